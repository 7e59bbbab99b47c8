// Long file: the entrypoint's delivery state machine (window, acks, spool, gaps), whose invariants are read together.
//! The entrypoint's outbox: numbers frames, sends them to the sidecar, keeps every frame until
//! the sidecar acknowledges it, and spools to disk when the sidecar cannot take them.
//!
//! Rules, in order, for a new frame:
//! 1. if the spool holds unsent frames, append to it (order is kept);
//! 2. else, with a sidecar connected and room in the in-memory window, send it;
//! 3. else, with a sidecar connected and Redis up, wait (back-pressure: the agent's pipe fills
//!    and the agent slows down to what Redis takes);
//! 4. else (no sidecar, or Redis down) append to the spool; past the spool's bound, drop the
//!    chunk and count it, and send an explicit `gap` frame once there is room again.
//!
//! A spool write that fails (a full disk) is the spool's bound reached early: the chunk is
//! dropped and counted like one that did not fit, never kept in memory ahead of older frames
//! still in the spool (a newer frame sent first would make Redis skip every older one as a
//! re-send). Lifecycle events are not dropped: they wait in memory behind the spool, in order.
//! The spool is tried again once it has been drained.
//!
//! Frames sent and not yet acknowledged stay in memory (bounded by the window) and are sent
//! again after a reconnect; Redis drops the duplicates by producer sequence.
//!
//! When no sidecar answers, the agent container's log (`kubectl logs POD -c agent`) says so:
//! at once when the socket refuses this process (with who this process is and who owns the
//! socket), after [`NO_SIDECAR_WARNING`] when no socket is there, and again when the sidecar is
//! back. Output is never dropped for that; it waits in the spool.
//!
//! The outbox sends its `Hello` with the key the sidecar handed over, and only to a socket
//! served by the sidecar's user (the owner of the hand-off file): a process of the agent's
//! user that put a socket of its own in the sidecar's place gets nothing. Its spool records
//! are authenticated with the same key.
//!
//! Control messages arrive numbered by their control stream seq; each is passed on to the
//! entrypoint once (a sidecar sends again what was not acknowledged when it reconnects), and
//! acknowledged to the sidecar once the entrypoint has applied it or refused it with a report.

use crate::auth::Key;
use crate::frame::{Frame, Pipe};
use crate::spool::{SpoolFile, write_spool};
use agentrun_protocol::{ControlMessage, StatusEvent, now_ms};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub socket: PathBuf,
    pub spool_dir: PathBuf,
    pub producer: String,
    /// Bytes sent and not yet acknowledged before the outbox waits or spools.
    pub window_bytes: usize,
    /// Largest spool; beyond it output is dropped and reported as a gap.
    pub spool_max_bytes: u64,
    /// How often to retry connecting to the sidecar.
    pub reconnect_every: Duration,
    /// The key from the sidecar (none: the sidecar refuses this outbox).
    pub key: Key,
    /// The sidecar's user: a socket served by anyone else does not get the key.
    pub sidecar_uid: Option<u32>,
}

/// Control messages the entrypoint may hold before it applies them; a sidecar sends at most
/// its window (`server::control_queue::WINDOW`) without an acknowledgement.
pub const CONTROL_QUEUE: usize = 256;
/// After the sidecar refused this outbox, how long before it tries again.
const REFUSED_RETRY: Duration = Duration::from_secs(2);

/// What the outbox reports when it is finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReport {
    /// The sidecar acknowledged everything.
    Delivered,
    /// The deadline passed; what was left is in this spool file for the sidecar to publish.
    Spooled {
        path: PathBuf,
        frames: usize,
        /// Why no sidecar ever took anything (the last connection error), when none did.
        no_sidecar: Option<String>,
    },
    /// The deadline passed and the frames could not even be written to disk.
    Lost { frames: usize, error: String },
}

enum Command {
    Data {
        pipe: Pipe,
        ts: u64,
        bytes: Bytes,
    },
    Event {
        ts: u64,
        event: StatusEvent,
    },
    Finish {
        deadline: Instant,
        reply: oneshot::Sender<FinishReport>,
    },
    Usage {
        cpu_millis: u64,
        rss_bytes: u64,
    },
}

/// Cheap handle used by the pipe readers and the main task.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Command>,
    /// Control seqs the entrypoint is done with (never waits: at most a window of them).
    control_done: mpsc::UnboundedSender<u64>,
}

impl Outbox {
    /// Starts the outbox task. Control messages from the sidecar arrive on the returned
    /// receiver with their control seq; tell the outbox about each with
    /// [`Outbox::control_done`]. Once the receiver is closed (the agent has exited), the
    /// outbox acknowledges what still comes and says on stderr that it was not applied.
    pub fn start(config: OutboxConfig) -> (Self, mpsc::Receiver<(u64, ControlMessage)>) {
        let (tx, rx) = mpsc::channel(8);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        tokio::spawn(Actor::new(config, control_tx, done_rx).run(rx));
        (
            Self {
                tx,
                control_done: done_tx,
            },
            control_rx,
        )
    }

    /// The control message `seq` has been applied, or refused with a report.
    pub fn control_done(&self, seq: u64) {
        let _ = self.control_done.send(seq);
    }

    /// Queues a chunk of output; waits while the outbox applies back-pressure.
    pub async fn data(&self, pipe: Pipe, bytes: Bytes) {
        let _ = self
            .tx
            .send(Command::Data {
                pipe,
                ts: now_ms(),
                bytes,
            })
            .await;
    }

    /// Queues a lifecycle event for the status stream.
    pub async fn event(&self, event: StatusEvent) {
        let _ = self
            .tx
            .send(Command::Event {
                ts: now_ms(),
                event,
            })
            .await;
    }

    /// Reports the agent's resource use to the sidecar if one is connected (never spooled).
    pub fn usage(&self, cpu_millis: u64, rss_bytes: u64) {
        let _ = self.tx.try_send(Command::Usage {
            cpu_millis,
            rss_bytes,
        });
    }

    /// Waits until everything is acknowledged, or until `timeout`, then stops the outbox.
    pub async fn finish(&self, timeout: Duration) -> FinishReport {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + timeout;
        if self
            .tx
            .send(Command::Finish { deadline, reply })
            .await
            .is_err()
        {
            return FinishReport::Lost {
                frames: 0,
                error: "the outbox has stopped".into(),
            };
        }
        rx.await.unwrap_or(FinishReport::Lost {
            frames: 0,
            error: "the outbox has stopped".into(),
        })
    }
}

/// How long no sidecar may answer before the agent container's log says so.
pub const NO_SIDECAR_WARNING: Duration = Duration::from_secs(10);

/// The state of the link to the sidecar, for what the entrypoint tells its log.
#[derive(Default)]
struct SidecarLink {
    ever_connected: bool,
    /// Since when no sidecar has been connected (`None` while one is).
    down_since: Option<Instant>,
    last_error: Option<String>,
    /// Whether the log was told about the current outage.
    reported: bool,
}

struct Connection {
    epoch: u64,
    writer: mpsc::UnboundedSender<Bytes>,
    /// Whether the sidecar has sent anything: it took the `Hello`.
    heard: bool,
}

enum Incoming {
    Frame(u64, Frame),
    Closed(u64),
}

#[derive(Default, Clone, Copy)]
struct Dropped {
    bytes: u64,
    chunks: u64,
}

struct Actor {
    config: OutboxConfig,
    control_tx: mpsc::Sender<(u64, ControlMessage)>,
    control_done_rx: mpsc::UnboundedReceiver<u64>,
    /// The highest control seq passed on to the entrypoint, and the highest it is done with.
    control_seen: u64,
    control_done: u64,
    /// When to try connecting next.
    next_connect: Instant,
    /// Whether the log was told that the sidecar refused this outbox, or that the socket is
    /// served by another user.
    refusal_reported: bool,
    impostor_reported: bool,
    next_fseq: u64,
    pseq_out: u64,
    pseq_err: u64,
    pseq_status: u64,
    inflight: VecDeque<Frame>,
    inflight_bytes: usize,
    spool: Option<SpoolFile>,
    spool_error: Option<String>,
    /// Events that the spool refused, waiting behind it in order (bounded by the window).
    held: VecDeque<Frame>,
    held_bytes: usize,
    dropped: [Dropped; 2],
    conn: Option<Connection>,
    epoch: u64,
    redis_up: bool,
    incoming_tx: mpsc::Sender<Incoming>,
    incoming_rx: mpsc::Receiver<Incoming>,
    finishing: Option<(Instant, oneshot::Sender<FinishReport>)>,
    link: SidecarLink,
}

impl Actor {
    fn new(
        config: OutboxConfig,
        control_tx: mpsc::Sender<(u64, ControlMessage)>,
        control_done_rx: mpsc::UnboundedReceiver<u64>,
    ) -> Self {
        let (incoming_tx, incoming_rx) = mpsc::channel(256);
        Self {
            config,
            control_tx,
            control_done_rx,
            control_seen: 0,
            control_done: 0,
            next_connect: Instant::now(),
            refusal_reported: false,
            impostor_reported: false,
            next_fseq: 1,
            pseq_out: 0,
            pseq_err: 0,
            pseq_status: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            spool: None,
            spool_error: None,
            held: VecDeque::new(),
            held_bytes: 0,
            dropped: [Dropped::default(); 2],
            conn: None,
            epoch: 0,
            redis_up: true,
            incoming_tx,
            incoming_rx,
            finishing: None,
            link: SidecarLink {
                down_since: Some(Instant::now()),
                ..Default::default()
            },
        }
    }

    fn spool_unread(&self) -> u64 {
        self.spool.as_ref().map_or(0, SpoolFile::unread)
    }

    fn window_full(&self) -> bool {
        self.inflight_bytes >= self.config.window_bytes
    }

    /// Whether the outbox must wait before taking another frame (rule 3).
    fn back_pressure(&self) -> bool {
        self.conn.is_some() && self.redis_up && self.spool_unread() == 0 && self.window_full()
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut commands_open = true;
        loop {
            self.pump_spool();
            if let Some(report) = self.check_finished() {
                if let Some((_, reply)) = self.finishing.take() {
                    let _ = reply.send(report);
                }
                return;
            }
            let accepting = commands_open && self.finishing.is_none() && !self.back_pressure();
            let finish_at = self.finishing.as_ref().map(|(d, _)| *d);
            tokio::select! {
                cmd = commands.recv(), if accepting => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => commands_open = false,
                },
                Some(msg) = self.incoming_rx.recv() => self.incoming(msg),
                Some(seq) = self.control_done_rx.recv() => self.done_with_control(seq),
                _ = tokio::time::sleep_until(self.next_connect), if self.conn.is_none() => {
                    self.next_connect = Instant::now() + self.config.reconnect_every;
                    self.connect().await;
                }
                _ = sleep_until_opt(finish_at) => {
                    let report = self.give_up();
                    if let Some((_, reply)) = self.finishing.take() {
                        let _ = reply.send(report);
                    }
                    return;
                }
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Data { pipe, ts, bytes } => {
                let weight = bytes.len() as u64 + 32;
                if self.must_spool() && !self.spool_has_room(weight) {
                    let d = &mut self.dropped[pipe as usize];
                    d.bytes += bytes.len() as u64;
                    d.chunks += 1;
                    return;
                }
                self.emit_gaps();
                let frame = Frame::Data {
                    fseq: self.fseq(),
                    pipe,
                    pseq: self.pseq(pipe),
                    ts,
                    bytes,
                };
                self.route(frame);
            }
            Command::Event { ts, event } => {
                self.emit_gaps();
                self.pseq_status += 1;
                let frame = Frame::Event {
                    fseq: self.fseq(),
                    pseq: self.pseq_status,
                    ts,
                    event,
                };
                self.route(frame);
            }
            Command::Usage {
                cpu_millis,
                rss_bytes,
            } => {
                if let Some(conn) = &self.conn {
                    let _ = conn.writer.send(
                        Frame::Usage {
                            cpu_millis,
                            rss_bytes,
                        }
                        .to_bytes(),
                    );
                }
            }
            Command::Finish { deadline, reply } => {
                self.emit_gaps();
                self.finishing = Some((deadline, reply));
            }
        }
    }

    fn fseq(&mut self) -> u64 {
        let f = self.next_fseq;
        self.next_fseq += 1;
        f
    }

    fn pseq(&mut self, pipe: Pipe) -> u64 {
        let p = match pipe {
            Pipe::Stdout => &mut self.pseq_out,
            Pipe::Stderr => &mut self.pseq_err,
        };
        *p += 1;
        *p
    }

    /// Whether a new frame goes to the spool rather than to the sidecar (rules 1 and 4).
    fn must_spool(&self) -> bool {
        self.spool_unread() > 0
            || !self.held.is_empty()
            || self.conn.is_none()
            || (self.window_full() && !self.redis_up)
    }

    fn spool_has_room(&self, weight: u64) -> bool {
        self.spool_error.is_none() && self.spool_unread() + weight <= self.config.spool_max_bytes
    }

    /// Sends the gap frames for output that was dropped, once there is room again.
    fn emit_gaps(&mut self) {
        for pipe in [Pipe::Stdout, Pipe::Stderr] {
            if let Some(frame) = self.take_gap(pipe) {
                self.route(frame);
            }
        }
    }

    /// The gap frame for what `pipe` dropped since the last one, if it dropped anything.
    fn take_gap(&mut self, pipe: Pipe) -> Option<Frame> {
        let d = std::mem::take(&mut self.dropped[pipe as usize]);
        (d.chunks > 0).then(|| Frame::Gap {
            fseq: self.fseq(),
            pipe,
            pseq: self.pseq(pipe),
            ts: now_ms(),
            dropped_bytes: d.bytes,
            dropped_chunks: d.chunks,
        })
    }

    fn route(&mut self, frame: Frame) {
        if !self.must_spool() {
            return self.send(frame);
        }
        if self.held.is_empty() && self.spool_error.is_none() {
            match self.spool_append(&frame) {
                Ok(()) => return,
                Err(e) => {
                    eprintln!(
                        "agentrun-entrypoint: cannot write the spool in {}: {e}; output that does not fit is dropped and reported as a gap until the spool is drained",
                        self.config.spool_dir.display()
                    );
                    self.spool_error = Some(e.to_string());
                }
            }
        }
        self.refused(frame);
    }

    /// A frame the spool cannot take: output is dropped and counted (its gap comes later);
    /// events wait in memory behind the spool, bounded by the window.
    fn refused(&mut self, frame: Frame) {
        match frame {
            Frame::Data { pipe, bytes, .. } => {
                let d = &mut self.dropped[pipe as usize];
                d.bytes += bytes.len() as u64;
                d.chunks += 1;
            }
            Frame::Gap {
                pipe,
                dropped_bytes,
                dropped_chunks,
                ..
            } => {
                let d = &mut self.dropped[pipe as usize];
                d.bytes += dropped_bytes;
                d.chunks += dropped_chunks;
            }
            frame if self.held_bytes < self.config.window_bytes => {
                self.held_bytes += frame.weight();
                self.held.push_back(frame);
            }
            _ => eprintln!(
                "agentrun-entrypoint: dropping a lifecycle event: the spool refuses writes and {} bytes of events already wait",
                self.held_bytes
            ),
        }
    }

    fn spool_append(&mut self, frame: &Frame) -> std::io::Result<()> {
        if self.spool.is_none() {
            self.spool = Some(SpoolFile::create(
                &self.config.spool_dir,
                &self.config.producer,
                &self.config.key,
            )?);
        }
        match self.spool.as_mut() {
            Some(s) => s.append(frame),
            None => Ok(()),
        }
    }

    fn send(&mut self, frame: Frame) {
        if let Some(conn) = &self.conn
            && conn.writer.send(frame.to_bytes()).is_err()
        {
            self.disconnected();
        }
        self.inflight_bytes += frame.weight();
        self.inflight.push_back(frame);
    }

    /// Moves spooled frames to the sidecar while there is room in the window.
    fn pump_spool(&mut self) {
        while self.conn.is_some() && !self.window_full() && self.spool_unread() > 0 {
            let next = match self.spool.as_mut().map(SpoolFile::next_frame) {
                Some(Ok(Some(f))) => f,
                Some(Ok(None)) | None => break,
                Some(Err(e)) => {
                    eprintln!("agentrun-entrypoint: the spool is unreadable: {e}");
                    self.spool_error = Some(e.to_string());
                    self.spool = None;
                    break;
                }
            };
            self.send(next);
        }
        if self.spool_unread() > 0 {
            return;
        }
        // Drained: the disk has room again (and what waited behind the spool goes next).
        self.spool_error = None;
        while self.conn.is_some() && !self.window_full() {
            let Some(frame) = self.held.pop_front() else {
                break;
            };
            self.held_bytes -= frame.weight();
            self.send(frame);
        }
        if self.held.is_empty() && self.conn.is_some() {
            self.emit_gaps();
        }
    }

    async fn connect(&mut self) {
        let stream = match UnixStream::connect(&self.config.socket).await {
            Ok(stream) => stream,
            Err(e) => return self.connect_failed(&e),
        };
        if let Some(expected) = self.config.sidecar_uid {
            let served_by = stream.peer_cred().map(|c| c.uid());
            if served_by.as_ref().ok() != Some(&expected) {
                let who = match served_by {
                    Ok(uid) => format!("uid {uid}"),
                    Err(e) => format!("a process this entrypoint cannot identify ({e})"),
                };
                self.link.last_error = Some(format!(
                    "the socket is served by {who}, not by the sidecar's user (uid {expected})"
                ));
                self.link.down_since.get_or_insert_with(Instant::now);
                if !std::mem::replace(&mut self.impostor_reported, true) {
                    eprintln!(
                        "agentrun-entrypoint: the socket {} is served by {who}, not by the sidecar's user (uid {expected}, the owner of the key it handed over); another process in the pod may have put its own socket there. This entrypoint sends it neither its key nor the agent's output; the output waits in the spool in {}",
                        self.config.socket.display(),
                        self.config.spool_dir.display()
                    );
                }
                return;
            }
        }
        let (mut read, mut write) = stream.into_split();
        self.epoch += 1;
        let epoch = self.epoch;
        let (writer, mut queue) = mpsc::unbounded_channel::<Bytes>();
        let incoming = self.incoming_tx.clone();
        tokio::spawn(async move {
            while let Some(bytes) = queue.recv().await {
                if write.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            loop {
                match Frame::read(&mut read).await {
                    Ok(Some(f)) => {
                        if incoming.send(Incoming::Frame(epoch, f)).await.is_err() {
                            return;
                        }
                    }
                    _ => {
                        let _ = incoming.send(Incoming::Closed(epoch)).await;
                        return;
                    }
                }
            }
        });
        let hello = Frame::Hello {
            producer: self.config.producer.clone(),
            pid: std::process::id(),
            key: self.config.key.bytes().copied(),
        };
        let mut batch = BytesMut::new();
        hello.encode(&mut batch);
        for f in &self.inflight {
            f.encode(&mut batch);
        }
        if writer.send(batch.freeze()).is_ok() {
            self.redis_up = true;
            self.conn = Some(Connection {
                epoch,
                writer,
                heard: false,
            });
        }
    }

    /// Tells the log about a sidecar that cannot be reached (once per outage).
    fn connect_failed(&mut self, error: &std::io::Error) {
        let now = Instant::now();
        let since = *self.link.down_since.get_or_insert(now);
        self.link.last_error = Some(error.to_string());
        if self.link.reported {
            return;
        }
        let socket = self.config.socket.display();
        let spool = self.config.spool_dir.display();
        let absent = matches!(
            error.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        );
        if !absent {
            eprintln!(
                "agentrun-entrypoint: cannot connect to the sidecar on {socket}: {error}. {}. The agent's output waits in the spool in {spool} and reaches Redis only once this process can connect.",
                identity_and_socket(&self.config.socket)
            );
            self.link.reported = true;
        } else if now.duration_since(since) >= NO_SIDECAR_WARNING {
            eprintln!(
                "agentrun-entrypoint: no sidecar has answered on {socket} for {}s ({error}); the agent's output waits in the spool in {spool} until one does. Is the agentrun-sidecar container running? kubectl logs POD -c agentrun-sidecar",
                now.duration_since(since).as_secs()
            );
            self.link.reported = true;
        }
    }

    /// The sidecar took this outbox's `Hello` (it sent something back).
    fn accepted(&mut self) {
        if self.link.reported || self.refusal_reported {
            eprintln!(
                "agentrun-entrypoint: connected to the sidecar on {}; delivering the output that waited",
                self.config.socket.display()
            );
        }
        self.refusal_reported = false;
        self.link = SidecarLink {
            ever_connected: true,
            ..Default::default()
        };
    }

    fn disconnected(&mut self) {
        self.conn = None;
        self.link.down_since.get_or_insert_with(Instant::now);
    }

    /// The sidecar closed the connection without a word: it did not take the `Hello`.
    fn hello_refused(&mut self) {
        let why = if self.config.key.is_none() {
            "this entrypoint has no key (see above)"
        } else {
            "it does not take this entrypoint's key"
        };
        self.link.last_error = Some(format!(
            "the sidecar closed the connection after the hello: {why}"
        ));
        self.next_connect = Instant::now() + REFUSED_RETRY;
        if !std::mem::replace(&mut self.refusal_reported, true) {
            eprintln!(
                "agentrun-entrypoint: the sidecar on {} refused this entrypoint: {why}. The agent's output waits in the spool in {} and is not published; the run's status says so (SocketClientRefused)",
                self.config.socket.display(),
                self.config.spool_dir.display()
            );
        }
    }

    /// The entrypoint is done with control message `seq`: tell the sidecar.
    fn done_with_control(&mut self, seq: u64) {
        self.control_done = self.control_done.max(seq);
        self.send_control_ack();
    }

    fn send_control_ack(&mut self) {
        if self.control_done == 0 {
            return;
        }
        if let Some(conn) = &self.conn {
            let _ = conn.writer.send(
                Frame::ControlAck {
                    seq: self.control_done,
                }
                .to_bytes(),
            );
        }
    }

    /// A control message from the sidecar: passed on once per seq.
    fn control(&mut self, seq: u64, msg: ControlMessage) {
        if seq <= self.control_done {
            // Sent again by a sidecar that had not seen the acknowledgement.
            return self.send_control_ack();
        }
        if seq <= self.control_seen {
            return; // being applied; acknowledged when done
        }
        let action = msg.action;
        match self.control_tx.try_send((seq, msg)) {
            Ok(()) => self.control_seen = seq,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                eprintln!(
                    "agentrun-entrypoint: control message {seq} ({action}) arrived after the agent exited; it was not applied"
                );
                self.control_seen = seq;
                self.done_with_control(seq);
            }
            Err(mpsc::error::TrySendError::Full(_)) => eprintln!(
                "agentrun-entrypoint: control message {seq} ({action}) does not fit in the {CONTROL_QUEUE} waiting to be applied; it stays with the sidecar, which sends it again"
            ),
        }
    }

    fn incoming(&mut self, msg: Incoming) {
        match msg {
            Incoming::Closed(epoch) => {
                if let Some(conn) = self.conn.as_ref().filter(|c| c.epoch == epoch) {
                    let heard = conn.heard;
                    self.disconnected();
                    if !heard {
                        self.hello_refused();
                    }
                }
            }
            Incoming::Frame(epoch, frame) => {
                let Some(conn) = self.conn.as_mut().filter(|c| c.epoch == epoch) else {
                    return;
                };
                if !std::mem::replace(&mut conn.heard, true) {
                    self.accepted();
                }
                match frame {
                    Frame::Ack { fseq } => {
                        while self
                            .inflight
                            .front()
                            .and_then(Frame::fseq)
                            .is_some_and(|f| f <= fseq)
                        {
                            if let Some(f) = self.inflight.pop_front() {
                                self.inflight_bytes -= f.weight();
                            }
                        }
                    }
                    Frame::Health { redis_up } => self.redis_up = redis_up,
                    Frame::Control { seq, msg } => self.control(seq, msg),
                    _ => {}
                }
            }
        }
    }

    fn check_finished(&mut self) -> Option<FinishReport> {
        self.finishing.as_ref()?;
        let dropped_unreported = self.dropped.iter().any(|d| d.chunks > 0);
        let done = self.inflight.is_empty()
            && self.spool_unread() == 0
            && self.held.is_empty()
            && !dropped_unreported;
        if !done {
            return None;
        }
        if let Some(conn) = &self.conn {
            let _ = conn.writer.send(Frame::Done.to_bytes());
        }
        Some(FinishReport::Delivered)
    }

    /// The deadline passed: leave everything unacknowledged in a spool file.
    fn give_up(&mut self) -> FinishReport {
        let front: Vec<Frame> = self.inflight.drain(..).collect();
        let mut back: Vec<Frame> = self.held.drain(..).collect();
        self.held_bytes = 0;
        for pipe in [Pipe::Stdout, Pipe::Stderr] {
            back.extend(self.take_gap(pipe));
        }
        let frames =
            front.len() + back.len() + self.spool.as_ref().map_or(0, SpoolFile::unread_frames);
        let result = match self.spool.take() {
            Some(spool) => spool.persist(&front, &back),
            None => {
                let all: Vec<Frame> = front.into_iter().chain(back).collect();
                write_spool(
                    &self.config.spool_dir,
                    &self.config.producer,
                    &all,
                    &self.config.key,
                )
            }
        };
        match result {
            Ok(path) => FinishReport::Spooled {
                path,
                frames,
                no_sidecar: (!self.link.ever_connected).then(|| {
                    self.link
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "no connection was made".into())
                }),
            },
            Err(e) => FinishReport::Lost {
                frames,
                error: e.to_string(),
            },
        }
    }
}

/// Who this process is and who owns the socket, for a refused connection.
fn identity_and_socket(socket: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let groups = nix::unistd::getgroups()
        .map(|g| {
            g.iter()
                .map(|g| g.as_raw().to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let me = format!(
        "This process runs as uid {}, gid {}, groups [{groups}]",
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    match std::fs::metadata(socket) {
        Ok(m) => format!(
            "{me}; the socket belongs to uid {}, gid {} with mode {:o}",
            m.uid(),
            m.gid(),
            m.mode() & 0o7777
        ),
        Err(e) => format!("{me}; the socket cannot be looked at: {e}"),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

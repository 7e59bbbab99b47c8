//! `agentrun-sidecar serve`: takes frames from the entrypoint over a Unix socket and publishes
//! them to the run's Redis streams and channels; forwards control messages back.

mod adopt;
mod control;
mod entrypoint_watch;
mod publisher;

use crate::frame::{Frame, Pipe};
use crate::metrics::Metrics;
use agentrun_protocol::{
    ControlMessage, EntryType, NewEntry, PublishOptions, Publisher, RedisSettings, RunId, RunState,
    StatusEvent, StreamName, Variation, now_ms,
};
use bytes::Bytes;
use publisher::{Item, PublishLoop};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub socket: PathBuf,
    /// Where orphaned spool files are looked for (the socket's directory by default).
    pub spool_dir: PathBuf,
    pub redis: RedisSettings,
    pub run: RunId,
    pub variation: Variation,
    pub metrics_addr: Option<SocketAddr>,
    /// `MAXLEN ~` for output and logs streams.
    pub stream_max_len: u64,
    /// TTL put on the run's keys once it has ended.
    pub retention: Duration,
    /// On shutdown, how long to keep trying to deliver what is held.
    pub drain_timeout: Duration,
    /// Bytes the sidecar holds for Redis before it stops reading the socket.
    pub buffer_bytes: usize,
    /// How often figures are published to `run:{RUN}:metrics` (zero: never).
    pub metrics_interval: Duration,
    /// Local mode (`agentrun-sidecar run`): this sidecar owns the whole run, so it also
    /// writes the run's `phase` and puts the TTL on every key of the run.
    pub owns_run: bool,
    /// Give up at start when Redis cannot be reached in this time (`None`: keep trying).
    pub fail_fast: Option<Duration>,
}

impl SidecarConfig {
    pub fn new(socket: PathBuf, redis: RedisSettings, run: RunId, variation: Variation) -> Self {
        let spool_dir = socket
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        Self {
            socket,
            spool_dir,
            redis,
            run,
            variation,
            metrics_addr: None,
            stream_max_len: 10_000,
            retention: Duration::from_secs(24 * 3600),
            drain_timeout: Duration::from_secs(20),
            buffer_bytes: 16 * 1024 * 1024,
            metrics_interval: Duration::from_secs(5),
            owns_run: false,
            fail_fast: None,
        }
    }
}

/// Errors that stop the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("cannot listen on the socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot reach Redis at {target} within {waited:?}: {reason}. Check --redis-url and that Redis is running"
    )]
    RedisUnreachable {
        target: String,
        waited: Duration,
        reason: String,
    },
}

/// Binds the entrypoint's socket, open to every user of the pod.
///
/// On a real kubelet the agent container runs as whatever user its image or securityContext
/// says (root with no capabilities, any uid, OpenShift's random uid with gid 0), never as the
/// sidecar's user, and `connect()` needs write permission on the socket file. The socket lives
/// on the pod's own volume, which only the pod's containers see, so mode 0666 opens it to the
/// agent container and to nothing outside the pod.
fn bind_socket(path: &std::path::Path) -> Result<UnixListener, SidecarError> {
    use std::os::unix::fs::PermissionsExt;
    let error = |source| SidecarError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(error)?;
    Ok(listener)
}

/// What a finished sidecar did.
#[derive(Debug, Clone, Default)]
pub struct ServeReport {
    /// Bytes still held when the drain deadline passed (0 when everything was delivered).
    pub undelivered_bytes: u64,
    pub metrics_addr: Option<SocketAddr>,
}

/// The entrypoint currently connected.
struct Peer {
    epoch: u64,
    writer: mpsc::UnboundedSender<Bytes>,
}

pub(crate) struct Shared {
    config: SidecarConfig,
    metrics: Metrics,
    peer: Mutex<Option<Peer>>,
    pending_control: Mutex<VecDeque<ControlMessage>>,
    redis_up: watch::Sender<bool>,
    /// Set when an entrypoint said it has sent everything.
    entrypoint_done: watch::Sender<bool>,
    /// Spools published but not removable (the volume refused): not published again.
    published_spools: Mutex<std::collections::HashSet<PathBuf>>,
}

impl Shared {
    fn send_to_peer(&self, frame: &Frame, epoch: Option<u64>) -> bool {
        let guard = self.peer.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(p) if epoch.is_none_or(|e| e == p.epoch) => {
                p.writer.send(frame.to_bytes()).is_ok()
            }
            _ => false,
        }
    }

    pub(crate) fn ack(&self, epoch: u64, fseq: u64) {
        self.send_to_peer(&Frame::Ack { fseq }, Some(epoch));
    }

    pub(crate) fn set_redis_up(&self, up: bool) {
        self.metrics.redis_up.set(i64::from(up));
        let changed = self
            .redis_up
            .send_if_modified(|v| std::mem::replace(v, up) != up);
        if changed {
            self.send_to_peer(&Frame::Health { redis_up: up }, None);
        }
    }

    pub(crate) fn forward_control(&self, msg: ControlMessage) {
        self.metrics.control_messages.inc();
        if !self.send_to_peer(&Frame::Control(msg.clone()), None) {
            let mut q = self
                .pending_control
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if q.len() >= 64 {
                q.pop_front();
            }
            q.push_back(msg);
        }
    }
}

/// A running sidecar.
pub struct Sidecar {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    done: oneshot::Receiver<ServeReport>,
    pub metrics_addr: Option<SocketAddr>,
}

impl Sidecar {
    /// Binds the socket (and the metrics address) and starts serving.
    pub async fn start(config: SidecarConfig) -> Result<Self, SidecarError> {
        let metrics = Metrics::new();
        let metrics_addr = match config.metrics_addr {
            Some(addr) => Some(
                crate::metrics::serve(addr, metrics.clone())
                    .await
                    .map_err(|source| SidecarError::Metrics { addr, source })?,
            ),
            None => None,
        };
        let _ = std::fs::remove_file(&config.socket);
        if let Some(dir) = config.socket.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let listener = bind_socket(&config.socket)?;

        let publish_options = PublishOptions {
            max_len: Some(config.stream_max_len),
            publish_command: config.redis.publish_command(),
        };
        let (publish_loop, conn) = PublishLoop::connect(
            config.redis.clone(),
            Publisher::new(publish_options),
            config.fail_fast,
        )
        .await
        .map_err(|reason| SidecarError::RedisUnreachable {
            target: config.redis.target(),
            waited: config.fail_fast.unwrap_or_default(),
            reason,
        })?;

        let shared = Arc::new(Shared {
            config: config.clone(),
            metrics: metrics.clone(),
            peer: Mutex::new(None),
            pending_control: Mutex::new(VecDeque::new()),
            redis_up: watch::channel(conn.is_some()).0,
            entrypoint_done: watch::channel(false).0,
            published_spools: Mutex::new(Default::default()),
        });
        shared.set_redis_up(conn.is_some());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (done_tx, done) = oneshot::channel();
        tokio::spawn(run(
            shared.clone(),
            listener,
            publish_loop,
            conn,
            shutdown_rx,
            done_tx,
        ));
        Ok(Self {
            shared,
            shutdown,
            done,
            metrics_addr,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Stops accepting, delivers what it holds (bounded by the drain timeout) and returns.
    pub async fn shutdown(self) -> ServeReport {
        let _ = self.shutdown.send(true);
        self.done.await.unwrap_or_default()
    }

    /// Waits until an entrypoint has reported that it sent everything.
    pub async fn entrypoint_done(&self) {
        let mut rx = self.shared.entrypoint_done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }
}

async fn run(
    shared: Arc<Shared>,
    listener: UnixListener,
    publish_loop: PublishLoop,
    conn: Option<agentrun_protocol::RedisConn>,
    mut shutdown: watch::Receiver<bool>,
    done: oneshot::Sender<ServeReport>,
) {
    let budget = Arc::new(Semaphore::new(shared.config.buffer_bytes));
    let (items_tx, items_rx) = mpsc::channel::<Item>(4096);
    let sidecar_producer: Arc<str> =
        Arc::from(crate::entrypoint::new_producer_id("sidecar").as_str());
    let publisher = tokio::spawn(publish_loop.run(shared.clone(), conn, items_rx));
    let controls = tokio::spawn(control::subscribe(shared.clone()));
    let pinger = tokio::spawn(health_pinger(shared.clone()));
    shared
        .metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);

    // Spools left by an entrypoint that exited while no sidecar was there: published while
    // this sidecar already serves (Redis may be away for long; the entrypoint must not wait).
    let adoption = tokio::spawn(adopt::adopt_orphans(
        shared.clone(),
        items_tx.clone(),
        budget.clone(),
        None,
    ));
    let pseq = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let starting = StatusEvent::new(Some(shared.config.variation.as_str()), RunState::Starting)
        .reason("SidecarStarted")
        .source("sidecar");
    push_status(&items_tx, &sidecar_producer, &pseq, starting).await;
    let figures = tokio::spawn(metrics_ticker(
        shared.clone(),
        items_tx.clone(),
        sidecar_producer.clone(),
        pseq.clone(),
    ));
    let watchdog = tokio::spawn(entrypoint_watch::run(
        shared.clone(),
        items_tx.clone(),
        sidecar_producer.clone(),
        pseq.clone(),
    ));

    let mut epoch = 0;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    epoch += 1;
                    tokio::spawn(handle_connection(shared.clone(), stream, epoch, items_tx.clone(), budget.clone()));
                }
            }
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&shared.config.socket);
    figures.abort();
    watchdog.abort();

    // Drain: let a connected entrypoint finish (bounded), adopt spools it may have left, and
    // wait for the publisher to deliver everything queued before the barrier.
    let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
    let has_peer = shared.peer.lock().map(|p| p.is_some()).unwrap_or(false);
    if has_peer {
        let mut d = shared.entrypoint_done.subscribe();
        let _ = tokio::time::timeout_at(deadline, d.wait_for(|v| *v)).await;
    }
    adoption.abort();
    let _ = adoption.await; // its spool locks are released before the final scan
    let _ = tokio::time::timeout_at(
        deadline,
        adopt::adopt_orphans(
            shared.clone(),
            items_tx.clone(),
            budget.clone(),
            Some(deadline),
        ),
    )
    .await;
    let (barrier_tx, barrier_rx) = oneshot::channel();
    let _ = items_tx.send(Item::Barrier(barrier_tx)).await;
    let delivered = tokio::time::timeout_at(deadline, barrier_rx).await.is_ok();
    controls.abort();
    pinger.abort();
    let undelivered = if delivered {
        0
    } else {
        (shared.config.buffer_bytes - budget.available_permits()) as u64
    };
    publisher.abort();
    if undelivered > 0 {
        tracing::error!(
            undelivered_bytes = undelivered,
            "Redis did not take everything before the drain deadline; the entrypoint's spool keeps what it had not been told was delivered"
        );
    }
    let _ = done.send(ServeReport {
        undelivered_bytes: undelivered,
        metrics_addr: None,
    });
}

/// Notices an outage (and the end of one) while nothing is being published, so readiness and
/// the entrypoint's spooling decision follow Redis even when the agent is quiet.
async fn health_pinger(shared: Arc<Shared>) {
    let mut conn = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if conn.is_none() {
            conn = shared.config.redis.connect().await.ok();
        }
        let ok = match conn.as_mut() {
            Some(c) => redis::cmd("PING").query_async::<String>(c).await.is_ok(),
            None => false,
        };
        if !ok {
            conn = None;
            shared.set_redis_up(false);
        } else if shared.metrics.buffered_bytes.get() == 0 {
            shared.set_redis_up(true);
        }
    }
}

async fn push_status(
    items: &mpsc::Sender<Item>,
    producer: &Arc<str>,
    pseq: &std::sync::atomic::AtomicU64,
    event: StatusEvent,
) {
    let p = pseq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    let entry = NewEntry {
        pseq: p,
        ts: now_ms(),
        kind: EntryType::Status,
        content: Bytes::from(event.to_json()),
        meta: None,
    };
    let _ = items
        .send(Item::Entry {
            stream: StreamName::Status,
            producer: producer.clone(),
            entry: Box::new(entry),
            ack: None,
            status: Some(event),
            permit: None,
        })
        .await;
}

async fn metrics_ticker(
    shared: Arc<Shared>,
    items: mpsc::Sender<Item>,
    producer: Arc<str>,
    pseq: Arc<std::sync::atomic::AtomicU64>,
) {
    if shared.config.metrics_interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(shared.config.metrics_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        if !*shared.redis_up.borrow() {
            continue; // live figures are not worth buffering through an outage
        }
        let m = &shared.metrics;
        let figures = serde_json::json!({
            "variation": shared.config.variation.as_str(),
            "outputBytes": m.bytes_in.with_label_values(&["output"]).get(),
            "logsBytes": m.bytes_in.with_label_values(&["logs"]).get(),
            "entriesPublished": m.entries_published.get(),
            "bufferedBytes": m.buffered_bytes.get(),
            "publishErrors": m.publish_errors.get(),
            "gapBytes": m.gap_bytes.get(),
            "agentCpuMillis": m.agent_cpu_millis.get(),
            "agentMemoryBytes": m.agent_rss_bytes.get(),
        });
        let p = pseq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let entry = NewEntry {
            pseq: p,
            ts: now_ms(),
            kind: EntryType::Metrics,
            content: Bytes::from(figures.to_string()),
            meta: None,
        };
        if items
            .send(Item::Entry {
                stream: StreamName::Metrics,
                producer: producer.clone(),
                entry: Box::new(entry),
                ack: None,
                status: None,
                permit: None,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Turns a frame from an entrypoint into an item for the publisher.
async fn frame_item(
    shared: &Arc<Shared>,
    producer: &Arc<str>,
    frame: Frame,
    epoch: Option<u64>,
    budget: &Arc<Semaphore>,
) -> Option<Item> {
    let var = &shared.config.variation;
    let weight = frame.weight().min(shared.config.buffer_bytes) as u32;
    let fseq = frame.fseq()?;
    let (stream, entry, status) = match frame {
        Frame::Data {
            pipe,
            pseq,
            ts,
            bytes,
            ..
        } => {
            let (stream, kind, label) = match pipe {
                Pipe::Stdout => (StreamName::Output(var.clone()), EntryType::Output, "output"),
                Pipe::Stderr => (StreamName::Logs(var.clone()), EntryType::Logs, "logs"),
            };
            shared
                .metrics
                .bytes_in
                .with_label_values(&[label])
                .inc_by(bytes.len() as u64);
            (
                stream,
                NewEntry {
                    pseq,
                    ts,
                    kind,
                    content: bytes,
                    meta: None,
                },
                None,
            )
        }
        Frame::Gap {
            pipe,
            pseq,
            ts,
            dropped_bytes,
            dropped_chunks,
            ..
        } => {
            let stream = match pipe {
                Pipe::Stdout => StreamName::Output(var.clone()),
                Pipe::Stderr => StreamName::Logs(var.clone()),
            };
            shared.metrics.gap_bytes.inc_by(dropped_bytes);
            let meta = serde_json::json!({"droppedBytes": dropped_bytes, "droppedChunks": dropped_chunks, "reason": "spool full"});
            let content = format!(
                "[agentrun: {dropped_bytes} bytes of output were dropped because the spool was full]"
            );
            (
                stream,
                NewEntry {
                    pseq,
                    ts,
                    kind: EntryType::Gap,
                    content: Bytes::from(content),
                    meta: Some(meta.to_string()),
                },
                None,
            )
        }
        Frame::Event {
            pseq,
            ts,
            mut event,
            ..
        } => {
            event.variation = Some(var.as_str().to_owned());
            event.source = Some("sidecar".into());
            let content = Bytes::from(event.to_json());
            (
                StreamName::Status,
                NewEntry {
                    pseq,
                    ts,
                    kind: EntryType::Status,
                    content,
                    meta: None,
                },
                Some(event),
            )
        }
        _ => return None,
    };
    let permit = budget.clone().acquire_many_owned(weight).await.ok()?;
    shared.metrics.buffered_bytes.add(i64::from(weight));
    Some(Item::Entry {
        stream,
        producer: producer.clone(),
        entry: Box::new(entry),
        ack: epoch.map(|e| (e, fseq)),
        status,
        permit: Some((permit, weight)),
    })
}

async fn handle_connection(
    shared: Arc<Shared>,
    stream: UnixStream,
    epoch: u64,
    items: mpsc::Sender<Item>,
    budget: Arc<Semaphore>,
) {
    let (mut read, mut write) = stream.into_split();
    let producer: Arc<str> =
        match tokio::time::timeout(Duration::from_secs(10), Frame::read(&mut read)).await {
            Ok(Ok(Some(Frame::Hello { producer, .. }))) => Arc::from(producer.as_str()),
            _ => {
                tracing::warn!("a client connected to the socket without saying hello; closing it");
                return;
            }
        };
    let (writer, mut queue) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(async move {
        while let Some(b) = queue.recv().await {
            if write.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let _ = writer.send(
        Frame::Health {
            redis_up: *shared.redis_up.borrow(),
        }
        .to_bytes(),
    );
    {
        let pending: Vec<ControlMessage> = shared
            .pending_control
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default();
        for msg in pending {
            let _ = writer.send(Frame::Control(msg).to_bytes());
        }
    }
    if let Ok(mut p) = shared.peer.lock() {
        *p = Some(Peer { epoch, writer });
    }
    tracing::info!(producer = %producer, "entrypoint connected");
    loop {
        match Frame::read(&mut read).await {
            Ok(Some(Frame::Usage {
                cpu_millis,
                rss_bytes,
            })) => {
                shared.metrics.agent_cpu_millis.set(cpu_millis as i64);
                shared.metrics.agent_rss_bytes.set(rss_bytes as i64);
            }
            Ok(Some(Frame::Done)) => {
                let _ = shared.entrypoint_done.send(true);
            }
            Ok(Some(frame)) => {
                if let Some(item) =
                    frame_item(&shared, &producer, frame, Some(epoch), &budget).await
                    && items.send(item).await.is_err()
                {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "dropping the entrypoint connection");
                break;
            }
        }
    }
    if let Ok(mut p) = shared.peer.lock()
        && p.as_ref().is_some_and(|p| p.epoch == epoch)
    {
        *p = None;
    }
    tracing::info!(producer = %producer, "entrypoint disconnected");
}

//! `agentrun-sidecar serve`: takes frames from the entrypoint over a Unix socket and publishes
//! them to the run's Redis streams and channels; forwards control messages back.

mod adopt;
mod control;
mod entrypoint_watch;
mod publisher;

use crate::auth::{self, Key, KeyFileError, KeyOrigin};
use crate::frame::{Frame, MAX_HELLO, Pipe};
use crate::metrics::Metrics;
use agentrun_protocol::{
    EntryType, NewEntry, PublishOptions, Publisher, RedisSettings, RunId, RunState, StatusEvent,
    StreamName, Variation, now_ms,
};
use bytes::Bytes;
use publisher::{Item, PublishLoop};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

/// How long a new connection has to present its `Hello` before it is closed.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections that may wait for their `Hello` at once; a new one closes the oldest. The
/// entrypoint writes its `Hello` with its `connect`, so only a client that stalls waits.
pub const MAX_UNAUTHENTICATED: usize = 4;
/// Reason of the status event that reports a refused socket client.
pub const SOCKET_REFUSED_REASON: &str = "SocketClientRefused";
/// Reason of the status event that reports a spool that is not authentic.
pub const SPOOL_REFUSED_REASON: &str = "SpoolRefused";

#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub socket: PathBuf,
    /// The sidecar's private state directory (a volume mounted in the sidecar container only),
    /// where it keeps its key across restarts. Without one the key lives in memory only.
    pub state_dir: Option<PathBuf>,
    /// Where the key is handed to the entrypoint (next to the socket by default).
    pub handoff_file: PathBuf,
    /// The key, when the entrypoint runs in this process (`agentrun-sidecar run`): nothing is
    /// handed off or persisted.
    pub key: Option<Key>,
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
    /// When this sidecar settles the run's phase (no operator): mark the run for archiving,
    /// put it on the archive queue once it ends, and leave its TTL to the archiver.
    pub archive: bool,
    /// What Redis must confirm before frames are acknowledged to the entrypoint.
    pub durability: agentrun_protocol::durability::Durability,
}

impl SidecarConfig {
    pub fn new(socket: PathBuf, redis: RedisSettings, run: RunId, variation: Variation) -> Self {
        let spool_dir = socket
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        Self {
            handoff_file: spool_dir.join(auth::HANDOFF_FILE),
            state_dir: None,
            key: None,
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
            archive: false,
            durability: agentrun_protocol::durability::Durability::None,
        }
    }
}

/// Errors that stop the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("cannot set up the key for the entrypoint: {0}")]
    Key(#[from] KeyFileError),
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
    #[error("{0}")]
    Durability(String),
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

/// What is remembered about clients refused on the socket.
#[derive(Default)]
struct Refusals {
    /// Whether the run's status was told (once per sidecar process).
    reported: bool,
    /// Refusals since the last log line, and when that was.
    unlogged: u64,
    last_log: Option<tokio::time::Instant>,
}

pub(crate) struct Shared {
    config: SidecarConfig,
    metrics: Metrics,
    key: Key,
    peer: Mutex<Option<Peer>>,
    /// Control messages taken from the stream and not yet acknowledged by the entrypoint.
    control: Mutex<control::Queue>,
    /// Woken when the entrypoint acknowledges control messages.
    control_acked: tokio::sync::Notify,
    redis_up: watch::Sender<bool>,
    /// Set when an entrypoint said it has sent everything.
    entrypoint_done: watch::Sender<bool>,
    /// Spools published but not removable (the volume refused): not published again.
    published_spools: Mutex<std::collections::HashSet<PathBuf>>,
    /// Spools refused as not authentic: left in place, reported once, not read again.
    refused_spools: Mutex<std::collections::HashSet<PathBuf>>,
    /// Connections waiting for their `Hello`, oldest first, each with its eviction switch.
    unauthenticated: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    refusals: Mutex<Refusals>,
    /// The producer id and sequence of the sidecar's own status and metrics entries.
    producer: Arc<str>,
    pseq: Arc<AtomicU64>,
    /// The variation's latest state, for the sidecar's notices (which must not change it).
    last_state: Mutex<RunState>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn send_to_peer(&self, frame: &Frame, epoch: Option<u64>) -> bool {
        let guard = lock(&self.peer);
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

    /// Registers a new connection as waiting for its `Hello`; past [`MAX_UNAUTHENTICATED`]
    /// the oldest waiting one is closed. The receiver fires when this one is.
    fn admit(&self, epoch: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut waiting = lock(&self.unauthenticated);
        if waiting.len() >= MAX_UNAUTHENTICATED
            && let Some((_, oldest)) = waiting.pop_front()
        {
            let _ = oldest.send(());
        }
        waiting.push_back((epoch, tx));
        rx
    }

    /// The connection is no longer waiting for its `Hello`.
    fn admitted(&self, epoch: u64) {
        lock(&self.unauthenticated).retain(|(e, _)| *e != epoch);
    }

    /// Records the variation's state as the entrypoint or the sidecar reported it.
    fn saw_state(&self, state: RunState) {
        *lock(&self.last_state) = state;
    }

    /// Publishes a fact about the sidecar on the status stream without changing the
    /// variation's state: the event carries the latest state, and is not mirrored into the
    /// state hash (so it never moves the run's phase, even after the run has ended).
    pub(crate) async fn notice(&self, items: &mpsc::Sender<Item>, reason: &str, message: String) {
        let state = *lock(&self.last_state);
        let event = StatusEvent::new(Some(self.config.variation.as_str()), state)
            .reason(reason)
            .message(message)
            .source("sidecar");
        push_status(items, &self.producer, &self.pseq, event, false).await;
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
    /// Sets up the key (handing it off to the entrypoint on a first start), binds the socket,
    /// then the metrics address, and starts serving. The hand-off file exists before the
    /// health endpoint answers, so the kubelet, which starts the agent container once the
    /// sidecar's startup probe passes, never starts the entrypoint before its key is there.
    pub async fn start(config: SidecarConfig) -> Result<Self, SidecarError> {
        let key = match &config.key {
            Some(key) => key.clone(),
            None => setup_key(&config)?,
        };
        let _ = std::fs::remove_file(&config.socket);
        if let Some(dir) = config.socket.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let listener = bind_socket(&config.socket)?;
        let metrics = Metrics::new();
        let metrics_addr = match config.metrics_addr {
            Some(addr) => Some(
                crate::metrics::serve(addr, metrics.clone())
                    .await
                    .map_err(|source| SidecarError::Metrics { addr, source })?,
            ),
            None => None,
        };

        let publish_options = PublishOptions {
            max_len: Some(config.stream_max_len),
            publish_command: config.redis.publish_command(),
        };
        let (publish_loop, mut conn) = PublishLoop::connect(
            config.redis.clone(),
            Publisher::new(publish_options),
            config.fail_fast,
            config.durability,
        )
        .await
        .map_err(|reason| SidecarError::RedisUnreachable {
            target: config.redis.target(),
            waited: config.fail_fast.unwrap_or_default(),
            reason,
        })?;
        // A level this Redis cannot give is refused now rather than found at the first batch.
        if let Some(c) = conn.as_mut() {
            publisher::check_durability(c, config.durability)
                .await
                .map_err(SidecarError::Durability)?;
        }
        // A restarted sidecar reports its notices with the state the variation is in.
        let mut last_state = RunState::Starting;
        if let Some(c) = conn.as_mut() {
            let latest: Option<String> = redis::cmd("HGET")
                .arg(config.run.state_key())
                .arg(format!("var:{}", config.variation))
                .query_async(c)
                .await
                .unwrap_or_default();
            if let Some(event) = latest.and_then(|j| serde_json::from_str::<StatusEvent>(&j).ok()) {
                last_state = event.state;
            }
        }

        let shared = Arc::new(Shared {
            config: config.clone(),
            metrics: metrics.clone(),
            key,
            peer: Mutex::new(None),
            control: Mutex::new(control::Queue::default()),
            control_acked: tokio::sync::Notify::new(),
            redis_up: watch::channel(conn.is_some()).0,
            entrypoint_done: watch::channel(false).0,
            published_spools: Mutex::new(Default::default()),
            refused_spools: Mutex::new(Default::default()),
            unauthenticated: Mutex::new(VecDeque::new()),
            refusals: Mutex::new(Refusals::default()),
            producer: Arc::from(crate::entrypoint::new_producer_id("sidecar").as_str()),
            pseq: Arc::new(AtomicU64::new(0)),
            last_state: Mutex::new(last_state),
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

/// The sidecar's key: from its state directory, or new and handed off (see [`crate::auth`]).
fn setup_key(config: &SidecarConfig) -> Result<Key, SidecarError> {
    if let Some(dir) = &config.state_dir
        && !dir.exists()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| KeyFileError::Unwritable {
                path: dir.clone(),
                source,
            })?;
    }
    let (key, origin) = auth::sidecar_key(config.state_dir.as_deref(), &config.handoff_file)?;
    match (origin, &config.state_dir) {
        (KeyOrigin::Restored, Some(dir)) => tracing::info!(
            state_dir = %dir.display(),
            "restarted: using the key from the state directory; the running entrypoint reconnects with it"
        ),
        (KeyOrigin::HandedOff, Some(_)) => tracing::info!(
            handoff = %config.handoff_file.display(),
            "left a one-time key for the entrypoint"
        ),
        (_, None) => tracing::warn!(
            handoff = %config.handoff_file.display(),
            "no --state-dir: the key for the entrypoint lives in this process only. If this sidecar restarts, it makes a new key that the running entrypoint does not have: the entrypoint is then refused and must be restarted too. Give the sidecar a private volume with --state-dir (AGENTRUN_STATE_DIR)"
        ),
    }
    Ok(key)
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
    let sidecar_producer = shared.producer.clone();
    let publisher = tokio::spawn(publish_loop.run(shared.clone(), conn, items_rx));
    let controls = tokio::spawn(control::subscribe(shared.clone(), items_tx.clone()));
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
    let pseq = shared.pseq.clone();
    let starting = StatusEvent::new(Some(shared.config.variation.as_str()), RunState::Starting)
        .reason("SidecarStarted")
        .source("sidecar");
    push_status(&items_tx, &sidecar_producer, &pseq, starting, true).await;
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
                    let evicted = shared.admit(epoch);
                    tokio::spawn(handle_connection(shared.clone(), stream, epoch, evicted, items_tx.clone(), budget.clone()));
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

/// Queues a status event of the sidecar's own; `mirror`: also make it the variation's latest
/// status in the state hash (a notice is not).
async fn push_status(
    items: &mpsc::Sender<Item>,
    producer: &Arc<str>,
    pseq: &AtomicU64,
    event: StatusEvent,
    mirror: bool,
) {
    let p = pseq.fetch_add(1, Ordering::SeqCst) + 1;
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
            status: mirror.then_some(event),
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
            shared.saw_state(event.state);
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

/// Why a client of the socket was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// It sent no `Hello` in time.
    Slow,
    /// It closed the connection without a `Hello`.
    Silent,
    /// Its first frame was not a valid `Hello`.
    NotHello,
    /// Its `Hello` carried no key.
    NoKey,
    /// Its `Hello` carried a key that is not this sidecar's.
    WrongKey,
    /// Too many connections waited for their `Hello`; it was the oldest.
    Crowded,
}

impl Refusal {
    /// The `reason` label of `agentrun_sidecar_socket_clients_refused_total`.
    fn label(self) -> &'static str {
        match self {
            Refusal::Slow => "hello_timeout",
            Refusal::Silent => "no_hello",
            Refusal::NotHello => "not_a_hello",
            Refusal::NoKey => "no_key",
            Refusal::WrongKey => "wrong_key",
            Refusal::Crowded => "too_many_waiting",
        }
    }

    fn describe(self) -> String {
        match self {
            Refusal::Slow => format!("it sent no hello within {}s", HELLO_TIMEOUT.as_secs()),
            Refusal::Silent => "it closed the connection without a hello".into(),
            Refusal::NotHello => "its first frame was not a valid hello".into(),
            Refusal::NoKey => "its hello carried no key".into(),
            Refusal::WrongKey => "its hello carried a wrong key".into(),
            Refusal::Crowded => format!(
                "more than {MAX_UNAUTHENTICATED} connections were waiting to say hello at once; it was the oldest"
            ),
        }
    }
}

/// Waits for the connection's `Hello` (bounded in time and size, and closed early when newer
/// connections crowd it out) and checks its key.
async fn authenticate(
    shared: &Shared,
    read: &mut tokio::net::unix::OwnedReadHalf,
    mut evicted: oneshot::Receiver<()>,
) -> Result<Arc<str>, Refusal> {
    let hello = tokio::select! {
        hello = tokio::time::timeout(HELLO_TIMEOUT, Frame::read_limited(read, MAX_HELLO)) => hello,
        Ok(()) = &mut evicted => return Err(Refusal::Crowded),
    };
    match hello {
        Err(_) => Err(Refusal::Slow),
        Ok(Ok(None)) => Err(Refusal::Silent),
        Ok(Ok(Some(Frame::Hello { producer, key, .. }))) => {
            if shared.key.matches(key.as_ref()) {
                Ok(Arc::from(producer.as_str()))
            } else if key.is_none() {
                Err(Refusal::NoKey)
            } else {
                Err(Refusal::WrongKey)
            }
        }
        Ok(Ok(Some(_)) | Err(_)) => Err(Refusal::NotHello),
    }
}

/// Counts, logs (at most every few seconds) and, once per sidecar, reports a refused client.
async fn refused(shared: &Shared, items: &mpsc::Sender<Item>, why: Refusal) {
    shared
        .metrics
        .socket_refused
        .with_label_values(&[why.label()])
        .inc();
    let (first, log) = {
        let mut r = lock(&shared.refusals);
        r.unlogged += 1;
        let now = tokio::time::Instant::now();
        let log = r
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10));
        let count = if log {
            r.last_log = Some(now);
            Some(std::mem::take(&mut r.unlogged))
        } else {
            None
        };
        (!std::mem::replace(&mut r.reported, true), count)
    };
    let message = format!(
        "a process in the agent container tried to use the sidecar's socket {} without the entrypoint's key ({}); it was refused: it receives no control messages and publishes nothing. If it was the agent's own entrypoint, it had no key: its log says why (kubectl logs POD -c agent)",
        shared.config.socket.display(),
        why.describe()
    );
    if let Some(count) = log {
        tracing::warn!(refused = count, reason = why.label(), "{message}");
    }
    if first {
        shared.notice(items, SOCKET_REFUSED_REASON, message).await;
    }
}

async fn handle_connection(
    shared: Arc<Shared>,
    stream: UnixStream,
    epoch: u64,
    evicted: oneshot::Receiver<()>,
    items: mpsc::Sender<Item>,
    budget: Arc<Semaphore>,
) {
    let (mut read, mut write) = stream.into_split();
    let authenticated = authenticate(&shared, &mut read, evicted).await;
    shared.admitted(epoch);
    let producer = match authenticated {
        Ok(p) => p,
        Err(why) => return refused(&shared, &items, why).await,
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
    // The new peer gets every control message not acknowledged yet (the entrypoint applies
    // each seq once), under the queue's lock so that none is sent between the two.
    {
        let queue = lock(&shared.control);
        for (seq, msg) in queue.unacknowledged() {
            let _ = writer.send(
                Frame::Control {
                    seq,
                    msg: msg.clone(),
                }
                .to_bytes(),
            );
        }
        *lock(&shared.peer) = Some(Peer { epoch, writer });
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
            Ok(Some(Frame::ControlAck { seq })) => control::acknowledged(&shared, seq),
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
    {
        let mut p = lock(&shared.peer);
        if p.as_ref().is_some_and(|p| p.epoch == epoch) {
            *p = None;
        }
    }
    tracing::info!(producer = %producer, "entrypoint disconnected");
}

//! `agentrun-sidecar serve`: takes frames from the entrypoint over a Unix socket and publishes
//! them to the run's Redis streams and channels; forwards control messages back.
//!
//! Along the message path: [`socket`] admits the entrypoint and reads its frames, [`ingest`]
//! makes them entries, [`publisher`] appends and announces them in Redis and acknowledges
//! them to the entrypoint; [`control`] follows the control stream and delivers each message
//! to the entrypoint until it acknowledges it. Around it: [`adopt`] publishes spools an
//! entrypoint left behind, [`entrypoint_watch`] reports an entrypoint that never came or
//! vanished, [`health`] and [`figures`] tick, [`state`] is what these tasks share. This file
//! starts them and drains them at shutdown.

mod adopt;
mod config;
mod control;
mod control_queue;
mod entrypoint_watch;
mod figures;
mod health;
mod ingest;
mod key;
mod publisher;
mod socket;
mod state;

pub use config::{ServeReport, SidecarConfig, SidecarError};
pub use socket::{HELLO_TIMEOUT, MAX_UNAUTHENTICATED, SOCKET_REFUSED_REASON};

/// Reason of the status event that reports a spool that is not authentic.
pub const SPOOL_REFUSED_REASON: &str = "SpoolRefused";

use crate::metrics::Metrics;
use agentrun_protocol::{PublishOptions, Publisher, RunState, StatusEvent};
use publisher::{PublishLoop, ToPublish};
use state::{Refusals, SidecarState};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

/// A running sidecar.
pub struct Sidecar {
    shared: Arc<SidecarState>,
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
            None => key::setup_key(&config)?,
        };
        let _ = std::fs::remove_file(&config.socket);
        if let Some(dir) = config.socket.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let listener = socket::bind_socket(&config.socket)?;
        let metrics = Metrics::default();
        let metrics_addr = match config.metrics_addr {
            Some(addr) => Some(
                agentrun_protocol::telemetry::serve_health(addr, metrics.clone())
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
                .arg(agentrun_protocol::state_hash::var_field(&config.variation))
                .query_async(c)
                .await
                .unwrap_or_default();
            if let Some(event) = latest.and_then(|j| serde_json::from_str::<StatusEvent>(&j).ok()) {
                last_state = event.state;
            }
        }

        let shared = Arc::new(SidecarState {
            config: config.clone(),
            metrics: metrics.clone(),
            key,
            peer: Mutex::new(None),
            control: Mutex::new(control_queue::Queue::default()),
            control_acked: tokio::sync::Notify::new(),
            redis_up: watch::channel(conn.is_some()).0,
            entrypoint_done: watch::channel(false).0,
            published_spools: Mutex::new(Default::default()),
            refused_spools: Mutex::new(Default::default()),
            unauthenticated: Mutex::new(VecDeque::new()),
            refusals: Mutex::new(Refusals::default()),
            producer: Arc::from(crate::frame::new_producer_id("sidecar").as_str()),
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

async fn run(
    shared: Arc<SidecarState>,
    listener: UnixListener,
    publish_loop: PublishLoop,
    conn: Option<agentrun_protocol::RedisConn>,
    mut shutdown: watch::Receiver<bool>,
    done: oneshot::Sender<ServeReport>,
) {
    let budget = Arc::new(Semaphore::new(shared.config.buffer_bytes));
    let (items_tx, items_rx) = mpsc::channel::<ToPublish>(4096);
    let publisher = tokio::spawn(publish_loop.run(shared.clone(), conn, items_rx));
    let controls = tokio::spawn(control::subscribe(shared.clone(), items_tx.clone()));
    let pinger = tokio::spawn(health::health_pinger(shared.clone()));
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
    let starting = StatusEvent::new(Some(shared.config.variation.as_str()), RunState::Starting)
        .reason("SidecarStarted")
        .source("sidecar");
    shared.push_status(&items_tx, starting, true).await;
    let figures = tokio::spawn(figures::metrics_ticker(shared.clone(), items_tx.clone()));
    let watchdog = tokio::spawn(entrypoint_watch::run(shared.clone(), items_tx.clone()));

    let mut epoch = 0;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    epoch += 1;
                    let evicted = shared.admit(epoch);
                    tokio::spawn(socket::handle_connection(shared.clone(), stream, epoch, evicted, items_tx.clone(), budget.clone()));
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
    let _ = items_tx.send(ToPublish::Barrier(barrier_tx)).await;
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

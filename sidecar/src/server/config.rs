//! What the sidecar is told (`SidecarConfig`), how it fails to start (`SidecarError`) and
//! what it reports when it ends (`ServeReport`).

use crate::auth::{self, Key, KeyFileError};
use agentrun_protocol::{RedisSettings, RunId, Variation};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
            stream_max_len: agentrun_protocol::publish::DEFAULT_STREAM_MAX_LEN,
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

/// What a finished sidecar did.
#[derive(Debug, Clone, Default)]
pub struct ServeReport {
    /// Bytes still held when the drain deadline passed (0 when everything was delivered).
    pub undelivered_bytes: u64,
    pub metrics_addr: Option<SocketAddr>,
}

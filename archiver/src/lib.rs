//! `agentrun-archiver`: copies finished runs from Redis to object storage, so that their
//! history outlives Redis's retention, and reads them back with Redis replay's cursors.
//!
//! - [`queue`]: the archive queue, consumed with a consumer group (claims, heartbeats,
//!   retries with backoff, the dead-letter stream).
//! - [`writer`]: writes one run's archive, idempotently: one archive per run, however many
//!   archivers try and wherever they crash.
//! - [`reader`]: [`ArchiveReader`], what the relay serves archived runs with.
//! - [`format`]: the objects, the entry encoding, the index and the manifest.
//! - [`store`]: the object store a URL names (a folder, `s3://`, `gs://`, `az://`).
//!
//! The Redis side of the contract (queue keys, the `archive` field of the state hash, expiry
//! that waits for the archive) is `agentrun_protocol::archive`; `docs/archive.md` describes
//! both for people.

pub mod error;
pub mod format;
pub mod metrics;
pub mod queue;
pub mod reader;
pub mod store;
pub mod writer;

pub use error::ArchiveError;
pub use format::Manifest;
pub use reader::ArchiveReader;
pub use store::ArchiveStore;

/// Initialises logging to stderr (`RUST_LOG` filters; `AGENTRUN_LOG_FORMAT=json` for JSON).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("AGENTRUN_LOG_FORMAT").is_ok_and(|f| f == "json") {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

//! `agentrun-archiver`: copies finished runs from Redis to object storage, so that their
//! history outlives Redis's retention, and reads them back with Redis replay's cursors.
//!
//! - [`queue`]: the archive queue, consumed with a consumer group (claims, heartbeats,
//!   retries with backoff, the dead-letter stream).
//! - [`writer`]: writes one run's archive, idempotently: one archive per run, however many
//!   archivers try and wherever they crash.
//! - [`reader`]: [`ArchiveReader`], what the relay serves archived runs with.
//! - [`catalog`]: the list of archived runs, newest first, filtered by namespace, phase and
//!   name without reading an object.
//! - [`format`]: the objects, the entry encoding, the index and the manifest.
//! - [`store`]: the object store a URL names (a folder, `s3://`, `gs://`, `az://`).
//! - `testing` (feature `test-support`): a real S3 server and seeded runs for tests.
//!
//! The Redis side of the contract (queue keys, the `archive` field of the state hash, expiry
//! that waits for the archive) is `agentrun_protocol::archive`; `docs/archive.md` describes
//! both for people.

pub mod catalog;
pub mod error;
pub mod format;
pub mod metrics;
pub mod queue;
pub mod reader;
pub mod store;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod writer;

pub use error::ArchiveError;
pub use format::Manifest;
pub use reader::ArchiveReader;
pub use store::ArchiveStore;

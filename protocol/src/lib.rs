//! The agentrun wire contract.
//!
//! Everything that two agentrun components must agree on lives here: the names of the Redis
//! keys and Pub/Sub channels of a run ([`names`]), the fields of a stream entry ([`entry`]), the
//! JSON envelope sent to clients ([`envelope`]), the control and status messages ([`control`],
//! [`status`]), how to reach Redis ([`settings`]), and the two primitives that touch streams:
//! [`publish`] (append and notify, deduplicated, in batches) and [`replay`] (read a stream from
//! a cursor in pages), and the run's [`epoch`] that makes a cursor mean the same history; the Redis
//! [`functions`] that do the atomic steps. `docs/protocol.md` describes the same contract for
//! people.

pub mod acl;
pub mod archive;
#[cfg(feature = "clap")]
pub mod args;
pub mod control;
pub mod durability;
pub mod entry;
pub mod envelope;
pub mod epoch;
pub mod functions;
pub mod live;
pub mod names;
#[cfg(feature = "process")]
pub mod process;
pub mod publish;
pub mod replay;
pub mod settings;
pub mod sse;
pub mod state_hash;
pub mod status;
#[cfg(feature = "process")]
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod topology;

#[cfg(feature = "clap")]
pub use args::RedisArgs;
pub use control::{ControlAction, ControlError, ControlMessage, MAX_CONTROL_BYTES};
pub use entry::{Entry, EntryType, NewEntry};
pub use envelope::Envelope;
pub use epoch::Epoch;
pub use names::{NameError, RunId, StreamName, Variation};
pub use publish::{PublishOptions, Publisher};
pub use settings::{RedisConn, RedisMode, RedisSettings, SettingsError};
pub use status::{RunState, StatusEvent};

/// Milliseconds since the Unix epoch, the unit of every `ts` field.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

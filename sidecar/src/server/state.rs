//! What the sidecar's tasks share: the connected entrypoint, the control queue, Redis health,
//! the sidecar's own status producer, and the refusals and spools it has seen.

use super::config::SidecarConfig;
use super::control_queue;
use crate::auth::Key;
use crate::frame::Frame;
use crate::metrics::Metrics;
use agentrun_protocol::RunState;
use bytes::Bytes;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};

/// The entrypoint currently connected.
pub(crate) struct Peer {
    pub(crate) epoch: u64,
    pub(crate) writer: mpsc::UnboundedSender<Bytes>,
}

/// What is remembered about clients refused on the socket.
#[derive(Default)]
pub(crate) struct Refusals {
    /// Whether the run's status was told (once per sidecar process).
    pub(crate) reported: bool,
    /// Refusals since the last log line, and when that was.
    pub(crate) unlogged: u64,
    pub(crate) last_log: Option<tokio::time::Instant>,
}

pub(crate) struct SidecarState {
    pub(crate) config: SidecarConfig,
    pub(crate) metrics: Metrics,
    pub(crate) key: Key,
    pub(crate) peer: Mutex<Option<Peer>>,
    /// Control messages taken from the stream and not yet acknowledged by the entrypoint.
    pub(crate) control: Mutex<control_queue::Queue>,
    /// Woken when the entrypoint acknowledges control messages.
    pub(crate) control_acked: tokio::sync::Notify,
    pub(crate) redis_up: watch::Sender<bool>,
    /// Set when an entrypoint said it has sent everything.
    pub(crate) entrypoint_done: watch::Sender<bool>,
    /// Spools published but not removable (the volume refused): not published again.
    pub(crate) published_spools: Mutex<std::collections::HashSet<PathBuf>>,
    /// Spools refused as not authentic: left in place, reported once, not read again.
    pub(crate) refused_spools: Mutex<std::collections::HashSet<PathBuf>>,
    /// Connections waiting for their `Hello`, oldest first, each with its eviction switch.
    pub(crate) unauthenticated: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    pub(crate) refusals: Mutex<Refusals>,
    /// The producer id and sequence of the sidecar's own status and metrics entries.
    pub(crate) producer: Arc<str>,
    pub(crate) pseq: Arc<AtomicU64>,
    /// The variation's latest state, for the sidecar's notices (which must not change it).
    pub(crate) last_state: Mutex<RunState>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SidecarState {
    pub(crate) fn send_to_peer(&self, frame: &Frame, epoch: Option<u64>) -> bool {
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

    /// Records the variation's state as the entrypoint or the sidecar reported it.
    pub(crate) fn saw_state(&self, state: RunState) {
        *lock(&self.last_state) = state;
    }
}

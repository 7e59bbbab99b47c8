//! The control messages the sidecar holds for the entrypoint: at most [`WINDOW`] of them
//! ([`WINDOW_BYTES`]), kept in [`super::state::SidecarState`] and filled and drained by
//! [`super::control`].

use agentrun_protocol::ControlMessage;
use std::collections::VecDeque;

/// Control messages held in memory for the entrypoint at most.
pub const WINDOW: usize = 64;
/// Bytes of control messages held in memory at most (one message is always taken).
pub const WINDOW_BYTES: usize = 1024 * 1024;

/// The control messages for this variation taken from the stream and not yet acknowledged.
#[derive(Default)]
pub(crate) struct Queue {
    pub(super) pending: VecDeque<(u64, ControlMessage, usize)>,
    pub(super) bytes: usize,
    /// Every control entry up to this seq has been read (and is pending, acknowledged, or
    /// meant for another variation).
    pub(super) read_to: u64,
    /// Whether `read_to` was loaded from the state hash.
    pub(super) loaded: bool,
}

impl Queue {
    pub(super) fn has_room(&self, size: usize) -> bool {
        self.pending.is_empty()
            || (self.pending.len() < WINDOW && self.bytes + size <= WINDOW_BYTES)
    }

    /// Every control message up to this seq is dealt with.
    pub(super) fn marker(&self) -> u64 {
        self.pending
            .front()
            .map_or(self.read_to, |(seq, _, _)| seq - 1)
    }

    /// The messages to send to a newly connected entrypoint, in order.
    pub(crate) fn unacknowledged(&self) -> impl Iterator<Item = (u64, &ControlMessage)> {
        self.pending.iter().map(|(seq, msg, _)| (*seq, msg))
    }
}

//! Pieces both SSE sessions share: the live one ([`crate::events`]) and the one of an archived
//! run ([`crate::archived`]), so that they write the same text for the same thing.

use crate::cursor::{self, Cursors, Origin};
use crate::query::Start;
use agentrun_protocol::{Epoch, RunId, sse};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use std::convert::Infallible;

/// Why a connection's positions are not valid in the run's history (`event: reset`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum ResetReason {
    EpochChanged,
    HistoryRewound,
    PastTheEnd,
    AnotherRun,
}

impl ResetReason {
    pub(crate) fn code(self) -> &'static str {
        match self {
            Self::EpochChanged => "epoch-changed",
            Self::HistoryRewound => "history-rewound",
            Self::PastTheEnd => "past-the-end",
            Self::AnotherRun => "another-run",
        }
    }

    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::EpochChanged => {
                "the run's history changed: Redis lost entries it had acknowledged (a restart without persistence, or a failover) and the run started a new epoch; positions from before do not count the same entries. Discard what you have shown: the run's history follows again from its first entry"
            }
            Self::HistoryRewound => {
                "a stream's sequence numbers went back: its history was written again after Redis lost entries. Discard what you have shown: the run's history follows again from its first entry"
            }
            Self::PastTheEnd => {
                "the cursor points past the end of the run's history (that history was lost, or the cursor is not from it). Discard what you have shown: the run's history follows again from its first entry"
            }
            Self::AnotherRun => {
                "the cursor was taken on another run; this run's history follows from its first entry"
            }
        }
    }
}

/// Counts the connection in the `connections` gauge while it is open.
pub(crate) struct ConnectionGauge(pub(crate) prometheus::IntGauge);

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An SSE session: the next chunk of its response, `None` at its end.
pub(crate) trait Chunks: Send + 'static {
    fn next_chunk(&mut self) -> impl Future<Output = Option<Bytes>> + Send;
}

/// The streamed `text/event-stream` response of a session.
pub(crate) fn respond(session: impl Chunks) -> Response {
    let stream = futures::stream::unfold(session, |mut s| async move {
        s.next_chunk()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), s))
    });
    crate::sse::streamed(stream, "text/event-stream", "no-cache")
}

/// What every stream starts with: a comment and the reconnection delay.
pub(crate) fn preamble(retry_ms: u64) -> String {
    format!(": agentrun relay\nretry: {retry_ms}\n\n")
}

/// Appends the `id:` line of an event: the connection's cursor.
pub(crate) fn write_id(
    out: &mut BytesMut,
    origin: &Origin,
    cursors: &Cursors,
    scratch: &mut String,
) {
    out.extend_from_slice(b"id: ");
    cursor::encode_into(origin, cursors, out, scratch);
    out.extend_from_slice(b"\n");
}

/// The `reset` event: every stream starts over, in epoch `new`.
pub(crate) fn reset_event(
    reason: ResetReason,
    new: Option<Epoch>,
    old: Option<Epoch>,
    run: &RunId,
) -> sse::Reset {
    sse::Reset {
        message: reason.message().to_owned(),
        new_epoch: new.map(|e| e.to_string()),
        old_epoch: old.map(|e| e.to_string()),
        reason: reason.code().to_owned(),
        run: run.to_string(),
    }
}

/// The `shutdown` event: the relay is stopping.
pub(crate) fn shutdown_event(run: &RunId) -> sse::Shutdown {
    sse::Shutdown {
        reason: "the relay is shutting down; reconnect with this event's id as Last-Event-ID"
            .to_owned(),
        run: run.to_string(),
    }
}

/// Where a request starts: the cursors to resume from, and the reset to announce when its
/// cursor counts the entries of another run or epoch (then every stream starts over).
pub(crate) fn resume_from(
    start: Start,
    origin: &Origin,
) -> (Cursors, Option<(ResetReason, Option<Epoch>)>) {
    let Start::Cursor(position) = start else {
        return (Cursors::new(), None);
    };
    let reason = match position.origin {
        Some(o) if o.run_tag != origin.run_tag => Some((ResetReason::AnotherRun, o.epoch)),
        Some(o) if o.epoch != origin.epoch => Some((ResetReason::EpochChanged, o.epoch)),
        // Version 1: no run, no epoch to check; positions past a stream's end still reset
        // when replayed.
        _ => None,
    };
    let counts = position.seqs.values().any(|s| *s > 0);
    match reason {
        Some(r) if counts => (Cursors::new(), Some(r)),
        _ => (position.seqs, None),
    }
}

//! Pieces both SSE sessions share: the live one ([`crate::events`]) and the one of an archived
//! run ([`crate::archived`]), so that they write the same text for the same thing.

use crate::cursor::{self, Cursors, Origin};
use crate::query::Start;
use agentrun_protocol::{Entry, Epoch, RunId, RunState, StreamName, Variation, sse};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
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

/// An SSE session: the next chunk of its response (`None` at its end), and the events both
/// kinds of session write the same way.
pub(crate) trait Chunks: Send + Sized + 'static {
    fn next_chunk(&mut self) -> impl Future<Output = Option<Bytes>> + Send;
    /// The text not yet handed to the connection.
    fn out(&mut self) -> &mut BytesMut;
    /// The connection's position in each stream.
    fn cursors(&mut self) -> &mut Cursors;
    /// The run, and the counter of replayed events sent.
    fn replay_context(&self) -> (RunId, prometheus::IntCounter);
    /// Appends the `id:` line of the next event: the connection's cursor.
    fn write_id(&mut self);
    /// Appends `reset`: every stream starts over (the client's positions do not count here).
    fn write_reset(&mut self, reason: ResetReason, old: Option<Epoch>);
    /// Whether the caller may no longer see the run ([`check_access`]); then the comment that
    /// ends the stream is written.
    fn access_withdrawn(&mut self) -> impl Future<Output = bool> + Send;

    /// Appends one of the relay's own events, after its `id:` line.
    fn write_event<E: sse::ServerEvent>(&mut self, event: &E) {
        self.write_id();
        crate::sse::event_tail(self.out(), event);
    }
}

/// The streamed `text/event-stream` response of a session, which starts with the preamble,
/// `open` (the run, its phase and variations), and a `reset` when the client's cursor does not
/// count in this history.
pub(crate) fn start<'a, S: Chunks>(
    mut session: S,
    retry_ms: u64,
    open: (
        &RunId,
        Option<RunState>,
        impl IntoIterator<Item = &'a Variation>,
    ),
    reset: Option<(ResetReason, Option<Epoch>)>,
) -> Response {
    let (run, phase, variations) = open;
    session
        .out()
        .extend_from_slice(preamble(retry_ms).as_bytes());
    session.write_event(&sse::Open {
        phase,
        run: run.to_string(),
        variations: variations.into_iter().map(|v| v.to_string()).collect(),
    });
    if let Some((reason, old)) = reset {
        session.write_reset(reason, old);
    }
    let stream = futures::stream::unfold(session, |mut s| async move {
        s.next_chunk()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), s))
    });
    crate::sse::streamed(stream, "text/event-stream", "no-cache")
}

/// Flush to the socket once this much is buffered (or when nothing more is ready).
pub(crate) const FLUSH_BYTES: usize = 32 * 1024;

/// Writes replayed entries of `stream` from the front of `entries`, each with its `id:` line,
/// until a flush is ready or none are left.
pub(crate) fn write_entries<S: Chunks>(
    session: &mut S,
    stream: &StreamName,
    entries: &mut VecDeque<Entry>,
) {
    let (run, sent) = session.replay_context();
    let run = &run;
    while session.out().len() < FLUSH_BYTES {
        let Some(entry) = entries.pop_front() else {
            break;
        };
        session.cursors().insert(stream.clone(), entry.seq);
        session.write_id();
        let tail = crate::sse::entry_tail(run, stream, &entry);
        session.out().extend_from_slice(&tail);
        sent.inc();
    }
}

/// Whether the caller may no longer see the run (its token was removed or its permission
/// revoked): then `out` gets the comment that ends the stream. An API server that cannot be
/// asked does not end streams.
pub(crate) async fn check_access(
    access: &crate::auth::Access,
    auth: &crate::auth::Authenticator,
    state: &std::collections::HashMap<String, String>,
    run: &RunId,
    out: &mut BytesMut,
) -> bool {
    // Boxed: the API server call's future would otherwise be part of every idle connection's
    // state.
    if Box::pin(access.still_allowed(auth, state)).await != Some(false) {
        return false;
    }
    tracing::info!(run = %run, client = access.client_key(), "the caller may no longer see this run (token removed or permission revoked); ending its stream");
    out.extend_from_slice(b": access withdrawn\n\n");
    true
}

/// Implements [`Chunks`] for a session type that has the fields `out`, `origin`, `cursors`
/// and `scratch` (and `run`, `app`, `access`, `access_state`), and its own `next_chunk` and
/// `write_reset`.
macro_rules! chunks_for {
    ($session:ty) => {
        impl $crate::session::Chunks for $session {
            fn next_chunk(&mut self) -> impl Future<Output = Option<bytes::Bytes>> + Send {
                <$session>::next_chunk(self)
            }

            fn out(&mut self) -> &mut bytes::BytesMut {
                &mut self.out
            }

            fn cursors(&mut self) -> &mut $crate::cursor::Cursors {
                &mut self.cursors
            }

            fn replay_context(&self) -> (agentrun_protocol::RunId, prometheus::IntCounter) {
                (self.run.clone(), self.app.sent_replay.clone())
            }

            fn write_id(&mut self) {
                $crate::session::write_id(
                    &mut self.out,
                    &self.origin,
                    &self.cursors,
                    &mut self.scratch,
                );
            }

            fn access_withdrawn(&mut self) -> impl Future<Output = bool> + Send {
                $crate::session::check_access(
                    &self.access,
                    &self.app.auth,
                    &self.access_state,
                    &self.run,
                    &mut self.out,
                )
            }

            fn write_reset(
                &mut self,
                reason: $crate::session::ResetReason,
                old: Option<agentrun_protocol::Epoch>,
            ) {
                <$session>::write_reset(self, reason, old)
            }
        }
    };
}
pub(crate) use chunks_for;

/// What every stream starts with: a comment and the reconnection delay.
pub(crate) fn preamble(retry_ms: u64) -> String {
    format!(": agentrun relay\nretry: {retry_ms}\n\n")
}

/// What an empty buffer reserves for the next event (its `id:` line and a small tail).
const FIRST_RESERVE: usize = 512;

/// Appends the `id:` line of an event: the connection's cursor.
pub(crate) fn write_id(
    out: &mut BytesMut,
    origin: &Origin,
    cursors: &Cursors,
    scratch: &mut String,
) {
    if out.capacity() == 0 {
        // An event with its tail is a few hundred bytes: one allocation, not several.
        out.reserve(FIRST_RESERVE);
    }
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

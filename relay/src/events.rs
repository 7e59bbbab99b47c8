// Long file: one SSE session (replay, live feed, lag, resync, reset, end) whose state machine is read as a whole.
//! `GET /api/runs/{run}/events`: Server-Sent Events with replay and resume.
//!
//! A connection carries a set of streams (the requested channels of the requested
//! variations) and a cursor: the last `seq` it delivered per stream, within the run's epoch.
//! It joins the run's live feed *first*, then replays each stream from its cursor in pages,
//! then forwards live entries, dropping any `seq` it already delivered. A live entry that is
//! not the next one of its stream (the client lagged, Redis restarted, a variation appeared)
//! makes the connection replay that stream from its cursor again, so it never skips and never
//! repeats.
//!
//! A cursor is only valid within the epoch it was taken in (`agentrun_protocol::epoch`).
//! Every replay page is read together with the run's epoch; when it differs from the
//! connection's, when a stream ends before the cursor, when the hub sees a stream's `seq` go
//! back, or when a resume cursor is from another run or epoch, the connection sends
//! `event: reset` (old and new epoch, why) and starts every stream over from its first entry.
//! A connection that has delivered nothing yet just adopts the run's epoch.
//!
//! Access is checked before anything touches the run's feed: a caller who may not see the
//! run, or asks for a variation the run does not have, changes nothing.
//!
//! Memory per connection is bounded in bytes: replay pages are sized from the stream's
//! entries to about `--replay-page-bytes` and reserved from the relay-wide
//! `--replay-memory-bytes` budget, and are written out a flush (32 KiB) at a time, so a
//! connection holds at most one page and one flush plus one event.

use crate::AppState;
use crate::budget::Reservation;
use crate::cursor::{Cursors, Origin};
use crate::error::ApiError;
use crate::hub::{FeedItem, Watch};
use crate::paging::{self, Pager, Source};
use crate::query::parse_run;
use crate::query::{Kinds, Request, Start, parse_request};
use crate::ring::TryRecvError;
use crate::session::{self, Chunks as _, ConnectionGauge, FLUSH_BYTES, ResetReason};
use agentrun_protocol::replay::last_seq;
use agentrun_protocol::{Entry, Epoch, RunState, StreamName, Variation};
use agentrun_protocol::{sse, state_hash};
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// Pause before retrying a replay read that failed (Redis away).
const REPLAY_RETRY: Duration = Duration::from_millis(250);

/// A replay page being written out.
struct PageInProgress {
    stream: StreamName,
    entries: VecDeque<Entry>,
    /// The page was full: the stream may have more.
    more: bool,
    /// Its share of the relay's replay budget, returned when the page is written out.
    _held: Reservation,
}

enum Ending {
    /// The run reached a final phase: deliver everything, then `end`.
    Final(RunState),
    /// `follow=false`: deliver the history, then `end`.
    Snapshot(Option<RunState>),
}

struct Session {
    app: AppState,
    run: agentrun_protocol::RunId,
    /// The run (tag) and the epoch the cursors count in.
    origin: Origin,
    kinds: Kinds,
    variation: Option<Variation>,
    cursors: Cursors,
    /// Cursors given on resume, for streams that join later (new variations).
    resume: Cursors,
    /// Streams to replay from their cursor to their end before forwarding live entries.
    catchup: BTreeSet<StreamName>,
    page: Option<PageInProgress>,
    /// Sizes and reads replay pages.
    pager: Pager,
    watch: Watch,
    out: BytesMut,
    /// Scratch space for encoding cursors.
    scratch: String,
    ending: Option<Ending>,
    refresh_variations: bool,
    done: bool,
    retry_at: Option<Instant>,
    /// When the next keep-alive and access re-check are due.
    deadlines: crate::sse::Deadlines,
    /// One timer, armed for the nearest deadline (`deadlines`, `retry_at`); created when the
    /// session first waits.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The caller's access and the run's state hash, checked again every `auth_recheck`:
    /// a stream whose token was removed, or whose permission was revoked, ends.
    access: crate::auth::Access,
    access_state: HashMap<String, String>,
    recheck_due: bool,
    shutdown: bool,
    _gauge: ConnectionGauge,
    _slot: crate::limits::SseSlot,
}

impl Session {
    fn wants(&self, stream: &StreamName) -> bool {
        let var_ok = |v: &Variation| self.variation.as_ref().is_none_or(|want| want == v);
        match stream {
            StreamName::Output(v) => self.kinds.output && var_ok(v),
            StreamName::Logs(v) => self.kinds.logs && var_ok(v),
            StreamName::Status => self.kinds.status,
            StreamName::Metrics => self.kinds.metrics,
            StreamName::Control => false,
        }
    }

    fn streams_for(&self, variations: &[Variation]) -> Vec<StreamName> {
        let mut out = Vec::new();
        if self.kinds.status {
            out.push(StreamName::Status);
        }
        if self.kinds.metrics {
            out.push(StreamName::Metrics);
        }
        for v in variations {
            if self.variation.as_ref().is_some_and(|want| want != v) {
                continue;
            }
            if self.kinds.output {
                out.push(StreamName::Output(v.clone()));
            }
            if self.kinds.logs {
                out.push(StreamName::Logs(v.clone()));
            }
        }
        out
    }

    /// Starts carrying a stream (from the resume cursor, or from its first entry).
    fn track(&mut self, stream: StreamName) {
        if self.cursors.contains_key(&stream) || !self.wants(&stream) {
            return;
        }
        let from = self.resume.get(&stream).copied().unwrap_or(0);
        self.cursors.insert(stream.clone(), from);
        self.catchup.insert(stream);
    }

    /// Whether this connection has positions that count entries (delivered, or given in a
    /// resume cursor): only then does a changed history need saying.
    fn has_positions(&self) -> bool {
        self.cursors
            .values()
            .chain(self.resume.values())
            .any(|s| *s > 0)
    }

    /// Starts every stream over from its first entry, in the epoch `epoch`, and says so.
    fn reset(&mut self, reason: ResetReason, epoch: Option<Epoch>) {
        let old = self.origin.epoch;
        self.origin.epoch = epoch;
        for seq in self.cursors.values_mut() {
            *seq = 0;
        }
        self.resume.clear();
        self.page = None;
        self.catch_up_all();
        self.write_reset(reason, old);
    }

    fn write_reset(&mut self, reason: ResetReason, old: Option<Epoch>) {
        self.app.metrics.resets.inc();
        tracing::info!(run = %self.run, reason = reason.code(), "a client's position is not valid in the run's history; it starts over");
        let event = session::reset_event(reason, self.origin.epoch, old, &self.run);
        self.write_event(&event);
    }

    /// The buffered text, as one chunk (one socket write). The buffer is handed over whole,
    /// so that nothing stays allocated for a connection between deliveries (a replay's 32 KiB
    /// flush would otherwise stay reserved for the connection's life).
    fn take(&mut self) -> Option<Bytes> {
        Some(std::mem::take(&mut self.out).freeze())
    }

    fn handle(&mut self, item: &FeedItem) {
        match item {
            FeedItem::Entry {
                stream,
                entry,
                epoch,
                event,
            } => {
                if epoch.is_some() && *epoch != self.origin.epoch {
                    // Published in another epoch than this connection counts in: the replay
                    // read (entries and epoch together) decides what happened.
                    self.catch_up_all();
                    return;
                }
                let seq = entry.seq;
                let Some(at) = self.cursors.get_mut(stream) else {
                    // A stream this connection wants but did not know (a new variation).
                    self.track(stream.clone());
                    return;
                };
                if seq <= *at {
                    return;
                }
                if seq == *at + 1 && !self.catchup.contains(stream) {
                    *at = seq;
                    self.write_id();
                    let tail =
                        event.get_or_init(|| crate::sse::entry_tail(&self.run, stream, entry));
                    self.out.extend_from_slice(tail);
                    self.app.sent_live.inc();
                } else {
                    // Something between the cursor and this entry was not seen live.
                    self.catchup.insert(stream.clone());
                }
            }
            FeedItem::Variation(v) => {
                for s in self.streams_for(std::slice::from_ref(v)) {
                    self.track(s);
                }
            }
            FeedItem::Resync => self.catch_up_all(),
            FeedItem::Rewound(stream) => {
                if self.cursors.contains_key(stream) && self.has_positions() {
                    self.reset(ResetReason::HistoryRewound, self.origin.epoch);
                }
            }
            FeedItem::Shutdown => self.shutdown = true,
            FeedItem::Ended(state) => {
                if !matches!(self.ending, Some(Ending::Final(_))) {
                    self.ending = Some(Ending::Final(*state));
                    self.refresh_variations = self.variation.is_none();
                    self.catch_up_all();
                }
            }
        }
    }

    fn catch_up_all(&mut self) {
        let all: Vec<StreamName> = self.cursors.keys().cloned().collect();
        self.catchup.extend(all);
    }

    fn lagged(&mut self) {
        self.app.metrics.slow_client_fallbacks.inc();
        // The items this reader missed may include news the feed sends once: a new variation,
        // the run's end. Take them from the feed, or a client that lagged over the run's end
        // would wait for it forever.
        for v in self.watch.feed.variations() {
            self.handle(&FeedItem::Variation(v));
        }
        if let Some(state) = self.watch.feed.ended() {
            self.handle(&FeedItem::Ended(state));
        }
        self.catch_up_all();
    }

    /// Writes out the page in progress, or reads the next page of the first stream that needs
    /// catching up.
    async fn catch_up_step(&mut self) {
        if self.page.is_some() {
            self.write_page();
            return;
        }
        let Some(stream) = self.catchup.first().cloned() else {
            return;
        };
        let at = self.cursors.get(&stream).copied().unwrap_or(0);
        let found = match self
            .pager
            .read(
                &Source::Redis,
                &self.app,
                &self.run,
                &stream,
                at,
                usize::MAX,
            )
            .await
        {
            // Other connections hold the budget: do other work, then ask again.
            paging::Read::Busy => {
                self.retry_at = Some(Instant::now() + REPLAY_RETRY);
                return;
            }
            paging::Read::Failed(e) => {
                tracing::debug!(run = %self.run, error = %e, "replay read failed; retrying");
                self.retry_at = Some(Instant::now() + REPLAY_RETRY);
                return;
            }
            paging::Read::Page(found) => found,
        };
        let more = found.more();
        let paging::Found {
            run_page: found,
            mut held,
            ..
        } = found;
        if found.epoch != self.origin.epoch {
            if self.origin.epoch.is_some() && found.epoch.is_none() && found.page.entries.is_empty()
            {
                // The run's history is gone from Redis and nothing was written since: there
                // is nothing to send, and the next entry will come with a new epoch.
                self.catchup.remove(&stream);
            } else if self.has_positions() {
                self.reset(ResetReason::EpochChanged, found.epoch);
            } else {
                // Nothing delivered yet: count in the run's epoch from the start.
                self.origin.epoch = found.epoch;
            }
            return;
        }
        if found.ends_before_cursor.is_some() {
            self.reset(ResetReason::PastTheEnd, found.epoch);
            return;
        }
        let page = found.page;
        if let Some(t) = page.trimmed {
            self.app.metrics.trimmed_notices.inc();
            let event = crate::archived::trimmed_event(&self.run, &stream, t);
            self.write_event(&event);
        }
        self.pager.measure(&page, &mut held);
        if page.entries.is_empty() {
            if !more {
                self.catchup.remove(&stream);
            }
            return;
        }
        self.page = Some(PageInProgress {
            stream,
            entries: page.entries.into(),
            more,
            _held: held,
        });
        self.app
            .metrics
            .replay_bytes
            .set(self.app.replay_budget.in_use() as i64);
        self.write_page();
    }

    /// Encodes entries of the page in progress until a flush is ready.
    fn write_page(&mut self) {
        let Some(mut page) = self.page.take() else {
            return;
        };
        session::write_entries(self, &page.stream, &mut page.entries);
        if !page.entries.is_empty() {
            self.page = Some(page);
            return;
        }
        if !page.more {
            self.catchup.remove(&page.stream);
        }
        drop(page);
        self.app
            .metrics
            .replay_bytes
            .set(self.app.replay_budget.in_use() as i64);
    }

    async fn refresh_variations_step(&mut self) {
        self.refresh_variations = false;
        let mut conn = self.app.conn.clone();
        let state: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.run.state_key())
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let vars: Vec<Variation> = state_hash::variations(&state).into_iter().collect();
        for s in self.streams_for(&vars) {
            self.track(s);
        }
    }

    fn write_end(&mut self) {
        let (phase, finished) = match &self.ending {
            Some(Ending::Final(s)) => (Some(*s), true),
            Some(Ending::Snapshot(s)) => (*s, s.is_some_and(|s| s.is_final())),
            None => (None, false),
        };
        self.write_event(&sse::End {
            finished,
            phase,
            run: self.run.to_string(),
        });
        self.done = true;
    }

    /// Does what fell due: ends a replay pause, writes a keep-alive, asks for an access
    /// re-check.
    fn timer_fired(&mut self) {
        let now = Instant::now();
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
        }
        let due = self.deadlines.due(now);
        if due.keepalive {
            self.out.extend_from_slice(b": keep-alive\n\n");
        }
        if due.recheck {
            self.recheck_due = true;
        }
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.done {
                return None;
            }
            if self.out.len() >= FLUSH_BYTES {
                return self.take();
            }
            if self.shutdown || self.app.shutting_down.load(Ordering::Relaxed) {
                let event = session::shutdown_event(&self.run);
                self.write_event(&event);
                self.done = true;
                return self.take();
            }
            if self.recheck_due {
                self.recheck_due = false;
                if self.access_withdrawn().await {
                    self.done = true;
                    return self.take();
                }
            }
            if self.retry_at.is_none() {
                if self.refresh_variations {
                    Box::pin(self.refresh_variations_step()).await;
                    continue;
                }
                if !self.catchup.is_empty() {
                    Box::pin(self.catch_up_step()).await;
                    continue;
                }
                if self.ending.is_some() {
                    self.write_end();
                    return self.take();
                }
            }
            if !self.out.is_empty() {
                match self.watch.rx.try_recv() {
                    Ok(item) => {
                        self.handle(&item);
                        continue;
                    }
                    Err(TryRecvError::Lagged(_)) => {
                        self.lagged();
                        continue;
                    }
                    Err(TryRecvError::Empty) => return self.take(),
                }
            }
            // One timer for every deadline; re-armed only when the nearest one changes.
            let wake_at = self.deadlines.next(self.retry_at);
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(wake_at)));
            if timer.deadline() != wake_at {
                timer.as_mut().reset(wake_at);
            }
            tokio::select! {
                biased;
                r = self.watch.rx.recv() => match r {
                    Ok(item) => self.handle(&item),
                    Err(_) => self.lagged(),
                },
                _ = timer.as_mut() => self.timer_fired(),
            }
        }
    }
}

/// `GET /api/runs/{run}/events`.
pub async fn events(
    State(app): State<AppState>,
    Extension(access): Extension<crate::auth::Access>,
    Path(run): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let run = parse_run(&run)?;
    let Request {
        kinds,
        variation,
        follow,
        start,
    } = parse_request(query.as_deref(), &headers)?;
    if app.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the relay is shutting down; reconnect to another replica or retry shortly",
        ));
    }

    // Who may see the run, and what it has, is settled before anything touches its feed. A run
    // Redis no longer holds is served from its archive (`crate::archived`).
    let state = match crate::archived::locate(&app, &access, &run).await? {
        crate::archived::Located::Live(state) => state,
        crate::archived::Located::Archived(archived) => {
            let request = Request {
                kinds,
                variation,
                follow,
                start,
            };
            return crate::archived::events(app, access, run, archived, request).await;
        }
    };
    let declared = state_hash::variations(&state);
    if let Some(v) = &variation
        && !declared.contains(v)
        && !app.hub.known_variations(&run).contains(v)
    {
        return Err(crate::archived::unknown_variation(&run, v, &declared));
    }
    let slot = match app.limiter.sse_slot(access.client_key()) {
        Ok(s) => s,
        Err(r) => return Ok(r),
    };
    let phase = state_hash::phase(&state);
    let epoch = state_hash::epoch(&state);

    // Join the live feed first, so nothing published from here on is missed.
    let watch = app.hub.watch(&run).await;
    app.hub.learn_variations(&watch.feed, &state).await;

    // A cursor from another run or another epoch counts other entries: start over, and say so.
    let origin = Origin::new(&run, epoch);
    let from_now = matches!(start, Start::Now);
    let (resume, pending_reset) = session::resume_from(start, &origin);

    let gauge = app.metrics.connections.clone();
    gauge.inc();
    let keepalive_period = app.limits.keepalive;
    let recheck_period = app.limits.auth_recheck;
    let mut session = Session {
        run: run.clone(),
        origin,
        kinds,
        variation: variation.clone(),
        cursors: Cursors::new(),
        resume,
        catchup: BTreeSet::new(),
        page: None,
        pager: Pager::default(),
        watch,
        out: BytesMut::new(),
        scratch: String::new(),
        ending: None,
        refresh_variations: false,
        done: false,
        retry_at: None,
        deadlines: crate::sse::Deadlines::new(
            Instant::now(),
            keepalive_period,
            access.can_be_withdrawn().then_some(recheck_period),
        ),
        timer: None,
        recheck_due: false,
        // Only a caller whose access can be withdrawn needs the state hash to re-check it.
        access_state: if access.can_be_withdrawn() {
            state.clone()
        } else {
            HashMap::new()
        },
        access,
        shutdown: false,
        _gauge: ConnectionGauge(gauge),
        _slot: slot,
        app: app.clone(),
    };
    let mut vars: BTreeSet<Variation> = session.watch.feed.variations().into_iter().collect();
    vars.extend(declared);
    if let Some(v) = &variation {
        vars.insert(v.clone());
    }
    let vars: Vec<Variation> = vars.into_iter().collect();
    for s in session.streams_for(&vars) {
        session.track(s);
    }
    if from_now {
        for (stream, at) in session.cursors.iter_mut() {
            let key = stream.key(&run);
            let key = &key;
            *at = app
                .redis(|mut conn| async move { last_seq(&mut conn, key).await })
                .await?;
        }
    }
    match phase {
        Some(p) if p.is_final() => session.ending = Some(Ending::Final(p)),
        p if !follow => session.ending = Some(Ending::Snapshot(p)),
        _ => {}
    }

    Ok(session::start(
        session,
        app.limits.retry_ms,
        (&run, phase, &vars),
        pending_reset,
    ))
}

session::chunks_for!(Session);

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn size_of_return<F, R>(_: F) -> usize
    where
        F: FnOnce(&'static mut Session) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// What an idle connection holds beyond hyper's buffers: the session and the future that
    /// waits for its next chunk. The rare steps (replay read, access re-check) are boxed so
    /// that their futures are not part of it.
    #[test]
    fn an_idle_session_is_small() {
        let session = std::mem::size_of::<Session>();
        let waiting = size_of_return(|s: &'static mut Session| s.next_chunk());
        println!("Session: {session} bytes; next_chunk future: {waiting} bytes");
        assert!(session <= 1024, "Session is {session} bytes");
        assert!(waiting <= 512, "next_chunk's future is {waiting} bytes");
    }
}

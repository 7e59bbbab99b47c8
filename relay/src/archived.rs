//! Runs that Redis no longer holds, served from their archive (`--archive-url`).
//!
//! [`locate`] finds a run: in Redis when its state hash is there, else in the archive. Either
//! way the caller's access is checked against the run's state hash (for an archived run, the
//! one its manifest keeps), so an archived run is visible to exactly whom the live run was.
//!
//! [`events`] serves `GET /api/runs/{run}/events` of an archived run like the live session
//! serves a finished run: the same `open`, the same entries with the same `id:` cursors (the
//! run's tag and the epoch it had in Redis), `trimmed` and `reset` where the live session
//! would send them, then the same `end`. A cursor taken while the run was live resumes here
//! with no gap and no duplicate. Streams are replayed one after the other in the live
//! session's order, a page at a time within the relay's replay budget ([`crate::paging`]).

use crate::AppState;
use crate::auth::Access;
use crate::budget::Reservation;
use crate::cursor::{Cursors, Origin};
use crate::error::ApiError;
use crate::paging::{self, Pager, Source};
use crate::query::{Request, Start};
use crate::session::{self, Chunks as _, ConnectionGauge, FLUSH_BYTES, ResetReason};
use agentrun_archiver::ArchiveReader;
use agentrun_protocol::{Entry, RunId, StreamName, Variation, sse, state_hash};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

/// Pause before reading again when the budget is spent or the store failed.
const RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// Where a run the caller may see was found.
pub enum Located {
    /// In Redis: its state hash.
    Live(HashMap<String, String>),
    /// Only in the archive.
    Archived(ArchivedRun),
}

/// An archived run: its archive and the state hash it had when archived.
#[derive(Clone)]
pub struct ArchivedRun {
    pub reader: Arc<ArchiveReader>,
    pub state: HashMap<String, String>,
}

impl Located {
    /// The run's state hash, wherever it was found.
    pub fn state(&self) -> &HashMap<String, String> {
        match self {
            Located::Live(state) => state,
            Located::Archived(a) => &a.state,
        }
    }

    /// Where to read its entries.
    pub fn source(&self) -> Source {
        match self {
            Located::Live(_) => Source::Redis,
            Located::Archived(a) => Source::Archive(a.reader.clone()),
        }
    }

    pub fn is_archived(&self) -> bool {
        matches!(self, Located::Archived(_))
    }
}

/// A run that neither Redis nor the archive holds (or one the caller may not see: the same
/// answer, so that a caller cannot tell the two apart).
pub fn not_found(app: &AppState, run: &RunId) -> ApiError {
    match &app.archive {
        None => ApiError::not_found(run),
        Some(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "run {run} was found neither in Redis nor in the archive: it never started here, or its data expired before it was archived; list runs with GET /api/runs"
            ),
        ),
    }
}

/// The archive store failed (503: retry).
pub fn store_failed(app: &AppState, e: impl std::fmt::Display) -> ApiError {
    let url = app.archive.as_ref().map_or("", |a| a.url());
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the archive store {url} could not be read ({e}); retry shortly"),
    )
}

/// Finds a run the caller may see: in Redis, else in the archive; 404 otherwise. A run Redis
/// holds is never looked up in the archive (Redis has its newest state).
pub async fn locate(app: &AppState, access: &Access, run: &RunId) -> Result<Located, ApiError> {
    let state: HashMap<String, String> = app
        .query(redis::cmd("HGETALL").arg(run.state_key()))
        .await?;
    if !state.is_empty() {
        return if access.can_see(&state).await? {
            Ok(Located::Live(state))
        } else {
            Err(not_found(app, run))
        };
    }
    let Some(archive) = &app.archive else {
        return Err(not_found(app, run));
    };
    let Some(reader) = archive
        .reader(run)
        .await
        .map_err(|e| store_failed(app, e))?
    else {
        return Err(not_found(app, run));
    };
    let state = crate::archive::state_of(&reader);
    if !access.can_see(&state).await? {
        return Err(not_found(app, run));
    }
    Ok(Located::Archived(ArchivedRun { reader, state }))
}

/// The 404 of a variation the run does not have.
pub fn unknown_variation(run: &RunId, v: &Variation, declared: &BTreeSet<Variation>) -> ApiError {
    let known: Vec<&str> = declared.iter().map(|v| v.as_str()).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "run {run} has no variation {v:?} (its variations: {}); ask for one of them, or leave out `variation` to follow all",
            if known.is_empty() {
                "none yet".to_owned()
            } else {
                known.join(", ")
            }
        ),
    )
}

/// The `trimmed` event of entries a client wanted that the stream no longer had.
pub fn trimmed_event(
    run: &RunId,
    stream: &StreamName,
    t: agentrun_protocol::replay::Trimmed,
) -> sse::Trimmed {
    sse::Trimmed {
        channel: stream.kind().to_owned(),
        first_available: t.first_available,
        missed: t.first_available - t.wanted,
        run: run.to_string(),
        variation: stream.variation().map(|v| v.to_string()),
        wanted: t.wanted,
    }
}

/// A page being written out.
struct Page {
    stream: StreamName,
    entries: VecDeque<Entry>,
    more: bool,
    _held: Reservation,
}

/// One SSE connection to an archived run.
struct Session {
    app: AppState,
    run: RunId,
    source: Source,
    origin: Origin,
    cursors: Cursors,
    /// Streams not yet replayed to their end, taken in order (as the live session does).
    pending: BTreeSet<StreamName>,
    page: Option<Page>,
    pager: Pager,
    out: BytesMut,
    scratch: String,
    end: sse::End,
    done: bool,
    access: Access,
    access_state: HashMap<String, String>,
    recheck_at: Instant,
    /// When something was last written (for keep-alives while the budget is spent).
    wrote_at: Instant,
    _gauge: ConnectionGauge,
    _slot: crate::limits::SseSlot,
}

impl Session {
    fn write_reset(&mut self, reason: ResetReason, old: Option<agentrun_protocol::Epoch>) {
        self.app.metrics.resets.inc();
        let event = session::reset_event(reason, self.origin.epoch, old, &self.run);
        self.write_event(&event);
    }

    /// Every stream from its first entry again (the cursor is not one of this history).
    fn reset(&mut self, reason: ResetReason) {
        for seq in self.cursors.values_mut() {
            *seq = 0;
        }
        self.pending = self.cursors.keys().cloned().collect();
        self.page = None;
        self.write_reset(reason, self.origin.epoch);
    }

    fn take(&mut self) -> Option<Bytes> {
        self.wrote_at = Instant::now();
        Some(self.out.split().freeze())
    }

    fn write_page(&mut self) {
        let Some(mut page) = self.page.take() else {
            return;
        };
        session::write_entries(self, &page.stream, &mut page.entries);
        if !page.entries.is_empty() {
            self.page = Some(page);
        } else if !page.more {
            self.pending.remove(&page.stream);
        }
    }

    /// Reads the next page of the first stream not replayed yet; `false` when it has to wait.
    async fn read_step(&mut self) -> bool {
        let Some(stream) = self.pending.first().cloned() else {
            return true;
        };
        let at = self.cursors.get(&stream).copied().unwrap_or(0);
        let found = match self
            .pager
            .read(&self.source, &self.app, &self.run, &stream, at, usize::MAX)
            .await
        {
            paging::Read::Busy => return false,
            paging::Read::Failed(e) => {
                tracing::warn!(run = %self.run, error = %e, "reading an archived run failed; retrying");
                return false;
            }
            paging::Read::Page(found) => found,
        };
        let more = found.more();
        let paging::Found {
            run_page, mut held, ..
        } = found;
        if run_page.ends_before_cursor.is_some() {
            self.reset(ResetReason::PastTheEnd);
            return true;
        }
        let page = run_page.page;
        if let Some(t) = page.trimmed {
            self.app.metrics.trimmed_notices.inc();
            let event = trimmed_event(&self.run, &stream, t);
            self.write_event(&event);
        }
        self.pager.measure(&page, &mut held);
        if page.entries.is_empty() {
            if !more {
                self.pending.remove(&stream);
            }
            return true;
        }
        self.page = Some(Page {
            stream,
            entries: page.entries.into(),
            more,
            _held: held,
        });
        self.write_page();
        true
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.done {
                return None;
            }
            if self.out.len() >= FLUSH_BYTES {
                return self.take();
            }
            if self.app.shutting_down.load(Ordering::Relaxed) {
                let event = session::shutdown_event(&self.run);
                self.write_event(&event);
                self.done = true;
                return self.take();
            }
            if Instant::now() >= self.recheck_at {
                self.recheck_at = Instant::now() + self.app.limits.auth_recheck;
                if self.access_withdrawn().await {
                    self.done = true;
                    return self.take();
                }
            }
            if self.page.is_some() {
                self.write_page();
                continue;
            }
            if !self.pending.is_empty() {
                if !self.read_step().await {
                    // Send what is ready, then wait a moment (a keep-alive now and then).
                    if !self.out.is_empty() {
                        return self.take();
                    }
                    tokio::time::sleep(RETRY).await;
                    if self.wrote_at.elapsed() >= self.app.limits.keepalive {
                        self.out.extend_from_slice(b": keep-alive\n\n");
                        return self.take();
                    }
                }
                continue;
            }
            let end = self.end.clone();
            self.write_event(&end);
            self.done = true;
            return self.take();
        }
    }
}

/// `GET /api/runs/{run}/events` of a run found only in the archive (after the request was
/// checked and the caller's access too).
pub async fn events(
    app: AppState,
    access: Access,
    run: RunId,
    archived: ArchivedRun,
    request: Request,
) -> Result<Response, ApiError> {
    let Request {
        kinds,
        variation,
        start,
        // An archived run has ended: following it ends like a finished live run.
        follow: _,
    } = request;
    let state = &archived.state;
    let declared = state_hash::variations(state);
    if let Some(v) = &variation
        && !declared.contains(v)
    {
        return Err(unknown_variation(&run, v, &declared));
    }
    let slot = match app.limiter.sse_slot(access.client_key()) {
        Ok(s) => s,
        Err(r) => return Ok(r),
    };
    let phase = state_hash::phase(state);
    let origin = Origin::new(&run, crate::archive::epoch_of(&archived.reader));

    let mut vars: BTreeSet<Variation> = declared;
    if let Some(v) = &variation {
        vars.insert(v.clone());
    }
    let mut streams = Vec::new();
    if kinds.status {
        streams.push(StreamName::Status);
    }
    if kinds.metrics {
        streams.push(StreamName::Metrics);
    }
    for v in vars
        .iter()
        .filter(|v| variation.as_ref().is_none_or(|w| w == *v))
    {
        if kinds.output {
            streams.push(StreamName::Output(v.clone()));
        }
        if kinds.logs {
            streams.push(StreamName::Logs(v.clone()));
        }
    }

    // The same cursor checks as for a live run: another run or another epoch starts over.
    let from_now = matches!(start, Start::Now);
    let (resume, pending_reset) = session::resume_from(start, &origin);
    let mut cursors = Cursors::new();
    for s in streams {
        let at = if from_now {
            archived.reader.last_seq(&s)
        } else {
            resume.get(&s).copied().unwrap_or(0)
        };
        cursors.insert(s, at);
    }

    let gauge = app.metrics.connections.clone();
    gauge.inc();
    let session = Session {
        app: app.clone(),
        run: run.clone(),
        source: Source::Archive(archived.reader.clone()),
        origin,
        pending: cursors.keys().cloned().collect(),
        cursors,
        page: None,
        pager: Pager::default(),
        out: BytesMut::new(),
        scratch: String::new(),
        end: sse::End {
            finished: phase.is_some_and(|p| p.is_final()),
            phase,
            run: run.to_string(),
        },
        done: false,
        access,
        access_state: archived.state.clone(),
        recheck_at: Instant::now() + app.limits.auth_recheck,
        wrote_at: Instant::now(),
        _gauge: ConnectionGauge(gauge),
        _slot: slot,
    };
    Ok(session::start(
        session,
        app.limits.retry_ms,
        (&run, phase, &vars),
        pending_reset,
    ))
}

session::chunks_for!(Session);

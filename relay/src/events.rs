//! `GET /api/runs/{run}/events`: Server-Sent Events with replay and resume.
//!
//! A connection carries a set of streams (the requested channels of the requested
//! variations) and a cursor: the last `seq` it delivered per stream. It joins the run's live
//! feed *first*, then replays each stream from its cursor in pages, then forwards live
//! entries, dropping any `seq` it already delivered. A live entry that is not the next one of
//! its stream (the client lagged, Redis restarted, a variation appeared) makes the connection
//! replay that stream from its cursor again, so it never skips and never repeats.

use crate::AppState;
use crate::api::{ApiError, parse_run};
use crate::cursor::{self, Cursors};
use crate::hub::{FeedItem, Watch, phase_from_state, variations_from_state};
use agentrun_protocol::replay::{last_seq, read_page};
use agentrun_protocol::{RunState, StreamName, Variation};
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::{Instant, Interval};

/// Flush to the socket once this much is buffered (or when nothing more is ready).
const FLUSH_BYTES: usize = 32 * 1024;
/// How long one replay read may take before it is retried.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before retrying a replay read that failed (Redis away).
const REPLAY_RETRY: Duration = Duration::from_millis(250);

#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    /// Comma-separated: output, logs, status, metrics (default all).
    pub channels: Option<String>,
    /// One variation (default all, including variations that appear later).
    pub variation: Option<String>,
    /// earliest (default), now, or a cursor (an `id` the relay sent).
    pub from: Option<String>,
    /// `false` sends the history up to now, then `end`, and closes.
    pub follow: Option<String>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Kinds {
    output: bool,
    logs: bool,
    status: bool,
    metrics: bool,
}

fn parse_kinds(channels: Option<&str>) -> Result<Kinds, ApiError> {
    let Some(list) = channels.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(Kinds {
            output: true,
            logs: true,
            status: true,
            metrics: true,
        });
    };
    let mut k = Kinds::default();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match name {
            "output" => k.output = true,
            "logs" => k.logs = true,
            "status" => k.status = true,
            "metrics" => k.metrics = true,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown channel {other:?}: use any of output, logs, status, metrics (comma-separated)"
                )));
            }
        }
    }
    Ok(k)
}

enum Start {
    Earliest,
    Now,
    Cursor(Cursors),
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
    kinds: Kinds,
    variation: Option<Variation>,
    cursors: Cursors,
    /// Cursors given on resume, for streams that join later (new variations).
    resume: Cursors,
    /// Streams to replay from their cursor to their end before forwarding live entries.
    catchup: BTreeSet<StreamName>,
    watch: Watch,
    out: BytesMut,
    ending: Option<Ending>,
    refresh_variations: bool,
    done: bool,
    retry_at: Option<Instant>,
    keepalive: Interval,
    /// The caller's access and the run's state hash, checked again every `auth_recheck`:
    /// a stream whose token was removed, or whose permission was revoked, ends.
    access: crate::auth::Access,
    access_state: HashMap<String, String>,
    recheck: Interval,
    recheck_due: bool,
    shutdown: bool,
    _gauge: ConnectionGauge,
    _slot: crate::limits::SseSlot,
}

struct ConnectionGauge(prometheus::IntGauge);

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
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

    fn write_id(&mut self) {
        self.out.extend_from_slice(b"id: ");
        cursor::encode_into(&self.cursors, &mut self.out);
        self.out.extend_from_slice(b"\n");
    }

    fn write_event(&mut self, event: &str, data: &serde_json::Value) {
        self.write_id();
        self.out.extend_from_slice(b"event: ");
        self.out.extend_from_slice(event.as_bytes());
        self.out.extend_from_slice(b"\ndata: ");
        self.out.extend_from_slice(data.to_string().as_bytes());
        self.out.extend_from_slice(b"\n\n");
    }

    fn take(&mut self) -> Option<Bytes> {
        Some(self.out.split().freeze())
    }

    fn handle(&mut self, item: &FeedItem) {
        match item {
            FeedItem::Entry {
                stream,
                entry,
                event,
            } => {
                let seq = entry.seq;
                let Some(&at) = self.cursors.get(stream) else {
                    // A stream this connection wants but did not know (a new variation).
                    self.track(stream.clone());
                    return;
                };
                if seq <= at {
                    return;
                }
                if seq == at + 1 && !self.catchup.contains(stream) {
                    if let Some(c) = self.cursors.get_mut(stream) {
                        *c = seq;
                    }
                    self.write_id();
                    let tail =
                        event.get_or_init(|| crate::hub::encode_event(&self.run, stream, entry));
                    self.out.extend_from_slice(tail);
                    self.app.inner.sent_live.inc();
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
        self.app.inner.metrics.slow_client_fallbacks.inc();
        self.catch_up_all();
    }

    /// Reads one page of the first stream that needs catching up.
    async fn catch_up_step(&mut self) {
        let Some(stream) = self.catchup.first().cloned() else {
            return;
        };
        let at = self.cursors.get(&stream).copied().unwrap_or(0);
        let key = stream.key(&self.run);
        let page_size = self.app.inner.limits.replay_page;
        let mut conn = self.app.inner.conn.clone();
        let page =
            match tokio::time::timeout(REPLAY_TIMEOUT, read_page(&mut conn, &key, at, page_size))
                .await
            {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    tracing::debug!(run = %self.run, error = %e, "replay read failed; retrying");
                    self.retry_at = Some(Instant::now() + REPLAY_RETRY);
                    return;
                }
                Err(_) => {
                    self.retry_at = Some(Instant::now() + REPLAY_RETRY);
                    return;
                }
            };
        if let Some(t) = page.trimmed {
            self.app.inner.metrics.trimmed_notices.inc();
            let data = serde_json::json!({
                "run": self.run.as_str(),
                "channel": stream.kind(),
                "variation": stream.variation().map(|v| v.as_str()),
                "wanted": t.wanted,
                "firstAvailable": t.first_available,
                "missed": t.first_available - t.wanted,
            });
            self.write_event("trimmed", &data);
        }
        let full = page.entries.len() >= page_size;
        for entry in &page.entries {
            self.cursors.insert(stream.clone(), entry.seq);
            self.write_id();
            let tail = crate::hub::encode_event(&self.run, &stream, entry);
            self.out.extend_from_slice(&tail);
            self.app.inner.sent_replay.inc();
        }
        if !full {
            self.catchup.remove(&stream);
        }
    }

    async fn refresh_variations_step(&mut self) {
        self.refresh_variations = false;
        let mut conn = self.app.inner.conn.clone();
        let state: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.run.state_key())
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let vars: Vec<Variation> = variations_from_state(&state).into_iter().collect();
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
        let data = serde_json::json!({
            "run": self.run.as_str(),
            "phase": phase.map(|p| p.as_str()),
            "finished": finished,
        });
        self.write_event("end", &data);
        self.done = true;
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.done {
                return None;
            }
            if self.out.len() >= FLUSH_BYTES {
                return self.take();
            }
            if self.shutdown || self.app.inner.shutting_down.load(Ordering::Relaxed) {
                let data = serde_json::json!({
                    "run": self.run.as_str(),
                    "reason": "the relay is shutting down; reconnect with this event's id as Last-Event-ID",
                });
                self.write_event("shutdown", &data);
                self.done = true;
                return self.take();
            }
            if self.recheck_due {
                self.recheck_due = false;
                let still = self
                    .access
                    .still_allowed(&self.app.inner.auth, &self.access_state)
                    .await;
                // An API server that cannot be asked does not end streams.
                if still == Some(false) {
                    tracing::info!(run = %self.run, client = self.access.client_key(), "the caller may no longer see this run (token removed or permission revoked); ending its stream");
                    self.out.extend_from_slice(b": access withdrawn\n\n");
                    self.done = true;
                    return self.take();
                }
            }
            if self.retry_at.is_none() {
                if self.refresh_variations {
                    self.refresh_variations_step().await;
                    continue;
                }
                if !self.catchup.is_empty() {
                    self.catch_up_step().await;
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
                    Err(TryRecvError::Closed) => {
                        self.done = true;
                        return self.take();
                    }
                }
            }
            let retry_at = self.retry_at;
            tokio::select! {
                biased;
                _ = async { if let Some(t) = retry_at { tokio::time::sleep_until(t).await } }, if retry_at.is_some() => {
                    self.retry_at = None;
                }
                r = self.watch.rx.recv() => match r {
                    Ok(item) => self.handle(&item),
                    Err(RecvError::Lagged(_)) => self.lagged(),
                    Err(RecvError::Closed) => self.done = true,
                },
                _ = self.keepalive.tick() => {
                    self.out.extend_from_slice(b": keep-alive\n\n");
                }
                _ = self.recheck.tick() => self.recheck_due = true,
            }
        }
    }
}

fn last_event_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// `GET /api/runs/{run}/events`.
pub async fn events(
    State(app): State<AppState>,
    Extension(access): Extension<crate::auth::Access>,
    Path(run): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let run = parse_run(&run)?;
    let kinds = parse_kinds(q.channels.as_deref())?;
    let variation = q
        .variation
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|v| Variation::new(v).map_err(|e| ApiError::bad_request(e.to_string())))
        .transpose()?;
    let follow = !matches!(q.follow.as_deref(), Some("false" | "0" | "no"));
    // Last-Event-ID (an EventSource reconnecting) wins over `from`, which stays in its URL.
    let start = match last_event_id(&headers).or(q.from.clone()).as_deref() {
        None | Some("earliest") => Start::Earliest,
        Some("now") => Start::Now,
        Some(token) => {
            Start::Cursor(cursor::decode(token).map_err(|e| ApiError::bad_request(e.to_string()))?)
        }
    };
    if app.inner.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the relay is shutting down; reconnect to another replica or retry shortly",
        ));
    }

    // Join the live feed first, so nothing published from here on is missed.
    let watch = app.inner.hub.watch(&run).await;
    if let Some(v) = &variation {
        app.inner.hub.ensure_variation(&watch.feed, v).await;
    }
    let mut conn = app.inner.conn.clone();
    let state: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(run.state_key())
        .query_async(&mut conn)
        .await
        .map_err(|e| ApiError::redis(&app, e))?;
    if state.is_empty() || !access.can_see(&state).await? {
        return Err(ApiError::not_found(&run));
    }
    let slot = match app.inner.limiter.sse_slot(access.client_key()) {
        Ok(s) => s,
        Err(r) => return Ok(r),
    };
    let phase = phase_from_state(&state);

    let gauge = app.inner.metrics.connections.clone();
    gauge.inc();
    let keepalive_period = app.inner.limits.keepalive;
    let recheck_period = app.inner.limits.auth_recheck;
    let mut session = Session {
        run: run.clone(),
        kinds,
        variation: variation.clone(),
        cursors: Cursors::new(),
        resume: match &start {
            Start::Cursor(c) => c.clone(),
            _ => Cursors::new(),
        },
        catchup: BTreeSet::new(),
        watch,
        out: BytesMut::new(),
        ending: None,
        refresh_variations: false,
        done: false,
        retry_at: None,
        keepalive: tokio::time::interval_at(Instant::now() + keepalive_period, keepalive_period),
        recheck: tokio::time::interval_at(Instant::now() + recheck_period, recheck_period),
        recheck_due: false,
        access_state: state.clone(),
        access,
        shutdown: false,
        _gauge: ConnectionGauge(gauge),
        _slot: slot,
        app: app.clone(),
    };
    let mut vars: BTreeSet<Variation> = session.watch.feed.variations().into_iter().collect();
    vars.extend(variations_from_state(&state));
    if let Some(v) = &variation {
        vars.insert(v.clone());
    }
    let vars: Vec<Variation> = vars.into_iter().collect();
    for s in session.streams_for(&vars) {
        session.track(s);
    }
    if let Start::Now = start {
        for (stream, at) in session.cursors.iter_mut() {
            *at = last_seq(&mut conn, &stream.key(&run))
                .await
                .map_err(|e| ApiError::redis(&app, e))?;
        }
    }
    match phase {
        Some(p) if p.is_final() => session.ending = Some(Ending::Final(p)),
        p if !follow => session.ending = Some(Ending::Snapshot(p)),
        _ => {}
    }

    session.out.extend_from_slice(
        format!(": agentrun relay\nretry: {}\n\n", app.inner.limits.retry_ms).as_bytes(),
    );
    let open = serde_json::json!({
        "run": run.as_str(),
        "variations": vars.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        "phase": phase.map(|p| p.as_str()),
    });
    session.write_event("open", &open);

    let stream = futures::stream::unfold(session, |mut s| async move {
        s.next_chunk()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), s))
    });
    let mut response = Body::from_stream(stream).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

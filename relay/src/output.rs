// Long file: the range and search endpoints share the line index and its bounds; split, each half would reach into the other.
//! A variation's output as a document of numbered lines: ranges of it and search across it.
//!
//! - `GET /api/runs/{run}/variations/{variation}/output/range`: a page of the output stream's
//!   entries at a position (`after=SEQ`, `before=SEQ`, `line=N`; none: the newest page), each
//!   with the number of the line its first byte belongs to. The web page loads the output
//!   it has not kept with it, as the user scrolls, jumps to a search match or opens a line link.
//! - `GET /api/runs/{run}/variations/{variation}/output/search?q=TEXT`: every line of the
//!   output that matches, streamed as NDJSON with its line number and position (`seq` of the
//!   entry the line starts in and the byte offset there), then a summary line; bounded in
//!   time, matches and memory.
//!
//! Line `N` is what `sed -n Np` prints of the downloaded output: lines are counted by `\n`
//! over the output entries' bytes in stream order, from the first entry Redis still holds
//! (a stream trimmed by `MAXLEN` counts from its first entry left). Counting from the start
//! for every request would read the whole stream each time, so the relay keeps a
//! [`LineIndex`]: a few checkpoints per stream (`seq` → lines before it), bounded in streams
//! and checkpoints, valid within one epoch and one first entry.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use agentrun_protocol::{Entry, EntryType, Envelope, Epoch, RunId, StreamName, Variation};
use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use tokio::time::Instant;

use crate::AppState;
use crate::auth::Access;
use crate::budget::Reservation;
use crate::error::ApiError;
use crate::paging::{Pager, Read, Source};
use crate::query::{parse_query, parse_run};
use agentrun_protocol::state_hash;

/// Most entries one range page holds.
pub const MAX_RANGE_ENTRIES: usize = 1000;
/// Entries a range page holds when `limit` is not given.
pub const DEFAULT_RANGE_ENTRIES: usize = 200;
/// About how many bytes of content one range page holds at most (the page stops after the
/// entry that crosses it).
pub const RANGE_BYTES: usize = 1024 * 1024;
/// How long a range request may take (reading up to its first entry included).
const RANGE_TIME: Duration = Duration::from_secs(20);
/// How long a search may run; past it the summary says where it stopped.
pub const SEARCH_TIME: Duration = Duration::from_secs(30);
/// Most matches a search sends when `limit` is not given, and at most.
pub const DEFAULT_MATCHES: usize = 1000;
pub const MAX_MATCHES: usize = 10_000;
/// The longest query.
pub const MAX_QUERY: usize = 1000;
/// Bytes of one line that a search looks at (the rest of a longer line is not searched).
pub const MAX_SEARCH_LINE: usize = 64 * 1024;
/// Characters of a matching line sent with the match.
const MATCH_TEXT: usize = 300;
/// Content between two checkpoints of the line index.
const CHECKPOINT_BYTES: u64 = 1024 * 1024;
/// Checkpoints kept per stream: past it every other one is dropped (and the spacing doubles).
const MAX_CHECKPOINTS: usize = 1024;
/// Streams the line index keeps checkpoints of; the least recently used go first.
const MAX_INDEXED_STREAMS: usize = 256;

/// Checks that the caller may see `run` and that it has `variation`: 404 otherwise (the same
/// answer for a run that does not exist and one the caller may not see). Also says where the
/// run's entries are: Redis, or its archive once Redis no longer holds it.
pub async fn visible_variation(
    state: &AppState,
    access: &Access,
    run: &str,
    variation: &str,
) -> Result<(RunId, Variation, Source), ApiError> {
    let run = parse_run(run)?;
    let variation = Variation::new(variation).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let located = crate::archived::locate(state, access, &run).await?;
    let known = state_hash::variations(located.state());
    if !known.contains(&variation) {
        let names: Vec<&str> = known.iter().map(Variation::as_str).collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "run {run} has no variation {variation}; its variations are: {}",
                names.join(", ")
            ),
        ));
    }
    Ok((run, variation, located.source()))
}

// ---------------------------------------------------------------------------------------------
// Line index

/// A position between entries: after entry `after`, `lines` newlines were seen, and whether
/// the last byte seen was a newline (the next byte starts a line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub after: u64,
    pub lines: u64,
    pub line_start: bool,
}

impl Mark {
    /// Before the first entry.
    pub const START: Mark = Mark {
        after: 0,
        lines: 0,
        line_start: true,
    };

    /// The mark after `entry`, this being the mark before it.
    pub fn past(self, entry: &Entry) -> Mark {
        let content = counted(entry);
        Mark {
            after: entry.seq,
            lines: self.lines + count_newlines(content),
            line_start: content.last().map_or(self.line_start, |b| *b == b'\n'),
        }
    }

    /// The number of the line the next byte belongs to (1-based).
    pub fn line(self) -> u64 {
        self.lines + 1
    }
}

/// The bytes of an entry that count as output (a gap adds none).
fn counted(entry: &Entry) -> &[u8] {
    if entry.kind == EntryType::Output {
        &entry.content
    } else {
        &[]
    }
}

fn count_newlines(b: &[u8]) -> u64 {
    b.iter().filter(|c| **c == b'\n').count() as u64
}

#[derive(Debug)]
struct Checkpoints {
    epoch: Option<Epoch>,
    /// The stream's first entry when the checkpoints were taken: lines count from it.
    first: u64,
    /// In order of `after` (and of `lines`); never holds [`Mark::START`].
    marks: Vec<Mark>,
    spacing: u64,
    /// Content read since the last checkpoint, when walking on from it.
    used: u64,
    /// When a request last used these checkpoints: the least recently used stream is the
    /// one dropped when the index is full.
    last_used: u64,
}

/// Checkpoints of the lines of output streams (see the module documentation).
#[derive(Debug, Default)]
pub struct LineIndex {
    streams: Mutex<HashMap<String, Checkpoints>>,
    /// Counts uses, to order streams by their last use.
    uses: std::sync::atomic::AtomicU64,
}

impl LineIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Checkpoints>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The checkpoints of `key` if they count in `epoch` from entry `first`; others are
    /// dropped.
    fn valid<'a>(
        map: &'a mut HashMap<String, Checkpoints>,
        uses: &std::sync::atomic::AtomicU64,
        key: &str,
        epoch: Option<Epoch>,
        first: u64,
    ) -> Option<&'a mut Checkpoints> {
        if map
            .get(key)
            .is_some_and(|c| c.epoch != epoch || c.first != first)
        {
            map.remove(key);
        }
        let c = map.get_mut(key)?;
        c.used = 0;
        c.last_used = uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(c)
    }

    /// The last checkpoint that `pred` accepts (checkpoints are in order; `pred` accepts a
    /// prefix of them), or [`Mark::START`].
    fn nearest(
        &self,
        key: &str,
        epoch: Option<Epoch>,
        first: u64,
        pred: impl Fn(&Mark) -> bool,
    ) -> Mark {
        let mut map = self.lock();
        let Some(c) = Self::valid(&mut map, &self.uses, key, epoch, first) else {
            return Mark::START;
        };
        let n = c.marks.partition_point(|m| pred(m));
        if n == 0 { Mark::START } else { c.marks[n - 1] }
    }

    /// Notes that `bytes` of content were read, ending at `mark`; takes a checkpoint when
    /// enough were read since the last one.
    fn note(&self, key: &str, epoch: Option<Epoch>, first: u64, mark: Mark, bytes: u64) {
        let mut map = self.lock();
        if !map.contains_key(key) {
            if map.len() >= MAX_INDEXED_STREAMS {
                // The least recently used stream goes; read again, it is indexed again.
                let oldest = map
                    .iter()
                    .min_by_key(|(_, c)| c.last_used)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    map.remove(&k);
                }
            }
            map.insert(
                key.to_owned(),
                Checkpoints {
                    epoch,
                    first,
                    marks: Vec::new(),
                    spacing: CHECKPOINT_BYTES,
                    used: 0,
                    last_used: self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                },
            );
        }
        let Some(c) = map.get_mut(key) else { return };
        if c.epoch != epoch || c.first != first {
            return;
        }
        c.used += bytes;
        if c.used < c.spacing || c.marks.last().is_some_and(|m| m.after >= mark.after) {
            return;
        }
        c.used = 0;
        c.marks.push(mark);
        if c.marks.len() > MAX_CHECKPOINTS {
            let kept: Vec<Mark> = c.marks.iter().skip(1).step_by(2).copied().collect();
            c.marks = kept;
            c.spacing *= 2;
        }
    }

    /// Checkpoints held in all (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().values().map(|c| c.marks.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------------------------
// Reading an output stream entry by entry, with line numbers

/// Reads an output stream forward from a mark, one budgeted page at a time, keeping count of
/// the lines and feeding the line index. All its pages belong to one epoch.
struct Walk {
    app: AppState,
    run: RunId,
    source: Source,
    stream: StreamName,
    key: String,
    pager: Pager,
    deadline: Instant,
    epoch: Option<Epoch>,
    first: u64,
    mark: Mark,
    page: VecDeque<Entry>,
    _held: Option<Reservation>,
    more: bool,
}

/// The stream's first entry and the run's epoch (0: empty stream).
async fn first_entry(
    app: &AppState,
    source: &Source,
    run: &RunId,
    stream: &StreamName,
) -> Result<(u64, Option<Epoch>), ApiError> {
    let found = source
        .read_page(app, run, stream, 0, 1)
        .await
        .map_err(|e| app.redis_error(e))?;
    Ok((found.page.entries.first().map_or(0, |e| e.seq), found.epoch))
}

fn changed_underneath() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "the run's history changed while it was read (Redis lost entries, or the stream was trimmed); load it again",
    )
}

impl Walk {
    async fn new(
        app: &AppState,
        source: Source,
        run: &RunId,
        variation: &Variation,
        time: Duration,
    ) -> Result<Self, ApiError> {
        let stream = StreamName::Output(variation.clone());
        let (first, epoch) = first_entry(app, &source, run, &stream).await?;
        Ok(Self {
            key: stream.key(run),
            app: app.clone(),
            run: run.clone(),
            source,
            stream,
            pager: Pager::default(),
            deadline: Instant::now() + time,
            epoch,
            first,
            mark: Mark::START,
            page: VecDeque::new(),
            _held: None,
            more: true,
        })
    }

    /// Starts from the nearest checkpoint that `pred` accepts.
    fn restart_at_checkpoint(&mut self, pred: impl Fn(&Mark) -> bool) {
        self.mark = self
            .app
            .line_index
            .nearest(&self.key, self.epoch, self.first, pred);
        self.page.clear();
        self._held = None;
        self.more = true;
    }

    fn timed_out(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The next entry and the mark before it; `None` at the end of the stream (as it is now).
    async fn next(&mut self) -> Result<Option<(Entry, Mark)>, ApiError> {
        if self.page.is_empty() {
            if !self.more {
                return Ok(None);
            }
            self.fill().await?;
        }
        let Some(entry) = self.page.pop_front() else {
            return Ok(None);
        };
        let before = self.mark;
        self.mark = before.past(&entry);
        self.app.line_index.note(
            &self.key,
            self.epoch,
            self.first,
            self.mark,
            counted(&entry).len() as u64,
        );
        Ok(Some((entry, before)))
    }

    async fn fill(&mut self) -> Result<(), ApiError> {
        self._held = None;
        loop {
            if self.timed_out() {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "reading the output took too long (Redis is slow or the relay is busy); retry shortly",
                ));
            }
            match self
                .pager
                .read(
                    &self.source,
                    &self.app,
                    &self.run,
                    &self.stream,
                    self.mark.after,
                    usize::MAX,
                )
                .await
            {
                Read::Busy => continue,
                Read::Failed(e) => return Err(self.app.redis_error(e)),
                Read::Page(found) => {
                    let more = found.more();
                    let mut held = found.held;
                    let run_page = found.run_page;
                    if run_page.epoch != self.epoch {
                        return Err(changed_underneath());
                    }
                    let page = run_page.page;
                    if let Some(t) = page.trimmed
                        && !(self.mark.after == 0 && t.first_available == self.first)
                    {
                        return Err(changed_underneath());
                    }
                    self.pager.measure(&page, &mut held);
                    self.more = more;
                    self.page = page.entries.into();
                    self._held = Some(held);
                    return Ok(());
                }
            }
        }
    }

    /// Walks on to the mark after entry `seq` (or the stream's end, if it ends before).
    async fn walk_past(&mut self, seq: u64) -> Result<(), ApiError> {
        while self.mark.after < seq {
            if self.next().await?.is_none() {
                break;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Range

#[derive(Debug, Default, Deserialize)]
struct RangeQuery {
    after: Option<String>,
    before: Option<String>,
    line: Option<String>,
    limit: Option<String>,
}

/// Where a range page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// Entries with `seq` above this.
    After(u64),
    /// The entries just before this `seq`.
    Before(u64),
    /// From the entry that holds the first byte of line N (or the newline that ends line N-1).
    Line(u64),
    /// The newest entries.
    End,
}

fn number(name: &str, text: &str, what: &str) -> Result<u64, ApiError> {
    text.trim().parse::<u64>().map_err(|_| {
        ApiError::bad_request(format!(
            "`{name}` must be {what} (a whole number), not {text:?}"
        ))
    })
}

/// Reads the query of a range request: at most one position, and a page size.
pub fn parse_range(query: Option<&str>) -> Result<(At, usize), ApiError> {
    let q: RangeQuery = parse_query(query)?;
    let given = [&q.after, &q.before, &q.line]
        .iter()
        .filter(|p| p.is_some())
        .count();
    if given > 1 {
        return Err(ApiError::bad_request(
            "give one of `after`, `before` and `line` (or none, for the newest entries)",
        ));
    }
    let at = if let Some(a) = &q.after {
        At::After(number(
            "after",
            a,
            "the seq of an entry (0: from the start)",
        )?)
    } else if let Some(b) = &q.before {
        At::Before(number("before", b, "the seq of an entry")?)
    } else if let Some(l) = &q.line {
        let n = number("line", l, "a line number, from 1")?;
        if n == 0 {
            return Err(ApiError::bad_request(
                "`line` counts from 1 (the first line of the output)",
            ));
        }
        At::Line(n)
    } else {
        At::End
    };
    let limit = match &q.limit {
        None => DEFAULT_RANGE_ENTRIES,
        Some(l) => {
            let n = number("limit", l, "a number of entries")?;
            if n == 0 || n > MAX_RANGE_ENTRIES as u64 {
                return Err(ApiError::bad_request(format!(
                    "`limit` must be between 1 and {MAX_RANGE_ENTRIES} entries, not {n}"
                )));
            }
            n as usize
        }
    };
    Ok((at, limit))
}

/// `GET /api/runs/{run}/variations/{variation}/output/range`.
pub async fn range(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path((run, variation)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (at, limit) = parse_range(query.as_deref())?;
    let (run, variation, source) = visible_variation(&state, &access, &run, &variation).await?;
    let mut walk = Walk::new(&state, source, &run, &variation, RANGE_TIME).await?;
    let last = walk.source.last_seq(&state, &run, &walk.stream).await?;
    // Walk to the mark just before the first entry the page may hold.
    match at {
        At::After(seq) => {
            let seq = seq.max(walk.first.saturating_sub(1));
            walk.restart_at_checkpoint(|m| m.after <= seq);
            walk.walk_past(seq).await?;
        }
        At::Before(_) | At::End => {
            let before = match at {
                At::Before(seq) => seq,
                _ => last.saturating_add(1),
            };
            let from = before
                .saturating_sub(limit as u64 + 1)
                .max(walk.first.saturating_sub(1));
            walk.restart_at_checkpoint(|m| m.after <= from);
            walk.walk_past(from).await?;
        }
        At::Line(n) => {
            // The entry holding the newline that ends line n-1 (line 1: the first entry).
            walk.restart_at_checkpoint(|m| m.lines + 1 < n);
            while let Some((entry, before)) = walk.next().await? {
                if before.lines + count_newlines(counted(&entry)) + 1 >= n {
                    walk.page.push_front(entry);
                    walk.mark = before;
                    break;
                }
            }
        }
    }
    let until = match at {
        At::Before(seq) => seq,
        _ => u64::MAX,
    };
    // A page before a position keeps the entries nearest to it: older ones leave as newer
    // ones come, so it holds at most `limit` entries and about RANGE_BYTES.
    let backwards = matches!(at, At::Before(_) | At::End);
    let mut kept: VecDeque<(Entry, Mark)> = VecDeque::new();
    let mut bytes = 0usize;
    while backwards || (kept.len() < limit && bytes < RANGE_BYTES) {
        let Some((entry, before)) = walk.next().await? else {
            break;
        };
        if entry.seq >= until {
            break;
        }
        bytes += entry.content.len();
        kept.push_back((entry, before));
        while backwards && (kept.len() > limit || (bytes > RANGE_BYTES && kept.len() > 1)) {
            if let Some((e, _)) = kept.pop_front() {
                bytes -= e.content.len();
            }
        }
    }
    let start = kept.front().map_or(walk.mark, |(_, m)| *m);
    let entries: Vec<serde_json::Value> = kept
        .iter()
        .map(|(entry, before)| {
            let mut value = serde_json::to_value(Envelope::new(&run, &walk.stream, entry))
                .unwrap_or(serde_json::Value::Null);
            if let Some(o) = value.as_object_mut() {
                o.insert("line".into(), before.line().into());
            }
            value
        })
        .collect();
    let next = walk.mark;
    let body = serde_json::json!({
        "run": run.as_str(),
        "variation": variation.as_str(),
        "epoch": walk.epoch.map(|e| e.to_string()),
        "firstSeq": walk.first,
        "lastSeq": last,
        "startsLine": start.line_start,
        "line": start.line(),
        "nextLine": next.line(),
        "nextSeq": next.after,
        "moreBefore": start.after >= walk.first && walk.first > 0,
        "moreAfter": next.after < last,
        "entries": entries,
    });
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

// ---------------------------------------------------------------------------------------------
// Search

#[derive(Debug, Default, Deserialize)]
struct SearchQuery {
    q: Option<String>,
    regex: Option<String>,
    case: Option<String>,
    limit: Option<String>,
}

fn flag(name: &str, value: Option<&str>) -> Result<bool, ApiError> {
    match value.map(str::trim) {
        None | Some("" | "false" | "0" | "no") => Ok(false),
        Some("true" | "1" | "yes") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "`{name}` is true or false, not {other:?}"
        ))),
    }
}

/// A checked search: the pattern and how many matches to send.
#[derive(Debug)]
pub struct Search {
    pub pattern: regex::bytes::Regex,
    pub limit: usize,
}

/// Reads the query of a search: `q` (text, or a regular expression with `regex=true`),
/// `case=true` for a case-sensitive search, `limit` matches.
pub fn parse_search(query: Option<&str>) -> Result<Search, ApiError> {
    let q: SearchQuery = parse_query(query)?;
    let text = q.q.unwrap_or_default();
    if text.is_empty() {
        return Err(ApiError::bad_request(
            "`q` is empty: give the text to search for (q=TEXT, or a regular expression with regex=true)",
        ));
    }
    if text.chars().count() > MAX_QUERY {
        return Err(ApiError::bad_request(format!(
            "`q` is {} characters long; search for at most {MAX_QUERY}",
            text.chars().count()
        )));
    }
    let is_regex = flag("regex", q.regex.as_deref())?;
    let case = flag("case", q.case.as_deref())?;
    let limit = match q.limit {
        None => DEFAULT_MATCHES,
        Some(l) => {
            let n = number("limit", &l, "a number of matches")?;
            if n == 0 || n > MAX_MATCHES as u64 {
                return Err(ApiError::bad_request(format!(
                    "`limit` must be between 1 and {MAX_MATCHES} matches, not {n}"
                )));
            }
            n as usize
        }
    };
    let source = if is_regex {
        text.clone()
    } else {
        regex::escape(&text)
    };
    let pattern = regex::bytes::RegexBuilder::new(&source)
        .case_insensitive(!case)
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20)
        .build()
        .map_err(|e| {
            ApiError::bad_request(format!(
                "`q` is not a valid regular expression ({e}); fix it, or leave out regex=true to search for the text as it is"
            ))
        })?;
    if pattern.is_match(b"") {
        return Err(ApiError::bad_request(
            "`q` matches the empty text, so it would match every line: give a pattern that needs at least one character",
        ));
    }
    Ok(Search { pattern, limit })
}

/// The text of a line as a terminal user reads it for searching: escape sequences (colours,
/// cursor moves, OSC titles) removed, other bytes kept.
pub fn strip_escapes(line: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if b != 0x1b {
            if b != b'\r' {
                out.push(b);
            }
            i += 1;
            continue;
        }
        match line.get(i + 1) {
            Some(b'[') => {
                // CSI: parameters and intermediates, then a final byte 0x40..=0x7e.
                i += 2;
                while i < line.len() && !(0x40..=0x7e).contains(&line[i]) {
                    i += 1;
                }
                i += 1;
            }
            Some(b']') => {
                // OSC: up to BEL or ESC \.
                i += 2;
                while i < line.len() {
                    if line[i] == 0x07 {
                        i += 1;
                        break;
                    }
                    if line[i] == 0x1b && line.get(i + 1) == Some(&b'\\') {
                        i += 2;
                        break;
                    }
                    i += 1;
                }
            }
            Some(_) => i += 2,
            None => i += 1,
        }
    }
}

/// A line being assembled from entries: its first `MAX_SEARCH_LINE` bytes and where it starts.
struct LineBuf {
    bytes: Vec<u8>,
    number: u64,
    seq: u64,
    offset: usize,
    started: bool,
}

/// Where a search is, and what it found.
struct Searcher {
    search: Search,
    matches: usize,
    plain: Vec<u8>,
}

impl Searcher {
    /// The match record of a complete line, if it matches.
    fn check(&mut self, line: &LineBuf) -> Option<serde_json::Value> {
        strip_escapes(&line.bytes, &mut self.plain);
        let m = self.search.pattern.find(&self.plain)?;
        self.matches += 1;
        let text = String::from_utf8_lossy(&self.plain);
        // Show the match with some of the line around it.
        let at = String::from_utf8_lossy(&self.plain[..m.start()])
            .chars()
            .count();
        let skip = at.saturating_sub(MATCH_TEXT / 3);
        let shown: String = text.chars().skip(skip).take(MATCH_TEXT).collect();
        Some(serde_json::json!({
            "line": line.number,
            "seq": line.seq,
            "offset": line.offset,
            "text": shown,
            "clipped": skip > 0 || text.chars().count() > skip + MATCH_TEXT,
        }))
    }
}

fn ndjson(value: &serde_json::Value) -> Bytes {
    let mut v = serde_json::to_vec(value).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// `GET /api/runs/{run}/variations/{variation}/output/search`.
pub async fn search(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path((run, variation)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let search = parse_search(query.as_deref())?;
    let (run, variation, source) = visible_variation(&state, &access, &run, &variation).await?;
    // A search counts as one of the caller's streams (`--max-sse-per-client`) while it runs.
    let slot = match state.limiter.sse_slot(access.client_key()) {
        Ok(s) => s,
        Err(r) => return Ok(r),
    };
    let walk = Walk::new(&state, source, &run, &variation, SEARCH_TIME).await?;
    // Small messages, few in flight: a client that reads slowly holds the search back.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        run_search(walk, search, tx).await;
        drop(slot);
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok(crate::sse::streamed(
        body,
        "application/x-ndjson",
        "no-store",
    ))
}

/// Why a search stopped before the end of the output.
fn stopped(reason: &str, message: String) -> serde_json::Value {
    serde_json::json!({ "done": true, "complete": false, "reason": reason, "message": message })
}

async fn run_search(mut walk: Walk, search: Search, tx: tokio::sync::mpsc::Sender<Bytes>) {
    let limit = search.limit;
    let mut s = Searcher {
        search,
        matches: 0,
        plain: Vec::new(),
    };
    let mut line = LineBuf {
        bytes: Vec::new(),
        number: 1,
        seq: 0,
        offset: 0,
        started: false,
    };
    let summary = loop {
        if tx.is_closed() {
            return; // the client went away
        }
        if walk.timed_out() {
            break stopped(
                "time",
                format!(
                    "the search stopped after {} s at line {}; narrow it, or search the download (kubectl agentrun logs RUN | grep)",
                    SEARCH_TIME.as_secs(),
                    line.number
                ),
            );
        }
        let (entry, _) = match walk.next().await {
            Ok(Some(e)) => e,
            Ok(None) => {
                if line.started
                    && !line.bytes.is_empty()
                    && let Some(m) = s.check(&line)
                    && tx.send(ndjson(&m)).await.is_err()
                {
                    return;
                }
                break serde_json::json!({ "done": true, "complete": true });
            }
            Err(e) => break stopped("error", e.message),
        };
        let content = counted(&entry);
        let mut start = 0;
        while start < content.len() {
            if !line.started {
                line.started = true;
                line.seq = entry.seq;
                line.offset = start;
            }
            let rest = &content[start..];
            let end = memchr_newline(rest);
            let part = &rest[..end.unwrap_or(rest.len())];
            let room = MAX_SEARCH_LINE.saturating_sub(line.bytes.len());
            line.bytes.extend_from_slice(&part[..part.len().min(room)]);
            let Some(nl) = end else { break };
            if let Some(m) = s.check(&line)
                && tx.send(ndjson(&m)).await.is_err()
            {
                return; // the client went away
            }
            if s.matches >= limit {
                let _ = tx
                    .send(ndjson(&serde_json::json!({
                        "done": true, "complete": false, "reason": "limit", "matches": s.matches,
                        "message": format!("the first {limit} matches were sent (limit={limit}); narrow the search to see others"),
                    })))
                    .await;
                return;
            }
            line.bytes.clear();
            line.started = false;
            line.number += 1;
            start += nl + 1;
        }
    };
    let mut summary = summary;
    if let Some(o) = summary.as_object_mut() {
        // Lines searched: the last one counts when it has begun.
        let lines = line.number - u64::from(!line.started);
        o.insert("matches".into(), s.matches.into());
        o.insert("lines".into(), lines.into());
    }
    let _ = tx.send(ndjson(&summary)).await;
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|c| *c == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(seq: u64, content: &[u8]) -> Entry {
        Entry {
            seq,
            ts: 0,
            kind: EntryType::Output,
            content: Bytes::copy_from_slice(content),
            meta: None,
        }
    }

    #[test]
    fn marks_count_lines_over_entries_and_gaps_add_none() {
        let m = Mark::START.past(&entry(1, b"a\nb"));
        assert_eq!((m.after, m.lines, m.line_start, m.line()), (1, 1, false, 2));
        let mut gap = entry(2, b"");
        gap.kind = EntryType::Gap;
        let g = m.past(&gap);
        assert_eq!((g.after, g.lines, g.line_start), (2, 1, false));
        let m = g.past(&entry(3, b"c\n\n"));
        assert_eq!((m.lines, m.line_start, m.line()), (3, true, 4));
    }

    #[test]
    fn the_index_keeps_checkpoints_bounded_and_drops_them_for_another_epoch() {
        let index = LineIndex::default();
        let e = Some(Epoch::from_u64(7));
        for i in 1..=(3 * MAX_CHECKPOINTS as u64) {
            let mark = Mark {
                after: i,
                lines: i * 10,
                line_start: true,
            };
            index.note("k", e, 1, mark, CHECKPOINT_BYTES);
        }
        assert!(index.len() <= MAX_CHECKPOINTS, "{}", index.len());
        let near = index.nearest("k", e, 1, |m| m.after <= 1500);
        assert!(near.after <= 1500 && near.after > 1500 - 8, "{near:?}");
        assert_eq!(near.lines, near.after * 10);
        // Another epoch, or another first entry (trimmed): counted again from the start.
        assert_eq!(index.nearest("k", None, 1, |_| true), Mark::START);
        assert!(index.is_empty());
        index.note(
            "k",
            e,
            1,
            Mark::START.past(&entry(1, b"\n")),
            CHECKPOINT_BYTES,
        );
        assert_eq!(index.nearest("k", e, 5, |_| true), Mark::START);
    }

    #[test]
    fn the_index_keeps_at_most_its_number_of_streams() {
        let index = LineIndex::default();
        for i in 0..(MAX_INDEXED_STREAMS + 10) {
            let mark = Mark::START.past(&entry(1, b"\n"));
            index.note(&format!("k{i}"), None, 1, mark, CHECKPOINT_BYTES);
        }
        assert!(index.lock().len() <= MAX_INDEXED_STREAMS);
    }

    #[test]
    fn a_full_index_drops_the_least_recently_used_stream() {
        let index = LineIndex::default();
        let mark = Mark::START.past(&entry(1, b"\n"));
        for i in 0..MAX_INDEXED_STREAMS {
            index.note(&format!("k{i}"), None, 1, mark, CHECKPOINT_BYTES);
        }
        // The first stream indexed is read again: it is now the most recently used.
        assert_eq!(index.nearest("k0", None, 1, |_| true), mark);
        index.note("new", None, 1, mark, CHECKPOINT_BYTES);
        let map = index.lock();
        assert!(map.contains_key("k0"), "the stream read last stays");
        assert!(!map.contains_key("k1"), "the least recently used went");
        assert!(map.contains_key("new") && map.len() == MAX_INDEXED_STREAMS);
    }

    #[test]
    fn range_queries_are_read_or_refused_naming_the_parameter() {
        assert_eq!(parse_range(None).unwrap(), (At::End, DEFAULT_RANGE_ENTRIES));
        assert_eq!(
            parse_range(Some("after=5&limit=10")).unwrap(),
            (At::After(5), 10)
        );
        assert_eq!(parse_range(Some("before=9")).unwrap().0, At::Before(9));
        assert_eq!(parse_range(Some("line=1234")).unwrap().0, At::Line(1234));
        for (q, needle) in [
            ("after=1&before=2", "one of `after`"),
            ("after=x", "`after`"),
            ("before=-1", "`before`"),
            ("line=0", "`line` counts from 1"),
            ("line=abc", "`line`"),
            ("limit=0", "`limit`"),
            ("limit=100000", "`limit`"),
            ("after=1&after=2", "at most once"),
        ] {
            refused(parse_range(Some(q)).map(|_| ()), q, needle);
        }
    }

    /// `result` is a 400 whose message contains `needle`.
    fn refused(result: Result<(), ApiError>, q: &str, needle: &str) {
        let e = result.unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains(needle), "{q}: {}", e.message);
    }

    #[test]
    fn search_queries_are_read_or_refused_naming_the_parameter() {
        let s = parse_search(Some("q=Hello")).unwrap();
        assert!(s.pattern.is_match(b"say hello"));
        assert_eq!(s.limit, DEFAULT_MATCHES);
        let s = parse_search(Some("q=Hello&case=true")).unwrap();
        assert!(!s.pattern.is_match(b"say hello"));
        // Text is searched as it is, unless regex=true.
        let s = parse_search(Some("q=a.c")).unwrap();
        assert!(!s.pattern.is_match(b"abc") && s.pattern.is_match(b"a.c"));
        let s = parse_search(Some("q=a.c&regex=true&limit=5")).unwrap();
        assert!(s.pattern.is_match(b"abc"));
        assert_eq!(s.limit, 5);
        let long = format!("q={}", "x".repeat(MAX_QUERY + 1));
        for (q, needle) in [
            ("", "`q` is empty"),
            ("q=", "`q` is empty"),
            (long.as_str(), "at most 1000"),
            ("q=(&regex=true", "not a valid regular expression"),
            ("q=a*&regex=true", "matches the empty text"),
            ("q=a&regex=maybe", "`regex`"),
            ("q=a&case=x", "`case`"),
            ("q=a&limit=0", "`limit`"),
            ("q=a&limit=10001", "`limit`"),
        ] {
            refused(parse_search(Some(q)).map(|_| ()), q, needle);
        }
    }

    #[test]
    fn escapes_are_not_searched() {
        let mut out = Vec::new();
        strip_escapes(
            b"\x1b[1;31mred\x1b[0m \x1b]0;title\x07plain\r\x1b[Kdone\x1b",
            &mut out,
        );
        assert_eq!(out, b"red plaindone");
    }

    proptest! {
        /// Whatever the bytes, stripping never panics and never grows the line.
        #[test]
        fn stripping_takes_any_bytes(line in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut out = Vec::new();
            strip_escapes(&line, &mut out);
            prop_assert!(out.len() <= line.len());
            prop_assert!(!out.contains(&0x1b) || line.contains(&0x1b));
        }

        /// A mark walked over entries counts the newlines of their concatenation.
        #[test]
        fn marks_count_the_newlines_of_the_whole(chunks in prop::collection::vec(prop::collection::vec(prop_oneof![Just(b'\n'), Just(b'a')], 0..20), 0..20)) {
            let mut m = Mark::START;
            for (i, c) in chunks.iter().enumerate() {
                m = m.past(&entry(i as u64 + 1, c));
            }
            let all: Vec<u8> = chunks.concat();
            prop_assert_eq!(m.lines, count_newlines(&all));
            prop_assert_eq!(m.line_start, all.last().is_none_or(|b| *b == b'\n'));
        }
    }
}

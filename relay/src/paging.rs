//! Replay paging: reading a run's stream from a cursor, one page at a time, within the
//! relay's memory budget. The SSE session ([`crate::events`]) replays with it, and so do the
//! output endpoints ([`crate::output`]: ranges, search, line numbers).
//!
//! A [`Pager`] sizes each page from the entries it has read so far (about
//! `--replay-page-bytes` of them, at most `--replay-page` entries), reserves that much from
//! the relay-wide `--replay-memory-bytes` budget before it reads, and gives the reservation to
//! the caller with the page: the caller holds it until it has used the page, so every reader
//! together holds at most the budget.
//!
//! Pages come from Redis, or from the run's archive when Redis no longer holds the run
//! ([`Source`]): the same entries, the same cursors, within the same budget.

use crate::AppState;
use crate::budget::Reservation;
use crate::config::Limits;
use agentrun_archiver::ArchiveReader;
use agentrun_protocol::replay::{ReplayPage, RunPage, read_run_page};
use agentrun_protocol::{Entry, RunId, StreamName};
use std::sync::Arc;
use std::time::Duration;

/// How long one replay read may take before it is given up (and retried by the session).
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reader waits for room in the replay budget before it does other work.
pub const BUDGET_WAIT: Duration = Duration::from_secs(1);
/// What a reader assumes of a stream's entries until it has read some: the largest chunk the
/// sidecar writes (64 KiB), plus the fields.
pub const FIRST_ENTRY_ESTIMATE: usize = 64 * 1024 + 256;
/// The smallest size assumed for an entry when sizing a page.
const MIN_ENTRY_ESTIMATE: usize = 256;
/// What an entry costs beyond its content and meta (its fields and bookkeeping).
const ENTRY_OVERHEAD: usize = 128;

/// Where a run's entries are read from.
#[derive(Clone)]
pub enum Source {
    /// Redis (the run is live, or ended and not yet expired).
    Redis,
    /// The run's archive (`--archive-url`): Redis no longer holds it.
    Archive(Arc<ArchiveReader>),
}

impl Source {
    /// Up to `count` entries of `stream` with `seq > after`, with the run's epoch.
    pub async fn read_page(
        &self,
        app: &AppState,
        run: &RunId,
        stream: &StreamName,
        after: u64,
        count: usize,
    ) -> Result<RunPage, String> {
        match self {
            Source::Redis => {
                let mut conn = app.conn.clone();
                read_run_page(&mut conn, run, stream, after, count)
                    .await
                    .map_err(|e| e.to_string())
            }
            Source::Archive(reader) => crate::archive::read_run_page(reader, stream, after, count)
                .await
                .map_err(|e| format!("archive store: {e}")),
        }
    }

    /// The `seq` of the stream's newest entry (0: none).
    pub async fn last_seq(
        &self,
        app: &AppState,
        run: &RunId,
        stream: &StreamName,
    ) -> Result<u64, crate::error::ApiError> {
        match self {
            Source::Redis => {
                let key = stream.key(run);
                let key = &key;
                app.redis(|mut conn| async move {
                    agentrun_protocol::replay::last_seq(&mut conn, key).await
                })
                .await
            }
            Source::Archive(reader) => Ok(reader.last_seq(stream)),
        }
    }
}

/// Sizes pages from what it has read, and reads them.
#[derive(Debug, Clone)]
pub struct Pager {
    /// The largest entry seen so far (with its fields), to size the next page.
    entry_estimate: usize,
}

impl Default for Pager {
    fn default() -> Self {
        Self {
            entry_estimate: FIRST_ENTRY_ESTIMATE,
        }
    }
}

/// What reading a page came to.
pub enum Read {
    /// Other readers hold the budget: do other work, then ask again.
    Busy,
    /// Redis failed or did not answer in time.
    Failed(String),
    /// A page, with the budget it holds.
    Page(Found),
}

/// A page read together with the run's epoch, and its share of the replay budget.
pub struct Found {
    pub run_page: RunPage,
    /// How many entries were asked for: a page that has that many may be followed by more.
    pub asked: usize,
    /// Returned to the budget when dropped; [`Pager::measure`] sets it to the page's size.
    pub held: Reservation,
}

impl Found {
    /// The page was full: the stream may have more after it.
    pub fn more(&self) -> bool {
        self.run_page.page.entries.len() >= self.asked
    }
}

/// What an entry is taken to hold in memory.
pub fn entry_size(e: &Entry) -> usize {
    e.content.len() + e.meta.as_ref().map_or(0, String::len) + ENTRY_OVERHEAD
}

impl Pager {
    /// How many entries the next page asks for, given the relay's limits.
    pub fn count(&self, limits: &Limits) -> usize {
        let estimate = self.entry_estimate.max(MIN_ENTRY_ESTIMATE);
        (limits.replay_page_bytes / estimate).clamp(1, limits.replay_page.max(1))
    }

    /// Reads up to [`Pager::count`] entries (and at most `at_most`) of `stream` with `seq >
    /// after` from `source` (Redis, or the run's archive), with the run's epoch, once the
    /// budget has room for them.
    pub async fn read(
        &self,
        source: &Source,
        app: &AppState,
        run: &RunId,
        stream: &StreamName,
        after: u64,
        at_most: usize,
    ) -> Read {
        let count = self.count(&app.limits).min(at_most.max(1));
        let estimate = self.entry_estimate.max(MIN_ENTRY_ESTIMATE);
        let budget = app.replay_budget.clone();
        let Ok(held) = tokio::time::timeout(BUDGET_WAIT, budget.reserve(count * estimate)).await
        else {
            return Read::Busy;
        };
        let read = source.read_page(app, run, stream, after, count);
        match tokio::time::timeout(REPLAY_TIMEOUT, read).await {
            Ok(Ok(run_page)) => Read::Page(Found {
                run_page,
                asked: count,
                held,
            }),
            Ok(Err(e)) => Read::Failed(e),
            Err(_) => Read::Failed(format!("no answer within {} s", REPLAY_TIMEOUT.as_secs())),
        }
    }

    /// Learns the size of a page's entries (for the next page) and sets its reservation to
    /// what the page holds.
    pub fn measure(&mut self, page: &ReplayPage, held: &mut Reservation) {
        let (largest, total) = page
            .entries
            .iter()
            .map(entry_size)
            .fold((0, 0), |(l, t), s| (l.max(s), t + s));
        if largest > 0 {
            self.entry_estimate = largest;
        }
        held.resize(total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::ByteBudget;
    use agentrun_protocol::EntryType;
    use bytes::Bytes;

    fn limits(page: usize, page_bytes: usize) -> Limits {
        Limits {
            keepalive: Duration::from_secs(15),
            auth_recheck: Duration::from_secs(30),
            replay_page: page,
            replay_page_bytes: page_bytes,
            retry_ms: 1000,
        }
    }

    fn entry(seq: u64, len: usize) -> Entry {
        Entry {
            seq,
            ts: 0,
            kind: EntryType::Output,
            content: Bytes::from(vec![b'x'; len]),
            meta: None,
        }
    }

    #[test]
    fn a_new_pager_assumes_the_largest_chunk_and_asks_for_at_least_one_entry() {
        let p = Pager::default();
        assert_eq!(p.count(&limits(500, 256 * 1024)), 3);
        assert_eq!(p.count(&limits(500, 1)), 1);
        assert_eq!(p.count(&limits(0, 1 << 30)), 1);
    }

    #[tokio::test]
    async fn measuring_a_page_sizes_the_next_and_sets_the_reservation() {
        let budget = ByteBudget::new(1 << 20);
        let mut held = budget.reserve(100_000).await;
        let mut p = Pager::default();
        let page = ReplayPage {
            entries: vec![entry(1, 10), entry(2, 1000 - ENTRY_OVERHEAD)],
            trimmed: None,
        };
        p.measure(&page, &mut held);
        assert_eq!(budget.in_use(), 10 + ENTRY_OVERHEAD + 1000);
        // Pages are sized from the largest entry seen, capped at `replay_page` entries.
        assert_eq!(p.count(&limits(500, 100_000)), 100);
        assert_eq!(p.count(&limits(50, 100_000)), 50);
        // Tiny entries count as MIN_ENTRY_ESTIMATE.
        p.measure(
            &ReplayPage {
                entries: vec![entry(3, 0)],
                trimmed: None,
            },
            &mut held,
        );
        assert_eq!(p.count(&limits(10_000, 256 * 100)), 100);
        // An empty page teaches nothing.
        p.measure(
            &ReplayPage {
                entries: vec![],
                trimmed: None,
            },
            &mut held,
        );
        assert_eq!(p.count(&limits(10_000, 256 * 100)), 100);
        assert_eq!(budget.in_use(), 0);
    }
}

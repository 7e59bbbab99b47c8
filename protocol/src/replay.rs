//! The replay primitive: read a stream from a cursor, in pages.
//!
//! A cursor is the `seq` of the last entry a reader has; `0` means "from the start". Because
//! entry ids are `0-SEQ`, the next page is one `XRANGE key 0-(CURSOR+1) + COUNT N`.
//!
//! A cursor is only valid within the run's epoch ([`crate::epoch`]): [`read_run_page`] reads a
//! page together with the epoch it belongs to, and says when the stream ends before the
//! cursor (its history was rewound). Cursor arithmetic never overflows: a cursor at or above
//! [`MAX_SEQ`] is past the end of every stream.

use crate::entry::Entry;
use crate::epoch::Epoch;
use crate::names::{RunId, StreamName};
use redis::aio::ConnectionLike;
use redis::{RedisError, Value};

/// The largest `seq` the publish function can assign (Lua numbers are doubles, exact up to
/// 2^53). A cursor naming a larger one cannot come from any stream.
pub const MAX_SEQ: u64 = 1 << 53;

/// A page of entries that follow a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayPage {
    pub entries: Vec<Entry>,
    /// Set when entries after the cursor were trimmed away (`MAXLEN` or TTL): the reader asked
    /// for `after + 1` but the stream now starts at `first_available`.
    pub trimmed: Option<Trimmed>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// The first seq the reader wanted.
    pub wanted: u64,
    /// The first seq the stream still holds.
    pub first_available: u64,
}

fn malformed(e: crate::entry::MalformedEntry) -> RedisError {
    RedisError::from((redis::ErrorKind::Parse, "malformed stream entry", e.0))
}

/// The first id after `after`, or `None` when no stream can hold one.
fn first_wanted(after: u64) -> Option<u64> {
    after.checked_add(1).filter(|s| *s <= MAX_SEQ)
}

fn page_of(entries: Vec<Entry>, after: u64) -> ReplayPage {
    let wanted = after.saturating_add(1);
    let trimmed = entries.first().and_then(|first| {
        (first.seq > wanted).then_some(Trimmed {
            wanted,
            first_available: first.seq,
        })
    });
    ReplayPage { entries, trimmed }
}

fn xrange(key: &str, from: u64, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(key)
        .arg(format!("0-{from}"))
        .arg("+")
        .arg("COUNT")
        .arg(count.max(1));
    cmd
}

/// Reads up to `count` entries with `seq > after`.
pub async fn read_page<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    after: u64,
    count: usize,
) -> Result<ReplayPage, RedisError> {
    let Some(from) = first_wanted(after) else {
        return Ok(page_of(Vec::new(), after));
    };
    let reply: Value = xrange(key, from, count).query_async(conn).await?;
    let entries = Entry::from_range_reply(&reply).map_err(malformed)?;
    Ok(page_of(entries, after))
}

/// A page read together with the run's epoch (see [`read_run_page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPage {
    pub page: ReplayPage,
    /// The run's epoch while the page was read (`None`: the run has none).
    pub epoch: Option<Epoch>,
    /// Set when the page is empty and the stream's newest `seq` (the value) is below the
    /// cursor: the history the cursor counts is not this one (it was rewound or never
    /// existed).
    pub ends_before_cursor: Option<u64>,
}

/// How often [`read_run_page`] reads again when the epoch changed while it read.
const EPOCH_RACE_RETRIES: usize = 8;

/// Reads up to `count` entries of one of a run's streams with `seq > after`, and the run's
/// epoch they belong to: the epoch is read before and after the range in one pipeline, and
/// the read is repeated until both agree, so the entries and the epoch always go together.
/// Needs only `HGET`, `XRANGE` and `XREVRANGE` (the relay's read-only user has them).
pub async fn read_run_page<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
    stream: &StreamName,
    after: u64,
    count: usize,
) -> Result<RunPage, RedisError> {
    let key = stream.key(run);
    let state = run.state_key();
    for _ in 0..EPOCH_RACE_RETRIES {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(&state).arg("epoch");
        if let Some(from) = first_wanted(after) {
            pipe.add_command(xrange(&key, from, count));
        } else {
            // Past the end of any stream: read nothing, but still learn the top below.
            pipe.cmd("PING");
        }
        pipe.cmd("HGET").arg(&state).arg("epoch");
        let (before, range, again): (Option<String>, Value, Option<String>) =
            pipe.query_async(conn).await?;
        if before != again {
            continue;
        }
        let entries = match range {
            Value::SimpleString(_) => Vec::new(),
            v => Entry::from_range_reply(&v).map_err(malformed)?,
        };
        let mut ends_before_cursor = None;
        if entries.is_empty() && after > 0 {
            let top = last_seq(conn, &key).await?;
            if top < after {
                ends_before_cursor = Some(top);
            }
        }
        return Ok(RunPage {
            page: page_of(entries, after),
            epoch: before.as_deref().and_then(Epoch::parse),
            ends_before_cursor,
        });
    }
    Err(RedisError::from((
        redis::ErrorKind::Client,
        "the run's epoch kept changing while its stream was read",
    )))
}

/// The `seq` of the newest entry of a stream, or 0 when it is empty or missing.
pub async fn last_seq<C: ConnectionLike>(conn: &mut C, key: &str) -> Result<u64, RedisError> {
    let reply: Value = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(Entry::from_range_reply(&reply)
        .map_err(malformed)?
        .first()
        .map_or(0, |e| e.seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_at_the_top_of_the_range_are_past_every_stream() {
        assert_eq!(first_wanted(0), Some(1));
        assert_eq!(first_wanted(MAX_SEQ - 1), Some(MAX_SEQ));
        assert_eq!(first_wanted(MAX_SEQ), None);
        assert_eq!(first_wanted(u64::MAX), None);
        let page = page_of(Vec::new(), u64::MAX);
        assert_eq!(page.trimmed, None);
    }
}

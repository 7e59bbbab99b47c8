//! The replay primitive: read a stream from a cursor, in pages.
//!
//! A cursor is the `seq` of the last entry a reader has; `0` means "from the start". Because
//! entry ids are `0-SEQ`, the next page is one `XRANGE key 0-(CURSOR+1) + COUNT N`.

use crate::entry::Entry;
use redis::aio::ConnectionLike;
use redis::{RedisError, Value};

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

/// Reads up to `count` entries with `seq > after`.
pub async fn read_page<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    after: u64,
    count: usize,
) -> Result<ReplayPage, RedisError> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg(format!("0-{}", after + 1))
        .arg("+")
        .arg("COUNT")
        .arg(count.max(1))
        .query_async(conn)
        .await?;
    let entries = Entry::from_range_reply(&reply).map_err(malformed)?;
    let trimmed = entries.first().and_then(|first| {
        (first.seq > after + 1).then_some(Trimmed {
            wanted: after + 1,
            first_available: first.seq,
        })
    });
    Ok(ReplayPage { entries, trimmed })
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

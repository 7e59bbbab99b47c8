//! The archive contract: how a finished run gets into object storage and what Redis says
//! about it meanwhile (`agentrun-archiver` does the work; `docs/archive.md` describes it).
//!
//! - Whoever sees a run end (the operator once `status.streamsClosed` is true, or the sidecar
//!   that settles the run's phase) [`enqueue`]s it on the **archive queue**, a stream read by
//!   the archivers' consumer group. A duplicate request is harmless: the archive of a run is
//!   written once, and a second request finds it done.
//! - A run that is going to be archived says so in its state hash (field `archive`, see
//!   [`ArchiveStatus`]). While that field is there and not `complete`, nobody puts a TTL on the
//!   run's keys ([`expire_unless_archiving`]): the archiver puts the retention TTL on every
//!   key of the run once its archive is complete ([`complete`]). Without the field (archiving
//!   off) expiry is what it always was.
//! - Runs whose archive failed N times go to the **dead-letter stream** with the reason; the
//!   state hash says `failed` and keeps the reason in `archive_error`.
//!
//! The queue and the dead-letter stream share the hash tag `{archive}`, so in Redis Cluster
//! they live in one slot and a Redis function ([`crate::functions`]) can move an entry from
//! one to the other atomically. Functions that touch a run's keys touch only that run's keys (the `{RUN}` tag), so they run
//! in Cluster mode and under a run's own ACL user too.

use crate::functions::{self, Call};
use crate::names::{RunId, Variation};
use redis::RedisError;
use redis::aio::ConnectionLike;
use std::collections::HashMap;
use std::fmt;

/// Stream of runs waiting to be archived (one entry per request; see [`ArchiveRequest`]).
pub const ARCHIVE_QUEUE_KEY: &str = "agentrun:{archive}:queue";
/// Stream of requests that failed too often, each with the reason (`reason`, `attempts`).
pub const ARCHIVE_DEAD_LETTER_KEY: &str = "agentrun:{archive}:dead";
/// The consumer group the archivers read the queue with.
pub const ARCHIVE_GROUP: &str = "archivers";

/// State hash field: the run's [`ArchiveStatus`].
pub const FIELD_ARCHIVE: &str = "archive";
/// State hash field: why the last archive attempt failed (while `archive` is `failed`).
pub const FIELD_ARCHIVE_ERROR: &str = "archive_error";
/// State hash field: ms since the epoch when the archive was completed.
pub const FIELD_ARCHIVED: &str = "archived";

/// Where a run is on its way to the archive (state hash field `archive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArchiveStatus {
    /// It will be archived once it ends; its keys get no TTL until then.
    Pending,
    /// It ended and waits in the archive queue.
    Queued,
    /// An archiver is writing it.
    Archiving,
    /// Its archive is complete and readable; its keys carry the retention TTL.
    Complete,
    /// Archiving failed too often; the request is on the dead-letter stream.
    Failed,
}

impl ArchiveStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Queued => "queued",
            Self::Archiving => "archiving",
            Self::Complete => "complete",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "queued" => Self::Queued,
            "archiving" => Self::Archiving,
            "complete" => Self::Complete,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
}

impl fmt::Display for ArchiveStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the archive queue: archive this run, then put `retention_seconds` on its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveRequest {
    pub run: RunId,
    /// TTL put on every key of the run once its archive is complete (0: none).
    pub retention_seconds: u64,
    /// Variations the requester knows of (the archiver adds those in the state hash).
    pub variations: Vec<Variation>,
    /// Do not start before this time (ms since the epoch): set for runs deleted while their
    /// pods were still stopping, whose sidecars flush within the pods' grace period.
    pub not_before_ms: Option<u64>,
    /// Who asked: `operator` or `sidecar`.
    pub source: String,
}

impl ArchiveRequest {
    pub fn new(run: RunId, retention_seconds: u64, source: impl Into<String>) -> Self {
        Self {
            run,
            retention_seconds,
            variations: Vec::new(),
            not_before_ms: None,
            source: source.into(),
        }
    }

    /// The stream entry's fields.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("run", self.run.to_string()),
            ("retention", self.retention_seconds.to_string()),
            ("source", self.source.clone()),
            ("enqueued", crate::now_ms().to_string()),
        ];
        if !self.variations.is_empty() {
            let names: Vec<&str> = self.variations.iter().map(Variation::as_str).collect();
            f.push(("variations", names.join(",")));
        }
        if let Some(t) = self.not_before_ms {
            f.push(("not_before", t.to_string()));
        }
        f
    }

    /// Reads a queue entry's fields back; the error says which field is wrong.
    pub fn from_fields(fields: &HashMap<String, String>) -> Result<Self, String> {
        let run = fields
            .get("run")
            .ok_or("the entry has no `run` field")?
            .clone();
        let run = RunId::new(run).map_err(|e| e.to_string())?;
        let number = |name: &str| -> Result<Option<u64>, String> {
            fields
                .get(name)
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("field `{name}` is not a number: {v:?}"))
                })
                .transpose()
        };
        let variations = fields
            .get("variations")
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| Variation::new(s).map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        Ok(Self {
            run,
            retention_seconds: number("retention")?.unwrap_or(0),
            variations,
            not_before_ms: number("not_before")?,
            source: fields.get("source").cloned().unwrap_or_default(),
        })
    }
}

/// Says that the run will be archived once it ends, so that no TTL is put on its keys before
/// then (a no-op when the run already has an archive status).
pub async fn mark_pending<C: ConnectionLike>(conn: &mut C, run: &RunId) -> Result<(), RedisError> {
    redis::cmd("HSETNX")
        .arg(run.state_key())
        .arg(FIELD_ARCHIVE)
        .arg(ArchiveStatus::Pending.as_str())
        .query_async::<()>(conn)
        .await
}

/// Puts the run on the archive queue and marks it `queued`; returns the queue entry's id.
pub async fn enqueue<C: ConnectionLike>(
    conn: &mut C,
    request: &ArchiveRequest,
) -> Result<String, RedisError> {
    set_status(conn, &request.run, ArchiveStatus::Queued, None).await?;
    let mut cmd = redis::cmd("XADD");
    cmd.arg(ARCHIVE_QUEUE_KEY).arg("*");
    for (k, v) in request.fields() {
        cmd.arg(k).arg(v);
    }
    cmd.query_async(conn).await
}

/// Enqueues the run if its state hash says `pending` (it was marked for archiving and never
/// enqueued); returns whether it did. Safe to call on every look at a finished run: a
/// request made twice by a race is archived once.
pub async fn enqueue_if_pending<C: ConnectionLike>(
    conn: &mut C,
    request: &ArchiveRequest,
) -> Result<bool, RedisError> {
    if status(conn, &request.run).await? != Some(ArchiveStatus::Pending) {
        return Ok(false);
    }
    enqueue(conn, request).await?;
    Ok(true)
}

/// Records the run's archive status (and the reason of a failure) in its state hash, unless
/// the state hash is gone (a state hash made by this alone would be a key without a TTL) or
/// the archive is already complete.
pub async fn set_status<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
    status: ArchiveStatus,
    error: Option<&str>,
) -> Result<(), RedisError> {
    Call::new(functions::ARCHIVE_SET_STATUS, [run.state_key()])
        .arg(status.as_str())
        .arg(error.unwrap_or(""))
        .invoke::<i64, _>(conn)
        .await
        .map(|_| ())
}

/// The run's archive status, if it has one.
pub async fn status<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
) -> Result<Option<ArchiveStatus>, RedisError> {
    let s: Option<String> = redis::cmd("HGET")
        .arg(run.state_key())
        .arg(FIELD_ARCHIVE)
        .query_async(conn)
        .await?;
    Ok(s.as_deref().and_then(ArchiveStatus::parse))
}

/// What a run's state hash says about its archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveDetails {
    pub status: ArchiveStatus,
    /// Why the last attempt failed (while [`ArchiveStatus::Failed`]).
    pub error: Option<String>,
    /// Milliseconds since the epoch when the archive was completed.
    pub archived_ms: Option<u64>,
}

/// The run's archive status with the failure reason and completion time, if it has one.
pub async fn details<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
) -> Result<Option<ArchiveDetails>, RedisError> {
    let (status, error, archived): (Option<String>, Option<String>, Option<String>) =
        redis::cmd("HMGET")
            .arg(run.state_key())
            .arg(FIELD_ARCHIVE)
            .arg(FIELD_ARCHIVE_ERROR)
            .arg(FIELD_ARCHIVED)
            .query_async(conn)
            .await?;
    Ok(status
        .as_deref()
        .and_then(ArchiveStatus::parse)
        .map(|status| ArchiveDetails {
            status,
            error: error.filter(|e| !e.is_empty()),
            archived_ms: archived.and_then(|a| a.parse().ok()),
        }))
}

/// Puts a TTL on some of a run's keys, unless the run waits for its archive (then the
/// archiver puts the retention TTL on every key once the archive is complete). Returns
/// whether the TTL was put. With archiving off this is [`crate::publish::expire_keys`].
pub async fn expire_unless_archiving<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
    keys: &[String],
    ttl_seconds: u64,
) -> Result<bool, RedisError> {
    let keys = std::iter::once(run.state_key()).chain(keys.iter().cloned());
    let done: i64 = Call::new(functions::EXPIRE_UNLESS_ARCHIVING, keys)
        .arg(ttl_seconds)
        .invoke(conn)
        .await?;
    Ok(done == 1)
}

/// Marks the run's archive complete and puts `ttl_seconds` (0: none) on every key of the run
/// given (`RunId::all_keys`), in one step.
pub async fn complete<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
    keys: &[String],
    now_ms: u64,
    ttl_seconds: u64,
) -> Result<(), RedisError> {
    let state = run.state_key();
    let others = keys.iter().filter(|k| **k != state).cloned();
    Call::new(
        functions::ARCHIVE_COMPLETE,
        std::iter::once(state.clone()).chain(others),
    )
    .arg(now_ms)
    .arg(ttl_seconds)
    .invoke::<i64, _>(conn)
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_their_fields() {
        let mut r = ArchiveRequest::new(RunId::new("ns.a.1").unwrap(), 3600, "operator");
        r.variations = vec![Variation::new("a").unwrap(), Variation::new("b").unwrap()];
        r.not_before_ms = Some(42);
        let fields: HashMap<String, String> = r
            .fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(ArchiveRequest::from_fields(&fields).unwrap(), r);
    }

    #[test]
    fn a_bad_request_names_its_field() {
        let fields = HashMap::from([
            ("run".to_owned(), "r1".to_owned()),
            ("retention".to_owned(), "soon".to_owned()),
        ]);
        let err = ArchiveRequest::from_fields(&fields).unwrap_err();
        assert!(err.contains("retention"), "{err}");
        assert!(ArchiveRequest::from_fields(&HashMap::new()).is_err());
    }

    #[test]
    fn queue_keys_share_one_cluster_slot() {
        let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_owned();
        assert_eq!(tag(ARCHIVE_QUEUE_KEY), tag(ARCHIVE_DEAD_LETTER_KEY));
        for s in ["pending", "queued", "archiving", "complete", "failed"] {
            assert_eq!(ArchiveStatus::parse(s).unwrap().as_str(), s);
        }
    }
}

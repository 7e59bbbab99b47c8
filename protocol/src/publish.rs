//! The publish primitive: append entries to a run's stream and announce each one on the
//! channel of the same name, exactly once, in order, within the run's epoch.
//!
//! One Redis function (`agentrun_v1_publish`, see [`crate::functions`]) does the work for a
//! batch of entries of one stream from one producer, so the append and the announcement are
//! atomic and ordered alike. Re-sends are harmless: the function
//! remembers, per stream and producer, the highest producer sequence (`pseq`) it has applied
//! (in the hash `run:{RUN}:producers`) and skips anything at or below it. Stream sequence
//! numbers (`seq`, also the entry id `0-SEQ`) are assigned by the script, contiguous from 1,
//! whoever the producer. Batches for several streams go to Redis in one pipeline.
//!
//! Epochs ([`crate::epoch`]): the script reads the run's epoch from the state hash and puts it
//! in every announcement; it creates one when the run has none. A producer that passes the
//! stream top it was last acknowledged ([`Expected`]) lets the script notice a rewound
//! history (Redis lost acknowledged entries): the top is below what was acknowledged, in the
//! same epoch. The script then starts a new epoch before appending, so the reused sequence
//! numbers are never mistaken for the lost ones. Only one rewind starts a new epoch: a
//! producer whose last acknowledgement is from an older epoch has nothing to report.

use crate::entry::NewEntry;
use crate::epoch::Epoch;
use crate::functions::{self, Call};
use crate::names::{RUNS_INDEX_KEY, RunId, StreamName};
use redis::aio::ConnectionLike;
use redis::{Cmd, RedisError, Value};

/// How entries are published.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Approximate cap on each stream's length (`XADD MAXLEN ~`); `None` keeps everything.
    pub max_len: Option<u64>,
    /// `PUBLISH`, or `SPUBLISH` for Redis Cluster (see [`crate::RedisSettings::publish_command`]).
    pub publish_command: &'static str,
}

/// The default cap on each stream of a run (`XADD MAXLEN ~`), the same in the operator (which
/// hands its value to the sidecars) and in a sidecar run on its own.
pub const DEFAULT_STREAM_MAX_LEN: u64 = 100_000;

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            max_len: Some(DEFAULT_STREAM_MAX_LEN),
            publish_command: "PUBLISH",
        }
    }
}

/// The result of publishing one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The stream's last `seq` after the batch.
    pub last_seq: u64,
    /// How many entries were new (the rest were re-sends and skipped).
    pub appended: u64,
    /// The highest producer sequence the stream has applied for this producer.
    pub applied_pseq: u64,
    /// The run's epoch the entries were published in (`None`: the run has none, or the
    /// publisher does not read it, see [`Publisher::without_run_state`]).
    pub epoch: Option<Epoch>,
    /// This batch found the stream below the top the producer was last acknowledged, and
    /// started a new epoch: Redis lost acknowledged entries.
    pub rewound: bool,
}

impl PublishOutcome {
    /// What to pass as [`Expected`] for the stream's next batch.
    pub fn expected(&self) -> Expected {
        Expected {
            top: self.last_seq,
            epoch: self.epoch,
        }
    }
}

/// What a producer knows of a stream from its last acknowledged batch: the stream's top then,
/// and the epoch it was in. The default (top 0) checks nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expected {
    pub top: u64,
    pub epoch: Option<Epoch>,
}

/// One stream's entries from one producer.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub stream: &'a StreamName,
    pub producer: &'a str,
    pub entries: &'a [NewEntry],
}

/// Appends and announces entries; cheap to clone.
#[derive(Debug, Clone)]
pub struct Publisher {
    options: PublishOptions,
    run_state: bool,
}

impl Publisher {
    pub fn new(options: PublishOptions) -> Self {
        Self {
            options,
            run_state: true,
        }
    }

    /// A publisher that does not touch the run's state hash, for a Redis user that may not
    /// write it (the relay, which publishes only control messages): its entries carry no
    /// epoch and it never starts one.
    pub fn without_run_state(mut self) -> Self {
        self.run_state = false;
        self
    }

    pub fn options(&self) -> &PublishOptions {
        &self.options
    }

    fn command(&self, run: &RunId, batch: &Batch<'_>, expected: Expected) -> Cmd {
        let mut keys = vec![batch.stream.key(run), batch.stream.producers_key(run)];
        if self.run_state {
            keys.push(run.state_key());
        }
        let mut call = Call::new(functions::PUBLISH, keys);
        call.arg(batch.producer)
            .arg(self.options.max_len.unwrap_or(0))
            .arg(self.options.publish_command)
            .arg(Epoch::random().to_string())
            .arg(expected.top)
            .arg(expected.epoch.map(|e| e.to_string()).unwrap_or_default());
        for e in batch.entries {
            call.arg(e.pseq)
                .arg(e.ts)
                .arg(e.kind.as_str())
                .arg(e.content.as_ref())
                .arg(e.meta.as_deref().unwrap_or(""));
        }
        call.into_cmd()
    }

    /// Publishes one batch.
    pub async fn publish<C: ConnectionLike>(
        &self,
        conn: &mut C,
        run: &RunId,
        batch: Batch<'_>,
    ) -> Result<PublishOutcome, RedisError> {
        let mut out = self.publish_many(conn, run, &[batch]).await?;
        Ok(out.remove(0))
    }

    /// Publishes one entry, made now, of `producer` on `stream`: what a producer that sends
    /// the odd message (the operator's status, the relay's control) needs.
    pub async fn publish_one<C: ConnectionLike>(
        &self,
        conn: &mut C,
        run: &RunId,
        stream: &StreamName,
        producer: &str,
        entry: &NewEntry,
    ) -> Result<PublishOutcome, RedisError> {
        let batch = Batch {
            stream,
            producer,
            entries: std::slice::from_ref(entry),
        };
        self.publish(conn, run, batch).await
    }

    /// Publishes several batches (usually of different streams) in one round trip.
    /// Safe to retry as a whole after any error: applied entries are skipped.
    pub async fn publish_many<C: ConnectionLike>(
        &self,
        conn: &mut C,
        run: &RunId,
        batches: &[Batch<'_>],
    ) -> Result<Vec<PublishOutcome>, RedisError> {
        self.publish_many_checked(conn, run, batches, &[]).await
    }

    /// Like [`Self::publish_many`], with what the producer knows of each batch's stream
    /// (`expected[i]` for `batches[i]`; missing ones check nothing): a stream found below
    /// its expected top, in the expected epoch, gets the run a new epoch before the batch is
    /// appended (see the module documentation).
    pub async fn publish_many_checked<C: ConnectionLike>(
        &self,
        conn: &mut C,
        run: &RunId,
        batches: &[Batch<'_>],
        expected: &[Expected],
    ) -> Result<Vec<PublishOutcome>, RedisError> {
        let mut loaded = false;
        loop {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for (i, b) in batches.iter().enumerate() {
                let exp = expected.get(i).copied().unwrap_or_default();
                pipe.add_command(self.command(run, b, exp));
            }
            let replies: Vec<Value> = pipe.query_async(conn).await?;
            let mut outcomes = Vec::with_capacity(replies.len());
            let mut missing_function = false;
            for reply in replies {
                match reply {
                    v if functions::is_missing_function_reply(&v) => missing_function = true,
                    Value::ServerError(e) => return Err(RedisError::from(e)),
                    v => outcomes.push(parse_outcome(&v)?),
                }
            }
            if !missing_function {
                return Ok(outcomes);
            }
            if loaded {
                return Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "the agentrun functions vanished right after they were loaded",
                )));
            }
            functions::load_after_missing(conn).await?;
            loaded = true;
        }
    }
}

fn parse_outcome(v: &Value) -> Result<PublishOutcome, RedisError> {
    let (last_seq, appended, applied_pseq, epoch, rewound): (u64, u64, u64, String, u64) =
        redis::FromRedisValue::from_redis_value_ref(v)?;
    Ok(PublishOutcome {
        last_seq,
        appended,
        applied_pseq,
        epoch: Epoch::parse(&epoch),
        rewound: rewound == 1,
    })
}

/// Adds a run to the run index (if it is not there yet), gives it an epoch (if it has none)
/// and writes fields to its state hash.
///
/// The run index is not in the run's hash slot, so in Redis Cluster it is on another node
/// (a cluster client sends a pipeline to one node and refuses one whose keys are in several
/// slots): it is written first, on its own, then the run's state in one pipeline.
pub async fn register_run<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
    created_ms: u64,
    fields: &[(&str, String)],
) -> Result<(), RedisError> {
    redis::cmd("ZADD")
        .arg(RUNS_INDEX_KEY)
        .arg("NX")
        .arg(created_ms)
        .arg(run.as_str())
        .query_async::<()>(conn)
        .await?;
    let mut pipe = redis::pipe();
    pipe.cmd("HSETNX")
        .arg(run.state_key())
        .arg("created")
        .arg(created_ms)
        .ignore();
    // The run's first epoch, unless a publish made it already.
    pipe.cmd("HSETNX")
        .arg(run.state_key())
        .arg("epoch")
        .arg(Epoch::random().to_string())
        .ignore();
    if !fields.is_empty() {
        let mut hset = redis::cmd("HSET");
        hset.arg(run.state_key());
        for (k, v) in fields {
            hset.arg(*k).arg(v);
        }
        pipe.add_command(hset).ignore();
    }
    pipe.query_async::<()>(conn).await
}

/// Removes from the run index the runs created before `created_before_ms` whose state hash
/// is gone (their keys expired after the run ended, or were archived and let go); returns how
/// many it removed. Without this the index would keep every run ever started.
///
/// Only runs older than the cut are looked at: a run is put in the index before its state
/// hash is written, and a young entry without a hash may be a run being registered. The
/// index is read a page at a time (oldest first) and each state hash is asked for on its
/// own (`EXISTS`): in Redis Cluster they are on other nodes than the index.
pub async fn prune_run_index<C: ConnectionLike + Clone>(
    conn: &mut C,
    created_before_ms: u64,
) -> Result<usize, RedisError> {
    use futures::{StreamExt, TryStreamExt};
    const PAGE: usize = 500;
    let mut removed = 0;
    // Entries before `offset` were looked at and kept.
    let mut offset = 0;
    loop {
        let page: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(RUNS_INDEX_KEY)
            .arg("-inf")
            .arg(format!("({created_before_ms}"))
            .arg("LIMIT")
            .arg(offset)
            .arg(PAGE)
            .query_async(conn)
            .await?;
        let looked = page.len();
        let gone: Vec<String> = futures::stream::iter(page)
            .map(|id| {
                let mut conn = conn.clone();
                async move {
                    // An id that is not a run id has no state hash to look for.
                    let Ok(run) = RunId::new(id.clone()) else {
                        return Ok::<_, RedisError>(Some(id));
                    };
                    let exists: bool = redis::cmd("EXISTS")
                        .arg(run.state_key())
                        .query_async(&mut conn)
                        .await?;
                    Ok((!exists).then_some(id))
                }
            })
            .buffered(16)
            .try_filter_map(|id| async move { Ok(id) })
            .try_collect()
            .await?;
        if !gone.is_empty() {
            let n: usize = redis::cmd("ZREM")
                .arg(RUNS_INDEX_KEY)
                .arg(&gone)
                .query_async(conn)
                .await?;
            removed += n;
        }
        offset += looked - gone.len();
        if looked < PAGE {
            return Ok(removed);
        }
    }
}

/// Writes fields to the run's state hash.
pub async fn set_state<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
    fields: &[(&str, String)],
) -> Result<(), RedisError> {
    if fields.is_empty() {
        return Ok(());
    }
    let mut hset = redis::cmd("HSET");
    hset.arg(run.state_key());
    for (k, v) in fields {
        hset.arg(*k).arg(v);
    }
    hset.query_async::<()>(conn).await
}

/// Puts a TTL on the given keys of a run (once the run has ended).
pub async fn expire_keys<C: ConnectionLike>(
    conn: &mut C,
    keys: &[String],
    ttl_seconds: u64,
) -> Result<(), RedisError> {
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.cmd("EXPIRE").arg(k).arg(ttl_seconds).ignore();
    }
    pipe.query_async::<()>(conn).await
}

/// Declares a variation of a run (for runs that no operator registered).
pub async fn add_variation<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
    variation: &crate::Variation,
) -> Result<(), RedisError> {
    Call::new(functions::ADD_VARIATION, [run.state_key()])
        .arg(variation.as_str())
        .invoke::<i64, _>(conn)
        .await
        .map(|_| ())
}

/// Recomputes the run's `phase` from the latest state of each declared variation: final once
/// every variation is final (failed if any failed, else stopped if any stopped, else
/// succeeded), otherwise running, paused, starting or pending; sets `ended` the first time
/// the phase is final. Returns the phase (`None`: no variation is declared).
pub async fn settle_phase<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
    now_ms: u64,
) -> Result<Option<crate::RunState>, RedisError> {
    let phase: Option<String> = Call::new(functions::SETTLE_PHASE, [run.state_key()])
        .arg(now_ms)
        .invoke(conn)
        .await?;
    Ok(phase.and_then(|p| crate::RunState::parse(&p)))
}

// Long file: one consumer-group protocol (claim, heartbeat, retry, dead letter) whose invariants are read together.
//! The archive queue, read with a consumer group: every archiver (every replica, and every
//! worker in it) is a consumer of `archivers` on `agentrun:{archive}:queue`.
//!
//! Invariants:
//! - A request leaves the queue only once its run's archive is complete and the run's state
//!   hash says so (`XACK` and `XDEL` come after [`agentrun_protocol::archive::complete`]), or
//!   when it moves to the dead-letter stream, in one Redis function call with the `XACK`.
//! - A request held by an archiver that stopped (crash, `SIGKILL`, lost node) is taken over by
//!   another with `XAUTOCLAIM` once it has been idle for `claim_idle`. An archiver at work
//!   keeps its requests from looking idle with a heartbeat (`XCLAIM ... JUSTID` after checking
//!   that it still owns them); when the heartbeat finds that another took a request over, it
//!   stops working on it. Two archivers working on one run anyway is safe: see
//!   [`crate::writer`].
//! - Failures are retried in place, with exponential backoff, `max_attempts` times in all; a
//!   request delivered more than `max_attempts` times (its archivers kept dying) or whose
//!   attempts all failed goes to the dead-letter stream with the reason, and the run's state
//!   hash says `failed`. `agentrun-archiver requeue-dead` puts dead letters back on the queue.

use crate::error::ArchiveError;
use crate::metrics::Metrics;
use crate::store::ArchiveStore;
use crate::writer::{WriteOptions, archive_run};
use agentrun_protocol::archive::{
    ARCHIVE_DEAD_LETTER_KEY, ARCHIVE_GROUP, ARCHIVE_QUEUE_KEY, ArchiveRequest, ArchiveStatus,
    complete, set_status,
};
use agentrun_protocol::functions::{self, Call};
use agentrun_protocol::{RedisConn, RedisSettings, RunId, Variation, now_ms};
use redis::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Longest wait for a request's `not_before`.
const MAX_NOT_BEFORE_WAIT: Duration = Duration::from_secs(15 * 60);
/// Most entries kept on the dead-letter stream (`MAXLEN ~`).
const DEAD_LETTER_MAX_LEN: u64 = 100_000;

/// How the archiver consumes the queue.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Consumer name; worker `i` is `CONSUMER-i`. Keep it stable across restarts of one
    /// replica (the pod name) so a restarted archiver resumes what it held at once.
    pub consumer: String,
    /// Runs archived at the same time.
    pub workers: usize,
    /// How long one `XREADGROUP` waits for a new request.
    pub block: Duration,
    /// Idle time after which another archiver's request is taken over.
    pub claim_idle: Duration,
    /// Attempts per request before it goes to the dead-letter stream.
    pub max_attempts: u32,
    /// Backoff after the first failure; doubled after each, up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// On shutdown, how long a run being archived may take to finish.
    pub drain_timeout: Duration,
    pub write: WriteOptions,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            consumer: default_consumer(),
            workers: 2,
            block: Duration::from_secs(2),
            claim_idle: Duration::from_secs(60),
            max_attempts: 5,
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(20),
            write: WriteOptions::default(),
        }
    }
}

/// `HOSTNAME` (the pod name in Kubernetes), or `archiver-PID`.
pub fn default_consumer() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("archiver-{}", std::process::id()))
}

/// A request read from the queue.
#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    fields: HashMap<String, String>,
    /// Taken over from another consumer.
    claimed: bool,
}

/// Creates the consumer group (and the queue) unless they exist. The group starts at the
/// beginning of the queue, so requests made before any archiver ran are archived too.
pub async fn ensure_group(conn: &mut RedisConn) -> Result<(), redis::RedisError> {
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(ARCHIVE_QUEUE_KEY)
        .arg(ARCHIVE_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Moves dead letters (of one run, or all) back to the queue; returns the runs moved.
pub async fn requeue_dead(
    conn: &mut RedisConn,
    run: Option<&RunId>,
) -> Result<Vec<String>, redis::RedisError> {
    let runs: Vec<String> = Call::new(
        functions::ARCHIVE_REQUEUE,
        [ARCHIVE_QUEUE_KEY, ARCHIVE_DEAD_LETTER_KEY],
    )
    .arg(run.map(|r| r.as_str()).unwrap_or(""))
    .arg(100_000)
    .invoke(conn)
    .await?;
    for r in &runs {
        if let Ok(id) = RunId::new(r.clone()) {
            set_status(conn, &id, ArchiveStatus::Queued, None).await?;
        }
    }
    Ok(runs)
}

/// The archiver: workers that take requests from the queue and archive their runs.
pub struct Archiver {
    settings: RedisSettings,
    conn: RedisConn,
    store: ArchiveStore,
    config: QueueConfig,
    metrics: Metrics,
}

impl Archiver {
    pub fn new(
        settings: RedisSettings,
        conn: RedisConn,
        store: ArchiveStore,
        config: QueueConfig,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            conn,
            store,
            config,
            metrics,
        })
    }

    /// Runs until `shutdown` turns true; then lets runs being archived finish within the
    /// drain timeout (what does not finish stays on the queue for the next archiver).
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let mut conn = self.conn.clone();
        loop {
            match ensure_group(&mut conn).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the archive queue's consumer group; retrying");
                    if wait_or_shutdown(&shutdown, Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        }
        self.metrics
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let gauges = tokio::spawn(self.clone().update_gauges(shutdown.clone()));
        let mut workers = Vec::new();
        for i in 0..self.config.workers.max(1) {
            let consumer = format!("{}-{i}", self.config.consumer);
            workers.push(tokio::spawn(
                self.clone().worker(consumer, shutdown.clone()),
            ));
        }
        for w in workers {
            let _ = w.await;
        }
        gauges.abort();
    }

    async fn update_gauges(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let mut conn = self.conn.clone();
        loop {
            let figures: Result<(u64, u64, Value), _> = redis::pipe()
                .cmd("XLEN")
                .arg(ARCHIVE_QUEUE_KEY)
                .cmd("XLEN")
                .arg(ARCHIVE_DEAD_LETTER_KEY)
                .cmd("XPENDING")
                .arg(ARCHIVE_QUEUE_KEY)
                .arg(ARCHIVE_GROUP)
                .query_async(&mut conn)
                .await;
            if let Ok((queued, dead, pending)) = figures {
                self.metrics.queue_length.set(queued as i64);
                self.metrics.dead_letters.set(dead as i64);
                if let Value::Array(p) = pending
                    && let Some(Value::Int(n)) = p.first()
                {
                    self.metrics.queue_pending.set(*n);
                }
            }
            if wait_or_shutdown(&shutdown, Duration::from_secs(5)).await {
                return;
            }
        }
    }

    async fn worker(self: Arc<Self>, consumer: String, shutdown: watch::Receiver<bool>) {
        // XREADGROUP BLOCK holds its connection: each worker reads on its own.
        let mut reader: Option<RedisConn> = None;
        let mut own_pending_done = false;
        while !*shutdown.borrow() {
            if reader.is_none() {
                match self.settings.connect().await {
                    Ok(c) => reader = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot connect to Redis; retrying");
                        if wait_or_shutdown(&shutdown, Duration::from_secs(1)).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let Some(conn) = reader.as_mut() else {
                continue;
            };
            let next = self.next(conn, &consumer, &mut own_pending_done).await;
            match next {
                Ok(Some(delivery)) => self.handle(&consumer, delivery, &shutdown).await,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the archive queue; retrying");
                    if e.is_connection_dropped() || e.is_io_error() || e.is_timeout() {
                        reader = None;
                    }
                    if wait_or_shutdown(&shutdown, Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        }
    }

    /// The next request: first this consumer's own (left by a restart), then one idle for
    /// `claim_idle` at another consumer, then a new one.
    async fn next(
        &self,
        conn: &mut RedisConn,
        consumer: &str,
        own_pending_done: &mut bool,
    ) -> Result<Option<Delivery>, redis::RedisError> {
        if !*own_pending_done {
            let reply: Value = read_group(consumer, None, "0").query_async(conn).await?;
            match read_group_reply(&reply).into_iter().next() {
                Some(mut d) => {
                    d.claimed = false;
                    return Ok(Some(d));
                }
                None => *own_pending_done = true,
            }
        }
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(ARCHIVE_QUEUE_KEY)
            .arg(ARCHIVE_GROUP)
            .arg(consumer)
            .arg(self.config.claim_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        let (claimed, deleted) = autoclaim_reply(&reply);
        for id in deleted {
            // Pending entries whose stream entry is gone: nothing to do but forget them.
            let _: Result<(), _> = redis::cmd("XACK")
                .arg(ARCHIVE_QUEUE_KEY)
                .arg(ARCHIVE_GROUP)
                .arg(id)
                .query_async(conn)
                .await;
        }
        if let Some(d) = claimed.into_iter().next() {
            return Ok(Some(d));
        }
        let reply: Value = read_group(consumer, Some(self.config.block), ">")
            .query_async(conn)
            .await?;
        Ok(read_group_reply(&reply).into_iter().next())
    }

    /// Archives one request's run, retrying, then acknowledges it or sends it to the
    /// dead-letter stream.
    async fn handle(&self, consumer: &str, delivery: Delivery, shutdown: &watch::Receiver<bool>) {
        let mut conn = self.conn.clone();
        if delivery.fields.is_empty() {
            // A pending entry whose stream entry is gone: nothing to archive.
            let _ = ack(&mut conn, &delivery.id).await;
            return;
        }
        if delivery.claimed {
            self.metrics.claimed.inc();
        }
        let delivered = self.times_delivered(&delivery.id).await.unwrap_or(1);
        let request = match ArchiveRequest::from_fields(&delivery.fields) {
            Ok(r) => r,
            Err(reason) => {
                self.dead_letter(&delivery, None, &format!("bad request: {reason}"), 0)
                    .await;
                return;
            }
        };
        let run = request.run.clone();
        if delivered > u64::from(self.config.max_attempts) {
            let reason = format!(
                "delivered {delivered} times without being finished: the archivers that held it stopped (crashed, killed, out of memory?)"
            );
            self.dead_letter(&delivery, Some(&run), &reason, delivered as u32)
                .await;
            return;
        }
        tracing::info!(run = %run, id = %delivery.id, claimed = delivery.claimed, "archiving");
        self.metrics.in_progress.inc();
        let (lost_tx, lost_rx) = watch::channel(false);
        let heartbeat = tokio::spawn(heartbeat(
            self.conn.clone(),
            delivery.id.clone(),
            consumer.to_owned(),
            self.config.claim_idle / 3,
            lost_tx,
        ));
        let outcome = self
            .attempts(&mut conn, &delivery, &request, lost_rx, shutdown)
            .await;
        heartbeat.abort();
        self.metrics.in_progress.dec();
        match outcome {
            Outcome::Done => {}
            Outcome::Dead(reason, attempts) => {
                self.dead_letter(&delivery, Some(&run), &reason, attempts)
                    .await;
            }
            Outcome::Left(why) => {
                tracing::info!(run = %run, id = %delivery.id, "left on the queue: {why}");
            }
        }
    }

    async fn attempts(
        &self,
        conn: &mut RedisConn,
        delivery: &Delivery,
        request: &ArchiveRequest,
        lost: watch::Receiver<bool>,
        shutdown: &watch::Receiver<bool>,
    ) -> Outcome {
        let run = &request.run;
        if let Some(t) = request.not_before_ms {
            let wait = Duration::from_millis(t.saturating_sub(now_ms())).min(MAX_NOT_BEFORE_WAIT);
            if !wait.is_zero() {
                tracing::info!(run = %run, ?wait, "waiting for the run's pods to finish stopping");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    why = interrupted(lost.clone(), shutdown.clone(), Duration::ZERO) => return Outcome::Left(why),
                }
            }
        }
        let mut backoff = self.config.backoff;
        let max = self.config.max_attempts.max(1);
        for attempt in 1..=max {
            let _ = set_status(conn, run, ArchiveStatus::Archiving, None).await;
            let started = Instant::now();
            let result = tokio::select! {
                r = self.archive_once(conn, delivery, request) => r,
                why = interrupted(lost.clone(), shutdown.clone(), self.config.drain_timeout) => return Outcome::Left(why),
            };
            match result {
                Ok(()) => {
                    self.metrics
                        .archive_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Outcome::Done;
                }
                Err(e) => {
                    self.metrics
                        .attempt_failures
                        .with_label_values(&[e.metric_label()])
                        .inc();
                    let reason = format!("attempt {attempt} of {max}: {e}");
                    if e.is_permanent() || attempt == max {
                        return Outcome::Dead(reason, attempt);
                    }
                    tracing::warn!(run = %run, error = %e, ?backoff, "archiving failed; trying again");
                    let _ = set_status(conn, run, ArchiveStatus::Archiving, Some(&reason)).await;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        why = interrupted(lost.clone(), shutdown.clone(), Duration::ZERO) => return Outcome::Left(why),
                    }
                    backoff = (backoff * 2).min(self.config.backoff_max);
                }
            }
        }
        Outcome::Left("no attempt made".into())
    }

    /// One attempt: write the archive (or find it written), mark it complete with the
    /// retention TTL, acknowledge the request.
    async fn archive_once(
        &self,
        conn: &mut RedisConn,
        delivery: &Delivery,
        request: &ArchiveRequest,
    ) -> Result<(), ArchiveError> {
        let run = &request.run;
        match archive_run(conn, &self.store, request, &self.config.write).await? {
            Some(archived) => {
                let variations: Vec<Variation> = archived
                    .manifest
                    .variations
                    .iter()
                    .filter_map(|v| Variation::new(v.clone()).ok())
                    .collect();
                complete(
                    conn,
                    run,
                    &run.all_keys(variations.iter()),
                    now_ms(),
                    request.retention_seconds,
                )
                .await?;
                self.metrics.runs_archived.inc();
                self.metrics.entries_archived.inc_by(archived.entries);
                self.metrics.content_bytes.inc_by(archived.content_bytes);
                self.metrics.stored_bytes.inc_by(archived.data_bytes);
                tracing::info!(
                    run = %run,
                    written_now = archived.written_now,
                    entries = archived.entries,
                    content_bytes = archived.content_bytes,
                    stored_bytes = archived.data_bytes,
                    "archive complete"
                );
            }
            None => {
                self.metrics.runs_empty.inc();
                tracing::warn!(run = %run, "Redis holds nothing of the run: nothing to archive");
            }
        }
        ack(conn, &delivery.id).await?;
        Ok(())
    }

    async fn times_delivered(&self, id: &str) -> Option<u64> {
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XPENDING")
            .arg(ARCHIVE_QUEUE_KEY)
            .arg(ARCHIVE_GROUP)
            .arg(id)
            .arg(id)
            .arg(1)
            .query_async(&mut conn)
            .await
            .ok()?;
        let Value::Array(rows) = reply else {
            return None;
        };
        let Some(Value::Array(row)) = rows.first() else {
            return None;
        };
        match row.get(3) {
            Some(Value::Int(n)) => Some(*n as u64),
            _ => None,
        }
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        run: Option<&RunId>,
        reason: &str,
        attempts: u32,
    ) {
        tracing::error!(run = ?run.map(RunId::as_str), id = %delivery.id, reason, "archive request sent to the dead-letter stream");
        let mut conn = self.conn.clone();
        let mut call = Call::new(
            functions::ARCHIVE_DEAD_LETTER,
            [ARCHIVE_QUEUE_KEY, ARCHIVE_DEAD_LETTER_KEY],
        );
        call.arg(ARCHIVE_GROUP)
            .arg(&delivery.id)
            .arg(DEAD_LETTER_MAX_LEN);
        let mut fields: Vec<(&String, &String)> = delivery.fields.iter().collect();
        fields.sort();
        for (k, v) in fields {
            if !["reason", "attempts", "failed", "queue_id"].contains(&k.as_str()) {
                call.arg(k).arg(v);
            }
        }
        call.arg("reason")
            .arg(reason)
            .arg("attempts")
            .arg(attempts)
            .arg("failed")
            .arg(now_ms())
            .arg("queue_id")
            .arg(&delivery.id);
        let moved: Result<i64, _> = call.invoke(&mut conn).await;
        if let Err(e) = moved {
            tracing::warn!(error = %e, "cannot move the request to the dead-letter stream; it stays on the queue");
            return;
        }
        self.metrics.dead_lettered.inc();
        if let Some(run) = run {
            let _ = set_status(&mut conn, run, ArchiveStatus::Failed, Some(reason)).await;
        }
    }
}

enum Outcome {
    Done,
    /// Send to the dead-letter stream: reason, attempts.
    Dead(String, u32),
    /// Leave it on the queue (shut down, or taken over).
    Left(String),
}

/// `XREADGROUP` of one entry of the queue from `from` (`0`: this consumer's own pending
/// entries, `>`: a new one), waiting up to `block` when given.
fn read_group(consumer: &str, block: Option<Duration>, from: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(ARCHIVE_GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(1);
    if let Some(b) = block {
        cmd.arg("BLOCK").arg(b.as_millis() as u64);
    }
    cmd.arg("STREAMS").arg(ARCHIVE_QUEUE_KEY).arg(from);
    cmd
}

async fn ack(conn: &mut RedisConn, id: &str) -> Result<(), redis::RedisError> {
    redis::pipe()
        .cmd("XACK")
        .arg(ARCHIVE_QUEUE_KEY)
        .arg(ARCHIVE_GROUP)
        .arg(id)
        .ignore()
        .cmd("XDEL")
        .arg(ARCHIVE_QUEUE_KEY)
        .arg(id)
        .ignore()
        .query_async(conn)
        .await
}

/// Resolves when the request is lost to another archiver, or `drain` after shutdown.
async fn interrupted(
    mut lost: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) -> String {
    tokio::select! {
        _ = lost.wait_for(|l| *l) => "another archiver took it over".to_owned(),
        _ = async {
            let _ = shutdown.wait_for(|s| *s).await;
            tokio::time::sleep(drain).await;
        } => "shutting down".to_owned(),
    }
}

/// Resolves after `wait`; true when shutdown came first.
async fn wait_or_shutdown(shutdown: &watch::Receiver<bool>, wait: Duration) -> bool {
    let mut s = shutdown.clone();
    let stopped = tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = s.wait_for(|v| *v) => true,
    };
    stopped || *shutdown.borrow()
}

async fn heartbeat(
    mut conn: RedisConn,
    id: String,
    consumer: String,
    every: Duration,
    lost: watch::Sender<bool>,
) {
    let every = every.max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let owned: Result<i64, _> = Call::new(functions::ARCHIVE_HEARTBEAT, [ARCHIVE_QUEUE_KEY])
            .arg(ARCHIVE_GROUP)
            .arg(&id)
            .arg(&consumer)
            .invoke(&mut conn)
            .await;
        if let Ok(0) = owned {
            let _ = lost.send(true);
            return;
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn entry(v: &Value, claimed: bool) -> Option<Delivery> {
    let Value::Array(parts) = v else { return None };
    let id = text(parts.first()?)?;
    let mut fields = HashMap::new();
    if let Some(Value::Array(kv)) = parts.get(1) {
        for pair in kv.chunks(2) {
            if let [k, v] = pair
                && let (Some(k), Some(v)) = (text(k), text(v))
            {
                fields.insert(k, v);
            }
        }
    }
    Some(Delivery {
        id,
        fields,
        claimed,
    })
}

/// Entries of an `XREADGROUP` reply (one stream).
fn read_group_reply(v: &Value) -> Vec<Delivery> {
    let streams = match v {
        Value::Array(s) => s.clone(),
        Value::Map(m) => m
            .iter()
            .map(|(k, v)| Value::Array(vec![k.clone(), v.clone()]))
            .collect(),
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    for s in streams {
        if let Value::Array(kv) = s
            && let Some(Value::Array(entries)) = kv.get(1)
        {
            out.extend(entries.iter().filter_map(|e| entry(e, false)));
        }
    }
    out
}

/// Claimed entries and deleted ids of an `XAUTOCLAIM` reply.
fn autoclaim_reply(v: &Value) -> (Vec<Delivery>, Vec<String>) {
    let Value::Array(parts) = v else {
        return (Vec::new(), Vec::new());
    };
    let claimed = match parts.get(1) {
        Some(Value::Array(entries)) => entries.iter().filter_map(|e| entry(e, true)).collect(),
        _ => Vec::new(),
    };
    let deleted = match parts.get(2) {
        Some(Value::Array(ids)) => ids.iter().filter_map(text).collect(),
        _ => Vec::new(),
    };
    (claimed, deleted)
}

//! Batches items and publishes them to Redis, retrying with exponential back-off and jitter
//! until Redis takes them; acknowledges frames to the entrypoint once they are in Redis.
//!
//! For each stream it remembers the top Redis acknowledged last and the run's epoch then, and
//! passes them with the next batch: when Redis has lost acknowledged entries (it restarted
//! without persistence, or failed over to a replica that was behind), the publish function sees
//! the stream below that top and starts a new epoch before appending, so readers are told
//! that the history was reset instead of silently skipping the reused sequence numbers.

use super::state::{SidecarState, lock};
use agentrun_protocol::archive::{self, ArchiveRequest};
use agentrun_protocol::durability::{Durability, NO_WAITAOF};
use agentrun_protocol::publish::{Batch, Expected, add_variation, set_state, settle_phase};
use agentrun_protocol::state_hash;
use agentrun_protocol::{
    EntryType, NewEntry, Publisher, RedisConn, RedisSettings, StatusEvent, StreamName, Variation,
    now_ms,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

const MAX_BATCH_ITEMS: usize = 1024;
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

// Barriers are rare; boxing the common variant would only add an allocation per entry.
#[allow(clippy::large_enum_variant)]
pub(crate) enum ToPublish {
    Entry {
        stream: StreamName,
        producer: Arc<str>,
        entry: Box<NewEntry>,
        /// (connection epoch, frame seq) to acknowledge once published.
        ack: Option<(u64, u64)>,
        /// For status entries: the event, to mirror into the state hash.
        status: Option<StatusEvent>,
        /// Share of the sidecar's buffer budget, released once published.
        permit: Option<(OwnedSemaphorePermit, u32)>,
    },
    /// Answered once everything queued before it is published.
    Barrier(oneshot::Sender<()>),
}

/// Exponential back-off with full jitter.
pub(crate) struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next delay: uniformly between half and all of the current step, which doubles.
    pub(crate) fn delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }
}

pub(crate) struct PublishLoop {
    settings: RedisSettings,
    publisher: Publisher,
    /// Per stream: its top and the run's epoch when Redis last acknowledged a batch.
    acknowledged: HashMap<StreamName, Expected>,
    /// What Redis must confirm after each batch before its frames are acknowledged.
    durability: Durability,
}

/// Checks that this Redis (and the sidecar's Redis user) can give `durability`: `WAITAOF`
/// needs Redis 7.2 and `appendonly yes`; both commands need the user's permission.
pub(crate) async fn check_durability(
    c: &mut RedisConn,
    durability: Durability,
) -> Result<(), String> {
    let probe = match durability {
        Durability::None => return Ok(()),
        // Zero replicas are always reached: these answer at once.
        Durability::Replicas { .. } => {
            let mut cmd = redis::cmd("WAIT");
            cmd.arg(0).arg(0);
            cmd
        }
        Durability::Aof { .. } => {
            let mut cmd = redis::cmd("WAITAOF");
            cmd.arg(1).arg(0).arg(1);
            cmd
        }
    };
    match probe.query_async::<redis::Value>(c).await {
        Ok(_) => Ok(()),
        Err(e) => Err(durability_error(durability, &e)),
    }
}

/// What to tell the operator of the sidecar when the wait command itself fails.
fn durability_error(durability: Durability, e: &redis::RedisError) -> String {
    let text = e.to_string();
    let lower = text.to_lowercase();
    if matches!(durability, Durability::Aof { .. }) && lower.contains("unknown command") {
        NO_WAITAOF.to_owned()
    } else if lower.contains("noperm") || lower.contains("no permissions") {
        format!(
            "--durability {durability}: the sidecar's Redis user may not run {}: {text}",
            if matches!(durability, Durability::Aof { .. }) {
                "WAITAOF"
            } else {
                "WAIT"
            }
        )
    } else {
        format!("--durability {durability}: Redis refused the wait: {text}")
    }
}

impl PublishLoop {
    /// Connects to Redis. With `fail_fast`, keeps trying for that long and then reports why it
    /// could not connect; without, one attempt, and the loop keeps trying in the background.
    pub(crate) async fn connect(
        settings: RedisSettings,
        publisher: Publisher,
        fail_fast: Option<Duration>,
        durability: Durability,
    ) -> Result<(Self, Option<RedisConn>), String> {
        let deadline = fail_fast.map(|d| tokio::time::Instant::now() + d);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let conn = loop {
            match settings.connect().await {
                Ok(conn) => break Some(conn),
                Err(e) => match deadline {
                    None => {
                        tracing::warn!(error = %e, "Redis is not reachable yet; will keep trying");
                        break None;
                    }
                    Some(d) if tokio::time::Instant::now() >= d => return Err(e.to_string()),
                    Some(_) => tokio::time::sleep(backoff.delay()).await,
                },
            }
        };
        let publish_loop = Self {
            settings,
            publisher,
            acknowledged: HashMap::new(),
            durability,
        };
        Ok((publish_loop, conn))
    }

    pub(crate) async fn run(
        mut self,
        shared: Arc<SidecarState>,
        mut conn: Option<RedisConn>,
        mut rx: mpsc::Receiver<ToPublish>,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        while let Some(first) = rx.recv().await {
            let mut items = vec![first];
            let mut bytes = 0usize;
            while items.len() < MAX_BATCH_ITEMS && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(item) => {
                        if let ToPublish::Entry { entry, .. } = &item {
                            bytes += entry.content.len();
                        }
                        items.push(item);
                    }
                    Err(_) => break,
                }
            }
            let mut batch = Vec::new();
            for item in items {
                match item {
                    ToPublish::Barrier(done) => {
                        self.deliver(&shared, &mut conn, &mut backoff, std::mem::take(&mut batch))
                            .await;
                        let _ = done.send(());
                    }
                    entry => batch.push(entry),
                }
            }
            self.deliver(&shared, &mut conn, &mut backoff, batch).await;
        }
    }

    /// Publishes `items`, retrying until Redis takes them.
    async fn deliver(
        &mut self,
        shared: &Arc<SidecarState>,
        conn: &mut Option<RedisConn>,
        backoff: &mut Backoff,
        items: Vec<ToPublish>,
    ) {
        if items.is_empty() {
            return;
        }
        // Consecutive entries of one stream and producer form one script call; the calls go
        // in one pipeline, in the order the entries came.
        let mut groups: Vec<(StreamName, Arc<str>, Vec<NewEntry>)> = Vec::new();
        let mut acks: HashMap<u64, u64> = HashMap::new();
        let mut statuses = Vec::new();
        let mut permits = Vec::new();
        for item in items {
            let ToPublish::Entry {
                stream,
                producer,
                entry,
                ack,
                status,
                permit,
            } = item
            else {
                continue;
            };
            if let Some((epoch, fseq)) = ack {
                let e = acks.entry(epoch).or_insert(0);
                *e = (*e).max(fseq);
            }
            if let Some(s) = status {
                statuses.push(s);
            }
            if let Some(p) = permit {
                permits.push(p);
            }
            match groups.last_mut() {
                Some((s, p, entries)) if *s == stream && *p == producer => entries.push(*entry),
                _ => groups.push((stream, producer, vec![*entry])),
            }
        }
        let run = &shared.config.run;
        let mut failures = 0u32;
        let mut waits_missed = 0u32;
        loop {
            let Some(c) = conn.as_mut() else {
                match self.settings.connect().await {
                    Ok(c) => {
                        shared.metrics.redis_reconnects.inc();
                        *conn = Some(c);
                    }
                    Err(e) => {
                        shared.set_redis_up(false);
                        if failures.is_multiple_of(20) {
                            tracing::warn!(error = %e, "cannot reach Redis; holding output and retrying");
                        }
                        failures += 1;
                        tokio::time::sleep(backoff.delay()).await;
                    }
                }
                continue;
            };
            let batches: Vec<Batch<'_>> = groups
                .iter()
                .map(|(stream, producer, entries)| Batch {
                    stream,
                    producer,
                    entries,
                })
                .collect();
            let expected: Vec<Expected> = groups
                .iter()
                .map(|(stream, _, _)| self.acknowledged.get(stream).copied().unwrap_or_default())
                .collect();
            let timer = shared.metrics.publish_seconds.start_timer();
            match self
                .publisher
                .publish_many_checked(c, run, &batches, &expected)
                .await
            {
                Ok(outcomes) => {
                    timer.observe_duration();
                    for ((stream, _, _), outcome) in groups.iter().zip(&outcomes) {
                        if outcome.rewound {
                            tracing::warn!(
                                stream = %stream.key(run),
                                acknowledged = expected_top(&self.acknowledged, stream),
                                found = outcome.last_seq - outcome.appended,
                                epoch = %outcome.epoch.map(|e| e.to_string()).unwrap_or_default(),
                                "Redis lost entries it had acknowledged (restart without persistence or failover); the run starts a new epoch and readers are told"
                            );
                        }
                        self.acknowledged.insert(stream.clone(), outcome.expected());
                    }
                    let appended: u64 = outcomes.iter().map(|o| o.appended).sum();
                    shared.metrics.entries_published.inc_by(appended);
                    shared.set_redis_up(true);
                    if let Some(wait) = self.durability.command() {
                        // Nothing is acknowledged before Redis confirms the level: on a
                        // timeout or an error the batch is published again (the function skips
                        // what it already has) and waited for again.
                        let started = std::time::Instant::now();
                        let answer = wait.query_async::<redis::Value>(c).await;
                        shared
                            .metrics
                            .durability_wait_seconds
                            .observe(started.elapsed().as_secs_f64());
                        match answer {
                            Ok(value) => match self.durability.reached(&value) {
                                Ok(true) => {}
                                Ok(false) => {
                                    shared.metrics.durability_timeouts.inc();
                                    if waits_missed.is_multiple_of(20) {
                                        tracing::warn!(
                                            durability = %self.durability,
                                            confirmed = ?value,
                                            entries = groups.iter().map(|g| g.2.len()).sum::<usize>(),
                                            "Redis did not confirm the batch at the durability level in time; it is not acknowledged (the entrypoint keeps it) and is published and waited for again"
                                        );
                                    }
                                    waits_missed += 1;
                                    continue;
                                }
                                Err(e) => {
                                    shared.metrics.publish_errors.inc();
                                    tracing::warn!(durability = %self.durability, error = %e, "cannot read Redis's answer to the durability wait; holding output and retrying");
                                    tokio::time::sleep(backoff.delay()).await;
                                    continue;
                                }
                            },
                            Err(e) => {
                                shared.metrics.publish_errors.inc();
                                if failures.is_multiple_of(20) {
                                    tracing::error!(
                                        error = %durability_error(self.durability, &e),
                                        "the durability wait failed; holding output (not acknowledged) and retrying"
                                    );
                                }
                                failures += 1;
                                if failures.is_multiple_of(3) {
                                    *conn = None;
                                }
                                tokio::time::sleep(backoff.delay()).await;
                                continue;
                            }
                        }
                        if waits_missed > 0 {
                            tracing::info!(
                                durability = %self.durability,
                                after = waits_missed,
                                "Redis confirmed the batch at the durability level; acknowledging it"
                            );
                        }
                    }
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    drop(timer);
                    shared.metrics.publish_errors.inc();
                    shared.set_redis_up(false);
                    if failures.is_multiple_of(20) {
                        tracing::warn!(error = %e, "publishing to Redis failed; holding output and retrying");
                    }
                    failures += 1;
                    if failures.is_multiple_of(3) {
                        // Start over with a fresh connection.
                        *conn = None;
                    }
                    tokio::time::sleep(backoff.delay()).await;
                }
            }
        }
        for event in statuses {
            self.mirror_status(shared, conn, event).await;
        }
        for (epoch, fseq) in acks {
            shared.ack(epoch, fseq);
        }
        for (permit, weight) in permits {
            shared.metrics.buffered_bytes.sub(i64::from(weight));
            drop(permit);
        }
    }

    /// Mirrors a status event into the state hash; on a final state, puts the retention TTL
    /// on the keys this sidecar is responsible for.
    async fn mirror_status(
        &self,
        shared: &Arc<SidecarState>,
        conn: &mut Option<RedisConn>,
        event: StatusEvent,
    ) {
        let Some(c) = conn.as_mut() else { return };
        let config = &shared.config;
        let run = &config.run;
        let field = state_hash::var_field(&config.variation);
        let json = String::from_utf8(event.to_json()).unwrap_or_default();
        let result: Result<(), redis::RedisError> = async {
            if event.reason.as_deref() == Some("SidecarStarted") {
                // A restarted sidecar must not hide the state of a running agent.
                redis::cmd("HSETNX")
                    .arg(run.state_key())
                    .arg(&field)
                    .arg(&json)
                    .query_async::<()>(c)
                    .await?;
                return Ok(());
            }
            set_state(c, run, &[(field.as_str(), json.clone())]).await?;
            // Without an operator (no `namespace` in the state hash) the sidecars settle the
            // run's phase themselves, from every declared variation; with one, it does.
            let operator_owned = !config.owns_run && {
                let ns: Option<String> = redis::cmd("HGET")
                    .arg(run.state_key())
                    .arg(state_hash::NAMESPACE)
                    .query_async(c)
                    .await?;
                ns.is_some()
            };
            let mut run_final = false;
            if !operator_owned {
                if config.archive {
                    archive::mark_pending(c, run).await?;
                }
                add_variation(c, run, &config.variation).await?;
                run_final = settle_phase(c, run, now_ms())
                    .await?
                    .is_some_and(|p| p.is_final());
            }
            let ttl = config.retention.as_secs().max(1);
            if run_final {
                let declared: Option<String> = redis::cmd("HGET")
                    .arg(run.state_key())
                    .arg(state_hash::VARIATIONS)
                    .query_async(c)
                    .await?;
                let variations: Vec<Variation> = declared
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|v| Variation::new(v).ok())
                    .collect();
                if config.archive {
                    let mut request = ArchiveRequest::new(run.clone(), ttl, "sidecar");
                    request.variations = variations.clone();
                    archive::enqueue_if_pending(c, &request).await?;
                }
                archive::expire_unless_archiving(c, run, &run.all_keys(variations.iter()), ttl)
                    .await?;
            } else if event.state.is_final() {
                let keys = [
                    StreamName::Output(config.variation.clone()).key(run),
                    StreamName::Logs(config.variation.clone()).key(run),
                ];
                archive::expire_unless_archiving(c, run, &keys, ttl).await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot update the run's state hash");
        }
    }
}

fn expected_top(acknowledged: &HashMap<StreamName, Expected>, stream: &StreamName) -> u64 {
    acknowledged.get(stream).map_or(0, |e| e.top)
}

/// The sidecar's own entries (its status events and figures), queued for the publisher.
impl SidecarState {
    /// Publishes a fact about the sidecar on the status stream without changing the
    /// variation's state: the event carries the latest state, and is not mirrored into the
    /// state hash (so it never moves the run's phase, even after the run has ended).
    pub(crate) async fn notice(
        &self,
        items: &mpsc::Sender<ToPublish>,
        reason: &str,
        message: String,
    ) {
        let state = *lock(&self.last_state);
        let event = StatusEvent::new(Some(self.config.variation.as_str()), state)
            .reason(reason)
            .message(message)
            .source("sidecar");
        self.push_status(items, event, false).await;
    }

    /// Queues a status event of the sidecar's own; `mirror`: also make it the variation's
    /// latest status in the state hash (a notice is not).
    pub(crate) async fn push_status(
        &self,
        items: &mpsc::Sender<ToPublish>,
        event: StatusEvent,
        mirror: bool,
    ) {
        let content = event.to_json();
        let status = mirror.then_some(event);
        self.push_own(
            items,
            StreamName::Status,
            EntryType::Status,
            content,
            status,
        )
        .await;
    }

    /// Queues an entry of the sidecar's own producer (its status events and figures); false
    /// when the publisher is gone.
    pub(crate) async fn push_own(
        &self,
        items: &mpsc::Sender<ToPublish>,
        stream: StreamName,
        kind: EntryType,
        content: impl Into<Bytes>,
        status: Option<StatusEvent>,
    ) -> bool {
        let pseq = self.pseq.fetch_add(1, Ordering::SeqCst) + 1;
        items
            .send(ToPublish::Entry {
                stream,
                producer: self.producer.clone(),
                entry: Box::new(NewEntry::now(pseq, kind, content)),
                ack: None,
                status,
                permit: None,
            })
            .await
            .is_ok()
    }
}

// Long file: one Pub/Sub connection's life (subscribe, dispatch, resync, shed) whose locking is read as a whole.
//! In-process fan-out: one Redis Pub/Sub connection per relay process, shared by every client.
//!
//! Each run that has at least one SSE client has a [`Feed`]: the hub subscribes that run's
//! channels (status, metrics, and output and logs of each variation it knows) once, by
//! reference count, and puts every announced entry in the feed's [`Ring`], which all clients
//! of the run read. The ring is bounded in entries and in bytes, so relay memory does not grow
//! with slow clients: a client that falls behind the ring is told it lagged and catches up
//! from the Redis stream instead.
//!
//! Announcements are taken off the Pub/Sub connection at once, by a task that does nothing
//! else, into an intake queue bounded in bytes; a second task decodes them and fills the
//! rings. When the relay falls behind (starved of CPU) and the intake is full, announcements
//! are dropped ("shed") instead of queued, and once the intake has room again the runs they
//! belonged to get [`FeedItem::Resync`]: their clients read what they missed from the streams,
//! from their cursors. Nothing is lost and nothing grows.
//!
//! When the Pub/Sub connection drops (Redis restart), the hub re-opens it, re-subscribes every
//! channel and sends [`FeedItem::Resync`] to every feed likewise.
//!
//! On a Redis Cluster (`redis+cluster://`) the same happens per run over sharded Pub/Sub
//! ([`crate::shards`]): each run's channels are subscribed with `SSUBSCRIBE` on the master of
//! the run's slot, and when a slot moves (resharding, failover) or a node's connection drops,
//! a repair task resubscribes the runs it concerns where their slot is now and sends them
//! [`FeedItem::Resync`].
//!
//! Epochs: every announcement carries the run's epoch. Within one epoch a stream's `seq` only
//! grows; when the hub sees it go back (a writer that does not check the stream's top
//! rewrote history after Redis lost entries), it sends [`FeedItem::Rewound`], and clients
//! that carry that stream start over from its first entry, saying so (`event: reset`).
//!
//! A feed carries at most [`MAX_FEED_VARIATIONS`] variations: those in the run's state hash
//! and those its own status stream announces. Viewers never add any.

use crate::metrics::Metrics;
use crate::ring::{Ring, RingReader};
use crate::shards::{Link, Push, Shards};
use agentrun_protocol::live;
use agentrun_protocol::state_hash;
use agentrun_protocol::{
    Epoch, RedisConn, RedisMode, RedisSettings, RunId, RunState, StatusEvent, StreamName, Variation,
};
use bytes::Bytes;
use futures::StreamExt;
use redis::aio::PubSubSink;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::sync::{Mutex, Notify, OnceCell, watch};

/// Most variations one run's feed carries: the AgentRun CRD's limit (`spec.variations`,
/// 64). Keeps a run's subscriptions and its clients' cursors bounded.
pub const MAX_FEED_VARIATIONS: usize = 64;

/// What a feed tells its clients.
#[derive(Debug)]
pub enum FeedItem {
    /// A new entry on one of the run's streams. Its SSE tail (`event: TYPE\ndata: JSON\n\n`)
    /// is encoded once, by the first client that sends it (off the Pub/Sub task), and shared;
    /// each client prepends its own `id:` line.
    Entry {
        stream: StreamName,
        entry: agentrun_protocol::Entry,
        /// The run's epoch the entry was published in (`None`: not said).
        epoch: Option<Epoch>,
        event: std::sync::OnceLock<Bytes>,
    },
    /// A variation the feed had not known about (announced on the status stream).
    Variation(Variation),
    /// Entries may have been missed (the Pub/Sub connection was re-opened, the run's slot
    /// moved to another cluster node, or the relay shed announcements it could not keep up
    /// with): replay from the cursors.
    Resync,
    /// The stream's `seq` went back within one epoch: its history was rewritten.
    Rewound(StreamName),
    /// The run reached a final phase.
    Ended(RunState),
    /// The relay is stopping: end the stream with a resumable cursor.
    Shutdown,
}

impl FeedItem {
    /// What the item costs in the ring: an entry's bytes twice (its content, and the SSE text
    /// encoded from it, base64 for binary) plus bookkeeping.
    fn weight(&self) -> usize {
        match self {
            FeedItem::Entry { entry, .. } => {
                2 * (entry.content.len() + entry.meta.as_ref().map_or(0, String::len)) + 256
            }
            _ => 64,
        }
    }
}

/// Tuning of the fan-out.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Live entries kept per run for clients that lag.
    pub feed_capacity: usize,
    /// Bytes kept per run for clients that lag (see [`FeedItem::weight`]).
    pub feed_bytes: usize,
    /// Bytes of announcements waiting to be handed to the feeds; beyond, they are shed.
    pub pubsub_buffer_bytes: usize,
    /// How often a watched run's state hash is re-read (phase, variations).
    pub phase_poll: Duration,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            feed_capacity: 1024,
            feed_bytes: 8 * 1024 * 1024,
            pubsub_buffer_bytes: 32 * 1024 * 1024,
            phase_poll: Duration::from_secs(2),
        }
    }
}

/// One run's live fan-out.
pub struct Feed {
    pub run: RunId,
    ring: Arc<Ring<FeedItem>>,
    variations: StdMutex<BTreeSet<Variation>>,
    ready: OnceCell<()>,
    clients: StdMutex<usize>,
    /// The run's final phase, once the feed has sent `Ended` (it sends it once).
    ended: StdMutex<Option<RunState>>,
    /// The newest (epoch, seq) announced per stream, to notice `seq` going back.
    live_tops: StdMutex<HashMap<StreamName, (Option<Epoch>, u64)>>,
    /// The variation cap was hit (logged once).
    capped: AtomicBool,
}

impl Feed {
    /// Variations known so far.
    pub fn variations(&self) -> Vec<Variation> {
        lock(&self.variations).iter().cloned().collect()
    }

    /// The run's final phase, once the feed has told its clients that the run ended.
    pub fn ended(&self) -> Option<RunState> {
        *lock(&self.ended)
    }

    fn send(&self, item: FeedItem) {
        let weight = item.weight();
        self.ring.push(item, weight);
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Subscriptions {
    sink: Sink,
    refs: HashMap<String, usize>,
}

/// Where subscriptions are made.
enum Sink {
    /// One Pub/Sub connection (standalone or Sentinel); `None` while it is re-opened.
    Single(Option<PubSubSink>),
    /// Sharded Pub/Sub on a Redis Cluster, one connection per master.
    Sharded(Box<Shards>),
}

/// Runs whose sharded subscriptions must be made again (Cluster mode).
#[derive(Default)]
struct Repairs {
    /// Runs to resubscribe.
    runs: HashSet<RunId>,
    /// A node ended one of the run's subscriptions on this connection (`sunsubscribe`).
    lost: HashSet<(Link, RunId)>,
    /// Node connections that dropped.
    down: HashSet<Link>,
}

impl Repairs {
    fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.lost.is_empty() && self.down.is_empty()
    }
}

/// Announcements taken off the Pub/Sub connection, waiting for the dispatcher.
struct Intake {
    queue: StdMutex<IntakeQueue>,
    ready: Notify,
    limit: usize,
    paused: watch::Sender<bool>,
}

#[derive(Default)]
struct IntakeQueue {
    items: VecDeque<(redis::Msg, usize)>,
    bytes: usize,
    /// Runs whose announcements were shed since the last resync.
    shed: HashSet<RunId>,
}

struct HubInner {
    settings: RedisSettings,
    conn: RedisConn,
    options: HubOptions,
    metrics: Metrics,
    feeds: StdMutex<HashMap<RunId, Arc<Feed>>>,
    subs: Mutex<Subscriptions>,
    intake: Arc<Intake>,
    repairs: StdMutex<Repairs>,
    repair_ready: Arc<Notify>,
}

/// The process-wide fan-out; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

/// A client's hold on a run's feed; dropping it releases the run's subscriptions when it was
/// the last client.
pub struct Watch {
    pub feed: Arc<Feed>,
    pub rx: RingReader<FeedItem>,
    hub: Hub,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.hub.release(&self.feed);
    }
}

fn feed_channels(run: &RunId, variations: &[Variation]) -> Vec<String> {
    let mut out = vec![StreamName::Status.key(run), StreamName::Metrics.key(run)];
    for v in variations {
        out.push(StreamName::Output(v.clone()).key(run));
        out.push(StreamName::Logs(v.clone()).key(run));
    }
    out
}

impl Hub {
    /// Starts the hub and its Pub/Sub tasks. Fails only if the first connection cannot be
    /// opened.
    pub async fn start(
        settings: RedisSettings,
        conn: RedisConn,
        options: HubOptions,
        metrics: Metrics,
    ) -> Result<Self, agentrun_protocol::SettingsError> {
        let (sink, stream, pushes) = if settings.mode == RedisMode::Cluster {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let mut shards = Shards::new(settings.clone(), conn.clone(), tx);
            if !shards.refresh().await {
                tracing::warn!(redis = %settings.target(), "cannot read the cluster's slot map yet; will ask again when a run is watched");
            }
            (Sink::Sharded(Box::new(shards)), None, Some(rx))
        } else {
            let (sink, stream) = settings.pubsub().await?.split();
            (Sink::Single(Some(sink)), Some(stream), None)
        };
        let (paused, paused_rx) = watch::channel(false);
        let limit = options.pubsub_buffer_bytes.max(64 * 1024);
        let hub = Hub {
            inner: Arc::new(HubInner {
                settings,
                conn,
                options,
                metrics,
                feeds: StdMutex::new(HashMap::new()),
                subs: Mutex::new(Subscriptions {
                    sink,
                    refs: HashMap::new(),
                }),
                intake: Arc::new(Intake {
                    queue: StdMutex::new(IntakeQueue::default()),
                    ready: Notify::new(),
                    limit,
                    paused,
                }),
                repairs: StdMutex::new(Repairs::default()),
                repair_ready: Arc::new(Notify::new()),
            }),
        };
        let weak = Arc::downgrade(&hub.inner);
        if let Some(stream) = stream {
            tokio::spawn(run_pubsub(weak.clone(), stream));
        }
        if let Some(pushes) = pushes {
            tokio::spawn(run_shard_pushes(weak.clone(), pushes));
            tokio::spawn(run_shard_repair(
                weak.clone(),
                hub.inner.repair_ready.clone(),
            ));
        }
        tokio::spawn(run_dispatch(weak, hub.inner.intake.clone(), paused_rx));
        Ok(hub)
    }

    pub fn conn(&self) -> RedisConn {
        self.inner.conn.clone()
    }

    /// Variations the run's feed carries now, if the run has one on this relay.
    pub fn known_variations(&self, run: &RunId) -> Vec<Variation> {
        lock(&self.inner.feeds)
            .get(run)
            .map(|f| f.variations())
            .unwrap_or_default()
    }

    /// Joins (or creates) the feed of a run. The returned reader sees every entry announced
    /// after the run's channels were subscribed.
    pub async fn watch(&self, run: &RunId) -> Watch {
        let (feed, created) = {
            let mut feeds = lock(&self.inner.feeds);
            match feeds.get(run) {
                Some(f) => {
                    *lock(&f.clients) += 1;
                    (f.clone(), false)
                }
                None => {
                    let f = Arc::new(Feed {
                        run: run.clone(),
                        ring: Ring::new(
                            self.inner.options.feed_capacity.max(16),
                            self.inner.options.feed_bytes.max(64 * 1024),
                        ),
                        variations: StdMutex::new(BTreeSet::new()),
                        ready: OnceCell::new(),
                        clients: StdMutex::new(1),
                        ended: StdMutex::new(None),
                        live_tops: StdMutex::new(HashMap::new()),
                        capped: AtomicBool::new(false),
                    });
                    feeds.insert(run.clone(), f.clone());
                    self.inner.metrics.watched_runs.inc();
                    (f, true)
                }
            }
        };
        let rx = feed.ring.reader();
        let watch = Watch {
            feed: feed.clone(),
            rx,
            hub: self.clone(),
        };
        feed.ready.get_or_init(|| self.init_feed(&feed)).await;
        if created {
            tokio::spawn(poll_state(Arc::downgrade(&self.inner), feed.clone()));
        }
        watch
    }

    async fn init_feed(&self, feed: &Arc<Feed>) {
        // Subscribe the run-wide channels first, so that a variation announced from now on is
        // seen live; then learn the variations that already exist.
        self.subscribe(feed_channels(&feed.run, &[])).await;
        let mut conn = self.conn();
        let state: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(feed.run.state_key())
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let mut vars = state_hash::variations(&state);
        if vars.is_empty() {
            vars.insert(Variation::default_name());
        }
        let vars: Vec<Variation> = vars.into_iter().take(MAX_FEED_VARIATIONS).collect();
        let mut channels = Vec::new();
        for v in &vars {
            channels.push(StreamName::Output(v.clone()).key(&feed.run));
            channels.push(StreamName::Logs(v.clone()).key(&feed.run));
        }
        self.subscribe(channels).await;
        lock(&feed.variations).extend(vars);
    }

    /// Adds the variations declared in the run's state hash to the feed (up to
    /// [`MAX_FEED_VARIATIONS`]), subscribed before this returns.
    pub async fn learn_variations(&self, feed: &Arc<Feed>, state: &HashMap<String, String>) {
        for v in state_hash::variations(state) {
            if !self.add_variation(feed, &v).await {
                break;
            }
        }
    }

    /// Makes sure the feed carries a variation's channels (subscribed before this returns).
    /// `false` when the feed is full ([`MAX_FEED_VARIATIONS`]) and the variation is not in it.
    async fn add_variation(&self, feed: &Arc<Feed>, v: &Variation) -> bool {
        {
            let vars = lock(&feed.variations);
            if vars.contains(v) {
                return true;
            }
            if vars.len() >= MAX_FEED_VARIATIONS {
                if !feed.capped.swap(true, Ordering::Relaxed) {
                    tracing::warn!(run = %feed.run, variation = %v, limit = MAX_FEED_VARIATIONS, "the run names more variations than a feed carries; ignoring the rest");
                }
                return false;
            }
        }
        self.subscribe(vec![
            StreamName::Output(v.clone()).key(&feed.run),
            StreamName::Logs(v.clone()).key(&feed.run),
        ])
        .await;
        let new = {
            let mut vars = lock(&feed.variations);
            vars.len() < MAX_FEED_VARIATIONS && vars.insert(v.clone())
        };
        if new {
            feed.send(FeedItem::Variation(v.clone()));
        } else {
            // Someone else added it meanwhile and holds the subscription reference (or the
            // feed filled up meanwhile).
            self.unsubscribe(vec![
                StreamName::Output(v.clone()).key(&feed.run),
                StreamName::Logs(v.clone()).key(&feed.run),
            ])
            .await;
        }
        lock(&feed.variations).contains(v)
    }

    fn release(&self, feed: &Arc<Feed>) {
        let last = {
            let mut feeds = lock(&self.inner.feeds);
            let mut clients = lock(&feed.clients);
            *clients = clients.saturating_sub(1);
            if *clients == 0 {
                if feeds.get(&feed.run).is_some_and(|f| Arc::ptr_eq(f, feed)) {
                    feeds.remove(&feed.run);
                }
                true
            } else {
                false
            }
        };
        if last {
            self.inner.metrics.watched_runs.dec();
            let hub = self.clone();
            let feed = feed.clone();
            tokio::spawn(async move {
                // Wait for the subscriptions to be made before undoing them.
                feed.ready.get_or_init(|| async {}).await;
                let vars = feed.variations();
                hub.unsubscribe(feed_channels(&feed.run, &vars)).await;
            });
        }
    }

    async fn subscribe(&self, channels: Vec<String>) {
        let mut subs = self.inner.subs.lock().await;
        let mut new = Vec::new();
        for c in channels {
            let n = subs.refs.entry(c.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                new.push(c);
            }
        }
        if new.is_empty() {
            return;
        }
        match &mut subs.sink {
            Sink::Single(Some(sink)) => {
                if let Err(e) = sink.subscribe(&new).await {
                    // If the connection dropped, the connection task re-subscribes everything
                    // in `refs` and tells every feed to resync.
                    tracing::warn!(error = %e, "could not subscribe run channels; will re-subscribe after reconnecting");
                }
            }
            Sink::Single(None) => {}
            Sink::Sharded(shards) => {
                // Every call names channels of one run: one slot.
                if let Some((run, _)) = StreamName::parse(&new[0])
                    && !shards.subscribe(&run, &new).await
                {
                    tracing::debug!(%run, "could not subscribe the run's sharded channels yet; repairing");
                    self.inner.repair(|r| {
                        r.runs.insert(run);
                    });
                }
            }
        }
    }

    async fn unsubscribe(&self, channels: Vec<String>) {
        let mut subs = self.inner.subs.lock().await;
        let mut gone = Vec::new();
        for c in channels {
            if let Some(n) = subs.refs.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    subs.refs.remove(&c);
                    gone.push(c);
                }
            }
        }
        if gone.is_empty() {
            return;
        }
        let Subscriptions { sink, refs } = &mut *subs;
        match sink {
            Sink::Single(Some(sink)) => {
                if let Err(e) = sink.unsubscribe(&gone).await {
                    tracing::debug!(error = %e, "could not unsubscribe; the connection is being re-opened");
                }
            }
            Sink::Single(None) => {}
            Sink::Sharded(shards) => {
                if let Some((run, _)) = StreamName::parse(&gone[0]) {
                    let prefix = run.prefix();
                    let last = !refs.keys().any(|c| c.starts_with(&prefix));
                    shards.unsubscribe(&run, &gone, last).await;
                }
            }
        }
    }

    /// Tells every open stream that the relay is stopping.
    pub fn shutdown(&self) {
        let feeds: Vec<Arc<Feed>> = lock(&self.inner.feeds).values().cloned().collect();
        for feed in feeds {
            feed.send(FeedItem::Shutdown);
        }
    }

    /// Number of channels currently subscribed (for tests and metrics).
    pub async fn subscribed_channels(&self) -> usize {
        self.inner.subs.lock().await.refs.len()
    }

    /// Stops (`true`) or restarts handing announcements to the feeds, as a relay starved of
    /// CPU would: announcements keep being taken off the Pub/Sub connection into the bounded
    /// intake, which sheds once full. For tests of the shedding; nothing else calls it.
    pub fn pause_live_dispatch(&self, paused: bool) {
        self.inner.intake.paused.send_replace(paused);
    }
}

impl Intake {
    /// Queues an announcement, or sheds it when the queue is full.
    fn offer(&self, msg: redis::Msg, metrics: &Metrics) {
        let weight = msg.get_payload_bytes().len() + msg.get_channel_name().len() + 64;
        let mut q = lock(&self.queue);
        if q.bytes + weight > self.limit && !q.items.is_empty() {
            if let Some((run, _)) = StreamName::parse(msg.get_channel_name()) {
                q.shed.insert(run);
            }
            metrics.live_shed.inc();
            return;
        }
        q.bytes += weight;
        q.items.push_back((msg, weight));
        metrics.pubsub_buffer_bytes.set(q.bytes as i64);
        drop(q);
        self.ready.notify_one();
    }

    /// The next announcement, and the runs to resync once the queue has room again.
    fn take(&self, metrics: &Metrics) -> (Option<redis::Msg>, Vec<RunId>) {
        let mut q = lock(&self.queue);
        let next = q.items.pop_front().map(|(msg, weight)| {
            q.bytes -= weight;
            msg
        });
        metrics.pubsub_buffer_bytes.set(q.bytes as i64);
        let shed = if !q.shed.is_empty() && q.bytes <= self.limit / 2 {
            q.shed.drain().collect()
        } else {
            Vec::new()
        };
        (next, shed)
    }
}

impl HubInner {
    fn feed(&self, run: &RunId) -> Option<Arc<Feed>> {
        lock(&self.feeds).get(run).cloned()
    }

    /// Notes sharded subscriptions to make again and wakes the repair task.
    fn repair(&self, note: impl FnOnce(&mut Repairs)) {
        note(&mut lock(&self.repairs));
        self.repair_ready.notify_one();
    }

    /// One round of repairs (Cluster mode): resubscribes the runs whose subscriptions were
    /// lost where their slot is now, then tells their feeds to resync. Runs that could not be
    /// resubscribed yet are kept for the next round; returns whether there are any.
    async fn repair_shards(&self) -> bool {
        let work = std::mem::take(&mut *lock(&self.repairs));
        if work.is_empty() {
            return false;
        }
        let mut subs = self.subs.lock().await;
        let Subscriptions { sink, refs } = &mut *subs;
        let Sink::Sharded(shards) = sink else {
            return false;
        };
        let mut runs = work.runs;
        for link in &work.down {
            let lost = shards.link_down(link);
            if !lost.is_empty() {
                self.metrics.redis_reconnects.inc();
                tracing::warn!(node = %format!("{}:{}", link.0.0, link.0.1), runs = lost.len(), "a cluster node's Pub/Sub connection dropped; resubscribing its runs");
            }
            runs.extend(lost);
        }
        for (link, run) in work.lost {
            if shards.is_on(&run, &link) {
                tracing::info!(%run, node = %format!("{}:{}", link.0.0, link.0.1), "the run's slot left its node; resubscribing where it is now");
                runs.insert(run);
            }
        }
        if runs.is_empty() {
            return false;
        }
        shards.refresh().await;
        let mut wanted: HashMap<RunId, Vec<String>> = HashMap::new();
        for channel in refs.keys() {
            if let Some((run, _)) = StreamName::parse(channel)
                && runs.contains(&run)
            {
                wanted.entry(run).or_default().push(channel.clone());
            }
        }
        let mut unreachable = HashSet::new();
        let (mut done, mut again) = (Vec::new(), Vec::new());
        for run in runs {
            match wanted.get(&run) {
                None => shards.forget(&run),
                Some(channels) => {
                    if shards.resubscribe(&run, channels, &mut unreachable).await {
                        done.push(run);
                    } else {
                        again.push(run);
                    }
                }
            }
        }
        drop(subs);
        // Subscribed again: from now on every entry is heard, and what was announced before
        // is in the streams, where the clients read it from their cursors.
        for run in done {
            self.metrics.resubscribed_runs.inc();
            if let Some(feed) = self.feed(&run) {
                feed.send(FeedItem::Resync);
            }
        }
        if again.is_empty() {
            return false;
        }
        lock(&self.repairs).runs.extend(again);
        true
    }

    fn dispatch(self: &Arc<Self>, channel: &str, payload: &[u8]) {
        let Some((run, stream)) = StreamName::parse(channel) else {
            return;
        };
        let Some(feed) = self.feed(&run) else {
            return;
        };
        let (entry, epoch) = match live::decode_with_epoch(payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(%run, channel, error = %e, "ignoring a malformed live message");
                return;
            }
        };
        let went_back = {
            let mut tops = lock(&feed.live_tops);
            let back = tops
                .get(&stream)
                .is_some_and(|(e, seq)| *e == epoch && entry.seq <= *seq);
            tops.insert(stream.clone(), (epoch, entry.seq));
            back
        };
        if went_back {
            tracing::warn!(%run, channel, seq = entry.seq, "a stream's sequence numbers went back within one epoch; its clients start over from its first entry");
            feed.send(FeedItem::Rewound(stream.clone()));
        }
        if stream == StreamName::Status {
            match serde_json::from_slice::<StatusEvent>(&entry.content) {
                Ok(status) => {
                    if let Some(v) = status
                        .variation
                        .as_deref()
                        .and_then(|v| Variation::new(v).ok())
                        && !lock(&feed.variations).contains(&v)
                    {
                        let hub = Hub {
                            inner: self.clone(),
                        };
                        let feed = feed.clone();
                        tokio::spawn(async move { hub.add_variation(&feed, &v).await });
                    }
                    if status.state.is_final() || status.variation.is_none() {
                        let inner = self.clone();
                        let feed = feed.clone();
                        tokio::spawn(async move { check_phase(&inner, &feed).await });
                    }
                }
                Err(e) => tracing::debug!(%run, error = %e, "status entry is not a StatusEvent"),
            }
        }
        feed.send(FeedItem::Entry {
            stream,
            entry,
            epoch,
            event: std::sync::OnceLock::new(),
        });
    }
}

/// Reads the run's state hash: learns declared variations, and tells the clients once the
/// phase is final. Returns whether it is.
async fn check_phase(inner: &Arc<HubInner>, feed: &Arc<Feed>) -> bool {
    if lock(&feed.ended).is_some() {
        return true;
    }
    let mut conn = inner.conn.clone();
    let state: Result<HashMap<String, String>, _> = redis::cmd("HGETALL")
        .arg(feed.run.state_key())
        .query_async(&mut conn)
        .await;
    let hub = Hub {
        inner: inner.clone(),
    };
    match state {
        Ok(state) => {
            hub.learn_variations(feed, &state).await;
            match state_hash::phase(&state) {
                Some(phase) if phase.is_final() => {
                    let first = lock(&feed.ended).replace(phase).is_none();
                    if first {
                        feed.send(FeedItem::Ended(phase));
                    }
                    true
                }
                _ => false,
            }
        }
        Err(_) => false,
    }
}

async fn poll_state(hub: std::sync::Weak<HubInner>, feed: Arc<Feed>) {
    let Some(period) = hub.upgrade().map(|h| h.options.phase_poll) else {
        return;
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = hub.upgrade() else { return };
        if *lock(&feed.clients) == 0 {
            return;
        }
        if check_phase(&inner, &feed).await {
            return;
        }
    }
}

/// Hands queued announcements to the feeds, one at a time, in order; resyncs the runs whose
/// announcements were shed once the intake has room again. Ends when the hub is gone.
async fn run_dispatch(
    hub: std::sync::Weak<HubInner>,
    intake: Arc<Intake>,
    mut paused: watch::Receiver<bool>,
) {
    loop {
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
        }
        let Some(inner) = hub.upgrade() else { return };
        let (next, shed) = intake.take(&inner.metrics);
        for run in shed {
            if let Some(feed) = inner.feed(&run) {
                feed.send(FeedItem::Resync);
            }
        }
        match next {
            Some(msg) => inner.dispatch(msg.get_channel_name(), msg.get_payload_bytes()),
            None => {
                drop(inner);
                // Woken by the next announcement; the timeout only notices a hub that is gone.
                tokio::select! {
                    _ = intake.ready.notified() => {}
                    _ = paused.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Takes announcements off the Pub/Sub connection as they come (nothing else, so the redis
/// client's own unbounded queue stays short), and re-opens the connection when it drops.
async fn run_pubsub(hub: std::sync::Weak<HubInner>, mut stream: redis::aio::PubSubStream) {
    loop {
        while let Some(msg) = stream.next().await {
            let Some(inner) = hub.upgrade() else { return };
            inner.intake.offer(msg, &inner.metrics);
        }
        // The connection is gone: re-open it, re-subscribe and make every client catch up.
        let Some(inner) = hub.upgrade() else { return };
        inner.subs.lock().await.sink = Sink::Single(None);
        tracing::warn!(redis = %inner.settings.target(), "Redis Pub/Sub connection lost; reconnecting");
        let mut delay = Duration::from_millis(100);
        stream = loop {
            match inner.settings.pubsub().await {
                Ok(pubsub) => {
                    let (mut sink, new_stream) = pubsub.split();
                    let mut subs = inner.subs.lock().await;
                    let channels: Vec<String> = subs.refs.keys().cloned().collect();
                    let ok = channels.is_empty() || sink.subscribe(&channels).await.is_ok();
                    if ok {
                        subs.sink = Sink::Single(Some(sink));
                        drop(subs);
                        break new_stream;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "Redis still unreachable");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
            if hub.strong_count() == 0 {
                return;
            }
        };
        inner.metrics.redis_reconnects.inc();
        tracing::info!(redis = %inner.settings.target(), "Redis Pub/Sub connection re-opened");
        let feeds: Vec<Arc<Feed>> = lock(&inner.feeds).values().cloned().collect();
        for feed in feeds {
            feed.send(FeedItem::Resync);
        }
    }
}

/// Takes pushes off the cluster nodes' connections as they come: sharded messages into the
/// intake, lost subscriptions and dropped connections to the repair task. Ends when the hub is
/// gone (its connections, which hold the senders, with it).
async fn run_shard_pushes(
    hub: std::sync::Weak<HubInner>,
    mut pushes: tokio::sync::mpsc::UnboundedReceiver<Push>,
) {
    while let Some((link, push)) = pushes.recv().await {
        let Some(inner) = hub.upgrade() else { return };
        match push.kind {
            redis::PushKind::SMessage => {
                if let Some(msg) = redis::Msg::from_push_info(push) {
                    inner.intake.offer(msg, &inner.metrics);
                }
            }
            redis::PushKind::SUnsubscribe => {
                // Our own unsubscribes are confirmed the same way; the repair task tells
                // them apart (the run is no longer on that connection, or no longer watched).
                let channel: Option<String> = push
                    .data
                    .first()
                    .and_then(|v| redis::FromRedisValue::from_redis_value_ref(v).ok());
                if let Some((run, _)) = channel.as_deref().and_then(StreamName::parse) {
                    inner.repair(|r| {
                        r.lost.insert((link, run));
                    });
                }
            }
            redis::PushKind::Disconnection => inner.repair(|r| {
                r.down.insert(link);
            }),
            _ => {}
        }
    }
}

/// Resubscribes runs whose sharded subscriptions were lost, retrying (100 ms, doubling up to
/// 1 s) while their slot's master is away (a failover in progress). Ends when the hub is gone.
async fn run_shard_repair(hub: std::sync::Weak<HubInner>, ready: Arc<Notify>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(inner) = hub.upgrade() else { return };
        if inner.repair_shards().await {
            drop(inner);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
            continue;
        }
        delay = Duration::from_millis(100);
        let pending = !lock(&inner.repairs).is_empty();
        if pending {
            continue;
        }
        drop(inner);
        // Woken by the next repair (a notification sent meanwhile is kept); the timeout only
        // notices a hub that is gone.
        tokio::select! {
            _ = ready.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentrun_protocol::{Entry, EntryType};

    fn run() -> RunId {
        RunId::new("r").unwrap()
    }

    #[test]
    fn a_feed_listens_to_status_metrics_and_each_variations_output_and_logs_never_control() {
        let vars = [Variation::new("a").unwrap(), Variation::new("b").unwrap()];
        let channels = feed_channels(&run(), &vars);
        assert_eq!(
            channels,
            [
                "run:{r}:status",
                "run:{r}:metrics",
                "run:{r}:output:a",
                "run:{r}:logs:a",
                "run:{r}:output:b",
                "run:{r}:logs:b",
            ]
        );
        assert!(!channels.iter().any(|c| c.ends_with(":control")));
    }

    #[test]
    fn an_entry_weighs_its_bytes_twice_and_news_weighs_little() {
        let entry = Entry {
            seq: 1,
            ts: 0,
            kind: EntryType::Output,
            content: Bytes::from(vec![0u8; 10_000]),
            meta: Some("{}".into()),
        };
        let item = FeedItem::Entry {
            stream: StreamName::Output(Variation::default_name()),
            entry,
            epoch: None,
            event: Default::default(),
        };
        assert_eq!(item.weight(), 2 * 10_002 + 256);
        for news in [
            FeedItem::Resync,
            FeedItem::Shutdown,
            FeedItem::Ended(RunState::Succeeded),
            FeedItem::Variation(Variation::default_name()),
        ] {
            assert!(news.weight() <= 64);
        }
    }
}

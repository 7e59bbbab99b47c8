//! In-process fan-out: one Redis Pub/Sub connection per relay process, shared by every client.
//!
//! Each run that has at least one SSE client has a [`Feed`]: the hub subscribes that run's
//! channels (status, metrics, and output and logs of each variation it knows) once, by
//! reference count, and broadcasts every announced entry to the feed's clients through a
//! bounded ring ([`tokio::sync::broadcast`]). The ring is shared by all clients of the run, so
//! relay memory does not grow with slow clients: a client that falls more than the ring's
//! capacity behind is told it lagged and catches up from the Redis stream instead.
//!
//! When the Pub/Sub connection drops (Redis restart), the hub re-opens it, re-subscribes every
//! channel and sends [`FeedItem::Resync`] to every feed, whose clients then replay each of
//! their streams from their cursor: whatever was published during the outage is read from the
//! streams, so nothing is lost.

use crate::metrics::Metrics;
use agentrun_protocol::entry::LiveMessage;
use agentrun_protocol::{
    Envelope, RedisConn, RedisSettings, RunId, RunState, StatusEvent, StreamName, Variation,
};
use bytes::Bytes;
use futures::StreamExt;
use redis::aio::PubSubSink;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::sync::{Mutex, OnceCell, broadcast};

/// What a feed tells its clients.
#[derive(Debug)]
pub enum FeedItem {
    /// A new entry on one of the run's streams. Its SSE tail (`event: TYPE\ndata: JSON\n\n`)
    /// is encoded once, by the first client that sends it (off the Pub/Sub task), and shared;
    /// each client prepends its own `id:` line.
    Entry {
        stream: StreamName,
        entry: agentrun_protocol::Entry,
        event: std::sync::OnceLock<Bytes>,
    },
    /// A variation the feed had not known about (announced on the status stream).
    Variation(Variation),
    /// The Pub/Sub connection was re-opened: entries may have been missed; replay.
    Resync,
    /// The run reached a final phase.
    Ended(RunState),
    /// The relay is stopping: end the stream with a resumable cursor.
    Shutdown,
}

/// Tuning of the fan-out.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Live entries kept per run for clients that lag (the bounded queue).
    pub feed_capacity: usize,
    /// How often a watched run's `phase` is re-read (it may be written without a status entry).
    pub phase_poll: Duration,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            feed_capacity: 1024,
            phase_poll: Duration::from_secs(2),
        }
    }
}

/// One run's live fan-out.
pub struct Feed {
    pub run: RunId,
    tx: broadcast::Sender<Arc<FeedItem>>,
    variations: StdMutex<BTreeSet<Variation>>,
    ready: OnceCell<()>,
    clients: StdMutex<usize>,
    ended: StdMutex<bool>,
}

impl Feed {
    /// Variations known so far.
    pub fn variations(&self) -> Vec<Variation> {
        lock(&self.variations).iter().cloned().collect()
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Subscriptions {
    sink: Option<PubSubSink>,
    refs: HashMap<String, usize>,
}

struct HubInner {
    settings: RedisSettings,
    conn: RedisConn,
    options: HubOptions,
    metrics: Metrics,
    feeds: StdMutex<HashMap<RunId, Arc<Feed>>>,
    subs: Mutex<Subscriptions>,
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
    pub rx: broadcast::Receiver<Arc<FeedItem>>,
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

/// Builds the shared SSE tail of an entry.
pub fn encode_event(run: &RunId, stream: &StreamName, entry: &agentrun_protocol::Entry) -> Bytes {
    let envelope = Envelope::new(run, stream, entry);
    let json = serde_json::to_string(&envelope).unwrap_or_else(|_| "{}".to_owned());
    let mut out = String::with_capacity(json.len() + 24);
    out.push_str("event: ");
    out.push_str(entry.kind.as_str());
    out.push_str("\ndata: ");
    out.push_str(&json);
    out.push_str("\n\n");
    Bytes::from(out)
}

/// Variation names recorded in a run's state hash (`variations` and `var:NAME` fields).
pub fn variations_from_state(state: &HashMap<String, String>) -> BTreeSet<Variation> {
    let mut out = BTreeSet::new();
    if let Some(list) = state.get("variations") {
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Ok(v) = Variation::new(name) {
                out.insert(v);
            }
        }
    }
    for key in state.keys() {
        if let Some(name) = key.strip_prefix("var:")
            && let Ok(v) = Variation::new(name)
        {
            out.insert(v);
        }
    }
    out
}

/// The run-level phase in a state hash, if it is set and known.
pub fn phase_from_state(state: &HashMap<String, String>) -> Option<RunState> {
    state
        .get("phase")
        .and_then(|p| serde_json::from_value(serde_json::Value::String(p.clone())).ok())
}

impl Hub {
    /// Starts the hub and its Pub/Sub connection task. Fails only if the first connection
    /// cannot be opened.
    pub async fn start(
        settings: RedisSettings,
        conn: RedisConn,
        options: HubOptions,
        metrics: Metrics,
    ) -> Result<Self, agentrun_protocol::SettingsError> {
        let pubsub = settings.pubsub().await?;
        let (sink, stream) = pubsub.split();
        let hub = Hub {
            inner: Arc::new(HubInner {
                settings,
                conn,
                options,
                metrics,
                feeds: StdMutex::new(HashMap::new()),
                subs: Mutex::new(Subscriptions {
                    sink: Some(sink),
                    refs: HashMap::new(),
                }),
            }),
        };
        let weak = Arc::downgrade(&hub.inner);
        tokio::spawn(run_pubsub(weak, stream));
        Ok(hub)
    }

    pub fn conn(&self) -> RedisConn {
        self.inner.conn.clone()
    }

    /// Joins (or creates) the feed of a run. The returned receiver sees every entry announced
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
                    let (tx, _) = broadcast::channel(self.inner.options.feed_capacity.max(16));
                    let f = Arc::new(Feed {
                        run: run.clone(),
                        tx,
                        variations: StdMutex::new(BTreeSet::new()),
                        ready: OnceCell::new(),
                        clients: StdMutex::new(1),
                        ended: StdMutex::new(false),
                    });
                    feeds.insert(run.clone(), f.clone());
                    self.inner.metrics.watched_runs.inc();
                    (f, true)
                }
            }
        };
        let rx = feed.tx.subscribe();
        let watch = Watch {
            feed: feed.clone(),
            rx,
            hub: self.clone(),
        };
        feed.ready.get_or_init(|| self.init_feed(&feed)).await;
        if created {
            tokio::spawn(poll_phase(Arc::downgrade(&self.inner), feed.clone()));
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
        let mut vars = variations_from_state(&state);
        if vars.is_empty() {
            vars.insert(Variation::default_name());
        }
        let vars: Vec<Variation> = vars.into_iter().collect();
        let mut channels = Vec::new();
        for v in &vars {
            channels.push(StreamName::Output(v.clone()).key(&feed.run));
            channels.push(StreamName::Logs(v.clone()).key(&feed.run));
        }
        self.subscribe(channels).await;
        lock(&feed.variations).extend(vars);
    }

    /// Makes sure the feed carries a variation's channels (subscribed before this returns).
    pub async fn ensure_variation(&self, feed: &Arc<Feed>, v: &Variation) {
        if lock(&feed.variations).contains(v) {
            return;
        }
        self.subscribe(vec![
            StreamName::Output(v.clone()).key(&feed.run),
            StreamName::Logs(v.clone()).key(&feed.run),
        ])
        .await;
        let new = lock(&feed.variations).insert(v.clone());
        if new {
            let _ = feed.tx.send(Arc::new(FeedItem::Variation(v.clone())));
        } else {
            // Someone else added it meanwhile and holds the subscription reference.
            self.unsubscribe(vec![
                StreamName::Output(v.clone()).key(&feed.run),
                StreamName::Logs(v.clone()).key(&feed.run),
            ])
            .await;
        }
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
        if let Some(sink) = subs.sink.as_mut()
            && let Err(e) = sink.subscribe(&new).await
        {
            // The connection task notices the drop, re-subscribes everything and resyncs.
            // If the connection dropped, the connection task re-subscribes everything in
            // `refs` and tells every feed to resync.
            tracing::warn!(error = %e, "could not subscribe run channels; will re-subscribe after reconnecting");
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
        if let Some(sink) = subs.sink.as_mut()
            && let Err(e) = sink.unsubscribe(&gone).await
        {
            tracing::debug!(error = %e, "could not unsubscribe; the connection is being re-opened");
        }
    }

    /// Tells every open stream that the relay is stopping.
    pub fn shutdown(&self) {
        let feeds: Vec<Arc<Feed>> = lock(&self.inner.feeds).values().cloned().collect();
        for feed in feeds {
            let _ = feed.tx.send(Arc::new(FeedItem::Shutdown));
        }
    }

    /// Number of channels currently subscribed (for tests and metrics).
    pub async fn subscribed_channels(&self) -> usize {
        self.inner.subs.lock().await.refs.len()
    }
}

impl HubInner {
    fn dispatch(self: &Arc<Self>, channel: &str, payload: &[u8]) {
        let Some((run, stream)) = StreamName::parse(channel) else {
            return;
        };
        let Some(feed) = lock(&self.feeds).get(&run).cloned() else {
            return;
        };
        let entry = match LiveMessage::decode(payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(%run, channel, error = %e, "ignoring a malformed live message");
                return;
            }
        };
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
                        tokio::spawn(async move { hub.ensure_variation(&feed, &v).await });
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
        let _ = feed.tx.send(Arc::new(FeedItem::Entry {
            stream,
            entry,
            event: std::sync::OnceLock::new(),
        }));
    }
}

/// Reads the run's `phase` and tells the clients once it is final.
async fn check_phase(inner: &HubInner, feed: &Arc<Feed>) -> bool {
    if *lock(&feed.ended) {
        return true;
    }
    let mut conn = inner.conn.clone();
    let phase: Option<String> = match redis::cmd("HGET")
        .arg(feed.run.state_key())
        .arg("phase")
        .query_async(&mut conn)
        .await
    {
        Ok(p) => p,
        Err(_) => return false,
    };
    let Some(state) =
        phase.and_then(|p| serde_json::from_value::<RunState>(serde_json::Value::String(p)).ok())
    else {
        return false;
    };
    if state.is_final() {
        let first = {
            let mut ended = lock(&feed.ended);
            !std::mem::replace(&mut *ended, true)
        };
        if first {
            let _ = feed.tx.send(Arc::new(FeedItem::Ended(state)));
        }
        return true;
    }
    false
}

async fn poll_phase(hub: std::sync::Weak<HubInner>, feed: Arc<Feed>) {
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

async fn run_pubsub(hub: std::sync::Weak<HubInner>, mut stream: redis::aio::PubSubStream) {
    loop {
        while let Some(msg) = stream.next().await {
            let Some(inner) = hub.upgrade() else { return };
            inner.dispatch(msg.get_channel_name(), msg.get_payload_bytes());
        }
        // The connection is gone: re-open it, re-subscribe and make every client catch up.
        let Some(inner) = hub.upgrade() else { return };
        inner.subs.lock().await.sink = None;
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
                        subs.sink = Some(sink);
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
            let _ = feed.tx.send(Arc::new(FeedItem::Resync));
        }
    }
}

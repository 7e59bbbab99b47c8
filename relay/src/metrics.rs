//! Prometheus metrics of the relay, served at `/metrics`.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open SSE connections.
    pub connections: IntGauge,
    /// Runs with at least one SSE client (each has its Redis channel subscriptions).
    pub watched_runs: IntGauge,
    /// Events written to SSE clients, by source (`live` fan-out or `replay` from a stream).
    pub events_sent: IntCounterVec,
    /// Times a client read too slowly, overran its bounded queue and was switched to replay.
    pub slow_client_fallbacks: IntCounter,
    /// Times the shared Pub/Sub connection was re-opened after Redis went away.
    pub redis_reconnects: IntCounter,
    /// Control messages accepted and published.
    pub control_messages: IntCounter,
    /// Trimmed-history notices sent to clients.
    pub trimmed_notices: IntCounter,
    /// Reviews sent to the Kubernetes API server, by kind (`token`, `access`).
    pub auth_reviews: IntCounterVec,
    /// Authentication and authorization answers taken from the cache.
    pub auth_cache_hits: IntCounter,
    /// Times the tokens file was read again after a change, by result (`ok`, `error`).
    pub tokens_reloads: IntCounterVec,
    /// Announcements dropped because the relay fell behind; their runs' clients read them
    /// from the streams instead.
    pub live_shed: IntCounter,
    /// Bytes of announcements taken off the Pub/Sub connection, not yet handed to the feeds.
    pub pubsub_buffer_bytes: IntGauge,
    /// Bytes of replay pages held by all connections.
    pub replay_bytes: IntGauge,
    /// `reset` events sent: a client's position was not valid in the run's current history.
    pub resets: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace("agentrun_relay");
        let connections =
            IntGauge::with_opts(opts("connections", "Open SSE connections")).expect("valid metric");
        let watched_runs = IntGauge::with_opts(opts(
            "watched_runs",
            "Runs with at least one SSE client on this relay",
        ))
        .expect("valid metric");
        let events_sent = IntCounterVec::new(
            opts(
                "events_sent_total",
                "Events written to SSE clients, by source (live or replay)",
            ),
            &["source"],
        )
        .expect("valid metric");
        let slow_client_fallbacks = IntCounter::with_opts(opts(
            "slow_client_fallbacks_total",
            "Clients that overran their bounded live queue and were switched to replay from the stream",
        ))
        .expect("valid metric");
        let redis_reconnects = IntCounter::with_opts(opts(
            "redis_reconnects_total",
            "Times the shared Pub/Sub connection was re-opened",
        ))
        .expect("valid metric");
        let control_messages =
            IntCounter::with_opts(opts("control_messages_total", "Control messages published"))
                .expect("valid metric");
        let trimmed_notices = IntCounter::with_opts(opts(
            "trimmed_notices_total",
            "Trimmed-history notices sent to clients",
        ))
        .expect("valid metric");
        let auth_reviews = IntCounterVec::new(
            opts(
                "auth_reviews_total",
                "TokenReviews (kind=token) and SubjectAccessReviews (kind=access) sent to the Kubernetes API server",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let auth_cache_hits = IntCounter::with_opts(opts(
            "auth_cache_hits_total",
            "Token and access review answers taken from the cache",
        ))
        .expect("valid metric");
        let tokens_reloads = IntCounterVec::new(
            opts(
                "tokens_reloads_total",
                "Times a changed tokens file was read again, by result (ok, error)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let live_shed = IntCounter::with_opts(opts(
            "live_shed_total",
            "Live announcements dropped because the relay fell behind; clients read them from the streams",
        ))
        .expect("valid metric");
        let pubsub_buffer_bytes = IntGauge::with_opts(opts(
            "pubsub_buffer_bytes",
            "Bytes of live announcements waiting to be handed to the feeds",
        ))
        .expect("valid metric");
        let replay_bytes = IntGauge::with_opts(opts(
            "replay_bytes",
            "Bytes of replay pages held by all SSE connections",
        ))
        .expect("valid metric");
        let resets = IntCounter::with_opts(opts(
            "resets_total",
            "reset events sent: a client's position was not valid in the run's current history",
        ))
        .expect("valid metric");
        // Every label shows from the start (0), so that a rate over them is defined.
        for kind in ["token", "access"] {
            auth_reviews.with_label_values(&[kind]);
        }
        for result in ["ok", "error"] {
            tokens_reloads.with_label_values(&[result]);
        }
        for c in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(watched_runs.clone()),
            Box::new(events_sent.clone()),
            Box::new(slow_client_fallbacks.clone()),
            Box::new(redis_reconnects.clone()),
            Box::new(control_messages.clone()),
            Box::new(trimmed_notices.clone()),
            Box::new(auth_reviews.clone()),
            Box::new(auth_cache_hits.clone()),
            Box::new(tokens_reloads.clone()),
            Box::new(live_shed.clone()),
            Box::new(pubsub_buffer_bytes.clone()),
            Box::new(replay_bytes.clone()),
            Box::new(resets.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            registry,
            connections,
            watched_runs,
            events_sent,
            slow_client_fallbacks,
            redis_reconnects,
            control_messages,
            trimmed_notices,
            auth_reviews,
            auth_cache_hits,
            tokens_reloads,
            live_shed,
            pubsub_buffer_bytes,
            replay_bytes,
            resets,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "could not encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

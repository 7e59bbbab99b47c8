//! Prometheus figures of the archiver, and the small HTTP server for `/metrics`, `/healthz`
//! and `/readyz`.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Runs whose archive this archiver completed (or found complete).
    pub runs_archived: IntCounter,
    /// Requests for runs Redis held nothing of.
    pub runs_empty: IntCounter,
    /// Failed attempts, by kind of failure (`redis`, `store`, `corrupt`...).
    pub attempt_failures: IntCounterVec,
    /// Requests sent to the dead-letter stream.
    pub dead_lettered: IntCounter,
    /// Requests taken over from another archiver with XAUTOCLAIM.
    pub claimed: IntCounter,
    pub entries_archived: IntCounter,
    /// Content bytes read from Redis into archives.
    pub content_bytes: IntCounter,
    /// Compressed bytes written to the store.
    pub stored_bytes: IntCounter,
    pub archive_seconds: Histogram,
    pub in_progress: IntGauge,
    /// Entries in the queue (waiting or being archived).
    pub queue_length: IntGauge,
    /// Entries delivered to an archiver and not yet acknowledged.
    pub queue_pending: IntGauge,
    /// Entries on the dead-letter stream.
    pub dead_letters: IntGauge,
    pub ready: Arc<AtomicBool>,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("metric")
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("agentrun_archiver".into()), None).unwrap_or_default();
        let m = Self {
            runs_archived: counter("runs_archived_total", "Runs whose archive is complete"),
            runs_empty: counter(
                "runs_empty_total",
                "Archive requests for runs that Redis held nothing of",
            ),
            attempt_failures: IntCounterVec::new(
                Opts::new(
                    "attempt_failures_total",
                    "Failed attempts to archive a run, by kind",
                ),
                &["kind"],
            )
            .expect("metric"),
            dead_lettered: counter(
                "dead_lettered_total",
                "Archive requests sent to the dead-letter stream",
            ),
            claimed: counter(
                "claimed_total",
                "Archive requests taken over from a stopped archiver",
            ),
            entries_archived: counter("entries_archived_total", "Stream entries archived"),
            content_bytes: counter(
                "content_bytes_total",
                "Content bytes read from Redis into archives",
            ),
            stored_bytes: counter(
                "stored_bytes_total",
                "Compressed bytes written to the object store",
            ),
            archive_seconds: Histogram::with_opts(
                HistogramOpts::new("archive_duration_seconds", "Time to archive one run").buckets(
                    vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
                ),
            )
            .expect("metric"),
            in_progress: gauge("runs_in_progress", "Runs being archived by this archiver"),
            queue_length: gauge("queue_length", "Entries in the archive queue"),
            queue_pending: gauge(
                "queue_pending",
                "Archive requests delivered to an archiver and not yet done",
            ),
            dead_letters: gauge("dead_letters", "Entries on the dead-letter stream"),
            ready: Arc::new(AtomicBool::new(false)),
            registry,
        };
        for c in [
            Box::new(m.runs_archived.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.runs_empty.clone()),
            Box::new(m.attempt_failures.clone()),
            Box::new(m.dead_lettered.clone()),
            Box::new(m.claimed.clone()),
            Box::new(m.entries_archived.clone()),
            Box::new(m.content_bytes.clone()),
            Box::new(m.stored_bytes.clone()),
            Box::new(m.archive_seconds.clone()),
            Box::new(m.in_progress.clone()),
            Box::new(m.queue_length.clone()),
            Box::new(m.queue_pending.clone()),
            Box::new(m.dead_letters.clone()),
        ] {
            let _ = m.registry.register(c);
        }
        m
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub fn router(metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Metrics>| async move { m.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Metrics>| async move {
                if m.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: waiting for Redis to create the archive queue's consumer group",
                    )
                }
            }),
        )
        .with_state(metrics)
}

/// Serves the router on `addr`; returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(metrics)).await;
    });
    Ok(local)
}

//! Prometheus metrics of the operator.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::crd::RunPhase;

/// The operator's metrics, registered in their own registry.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub runs: IntGaugeVec,
    pub pods_created: IntCounter,
    phases: Mutex<HashMap<String, RunPhase>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Only if the metric definitions are invalid (a programming error caught by the tests).
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "agentrun_operator_reconciles_total",
                "Reconciliations of AgentRuns, by result (ok or an error kind)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "agentrun_operator_reconcile_duration_seconds",
                "How long one reconciliation of an AgentRun took",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid metric");
        let runs = IntGaugeVec::new(
            Opts::new(
                "agentrun_operator_runs",
                "AgentRuns known to the operator, by phase",
            ),
            &["phase"],
        )
        .expect("valid metric");
        let pods_created = IntCounter::new(
            "agentrun_operator_pods_created_total",
            "Agent pods created by the operator",
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_duration.clone()),
            Box::new(runs.clone()),
            Box::new(pods_created.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        for phase in RunPhase::ALL {
            runs.with_label_values(&[phase.as_str()]).set(0);
        }
        Self {
            registry,
            reconciles,
            reconcile_duration,
            runs,
            pods_created,
            phases: Mutex::new(HashMap::new()),
        }
    }

    /// Starts timing a reconciliation; the time is recorded when the guard drops.
    pub fn count_and_measure(&self) -> ReconcileTimer<'_> {
        ReconcileTimer {
            metrics: self,
            start: Instant::now(),
        }
    }

    /// Counts a reconciliation result.
    pub fn reconciled(&self, result: &str) {
        self.reconciles.with_label_values(&[result]).inc();
    }

    /// Records the phase of a run (None when the run is gone).
    pub fn set_phase(&self, key: &str, phase: Option<RunPhase>) {
        let Ok(mut phases) = self.phases.lock() else {
            return;
        };
        match phase {
            Some(p) => {
                phases.insert(key.to_string(), p);
            }
            None => {
                phases.remove(key);
            }
        }
        for p in RunPhase::ALL {
            let n = phases.values().filter(|v| **v == p).count() as i64;
            self.runs.with_label_values(&[p.as_str()]).set(n);
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Records the reconcile duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .observe(self.start.elapsed().as_secs_f64());
    }
}

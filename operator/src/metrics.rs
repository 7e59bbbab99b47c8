//! Prometheus metrics of the operator.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use agentrun_protocol::telemetry::MetricRegistry;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGaugeVec};

use crate::crd::RunPhase;

/// The operator's metrics, registered in their own registry.
pub struct Metrics {
    pub registry: MetricRegistry,
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
        let registry = MetricRegistry::new("agentrun_operator");
        let reconciles = registry.counter_vec(
            "reconciles_total",
            "Reconciliations of AgentRuns, by result (ok or an error kind)",
            "result",
            &[],
        );
        let reconcile_duration = registry.histogram(
            "reconcile_duration_seconds",
            "How long one reconciliation of an AgentRun took",
            &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
        );
        let phases: Vec<&str> = RunPhase::ALL.iter().map(|p| p.as_str()).collect();
        let runs = registry.gauge_vec(
            "runs",
            "AgentRuns known to the operator, by phase",
            "phase",
            &phases,
        );
        let pods_created =
            registry.counter("pods_created_total", "Agent pods created by the operator");
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
        self.registry.render()
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

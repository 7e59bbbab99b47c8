//! The operator's HTTP endpoints: `/metrics`, `/healthz` (the process is alive) and `/readyz`
//! (the CRD was found and this replica is either leading or waiting as a standby).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use agentrun_protocol::telemetry::{Health, health_router};
use axum::Router;

use crate::metrics::Metrics;

/// State shared between the controller and the HTTP server.
#[derive(Clone)]
pub struct ServerState {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
}

impl Health for ServerState {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    fn not_ready(&self) -> Option<&'static str> {
        (!self.ready.load(Ordering::SeqCst))
            .then_some("starting: checking that the AgentRun CRD is installed")
    }
}

/// The router; served by `main`, and by tests on `127.0.0.1:0`.
pub fn app(state: ServerState) -> Router {
    health_router(state)
}

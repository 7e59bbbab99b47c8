//! agentrun-relay: streams runs from Redis to browsers and the kubectl plugin over
//! Server-Sent Events, with replay and resume, and forwards control messages to the agents.

pub mod ui;

use axum::Router;

/// Shared state of the relay's handlers.
#[derive(Clone, Default)]
pub struct AppState {}

/// The relay's HTTP application: API routes merged with the web UI.
pub fn app(state: AppState) -> Router {
    Router::new().merge(crate::ui::router()).with_state(state)
}

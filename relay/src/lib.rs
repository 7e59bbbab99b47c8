//! agentrun-relay: streams runs from Redis to browsers and the kubectl plugin over
//! Server-Sent Events, with replay and resume, and forwards control messages to the agents.
//!
//! Along the message path: [`hub`] holds one Pub/Sub subscription per watched run and fans
//! its live entries out to that run's connections (on a Redis Cluster through [`shards`]:
//! sharded subscriptions on each run's master); [`events`] serves `GET
//! /api/runs/{run}/events`, replaying each stream from the client's [`cursor`] and then
//! following the hub's feed; [`sse`] writes the SSE text (the events of
//! [`agentrun_protocol::sse`]). Around it:
//! [`api`] (run summary, control, health), [`listing`] (the run list, live and archived), [`archive`] (runs Redis has let go,
//! read from their archive) and [`archived`] (serving them), [`download`] (a variation's output as a file), [`output`] (ranges
//! of a variation's output by entry or line, and search across it; read with [`paging`]),
//! [`query`] (what a request for events asks for), [`auth`] and [`kube_auth`] (who may see and
//! steer a run), [`cors`], [`limits`] (per
//! client and global caps), [`budget`] and [`ring`] (byte-bounded buffers), [`ui`] (the web
//! page), [`metrics`]. [`config`] holds the flags, [`state`] what every handler shares,
//! [`error`] the one error type handlers answer with, [`server`] the HTTP server (HTTP/1.1,
//! and HTTP/2 over [`tls`]).
//! `docs/relay.md` describes the endpoints, the cursor and the events.

pub mod api;
pub mod archive;
pub mod archived;
pub mod auth;
pub mod budget;
pub mod config;
pub mod cors;
pub mod cursor;
pub mod download;
pub mod error;
pub mod events;
pub mod hub;
pub mod kube_auth;
pub mod limits;
pub mod listing;
pub mod metrics;
pub mod output;
pub mod paging;
pub mod query;
pub mod ring;
pub mod server;
pub mod shards;
pub mod sse;
pub mod state;
pub mod tls;
pub mod ui;

pub use config::{Config, Limits};
pub use server::{serve, serve_tls};
pub use state::{AppState, RelayState};

use axum::Router;
use axum::routing::{get, post};

/// The relay's HTTP application: API routes merged with the web UI.
///
/// The `/api` routes pass through [`cors::layer`] and [`auth::layer`]; `/metrics`, `/healthz`, `/readyz` and the
/// UI's static files do not (they hold no run data). Every route passes through
/// [`limits::layer`] (in-flight cap, body size).
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/runs", get(api::list_runs))
        .route("/api/runs/{run}", get(api::get_run))
        .route("/api/runs/{run}/events", get(events::events))
        .route("/api/runs/{run}/control", post(api::control))
        .route(
            "/api/runs/{run}/variations/{variation}/output",
            get(download::output),
        )
        .route(
            "/api/runs/{run}/variations/{variation}/output/range",
            get(output::range),
        )
        .route(
            "/api/runs/{run}/variations/{variation}/output/search",
            get(output::search),
        )
        .route(
            "/api/session",
            post(auth::create_session).delete(auth::delete_session),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::layer,
        ))
        // Outside authentication: preflight requests carry no credentials.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cors::layer,
        ));
    Router::new()
        .merge(api)
        .route("/metrics", get(api::metrics))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .merge(crate::ui::router())
        .layer(axum::extract::DefaultBodyLimit::max(
            state.limiter.settings.max_body_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::layer,
        ))
        .with_state(state)
}

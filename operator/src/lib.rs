//! agentrun operator: reconciles `AgentRun` resources into agent pods with the agentrun sidecar.
//!
//! Small modules with one job each: [`crd`] (the resource types), [`pod`] (building pods, pure),
//! [`status`] (deriving status from pods, pure), [`controller`] (reconcile with a finalizer),
//! [`store`] (what goes to Redis), [`metrics`], [`leader`] (Lease-based leader election),
//! [`server`] (/metrics, /healthz, /readyz), [`telemetry`].
pub mod config;
pub mod controller;
pub mod crd;
pub mod error;
#[cfg(test)]
pub mod fixtures;
pub mod leader;
pub mod metrics;
pub mod pod;
pub mod server;
pub mod status;
pub mod store;
pub mod telemetry;

pub use error::{Error, Result};

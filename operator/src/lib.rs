//! agentrun operator: reconciles `AgentRun` resources into agent pods with the agentrun sidecar.
//!
//! Small modules with one job each: [`crd`] (the resource types), [`pod`] (building pods, pure),
//! [`status`] (deriving status from pods, pure), [`refusal`] (why the API server refused a pod or
//! Secret, pure), [`controller`] (reconcile with a finalizer), [`store`] (what goes to Redis), [`run_users`]
//! (the runs' Redis users on every node),
//! [`metrics`], [`leader`] (Lease-based leader election), [`preflight`] (start-up checks:
//! version, permissions, CRD), [`config`] (the operator's settings), [`args`] (its flags),
//! [`server`] (/metrics, /healthz, /readyz), and [`run`], which starts them in order.
pub mod args;
pub mod config;
pub mod controller;
pub mod crd;
pub mod error;
#[cfg(test)]
pub mod fixtures;
pub mod leader;
pub mod metrics;
pub mod pod;
pub mod preflight;
pub mod refusal;
pub mod run;
pub mod run_users;
pub mod server;
pub mod status;
pub mod store;

pub use error::{Error, Result};

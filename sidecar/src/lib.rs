//! The agentrun sidecar and entrypoint.
//!
//! `agentrun-entrypoint` runs inside the agent container: it starts the agent, captures its
//! stdout and stderr byte-exact ([`chunker`]), and hands the chunks to the sidecar over a Unix
//! socket ([`frame`]), spooling to the shared volume while the sidecar is away ([`spool`]).
//! `agentrun-sidecar` publishes them to Redis ([`server`]) and carries control messages back.
//! [`local`] runs both in one process, with no Kubernetes. [`auth`] keeps the agent, which runs
//! as the entrypoint's user, from speaking for the entrypoint.

pub mod auth;
pub mod chunker;
pub mod entrypoint;
pub mod frame;
pub mod local;
pub mod metrics;
pub mod server;
pub mod spool;

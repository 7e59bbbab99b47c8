//! `agentrun-sidecar run`: the whole path in one process on a laptop. Starts a sidecar on a
//! private socket, runs the agent through the entrypoint logic, and exits with its exit code.

use crate::auth::{Key, KeyFileError};
use crate::entrypoint::{self, EntrypointConfig};
use crate::server::{Sidecar, SidecarConfig, SidecarError};
use agentrun_protocol::now_ms;
use agentrun_protocol::publish::{add_variation, register_run, settle_phase};
use std::ffi::OsString;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct LocalRun {
    pub sidecar: SidecarConfig,
    pub command: Vec<OsString>,
    pub stop_grace: Duration,
    pub tee: bool,
}

/// Runs the agent and returns its exit code.
pub async fn run(mut local: LocalRun) -> Result<i32, SidecarError> {
    local.sidecar.owns_run = true;
    if local.sidecar.fail_fast.is_none() {
        local.sidecar.fail_fast = Some(Duration::from_secs(5));
    }
    // Both ends are in this process: the key is passed in memory, nothing is handed off.
    let key = Key::generate().map_err(|source| KeyFileError::Unwritable {
        path: local.sidecar.socket.clone(),
        source,
    })?;
    local.sidecar.key = Some(key.clone());
    let sidecar_config = local.sidecar.clone();
    let sidecar = Sidecar::start(sidecar_config.clone()).await?;

    // Register the run so the relay lists it.
    if let Ok(mut conn) = sidecar_config.redis.connect().await {
        let run = &sidecar_config.run;
        let registered = async {
            register_run(
                &mut conn,
                run,
                now_ms(),
                &[(agentrun_protocol::state_hash::NAME, run.to_string())],
            )
            .await?;
            add_variation(&mut conn, run, &sidecar_config.variation).await?;
            settle_phase(&mut conn, run, now_ms()).await
        };
        if let Err(e) = registered.await {
            tracing::warn!(error = %e, "cannot register the run in Redis");
        }
    }

    let mut ep = EntrypointConfig::new(sidecar_config.socket.clone(), local.command);
    ep.spool_dir = sidecar_config.spool_dir.clone();
    ep.stop_grace = local.stop_grace;
    ep.tee = local.tee;
    ep.drain_timeout = sidecar_config.drain_timeout;
    ep.key = key;
    ep.sidecar_uid = Some(nix::unistd::geteuid().as_raw());
    let code = entrypoint::run(ep).await;
    let report = sidecar.shutdown().await;
    if report.undelivered_bytes > 0 {
        eprintln!(
            "agentrun-sidecar: {} bytes could not be delivered to Redis before the drain deadline; they remain in {}",
            report.undelivered_bytes,
            sidecar_config.spool_dir.display()
        );
    }
    Ok(code)
}

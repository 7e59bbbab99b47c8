//! The sidecar's key for the entrypoint, at start (see [`crate::auth`]).

use super::config::{SidecarConfig, SidecarError};
use crate::auth::{self, Key, KeyFileError, KeyOrigin};

/// The sidecar's key: from its state directory, or new and handed off (see [`crate::auth`]).
pub(crate) fn setup_key(config: &SidecarConfig) -> Result<Key, SidecarError> {
    if let Some(dir) = &config.state_dir
        && !dir.exists()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| KeyFileError::Unwritable {
                path: dir.clone(),
                source,
            })?;
    }
    let (key, origin) = auth::sidecar_key(config.state_dir.as_deref(), &config.handoff_file)?;
    match (origin, &config.state_dir) {
        (KeyOrigin::Restored, Some(dir)) => tracing::info!(
            state_dir = %dir.display(),
            "restarted: using the key from the state directory; the running entrypoint reconnects with it"
        ),
        (KeyOrigin::HandedOff, Some(_)) => tracing::info!(
            handoff = %config.handoff_file.display(),
            "left a one-time key for the entrypoint"
        ),
        (_, None) => tracing::warn!(
            handoff = %config.handoff_file.display(),
            "no --state-dir: the key for the entrypoint lives in this process only. If this sidecar restarts, it makes a new key that the running entrypoint does not have: the entrypoint is then refused and must be restarted too. Give the sidecar a private volume with --state-dir (AGENTRUN_STATE_DIR)"
        ),
    }
    Ok(key)
}

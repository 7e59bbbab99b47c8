//! Notices an entrypoint that runs but does not connect.
//!
//! A running entrypoint holds the lock of its spool file on the shared volume, so the sidecar
//! can tell that the agent container is up even when nothing arrives on the socket (a wrong
//! socket path, a volume mounted elsewhere, a socket the agent's user cannot open). When that
//! lasts [`AFTER`], the sidecar says so once per spool: in its own log and as a status event
//! of the variation, so the run's page and `kubectl agentrun` show why no output comes.

use super::publisher::ToPublish;
use super::state::SidecarState;
use crate::spool::live_spools;
use agentrun_protocol::{RunState, StatusEvent};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long a running entrypoint may stay unconnected before it is reported.
pub const AFTER: Duration = Duration::from_secs(10);
/// Reason of the status event.
pub const REASON: &str = "EntrypointNotConnected";

pub(super) async fn run(shared: Arc<SidecarState>, items: mpsc::Sender<ToPublish>) {
    let mut since: HashMap<PathBuf, Instant> = HashMap::new();
    let mut reported: HashSet<PathBuf> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let connected = shared.peer.lock().map(|p| p.is_some()).unwrap_or(true);
        let live = live_spools(&shared.config.spool_dir);
        since.retain(|p, _| live.contains(p));
        if connected {
            since.clear();
            continue;
        }
        let now = Instant::now();
        for path in live {
            let first = *since.entry(path.clone()).or_insert(now);
            if now.duration_since(first) < AFTER || !reported.insert(path.clone()) {
                continue;
            }
            let message = format!(
                "the agent's entrypoint is running (it holds {}) but has not connected to the sidecar on {} for {}s; its output waits in that spool. Its log says why: kubectl logs POD -c agent",
                path.display(),
                shared.config.socket.display(),
                AFTER.as_secs()
            );
            tracing::error!("{message}");
            let event = StatusEvent::new(Some(shared.config.variation.as_str()), RunState::Running)
                .reason(REASON)
                .message(message)
                .source("sidecar");
            shared.push_status(&items, event, true).await;
        }
    }
}

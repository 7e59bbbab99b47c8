//! Redis health while the agent is quiet.

use super::state::SidecarState;
use std::sync::Arc;
use std::time::Duration;

/// Notices an outage (and the end of one) while nothing is being published, so readiness and
/// the entrypoint's spooling decision follow Redis even when the agent is quiet.
pub(crate) async fn health_pinger(shared: Arc<SidecarState>) {
    let mut conn = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if conn.is_none() {
            conn = shared.config.redis.connect().await.ok();
        }
        let ok = match conn.as_mut() {
            Some(c) => redis::cmd("PING").query_async::<String>(c).await.is_ok(),
            None => false,
        };
        if !ok {
            conn = None;
            shared.set_redis_up(false);
        } else if shared.metrics.buffered_bytes.get() == 0 {
            shared.set_redis_up(true);
        }
    }
}

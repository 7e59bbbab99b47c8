//! Periodic figures of the variation (bytes in, entries published, buffered bytes, gaps, the
//! agent's CPU and memory) on the run's metrics stream, for the UI's figures panel.

use super::publisher::ToPublish;
use super::state::SidecarState;
use agentrun_protocol::{EntryType, StreamName};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Publishes the sidecar's figures on `run:{RUN}:metrics` every `metrics_interval`.
pub(crate) async fn metrics_ticker(shared: Arc<SidecarState>, items: mpsc::Sender<ToPublish>) {
    if shared.config.metrics_interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(shared.config.metrics_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        if !*shared.redis_up.borrow() {
            continue; // live figures are not worth buffering through an outage
        }
        let m = &shared.metrics;
        let figures = serde_json::json!({
            "variation": shared.config.variation.as_str(),
            "outputBytes": m.bytes_in.with_label_values(&["output"]).get(),
            "logsBytes": m.bytes_in.with_label_values(&["logs"]).get(),
            "entriesPublished": m.entries_published.get(),
            "bufferedBytes": m.buffered_bytes.get(),
            "publishErrors": m.publish_errors.get(),
            "gapBytes": m.gap_bytes.get(),
            "agentCpuMillis": m.agent_cpu_millis.get(),
            "agentMemoryBytes": m.agent_rss_bytes.get(),
        });
        let content = figures.to_string();
        if !shared
            .push_own(
                &items,
                StreamName::Metrics,
                EntryType::Metrics,
                content,
                None,
            )
            .await
        {
            return;
        }
    }
}

//! Reads `run:{RUN}:control` and hands the messages meant for this variation to the
//! entrypoint, each until the entrypoint acknowledges it.
//!
//! The control stream is the queue: the sidecar subscribes to the channel (only to learn that
//! there is something new), then reads the stream from where it is. At most [`WINDOW`]
//! messages (and [`WINDOW_BYTES`] of them) are held in memory, sent to the entrypoint or
//! waiting for one to connect; the rest wait in the stream, and are read as the entrypoint
//! acknowledges what it has. The state hash's `control:VAR` records how far every message is
//! dealt with (meant for another variation, or acknowledged by the entrypoint), so a restarted
//! sidecar starts from there; the entrypoint applies each seq at most once, so a message sent
//! again after a restart is not applied twice. Nothing is dropped silently: messages removed
//! from the stream (its length cap) before they could be delivered are reported on the status
//! stream (`ControlTrimmed`).

use super::publisher::{Backoff, ToPublish};
use super::state::{SidecarState, lock};
use agentrun_protocol::replay::read_page;
use agentrun_protocol::{ControlMessage, Entry, StreamName};
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Control messages held in memory for the entrypoint at most.
pub const WINDOW: usize = 64;
/// Bytes of control messages held in memory at most (one message is always taken).
pub const WINDOW_BYTES: usize = 1024 * 1024;
/// Reason of the status event that reports trimmed control messages.
pub const TRIMMED_REASON: &str = "ControlTrimmed";

/// The control messages for this variation taken from the stream and not yet acknowledged.
#[derive(Default)]
pub(crate) struct Queue {
    pending: VecDeque<(u64, ControlMessage, usize)>,
    bytes: usize,
    /// Every control entry up to this seq has been read (and is pending, acknowledged, or
    /// meant for another variation).
    read_to: u64,
    /// Whether `read_to` was loaded from the state hash.
    loaded: bool,
}

impl Queue {
    fn has_room(&self, size: usize) -> bool {
        self.pending.is_empty()
            || (self.pending.len() < WINDOW && self.bytes + size <= WINDOW_BYTES)
    }

    /// Every control message up to this seq is dealt with.
    fn marker(&self) -> u64 {
        self.pending
            .front()
            .map_or(self.read_to, |(seq, _, _)| seq - 1)
    }

    /// The messages to send to a newly connected entrypoint, in order.
    pub(crate) fn unacknowledged(&self) -> impl Iterator<Item = (u64, &ControlMessage)> {
        self.pending.iter().map(|(seq, msg, _)| (*seq, msg))
    }
}

/// The entrypoint has every control message up to `seq`.
pub(crate) fn acknowledged(shared: &SidecarState, seq: u64) {
    let mut q = lock(&shared.control);
    while q.pending.front().is_some_and(|(s, _, _)| *s <= seq) {
        if let Some((_, _, size)) = q.pending.pop_front() {
            q.bytes -= size;
        }
    }
    shared.metrics.control_pending.set(q.pending.len() as i64);
    drop(q);
    shared.control_acked.notify_one();
}

/// Takes one entry of the control stream; `false` when there is no room for it now (it is
/// read again later).
fn take(shared: &SidecarState, entry: &Entry) -> bool {
    let mut q = lock(&shared.control);
    match ControlMessage::parse(&entry.content) {
        Ok(msg) if msg.targets(shared.config.variation.as_str()) => {
            let size = entry.content.len();
            if !q.has_room(size) {
                return false;
            }
            tracing::info!(action = %msg.action, seq = entry.seq, "control message");
            shared.metrics.control_messages.inc();
            q.pending.push_back((entry.seq, msg.clone(), size));
            q.bytes += size;
            q.read_to = entry.seq;
            shared.metrics.control_pending.set(q.pending.len() as i64);
            // Sent under the queue's lock: a peer that connects now gets it exactly once from
            // here or from the queue.
            shared.send_to_peer(
                &crate::frame::Frame::Control {
                    seq: entry.seq,
                    msg,
                },
                None,
            );
        }
        Ok(_) => q.read_to = entry.seq,
        Err(e) => {
            tracing::warn!(seq = entry.seq, error = %e, "ignoring an invalid control message");
            q.read_to = entry.seq;
        }
    }
    true
}

fn seq_range(first: u64, last: u64) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

pub(crate) async fn subscribe(shared: Arc<SidecarState>, items: mpsc::Sender<ToPublish>) {
    let config = &shared.config;
    let key = StreamName::Control.key(&config.run);
    let marker_field = format!("control:{}", config.variation);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut recorded: Option<u64> = None;
    loop {
        let attempt = async {
            let mut pubsub = config.redis.pubsub().await.map_err(|e| e.to_string())?;
            pubsub.subscribe(&key).await.map_err(|e| e.to_string())?;
            let mut conn = config.redis.connect().await.map_err(|e| e.to_string())?;
            if !lock(&shared.control).loaded {
                let stored: Option<u64> = redis::cmd("HGET")
                    .arg(config.run.state_key())
                    .arg(&marker_field)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut q = lock(&shared.control);
                q.read_to = stored.unwrap_or(0);
                q.loaded = true;
                recorded = stored;
            }
            let mut messages = pubsub.into_on_message();
            backoff.reset();
            loop {
                // Read what there is room for.
                'read: loop {
                    let after = lock(&shared.control).read_to;
                    let page = read_page(&mut conn, &key, after, 256)
                        .await
                        .map_err(|e| e.to_string())?;
                    if let Some(t) = page.trimmed {
                        let lost = t.first_available - t.wanted;
                        let message = format!(
                            "{lost} control message(s) of the run (seq {}) were removed from {key} (its length cap) before this sidecar could deliver them; those meant for this variation were not applied",
                            seq_range(t.wanted, t.first_available - 1)
                        );
                        tracing::error!("{message}");
                        shared.notice(&items, TRIMMED_REASON, message).await;
                        lock(&shared.control).read_to = t.first_available - 1;
                    }
                    if page.entries.is_empty() {
                        break;
                    }
                    for entry in &page.entries {
                        if !take(&shared, entry) {
                            break 'read;
                        }
                    }
                }
                let marker = lock(&shared.control).marker();
                if recorded != Some(marker) {
                    let _: () = redis::cmd("HSET")
                        .arg(config.run.state_key())
                        .arg(&marker_field)
                        .arg(marker)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    recorded = Some(marker);
                }
                // Wait for news: a new message, or room after an acknowledgement.
                tokio::select! {
                    msg = messages.next() => if msg.is_none() {
                        return Err::<(), String>("the control subscription ended".into());
                    },
                    _ = shared.control_acked.notified() => {}
                }
            }
        };
        if let Err(e) = attempt.await {
            tracing::debug!(error = %e, "control subscription interrupted; resubscribing");
        }
        tokio::time::sleep(backoff.delay()).await;
    }
}

//! Reads `run:{RUN}:control` and hands the messages meant for this variation to the
//! entrypoint, each until the entrypoint acknowledges it.
//!
//! The control stream is the queue: the sidecar subscribes to the channel (only to learn that
//! there is something new), then reads the stream from where it is. At most
//! [`WINDOW`](super::control_queue::WINDOW) messages (and
//! [`WINDOW_BYTES`](super::control_queue::WINDOW_BYTES) of them) are held in memory, sent to
//! the entrypoint or waiting for one to connect; the rest wait in the stream, and are read as the entrypoint
//! acknowledges what it has. The state hash's `control:VAR` records how far every message is
//! dealt with (meant for another variation, or acknowledged by the entrypoint), so a restarted
//! sidecar starts from there; the entrypoint applies each seq at most once, so a message sent
//! again after a restart is not applied twice. Nothing is dropped silently: messages removed
//! from the stream (its length cap) before they could be delivered are reported on the status
//! stream (`ControlTrimmed`).

use super::publisher::{Backoff, ToPublish};
use super::state::{SidecarState, lock};
use agentrun_protocol::replay::read_page;
use agentrun_protocol::{ControlError, ControlMessage, Entry, StreamName};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Reason of the status event that reports trimmed control messages.
pub const TRIMMED_REASON: &str = "ControlTrimmed";

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

/// Reads the content of a control entry: the message when it is meant for `variation`, `None`
/// when it is meant for another one, an error when it is not a valid message (or larger than
/// [`agentrun_protocol::MAX_CONTROL_BYTES`], which could not reach the entrypoint).
fn read_entry(content: &[u8], variation: &str) -> Result<Option<ControlMessage>, ControlError> {
    ControlMessage::parse(content).map(|msg| msg.targets(variation).then_some(msg))
}

/// Takes one entry of the control stream; `false` when there is no room for it now (it is
/// read again later).
fn take(shared: &SidecarState, entry: &Entry) -> bool {
    let mut q = lock(&shared.control);
    match read_entry(&entry.content, shared.config.variation.as_str()) {
        Ok(Some(msg)) => {
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
        Ok(None) => q.read_to = entry.seq,
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
    let marker_field = agentrun_protocol::state_hash::control_field(&config.variation);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut recorded: Option<u64> = None;
    loop {
        let attempt = async {
            let mut messages = config
                .redis
                .subscribe(&key)
                .await
                .map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;
    use agentrun_protocol::{ControlAction, MAX_CONTROL_BYTES};
    use proptest::prelude::*;

    proptest! {
        /// Whatever a control entry holds (arbitrary bytes, or a message meant for any
        /// variation), reading it never panics: an invalid entry is an error (skipped), a valid
        /// one is taken exactly when it is meant for this variation, and what is taken is the
        /// message sent, in a frame the entrypoint reads back.
        #[test]
        fn any_control_entry_is_taken_skipped_or_refused_never_a_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..128),
            msg in crate::frame::tests::control_message(),
            variation in prop_oneof![Just("a".to_owned()), "[a-z0-9-]{1,8}"],
            seq in any::<u64>(),
        ) {
            let _ = read_entry(&bytes, &variation);
            let json = msg.to_json();
            let taken = read_entry(&json, &variation).unwrap();
            let meant = msg.variation.as_deref().is_none_or(|v| v == variation);
            prop_assert_eq!(taken.is_some(), meant);
            if let Some(taken) = taken {
                prop_assert_eq!(&taken, &msg);
                let frame = Frame::Control { seq, msg: taken }.to_bytes();
                let mut r = &frame[..];
                let back = futures::executor::block_on(Frame::read(&mut r)).unwrap();
                prop_assert_eq!(back, Some(Frame::Control { seq, msg }));
            }
        }
    }

    /// A control entry larger than the entrypoint could be sent (written to Redis by something
    /// other than the relay, which refuses it) is refused, not taken: taken, it would be sent
    /// in a frame the entrypoint refuses, again after every reconnection.
    #[test]
    fn an_oversize_control_entry_is_refused() {
        let mut msg = ControlMessage::new(ControlAction::Stdin);
        msg.data = Some("x".repeat(crate::frame::MAX_FRAME));
        assert!(matches!(
            read_entry(&msg.to_json(), "a"),
            Err(ControlError::TooLarge(_))
        ));
        msg.data = Some("x".repeat(MAX_CONTROL_BYTES / 2));
        assert!(read_entry(&msg.to_json(), "a").unwrap().is_some());
    }
}

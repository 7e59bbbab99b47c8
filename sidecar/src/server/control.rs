//! Listens on `run:{RUN}:control` and forwards the messages meant for this variation to the
//! entrypoint. Subscribes first, then reads the control stream from the last message applied,
//! so messages sent while the sidecar was away or Redis was down are applied too, once each.

use super::Shared;
use super::publisher::Backoff;
use agentrun_protocol::entry::LiveMessage;
use agentrun_protocol::replay::read_page;
use agentrun_protocol::{ControlMessage, Entry, StreamName};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

pub(crate) async fn subscribe(shared: Arc<Shared>) {
    let config = &shared.config;
    let key = StreamName::Control.key(&config.run);
    let marker = format!("control:{}", config.variation);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut applied: Option<u64> = None;
    loop {
        let attempt = async {
            let mut pubsub = config.redis.pubsub().await.map_err(|e| e.to_string())?;
            pubsub.subscribe(&key).await.map_err(|e| e.to_string())?;
            let mut conn = config.redis.connect().await.map_err(|e| e.to_string())?;
            if applied.is_none() {
                let stored: Option<u64> = redis::cmd("HGET")
                    .arg(config.run.state_key())
                    .arg(&marker)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                applied = Some(stored.unwrap_or(0));
            }
            // Catch up from the stream, then follow the channel.
            loop {
                let after = applied.unwrap_or(0);
                let page = read_page(&mut conn, &key, after, 256)
                    .await
                    .map_err(|e| e.to_string())?;
                if page.entries.is_empty() {
                    break;
                }
                for entry in page.entries {
                    apply(&shared, &mut conn, &marker, &mut applied, entry).await;
                }
            }
            backoff.reset();
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let Ok(payload) = msg.get_payload::<Vec<u8>>() else {
                    continue;
                };
                match LiveMessage::decode(&payload) {
                    Ok(entry) => apply(&shared, &mut conn, &marker, &mut applied, entry).await,
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed control message"),
                }
            }
            Err::<(), String>("the control subscription ended".into())
        };
        if let Err(e) = attempt.await {
            tracing::debug!(error = %e, "control subscription interrupted; resubscribing");
        }
        tokio::time::sleep(backoff.delay()).await;
    }
}

async fn apply(
    shared: &Arc<Shared>,
    conn: &mut agentrun_protocol::RedisConn,
    marker: &str,
    applied: &mut Option<u64>,
    entry: Entry,
) {
    if entry.seq <= applied.unwrap_or(0) {
        return;
    }
    *applied = Some(entry.seq);
    match ControlMessage::parse(&entry.content) {
        Ok(msg) if msg.targets(shared.config.variation.as_str()) => {
            tracing::info!(action = %msg.action, seq = entry.seq, "control message");
            shared.forward_control(msg);
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(seq = entry.seq, error = %e, "ignoring an invalid control message")
        }
    }
    let _: Result<(), _> = redis::cmd("HSET")
        .arg(shared.config.run.state_key())
        .arg(marker)
        .arg(entry.seq)
        .query_async(conn)
        .await;
}

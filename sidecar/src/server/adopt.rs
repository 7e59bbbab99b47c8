//! Adopting spools whose entrypoint has exited: publish them, then remove them.
//!
//! A spool is read one frame at a time and each frame waits for room in the sidecar's byte
//! budget like a frame from the socket, so a spool of any size is published in bounded memory.
//! A spool is removed only after Redis has everything queued before it (a barrier); at start
//! this runs beside serving, so a Redis outage never keeps the entrypoint waiting, and at
//! shutdown it is bounded by the drain deadline (an unfinished spool stays for the next
//! sidecar; Redis drops what is published twice).

use super::{Shared, frame_item};
use crate::server::publisher::Item;
use crate::spool::orphan_spools;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

pub(super) async fn adopt_orphans(
    shared: Arc<Shared>,
    items: mpsc::Sender<Item>,
    budget: Arc<Semaphore>,
    deadline: Option<Instant>,
) {
    for mut orphan in orphan_spools(&shared.config.spool_dir) {
        let already = shared
            .published_spools
            .lock()
            .map(|p| p.contains(&orphan.path))
            .unwrap_or(false);
        if already {
            continue;
        }
        let producer: Arc<str> = Arc::from(
            orphan
                .path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.strip_prefix("agentrun-spool-"))
                .unwrap_or("orphan"),
        );
        tracing::info!(path = %orphan.path.display(), "publishing a spool left by an entrypoint");
        let mut frames = 0u64;
        loop {
            let frame = match orphan.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(path = %orphan.path.display(), error = %e, frames, "cannot read the rest of a spool file; leaving it in place");
                    break;
                }
            };
            frames += 1;
            if let Some(item) = frame_item(&shared, &producer, frame, None, &budget).await
                && items.send(item).await.is_err()
            {
                return;
            }
        }
        let (tx, rx) = oneshot::channel();
        if items.send(Item::Barrier(tx)).await.is_err() {
            return;
        }
        let delivered = match deadline {
            Some(d) => tokio::time::timeout_at(d, rx)
                .await
                .is_ok_and(|r| r.is_ok()),
            None => rx.await.is_ok(),
        };
        if !delivered {
            tracing::warn!(path = %orphan.path.display(), "the drain deadline passed before Redis took a whole spool; it stays for the next sidecar");
            return;
        }
        let path = orphan.path.clone();
        if let Err(e) = orphan.remove() {
            tracing::warn!(path = %path.display(), error = %e, "published a spool but cannot remove it; this sidecar skips it from now on (a later one publishes it again and Redis drops the repeats)");
            if let Ok(mut p) = shared.published_spools.lock() {
                p.insert(path);
            }
        } else {
            tracing::info!(path = %path.display(), frames, "published and removed a spool");
        }
    }
}

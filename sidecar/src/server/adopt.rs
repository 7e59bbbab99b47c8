//! Adopting spools whose entrypoint has exited: publish them, then remove them.
//!
//! A spool is read one frame at a time and each frame waits for room in the sidecar's byte
//! budget like a frame from the socket, so a spool of any size is published in bounded memory.
//! A spool is removed only after Redis has everything queued before it (a barrier); at start
//! this runs beside serving, so a Redis outage never keeps the entrypoint waiting, and at
//! shutdown it is bounded by the drain deadline (an unfinished spool stays for the next
//! sidecar; Redis drops what is published twice).
//!
//! Every record of a spool is verified with the pod's key as it is read. The first one that
//! does not verify ends the spool: what came before it is published, nothing after; the file is
//! left in place, reported once (log and a `SpoolRefused` status event) and not read again by
//! this sidecar. The shared volume is writable by the agent, so this is what keeps a file it
//! dropped or changed from being published as the agent's output or status.

use super::SPOOL_REFUSED_REASON;
use super::ingest::ingest;
use super::publisher::ToPublish;
use super::state::{SidecarState, lock};
use crate::frame::FrameError;
use crate::spool::orphan_spools;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

pub(super) async fn adopt_orphans(
    shared: Arc<SidecarState>,
    items: mpsc::Sender<ToPublish>,
    budget: Arc<Semaphore>,
    deadline: Option<Instant>,
) {
    for mut orphan in orphan_spools(&shared.config.spool_dir) {
        let already = lock(&shared.published_spools).contains(&orphan.path)
            || lock(&shared.refused_spools).contains(&orphan.path);
        if already {
            continue;
        }
        let producer: Arc<str> = Arc::from(orphan.producer());
        tracing::info!(path = %orphan.path.display(), "publishing a spool left by an entrypoint");
        let mut frames = 0u64;
        let mut complete = true;
        loop {
            let frame = match orphan.next_frame(&shared.key) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(FrameError::Io(e)) => {
                    tracing::error!(path = %orphan.path.display(), error = %e, frames, "cannot read the rest of a spool file; leaving it in place");
                    complete = false;
                    break;
                }
                Err(e) => {
                    refuse(&shared, &items, &orphan.path, frames, &e).await;
                    complete = false;
                    break;
                }
            };
            frames += 1;
            if let Some(item) = ingest(&shared, &producer, frame, None, &budget).await
                && items.send(item).await.is_err()
            {
                return;
            }
        }
        if !complete {
            continue;
        }
        let (tx, rx) = oneshot::channel();
        if items.send(ToPublish::Barrier(tx)).await.is_err() {
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
            lock(&shared.published_spools).insert(path);
        } else {
            tracing::info!(path = %path.display(), frames, "published and removed a spool");
        }
    }
}

/// A spool whose record does not verify: left in place, reported once, not read again.
async fn refuse(
    shared: &SidecarState,
    items: &mpsc::Sender<ToPublish>,
    path: &std::path::Path,
    frames: u64,
    error: &FrameError,
) {
    shared.metrics.spools_refused.inc();
    lock(&shared.refused_spools).insert(path.to_path_buf());
    let message = format!(
        "the spool file {} is not authentic: {error}. It was not written by this pod's entrypoint with its key (a process in the agent container may have made or changed it); {frames} frame(s) before that point were published, nothing from there on. The file is left in place",
        path.display()
    );
    tracing::error!("{message}");
    shared.notice(items, SPOOL_REFUSED_REASON, message).await;
}

//! Reads a run's archive with the cursor semantics of Redis replay
//! (`agentrun_protocol::replay`): a cursor is the `seq` of the last entry a reader has, `0`
//! is the start, and a reader asking for entries that were trimmed before the run was
//! archived is told so ([`Trimmed`]) rather than skipped silently.
//!
//! Starting at a cursor costs one index read (once per stream, then cached) and one ranged
//! read of the block that holds the next entry; reading on costs one ranged read per block.

use crate::error::ArchiveError;
use crate::format::{Manifest, StreamIndex, StreamManifest, decode_entries, run_dir};
use crate::store::ArchiveStore;
use crate::store::read_manifest;
use agentrun_protocol::replay::{ReplayPage, Trimmed};
use agentrun_protocol::{Entry, RunId, StreamName};
use futures::{Stream, TryStreamExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A block decoded last, kept for the next page.
type CachedBlock = (String, usize, Arc<Vec<Entry>>);

/// An opened archive of one run.
pub struct ArchiveReader {
    store: ArchiveStore,
    run: RunId,
    manifest: Manifest,
    indexes: Mutex<HashMap<String, Arc<StreamIndex>>>,
    last_block: Mutex<Option<CachedBlock>>,
}

impl ArchiveReader {
    /// Opens a run's archive; `None` when the run has no (complete) archive.
    pub async fn open(store: &ArchiveStore, run: &RunId) -> Result<Option<Self>, ArchiveError> {
        let Some(manifest) = read_manifest(store, run).await? else {
            return Ok(None);
        };
        Ok(Some(Self {
            store: store.clone(),
            run: run.clone(),
            manifest,
            indexes: Mutex::new(HashMap::new()),
            last_block: Mutex::new(None),
        }))
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The seq of the last entry archived of a stream (0 when the run did not have it).
    pub fn last_seq(&self, stream: &StreamName) -> u64 {
        self.manifest.stream(stream).map_or(0, |s| s.last_seq)
    }

    async fn index(&self, s: &StreamManifest) -> Result<Arc<StreamIndex>, ArchiveError> {
        if let Some(i) = self.lock_indexes().get(&s.index) {
            return Ok(i.clone());
        }
        let path = self
            .store
            .path(&format!("{}/{}", run_dir(&self.run), s.index));
        let bytes = self.store.object_store().get(&path).await?.bytes().await?;
        let index: StreamIndex = serde_json::from_slice(&bytes)
            .map_err(|e| ArchiveError::Corrupt(format!("index {path}: {e}")))?;
        let index = Arc::new(index);
        self.lock_indexes().insert(s.index.clone(), index.clone());
        Ok(index)
    }

    fn lock_indexes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<StreamIndex>>> {
        self.indexes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entries of block `i` of a stream (one ranged read, then cached until the next).
    async fn block(
        &self,
        s: &StreamManifest,
        index: &StreamIndex,
        i: usize,
    ) -> Result<Arc<Vec<Entry>>, ArchiveError> {
        {
            let cached = self.last_block.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((data, at, entries)) = cached.as_ref()
                && *data == s.data
                && *at == i
            {
                return Ok(entries.clone());
            }
        }
        let b = &index.blocks[i];
        let path = self
            .store
            .path(&format!("{}/{}", run_dir(&self.run), s.data));
        let frame = self
            .store
            .object_store()
            .get_range(&path, b.offset..b.offset + b.length)
            .await?;
        let raw = zstd::bulk::decompress(&frame, b.raw_length as usize).map_err(|e| {
            ArchiveError::Corrupt(format!("block {i} of {path} does not decompress: {e}"))
        })?;
        let entries = Arc::new(decode_entries(raw.into())?);
        *self.last_block.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((s.data.clone(), i, entries.clone()));
        Ok(entries)
    }

    /// Up to `count` entries with `seq > after`, like `replay::read_page` on the stream.
    pub async fn read_page(
        &self,
        stream: &StreamName,
        after: u64,
        count: usize,
    ) -> Result<ReplayPage, ArchiveError> {
        let count = count.max(1);
        let mut entries = Vec::new();
        if let Some(s) = self.manifest.stream(stream) {
            let index = self.index(s).await?;
            let mut i = index.first_block_after(after);
            while entries.len() < count && i < index.blocks.len() {
                let block = self.block(s, &index, i).await?;
                entries.extend(
                    block
                        .iter()
                        .filter(|e| e.seq > after)
                        .take(count - entries.len())
                        .cloned(),
                );
                i += 1;
            }
        }
        let trimmed = entries.first().and_then(|first| {
            (first.seq > after + 1).then_some(Trimmed {
                wanted: after + 1,
                first_available: first.seq,
            })
        });
        Ok(ReplayPage { entries, trimmed })
    }

    /// Every entry with `seq > after`, in order, block by block.
    pub fn read_from<'a>(
        &'a self,
        stream: &'a StreamName,
        after: u64,
    ) -> impl Stream<Item = Result<Entry, ArchiveError>> + 'a {
        let pages = futures::stream::try_unfold(after, move |cursor| async move {
            let page = self.read_page(stream, cursor, 4096).await?;
            Ok::<_, ArchiveError>(
                page.entries
                    .last()
                    .map(|e| e.seq)
                    .map(|next| (page.entries, next)),
            )
        });
        futures::TryStreamExt::map_ok(pages, |v| {
            futures::stream::iter(v.into_iter().map(Ok::<Entry, ArchiveError>))
        })
        .try_flatten()
    }
}

//! Runs that Redis has let go, read from their archive (`--archive-url`, the store the
//! archivers write to; `docs/archive.md`).
//!
//! An archived run is served like a finished live run: the same entries, the same `seq`
//! cursors (the archive keeps Redis's), the same end. Opened archives are kept for the next
//! request of the same run (at most [`OPEN_ARCHIVES`], the least recently used go first): an
//! archive's manifest and the index of a stream are read once.

use agentrun_archiver::catalog::{self, CatalogFilter, CatalogPage};
use agentrun_archiver::{ArchiveError, ArchiveReader, ArchiveStore};
use agentrun_protocol::replay::RunPage;
use agentrun_protocol::{Epoch, RunId, StreamName, state_hash};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Archives kept open.
pub const OPEN_ARCHIVES: usize = 64;

/// The archive store and the archives open in it.
pub struct Archive {
    store: ArchiveStore,
    open: Mutex<VecDeque<(RunId, Arc<ArchiveReader>)>>,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("store", &self.store.url())
            .finish()
    }
}

impl Archive {
    /// The store `url` names: a folder, `s3://`, `gs://` or `az://` (credentials from the
    /// usual environment variables).
    pub fn from_url(url: &str) -> Result<Self, ArchiveError> {
        Ok(Self::new(ArchiveStore::from_url(url)?))
    }

    pub fn new(store: ArchiveStore) -> Self {
        Self {
            store,
            open: Mutex::new(VecDeque::new()),
        }
    }

    pub fn url(&self) -> &str {
        self.store.url()
    }

    /// The run's archive, if it has a complete one.
    pub async fn reader(&self, run: &RunId) -> Result<Option<Arc<ArchiveReader>>, ArchiveError> {
        if let Some(reader) = self.take_open(run) {
            self.keep_open(run, reader.clone());
            return Ok(Some(reader));
        }
        let Some(reader) = ArchiveReader::open(&self.store, run).await? else {
            return Ok(None);
        };
        let reader = Arc::new(reader);
        self.keep_open(run, reader.clone());
        Ok(Some(reader))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(RunId, Arc<ArchiveReader>)>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_open(&self, run: &RunId) -> Option<Arc<ArchiveReader>> {
        let mut open = self.lock();
        let at = open.iter().position(|(r, _)| r == run)?;
        open.remove(at).map(|(_, reader)| reader)
    }

    fn keep_open(&self, run: &RunId, reader: Arc<ArchiveReader>) {
        let mut open = self.lock();
        open.retain(|(r, _)| r != run);
        open.push_front((run.clone(), reader));
        open.truncate(OPEN_ARCHIVES);
    }

    /// Archived runs, newest first (see [`catalog::list`]).
    pub async fn list(
        &self,
        filter: &CatalogFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<CatalogPage, ArchiveError> {
        catalog::list(&self.store, filter, after, limit).await
    }
}

/// The run's state hash as it was archived (what access checks and run summaries read).
pub fn state_of(reader: &ArchiveReader) -> HashMap<String, String> {
    reader
        .manifest()
        .state
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The epoch the archived run's cursors count in (the one it had in Redis).
pub fn epoch_of(reader: &ArchiveReader) -> Option<Epoch> {
    reader
        .manifest()
        .state
        .get(state_hash::EPOCH)
        .and_then(|e| Epoch::parse(e))
}

/// Like `agentrun_protocol::replay::read_run_page`, from the archive: up to `count` entries of
/// `stream` with `seq > after`, the run's epoch, and whether the cursor is past the stream's
/// end (so the same cursor checks hold as for a live run).
pub async fn read_run_page(
    reader: &ArchiveReader,
    stream: &StreamName,
    after: u64,
    count: usize,
) -> Result<RunPage, ArchiveError> {
    let page = reader.read_page(stream, after, count).await?;
    let top = reader.last_seq(stream);
    let ends_before_cursor = (page.entries.is_empty() && after > top).then_some(top);
    Ok(RunPage {
        page,
        epoch: epoch_of(reader),
        ends_before_cursor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_run_without_an_archive_is_none_and_is_not_kept_open() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::from_url(dir.path().to_str().unwrap()).unwrap();
        let run = RunId::new("default.missing.00000000").unwrap();
        assert!(archive.reader(&run).await.unwrap().is_none());
        assert!(
            archive.lock().is_empty(),
            "nothing kept for a run with no archive"
        );
        let page = archive
            .list(&CatalogFilter::default(), None, 10)
            .await
            .unwrap();
        assert!(page.runs.is_empty() && page.next.is_none());
    }

    #[tokio::test]
    async fn a_store_url_that_names_nothing_usable_is_refused_with_the_choices() {
        let e = Archive::from_url("ftp://host/x").unwrap_err().to_string();
        assert!(e.contains("s3://"), "{e}");
    }
}

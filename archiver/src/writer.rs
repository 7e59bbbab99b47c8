//! Writes one run's archive: every stream of every variation, from Redis to the store.
//!
//! Invariants:
//! - The manifest is written last, create-only. Before it exists nothing of the attempt is
//!   visible to readers; once it exists it is never replaced, so however many archivers try
//!   (a crash mid-upload and its successor, two replicas racing), a run has one archive.
//! - An attempt writes only under its own folder, so a losing or crashed attempt never
//!   damages the winner's objects; the winner deletes the other attempts' folders.
//! - Each stream is read up to the last seq it had when the attempt started, in pages, and
//!   uploaded as it is read: memory stays bounded by one block and one upload part, whatever
//!   the size of the run.

use crate::catalog;
use crate::error::ArchiveError;
use crate::format::{
    BLOCK_TARGET_BYTES, BlockIndex, FORMAT, Manifest, StreamIndex, StreamManifest, ZSTD_LEVEL,
    encode_entry, manifest_path, run_dir, stream_file,
};
use crate::store::{ArchiveStore, read_manifest};
use agentrun_protocol::archive::{
    ArchiveRequest, FIELD_ARCHIVE, FIELD_ARCHIVE_ERROR, FIELD_ARCHIVED,
};
use agentrun_protocol::replay::{last_seq, read_page};
use agentrun_protocol::{RunId, StreamName, Variation, now_ms};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use object_store::{ObjectStore, PutMode, PutPayload};
use redis::aio::ConnectionLike;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How an archive is written.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Entries per `XRANGE` page.
    pub page_entries: usize,
    /// Size of each part of a multipart upload (S3 wants at least 5 MiB).
    pub part_bytes: usize,
    /// Upper bound on the bytes written to the store per second (`None`: as fast as it goes).
    pub max_write_bytes_per_second: Option<u64>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            page_entries: 1000,
            part_bytes: 8 * 1024 * 1024,
            max_write_bytes_per_second: None,
        }
    }
}

/// What archiving a run did.
#[derive(Debug, Clone)]
pub struct Archived {
    pub manifest: Manifest,
    /// False when the archive existed already (another attempt wrote it).
    pub written_now: bool,
    /// Entries, content bytes and compressed bytes this attempt wrote.
    pub entries: u64,
    pub content_bytes: u64,
    pub data_bytes: u64,
}

/// Archives the run `request` names. Returns `None` when Redis holds nothing of the run.
pub async fn archive_run<C: ConnectionLike + Clone + Send>(
    conn: &C,
    store: &ArchiveStore,
    request: &ArchiveRequest,
    options: &WriteOptions,
) -> Result<Option<Archived>, ArchiveError> {
    let run = &request.run;
    if let Some(manifest) = read_manifest(store, run).await? {
        // A catalog entry lost to a crash after the manifest is made now.
        catalog::add(store, &manifest).await?;
        return Ok(Some(done_already(manifest)));
    }
    let mut c = conn.clone();
    let state: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(run.state_key())
        .query_async(&mut c)
        .await?;
    let variations = variations_of(&state, &request.variations);
    let mut streams = vec![StreamName::Status, StreamName::Control, StreamName::Metrics];
    for v in &variations {
        streams.push(StreamName::Output(v.clone()));
        streams.push(StreamName::Logs(v.clone()));
    }
    let mut tops = Vec::new();
    for s in streams {
        let top = last_seq(&mut c, &s.key(run)).await?;
        if top > 0 {
            tops.push((s, top));
        }
    }
    if state.is_empty() && tops.is_empty() {
        return Ok(None);
    }

    let attempt = format!("{}-{:08x}", now_ms(), rand::random::<u32>());
    let mut writer = AttemptWriter {
        store,
        run,
        attempt: &attempt,
        options,
        started: Instant::now(),
        written: 0,
    };
    let mut manifest = Manifest {
        format: FORMAT.to_owned(),
        run: run.to_string(),
        attempt: attempt.clone(),
        archived_ms: 0,
        variations: variations.iter().map(|v| v.to_string()).collect(),
        state: state
            .into_iter()
            .filter(|(k, _)| {
                ![FIELD_ARCHIVE, FIELD_ARCHIVE_ERROR, FIELD_ARCHIVED].contains(&k.as_str())
            })
            .collect::<BTreeMap<_, _>>(),
        streams: Vec::new(),
    };
    let written = async {
        for (stream, top) in &tops {
            let m = writer.write_stream(&mut c, stream, *top).await?;
            manifest.streams.push(m);
        }
        Ok::<_, ArchiveError>(())
    }
    .await;
    if let Err(e) = written {
        writer.discard().await;
        return Err(e);
    }
    manifest.archived_ms = now_ms();
    let body = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| ArchiveError::Corrupt(format!("cannot encode the manifest: {e}")))?;
    let put = store
        .object_store()
        .put_opts(
            &store.path(&manifest_path(run)),
            PutPayload::from(body),
            PutMode::Create.into(),
        )
        .await;
    match put {
        Ok(_) => {}
        Err(object_store::Error::AlreadyExists { .. }) => {
            // Another attempt finished first: its archive is the run's.
            writer.discard().await;
            let winner = read_manifest(store, run).await?.ok_or_else(|| {
                ArchiveError::Corrupt(format!("the manifest of {run} exists but cannot be read"))
            })?;
            catalog::add(store, &winner).await?;
            return Ok(Some(done_already(winner)));
        }
        Err(e) => {
            writer.discard().await;
            return Err(e.into());
        }
    }
    catalog::add(store, &manifest).await?;
    remove_other_attempts(store, run, &attempt).await;
    let (entries, content_bytes, data_bytes) = manifest.streams.iter().fold((0, 0, 0), |a, s| {
        (a.0 + s.entries, a.1 + s.content_bytes, a.2 + s.data_bytes)
    });
    Ok(Some(Archived {
        manifest,
        written_now: true,
        entries,
        content_bytes,
        data_bytes,
    }))
}

fn done_already(manifest: Manifest) -> Archived {
    Archived {
        manifest,
        written_now: false,
        entries: 0,
        content_bytes: 0,
        data_bytes: 0,
    }
}

/// The run's variations: those its state hash declares, then those the request adds.
fn variations_of(state: &HashMap<String, String>, extra: &[Variation]) -> Vec<Variation> {
    let mut out: Vec<Variation> = state
        .get(agentrun_protocol::state_hash::VARIATIONS)
        .map(|d| {
            d.split(',')
                .filter_map(|v| Variation::new(v).ok())
                .collect()
        })
        .unwrap_or_default();
    for v in extra {
        if !out.contains(v) {
            out.push(v.clone());
        }
    }
    if out.is_empty() {
        out.push(Variation::default_name());
    }
    out
}

/// Deletes every object of the run that is neither the manifest nor the winning attempt's
/// (folders of crashed or losing attempts). Failures only leave garbage behind.
async fn remove_other_attempts(store: &ArchiveStore, run: &RunId, keep: &str) {
    let dir = run_dir(run);
    let prefix = store.path(&dir);
    let keep_prefix = store.path(&format!("{dir}/{keep}"));
    let manifest = store.path(&manifest_path(run));
    let listed: Result<Vec<_>, _> = store.object_store().list(Some(&prefix)).try_collect().await;
    let mut folders = std::collections::BTreeSet::new();
    for meta in listed.unwrap_or_default() {
        if meta.location == manifest || meta.location.prefix_matches(&keep_prefix) {
            continue;
        }
        if let Some(folder) = meta
            .location
            .prefix_match(&prefix)
            .and_then(|mut p| p.next())
        {
            folders.insert(folder.as_ref().to_owned());
        }
        if let Err(e) = store.object_store().delete(&meta.location).await {
            tracing::warn!(object = %meta.location, error = %e, "cannot delete an abandoned archive object");
        }
    }
    // Staging files of abandoned local uploads are not listed.
    if let Ok(mut entries) = local_folders(store, &dir).await {
        folders.append(&mut entries);
    }
    for folder in folders.into_iter().filter(|f| f != keep) {
        store.remove_local_dir(&format!("{dir}/{folder}")).await;
    }
}

async fn local_folders(
    store: &ArchiveStore,
    dir: &str,
) -> std::io::Result<std::collections::BTreeSet<String>> {
    let mut out = std::collections::BTreeSet::new();
    let Some(root) = store.local_dir(dir) else {
        return Ok(out);
    };
    let mut rd = tokio::fs::read_dir(root).await?;
    while let Some(e) = rd.next_entry().await? {
        if e.file_type().await?.is_dir() {
            out.insert(e.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

/// Compresses a block of entries `seqs` (first, last) that starts at `offset` in its data
/// object: its index entry and its zstd frame.
fn seal(
    compressor: &mut zstd::bulk::Compressor<'_>,
    block: &[u8],
    seqs: (u64, u64),
    offset: u64,
) -> Result<(BlockIndex, Vec<u8>), ArchiveError> {
    let frame = compressor.compress(block)?;
    let index = BlockIndex {
        first_seq: seqs.0,
        last_seq: seqs.1,
        offset,
        length: frame.len() as u64,
        raw_length: block.len() as u64,
    };
    Ok((index, frame))
}

struct AttemptWriter<'a> {
    store: &'a ArchiveStore,
    run: &'a RunId,
    attempt: &'a str,
    options: &'a WriteOptions,
    started: Instant,
    written: u64,
}

impl AttemptWriter<'_> {
    fn relative(&self, name: &str) -> String {
        format!("{}/{name}", self.attempt)
    }

    /// Keeps the write rate under the configured bound.
    async fn throttle(&mut self, bytes: usize) {
        self.written += bytes as u64;
        if let Some(rate) = self.options.max_write_bytes_per_second.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(self.written as f64 / rate as f64);
            let elapsed = self.started.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }

    /// Uploads one compressed block; returns its length.
    async fn put_frame(
        &mut self,
        upload: &mut BufWriter,
        frame: Vec<u8>,
    ) -> Result<u64, ArchiveError> {
        let len = frame.len();
        upload.put(Bytes::from(frame)).await?;
        self.throttle(len).await;
        Ok(len as u64)
    }

    /// Copies one stream, entries 1..=`top`, to `STREAM.zst` and `STREAM.index.json`.
    async fn write_stream<C: ConnectionLike + Send>(
        &mut self,
        conn: &mut C,
        stream: &StreamName,
        top: u64,
    ) -> Result<StreamManifest, ArchiveError> {
        let key = stream.key(self.run);
        let name = stream_file(stream);
        let data_rel = self.relative(&format!("{name}.zst"));
        let index_rel = self.relative(&format!("{name}.index.json"));
        let dir = run_dir(self.run);
        let mut upload = BufWriter::with_capacity(
            self.store.object_store().clone(),
            self.store.path(&format!("{dir}/{data_rel}")),
            self.options.part_bytes,
        )
        .with_max_concurrency(2);
        let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
        compressor.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;

        let mut index = StreamIndex::default();
        let mut block = Vec::with_capacity(BLOCK_TARGET_BYTES + 64 * 1024);
        let mut block_first = 0;
        let mut block_last = 0;
        let mut offset = 0u64;
        let (mut first_seq, mut entries, mut content_bytes) = (0u64, 0u64, 0u64);
        let mut after = 0;
        let result = async {
            'pages: while after < top {
                let page = read_page(conn, &key, after, self.options.page_entries).await?;
                if page.entries.is_empty() {
                    break;
                }
                for entry in page.entries {
                    if entry.seq > top {
                        break 'pages;
                    }
                    if first_seq == 0 {
                        first_seq = entry.seq;
                    }
                    if block.is_empty() {
                        block_first = entry.seq;
                    }
                    block_last = entry.seq;
                    after = entry.seq;
                    entries += 1;
                    content_bytes += entry.content.len() as u64;
                    encode_entry(&entry, &mut block);
                    if block.len() >= BLOCK_TARGET_BYTES {
                        let (b, frame) =
                            seal(&mut compressor, &block, (block_first, block_last), offset)?;
                        index.blocks.push(b);
                        offset += self.put_frame(&mut upload, frame).await?;
                        block.clear();
                    }
                }
            }
            if !block.is_empty() {
                let (b, frame) = seal(&mut compressor, &block, (block_first, block_last), offset)?;
                index.blocks.push(b);
                offset += self.put_frame(&mut upload, frame).await?;
            }
            upload.shutdown().await?;
            Ok::<_, ArchiveError>(())
        }
        .await;
        if let Err(e) = result {
            let _ = upload.abort().await;
            return Err(e);
        }
        let index_body = serde_json::to_vec(&index)
            .map_err(|e| ArchiveError::Corrupt(format!("cannot encode an index: {e}")))?;
        self.throttle(index_body.len()).await;
        self.store
            .object_store()
            .put(
                &self.store.path(&format!("{dir}/{index_rel}")),
                PutPayload::from(index_body),
            )
            .await?;
        Ok(StreamManifest {
            channel: stream.kind().to_owned(),
            variation: stream.variation().map(|v| v.to_string()),
            key,
            data: data_rel,
            index: index_rel,
            first_seq,
            last_seq: after,
            entries,
            content_bytes,
            data_bytes: offset,
        })
    }

    /// Deletes what this attempt wrote (it lost, or failed).
    async fn discard(&self) {
        let dir = run_dir(self.run);
        let prefix = self.store.path(&format!("{dir}/{}", self.attempt));
        let listed: Result<Vec<_>, _> = self
            .store
            .object_store()
            .list(Some(&prefix))
            .try_collect()
            .await;
        for meta in listed.unwrap_or_default() {
            let _ = self.store.object_store().delete(&meta.location).await;
        }
        self.store
            .remove_local_dir(&format!("{dir}/{}", self.attempt))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variations_come_from_the_state_then_the_request() {
        let state = HashMap::from([("variations".to_owned(), "a,b".to_owned())]);
        let extra = [Variation::new("c").unwrap(), Variation::new("a").unwrap()];
        let names: Vec<String> = variations_of(&state, &extra)
            .iter()
            .map(|v| v.to_string())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(variations_of(&HashMap::new(), &[])[0].as_str(), "default");
    }
}

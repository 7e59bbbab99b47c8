//! The archive format: where a run's objects live, how entries are encoded, the per-stream
//! index and the manifest.
//!
//! ```text
//! runs/RUN/manifest.json                 written last, only if absent: the archive exists iff it does
//! runs/RUN/ATTEMPT/STREAM.zst            the stream's entries: independent zstd frames, one per block
//! runs/RUN/ATTEMPT/STREAM.index.json     its blocks: first and last seq, byte range
//! ```
//!
//! `STREAM` is `output.VAR`, `logs.VAR`, `status`, `control` or `metrics`. `ATTEMPT` is unique
//! per attempt to archive the run, so two archivers (or a crashed one and its successor) never
//! write the same data object; the manifest names the attempt that won, and every other
//! attempt's objects are garbage that the winner deletes.
//!
//! A block holds whole entries in seq order, about [`BLOCK_TARGET_BYTES`] of them before
//! compression; each is one zstd frame with its checksum, so a reader decompresses a block
//! alone after one ranged read, and a damaged block is an error, never wrong bytes.
//!
//! Entry encoding inside a block (little-endian): `seq u64, ts u64, type u8, flags u8`
//! (bit 0: has meta), then `meta_len u32` and the meta bytes when it has meta, then
//! `content_len u32` and the content bytes. Content is kept byte for byte.

use crate::error::ArchiveError;
use agentrun_protocol::{Entry, EntryType, RunId, StreamName};
use bytes::{Buf, BufMut, Bytes};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `format` of every manifest this crate writes.
pub const FORMAT: &str = "agentrun-archive/1";
/// Raw bytes gathered into one block before it is compressed.
pub const BLOCK_TARGET_BYTES: usize = 1024 * 1024;
/// zstd level of every block: level 3 (zstd's default) compresses text 3 to 5 times at
/// hundreds of MB/s on one core.
pub const ZSTD_LEVEL: i32 = 3;

/// The file name of a stream in an attempt folder (`output.VAR`, `status`, ...).
pub fn stream_file(stream: &StreamName) -> String {
    match stream.variation() {
        Some(v) => format!("{}.{v}", stream.kind()),
        None => stream.kind().to_owned(),
    }
}

/// Parses what [`stream_file`] made.
pub fn parse_stream_file(name: &str) -> Option<StreamName> {
    StreamName::parse_kind(name, '.')
}

/// Folder of a run's archive, under the store's root.
pub fn run_dir(run: &RunId) -> String {
    format!("runs/{run}")
}

/// The manifest of a run's archive.
pub fn manifest_path(run: &RunId) -> String {
    format!("runs/{run}/manifest.json")
}

fn type_code(kind: EntryType) -> u8 {
    match kind {
        EntryType::Output => 0,
        EntryType::Logs => 1,
        EntryType::Status => 2,
        EntryType::Control => 3,
        EntryType::Metrics => 4,
        EntryType::Gap => 5,
    }
}

fn type_of(code: u8) -> Option<EntryType> {
    Some(match code {
        0 => EntryType::Output,
        1 => EntryType::Logs,
        2 => EntryType::Status,
        3 => EntryType::Control,
        4 => EntryType::Metrics,
        5 => EntryType::Gap,
        _ => return None,
    })
}

/// Appends one entry's encoding to `out`.
pub fn encode_entry(entry: &Entry, out: &mut Vec<u8>) {
    out.put_u64_le(entry.seq);
    out.put_u64_le(entry.ts);
    out.put_u8(type_code(entry.kind));
    match &entry.meta {
        Some(meta) => {
            out.put_u8(1);
            out.put_u32_le(meta.len() as u32);
            out.extend_from_slice(meta.as_bytes());
        }
        None => out.put_u8(0),
    }
    out.put_u32_le(entry.content.len() as u32);
    out.extend_from_slice(&entry.content);
}

/// Decodes every entry of a decompressed block.
pub fn decode_entries(mut raw: Bytes) -> Result<Vec<Entry>, ArchiveError> {
    let bad = |what: &str| ArchiveError::Corrupt(format!("block entry: {what}"));
    let mut entries = Vec::new();
    while raw.has_remaining() {
        if raw.remaining() < 18 {
            return Err(bad("truncated header"));
        }
        let seq = raw.get_u64_le();
        let ts = raw.get_u64_le();
        let kind = type_of(raw.get_u8()).ok_or_else(|| bad("unknown type"))?;
        let flags = raw.get_u8();
        let meta = if flags & 1 == 1 {
            let len = take_len(&mut raw).ok_or_else(|| bad("truncated meta"))?;
            let bytes = raw.split_to(len);
            Some(String::from_utf8(bytes.to_vec()).map_err(|_| bad("meta is not UTF-8"))?)
        } else {
            None
        };
        let len = take_len(&mut raw).ok_or_else(|| bad("truncated content"))?;
        let content = raw.split_to(len);
        entries.push(Entry {
            seq,
            ts,
            kind,
            content,
            meta,
        });
    }
    Ok(entries)
}

fn take_len(raw: &mut Bytes) -> Option<usize> {
    if raw.remaining() < 4 {
        return None;
    }
    let len = raw.get_u32_le() as usize;
    (raw.remaining() >= len).then_some(len)
}

/// One block of a stream's data object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockIndex {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Byte offset of the block's zstd frame in the data object.
    pub offset: u64,
    /// Length of the frame.
    pub length: u64,
    /// Length of the block once decompressed.
    pub raw_length: u64,
}

/// The index of one stream: its blocks in seq order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamIndex {
    pub blocks: Vec<BlockIndex>,
}

impl StreamIndex {
    /// The first block that holds entries after `after` (its position in `blocks`).
    pub fn first_block_after(&self, after: u64) -> usize {
        self.blocks.partition_point(|b| b.last_seq <= after)
    }
}

/// What the manifest says about one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamManifest {
    /// `output`, `logs`, `status`, `control` or `metrics`.
    pub channel: String,
    /// The variation of `output` and `logs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variation: Option<String>,
    /// The Redis key it was copied from.
    pub key: String,
    /// Data object, relative to the run's folder.
    pub data: String,
    /// Index object, relative to the run's folder.
    pub index: String,
    /// Seq of the first entry archived (greater than 1 when Redis had trimmed the stream).
    pub first_seq: u64,
    pub last_seq: u64,
    pub entries: u64,
    /// Sum of the entries' content lengths.
    pub content_bytes: u64,
    /// Size of the data object.
    pub data_bytes: u64,
}

impl StreamManifest {
    pub fn stream(&self) -> Option<StreamName> {
        let name = match &self.variation {
            Some(v) => format!("{}.{v}", self.channel),
            None => self.channel.clone(),
        };
        parse_stream_file(&name)
    }
}

/// The manifest of a run's archive, `runs/RUN/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    pub run: String,
    /// Folder of the attempt that wrote the data, relative to the run's folder.
    pub attempt: String,
    /// ms since the epoch when the archive was written.
    pub archived_ms: u64,
    /// Variations of the run.
    pub variations: Vec<String>,
    /// The run's state hash as it was when archived (`phase`, `created`, `ended`, `name`,
    /// `namespace`, `var:NAME`...), less the archive's own fields.
    pub state: BTreeMap<String, String>,
    pub streams: Vec<StreamManifest>,
}

impl Manifest {
    /// The manifest entry of a stream, if the run had it.
    pub fn stream(&self, stream: &StreamName) -> Option<&StreamManifest> {
        self.streams
            .iter()
            .find(|s| s.stream().as_ref() == Some(stream))
    }

    /// The run's phase when it was archived (`succeeded`, `failed`, `stopped`...).
    pub fn phase(&self) -> Option<&str> {
        self.state
            .get(agentrun_protocol::state_hash::PHASE)
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentrun_protocol::Variation;
    use proptest::prelude::*;

    fn kind(i: u8) -> EntryType {
        type_of(i % 6).unwrap()
    }

    proptest! {
        #[test]
        fn entries_round_trip_byte_for_byte(
            items in proptest::collection::vec((1u64.., any::<u64>(), 0u8..6, proptest::option::of(".*"), proptest::collection::vec(any::<u8>(), 0..300)), 0..20)
        ) {
            let entries: Vec<Entry> = items.into_iter().map(|(seq, ts, k, meta, content)| Entry {
                seq, ts, kind: kind(k), meta, content: Bytes::from(content),
            }).collect();
            let mut raw = Vec::new();
            for e in &entries { encode_entry(e, &mut raw); }
            prop_assert_eq!(decode_entries(Bytes::from(raw)).unwrap(), entries);
        }
    }

    #[test]
    fn a_truncated_block_is_an_error_not_an_entry() {
        let e = Entry {
            seq: 1,
            ts: 2,
            kind: EntryType::Output,
            content: Bytes::from_static(b"hello"),
            meta: None,
        };
        let mut raw = Vec::new();
        encode_entry(&e, &mut raw);
        raw.pop();
        assert!(decode_entries(Bytes::from(raw)).is_err());
    }

    #[test]
    fn stream_files_name_every_stream() {
        for s in [
            StreamName::Output(Variation::new("a-1").unwrap()),
            StreamName::Logs(Variation::default_name()),
            StreamName::Status,
            StreamName::Control,
            StreamName::Metrics,
        ] {
            assert_eq!(parse_stream_file(&stream_file(&s)), Some(s));
        }
        assert_eq!(parse_stream_file("output"), None);
    }

    #[test]
    fn the_index_finds_the_block_after_a_cursor() {
        let block = |first, last| BlockIndex {
            first_seq: first,
            last_seq: last,
            offset: 0,
            length: 0,
            raw_length: 0,
        };
        let index = StreamIndex {
            blocks: vec![block(1, 10), block(11, 20), block(21, 30)],
        };
        assert_eq!(index.first_block_after(0), 0);
        assert_eq!(index.first_block_after(9), 0);
        assert_eq!(index.first_block_after(10), 1);
        assert_eq!(index.first_block_after(29), 2);
        assert_eq!(index.first_block_after(30), 3);
    }
}

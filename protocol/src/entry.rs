//! Stream entries: what is stored in a run's streams and announced on its channels.
//!
//! Stream entry ids are `0-SEQ`: the id *is* the stream sequence number, contiguous from 1.
//! That makes a cursor a plain number, lets a reader ask for "everything after 41" with one
//! `XRANGE`, and lets the publish script refuse anything that is not new.
//!
//! Fields of an entry: `seq`, `ts` (ms since the epoch, when the producer saw the data),
//! `type` (see [`EntryType`]), `content` (raw bytes) and, when present, `meta` (JSON text).

use crate::epoch::Epoch;
use bytes::Bytes;
use redis::Value;
use std::fmt;

/// What an entry is. Written as the lowercase name in the `type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryType {
    /// A chunk of agent stdout.
    Output,
    /// A chunk of agent stderr or a sidecar log line.
    Logs,
    /// A lifecycle fact; `content` is a JSON [`crate::StatusEvent`].
    Status,
    /// A control message; `content` is a JSON [`crate::ControlMessage`].
    Control,
    /// Periodic figures; `content` is a JSON object.
    Metrics,
    /// Data that could not be kept; `meta` says how much (`{"droppedBytes":N,"droppedChunks":M}`).
    Gap,
}

impl EntryType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Output => "output",
            Self::Logs => "logs",
            Self::Status => "status",
            Self::Control => "control",
            Self::Metrics => "metrics",
            Self::Gap => "gap",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "output" => Self::Output,
            "logs" => Self::Logs,
            "status" => Self::Status,
            "control" => Self::Control,
            "metrics" => Self::Metrics,
            "gap" => Self::Gap,
            _ => return None,
        })
    }
}

impl fmt::Display for EntryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An entry as stored in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub ts: u64,
    pub kind: EntryType,
    pub content: Bytes,
    pub meta: Option<String>,
}

/// An entry a producer wants appended. `pseq` is the producer's own sequence number for this
/// stream: strictly increasing per producer and stream, it is what makes re-sends idempotent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub pseq: u64,
    pub ts: u64,
    pub kind: EntryType,
    pub content: Bytes,
    pub meta: Option<String>,
}

/// Why a stream entry or live message could not be read.
#[derive(Debug, thiserror::Error)]
#[error("malformed stream entry: {0}")]
pub struct MalformedEntry(pub String);

impl Entry {
    /// Reads one `[id, [field, value, ...]]` element of an `XRANGE`/`XREAD` reply.
    pub fn from_stream_value(value: &Value) -> Result<Self, MalformedEntry> {
        let Value::Array(parts) = value else {
            return Err(MalformedEntry(format!(
                "expected [id, fields], got {value:?}"
            )));
        };
        let [id, fields] = parts.as_slice() else {
            return Err(MalformedEntry("expected two elements".into()));
        };
        let id = bytes_of(id).ok_or_else(|| MalformedEntry("entry id is not a string".into()))?;
        let id_seq = parse_id(&id)?;
        let Value::Array(fields) = fields else {
            return Err(MalformedEntry("fields are not an array".into()));
        };
        let mut seq = None;
        let mut ts = 0;
        let mut kind = None;
        let mut content = Bytes::new();
        let mut meta = None;
        for pair in fields.chunks(2) {
            let [k, v] = pair else { break };
            let (Some(k), Some(v)) = (bytes_of(k), bytes_of(v)) else {
                continue;
            };
            match k.as_ref() {
                b"seq" => seq = std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()),
                b"ts" => {
                    ts = std::str::from_utf8(&v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0)
                }
                b"type" => kind = std::str::from_utf8(&v).ok().and_then(EntryType::parse),
                b"content" => content = v,
                b"meta" => meta = Some(String::from_utf8_lossy(&v).into_owned()),
                _ => {}
            }
        }
        let kind =
            kind.ok_or_else(|| MalformedEntry(format!("entry {id_seq} has no known type")))?;
        Ok(Entry {
            seq: seq.unwrap_or(id_seq),
            ts,
            kind,
            content,
            meta,
        })
    }

    /// Reads a whole `XRANGE` reply.
    pub fn from_range_reply(value: &Value) -> Result<Vec<Self>, MalformedEntry> {
        match value {
            Value::Array(items) => items.iter().map(Self::from_stream_value).collect(),
            Value::Nil => Ok(Vec::new()),
            other => Err(MalformedEntry(format!("expected an array, got {other:?}"))),
        }
    }
}

fn bytes_of(v: &Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        Value::VerbatimString { text, .. } => Some(Bytes::copy_from_slice(text.as_bytes())),
        _ => None,
    }
}

fn parse_id(id: &[u8]) -> Result<u64, MalformedEntry> {
    std::str::from_utf8(id)
        .ok()
        .and_then(|s| s.strip_prefix("0-"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            MalformedEntry(format!(
                "stream id {:?} is not of the form 0-SEQ",
                String::from_utf8_lossy(id)
            ))
        })
}

/// The payload of a Pub/Sub message announcing a new stream entry (the channel name is the
/// stream key). Binary-safe: a one-line ASCII header `SEQ TS TYPE METALEN[ EPOCH]\n`, then
/// `METALEN` bytes of meta, then the content bytes to the end. Built by the publish script.
///
/// `EPOCH` is the run's [`Epoch`] (16 hex digits) when the run has one and the publisher
/// may read it; readers that predate it stop after `METALEN` and ignore it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMessage;

impl LiveMessage {
    /// Decodes a live payload into the entry it announces.
    pub fn decode(payload: &[u8]) -> Result<Entry, MalformedEntry> {
        Self::decode_with_epoch(payload).map(|(entry, _)| entry)
    }

    /// Decodes a live payload into the entry it announces and the run's epoch it was
    /// published in (`None` when the header has none).
    pub fn decode_with_epoch(payload: &[u8]) -> Result<(Entry, Option<Epoch>), MalformedEntry> {
        let nl = payload
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| MalformedEntry("live message has no header line".into()))?;
        let header = std::str::from_utf8(&payload[..nl])
            .map_err(|_| MalformedEntry("live header is not ASCII".into()))?;
        let mut parts = header.split(' ');
        let mut next = |what: &str| {
            parts
                .next()
                .ok_or_else(|| MalformedEntry(format!("live header lacks {what}")))
        };
        let seq: u64 = next("seq")?
            .parse()
            .map_err(|_| MalformedEntry("bad seq".into()))?;
        let ts: u64 = next("ts")?
            .parse()
            .map_err(|_| MalformedEntry("bad ts".into()))?;
        let kind =
            EntryType::parse(next("type")?).ok_or_else(|| MalformedEntry("bad type".into()))?;
        let meta_len: usize = next("meta length")?
            .parse()
            .map_err(|_| MalformedEntry("bad meta length".into()))?;
        let epoch = match parts.next() {
            None => None,
            Some(text) => Some(
                Epoch::parse(text).ok_or_else(|| MalformedEntry(format!("bad epoch {text:?}")))?,
            ),
        };
        let body = &payload[nl + 1..];
        if body.len() < meta_len {
            return Err(MalformedEntry("live message shorter than its meta".into()));
        }
        let meta = (meta_len > 0).then(|| String::from_utf8_lossy(&body[..meta_len]).into_owned());
        let entry = Entry {
            seq,
            ts,
            kind,
            content: Bytes::copy_from_slice(&body[meta_len..]),
            meta,
        };
        Ok((entry, epoch))
    }

    /// Encodes an entry the way the publish script does (used by tests and tools).
    pub fn encode(entry: &Entry, epoch: Option<Epoch>) -> Vec<u8> {
        let meta = entry.meta.as_deref().unwrap_or("");
        let mut out =
            format!("{} {} {} {}", entry.seq, entry.ts, entry.kind, meta.len()).into_bytes();
        if let Some(e) = epoch {
            out.extend_from_slice(format!(" {e}").as_bytes());
        }
        out.push(b'\n');
        out.extend_from_slice(meta.as_bytes());
        out.extend_from_slice(&entry.content);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn live_messages_round_trip(seq in 1u64.., ts: u64, content: Vec<u8>, meta in proptest::option::of(".*"), epoch: Option<u64>) {
            let meta = meta.filter(|m| !m.is_empty());
            let epoch = epoch.map(Epoch::from_u64);
            let e = Entry { seq, ts, kind: EntryType::Output, content: Bytes::from(content), meta };
            prop_assert_eq!(LiveMessage::decode_with_epoch(&LiveMessage::encode(&e, epoch)).unwrap(), (e.clone(), epoch));
            prop_assert_eq!(LiveMessage::decode(&LiveMessage::encode(&e, epoch)).unwrap(), e);
        }
    }

    #[test]
    fn malformed_live_messages_are_errors() {
        assert!(LiveMessage::decode(b"no header").is_err());
        assert!(LiveMessage::decode(b"1 2 nope 0\n").is_err());
        assert!(LiveMessage::decode(b"1 2 output 9\nab").is_err());
        assert!(LiveMessage::decode(b"1 2 output 0 not-an-epoch\nab").is_err());
    }

    #[test]
    fn a_header_without_an_epoch_is_read_as_before() {
        let (entry, epoch) = LiveMessage::decode_with_epoch(b"7 9 logs 0\nhello").unwrap();
        assert_eq!((entry.seq, epoch), (7, None));
        assert_eq!(&entry.content[..], b"hello");
    }
}

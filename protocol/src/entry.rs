//! Stream entries: what is stored in a run's streams and announced on its channels.
//!
//! Stream entry ids are `0-SEQ`: the id *is* the stream sequence number, contiguous from 1.
//! That makes a cursor a plain number, lets a reader ask for "everything after 41" with one
//! `XRANGE`, and lets the publish function refuse anything that is not new.
//!
//! Fields of an entry: `seq`, `ts` (ms since the epoch, when the producer saw the data),
//! `type` (see [`EntryType`]), `content` (raw bytes) and, when present, `meta` (JSON text).

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

impl NewEntry {
    /// An entry made now, with no meta.
    pub fn now(pseq: u64, kind: EntryType, content: impl Into<Bytes>) -> Self {
        Self {
            pseq,
            ts: crate::now_ms(),
            kind,
            content: content.into(),
            meta: None,
        }
    }
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

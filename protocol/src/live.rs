//! The payload of a Pub/Sub message announcing a new stream entry (the channel name is the
//! stream key). Binary-safe: a one-line ASCII header `SEQ TS TYPE METALEN[ EPOCH]\n`, then
//! `METALEN` bytes of meta, then the content bytes to the end. Built by the publish function
//! (`agentrun.lua`); [`encode`] builds the same bytes for tests and benches.
//!
//! `EPOCH` is the run's [`Epoch`] (16 hex digits) when the run has one and the publisher
//! may read it; readers that predate it stop after `METALEN` and ignore it.

use crate::entry::{Entry, EntryType, MalformedEntry};
use crate::epoch::Epoch;
use bytes::Bytes;

/// Decodes a live payload into the entry it announces.
pub fn decode(payload: &[u8]) -> Result<Entry, MalformedEntry> {
    decode_with_epoch(payload).map(|(entry, _)| entry)
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
    let kind = EntryType::parse(next("type")?).ok_or_else(|| MalformedEntry("bad type".into()))?;
    let meta_len: usize = next("meta length")?
        .parse()
        .map_err(|_| MalformedEntry("bad meta length".into()))?;
    let epoch = match parts.next() {
        None => None,
        Some(text) => {
            Some(Epoch::parse(text).ok_or_else(|| MalformedEntry(format!("bad epoch {text:?}")))?)
        }
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

/// Encodes an entry the way the publish function does (used by tests and tools).
pub fn encode(entry: &Entry, epoch: Option<Epoch>) -> Vec<u8> {
    let meta = entry.meta.as_deref().unwrap_or("");
    let mut out = format!("{} {} {} {}", entry.seq, entry.ts, entry.kind, meta.len()).into_bytes();
    if let Some(e) = epoch {
        out.extend_from_slice(format!(" {e}").as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(meta.as_bytes());
    out.extend_from_slice(&entry.content);
    out
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
            prop_assert_eq!(decode_with_epoch(&encode(&e, epoch)).unwrap(), (e.clone(), epoch));
            prop_assert_eq!(decode(&encode(&e, epoch)).unwrap(), e);
        }
    }

    #[test]
    fn malformed_live_messages_are_errors() {
        assert!(decode(b"no header").is_err());
        assert!(decode(b"1 2 nope 0\n").is_err());
        assert!(decode(b"1 2 output 9\nab").is_err());
        assert!(decode(b"1 2 output 0 not-an-epoch\nab").is_err());
    }

    #[test]
    fn a_header_without_an_epoch_is_read_as_before() {
        let (entry, epoch) = decode_with_epoch(b"7 9 logs 0\nhello").unwrap();
        assert_eq!((entry.seq, epoch), (7, None));
        assert_eq!(&entry.content[..], b"hello");
    }
}

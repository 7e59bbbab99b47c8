//! The JSON envelope sent to clients (SSE `data:` lines, `kubectl agentrun logs -o json`).
//!
//! ```json
//! {"run":"r1","variation":"default","channel":"output","seq":42,"ts":1700000000000,
//!  "type":"output","content":"hello\n","meta":null}
//! ```
//!
//! Content rule: when an entry's bytes are valid UTF-8, `content` is that text. When they are
//! not, `content` holds the bytes in standard base64 and the envelope carries
//! `"encoding":"base64"`. Either way the client can recover the exact bytes. Chunks are cut on
//! UTF-8 character boundaries by the entrypoint whenever it can, so text output is almost
//! always sent as text.

use crate::entry::{Entry, EntryType};
use crate::names::{RunId, StreamName};
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub run: String,
    /// The variation for output and logs; `null` for run-wide channels.
    pub variation: Option<String>,
    /// `output`, `logs`, `status`, `control` or `metrics`.
    pub channel: String,
    pub seq: u64,
    pub ts: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub content: String,
    /// Present (as `"base64"`) only when `content` is base64 because the bytes are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// The entry's meta, parsed as JSON when it is JSON.
    #[serde(default)]
    pub meta: serde_json::Value,
}

impl Envelope {
    pub fn new(run: &RunId, stream: &StreamName, entry: &Entry) -> Self {
        let (content, encoding) = match std::str::from_utf8(&entry.content) {
            Ok(text) => (text.to_owned(), None),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&entry.content),
                Some("base64".to_owned()),
            ),
        };
        let meta = match entry.meta.as_deref() {
            None => serde_json::Value::Null,
            Some(m) => {
                serde_json::from_str(m).unwrap_or_else(|_| serde_json::Value::String(m.into()))
            }
        };
        Envelope {
            run: run.as_str().to_owned(),
            variation: stream.variation().map(|v| v.as_str().to_owned()),
            channel: stream.kind().to_owned(),
            seq: entry.seq,
            ts: entry.ts,
            kind: entry.kind.as_str().to_owned(),
            content,
            encoding,
            meta,
        }
    }

    /// The exact bytes of the entry's content.
    pub fn content_bytes(&self) -> Result<Bytes, base64::DecodeError> {
        match self.encoding.as_deref() {
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(&self.content)
                .map(Bytes::from),
            _ => Ok(Bytes::copy_from_slice(self.content.as_bytes())),
        }
    }

    pub fn entry_type(&self) -> Option<EntryType> {
        EntryType::parse(&self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Variation;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_bytes_survive_the_envelope(content: Vec<u8>) {
            let run = RunId::new("r").unwrap();
            let stream = StreamName::Output(Variation::default_name());
            let entry = Entry { seq: 1, ts: 2, kind: EntryType::Output, content: Bytes::from(content.clone()), meta: None };
            let json = serde_json::to_string(&Envelope::new(&run, &stream, &entry)).unwrap();
            let back: Envelope = serde_json::from_str(&json).unwrap();
            let bytes = back.content_bytes().unwrap();
            prop_assert_eq!(bytes.as_ref(), content.as_slice());
            prop_assert_eq!(back.encoding.is_some(), std::str::from_utf8(&content).is_err());
        }
    }

    #[test]
    fn text_is_sent_as_text_and_meta_as_json() {
        let run = RunId::new("r").unwrap();
        let entry = Entry {
            seq: 3,
            ts: 4,
            kind: EntryType::Gap,
            content: Bytes::from_static(b"h\xc3\xa9"),
            meta: Some(r#"{"droppedBytes":5}"#.into()),
        };
        let env = Envelope::new(&run, &StreamName::Status, &entry);
        let json = serde_json::to_value(&env).unwrap();
        assert_eq!(json["content"], "hé");
        assert_eq!(json["meta"]["droppedBytes"], 5);
        assert_eq!(json["variation"], serde_json::Value::Null);
        assert!(json.get("encoding").is_none());
    }
}

//! The relay's Server-Sent Events: the events besides entries ([`Open`], [`End`], [`Trimmed`],
//! [`Reset`], [`Shutdown`]), typed once for the relay that writes them and the clients that
//! read them (the kubectl plugin, the tests; `relay/ui/app.js` reads the same fields), and a
//! small incremental parser of the subset the relay sends (`id`, `event`, `data`, `retry`,
//! comments). Entries themselves are [`crate::Envelope`]s under their type's name.
//! `docs/relay.md` ("The event stream") describes them for people.

use crate::status::RunState;
use serde::{Deserialize, Serialize};

/// An event the relay sends besides entries; its JSON is the event's `data`.
pub trait ServerEvent: Serialize {
    /// The event's name (`event:` line).
    const NAME: &'static str;
}

// Fields are in the alphabetical order of their JSON names: the order the relay has always
// written them in.

/// First event of every stream: the run and what it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    pub phase: Option<RunState>,
    pub run: String,
    pub variations: Vec<String>,
}

impl ServerEvent for Open {
    const NAME: &'static str = "open";
}

/// Last event of a stream that ends because the run ended (or, for a snapshot, because
/// everything there was has been sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// Whether the run has ended (`false`: a snapshot of a run still going).
    pub finished: bool,
    pub phase: Option<RunState>,
    pub run: String,
}

impl ServerEvent for End {
    const NAME: &'static str = "end";
}

/// Entries a client wanted were trimmed from the stream (`MAXLEN`) before it read them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trimmed {
    /// `output`, `logs`, `status`, `control` or `metrics`.
    pub channel: String,
    /// The first `seq` still in the stream.
    pub first_available: u64,
    /// How many entries were lost to the client (`first_available - wanted`).
    pub missed: u64,
    pub run: String,
    pub variation: Option<String>,
    /// The `seq` the client wanted next.
    pub wanted: u64,
}

impl ServerEvent for Trimmed {
    const NAME: &'static str = "trimmed";
}

/// The client's position is not valid in the run's history (a new epoch, or past the end):
/// every stream starts over from its first entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reset {
    pub message: String,
    pub new_epoch: Option<String>,
    pub old_epoch: Option<String>,
    /// A code: `epoch`, `past-the-end`, ...
    pub reason: String,
    pub run: String,
}

impl ServerEvent for Reset {
    const NAME: &'static str = "reset";
}

/// The relay is stopping: reconnect with this event's id as `Last-Event-ID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    pub reason: String,
    pub run: String,
}

impl ServerEvent for Shutdown {
    const NAME: &'static str = "shutdown";
}

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl Event {
    /// The data as the typed event `E`, when this is an `E` (by name) and its data fits.
    pub fn parse<E: ServerEvent + serde::de::DeserializeOwned>(&self) -> Option<E> {
        (self.event == E::NAME)
            .then(|| serde_json::from_str(&self.data).ok())
            .flatten()
    }
}

/// Incremental parser: [`Parser::push`] bytes, then take events with [`Parser::next_event`].
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    /// The last `id` seen, as an EventSource keeps it for `Last-Event-ID`.
    pub last_id: Option<String>,
    /// The last `retry:` hint in milliseconds.
    pub retry_ms: Option<u64>,
}

impl Parser {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event with data, if one is buffered.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            let end = self.block_end()?;
            let block: Vec<u8> = self.buf.drain(..end).collect();
            let text = String::from_utf8_lossy(&block);
            let mut event = Event {
                id: None,
                event: "message".to_owned(),
                data: String::new(),
            };
            let mut has_data = false;
            for line in text.split('\n') {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if line.is_empty() || line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" if !value.contains('\0') => {
                        event.id = Some(value.to_owned());
                        self.last_id = Some(value.to_owned());
                    }
                    "event" => event.event = value.to_owned(),
                    "data" => {
                        if has_data {
                            event.data.push('\n');
                        }
                        event.data.push_str(value);
                        has_data = true;
                    }
                    "retry" => self.retry_ms = value.parse().ok(),
                    _ => {}
                }
            }
            if has_data {
                return Some(event);
            }
        }
    }

    /// Length of the first complete block including its blank line.
    fn block_end(&self) -> Option<usize> {
        let b = &self.buf;
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\n' {
                if b.get(i + 1) == Some(&b'\n') {
                    return Some(i + 2);
                }
                if b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                    return Some(i + 3);
                }
            }
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_the_json_the_relay_always_wrote() {
        let end = End {
            finished: true,
            phase: Some(RunState::Failed),
            run: "r".into(),
        };
        assert_eq!(
            serde_json::to_string(&end).unwrap(),
            r#"{"finished":true,"phase":"failed","run":"r"}"#
        );
        let trimmed = Trimmed {
            channel: "output".into(),
            first_available: 9,
            missed: 4,
            run: "r".into(),
            variation: None,
            wanted: 5,
        };
        assert_eq!(
            serde_json::to_string(&trimmed).unwrap(),
            r#"{"channel":"output","firstAvailable":9,"missed":4,"run":"r","variation":null,"wanted":5}"#
        );
        let ev = Event {
            id: None,
            event: "trimmed".into(),
            data: serde_json::to_string(&trimmed).unwrap(),
        };
        assert_eq!(ev.parse::<Trimmed>(), Some(trimmed));
        assert_eq!(ev.parse::<End>(), None, "another event's name");
    }

    #[test]
    fn parses_events_split_anywhere() {
        let text = b": hello\nretry: 2000\n\nid: 1.abc\nevent: output\ndata: {\"a\":1}\n\nid: 1.def\nevent: end\ndata: x\ndata: y\r\n\r\n";
        for split in 0..text.len() {
            let mut p = Parser::default();
            let mut got = Vec::new();
            p.push(&text[..split]);
            while let Some(e) = p.next_event() {
                got.push(e);
            }
            p.push(&text[split..]);
            while let Some(e) = p.next_event() {
                got.push(e);
            }
            assert_eq!(got.len(), 2, "split at {split}");
            assert_eq!(got[0].event, "output");
            assert_eq!(got[0].data, "{\"a\":1}");
            assert_eq!(got[1].data, "x\ny");
            assert_eq!(p.last_id.as_deref(), Some("1.def"));
            assert_eq!(p.retry_ms, Some(2000));
        }
    }
}

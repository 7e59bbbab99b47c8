//! A small Server-Sent Events parser (the subset the relay sends: `id`, `event`, `data`,
//! `retry`, comments), fed with chunks of bytes as they arrive.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
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

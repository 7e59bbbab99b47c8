//! The SSE text the relay writes: an entry's shared tail (`event: TYPE`, `data: ENVELOPE`),
//! encoded once per entry for every viewer, and the other events of
//! [`agentrun_protocol::sse`]. Each connection puts its own `id:` line (its cursor) first.

use agentrun_protocol::sse::ServerEvent;
use agentrun_protocol::{Entry, Envelope, RunId, StreamName};
use bytes::{BufMut, Bytes, BytesMut};
use std::time::Duration;
use tokio::time::Instant;

/// The tail of an entry's event, shared by every connection that sends it.
pub fn entry_tail(run: &RunId, stream: &StreamName, entry: &Entry) -> Bytes {
    let envelope = Envelope::new(run, stream, entry);
    let json = serde_json::to_string(&envelope).unwrap_or_else(|_| "{}".to_owned());
    let mut out = String::with_capacity(json.len() + 24);
    out.push_str("event: ");
    out.push_str(entry.kind.as_str());
    out.push_str("\ndata: ");
    out.push_str(&json);
    out.push_str("\n\n");
    Bytes::from(out)
}

/// Appends the tail of one of the relay's own events (after the connection's `id:` line).
pub fn event_tail<E: ServerEvent>(out: &mut BytesMut, event: &E) {
    out.put_slice(b"event: ");
    out.put_slice(E::NAME.as_bytes());
    out.put_slice(b"\ndata: ");
    let data = serde_json::to_vec(event).unwrap_or_else(|_| b"{}".to_vec());
    out.put_slice(&data);
    out.put_slice(b"\n\n");
}

/// A response whose body is `stream`, sent as it comes: with its content type and cache
/// policy, and `X-Accel-Buffering: no` so that a proxy (nginx) does not hold it back.
pub fn streamed<S>(
    stream: S,
    content_type: &'static str,
    cache_control: &'static str,
) -> axum::response::Response
where
    S: futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
{
    use axum::http::{HeaderValue, header};
    use axum::response::IntoResponse;
    let mut response = axum::body::Body::from_stream(stream).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A connection's timed duties: a keep-alive comment every `keepalive`, and, for a caller
/// whose access can be withdrawn, an access re-check every `recheck`. Kept as deadlines that
/// the session looks at when it wakes, so that it arms one timer (for the nearest of them)
/// instead of polling a timer per duty on every delivery.
#[derive(Debug, Clone)]
pub struct Deadlines {
    keepalive: Duration,
    keepalive_at: Instant,
    /// `None`: nothing to re-check (no credential).
    recheck: Option<(Duration, Instant)>,
}

/// What [`Deadlines::due`] found due.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Due {
    pub keepalive: bool,
    pub recheck: bool,
}

impl Deadlines {
    /// Duties from `now`: the first keep-alive one period later, the first re-check likewise.
    pub fn new(now: Instant, keepalive: Duration, recheck: Option<Duration>) -> Self {
        Self {
            keepalive,
            keepalive_at: now + keepalive,
            recheck: recheck.map(|p| (p, now + p)),
        }
    }

    /// The nearest deadline, or `also` if that is nearer (a replay retry).
    pub fn next(&self, also: Option<Instant>) -> Instant {
        let mut at = self.keepalive_at;
        if let Some((_, r)) = self.recheck {
            at = at.min(r);
        }
        also.map_or(at, |a| at.min(a))
    }

    /// The duties due at `now`, each moved to its next time: one period after the one that
    /// fell due, or one period from `now` if the session was too busy to look for longer
    /// than a period (one keep-alive, not a burst of them).
    pub fn due(&mut self, now: Instant) -> Due {
        fn advance(at: &mut Instant, period: Duration, now: Instant) -> bool {
            if *at > now {
                return false;
            }
            *at += period;
            if *at <= now {
                *at = now + period;
            }
            true
        }
        Due {
            keepalive: advance(&mut self.keepalive_at, self.keepalive, now),
            recheck: self
                .recheck
                .as_mut()
                .is_some_and(|(period, at)| advance(at, *period, now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentrun_protocol::sse::{End, Parser};
    use agentrun_protocol::{EntryType, RunState, Variation};

    #[test]
    fn what_the_relay_writes_the_protocols_parser_reads_back() {
        let run = RunId::new("r").unwrap();
        let entry = Entry {
            seq: 3,
            ts: 7,
            kind: EntryType::Output,
            content: Bytes::from_static(b"hi\n"),
            meta: None,
        };
        let mut out = BytesMut::new();
        out.put_slice(b"id: c1\n");
        out.put_slice(&entry_tail(
            &run,
            &StreamName::Output(Variation::default_name()),
            &entry,
        ));
        out.put_slice(b"id: c2\n");
        let end = End {
            finished: true,
            phase: Some(RunState::Succeeded),
            run: "r".into(),
        };
        event_tail(&mut out, &end);
        let mut parser = Parser::default();
        parser.push(&out);
        let first = parser.next_event().unwrap();
        assert_eq!(
            (first.id.as_deref(), first.event.as_str()),
            (Some("c1"), "output")
        );
        let envelope: serde_json::Value = serde_json::from_str(&first.data).unwrap();
        assert_eq!(envelope["content"], "hi\n");
        assert_eq!(envelope["seq"], 3);
        let second = parser.next_event().unwrap();
        assert_eq!(second.parse::<End>(), Some(end));
        assert_eq!(parser.last_id.as_deref(), Some("c2"));
    }

    #[test]
    fn binary_output_is_sent_as_base64() {
        let entry = Entry {
            seq: 1,
            ts: 0,
            kind: EntryType::Output,
            content: Bytes::from_static(&[0xff, 0xfe, 0x00]),
            meta: None,
        };
        let tail = entry_tail(
            &RunId::new("r").unwrap(),
            &StreamName::Output(Variation::default_name()),
            &entry,
        );
        let text = std::str::from_utf8(&tail).unwrap();
        assert!(text.contains("\"encoding\":\"base64\""), "{text}");
    }

    #[test]
    fn deadlines_fall_due_in_turn_and_one_timer_covers_them() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut d = Deadlines::new(t0, 15 * s, Some(30 * s));
        assert_eq!(d.next(None), t0 + 15 * s);
        assert_eq!(d.next(Some(t0 + 2 * s)), t0 + 2 * s);
        assert_eq!(d.due(t0 + 14 * s), Due::default());
        assert_eq!(
            d.due(t0 + 15 * s),
            Due {
                keepalive: true,
                recheck: false
            }
        );
        // The next keep-alive counts from the one that fell due, not from when it was seen.
        assert_eq!(d.next(None), t0 + 30 * s);
        assert_eq!(
            d.due(t0 + 30 * s + Duration::from_millis(5)),
            Due {
                keepalive: true,
                recheck: true
            }
        );
        assert_eq!(d.next(None), t0 + 45 * s);
        // A session busy for several periods sends one keep-alive, then one a period later.
        assert!(d.due(t0 + 100 * s).keepalive);
        assert_eq!(d.next(None), t0 + 115 * s);
        assert!(!d.due(t0 + 100 * s).keepalive);
    }

    #[test]
    fn without_a_credential_nothing_is_rechecked() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, Duration::from_secs(15), None);
        assert_eq!(d.next(None), t0 + Duration::from_secs(15));
        let due = d.due(t0 + Duration::from_secs(3600));
        assert!(due.keepalive && !due.recheck);
    }
}

//! Reading what a request asks for: the run in its path, its query string, and for `GET
//! /api/runs/{run}/events` its parameters and `Last-Event-ID` header, checked; a bad one is a
//! 400 whose message names the parameter at fault and what to send.

use crate::cursor;
use crate::error::ApiError;
use agentrun_protocol::{RunId, Variation};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The run named in a request's path.
pub fn parse_run(run: &str) -> Result<RunId, ApiError> {
    RunId::new(run).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Reads a query string as axum's `Query` does (`serde_urlencoded`), but answers a bad one
/// with an [`ApiError`] (JSON, like every other error of the API) rather than plain text.
/// The query types take every parameter as text and check it themselves, so the only error
/// left here is a parameter given twice, which the message names.
pub fn parse_query<T: DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(query.unwrap_or_default()).map_err(|e| {
        ApiError::bad_request(format!(
            "the query string is not valid: {e}; give each parameter at most once"
        ))
    })
}

#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    /// Comma-separated: output, logs, status, metrics (default all).
    pub channels: Option<String>,
    /// One variation (default all, including variations that appear later).
    pub variation: Option<String>,
    /// earliest (default), now, or a cursor (an `id` the relay sent).
    pub from: Option<String>,
    /// `false` sends the history up to now, then `end`, and closes.
    pub follow: Option<String>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Kinds {
    pub output: bool,
    pub logs: bool,
    pub status: bool,
    pub metrics: bool,
}

/// The channels of `channels`: every one when it names none (absent, empty, or only commas
/// and blanks: never a connection that carries nothing).
pub fn parse_kinds(channels: Option<&str>) -> Result<Kinds, ApiError> {
    let mut names = channels
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .peekable();
    if names.peek().is_none() {
        return Ok(Kinds {
            output: true,
            logs: true,
            status: true,
            metrics: true,
        });
    }
    let mut k = Kinds::default();
    for name in names {
        match name {
            "output" => k.output = true,
            "logs" => k.logs = true,
            "status" => k.status = true,
            "metrics" => k.metrics = true,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown channel {other:?} in `channels`: use any of output, logs, status, metrics (comma-separated)"
                )));
            }
        }
    }
    Ok(k)
}

#[derive(Debug)]
pub enum Start {
    Earliest,
    Now,
    Cursor(cursor::Position),
}

/// What a request for events asks for, checked.
#[derive(Debug)]
pub struct Request {
    pub kinds: Kinds,
    pub variation: Option<Variation>,
    pub follow: bool,
    pub start: Start,
}

/// Checks the query string and the `Last-Event-ID` header of a request for events; a bad one
/// is a 400 that says which parameter is wrong and what to send.
pub fn parse_request(query: Option<&str>, headers: &HeaderMap) -> Result<Request, ApiError> {
    let q: EventsQuery = parse_query(query)?;
    let kinds = parse_kinds(q.channels.as_deref())?;
    let variation = q
        .variation
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|v| Variation::new(v).map_err(|e| ApiError::bad_request(e.to_string())))
        .transpose()?;
    let follow = !matches!(q.follow.as_deref(), Some("false" | "0" | "no"));
    // Last-Event-ID (an EventSource reconnecting) wins over `from`, which stays in its URL.
    let start = match last_event_id(headers).or(q.from).as_deref() {
        None | Some("earliest") => Start::Earliest,
        Some("now") => Start::Now,
        Some(token) => {
            Start::Cursor(cursor::decode(token).map_err(|e| ApiError::bad_request(e.to_string()))?)
        }
    };
    Ok(Request {
        kinds,
        variation,
        follow,
        start,
    })
}

/// The `Last-Event-ID` header (an EventSource reconnecting), trimmed, when it is text and not
/// blank.
pub fn last_event_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::{Cursors, Origin};
    use agentrun_protocol::RunId;
    use agentrun_protocol::replay::MAX_SEQ;
    use agentrun_protocol::{Epoch, StreamName};
    use axum::http::{HeaderValue, StatusCode};
    use proptest::prelude::*;

    fn channel() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("output".to_owned()),
            Just("logs".to_owned()),
            Just("status".to_owned()),
            Just("metrics".to_owned()),
            Just(String::new()),
            Just(" ".to_owned()),
        ]
    }

    fn a_cursor() -> impl Strategy<Value = String> {
        (
            "[a-z0-9.]{1,20}",
            prop::option::of(any::<u64>()),
            0..=MAX_SEQ,
        )
            .prop_map(|(run, epoch, seq)| {
                let run = RunId::new(run).unwrap();
                let mut c = Cursors::new();
                c.insert(StreamName::Status, seq);
                cursor::encode(&Origin::new(&run, epoch.map(Epoch::from_u64)), &c)
            })
    }

    /// A value for any parameter: valid ones of every parameter, and junk.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::collection::vec(channel(), 0..4).prop_map(|c| c.join(",")),
            "[a-z0-9-]{0,10}",
            Just("earliest".to_owned()),
            Just("now".to_owned()),
            a_cursor(),
            Just("false".to_owned()),
            any::<String>(),
        ]
    }

    /// A query string: `key=value` pairs (percent-encoded or not) of the parameters and others,
    /// or arbitrary text.
    fn query() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("channels".to_owned()),
            Just("variation".to_owned()),
            Just("from".to_owned()),
            Just("follow".to_owned()),
            "[a-z%]{0,6}",
        ];
        prop_oneof![
            prop::collection::vec((key, value()), 0..5)
                .prop_map(|pairs| serde_urlencoded::to_string(pairs).unwrap()),
            any::<String>(),
            "[a-z=&%0-9+,.]{0,40}",
        ]
    }

    fn headers(last_event_id: Option<&[u8]>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = last_event_id.and_then(|v| HeaderValue::from_bytes(v).ok()) {
            h.insert("last-event-id", v);
        }
        h
    }

    /// Regression (found by `any_channel_list_is_read_or_refused`): a list that names no
    /// channel is every channel, not a connection that carries nothing.
    #[test]
    fn a_channel_list_naming_none_means_all() {
        for list in [None, Some(""), Some(","), Some(" , ,"), Some(",,\t")] {
            let k = parse_kinds(list).unwrap();
            assert!(k.output && k.logs && k.status && k.metrics, "{list:?}");
        }
    }

    proptest! {
        /// Any query string with any Last-Event-ID is read, or refused with a 400 whose
        /// message names the parameter at fault and what to send: never a panic, and never
        /// axum's plain-text rejection.
        #[test]
        fn any_events_request_is_read_or_refused_naming_the_parameter(
            query in query(),
            lei in prop::option::of(prop_oneof![
                a_cursor().prop_map(String::into_bytes),
                prop::collection::vec(any::<u8>(), 0..40),
            ]),
        ) {
            let h = headers(lei.as_deref());
            if let Err(e) = parse_request(Some(&query), &h) {
                prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                let m = &e.message;
                prop_assert!(
                    m.contains("`channels`")
                        || m.contains("variation name")
                        || m.contains("from=earliest")
                        || m.contains("at most once"),
                    "{}", m
                );
            }
        }

        /// A request with one bad parameter is refused naming that parameter; the same request
        /// with the parameter valid is read as it says.
        #[test]
        fn a_bad_parameter_is_refused_and_a_good_one_read_as_it_says(
            channels in prop::collection::vec(channel(), 0..5),
            variation in prop::option::of("[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"),
            from in prop::option::of(prop_oneof![
                Just("earliest".to_owned()),
                Just("now".to_owned()),
                a_cursor(),
            ]),
            follow in prop::option::of(prop_oneof![
                Just("false"), Just("0"), Just("no"), Just("true"), Just("")
            ]),
            lei in prop::option::of(a_cursor()),
            bad in 0usize..5,
            junk in "[A-Z_!]{1,5}",
        ) {
            let mut pairs: Vec<(&str, String)> = vec![("channels", channels.join(","))];
            if let Some(v) = &variation {
                pairs.push(("variation", v.clone()));
            }
            if let Some(f) = &from {
                pairs.push(("from", f.clone()));
            }
            if let Some(f) = follow {
                pairs.push(("follow", f.to_owned()));
            }
            let h = headers(lei.as_deref().map(str::as_bytes));
            let q = serde_urlencoded::to_string(&pairs).unwrap();
            let r = parse_request(Some(&q), &h).unwrap();
            let named = |c: &str| channels.iter().any(|n| n == c);
            let none = channels.iter().all(|c| c.trim().is_empty());
            prop_assert_eq!(r.kinds.output, none || named("output"));
            prop_assert_eq!(r.kinds.logs, none || named("logs"));
            prop_assert_eq!(r.kinds.status, none || named("status"));
            prop_assert_eq!(r.kinds.metrics, none || named("metrics"));
            prop_assert_eq!(r.variation.as_ref().map(Variation::as_str), variation.as_deref());
            prop_assert_eq!(r.follow, !matches!(follow, Some("false" | "0" | "no")));
            match (lei.as_ref().or(from.as_ref()).map(String::as_str), r.start) {
                (None | Some("earliest"), Start::Earliest) | (Some("now"), Start::Now) => {}
                (Some(token), Start::Cursor(p)) => {
                    prop_assert_eq!(p, cursor::decode(token).unwrap());
                }
                (want, got) => prop_assert!(false, "{:?} read as {:?}", want, got),
            }

            let (name, value) = match bad {
                0 => ("channels", format!("output,{junk}")),
                1 => ("variation", junk.clone()),
                2 => ("from", format!("2.{junk}")),
                3 => ("last-event-id", format!("1.{junk}")),
                _ => ("channels", "status".to_owned()),
            };
            let mut h = h;
            if bad == 2 {
                h.remove("last-event-id"); // it would win over `from`
            }
            if name == "last-event-id" {
                h.insert("last-event-id", HeaderValue::from_str(&value).unwrap());
            } else {
                pairs.retain(|(k, _)| *k != name);
                pairs.push((name, value));
            }
            if bad == 4 {
                pairs.push(("channels", "logs".to_owned())); // given twice
            }
            let e = parse_request(Some(&serde_urlencoded::to_string(&pairs).unwrap()), &h)
                .unwrap_err();
            prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
            let needle = match bad {
                0 => "`channels`",
                1 => "variation name",
                2 | 3 => "Last-Event-ID",
                _ => "`channels`",
            };
            prop_assert!(e.message.contains(needle), "{}: {}", needle, e.message);
        }

        /// Any Last-Event-ID header is read (trimmed, when it is text and not blank) or
        /// ignored, never a panic.
        #[test]
        fn any_last_event_id_is_read_or_ignored(value in prop::collection::vec(any::<u8>(), 0..64)) {
            let h = headers(Some(&value));
            let got = last_event_id(&h);
            let want = h
                .get("last-event-id")
                .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
                .filter(|v| v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
                .map(str::trim)
                .filter(|v| !v.is_empty());
            prop_assert_eq!(got.as_deref(), want);
        }

        /// `parse_kinds` takes any text: a comma-separated list of the four channels (blanks
        /// ignored; naming none means all), anything else refused naming the parameter.
        /// Found by this property: `channels=,` gave a connection that carried nothing.
        #[test]
        fn any_channel_list_is_read_or_refused(
            list in prop_oneof![
                prop::collection::vec(prop_oneof![channel(), "[a-z ]{0,8}"], 0..5)
                    .prop_map(|c| c.join(",")),
                any::<String>(),
            ],
        ) {
            let names: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
            let known = ["output", "logs", "status", "metrics"];
            match parse_kinds(Some(&list)) {
                Ok(k) => {
                    prop_assert!(names.iter().all(|n| known.contains(n)));
                    let has = |c: &str| names.is_empty() || names.contains(&c);
                    prop_assert_eq!(
                        (k.output, k.logs, k.status, k.metrics),
                        (has("output"), has("logs"), has("status"), has("metrics"))
                    );
                }
                Err(e) => {
                    prop_assert!(names.iter().any(|n| !known.contains(n)));
                    prop_assert!(e.message.contains("`channels`"), "{}", e.message);
                }
            }
        }
    }
}

//! The JSON API: runs, a run's state, control messages, health and metrics.

use crate::AppState;
use crate::auth::Access;
use crate::error::ApiError;
use crate::listing::{ListQuery, RunSummary, summary};
use crate::query::{parse_query, parse_run};
use agentrun_protocol::{ControlError, ControlMessage, EntryType, NewEntry, StreamName, Variation};
use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// `GET /api/runs?limit=N&namespace=NS&phase=PHASE&name=TEXT&after=TOKEN`: live and archived
/// runs, newest first, with their state: `{"runs": [...], "next": TOKEN or null}` (see
/// [`crate::listing`]).
pub async fn list_runs(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    RawQuery(query): RawQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let query = parse_query::<ListQuery>(query.as_deref())?;
    Ok(Json(
        crate::listing::list_runs(&state, &access, &query).await?,
    ))
}

/// `GET /api/runs/{run}`: the run's state hash, summarised (from its archive's manifest once
/// Redis no longer holds it: `"archived": true`).
pub async fn get_run(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(run): Path<String>,
) -> Result<Json<RunSummary>, ApiError> {
    let run = parse_run(&run)?;
    let located = crate::archived::locate(&state, &access, &run).await?;
    let mut summary = summary(run.as_str(), None, located.state());
    summary.archived = located.is_archived();
    Ok(Json(summary))
}

/// The longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The request's `Idempotency-Key`, if it has one.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| {
            !k.is_empty()
                && k.len() <= MAX_IDEMPOTENCY_KEY
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        })
        .map(|k| Some(k.to_owned()))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters of A-Z a-z 0-9 - _ . : (a random id, one per action, sent again unchanged when the request is retried)"
            ))
        })
}

/// Reads the body of a control request: a valid [`ControlMessage`] naming a valid variation
/// (if any), at most [`agentrun_protocol::MAX_CONTROL_BYTES`] (413 beyond).
pub fn parse_control(body: &[u8]) -> Result<ControlMessage, ApiError> {
    let msg = ControlMessage::parse(body).map_err(|e| match e {
        ControlError::TooLarge(_) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        e => ApiError::bad_request(e.to_string()),
    })?;
    if let Some(v) = &msg.variation {
        Variation::new(v.clone()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    Ok(msg)
}

/// `POST /api/runs/{run}/control`: publishes a control message to the run's agents.
///
/// With an `Idempotency-Key` header the message is published once per run, client and key,
/// however often the request is sent: the key (with a digest of the client) is the entry's
/// producer and the entry its producer sequence 1, so the publish function skips a retry as a
/// re-send. The answer to a retry has `"duplicate": true` and no `seq`. Without the header,
/// each request is a new message.
pub async fn control(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(run): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if let Err(r) = state.limiter.control(access.client_key()) {
        return Ok(r);
    }
    let run = parse_run(&run)?;
    let key = idempotency_key(&headers)?;
    let msg = parse_control(&body)?;
    let hash: HashMap<String, String> = state
        .query(redis::cmd("HGETALL").arg(run.state_key()))
        .await?;
    access.check_control(&run, &hash).await?;
    let entry = |pseq| NewEntry::now(pseq, EntryType::Control, msg.to_json());
    // Sent again as is when the connection had dropped: the function skips a re-send.
    let publish = |producer: String, entry: NewEntry| {
        let state = state.clone();
        let run = run.clone();
        async move {
            let (producer, entry, run) = (&producer, &entry, &run);
            state
                .redis(|mut conn| {
                    let publisher = &state.publisher;
                    async move {
                        publisher
                            .publish_one(&mut conn, run, &StreamName::Control, producer, entry)
                            .await
                    }
                })
                .await
        }
    };
    let outcome = match &key {
        Some(key) => {
            let client = crate::kube_auth::digest(access.client_key());
            let producer = format!(
                "key:{:02x}{:02x}{:02x}{:02x}:{key}",
                client[0], client[1], client[2], client[3]
            );
            publish(producer, entry(1)).await?
        }
        None => {
            let _order = state.control_lock.lock().await;
            let pseq = state.control_pseq.fetch_add(1, Ordering::SeqCst) + 1;
            publish(state.producer_id.clone(), entry(pseq)).await?
        }
    };
    let duplicate = outcome.appended == 0;
    if duplicate {
        tracing::info!(%run, action = %msg.action, "control request retried with the same Idempotency-Key; already published");
    } else {
        state.metrics.control_messages.inc();
        tracing::info!(%run, action = %msg.action, variation = msg.variation.as_deref().unwrap_or("*"), "control message published");
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "run": run.as_str(),
            "action": msg.action.as_str(),
            "variation": msg.variation,
            "seq": (!duplicate).then_some(outcome.last_seq),
            "duplicate": duplicate,
        })),
    )
        .into_response())
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            agentrun_protocol::telemetry::METRICS_CONTENT_TYPE,
        )],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when Redis answers.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let ping = tokio::time::timeout(
        Duration::from_secs(2),
        state.query::<String>(&redis::cmd("PING")),
    )
    .await;
    match ping {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(_) => state.redis_error("timed out after 2 s").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentrun_protocol::{ControlAction, MAX_CONTROL_BYTES};
    use proptest::prelude::*;

    proptest! {
        /// Any query string of `GET /api/runs` gives a limit from 1 to 1000, or a 400 that names
        /// `limit` (not a number) or says a parameter was given twice: never a panic, and
        /// never axum's plain-text rejection.
        #[test]
        fn any_list_query_gives_a_limit_in_range_or_a_400_naming_it(
            query in prop_oneof![
                any::<String>(),
                "(limit=[0-9+-]{0,25}&?){0,3}",
                prop::collection::vec(("[a-z]{0,6}", any::<String>()), 0..3)
                    .prop_map(|pairs| serde_urlencoded::to_string(pairs).unwrap()),
            ],
        ) {
            match parse_query::<ListQuery>(Some(&query)).and_then(|q| q.limit()) {
                Ok(n) => prop_assert!((1..=1000).contains(&n)),
                Err(e) => {
                    prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                    prop_assert!(e.message.contains("limit"), "{}", e.message);
                }
            }
        }

        /// A number is taken and brought into 1 to 1000 (however many digits it has); anything
        /// else is refused.
        #[test]
        fn a_limit_is_a_number_brought_into_range(
            digits in "[0-9]{1,40}",
            junk in "[0-9]{0,3}[a-zA-Z+.,-]{1,3}[0-9]{0,3}",
        ) {
            let limit = |v: &str| ListQuery { limit: Some(v.to_owned()), ..Default::default() }.limit();
            let want = digits.parse::<u128>().map_or(1000, |n| n.clamp(1, 1000) as usize);
            prop_assert_eq!(limit(&digits).unwrap(), want);
            prop_assert!(limit(&junk).unwrap_err().message.contains("`limit`"));
        }

        /// Any control body is a message or a 400 (413 over the size limit), never a panic; a
        /// valid message for a valid variation (or all) is read back as sent.
        #[test]
        fn any_control_body_is_read_or_refused_never_a_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..256),
            action in prop::sample::select(vec![
                ControlAction::Pause,
                ControlAction::Resume,
                ControlAction::Stop,
                ControlAction::Stdin,
            ]),
            variation in prop::option::of(prop_oneof![
                "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?",
                any::<String>(),
            ]),
            data in any::<String>(),
        ) {
            if let Err(e) = parse_control(&bytes) {
                prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
            }
            let msg = ControlMessage {
                action,
                variation: variation.clone(),
                data: (action == ControlAction::Stdin).then_some(data),
            };
            match parse_control(&msg.to_json()) {
                Ok(back) => prop_assert_eq!(back, msg),
                Err(e) => {
                    let v = variation.unwrap_or_default();
                    prop_assert!(Variation::new(v.clone()).is_err(), "{v:?}: {}", e.message);
                    prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                    prop_assert!(e.message.contains("variation name"), "{}", e.message);
                }
            }
        }
    }

    /// A control body over the limit is refused with 413 before it is parsed, whatever
    /// `--max-body-bytes` lets through.
    #[test]
    fn an_oversize_control_body_is_refused() {
        let mut msg = ControlMessage::new(ControlAction::Stdin);
        msg.data = Some("x".repeat(MAX_CONTROL_BYTES));
        let e = parse_control(&msg.to_json()).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("too large"), "{}", e.message);
        let e = parse_control(&vec![b'{'; MAX_CONTROL_BYTES + 1]).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}

//! Watches: a chunked stream of `{"type": ..., "object": ...}` lines, from "now" (synthetic
//! ADDED events for what exists) or from a `resourceVersion` in the event history, with
//! selector transitions, bookmarks, `sendInitialEvents` and `410 Gone` as an ERROR event.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::apiserver::App;
use crate::apiserver::errors::ApiError;
use crate::apiserver::http::{Query, Target, as_version, key, selectors};
use crate::apiserver::store::{Event, EventType};
use crate::apiserver::table;

fn event_line(kind: &str, object: Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// A watch: a chunked stream of `{"type": ..., "object": ...}` lines.
pub(super) fn watch(
    app: &Arc<App>,
    target: &Target,
    q: &Query,
    wants_table: bool,
) -> Result<Response, ApiError> {
    let (ls, fs) = selectors(q)?;
    let send_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(_) if send_initial => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?,
        ),
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let include = q
        .get("includeObject")
        .cloned()
        .unwrap_or_else(|| "Metadata".into());
    let ns = (!target.ns.is_empty()).then(|| target.ns.clone());
    let t = target.t.clone();
    let k = key(&t);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let matches = move |o: &Value| ls.matches(o) && fs.matches(o);
    let render = {
        let t = t.clone();
        move |o: Value| -> Value {
            let o = as_version(&t, o);
            if wants_table {
                let rv = o
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                table::table(&t, &[o], rv, &include)
            } else {
                o
            }
        }
    };
    let (initial, mut events, current_rv) = match app.store.watch_from(&k, ns.as_deref(), from) {
        Ok(x) => x,
        Err(e) if e.code == 410 => {
            // Like the real API server: the error arrives as an event in a 200 stream.
            let line = event_line("ERROR", e.to_status());
            let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(line) });
            return Ok(watch_response(Body::from_stream(stream)));
        }
        Err(e) => return Err(e),
    };
    let interval = app.bookmark_interval;
    let bookmark_obj = {
        let t = t.clone();
        move |rv: u64, end: bool| {
            let mut m = json!({"resourceVersion": rv.to_string()});
            if end {
                m["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            json!({"kind": t.kind, "apiVersion": t.api_version(), "metadata": m})
        }
    };
    tokio::spawn(async move {
        let mut last_rv = from
            .unwrap_or(0)
            .max(if from.is_none() { current_rv } else { 0 });
        for ev in initial {
            if !send_event(&tx, &ev, &matches, &render).await {
                return;
            }
            if from.is_some() {
                last_rv = last_rv.max(ev.rv);
            }
        }
        if from.is_none() {
            last_rv = current_rv;
        }
        if send_initial && bookmarks {
            let line = event_line("BOOKMARK", bookmark_obj(last_rv, true));
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(Ok(event_line("BOOKMARK", bookmark_obj(last_rv, false)))).await.is_err() {
                        return;
                    }
                }
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= last_rv || ev.key != k || ns.as_ref().is_some_and(|n| *n != ev.namespace) {
                            continue;
                        }
                        last_rv = ev.rv;
                        if !send_event(&tx, &ev, &matches, &render).await {
                            return;
                        }
                    }
                    // Lagged or closed: end the watch; the client resumes from its last rv.
                    Err(_) => return,
                }
            }
        }
    });
    Ok(watch_response(Body::from_stream(ReceiverStream::new(rx))))
}

fn watch_response(body: Body) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn send_event(
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    ev: &Event,
    matches: &impl Fn(&Value) -> bool,
    render: &impl Fn(Value) -> Value,
) -> bool {
    let now = matches(&ev.object);
    let before = ev.old.as_ref().is_some_and(matches);
    let kind = match ev.kind {
        EventType::Added if now => "ADDED",
        EventType::Modified if now && before => "MODIFIED",
        EventType::Modified if now => "ADDED",
        EventType::Modified if before => "DELETED",
        EventType::Deleted if now || before => "DELETED",
        _ => return true,
    };
    tx.send(Ok(event_line(kind, render(ev.object.clone()))))
        .await
        .is_ok()
}

//! `GET /api/runs/{run}/variations/{variation}/output`: a variation's output, the agent's bytes
//! as they are in the stream (or its archive, once Redis no longer holds the run), streamed page by page (at most [`PAGE`] entries in memory per
//! request), named after the run for the browser's download.
//!
//! The body is the output entries' content in stream order; `gap` entries (output that never
//! reached Redis) add nothing, and neither does history already trimmed away: the
//! `X-Agentrun-First-Seq` header says where the stream started when the download began, so a
//! caller can tell a complete download (`1`) from a trimmed one.

use agentrun_protocol::{EntryType, StreamName};
use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::AppState;
use crate::auth::Access;
use crate::error::ApiError;

/// Entries read from Redis at a time (each at most the sidecar's chunk size, 64 KiB).
pub const PAGE: usize = 64;

pub async fn output(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path((run, variation)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (run, variation, source) =
        crate::output::visible_variation(&state, &access, &run, &variation).await?;
    let stream = StreamName::Output(variation.clone());
    let first = source
        .read_page(&state, &run, &stream, 0, 1)
        .await
        .map_err(|e| state.redis_error(e))?;
    let first_seq = first.page.entries.first().map_or(0, |e| e.seq);
    let (app, id) = (state.clone(), run.clone());
    let body = futures::stream::unfold(Some(0u64), move |cursor| {
        let (app, id, stream, source) = (app.clone(), id.clone(), stream.clone(), source.clone());
        async move {
            let after = cursor?;
            match source.read_page(&app, &id, &stream, after, PAGE).await {
                Ok(found) => {
                    let last = found.page.entries.last()?.seq;
                    let mut bytes = Vec::new();
                    for e in found
                        .page
                        .entries
                        .iter()
                        .filter(|e| e.kind == EntryType::Output)
                    {
                        bytes.extend_from_slice(&e.content);
                    }
                    Some((Ok(Bytes::from(bytes)), Some(last)))
                }
                // The status line is sent: the connection ends short, which clients see.
                Err(e) => Some((Err(std::io::Error::other(e)), None)),
            }
        }
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // Run ids and variation names are plain ASCII without quotes (protocol names).
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{run}-{variation}.txt\""))
    {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("x-agentrun-first-seq", HeaderValue::from(first_seq));
    Ok(response)
}

//! Request limits: in-flight requests, request body size, SSE connections per client and in
//! total, control requests per client per second. Each refusal is a 429 (413 for a body)
//! with `Retry-After` and a JSON body naming the limit and its flag.

use crate::AppState;
use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Settings of the limits (from the flags).
#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub max_in_flight: usize,
    pub max_body_bytes: usize,
    /// 0: no per-client limit.
    pub max_sse_per_client: usize,
    pub max_sse_total: usize,
    pub control_per_second: f64,
    pub control_burst: f64,
}

pub struct Limiter {
    pub settings: LimitSettings,
    in_flight: Arc<tokio::sync::Semaphore>,
    sse: Arc<Mutex<SseCounts>>,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

#[derive(Default)]
struct SseCounts {
    total: usize,
    per_client: HashMap<String, usize>,
}

/// Held by an open SSE connection; frees its place when dropped.
pub struct SseSlot {
    counts: Arc<Mutex<SseCounts>>,
    client: String,
}

impl Drop for SseSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.per_client.remove(&self.client);
            }
        }
    }
}

pub fn too_many(limit: &str, flag: &str, retry_after: u64) -> Response {
    let mut r = (
        StatusCode::TOO_MANY_REQUESTS,
        Json(serde_json::json!({
            "error": format!("limit reached: {limit} (set by {flag}); retry after {retry_after} s"),
            "limit": flag.trim_start_matches("--"),
        })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
    r
}

impl Limiter {
    pub fn new(settings: LimitSettings) -> Self {
        Self {
            in_flight: Arc::new(tokio::sync::Semaphore::new(settings.max_in_flight.max(1))),
            settings,
            sse: Arc::default(),
            buckets: Mutex::default(),
        }
    }

    /// A place for one more SSE connection of `client`, or the 429 to answer.
    #[allow(clippy::result_large_err)]
    pub fn sse_slot(&self, client: &str) -> Result<SseSlot, Response> {
        let mut c = self.sse.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.settings.max_sse_total {
            return Err(too_many(
                "too many SSE connections on this relay",
                "--max-sse-total",
                5,
            ));
        }
        let mine = c.per_client.get(client).copied().unwrap_or(0);
        if self.settings.max_sse_per_client > 0 && mine >= self.settings.max_sse_per_client {
            return Err(too_many(
                "too many SSE connections from this client; close some first",
                "--max-sse-per-client",
                5,
            ));
        }
        c.total += 1;
        *c.per_client.entry(client.to_owned()).or_insert(0) += 1;
        Ok(SseSlot {
            counts: self.sse.clone(),
            client: client.to_owned(),
        })
    }

    /// Takes one control request from `client`'s token bucket.
    #[allow(clippy::result_large_err)]
    pub fn control(&self, client: &str) -> Result<(), Response> {
        let rate = self.settings.control_per_second.max(0.001);
        let burst = self.settings.control_burst.max(1.0);
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() > 10_000 {
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = b.entry(client.to_owned()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - *tokens) / rate).ceil() as u64;
            Err(too_many(
                "too many control requests from this client",
                "--control-per-second",
                wait,
            ))
        }
    }
}

/// Middleware on every route: the server-wide in-flight cap and the body size.
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limiter = &state.limiter;
    let max = limiter.settings.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return body_too_large(max);
    }
    let Ok(_permit) = limiter.in_flight.clone().try_acquire_owned() else {
        return too_many(
            "too many requests in flight on this relay",
            "--max-in-flight",
            1,
        );
    };
    let resp = next.run(req).await;
    // A body without Content-Length that went over the limit (axum's own 413).
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return body_too_large(max);
    }
    resp
}

pub fn body_too_large(max: usize) -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        Json(serde_json::json!({
            "error": format!("request body too large: at most {max} bytes (set by --max-body-bytes)"),
            "limit": "max-body-bytes",
        })),
    )
        .into_response()
}

/// The peer address that `serve` attaches to each request.
pub fn peer(req_ext: &axum::http::Extensions) -> Option<SocketAddr> {
    req_ext
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a)
}

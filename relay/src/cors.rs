//! `--cors-origins`: lets pages of other origins call the API with a bearer token.
//!
//! Off unless configured: then the relay sends no CORS header at all, and browsers keep other
//! origins' pages from reading its answers. When configured, a request whose `Origin` is one of
//! the listed origins (exactly: scheme, host and port) gets `Access-Control-Allow-Origin` with
//! that origin; other origins get nothing. Credentials are not allowed cross-origin
//! (`Access-Control-Allow-Credentials` is never sent): such pages send the token in the
//! `Authorization` header (or `?access_token=` for EventSource), never the session cookie.
//! Preflight requests (`OPTIONS` with `Access-Control-Request-Method`) to the API are answered
//! here, before authentication (browsers send no credentials with them).

use crate::AppState;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

const ALLOW_METHODS: &str = "GET, POST, DELETE, OPTIONS";
const ALLOW_HEADERS: &str =
    "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, X-Agentrun-Request";
const EXPOSE_HEADERS: &str = "Retry-After, WWW-Authenticate";
/// How long browsers may keep a preflight answer, in seconds.
const MAX_AGE: &str = "600";

/// An origin as browsers send it: no trailing slash.
pub fn normalize(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_owned()
}

/// The request's `Origin` when it is one of `allowed`.
fn allowed_origin(headers: &HeaderMap, allowed: &[String]) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    allowed.iter().any(|a| a == text).then(|| origin.clone())
}

/// Middleware on the `/api` routes (outside authentication).
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let origins = &state.cors_origins;
    if origins.is_empty() {
        return next.run(req).await;
    }
    let origin = allowed_origin(req.headers(), origins);
    let preflight = req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight {
        match &origin {
            Some(_) => StatusCode::NO_CONTENT.into_response(),
            None => ApiError::new(
                StatusCode::FORBIDDEN,
                "this origin is not in the relay's --cors-origins (AGENTRUN_CORS_ORIGINS)",
            )
            .into_response(),
        }
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = origin {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(ALLOW_METHODS),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOW_HEADERS),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static(MAX_AGE),
            );
        } else {
            h.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSE_HEADERS),
            );
        }
    }
    resp
}

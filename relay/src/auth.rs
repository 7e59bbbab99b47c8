//! Authentication and authorization of API requests, and cross-site protection.
//!
//! `--auth none` lets everyone see and control every run (local demo). `--auth token` reads
//! bearer tokens from `--tokens-file`: one token per line, optionally followed by the
//! namespaces it may see (none listed: all namespaces, and local runs). A token is accepted
//! from the `Authorization: Bearer` header, the `access_token` query parameter, or the
//! `agentrun_token` cookie set by `POST /api/session`. Tokens are never logged.

use crate::AppState;
use crate::api::ApiError;
use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::path::Path;

pub const COOKIE: &str = "agentrun_token";
/// The header the UI sends on control requests; a cross-site form cannot set it.
pub const REQUEST_HEADER: &str = "x-agentrun-request";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// No authentication: anyone who reaches the relay sees and controls every run.
    None,
    /// Bearer tokens from --tokens-file.
    Token,
}

/// One configured token.
#[derive(Debug, Clone)]
struct TokenEntry {
    token: Vec<u8>,
    /// `None`: every namespace and local runs.
    namespaces: Option<Vec<String>>,
    /// Position in the file, used as the client's name (never the token itself).
    index: usize,
}

/// What the relay knows about callers: the mode and the tokens.
#[derive(Debug, Clone)]
pub struct Authenticator {
    mode: AuthMode,
    tokens: Vec<TokenEntry>,
}

/// What a caller may see; inserted into each API request by [`layer`].
#[derive(Debug, Clone)]
pub struct Access {
    /// `None`: everything.
    namespaces: Option<Vec<String>>,
    /// Who the caller is for limits: `token#N`, else its IP address.
    pub client: Option<String>,
}

impl Access {
    pub fn all() -> Self {
        Self {
            namespaces: None,
            client: None,
        }
    }

    /// The key of the per-client limits.
    pub fn client_key(&self) -> &str {
        self.client.as_deref().unwrap_or("unknown")
    }

    /// Whether the caller may see (and control) a run with this state hash.
    pub fn can_see(&self, state: &HashMap<String, String>) -> bool {
        match &self.namespaces {
            None => true,
            Some(list) => state
                .get("namespace")
                .is_some_and(|ns| list.iter().any(|n| n == ns)),
        }
    }
}

/// Compares in time that depends only on the lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator {
    pub fn none() -> Self {
        Self {
            mode: AuthMode::None,
            tokens: Vec::new(),
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Reads a tokens file (see the module documentation).
    pub fn from_tokens_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the tokens file {}: {e}; pass --tokens-file (AGENTRUN_TOKENS_FILE) with one token per line",
                path.display()
            )
        })?;
        Self::from_tokens(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_tokens(text: &str) -> anyhow::Result<Self> {
        let mut tokens = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            let Some(token) = words.next() else { continue };
            if !token
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'))
            {
                anyhow::bail!(
                    "line {}: a token may hold printable ASCII except ; , \" and \\ (it is sent in a cookie)",
                    n + 1
                );
            }
            let namespaces: Vec<String> = words.map(str::to_owned).collect();
            tokens.push(TokenEntry {
                token: token.as_bytes().to_vec(),
                namespaces: (!namespaces.is_empty()).then_some(namespaces),
                index: tokens.len() + 1,
            });
        }
        if tokens.is_empty() {
            anyhow::bail!("no tokens: write one bearer token per line");
        }
        Ok(Self {
            mode: AuthMode::Token,
            tokens,
        })
    }

    fn check(&self, token: &str) -> Option<Access> {
        let mut found = None;
        // Compare with every entry so the time does not say which one matched.
        for t in &self.tokens {
            if ct_eq(&t.token, token.as_bytes()) && found.is_none() {
                found = Some(Access {
                    namespaces: t.namespaces.clone(),
                    client: Some(format!("token#{}", t.index)),
                });
            }
        }
        found
    }
}

/// Where a credential came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Header,
    Query,
    Cookie,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "access_token").then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or(""), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn credential(req: &Request) -> Option<(String, Source)> {
    if let Some(t) = bearer(req.headers()) {
        return Some((t.to_owned(), Source::Header));
    }
    if let Some(t) = query_token(req.uri().query()) {
        return Some((t, Source::Query));
    }
    cookie(req.headers()).map(|t| (t.to_owned(), Source::Cookie))
}

pub fn unauthorized(message: &str) -> Response {
    let mut r = (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"agentrun-relay\""),
    );
    r
}

const HOW: &str = "send a token of the relay's --tokens-file as 'Authorization: Bearer TOKEN', or POST it to /api/session (a cookie for the browser), or add ?access_token=TOKEN to an events URL";

/// Whether an `Origin` header (when present) names this relay or an allowed origin.
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    if allowed.iter().any(|a| a.trim_end_matches('/') == origin) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (host, origin.split_once("://")) {
        (Some(host), Some((scheme, rest))) => {
            matches!(scheme, "http" | "https") && rest.eq_ignore_ascii_case(host)
        }
        _ => false,
    }
}

fn forbidden(message: String) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, message).into_response()
}

/// Middleware on every `/api` route: cross-site checks, then authentication.
pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let auth = &state.inner.auth;
    let unsafe_method = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if unsafe_method && !origin_allowed(req.headers(), &state.inner.allowed_origins) {
        return forbidden(
            "cross-site request refused: the Origin header is not this relay's origin; add it to --allowed-origins if it is trusted".into(),
        );
    }
    let is_session = req.uri().path() == "/api/session";
    let access = match auth.mode {
        AuthMode::None => Access::all(),
        AuthMode::Token if is_session => Access::all(),
        AuthMode::Token => {
            let Some((token, source)) = credential(&req) else {
                return unauthorized(&format!("authentication required: {HOW}"));
            };
            let Some(access) = auth.check(&token) else {
                return unauthorized(&format!("the token was not accepted: {HOW}"));
            };
            if unsafe_method
                && source != Source::Header
                && req
                    .headers()
                    .get(REQUEST_HEADER)
                    .is_none_or(|v| v.as_bytes() != b"1")
            {
                return forbidden(format!(
                    "a control request authenticated by cookie or query alone is refused (cross-site protection): send the token in the Authorization header, or add the header '{REQUEST_HEADER}: 1'"
                ));
            }
            access
        }
    };
    let mut access = access;
    if access.client.is_none() {
        access.client = crate::limits::peer(req.extensions()).map(|p| p.ip().to_string());
    }
    req.extensions_mut().insert(access);
    next.run(req).await
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct SessionBody {
    pub token: Option<String>,
}

/// `POST /api/session`: checks a token (JSON body `{"token": "..."}` or the Authorization
/// header) and sets it as an HttpOnly cookie, so EventSource connections carry it.
pub async fn create_session(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let auth = &state.inner.auth;
    if auth.mode == AuthMode::None {
        return (StatusCode::OK, Json(serde_json::json!({ "auth": "none" }))).into_response();
    }
    let from_body = serde_json::from_slice::<SessionBody>(&body)
        .ok()
        .and_then(|b| b.token);
    let Some(token) = from_body.or_else(|| bearer(&headers).map(str::to_owned)) else {
        return ApiError::bad_request(
            "send the token as JSON {\"token\": \"...\"} or in the Authorization header",
        )
        .into_response();
    };
    if auth.check(&token).is_none() {
        return unauthorized(&format!("the token was not accepted: {HOW}"));
    }
    let mut r = (StatusCode::OK, Json(serde_json::json!({ "auth": "token" }))).into_response();
    // Behind a TLS-terminating proxy (or an https page), the cookie is never sent in clear.
    let https = headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
        || headers
            .get(header::ORIGIN)
            .is_some_and(|v| v.as_bytes().starts_with(b"https://"));
    let secure = if https { "; Secure" } else { "" };
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{secure}"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `DELETE /api/session`: clears the cookie.
pub async fn delete_session() -> Response {
    (
        StatusCode::OK,
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
        Json(serde_json::json!({})),
    )
        .into_response()
}

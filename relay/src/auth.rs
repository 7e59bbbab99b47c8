// Long file: three authentication modes behind one Access type, with token reloading and session cookies.
//! Authentication and authorization of API requests, and cross-site protection.
//!
//! `--auth none` lets everyone see and control every run (local demo). `--auth token` reads
//! bearer tokens from `--tokens-file`: one token per line, optionally followed by the
//! namespaces it may see (none listed: all namespaces, and local runs); the file is read again
//! when it changes (polled every `--tokens-reload-seconds`, and on SIGHUP). `--auth kubernetes`
//! checks the token with a TokenReview and each run with SubjectAccessReviews on its AgentRun
//! ([`crate::kube_auth`]). A token is accepted from the `Authorization: Bearer` header, the
//! `access_token` query parameter, or the `agentrun_token` cookie set by `POST /api/session`.
//! Tokens are never logged.

use crate::AppState;
use crate::error::ApiError;
use crate::kube_auth::{Caller, KubeAuth, Verb};
use agentrun_protocol::names::is_dns_label;
use agentrun_protocol::state_hash;
use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

pub const COOKIE: &str = "agentrun_token";
/// The header the UI sends on control requests; a cross-site form cannot set it.
pub const REQUEST_HEADER: &str = "x-agentrun-request";
/// Access reviews made at once while filtering a list of runs.
const LIST_REVIEWS_AT_ONCE: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// No authentication: anyone who reaches the relay sees and controls every run.
    None,
    /// Bearer tokens from --tokens-file.
    Token,
    /// Kubernetes bearer tokens (TokenReview); runs by RBAC on their AgentRun
    /// (SubjectAccessReview: get to view, update to control).
    Kubernetes,
}

impl AuthMode {
    fn as_str(self) -> &'static str {
        match self {
            AuthMode::None => "none",
            AuthMode::Token => "token",
            AuthMode::Kubernetes => "kubernetes",
        }
    }
}

/// One configured token.
#[derive(Debug, Clone)]
struct TokenEntry {
    token: Vec<u8>,
    /// `None`: every namespace and local runs.
    namespaces: Option<Arc<[String]>>,
    /// The client's name for limits: `token:` and the start of the token's SHA-256 (never
    /// the token itself), stable when the file is re-read.
    client: String,
}

type TokenList = Arc<RwLock<Arc<Vec<TokenEntry>>>>;

/// What the relay knows about callers: the mode, the tokens, the Kubernetes client.
#[derive(Debug, Clone)]
pub struct Authenticator {
    mode: AuthMode,
    tokens: TokenList,
    kube: Option<Arc<KubeAuth>>,
}

/// What a caller may see and do.
#[derive(Debug, Clone)]
enum Scope {
    All,
    Namespaces(Arc<[String]>),
    Kube {
        auth: Arc<KubeAuth>,
        caller: Arc<Caller>,
    },
}

/// What a caller may see; inserted into each API request by [`layer`].
#[derive(Debug, Clone)]
pub struct Access {
    scope: Scope,
    /// Who the caller is for limits: `token:HASH`, `user:NAME`, else its IP address.
    pub client: Option<String>,
    /// The token the request came with, to check an open stream again later.
    credential: Option<Credential>,
}

/// A token held while a request (or its stream) lasts; its `Debug` does not show it.
#[derive(Clone)]
struct Credential(Arc<str>);

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

fn unavailable(e: crate::kube_auth::Unavailable) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.0)
}

impl Access {
    pub fn all() -> Self {
        Self {
            scope: Scope::All,
            client: None,
            credential: None,
        }
    }

    /// Whether the request's token still lets it see the run: it is still in the tokens file,
    /// the API server still accepts it and still allows `get`. `None` when that cannot be told
    /// now (the API server is away); always `Some(true)` without authentication.
    pub async fn still_allowed(
        &self,
        auth: &Authenticator,
        state: &HashMap<String, String>,
    ) -> Option<bool> {
        let Some(Credential(token)) = &self.credential else {
            return Some(true);
        };
        match auth.check(token).await {
            Ok(Some(now)) => now.can_see(state).await.ok(),
            Ok(None) => Some(false),
            Err(_) => None,
        }
    }

    /// Whether [`Access::still_allowed`] can ever say no: only for a caller with a
    /// credential. Without one, nothing needs re-checking.
    pub fn can_be_withdrawn(&self) -> bool {
        self.credential.is_some()
    }

    /// The key of the per-client limits.
    pub fn client_key(&self) -> &str {
        self.client.as_deref().unwrap_or("unknown")
    }

    /// Whether the caller may see a run with this state hash. In Kubernetes mode: `get` on
    /// its AgentRun; runs without one (local runs) are never visible.
    pub async fn can_see(&self, state: &HashMap<String, String>) -> Result<bool, ApiError> {
        match &self.scope {
            Scope::All => Ok(true),
            Scope::Namespaces(list) => Ok(state
                .get(state_hash::NAMESPACE)
                .is_some_and(|ns| list.iter().any(|n| n == ns))),
            Scope::Kube { auth, caller } => {
                let Some((ns, name)) = state_hash::agentrun(state) else {
                    return Ok(false);
                };
                if auth.cached_allowed(caller, Verb::Get, ns, "") == Some(true) {
                    return Ok(true);
                }
                auth.allowed(caller, Verb::Get, ns, name)
                    .await
                    .map_err(unavailable)
            }
        }
    }

    /// The run's state hash, when the caller may see the run; a run it may not see answers
    /// `404` like one that does not exist (never started, or expired).
    pub async fn visible_state(
        &self,
        app: &crate::AppState,
        run: &agentrun_protocol::RunId,
    ) -> Result<HashMap<String, String>, ApiError> {
        let state: HashMap<String, String> = app
            .query(redis::cmd("HGETALL").arg(run.state_key()))
            .await?;
        if state.is_empty() || !self.can_see(&state).await? {
            return Err(ApiError::not_found(run));
        }
        Ok(state)
    }

    /// `Ok` when the caller may control the run; a run it may not see answers `404` like a
    /// missing one; in Kubernetes mode, a run it may see but not `update` answers `403`.
    pub async fn check_control(
        &self,
        run: &agentrun_protocol::RunId,
        state: &HashMap<String, String>,
    ) -> Result<(), ApiError> {
        if state.is_empty() || !self.can_see(state).await? {
            return Err(ApiError::not_found(run));
        }
        if let Scope::Kube { auth, caller } = &self.scope
            && let Some((ns, name)) = state_hash::agentrun(state)
            && !auth
                .allowed(caller, Verb::Update, ns, name)
                .await
                .map_err(unavailable)?
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "user {} may not update agentruns/{name} in namespace {ns} (group {}): controlling a run needs 'update' on its AgentRun",
                    caller.username,
                    crate::kube_auth::GROUP
                ),
            ));
        }
        Ok(())
    }

    /// Which of these runs the caller may see (same order). In Kubernetes mode one review
    /// per namespace asks for `get` on every AgentRun there; only where that is denied is each
    /// run asked for on its own.
    pub async fn visible(
        &self,
        states: &[&HashMap<String, String>],
    ) -> Result<Vec<bool>, ApiError> {
        let Scope::Kube { auth, caller } = &self.scope else {
            let mut out = Vec::with_capacity(states.len());
            for s in states {
                out.push(self.can_see(s).await?);
            }
            return Ok(out);
        };
        let targets: Vec<Option<(String, String)>> = states
            .iter()
            .map(|s| state_hash::agentrun(s).map(|(ns, name)| (ns.to_owned(), name.to_owned())))
            .collect();
        let mut namespaces: Vec<(String, String)> = targets
            .iter()
            .flatten()
            .map(|(ns, _)| (ns.clone(), String::new()))
            .collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        let answers = review_all(auth, caller, &namespaces).await?;
        let whole: std::collections::HashSet<&str> = namespaces
            .iter()
            .zip(answers)
            .filter(|(_, ok)| *ok)
            .map(|((ns, _), _)| ns.as_str())
            .collect();
        let single: Vec<(String, String)> = targets
            .iter()
            .flatten()
            .filter(|(ns, _)| !whole.contains(ns.as_str()))
            .cloned()
            .collect();
        let answers = review_all(auth, caller, &single).await?;
        let single: HashMap<&(String, String), bool> = single.iter().zip(answers).collect();
        Ok(targets
            .iter()
            .map(|t| match t {
                None => false,
                Some((ns, _)) if whole.contains(ns.as_str()) => true,
                Some(t) => single.get(t).copied().unwrap_or(false),
            })
            .collect())
    }
}

/// `get` reviews of (namespace, name) pairs, [`LIST_REVIEWS_AT_ONCE`] at a time.
async fn review_all(
    auth: &KubeAuth,
    caller: &Caller,
    targets: &[(String, String)],
) -> Result<Vec<bool>, ApiError> {
    let mut out = Vec::with_capacity(targets.len());
    for chunk in targets.chunks(LIST_REVIEWS_AT_ONCE) {
        let mut reviews = Vec::with_capacity(chunk.len());
        for (ns, name) in chunk {
            reviews.push(auth.allowed(caller, Verb::Get, ns, name));
        }
        for r in futures::future::join_all(reviews).await {
            out.push(r.map_err(unavailable)?);
        }
    }
    Ok(out)
}

/// Compares in time that depends only on the lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses a tokens file (see the module documentation).
fn parse_tokens(text: &str) -> anyhow::Result<Vec<TokenEntry>> {
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
        if let Some(bad) = namespaces.iter().find(|ns| !is_dns_label(ns)) {
            anyhow::bail!(
                "line {}: {bad:?} is not a namespace name (lowercase letters, digits and '-', at most 63); list namespaces separated by spaces",
                n + 1
            );
        }
        let digest = crate::kube_auth::digest(token);
        tokens.push(TokenEntry {
            token: token.as_bytes().to_vec(),
            namespaces: (!namespaces.is_empty()).then(|| namespaces.into()),
            client: format!(
                "token:{}",
                digest[..6]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
        });
    }
    if tokens.is_empty() {
        anyhow::bail!("no tokens: write one bearer token per line");
    }
    Ok(tokens)
}

fn read_tokens_file(path: &Path) -> anyhow::Result<(Vec<TokenEntry>, [u8; 32])> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the tokens file {}: {e}; pass --tokens-file (AGENTRUN_TOKENS_FILE) with one token per line",
            path.display()
        )
    })?;
    let tokens = parse_tokens(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((tokens, crate::kube_auth::digest(&text)))
}

impl Authenticator {
    pub fn none() -> Self {
        Self {
            mode: AuthMode::None,
            tokens: Arc::default(),
            kube: None,
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Reads a tokens file (see the module documentation).
    pub fn from_tokens_file(path: &Path) -> anyhow::Result<Self> {
        Ok(Self::with_tokens(read_tokens_file(path)?.0))
    }

    pub fn from_tokens(text: &str) -> anyhow::Result<Self> {
        Ok(Self::with_tokens(parse_tokens(text)?))
    }

    fn with_tokens(tokens: Vec<TokenEntry>) -> Self {
        Self {
            mode: AuthMode::Token,
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
            kube: None,
        }
    }

    /// Kubernetes mode (TokenReview and SubjectAccessReview through `kube`).
    pub fn kubernetes(kube: KubeAuth) -> Self {
        Self {
            mode: AuthMode::Kubernetes,
            tokens: Arc::default(),
            kube: Some(Arc::new(kube)),
        }
    }

    /// The Kubernetes client and cache (Kubernetes mode only).
    pub fn kube(&self) -> Option<&KubeAuth> {
        self.kube.as_deref()
    }

    /// Re-reads `path` every `every` (zero: only on SIGHUP) and on SIGHUP, and uses its tokens
    /// from then on; a file that cannot be read or holds no valid tokens keeps the tokens in
    /// use, with an error in the log. Stops when the authenticator is dropped.
    pub fn spawn_reload(&self, path: PathBuf, every: Duration, metrics: crate::metrics::Metrics) {
        let weak: Weak<RwLock<Arc<Vec<TokenEntry>>>> = Arc::downgrade(&self.tokens);
        let mut seen = read_tokens_file(&path).map(|(_, d)| d).ok();
        // Registered before the relay serves, so a SIGHUP never meets the default action.
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP; the tokens file is still checked for changes"))
            .ok();
        tokio::spawn(async move {
            loop {
                let tick = async {
                    if every.is_zero() {
                        std::future::pending::<()>().await
                    } else {
                        tokio::time::sleep(every).await
                    }
                };
                #[cfg(unix)]
                let hangup = async {
                    match hup.as_mut() {
                        Some(s) => {
                            s.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<()>();
                let signalled = tokio::select! {
                    _ = tick => false,
                    _ = hangup => true,
                };
                let Some(list) = weak.upgrade() else { return };
                match read_tokens_file(&path) {
                    Ok((tokens, digest)) => {
                        if seen == Some(digest) {
                            continue;
                        }
                        seen = Some(digest);
                        let n = tokens.len();
                        *list.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
                        metrics.tokens_reloads.with_label_values(&["ok"]).inc();
                        tracing::info!(file = %path.display(), tokens = n, signalled, "tokens file read again: the new tokens are in use");
                    }
                    Err(e) => {
                        // Log each broken version once (a SIGHUP asks again).
                        let digest = std::fs::read(&path)
                            .ok()
                            .map(|b| crate::kube_auth::digest(&String::from_utf8_lossy(&b)));
                        if digest.is_some() && digest == seen && !signalled {
                            continue;
                        }
                        seen = digest;
                        metrics.tokens_reloads.with_label_values(&["error"]).inc();
                        tracing::error!(error = %e, "the tokens file changed but cannot be used; the tokens read before stay in use until it is fixed");
                    }
                }
            }
        });
    }

    fn check_token(&self, token: &str) -> Option<Access> {
        let tokens = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut found = None;
        // Compare with every entry so the time does not say which one matched.
        for t in tokens.iter() {
            if ct_eq(&t.token, token.as_bytes()) && found.is_none() {
                found = Some(Access {
                    scope: match &t.namespaces {
                        None => Scope::All,
                        Some(list) => Scope::Namespaces(list.clone()),
                    },
                    client: Some(t.client.clone()),
                    credential: Some(Credential(token.into())),
                });
            }
        }
        found
    }

    /// What the token allows: `Ok(None)` when it is not accepted, `503` when the API server
    /// cannot be asked.
    pub async fn check(&self, token: &str) -> Result<Option<Access>, ApiError> {
        match (self.mode, &self.kube) {
            (AuthMode::Kubernetes, Some(kube)) => {
                let caller = kube.authenticate(token).await.map_err(unavailable)?;
                Ok(caller.map(|caller| Access {
                    client: Some(format!("user:{}", caller.username)),
                    credential: Some(Credential(token.into())),
                    scope: Scope::Kube {
                        auth: kube.clone(),
                        caller,
                    },
                }))
            }
            (AuthMode::None, _) => Ok(Some(Access::all())),
            _ => Ok(self.check_token(token)),
        }
    }

    fn how(&self) -> &'static str {
        match self.mode {
            AuthMode::Kubernetes => HOW_KUBE,
            _ => HOW,
        }
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

/// `401` with `WWW-Authenticate: Bearer` and a body saying how to authenticate; `auth` names
/// the mode, so that a client knows which token to send (the plugin sends the kubeconfig's
/// token to a relay in `kubernetes` mode).
pub fn unauthorized(mode: AuthMode, message: &str) -> Response {
    let mut r = (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({ "error": message, "auth": mode.as_str() })),
    )
        .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"agentrun-relay\""),
    );
    r
}

const HOW: &str = "send a token of the relay's --tokens-file as 'Authorization: Bearer TOKEN', or POST it to /api/session (a cookie for the browser), or add ?access_token=TOKEN to an events URL";
const HOW_KUBE: &str = "send a Kubernetes bearer token (a ServiceAccount token from `kubectl create token NAME`, or your kubeconfig's token) as 'Authorization: Bearer TOKEN', or POST it to /api/session (a cookie for the browser), or add ?access_token=TOKEN to an events URL";

/// Whether an `Origin` header (when present) names this relay or an allowed origin.
pub(crate) fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
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
    let auth = &state.auth;
    let unsafe_method = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if unsafe_method && !origin_allowed(req.headers(), &state.allowed_origins) {
        return forbidden(
            "cross-site request refused: the Origin header is not this relay's origin; add it to --allowed-origins (or --cors-origins) if it is trusted".into(),
        );
    }
    let is_session = req.uri().path() == "/api/session";
    let access = match auth.mode {
        AuthMode::None => Access::all(),
        _ if is_session => Access::all(),
        AuthMode::Token | AuthMode::Kubernetes => {
            let Some((token, source)) = credential(&req) else {
                return unauthorized(
                    auth.mode,
                    &format!("authentication required: {}", auth.how()),
                );
            };
            let access = match auth.check(&token).await {
                Ok(Some(access)) => access,
                Ok(None) => {
                    return unauthorized(
                        auth.mode,
                        &format!("the token was not accepted: {}", auth.how()),
                    );
                }
                Err(e) => return e.into_response(),
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
    let auth = &state.auth;
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
    match auth.check(&token).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return unauthorized(
                auth.mode,
                &format!("the token was not accepted: {}", auth.how()),
            );
        }
        Err(e) => return e.into_response(),
    }
    let mut r = (
        StatusCode::OK,
        Json(serde_json::json!({ "auth": auth.mode.as_str() })),
    )
        .into_response();
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A token as the file allows it: printable ASCII without `; , " \\ #`.
    fn token() -> impl Strategy<Value = String> {
        "[!$-+\\--~&&[^;,\"\\\\#]]{1,40}"
    }

    fn namespace() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_text_is_parsed_or_refused_never_a_panic(text in any::<String>()) {
            let _ = parse_tokens(&text);
        }

        #[test]
        fn a_well_formed_file_gives_back_exactly_its_tokens_and_namespaces(
            entries in prop::collection::vec(
                (token(), prop::collection::vec(namespace(), 0..4), any::<bool>()),
                1..12,
            ),
        ) {
            let mut text = String::from("# viewers\n\n");
            for (t, ns, comment) in &entries {
                text.push_str(&format!("  {t}\t{}", ns.join("  ")));
                if *comment {
                    text.push_str(" # who");
                }
                text.push_str("\r\n");
            }
            let parsed = parse_tokens(&text).expect("a well-formed file parses");
            prop_assert_eq!(parsed.len(), entries.len());
            for (p, (t, ns, _)) in parsed.iter().zip(&entries) {
                prop_assert_eq!(&p.token, t.as_bytes());
                let got: Option<Vec<String>> = p.namespaces.as_ref().map(|n| n.to_vec());
                prop_assert_eq!(got, (!ns.is_empty()).then(|| ns.clone()));
            }
        }

        #[test]
        fn a_bad_token_or_namespace_names_its_line(
            good in token(),
            line in 0usize..5,
            bad in prop_oneof![
                "[a-z]{1,5}[;,\"\\\\][a-z]{0,5}".prop_map(|t| (t, String::new())),
                "[A-Z_.]{1,8}".prop_map(|ns| ("tok".to_owned(), ns)),
            ],
        ) {
            let mut text = String::new();
            for _ in 0..line {
                text.push_str(&format!("{good}\n"));
            }
            text.push_str(&format!("{} {}\n", bad.0, bad.1));
            let e = parse_tokens(&text).expect_err("refused").to_string();
            let want = format!("line {}:", line + 1);
            prop_assert!(e.starts_with(&want), "{}", e);
        }
    }

    #[test]
    fn an_empty_file_says_what_to_write() {
        let e = parse_tokens("# nothing here\n\n").unwrap_err().to_string();
        assert!(e.contains("one bearer token per line"), "{e}");
    }
}

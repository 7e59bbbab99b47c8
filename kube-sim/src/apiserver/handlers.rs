//! HTTP handlers: path routing, the REST verbs, watch streams, reviews and pod logs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::apiserver::auth::{AuthConfig, Identity};
use crate::apiserver::discovery;
use crate::kubelet::Kubelet;
use crate::apiserver::patch::{self, PatchKind};
use crate::apiserver::rbac::{self, Attrs, DenialLog};
use crate::apiserver::resources::ResourceType;
use crate::apiserver::selectors::{FieldSelector, LabelSelector};
use crate::apiserver::store::{DeleteOpts, Event, EventType, Store, TypeKey, WriteOpts};
use crate::apiserver::table;
use crate::apiserver::errors::ApiError;

/// Shared state of the HTTP server.
pub struct App {
    pub store: Arc<Store>,
    pub auth: AuthConfig,
    pub kubelet: Option<Arc<Kubelet>>,
    pub addr: String,
    pub bookmark_interval: Duration,
    /// Requests refused with 403.
    pub denials: Arc<DenialLog>,
}

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status())
}

type Query = HashMap<String, String>;

fn parse_query(q: Option<&str>) -> Query {
    let mut out = HashMap::new();
    for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(decode(k), decode(v));
    }
    out
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(x) => {
                        out.push(x);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a resource URL names.
struct Target {
    t: ResourceType,
    ns: String,
    name: Option<String>,
    sub: Option<String>,
}

/// The single entry point: every request goes through here.
pub async fn handle(State(app): State<Arc<App>>, req: Request) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let headers = req.headers().clone();
    let body = match axum::body::to_bytes(req.into_body(), 64 << 20).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    let q = parse_query(uri.query());
    let path = uri.path().to_string();
    tracing::debug!("{method} {uri}");
    let requester = match authenticate(&app.auth, &headers) {
        Ok(id) => id,
        Err(e) => {
            tracing::info!("{method} {uri} -> {e}");
            return error_response(&e);
        }
    };
    if let Some(id) = &requester {
        let attrs = Attrs::of_request(method.as_str(), &path, &|k| q.get(k).cloned());
        if !rbac::allowed(&app.store, &app.auth, id, &attrs) {
            let e = rbac::forbidden(&id.username, &attrs);
            tracing::info!("{method} {uri} -> {e}");
            app.denials.record(format!("{method} {uri}: {}", e.message));
            return error_response(&e);
        }
    }
    match route(&app, &method, &path, &q, &headers, body, requester.as_ref()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!("{method} {uri} -> {e}");
            error_response(&e)
        }
    }
}

/// The requester: None without an `Authorization` header (the admin kubeconfig kube-sim
/// writes has no credentials and may do anything); 401 for a token the auth config does not
/// know, or for credentials other than a bearer token.
fn authenticate(auth: &AuthConfig, headers: &HeaderMap) -> Result<Option<Identity>, ApiError> {
    let Some(h) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let unauthorized = || ApiError::new(401, "Unauthorized", "Unauthorized");
    let value = h.to_str().map_err(|_| unauthorized())?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(unauthorized)?
        .trim();
    auth.authenticate(token).map(Some).ok_or_else(unauthorized)
}

async fn route(
    app: &Arc<App>,
    method: &Method,
    path: &str,
    q: &Query,
    headers: &HeaderMap,
    body: Bytes,
    requester: Option<&Identity>,
) -> Result<Response, ApiError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let types = app.store.types();
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    match segs.as_slice() {
        [] => {
            return Ok(json_response(
                200,
                &json!({"paths": ["/api", "/api/v1", "/apis", "/version", "/healthz", "/readyz", "/livez"]}),
            ));
        }
        ["version"] => return Ok(json_response(200, &discovery::version())),
        ["healthz"] | ["readyz"] | ["livez"] => {
            return Ok((StatusCode::OK, "ok").into_response());
        }
        ["openapi", "v3"] => return Ok(json_response(200, &discovery::openapi_root(&types))),
        ["openapi", "v3", "api", v] => {
            return discovery::openapi_gv(&types, "", v)
                .map(|d| json_response(200, &d))
                .ok_or_else(not_found);
        }
        ["openapi", "v3", "apis", g, v] => {
            return discovery::openapi_gv(&types, g, v)
                .map(|d| json_response(200, &d))
                .ok_or_else(not_found);
        }
        ["api"] => return Ok(json_response(200, &discovery::core_versions(&app.addr))),
        ["apis"] => return Ok(json_response(200, &discovery::group_list(&types))),
        ["api", v] => {
            return discovery::resource_list(&types, "", v)
                .map(|d| json_response(200, &d))
                .ok_or_else(not_found);
        }
        ["apis", g] => {
            return discovery::group(&types, g)
                .map(|d| json_response(200, &d))
                .ok_or_else(not_found);
        }
        ["apis", g, v] => {
            return discovery::resource_list(&types, g, v)
                .map(|d| json_response(200, &d))
                .ok_or_else(not_found);
        }
        _ => {}
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found()),
    };
    // The deprecated `/watch/` paths of old clients.
    let (rest, watch_path) = match rest {
        ["watch", r @ ..] => (r, true),
        r => (r, false),
    };
    let find = |plural: &str| {
        types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    };
    let target = match rest {
        ["namespaces", ns, plural, tail @ ..] if find(plural).is_some_and(|t| t.namespaced) => {
            Target {
                t: find(plural).ok_or_else(not_found)?,
                ns: ns.to_string(),
                name: tail.first().map(|s| s.to_string()),
                sub: tail.get(1).map(|s| s.to_string()),
            }
        }
        [plural, tail @ ..] => Target {
            t: find(plural).ok_or_else(not_found)?,
            ns: String::new(),
            name: tail.first().map(|s| s.to_string()),
            sub: tail.get(1).map(|s| s.to_string()),
        },
        [] => return Err(not_found()),
    };
    if let Some(sub) = &target.sub {
        let ok = (sub == "status" && target.t.has_status)
            || (sub == "log" && target.t.plural == "pods" && target.t.group.is_empty());
        if !ok {
            return Err(not_found());
        }
    }
    if target.t.create_only {
        if method != Method::POST {
            return Err(ApiError::method_not_allowed(format!(
                "{} only support create",
                target.t.plural
            )));
        }
        let obj = parse_object(&body, headers)?;
        let (auth, store) = (&app.auth, &app.store);
        let mut out = match target.t.plural.as_str() {
            "tokenreviews" => auth.token_review(obj),
            "localsubjectaccessreviews" => {
                auth.access_review(store, obj, Some(&target.ns), requester, false)
            }
            "selfsubjectaccessreviews" => auth.access_review(store, obj, None, requester, true),
            _ => auth.access_review(store, obj, None, requester, false),
        };
        out["apiVersion"] = Value::String(target.t.api_version());
        out["kind"] = Value::String(target.t.kind.clone());
        return Ok(json_response(201, &out));
    }
    let wants_table = headers
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    match (method.clone(), &target.name, target.sub.as_deref()) {
        (Method::GET, None, _) => {
            if watch_path || q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                watch(app, &target, q, wants_table)
            } else {
                list(app, &target, q, wants_table)
            }
        }
        (Method::GET, Some(name), Some("log")) => logs(app, &target, name, q).await,
        (Method::GET, Some(name), _) => {
            let obj = app
                .store
                .get(&key(&target.t), &target.ns, name)
                .ok_or_else(|| ApiError::not_found(&target.t.group, &target.t.plural, name))?;
            let obj = as_version(&target.t, obj);
            if wants_table {
                let include = q
                    .get("includeObject")
                    .map(String::as_str)
                    .unwrap_or("Metadata");
                return Ok(json_response(
                    200,
                    &table::table(&target.t, &[obj], app.store.current_rv(), include),
                ));
            }
            Ok(json_response(200, &obj))
        }
        (Method::POST, None, None) => {
            let obj = parse_object(&body, headers)?;
            let created = app
                .store
                .create(&target.t, &target.ns, obj, &write_opts(q, false))?;
            Ok(json_response(201, &as_version(&target.t, created)))
        }
        (Method::PUT, Some(name), sub) => {
            let obj = parse_object(&body, headers)?;
            let opts = write_opts(q, sub == Some("status"));
            let updated = app.store.update(&target.t, &target.ns, name, obj, &opts)?;
            Ok(json_response(200, &as_version(&target.t, updated)))
        }
        (Method::PATCH, Some(name), sub) => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default();
            let kind = PatchKind::from_content_type(ct).ok_or_else(|| {
                ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {ct:?}"))
            })?;
            let patch_body = patch::parse_body(kind, &body)?;
            let out = do_patch(
                app,
                &target,
                name,
                sub == Some("status"),
                kind,
                &patch_body,
                q,
            )?;
            Ok(json_response(200, &as_version(&target.t, out)))
        }
        (Method::DELETE, Some(name), None) => {
            let opts = delete_opts(q, &body);
            let out = app.store.delete(&target.t, &target.ns, name, &opts)?;
            Ok(json_response(200, &as_version(&target.t, out)))
        }
        (Method::DELETE, None, None) => {
            let opts = delete_opts(q, &body);
            let (items, rv) = selected(app, &target, q)?;
            let mut deleted = Vec::new();
            for it in items {
                let name = it
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let ns = it
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                match app.store.delete(&target.t, &ns, &name, &opts) {
                    Ok(v) => deleted.push(v),
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(json_response(200, &list_doc(&target.t, deleted, rv)))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource: {method}"
        ))),
    }
}

fn key(t: &ResourceType) -> TypeKey {
    (t.group.clone(), t.plural.clone())
}

/// Objects are stored once; reading through another served version only relabels them.
fn as_version(t: &ResourceType, mut obj: Value) -> Value {
    if obj.is_object() {
        obj["apiVersion"] = Value::String(t.api_version());
    }
    obj
}

fn parse_object(body: &[u8], headers: &HeaderMap) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if ct.contains("protobuf") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            "kube-sim speaks JSON only",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(je) => serde_yaml::from_slice::<Value>(body)
            .map_err(|_| ApiError::bad_request(format!("error decoding request body: {je}"))),
    }
}

fn write_opts(q: &Query, status: bool) -> WriteOpts {
    WriteOpts {
        dry_run: q.get("dryRun").is_some_and(|d| d == "All"),
        status,
        field_manager: q.get("fieldManager").cloned(),
        operation: None,
        strict: q.get("fieldValidation").is_some_and(|v| v == "Strict"),
    }
}

fn delete_opts(q: &Query, body: &[u8]) -> DeleteOpts {
    let b: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    DeleteOpts {
        grace_seconds: b["gracePeriodSeconds"]
            .as_i64()
            .or_else(|| q.get("gracePeriodSeconds").and_then(|g| g.parse().ok())),
        propagation: b["propagationPolicy"]
            .as_str()
            .map(String::from)
            .or_else(|| q.get("propagationPolicy").cloned())
            .or_else(|| match b["orphanDependents"].as_bool() {
                Some(true) => Some("Orphan".into()),
                _ => None,
            }),
        precondition_uid: b
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from),
        precondition_rv: b
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from),
        dry_run: q.get("dryRun").is_some_and(|d| d == "All")
            || b["dryRun"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "All")),
    }
}

fn do_patch(
    app: &Arc<App>,
    target: &Target,
    name: &str,
    status: bool,
    kind: PatchKind,
    patch_body: &Value,
    q: &Query,
) -> Result<Value, ApiError> {
    let k = key(&target.t);
    let mut opts = write_opts(q, status);
    if kind == PatchKind::Apply {
        opts.operation = Some("Apply");
        if opts.field_manager.is_none() {
            return Err(ApiError::bad_request(
                "PATCH with apply requires a fieldManager",
            ));
        }
    }
    let pinned_rv = patch_body.pointer("/metadata/resourceVersion").is_some();
    for _ in 0..20 {
        let Some(existing) = app.store.get(&k, &target.ns, name) else {
            if kind == PatchKind::Apply && !status {
                let mut obj = patch_body.clone();
                obj["metadata"]["name"] = Value::String(name.to_string());
                return app.store.create(&target.t, &target.ns, obj, &opts);
            }
            return Err(ApiError::not_found(&target.t.group, &target.t.plural, name));
        };
        let patched = patch::apply(kind, &existing, patch_body)?;
        match app
            .store
            .update(&target.t, &target.ns, name, patched, &opts)
        {
            Err(e) if e.code == 409 && e.reason == "Conflict" && !pinned_rv => continue,
            other => return other,
        }
    }
    Err(ApiError::conflict(&target.t.group, &target.t.plural, name))
}

fn selected(app: &Arc<App>, target: &Target, q: &Query) -> Result<(Vec<Value>, u64), ApiError> {
    let ls = LabelSelector::parse(
        q.get("labelSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )?;
    let fs = FieldSelector::parse(
        q.get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )?;
    let ns = (!target.ns.is_empty()).then_some(target.ns.as_str());
    let (items, rv) = app.store.list(&key(&target.t), ns);
    Ok((
        items
            .into_iter()
            .filter(|o| ls.matches(o) && fs.matches(o))
            .map(|o| as_version(&target.t, o))
            .collect(),
        rv,
    ))
}

fn list_doc(t: &ResourceType, items: Vec<Value>, rv: u64) -> Value {
    json!({
        "kind": format!("{}List", t.kind),
        "apiVersion": t.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })
}

fn list(
    app: &Arc<App>,
    target: &Target,
    q: &Query,
    wants_table: bool,
) -> Result<Response, ApiError> {
    let (items, rv) = selected(app, target, q)?;
    if wants_table {
        let include = q
            .get("includeObject")
            .map(String::as_str)
            .unwrap_or("Metadata");
        return Ok(json_response(
            200,
            &table::table(&target.t, &items, rv, include),
        ));
    }
    Ok(json_response(200, &list_doc(&target.t, items, rv)))
}

fn event_line(kind: &str, object: Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// A watch: a chunked stream of `{"type": ..., "object": ...}` lines.
fn watch(
    app: &Arc<App>,
    target: &Target,
    q: &Query,
    wants_table: bool,
) -> Result<Response, ApiError> {
    let ls = LabelSelector::parse(
        q.get("labelSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )?;
    let fs = FieldSelector::parse(
        q.get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )?;
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

async fn logs(
    app: &Arc<App>,
    target: &Target,
    name: &str,
    q: &Query,
) -> Result<Response, ApiError> {
    let pod = app
        .store
        .get(&key(&target.t), &target.ns, name)
        .ok_or_else(|| ApiError::not_found("", "pods", name))?;
    let container = match q.get("container") {
        Some(c) => c.clone(),
        None => {
            let cs = pod
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if cs.len() != 1 {
                return Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {name}, choose one of: {:?}",
                    cs.iter()
                        .filter_map(|c| c["name"].as_str())
                        .collect::<Vec<_>>()
                )));
            }
            cs[0]["name"].as_str().unwrap_or_default().to_string()
        }
    };
    let uid = pod
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let path = app
        .kubelet
        .as_ref()
        .map(|k| k.log_path(uid, &container))
        .ok_or_else(|| ApiError::bad_request("kube-sim runs without a kubelet"))?;
    let path = if q.get("previous").is_some_and(|p| p == "true") {
        let prev = path.with_extension("previous.log");
        if !prev.exists() {
            return Err(ApiError::bad_request(format!(
                "previous terminated container \"{container}\" in pod \"{name}\" not found"
            )));
        }
        prev
    } else {
        path
    };
    let follow = q.get("follow").is_some_and(|f| f == "true");
    if !follow {
        let data = tokio::fs::read(&path).await.map_err(|_| {
            ApiError::bad_request(format!(
                "container \"{container}\" in pod \"{name}\" is waiting to start"
            ))
        })?;
        return Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], data).into_response());
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let store = app.store.clone();
    let (ns, pod_name, k) = (target.ns.clone(), name.to_string(), key(&target.t));
    let uid = uid.to_string();
    tokio::spawn(async move {
        let mut offset = 0usize;
        loop {
            let data = tokio::fs::read(&path).await.unwrap_or_default();
            if data.len() > offset {
                if tx
                    .send(Ok(Bytes::copy_from_slice(&data[offset..])))
                    .await
                    .is_err()
                {
                    return;
                }
                offset = data.len();
            }
            let running = store.get(&k, &ns, &pod_name).is_some_and(|p| {
                p.pointer("/metadata/uid").and_then(Value::as_str) == Some(uid.as_str())
                    && !matches!(
                        p.pointer("/status/phase").and_then(Value::as_str),
                        Some("Succeeded") | Some("Failed")
                    )
            });
            if !running {
                let data = tokio::fs::read(&path).await.unwrap_or_default();
                if data.len() > offset {
                    let _ = tx.send(Ok(Bytes::copy_from_slice(&data[offset..]))).await;
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = parse_query(Some("labelSelector=app%3Dx%2Ctier+in+%28a%29&watch=true"));
        assert_eq!(
            q.get("labelSelector").map(String::as_str),
            Some("app=x,tier in (a)")
        );
        assert_eq!(q.get("watch").map(String::as_str), Some("true"));
    }
}

//! Routing and the REST verbs: every request is authenticated and authorized, then routed by
//! path to discovery, the reviews, or a resource's get, list, watch, create, update, patch,
//! delete and deletecollection.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::apiserver::App;
use crate::apiserver::apply;
use crate::apiserver::attributes::Attrs;
use crate::apiserver::auth::{self, Identity};
use crate::apiserver::discovery;
use crate::apiserver::errors::ApiError;
use crate::apiserver::http::{
    Query, Target, as_version, delete_opts, error_response, json_response, key, parse_object,
    parse_query, selectors, with_warnings, write_opts,
};
use crate::apiserver::logs::logs;
use crate::apiserver::patch::{self, PatchKind};
use crate::apiserver::rbac;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::table;
use crate::apiserver::watch::watch;

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
    let requester = match auth::authenticate_request(&app.auth, &headers) {
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
        ["version"] => {
            return Ok(json_response(200, &app.store.server_version().document()));
        }
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
            plural => {
                let (local_ns, self_review) = match plural {
                    "localsubjectaccessreviews" => (Some(target.ns.as_str()), false),
                    "selfsubjectaccessreviews" => (None, true),
                    _ => (None, false),
                };
                rbac::access_review(store, auth, obj, local_ns, requester, self_review)
            }
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
                return Ok(table_response(&target, q, &[obj], app.store.current_rv()));
            }
            Ok(json_response(200, &obj))
        }
        (Method::POST, None, None) => {
            let obj = parse_object(&body, headers)?;
            let opts = write_opts(q, headers, false);
            let created = app.store.create(&target.t, &target.ns, obj, &opts)?;
            let resp = json_response(201, &as_version(&target.t, created));
            Ok(with_warnings(resp, &opts))
        }
        (Method::PUT, Some(name), sub) => {
            let obj = parse_object(&body, headers)?;
            let opts = write_opts(q, headers, sub == Some("status"));
            let updated = app.store.update(&target.t, &target.ns, name, obj, &opts)?;
            let resp = json_response(200, &as_version(&target.t, updated));
            Ok(with_warnings(resp, &opts))
        }
        (Method::PATCH, Some(name), sub) => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default();
            let kind = PatchKind::from_content_type(ct).ok_or_else(|| {
                ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {ct:?}"))
            })?;
            let status = sub == Some("status");
            let force = match q.get("force").map(String::as_str) {
                None => None,
                Some("true" | "1") => Some(true),
                Some(_) => Some(false),
            };
            if kind == PatchKind::Apply {
                // Apply requires the manager to be named: no user agent stands in for it.
                if q.get("fieldManager").is_none_or(String::is_empty) {
                    return Err(apply::invalid_patch_options(
                        "fieldManager",
                        "FieldValueRequired",
                        "Required value: is required for apply patch",
                    ));
                }
            } else if force.is_some() {
                return Err(apply::invalid_patch_options(
                    "force",
                    "FieldValueForbidden",
                    "Forbidden: may not be specified for non-apply patch",
                ));
            }
            let patch_body = patch::parse_body(kind, &body)?;
            let opts = write_opts(q, headers, status);
            let (store, t, ns) = (&app.store, &target.t, &target.ns);
            let (out, code) = if kind == PatchKind::Apply {
                let force = force.unwrap_or(false);
                let (obj, created) = apply::server_side_apply(
                    store,
                    t,
                    ns,
                    name,
                    status,
                    &patch_body,
                    force,
                    opts.clone(),
                )?;
                (obj, if created { 201 } else { 200 })
            } else {
                let obj = patch::patch_object(store, t, ns, name, kind, &patch_body, &opts)?;
                (obj, 200)
            };
            let resp = json_response(code, &as_version(&target.t, out));
            Ok(with_warnings(resp, &opts))
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

fn selected(app: &Arc<App>, target: &Target, q: &Query) -> Result<(Vec<Value>, u64), ApiError> {
    let (ls, fs) = selectors(q)?;
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

/// Objects as a `Table` (kubectl's `get` output), with `includeObject` as the client asked.
fn table_response(target: &Target, q: &Query, objects: &[Value], rv: u64) -> Response {
    let include = q
        .get("includeObject")
        .map(String::as_str)
        .unwrap_or("Metadata");
    json_response(200, &table::table(&target.t, objects, rv, include))
}

fn list(
    app: &Arc<App>,
    target: &Target,
    q: &Query,
    wants_table: bool,
) -> Result<Response, ApiError> {
    let (items, rv) = selected(app, target, q)?;
    if wants_table {
        return Ok(table_response(target, q, &items, rv));
    }
    Ok(json_response(200, &list_doc(&target.t, items, rv)))
}

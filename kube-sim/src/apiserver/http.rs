//! The HTTP plumbing the handlers share: query decoding (selectors included), what a resource
//! URL names, request bodies, write and delete options, and JSON responses.

use std::collections::HashMap;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::apiserver::admission::Warnings;
use crate::apiserver::errors::ApiError;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::selectors::{FieldSelector, LabelSelector};
use crate::apiserver::store::{DeleteOpts, TypeKey, WriteOpts};

pub(super) fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

pub(super) fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status())
}

pub(super) type Query = HashMap<String, String>;

pub(super) fn parse_query(q: Option<&str>) -> Query {
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

/// The `labelSelector` and `fieldSelector` of a list, watch or deletecollection.
pub(super) fn selectors(q: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
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
    Ok((ls, fs))
}

/// What a resource URL names.
pub(super) struct Target {
    pub(super) t: ResourceType,
    pub(super) ns: String,
    pub(super) name: Option<String>,
    pub(super) sub: Option<String>,
}

pub(super) fn key(t: &ResourceType) -> TypeKey {
    (t.group.clone(), t.plural.clone())
}

/// Objects are stored once; reading through another served version only relabels them.
pub(super) fn as_version(t: &ResourceType, mut obj: Value) -> Value {
    if obj.is_object() {
        obj["apiVersion"] = Value::String(t.api_version());
    }
    obj
}

pub(super) fn parse_object(body: &[u8], headers: &HeaderMap) -> Result<Value, ApiError> {
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

/// The options of a create, update or patch. The field manager is `fieldManager`, else the
/// client's user agent up to its first `/` (as the API server names managers).
pub(super) fn write_opts(q: &Query, headers: &HeaderMap, status: bool) -> WriteOpts {
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|h| h.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|m| !m.is_empty())
        .map(String::from);
    WriteOpts {
        dry_run: q.get("dryRun").is_some_and(|d| d == "All"),
        status,
        field_manager: q.get("fieldManager").cloned().or(agent),
        strict: q.get("fieldValidation").is_some_and(|v| v == "Strict"),
        managed_fields: None,
        warnings: Some(Warnings::default()),
    }
}

/// A response with the request's warnings as `Warning: 299 - "..."` headers.
pub(super) fn with_warnings(mut resp: Response, opts: &WriteOpts) -> Response {
    for w in opts.warnings.iter().flat_map(Warnings::all) {
        let escaped = w.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{escaped}\"")) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

pub(super) fn delete_opts(q: &Query, body: &[u8]) -> DeleteOpts {
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

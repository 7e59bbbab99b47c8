//! PATCH: the formats (JSON patch, RFC 6902; JSON merge patch, RFC 7386; a strategic merge
//! patch that merges lists of objects by their usual merge key: `name`, `mountPath`,
//! `containerPort`, `port`, `uid`, `type`) and the read-patch-write of a stored object.
//! Server-side apply has its own entry point and merge (`apply.rs`); only its body parsing is
//! here.

use serde_json::{Map, Value};

use crate::apiserver::errors::ApiError;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::store::{Store, TypeKey, WriteOpts};

/// The patch formats kube-sim accepts, by Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<PatchKind> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        match base {
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchKind::Apply)
            }
            _ => None,
        }
    }
}

/// Parses a patch body. Apply bodies may be YAML.
pub fn parse_body(kind: PatchKind, body: &[u8]) -> Result<Value, ApiError> {
    if kind == PatchKind::Apply {
        return serde_yaml::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

/// A JSON, merge or strategic merge PATCH of a stored object (404 when there is none).
pub fn patch_object(
    store: &Store,
    t: &ResourceType,
    ns: &str,
    name: &str,
    kind: PatchKind,
    patch: &Value,
    opts: &WriteOpts,
) -> Result<Value, ApiError> {
    let pinned_rv = patch.pointer("/metadata/resourceVersion").is_some();
    patch_stored(store, t, ns, name, opts, pinned_rv, |existing| {
        apply(kind, existing, patch)
    })?
    .ok_or_else(|| ApiError::not_found(&t.group, &t.plural, name))
}

/// Reads the stored object, makes the new one with `patched` and writes it; on a conflict with
/// a concurrent write it starts again, unless the patch pinned `metadata.resourceVersion`
/// (`pinned_rv`). None when there is no such object.
pub fn patch_stored(
    store: &Store,
    t: &ResourceType,
    ns: &str,
    name: &str,
    opts: &WriteOpts,
    pinned_rv: bool,
    patched: impl Fn(&Value) -> Result<Value, ApiError>,
) -> Result<Option<Value>, ApiError> {
    let k: TypeKey = (t.group.clone(), t.plural.clone());
    for _ in 0..20 {
        let Some(existing) = store.get(&k, ns, name) else {
            return Ok(None);
        };
        let new = patched(&existing)?;
        match store.update(t, ns, name, new, opts) {
            Err(e) if e.code == 409 && e.reason == "Conflict" && !pinned_rv => continue,
            other => return other.map(Some),
        }
    }
    Err(ApiError::conflict(&t.group, &t.plural, name))
}

/// Applies a JSON, merge or strategic merge patch to `target` (server-side apply does not come
/// here: `apply.rs`).
pub fn apply(kind: PatchKind, target: &Value, patch: &Value) -> Result<Value, ApiError> {
    match kind {
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            let mut doc = target.clone();
            // Like the API server's JSON patch library, `test` of a missing path against null
            // succeeds (kube-runtime's finalizer helper relies on it).
            let ops = json_patch::Patch(
                ops.0
                    .into_iter()
                    .filter(|op| match op {
                        json_patch::PatchOperation::Test(t) => {
                            !(t.value.is_null() && doc.pointer(t.path.as_str()).is_none())
                        }
                        _ => true,
                    })
                    .collect(),
            );
            json_patch::patch(&mut doc, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?;
            Ok(doc)
        }
        PatchKind::Merge => {
            let mut doc = target.clone();
            json_patch::merge(&mut doc, patch);
            Ok(doc)
        }
        PatchKind::Strategic | PatchKind::Apply => {
            // Apply bodies never come here (`apply.rs` merges them); treated as strategic.
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "a strategic merge patch must be an object",
                ));
            }
            Ok(strategic(target, patch))
        }
    }
}

const MERGE_KEYS: &[&str] = &[
    "mountPath",
    "devicePath",
    "containerPort",
    "port",
    "uid",
    "ip",
    "name",
    "type",
];

fn merge_key(items: &[Value]) -> Option<&'static str> {
    if items.is_empty() || !items.iter().all(Value::is_object) {
        return None;
    }
    MERGE_KEYS
        .iter()
        .find(|k| items.iter().all(|i| i.get(**k).is_some()))
        .copied()
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// Strategic merge of `patch` into `target`.
pub fn strategic(target: &Value, patch: &Value) -> Value {
    let (Some(t), Some(p)) = (target.as_object(), patch.as_object()) else {
        return strip_directives(patch);
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        return strip_directives(patch);
    }
    let mut out: Map<String, Value> = t.clone();
    for (k, pv) in p {
        if let Some(list) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(cur)), Some(del)) = (out.get_mut(list), pv.as_array()) {
                cur.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if pv.is_null() {
            out.remove(k);
            continue;
        }
        let merged = match (out.get(k), pv) {
            (Some(tv @ Value::Object(_)), Value::Object(_)) => strategic(tv, pv),
            (Some(Value::Array(ta)), Value::Array(pa)) => merge_lists(ta, pa),
            _ => strip_directives(pv),
        };
        out.insert(k.clone(), merged);
    }
    Value::Object(out)
}

fn merge_lists(target: &[Value], patch: &[Value]) -> Value {
    let Some(key) = merge_key(patch).or_else(|| {
        // A patch that only deletes elements still names them by key.
        merge_key(target).filter(|k| patch.iter().all(|p| p.get(*k).is_some()))
    }) else {
        return Value::Array(patch.iter().map(strip_directives).collect());
    };
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Value::Array(
            patch
                .iter()
                .filter(|p| p.get("$patch").is_none())
                .map(strip_directives)
                .collect(),
        );
    }
    let mut out: Vec<Value> = target.to_vec();
    for p in patch {
        let id = &p[key];
        let pos = out.iter().position(|t| &t[key] == id);
        let delete = p.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => out[i] = strategic(&out[i], p),
            (None, false) => out.push(strip_directives(p)),
        }
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_named_lists() {
        let t = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        let p = json!({"spec": {"$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                                 "containers": [{"name": "b", "image": "z"}]}});
        assert_eq!(
            strategic(&t, &p),
            json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "z"}]}})
        );
        let p = json!({"spec": {"containers": [{"name": "a", "$patch": "delete"}]}});
        assert_eq!(
            strategic(&t, &p),
            json!({"spec": {"containers": [{"name": "b", "image": "y"}]}})
        );
        let p = json!({"metadata": {"labels": {"x": null}}, "spec": {"args": ["1"]}});
        let t = json!({"metadata": {"labels": {"x": "1", "y": "2"}}, "spec": {"args": ["0"]}});
        assert_eq!(
            strategic(&t, &p),
            json!({"metadata": {"labels": {"y": "2"}}, "spec": {"args": ["1"]}})
        );
    }

    #[test]
    fn json_and_merge() {
        let t = json!({"a": {"b": 1}, "c": [1]});
        let r = apply(
            PatchKind::Json,
            &t,
            &json!([{"op": "add", "path": "/c/-", "value": 2}]),
        );
        assert_eq!(r.ok(), Some(json!({"a": {"b": 1}, "c": [1, 2]})));
        let r = apply(PatchKind::Merge, &t, &json!({"a": {"b": null, "d": 2}}));
        assert_eq!(r.ok(), Some(json!({"a": {"d": 2}, "c": [1]})));
        let r = apply(
            PatchKind::Json,
            &t,
            &json!([{"op": "test", "path": "/a/b", "value": 2}]),
        );
        assert!(r.is_err());
        // kube-runtime's finalizer helper: test a missing list against null, then add it.
        let p = json!([{"op": "test", "path": "/f", "value": null},
                       {"op": "add", "path": "/f", "value": ["x"]}]);
        let r = apply(PatchKind::Json, &t, &p);
        assert_eq!(r.ok(), Some(json!({"a": {"b": 1}, "c": [1], "f": ["x"]})));
    }
}

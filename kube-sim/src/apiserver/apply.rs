//! Server-side apply (`application/apply-patch+yaml`), with field ownership as the API server
//! keeps it (`managed_fields.rs`, `fieldset.rs`):
//! - the applied configuration is merged into the live object: objects field by field, lists
//!   with merge keys (`x-kubernetes-list-type: map`, the built-in keys) item by item, sets by
//!   value, atomic lists and scalars replaced;
//! - what the manager applied last time and omits now is removed, unless another manager owns
//!   it too;
//! - a field another manager owns and this apply would change is a conflict: 409 `Apply failed
//!   with 1 conflict: conflict with "other" using v1: .spec.x`, unless `force=true`, which
//!   takes it over;
//! - the manager's `Apply` entry becomes exactly what it applied; through `/status` it owns
//!   only `status`, through the main resource never `status` (of a type with a status
//!   subresource).
//!
//! An apply to an object that does not exist creates it (201).

use serde_json::{Map, Value, json};

use crate::apiserver::errors::{ApiError, FieldError};
use crate::apiserver::fieldset::{
    FieldSet, ListKind, ObjectKind, Path, Shape, item_element, path_string, remove_at,
};
use crate::apiserver::managed_fields::{self, Entry, Section, diff, encode};
use crate::apiserver::resources::ResourceType;
use crate::apiserver::store::{Store, TypeKey, WriteOpts};
use crate::time::now_rfc3339;

/// The shape of objects of `t` for field ownership.
pub fn shape_of(t: &ResourceType) -> Shape<'_> {
    if t.custom {
        Shape::Schema(t.schema.as_ref())
    } else {
        Shape::Builtin("")
    }
}

/// The 422 the API server answers for invalid patch options.
pub fn invalid_patch_options(field: &str, reason: &'static str, detail: &str) -> ApiError {
    ApiError::invalid(
        "PatchOptions",
        "meta.k8s.io",
        "",
        &[FieldError::with(field, reason, detail)],
    )
}

/// Applies `applied` as field manager `opts.field_manager` (required) with `force`, to the
/// object `name` (its `/status` with `status`), creating it when it does not exist (not
/// through `/status`). Returns the stored object and whether it was created.
#[allow(clippy::too_many_arguments)]
pub fn server_side_apply(
    store: &Store,
    t: &ResourceType,
    ns: &str,
    name: &str,
    status: bool,
    applied: &Value,
    force: bool,
    mut opts: WriteOpts,
) -> Result<(Value, bool), ApiError> {
    let Some(manager) = opts.field_manager.clone() else {
        return Err(invalid_patch_options(
            "fieldManager",
            "FieldValueRequired",
            "Required value: is required for apply patch",
        ));
    };
    let Some(body) = applied.as_object() else {
        return Err(ApiError::bad_request(
            "error decoding YAML: the applied configuration must be an object",
        ));
    };
    let mut config = Value::Object(body.clone());
    if let Some(m) = config.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
    }
    let pinned_rv = config.pointer("/metadata/resourceVersion").is_some();
    let shape = shape_of(t);
    let section = Section {
        has_status: t.has_status,
        status,
    };
    let api_version = t.api_version();
    let key: TypeKey = (t.group.clone(), t.plural.clone());
    let store_ns = if t.namespaced { ns } else { "" };
    for _ in 0..20 {
        let Some(live) = store.get(&key, store_ns, name) else {
            if status {
                return Err(ApiError::not_found(&t.group, &t.plural, name));
            }
            let mut obj = strip_nulls(&config);
            obj["metadata"]["name"] = Value::String(name.to_string());
            let entry = Entry {
                manager: manager.clone(),
                operation: "Apply".into(),
                api_version: api_version.clone(),
                subresource: String::new(),
                time: now_rfc3339(),
                set: section.owned(&config, shape),
            };
            opts.managed_fields = Some(encode(&[entry]));
            match store.create(t, ns, obj, &opts) {
                Err(e) if e.reason == "AlreadyExists" => continue,
                other => return other.map(|o| (o, true)),
            }
        };
        let planned = plan(
            &live,
            &config,
            shape,
            section,
            &manager,
            &api_version,
            force,
        )?;
        opts.managed_fields = planned.pointer("/metadata/managedFields").cloned();
        if opts.managed_fields.is_none() {
            opts.managed_fields = Some(json!([]));
        }
        match store.update(t, ns, name, planned, &opts) {
            Err(e) if e.code == 409 && e.reason == "Conflict" && !pinned_rv => continue,
            other => return other.map(|o| (o, false)),
        }
    }
    Err(ApiError::conflict(&t.group, &t.plural, name))
}

/// The object an apply makes of `live`: merged, pruned, with its new `managedFields`; or the
/// conflict error.
fn plan(
    live: &Value,
    config: &Value,
    shape: Shape<'_>,
    section: Section,
    manager: &str,
    api_version: &str,
    force: bool,
) -> Result<Value, ApiError> {
    let subresource = if section.status { "status" } else { "" };
    let mut entries = managed_fields::decode(live);
    let mine = entries
        .iter()
        .position(|e| e.is(manager, "Apply", subresource, api_version));
    let last = mine.map(|i| entries[i].set.clone()).unwrap_or_default();
    let applied_set = section.owned(config, shape);
    let others = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != mine)
        .fold(FieldSet::default(), |acc, (_, e)| acc.union(&e.set));

    let mut new = merge(Some(live), config, shape, true);
    for p in last.members() {
        if !applied_set.covers(&p) && !others.covers(&p) {
            remove_at(&mut new, &p, shape);
        }
    }

    let d = diff(live, &new, shape, section);
    let changed = d.changed();
    let conflicts: Vec<(&Entry, Vec<Path>)> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != mine)
        .map(|(_, e)| (e, e.set.intersection(&changed).members_in_order()))
        .filter(|(_, paths)| !paths.is_empty())
        .collect();
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(&conflicts));
    }
    for (i, e) in entries.iter_mut().enumerate() {
        if Some(i) != mine {
            e.set = e.set.difference(&changed).difference(&d.removed);
        }
    }
    let object_changed = !(d.added.is_empty() && d.modified.is_empty() && d.removed.is_empty());
    match mine {
        Some(i) => {
            if object_changed || entries[i].set != applied_set {
                entries[i].time = now_rfc3339();
            }
            entries[i].set = applied_set;
            entries[i].api_version = api_version.to_string();
        }
        None => entries.push(Entry {
            manager: manager.to_string(),
            operation: "Apply".into(),
            api_version: api_version.to_string(),
            subresource: subresource.to_string(),
            time: now_rfc3339(),
            set: applied_set,
        }),
    }
    managed_fields::store_in(&mut new, &encode(&entries));
    Ok(new)
}

/// 409 with one cause per conflicting field, worded like the API server.
fn conflict_error(conflicts: &[(&Entry, Vec<Path>)]) -> ApiError {
    let mut sorted: Vec<&(&Entry, Vec<Path>)> = conflicts.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.0.manager, &a.0.operation, &a.0.subresource).cmp(&(
            &b.0.manager,
            &b.0.operation,
            &b.0.subresource,
        ))
    });
    let total: usize = sorted.iter().map(|(_, p)| p.len()).sum();
    let causes: Vec<Value> = sorted
        .iter()
        .flat_map(|(e, paths)| {
            paths.iter().map(move |p| {
                json!({"reason": "FieldManagerConflict",
                       "message": format!("conflict with {}", e.describe()),
                       "field": path_string(p)})
            })
        })
        .collect();
    let message = if total == 1 {
        let (e, paths) = sorted[0];
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            e.describe(),
            path_string(&paths[0])
        )
    } else {
        let mut lines = Vec::new();
        for (e, paths) in &sorted {
            lines.push(format!("conflicts with {}:", e.describe()));
            lines.extend(paths.iter().map(|p| format!("- {}", path_string(p))));
        }
        format!("Apply failed with {total} conflicts: {}", lines.join("\n"))
    };
    ApiError::new(409, "Conflict", message).with_details(json!({"causes": causes}))
}

/// The applied configuration `cfg` merged into `live` (structured merge).
pub fn merge(live: Option<&Value>, cfg: &Value, shape: Shape<'_>, root: bool) -> Value {
    match (live, cfg) {
        (Some(Value::Object(l)), Value::Object(c))
            if shape.object_kind(cfg) != ObjectKind::Atomic =>
        {
            let mut out = l.clone();
            for (k, v) in c {
                if v.is_null() {
                    out.remove(k);
                } else {
                    out.insert(k.clone(), merge(l.get(k), v, shape.child(k, root), false));
                }
            }
            Value::Object(out)
        }
        (Some(Value::Array(l)), Value::Array(c)) => {
            let kind = shape.list_kind(if c.is_empty() { l } else { c });
            match kind {
                ListKind::Atomic => strip_nulls(cfg),
                _ => Value::Array(merge_list(l, c, &kind, shape.item())),
            }
        }
        _ => strip_nulls(cfg),
    }
}

/// Merges the items of a keyed list or set: live items keep their place, applied items come
/// in the applied order (each merged with the live item of the same key).
fn merge_list(l: &[Value], c: &[Value], kind: &ListKind, item: Shape<'_>) -> Vec<Value> {
    let lk: Vec<String> = l
        .iter()
        .enumerate()
        .map(|(i, v)| item_element(kind, v, i))
        .collect();
    let ck: Vec<String> = c
        .iter()
        .enumerate()
        .map(|(i, v)| item_element(kind, v, i))
        .collect();
    let live_item = |k: &String| lk.iter().position(|x| x == k).map(|i| &l[i]);
    let merged = |j: usize| match kind {
        ListKind::Map(_) => merge(live_item(&ck[j]), &c[j], item, false),
        _ => strip_nulls(&c[j]),
    };
    let mut out = Vec::new();
    let mut next = 0;
    for (i, li) in l.iter().enumerate() {
        match ck.iter().position(|k| *k == lk[i]) {
            None => out.push(li.clone()),
            Some(j) if j >= next => {
                out.extend((next..=j).map(merged));
                next = j + 1;
            }
            Some(_) => {}
        }
    }
    out.extend((next..c.len()).map(merged));
    out
}

/// `v` without null object entries (the API server does not store them).
fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect::<Map<String, Value>>(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_nulls).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_lists_merge_by_key_and_keep_the_applied_order() {
        let live = json!({"spec": {"containers": [
            {"name": "a", "image": "1", "args": ["x"]}, {"name": "b", "image": "2"}]}});
        let cfg = json!({"spec": {"containers": [{"name": "b", "image": "3"}, {"name": "c", "image": "4"}]}});
        let out = merge(Some(&live), &cfg, Shape::Builtin(""), true);
        assert_eq!(
            out["spec"]["containers"],
            json!([{"name": "a", "image": "1", "args": ["x"]}, {"name": "b", "image": "3"},
                   {"name": "c", "image": "4"}])
        );
        let cfg = json!({"spec": {"containers": [{"name": "b"}, {"name": "a", "args": ["y"]}]}});
        let out = merge(Some(&live), &cfg, Shape::Builtin(""), true);
        assert_eq!(
            out["spec"]["containers"],
            json!([{"name": "b", "image": "2"}, {"name": "a", "image": "1", "args": ["y"]}])
        );
    }
}

//! `metadata.managedFields`: which field manager owns which fields, as the API server's field
//! manager keeps it. One entry per manager, operation (`Apply` for server-side apply, `Update`
//! for every other write), subresource and (for `Update`) API version, each with the
//! `fieldsV1` set of what it owns. An update takes the fields it changed from every other
//! manager (and the fields it removed from everyone); server-side apply (`apply.rs`) computes
//! its entries itself, because it may refuse with a conflict.

use serde_json::{Value, json};

use crate::apiserver::fieldset::{Element, FieldSet, Shape, field, to_field_set, value_at};
use crate::apiserver::store::meta_mut;
use crate::time::now_rfc3339;

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    /// "" for the main resource, `status` for the status subresource.
    pub subresource: String,
    pub time: String,
    pub set: FieldSet,
}

impl Entry {
    /// Whether this entry is the one a write by `manager` with `operation` through
    /// `subresource` at `api_version` records into (appliers are one entry whatever the
    /// version).
    pub fn is(&self, manager: &str, operation: &str, subresource: &str, api_version: &str) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource == subresource
            && (operation == "Apply" || self.api_version == api_version)
    }

    /// The manager as conflict messages name it: `"kubectl-edit" using v1`.
    pub fn describe(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            s.push_str(&format!(" with subresource {:?}", self.subresource));
        }
        if self.operation == "Update" {
            s.push_str(&format!(" using {}", self.api_version));
        }
        s
    }
}

/// The entries of an object.
pub fn decode(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| Entry {
            manager: crate::json::str_at(e, "/manager"),
            operation: crate::json::str_at(e, "/operation"),
            api_version: crate::json::str_at(e, "/apiVersion"),
            subresource: crate::json::str_at(e, "/subresource"),
            time: crate::json::str_at(e, "/time"),
            set: e
                .get("fieldsV1")
                .map(FieldSet::from_fields_v1)
                .unwrap_or_default(),
        })
        .collect()
}

/// The entries as `managedFields` (empty sets dropped), in the API server's order: by
/// operation, time, manager, API version and subresource.
pub fn encode(entries: &[Entry]) -> Value {
    let mut sorted: Vec<&Entry> = entries.iter().filter(|e| !e.set.is_empty()).collect();
    sorted.sort_by(|a, b| {
        (
            &a.operation,
            &a.time,
            &a.manager,
            &a.api_version,
            &a.subresource,
        )
            .cmp(&(
                &b.operation,
                &b.time,
                &b.manager,
                &b.api_version,
                &b.subresource,
            ))
    });
    Value::Array(
        sorted
            .into_iter()
            .map(|e| {
                let mut v = json!({
                    "manager": e.manager,
                    "operation": e.operation,
                    "apiVersion": e.api_version,
                    "time": e.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": e.set.to_fields_v1(),
                });
                if !e.subresource.is_empty() {
                    v["subresource"] = json!(e.subresource);
                }
                v
            })
            .collect(),
    )
}

/// Stores `managed` (a `managedFields` list) in `obj`, or removes the field when it is empty.
pub fn store_in(obj: &mut Value, managed: &Value) {
    if let Some(m) = meta_mut(obj) {
        if managed.as_array().is_some_and(|a| !a.is_empty()) {
            m.insert("managedFields".into(), managed.clone());
        } else {
            m.remove("managedFields");
        }
    }
}

/// Which part of an object a write owns: the main resource's writes never own `status` of a
/// type with a status subresource (it resets it), status writes own only `status`.
#[derive(Debug, Clone, Copy)]
pub struct Section {
    pub has_status: bool,
    pub status: bool,
}

impl Section {
    /// Whether a write through this section can own `path`. Fields the server sets
    /// (`apiVersion`, `kind`, the name, uid, resourceVersion, ...) are nobody's.
    pub fn owns(&self, path: &[Element]) -> bool {
        const SERVER_SET: &[&str] = &[
            "name",
            "namespace",
            "creationTimestamp",
            "selfLink",
            "uid",
            "clusterName",
            "generation",
            "managedFields",
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ];
        let status = path.first() == Some(&field("status"));
        match path {
            [] => false,
            [one] if *one == field("apiVersion") || *one == field("kind") => false,
            [m] if *m == field("metadata") => false,
            [m, f, ..] if *m == field("metadata") => {
                !self.status && !SERVER_SET.iter().any(|s| *f == field(s))
            }
            _ if self.status => status,
            _ => !(self.has_status && status),
        }
    }

    /// The paths of `v` a write through this section owns.
    pub fn owned(&self, v: &Value, shape: Shape<'_>) -> FieldSet {
        to_field_set(v, shape).filter(|p| self.owns(p))
    }
}

/// What a write changed, as field sets.
#[derive(Debug, Default)]
pub struct Diff {
    pub added: FieldSet,
    pub modified: FieldSet,
    pub removed: FieldSet,
}

impl Diff {
    /// Added or modified.
    pub fn changed(&self) -> FieldSet {
        self.added.union(&self.modified)
    }
}

/// What changed from `old` to `new` in the part `section` owns.
pub fn diff(old: &Value, new: &Value, shape: Shape<'_>, section: Section) -> Diff {
    let o = section.owned(old, shape);
    let n = section.owned(new, shape);
    let mut modified = FieldSet::default();
    for m in n.intersection(&o).members() {
        if n.is_leaf(&m) && o.is_leaf(&m) && value_at(old, &m, shape) != value_at(new, &m, shape) {
            modified.insert(&m);
        }
    }
    Diff {
        added: n.difference(&o),
        removed: o.difference(&n),
        modified,
    }
}

/// Records a non-apply write (`operation: Update`) by `manager` that turned `old` (None: a
/// create) into `new`: the manager owns what it added or changed, other managers lose it,
/// and everyone loses what it removed. The manager's entry gets a new time when it changed
/// something.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    shape: Shape<'_>,
    section: Section,
) {
    let empty = json!({});
    let mut entries = old.map(decode).unwrap_or_default();
    let d = diff(old.unwrap_or(&empty), new, shape, section);
    let changed = d.changed();
    let subresource = if section.status { "status" } else { "" };
    for e in entries
        .iter_mut()
        .filter(|e| !e.is(manager, "Update", subresource, api_version))
    {
        e.set = e.set.difference(&changed).difference(&d.removed);
    }
    if !changed.is_empty() {
        let now = now_rfc3339();
        match entries
            .iter_mut()
            .find(|e| e.is(manager, "Update", subresource, api_version))
        {
            Some(e) => {
                e.set = e.set.difference(&d.removed).union(&changed);
                e.time = now;
            }
            None => entries.push(Entry {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version: api_version.to_string(),
                subresource: subresource.to_string(),
                time: now,
                set: changed,
            }),
        }
    } else if let Some(e) = entries
        .iter_mut()
        .find(|e| e.is(manager, "Update", subresource, api_version))
    {
        e.set = e.set.difference(&d.removed);
    }
    store_in(new, &encode(&entries));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_takes_the_fields_it_changes_from_other_managers() {
        let shape = Shape::root(None);
        let main = Section {
            has_status: false,
            status: false,
        };
        let mut obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "uid": "u"}, "data": {"a": "1", "b": "2"}});
        record_update(None, &mut obj, "creator", "v1", shape, main);
        let entries = decode(&obj);
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0].set.to_fields_v1(),
            json!({"f:data": {"f:a": {}, "f:b": {}}})
        );
        let old = obj.clone();
        obj["data"]["a"] = json!("changed");
        obj["data"]["c"] = json!("3");
        record_update(Some(&old), &mut obj, "editor", "v1", shape, main);
        let entries = decode(&obj);
        let creator = entries
            .iter()
            .find(|e| e.manager == "creator")
            .expect("creator");
        let editor = entries
            .iter()
            .find(|e| e.manager == "editor")
            .expect("editor");
        assert_eq!(creator.set.to_fields_v1(), json!({"f:data": {"f:b": {}}}));
        assert_eq!(
            editor.set.to_fields_v1(),
            json!({"f:data": {"f:a": {}, "f:c": {}}})
        );
        assert_eq!(editor.describe(), "\"editor\" using v1");
    }
}

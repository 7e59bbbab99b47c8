//! Field sets, as server-side apply tracks ownership (structured-merge-diff's `fieldpath.Set`):
//! the paths of an object's fields, list items and map entries, serialized as `fieldsV1`
//! (`{"f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:image": {}}}}}`), and
//! the shape of the object that decides what a path element is: which objects are structs
//! (their fields are not owned themselves, only what is under them), maps (every entry is
//! owned) or atomic, and which lists merge by key (`x-kubernetes-list-type: map`, the built-in
//! merge keys), hold a set, or are atomic.
//!
//! Custom resources take the shape from their CRD's `openAPIV3Schema`; built-in types from
//! the list below, keyed by field name (the merge keys of the Go types).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// One path element as `fieldsV1` writes it: `f:name`, `k:{"name":"x"}`, `v:"x"`, `i:0`.
pub type Element = String;
/// A path from the object's root.
pub type Path = Vec<Element>;

/// A set of paths. A path is a member when it is owned itself; a node may also only lead to
/// members below it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<Element, FieldSet>,
}

impl FieldSet {
    pub fn is_empty(&self) -> bool {
        !self.member && self.children.values().all(FieldSet::is_empty)
    }

    pub fn insert(&mut self, path: &[Element]) {
        match path.split_first() {
            None => self.member = true,
            Some((first, rest)) => self.children.entry(first.clone()).or_default().insert(rest),
        }
    }

    fn node(&self, path: &[Element]) -> Option<&FieldSet> {
        match path.split_first() {
            None => Some(self),
            Some((first, rest)) => self.children.get(first)?.node(rest),
        }
    }

    /// Whether `path` itself is a member.
    pub fn has(&self, path: &[Element]) -> bool {
        self.node(path).is_some_and(|n| n.member)
    }

    /// Whether `path` is a member with nothing owned below it.
    pub fn is_leaf(&self, path: &[Element]) -> bool {
        self.node(path)
            .is_some_and(|n| n.member && n.children.values().all(FieldSet::is_empty))
    }

    /// Whether `path`, a path above it or a path below it is a member: whether anything of the
    /// value at `path` is owned.
    pub fn covers(&self, path: &[Element]) -> bool {
        let mut cur = self;
        for pe in path {
            if cur.member {
                return true;
            }
            match cur.children.get(pe) {
                Some(n) => cur = n,
                None => return false,
            }
        }
        !cur.is_empty()
    }

    /// Every member, in order.
    pub fn members(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Path, out: &mut Vec<Path>) {
        if self.member {
            out.push(prefix.clone());
        }
        for (pe, child) in &self.children {
            prefix.push(pe.clone());
            child.collect(prefix, out);
            prefix.pop();
        }
    }

    /// Every member in structured-merge-diff's order (what conflict messages list): the
    /// members among a node's children first, then what lies below each child.
    pub fn members_in_order(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.iterate(&mut Vec::new(), &mut out);
        out
    }

    fn iterate(&self, prefix: &mut Path, out: &mut Vec<Path>) {
        for (pe, child) in &self.children {
            if child.member {
                let mut p = prefix.clone();
                p.push(pe.clone());
                out.push(p);
            }
        }
        for (pe, child) in &self.children {
            if !child.children.is_empty() {
                prefix.push(pe.clone());
                child.iterate(prefix, out);
                prefix.pop();
            }
        }
    }

    pub fn union(&self, other: &FieldSet) -> FieldSet {
        let mut out = self.clone();
        for m in other.members() {
            out.insert(&m);
        }
        out
    }

    /// The members of `self` that are not members of `other`.
    pub fn difference(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet::default();
        for m in self.members() {
            if !other.has(&m) {
                out.insert(&m);
            }
        }
        out
    }

    /// The members of both.
    pub fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet::default();
        for m in self.members() {
            if other.has(&m) {
                out.insert(&m);
            }
        }
        out
    }

    /// The members for which `keep` holds.
    pub fn filter(&self, keep: impl Fn(&[Element]) -> bool) -> FieldSet {
        let mut out = FieldSet::default();
        for m in self.members().into_iter().filter(|m| keep(m)) {
            out.insert(&m);
        }
        out
    }

    /// `fieldsV1` as the API server writes it.
    pub fn to_fields_v1(&self) -> Value {
        let mut m = Map::new();
        if self.member && !self.children.is_empty() {
            m.insert(".".into(), Value::Object(Map::new()));
        }
        for (pe, child) in &self.children {
            if !child.is_empty() {
                m.insert(pe.clone(), child.to_fields_v1());
            }
        }
        Value::Object(m)
    }

    /// Reads `fieldsV1` (what cannot be read is no set).
    pub fn from_fields_v1(v: &Value) -> FieldSet {
        let mut out = FieldSet::default();
        if let Some(m) = v.as_object() {
            out.member = m.is_empty() || m.contains_key(".");
            for (k, child) in m {
                if k != "." {
                    out.children
                        .insert(k.clone(), FieldSet::from_fields_v1(child));
                }
            }
        }
        out
    }
}

/// A path as conflict messages print it: `.spec.containers[name="app"].image`.
pub fn path_string(path: &[Element]) -> String {
    let mut out = String::new();
    for pe in path {
        if let Some(f) = pe.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(k) = pe.strip_prefix("k:") {
            let keys: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = keys
                .iter()
                .map(|(name, v)| format!("{name}={}", go_value(v)))
                .collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = pe.strip_prefix("v:") {
            let v: Value = serde_json::from_str(v).unwrap_or(Value::Null);
            out.push_str(&format!("[={}]", go_value(&v)));
        } else if let Some(i) = pe.strip_prefix("i:") {
            out.push_str(&format!("[{i}]"));
        }
    }
    out
}

/// A value as structured-merge-diff's `value.ToString` prints it: strings quoted.
fn go_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

pub fn field(name: &str) -> Element {
    format!("f:{name}")
}

/// How a list merges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListKind {
    /// Replaced whole; owned as one field.
    Atomic,
    /// A set of scalars: items merge by value (`v:`).
    Set,
    /// Items merge by these key fields (`k:`).
    Map(Vec<String>),
}

/// How an object's entries are owned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// Replaced whole; owned as one field.
    Atomic,
    /// Declared fields: owned through what is under them.
    Struct,
    /// Arbitrary keys (labels, data): every entry is owned.
    Map,
}

/// The shape of the value at some path.
#[derive(Debug, Clone, Copy)]
pub enum Shape<'a> {
    /// A custom resource's schema node (None: nothing known, as under
    /// `x-kubernetes-preserve-unknown-fields`).
    Schema(Option<&'a Value>),
    /// A built-in type's value held by the field `name` ("" for a list item).
    Builtin(&'a str),
}

/// Built-in objects whose keys are data, not declared fields.
const BUILTIN_MAPS: &[&str] = &[
    "labels",
    "annotations",
    "data",
    "stringData",
    "binaryData",
    "nodeSelector",
    "requests",
    "limits",
    "hard",
    "used",
    "capacity",
    "allocatable",
    "overhead",
    "default",
    "defaultRequest",
    "min",
    "max",
    "maxLimitRequestRatio",
];

impl<'a> Shape<'a> {
    /// The shape at the root of an object of a type with this schema (None: built-in).
    pub fn root(schema: Option<&'a Value>) -> Shape<'a> {
        match schema {
            Some(s) => Shape::Schema(Some(s)),
            None => Shape::Builtin(""),
        }
    }

    pub fn object_kind(&self, value: &Value) -> ObjectKind {
        match self {
            Shape::Schema(None) => ObjectKind::Map,
            Shape::Schema(Some(s)) => {
                if s.get("x-kubernetes-map-type").and_then(Value::as_str) == Some("atomic") {
                    ObjectKind::Atomic
                } else if s.get("properties").is_some() {
                    ObjectKind::Struct
                } else {
                    ObjectKind::Map
                }
            }
            Shape::Builtin(name) => {
                let selector = matches!(*name, "labelSelector" | "namespaceSelector")
                    || (*name == "selector"
                        && (value.get("matchLabels").is_some()
                            || value.get("matchExpressions").is_some()));
                if selector {
                    ObjectKind::Atomic
                } else if BUILTIN_MAPS.contains(name) || (*name == "selector") {
                    ObjectKind::Map
                } else {
                    ObjectKind::Struct
                }
            }
        }
    }

    /// Whether the entry `key` of an object of this shape is owned itself (map entries and
    /// undeclared fields are; declared struct fields only through what is under them).
    pub fn entry_is_member(&self, key: &str, value: &Value) -> bool {
        match self {
            Shape::Schema(Some(s)) if s.get("properties").is_some() => {
                s.pointer(&format!("/properties/{}", escape(key))).is_none()
            }
            _ => self.object_kind(value) == ObjectKind::Map,
        }
    }

    /// The shape of the entry `key` of an object of this shape.
    pub fn child(&self, key: &'a str, at_root: bool) -> Shape<'a> {
        if at_root && key == "metadata" {
            return Shape::Builtin("metadata");
        }
        match self {
            Shape::Schema(None) => Shape::Schema(None),
            Shape::Schema(Some(s)) => {
                if let Some(p) = s.get("properties").and_then(|p| p.get(key)) {
                    Shape::Schema(Some(p))
                } else {
                    Shape::Schema(s.get("additionalProperties").filter(|a| a.is_object()))
                }
            }
            Shape::Builtin(_) => Shape::Builtin(key),
        }
    }

    /// The shape of the items of a list of this shape.
    pub fn item(&self) -> Shape<'a> {
        match self {
            Shape::Schema(s) => Shape::Schema(s.and_then(|s| s.get("items"))),
            Shape::Builtin(_) => Shape::Builtin(""),
        }
    }

    /// How a list of this shape merges (`items`: its items, for the built-in heuristics).
    pub fn list_kind(&self, items: &[Value]) -> ListKind {
        match self {
            Shape::Schema(None) => ListKind::Atomic,
            Shape::Schema(Some(s)) => {
                match s.get("x-kubernetes-list-type").and_then(Value::as_str) {
                    Some("set") => ListKind::Set,
                    Some("map") => ListKind::Map(
                        s.get("x-kubernetes-list-map-keys")
                            .map(crate::json::string_list)
                            .unwrap_or_default(),
                    ),
                    _ => ListKind::Atomic,
                }
            }
            Shape::Builtin(name) => builtin_list_kind(name, items),
        }
    }
}

/// The merge keys of the built-in types' lists (the Go types' `patchMergeKey` and
/// `listType`); other lists are atomic.
fn builtin_list_kind(name: &str, items: &[Value]) -> ListKind {
    let keys = |k: &[&str]| ListKind::Map(k.iter().map(|s| s.to_string()).collect());
    match name {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "imagePullSecrets"
        | "env"
        | "resourceClaims"
        | "schedulingGates" => keys(&["name"]),
        "ports" if items.iter().any(|i| i.get("containerPort").is_some()) => {
            keys(&["containerPort", "protocol"])
        }
        "ports" if items.iter().all(|i| i.get("port").is_some()) && !items.is_empty() => {
            keys(&["port", "protocol"])
        }
        "volumeMounts" => keys(&["mountPath"]),
        "volumeDevices" => keys(&["devicePath"]),
        "conditions" => keys(&["type"]),
        "ownerReferences" => keys(&["uid"]),
        "hostAliases" | "podIPs" | "hostIPs" => keys(&["ip"]),
        "topologySpreadConstraints" => keys(&["topologyKey", "whenUnsatisfiable"]),
        "finalizers" => ListKind::Set,
        _ => ListKind::Atomic,
    }
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The `k:` element of an item of a list merged by `keys` (a missing `protocol` is `TCP`, the
/// default the API server keys ports by); None when the item is not an object.
pub fn key_element(item: &Value, keys: &[String]) -> Option<Element> {
    let o = item.as_object()?;
    let mut k = Map::new();
    for name in keys {
        match o.get(name) {
            Some(v) => {
                k.insert(name.clone(), v.clone());
            }
            None if name == "protocol" => {
                k.insert(name.clone(), Value::String("TCP".into()));
            }
            None => {}
        }
    }
    Some(format!("k:{}", Value::Object(k)))
}

/// The `v:` element of a set item.
pub fn value_element(item: &Value) -> Element {
    format!("v:{item}")
}

/// The element naming `item` of a list of kind `kind` at index `i`.
pub fn item_element(kind: &ListKind, item: &Value, i: usize) -> Element {
    match kind {
        ListKind::Map(keys) => key_element(item, keys).unwrap_or_else(|| format!("i:{i}")),
        ListKind::Set => value_element(item),
        ListKind::Atomic => format!("i:{i}"),
    }
}

/// Every path of `v` that an applier or updater of `v` owns (structured-merge-diff's
/// `ToFieldSet`): scalars, atomic lists and objects, map entries, list items, empty objects.
pub fn to_field_set(v: &Value, shape: Shape<'_>) -> FieldSet {
    let mut set = FieldSet::default();
    walk(v, shape, &mut Vec::new(), &mut set);
    set
}

fn walk(v: &Value, shape: Shape<'_>, path: &mut Path, set: &mut FieldSet) {
    match v {
        Value::Object(m) => {
            if shape.object_kind(v) == ObjectKind::Atomic {
                set.insert(path);
                return;
            }
            for (k, child) in m {
                path.push(field(k));
                walk(child, shape.child(k, path.len() == 1), path, set);
                let empty = child.is_null() || child.as_object().is_some_and(Map::is_empty);
                if empty || shape.entry_is_member(k, v) {
                    set.insert(path);
                }
                path.pop();
            }
        }
        Value::Array(items) => {
            let kind = shape.list_kind(items);
            if kind == ListKind::Atomic {
                set.insert(path);
                return;
            }
            for (i, item) in items.iter().enumerate() {
                path.push(item_element(&kind, item, i));
                if matches!(kind, ListKind::Map(_)) {
                    walk(item, shape.item(), path, set);
                }
                set.insert(path);
                path.pop();
            }
        }
        _ => set.insert(path),
    }
}

/// The value at `path` of `v`.
pub fn value_at<'v>(v: &'v Value, path: &[Element], shape: Shape<'_>) -> Option<&'v Value> {
    let mut cur = v;
    let mut shape = shape;
    for (depth, pe) in path.iter().enumerate() {
        if let Some(f) = pe.strip_prefix("f:") {
            cur = cur.get(f)?;
            shape = shape.child(f, depth == 0);
        } else {
            let items = cur.as_array()?;
            let kind = shape.list_kind(items);
            cur = items
                .iter()
                .enumerate()
                .find(|(i, it)| &item_element(&kind, it, *i) == pe)
                .map(|(_, it)| it)?;
            shape = shape.item();
        }
    }
    Some(cur)
}

/// Removes the field, list item or map entry at `path` from `v` (nothing when it is absent).
/// An object of arbitrary keys (labels, annotations) left empty goes too, as the API server
/// does not store empty maps of built-in types.
pub fn remove_at(v: &mut Value, path: &[Element], shape: Shape<'_>) {
    remove_rec(v, path, shape, 0);
}

fn remove_rec(v: &mut Value, path: &[Element], shape: Shape<'_>, depth: usize) {
    let Some((pe, rest)) = path.split_first() else {
        return;
    };
    if let Some(f) = pe.strip_prefix("f:") {
        let child_shape = shape.child(f, depth == 0);
        let Some(o) = v.as_object_mut() else {
            return;
        };
        if rest.is_empty() {
            o.remove(f);
            return;
        }
        let Some(child) = o.get_mut(f) else {
            return;
        };
        remove_rec(child, rest, child_shape, depth + 1);
        let emptied = child.as_object().is_some_and(Map::is_empty);
        if emptied && matches!(child_shape, Shape::Builtin(n) if BUILTIN_MAPS.contains(&n)) {
            o.remove(f);
        }
        return;
    }
    let Some(items) = v.as_array_mut() else {
        return;
    };
    let kind = shape.list_kind(items);
    let Some(i) = items
        .iter()
        .enumerate()
        .position(|(i, it)| &item_element(&kind, it, i) == pe)
    else {
        return;
    };
    if rest.is_empty() {
        items.remove(i);
    } else {
        remove_rec(&mut items[i], rest, shape.item(), depth + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_sets_of_built_in_objects_read_like_the_api_servers() {
        let pod = json!({"metadata": {"labels": {"app": "x"}},
            "spec": {"containers": [{"name": "app", "image": "busybox",
                "ports": [{"containerPort": 80}], "args": ["a", "b"], "resources": {}}],
                "restartPolicy": "Never"}});
        let set = to_field_set(&pod, Shape::root(None));
        assert_eq!(
            set.to_fields_v1(),
            json!({"f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {},
                    "f:args": {}, "f:image": {}, "f:name": {},
                    "f:ports": {"k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}}},
                    "f:resources": {}}},
                "f:restartPolicy": {}}})
        );
        assert_eq!(FieldSet::from_fields_v1(&set.to_fields_v1()), set);
        let path = vec![
            field("spec"),
            field("containers"),
            "k:{\"name\":\"app\"}".to_string(),
            field("image"),
        ];
        assert_eq!(path_string(&path), ".spec.containers[name=\"app\"].image");
        assert_eq!(
            value_at(&pod, &path, Shape::root(None)),
            Some(&json!("busybox"))
        );
        assert!(set.has(&path));
        assert!(set.covers(&path[..2]));
    }

    #[test]
    fn crd_schemas_decide_list_and_map_types() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "items": {"type": "array", "x-kubernetes-list-type": "map",
                          "x-kubernetes-list-map-keys": ["id"], "items": {"type": "object",
                          "properties": {"id": {"type": "string"}, "v": {"type": "integer"}}}},
                "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                "args": {"type": "array", "items": {"type": "string"}},
                "env": {"type": "object", "additionalProperties": {"type": "string"}}}}}});
        let obj = json!({"spec": {"items": [{"id": "a", "v": 1}], "tags": ["x"], "args": ["1"],
                                  "env": {"K": "V"}}});
        let set = to_field_set(&obj, Shape::root(Some(&schema)));
        assert_eq!(
            set.to_fields_v1(),
            json!({"f:spec": {"f:args": {}, "f:env": {"f:K": {}},
                "f:items": {"k:{\"id\":\"a\"}": {".": {}, "f:id": {}, "f:v": {}}},
                "f:tags": {"v:\"x\"": {}}}})
        );
        let mut o = obj.clone();
        remove_at(
            &mut o,
            &[field("spec"), field("items"), "k:{\"id\":\"a\"}".into()],
            Shape::root(Some(&schema)),
        );
        assert_eq!(o["spec"]["items"], json!([]));
    }
}

//! The object store: every object of every type, one global `resourceVersion` counter, the
//! event history that watches resume from, and the write semantics of the API server
//! (defaults, validation, optimistic concurrency, status subresource, generation, finalizers).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::apiserver::resources::{ResourceType, builtin_types, types_from_crd};
use crate::apiserver::schema;
use crate::apiserver::errors::{ApiError, FieldError, now_rfc3339};

/// `(group, plural)`: the storage key of a resource, shared by all its versions.
pub type TypeKey = (String, String);

/// The name of the one node the kubelet runs.
pub const NODE_NAME: &str = "kube-sim-node";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change to one object.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub key: TypeKey,
    pub namespace: String,
    pub kind: EventType,
    pub object: Value,
    /// The object before the change (for selector transitions in watches).
    pub old: Option<Value>,
}

/// Options of a write.
#[derive(Debug, Clone, Default)]
pub struct WriteOpts {
    pub dry_run: bool,
    /// Write through the `/status` subresource.
    pub status: bool,
    pub field_manager: Option<String>,
    /// `Apply` for server-side apply, `Update` otherwise.
    pub operation: Option<&'static str>,
    /// `fieldValidation=Strict`: unknown fields are an error instead of being pruned.
    pub strict: bool,
}

/// Options of a delete.
#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    pub grace_seconds: Option<i64>,
    pub propagation: Option<String>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

struct State {
    rv: u64,
    objects: HashMap<TypeKey, BTreeMap<(String, String), Value>>,
    history: VecDeque<Arc<Event>>,
    /// Highest resourceVersion that has been dropped from the history.
    compacted: u64,
    custom_types: Vec<ResourceType>,
    next_ip: u32,
}

/// The shared object store.
pub struct Store {
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<Event>>,
    builtin: Vec<ResourceType>,
    history_limit: usize,
}

fn meta(obj: &Value, field: &str) -> Option<String> {
    obj.get("metadata")?.get(field)?.as_str().map(String::from)
}

fn meta_mut(obj: &mut Value) -> Option<&mut Map<String, Value>> {
    let root = obj.as_object_mut()?;
    let m = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !m.is_object() {
        *m = Value::Object(Map::new());
    }
    m.as_object_mut()
}

fn bad_shape() -> ApiError {
    ApiError::bad_request("the body of the request must be an object")
}

/// Rejects bodies whose well-known parts have the wrong JSON type (the real server fails to
/// decode them).
fn check_shape(obj: &Value) -> Result<(), ApiError> {
    let Some(o) = obj.as_object() else {
        return Err(bad_shape());
    };
    for k in ["metadata", "spec", "status"] {
        if o.get(k).is_some_and(|v| !v.is_object() && !v.is_null()) {
            return Err(ApiError::bad_request(format!(
                "error decoding request body: .{k} must be an object"
            )));
        }
    }
    if let Some(m) = o.get("metadata").and_then(Value::as_object) {
        for k in ["labels", "annotations"] {
            if m.get(k).is_some_and(|v| !v.is_object() && !v.is_null()) {
                return Err(ApiError::bad_request(format!(
                    "error decoding request body: .metadata.{k} must be an object"
                )));
            }
        }
    }
    Ok(())
}

/// The object without `metadata` and `status`: what counts as its spec for `generation`.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

fn random_suffix(n: usize) -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

fn new_uid() -> String {
    let mut rng = rand::rng();
    let b: [u8; 16] = rng.random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn dns_label_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_subdomain_ok(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label_ok)
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .map(crate::apiserver::errors::string_list)
        .unwrap_or_default()
}

fn is_pod(t: &TypeKey) -> bool {
    t.0.is_empty() && t.1 == "pods"
}

fn pod_terminal(obj: &Value) -> bool {
    matches!(
        obj.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded") | Some("Failed")
    )
}

impl Store {
    pub fn new(history_limit: usize) -> Arc<Store> {
        let (tx, _) = broadcast::channel(16_384);
        let store = Store {
            state: Mutex::new(State {
                rv: 1,
                objects: HashMap::new(),
                history: VecDeque::new(),
                compacted: 0,
                custom_types: Vec::new(),
                next_ip: 10,
            }),
            tx,
            builtin: builtin_types(),
            history_limit: history_limit.max(1),
        };
        let store = Arc::new(store);
        store.bootstrap();
        store
    }

    fn bootstrap(&self) {
        let ns_type = self.builtin_type("", "namespaces");
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            if let Some(t) = &ns_type {
                let obj =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                if let Err(e) = self.create(t, "", obj, &WriteOpts::default()) {
                    tracing::error!("bootstrap namespace {ns}: {e}");
                }
            }
        }
        if let Some(t) = self.builtin_type("", "nodes") {
            let node = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": NODE_NAME, "labels": {
                    "kubernetes.io/hostname": NODE_NAME,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                    "node-role.kubernetes.io/control-plane": "",
                }},
                "spec": {},
                "status": {
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                    "message": "kube-sim kubelet is posting ready status",
                                    "lastHeartbeatTime": now_rfc3339(), "lastTransitionTime": now_rfc3339()}],
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                  {"type": "Hostname", "address": NODE_NAME}],
                    "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                    "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                    "nodeInfo": {"kubeletVersion": "v1.33.0-kube-sim", "operatingSystem": "linux",
                                 "architecture": "amd64", "containerRuntimeVersion": "kube-sim://0.1"},
                }
            });
            if let Err(e) = self.create(&t, "", node, &WriteOpts::default()) {
                tracing::error!("bootstrap node: {e}");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn builtin_type(&self, group: &str, plural: &str) -> Option<ResourceType> {
        self.builtin
            .iter()
            .find(|t| t.group == group && t.plural == plural)
            .cloned()
    }

    /// Every served type, built-in and custom.
    pub fn types(&self) -> Vec<ResourceType> {
        let st = self.lock();
        let mut v = self.builtin.clone();
        v.extend(st.custom_types.iter().cloned());
        v
    }

    pub fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        if let Some(t) = self
            .builtin
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
        {
            return Some(t.clone());
        }
        let st = self.lock();
        st.custom_types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    /// Subscribes to every future event.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// Drops the whole watch history (tests use it to provoke 410 Gone).
    pub fn compact_history(&self) {
        let mut st = self.lock();
        st.compacted = st.rv;
        st.history.clear();
    }

    pub fn get(&self, key: &TypeKey, ns: &str, name: &str) -> Option<Value> {
        let st = self.lock();
        st.objects
            .get(key)?
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// All objects of a type (in one namespace, or all when `ns` is None) and the list's
    /// resourceVersion.
    pub fn list(&self, key: &TypeKey, ns: Option<&str>) -> (Vec<Value>, u64) {
        let st = self.lock();
        let items = st
            .objects
            .get(key)
            .map(|m| {
                m.iter()
                    .filter(|((n, _), _)| ns.is_none_or(|want| want == n))
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default();
        (items, st.rv)
    }

    /// Every object of every type (for the garbage collector).
    pub fn all_objects(&self) -> Vec<(TypeKey, Value)> {
        let st = self.lock();
        st.objects
            .iter()
            .flat_map(|(k, m)| m.values().map(move |v| (k.clone(), v.clone())))
            .collect()
    }

    /// Registers a watch: returns the events to send first (existing objects when `from` is
    /// None, or the history after `from`), a receiver for what follows, and the current rv.
    #[allow(clippy::type_complexity)]
    pub fn watch_from(
        &self,
        key: &TypeKey,
        ns: Option<&str>,
        from: Option<u64>,
    ) -> Result<(Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>, u64), ApiError> {
        let st = self.lock();
        let rx = self.tx.subscribe();
        let in_scope = |e: &Event| &e.key == key && ns.is_none_or(|n| n == e.namespace);
        let initial = match from {
            None => st
                .objects
                .get(key)
                .into_iter()
                .flat_map(|m| m.iter())
                .filter(|((n, _), _)| ns.is_none_or(|want| want == n))
                .map(|((n, _), obj)| {
                    Arc::new(Event {
                        rv: obj
                            .pointer("/metadata/resourceVersion")
                            .and_then(Value::as_str)
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0),
                        key: key.clone(),
                        namespace: n.clone(),
                        kind: EventType::Added,
                        object: obj.clone(),
                        old: None,
                    })
                })
                .collect(),
            Some(rv) => {
                if rv < st.compacted {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {rv} ({})",
                        st.compacted + 1
                    )));
                }
                st.history
                    .iter()
                    .filter(|e| e.rv > rv && in_scope(e))
                    .cloned()
                    .collect()
            }
        };
        Ok((initial, rx, st.rv))
    }

    fn emit(&self, st: &mut State, ev: Event) {
        let ev = Arc::new(ev);
        st.history.push_back(ev.clone());
        while st.history.len() > self.history_limit {
            if let Some(old) = st.history.pop_front() {
                st.compacted = old.rv;
            }
        }
        // No receivers is fine.
        let _ = self.tx.send(ev);
    }

    fn next_rv(st: &mut State) -> u64 {
        st.rv += 1;
        st.rv
    }

    fn put(&self, st: &mut State, key: &TypeKey, ns: &str, name: &str, obj: Value) {
        st.objects
            .entry(key.clone())
            .or_default()
            .insert((ns.to_string(), name.to_string()), obj);
    }

    fn take(st: &mut State, key: &TypeKey, ns: &str, name: &str) -> Option<Value> {
        st.objects
            .get_mut(key)?
            .remove(&(ns.to_string(), name.to_string()))
    }

    /// Creates an object. `ns` is the namespace from the URL ("" for cluster-scoped types).
    pub fn create(
        &self,
        t: &ResourceType,
        ns: &str,
        mut obj: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        check_shape(&obj)?;
        let key: TypeKey = (t.group.clone(), t.plural.clone());
        obj["apiVersion"] = Value::String(t.api_version());
        obj["kind"] = Value::String(t.kind.clone());
        if let Some(body_ns) = meta(&obj, "namespace")
            && t.namespaced
            && body_ns != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let name = match meta(&obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n,
            None => match meta(&obj, "generateName") {
                Some(prefix) => format!("{prefix}{}", random_suffix(5)),
                None => {
                    return Err(ApiError::invalid(
                        &t.kind,
                        &t.group,
                        "",
                        &[FieldError::with(
                            "metadata.name",
                            "FieldValueRequired",
                            "Required value: name or generateName is required",
                        )],
                    ));
                }
            },
        };
        let label_only =
            t.group.is_empty() && matches!(t.plural.as_str(), "namespaces" | "services");
        let name_ok = if label_only {
            dns_label_ok(&name)
        } else {
            dns_subdomain_ok(&name)
        };
        if !name_ok {
            let what = if label_only {
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
            } else {
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            };
            return Err(ApiError::invalid(
                &t.kind,
                &t.group,
                &name,
                &[FieldError::invalid(
                    "metadata.name",
                    &Value::String(name.clone()),
                    what,
                )],
            ));
        }
        self.prepare_create(t, &mut obj, &name)?;
        if t.custom {
            self.check_schema(t, &name, &mut obj, opts.strict, None)?;
        }
        let now = now_rfc3339();
        {
            let Some(m) = meta_mut(&mut obj) else {
                return Err(bad_shape());
            };
            m.insert("name".into(), Value::String(name.clone()));
            if t.namespaced {
                m.insert("namespace".into(), Value::String(ns.to_string()));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), Value::String(new_uid()));
            m.insert("creationTimestamp".into(), Value::String(now.clone()));
            m.insert("generation".into(), json!(1));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("managedFields");
        }
        if let Some(manager) = &opts.field_manager {
            record_manager(
                &mut obj,
                manager,
                opts.operation.unwrap_or("Update"),
                &t.api_version(),
            );
        }
        let mut st = self.lock();
        let store_ns = if t.namespaced { ns } else { "" };
        if t.namespaced {
            let nskey: TypeKey = (String::new(), "namespaces".into());
            match st
                .objects
                .get(&nskey)
                .and_then(|m| m.get(&(String::new(), ns.to_string())))
            {
                None => return Err(ApiError::not_found("", "namespaces", ns)),
                Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                            t.plural
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        if st
            .objects
            .get(&key)
            .is_some_and(|m| m.contains_key(&(store_ns.to_string(), name.clone())))
        {
            return Err(ApiError::already_exists(&t.group, &t.plural, &name));
        }
        if key.0.is_empty() && key.1 == "services" {
            let ip = st.next_ip;
            st.next_ip += 1;
            if obj.pointer("/spec/clusterIP").and_then(Value::as_str) != Some("None") {
                obj["spec"]["clusterIP"] = json!(format!("10.96.{}.{}", ip / 250, ip % 250 + 1));
            }
        }
        if opts.dry_run {
            return Ok(obj);
        }
        let rv = Self::next_rv(&mut st);
        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        self.put(&mut st, &key, store_ns, &name, obj.clone());
        self.emit(
            &mut st,
            Event {
                rv,
                key: key.clone(),
                namespace: store_ns.to_string(),
                kind: EventType::Added,
                object: obj.clone(),
                old: None,
            },
        );
        if key.1 == "customresourcedefinitions" && key.0 == "apiextensions.k8s.io" {
            self.crd_changed(&mut st, &name);
        }
        drop(st);
        if key.0.is_empty() && key.1 == "namespaces" {
            self.create_namespace_defaults(&name);
        }
        Ok(self.get(&key, store_ns, &name).unwrap_or(obj))
    }

    fn create_namespace_defaults(&self, ns: &str) {
        if let Some(t) = self.builtin_type("", "serviceaccounts") {
            let sa = json!({"metadata": {"name": "default"}});
            if let Err(e) = self.create(&t, ns, sa, &WriteOpts::default()) {
                tracing::warn!("default service account in {ns}: {e}");
            }
        }
    }

    /// Type-specific defaults and validation on create.
    fn prepare_create(
        &self,
        t: &ResourceType,
        obj: &mut Value,
        name: &str,
    ) -> Result<(), ApiError> {
        let builtin = !t.custom;
        match (t.group.as_str(), t.plural.as_str()) {
            ("", "pods") if builtin => {
                let mut errs = Vec::new();
                let containers = obj.pointer("/spec/containers").and_then(Value::as_array);
                if containers.is_none_or(|c| c.is_empty()) {
                    errs.push(FieldError::required("spec.containers"));
                }
                for (list, field) in [
                    ("containers", "spec.containers"),
                    ("initContainers", "spec.initContainers"),
                ] {
                    for (i, c) in obj["spec"][list]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .enumerate()
                    {
                        if c["name"].as_str().is_none_or(str::is_empty) {
                            errs.push(FieldError::required(&format!("{field}[{i}].name")));
                        }
                        if c["image"].as_str().is_none_or(str::is_empty) {
                            errs.push(FieldError::required(&format!("{field}[{i}].image")));
                        }
                    }
                }
                if !errs.is_empty() {
                    return Err(ApiError::invalid(&t.kind, "", name, &errs));
                }
                let spec = &mut obj["spec"];
                for (k, v) in [
                    ("restartPolicy", json!("Always")),
                    ("terminationGracePeriodSeconds", json!(30)),
                    ("dnsPolicy", json!("ClusterFirst")),
                    ("serviceAccountName", json!("default")),
                    ("schedulerName", json!("default-scheduler")),
                ] {
                    if spec.get(k).is_none() {
                        spec[k] = v;
                    }
                }
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            }
            ("", "namespaces") if builtin => {
                obj["status"] = json!({"phase": "Active"});
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
                let Some(m) = meta_mut(obj) else {
                    return Err(bad_shape());
                };
                let labels = m.entry("labels").or_insert_with(|| json!({}));
                labels["kubernetes.io/metadata.name"] = Value::String(name.to_string());
            }
            ("", "secrets") if builtin => {
                if let Some(sd) = obj.get("stringData").and_then(Value::as_object).cloned() {
                    let data = obj
                        .as_object_mut()
                        .map(|o| o.entry("data").or_insert_with(|| json!({})));
                    if let Some(data) = data {
                        for (k, v) in sd {
                            let s = v.as_str().unwrap_or_default();
                            data[k] =
                                Value::String(base64::engine::general_purpose::STANDARD.encode(s));
                        }
                    }
                    if let Some(o) = obj.as_object_mut() {
                        o.remove("stringData");
                    }
                }
                if obj.get("type").is_none() {
                    obj["type"] = json!("Opaque");
                }
            }
            ("", "services") if builtin => {
                if obj.pointer("/spec/type").is_none() {
                    obj["spec"]["type"] = json!("ClusterIP");
                }
                if let Some(ports) = obj.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        if p.get("protocol").is_none() {
                            p["protocol"] = json!("TCP");
                        }
                        if p.get("targetPort").is_none() {
                            p["targetPort"] = p["port"].clone();
                        }
                    }
                }
            }
            ("apiextensions.k8s.io", "customresourcedefinitions") => {
                let spec = &obj["spec"];
                let mut errs = Vec::new();
                for f in ["group", "names", "scope", "versions"] {
                    if spec.get(f).is_none() {
                        errs.push(FieldError::required(&format!("spec.{f}")));
                    }
                }
                let plural = spec
                    .pointer("/names/plural")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let group = spec["group"].as_str().unwrap_or_default();
                if errs.is_empty() && name != format!("{plural}.{group}") {
                    errs.push(FieldError::invalid(
                        "metadata.name",
                        &Value::String(name.into()),
                        "must be spec.names.plural+\".\"+spec.group",
                    ));
                }
                if !errs.is_empty() {
                    return Err(ApiError::invalid(&t.kind, &t.group, name, &errs));
                }
                obj["status"] = crd_status(obj);
            }
            _ => {
                if t.has_status
                    && t.custom
                    && let Some(o) = obj.as_object_mut()
                {
                    o.remove("status");
                }
            }
        }
        Ok(())
    }

    fn check_schema(
        &self,
        t: &ResourceType,
        name: &str,
        obj: &mut Value,
        strict: bool,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let Some(s) = &t.schema else { return Ok(()) };
        let out = schema::check_update(s, obj, old);
        if strict && !out.unknown.is_empty() {
            let fields: Vec<String> = out
                .unknown
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                t.kind,
                t.version,
                t.kind,
                fields.join(", ")
            )));
        }
        if !out.errors.is_empty() {
            return Err(ApiError::invalid(&t.kind, &t.group, name, &out.errors));
        }
        Ok(())
    }

    fn crd_changed(&self, st: &mut State, _name: &str) {
        let key: TypeKey = (
            "apiextensions.k8s.io".into(),
            "customresourcedefinitions".into(),
        );
        let crds: Vec<Value> = st
            .objects
            .get(&key)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        st.custom_types = crds.iter().flat_map(types_from_crd).collect();
    }

    /// Replaces an object (PUT). Honors `metadata.resourceVersion` as a precondition.
    pub fn update(
        &self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        mut new: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        let key: TypeKey = (t.group.clone(), t.plural.clone());
        let store_ns = if t.namespaced { ns } else { "" };
        check_shape(&new)?;
        if let Some(body_name) = meta(&new, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let old = self
            .get(&key, store_ns, name)
            .ok_or_else(|| ApiError::not_found(&t.group, &t.plural, name))?;
        if let Some(rv) = meta(&new, "resourceVersion").filter(|r| !r.is_empty())
            && Some(rv) != meta(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(&t.group, &t.plural, name));
        }
        new["apiVersion"] = Value::String(t.api_version());
        new["kind"] = Value::String(t.kind.clone());
        let mut merged = if opts.status {
            let mut m = old.clone();
            m["status"] = new.get("status").cloned().unwrap_or(Value::Null);
            if m["status"].is_null()
                && let Some(o) = m.as_object_mut()
            {
                o.remove("status");
            }
            m
        } else {
            if t.has_status {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            // Immutable metadata comes from the stored object.
            let old_meta = old["metadata"].clone();
            let Some(m) = meta_mut(&mut new) else {
                return Err(bad_shape());
            };
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "namespace",
                "name",
                "generation",
                "managedFields",
            ] {
                match old_meta.get(f) {
                    Some(v) => {
                        m.insert(f.into(), v.clone());
                    }
                    None => {
                        m.remove(f);
                    }
                }
            }
            if t.custom {
                self.check_schema(t, name, &mut new, opts.strict, Some(&old))?;
            }
            if key.0.is_empty()
                && key.1 == "services"
                && let Some(ip) = old.pointer("/spec/clusterIP")
            {
                new["spec"]["clusterIP"] = ip.clone();
            }
            if key.0.is_empty() && key.1 == "pods" {
                // The pod spec is immutable but for a few fields; nodeName is set by binding.
                if let Some(n) = old.pointer("/spec/nodeName")
                    && new.pointer("/spec/nodeName").is_none()
                {
                    new["spec"]["nodeName"] = n.clone();
                }
            }
            if key.0.is_empty()
                && key.1 == "secrets"
                && let Some(sd) = new.get("stringData").and_then(Value::as_object).cloned()
            {
                for (k, v) in sd {
                    let s = v.as_str().unwrap_or_default();
                    new["data"][k] =
                        Value::String(base64::engine::general_purpose::STANDARD.encode(s));
                }
                if let Some(o) = new.as_object_mut() {
                    o.remove("stringData");
                }
            }
            new
        };
        if t.custom && opts.status {
            self.check_schema(t, name, &mut merged, opts.strict, Some(&old))?;
        }
        if spec_part(&merged) != spec_part(&old) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            merged["metadata"]["generation"] = json!(g + 1);
        }
        merged["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if key.0 == "apiextensions.k8s.io" && !opts.status {
            merged["status"] = crd_status(&merged);
            if let Some(conds) = old.pointer("/status/conditions") {
                merged["status"]["conditions"] = conds.clone();
            }
        }
        // A write that changes nothing is a no-op: no new resourceVersion, no event.
        if merged == old {
            return Ok(old);
        }
        if let Some(manager) = &opts.field_manager {
            record_manager(
                &mut merged,
                manager,
                opts.operation.unwrap_or("Update"),
                &t.api_version(),
            );
        }
        if opts.dry_run {
            return Ok(merged);
        }
        self.commit_update(&key, store_ns, name, merged, Some(old), false)
    }

    /// Stores a modified object, or removes it when it is being deleted and nothing holds it.
    fn commit_update(
        &self,
        key: &TypeKey,
        ns: &str,
        name: &str,
        mut obj: Value,
        old: Option<Value>,
        force: bool,
    ) -> Result<Value, ApiError> {
        let mut st = self.lock();
        // The object may have changed since the caller read it; the caller checked the
        // precondition against its read, which is the same lock-free window a real server's
        // guaranteed update closes by retrying. Re-check here.
        let current = st
            .objects
            .get(key)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&key.0, &key.1, name))?;
        if let Some(o) = &old
            && meta(o, "resourceVersion") != meta(&current, "resourceVersion")
        {
            return Err(ApiError::conflict(&key.0, &key.1, name));
        }
        let rv = Self::next_rv(&mut st);
        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
        let held = !finalizers(&obj).is_empty()
            || (!force
                && is_pod(key)
                && obj.pointer("/spec/nodeName").is_some()
                && !pod_terminal(&obj))
            || (key.0.is_empty() && key.1 == "namespaces");
        if deleting && !held {
            Self::take(&mut st, key, ns, name);
            self.emit(
                &mut st,
                Event {
                    rv,
                    key: key.clone(),
                    namespace: ns.into(),
                    kind: EventType::Deleted,
                    object: obj.clone(),
                    old: Some(current),
                },
            );
        } else {
            self.put(&mut st, key, ns, name, obj.clone());
            self.emit(
                &mut st,
                Event {
                    rv,
                    key: key.clone(),
                    namespace: ns.into(),
                    kind: EventType::Modified,
                    object: obj.clone(),
                    old: Some(current),
                },
            );
        }
        if key.0 == "apiextensions.k8s.io" && key.1 == "customresourcedefinitions" {
            self.crd_changed(&mut st, name);
            if deleting && !held {
                self.drop_custom_resources(&mut st, &obj);
            }
        }
        Ok(obj)
    }

    /// Read-modify-write by a controller of kube-sim (kubelet, GC): no precondition, retried
    /// on conflict. Returns None when the object is gone.
    pub fn modify(
        &self,
        key: &TypeKey,
        ns: &str,
        name: &str,
        f: impl Fn(&mut Value),
    ) -> Option<Value> {
        for _ in 0..50 {
            let old = self.get(key, ns, name)?;
            let mut new = old.clone();
            f(&mut new);
            if new == old {
                return Some(old);
            }
            match self.commit_update(key, ns, name, new, Some(old), false) {
                Ok(v) => return Some(v),
                Err(e) if e.code == 409 => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// Deletes an object: immediately, or by setting `deletionTimestamp` when finalizers hold it
    /// or (for a running pod) the kubelet must stop it first.
    pub fn delete(
        &self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Value, ApiError> {
        let key: TypeKey = (t.group.clone(), t.plural.clone());
        let store_ns = if t.namespaced { ns } else { "" };
        let obj = self
            .get(&key, store_ns, name)
            .ok_or_else(|| ApiError::not_found(&t.group, &t.plural, name))?;
        if let Some(uid) = &opts.precondition_uid
            && meta(&obj, "uid").as_ref() != Some(uid)
        {
            return Err(ApiError::conflict(&t.group, &t.plural, name));
        }
        if let Some(rv) = &opts.precondition_rv
            && meta(&obj, "resourceVersion").as_ref() != Some(rv)
        {
            return Err(ApiError::conflict(&t.group, &t.plural, name));
        }
        if opts.dry_run {
            return Ok(obj);
        }
        let uid = meta(&obj, "uid").unwrap_or_default();
        let policy = opts
            .propagation
            .clone()
            .unwrap_or_else(|| "Background".into());
        if policy == "Orphan" {
            self.orphan_dependents(&uid);
        }
        let mut new = obj.clone();
        let already = obj.pointer("/metadata/deletionTimestamp").is_some();
        let grace = opts.grace_seconds.or_else(|| {
            if is_pod(&key) {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            } else {
                None
            }
        });
        if policy == "Foreground" {
            let Some(m) = meta_mut(&mut new) else {
                return Err(bad_shape());
            };
            let f = m.entry("finalizers").or_insert_with(|| json!([]));
            if let Some(a) = f.as_array_mut()
                && !a.contains(&json!("foregroundDeletion"))
            {
                a.push(json!("foregroundDeletion"));
            }
        }
        if !already {
            let Some(m) = meta_mut(&mut new) else {
                return Err(bad_shape());
            };
            m.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
            m.insert(
                "deletionGracePeriodSeconds".into(),
                json!(grace.unwrap_or(0)),
            );
        } else if let Some(g) = grace {
            new["metadata"]["deletionGracePeriodSeconds"] = json!(g);
        }
        if key.0.is_empty() && key.1 == "namespaces" {
            new["status"]["phase"] = json!("Terminating");
        }
        let force = is_pod(&key) && grace == Some(0);
        self.commit_update(&key, store_ns, name, new, Some(obj), force)
    }

    /// Removes an object that is being deleted once nothing holds it any more (the kubelet
    /// calls this after stopping a pod; the namespace controller after emptying a namespace).
    pub fn finish_deletion(&self, key: &TypeKey, ns: &str, name: &str) {
        let mut st = self.lock();
        let Some(obj) = st
            .objects
            .get(key)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
        else {
            return;
        };
        if obj.pointer("/metadata/deletionTimestamp").is_none() || !finalizers(&obj).is_empty() {
            return;
        }
        let rv = Self::next_rv(&mut st);
        let mut gone = obj.clone();
        gone["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        Self::take(&mut st, key, ns, name);
        self.emit(
            &mut st,
            Event {
                rv,
                key: key.clone(),
                namespace: ns.into(),
                kind: EventType::Deleted,
                object: gone,
                old: Some(obj),
            },
        );
    }

    fn orphan_dependents(&self, owner_uid: &str) {
        for (key, obj) in self.all_objects() {
            let refs = obj
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array);
            if refs.is_some_and(|r| r.iter().any(|o| o["uid"] == owner_uid)) {
                let ns = meta(&obj, "namespace").unwrap_or_default();
                let name = meta(&obj, "name").unwrap_or_default();
                self.modify(&key, &ns, &name, |o| {
                    if let Some(a) = o
                        .pointer_mut("/metadata/ownerReferences")
                        .and_then(Value::as_array_mut)
                    {
                        a.retain(|r| r["uid"] != owner_uid);
                    }
                });
            }
        }
    }

    fn drop_custom_resources(&self, st: &mut State, crd: &Value) {
        let group = crd
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let plural = crd
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let key: TypeKey = (group.into(), plural.into());
        let objs: Vec<((String, String), Value)> = st
            .objects
            .remove(&key)
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        for ((ns, _), obj) in objs {
            let rv = Self::next_rv(st);
            let mut gone = obj.clone();
            gone["metadata"]["resourceVersion"] = Value::String(rv.to_string());
            self.emit(
                st,
                Event {
                    rv,
                    key: key.clone(),
                    namespace: ns,
                    kind: EventType::Deleted,
                    object: gone,
                    old: Some(obj),
                },
            );
        }
    }
}

fn crd_status(crd: &Value) -> Value {
    let now = now_rfc3339();
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v["storage"] == Value::Bool(true))
        .map(|v| v["name"].clone())
        .collect();
    json!({
        "acceptedNames": names,
        "storedVersions": stored,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now},
        ]
    })
}

/// Records a field manager in `metadata.managedFields` (one entry per manager and operation;
/// the field set itself is not tracked).
pub fn record_manager(obj: &mut Value, manager: &str, operation: &str, api_version: &str) {
    let entry = json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": now_rfc3339(),
        "fieldsType": "FieldsV1",
        "fieldsV1": {},
    });
    let Some(m) = meta_mut(obj) else {
        return;
    };
    let list = m.entry("managedFields").or_insert_with(|| json!([]));
    if let Some(a) = list.as_array_mut() {
        a.retain(|e| !(e["manager"] == manager && e["operation"] == operation));
        a.push(entry);
    }
}

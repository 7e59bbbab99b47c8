//! The object store: every object of every type, one global `resourceVersion` counter, the
//! served types (built-in and registered by CRDs), and the event history that watches resume
//! from. Writes are in `writes.rs`, deletion in `deletion.rs`.

mod deletion;
mod writes;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::apiserver::admission::Warnings;
use crate::apiserver::discovery::ServerVersion;
use crate::apiserver::errors::ApiError;
use crate::apiserver::resources::{ResourceType, builtin_types, types_from_crd};
use crate::time::now_rfc3339;

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
    /// Who writes (`fieldManager`, or the client's user agent); None: kube-sim itself, whose
    /// writes own no fields.
    pub field_manager: Option<String>,
    /// `fieldValidation=Strict`: unknown fields are an error instead of being pruned.
    pub strict: bool,
    /// The `managedFields` server-side apply computed (stored as they are).
    pub managed_fields: Option<Value>,
    /// Where admission's warnings go.
    pub warnings: Option<Warnings>,
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
    version: RwLock<ServerVersion>,
    /// Held by a create from its quota check until the object is stored, so that two creates
    /// cannot both take the last of a quota.
    quota_lock: Mutex<()>,
}

fn meta(obj: &Value, field: &str) -> Option<String> {
    obj.get("metadata")?.get(field)?.as_str().map(String::from)
}

pub(crate) fn meta_mut(obj: &mut Value) -> Option<&mut Map<String, Value>> {
    let root = obj.as_object_mut()?;
    let m = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !m.is_object() {
        *m = Value::Object(Map::new());
    }
    m.as_object_mut()
}

pub(crate) fn bad_shape() -> ApiError {
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

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .map(crate::json::string_list)
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
            version: RwLock::new(ServerVersion::default()),
            quota_lock: Mutex::new(()),
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
                    "nodeInfo": {"kubeletVersion": crate::apiserver::discovery::DEFAULT_VERSION, "operatingSystem": "linux",
                                 "architecture": "amd64", "containerRuntimeVersion": "kube-sim://0.1"},
                }
            });
            if let Err(e) = self.create(&t, "", node, &WriteOpts::default()) {
                tracing::error!("bootstrap node: {e}");
            }
        }
    }

    /// The version the API server reports (and PodSecurity's `latest`); the node's kubelet
    /// reports it too.
    pub fn set_server_version(&self, v: ServerVersion) {
        let git = v.git_version.clone();
        if let Ok(mut cur) = self.version.write() {
            *cur = v;
        }
        let key: TypeKey = (String::new(), "nodes".into());
        self.modify(&key, "", NODE_NAME, |n| {
            n["status"]["nodeInfo"]["kubeletVersion"] = Value::String(git.clone());
        });
    }

    pub fn server_version(&self) -> ServerVersion {
        self.version.read().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn server_minor(&self) -> u32 {
        self.server_version().minor
    }

    fn quota_guard(&self) -> MutexGuard<'_, ()> {
        match self.quota_lock.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
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

    /// Tells the watchers that `object` is gone as of `rv` (stamped on it); `old` is the object
    /// as it was stored.
    fn emit_deleted(
        &self,
        st: &mut State,
        key: &TypeKey,
        ns: &str,
        rv: u64,
        mut object: Value,
        old: Value,
    ) {
        object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        self.emit(
            st,
            Event {
                rv,
                key: key.clone(),
                namespace: ns.into(),
                kind: EventType::Deleted,
                object,
                old: Some(old),
            },
        );
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
}

//! The kubelet: schedules pods onto the one node, then runs their containers as host processes.
//!
//! Init containers run in order (native sidecars, `restartPolicy: Always`, keep running and are
//! restarted when they exit), then the main containers, restarted per the pod's
//! `restartPolicy`. Each container runs in its own mount namespace (when kube-sim runs as root)
//! with the pod's volumes bind-mounted at their `mountPath`, and, when enabled, in the pod's own
//! network namespace. Images map to executables through an image map.

pub mod network;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::apiserver::store::{EventType, NODE_NAME, Store, TypeKey};
use crate::apiserver::errors::now_rfc3339;
use network::{NetNs, Network};

/// How an image maps to something runnable on the host.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ImageEntry {
    /// The image is one binary: it is the entrypoint, and replaces `command[0]` when the
    /// container sets `command`.
    Binary(String),
    /// `{binary: PATH}` (same as the plain string) or `{prefix: [..]}`: prepended to the
    /// container's command and args.
    Spec {
        #[serde(default)]
        binary: Option<String>,
        #[serde(default)]
        prefix: Option<Vec<String>>,
    },
}

/// The `--images FILE` document: `images: {NAME: ENTRY}` with NAME an image without tag.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageMap {
    #[serde(default)]
    pub images: HashMap<String, ImageEntry>,
}

impl ImageMap {
    pub fn load(path: &Path) -> anyhow::Result<ImageMap> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading image map {}: {e}", path.display()))?;
        serde_yaml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("parsing image map {}: {e}", path.display()))
    }

    /// Image name without tag or digest, normalized like Docker Hub names.
    pub fn base_name(image: &str) -> String {
        let no_digest = image.split('@').next().unwrap_or(image);
        let (head, last) = match no_digest.rsplit_once('/') {
            Some((h, l)) => (Some(h), l),
            None => (None, no_digest),
        };
        let last = last.split(':').next().unwrap_or(last);
        let full = match head {
            Some(h) => format!("{h}/{last}"),
            None => last.to_string(),
        };
        full.strip_prefix("docker.io/library/")
            .or_else(|| full.strip_prefix("docker.io/"))
            .map(String::from)
            .unwrap_or(full)
    }

    fn lookup(&self, image: &str) -> Option<&ImageEntry> {
        let base = Self::base_name(image);
        self.images.get(&base).or_else(|| {
            self.images
                .iter()
                .find(|(k, _)| Self::base_name(k) == base)
                .map(|(_, v)| v)
        })
    }
}

/// Kubelet settings.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub state_dir: PathBuf,
    pub images: ImageMap,
    /// Images missing from the map fail like an image that cannot be pulled.
    pub strict_images: bool,
    /// Run each container in its own mount namespace with volumes bind-mounted (needs root).
    pub mount_namespaces: bool,
    /// Give each pod its own network namespace (needs root).
    pub network: Option<Arc<Network>>,
    /// Delay before restarting a crashed container; doubles up to 10 s.
    pub restart_backoff: Duration,
}

impl KubeletConfig {
    pub fn new(state_dir: PathBuf) -> Self {
        KubeletConfig {
            state_dir,
            images: ImageMap::default(),
            strict_images: false,
            mount_namespaces: namespaces_available(),
            network: None,
            restart_backoff: Duration::from_secs(1),
        }
    }
}

/// Whether this process may create mount namespaces (root and `unshare` present).
pub fn namespaces_available() -> bool {
    nix::unistd::geteuid().is_root() && Path::new("/usr/bin/unshare").exists()
}

pub struct Kubelet {
    store: Arc<Store>,
    cfg: KubeletConfig,
    pods: Mutex<HashMap<String, watch::Sender<Option<i64>>>>,
}

fn pods_key() -> TypeKey {
    (String::new(), "pods".into())
}

fn s(v: &Value, ptr: &str) -> String {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

impl Kubelet {
    pub fn new(store: Arc<Store>, cfg: KubeletConfig) -> Arc<Kubelet> {
        Arc::new(Kubelet {
            store,
            cfg,
            pods: Mutex::new(HashMap::new()),
        })
    }

    pub fn log_path(&self, uid: &str, container: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("pods")
            .join(uid)
            .join("logs")
            .join(format!("{container}.log"))
    }

    /// Stops every pod at once (SIGKILL after no grace) and waits for them to end.
    pub async fn stop_all(&self) {
        for h in self.handles().values() {
            let _ = h.send(Some(0));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.handles().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<Option<i64>>>> {
        match self.pods.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Runs the kubelet until the store goes away.
    pub async fn run(self: Arc<Self>) {
        let mut rx = self.store.subscribe();
        self.resync();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        if ev.key == pods_key() {
                            if ev.kind == EventType::Deleted {
                                let uid = s(&ev.object, "/metadata/uid");
                                if let Some(h) = self.handles().get(&uid) {
                                    let _ = h.send(Some(0));
                                }
                            } else {
                                self.observe(&ev.object);
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.resync(),
                    Err(_) => return,
                },
                _ = tick.tick() => self.resync(),
            }
        }
    }

    fn resync(self: &Arc<Self>) {
        let (pods, _) = self.store.list(&pods_key(), None);
        for p in pods {
            self.observe(&p);
        }
    }

    fn observe(self: &Arc<Self>, pod: &Value) {
        let uid = s(pod, "/metadata/uid");
        let (ns, name) = (s(pod, "/metadata/namespace"), s(pod, "/metadata/name"));
        let deleting = pod.pointer("/metadata/deletionTimestamp").is_some();
        let node = s(pod, "/spec/nodeName");
        if deleting {
            let grace = pod
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30);
            match self.handles().get(&uid) {
                Some(h) => {
                    let _ = h.send(Some(grace));
                }
                None => self.store.finish_deletion(&pods_key(), &ns, &name),
            }
            return;
        }
        if node.is_empty() {
            self.schedule(pod);
            return;
        }
        if node != NODE_NAME {
            return;
        }
        let phase = s(pod, "/status/phase");
        if phase == "Succeeded" || phase == "Failed" {
            return;
        }
        let mut handles = self.handles();
        if handles.contains_key(&uid) {
            return;
        }
        let (tx, rx) = watch::channel(None);
        handles.insert(uid.clone(), tx);
        drop(handles);
        let me = self.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            let runner = PodRunner::new(me.clone(), pod, rx);
            runner.run().await;
            me.handles().remove(&uid);
            // A deletion that arrived while the pod ran is finished now.
            me.store.finish_deletion(&pods_key(), &ns, &name);
        });
    }

    fn schedule(&self, pod: &Value) {
        let node = self
            .store
            .get(&(String::new(), "nodes".into()), "", NODE_NAME);
        let labels = node
            .as_ref()
            .and_then(|n| n.pointer("/metadata/labels"))
            .cloned()
            .unwrap_or(json!({}));
        let selector_ok = pod
            .pointer("/spec/nodeSelector")
            .and_then(Value::as_object)
            .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
        let (ns, name, uid) = (
            s(pod, "/metadata/namespace"),
            s(pod, "/metadata/name"),
            s(pod, "/metadata/uid"),
        );
        let now = now_rfc3339();
        let was_unschedulable = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "PodScheduled" && c["reason"] == "Unschedulable")
            });
        if selector_ok {
            pod_event(
                &self.store,
                pod,
                "Normal",
                "Scheduled",
                &format!("Successfully assigned {ns}/{name} to {NODE_NAME}"),
                "default-scheduler",
            );
            self.store.modify(&pods_key(), &ns, &name, |p| {
                if s(p, "/metadata/uid") != uid || p.pointer("/spec/nodeName").is_some() {
                    return;
                }
                p["spec"]["nodeName"] = json!(NODE_NAME);
                set_condition(p, "PodScheduled", "True", "", "", &now);
            });
        } else {
            let msg = "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.";
            if !was_unschedulable {
                pod_event(
                    &self.store,
                    pod,
                    "Warning",
                    "FailedScheduling",
                    msg,
                    "default-scheduler",
                );
            }
            self.store.modify(&pods_key(), &ns, &name, |p| {
                if s(p, "/metadata/uid") != uid {
                    return;
                }
                let already = p
                    .pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "PodScheduled" && c["reason"] == "Unschedulable")
                    });
                if !already {
                    set_condition(p, "PodScheduled", "False", "Unschedulable", msg, &now);
                }
            });
        }
    }
}

/// Records a core/v1 Event about a pod, as the scheduler and kubelet do.
fn pod_event(
    store: &Store,
    pod: &Value,
    type_: &str,
    reason: &str,
    message: &str,
    component: &str,
) {
    let Some(t) = store.find_type("", "v1", "events") else {
        return;
    };
    let now = now_rfc3339();
    let ns = s(pod, "/metadata/namespace");
    let ev = json!({
        "metadata": {"name": format!("{}.{:016x}", s(pod, "/metadata/name"), rand::random::<u64>())},
        "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": ns,
                           "name": s(pod, "/metadata/name"), "uid": s(pod, "/metadata/uid")},
        "type": type_,
        "reason": reason,
        "message": message,
        "source": {"component": component, "host": NODE_NAME},
        "reportingComponent": component,
        "reportingInstance": NODE_NAME,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    });
    if let Err(e) = store.create(&t, &ns, ev, &crate::apiserver::store::WriteOpts::default()) {
        tracing::debug!("event {reason} for pod {ns}: {e}");
    }
}

fn set_condition(p: &mut Value, type_: &str, status: &str, reason: &str, message: &str, now: &str) {
    if !p["status"].is_object() {
        p["status"] = json!({});
    }
    let conds = p["status"]
        .as_object_mut()
        .map(|o| o.entry("conditions").or_insert_with(|| json!([])));
    let Some(Value::Array(conds)) = conds else {
        return;
    };
    let mut c =
        json!({"type": type_, "status": status, "lastProbeTime": null, "lastTransitionTime": now});
    if !reason.is_empty() {
        c["reason"] = json!(reason);
    }
    if !message.is_empty() {
        c["message"] = json!(message);
    }
    match conds.iter_mut().find(|x| x["type"] == type_) {
        Some(existing) => {
            if existing["status"] != status {
                *existing = c;
            } else {
                existing["reason"] = c.get("reason").cloned().unwrap_or(Value::Null);
                existing["message"] = c.get("message").cloned().unwrap_or(Value::Null);
                if let Some(o) = existing.as_object_mut() {
                    o.retain(|k, v| !(v.is_null() && (k == "reason" || k == "message")));
                }
            }
        }
        None => conds.push(c),
    }
}

/// One container's runtime state.
struct Ctr {
    name: String,
    spec: Value,
    init: bool,
    sidecar: bool,
    child: Option<Child>,
    pid: Option<i32>,
    restarts: i64,
    state: Value,
    last_state: Value,
    /// The container will not run again.
    done: bool,
    exit_code: Option<i32>,
    next_start: Option<Instant>,
    backoff: Duration,
    /// The startup probe passed (or there is none) since the last start.
    started: bool,
    /// The readiness probe passes (or there is none and the container started).
    ready: bool,
    probes: [ProbeState; 3],
    /// SIGKILL deadline after a probe failure sent SIGTERM.
    kill_at: Option<Instant>,
    /// The host file bind-mounted at the container's `terminationMessagePath`.
    term_file: Option<PathBuf>,
}

/// Counters of one probe (startup, readiness, liveness) of one container.
#[derive(Debug, Clone, Default)]
struct ProbeState {
    next: Option<Instant>,
    successes: u32,
    failures: u32,
}

const STARTUP: usize = 0;
const READINESS: usize = 1;
const LIVENESS: usize = 2;
const PROBE_FIELDS: [&str; 3] = ["startupProbe", "readinessProbe", "livenessProbe"];

impl Ctr {
    fn new(spec: &Value, init: bool) -> Ctr {
        let sidecar = init && spec["restartPolicy"] == "Always";
        Ctr {
            name: s(spec, "/name"),
            spec: spec.clone(),
            init,
            sidecar,
            child: None,
            pid: None,
            restarts: 0,
            state: json!({"waiting": {"reason": if init { "PodInitializing" } else { "ContainerCreating" }}}),
            last_state: json!({}),
            done: false,
            exit_code: None,
            next_start: None,
            backoff: Duration::ZERO,
            started: false,
            ready: false,
            probes: Default::default(),
            kill_at: None,
            term_file: None,
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Records the exit: `state.terminated` with the exit code and the termination message.
    fn terminated(&mut self, code: i32, log: &Path) {
        let started = self
            .state
            .pointer("/running/startedAt")
            .cloned()
            .unwrap_or(Value::Null);
        self.exit_code = Some(code);
        let mut t = json!({
            "exitCode": code,
            "reason": if code == 0 { "Completed" } else { "Error" },
            "startedAt": started,
            "finishedAt": now_rfc3339(),
            "containerID": format!("kube-sim://{}", self.pid.unwrap_or(0)),
        });
        let policy = self.spec["terminationMessagePolicy"]
            .as_str()
            .unwrap_or("File");
        if let Some(m) = termination_message(self.term_file.as_deref(), policy, code, log) {
            t["message"] = json!(m);
        }
        self.state = json!({ "terminated": t });
    }

    fn status(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "image": self.spec["image"],
            "imageID": format!("kube-sim://{}", self.spec["image"].as_str().unwrap_or_default()),
            "ready": self.running() && self.ready,
            "started": self.running() && self.started,
            "restartCount": self.restarts,
            "state": self.state,
            "lastState": self.last_state,
        });
        if let Some(pid) = self.pid {
            v["containerID"] = json!(format!("kube-sim://{pid}"));
        }
        v
    }
}

struct PodRunner {
    kubelet: Arc<Kubelet>,
    pod: Value,
    uid: String,
    ns: String,
    name: String,
    stop: watch::Receiver<Option<i64>>,
    inits: Vec<Ctr>,
    mains: Vec<Ctr>,
    dir: PathBuf,
    phase: &'static str,
    reason: Option<(&'static str, String)>,
    start_time: String,
    initialized: bool,
    net: Option<NetNs>,
    pod_ip: String,
    /// Events to record: type, reason, message.
    events: Vec<(&'static str, &'static str, String)>,
}

enum Prepared {
    Argv(Vec<String>, Vec<(String, String)>),
    /// The container cannot start (yet): waiting reason and message.
    Wait(&'static str, String),
}

impl PodRunner {
    fn new(kubelet: Arc<Kubelet>, pod: Value, stop: watch::Receiver<Option<i64>>) -> PodRunner {
        let uid = s(&pod, "/metadata/uid");
        let dir = kubelet.cfg.state_dir.join("pods").join(&uid);
        let list = |k: &str, init: bool| -> Vec<Ctr> {
            pod["spec"][k]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| Ctr::new(c, init))
                .collect()
        };
        PodRunner {
            inits: list("initContainers", true),
            mains: list("containers", false),
            ns: s(&pod, "/metadata/namespace"),
            name: s(&pod, "/metadata/name"),
            uid,
            dir,
            stop,
            kubelet,
            pod,
            phase: "Pending",
            reason: None,
            start_time: now_rfc3339(),
            initialized: false,
            net: None,
            pod_ip: "127.0.0.1".into(),
            events: Vec::new(),
        }
    }

    fn flush_events(&mut self) {
        for (t, reason, msg) in std::mem::take(&mut self.events) {
            pod_event(&self.kubelet.store, &self.pod, t, reason, &msg, "kubelet");
        }
    }

    fn publish(&mut self) {
        self.flush_events();
        let now = now_rfc3339();
        let init_done = self.initialized;
        let ready = self.phase == "Running"
            && self
                .mains
                .iter()
                .chain(self.inits.iter().filter(|c| c.sidecar))
                .all(|c| c.running() && c.ready);
        let st = |b: bool| if b { "True" } else { "False" };
        let mut status = json!({
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "qosClass": "BestEffort",
            "containerStatuses": self.mains.iter().map(Ctr::status).collect::<Vec<_>>(),
        });
        if !self.inits.is_empty() {
            status["initContainerStatuses"] =
                json!(self.inits.iter().map(Ctr::status).collect::<Vec<_>>());
        }
        if let Some((r, m)) = &self.reason {
            status["reason"] = json!(r);
            status["message"] = json!(m);
        }
        let uid = self.uid.clone();
        let not_ready_reason = if init_done {
            "ContainersNotReady"
        } else {
            "PodCompleted"
        };
        self.kubelet
            .store
            .modify(&pods_key(), &self.ns, &self.name, |p| {
                if s(p, "/metadata/uid") != uid {
                    return;
                }
                let conds = p.pointer("/status/conditions").cloned();
                let mut new_status = status.clone();
                new_status["conditions"] = conds.unwrap_or(json!([]));
                let old_status = std::mem::replace(&mut p["status"], new_status);
                set_condition(p, "PodScheduled", "True", "", "", &now);
                set_condition(
                    p,
                    "Initialized",
                    st(init_done),
                    if init_done {
                        ""
                    } else {
                        "ContainersNotInitialized"
                    },
                    "",
                    &now,
                );
                set_condition(
                    p,
                    "ContainersReady",
                    st(ready),
                    if ready { "" } else { not_ready_reason },
                    "",
                    &now,
                );
                set_condition(
                    p,
                    "Ready",
                    st(ready),
                    if ready { "" } else { not_ready_reason },
                    "",
                    &now,
                );
                // Keep transition times when nothing changed.
                if let (Some(old), Some(new)) = (
                    old_status.get("conditions").and_then(Value::as_array),
                    p.pointer_mut("/status/conditions")
                        .and_then(Value::as_array_mut),
                ) {
                    for c in new.iter_mut() {
                        if let Some(o) = old
                            .iter()
                            .find(|o| o["type"] == c["type"] && o["status"] == c["status"])
                        {
                            c["lastTransitionTime"] = o["lastTransitionTime"].clone();
                        }
                    }
                }
            });
    }

    fn stop_requested(&self) -> Option<i64> {
        *self.stop.borrow()
    }

    async fn run(mut self) {
        if let Err(e) = std::fs::create_dir_all(self.dir.join("logs")) {
            tracing::error!(
                "pod {}/{}: creating {}: {e}",
                self.ns,
                self.name,
                self.dir.display()
            );
        }
        if let Some(net) = &self.kubelet.cfg.network {
            match net.create(&self.uid).await {
                Ok(n) => {
                    self.pod_ip = n.ip.clone();
                    self.net = Some(n);
                }
                Err(e) => tracing::error!("pod {}/{}: network namespace: {e}", self.ns, self.name),
            }
        }
        self.publish();
        let deadline = self
            .pod
            .pointer("/spec/activeDeadlineSeconds")
            .and_then(Value::as_u64)
            .map(|s| Instant::now() + Duration::from_secs(s));
        let restart_policy = s(&self.pod, "/spec/restartPolicy");
        let mut last_published = String::new();
        let mut stopped_with: Option<i64> = None;
        loop {
            if let Some(g) = self.stop_requested() {
                stopped_with = Some(g);
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.reason = Some((
                    "DeadlineExceeded",
                    "Pod was active on the node longer than the specified deadline".into(),
                ));
                self.events.push((
                    "Warning",
                    "DeadlineExceeded",
                    "Pod was active on the node longer than the specified deadline".into(),
                ));
                break;
            }
            self.reap();
            self.probe_all().await;
            self.flush_events();
            // Init containers in order.
            if !self.initialized {
                let mut all_done = true;
                for i in 0..self.inits.len() {
                    let c = &self.inits[i];
                    if c.sidecar {
                        if !c.running() && c.next_start.is_none_or(|t| Instant::now() >= t) {
                            self.start(true, i).await;
                        }
                        if !(self.inits[i].running() && self.inits[i].started) {
                            all_done = false;
                            break;
                        }
                        continue;
                    }
                    if c.done && c.exit_code == Some(0) {
                        continue;
                    }
                    all_done = false;
                    if c.running() {
                        break;
                    }
                    if c.exit_code.is_some_and(|x| x != 0) && restart_policy == "Never" {
                        self.phase = "Failed";
                        break;
                    }
                    if c.next_start.is_none_or(|t| Instant::now() >= t) {
                        self.start(true, i).await;
                    }
                    break;
                }
                if self.phase == "Failed" {
                    break;
                }
                if all_done {
                    self.initialized = true;
                }
            } else {
                self.supervise_sidecars().await;
                for i in 0..self.mains.len() {
                    let c = &self.mains[i];
                    if c.running() || c.done {
                        continue;
                    }
                    let restart = match c.exit_code {
                        None => true,
                        Some(code) => {
                            restart_policy == "Always"
                                || (restart_policy == "OnFailure" && code != 0)
                        }
                    };
                    if !restart {
                        self.mains[i].done = true;
                        continue;
                    }
                    if c.next_start.is_none_or(|t| Instant::now() >= t) {
                        self.start(false, i).await;
                    } else if c.state.get("terminated").is_some() {
                        let c = &mut self.mains[i];
                        c.last_state = c.state.clone();
                        c.state = json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off restarting failed container {}", c.name)}});
                    }
                }
                if self.mains.iter().any(Ctr::running) {
                    self.phase = "Running";
                }
                if self.mains.iter().all(|c| c.done) {
                    let ok = self.mains.iter().all(|c| c.exit_code == Some(0));
                    self.phase = if ok { "Succeeded" } else { "Failed" };
                    break;
                }
            }
            let snapshot = self.snapshot();
            if snapshot != last_published {
                self.publish();
                last_published = snapshot;
            }
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.changed() => {}
            }
        }
        // Stop what still runs: main containers, then sidecars.
        let grace = Duration::from_secs(
            stopped_with
                .or_else(|| {
                    self.pod
                        .pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                })
                .unwrap_or(30)
                .max(0) as u64,
        );
        let end = Instant::now() + grace;
        for c in self
            .inits
            .iter()
            .chain(self.mains.iter())
            .filter(|c| c.running())
        {
            self.events.push((
                "Normal",
                "Killing",
                format!("Stopping container {}", c.name),
            ));
        }
        self.terminate(false, end).await;
        self.terminate(true, end.max(Instant::now() + Duration::from_secs(1)))
            .await;
        if self.reason.is_some() || (stopped_with.is_none() && self.phase != "Succeeded") {
            self.phase = "Failed";
        } else if stopped_with.is_some() && self.phase != "Succeeded" {
            self.phase = if self.mains.iter().all(|c| c.exit_code == Some(0)) {
                "Succeeded"
            } else {
                "Failed"
            };
        }
        self.publish();
        if let Some(n) = self.net.take() {
            n.destroy().await;
        }
    }

    /// Runs the probes that are due, and acts on their results.
    async fn probe_all(&mut self) {
        let mount_ns = self.kubelet.cfg.mount_namespaces;
        let net = self.net.as_ref().map(|n| n.name.clone());
        let pod_ip = self.pod_ip.clone();
        let now = Instant::now();
        let grace = Duration::from_secs(
            self.pod
                .pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(30),
        );
        for c in self.inits.iter_mut().chain(self.mains.iter_mut()) {
            if !c.running() || (c.init && !c.sidecar) {
                continue;
            }
            if let Some(t) = c.kill_at {
                if now >= t
                    && let Some(pid) = c.pid
                {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                continue;
            }
            for k in [STARTUP, READINESS, LIVENESS] {
                if k != STARTUP && !c.started {
                    continue;
                }
                if k == STARTUP && c.started {
                    continue;
                }
                let Some(probe) = c.spec.get(PROBE_FIELDS[k]).cloned() else {
                    continue;
                };
                if c.probes[k].next.is_none_or(|t| now < t) {
                    continue;
                }
                let period = probe["periodSeconds"].as_u64().unwrap_or(10).max(1);
                c.probes[k].next = Some(now + Duration::from_secs(period));
                let ok = run_probe(&probe, &c.spec, &pod_ip, c.pid, mount_ns, net.as_deref()).await;
                let st = &mut c.probes[k];
                if ok {
                    st.successes += 1;
                    st.failures = 0;
                } else {
                    st.failures += 1;
                    st.successes = 0;
                }
                let failure_threshold = probe["failureThreshold"].as_u64().unwrap_or(3) as u32;
                let success_threshold = probe["successThreshold"].as_u64().unwrap_or(1) as u32;
                match k {
                    STARTUP if ok => {
                        c.started = true;
                        c.ready = c.spec.get("readinessProbe").is_none();
                    }
                    READINESS if ok && st.successes >= success_threshold => c.ready = true,
                    READINESS if !ok && st.failures >= failure_threshold => c.ready = false,
                    _ => {}
                }
                if !ok {
                    let kind = ["Startup", "Readiness", "Liveness"][k];
                    self.events
                        .push(("Warning", "Unhealthy", format!("{kind} probe failed")));
                }
                match k {
                    STARTUP | LIVENESS if !ok && st.failures >= failure_threshold => {
                        tracing::info!(
                            "pod {}/{}: container {} failed its {} probe; killing it",
                            self.ns,
                            self.name,
                            c.name,
                            PROBE_FIELDS[k]
                        );
                        if let Some(pid) = c.pid {
                            let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
                        }
                        c.kill_at = Some(now + grace);
                        let kind = ["Startup", "Readiness", "Liveness"][k];
                        self.events.push((
                            "Normal",
                            "Killing",
                            format!(
                                "Container {} failed {} probe, will be restarted",
                                c.name,
                                kind.to_lowercase()
                            ),
                        ));
                    }
                    _ => {}
                }
            }
        }
    }

    fn snapshot(&self) -> String {
        let c: Vec<Value> = self
            .inits
            .iter()
            .chain(self.mains.iter())
            .map(Ctr::status)
            .collect();
        format!("{}{}{:?}", self.phase, self.initialized, c)
    }

    async fn supervise_sidecars(&mut self) {
        for i in 0..self.inits.len() {
            let c = &self.inits[i];
            if c.sidecar && !c.running() && c.next_start.is_none_or(|t| Instant::now() >= t) {
                self.start(true, i).await;
            }
        }
    }

    /// Collects exited processes.
    fn reap(&mut self) {
        let backoff_base = self.kubelet.cfg.restart_backoff;
        for c in self.inits.iter_mut().chain(self.mains.iter_mut()) {
            let Some(child) = c.child.as_mut() else {
                continue;
            };
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            let code = exit_code(status);
            c.child = None;
            c.started = false;
            c.ready = false;
            c.kill_at = None;
            c.terminated(code, &self.kubelet.log_path(&self.uid, &c.name));
            if c.init && !c.sidecar && code == 0 {
                c.done = true;
            }
            c.backoff = if c.backoff.is_zero() {
                backoff_base
            } else {
                (c.backoff * 2).min(Duration::from_secs(10))
            };
            c.next_start = Some(Instant::now() + c.backoff);
        }
    }

    async fn start(&mut self, init: bool, i: usize) {
        let spec = if init {
            self.inits[i].spec.clone()
        } else {
            self.mains[i].spec.clone()
        };
        let prepared = self.prepare(&spec);
        let c = if init {
            &mut self.inits[i]
        } else {
            &mut self.mains[i]
        };
        let (argv, env) = match prepared {
            Prepared::Argv(a, e) => (a, e),
            Prepared::Wait(reason, message) => {
                if c.state.pointer("/waiting/reason").and_then(Value::as_str) != Some(reason) {
                    let ev = match reason {
                        "ImagePullBackOff" => "BackOff",
                        "ContainerCreating" => "FailedMount",
                        _ => "Failed",
                    };
                    self.events
                        .push(("Warning", ev, format!("Error: {reason}: {message}")));
                }
                c.state = json!({"waiting": {"reason": reason, "message": message}});
                c.next_start = Some(Instant::now() + Duration::from_millis(500));
                return;
            }
        };
        let restarted = c.exit_code.is_some();
        let mounts = mounts_of(&spec, &self.pod, &self.dir);
        let log = self.kubelet.log_path(&self.uid, &c.name);
        if restarted {
            // `kubectl logs` shows the current instance; `--previous` the one before.
            let _ = std::fs::rename(&log, log.with_extension("previous.log"));
        }
        // A fresh termination message file per container instance, as the real kubelet makes.
        let term = if self.kubelet.cfg.mount_namespaces {
            let dir = self.dir.join("termination");
            let src = dir.join(&c.name);
            let made = std::fs::create_dir_all(dir.join(format!("{}.stage", c.name)))
                .and_then(|_| std::fs::write(&src, b""));
            match made {
                Ok(()) => Some(TermMount {
                    dst: spec["terminationMessagePath"]
                        .as_str()
                        .filter(|p| !p.is_empty())
                        .unwrap_or("/dev/termination-log")
                        .to_string(),
                    stage: dir.join(format!("{}.stage", c.name)),
                    src,
                }),
                Err(e) => {
                    tracing::warn!("termination message file {}: {e}", src.display());
                    None
                }
            }
        } else {
            None
        };
        c.term_file = term.as_ref().map(|t| t.src.clone());
        match spawn(
            &argv,
            &env,
            &spec,
            (&mounts, term.as_ref()),
            &log,
            self.kubelet.cfg.mount_namespaces,
            self.net.as_ref(),
        ) {
            Ok(child) => {
                if restarted {
                    c.restarts += 1;
                    if c.state.get("terminated").is_some() {
                        c.last_state = c.state.clone();
                    }
                }
                c.pid = child.id().map(|p| p as i32);
                c.child = Some(child);
                let now = Instant::now();
                for (k, field) in PROBE_FIELDS.iter().enumerate() {
                    let delay = spec[field]["initialDelaySeconds"].as_u64().unwrap_or(0);
                    c.probes[k] = ProbeState {
                        next: spec.get(*field).map(|_| now + Duration::from_secs(delay)),
                        ..Default::default()
                    };
                }
                c.started = spec.get("startupProbe").is_none();
                c.ready = c.started && spec.get("readinessProbe").is_none();
                c.state = json!({"running": {"startedAt": now_rfc3339()}});
                let image = spec["image"].as_str().unwrap_or_default();
                self.events.push((
                    "Normal",
                    "Pulled",
                    format!("Container image \"{image}\" already present on machine"),
                ));
                self.events.push((
                    "Normal",
                    "Created",
                    format!("Created container: {}", c.name),
                ));
                self.events
                    .push(("Normal", "Started", format!("Started container {}", c.name)));
            }
            Err(e) => {
                c.state = json!({"waiting": {"reason": "RunContainerError", "message": e}});
                c.exit_code = Some(128);
                c.next_start = Some(Instant::now() + Duration::from_secs(1));
                if c.init && !c.sidecar {
                    c.done = false;
                }
            }
        }
    }

    fn prepare(&self, spec: &Value) -> Prepared {
        let image = spec["image"].as_str().unwrap_or_default();
        let strs = crate::apiserver::errors::string_list;
        let command = strs(&spec["command"]);
        let args = strs(&spec["args"]);
        if let Err(msg) = write_volume_files(&self.kubelet.store, &self.pod, &self.dir) {
            return Prepared::Wait("ContainerCreating", msg);
        }
        let env = match self.resolve_env(spec) {
            Ok(e) => e,
            Err(msg) => return Prepared::Wait("CreateContainerConfigError", msg),
        };
        let expand = |list: Vec<String>| -> Vec<String> {
            list.into_iter().map(|a| expand_vars(&a, &env)).collect()
        };
        let (command, args) = (expand(command), expand(args));
        let argv = match self.kubelet.cfg.images.lookup(image) {
            Some(ImageEntry::Binary(b))
            | Some(ImageEntry::Spec {
                binary: Some(b), ..
            }) => {
                let mut v = vec![b.clone()];
                v.extend(command.into_iter().skip(1));
                v.extend(args);
                v
            }
            Some(ImageEntry::Spec {
                prefix: Some(p), ..
            }) => {
                let mut v = p.clone();
                v.extend(command);
                v.extend(args);
                v
            }
            Some(ImageEntry::Spec { .. }) | None => {
                if self.kubelet.cfg.strict_images && self.kubelet.cfg.images.lookup(image).is_none()
                {
                    let pulls = self.inits.iter().chain(self.mains.iter()).any(|c| {
                        c.state.pointer("/waiting/reason") == Some(&json!("ErrImagePull"))
                    });
                    let reason = if pulls {
                        "ImagePullBackOff"
                    } else {
                        "ErrImagePull"
                    };
                    return Prepared::Wait(
                        reason,
                        format!(
                            "Back-off pulling image \"{image}\": kube-sim: image {:?} is not in the image map",
                            ImageMap::base_name(image)
                        ),
                    );
                }
                if command.is_empty() {
                    return Prepared::Wait(
                        "CreateContainerError",
                        format!(
                            "kube-sim: image {image:?} is not in the image map and the container sets no command"
                        ),
                    );
                }
                let mut v = command;
                v.extend(args);
                v
            }
        };
        Prepared::Argv(argv, env)
    }

    fn lookup_key(&self, kind: &str, name: &str, key: &str) -> Result<Option<String>, String> {
        let plural = if kind == "secret" {
            "secrets"
        } else {
            "configmaps"
        };
        let Some(obj) = self
            .kubelet
            .store
            .get(&(String::new(), plural.into()), &self.ns, name)
        else {
            return Err(format!("{kind} \"{name}\" not found"));
        };
        if let Some(v) = obj
            .pointer(&format!(
                "/data/{}",
                key.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(Value::as_str)
        {
            if kind == "secret" {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|e| format!("secret \"{name}\" key {key}: bad base64: {e}"))?;
                return Ok(Some(String::from_utf8_lossy(&bytes).into_owned()));
            }
            return Ok(Some(v.to_string()));
        }
        Ok(None)
    }

    fn resolve_env(&self, spec: &Value) -> Result<Vec<(String, String)>, String> {
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                std::env::var("PATH").unwrap_or_else(|_| {
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
                }),
            ),
            ("HOME".into(), "/root".into()),
            ("HOSTNAME".into(), self.name.clone()),
        ];
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(x, _)| *x != k);
            env.push((k, v));
        };
        for from in spec["envFrom"].as_array().into_iter().flatten() {
            let prefix = from["prefix"].as_str().unwrap_or_default();
            for (kind, field) in [("configmap", "configMapRef"), ("secret", "secretRef")] {
                let Some(r) = from.get(field) else { continue };
                let name = r["name"].as_str().unwrap_or_default();
                let plural = if kind == "secret" {
                    "secrets"
                } else {
                    "configmaps"
                };
                match self
                    .kubelet
                    .store
                    .get(&(String::new(), plural.into()), &self.ns, name)
                {
                    Some(obj) => {
                        for (k, v) in obj["data"].as_object().into_iter().flatten() {
                            let raw = v.as_str().unwrap_or_default();
                            let val = if kind == "secret" {
                                base64::engine::general_purpose::STANDARD
                                    .decode(raw)
                                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                                    .unwrap_or_default()
                            } else {
                                raw.to_string()
                            };
                            set(&mut env, format!("{prefix}{k}"), val);
                        }
                    }
                    None if r["optional"] == true => {}
                    None => return Err(format!("{kind} \"{name}\" not found")),
                }
            }
        }
        for e in spec["env"].as_array().into_iter().flatten() {
            let name = s(e, "/name");
            let value = if let Some(v) = e.get("value").and_then(Value::as_str) {
                expand_vars(v, &env)
            } else if let Some(vf) = e.get("valueFrom") {
                if let Some(fr) = vf.get("fieldRef") {
                    field_ref(
                        &self.pod,
                        fr["fieldPath"].as_str().unwrap_or_default(),
                        &self.pod_ip,
                    )
                } else if let Some(r) = vf.get("secretKeyRef").or_else(|| vf.get("configMapKeyRef"))
                {
                    let kind = if vf.get("secretKeyRef").is_some() {
                        "secret"
                    } else {
                        "configmap"
                    };
                    let optional = r["optional"] == true;
                    let (rn, rk) = (s(r, "/name"), s(r, "/key"));
                    match self.lookup_key(kind, &rn, &rk) {
                        Ok(Some(v)) => v,
                        Ok(None) if optional => continue,
                        Ok(None) => {
                            return Err(format!(
                                "couldn't find key {rk} in {kind} {}/{rn}",
                                self.ns
                            ));
                        }
                        Err(_) if optional => continue,
                        Err(msg) => return Err(msg),
                    }
                } else if vf.get("resourceFieldRef").is_some() {
                    "0".to_string()
                } else {
                    String::new()
                }
            } else {
                String::new()
            };
            set(&mut env, name, value);
        }
        Ok(env)
    }

    /// Sends SIGTERM to the sidecars (or the others), then SIGKILL at `end`, and waits.
    async fn terminate(&mut self, sidecars: bool, end: Instant) {
        let (kubelet, uid) = (self.kubelet.clone(), self.uid.clone());
        let list: Vec<&mut Ctr> = self
            .inits
            .iter_mut()
            .chain(self.mains.iter_mut())
            .filter(|c| c.sidecar == sidecars && c.child.is_some())
            .collect();
        for c in &list {
            if let Some(pid) = c.pid {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        for c in list {
            let Some(mut child) = c.child.take() else {
                continue;
            };
            let status = match tokio::time::timeout_at(end.into(), child.wait()).await {
                Ok(Ok(st)) => Some(st),
                _ => {
                    if let Some(pid) = c.pid {
                        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    child.wait().await.ok()
                }
            };
            let code = status.map(exit_code).unwrap_or(137);
            c.done = true;
            c.terminated(code, &kubelet.log_path(&uid, &c.name));
        }
        for c in self.inits.iter_mut().chain(self.mains.iter_mut()) {
            if c.child.is_none() && !c.done && c.sidecar == sidecars {
                c.done = true;
                if c.state.get("waiting").is_some() && c.exit_code.is_none() {
                    // Never started: stays waiting, as on a real node.
                    c.done = true;
                }
            }
        }
    }
}

/// Runs one probe: httpGet and tcpSocket connect to the pod IP from the host; exec runs the
/// command inside the container's namespaces.
async fn run_probe(
    probe: &Value,
    spec: &Value,
    pod_ip: &str,
    pid: Option<i32>,
    mount_ns: bool,
    net: Option<&str>,
) -> bool {
    let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1).max(1));
    let port_of = |action: &Value| -> Option<u16> {
        match &action["port"] {
            Value::Number(n) => n.as_u64().map(|p| p as u16),
            Value::String(name) => name.parse().ok().or_else(|| {
                spec["ports"]
                    .as_array()?
                    .iter()
                    .find(|p| p["name"] == name.as_str())?["containerPort"]
                    .as_u64()
                    .map(|p| p as u16)
            }),
            _ => None,
        }
    };
    let attempt = async {
        if let Some(h) = probe.get("httpGet") {
            let port = port_of(h)?;
            let host = h["host"].as_str().unwrap_or(pod_ip).to_string();
            let path = h["path"].as_str().unwrap_or("/");
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .ok()?;
            let mut req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nConnection: close\r\n"
            );
            for hd in h["httpHeaders"].as_array().into_iter().flatten() {
                req.push_str(&format!("{}: {}\r\n", s(hd, "/name"), s(hd, "/value")));
            }
            req.push_str("\r\n");
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.write_all(req.as_bytes()).await.ok()?;
            let mut buf = [0u8; 64];
            let mut got = 0;
            while got < 12 {
                let n = stream.read(&mut buf[got..]).await.ok()?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            let line = String::from_utf8_lossy(&buf[..got]).to_string();
            let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        } else if let Some(t) = probe.get("tcpSocket") {
            let port = port_of(t)?;
            let host = t["host"].as_str().unwrap_or(pod_ip).to_string();
            Some(
                tokio::net::TcpStream::connect((host.as_str(), port))
                    .await
                    .is_ok(),
            )
        } else if let Some(e) = probe.get("exec") {
            let cmd: Vec<String> = e["command"]
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect();
            if cmd.is_empty() {
                return Some(false);
            }
            let mut full: Vec<String> = Vec::new();
            if let Some(pid) = pid.filter(|_| mount_ns || net.is_some()) {
                full.extend(["nsenter".into(), "-t".into(), pid.to_string()]);
                if mount_ns {
                    full.push("-m".into());
                }
                if net.is_some() {
                    full.push("-n".into());
                }
                full.push("--".into());
            }
            full.extend(cmd);
            let status = Command::new(&full[0])
                .args(&full[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .ok()?;
            Some(status.success())
        } else {
            tracing::warn!(
                "kube-sim runs httpGet, tcpSocket and exec probes only; treating {probe} as passing"
            );
            Some(true)
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(9))
}

fn field_ref(pod: &Value, path: &str, pod_ip: &str) -> String {
    let bracket = |prefix: &str| -> Option<String> {
        let rest = path.strip_prefix(prefix)?;
        let key = rest.trim_start_matches("['").trim_end_matches("']");
        Some(key.to_string())
    };
    if let Some(k) = bracket("metadata.labels") {
        return pod
            .pointer("/metadata/labels")
            .and_then(|l| l.get(&k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .into();
    }
    if let Some(k) = bracket("metadata.annotations") {
        return pod
            .pointer("/metadata/annotations")
            .and_then(|l| l.get(&k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .into();
    }
    match path {
        "metadata.name" => s(pod, "/metadata/name"),
        "metadata.namespace" => s(pod, "/metadata/namespace"),
        "metadata.uid" => s(pod, "/metadata/uid"),
        "spec.nodeName" => NODE_NAME.into(),
        "spec.serviceAccountName" => s(pod, "/spec/serviceAccountName"),
        "status.podIP" => pod_ip.into(),
        "status.hostIP" => "127.0.0.1".into(),
        _ => String::new(),
    }
}

/// Expands `$(VAR)` references like the kubelet (`$$(VAR)` escapes).
pub fn expand_vars(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The termination message file: host file, container path, and a host directory to stage
/// the overlay in (see [`termination_mount_script`]).
struct TermMount {
    src: PathBuf,
    dst: String,
    stage: PathBuf,
}

/// A bind mount: host source, container path, read-only.
struct Mount {
    src: PathBuf,
    dst: String,
    read_only: bool,
}

fn mounts_of(spec: &Value, pod: &Value, dir: &Path) -> Vec<Mount> {
    let volumes = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in spec["volumeMounts"].as_array().into_iter().flatten() {
        let name = s(m, "/name");
        let Some(vol) = volumes.iter().find(|v| v["name"] == name.as_str()) else {
            continue;
        };
        let mut src = dir.join("volumes").join(&name);
        let _ = std::fs::create_dir_all(&src);
        if vol.get("secret").is_some()
            || vol.get("configMap").is_some()
            || vol.get("projected").is_some()
        {
            // Contents are written by `write_volume_files` before each start.
        } else if vol.get("emptyDir").is_none() {
            tracing::warn!(
                "volume {name}: only emptyDir, secret and configMap volumes are supported; using an empty directory"
            );
        }
        if let Some(sub) = m["subPath"].as_str().filter(|s| !s.is_empty()) {
            src = src.join(sub);
            let _ = std::fs::create_dir_all(&src);
        }
        out.push(Mount {
            src,
            dst: s(m, "/mountPath"),
            read_only: m["readOnly"] == true,
        });
    }
    out
}

/// The most of a termination message file the kubelet reads (its end), like the real one's.
pub const MAX_TERMINATION_MESSAGE: usize = 4096;
/// `FallbackToLogsOnError`: at most this many last lines of the log...
pub const FALLBACK_LOG_LINES: usize = 80;
/// ...and at most this many bytes of them.
pub const FALLBACK_LOG_BYTES: usize = 2048;

/// The last `max` bytes of a file (from a UTF-8 character boundary).
fn tail_bytes(path: &Path, max: usize) -> Option<String> {
    let data = std::fs::read(path).ok()?;
    let mut start = data.len().saturating_sub(max);
    while start < data.len() && (data[start] & 0xC0) == 0x80 {
        start += 1;
    }
    Some(String::from_utf8_lossy(&data[start..]).into_owned())
}

/// A container's `state.terminated.message`, as the real kubelet makes it: the end of the
/// termination message file (at most 4096 bytes); with `FallbackToLogsOnError`, when that is
/// empty and the container failed, the end of its log (80 lines, at most 2048 bytes).
pub fn termination_message(
    file: Option<&Path>,
    policy: &str,
    exit_code: i32,
    log: &Path,
) -> Option<String> {
    if let Some(m) = file
        .and_then(|f| tail_bytes(f, MAX_TERMINATION_MESSAGE))
        .filter(|m| !m.is_empty())
    {
        return Some(m);
    }
    if policy != "FallbackToLogsOnError" || exit_code == 0 {
        return None;
    }
    let text = tail_bytes(log, FALLBACK_LOG_BYTES * 64)?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let last = lines[lines.len().saturating_sub(FALLBACK_LOG_LINES)..].concat();
    let mut start = last.len().saturating_sub(FALLBACK_LOG_BYTES);
    while !last.is_char_boundary(start) {
        start += 1;
    }
    Some(last[start..].to_string()).filter(|m| !m.is_empty())
}

/// Mount points below `dir` on the host (the top-most ones), from `/proc/self/mountinfo`.
fn submounts(dir: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = format!("{}/", dir.trim_end_matches('/'));
    let mut points: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort();
    points.dedup();
    let all = points.clone();
    points.retain(|p| {
        !all.iter()
            .any(|q| q != p && p.starts_with(&format!("{q}/")))
    });
    points
}

/// Shell steps that bind-mount the host file `src` at `dst` in the container's mount
/// namespace. When `dst` does not exist its directory gets an overlay in the namespace (upper
/// layer on a tmpfs at `stage`, the host's mounts below it moved over), so creating the mount
/// target leaves nothing on the host, not even in `/dev`.
fn termination_mount_script(src: &Path, dst: &str, stage: &Path) -> String {
    let q = |s: &str| shell_quote(s);
    let (srcq, dstq) = (q(&src.to_string_lossy()), q(dst));
    let dst_path = Path::new(dst);
    let parent = dst_path.parent().map(|p| p.to_string_lossy().into_owned());
    match parent {
        _ if dst_path.is_file() => format!("mount --bind {srcq} {dstq} && "),
        Some(dir) if Path::new(&dir).is_dir() && dir != "/" => {
            let st = |sub: &str| q(&stage.join(sub).to_string_lossy());
            let options = format!(
                "lowerdir={dir},upperdir={},workdir={}",
                stage.join("upper").to_string_lossy(),
                stage.join("work").to_string_lossy()
            );
            let mut script = format!(
                "mount -t tmpfs kube-sim {s} && mkdir -p {u} {w} {m} && mount -t overlay overlay -o {o} {m} && ",
                s = q(&stage.to_string_lossy()),
                u = st("upper"),
                w = st("work"),
                m = st("merged"),
                o = q(&options),
            );
            for sub in submounts(&dir) {
                let rel = sub[dir.trim_end_matches('/').len() + 1..].to_string();
                script.push_str(&format!(
                    "mount --rbind {} {} && ",
                    q(&sub),
                    q(&stage.join("merged").join(rel).to_string_lossy())
                ));
            }
            script.push_str(&format!(
                "mount --move {} {} && touch {dstq} && mount --bind {srcq} {dstq} && ",
                st("merged"),
                q(&dir)
            ));
            script
        }
        // No such directory on the host: it is made there (left behind, like volume targets).
        _ => format!(
            "mkdir -p \"$(dirname {dstq})\" && touch {dstq} && mount --bind {srcq} {dstq} && "
        ),
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn spawn(
    argv: &[String],
    env: &[(String, String)],
    spec: &Value,
    (mounts, term): (&[Mount], Option<&TermMount>),
    log: &Path,
    mount_ns: bool,
    net: Option<&NetNs>,
) -> Result<Child, String> {
    if argv.is_empty() {
        return Err("empty command".into());
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("opening log {}: {e}", log.display()))?;
    let err_file = file.try_clone().map_err(|e| format!("log file: {e}"))?;
    let workdir = spec["workingDir"].as_str().filter(|w| !w.is_empty());
    let mut full: Vec<String> = Vec::new();
    if let Some(n) = net {
        full.extend(["ip".into(), "netns".into(), "exec".into(), n.name.clone()]);
    }
    if mount_ns {
        let mut script = String::new();
        // The termination message file goes first, unless it is inside a volume.
        let in_volume = term.is_some_and(|t| {
            mounts.iter().any(|m| {
                Path::new(&t.dst).starts_with(&m.dst) && Path::new(&t.dst) != Path::new(&m.dst)
            })
        });
        // A host where this cannot be mounted (e.g. no overlayfs) runs the container without
        // the file: its termination message is then empty (or taken from the log).
        let term_script = |t: &TermMount| {
            let steps = if in_volume {
                let d = shell_quote(&t.dst);
                let src = shell_quote(&t.src.to_string_lossy());
                format!("touch {d} && mount --bind {src} {d} && ")
            } else {
                termination_mount_script(&t.src, &t.dst, &t.stage)
            };
            format!("{{ {{ {steps}true; }} 2>/dev/null || true; }} && ")
        };
        if let Some(t) = term.filter(|_| !in_volume) {
            script.push_str(&term_script(t));
        }
        for m in mounts {
            let (src, dst) = (shell_quote(&m.src.to_string_lossy()), shell_quote(&m.dst));
            script.push_str(&format!("mkdir -p {dst} && mount --bind {src} {dst} && "));
            if m.read_only {
                script.push_str(&format!("mount -o remount,bind,ro {dst} && "));
            }
        }
        if let Some(t) = term.filter(|_| in_volume) {
            script.push_str(&term_script(t));
        }
        if let Some(w) = workdir {
            script.push_str(&format!("mkdir -p {q} && cd {q} && ", q = shell_quote(w)));
        }
        script.push_str("exec \"$@\"");
        full.extend(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                &script,
                "sh",
            ]
            .iter()
            .map(|x| x.to_string()),
        );
    }
    full.extend(argv.iter().cloned());
    let mut cmd = Command::new(&full[0]);
    cmd.args(&full[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.clone(), v.clone())))
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err_file))
        .process_group(0)
        .kill_on_drop(true);
    if !mount_ns {
        match workdir {
            Some(w) if Path::new(w).is_dir() => {
                cmd.current_dir(w);
            }
            _ => {
                cmd.current_dir("/");
            }
        }
    } else {
        cmd.current_dir("/");
    }
    cmd.spawn()
        .map_err(|e| format!("starting {:?}: {e}", argv[0]))
}

/// Writes the files of secret and configMap volumes into the pod directory.
pub fn write_volume_files(store: &Store, pod: &Value, dir: &Path) -> Result<(), String> {
    let ns = s(pod, "/metadata/namespace");
    for vol in pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = s(vol, "/name");
        let target = dir.join("volumes").join(&name);
        let sources: Vec<(&str, Value)> = if let Some(sv) = vol.get("secret") {
            vec![(
                "secrets",
                json!({"name": sv["secretName"], "items": sv["items"], "optional": sv["optional"]}),
            )]
        } else if let Some(cv) = vol.get("configMap") {
            vec![("configmaps", cv.clone())]
        } else if let Some(p) = vol.get("projected") {
            p["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|src| {
                    src.get("secret")
                        .map(|x| ("secrets", x.clone()))
                        .or_else(|| src.get("configMap").map(|x| ("configmaps", x.clone())))
                })
                .collect()
        } else {
            continue;
        };
        std::fs::create_dir_all(&target)
            .map_err(|e| format!("creating {}: {e}", target.display()))?;
        for (plural, src) in sources {
            let obj_name = src["name"].as_str().unwrap_or_default();
            let Some(obj) = store.get(&(String::new(), plural.into()), &ns, obj_name) else {
                if src["optional"] == true {
                    continue;
                }
                return Err(format!(
                    "MountVolume.SetUp failed for volume \"{name}\": {} \"{obj_name}\" not found",
                    plural.trim_end_matches('s')
                ));
            };
            let data = obj["data"].as_object().cloned().unwrap_or_default();
            let items: Vec<(String, String)> = match src["items"].as_array() {
                Some(items) => items
                    .iter()
                    .map(|i| (s(i, "/key"), s(i, "/path")))
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (k, path) in items {
                let Some(raw) = data.get(&k).and_then(Value::as_str) else {
                    continue;
                };
                let bytes = if plural == "secrets" {
                    base64::engine::general_purpose::STANDARD
                        .decode(raw)
                        .map_err(|e| format!("secret {obj_name} key {k}: {e}"))?
                } else {
                    raw.as_bytes().to_vec()
                };
                let file = target.join(&path);
                if let Some(parent) = file.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                std::fs::write(&file, bytes)
                    .map_err(|e| format!("writing {}: {e}", file.display()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        assert_eq!(
            ImageMap::base_name("ghcr.io/agentrun/sidecar:v1"),
            "ghcr.io/agentrun/sidecar"
        );
        assert_eq!(
            ImageMap::base_name("localhost:5000/x@sha256:abc"),
            "localhost:5000/x"
        );
        assert_eq!(
            ImageMap::base_name("docker.io/library/busybox:1.36"),
            "busybox"
        );
        assert_eq!(ImageMap::base_name("busybox"), "busybox");
    }

    #[test]
    fn var_expansion() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand_vars("x$(A)y$(B)$$(A)", &env), "x1y$(B)$(A)");
    }
}

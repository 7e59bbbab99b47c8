//! A pod on the node: its containers as host processes. Init containers run in order (native
//! sidecars keep running and are restarted), then the main containers, restarted per the
//! pod's `restartPolicy` with a back-off; `activeDeadlineSeconds`; deletion with a grace
//! period, sidecars last.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::Kubelet;
use super::container::{ContainerState, exit_code};
use super::env::{PodEnv, expand_vars};
use super::images::ImageMap;
use super::network::NetNs;
use super::probes::{PROBE_FIELDS, ProbeState};
use super::security::{Identity, identity, verify_run_as_non_root};
use super::spawn::{Isolation, spawn};
use super::volumes::{mounts_of, setup_volumes, termination_file, write_volume_files};
use crate::json::{str_at, string_list};
use crate::time::now_rfc3339;

/// One pod on the node, run until it ends or is deleted (one task per pod).
pub(super) struct PodRunner {
    pub(super) kubelet: Arc<Kubelet>,
    pub(super) pod: Value,
    pub(super) uid: String,
    pub(super) ns: String,
    pub(super) name: String,
    pub(super) stop: watch::Receiver<Option<i64>>,
    pub(super) inits: Vec<ContainerState>,
    pub(super) mains: Vec<ContainerState>,
    pub(super) dir: PathBuf,
    pub(super) phase: &'static str,
    pub(super) reason: Option<(&'static str, String)>,
    pub(super) start_time: String,
    pub(super) initialized: bool,
    pub(super) net: Option<NetNs>,
    pub(super) pod_ip: String,
    /// Events to record: type, reason, message.
    pub(super) events: Vec<(&'static str, &'static str, String)>,
}

/// What a container start needs: its argv, environment and identity, or why it must wait.
enum Prepared {
    Argv(Vec<String>, Vec<(String, String)>, Identity),
    /// The container cannot start (yet): waiting reason and message, and when to try again.
    Wait(&'static str, String, Duration),
}

/// How soon a container that waits for something another object may change (a Secret, a
/// ConfigMap, an image) is tried again.
const RETRY: Duration = Duration::from_millis(500);
/// How long the kubelet's pod worker backs off after a sync error that only the pod could
/// change, such as a container its security context refuses (pod specs cannot change there).
const SYNC_ERROR_BACKOFF: Duration = Duration::from_secs(10);

impl PodRunner {
    pub(super) fn new(
        kubelet: Arc<Kubelet>,
        pod: Value,
        stop: watch::Receiver<Option<i64>>,
    ) -> PodRunner {
        let uid = str_at(&pod, "/metadata/uid");
        let dir = kubelet.cfg.state_dir.join("pods").join(&uid);
        let list = |k: &str, init: bool| -> Vec<ContainerState> {
            pod["spec"][k]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| ContainerState::new(c, init))
                .collect()
        };
        PodRunner {
            inits: list("initContainers", true),
            mains: list("containers", false),
            ns: str_at(&pod, "/metadata/namespace"),
            name: str_at(&pod, "/metadata/name"),
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

    fn stop_requested(&self) -> Option<i64> {
        *self.stop.borrow()
    }

    pub(super) async fn run(mut self) {
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
        setup_volumes(&self.pod, &self.dir);
        self.publish();
        let deadline = self
            .pod
            .pointer("/spec/activeDeadlineSeconds")
            .and_then(Value::as_u64)
            .map(|s| Instant::now() + Duration::from_secs(s));
        let restart_policy = str_at(&self.pod, "/spec/restartPolicy");
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
                if self.mains.iter().any(ContainerState::running) {
                    self.phase = "Running";
                }
                if self.mains.iter().all(|c| c.done) {
                    let ok = self.mains.iter().all(|c| c.exit_code == Some(0));
                    self.phase = if ok { "Succeeded" } else { "Failed" };
                    // As the kubelet does since 1.27: the containers' ends are reported at
                    // once, the pod's terminal phase only once its sidecars have stopped too.
                    if self.inits.iter().any(|c| c.sidecar && c.running()) {
                        let terminal = std::mem::replace(&mut self.phase, "Running");
                        self.publish();
                        self.phase = terminal;
                    }
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
        let (argv, env, identity) = match prepared {
            Prepared::Argv(a, e, i) => (a, e, i),
            Prepared::Wait(reason, message, retry) => {
                if c.state.pointer("/waiting/reason").and_then(Value::as_str) != Some(reason) {
                    let ev = match reason {
                        "ImagePullBackOff" => "BackOff",
                        "ContainerCreating" => "FailedMount",
                        _ => "Failed",
                    };
                    // The kubelet's event for a container it could not create is `Error: ERR`.
                    let text = match reason {
                        "CreateContainerConfigError" | "CreateContainerError" => {
                            format!("Error: {message}")
                        }
                        _ => format!("Error: {reason}: {message}"),
                    };
                    self.events.push(("Warning", ev, text));
                }
                c.state = json!({"waiting": {"reason": reason, "message": message}});
                c.next_start = Some(Instant::now() + retry);
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
            termination_file(&self.dir, &c.name, &spec)
        } else {
            None
        };
        c.term_file = term.as_ref().map(|t| t.src.clone());
        let iso = Isolation {
            mount_ns: self.kubelet.cfg.mount_namespaces,
            read_only_root: identity.read_only_root,
            net: self.net.as_ref(),
            identity: Some(&identity).filter(|_| self.kubelet.cfg.identities),
        };
        c.identity = iso.identity.cloned();
        match spawn(&argv, &env, &spec, (&mounts, term.as_ref()), &log, &iso) {
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

    /// Everything the kubelet does before a container is created, in its order: the pod's
    /// volume files, the image (pulled), the environment, `runAsNonRoot`, then the identity
    /// (user, groups, capabilities) the runtime would give it.
    fn prepare(&self, spec: &Value) -> Prepared {
        let image = spec["image"].as_str().unwrap_or_default();
        let command = string_list(&spec["command"]);
        let args = string_list(&spec["args"]);
        if let Err(msg) = write_volume_files(&self.kubelet.store, &self.pod, &self.dir) {
            return Prepared::Wait("ContainerCreating", msg, RETRY);
        }
        let images = &self.kubelet.cfg.images;
        let pull_error = |detail: String| {
            let pulls = self
                .inits
                .iter()
                .chain(self.mains.iter())
                .any(|c| c.state.pointer("/waiting/reason") == Some(&json!("ErrImagePull")));
            let reason = if pulls {
                "ImagePullBackOff"
            } else {
                "ErrImagePull"
            };
            Prepared::Wait(
                reason,
                format!("Back-off pulling image \"{image}\": kube-sim: {detail}"),
                RETRY,
            )
        };
        if self.kubelet.cfg.strict_images && images.lookup(image).is_none() {
            return pull_error(format!(
                "image {:?} is not in the image map",
                ImageMap::base_name(image)
            ));
        }
        let policy = spec["imagePullPolicy"].as_str().unwrap_or_default();
        let pulled = match self.kubelet.pull_image(image, policy) {
            Ok(p) => p,
            Err(e) => return pull_error(format!("pulling {image:?}: {e}")),
        };
        let image_user = images.user(image);
        let identity = identity(&self.pod, spec, &image_user);
        let pod_env = PodEnv {
            store: &self.kubelet.store,
            pod: &self.pod,
            ns: &self.ns,
            name: &self.name,
            pod_ip: &self.pod_ip,
            home: identity.as_ref().map_or("/", |i| i.home.as_str()),
        };
        let env = match pod_env.resolve(spec) {
            Ok(e) => e,
            Err(msg) => return Prepared::Wait("CreateContainerConfigError", msg, RETRY),
        };
        if let Err(msg) = verify_run_as_non_root(&self.pod, spec, &image_user) {
            return Prepared::Wait("CreateContainerConfigError", msg, SYNC_ERROR_BACKOFF);
        }
        let identity = match identity {
            Ok(i) => i,
            Err(msg) => return Prepared::Wait("CreateContainerError", msg, SYNC_ERROR_BACKOFF),
        };
        let expand = |list: Vec<String>| -> Vec<String> {
            list.into_iter().map(|a| expand_vars(&a, &env)).collect()
        };
        let (command, args) = (expand(command), expand(args));
        let argv = match images.mapped_argv(image, pulled.as_deref(), &command, &args) {
            Some(argv) => argv,
            None => {
                if command.is_empty() {
                    return Prepared::Wait(
                        "CreateContainerError",
                        format!(
                            "kube-sim: image {image:?} is not in the image map and the container sets no command"
                        ),
                        RETRY,
                    );
                }
                let mut v = command;
                v.extend(args);
                v
            }
        };
        Prepared::Argv(argv, env, identity)
    }

    /// Sends SIGTERM to the sidecars (or the others), then SIGKILL at `end`, and waits.
    async fn terminate(&mut self, sidecars: bool, end: Instant) {
        let (kubelet, uid) = (self.kubelet.clone(), self.uid.clone());
        let list: Vec<&mut ContainerState> = self
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

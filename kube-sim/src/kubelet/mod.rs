//! The kubelet: schedules pods onto the one node, watches them, and runs their containers as
//! host processes.
//!
//! Init containers run in order (native sidecars, `restartPolicy: Always`, keep running and are
//! restarted when they exit), then the main containers, restarted per the pod's
//! `restartPolicy`. Each container runs in its own mount namespace (when kube-sim runs as root)
//! with the pod's volumes bind-mounted at their `mountPath`, and, when enabled, in the pod's own
//! network namespace; as root, it runs with the user, groups and capabilities its security
//! context and image give it. Images map to executables (and their users) through an image map.
//!
//! | module | what it owns |
//! |---|---|
//! | `mod.rs` | [`Kubelet`], its config, scheduling onto the node, the pod watch |
//! | `runner` | one pod's life: init containers, sidecars, main containers, restarts, deadline, deletion |
//! | `container` | one container's runtime state and container status |
//! | `status` | the pod status it publishes, conditions, Events |
//! | `probes` | startup, readiness and liveness probes |
//! | `images` | the image map, pulling binaries where every user can run them |
//! | `security` | security contexts: users, groups, capabilities, `runAsNonRoot` |
//! | `env` | environment resolution |
//! | `volumes` | volume mounts and files, termination message files |
//! | `spawn` | the host process: network namespace, mount namespace script, logs |
//! | `network` | per-pod network namespaces |

mod container;
pub mod env;
pub mod images;
pub mod network;
mod probes;
mod runner;
pub mod security;
mod spawn;
mod status;
pub mod volumes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::apiserver::PodLogs;
use crate::apiserver::store::{EventType, NODE_NAME, Store, TypeKey};
use crate::json::str_at;
use crate::time::now_rfc3339;
use network::Network;
use runner::PodRunner;
use status::{pod_event, set_condition};

pub use images::{ImageEntry, ImageMap};

/// Kubelet settings.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub state_dir: PathBuf,
    pub images: ImageMap,
    /// Images missing from the map fail like an image that cannot be pulled.
    pub strict_images: bool,
    /// Run each container in its own mount namespace with volumes bind-mounted (needs root).
    pub mount_namespaces: bool,
    /// Run each container as the user, groups and capabilities its security context and image
    /// give it (needs root and `setpriv`); otherwise containers run as kube-sim's user.
    pub identities: bool,
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
            identities: identities_available(),
            network: None,
            restart_backoff: Duration::from_secs(1),
        }
    }
}

/// Makes the state directory searchable by every user (its images are run by containers of
/// any uid), and warns when a directory above it is not.
fn open_state_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::create_dir_all(dir.join("images"));
    for d in [dir.to_path_buf(), dir.join("images")] {
        if let Ok(m) = std::fs::metadata(&d) {
            let mode = m.permissions().mode() & 0o7777;
            if mode & 0o011 != 0o011 {
                let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode | 0o011));
            }
        }
    }
    for a in dir.ancestors().skip(1) {
        let searchable = std::fs::metadata(a)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(true);
        if !searchable {
            tracing::warn!(
                "{} is not searchable by other users: containers that do not run as its owner cannot run the image binaries pulled below it into {}",
                a.display(),
                dir.display()
            );
            break;
        }
    }
}

/// Whether this process may create mount namespaces (root and `unshare` present).
pub fn namespaces_available() -> bool {
    nix::unistd::geteuid().is_root() && Path::new("/usr/bin/unshare").exists()
}

/// Whether this process may run containers as other users (root and `setpriv` present).
pub fn identities_available() -> bool {
    nix::unistd::geteuid().is_root() && Path::new(spawn::SETPRIV).exists()
}

pub struct Kubelet {
    store: Arc<Store>,
    cfg: KubeletConfig,
    pods: Mutex<HashMap<String, watch::Sender<Option<i64>>>>,
    /// Images pulled into the state directory: image name without tag, pulled binary.
    pulled: Mutex<HashMap<String, PathBuf>>,
}

fn pods_key() -> TypeKey {
    (String::new(), "pods".into())
}

impl Kubelet {
    pub fn new(store: Arc<Store>, cfg: KubeletConfig) -> Arc<Kubelet> {
        if !cfg.identities {
            tracing::warn!(
                "kube-sim is not root (or has no {}): every container runs as kube-sim's own user; securityContext users, groups, capabilities, no_new_privs and volume ownership are not applied",
                spawn::SETPRIV
            );
        }
        open_state_dir(&cfg.state_dir);
        Arc::new(Kubelet {
            store,
            cfg,
            pods: Mutex::new(HashMap::new()),
            pulled: Mutex::new(HashMap::new()),
        })
    }

    /// The host binary of a binary image, pulled into the state directory (once, or at every
    /// start with `imagePullPolicy: Always`); None for images that are not binaries.
    fn pull_image(&self, image: &str, policy: &str) -> Result<Option<PathBuf>, String> {
        let Some(files) = self.cfg.images.files(image) else {
            return Ok(None);
        };
        let key = ImageMap::base_name(image);
        let mut pulled = match self.pulled.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if policy != "Always"
            && let Some(p) = pulled.get(&key)
        {
            return Ok(Some(p.clone()));
        }
        let dir = self
            .cfg
            .state_dir
            .join("images")
            .join(images::pulled_dir_name(image));
        let binary = images::pull(&files, &dir)?;
        pulled.insert(key, binary.clone());
        Ok(Some(binary))
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
                                let uid = str_at(&ev.object, "/metadata/uid");
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
        let uid = str_at(pod, "/metadata/uid");
        let (ns, name) = (
            str_at(pod, "/metadata/namespace"),
            str_at(pod, "/metadata/name"),
        );
        let deleting = pod.pointer("/metadata/deletionTimestamp").is_some();
        let node = str_at(pod, "/spec/nodeName");
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
        let phase = str_at(pod, "/status/phase");
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
            str_at(pod, "/metadata/namespace"),
            str_at(pod, "/metadata/name"),
            str_at(pod, "/metadata/uid"),
        );
        let now = now_rfc3339();
        let was_unschedulable = marked_unschedulable(pod);
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
                if str_at(p, "/metadata/uid") != uid || p.pointer("/spec/nodeName").is_some() {
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
                if str_at(p, "/metadata/uid") != uid {
                    return;
                }
                if !marked_unschedulable(p) {
                    set_condition(p, "PodScheduled", "False", "Unschedulable", msg, &now);
                }
            });
        }
    }
}

impl PodLogs for Kubelet {
    fn log_path(&self, uid: &str, container: &str) -> PathBuf {
        Kubelet::log_path(self, uid, container)
    }
}

/// Whether the pod's `PodScheduled` condition already says it is unschedulable.
fn marked_unschedulable(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "PodScheduled" && c["reason"] == "Unschedulable")
        })
}

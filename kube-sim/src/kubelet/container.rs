//! One container's runtime state in the kubelet: its process, restarts and back-off, probe
//! results, and the `state` / `lastState` / `ready` / `started` of its container status.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::process::Child;

use super::probes::ProbeState;
use super::security::Identity;
use super::volumes::termination_message;
use crate::json::str_at;
use crate::time::now_rfc3339;

/// One container's runtime state.
pub(super) struct ContainerState {
    pub(super) name: String,
    pub(super) spec: Value,
    pub(super) init: bool,
    pub(super) sidecar: bool,
    pub(super) child: Option<Child>,
    pub(super) pid: Option<i32>,
    pub(super) restarts: i64,
    pub(super) state: Value,
    pub(super) last_state: Value,
    /// The container will not run again.
    pub(super) done: bool,
    pub(super) exit_code: Option<i32>,
    pub(super) next_start: Option<Instant>,
    pub(super) backoff: Duration,
    /// The startup probe passed (or there is none) since the last start.
    pub(super) started: bool,
    /// The readiness probe passes (or there is none and the container started).
    pub(super) ready: bool,
    pub(super) probes: [ProbeState; 3],
    /// SIGKILL deadline after a probe failure sent SIGTERM.
    pub(super) kill_at: Option<Instant>,
    /// The host file bind-mounted at the container's `terminationMessagePath`.
    pub(super) term_file: Option<PathBuf>,
    /// What the current instance runs as (exec probes run as it too); None: kube-sim's user.
    pub(super) identity: Option<Identity>,
}

impl ContainerState {
    pub(super) fn new(spec: &Value, init: bool) -> ContainerState {
        let sidecar = init && spec["restartPolicy"] == "Always";
        ContainerState {
            name: str_at(spec, "/name"),
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
            identity: None,
        }
    }

    pub(super) fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Records the exit: `state.terminated` with the exit code and the termination message.
    pub(super) fn terminated(&mut self, code: i32, log: &Path) {
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

    pub(super) fn status(&self) -> Value {
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

pub(super) fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(9))
}

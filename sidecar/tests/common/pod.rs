//! One agent pod on the host, with the users a real kubelet gives its containers.
//!
//! On a real kubelet the containers of one pod run as different users: the sidecar as its own
//! non-root user, the agent as its image's user (root with every capability dropped, an
//! arbitrary uid, or OpenShift's random uid with gid 0), each with the pod's `fsGroup` as a
//! supplementary group, and the shared `emptyDir` group-owned by the `fsGroup` with the setgid
//! bit. [`Pod`] builds exactly that layout (it needs root, as CI has): the real binaries run
//! under `setpriv` with the pod's uid, gid and groups, no capabilities and `no_new_privs`.
#![allow(dead_code)]

use super::{DEADLINE, ENTRYPOINT, SIDECAR};
use agentrun_protocol::testing::{ChildGuard, RedisServer, free_port, wait_for};
use agentrun_protocol::{RunId, StatusEvent};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The pod's `fsGroup`, and the sidecar's user and group (the operator's defaults).
pub const FS_GROUP: u32 = 65532;
pub const SIDECAR_USER: User = User {
    uid: 65532,
    gid: 65532,
    groups: &[65532],
};
/// An agent image's arbitrary non-root user.
pub const AGENT_USER: User = User {
    uid: 1000,
    gid: 1000,
    groups: &[FS_GROUP],
};

/// A container's identity as the kubelet gives it: uid, primary gid, supplementary groups.
#[derive(Clone, Copy, Debug)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub groups: &'static [u32],
}

/// One pod on the host: an "image" directory with the agentrun binaries (what the sidecar
/// image holds), the shared volume, made as a kubelet makes an `emptyDir` with `fsGroup`, the
/// sidecar's private state volume (mounted in the sidecar container only: here a directory
/// only the sidecar's user can enter), and a scratch directory for the agent's own files.
pub struct Pod {
    root: tempfile::TempDir,
}

/// A running sidecar of a [`Pod`].
pub struct PodSidecar {
    pub child: ChildGuard,
    pub metrics_port: u16,
}

impl Pod {
    pub fn new() -> Pod {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests build a pod's user layout with setpriv and need root (CI runs as root)"
        );
        let root = tempfile::Builder::new()
            .prefix("agentrun-pod-users-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let image = root.path().join("image");
        std::fs::create_dir(&image).unwrap();
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o755)).unwrap();
        for (bin, name) in [
            (SIDECAR, "agentrun-sidecar"),
            (ENTRYPOINT, "agentrun-entrypoint"),
        ] {
            let target = image.join(name);
            if std::fs::hard_link(bin, &target).is_err() {
                std::fs::copy(bin, &target).unwrap();
            }
        }
        // emptyDir: created 0777 by the kubelet; with fsGroup, group-owned by it with the setgid
        // bit so that what the containers create in it belongs to the group too.
        let volume = root.path().join("agentrun");
        std::fs::create_dir(&volume).unwrap();
        nix::unistd::chown(&volume, None, Some(nix::unistd::Gid::from_raw(FS_GROUP))).unwrap();
        std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o2777)).unwrap();
        // The sidecar's state volume: no other container mounts it, so no other user reaches it.
        let state = root.path().join("sidecar-state");
        std::fs::create_dir(&state).unwrap();
        nix::unistd::chown(
            &state,
            Some(nix::unistd::Uid::from_raw(SIDECAR_USER.uid)),
            Some(nix::unistd::Gid::from_raw(SIDECAR_USER.gid)),
        )
        .unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        // The agent's own scratch space (its /tmp).
        let scratch = root.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o1777)).unwrap();
        // The kubelet creates the termination message file writable by any user.
        let log = root.path().join("termination-log");
        std::fs::write(&log, "").unwrap();
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
        Pod { root }
    }

    pub fn image(&self, name: &str) -> PathBuf {
        self.root.path().join("image").join(name)
    }

    pub fn volume(&self) -> PathBuf {
        self.root.path().join("agentrun")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.path().join("sidecar-state")
    }

    pub fn scratch(&self) -> PathBuf {
        self.root.path().join("scratch")
    }

    pub fn termination_log(&self) -> PathBuf {
        self.root.path().join("termination-log")
    }

    pub fn socket(&self) -> PathBuf {
        self.volume().join("agentrun.sock")
    }

    /// The file the sidecar hands the entrypoint its key in.
    pub fn handoff(&self) -> PathBuf {
        self.volume().join("agentrun-entrypoint.key")
    }

    /// What the sidecar does at its first start, for an agent that runs before any sidecar
    /// (which a pod never does): its key in its state volume and the hand-off file on the
    /// shared volume, both made by the sidecar's user.
    pub fn provision_key(&self) {
        use agentrun_sidecar::auth;
        let key = auth::Key::generate().unwrap();
        auth::persist_key(&self.state_dir(), &key).unwrap();
        auth::write_handoff(&self.handoff(), &key).unwrap();
        let sidecar = Some(nix::unistd::Uid::from_raw(SIDECAR_USER.uid));
        for file in [self.state_dir().join(auth::STATE_KEY_FILE), self.handoff()] {
            nix::unistd::chown(&file, sidecar, None).unwrap();
        }
    }

    /// The tools init container: copies the entrypoint onto the shared volume.
    pub fn install_entrypoint(&self) {
        let out = as_user(SIDECAR_USER, &self.image("agentrun-sidecar"))
            .arg("install-entrypoint")
            .arg(self.volume().join("bin"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install-entrypoint as {SIDECAR_USER:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The native sidecar, as its own user, with its state volume; returns once it serves
    /// (its health endpoint answers and its socket is there), as the kubelet's startup probe
    /// waits before it starts the agent container.
    pub async fn start_sidecar(&self, redis: &RedisServer, run: &RunId) -> PodSidecar {
        let metrics_port = free_port();
        let child = as_user(SIDECAR_USER, &self.image("agentrun-sidecar"))
            .arg("serve")
            .arg("--socket")
            .arg(self.socket())
            .args(["--redis-url", &redis.url(), "--run-id", run.as_str()])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--metrics-interval-seconds", "0"])
            .env("AGENTRUN_STATE_DIR", self.state_dir())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let child = ChildGuard(child);
        let socket = self.socket();
        wait_for("the sidecar to serve", DEADLINE, || {
            let socket = socket.clone();
            async move {
                let healthy = http_get(metrics_port, "/healthz")
                    .await
                    .is_some_and(|r| r.starts_with("HTTP/1.1 200"));
                (healthy && socket.exists()).then_some(())
            }
        })
        .await;
        PodSidecar {
            child,
            metrics_port,
        }
    }

    /// The agent container: the entrypoint from the shared volume wrapping `script`.
    pub fn agent(&self, user: User, entrypoint_args: &[&str], script: &str) -> Command {
        let mut cmd = as_user(user, &self.volume().join("bin/agentrun-entrypoint"));
        cmd.arg("--socket")
            .arg(self.socket())
            .arg("--termination-log")
            .arg(self.termination_log())
            .args(entrypoint_args)
            .args(["--", "sh", "-c", script])
            .env("SCRATCH", self.scratch())
            .env("VOLUME", self.volume())
            .stdin(Stdio::null());
        cmd
    }
}

/// A run with one pod: Redis, the run's id, the pod with the entrypoint installed and some
/// files of the agent's own in its scratch directory, and the pod's sidecar serving.
pub async fn pod_run(
    tag: &str,
    scratch: &[(&str, &[u8])],
) -> (RedisServer, RunId, Pod, PodSidecar) {
    let redis = RedisServer::start();
    let run = super::run_id(tag);
    let pod = Pod::new();
    pod.install_entrypoint();
    for (name, content) in scratch {
        std::fs::write(pod.scratch().join(name), content).unwrap();
    }
    let sidecar = pod.start_sidecar(&redis, &run).await;
    (redis, run, pod, sidecar)
}

impl Pod {
    /// Starts the agent container ([`Pod::agent`]) with its stdout discarded and its stderr
    /// captured (read it with `exit_of`).
    pub fn spawn_agent(&self, user: User, entrypoint_args: &[&str], script: &str) -> ChildGuard {
        ChildGuard::spawn(
            self.agent(user, entrypoint_args, script)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
    }
}

/// `setpriv` with the user's ids and groups, every capability gone and `no_new_privs`, as a
/// container with `capabilities: {drop: [ALL]}` and `allowPrivilegeEscalation: false` runs.
pub fn as_user(user: User, program: &Path) -> Command {
    let groups: Vec<String> = user.groups.iter().map(u32::to_string).collect();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL"])
        .args(["--reuid", &user.uid.to_string()])
        .args(["--regid", &user.gid.to_string()])
        .args(["--groups", &groups.join(",")])
        .args(["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"])
        .arg("--")
        .arg(program)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .current_dir("/");
    cmd
}

/// A plain HTTP/1.1 GET on 127.0.0.1; the whole response, or `None` when nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// The value of a Prometheus sample (`name{labels}` as written in the exposition), summed over
/// every line that starts with `prefix`.
pub fn metric_sum(exposition: &str, prefix: &str) -> u64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The first status event of the run that `pick` accepts, waiting for it.
pub async fn wait_for_status(
    redis: &RedisServer,
    run: &RunId,
    what: &str,
    pick: impl Fn(&StatusEvent) -> bool,
) -> StatusEvent {
    let conn = redis.conn().await;
    wait_for(what, DEADLINE, || {
        let (mut conn, run) = (conn.clone(), run.clone());
        let found = async move { super::statuses(&mut conn, &run).await };
        let pick = &pick;
        async move { found.await.into_iter().find(|s| pick(s)) }
    })
    .await
}

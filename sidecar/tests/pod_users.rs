//! Agent output reaches Redis whatever user the agent runs as.
//!
//! On a real kubelet the containers of one pod run as different users: the sidecar as its own
//! non-root user, the agent as its image's user (root with every capability dropped, an
//! arbitrary uid, or OpenShift's random uid with gid 0), each with the pod's `fsGroup` as a
//! supplementary group, and the shared `emptyDir` group-owned by the `fsGroup` with the setgid
//! bit. These tests build exactly that layout on the host (they need root, as CI has): the real
//! binaries run under `setpriv` with the pod's uid, gid and groups, no capabilities and
//! `no_new_privs`, and the output must reach the stream byte-exact and `stop` must reach the
//! agent.

mod common;

use agentrun_protocol::publish::Batch;
use agentrun_protocol::testing::{ChildGuard, RedisServer, free_port, wait_for};
use agentrun_protocol::{
    ControlAction, ControlMessage, EntryType, NewEntry, PublishOptions, Publisher, RunId, RunState,
    StreamName, now_ms,
};
use bytes::Bytes;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The pod's `fsGroup`, and the sidecar's user and group (the operator's defaults).
const FS_GROUP: u32 = 65532;
const SIDECAR_USER: User = User {
    uid: 65532,
    gid: 65532,
    groups: &[65532],
};

/// A container's identity as the kubelet gives it: uid, primary gid, supplementary groups.
#[derive(Clone, Copy, Debug)]
struct User {
    uid: u32,
    gid: u32,
    groups: &'static [u32],
}

/// What the agent writes: several lines, bytes that are not UTF-8, and no final newline.
const AGENT_BYTES: &[u8] =
    b"first line\nsecond \xe2\x9c\x93 line\n\xff\xfe raw bytes\nno newline at the end";

/// One pod on the host: an "image" directory with the agentrun binaries (what the sidecar
/// image holds) and the shared volume, made as a kubelet makes an `emptyDir` with `fsGroup`.
struct Pod {
    root: tempfile::TempDir,
}

impl Pod {
    fn new() -> Pod {
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
        // The kubelet creates the termination message file writable by any user.
        let log = root.path().join("termination-log");
        std::fs::write(&log, "").unwrap();
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
        Pod { root }
    }

    fn image(&self, name: &str) -> PathBuf {
        self.root.path().join("image").join(name)
    }

    fn volume(&self) -> PathBuf {
        self.root.path().join("agentrun")
    }

    fn termination_log(&self) -> PathBuf {
        self.root.path().join("termination-log")
    }

    fn socket(&self) -> PathBuf {
        self.volume().join("agentrun.sock")
    }

    /// The tools init container: copies the entrypoint onto the shared volume.
    fn install_entrypoint(&self) {
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

    /// The native sidecar, as its own user; returns once its socket is there.
    async fn start_sidecar(&self, redis: &RedisServer, run: &RunId) -> ChildGuard {
        let child = as_user(SIDECAR_USER, &self.image("agentrun-sidecar"))
            .arg("serve")
            .arg("--socket")
            .arg(self.socket())
            .args(["--redis-url", &redis.url(), "--run-id", run.as_str()])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics-interval-seconds", "0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let sidecar = ChildGuard(child);
        let socket = self.socket();
        wait_for("the sidecar's socket", DEADLINE, || {
            let there = socket.exists();
            async move { there.then_some(()) }
        })
        .await;
        sidecar
    }

    /// The agent container: the entrypoint from the shared volume wrapping `script`.
    fn agent(&self, user: User, entrypoint_args: &[&str], script: &str) -> Command {
        let mut cmd = as_user(user, &self.volume().join("bin/agentrun-entrypoint"));
        cmd.arg("--socket")
            .arg(self.socket())
            .arg("--termination-log")
            .arg(self.termination_log())
            .args(entrypoint_args)
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::null());
        cmd
    }
}

/// `setpriv` with the user's ids and groups, every capability gone and `no_new_privs`, as a
/// container with `capabilities: {drop: [ALL]}` and `allowPrivilegeEscalation: false` runs.
fn as_user(user: User, program: &Path) -> Command {
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

/// The agent writes [`AGENT_BYTES`], then waits to be stopped.
fn writer_script() -> String {
    let octal: String = AGENT_BYTES.iter().map(|b| format!("\\{b:03o}")).collect();
    format!("printf '{octal}'; while :; do sleep 0.05; done")
}

async fn send_stop(redis: &RedisServer, run: &RunId) {
    let mut conn = redis.conn().await;
    let entry = NewEntry {
        pseq: 1,
        ts: now_ms(),
        kind: EntryType::Control,
        content: Bytes::from(ControlMessage::new(ControlAction::Stop).to_json()),
        meta: None,
    };
    Publisher::new(PublishOptions::default())
        .publish(
            &mut conn,
            run,
            Batch {
                stream: &StreamName::Control,
                producer: "test",
                entries: &[entry],
            },
        )
        .await
        .unwrap();
}

/// Waits until the output stream holds exactly the agent's bytes.
async fn wait_for_output(redis: &RedisServer, run: &RunId, user: User) {
    let conn = redis.conn().await;
    let key = output_key(run);
    wait_for(
        &format!("the output of an agent running as {user:?} in the stream"),
        DEADLINE,
        || {
            let (mut conn, key) = (conn.clone(), key.clone());
            async move {
                let bytes = concat(&read_all(&mut conn, &key).await);
                assert!(
                    AGENT_BYTES.starts_with(&bytes),
                    "the stream holds bytes the agent did not write: {:?}",
                    String::from_utf8_lossy(&bytes)
                );
                (bytes == AGENT_BYTES).then_some(())
            }
        },
    )
    .await;
}

/// The whole path with the sidecar up: output byte-exact in the stream, `stop` reaches the
/// agent, the run ends `stopped` with the agent's exit code.
async fn streams_and_stops(agent: User) {
    let redis = RedisServer::start();
    let run = run_id("users");
    let pod = Pod::new();
    pod.install_entrypoint();
    let _sidecar = pod.start_sidecar(&redis, &run).await;
    let child = pod
        .agent(agent, &["--stop-grace-seconds", "5"], &writer_script())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut agent_proc = ChildGuard(child);

    wait_for_output(&redis, &run, agent).await;
    send_stop(&redis, &run).await;
    let status = wait_for("the agent to stop", DEADLINE, || {
        let exited = agent_proc.try_wait().unwrap();
        async move { exited }
    })
    .await;
    let mut stderr = String::new();
    if let Some(mut e) = agent_proc.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    assert_eq!(
        status.code(),
        Some(143),
        "the entrypoint exits 128+SIGTERM after stop; its stderr: {stderr}"
    );
    assert!(
        !stderr.contains("cannot connect") && !stderr.contains("no sidecar"),
        "the entrypoint reached the sidecar, its stderr says otherwise: {stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(pod.termination_log()).unwrap(),
        "agentrun: stopped"
    );
    let conn = redis.conn().await;
    let stopped = wait_for("the stopped status in Redis", DEADLINE, || {
        let (mut conn, run) = (conn.clone(), run.clone());
        async move {
            statuses(&mut conn, &run)
                .await
                .into_iter()
                .find(|s| s.state == RunState::Stopped)
        }
    })
    .await;
    assert_eq!(stopped.exit_code, Some(143));
    assert_eq!(stopped.reason.as_deref(), Some("Stopped"));
}

#[tokio::test]
async fn agent_as_root_without_capabilities_streams_and_stops() {
    streams_and_stops(User {
        uid: 0,
        gid: 0,
        groups: &[FS_GROUP],
    })
    .await;
}

#[tokio::test]
async fn agent_as_uid_1000_streams_and_stops() {
    streams_and_stops(User {
        uid: 1000,
        gid: 1000,
        groups: &[FS_GROUP],
    })
    .await;
}

#[tokio::test]
async fn agent_as_an_openshift_random_uid_with_gid_0_streams_and_stops() {
    streams_and_stops(User {
        uid: 1_000_680_000,
        gid: 0,
        groups: &[0, FS_GROUP],
    })
    .await;
}

/// The agent runs and exits while no sidecar is there; its entrypoint leaves a spool on the
/// volume, and the sidecar (another user) publishes it when it starts.
async fn spool_is_adopted(agent: User, umask: &str) {
    let redis = RedisServer::start();
    let run = run_id("users-spool");
    let pod = Pod::new();
    pod.install_entrypoint();
    let script = format!("umask {umask}; printf '{}'", {
        AGENT_BYTES
            .iter()
            .map(|b| format!("\\{b:03o}"))
            .collect::<String>()
    });
    let out = pod
        .agent(agent, &["--drain-timeout-seconds", "1"], &script)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no sidecar ever answered"),
        "the entrypoint says that it found no sidecar: {stderr}"
    );
    let message = std::fs::read_to_string(pod.termination_log()).unwrap();
    assert!(
        message.starts_with("agentrun: output not delivered: no sidecar ever answered"),
        "the termination message tells the operator: {message:?}"
    );
    let spools: Vec<PathBuf> = std::fs::read_dir(pod.volume())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("agentrun-spool-"))
        .collect();
    assert_eq!(spools.len(), 1, "one spool on the volume: {spools:?}");

    let _sidecar = pod.start_sidecar(&redis, &run).await;
    wait_for_output(&redis, &run, agent).await;
    let spool = spools[0].clone();
    wait_for("the adopted spool to be removed", DEADLINE, || {
        let gone = !spool.exists();
        async move { gone.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_spool_left_by_an_agent_running_as_root_is_published_by_the_sidecar() {
    spool_is_adopted(
        User {
            uid: 0,
            gid: 0,
            groups: &[FS_GROUP],
        },
        "022",
    )
    .await;
}

#[tokio::test]
async fn a_spool_left_by_an_agent_with_umask_077_is_published_by_the_sidecar() {
    spool_is_adopted(
        User {
            uid: 1_000_680_000,
            gid: 0,
            groups: &[0, FS_GROUP],
        },
        "077",
    )
    .await;
}

#[tokio::test]
async fn the_sidecar_socket_is_open_to_every_user_of_the_pod() {
    // connect() needs write permission on the socket file itself.
    let redis = RedisServer::start();
    let run = run_id("users-socket");
    let pod = Pod::new();
    let _sidecar = pod.start_sidecar(&redis, &run).await;
    let mode = std::fs::metadata(pod.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666, "socket mode {mode:o}");
}

/// A socket that refuses the agent's user (a layout this project does not make, but a user's
/// securityContext or volume settings could): the agent container's log says so at once with
/// both identities, the run's status says why no output comes, and once the socket lets the
/// agent in everything that waited is delivered.
#[tokio::test]
async fn a_socket_that_refuses_the_agent_is_reported_at_once_and_in_the_run_status() {
    let redis = RedisServer::start();
    let run = run_id("users-refused");
    let pod = Pod::new();
    pod.install_entrypoint();
    let _sidecar = pod.start_sidecar(&redis, &run).await;
    std::fs::set_permissions(pod.socket(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = User {
        uid: 1000,
        gid: 1000,
        groups: &[FS_GROUP],
    };
    let mut child = pod
        .agent(agent, &["--stop-grace-seconds", "5"], &writer_script())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut agent_proc = ChildGuard(child);
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let mut log = Vec::new();
    let mut next_line = |what: &str, within: std::time::Duration| -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(line) => log.push(line),
                Err(_) => {
                    panic!("no line with {what:?} in the agent's log within {within:?}: {log:?}")
                }
            }
        }
    };

    // At once (well before the 10 s "no sidecar" warning), with who is who.
    let refused = next_line(
        "cannot connect to the sidecar",
        std::time::Duration::from_secs(5),
    );
    for part in ["Permission denied", "uid 1000", "uid 65532", "mode 600"] {
        assert!(refused.contains(part), "{part:?} missing from: {refused}");
    }

    // The run's status says why nothing arrives.
    let conn = redis.conn().await;
    let event = wait_for(
        "the sidecar's EntrypointNotConnected status",
        DEADLINE,
        || {
            let (mut conn, run) = (conn.clone(), run.clone());
            async move {
                statuses(&mut conn, &run)
                    .await
                    .into_iter()
                    .find(|s| s.reason.as_deref() == Some("EntrypointNotConnected"))
            }
        },
    )
    .await;
    assert!(
        event
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("kubectl logs"),
        "{event:?}"
    );
    assert!(concat(&read_all(&mut redis.conn().await, &output_key(&run)).await).is_empty());

    // Fixed: what waited is delivered, and the log says the sidecar is reached.
    std::fs::set_permissions(pod.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    next_line("connected to the sidecar", DEADLINE);
    wait_for_output(&redis, &run, agent).await;
    send_stop(&redis, &run).await;
    let status = wait_for("the agent to stop", DEADLINE, || {
        let exited = agent_proc.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert_eq!(status.code(), Some(143));
}

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

use agentrun_protocol::RunState;
use agentrun_protocol::testing::{ChildGuard, RedisServer, wait_for};
use common::pod::*;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;

/// What the agent writes: several lines, bytes that are not UTF-8, and no final newline.
const AGENT_BYTES: &[u8] =
    b"first line\nsecond \xe2\x9c\x93 line\n\xff\xfe raw bytes\nno newline at the end";

/// The agent writes [`AGENT_BYTES`], then waits to be stopped.
fn writer_script() -> String {
    let octal: String = AGENT_BYTES.iter().map(|b| format!("\\{b:03o}")).collect();
    format!("printf '{octal}'; while :; do sleep 0.05; done")
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

    wait_for_output(&redis, &run, AGENT_BYTES).await;
    let (status, stderr) = stop_agent(&redis, &run, &mut agent_proc).await;
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
    pod.provision_key();
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
    wait_for_output(&redis, &run, AGENT_BYTES).await;
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
    wait_for_output(&redis, &run, AGENT_BYTES).await;
    let (status, _) = stop_agent(&redis, &run, &mut agent_proc).await;
    assert_eq!(status.code(), Some(143));
}

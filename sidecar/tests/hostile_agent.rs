//! An agent that attacks the sidecar from inside its own container gains nothing.
//!
//! The agent runs as the entrypoint's user, so file permissions cannot keep it off the
//! sidecar's socket (mode 0666) or the shared volume. What keeps it out is the one-time key the
//! sidecar hands the entrypoint before the agent exists: a client without it never becomes the
//! sidecar's peer, and a spool without it is never published. These tests run the real
//! binaries in a pod's user layout ([`Pod`]): the sidecar as its own user with its private state
//! volume, the entrypoint and the agent as uid 1000.

mod common;

use agentrun_protocol::testing::wait_for;
use agentrun_protocol::{ControlAction, ControlMessage, RunState};
use common::pod::*;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// The impostor: connects to the sidecar's socket the way the entrypoint does and says hello,
/// again and again (a peer that is replaced reconnects, so one hello would not be enough to
/// keep the socket), alternately with no key and with a key of its own, each time followed by a
/// forged status event; writes down every byte it is sent (`OUT`), and that it has said hello
/// 20 times (`OUT.sent`).
const IMPOSTOR: &str = r#"
import collections, json, os, socket, struct, sys, time, threading
sock_path, out = sys.argv[1], sys.argv[2]

def frame(tag, body):
    return struct.pack('>IB', len(body) + 1, tag) + body

forged = json.dumps({"state": "succeeded", "reason": "Forged",
                     "message": "forged by the agent"}).encode()
event = frame(3, struct.pack('>QQQ', 1, 1, int(time.time() * 1000)) + forged)
got = []
lock = threading.Lock()

def listen(s):
    while True:
        try:
            d = s.recv(65536)
        except OSError:
            return
        if not d:
            return
        with lock:
            got.append(d)
            with open(out, 'wb') as f:
                f.write(b''.join(got))

conns = collections.deque()
for i in range(4000):
    if i % 2 == 0:
        hello = frame(1, struct.pack('>IB', os.getpid(), 0) + b'ep-impostor')
    else:
        hello = frame(1, struct.pack('>IB', os.getpid(), 32) + os.urandom(32) + b'ep-impostor')
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
        s.sendall(hello + event)
    except OSError:
        pass
    threading.Thread(target=listen, args=(s,), daemon=True).start()
    conns.append(s)
    if len(conns) > 8:
        conns.popleft().close()
    if i == 20:
        open(out + '.sent', 'w').close()
    time.sleep(0.005)
while True:
    time.sleep(1)
"#;

/// Tags of the frames in `bytes` (length-prefixed frames as on the socket).
fn frame_tags(mut bytes: &[u8]) -> Vec<u8> {
    let mut tags = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        tags.push(bytes[4]);
        bytes = &bytes[(4 + len).min(bytes.len())..];
    }
    tags
}

#[tokio::test]
async fn an_agent_saying_hello_on_the_socket_gets_no_control_and_cannot_forge_status() {
    let (redis, run, pod, sidecar) =
        pod_run("impostor", &[("impostor.py", IMPOSTOR.as_bytes())]).await;
    let script = "printf 'before\\n'; \
        python3 \"$SCRATCH/impostor.py\" \"$VOLUME/agentrun.sock\" \"$SCRATCH/got\" & \
        while [ ! -e \"$SCRATCH/got.sent\" ]; do sleep 0.02; done; \
        printf 'after\\n'; while :; do sleep 0.05; done";
    let mut agent = pod.spawn_agent(AGENT_USER, &["--stop-grace-seconds", "5"], script);

    // The real entrypoint's output is untouched, byte-exact.
    wait_for_output(&redis, &run, b"before\nafter\n").await;
    let got_path = pod.scratch().join("got");
    let impostor_got_control = || {
        let got = std::fs::read(&got_path).unwrap_or_default();
        frame_tags(&got).contains(&7)
    };

    // pause, resume and stop reach the real entrypoint, not the impostor.
    send_controls(&redis, &run, &[ControlMessage::new(ControlAction::Pause)]).await;
    let conn = redis.conn().await;
    wait_for("the pause to land somewhere", DEADLINE, || {
        let (mut conn, run) = (conn.clone(), run.clone());
        let stolen = impostor_got_control();
        async move {
            let paused = statuses(&mut conn, &run)
                .await
                .iter()
                .any(|s| s.reason.as_deref() == Some("Paused"));
            (paused || stolen).then_some(())
        }
    })
    .await;
    assert!(!impostor_got_control(), "the impostor was sent the pause");
    send_controls(
        &redis,
        &run,
        &[
            ControlMessage::new(ControlAction::Resume),
            ControlMessage::new(ControlAction::Stop),
        ],
    )
    .await;
    let (status, _) = exit_of(&mut agent, "the agent to stop").await;
    assert_eq!(status.code(), Some(143));

    // The refusals are in the run's status, once, and each is counted in the metrics.
    let refused = wait_for_status(&redis, &run, "the SocketClientRefused status", |s| {
        s.reason.as_deref() == Some("SocketClientRefused")
    })
    .await;
    assert!(
        refused
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("without the entrypoint's key"),
        "{refused:?}"
    );
    let port = sidecar.metrics_port;
    wait_for("the refusals in the metrics", DEADLINE, || async move {
        let m = http_get(port, "/metrics").await?;
        (metric_sum(&m, "agentrun_sidecar_socket_clients_refused_total") >= 20).then_some(())
    })
    .await;
    let got = std::fs::read(pod.scratch().join("got")).unwrap_or_default();
    assert!(
        !frame_tags(&got).contains(&7),
        "the impostor was sent control messages: frame tags {:?}",
        frame_tags(&got)
    );
    let mut conn = redis.conn().await;
    let all = statuses(&mut conn, &run).await;
    assert!(
        all.iter().all(|s| s.reason.as_deref() != Some("Forged")),
        "a forged status was published: {all:?}"
    );
    assert_eq!(
        all.iter()
            .filter(|s| s.reason.as_deref() == Some("SocketClientRefused"))
            .count(),
        1,
        "reported once: {all:?}"
    );
    let last = all.last().unwrap();
    assert_eq!(
        (last.state, last.reason.as_deref()),
        (RunState::Stopped, Some("Stopped"))
    );
    assert_eq!(
        concat(&read_all(&mut conn, &output_key(&run)).await),
        b"before\nafter\n"
    );
}

#[tokio::test]
async fn the_agent_finds_no_hand_off_key_and_cannot_read_the_entrypoints_memory() {
    let (redis, run, pod, _sidecar) = pod_run("handoff", &[]).await;
    // Before the agent container starts, the sidecar has left its key for the entrypoint:
    // readable by whatever user the agent container runs as, written by the sidecar's user.
    let meta = std::fs::metadata(pod.handoff()).expect("the hand-off file is there");
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert_eq!(meta.uid(), SIDECAR_USER.uid);
    // The agent looks for the key on the volume, and in its parent's (the entrypoint's)
    // memory and environment, as its own user may for a process of the same user.
    let script = r#"
if [ -e "$VOLUME/agentrun-entrypoint.key" ]; then echo "handoff: present"; else echo "handoff: absent"; fi
python3 - "$PPID" <<'EOF'
import sys
pid = sys.argv[1]
for what in ("mem", "environ"):
    try:
        with open("/proc/%s/%s" % (pid, what), "rb") as f:
            f.read(1)
        print("%s: readable" % what)
    except OSError:
        print("%s: denied" % what)
EOF
"#;
    let out = pod
        .agent(AGENT_USER, &[], script)
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout, "handoff: absent\nmem: denied\nenviron: denied\n",
        "entrypoint log: {stderr}"
    );
    // The entrypoint itself used the key: its output is in Redis, and nothing was refused.
    wait_for_output(
        &redis,
        &run,
        b"handoff: absent\nmem: denied\nenviron: denied\n",
    )
    .await;
    assert_nothing_refused(&redis, &run, "").await;
    assert!(!pod.handoff().exists());
}

/// Checks that the run's status reports no refused socket client (the entrypoint was never
/// refused); returns the status events. `log` is the entrypoint's, for the message.
async fn assert_nothing_refused(
    redis: &agentrun_protocol::testing::RedisServer,
    run: &agentrun_protocol::RunId,
    log: &str,
) -> Vec<agentrun_protocol::StatusEvent> {
    let all = statuses(&mut redis.conn().await, run).await;
    assert!(
        all.iter()
            .all(|s| s.reason.as_deref() != Some("SocketClientRefused")),
        "the entrypoint was refused: {all:?}; its log: {log}"
    );
    all
}

/// A spool file in the pre-authentication format: a data frame and a status event.
fn fake_spool() -> Vec<u8> {
    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut f = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        f.push(tag);
        f.extend_from_slice(body);
        f
    }
    let mut data = 1u64.to_be_bytes().to_vec(); // fseq
    data.push(0); // stdout
    data.extend_from_slice(&1u64.to_be_bytes());
    data.extend_from_slice(&agentrun_protocol::now_ms().to_be_bytes());
    data.extend_from_slice(b"FORGED OUTPUT\n");
    let mut event = Vec::new();
    for v in [2u64, 1, agentrun_protocol::now_ms()] {
        event.extend_from_slice(&v.to_be_bytes());
    }
    event.extend_from_slice(br#"{"state":"succeeded","reason":"Forged"}"#);
    let mut spool = frame(2, &data);
    spool.extend(frame(3, &event));
    spool
}

#[tokio::test]
async fn a_fake_spool_dropped_by_the_agent_is_not_published_and_is_reported() {
    let (redis, run, pod, mut sidecar) =
        pod_run("fake-spool", &[("fake.bin", &fake_spool())]).await;
    let out = pod
        .agent(
            AGENT_USER,
            &[],
            "cp \"$SCRATCH/fake.bin\" \"$VOLUME/agentrun-spool-ep-fake.bin\"; echo dropped",
        )
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fake = pod.volume().join("agentrun-spool-ep-fake.bin");
    assert!(fake.exists());
    // The sidecar adopts the spools it finds when it shuts down (and when it starts).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sidecar.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    exit_of(&mut sidecar.child, "the sidecar to exit").await;
    let mut conn = redis.conn().await;
    assert_eq!(
        concat(&read_all(&mut conn, &output_key(&run)).await),
        b"dropped\n",
        "only the entrypoint's output is published"
    );
    let all = statuses(&mut conn, &run).await;
    assert!(
        all.iter().all(|s| s.reason.as_deref() != Some("Forged")),
        "{all:?}"
    );
    let reported: Vec<_> = all
        .iter()
        .filter(|s| s.reason.as_deref() == Some("SpoolRefused"))
        .collect();
    assert_eq!(reported.len(), 1, "reported once: {all:?}");
    assert!(
        reported[0]
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("agentrun-spool-ep-fake.bin"),
        "{reported:?}"
    );
    assert!(fake.exists(), "the refused spool is left in place");
    let last = all
        .iter()
        .rfind(|s| s.reason.as_deref() != Some("SpoolRefused"))
        .unwrap();
    assert_eq!(last.state, RunState::Succeeded, "{all:?}");
}

#[tokio::test]
async fn a_sidecar_killed_and_restarted_is_rejoined_by_the_running_entrypoint_and_nothing_is_lost()
{
    let (redis, run, pod, mut sidecar) = pod_run("rejoin", &[]).await;
    let count = 400;
    let script = format!(
        "i=0; while [ $i -lt {count} ]; do echo line-$i; i=$((i+1)); \
         [ $i -eq 100 ] && while [ ! -e \"$SCRATCH/go\" ]; do sleep 0.02; done; \
         sleep 0.005; done"
    );
    let mut agent = pod.spawn_agent(AGENT_USER, &[], &script);
    let expected: Vec<u8> = (0..count)
        .flat_map(|i| format!("line-{i}\n").into_bytes())
        .collect();
    let first_hundred: Vec<u8> = (0..100)
        .flat_map(|i| format!("line-{i}\n").into_bytes())
        .collect();
    wait_for_output(&redis, &run, &first_hundred).await;
    // kill -9: nothing is flushed, and the next sidecar finds its key in its state volume.
    sidecar.child.kill().unwrap();
    sidecar.child.wait().unwrap();
    std::fs::write(pod.scratch().join("go"), "").unwrap();
    let _sidecar = pod.start_sidecar(&redis, &run).await;
    assert!(
        !pod.handoff().exists(),
        "a restarted sidecar never hands a key out again"
    );
    let (status, stderr) = exit_of(&mut agent, "the agent to finish").await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    wait_for_output(&redis, &run, &expected).await;
    let all = assert_nothing_refused(&redis, &run, &stderr).await;
    assert_eq!(
        all.last().map(|s| s.state),
        Some(RunState::Succeeded),
        "{all:?}"
    );
}

/// The squatter: puts a socket of its own where the sidecar's is, and writes down every byte
/// a client sends it (`OUT`), one more line in `OUT.accepted` per connection, and that it is
/// there (`OUT.ready`).
const SQUATTER: &str = r#"
import os, socket, sys
path, out = sys.argv[1], sys.argv[2]
os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o666)
s.listen(16)
open(out + '.ready', 'w').close()
while True:
    c, _ = s.accept()
    with open(out + '.accepted', 'a') as f:
        f.write('x\n')
    c.settimeout(1)
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            with open(out, 'ab') as f:
                f.write(d)
    except OSError:
        pass
    c.close()
"#;

#[tokio::test]
async fn an_agent_that_puts_its_own_socket_in_the_sidecars_place_gets_neither_key_nor_output() {
    let (redis, run, pod, mut sidecar) =
        pod_run("squatter", &[("squat.py", SQUATTER.as_bytes())]).await;
    let script = "printf 'before\\n'; \
        python3 \"$SCRATCH/squat.py\" \"$VOLUME/agentrun.sock\" \"$SCRATCH/got\" & \
        while [ ! -e \"$SCRATCH/got.ready\" ]; do sleep 0.02; done; printf 'during\\n'; \
        while [ ! -e \"$SCRATCH/go\" ]; do sleep 0.02; done; printf 'after\\n'; \
        while :; do sleep 0.05; done";
    let mut agent = pod.spawn_agent(AGENT_USER, &["--stop-grace-seconds", "5"], script);
    // The connection the entrypoint has is the sidecar's, whatever the path now holds.
    wait_for_output(&redis, &run, b"before\nduring\n").await;
    // The sidecar goes away: the entrypoint reconnects, and finds the squatter's socket.
    sidecar.child.kill().unwrap();
    sidecar.child.wait().unwrap();
    let accepted = pod.scratch().join("got.accepted");
    wait_for(
        "the entrypoint to try the squatter's socket",
        DEADLINE,
        || {
            let tries = std::fs::read_to_string(&accepted)
                .unwrap_or_default()
                .lines()
                .count();
            async move { (tries >= 3).then_some(()) }
        },
    )
    .await;
    std::fs::write(pod.scratch().join("go"), "").unwrap();
    let got = std::fs::read(pod.scratch().join("got")).unwrap_or_default();
    assert!(
        got.is_empty(),
        "the squatter was sent {} bytes: frame tags {:?}",
        got.len(),
        frame_tags(&got)
    );
    // A new sidecar takes its path back; the entrypoint delivers what waited.
    let _sidecar = pod.start_sidecar(&redis, &run).await;
    wait_for_output(&redis, &run, b"before\nduring\nafter\n").await;
    let got = std::fs::read(pod.scratch().join("got")).unwrap_or_default();
    assert!(got.is_empty(), "the squatter was sent {} bytes", got.len());
    let (status, stderr) = stop_agent(&redis, &run, &mut agent).await;
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(
        stderr.contains(&format!("is served by uid {}", AGENT_USER.uid))
            && stderr.contains(&format!("uid {}", SIDECAR_USER.uid)),
        "the entrypoint says why it did not use that socket: {stderr}"
    );
}

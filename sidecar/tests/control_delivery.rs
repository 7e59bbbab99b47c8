//! Control messages are applied once each, or refused with a report; never dropped silently.

mod common;

use agentrun_protocol::testing::{ChildGuard, RedisServer, dying_with_test, wait_for};
use agentrun_protocol::{ControlAction, ControlMessage, RunId, StatusEvent, StreamName};
use common::pod::{http_get, metric_sum, wait_for_status};
use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;

/// A run's Redis and a directory for its socket and the agent's files.
struct Setup {
    redis: RedisServer,
    run: RunId,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        Setup {
            redis: RedisServer::start(),
            run: run_id(tag),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

fn stdin(data: String) -> ControlMessage {
    let mut m = ControlMessage::new(ControlAction::Stdin);
    m.data = Some(data);
    m
}

/// The entrypoint wrapping `script`, connected to the sidecar on `socket`.
fn entrypoint(socket: &Path, script: &str, env: &[(&str, &str)]) -> ChildGuard {
    let mut cmd = dying_with_test(ENTRYPOINT);
    cmd.arg("--socket")
        .arg(socket)
        .args([
            "--no-tee",
            "--stop-grace-seconds",
            "2",
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    ChildGuard::spawn(&mut cmd)
}

/// The lines of a file (none while it is missing).
fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until the file holds exactly the lines `want`; it must never hold anything else.
async fn wait_for_lines(path: &Path, want: &[String], what: &str) {
    wait_for(what, DEADLINE, || {
        let got = lines_of(path);
        assert!(want.starts_with(&got), "{got:?}");
        let done = got.len() == want.len();
        async move { done.then_some(()) }
    })
    .await;
}

/// Control seqs named in a refusal report: `(control seq 3-5, 9; 4096 bytes)`.
fn refused_seqs(event: &StatusEvent) -> Vec<u64> {
    let message = event.message.as_deref().unwrap_or_default();
    let start = message
        .find("(control seq ")
        .unwrap_or_else(|| panic!("no seqs in {message:?}"))
        + "(control seq ".len();
    let list = &message[start..start + message[start..].find(';').unwrap()];
    let mut seqs = Vec::new();
    for part in list.split(", ") {
        match part.split_once('-') {
            Some((a, b)) => seqs.extend(a.parse::<u64>().unwrap()..=b.parse::<u64>().unwrap()),
            None => seqs.push(part.parse().unwrap()),
        }
    }
    seqs
}

/// The run's `StdinRefused` reports.
async fn stdin_refusals(conn: &mut agentrun_protocol::RedisConn, run: &RunId) -> Vec<StatusEvent> {
    statuses(conn, run)
        .await
        .into_iter()
        .filter(|s| s.reason.as_deref() == Some("StdinRefused"))
        .collect()
}

/// The `N` of "refused N stdin message(s)".
fn refused_count(event: &StatusEvent) -> u64 {
    let message = event.message.as_deref().unwrap_or_default();
    message
        .strip_prefix("refused ")
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {message:?}"))
}

#[tokio::test]
async fn stdin_for_an_agent_that_never_reads_it_is_refused_with_a_report_and_none_is_lost_or_doubled()
 {
    let t = Setup::new("stdin-flood");
    let (redis, run) = (&t.redis, &t.run);
    let (socket, go, received) = (t.path("agentrun.sock"), t.path("go"), t.path("received"));
    let _sidecar = serve(redis, run, &socket);
    wait_for_socket(&socket).await;
    // The agent reads nothing until told to, then everything that reached its stdin.
    let script = format!(
        "echo started; while [ ! -e {go} ]; do sleep 0.05; done; exec cat > {received}",
        go = go.display(),
        received = received.display()
    );
    let mut agent = entrypoint(&socket, &script, &[("AGENTRUN_STDIN_BUFFER_KIB", "64")]);
    let conn = redis.conn().await;
    wait_for("the agent to run", DEADLINE, || {
        let mut c = conn.clone();
        let k = output_key(run);
        async move { (!read_all(&mut c, &k).await.is_empty()).then_some(()) }
    })
    .await;

    // 1,000 lines of 1 KiB: far more than the pipe (64 KiB) and the entrypoint's budget hold.
    let count = 1000u64;
    let msgs: Vec<ControlMessage> = (1..=count)
        .map(|i| stdin(format!("{i:04}-{}", "x".repeat(1019))))
        .collect();
    let seqs = send_controls(redis, run, &msgs).await;
    assert_eq!(seqs, (1..=count).collect::<Vec<_>>());
    // The entrypoint has every one of them: the sidecar records it.
    wait_for("every stdin message handed over", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move { (control_marker(&mut c, &r).await == count).then_some(()) }
    })
    .await;
    let reports = wait_for("the refusals reported", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move {
            let reports = stdin_refusals(&mut c, &r).await;
            (!reports.is_empty()).then_some(reports)
        }
    })
    .await;
    assert!(
        reports[0]
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("not read"),
        "says why: {reports:?}"
    );

    // Once the agent reads, it gets exactly the lines that were not refused, once each.
    std::fs::write(&go, "").unwrap();
    let (refused, got) = wait_for("every line accounted for", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        let received = received.clone();
        async move {
            let refused: Vec<u64> = stdin_refusals(&mut c, &r)
                .await
                .iter()
                .flat_map(|s| {
                    let seqs = refused_seqs(s);
                    assert_eq!(seqs.len() as u64, refused_count(s), "{s:?}");
                    seqs
                })
                .collect();
            let got: Vec<u64> = lines_of(&received)
                .iter()
                .map(|l| l[..4].parse().unwrap())
                .collect();
            (refused.len() + got.len() == count as usize).then_some((refused, got))
        }
    })
    .await;
    let refused_set: BTreeSet<u64> = refused.iter().copied().collect();
    assert_eq!(
        refused_set.len(),
        refused.len(),
        "refused twice: {refused:?}"
    );
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "lines arrive in order, once each"
    );
    assert!(got.iter().all(|s| !refused_set.contains(s)));
    assert!(refused.len() > 500, "most were refused: {}", refused.len());
    for line in lines_of(&received) {
        assert_eq!(line.len(), 1024, "a whole line: {line:?}");
    }
    stop_agent(redis, run, &mut agent).await;
}

/// `cat`, reading everything it is sent into `received`.
fn reader_script(received: &Path) -> String {
    format!("echo started; exec cat > {}", received.display())
}

#[tokio::test]
async fn control_sent_while_no_entrypoint_is_connected_is_applied_once_it_connects() {
    let t = Setup::new("control-waits");
    let (redis, run) = (&t.redis, &t.run);
    let (socket, received) = (t.path("agentrun.sock"), t.path("received"));
    let port = agentrun_protocol::testing::free_port();
    let _sidecar = serve_on(redis, run, &socket, port);
    wait_for_socket(&socket).await;
    // More than the sidecar keeps in memory for an entrypoint that is not there.
    let count = 200u64;
    let msgs: Vec<ControlMessage> = (1..=count).map(|i| stdin(format!("m-{i:03}"))).collect();
    send_controls(redis, run, &msgs).await;
    let mut conn = redis.conn().await;
    wait_for("the sidecar to take what it can", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move {
            let m = http_get(port, "/metrics").await?;
            let held = metric_sum(&m, "agentrun_sidecar_control_pending") > 0;
            (held || control_marker(&mut c, &r).await > 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        control_marker(&mut conn, run).await,
        0,
        "nothing is recorded as applied before an entrypoint has it"
    );

    let mut agent = entrypoint(&socket, &reader_script(&received), &[]);
    let want: Vec<String> = (1..=count).map(|i| format!("m-{i:03}")).collect();
    wait_for_lines(&received, &want, "every line, in order, once").await;
    wait_for("the marker at the last message", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move { (control_marker(&mut c, &r).await == count).then_some(()) }
    })
    .await;
    stop_agent(redis, run, &mut agent).await;
}

#[tokio::test]
async fn control_trimmed_from_the_stream_before_it_could_be_delivered_is_reported() {
    let t = Setup::new("control-trimmed");
    let (redis, run) = (&t.redis, &t.run);
    let (socket, received) = (t.path("agentrun.sock"), t.path("received"));
    let msgs: Vec<ControlMessage> = (1..=100).map(|i| stdin(format!("m-{i:03}"))).collect();
    send_controls(redis, run, &msgs).await;
    // The control stream's cap (the relay's MAXLEN) keeps only the newest 10.
    let mut conn = redis.conn().await;
    let _: u64 = redis::cmd("XTRIM")
        .arg(StreamName::Control.key(run))
        .arg("MAXLEN")
        .arg(10)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _sidecar = serve(redis, run, &socket);
    wait_for_socket(&socket).await;
    let mut agent = entrypoint(&socket, &reader_script(&received), &[]);
    let want: Vec<String> = (91..=100).map(|i| format!("m-{i:03}")).collect();
    wait_for_lines(&received, &want, "the lines still in the stream").await;
    let report = wait_for_status(redis, run, "the ControlTrimmed report", |s| {
        s.reason.as_deref() == Some("ControlTrimmed")
    })
    .await;
    let message = report.message.unwrap_or_default();
    assert!(
        message.contains("90 control message") && message.contains("1-90"),
        "{message}"
    );
    stop_agent(redis, run, &mut agent).await;
}

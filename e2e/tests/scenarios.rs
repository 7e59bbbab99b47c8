//! End-to-end scenarios: the user's path from `kubectl apply` to the relay's SSE stream, with
//! the real operator, sidecar, entrypoint and relay binaries, a real Redis, and kube-sim (or the
//! cluster of `E2E_KUBECONFIG`, see e2e/README.md).

#[path = "common/browser.rs"]
mod browser;
mod common;
#[path = "common/stack.rs"]
mod stack;

use serde::Deserialize as _;
use serde_json::{Value, json};
use stack::{OperatorOptions, Stack, StackOptions, example_script, run_sh};

/// `kubectl apply`s manifests/examples/hello.yaml (the CRDs are in already) and waits until it
/// succeeded: its run id, the AgentRun then, and what its agent writes (run on the host
/// alongside).
async fn hello_succeeds(s: &Stack) -> (String, Value, Vec<u8>) {
    let out = s.apply_example("manifests/examples/hello.yaml");
    assert!(out.contains("agentrun.dev/hello created"), "{out}");
    let expected =
        tokio::task::spawn_blocking(|| run_sh(&example_script("manifests/examples/hello.yaml")));
    let run_id = s.run_id("hello").await;
    let done = s
        .wait_phase("hello", &["Succeeded", "Failed", "Stopped"], 45)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    let expected = expected.await.expect("host run");
    assert!(expected.len() > 40, "the example writes a sentence");
    (run_id, done, expected)
}

#[tokio::test(flavor = "multi_thread")]
async fn install_and_hello_streams_byte_exact_output() {
    let s = Stack::start().await;
    let (run_id, done, expected) = hello_succeeds(&s).await;
    assert_eq!(done["status"]["variationsDone"], "1/1", "{done:#}");
    assert_eq!(done["status"]["variations"][0]["exitCode"], 0, "{done:#}");

    // The printer columns.
    let table = s.kubectl_ok(&["get", "ar"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    for col in ["NAME", "PHASE", "VARIATIONS", "AGE"] {
        assert!(header.contains(&col), "column {col} in:\n{table}");
    }
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("hello") && row.contains("Succeeded") && row.contains("1/1"),
        "{table}"
    );
    let wide = s.kubectl_ok(&["get", "ar", "hello", "-o", "wide"]);
    assert!(wide.contains("DURATION") && wide.contains("URL"), "{wide}");
    assert!(
        wide.contains(&format!("{}/runs/{run_id}", s.relay_url)),
        "the URL column links the relay's run page:\n{wide}"
    );

    let sse = s.sse(&run_id, 20).await;
    let end = sse.end().expect("end");
    assert_eq!(end["phase"], "succeeded", "{end}");
    assert_eq!(end["finished"], true, "{end}");
    let output = sse.output();
    assert_eq!(
        output.keys().collect::<Vec<_>>(),
        vec!["default"],
        "one variation, `default`"
    );
    assert_eq!(
        String::from_utf8_lossy(&output["default"]),
        String::from_utf8_lossy(&expected),
        "the output through the relay is what the agent wrote"
    );
    assert_eq!(output["default"], expected, "byte for byte");
    // seq is contiguous from 1 in the output stream.
    let seqs: Vec<u64> = sse.seqs("output").into_iter().map(|(_, q)| q).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn three_variations_run_as_three_pods_side_by_side() {
    let s = Stack::start().await;
    s.apply_example("manifests/examples/variations.yaml");
    let run_id = s.run_id("hello-variations").await;
    // All three pods exist at once (parallelism 3), one per variation.
    let names = s
        .eventually(30, "three variation pods", || async {
            let mut names: Vec<String> = s
                .pods()
                .await
                .iter()
                .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
                .collect();
            names.sort();
            (names.len() == 3).then_some(names)
        })
        .await;
    assert_eq!(
        names,
        [
            "hello-variations-custom-args",
            "hello-variations-plain",
            "hello-variations-shouty"
        ]
    );
    let done = s
        .wait_phase("hello-variations", &["Succeeded", "Failed", "Stopped"], 50)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    assert_eq!(done["status"]["variationsDone"], "3/3", "{done:#}");

    let sse = s.sse(&run_id, 20).await;
    let out = sse.output();
    let steps = |style: &str| {
        let mut t = format!("style: {style}\n");
        for i in 1..=5 {
            t.push_str(&format!("[{style}] step {i}\n"));
        }
        t
    };
    let text = |v: &str| String::from_utf8_lossy(out.get(v).map(Vec::as_slice).unwrap_or(b""));
    assert_eq!(text("plain"), steps("plain"));
    assert_eq!(text("shouty"), steps("SHOUTY"));
    assert_eq!(
        text("custom-args"),
        "this variation replaces the args\ndone\n"
    );
    assert_eq!(out.len(), 3, "{:?}", out.keys());

    // Side by side: the variations' output overlaps in time (each takes several seconds).
    let span = |v: &str| {
        let ts: Vec<u64> = sse
            .events
            .iter()
            .filter(|(_, d)| d["channel"] == "output" && d["variation"] == v)
            .filter_map(|(_, d)| d["ts"].as_u64())
            .collect();
        (*ts.iter().min().expect("ts"), *ts.iter().max().expect("ts"))
    };
    let (p0, p1) = span("plain");
    let (s0, s1) = span("shouty");
    assert!(
        p0 < s1 && s0 < p1,
        "plain {p0}..{p1} and shouty {s0}..{s1} ran at the same time"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_agent_fails_with_its_exit_code() {
    let s = Stack::start().await;
    s.apply_example("manifests/examples/failing.yaml");
    let run_id = s.run_id("failing").await;
    let done = s
        .wait_phase("failing", &["Succeeded", "Failed", "Stopped"], 40)
        .await;
    assert_eq!(done["status"]["phase"], "Failed", "{done:#}");
    let var = &done["status"]["variations"][0];
    assert_eq!(var["exitCode"], 3, "{done:#}");
    assert_eq!(var["reason"], "Error", "{done:#}");
    let sse = s.sse(&run_id, 20).await;
    assert_eq!(sse.end().expect("end")["phase"], "failed");
    assert_eq!(
        String::from_utf8_lossy(&sse.output()["default"]),
        "starting the task\n"
    );
    let logs = sse.channel_bytes("logs");
    let logs = String::from_utf8_lossy(logs.get("default").map(Vec::as_slice).unwrap_or(b""));
    assert!(
        logs.contains("error: the task could not finish (simulated)"),
        "stderr reaches the logs stream: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_fails_the_run_with_reason_timeout_and_kills_the_agent() {
    let s = Stack::start().await;
    s.apply_example("manifests/examples/timeout.yaml");
    let run_id = s.run_id("timeout").await;
    let started = std::time::Instant::now();
    let done = s
        .wait_phase("timeout", &["Succeeded", "Failed", "Stopped"], 50)
        .await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(45),
        "timeoutSeconds is 20"
    );
    assert!(
        matches!(done["status"]["phase"].as_str(), Some("Failed" | "Stopped")),
        "{done:#}"
    );
    let var = &done["status"]["variations"][0];
    assert_eq!(var["reason"], "Timeout", "{done:#}");
    // The agent is killed: its pod's agent container terminates (kube-sim reports that only
    // once the process is gone) or the pod itself goes.
    s.eventually(30, "the agent process is gone", || async {
        let pods = s.pods().await;
        let Some(p) = pods
            .iter()
            .find(|p| p["metadata"]["name"] == "timeout-default")
        else {
            return Some(());
        };
        let agent = p["status"]["containerStatuses"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "agent")?;
        agent["state"]["terminated"].is_object().then_some(())
    })
    .await;
    let sse = s.sse(&run_id, 20).await;
    let out = String::from_utf8_lossy(&sse.output()["default"]).into_owned();
    assert!(out.starts_with("still working (0 s)\n"), "{out}");
    let lines = out.lines().count();
    assert!(
        (5..=40).contains(&lines),
        "about 20 s of output, then nothing: {lines} lines"
    );
}

/// A run whose agent prints `tick N` five times a second for a minute.
fn ticker(name: &str) -> String {
    marked_ticker(name, "")
}

/// [`ticker`] whose script starts with the line `marker` (a shell comment), so that the agent's
/// process can be found by its command line ([`agent_pid`]).
fn marked_ticker(name: &str, marker: &str) -> String {
    marked_counter(name, marker, 300, "0.2")
}

/// The host process of an agent running `sh -c SCRIPT` where SCRIPT starts with `marker`
/// (kube-sim runs containers as host processes; the entrypoint and kubelet wrappers that carry
/// the script as an argument further along are not it).
fn agent_pid(marker: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() >= 3
            && args[0].ends_with(b"sh")
            && args[1] == b"-c"
            && args[2].starts_with(marker.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

/// The `Uid:`, `Gid:`, `Groups:`, `CapEff:` and `NoNewPrivs:` lines of a process, first
/// values only (real uid and gid), e.g. `{"Uid": "65532", "Groups": "65532", ...}`.
fn process_identity(pid: i32) -> std::collections::BTreeMap<String, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| ["Uid", "Gid", "Groups", "CapEff", "NoNewPrivs"].contains(k))
        .map(|(k, v)| {
            let v = v.trim();
            let v = if k == "Groups" {
                v
            } else {
                v.split_whitespace().next().unwrap_or_default()
            };
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Where the sidecar keeps the key it handed to the entrypoint: its own `emptyDir`
/// (`agentrun-sidecar-state`, at `AGENTRUN_STATE_DIR`), mounted in the sidecar container only.
const SIDECAR_KEY: &str = "/var/run/agentrun-sidecar/sidecar.key";
/// The one-time hand-off file on the shared volume, removed by the entrypoint before the agent
/// starts.
const HANDOFF_KEY: &str = "/agentrun/agentrun-entrypoint.key";

/// The stdout of the shell `script` run in the mount namespace of the container whose process
/// is `pid`, so that its volumes are there and symlinks such as `/var/run` resolve as they do
/// for it (through `/proc/PID/root` an absolute symlink would resolve on the host). Its stderr
/// goes to the test's.
fn in_container(pid: i32, script: &str) -> String {
    let out = std::process::Command::new("nsenter")
        .args([
            "--target",
            &pid.to_string(),
            "--mount",
            "--",
            "sh",
            "-c",
            script,
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `path` exists for the container whose process is `pid`: `yes` or `no`, and a newline.
fn exists_in_container(pid: i32, path: &str) -> String {
    in_container(
        pid,
        &format!("if [ -e '{path}' ]; then echo yes; else echo no; fi"),
    )
}

/// The `State:` letter of a process (`T` when stopped by SIGSTOP), if it still exists.
fn process_state(pid: u32) -> Option<char> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .and_then(|v| v.trim().chars().next())
}

impl Stack {
    /// Entries in the run's output stream of one variation.
    async fn output_len(&self, run_id: &str, variation: &str) -> u64 {
        let mut c = self.redis_conn().await;
        redis::cmd("XLEN")
            .arg(format!("run:{{{run_id}}}:output:{variation}"))
            .query_async(&mut c)
            .await
            .unwrap_or(0)
    }

    /// Waits until the output stream has more than `n` entries.
    async fn output_grows_past(&self, run_id: &str, n: u64, secs: u64) -> u64 {
        self.eventually(secs, &format!("output beyond {n} entries"), || async {
            let len = self.output_len(run_id, "default").await;
            (len > n).then_some(len)
        })
        .await
    }

    /// Waits until the output stream stops growing (unchanged for 1.5 s); returns its length.
    async fn output_settles(&self, run_id: &str, secs: u64) -> u64 {
        let last = std::cell::Cell::new((u64::MAX, std::time::Instant::now()));
        let last = &last;
        self.eventually(secs, "the output stops growing", || async move {
            let now = std::time::Instant::now();
            let len = self.output_len(run_id, "default").await;
            let (prev, since) = last.get();
            if len != prev {
                last.set((len, now));
                return None;
            }
            (now.duration_since(since) >= std::time::Duration::from_millis(1500)).then_some(len)
        })
        .await
    }

    /// The latest status event of a variation in the run's state hash (`var:NAME`).
    async fn variation_state(&self, run_id: &str, variation: &str) -> Option<Value> {
        let mut c = self.redis_conn().await;
        let v: Option<String> = redis::cmd("HGET")
            .arg(format!("run:{{{run_id}}}:state"))
            .arg(format!("var:{variation}"))
            .query_async(&mut c)
            .await
            .ok()?;
        serde_json::from_str(&v?).ok()
    }

    /// Waits until the state hash says the variation is in `state`.
    async fn wait_variation_state(&self, run_id: &str, state: &str) -> Value {
        self.eventually(20, &format!("var:default in state {state}"), || async {
            let v = self.variation_state(run_id, "default").await?;
            (v["state"] == state).then_some(v)
        })
        .await
    }

    /// On kube-sim, waits until the agent process (found by `marker`) is stopped (`T`) or
    /// running again; returns its pid. Elsewhere the process is not on this machine: `None`.
    async fn wait_agent_stopped(&self, marker: &str, stopped: bool) -> Option<u32> {
        if !self.cluster.is_sim() {
            return None;
        }
        let what = if stopped {
            "the agent process stopped (State T)"
        } else {
            "the agent process running again"
        };
        Some(
            self.eventually(15, what, || async {
                let pid = agent_pid(marker)?;
                let st = process_state(pid)?;
                ((st == 'T') == stopped).then_some(pid)
            })
            .await,
        )
    }

    /// Asserts that the output does not grow for a second (polled, not slept): paused for real.
    async fn assert_output_held(&self, run_id: &str, held: u64) {
        let check = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while std::time::Instant::now() < check {
            assert_eq!(self.output_len(run_id, "default").await, held, "paused");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Stops the run through the relay; checks that the entrypoint reported the stop, the
    /// run ended Stopped long before its end, and every tick arrived exactly once, in order.
    async fn stop_through_the_relay(&self, name: &str, run_id: &str) {
        let (code, body) = self.control(run_id, json!({"action": "stop"})).await;
        assert_eq!(code, 202, "{body}");
        let done = self
            .wait_phase(name, &["Succeeded", "Failed", "Stopped"], 30)
            .await;
        let sse = self.sse(run_id, 20).await;
        let statuses = sse.statuses();
        assert!(
            statuses
                .iter()
                .any(|e| e["state"] == "stopped" && e["reason"] == "Stopped"),
            "the entrypoint reports the stop: {statuses:#?}"
        );
        // The entrypoint's termination message ("agentrun: stopped") tells the operator.
        assert_eq!(done["status"]["phase"], "Stopped", "{done:#}");
        let out = String::from_utf8_lossy(&sse.output()["default"]).into_owned();
        let ticks: Vec<&str> = out.lines().collect();
        assert!(
            ticks.len() < 250,
            "stopped long before the end: {}",
            ticks.len()
        );
        // Nothing lost or repeated across pause and resume.
        for (i, line) in ticks.iter().enumerate() {
            assert_eq!(*line, format!("tick {i}"));
        }
    }

    /// Starts a [`marked_ticker`] run and waits for its first ticks; returns its run id and the
    /// marker that finds its agent process.
    async fn start_ticker(&self, name: &str) -> (String, String) {
        let marker = format!("# e2e agent in {}", self.ns());
        self.apply_yaml("ticker.yaml", &marked_ticker(name, &marker));
        let run_id = self.run_id(name).await;
        self.wait_phase(name, &["Running"], 30).await;
        self.output_grows_past(&run_id, 3, 20).await;
        (run_id, marker)
    }

    /// `kubectl patch` of `spec.paused`.
    fn set_paused(&self, name: &str, paused: bool) {
        let patch = json!({"spec": {"paused": paused}}).to_string();
        self.kubectl_ok(&["patch", "ar", name, "--type", "merge", "-p", &patch]);
    }

    async fn wait_status_paused(&self, name: &str, paused: bool) -> Value {
        let api = self.agentruns().await;
        self.eventually(20, &format!("{name} status.paused = {paused}"), || {
            let api = api.clone();
            async move {
                let v = serde_json::to_value(api.get_opt(name).await.ok()??).ok()?;
                (v["status"]["paused"] == paused).then_some(v)
            }
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn paused_in_the_spec_pauses_and_resumes_and_relay_stop_stops() {
    let s = Stack::start().await;
    let (run_id, marker) = s.start_ticker("ticker").await;

    // paused: true stops the agent and its output; the status says so.
    s.set_paused("ticker", true);
    s.wait_status_paused("ticker", true).await;
    s.wait_agent_stopped(&marker, true).await;
    let held = s.output_settles(&run_id, 15).await;
    s.assert_output_held(&run_id, held).await;
    let v = s.agentrun("ticker").await.expect("ticker");
    assert_eq!(
        v["status"]["phase"], "Running",
        "a paused run is still running: {v:#}"
    );

    // paused: false resumes it.
    s.set_paused("ticker", false);
    s.wait_status_paused("ticker", false).await;
    s.wait_agent_stopped(&marker, false).await;
    s.output_grows_past(&run_id, held + 2, 15).await;

    s.stop_through_the_relay("ticker", &run_id).await;
    // A control message to an unknown run is refused.
    let (code, _) = s.control("nosuchrun", json!({"action": "stop"})).await;
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn control_from_the_relay_pauses_resumes_and_stops_the_agent() {
    let s = Stack::start().await;
    let (run_id, marker) = s.start_ticker("remote").await;
    if s.cluster.is_sim() {
        let pid = agent_pid(&marker).expect("the agent's sh process on this host");
        assert_ne!(
            process_state(pid),
            Some('T'),
            "not stopped before the pause"
        );
    }

    // pause through the relay: the entrypoint SIGSTOPs the agent and says so.
    let (code, body) = s.control(&run_id, json!({"action": "pause"})).await;
    assert_eq!(code, 202, "{body}");
    let pid = s.wait_agent_stopped(&marker, true).await;
    let paused = s.wait_variation_state(&run_id, "paused").await;
    assert_eq!(paused["reason"], "Paused", "{paused}");
    let held = s.output_settles(&run_id, 15).await;
    s.assert_output_held(&run_id, held).await;
    if let Some(pid) = pid {
        assert_eq!(process_state(pid), Some('T'), "still stopped");
    }
    let v = s.agentrun("remote").await.expect("remote");
    assert_eq!(v["status"]["phase"], "Running", "{v:#}");

    // resume through the relay: the same process goes on where it stopped.
    let (code, body) = s.control(&run_id, json!({"action": "resume"})).await;
    assert_eq!(code, 202, "{body}");
    let resumed = s.wait_agent_stopped(&marker, false).await;
    assert_eq!(resumed, pid, "the same agent process, continued");
    let running = s.wait_variation_state(&run_id, "running").await;
    assert_eq!(running["reason"], "Resumed", "{running}");
    s.output_grows_past(&run_id, held + 2, 15).await;

    s.stop_through_the_relay("remote", &run_id).await;
    if let Some(pid) = pid {
        s.eventually(20, "the agent process is gone", || async {
            process_state(pid).is_none_or(|st| st == 'Z').then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_shows_the_live_output_of_a_run_on_the_cluster() {
    let s = Stack::start().await;
    // The agent waits for a word on its stdin (sent through the relay once the page shows its
    // first line), so what it writes next is written after the page loaded.
    s.apply_yaml(
        "waiter.yaml",
        r#"apiVersion: agentrun.dev/v1alpha1
kind: AgentRun
metadata:
  name: waiter
spec:
  image: busybox:1.36
  command: ["sh", "-c"]
  args:
    - |
      echo "waiting for the browser"
      read -r word
      echo "the browser saw: $word"
      for i in 1 2 3; do echo "after $i"; sleep 0.2; done
  timeoutSeconds: 120
"#,
    );
    let run_id = s.run_id("waiter").await;
    // The page a user opens: the URL column of `kubectl get ar -o wide` (status.url).
    let v = s
        .eventually(30, "status.url", || async {
            let v = s.agentrun("waiter").await?;
            v["status"]["url"].as_str().map(str::to_string)
        })
        .await;
    assert_eq!(v, format!("{}/runs/{run_id}", s.relay_url));
    let wide = s.kubectl_ok(&["get", "ar", "waiter", "-o", "wide"]);
    assert!(wide.contains(&v), "kubectl shows the page: {wide}");
    s.wait_phase("waiter", &["Running"], 30).await;

    let word = format!("w{}", std::process::id());
    let after = format!("the browser saw: {word}");
    let mut page = browser::RunPage::open(
        &v,
        "default",
        "waiting for the browser",
        &after,
        s.dir.path(),
    );
    let loaded = page.next("loaded", 60).await;
    assert!(
        !loaded["text"].as_str().unwrap_or_default().contains(&word),
        "{loaded}"
    );
    let phase = s.agentrun("waiter").await.expect("waiter")["status"]["phase"].clone();
    assert_eq!(
        phase, "Running",
        "the agent still runs while the page is open"
    );

    let (code, body) = s
        .control(&run_id, json!({"action": "stdin", "data": word}))
        .await;
    assert_eq!(code, 202, "{body}");
    page.next("live", 40).await;
    let ended = page.next("ended", 40).await;
    assert_eq!(ended["badge"], "succeeded", "{ended}");
    assert_eq!(
        ended["text"],
        format!("waiting for the browser\n{after}\nafter 1\nafter 2\nafter 3\n"),
        "the page shows every line once, in order"
    );
    assert_eq!(ended["errors"], json!([]), "no page errors");
    assert_eq!(ended["csp"], json!([]), "no CSP violations");
    page.close().await;
    let done = s
        .wait_phase("waiter", &["Succeeded", "Failed", "Stopped"], 30)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
}

/// A run whose agent prints `tick 0` .. `tick {n-1}`, `every` seconds apart.
fn counter(name: &str, n: u32, every: &str) -> String {
    marked_counter(name, "", n, every)
}

/// [`counter`] whose script starts with the line `marker` (empty, or a shell comment).
fn marked_counter(name: &str, marker: &str, n: u32, every: &str) -> String {
    format!(
        r#"apiVersion: agentrun.dev/v1alpha1
kind: AgentRun
metadata:
  name: {name}
spec:
  image: busybox:1.36
  command: ["sh", "-c"]
  args:
    - |
      {marker}
      i=0
      while [ "$i" -lt {n} ]; do echo "tick $i"; i=$((i + 1)); sleep {every}; done
  timeoutSeconds: 120
"#
    )
}

/// The output is exactly `tick 0` .. `tick {n-1}`: nothing lost, nothing repeated.
fn assert_ticks(out: &[u8], n: u32) {
    let text = String::from_utf8_lossy(out);
    let expected: String = (0..n).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(text, expected, "every tick exactly once, in order");
}

impl Stack {
    async fn secret_data(&self, name: &str) -> Option<std::collections::BTreeMap<String, String>> {
        let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(self.cluster.client().await, self.ns());
        let s = api.get_opt(name).await.ok()??;
        Some(
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect(),
        )
    }

    async fn acl_user_exists(&self, user: &str) -> bool {
        let mut c = self.redis_conn().await;
        let v: redis::Value = redis::cmd("ACL")
            .arg("GETUSER")
            .arg(user)
            .query_async(&mut c)
            .await
            .expect("ACL GETUSER");
        !matches!(v, redis::Value::Nil)
    }

    /// Container `container` of pod `pod`: (pid from kube-sim's containerID, restartCount).
    async fn container(&self, pod: &str, container: &str) -> Option<(i32, i64)> {
        let pods = self.pods().await;
        let p = pods.iter().find(|p| p["metadata"]["name"] == pod)?;
        let all = p["status"]["initContainerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(
                p["status"]["containerStatuses"]
                    .as_array()
                    .into_iter()
                    .flatten(),
            );
        for c in all {
            if c["name"] == container {
                c["state"]["running"].as_object()?;
                let pid = c["containerID"]
                    .as_str()?
                    .strip_prefix("kube-sim://")?
                    .parse()
                    .ok()?;
                return Some((pid, c["restartCount"].as_i64().unwrap_or(0)));
            }
        }
        None
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_finished_run_collects_pods_and_secret_and_expires_redis_data() {
    delete_scenario(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_running_run_collects_pods_and_secret_and_expires_redis_data() {
    delete_scenario(true).await;
}

async fn delete_scenario(mid_run: bool) {
    let s = Stack::start().await;
    if mid_run {
        s.apply_yaml("ticker.yaml", &ticker("doomed"));
    } else {
        s.apply_yaml("counter.yaml", &counter("doomed", 5, "0.1"));
    }
    let run_id = s.run_id("doomed").await;
    if mid_run {
        s.wait_phase("doomed", &["Running"], 30).await;
        s.output_grows_past(&run_id, 2, 20).await;
    } else {
        s.wait_phase("doomed", &["Succeeded"], 30).await;
    }
    let secret = s
        .eventually(10, "the run's Secret", || {
            s.secret_data("doomed-agentrun-redis")
        })
        .await;
    let user = secret.get("AGENTRUN_REDIS_USERNAME").cloned();
    assert_eq!(
        user.as_deref(),
        Some(format!("agentrun-run-{run_id}").as_str()),
        "per-run Redis user in the Secret: {:?}",
        secret.keys()
    );
    let user = user.expect("user");
    assert!(
        s.acl_user_exists(&user).await,
        "ACL user {user} exists while the run runs"
    );
    assert!(!s.pods().await.is_empty());

    s.kubectl_ok(&["delete", "ar", "doomed", "--wait=false"]);
    s.eventually(30, "the run, its pods and its Secret are gone", || async {
        let gone = s.agentrun("doomed").await.is_none()
            && s.pods().await.is_empty()
            && s.secret_data("doomed-agentrun-redis").await.is_none();
        gone.then_some(())
    })
    .await;
    // Every key of the run gets a TTL (and they are not deleted right away: retention).
    s.eventually(20, "a TTL on every key of the run", || async {
        let keys = s.run_keys(&run_id).await;
        if keys.is_empty() {
            return None;
        }
        let mut c = s.redis_conn().await;
        for k in &keys {
            let ttl: i64 = redis::cmd("TTL").arg(k).query_async(&mut c).await.ok()?;
            if ttl <= 0 {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(
        s.run_keys(&run_id)
            .await
            .iter()
            .any(|k| k.ends_with(":output:default")),
        "the output stays readable until the TTL"
    );
    s.eventually(20, "the run's ACL user is deleted", || async {
        (!s.acl_user_exists(&user).await).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_restarted_mid_run_makes_no_duplicate_pods_and_finishes() {
    let mut s = Stack::start().await;
    s.apply_yaml("counter.yaml", &counter("steady", 40, "0.1"));
    let run_id = s.run_id("steady").await;
    s.wait_phase("steady", &["Running"], 30).await;
    s.output_grows_past(&run_id, 3, 20).await;
    let before: Vec<Value> = s.pods().await;
    assert_eq!(before.len(), 1);
    let uid = before[0]["metadata"]["uid"].clone();
    s.start_operator().await; // kills the running one first
    let done = s
        .wait_phase("steady", &["Succeeded", "Failed", "Stopped"], 40)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    let after = s.pods().await;
    assert_eq!(after.len(), 1, "no duplicate pod");
    assert_eq!(after[0]["metadata"]["uid"], uid, "the same pod");
    let sse = s.sse(&run_id, 20).await;
    assert_ticks(&sse.output()["default"], 40);
}

/// The run index does not keep every run ever started: a restarted operator (and then the
/// leader every ten minutes) drops the runs whose keys have expired, and keeps the others.
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_drops_runs_whose_keys_expired_from_the_run_index() {
    use agentrun_protocol::RunId;
    use agentrun_protocol::names::RUNS_INDEX_KEY;
    use agentrun_protocol::publish::register_run;
    let mut s = Stack::start().await;
    let mut c = s.redis_conn().await;
    let two_hours_ago = agentrun_protocol::now_ms() - 2 * 3600 * 1000;
    let kept = RunId::new("default.kept-a-while").unwrap();
    register_run(
        &mut c,
        &kept,
        two_hours_ago,
        &[("phase", "Succeeded".into())],
    )
    .await
    .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(RUNS_INDEX_KEY)
        .arg(two_hours_ago)
        .arg("default.expired-long-ago")
        .query_async(&mut c)
        .await
        .unwrap();
    s.start_operator().await; // kills the running one first
    s.eventually(30, "the expired run leaves the run index", || {
        let mut c = c.clone();
        async move {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(RUNS_INDEX_KEY)
                .arg("default.expired-long-ago")
                .query_async(&mut c)
                .await
                .unwrap();
            score.is_none().then_some(())
        }
    })
    .await;
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(RUNS_INDEX_KEY)
        .arg(kept.as_str())
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(score.is_some(), "a run whose keys exist stays in the index");
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecar_killed_mid_run_is_restarted_and_no_output_is_lost() {
    let s = Stack::start().await;
    if !s.cluster.is_sim() {
        eprintln!("finding the sidecar's process needs kube-sim's container ids; nothing to test");
        return;
    }
    s.apply_yaml("counter.yaml", &counter("sturdy", 50, "0.1"));
    let run_id = s.run_id("sturdy").await;
    s.wait_phase("sturdy", &["Running"], 30).await;
    s.output_grows_past(&run_id, 5, 20).await;
    let (pid, restarts) = s
        .eventually(10, "the sidecar runs", || {
            s.container("sturdy-default", "agentrun-sidecar")
        })
        .await;
    assert_eq!(restarts, 0);
    // The pod's users, as a real kubelet gives them: the sidecar as the sidecar image's
    // non-root user, the agent as busybox's root with every capability dropped, both with the
    // pod's fsGroup and no_new_privs.
    let (agent, _) = s
        .eventually(10, "the agent runs", || {
            s.container("sturdy-default", "agent")
        })
        .await;
    let expect = |uid: &str, groups: &str| {
        [
            ("CapEff", "0000000000000000"),
            ("Gid", uid),
            ("Groups", groups),
            ("NoNewPrivs", "1"),
            ("Uid", uid),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(process_identity(pid), expect("65532", "65532"));
    assert_eq!(process_identity(agent), expect("0", "0 65532"));
    // The key the sidecar handed to the entrypoint: kept on the sidecar's own volume (its user
    // only), which the agent container does not mount; the hand-off file on the shared volume
    // was taken by the entrypoint before the agent started.
    let key = in_container(pid, &format!("cat {SIDECAR_KEY}"));
    assert_eq!(key.trim().len(), 64, "a 256-bit key in hexadecimal");
    assert_eq!(
        in_container(pid, &format!("stat -c '%a %u' {SIDECAR_KEY}")),
        "600 65532\n",
        "mode and owner of the kept key"
    );
    assert_eq!(
        exists_in_container(agent, SIDECAR_KEY),
        "no\n",
        "the agent container sees the sidecar's state volume"
    );
    assert_eq!(
        exists_in_container(agent, HANDOFF_KEY),
        "no\n",
        "the hand-off file is still on the shared volume while the agent runs"
    );
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -KILL {pid}");
    // Its process is the sidecar once the kubelet's set-up (mounts, then exec) is done.
    let restarted = s
        .eventually(30, "the kubelet restarts the sidecar", || async {
            let (pid, r) = s.container("sturdy-default", "agentrun-sidecar").await?;
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            (r >= 1 && exe.ends_with("agentrun-sidecar")).then_some(pid)
        })
        .await;
    // The restarted sidecar finds the same key on its volume, so the running entrypoint
    // reconnects with it (a new key would have it refused: checked below).
    assert_eq!(
        in_container(restarted, &format!("cat {SIDECAR_KEY}")),
        key,
        "the restarted sidecar's state volume"
    );
    let done = s
        .wait_phase("sturdy", &["Succeeded", "Failed", "Stopped"], 40)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    let sse = s.sse(&run_id, 20).await;
    assert_ticks(&sse.output()["default"], 50);
    let seqs: Vec<u64> = sse.seqs("output").into_iter().map(|(_, q)| q).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "seq contiguous"
    );
    let refused: Vec<Value> = sse
        .statuses()
        .into_iter()
        .filter(|st| st["reason"] == "SocketClientRefused" || st["reason"] == "SpoolRefused")
        .collect();
    assert!(
        refused.is_empty(),
        "the restarted sidecar refused the entrypoint: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restarted_mid_run_loses_nothing() {
    let mut s = Stack::start().await;
    s.apply_yaml("counter.yaml", &counter("patient", 50, "0.1"));
    let run_id = s.run_id("patient").await;
    s.wait_phase("patient", &["Running"], 30).await;
    let n = s.output_grows_past(&run_id, 5, 20).await;
    // A one-second outage while the agent keeps writing (about ten ticks).
    s.redis.kill();
    let down = std::time::Instant::now();
    while down.elapsed() < std::time::Duration::from_secs(1) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    s.redis.restart();
    assert!(
        s.output_len(&run_id, "default").await >= n,
        "AOF kept the stream"
    );
    // The sidecar authenticates as the run's ACL user: it must survive the restart (or be
    // re-created) for the sidecar to deliver the rest.
    let user = format!("agentrun-run-{run_id}");
    s.eventually(
        20,
        "the run's ACL user exists after the Redis restart",
        || async { s.acl_user_exists(&user).await.then_some(()) },
    )
    .await;
    let done = s
        .wait_phase("patient", &["Succeeded", "Failed", "Stopped"], 40)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    let sse = s.sse(&run_id, 20).await;
    assert_ticks(&sse.output()["default"], 50);
}

/// The agent finishes while Redis is down: its last output reaches Redis only after it has
/// exited, when the sidecar drains. The run's end must come after that output, or viewers
/// (the relay's `end`, `kubectl agentrun logs -f`) stop before it.
#[tokio::test(flavor = "multi_thread")]
async fn output_published_after_the_agent_exited_comes_before_the_runs_end() {
    // The pod's grace period leaves the sidecar its whole drain time (20 s) after the agent.
    let mut s = Stack::start_with(StackOptions {
        operator: OperatorOptions {
            pod_termination_grace_seconds: Some(45),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    // The entrypoint waits 3 s (not 30) for the sidecar to take its last frames, then leaves
    // them in its spool for the sidecar.
    let run = counter("late", 60, "0.05").replace(
        "  timeoutSeconds: 120\n",
        "  timeoutSeconds: 120\n  env:\n    - name: AGENTRUN_DRAIN_TIMEOUT_SECONDS\n      value: \"3\"\n",
    );
    s.apply_yaml("late.yaml", &run);
    let run_id = s.run_id("late").await;
    s.wait_phase("late", &["Running"], 30).await;
    s.output_grows_past(&run_id, 3, 20).await;
    s.redis.kill();
    // The agent ends during the outage; its sidecar holds the rest and keeps the pod running.
    s.eventually(30, "the agent container to end", || async {
        s.pods()
            .await
            .iter()
            .any(|p| {
                p["status"]["containerStatuses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["name"] == "agent" && c["state"]["terminated"].is_object())
            })
            .then_some(())
    })
    .await;
    let ar = s.agentrun("late").await.expect("the run");
    assert!(
        ar["status"]["streamsClosed"].is_null(),
        "the run's end is not published while a sidecar still holds output: {:#}",
        ar["status"]
    );
    s.redis.restart();
    let sse = s.sse(&run_id, 60).await;
    assert_ticks(&sse.output()["default"], 60);
    let done = s
        .eventually(30, "the run's end to be published", || async {
            let ar = s.agentrun("late").await?;
            (ar["status"]["streamsClosed"] == true).then_some(ar)
        })
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
}

/// `helm template` of the chart as release `release` with `--set` values `sets`, applied to the
/// cluster with kubectl: every rendered object must be accepted. Returns the rendered objects.
fn apply_chart(c: &common::Cluster, release: &str, crds: bool, sets: &[&str]) -> Vec<Value> {
    let mut args: Vec<&str> = Vec::new();
    if crds {
        args.push("--include-crds");
    }
    for set in sets {
        args.extend(["--set", set]);
    }
    let rendered = stack::helm_template(release, &c.namespace, &args);
    let file = c.write(&format!("chart-{release}.yaml"), &rendered);
    let applied = c.kubectl_ok(&[
        "apply",
        "-n",
        &c.namespace,
        "-f",
        file.to_str().expect("utf-8"),
    ]);
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&rendered)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| v.is_object())
        .collect();
    for d in &docs {
        let kind = d["kind"].as_str().expect("kind").to_lowercase();
        let name = d["metadata"]["name"].as_str().expect("name");
        assert!(
            applied.contains(&format!("{kind}/{name}"))
                || applied.contains(&format!("/{name} created")),
            "{kind}/{name} applied ({sets:?}):\n{applied}"
        );
    }
    docs
}

/// Every Role/ClusterRole rule of `docs` names a resource the API server serves (group +
/// plural; subresources by their base). Returns how many were checked.
fn check_rbac_names_served_resources(c: &common::Cluster, docs: &[Value]) -> usize {
    let served = c.kubectl_ok(&["api-resources", "-o", "name"]);
    let served: std::collections::BTreeSet<&str> = served.lines().map(str::trim).collect();
    assert!(served.contains("agentruns.agentrun.dev"), "{served:?}");
    let mut checked = 0;
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for rule in d["rules"].as_array().into_iter().flatten() {
            let groups: Vec<&str> = rule["apiGroups"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for r in rule["resources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let base = r.split('/').next().unwrap_or(r);
                if base == "*" {
                    continue;
                }
                checked += 1;
                let found = groups.iter().any(|g| {
                    let full = if g.is_empty() {
                        base.to_string()
                    } else {
                        format!("{base}.{g}")
                    };
                    served.contains(full.as_str())
                });
                assert!(
                    found,
                    "{} {}: rule names {r} in {groups:?}, which the API server does not serve",
                    d["kind"], d["metadata"]["name"]
                );
            }
        }
    }
    checked
}

/// The stored object (as the API server keeps it) of `kind/name` in the test namespace.
fn stored(c: &common::Cluster, kind: &str, name: &str) -> Value {
    let json = c.kubectl_ok(&["get", kind, name, "-n", &c.namespace, "-o", "json"]);
    serde_json::from_str(&json).expect("kubectl -o json")
}

/// The env of the first container of a stored Deployment, as `name -> value or valueFrom`.
fn deployment_env(d: &Value) -> std::collections::BTreeMap<String, Value> {
    d["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let v = e.get("value").unwrap_or(&e["valueFrom"]).clone();
            (e["name"].as_str().unwrap_or_default().to_string(), v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_chart_output_is_accepted_and_its_rbac_names_real_resources() {
    let c = common::Cluster::start().await;
    let docs = apply_chart(&c, "agentrun", true, &[]);
    assert!(docs.len() >= 10, "the chart renders its objects");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in ["Deployment", "Service", "ClusterRole", "ServiceAccount"] {
        assert!(kinds.contains(&k), "the chart has a {k}: {kinds:?}");
    }
    let checked = check_rbac_names_served_resources(&c, &docs);
    assert!(
        checked >= 5,
        "the operator's RBAC rules were checked ({checked})"
    );
    // The default relay is not open: bearer tokens from a generated Secret.
    let relay = stored(&c, "deployment", "agentrun-relay");
    assert_eq!(
        deployment_env(&relay)["AGENTRUN_AUTH"],
        "token",
        "{relay:#}"
    );
    let tokens = stored(&c, "secret", "agentrun-relay-tokens");
    assert!(tokens["data"]["tokens"].is_string(), "{tokens:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_chart_with_relay_auth_cors_and_redis_tls_values_is_accepted() {
    let c = common::Cluster::start().await;
    // Token auth with the user's Secret, CORS, and the bundled Redis over mutual TLS.
    let secure = apply_chart(
        &c,
        "secure",
        true,
        &[
            "relay.auth.existingSecret=viewer-tokens",
            "relay.cors.origins={https://ui.example.com,https://b.example.com:8443}",
            "redis.tls.enabled=true",
            "redis.tls.caSecret=redis-ca",
            "redis.tls.serverCertSecret=redis-server",
            "redis.tls.clientCertSecret=redis-client",
        ],
    );
    let relay = stored(&c, "deployment", "secure-agentrun-relay");
    let env = deployment_env(&relay);
    assert_eq!(env["AGENTRUN_AUTH"], "token");
    assert_eq!(
        env["AGENTRUN_TOKENS_FILE"],
        "/etc/agentrun/relay-auth/tokens"
    );
    assert_eq!(
        env["AGENTRUN_CORS_ORIGINS"],
        "https://ui.example.com,https://b.example.com:8443"
    );
    assert_eq!(
        env["AGENTRUN_REDIS_URL"],
        format!("rediss://secure-agentrun-redis.{}.svc:6379", c.namespace)
    );
    assert_eq!(
        env["AGENTRUN_REDIS_CA_FILE"],
        "/etc/agentrun/redis-tls/ca/ca.crt"
    );
    let volumes = &relay["spec"]["template"]["spec"]["volumes"];
    let secrets: Vec<&str> = volumes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(
        secrets,
        ["viewer-tokens", "redis-ca", "redis-client"],
        "{volumes:#}"
    );
    let operator = deployment_env(&stored(&c, "deployment", "secure-agentrun-operator"));
    assert_eq!(
        operator["AGENTRUN_SIDECAR_REDIS_CLIENT_CERT"],
        "/etc/agentrun/redis-tls/client/tls.crt"
    );
    let redis = stored(&c, "statefulset", "secure-agentrun-redis");
    let args = redis["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert!(
        args.as_array()
            .is_some_and(|a| a.contains(&json!("--tls-port")) && a.contains(&json!("yes"))),
        "{args}"
    );
    assert!(
        !secure
            .iter()
            .any(|d| d["kind"] == "Secret"
                && d["metadata"]["name"] == "secure-agentrun-relay-tokens"),
        "no generated tokens Secret when one is given"
    );

    // Kubernetes auth with an external Redis over TLS: the relay may review tokens, nothing more.
    let kube = apply_chart(
        &c,
        "kube",
        false,
        &[
            "relay.auth.mode=kubernetes",
            "redis.bundled=false",
            "redis.external.url=rediss://redis.example.com:6380",
            "redis.external.existingSecret=my-redis",
            "redis.tls.enabled=true",
            "redis.tls.caSecret=redis-ca",
        ],
    );
    check_rbac_names_served_resources(&c, &kube);
    let role = c.kubectl_ok(&[
        "get",
        "clusterrole",
        "kube-agentrun-relay-auth",
        "-o",
        "json",
    ]);
    let role: Value = serde_json::from_str(&role).expect("json");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}
        ])
    );
    let relay = stored(&c, "deployment", "kube-agentrun-relay");
    assert_eq!(deployment_env(&relay)["AGENTRUN_AUTH"], "kubernetes");
    assert_eq!(
        relay["spec"]["template"]["spec"]["automountServiceAccountToken"],
        true
    );
    assert!(
        !secure.iter().any(|d| d["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.ends_with("-relay-auth"))),
        "no relay RBAC in token mode"
    );
}

/// PEM files of a test CA, a server certificate for `ips`, and a client certificate.
struct TestPki {
    ca: std::path::PathBuf,
    server: (std::path::PathBuf, std::path::PathBuf),
    client: (std::path::PathBuf, std::path::PathBuf),
}

fn test_pki(dir: &std::path::Path, ips: &[&str]) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).expect("write pem");
        p
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // rcgen's default subject is the same for every certificate; a leaf must not look like it
    // issued itself.
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "agentrun e2e CA");
    let ca_pem = ca.self_signed(&ca_key).expect("CA").pem();
    let issuer = Issuer::new(ca, ca_key);
    let pair = |names: Vec<String>, file: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("agentrun e2e {file}"));
        let cert = params.signed_by(&key, &issuer).expect("sign");
        (
            write(&format!("{file}.crt"), cert.pem()),
            write(&format!("{file}.key"), key.serialize_pem()),
        )
    };
    TestPki {
        server: pair(ips.iter().map(|s| s.to_string()).collect(), "server"),
        client: pair(vec!["agentrun-e2e-client".into()], "client"),
        ca: write("ca.crt", ca_pem),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecars_publish_to_a_tls_only_redis_with_the_operators_certificates() {
    let mut s = Stack::start().await;
    let dir = s.dir.path().to_path_buf();
    let pki = test_pki(&dir, &["127.0.0.1", &s.host_address]);
    let path = |p: &std::path::Path| p.display().to_string();
    // Redis with TLS only (no plain port) that requires client certificates.
    let port = agentrun_protocol::testing::free_port();
    let redis_dir = dir.join("tls-redis");
    std::fs::create_dir_all(&redis_dir).expect("redis dir");
    let _redis = stack::Proc::spawn(
        "redis-tls",
        std::path::Path::new("redis-server"),
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &path(&pki.server.0),
            "--tls-key-file",
            &path(&pki.server.1),
            "--tls-ca-cert-file",
            &path(&pki.ca),
            "--tls-auth-clients",
            "yes",
            "--bind",
            &format!("127.0.0.1 {}", s.host_address),
            "--protected-mode",
            "no",
            "--save",
            "",
            "--dir",
            &path(&redis_dir),
        ]
        .map(String::from),
        dir.join("redis-tls.log"),
    );
    let mut settings =
        agentrun_protocol::RedisSettings::from_url(&format!("rediss://127.0.0.1:{port}"))
            .expect("url");
    settings.ca_file = Some(pki.ca.clone());
    settings.client_cert = Some(pki.client.0.clone());
    settings.client_key = Some(pki.client.1.clone());
    let mut conn = s
        .eventually(20, "the TLS Redis answers", || async {
            let client = settings.client().await.ok()?;
            let mut c = client.get_multiplexed_async_connection().await.ok()?;
            let pong: String = redis::cmd("PING").query_async(&mut c).await.ok()?;
            (pong == "PONG").then_some(c)
        })
        .await;

    // The operator reaches it with its CA and client certificate, and hands both (not its
    // file paths) to the sidecars, which reach it at the pods' host address.
    if let Some(mut old) = s.operator.take() {
        old.kill();
    }
    let metrics = format!("127.0.0.1:{}", agentrun_protocol::testing::free_port());
    let _operator = stack::Proc::spawn(
        "operator-tls",
        &stack::binaries().join("agentrun-operator"),
        &[
            "run",
            "--kubeconfig",
            &path(&s.cluster.kubeconfig),
            "--no-leader-election",
            "--metrics-addr",
            &metrics,
            "--sidecar-image",
            &s.sidecar_image,
            "--redis-url",
            &format!("rediss://127.0.0.1:{port}"),
            "--redis-ca-file",
            &path(&pki.ca),
            "--redis-client-cert",
            &path(&pki.client.0),
            "--redis-client-key",
            &path(&pki.client.1),
            "--sidecar-redis-url",
            &format!("rediss://{}:{port}", s.host_address),
            "--sidecar-redis-client-cert",
            &path(&pki.client.0),
            "--sidecar-redis-client-key",
            &path(&pki.client.1),
            "--run-credential-key",
            "e2e-tls-key",
        ]
        .map(String::from),
        dir.join("operator-tls.log"),
    );
    let ready = format!("http://{metrics}/readyz");
    s.eventually(30, "the TLS operator is ready", || async {
        let r = s.http.get(&ready).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    s.apply_yaml("counter.yaml", &counter("secure", 5, "0.1"));
    let run_id = s.run_id("secure").await;
    let done = s
        .wait_phase("secure", &["Succeeded", "Failed", "Stopped"], 45)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    // The run's Secret carries the PEM contents; the sidecar got them as files.
    let secret = s
        .secret_data("secure-agentrun-redis")
        .await
        .expect("the run's Secret");
    let ca = std::fs::read_to_string(&pki.ca).expect("ca");
    assert_eq!(secret.get("redis-ca.crt"), Some(&ca), "{:?}", secret.keys());
    assert!(
        secret.contains_key("redis-client.key"),
        "{:?}",
        secret.keys()
    );
    // Every tick reached the TLS-only Redis, published by the sidecar as the run's own user.
    let entries: Vec<(String, std::collections::HashMap<String, redis::Value>)> =
        redis::cmd("XRANGE")
            .arg(format!("run:{{{run_id}}}:output:default"))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("XRANGE");
    let out: Vec<u8> = entries
        .iter()
        .flat_map(|(_, f)| match f.get("content") {
            Some(redis::Value::BulkString(b)) => b.clone(),
            other => panic!("content field: {other:?}"),
        })
        .collect();
    assert_ticks(&out, 5);
}

/// With archiving on: a run ends, the archiver copies it (`status.archive` becomes `complete`),
/// its Redis data expires (retention 2 s), and the relay and `kubectl agentrun logs` still show
/// it byte for byte from the archive, by run id and by AgentRun name, even once the AgentRun
/// is deleted.
#[tokio::test(flavor = "multi_thread")]
async fn an_archived_run_outlives_its_redis_data_and_still_shows_byte_exact() {
    let s = Stack::start_with(StackOptions {
        archive: true,
        operator: OperatorOptions {
            retention_seconds: Some(2),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let (run_id, _, expected) = hello_succeeds(&s).await;
    s.eventually(60, "status.archive.state is complete", || async {
        let ar = s.agentrun("hello").await?;
        (ar["status"]["archive"]["state"] == "complete").then_some(())
    })
    .await;
    s.eventually(30, "the run's Redis data expires", || async {
        s.run_keys(&run_id).await.is_empty().then_some(())
    })
    .await;
    // The relay serves it from the archive: the same output, the same end.
    let sse = s.sse(&run_id, 20).await;
    assert_eq!(sse.output()["default"], expected, "byte for byte");
    let end = sse.end().expect("end");
    assert_eq!(
        (end["phase"].clone(), end["finished"].clone()),
        (json!("succeeded"), json!(true))
    );
    let summary: Value = s
        .http
        .get(format!("{}/api/runs/{run_id}", s.relay_url))
        .send()
        .await
        .expect("GET the run")
        .json()
        .await
        .expect("JSON");
    assert_eq!(summary["archived"], true, "{summary}");

    // The plugin, by run id and by AgentRun name, while the AgentRun exists and once it is gone.
    let logs = |run: &str| {
        stdout_of(
            std::process::Command::new(stack::binaries().join("kubectl-agentrun"))
                .args(["logs", run, "--channels", "output"])
                .env("AGENTRUN_RELAY_URL", &s.relay_url)
                .env_remove("AGENTRUN_TOKEN"),
        )
    };
    assert_eq!(logs(&run_id), expected, "logs RUN_ID from the archive");
    assert_eq!(logs("hello"), expected, "logs NAME from the archive");
    // As a user types it: kubectl finds the plugin on PATH, and the plugin finds the relay and
    // the run id in the AgentRun's status.
    let kubectl = kube_sim::testing::kubectl_bin();
    // A bare `kubectl` has no folder to add: an empty PATH entry would mean the working folder.
    let kubectl_dir = std::path::Path::new(&kubectl)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| format!("{}:", d.display()))
        .unwrap_or_default();
    let path = format!(
        "{}:{kubectl_dir}{}",
        stack::binaries().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let typed = stdout_of(
        std::process::Command::new(&kubectl)
            .args(["agentrun", "logs", "hello", "--channels", "output"])
            .args(["-n", s.ns()])
            .env("PATH", &path)
            .env("KUBECONFIG", &s.cluster.kubeconfig)
            .env_remove("AGENTRUN_RELAY_URL")
            .env_remove("AGENTRUN_TOKEN"),
    );
    assert_eq!(
        typed, expected,
        "kubectl agentrun logs hello from the archive"
    );

    // The browser: the run's page (status.url) shows every line and the run's end.
    let url = s.agentrun("hello").await.expect("hello")["status"]["url"]
        .as_str()
        .expect("status.url")
        .to_owned();
    let text = String::from_utf8(expected.clone()).expect("hello prints text");
    let lines: Vec<&str> = text.lines().collect();
    let (first, last) = (lines[0], lines[lines.len() - 1]);
    let mut page = browser::RunPage::open(&url, "default", first, last, s.dir.path());
    page.next("loaded", 60).await;
    page.next("live", 30).await;
    let ended = page.next("ended", 30).await;
    assert_eq!(ended["badge"], "succeeded", "{ended}");
    assert_eq!(ended["text"], text.as_str(), "{ended}");
    assert_eq!(ended["errors"], json!([]), "no page errors");
    page.close().await;

    s.kubectl_ok(&["delete", "agentrun", "hello"]);
    s.eventually(30, "the AgentRun is gone", || async {
        s.agentrun("hello").await.is_none().then_some(())
    })
    .await;
    assert_eq!(logs("hello"), expected, "logs NAME with the AgentRun gone");
}

/// Runs `cmd` to its end and returns what it printed; a failure shows its stderr.
fn stdout_of(cmd: &mut std::process::Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

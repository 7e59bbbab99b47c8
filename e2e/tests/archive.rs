//! Run history that outlives Redis, on the cluster: the operator puts a finished run on the
//! archive queue, the real `agentrun-archiver` writes it to a folder store, the run's keys get
//! their (short) retention TTL only once the archive is complete, and after Redis has let the
//! run go the relay, `kubectl agentrun logs` and the browser still show it byte for byte.

#[path = "common/browser.rs"]
mod browser;
mod common;
#[path = "common/stack.rs"]
mod stack;

use stack::{Stack, StackOptions, bin_dir};

const TICKS: u32 = 40;

fn ticks() -> String {
    (0..TICKS).map(|i| format!("tick {i}\n")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finished_run_is_archived_and_still_shown_once_redis_has_let_it_go() {
    let s = Stack::start_with(StackOptions {
        archive: true,
        ..Default::default()
    })
    .await;
    s.apply_yaml(
        "kept.yaml",
        &format!(
            r#"apiVersion: agentrun.dev/v1alpha1
kind: AgentRun
metadata:
  name: kept
spec:
  image: busybox:1.36
  command: ["sh", "-c"]
  args:
    - |
      i=0
      while [ "$i" -lt {TICKS} ]; do echo "tick $i"; i=$((i + 1)); sleep 0.02; done
  timeoutSeconds: 120
"#
        ),
    );
    let run_id = s.run_id("kept").await;
    let done = s
        .wait_phase("kept", &["Succeeded", "Failed", "Stopped"], 60)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");

    // The archive completes, and only then does Redis let the run go.
    let archive = s
        .eventually(60, "status.archive.state = complete", || async {
            let ar = s.agentrun("kept").await?;
            let a = ar["status"]["archive"].clone();
            (a["state"] == "complete").then_some(a)
        })
        .await;
    assert!(archive["archivedTime"].is_string(), "{archive:#}");
    let wide = s.kubectl_ok(&["get", "ar", "kept", "-o", "wide"]);
    assert!(wide.contains("complete"), "kubectl shows the archive: {wide}");
    s.eventually(30, "every Redis key of the run gone", || async {
        s.run_keys(&run_id).await.is_empty().then_some(())
    })
    .await;

    // The relay serves it from the archive: the same events, the same end.
    let sse = s.sse(&run_id, 30).await;
    let out = sse.output();
    assert_eq!(
        String::from_utf8_lossy(out.get("default").map_or(&[][..], |v| &v[..])),
        ticks(),
        "every tick once, in order, from the archive"
    );
    let end = sse.end().expect("an end event");
    assert_eq!(end["finished"], true, "{end}");
    assert_eq!(end["phase"], "succeeded", "{end}");

    // `kubectl agentrun logs kept`: kubectl finds the plugin on PATH; the plugin finds the
    // relay and the run id in the AgentRun's status.
    let kubectl = kube_sim::testing::kubectl_bin();
    // The plugin runs `kubectl` itself: the one the tests use (`$KUBECTL`) comes first.
    let kubectl_dir = std::path::Path::new(&kubectl)
        .parent()
        .map(|d| format!("{}:", d.display()))
        .unwrap_or_default();
    let path = format!(
        "{}:{kubectl_dir}{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let logs = tokio::process::Command::new(&kubectl)
        .args(["agentrun", "logs", "kept", "-n", s.ns()])
        .env("PATH", &path)
        .env("KUBECONFIG", &s.cluster.kubeconfig)
        .output()
        .await
        .expect("run kubectl agentrun logs");
    assert!(
        logs.status.success(),
        "kubectl agentrun logs kept: {}",
        String::from_utf8_lossy(&logs.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&logs.stdout), ticks());

    // The browser: the run's page (status.url) shows every line and the run's end.
    let url = done["status"]["url"].as_str().expect("status.url").to_owned();
    let mut page = browser::RunPage::open(
        &url,
        "default",
        "tick 0",
        &format!("tick {}", TICKS - 1),
        s.dir.path(),
    );
    page.next("loaded", 60).await;
    page.next("live", 30).await;
    let ended = page.next("ended", 30).await;
    assert_eq!(ended["badge"], "succeeded", "{ended}");
    assert_eq!(ended["text"], ticks(), "{ended}");
    assert_eq!(ended["errors"], serde_json::json!([]), "no page errors");
    page.close().await;
}

//! End-to-end scenarios: the user's path from `kubectl apply` to the relay's SSE stream, with
//! the real operator, sidecar, entrypoint and relay binaries, a real Redis, and kube-sim (or the
//! cluster of `E2E_KUBECONFIG`, see e2e/README.md).

mod common;
#[path = "common/stack.rs"]
mod stack;

use serde_json::{Value, json};
use stack::{Stack, run_sh, workspace};

/// The agent script of an example manifest (`spec.args[0]`, run with `sh -c`).
fn example_script(rel: &str) -> String {
    let text = std::fs::read_to_string(workspace().join(rel)).expect("read example");
    let v: Value = serde_yaml::from_str(&text).expect("example YAML");
    assert_eq!(v["spec"]["command"], json!(["sh", "-c"]), "{rel}: command");
    v["spec"]["args"][0]
        .as_str()
        .expect("spec.args[0]")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn install_and_hello_streams_byte_exact_output() {
    let s = Stack::start().await;
    // kubectl apply -f crds/ was done by Stack::start; the example goes in the same way.
    let out = s.apply_example("manifests/examples/hello.yaml");
    assert!(out.contains("agentrun.dev/hello created"), "{out}");

    // What the agent writes, run on the host in parallel with the run itself.
    let expected =
        tokio::task::spawn_blocking(|| run_sh(&example_script("manifests/examples/hello.yaml")));

    let run_id = s.run_id("hello").await;
    let done = s
        .wait_phase("hello", &["Succeeded", "Failed", "Stopped"], 45)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
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
    let expected = expected.await.expect("host run");
    assert!(expected.len() > 40, "the example writes a sentence");
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

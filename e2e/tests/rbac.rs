//! The operator under the Helm chart's least-privilege RBAC: the chart's ServiceAccounts,
//! (Cluster)Roles and bindings (rendered by the real `helm template`) are applied to kube-sim,
//! which enforces RBAC for requests with a token; the real operator runs with a kubeconfig
//! holding its ServiceAccount's token. A run must succeed with no request refused, and with one
//! rule taken out of the ClusterRole the operator must be refused and the run must not finish.

mod common;
#[path = "common/stack.rs"]
mod stack;

use serde::Deserialize as _;
use serde_json::Value;
use stack::{OperatorOptions, Stack, StackOptions, workspace};

/// The release namespace the chart is rendered for (the operator's Lease lives here).
const RELEASE_NS: &str = "agentrun-system";
const OPERATOR_TOKEN: &str = "agentrun-operator-sa-token";
const RBAC_KINDS: [&str; 5] = [
    "ServiceAccount",
    "ClusterRole",
    "Role",
    "ClusterRoleBinding",
    "RoleBinding",
];

/// The chart's RBAC objects, rendered by `helm template` for release `agentrun` in
/// [`RELEASE_NS`].
fn chart_rbac() -> Vec<Value> {
    let helm = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    let chart = workspace().join("helm").join("agentrun");
    let out = std::process::Command::new(&helm)
        .args(["template", "agentrun"])
        .arg(&chart)
        .args(["--namespace", RELEASE_NS])
        .output()
        .unwrap_or_else(|e| {
            panic!("run {helm} (install it with scripts/deps/kubectl.sh, or set HELM): {e}")
        });
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).expect("utf-8");
    serde_yaml::Deserializer::from_str(&rendered)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| RBAC_KINDS.iter().any(|k| v["kind"] == *k))
        .collect()
}

fn is_operators(doc: &Value) -> bool {
    doc.pointer("/metadata/labels/app.kubernetes.io~1component") == Some(&"operator".into())
}

/// The operator's ServiceAccount as an API user: `system:serviceaccount:NS:NAME`.
fn operator_user(docs: &[Value]) -> String {
    let sa = docs
        .iter()
        .find(|d| d["kind"] == "ServiceAccount" && is_operators(d))
        .expect("the chart has the operator's ServiceAccount");
    format!(
        "system:serviceaccount:{RELEASE_NS}:{}",
        sa["metadata"]["name"].as_str().expect("name")
    )
}

/// kube-sim (with the operator's token in its auth config), Redis and the relay; the chart's
/// RBAC applied by the admin; the operator started with its ServiceAccount's kubeconfig.
async fn stack_under_chart_rbac(docs: &[Value], lease: bool) -> Stack {
    let user = operator_user(docs);
    let auth: agentrun_e2e::AuthConfig = serde_yaml::from_str(&format!(
        "users:\n- {{token: {OPERATOR_TOKEN}, username: \"{user}\"}}\n"
    ))
    .expect("auth config");
    let mut s = Stack::start_with(StackOptions {
        auth,
        no_operator: true,
        ..Default::default()
    })
    .await;
    let mut yaml =
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {RELEASE_NS}\n---\n");
    for d in docs {
        yaml.push_str(&serde_yaml::to_string(d).expect("yaml"));
        yaml.push_str("---\n");
    }
    let file = s.dir.path().join("chart-rbac.yaml");
    std::fs::write(&file, yaml).expect("write RBAC");
    let applied = s
        .cluster
        .kubectl_ok(&["apply", "-f", file.to_str().expect("utf-8")]);
    assert!(
        applied.contains("clusterrole.rbac.authorization.k8s.io/agentrun-operator created"),
        "{applied}"
    );
    let sim = s.cluster.sim.as_ref().expect("kube-sim");
    let kubeconfig = s.dir.path().join("operator.kubeconfig");
    std::fs::write(
        &kubeconfig,
        sim.kubeconfig_with_token(&user, OPERATOR_TOKEN),
    )
    .expect("write kubeconfig");
    s.start_operator_with(OperatorOptions {
        kubeconfig: Some(kubeconfig),
        lease_namespace: lease.then(|| RELEASE_NS.to_string()),
    })
    .await;
    s
}

fn operator_log(s: &Stack) -> String {
    let op = s.operator.as_ref().expect("operator");
    std::fs::read_to_string(&op.log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_under_the_charts_rbac_runs_hello_with_nothing_forbidden() {
    if std::env::var("E2E_KUBECONFIG").is_ok_and(|k| !k.is_empty()) {
        eprintln!("the operator's token comes from kube-sim's auth config; nothing to test here");
        return;
    }
    let docs = chart_rbac();
    let user = operator_user(&docs);
    // Leader election on too: the chart's Role grants the Lease.
    let s = stack_under_chart_rbac(&docs, true).await;
    s.apply_example("manifests/examples/hello.yaml");
    let run_id = s.run_id("hello").await;
    let done = s
        .wait_phase("hello", &["Succeeded", "Failed", "Stopped"], 60)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    let sse = s.sse(&run_id, 20).await;
    let out = String::from_utf8_lossy(&sse.output()["default"]).into_owned();
    assert!(out.starts_with("Hello from agentrun:"), "{out:?}");

    // The operator holds its Lease in the release namespace.
    let lease = s.cluster.kubectl_ok(&[
        "get",
        "lease",
        "agentrun-operator",
        "-n",
        RELEASE_NS,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert!(!lease.trim().is_empty(), "the Lease has a holder");

    // Deleting the run: the operator cleans up and removes its finalizer.
    s.kubectl_ok(&["delete", "ar", "hello", "--wait=false"]);
    s.eventually(30, "the AgentRun is gone", || async {
        s.agentrun("hello").await.is_none().then_some(())
    })
    .await;

    // A timeout (the operator deletes the agent's pod) and the TTL after it (the operator
    // deletes the AgentRun) work under the chart's RBAC too.
    s.apply_yaml(
        "short.yaml",
        "apiVersion: agentrun.dev/v1alpha1\nkind: AgentRun\nmetadata:\n  name: short\nspec:\n  image: busybox:1.36\n  command: [sh, -c]\n  args: ['while true; do echo working; sleep 0.2; done']\n  timeoutSeconds: 2\n  ttlSecondsAfterFinished: 1\n",
    );
    let timed_out = s
        .wait_phase("short", &["Succeeded", "Failed", "Stopped"], 30)
        .await;
    assert_eq!(
        timed_out["status"]["variations"][0]["reason"], "Timeout",
        "{timed_out:#}"
    );
    s.eventually(30, "the TTL deletes the timed-out run", || async {
        s.agentrun("short").await.is_none().then_some(())
    })
    .await;

    // Nothing the operator asked for was refused.
    let sim = s.cluster.sim.as_ref().expect("kube-sim");
    assert_eq!(sim.denials.all(), Vec::<String>::new(), "requests refused");
    let log = operator_log(&s);
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the operator ({user}) was refused something:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_missing_one_chart_rule_is_forbidden_and_the_run_does_not_finish() {
    if std::env::var("E2E_KUBECONFIG").is_ok_and(|k| !k.is_empty()) {
        eprintln!("the operator's token comes from kube-sim's auth config; nothing to test here");
        return;
    }
    let mut docs = chart_rbac();
    let user = operator_user(&docs);
    // Take `patch` on agentruns/status out of the operator's ClusterRole.
    let role = docs
        .iter_mut()
        .find(|d| d["kind"] == "ClusterRole" && is_operators(d))
        .expect("the operator's ClusterRole");
    let mut removed = 0;
    for rule in role["rules"].as_array_mut().expect("rules") {
        let status = rule["resources"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == "agentruns/status"));
        if let (true, Some(verbs)) = (status, rule["verbs"].as_array_mut()) {
            let before = verbs.len();
            verbs.retain(|v| v != "patch");
            removed += before - verbs.len();
        }
    }
    assert_eq!(
        removed, 1,
        "the chart grants patch on agentruns/status once: {role:#}"
    );
    let s = stack_under_chart_rbac(&docs, false).await;
    s.apply_example("manifests/examples/hello.yaml");
    let sim = s.cluster.sim.as_ref().expect("kube-sim");
    let refused = format!(
        "agentruns.agentrun.dev \"hello\" is forbidden: User \"{user}\" cannot patch resource \"agentruns/status\" in API group \"agentrun.dev\" in the namespace \"{}\"",
        s.ns()
    );
    let count = || {
        sim.denials
            .all()
            .iter()
            .filter(|d| d.ends_with(&refused))
            .count()
    };
    s.eventually(30, "kube-sim refuses the operator's status patch", || {
        let n = count();
        async move { (n > 0).then_some(()) }
    })
    .await;
    // The agent itself runs (pods may be created), and ends...
    s.eventually(30, "the run's pod finishes", || async {
        let pods = s.pods().await;
        (!pods.is_empty() && pods.iter().all(|p| p["status"]["phase"] == "Succeeded")).then_some(())
    })
    .await;
    // ...but recording that is refused again, so the run never gets a phase.
    let before = count();
    s.eventually(
        30,
        "the operator tries the status again and is refused",
        || {
            let n = count();
            async move { (n > before).then_some(()) }
        },
    )
    .await;
    let ar = s.agentrun("hello").await.expect("the AgentRun");
    assert!(
        ar["status"]["phase"].is_null(),
        "no status was written: {ar:#}"
    );
    let log = operator_log(&s);
    assert!(log.contains("forbidden"), "the operator logs it:\n{log}");
}

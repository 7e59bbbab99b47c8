//! What a real cluster enforces, on the user's path: Pod Security Admission from namespace
//! labels, ResourceQuota, the pod settings of an AgentRun reaching its pod, and a status that
//! server-side apply keeps whole. kube-sim refuses what a real API server refuses, with the same
//! messages; on the cluster of `E2E_KUBECONFIG` the same scenarios run unchanged.

mod common;
#[path = "common/stack.rs"]
mod stack;

use serde_json::Value;
use stack::Stack;

/// Labels the scenario's namespace to enforce a Pod Security level.
fn enforce_pod_security(s: &Stack, level: &str) {
    s.cluster.kubectl_ok(&[
        "label",
        "namespace",
        s.ns(),
        &format!("pod-security.kubernetes.io/enforce={level}"),
        "--overwrite",
    ]);
}

/// The namespace's events about the object `name`, as JSON (events.k8s.io/v1, which the
/// operator's recorder writes).
fn events_about(s: &Stack, name: &str) -> Vec<Value> {
    let out = s.kubectl_ok(&["get", "events.events.k8s.io", "-o", "json"]);
    let list: Value = serde_json::from_str(&out).expect("events JSON");
    list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["involvedObject"]["name"] == name || e["regarding"]["name"] == name)
        .collect()
}

fn condition<'a>(ar: &'a Value, type_: &str) -> &'a Value {
    ar["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_root_run_streams_in_a_restricted_namespace_and_its_status_is_complete() {
    let s = Stack::start().await;
    enforce_pod_security(&s, "restricted");
    s.apply_example("manifests/examples/restricted.yaml");
    let run_id = s.run_id("hello-restricted").await;
    let done = s
        .wait_phase("hello-restricted", &["Succeeded", "Failed", "Stopped"], 60)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    let sse = s.sse(&run_id, 20).await;
    assert_eq!(
        String::from_utf8_lossy(&sse.output()["default"]),
        "hello from a restricted namespace\n"
    );

    // Server-side apply on a real server removes what a manager stops sending: the finished
    // run's status still has everything the operator wrote along the way...
    let status = &done["status"];
    for field in ["runId", "url", "startTime", "completionTime", "variations"] {
        assert!(!status[field].is_null(), "status.{field} is kept: {done:#}");
    }
    assert_eq!(status["variations"][0]["exitCode"], 0, "{done:#}");
    // ...and it is owned by the operator's field manager, applied through /status.
    let yaml = s.kubectl_ok(&[
        "get",
        "ar",
        "hello-restricted",
        "--show-managed-fields",
        "-o",
        "json",
    ]);
    let ar: Value = serde_json::from_str(&yaml).expect("json");
    let managers = ar["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let status_owner = managers
        .iter()
        .find(|m| m["subresource"] == "status")
        .unwrap_or_else(|| panic!("a manager of the status: {managers:#?}"));
    assert_eq!(status_owner["manager"], "agentrun-operator");
    assert_eq!(status_owner["operation"], "Apply");
    assert!(
        status_owner["fieldsV1"]["f:status"]["f:runId"].is_object(),
        "{status_owner:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_run_in_a_restricted_namespace_fails_naming_pod_security() {
    let s = Stack::start().await;
    enforce_pod_security(&s, "restricted");
    s.apply_example("manifests/examples/hello.yaml");
    let done = s
        .wait_phase("hello", &["Succeeded", "Failed", "Stopped"], 60)
        .await;
    assert_eq!(done["status"]["phase"], "Failed", "{done:#}");
    assert_eq!(
        done["status"]["variations"][0]["reason"], "PodSecurity",
        "{done:#}"
    );
    let created = condition(&done, "PodsCreated");
    assert_eq!(created["status"], "False", "{done:#}");
    let message = created["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("violates PodSecurity \"restricted:latest\"")
            && message.contains("runAsNonRoot"),
        "the condition carries the API server's message: {message}"
    );
    let events = events_about(&s, "hello");
    assert!(
        events.iter().any(|e| e["type"] == "Warning"
            && e["note"]
                .as_str()
                .or(e["message"].as_str())
                .unwrap_or_default()
                .contains("violates PodSecurity")),
        "a Warning event says why: {events:#?}"
    );
    assert!(s.pods().await.is_empty(), "no pod was admitted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_refused_by_a_quota_waits_naming_it_and_runs_once_the_quota_allows() {
    let s = Stack::start().await;
    s.apply_yaml(
        "quota.yaml",
        "apiVersion: v1\nkind: ResourceQuota\nmetadata:\n  name: agents\nspec:\n  hard:\n    pods: \"0\"\n",
    );
    s.apply_example("manifests/examples/hello.yaml");
    let waiting = s
        .eventually(60, "the run to wait for the quota", || async {
            let ar = s.agentrun("hello").await?;
            (ar["status"]["variations"][0]["reason"] == "QuotaExceeded").then_some(ar)
        })
        .await;
    assert_eq!(waiting["status"]["phase"], "Pending", "{waiting:#}");
    let message = condition(&waiting, "PodsCreated")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("exceeded quota: agents"),
        "the condition names the quota: {message}"
    );
    assert!(
        events_about(&s, "hello")
            .iter()
            .any(|e| e["type"] == "Warning"),
        "a Warning event says why"
    );
    // The quota is raised: the operator's retry creates the pod and the run completes.
    s.apply_yaml(
        "quota.yaml",
        "apiVersion: v1\nkind: ResourceQuota\nmetadata:\n  name: agents\nspec:\n  hard:\n    pods: \"5\"\n",
    );
    let done = s
        .wait_phase("hello", &["Succeeded", "Failed", "Stopped"], 90)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    assert_eq!(
        condition(&done, "PodsCreated")["status"],
        "True",
        "{done:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pod_settings_of_an_agentrun_reach_its_pod() {
    let s = Stack::start().await;
    s.apply_yaml(
        "account.yaml",
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: agent\n",
    );
    s.apply_yaml(
        "settings.yaml",
        r#"apiVersion: agentrun.dev/v1alpha1
kind: AgentRun
metadata:
  name: settings
spec:
  image: busybox:1.36
  command: [sh, -c]
  args: ["echo configured"]
  imagePullSecrets: [{name: registry-login}]
  serviceAccountName: agent
  nodeSelector: {kubernetes.io/os: linux}
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  resources:
    requests: {cpu: 50m, memory: 32Mi}
    limits: {cpu: 500m, memory: 128Mi}
  podSecurityContext: {supplementalGroups: [4000]}
  securityContext: {runAsUser: 1000, runAsNonRoot: true}
"#,
    );
    let done = s
        .wait_phase("settings", &["Succeeded", "Failed", "Stopped"], 60)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    let pods = s.pods().await;
    let pod = pods
        .iter()
        .find(|p| p["metadata"]["name"] == "settings-default")
        .unwrap_or_else(|| panic!("the run's pod: {pods:#?}"));
    let spec = &pod["spec"];
    assert!(
        spec["imagePullSecrets"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "registry-login")),
        "{spec:#}"
    );
    assert_eq!(spec["serviceAccountName"], "agent");
    assert_eq!(spec["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(spec["tolerations"][0]["key"], "nvidia.com/gpu");
    assert_eq!(spec["securityContext"]["supplementalGroups"][0], 4000);
    let agent = spec["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "agent"))
        .expect("the agent container");
    assert_eq!(agent["resources"]["limits"]["cpu"], "500m", "{agent:#}");
    assert_eq!(
        agent["resources"]["requests"]["memory"], "32Mi",
        "{agent:#}"
    );
    assert_eq!(agent["securityContext"]["runAsUser"], 1000, "{agent:#}");
    // The project's defaults stay under the user's settings.
    assert_eq!(
        agent["securityContext"]["allowPrivilegeEscalation"], false,
        "{agent:#}"
    );
}

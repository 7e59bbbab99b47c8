//! What the API server refuses at admission, with the real messages: Pod Security Admission
//! (enforce, warn, namespace label changes), ResourceQuota (must specify, exceeded, usage
//! released when pods end), LimitRange (defaults, min/max), and the reported server version.
//! Through kube-rs, raw requests (for `Warning` headers) and the real kubectl.

mod common;

use common::{Cluster, Raw, eventually, raw, refusal};
use k8s_openapi::api::core::v1::{LimitRange, Namespace, Pod, ResourceQuota};
use kube::api::{Api, DeleteParams, PostParams};
use kube_sim::Options;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn typed<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("object")
}

/// A pod of busybox containers running `script` (`restartPolicy: Never`), with `extra`
/// merged into its spec.
fn busybox_pod(name: &str, script: &str, extra: Value) -> Value {
    let mut spec = json!({"restartPolicy": "Never", "containers": [
        {"name": "app", "image": "busybox:1.36", "command": ["sh", "-c", script]}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
}

/// What the restricted level asks of the pod and each container.
fn restricted_fields(pod: &mut Value) {
    pod["spec"]["securityContext"] = json!({"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}});
    for c in pod["spec"]["containers"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        c["securityContext"] =
            json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    }
}

async fn label_namespace(c: &Cluster, labels: &[(&str, &str)]) {
    let api: Api<Namespace> = Api::all(c.client().await);
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let patch = json!({"metadata": {"labels": labels}});
    api.patch(
        &c.namespace,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .expect("label namespace");
}

async fn create_raw(c: &Cluster, plural_path: &str, obj: &Value) -> Raw {
    let path = format!("/api/v1/namespaces/{}/{plural_path}", c.namespace);
    raw(
        &c.client().await,
        "POST",
        &path,
        "application/json",
        Some(obj),
    )
    .await
}

const RESTRICTED_ROOT_POD: &str = "pods \"root\" is forbidden: violates PodSecurity \"restricted:latest\": \
    allowPrivilegeEscalation != false (container \"app\" must set securityContext.allowPrivilegeEscalation=false), \
    unrestricted capabilities (container \"app\" must set securityContext.capabilities.drop=[\"ALL\"]), \
    runAsNonRoot != true (pod or container \"app\" must set securityContext.runAsNonRoot=true), \
    seccompProfile (pod or container \"app\" must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")";

#[tokio::test(flavor = "multi_thread")]
async fn a_root_pod_in_a_restricted_namespace_is_refused_and_the_same_pod_made_compliant_is_admitted()
 {
    let c = Cluster::start().await;
    label_namespace(&c, &[("pod-security.kubernetes.io/enforce", "restricted")]).await;
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let pod = busybox_pod("root", "true", json!({}));
    let s = refusal(
        api.create(&PostParams::default(), &typed(pod.clone()))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert_eq!(s.message, RESTRICTED_ROOT_POD);

    // runAsUser 0 is refused even with runAsNonRoot set.
    let mut root_user = pod.clone();
    restricted_fields(&mut root_user);
    root_user["spec"]["securityContext"]["runAsUser"] = json!(0);
    let s = refusal(api.create(&PostParams::default(), &typed(root_user)).await);
    assert!(
        s.message.ends_with(
            "violates PodSecurity \"restricted:latest\": runAsUser=0 (pod must not set runAsUser=0)"
        ),
        "{}",
        s.message
    );

    let mut ok = pod;
    restricted_fields(&mut ok);
    api.create(&PostParams::default(), &typed(ok))
        .await
        .expect("a compliant pod is admitted");
}

#[tokio::test(flavor = "multi_thread")]
async fn baseline_refuses_privileged_and_host_path_pods_that_privileged_admits() {
    let c = Cluster::start().await;
    let privileged_pod = {
        let mut p = busybox_pod("priv", "true", json!({}));
        p["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
        p
    };
    let host_path_pod = busybox_pod(
        "hostpath",
        "true",
        json!({"volumes": [{"name": "host", "hostPath": {"path": "/tmp"}}]}),
    );
    label_namespace(&c, &[("pod-security.kubernetes.io/enforce", "baseline")]).await;
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let s = refusal(
        api.create(&PostParams::default(), &typed(privileged_pod.clone()))
            .await,
    );
    assert_eq!(
        s.message,
        "pods \"priv\" is forbidden: violates PodSecurity \"baseline:latest\": privileged (container \"app\" must not set securityContext.privileged=true)"
    );
    let s = refusal(
        api.create(&PostParams::default(), &typed(host_path_pod.clone()))
            .await,
    );
    assert_eq!(
        s.message,
        "pods \"hostpath\" is forbidden: violates PodSecurity \"baseline:latest\": hostPath volumes (volume \"host\")"
    );
    // baseline admits what only restricted forbids.
    api.create(
        &PostParams::default(),
        &typed(busybox_pod("plain", "true", json!({}))),
    )
    .await
    .expect("baseline admits a plain pod");

    label_namespace(&c, &[("pod-security.kubernetes.io/enforce", "privileged")]).await;
    for p in [privileged_pod, host_path_pod] {
        api.create(&PostParams::default(), &typed(p))
            .await
            .expect("privileged admits everything");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warn_label_admits_the_pod_and_answers_a_warning_header() {
    let c = Cluster::start().await;
    label_namespace(&c, &[("pod-security.kubernetes.io/warn", "restricted")]).await;
    let r = create_raw(&c, "pods", &busybox_pod("root", "true", json!({}))).await;
    assert_eq!(r.code, 201, "{}", r.body);
    let want = RESTRICTED_ROOT_POD
        .replace("pods \"root\" is forbidden: violates", "would violate")
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    assert_eq!(r.warnings, vec![format!("299 - \"{want}\"")]);

    // Workloads are never refused, but their pod templates are warned about.
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"app": "d"}}, "template": {
            "metadata": {"labels": {"app": "d"}},
            "spec": {"containers": [{"name": "app", "image": "busybox:1.36"}]}}}});
    let path = format!("/apis/apps/v1/namespaces/{}/deployments", c.namespace);
    let r = raw(
        &c.client().await,
        "POST",
        &path,
        "application/json",
        Some(&deployment),
    )
    .await;
    assert_eq!(r.code, 201, "{}", r.body);
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(
        r.warnings[0].starts_with("299 - \"would violate PodSecurity \\\"restricted:latest\\\": allowPrivilegeEscalation != false"),
        "{:?}",
        r.warnings
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_prints_pod_security_refusals_and_warnings_as_a_real_server_makes_it() {
    let c = Cluster::start().await;
    let ns = c.namespace.clone();
    let pod = c.write(
        "pod.yaml",
        &busybox_pod("root", "sleep 30", json!({})).to_string(),
    );
    c.kubectl_ok(&["apply", "-n", &ns, "-f", pod.to_str().expect("utf-8")]);

    // Tightening enforce warns about the pods that would no longer be admitted.
    let out = c.kubectl(&[
        "label",
        "namespace",
        &ns,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "Warning: existing pods in namespace \"{ns}\" violate the new PodSecurity enforce level \"restricted:latest\"\n\
             Warning: root: allowPrivilegeEscalation != false, unrestricted capabilities, runAsNonRoot != true, seccompProfile\n"
        )),
        "{stderr}"
    );

    let other = c.write(
        "other.yaml",
        &busybox_pod("root2", "true", json!({})).to_string(),
    );
    let out = c.kubectl(&["apply", "-n", &ns, "-f", other.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = RESTRICTED_ROOT_POD.replace("\"root\"", "\"root2\"");
    assert!(
        stderr.contains(&format!(
            "Error from server (Forbidden): error when creating \"{}\": {want}",
            other.display()
        )),
        "{stderr}"
    );

    // An invalid level is refused on the namespace itself.
    let out = c.kubectl(&[
        "label",
        "--overwrite",
        "namespace",
        &ns,
        "pod-security.kubernetes.io/enforce=strict",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "The Namespace \"{ns}\" is invalid: metadata.labels[pod-security.kubernetes.io/enforce]: Invalid value: \"strict\": must be one of privileged, baseline, restricted"
        )),
        "{stderr}"
    );
}

fn quota(name: &str, hard: Value) -> ResourceQuota {
    typed(json!({"metadata": {"name": name}, "spec": {"hard": hard}}))
}

/// A pod whose one container limits cpu to `cpu` (and memory to 64Mi).
fn limited_pod(name: &str, script: &str, cpu: &str) -> Value {
    let mut p = busybox_pod(name, script, json!({}));
    p["spec"]["containers"][0]["resources"] = json!({"limits": {"cpu": cpu, "memory": "64Mi"}});
    p
}

async fn wait_used(api: &Api<ResourceQuota>, name: &str, resource: &str, want: &str) {
    eventually(30, &format!("quota {name} used {resource}={want}"), || {
        let api = api.clone();
        async move {
            let q = api.get(name).await.ok()?;
            let used = q.status?.used?;
            (used.get(resource)?.0 == want).then_some(())
        }
    })
    .await;
}

/// Creates the quota `name` with `hard` in the test's namespace and waits for its status:
/// the quotas' and pods' APIs.
async fn with_quota(c: &Cluster, name: &str, hard: Value) -> (Api<ResourceQuota>, Api<Pod>) {
    let client = c.client().await;
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &c.namespace);
    let first = hard
        .as_object()
        .and_then(|h| h.keys().next().cloned())
        .expect("a hard limit");
    quotas
        .create(&PostParams::default(), &quota(name, hard))
        .await
        .expect("quota");
    wait_used(&quotas, name, &first, "0").await;
    (quotas, Api::namespaced(client, &c.namespace))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quota_refuses_pods_that_leave_out_limits_or_exceed_it_and_frees_what_ended_pods_used() {
    let c = Cluster::start().await;
    let (quotas, pods) = with_quota(
        &c,
        "compute",
        json!({"limits.cpu": "1", "limits.memory": "1Gi", "pods": "5"}),
    )
    .await;
    let q = quotas.get("compute").await.expect("quota");
    let hard = q.status.and_then(|s| s.hard).expect("status.hard");
    assert_eq!(hard.get("limits.memory").map(|q| q.0.as_str()), Some("1Gi"));

    // Containers (a native sidecar too) that do not say what they use are named.
    let mut sidecar_pod = busybox_pod("unlimited", "true", json!({}));
    sidecar_pod["spec"]["initContainers"] = json!([{"name": "agentrun-sidecar", "image": "busybox:1.36",
        "restartPolicy": "Always", "command": ["sh", "-c", "sleep 30"]}]);
    let s = refusal(
        pods.create(&PostParams::default(), &typed(sidecar_pod))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        s.message,
        "pods \"unlimited\" is forbidden: failed quota: compute: must specify limits.cpu for: agentrun-sidecar,app; limits.memory for: agentrun-sidecar,app"
    );

    pods.create(
        &PostParams::default(),
        &typed(limited_pod("first", "true", "600m")),
    )
    .await
    .expect("within the quota");
    let s = refusal(
        pods.create(
            &PostParams::default(),
            &typed(limited_pod("second", "sleep 30", "500m")),
        )
        .await,
    );
    assert_eq!(
        s.message,
        "pods \"second\" is forbidden: exceeded quota: compute, requested: limits.cpu=500m, used: limits.cpu=600m, limited: limits.cpu=1"
    );

    // Once the first pod has ended its limits no longer count.
    wait_used(&quotas, "compute", "limits.cpu", "0").await;
    wait_used(&quotas, "compute", "pods", "0").await;
    pods.create(
        &PostParams::default(),
        &typed(limited_pod("second", "sleep 30", "500m")),
    )
    .await
    .expect("admitted once the first pod ended");
    wait_used(&quotas, "compute", "limits.cpu", "500m").await;
    wait_used(&quotas, "compute", "limits.memory", "64Mi").await;

    // A deleted pod frees its share as well.
    pods.delete(
        "second",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("delete");
    wait_used(&quotas, "compute", "limits.cpu", "0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pods_quota_usage_counts_native_sidecars_and_init_containers_like_kubernetes() {
    let c = Cluster::start().await;
    let (quotas, pods) =
        with_quota(&c, "req", json!({"requests.cpu": "2", "count/pods": "10"})).await;
    let container = |name: &str, cpu: &str, script: &str| {
        json!({"name": name, "image": "busybox:1.36", "command": ["sh", "-c", script],
               "resources": {"requests": {"cpu": cpu}}})
    };
    // Sidecar 200m + app 500m run together; the init container after the sidecar needs
    // 1 + 200m: the pod's requests are the larger, 1200m.
    let mut sidecar = container("sidecar", "200m", "sleep 60");
    sidecar["restartPolicy"] = json!("Always");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {
        "restartPolicy": "Never",
        "initContainers": [sidecar, container("setup", "1", "true")],
        "containers": [container("app", "500m", "sleep 60")]}});
    pods.create(&PostParams::default(), &typed(pod))
        .await
        .expect("pod");
    wait_used(&quotas, "req", "requests.cpu", "1200m").await;
    wait_used(&quotas, "req", "count/pods", "1").await;
    let s = refusal(
        pods.create(
            &PostParams::default(),
            &typed(json!({"metadata": {"name": "q"}, "spec": {
            "containers": [container("app", "900m", "true")]}})),
        )
        .await,
    );
    assert_eq!(
        s.message,
        "pods \"q\" is forbidden: exceeded quota: req, requested: requests.cpu=900m, used: requests.cpu=1200m, limited: requests.cpu=2"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_ranges_default_requests_and_limits_and_refuse_pods_outside_their_bounds() {
    let c = Cluster::start().await;
    let client = c.client().await;
    let ranges: Api<LimitRange> = Api::namespaced(client.clone(), &c.namespace);
    let pods: Api<Pod> = Api::namespaced(client, &c.namespace);
    let range: LimitRange = typed(json!({"metadata": {"name": "bounds"}, "spec": {"limits": [{
        "type": "Container", "max": {"cpu": "1"}, "min": {"memory": "64Mi"},
        "default": {"cpu": "500m", "memory": "128Mi"}, "defaultRequest": {"cpu": "100m"}}]}}));
    ranges
        .create(&PostParams::default(), &range)
        .await
        .expect("limit range");

    let mut pod = busybox_pod("defaults", "true", json!({}));
    pod["spec"]["initContainers"] =
        json!([{"name": "init", "image": "busybox:1.36", "command": ["true"]}]);
    let created = pods
        .create(&PostParams::default(), &typed(pod))
        .await
        .expect("pod");
    let v = serde_json::to_value(&created).expect("json");
    let want = json!({"limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}});
    assert_eq!(v["spec"]["containers"][0]["resources"], want);
    assert_eq!(v["spec"]["initContainers"][0]["resources"], want);
    assert_eq!(
        v["metadata"]["annotations"]["kubernetes.io/limit-ranger"],
        "LimitRanger plugin set: cpu, memory request for container app; cpu, memory limit for container app; \
         cpu, memory request for init container init; cpu, memory limit for init container init"
    );

    let mut big = busybox_pod("big", "true", json!({}));
    big["spec"]["containers"][0]["resources"] = json!({"limits": {"cpu": "2"}});
    let s = refusal(pods.create(&PostParams::default(), &typed(big)).await);
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        s.message,
        "pods \"big\" is forbidden: maximum cpu usage per Container is 1, but limit is 2"
    );
    let mut small = busybox_pod("small", "true", json!({}));
    small["spec"]["containers"][0]["resources"] = json!({"requests": {"memory": "32Mi"}});
    let s = refusal(pods.create(&PostParams::default(), &typed(small)).await);
    assert_eq!(
        s.message,
        "pods \"small\" is forbidden: minimum memory usage per Container is 64Mi, but request is 32Mi"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reported_server_version_is_configurable_and_pod_security_latest_follows_it() {
    let c = Cluster::start_with(Options {
        server_version: "v1.28.5".into(),
        kubelet: false,
        ..Options::default()
    })
    .await;
    if !c.is_sim() {
        eprintln!("a real cluster's version is its own: nothing to check");
        return;
    }
    let client = c.client().await;
    let v = client.apiserver_version().await.expect("version");
    assert_eq!(
        (v.major.as_str(), v.minor.as_str(), v.git_version.as_str()),
        ("1", "28", "v1.28.5")
    );
    let out = c.kubectl_ok(&["version", "-o", "json"]);
    let doc: Value = serde_json::from_str(&out).expect("kubectl version json");
    assert_eq!(doc["serverVersion"]["gitVersion"], "v1.28.5");

    // net.ipv4.tcp_keepalive_time is a safe sysctl from policy v1.29: baseline "latest" of a
    // 1.28 server forbids it.
    label_namespace(&c, &[("pod-security.kubernetes.io/enforce", "baseline")]).await;
    let pod = busybox_pod(
        "keepalive",
        "true",
        json!({"securityContext": {"sysctls": [{"name": "net.ipv4.tcp_keepalive_time", "value": "60"}]}}),
    );
    let pods: Api<Pod> = Api::namespaced(client, &c.namespace);
    let s = refusal(
        pods.create(&PostParams::default(), &typed(pod.clone()))
            .await,
    );
    assert_eq!(
        s.message,
        "pods \"keepalive\" is forbidden: violates PodSecurity \"baseline:latest\": forbidden sysctls (net.ipv4.tcp_keepalive_time)"
    );
    label_namespace(
        &c,
        &[("pod-security.kubernetes.io/enforce-version", "v1.29")],
    )
    .await;
    // A version newer than the server's is the server's.
    let s = refusal(pods.create(&PostParams::default(), &typed(pod)).await);
    assert!(
        s.message.contains("\"baseline:v1.29\": forbidden sysctls"),
        "{}",
        s.message
    );
}

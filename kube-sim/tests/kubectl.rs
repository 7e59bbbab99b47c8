//! kube-sim driven by the real kubectl binary: apply, get (tables with printer columns), -o
//! json, patch, delete, wait, logs and watch, and validation errors that name the field.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Cluster, fixture, kubectl_bin};
use serde_json::Value;

fn widget(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: test.agentrun.dev/v1\nkind: Widget\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

fn install_crd(c: &Cluster) {
    let crd = fixture("widgets-crd.yaml");
    c.kubectl_ok(&["apply", "-f", crd.to_str().expect("utf-8 path")]);
    c.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.test.agentrun.dev",
        "--timeout=30s",
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn crd_apply_get_patch_delete() {
    let c = Cluster::start().await;
    let ns = c.namespace.clone();
    install_crd(&c);
    let w = c.write("w1.yaml", &widget("w1", "  command: [echo, hi]\n"));
    let out = c.kubectl_ok(&["apply", "-n", &ns, "-f", w.to_str().expect("path")]);
    assert!(out.contains("widget.test.agentrun.dev/w1 created"), "{out}");
    // Applying the same file again changes nothing.
    let out = c.kubectl_ok(&["apply", "-n", &ns, "-f", w.to_str().expect("path")]);
    assert!(out.contains("unchanged"), "{out}");

    // Printer columns, short name and category.
    let table = c.kubectl_ok(&["get", "wd", "-n", &ns]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "PHASE", "SIZE", "AGE"], "{table}");
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..2],
        ["w1", "1"],
        "defaulted size shows, phase is empty: {table}"
    );
    let by_category = c.kubectl_ok(&["get", "agentrun-test", "-n", &ns, "-o", "name"]);
    assert_eq!(by_category.trim(), "widget.test.agentrun.dev/w1");

    // -o json carries the object with server-set metadata and schema defaults.
    let obj: Value =
        serde_json::from_str(&c.kubectl_ok(&["get", "widget", "w1", "-n", &ns, "-o", "json"]))
            .expect("json");
    assert_eq!(obj["spec"]["size"], 1);
    assert_eq!(obj["metadata"]["generation"], 1);
    assert!(
        obj["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36)
    );

    // Spec changes bump generation; status goes through the subresource only.
    c.kubectl_ok(&[
        "patch",
        "widget",
        "w1",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"size":3}}"#,
    ]);
    c.kubectl_ok(&[
        "patch",
        "widget",
        "w1",
        "-n",
        &ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Ready","observedGeneration":2}}"#,
    ]);
    c.kubectl_ok(&[
        "patch",
        "widget",
        "w1",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Ignored"}}"#,
    ]);
    let obj: Value =
        serde_json::from_str(&c.kubectl_ok(&["get", "widget", "w1", "-n", &ns, "-o", "json"]))
            .expect("json");
    assert_eq!(obj["metadata"]["generation"], 2);
    assert_eq!(obj["status"]["phase"], "Ready");
    let table = c.kubectl_ok(&["get", "wd", "w1", "-n", &ns, "--no-headers"]);
    let row: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(&row[..3], ["w1", "Ready", "3"], "{table}");

    c.kubectl_ok(&["delete", "widget", "w1", "-n", &ns]);
    let out = c.kubectl(&["get", "widget", "w1", "-n", &ns]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NotFound") && err.contains("\"w1\" not found"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_custom_resources_are_rejected_naming_the_field() {
    let c = Cluster::start().await;
    let ns = c.namespace.clone();
    install_crd(&c);
    let cases = [
        (
            "missing-command",
            "  size: 2\n",
            vec!["spec.command: Required value"],
        ),
        (
            "bad-variation",
            "  command: [x]\n  variations:\n  - name: Bad_Name\n",
            vec!["spec.variations[0].name", "should match"],
        ),
        (
            "too-big",
            "  command: [x]\n  size: 20\n",
            vec!["spec.size", "less than or equal to 10"],
        ),
        (
            "wrong-type",
            "  command: [x]\n  size: big\n",
            vec!["spec.size", "must be of type integer"],
        ),
        (
            "bad-enum",
            "  command: [x]\n  mode: medium\n",
            vec!["spec.mode", "Unsupported value: \"medium\""],
        ),
        (
            "dup",
            "  command: [x]\n  variations:\n  - name: a\n  - name: a\n",
            vec!["spec.variations[1]", "Duplicate value"],
        ),
        (
            "unknown-field",
            "  command: [x]\n  bogus: 1\n",
            vec!["unknown field \"spec.bogus\""],
        ),
    ];
    for (name, spec, needles) in cases {
        let f = c.write(&format!("{name}.yaml"), &widget(name, spec));
        let out = c.kubectl(&["apply", "-n", &ns, "-f", f.to_str().expect("path")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        for n in needles {
            assert!(err.contains(n), "{name}: expected {n:?} in: {err}");
        }
    }
    let out = c.kubectl_ok(&["get", "widgets", "-n", &ns, "-o", "name"]);
    assert_eq!(out.trim(), "", "no invalid widget was stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_runs_to_completion_and_kubectl_waits_and_reads_logs() {
    let c = Cluster::start().await;
    let ns = c.namespace.clone();
    let pod = c.write(
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hello\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: busybox\n    command: [sh, -c, 'echo hello from $(POD); exit 0']\n    env:\n    - name: POD\n      valueFrom:\n        fieldRef: {fieldPath: metadata.name}\n",
    );
    c.kubectl_ok(&["apply", "-n", &ns, "-f", pod.to_str().expect("path")]);
    c.kubectl_ok(&[
        "wait",
        "-n",
        &ns,
        "pod/hello",
        "--for=jsonpath={.status.phase}=Succeeded",
        "--timeout=60s",
    ]);
    let logs = c.kubectl_ok(&["logs", "-n", &ns, "hello"]);
    assert_eq!(logs, "hello from hello\n");
    let table = c.kubectl_ok(&["get", "pods", "-n", &ns, "--no-headers"]);
    let row: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(&row[..4], ["hello", "0/1", "Completed", "0"], "{table}");
    c.kubectl_ok(&["delete", "-n", &ns, "pod/hello"]);
    assert_eq!(
        c.kubectl_ok(&["get", "pods", "-n", &ns, "-o", "name"])
            .trim(),
        ""
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_get_watch_streams_changes() {
    let c = Cluster::start().await;
    let ns = c.namespace.clone();
    let cm = |name: &str| {
        let f = c.write(
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  a: '1'\n"
            ),
        );
        c.kubectl_ok(&["apply", "-n", &ns, "-f", f.to_str().expect("path")]);
    };
    // An object that exists before the watch starts: its ADDED line shows the watch is up.
    cm("first");
    let cache = c.dir.path().join("watch-cache");
    let mut child = std::process::Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .arg("--cache-dir")
        .arg(&cache)
        .args([
            "get",
            "configmaps",
            "-n",
            &ns,
            "-w",
            "--output-watch-events",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kubectl get -w");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut created, mut deleted) = (false, false);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => seen.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("kubectl get -w ended: {e}; saw {seen:?}"),
        }
        let has = |ev: &str, name: &str| {
            seen.iter()
                .any(|l| l.split_whitespace().take(2).eq([ev, name]))
        };
        if !created && has("ADDED", "first") {
            cm("watched");
            created = true;
        }
        if !deleted && has("ADDED", "watched") {
            c.kubectl_ok(&["delete", "configmap", "watched", "-n", &ns]);
            deleted = true;
        }
        if has("DELETED", "watched") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let watched: Vec<&String> = seen.iter().filter(|l| l.contains(" watched ")).collect();
    assert_eq!(
        watched.len(),
        2,
        "expected ADDED then DELETED, saw {seen:?}"
    );
    assert!(
        watched[0].starts_with("ADDED") && watched[1].starts_with("DELETED"),
        "{seen:?}"
    );
}

/// The kinds of object an install consists of are accepted and listed; deleting the namespace
/// deletes them.
#[tokio::test(flavor = "multi_thread")]
async fn install_objects_apply_and_namespace_deletion_removes_them() {
    let c = Cluster::start().await;
    let ns = c.namespace.clone();
    let f = fixture("install-objects.yaml");
    let out = c.kubectl_ok(&["apply", "-n", &ns, "-f", f.to_str().expect("path")]);
    assert_eq!(out.lines().count(), 11, "{out}");
    let again = c.kubectl_ok(&["apply", "-n", &ns, "-f", f.to_str().expect("path")]);
    // A Secret with stringData, and a PDB (its selector's patch strategy is "replace"), report
    // "configured" on every apply, on real clusters too.
    assert!(
        again
            .lines()
            .filter(|l| !l.starts_with("secret/") && !l.starts_with("poddisruptionbudget"))
            .all(|l| l.ends_with("unchanged")),
        "re-apply changes nothing: {again}"
    );
    let names = c.kubectl_ok(&[
        "get", "-n", &ns, "-o", "name",
        "deployments,statefulsets,services,secrets,serviceaccounts,roles,rolebindings,poddisruptionbudgets,ingresses,leases",
    ]);
    for want in [
        "deployment.apps/relay",
        "statefulset.apps/redis",
        "service/relay",
        "secret/redis",
        "serviceaccount/operator",
        "role.rbac.authorization.k8s.io/leases",
        "rolebinding.rbac.authorization.k8s.io/leases",
        "poddisruptionbudget.policy/relay",
        "ingress.networking.k8s.io/relay",
        "lease.coordination.k8s.io/agentrun-operator",
    ] {
        assert!(
            names.lines().any(|l| l == want),
            "missing {want} in {names}"
        );
    }
    let secret: Value =
        serde_json::from_str(&c.kubectl_ok(&["get", "secret", "redis", "-n", &ns, "-o", "json"]))
            .expect("json");
    assert_eq!(
        secret["data"]["password"], "aHVudGVyMg==",
        "stringData folds into data"
    );
    // A strategic merge patch on a Deployment merges containers by name.
    c.kubectl_ok(&[
        "patch", "deployment", "relay", "-n", &ns, "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"relay","image":"ghcr.io/agentrun/relay:0.2.0"}]}}}}"#,
    ]);
    let d: Value =
        serde_json::from_str(&c.kubectl_ok(&["get", "deploy", "relay", "-n", &ns, "-o", "json"]))
            .expect("json");
    let ctr = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(ctr["image"], "ghcr.io/agentrun/relay:0.2.0");
    assert_eq!(
        ctr["ports"][0]["containerPort"], 8080,
        "other fields kept: {ctr}"
    );
    c.kubectl_ok(&["delete", "clusterrole", "kube-sim-test-operator"]);

    if c.is_sim() {
        c.kubectl_ok(&["delete", "namespace", &ns, "--timeout=60s"]);
        let out = c.kubectl(&["get", "namespace", &ns]);
        assert!(!out.status.success(), "namespace still there");
        let out = c.kubectl_ok(&["get", "deployments,secrets,leases", "-A", "-o", "name"]);
        assert_eq!(out.trim(), "", "namespace content left behind: {out}");
    }
}

/// The `kube-sim` binary writes a kubeconfig, prints its URL, serves kubectl and stops on
/// SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn the_kube_sim_binary_serves_kubectl() {
    let dir = tempfile::tempdir().expect("tmp");
    let kc = dir.path().join("kubeconfig");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kube-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-kubelet",
            "--kubeconfig-out",
        ])
        .arg(&kc)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kube-sim");
    let mut url = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut url)
        .expect("read url");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let out = std::process::Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["get", "namespaces", "-o", "name"])
        .output()
        .expect("kubectl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "namespace/default\nnamespace/kube-node-lease\nnamespace/kube-public\nnamespace/kube-system\n"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kube-sim did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Role and RoleBinding for user `bob` (token `bob-token` in kube-sim's auth config) in `ns`.
fn pod_reader_role(ns: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: pod-reader\n  namespace: {ns}\nrules:\n- apiGroups: [\"\"]\n  resources: [pods, pods/log]\n  verbs: [get, list, watch]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: bob-reads-pods\n  namespace: {ns}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: pod-reader\nsubjects:\n- kind: User\n  name: bob\n  apiGroup: rbac.authorization.k8s.io\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn rbac_lets_a_user_read_pods_in_one_namespace_and_forbids_the_rest() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, DeleteParams, PostParams};

    let auth: kube_sim::AuthConfig =
        serde_yaml::from_str("users:\n- {token: bob-token, username: bob, groups: [developers]}\n")
            .expect("auth config");
    let c = Cluster::start_with(kube_sim::Options {
        auth,
        kubelet: false,
        // kubectl sends a kubeconfig's token only to an https server.
        tls: true,
        ..Default::default()
    })
    .await;
    let Some(sim) = &c.sim else {
        eprintln!(
            "bob's token comes from kube-sim's auth config; nothing to test on a real cluster"
        );
        return;
    };
    let ns = c.namespace.clone();
    let other = format!("{ns}-other");
    let setup = c.write(
        "setup.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {other}\n---\n{}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: {ns}\nspec:\n  containers:\n  - {{name: c, image: busybox, command: [sleep, '1']}}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: {other}\nspec:\n  containers:\n  - {{name: c, image: busybox, command: [sleep, '1']}}\n",
            pod_reader_role(&ns)
        ),
    );
    // The admin kubeconfig (no credentials) may do anything.
    c.kubectl_ok(&["apply", "-f", setup.to_str().expect("utf-8")]);

    // kube-rs with bob's token.
    let bob_kc = c.write(
        "bob.kubeconfig",
        &sim.kubeconfig_with_token("bob", "bob-token"),
    );
    let kc = kube::config::Kubeconfig::read_from(&bob_kc).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    let bob = kube::Client::try_from(cfg).expect("client");
    let mine: Api<Pod> = Api::namespaced(bob.clone(), &ns);
    assert_eq!(
        mine.list(&Default::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    mine.get("p").await.expect("get");
    let status = |r: Result<Pod, kube::Error>| match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    };
    let (code, reason, msg) = status(
        mine.delete("p", &DeleteParams::default())
            .await
            .map(|_| Pod::default()),
    );
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        msg,
        format!(
            "pods \"p\" is forbidden: User \"bob\" cannot delete resource \"pods\" in API group \"\" in the namespace \"{ns}\""
        )
    );
    let theirs: Api<Pod> = Api::namespaced(bob.clone(), &other);
    let (code, _, msg) = status(theirs.get("p").await);
    assert_eq!(code, 403);
    assert_eq!(
        msg,
        format!(
            "pods \"p\" is forbidden: User \"bob\" cannot get resource \"pods\" in API group \"\" in the namespace \"{other}\""
        )
    );
    let (code, _, msg) = status(theirs.create(&PostParams::default(), &Pod::default()).await);
    assert_eq!(code, 403);
    assert!(
        msg.starts_with("pods is forbidden: User \"bob\" cannot create resource \"pods\""),
        "{msg}"
    );
    let all: Api<Pod> = Api::all(bob.clone());
    let err = all
        .list(&Default::default())
        .await
        .expect_err("cluster-wide list");
    assert!(
        err.to_string()
            .contains("cannot list resource \"pods\" in API group \"\" at the cluster scope"),
        "{err}"
    );
    assert!(sim.denials.all().len() >= 4, "{:?}", sim.denials.all());

    // kubectl with the same token prints the same message.
    let kubectl = |kc: &std::path::Path, args: &[&str]| {
        std::process::Command::new(kubectl_bin())
            .arg("--kubeconfig")
            .arg(kc)
            .arg("--cache-dir")
            .arg(c.dir.path().join("bob-cache"))
            .args(args)
            .output()
            .expect("run kubectl")
    };
    let out = kubectl(&bob_kc, &["get", "pods", "-n", &ns, "-o", "name"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pod/p");
    let out = kubectl(&bob_kc, &["get", "pods", "-n", &other]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "Error from server (Forbidden): pods is forbidden: User \"bob\" cannot list resource \"pods\" in API group \"\" in the namespace \"{other}\""
        )
    );
    // SubjectAccessReviews consult the same RBAC objects (`kubectl auth can-i` sends
    // protobuf, which kube-sim does not decode, so the review is posted as JSON).
    let admin = c.client().await;
    for (namespace, allowed) in [(ns.as_str(), true), (other.as_str(), false)] {
        let body = serde_json::json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": "bob", "groups": ["developers", "system:authenticated"],
                     "resourceAttributes": {"verb": "list", "resource": "pods", "namespace": namespace}}});
        let req = http::Request::post("/apis/authorization.k8s.io/v1/subjectaccessreviews")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).expect("json"))
            .expect("request");
        let review: Value = admin.request(req).await.expect("review");
        assert_eq!(
            review["status"]["allowed"], allowed,
            "{namespace}: {review}"
        );
    }

    // An unknown token is 401, as kubectl reports it.
    let bad_kc = c.write(
        "bad.kubeconfig",
        &sim.kubeconfig_with_token("mallory", "not-a-token"),
    );
    let out = kubectl(&bad_kc, &["get", "pods", "-n", &ns]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("You must be logged in to the server (Unauthorized)"),
        "{err}"
    );
}

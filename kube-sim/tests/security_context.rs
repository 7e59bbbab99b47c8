//! kube-sim's kubelet applies security contexts as a real kubelet and container runtime do,
//! seen from inside the containers: the user, group, supplementary groups, capabilities and
//! no_new_privs a process gets (`id`, `/proc/self/status`), `runAsNonRoot` refusals with the
//! kubelet's messages, volume modes and `fsGroup` ownership, the termination message file,
//! `readOnlyRootFilesystem`, exec probes as the container's user, and image binaries pulled
//! where any user can run them. Needs root (kube-sim changes users with `setpriv`).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::Cluster;
use common::pods::{logs, phase, pod, sh, wait_for};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

/// What a container prints about itself: uid, gid, groups, capability sets, no_new_privs.
const WHO: &str =
    "id -u; id -g; id -G; grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' /proc/self/status";

/// The runtime's default capabilities for root (CHOWN ... AUDIT_WRITE), as /proc shows them.
const DEFAULT_CAPS: &str = "00000000a80425fb";
const NO_CAPS: &str = "0000000000000000";
/// CAP_NET_BIND_SERVICE alone.
const BIND_CAP: &str = "0000000000000400";
/// The default set and CAP_NET_ADMIN.
const DEFAULT_AND_NET_ADMIN: &str = "00000000a80435fb";

/// A process's identity as [`WHO`] prints it.
#[derive(Debug, PartialEq)]
struct Seen {
    uid: u32,
    gid: u32,
    groups: BTreeSet<u32>,
    /// `CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb`, `NoNewPrivs` and their values.
    status: BTreeMap<String, String>,
}

fn seen(log: &str) -> Seen {
    let mut lines = log.lines();
    let mut next = || {
        lines
            .next()
            .unwrap_or_else(|| panic!("short output: {log:?}"))
    };
    let number = |s: &str| {
        s.trim()
            .parse::<u32>()
            .unwrap_or_else(|_| panic!("{log:?}"))
    };
    let (uid, gid) = (number(next()), number(next()));
    let groups = next().split_whitespace().map(number).collect();
    let status = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    Seen {
        uid,
        gid,
        groups,
        status,
    }
}

/// The capability sets and no_new_privs a process should have: root gets its bounding set as
/// permitted and effective; other users get nothing but the bounding set.
fn status(root: bool, bounding: &str, no_new_privs: bool) -> BTreeMap<String, String> {
    let held = if root { bounding } else { NO_CAPS };
    [
        ("CapInh", NO_CAPS),
        ("CapPrm", held),
        ("CapEff", held),
        ("CapBnd", bounding),
        ("CapAmb", NO_CAPS),
        ("NoNewPrivs", if no_new_privs { "1" } else { "0" }),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn groups(g: &[u32]) -> BTreeSet<u32> {
    g.iter().copied().collect()
}

/// `sh(name, script)` with a container security context.
fn sh_as(name: &str, script: &str, sc: Value) -> Value {
    let mut c = sh(name, script);
    c["securityContext"] = sc;
    c
}

/// The status of the container `name` (main or init).
fn container<'a>(p: &'a Value, name: &str) -> &'a Value {
    ["containerStatuses", "initContainerStatuses"]
        .iter()
        .filter_map(|k| p["status"][k].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no status of {name}: {p}"))
}

/// None when users cannot be changed here (kube-sim not root): the test has nothing to check.
async fn cluster(opts: kube_sim::Options) -> Option<Cluster> {
    let c = Cluster::start_with(opts).await;
    if c.is_sim() && !kube_sim::kubelet::identities_available() {
        eprintln!("kube-sim runs containers as other users only as root (with setpriv)");
        return None;
    }
    Some(c)
}

/// Creates the pods.
async fn create(api: &Api<Pod>, pods: &[(&str, Value)]) {
    for (name, spec) in pods {
        api.create(&PostParams::default(), &pod(name, spec.clone()))
            .await
            .expect("create");
    }
}

/// Creates the pods and waits until each has succeeded.
async fn succeed(api: &Api<Pod>, pods: &[(&str, Value)]) {
    create(api, pods).await;
    for (name, _) in pods {
        wait_for(api, name, 60, "Succeeded", |p| phase(p) == "Succeeded").await;
    }
}

/// Asserts the logs of containers: pod, container, the whole log.
async fn assert_logs(api: &Api<Pod>, expected: &[(&str, &str, &str)]) {
    for (pod, ctr, log) in expected {
        assert_eq!(
            logs(api, pod, ctr).await,
            *log,
            "pod {pod}, container {ctr}"
        );
    }
}

fn images(yaml: &str) -> kube_sim::ImageMap {
    serde_yaml::from_str(yaml).expect("image map")
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_run_with_the_users_groups_and_capabilities_a_kubelet_gives_them() {
    let Some(c) = cluster(kube_sim::Options::default()).await else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let drop_all = json!({"drop": ["ALL"]});
    // The image's user (busybox: root), with the runtime's capabilities or fewer.
    let root = json!({"restartPolicy": "Never", "containers": [
        sh("image-user", WHO),
        sh_as("drop-all", WHO, json!({"capabilities": drop_all})),
        sh_as("bind-only", WHO, json!({"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}})),
        sh_as("no-escalation", WHO, json!({"allowPrivilegeEscalation": false})),
    ]});
    // A uid and group from the pod, with fsGroup and supplementalGroups; a non-root user holds
    // no capabilities whatever it adds, and writes the termination message file.
    let users = json!({"restartPolicy": "Never",
    "securityContext": {"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 2000, "supplementalGroups": [4000]},
    "containers": [
        sh("app", &format!("{WHO}; printf 'written by %s' $(id -u) > /dev/termination-log")),
        sh_as("adds-net-admin", WHO, json!({"capabilities": {"add": ["NET_ADMIN"]}})),
    ]});
    // OpenShift's restricted SCC: a random uid, no runAsGroup (gid 0), fsGroup.
    let openshift = json!({"restartPolicy": "Never",
        "securityContext": {"runAsUser": 1000680000, "fsGroup": 1000680000},
        "containers": [sh_as("app", WHO, json!({"allowPrivilegeEscalation": false, "runAsNonRoot": true, "capabilities": drop_all}))]});
    succeed(
        &api,
        &[("root", root), ("users", users), ("openshift", openshift)],
    )
    .await;

    for (ctr, bounding, no_new_privs) in [
        ("image-user", DEFAULT_CAPS, false),
        ("drop-all", NO_CAPS, false),
        ("bind-only", BIND_CAP, false),
        ("no-escalation", DEFAULT_CAPS, true),
    ] {
        let s = seen(&logs(&api, "root", ctr).await);
        assert_eq!((s.uid, s.gid), (0, 0), "{ctr}: {s:?}");
        assert!(s.groups.contains(&0), "{ctr}: {s:?}");
        assert_eq!(s.status, status(true, bounding, no_new_privs), "{ctr}");
    }

    let s = seen(&logs(&api, "users", "app").await);
    assert_eq!(
        (s.uid, s.gid, s.groups),
        (1000, 3000, groups(&[3000, 2000, 4000]))
    );
    assert_eq!(s.status, status(false, DEFAULT_CAPS, false));
    let s = seen(&logs(&api, "users", "adds-net-admin").await);
    assert_eq!(s.uid, 1000);
    assert_eq!(s.status, status(false, DEFAULT_AND_NET_ADMIN, false));
    let p = api.get("users").await.expect("get");
    let p = serde_json::to_value(&p).expect("json");
    assert_eq!(
        container(&p, "app")["state"]["terminated"]["message"],
        "written by 1000",
        "the termination message file is writable by any user"
    );

    let s = seen(&logs(&api, "openshift", "app").await);
    assert_eq!(
        (s.uid, s.gid, s.groups),
        (1000680000, 0, groups(&[0, 1000680000]))
    );
    assert_eq!(s.status, status(false, NO_CAPS, true));
}

#[tokio::test(flavor = "multi_thread")]
async fn run_as_non_root_refuses_root_and_non_numeric_image_users_with_the_kubelets_messages() {
    let Some(c) = cluster(kube_sim::Options {
        images: images(
            "images:\n  example.com/named: {user: nobody}\n  example.com/distroless: {user: \"65532:65532\"}\n",
        ),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    if !c.is_sim() {
        eprintln!(
            "the images' users come from kube-sim's image map; nothing to test on a real cluster"
        );
        return;
    }
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let non_root = json!({"runAsNonRoot": true});
    let image = |mut ctr: Value, image: &str| {
        ctr["image"] = json!(image);
        ctr
    };
    let refused = [
        // busybox declares no user: root.
        (
            "root-image",
            json!({"securityContext": non_root, "containers": [sh("main", "id -u")]}),
        ),
        (
            "named-image",
            json!({"containers": [image(sh_as("main", "id -u", non_root.clone()), "example.com/named")]}),
        ),
        (
            "root-user",
            json!({"securityContext": {"runAsUser": 0}, "containers": [sh_as("main", "id -u", non_root.clone())]}),
        ),
        (
            "root-init",
            json!({"initContainers": [sh_as("init", "id -u", non_root.clone())], "containers": [sh("main", "id -u")]}),
        ),
    ];
    create(&api, &refused).await;
    let runs = [
        // A numeric user passes the check; a name passes with a numeric runAsUser.
        (
            "distroless",
            json!({"restartPolicy": "Never", "containers": [image(sh_as("main", WHO, non_root.clone()), "example.com/distroless")]}),
        ),
        (
            "named-with-uid",
            json!({"restartPolicy": "Never", "securityContext": {"runAsUser": 1000, "runAsNonRoot": true},
                "containers": [image(sh("main", WHO), "example.com/named")]}),
        ),
        // A name without runAsNonRoot runs as that user, from the passwd file.
        (
            "named",
            json!({"restartPolicy": "Never", "containers": [image(sh("main", &format!("{WHO}; echo HOME=$HOME")), "example.com/named")]}),
        ),
    ];
    // The runtime knows capabilities without the `CAP_` prefix only (containerd 1.7).
    let bad_cap = json!({"containers": [sh_as("main", "id -u", json!({"capabilities": {"add": ["CAP_NET_ADMIN"]}}))]});
    create(&api, &[("bad-capability", bad_cap)]).await;
    succeed(&api, &runs).await;
    let message = |name: &str, ctr: &str, p: &Value| {
        let d = format!(
            "\"{name}_{}({})\"",
            c.namespace,
            p["metadata"]["uid"].as_str().expect("uid")
        );
        match name {
            "named-image" => format!(
                "container has runAsNonRoot and image has non-numeric user (nobody), cannot verify user is non-root (pod: {d}, container: {ctr})"
            ),
            "root-user" => {
                format!("container's runAsUser breaks non-root policy (pod: {d}, container: {ctr})")
            }
            _ => format!(
                "container has runAsNonRoot and image will run as root (pod: {d}, container: {ctr})"
            ),
        }
    };
    for (name, _) in &refused {
        let ctr = if *name == "root-init" { "init" } else { "main" };
        let p = wait_for(&api, name, 30, "CreateContainerConfigError", |p| {
            container(p, ctr)["state"]["waiting"]["reason"] == "CreateContainerConfigError"
        })
        .await;
        assert_eq!(
            container(&p, ctr)["state"]["waiting"]["message"],
            message(name, ctr, &p).as_str(),
            "{p}"
        );
    }
    let p = wait_for(&api, "bad-capability", 30, "CreateContainerError", |p| {
        container(p, "main")["state"]["waiting"]["reason"] == "CreateContainerError"
    })
    .await;
    let msg = container(&p, "main")["state"]["waiting"]["message"].as_str();
    assert!(
        msg.is_some_and(|m| m.ends_with("invalid capability: CAP_CAP_NET_ADMIN")),
        "{p}"
    );
    let s = seen(&logs(&api, "distroless", "main").await);
    assert_eq!((s.uid, s.gid, s.groups), (65532, 65532, groups(&[65532])));
    let s = seen(&logs(&api, "named-with-uid", "main").await);
    assert_eq!(
        (s.uid, s.gid),
        (1000, 0),
        "a uid the image does not know gets gid 0"
    );
    let log = logs(&api, "named", "main").await;
    let s = seen(&log);
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("passwd")
        .expect("nobody");
    assert_eq!(
        (s.uid, s.gid),
        (nobody.uid.as_raw(), nobody.gid.as_raw()),
        "{log}"
    );
    assert!(
        log.ends_with(&format!("HOME={}\n", nobody.dir.display())),
        "{log}"
    );

    // Long after the others finished, the refused pods are still Pending and never ran: no
    // process, no restarts, no crash loop.
    for (name, _) in &refused {
        let p = serde_json::to_value(api.get(name).await.expect("get")).expect("json");
        assert_eq!(phase(&p), "Pending", "{p}");
        let ctr = container(&p, if *name == "root-init" { "init" } else { "main" });
        assert_eq!(
            ctr["state"]["waiting"]["reason"],
            "CreateContainerConfigError"
        );
        assert_eq!(ctr["restartCount"], 0, "{p}");
        assert!(ctr.get("containerID").is_none(), "{p}");
    }
    let events = c.kubectl_ok(&[
        "get",
        "events",
        "-n",
        &c.namespace,
        "--field-selector",
        "involvedObject.name=root-image",
        "-o",
        "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
    ]);
    let refusal = message(
        "root-image",
        "main",
        &serde_json::to_value(api.get("root-image").await.expect("get")).expect("json"),
    );
    assert!(
        events.contains(&format!("Failed: Error: {refusal}\n")),
        "{events}"
    );
    assert!(!events.contains("Started"), "{events}");
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_dirs_are_0777_and_an_fs_group_shares_them_between_users() {
    let Some(c) = cluster(kube_sim::Options::default()).await else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let mount = json!([{"name": "data", "mountPath": "/data"}]);
    let with_data = |mut ctr: Value| {
        ctr["volumeMounts"] = mount.clone();
        ctr
    };
    let volumes = json!([{"name": "data", "emptyDir": {}}]);
    let plain = json!({"restartPolicy": "Never", "volumes": volumes,
        "containers": [with_data(sh("main", "stat -c '%a %u %g' /data"))]});
    // uid 1000 writes a group-writable and a private file; uid 3000 can append to the first
    // through the fsGroup, not to the second.
    let writer = "stat -c '%a %u %g' /data; umask 002; echo a > /data/shared; umask 022; echo p > /data/private; stat -c '%a %u %g' /data/shared /data/private";
    let other = "(echo b >> /data/shared) 2>/dev/null && echo appended; (echo x >> /data/private) 2>/dev/null || echo refused; cat /data/shared";
    let shared = json!({"restartPolicy": "Never", "volumes": volumes,
        "securityContext": {"fsGroup": 2000},
        "initContainers": [with_data(sh_as("writer", writer, json!({"runAsUser": 1000})))],
        "containers": [with_data(sh_as("other", other, json!({"runAsUser": 3000})))]});
    succeed(&api, &[("plain", plain), ("shared", shared)]).await;
    // Group-owned by the fsGroup with setgid: files made in it get the group.
    let modes = "2777 0 2000\n664 1000 2000\n644 1000 2000\n";
    let appended = "appended\nrefused\na\nb\n";
    let expected = [
        ("plain", "main", "777 0 0\n"),
        ("shared", "writer", modes),
        ("shared", "other", appended),
    ];
    assert_logs(&api, &expected).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_volume_modes_and_the_fs_group_decide_who_reads_them() {
    let Some(c) = cluster(kube_sim::Options::default()).await else {
        return;
    };
    let client = c.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), &c.namespace);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &c.namespace);
    let secret = serde_json::from_value(
        json!({"metadata": {"name": "tls"}, "stringData": {"tls.key": "secret-key"}}),
    )
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client, &c.namespace);
    let cm = serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"a": "x"}}))
        .expect("configmap");
    maps.create(&PostParams::default(), &cm)
        .await
        .expect("create configmap");
    // The operator's TLS volume: defaultMode 0440 for the sidecar's group.
    let volumes = json!([
        {"name": "tls", "secret": {"secretName": "tls", "defaultMode": 0o440}},
        {"name": "strict", "secret": {"secretName": "tls", "items": [{"key": "tls.key", "path": "key", "mode": 0o400}]}},
        {"name": "cfg", "configMap": {"name": "cfg"}},
    ]);
    let mounts = json!([
        {"name": "tls", "mountPath": "/tls", "readOnly": true},
        {"name": "strict", "mountPath": "/strict", "readOnly": true},
        {"name": "cfg", "mountPath": "/cfg"},
    ]);
    // The configMap is mounted read-only although its volumeMount does not say so.
    let script = "stat -L -c '%a %g' /tls/tls.key /strict/key /cfg/a; (touch /cfg/b) 2>/dev/null || echo read-only; cat /tls/tls.key 2>/dev/null || echo refused";
    let mut ctr = sh("main", script);
    ctr["volumeMounts"] = mounts;
    let grouped = json!({"restartPolicy": "Never", "volumes": volumes, "containers": [ctr],
        "securityContext": {"runAsUser": 1000, "fsGroup": 2000}});
    // Not gid 0 either (that is root's group, which may read root's 0440 files).
    let mut ungrouped = grouped.clone();
    ungrouped["securityContext"] = json!({"runAsUser": 1000, "runAsGroup": 3000});
    succeed(&api, &[("grouped", grouped), ("ungrouped", ungrouped)]).await;
    // Modes as asked, group read added for the fsGroup (0400 becomes 0440); without an
    // fsGroup, root's files are not the user's to read.
    let grouped_log = "440 2000\n440 2000\n644 2000\nread-only\nsecret-key";
    let ungrouped_log = "440 0\n400 0\n644 0\nread-only\nrefused\n";
    assert_logs(&api, &[("grouped", "main", grouped_log)]).await;
    assert_logs(&api, &[("ungrouped", "main", ungrouped_log)]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_root_filesystems_leave_volumes_and_the_termination_log_writable() {
    let Some(c) = cluster(kube_sim::Options::default()).await else {
        return;
    };
    if c.is_sim() && !kube_sim::kubelet::namespaces_available() {
        eprintln!("a read-only root needs kube-sim's mount namespaces");
        return;
    }
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let probe_file = "/etc/kube-sim-read-only-root-check";
    let script = format!(
        "touch {probe_file} 2>/dev/null && echo root-writable || echo root-read-only; touch /data/x && echo volume-writable; printf done > /dev/termination-log"
    );
    let mut ctr = sh_as("main", &script, json!({"readOnlyRootFilesystem": true}));
    ctr["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
    let spec = json!({"restartPolicy": "Never", "volumes": [{"name": "data", "emptyDir": {}}], "containers": [ctr]});
    succeed(&api, &[("ro", spec)]).await;
    let p = serde_json::to_value(api.get("ro").await.expect("get")).expect("json");
    let log = logs(&api, "ro", "main").await;
    if c.is_sim() {
        let _ = std::fs::remove_file(probe_file);
    }
    assert_eq!(log, "root-read-only\nvolume-writable\n");
    assert_eq!(
        container(&p, "main")["state"]["terminated"]["message"],
        "done"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_probes_run_as_the_containers_user() {
    let Some(c) = cluster(kube_sim::Options::default()).await else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let mut ctr = sh_as("main", "sleep 60", json!({"runAsUser": 1000}));
    ctr["readinessProbe"] =
        json!({"exec": {"command": ["sh", "-c", "test \"$(id -u)\" = 1000"]}, "periodSeconds": 1});
    create(&api, &[("probed", json!({"containers": [ctr]}))]).await;
    wait_for(&api, "probed", 60, "Ready", |p| {
        p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
    .await;
    api.delete("probed", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete");
}

#[tokio::test(flavor = "multi_thread")]
async fn mapped_images_are_pulled_where_any_user_can_run_them() {
    // A build directory only root can enter, like a target directory under /root.
    let build = tempfile::tempdir().expect("tmp");
    let tool = build.path().join("tool");
    let helper = build.path().join("helper");
    std::fs::write(
        &tool,
        "#!/bin/sh\nexec \"$(dirname \"$0\")/helper\" \"$@\"\n",
    )
    .expect("write");
    std::fs::write(
        &helper,
        "#!/bin/sh\necho \"helper as $(id -u):$(id -g): $*\"\n",
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt;
    for f in [&tool, &helper] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    let map = format!(
        "images:\n  example.com/tool:\n    binary: {}\n    files: [{}]\n    user: \"1000:1000\"\n",
        tool.display(),
        helper.display()
    );
    let Some(c) = cluster(kube_sim::Options {
        images: images(&map),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    if !c.is_sim() {
        eprintln!("image maps are a kube-sim feature; nothing to test on a real cluster");
        return;
    }
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let spec = json!({"restartPolicy": "Never", "containers": [
        {"name": "main", "image": "example.com/tool:1", "args": ["hi"], "securityContext": {"runAsNonRoot": true}},
        {"name": "other-user", "image": "example.com/tool:1", "args": ["there"], "securityContext": {"runAsUser": 65534, "runAsGroup": 65534}},
    ]});
    succeed(&api, &[("pulled", spec)]).await;
    assert_logs(
        &api,
        &[
            ("pulled", "main", "helper as 1000:1000: hi\n"),
            ("pulled", "other-user", "helper as 65534:65534: there\n"),
        ],
    )
    .await;
}

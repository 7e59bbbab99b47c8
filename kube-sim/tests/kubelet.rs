//! kube-sim's kubelet driven through the kube-rs client: pods run as host processes with
//! exit codes, init containers and native sidecars, emptyDir volumes, env resolution,
//! restarts, deadlines, graceful deletion, scheduling failures, image maps, reviews and pod
//! network namespaces.

mod common;

use std::time::{Duration, Instant};

use common::pods::{logs, phase, pod, sh, wait_for};
use common::{Cluster, eventually};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, LogParams, PostParams};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn pod_exit_codes_and_restart_policies() {
    let c = Cluster::start().await;
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    api.create(&PostParams::default(), &pod("fails", json!({"restartPolicy": "Never", "containers": [sh("main", "echo out; echo err >&2; exit 7")]})))
        .await
        .expect("create");
    let p = wait_for(&api, "fails", 60, "Failed", |p| phase(p) == "Failed").await;
    let t = &p["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(t["exitCode"], 7, "{p}");
    assert_eq!(t["reason"], "Error");
    assert_eq!(logs(&api, "fails", "main").await, "out\nerr\n");

    // OnFailure: restarted until it succeeds (a counter in an emptyDir survives restarts).
    let script = "n=$(cat /state/n 2>/dev/null || echo 0); echo run $n; echo $((n+1)) > /state/n; [ $n -ge 1 ]";
    let mut ctr = sh("main", script);
    ctr["volumeMounts"] = json!([{"name": "state", "mountPath": "/state"}]);
    api.create(
        &PostParams::default(),
        &pod(
            "retries",
            json!({"restartPolicy": "OnFailure", "containers": [ctr],
        "volumes": [{"name": "state", "emptyDir": {}}]}),
        ),
    )
    .await
    .expect("create");
    let p = wait_for(&api, "retries", 90, "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let cs = &p["status"]["containerStatuses"][0];
    assert_eq!(cs["restartCount"], 1, "{p}");
    assert_eq!(cs["state"]["terminated"]["exitCode"], 0);
    assert_eq!(cs["lastState"]["terminated"]["exitCode"], 1);
    // Logs are those of the current instance; --previous shows the one before.
    assert_eq!(logs(&api, "retries", "main").await, "run 1\n");
    let previous = api
        .logs(
            "retries",
            &LogParams {
                container: Some("main".into()),
                previous: true,
                ..Default::default()
            },
        )
        .await
        .expect("previous logs");
    assert_eq!(previous, "run 0\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn init_containers_native_sidecars_and_shared_empty_dir() {
    let c = Cluster::start().await;
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let mount = json!([{"name": "shared", "mountPath": "/agentrun"}]);
    let mut sidecar = sh(
        "sidecar",
        "echo started >> /agentrun/log; sleep 0.3; exit 1",
    );
    sidecar["restartPolicy"] = json!("Always");
    // The sidecar runs alongside the init containers that follow it.
    let init = sh(
        "init",
        "until grep -q started /agentrun/log; do sleep 0.05; done; echo init >> /agentrun/log",
    );
    let main = sh(
        "main",
        "while [ $(grep -c started /agentrun/log) -lt 2 ]; do sleep 0.1; done; cat /agentrun/log",
    );
    let mut spec = json!({"restartPolicy": "Never", "initContainers": [sidecar, init], "containers": [main],
        "volumes": [{"name": "shared", "emptyDir": {}}]});
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_array_mut().expect("list") {
            c["volumeMounts"] = mount.clone();
        }
    }
    api.create(&PostParams::default(), &pod("sidecars", spec))
        .await
        .expect("create");
    let p = wait_for(&api, "sidecars", 90, "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let out = logs(&api, "sidecars", "main").await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"started"), "{out}");
    assert_eq!(lines.iter().filter(|l| **l == "init").count(), 1, "{out}");
    assert!(
        lines.iter().filter(|l| **l == "started").count() >= 2,
        "{out}"
    );
    let side = &p["status"]["initContainerStatuses"][0];
    assert!(
        side["restartCount"].as_i64().unwrap_or(0) >= 1,
        "crashed sidecar is restarted: {p}"
    );
    assert_eq!(
        p["status"]["initContainerStatuses"][1]["state"]["terminated"]["exitCode"],
        0
    );

    // Each pod has its own emptyDir at the same mountPath.
    for name in ["iso-a", "iso-b"] {
        let mut ctr = sh(
            "main",
            &format!("echo {name} > /agentrun/who; sleep 1; cat /agentrun/who; ls /agentrun"),
        );
        ctr["volumeMounts"] = mount.clone();
        api.create(
            &PostParams::default(),
            &pod(
                name,
                json!({"restartPolicy": "Never", "containers": [ctr],
            "volumes": [{"name": "shared", "emptyDir": {}}]}),
            ),
        )
        .await
        .expect("create");
    }
    for name in ["iso-a", "iso-b"] {
        wait_for(&api, name, 60, "Succeeded", |p| phase(p) == "Succeeded").await;
        assert_eq!(logs(&api, name, "main").await, format!("{name}\nwho\n"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn env_from_values_fields_secrets_and_config_maps() {
    let c = Cluster::start().await;
    let client = c.client().await;
    let ns = c.namespace.clone();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}}),
            )
            .expect("secret"),
        )
        .await
        .expect("secret");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "settings"}, "data": {"mode": "fast", "level": "3"}}),
        )
        .expect("cm"),
    )
    .await
    .expect("cm");
    let api: Api<Pod> = Api::namespaced(client, &ns);
    let mut ctr = sh(
        "main",
        "echo \"$NAME $NS $APP $PASSWORD $MODE $GREETING $CFG_level\"; echo \"$UID\" | grep -Eq '^[0-9a-f-]{36}$' && echo uid-ok",
    );
    ctr["env"] = json!([
        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['suite']"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        {"name": "GREETING", "value": "hi-$(NAME)"},
    ]);
    ctr["envFrom"] = json!([{"prefix": "CFG_", "configMapRef": {"name": "settings"}}]);
    api.create(
        &PostParams::default(),
        &pod(
            "env",
            json!({"restartPolicy": "Never", "containers": [ctr]}),
        ),
    )
    .await
    .expect("create");
    wait_for(&api, "env", 60, "Succeeded", |p| phase(p) == "Succeeded").await;
    assert_eq!(
        logs(&api, "env", "main").await,
        format!("env {ns} kubelet s3cret fast hi-env 3\nuid-ok\n")
    );

    // A missing secret keeps the container waiting with the kubelet's reason.
    let mut ctr = sh("main", "true");
    ctr["env"] =
        json!([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]);
    api.create(
        &PostParams::default(),
        &pod("no-secret", json!({"containers": [ctr]})),
    )
    .await
    .expect("create");
    wait_for(&api, "no-secret", 60, "CreateContainerConfigError", |p| {
        p.pointer("/status/containerStatuses/0/state/waiting/reason")
            == Some(&json!("CreateContainerConfigError"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deadlines_scheduling_failures_and_graceful_deletion() {
    let c = Cluster::start().await;
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    api.create(
        &PostParams::default(),
        &pod(
            "slow",
            json!({"restartPolicy": "Never", "activeDeadlineSeconds": 2,
        "containers": [sh("main", "sleep 60")]}),
        ),
    )
    .await
    .expect("create");
    let p = wait_for(&api, "slow", 60, "DeadlineExceeded", |p| {
        phase(p) == "Failed"
    })
    .await;
    assert_eq!(p["status"]["reason"], "DeadlineExceeded", "{p}");

    api.create(
        &PostParams::default(),
        &pod(
            "nowhere",
            json!({"nodeSelector": {"disktype": "quantum"},
        "containers": [sh("main", "true")]}),
        ),
    )
    .await
    .expect("create");
    let p = wait_for(&api, "nowhere", 30, "Unschedulable", |p| {
        p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["type"] == "PodScheduled"
                    && c["status"] == "False"
                    && c["reason"] == "Unschedulable"
            })
        })
    })
    .await;
    assert_eq!(phase(&p), "Pending");
    assert!(p.pointer("/spec/nodeName").is_none());

    // The scheduler and kubelet record Events, as kubectl describe shows them.
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(c.client().await, &c.namespace);
    for (pod_name, reason) in [
        ("nowhere", "FailedScheduling"),
        ("slow", "Started"),
        ("slow", "DeadlineExceeded"),
    ] {
        let lp =
            kube::api::ListParams::default().fields(&format!("involvedObject.name={pod_name}"));
        eventually(30, &format!("{reason} event for {pod_name}"), || {
            let events = events.clone();
            let lp = lp.clone();
            async move {
                let list = events.list(&lp).await.ok()?;
                list.items
                    .iter()
                    .any(|e| e.reason.as_deref() == Some(reason))
                    .then_some(())
            }
        })
        .await;
    }

    // SIGTERM first: a pod that exits on TERM goes quickly, one that ignores it is killed
    // after its grace period.
    api.create(
        &PostParams::default(),
        &pod(
            "polite",
            json!({"terminationGracePeriodSeconds": 30,
        "containers": [sh("main", "trap 'exit 0' TERM; while true; do sleep 0.1; done")]}),
        ),
    )
    .await
    .expect("create");
    api.create(
        &PostParams::default(),
        &pod(
            "stubborn",
            json!({"terminationGracePeriodSeconds": 2,
        "containers": [sh("main", "trap '' TERM; echo trapped; while true; do sleep 0.1; done")]}),
        ),
    )
    .await
    .expect("create");
    for name in ["polite", "stubborn"] {
        wait_for(&api, name, 60, "Running", |p| phase(p) == "Running").await;
    }
    // Running is reported once the process started; SIGTERM is ignored once the trap is set.
    eventually(30, "stubborn ignores SIGTERM", || {
        let api = api.clone();
        async move {
            let log = api.logs("stubborn", &LogParams::default()).await.ok()?;
            log.contains("trapped").then_some(())
        }
    })
    .await;
    let gone = |name: &'static str| {
        let api = api.clone();
        async move {
            let start = Instant::now();
            api.delete(name, &DeleteParams::default())
                .await
                .expect("delete");
            eventually(30, &format!("{name} gone"), || {
                let api = api.clone();
                async move { api.get_opt(name).await.ok()?.is_none().then_some(()) }
            })
            .await;
            start.elapsed()
        }
    };
    let (polite, stubborn) = tokio::join!(gone("polite"), gone("stubborn"));
    assert!(
        polite < Duration::from_secs(10),
        "polite pod took {polite:?}"
    );
    assert!(
        stubborn >= Duration::from_millis(1800),
        "stubborn pod was killed before its grace: {stubborn:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn image_map_and_strict_images() {
    let dir = tempfile::tempdir().expect("tmp");
    let images = dir.path().join("images.yaml");
    std::fs::write(&images, "images:\n  example.com/agentrun/echo: /bin/echo\n  example.com/agentrun/shell: {prefix: [sh, -c]}\n").expect("write");
    let c = Cluster::start_with(kube_sim::Options {
        images: kube_sim::ImageMap::load(&images).expect("image map"),
        strict_images: true,
        ..Default::default()
    })
    .await;
    if !c.is_sim() {
        eprintln!("image maps are a kube-sim feature; nothing to test on a real cluster");
        return;
    }
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    // The image is one binary: it replaces command[0].
    api.create(&PostParams::default(), &pod("mapped", json!({"restartPolicy": "Never", "containers": [
        {"name": "main", "image": "example.com/agentrun/echo:v1.2.3", "command": ["/usr/local/bin/echo-tool", "mapped"], "args": ["ok"]},
        {"name": "prefixed", "image": "example.com/agentrun/shell", "args": ["echo prefixed"]},
    ]})))
    .await
    .expect("create");
    wait_for(&api, "mapped", 60, "Succeeded", |p| phase(p) == "Succeeded").await;
    assert_eq!(logs(&api, "mapped", "main").await, "mapped ok\n");
    assert_eq!(logs(&api, "mapped", "prefixed").await, "prefixed\n");

    api.create(
        &PostParams::default(),
        &pod(
            "unknown",
            json!({"containers": [
        {"name": "main", "image": "registry.invalid/none:1", "command": ["true"]}]}),
        ),
    )
    .await
    .expect("create");
    let p = wait_for(&api, "unknown", 30, "ImagePullBackOff", |p| {
        p.pointer("/status/containerStatuses/0/state/waiting/reason")
            == Some(&json!("ImagePullBackOff"))
    })
    .await;
    assert_eq!(phase(&p), "Pending");
    let table = c.kubectl_ok(&["get", "pod", "unknown", "-n", &c.namespace, "--no-headers"]);
    assert!(table.contains("ImagePullBackOff"), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_and_subject_access_reviews_follow_the_auth_config() {
    let auth: kube_sim::AuthConfig = serde_yaml::from_str(
        "users:\n- {token: alice-token, username: alice, uid: '1', groups: [viewers]}\nrules:\n- {subjects: ['group:viewers'], verbs: [get, list, watch], apiGroups: [agentrun.dev], resources: [agentruns], namespaces: [team-a]}\n",
    )
    .expect("auth config");
    let c = Cluster::start_with(kube_sim::Options {
        auth,
        ..Default::default()
    })
    .await;
    if !c.is_sim() {
        eprintln!("users come from kube-sim's auth config; nothing to test on a real cluster");
        return;
    }
    let client = c.client().await;
    let post = |path: &'static str, body: Value| {
        let client = client.clone();
        async move {
            let req = http::Request::post(path)
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body).expect("json"))
                .expect("request");
            client.request::<Value>(req).await.expect("review")
        }
    };
    let tr = post(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        json!({"apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview", "spec": {"token": "alice-token"}}),
    )
    .await;
    assert_eq!(tr["status"]["authenticated"], true);
    assert_eq!(tr["status"]["user"]["username"], "alice");
    let tr = post(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        json!({"spec": {"token": "wrong"}}),
    )
    .await;
    assert_eq!(tr["status"]["authenticated"], false);
    let sar = |verb: &str, ns: &str| {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
            "user": "alice", "groups": ["viewers"],
            "resourceAttributes": {"verb": verb, "group": "agentrun.dev", "resource": "agentruns", "namespace": ns}}})
    };
    let path = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
    assert_eq!(
        post(path, sar("get", "team-a")).await["status"]["allowed"],
        true
    );
    assert_eq!(
        post(path, sar("delete", "team-a")).await["status"]["allowed"],
        false
    );
    assert_eq!(
        post(path, sar("get", "team-b")).await["status"]["allowed"],
        false
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_get_their_own_network_namespace() {
    let c = Cluster::start_with(kube_sim::Options {
        pod_network: true,
        ..Default::default()
    })
    .await;
    if !c.is_sim() {
        eprintln!("pod networking is the cluster's own on a real cluster; nothing to test");
        return;
    }
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    // Two pods listen on the same port; neither collides with the other or with the host.
    let server = env!("CARGO_BIN_EXE_kube-sim");
    for name in ["net-a", "net-b"] {
        api.create(
            &PostParams::default(),
            &pod(
                name,
                json!({"containers": [{"name": "main", "image": "kube-sim",
            "command": [server, "--listen", "0.0.0.0:18081", "--no-kubelet"],
            "ports": [{"name": "api", "containerPort": 18081}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "api"}, "periodSeconds": 1}}]}),
            ),
        )
        .await
        .expect("create");
    }
    let mut ips = Vec::new();
    for name in ["net-a", "net-b"] {
        let p = wait_for(
            &api,
            name,
            60,
            "Ready through its httpGet readiness probe",
            |p| {
                p["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            },
        )
        .await;
        ips.push(
            p["status"]["podIP"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_ne!(ips[0], ips[1]);
    for ip in &ips {
        eventually(30, &format!("{ip}:18081 answers"), || {
            let ip = ip.clone();
            async move {
                tokio::net::TcpStream::connect((ip.as_str(), 18081))
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
    }
    for name in ["net-a", "net-b"] {
        let p = api.get(name).await.expect("get");
        let v = serde_json::to_value(&p).expect("json");
        assert_eq!(
            v["status"]["containerStatuses"][0]["restartCount"], 0,
            "{name} crashed: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_gate_start_readiness_and_liveness() {
    let c = Cluster::start().await;
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let mount = json!([{"name": "shared", "mountPath": "/probes"}]);
    let exec = |cmd: &str, period: u64, failures: u64| json!({"exec": {"command": ["sh", "-c", cmd]}, "periodSeconds": period, "failureThreshold": failures});
    // A native sidecar with a startup probe holds back the main container until it passes.
    let mut sidecar = sh("sidecar", "sleep 1.5; touch /probes/up; exec sleep 600");
    sidecar["restartPolicy"] = json!("Always");
    sidecar["startupProbe"] = exec("test -f /probes/up", 1, 30);
    // Readiness follows the probe; liveness failures kill and restart the container.
    let mut main = sh(
        "main",
        "test -f /probes/up || exit 99; sleep 2; touch /probes/ready; sleep 600",
    );
    main["readinessProbe"] = exec("test -f /probes/ready", 1, 1);
    let mut doomed = sh("doomed", "touch /probes/dead; exec sleep 600");
    doomed["livenessProbe"] = exec("test ! -f /probes/dead", 1, 1);
    let mut spec = json!({"initContainers": [sidecar], "containers": [main, doomed],
        "volumes": [{"name": "shared", "emptyDir": {}}]});
    for list in ["initContainers", "containers"] {
        for ctr in spec[list].as_array_mut().expect("list") {
            ctr["volumeMounts"] = mount.clone();
        }
    }
    api.create(&PostParams::default(), &pod("probed", spec))
        .await
        .expect("create");
    let status_of = |p: &Value, name: &str| -> Value {
        p["status"]["containerStatuses"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    let p = wait_for(&api, "probed", 60, "main running but not ready", |p| {
        let m = status_of(p, "main");
        m["state"].get("running").is_some() && m["ready"] == false
    })
    .await;
    assert_eq!(
        p["status"]["initContainerStatuses"][0]["started"], true,
        "{p}"
    );
    wait_for(&api, "probed", 60, "main ready", |p| {
        status_of(p, "main")["ready"] == true
    })
    .await;
    let p = wait_for(
        &api,
        "probed",
        90,
        "doomed restarted by its liveness probe",
        |p| status_of(p, "doomed")["restartCount"].as_i64().unwrap_or(0) >= 1,
    )
    .await;
    assert_eq!(
        status_of(&p, "main")["restartCount"],
        0,
        "main never failed its start gate: {p}"
    );
    assert_eq!(
        status_of(&p, "doomed")["lastState"]["terminated"]["exitCode"],
        143,
        "{p}"
    );
    api.delete(
        "probed",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("delete");
}

#[tokio::test(flavor = "multi_thread")]
async fn termination_messages_come_from_the_file_or_the_log() {
    let c = Cluster::start().await;
    if c.is_sim() && !kube_sim::kubelet::namespaces_available() {
        eprintln!("termination message files are bind-mounted in mount namespaces (root only)");
        return;
    }
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let lines = "i=1; while [ $i -le 100 ]; do echo line $i; i=$((i+1)); done";
    let fallback = |name: &str, script: &str| {
        let mut ctr = sh(name, script);
        ctr["terminationMessagePolicy"] = json!("FallbackToLogsOnError");
        ctr
    };
    let mut in_volume = sh("in-volume", "printf 'custom path' > /work/term");
    in_volume["terminationMessagePath"] = json!("/work/term");
    in_volume["volumeMounts"] = json!([{"name": "work", "mountPath": "/work"}]);
    let spec = json!({"restartPolicy": "Never", "volumes": [{"name": "work", "emptyDir": {}}], "containers": [
        sh("file", "printf 'all done: %s' ok > /dev/termination-log"),
        sh("empty-file-fails", "echo not a message; exit 1"),
        fallback("logs", &format!("{lines}; exit 3")),
        fallback("file-wins", "echo log; printf 'from the file' > /dev/termination-log; exit 2"),
        fallback("succeeds", "echo log only"),
        sh("long", "i=0; while [ $i -lt 500 ]; do printf '%09d\\n' $i; i=$((i+1)); done > /dev/termination-log"),
        in_volume,
    ]});
    api.create(&PostParams::default(), &pod("msgs", spec))
        .await
        .expect("create");
    let p = wait_for(&api, "msgs", 60, "finished", |p| phase(p) == "Failed").await;
    let message = |name: &str| -> Option<String> {
        let cs = p["status"]["containerStatuses"]
            .as_array()
            .expect("statuses")
            .iter()
            .find(|c| c["name"] == name)
            .expect("status");
        cs["state"]["terminated"]["message"]
            .as_str()
            .map(String::from)
    };
    assert_eq!(message("file").as_deref(), Some("all done: ok"));
    assert_eq!(
        message("empty-file-fails"),
        None,
        "File policy: no file, no message"
    );
    let expected: String = (21..=100).map(|i| format!("line {i}\n")).collect();
    assert_eq!(
        message("logs"),
        Some(expected),
        "the last 80 lines of the log"
    );
    assert_eq!(message("file-wins").as_deref(), Some("from the file"));
    assert_eq!(
        message("succeeds"),
        None,
        "logs only for a failed container"
    );
    let long = message("long").expect("long message");
    assert_eq!(long.len(), 4096, "at most 4096 bytes");
    assert!(long.ends_with("000000499\n"), "the end of the file: {long}");
    assert_eq!(message("in-volume").as_deref(), Some("custom path"));
    if c.is_sim() {
        assert!(
            !std::path::Path::new("/dev/termination-log").exists(),
            "the mount target was made in the container's own /dev, not the host's"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_main_containers_end_is_reported_while_its_sidecar_stops_and_the_phase_after() {
    // As the kubelet does since 1.27: once the main container exits its status says so at
    // once, while the pod stays Running until its native sidecars have stopped (here one that,
    // after SIGTERM, finishes only when the test says so); only then is the phase terminal.
    let c = Cluster::start().await;
    let api: Api<Pod> = Api::namespaced(c.client().await, &c.namespace);
    let gate = tempfile::tempdir().expect("temp dir");
    let go = gate.path().join("go");
    let mut sidecar = sh(
        "sidecar",
        &format!(
            "trap 'until [ -e {go} ]; do sleep 0.05; done; exit 0' TERM; while true; do sleep 0.1; done",
            go = go.display()
        ),
    );
    sidecar["restartPolicy"] = json!("Always");
    let spec = json!({"restartPolicy": "Never", "terminationGracePeriodSeconds": 30,
        "initContainers": [sidecar], "containers": [sh("main", "sleep 0.5")]});
    api.create(&PostParams::default(), &pod("stopping", spec))
        .await
        .expect("create");
    let p = wait_for(&api, "stopping", 60, "the main container's end", |p| {
        p["status"]["containerStatuses"][0]["state"]["terminated"].is_object()
    })
    .await;
    assert_eq!(phase(&p), "Running", "the sidecar still stops: {p}");
    assert!(
        p["status"]["initContainerStatuses"][0]["state"]["running"].is_object(),
        "{p}"
    );
    std::fs::write(&go, "").expect("let the sidecar finish");
    let p = wait_for(&api, "stopping", 60, "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let side = &p["status"]["initContainerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        side["exitCode"], 0,
        "the sidecar finished in its grace period: {p}"
    );
}

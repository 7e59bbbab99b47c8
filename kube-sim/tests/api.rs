//! kube-sim driven by the kube-rs client: discovery, custom resources with the status
//! subresource, generation, server-side apply, optimistic concurrency, selectors, watches
//! (resume, bookmarks, 410 Gone), finalizers and garbage collection.

mod common;

use std::time::Duration;

use common::{Cluster, eventually, install_crd, widget_resource};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Discovery;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    PropagationPolicy, WatchEvent, WatchParams,
};
use kube::runtime::WatchStreamExt;
use serde_json::{Value, json};

fn cm(name: &str, labels: Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .expect("configmap")
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_lists_builtin_and_custom_resources() {
    let c = Cluster::start().await;
    let client = c.client().await;
    install_crd(&client).await;
    let d = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let find = |group: &str, kind: &str| {
        d.groups()
            .flat_map(|g| g.recommended_resources())
            .any(|(ar, _)| ar.group == group && ar.kind == kind)
    };
    for (g, k) in [
        ("", "Pod"),
        ("", "Secret"),
        ("", "ServiceAccount"),
        ("apps", "Deployment"),
        ("apps", "StatefulSet"),
        ("coordination.k8s.io", "Lease"),
        ("events.k8s.io", "Event"),
        ("rbac.authorization.k8s.io", "ClusterRole"),
        ("test.agentrun.dev", "Widget"),
    ] {
        assert!(find(g, k), "discovery misses {g}/{k}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_resource_status_generation_apply_and_conflicts() {
    let c = Cluster::start().await;
    let client = c.client().await;
    install_crd(&client).await;
    let ar = widget_resource();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &c.namespace, &ar);
    let w = DynamicObject::new("w1", &ar)
        .data(json!({"spec": {"command": ["run"]}, "status": {"phase": "Forged"}}));
    let created = api
        .create(&PostParams::default(), &w)
        .await
        .expect("create widget");
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.data["spec"]["size"], 1, "schema default applied");
    assert!(
        created.data.get("status").is_none(),
        "status is not set on create"
    );

    // Invalid: 422 naming the field.
    let bad = DynamicObject::new("bad", &ar).data(json!({"spec": {"size": 0}}));
    match api.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422);
            assert_eq!(s.reason, "Invalid");
            assert!(
                s.message.contains("spec.command: Required value"),
                "{}",
                s.message
            );
            assert!(s.message.contains("spec.size"), "{}", s.message);
        }
        other => panic!("expected 422, got {other:?}"),
    }

    // Status through /status only; generation counts spec changes only.
    let st = api
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}, "spec": {"size": 9}})),
        )
        .await
        .expect("patch status");
    assert_eq!(st.data["status"]["phase"], "Running");
    assert_eq!(st.data["spec"]["size"], 1, "/status ignores spec");
    assert_eq!(st.metadata.generation, Some(1));
    let main = api
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}, "status": {"phase": "Hacked"}})),
        )
        .await
        .expect("patch spec");
    assert_eq!(
        main.data["status"]["phase"], "Running",
        "main endpoint ignores status"
    );
    assert_eq!(main.metadata.generation, Some(2));
    let labels_only = api
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .expect("patch labels");
    assert_eq!(
        labels_only.metadata.generation,
        Some(2),
        "metadata changes keep generation"
    );

    // Optimistic concurrency: a stale resourceVersion is a 409 Conflict.
    let mut stale = created.clone();
    stale.data["spec"]["size"] = json!(5);
    match api.replace("w1", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            assert!(
                s.message.contains("the object has been modified"),
                "{}",
                s.message
            );
        }
        other => panic!("expected 409, got {other:?}"),
    }
    let mut fresh = api.get("w1").await.expect("get");
    fresh.data["spec"]["size"] = json!(5);
    let replaced = api
        .replace("w1", &PostParams::default(), &fresh)
        .await
        .expect("replace");
    assert_eq!(replaced.metadata.generation, Some(3));
    let rv_before: u64 = fresh
        .metadata
        .resource_version
        .as_deref()
        .unwrap_or("0")
        .parse()
        .expect("rv");
    let rv_after: u64 = replaced
        .metadata
        .resource_version
        .as_deref()
        .unwrap_or("0")
        .parse()
        .expect("rv");
    assert!(rv_after > rv_before);

    // Server-side apply creates and then updates, recording the field manager.
    let pp = PatchParams::apply("kube-sim-test").force();
    let applied = api
        .patch(
            "w2",
            &pp,
            &Patch::Apply(
                json!({"apiVersion": "test.agentrun.dev/v1", "kind": "Widget",
            "metadata": {"name": "w2"}, "spec": {"command": ["a"], "mode": "fast"}}),
            ),
        )
        .await
        .expect("apply create");
    assert_eq!(applied.data["spec"]["mode"], "fast");
    let applied = api
        .patch(
            "w2",
            &pp,
            &Patch::Apply(
                json!({"apiVersion": "test.agentrun.dev/v1", "kind": "Widget",
            "metadata": {"name": "w2"}, "spec": {"command": ["a"], "mode": "slow"}}),
            ),
        )
        .await
        .expect("apply update");
    assert_eq!(applied.data["spec"]["mode"], "slow");
    let managers: Vec<String> = applied
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.contains(&"kube-sim-test".to_string()),
        "{managers:?}"
    );

    // JSON patch with a failing test op is rejected and changes nothing.
    let r = api
        .patch(
            "w2",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(json!([
            {"op": "test", "path": "/spec/mode", "value": "fast"},
            {"op": "replace", "path": "/spec/mode", "value": "fast"}]))
                .expect("json patch"),
            ),
        )
        .await;
    assert!(r.is_err());
    assert_eq!(
        api.get("w2").await.expect("get").data["spec"]["mode"],
        "slow"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn label_and_field_selectors() {
    let c = Cluster::start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client().await, &c.namespace);
    for (n, app, tier) in [("a", "x", "web"), ("b", "x", "db"), ("c", "y", "db")] {
        api.create(
            &PostParams::default(),
            &cm(n, json!({"app": app, "tier": tier})),
        )
        .await
        .expect("create");
    }
    let names = |l: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        let mut v: Vec<String> = l
            .items
            .into_iter()
            .filter_map(|o| o.metadata.name)
            .collect();
        v.sort();
        v
    };
    let q = |s: &str| ListParams::default().labels(s);
    assert_eq!(
        names(api.list(&q("app=x")).await.expect("list")),
        ["a", "b"]
    );
    assert_eq!(
        names(api.list(&q("app=x,tier!=web")).await.expect("list")),
        ["b"]
    );
    assert_eq!(
        names(
            api.list(&q("tier in (db),app notin (x)"))
                .await
                .expect("list")
        ),
        ["c"]
    );
    assert_eq!(
        names(api.list(&q("!tier")).await.expect("list")),
        Vec::<String>::new()
    );
    let f = ListParams::default().fields("metadata.name=c");
    assert_eq!(names(api.list(&f).await.expect("list")), ["c"]);
    let f = ListParams::default()
        .fields(&format!(
            "metadata.namespace={},metadata.name!=a",
            c.namespace
        ))
        .labels("app");
    assert_eq!(names(api.list(&f).await.expect("list")), ["b", "c"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_resumes_from_a_resource_version_and_old_ones_are_gone() {
    let c = Cluster::start_with(kube_sim::Options {
        bookmark_interval: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let api: Api<ConfigMap> = Api::namespaced(c.client().await, &c.namespace);
    let first = api
        .create(&PostParams::default(), &cm("w", json!({"n": "0"})))
        .await
        .expect("create");
    let rv0 = first.metadata.resource_version.clone().expect("rv");
    for i in 1..=3 {
        api.patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"n": i.to_string()}}})),
        )
        .await
        .expect("patch");
    }
    api.delete("w", &DeleteParams::default())
        .await
        .expect("delete");
    // Resume from the creation: exactly the three modifications and the deletion, in order.
    let stream = api
        .watch(&WatchParams::default().timeout(10), &rv0)
        .await
        .expect("watch");
    let mut stream = stream.boxed();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .expect("event in time")
            .expect("watch ok")
            .expect("stream open");
        match ev {
            WatchEvent::Modified(o) => {
                seen.push(format!("M{}", o.metadata.labels.unwrap_or_default()["n"]))
            }
            WatchEvent::Deleted(_) => seen.push("D".into()),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["M1", "M2", "M3", "D"]);

    // Live events and bookmarks arrive on an open watch.
    let now = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut stream = api
        .watch(&WatchParams::default().timeout(20), &now)
        .await
        .expect("watch")
        .boxed();
    api.create(&PostParams::default(), &cm("live", json!({})))
        .await
        .expect("create");
    let (mut added, mut bookmark) = (false, false);
    while !(added && (bookmark || !c.is_sim())) {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .expect("event in time")
            .expect("watch ok")
            .expect("stream open");
        match ev {
            WatchEvent::Added(o) => added |= o.metadata.name.as_deref() == Some("live"),
            WatchEvent::Bookmark(b) => bookmark |= !b.metadata.resource_version.is_empty(),
            _ => {}
        }
    }

    // A resourceVersion older than the history is 410 Gone (an ERROR event, as on a real server).
    if let Some(sim) = &c.sim {
        sim.store.compact_history();
    }
    let too_old = if c.is_sim() { rv0 } else { "1".to_string() };
    let mut stream = api
        .watch(&WatchParams::default().timeout(10), &too_old)
        .await
        .expect("watch")
        .boxed();
    let gone = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("event in time")
        {
            Some(Ok(WatchEvent::Error(s))) => break s.code,
            Some(Err(kube::Error::Api(s))) => break s.code,
            Some(Ok(WatchEvent::Bookmark(_))) => continue,
            other => panic!("expected 410, got {other:?}"),
        }
    };
    assert_eq!(gone, 410);
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_runtime_watcher_sees_changes() {
    let c = Cluster::start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client().await, &c.namespace);
    let cfg = kube::runtime::watcher::Config::default().labels("suite=watcher");
    let mut stream = kube::runtime::watcher(api.clone(), cfg)
        .applied_objects()
        .boxed();
    api.create(
        &PostParams::default(),
        &cm("seen", json!({"suite": "watcher"})),
    )
    .await
    .expect("create");
    api.create(
        &PostParams::default(),
        &cm("unseen", json!({"suite": "other"})),
    )
    .await
    .expect("create");
    let o = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    assert_eq!(o.metadata.name.as_deref(), Some("seen"));
}

#[tokio::test(flavor = "multi_thread")]
async fn finalizers_hold_deletion_until_removed() {
    let c = Cluster::start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client().await, &c.namespace);
    let mut obj = cm("held", json!({}));
    obj.metadata.finalizers = Some(vec!["test.agentrun.dev/hold".into()]);
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create");
    api.delete("held", &DeleteParams::default())
        .await
        .expect("delete");
    let still = api.get("held").await.expect("still there");
    assert!(still.metadata.deletion_timestamp.is_some());
    // Updates are still allowed while terminating; removing the finalizer completes deletion.
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("remove finalizer");
    eventually(10, "object gone", || {
        let api = api.clone();
        async move {
            api.get_opt("held")
                .await
                .expect("get")
                .is_none()
                .then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_collection_follows_owner_references() {
    let c = Cluster::start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client().await, &c.namespace);
    let owner_of = |o: &ConfigMap| {
        json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": o.metadata.name, "uid": o.metadata.uid,
                "controller": true, "blockOwnerDeletion": true}])
    };
    let with_owner = |name: &str, owner: &ConfigMap| -> ConfigMap {
        serde_json::from_value(
            json!({"metadata": {"name": name, "ownerReferences": owner_of(owner)}}),
        )
        .expect("cm")
    };
    // Background: dependents go after the owner.
    let owner = api
        .create(&PostParams::default(), &cm("owner", json!({})))
        .await
        .expect("owner");
    api.create(&PostParams::default(), &with_owner("dep1", &owner))
        .await
        .expect("dep1");
    api.create(&PostParams::default(), &with_owner("dep2", &owner))
        .await
        .expect("dep2");
    api.delete("owner", &DeleteParams::background())
        .await
        .expect("delete owner");
    eventually(20, "dependents collected", || {
        let api = api.clone();
        async move {
            let gone = api.get_opt("dep1").await.ok()?.is_none()
                && api.get_opt("dep2").await.ok()?.is_none();
            gone.then_some(())
        }
    })
    .await;

    // Orphan: the dependent stays and loses its owner reference.
    let owner = api
        .create(&PostParams::default(), &cm("owner2", json!({})))
        .await
        .expect("owner2");
    api.create(&PostParams::default(), &with_owner("kept", &owner))
        .await
        .expect("kept");
    api.delete("owner2", &DeleteParams::orphan())
        .await
        .expect("delete owner2");
    eventually(20, "owner gone", || {
        let api = api.clone();
        async move { api.get_opt("owner2").await.ok()?.is_none().then_some(()) }
    })
    .await;
    let kept = api.get("kept").await.expect("kept stays");
    assert!(
        kept.metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );

    // Foreground: the owner stays (with a deletionTimestamp) until its dependents are gone.
    let owner = api
        .create(&PostParams::default(), &cm("owner3", json!({})))
        .await
        .expect("owner3");
    let mut dep = with_owner("dep3", &owner);
    dep.metadata.finalizers = Some(vec!["test.agentrun.dev/slow".into()]);
    api.create(&PostParams::default(), &dep)
        .await
        .expect("dep3");
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Foreground),
        ..Default::default()
    };
    api.delete("owner3", &dp).await.expect("delete owner3");
    eventually(20, "dependent marked for deletion", || {
        let api = api.clone();
        async move {
            api.get("dep3")
                .await
                .ok()?
                .metadata
                .deletion_timestamp
                .map(|_| ())
        }
    })
    .await;
    let o3 = api
        .get("owner3")
        .await
        .expect("owner3 waits for its dependent");
    assert!(o3.metadata.deletion_timestamp.is_some());
    api.patch(
        "dep3",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("release dep3");
    eventually(20, "owner3 gone", || {
        let api = api.clone();
        async move { api.get_opt("owner3").await.ok()?.is_none().then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_kubernetes_status_objects() {
    let c = Cluster::start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client().await, &c.namespace);
    match api.get("nope").await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
            assert_eq!(s.message, "configmaps \"nope\" not found");
        }
        other => panic!("expected 404, got {other:?}"),
    }
    api.create(&PostParams::default(), &cm("dup", json!({})))
        .await
        .expect("create");
    match api
        .create(&PostParams::default(), &cm("dup", json!({})))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("expected 409, got {other:?}"),
    }
    match api
        .create(&PostParams::default(), &cm("Bad_Name", json!({})))
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
            assert!(
                s.message
                    .contains("metadata.name: Invalid value: \"Bad_Name\""),
                "{}",
                s.message
            );
        }
        other => panic!("expected 422, got {other:?}"),
    }
    // A malformed body is a 400, and the server keeps serving.
    let req = http::Request::post(format!("/api/v1/namespaces/{}/configmaps", c.namespace))
        .header("content-type", "application/json")
        .body(br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":5}"#.to_vec())
        .expect("request");
    match c.client().await.request::<serde_json::Value>(req).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 400, "{s:?}"),
        other => panic!("expected 400, got {other:?}"),
    }
    let missing_ns: Api<ConfigMap> = Api::namespaced(c.client().await, "no-such-namespace");
    match missing_ns
        .create(&PostParams::default(), &cm("x", json!({})))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(
            (s.code, s.message.as_str()),
            (404, "namespaces \"no-such-namespace\" not found")
        ),
        other => panic!("expected 404, got {other:?}"),
    }
}

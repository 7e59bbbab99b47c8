//! Server-side apply with field ownership, as a real API server does it: a manager that stops
//! applying a field loses it (status too), managers owning different fields keep them, a
//! conflict is a 409 with the real message until `force` takes the field over, atomic lists
//! are replaced and lists with merge keys merge by key, `managedFields` as kubectl shows them.

mod common;

use common::{Cluster, install_crd, raw, refusal, widget_resource};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

/// The ConfigMap `c` with `data` and (unless empty) `labels`.
fn config_map(data: Value, labels: Value) -> Value {
    let mut cm =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": data});
    if labels.as_object().is_some_and(|l| !l.is_empty()) {
        cm["metadata"]["labels"] = labels;
    }
    cm
}

async fn apply<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    force: bool,
    body: &Value,
) -> kube::Result<Value>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    let mut pp = PatchParams::apply(manager);
    pp.force = force;
    let out = api.patch(name, &pp, &Patch::Apply(body)).await?;
    Ok(serde_json::to_value(out).expect("json"))
}

/// Applies the ConfigMap `c` with `data` (no labels) as `manager`.
async fn apply_data(
    api: &Api<ConfigMap>,
    manager: &str,
    force: bool,
    data: Value,
) -> kube::Result<Value> {
    apply(api, "c", manager, force, &config_map(data, json!({}))).await
}

/// The `fieldsV1` of `manager`'s entry with `operation` (Null when it has none).
fn owned(obj: &Value, manager: &str, operation: &str) -> Value {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|e| e["manager"] == manager && e["operation"] == operation)
        .map(|e| e["fieldsV1"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manager_that_stops_applying_a_field_loses_it() {
    let c = Cluster::start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client().await, &c.namespace);
    apply(
        &api,
        "c",
        "tool",
        false,
        &config_map(json!({"a": "1", "b": "2"}), json!({"x": "1", "y": "2"})),
    )
    .await
    .expect("first apply");
    let out = apply(
        &api,
        "c",
        "tool",
        false,
        &config_map(json!({"a": "1"}), json!({"x": "1"})),
    )
    .await
    .expect("second apply");
    assert_eq!(out["data"], json!({"a": "1"}));
    assert_eq!(out["metadata"]["labels"], json!({"x": "1"}));
    assert_eq!(
        owned(&out, "tool", "Apply"),
        json!({"f:data": {"f:a": {}}, "f:metadata": {"f:labels": {"f:x": {}}}})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_apply_that_leaves_out_a_field_removes_it_and_leaves_the_spec_alone() {
    let c = Cluster::start().await;
    let client = c.client().await;
    install_crd(&client).await;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &c.namespace, &widget_resource());
    let widget = json!({"apiVersion": "test.agentrun.dev/v1", "kind": "Widget",
                        "metadata": {"name": "w"}, "spec": {"command": ["run"], "size": 2}});
    apply(&api, "w", "user", false, &widget)
        .await
        .expect("create");
    let status =
        |s: Value| json!({"apiVersion": "test.agentrun.dev/v1", "kind": "Widget", "status": s});
    let pp = PatchParams::apply("agentrun-operator").force();
    api.patch_status(
        "w",
        &pp,
        &Patch::Apply(status(json!({"phase": "Running", "observedGeneration": 1}))),
    )
    .await
    .expect("status apply");
    let out = api
        .patch_status("w", &pp, &Patch::Apply(status(json!({"phase": "Done"}))))
        .await
        .expect("second status apply");
    let out = serde_json::to_value(out).expect("json");
    assert_eq!(out["status"], json!({"phase": "Done"}));
    assert_eq!(out["spec"], json!({"command": ["run"], "size": 2}));
    let entry = out["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["manager"] == "agentrun-operator")
        .cloned()
        .expect("the operator's entry");
    assert_eq!(entry["operation"], "Apply");
    assert_eq!(entry["subresource"], "status");
    assert_eq!(entry["fieldsV1"], json!({"f:status": {"f:phase": {}}}));
    assert_eq!(
        owned(&out, "user", "Apply"),
        json!({"f:spec": {"f:command": {}, "f:size": {}}})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_managers_applying_different_fields_both_keep_them() {
    let c = Cluster::start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client().await, &c.namespace);
    apply_data(&api, "one", false, json!({"a": "1"}))
        .await
        .expect("one");
    apply_data(&api, "two", false, json!({"b": "2"}))
        .await
        .expect("two");
    let out = apply_data(&api, "one", false, json!({"a": "10"}))
        .await
        .expect("one again");
    assert_eq!(out["data"], json!({"a": "10", "b": "2"}));
    assert_eq!(owned(&out, "one", "Apply"), json!({"f:data": {"f:a": {}}}));
    assert_eq!(owned(&out, "two", "Apply"), json!({"f:data": {"f:b": {}}}));
    // One manager dropping the field the other also applies keeps it.
    apply_data(&api, "two", false, json!({"a": "10", "b": "2"}))
        .await
        .expect("shared");
    let out = apply_data(&api, "one", false, json!({}))
        .await
        .expect("one lets go");
    assert_eq!(out["data"], json!({"a": "10", "b": "2"}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conflicting_apply_is_a_409_with_the_real_message_and_force_takes_the_field() {
    let c = Cluster::start().await;
    let client = c.client().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &c.namespace);
    // other-manager writes the field with an update (a merge patch), not an apply.
    let created: ConfigMap =
        serde_json::from_value(config_map(json!({"x": "1"}), json!({}))).expect("cm");
    api.create(
        &kube::api::PostParams {
            field_manager: Some("other-manager".into()),
            ..Default::default()
        },
        &created,
    )
    .await
    .expect("create");
    let s = refusal(apply_data(&api, "applier", false, json!({"x": "2"})).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        s.message,
        "Apply failed with 1 conflict: conflict with \"other-manager\" using v1: .data.x"
    );
    let causes = s.details.expect("details").causes;
    assert_eq!(causes.len(), 1);
    assert_eq!(
        (
            causes[0].reason.as_str(),
            causes[0].message.as_str(),
            causes[0].field.as_str()
        ),
        (
            "FieldManagerConflict",
            "conflict with \"other-manager\" using v1",
            ".data.x"
        )
    );

    // The same value is no conflict: both own it.
    let out = apply_data(&api, "applier", false, json!({"x": "1"}))
        .await
        .expect("same value");
    assert_eq!(
        owned(&out, "other-manager", "Update"),
        json!({"f:data": {"f:x": {}}})
    );
    assert_eq!(
        owned(&out, "applier", "Apply"),
        json!({"f:data": {"f:x": {}}})
    );

    let out = apply_data(&api, "applier", true, json!({"x": "2"}))
        .await
        .expect("forced");
    assert_eq!(out["data"]["x"], "2");
    assert_eq!(owned(&out, "other-manager", "Update"), Value::Null);
    assert_eq!(
        owned(&out, "applier", "Apply"),
        json!({"f:data": {"f:x": {}}})
    );

    // Apply requires a field manager; force belongs to apply only.
    let path = format!("/api/v1/namespaces/{}/configmaps/c", c.namespace);
    let body = config_map(json!({"x": "3"}), json!({}));
    let r = raw(
        &client,
        "PATCH",
        &path,
        "application/apply-patch+yaml",
        Some(&body),
    )
    .await;
    assert_eq!(r.code, 422);
    assert_eq!(
        r.body["message"],
        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
    );
    let r = raw(
        &client,
        "PATCH",
        &format!("{path}?force=true"),
        "application/merge-patch+json",
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.code, 422);
    assert_eq!(
        r.body["message"],
        "PatchOptions.meta.k8s.io \"\" is invalid: force: Forbidden: may not be specified for non-apply patch"
    );
}

fn deployment(containers: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
           "spec": {"selector": {"matchLabels": {"app": "d"}},
                    "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": containers}}}})
}

#[tokio::test(flavor = "multi_thread")]
async fn atomic_lists_are_replaced_and_lists_with_merge_keys_merge_item_by_item() {
    let c = Cluster::start().await;
    let client = c.client().await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), &c.namespace);
    apply(
        &api,
        "d",
        "one",
        false,
        &deployment(json!([
        {"name": "a", "image": "busybox:1.36", "args": ["1", "2"]}])),
    )
    .await
    .expect("one");
    apply(
        &api,
        "d",
        "two",
        false,
        &deployment(json!([{"name": "b", "image": "busybox:1.36"}])),
    )
    .await
    .expect("two");
    let out = apply(
        &api,
        "d",
        "one",
        false,
        &deployment(json!([
        {"name": "a", "image": "busybox:1.36", "args": ["3"]}])),
    )
    .await
    .expect("one again");
    let containers = &out["spec"]["template"]["spec"]["containers"];
    let names: Vec<&str> = containers
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b"], "containers merge by name: {containers}");
    assert_eq!(containers[0]["args"], json!(["3"]), "args are atomic");
    assert_eq!(
        owned(&out, "one", "Apply")["f:spec"]["f:template"]["f:spec"]["f:containers"],
        json!({"k:{\"name\":\"a\"}": {".": {}, "f:args": {}, "f:image": {}, "f:name": {}}})
    );

    // A CRD list with x-kubernetes-list-type: map merges by its keys too.
    install_crd(&client).await;
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client, &c.namespace, &widget_resource());
    let widget = |variations: Value| {
        json!({"apiVersion": "test.agentrun.dev/v1", "kind": "Widget",
        "metadata": {"name": "w"}, "spec": {"command": ["x"], "variations": variations}})
    };
    apply(
        &widgets,
        "w",
        "one",
        false,
        &widget(json!([{"name": "v1", "env": {"A": "1"}}])),
    )
    .await
    .expect("one");
    let out = apply(
        &widgets,
        "w",
        "two",
        false,
        &widget(json!([{"name": "v2"}])),
    )
    .await
    .expect("two");
    assert_eq!(
        out["spec"]["variations"],
        json!([{"name": "v1", "env": {"A": "1"}}, {"name": "v2"}])
    );
    let out = apply(&widgets, "w", "one", false, &widget(json!([])))
        .await
        .expect("one drops its item");
    assert_eq!(out["spec"]["variations"], json!([{"name": "v2"}]));
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_shows_managed_fields_and_prints_apply_conflicts() {
    let c = Cluster::start().await;
    let ns = c.namespace.clone();
    let f = c.write(
        "cm.yaml",
        &config_map(json!({"x": "1", "y": "2"}), json!({})).to_string(),
    );
    let path = f.to_str().expect("utf-8");
    c.kubectl_ok(&["apply", "--server-side", "-n", &ns, "-f", path]);
    let get_yaml = |extra: &[&str]| {
        let mut args = vec!["get", "configmap", "c", "-n", &ns, "-o", "yaml"];
        args.extend_from_slice(extra);
        c.kubectl_ok(&args)
    };
    let plain = get_yaml(&[]);
    assert!(!plain.contains("managedFields"), "{plain}");
    let shown = get_yaml(&["--show-managed-fields"]);
    for needle in [
        "managedFields:",
        "manager: kubectl\n",
        "operation: Apply",
        "fieldsType: FieldsV1",
        "f:data:",
        "f:x: {}",
        "f:y: {}",
    ] {
        assert!(shown.contains(needle), "{needle:?} not in:\n{shown}");
    }
    c.kubectl_ok(&[
        "patch",
        "configmap",
        "c",
        "-n",
        &ns,
        "--type",
        "merge",
        "-p",
        r#"{"data":{"x":"changed"}}"#,
    ]);
    let shown = get_yaml(&["--show-managed-fields"]);
    assert!(shown.contains("manager: kubectl-patch\n"), "{shown}");
    let out = c.kubectl(&["apply", "--server-side", "-n", &ns, "-f", path]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "Apply failed with 1 conflict: conflict with \"kubectl-patch\" using v1: .data.x"
        ),
        "{stderr}"
    );
    c.kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-n",
        &ns,
        "-f",
        path,
    ]);
    let x = c.kubectl_ok(&[
        "get",
        "configmap",
        "c",
        "-n",
        &ns,
        "-o",
        "jsonpath={.data.x}",
    ]);
    assert_eq!(x, "1");
}

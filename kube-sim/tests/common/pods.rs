//! Pods for the kubelet tests: specs, waiting on a pod's state, logs.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};
use serde_json::{Value, json};

use super::eventually;

/// A pod named `name` with `spec`.
pub fn pod(name: &str, spec: Value) -> Pod {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"suite": "kubelet"}}, "spec": spec}),
    )
    .expect("pod")
}

/// A container that runs `script` with `sh -c` (busybox on a real cluster).
pub fn sh(name: &str, script: &str) -> Value {
    json!({"name": name, "image": "busybox:1.36", "command": ["sh", "-c", script]})
}

/// Waits up to `secs` for the pod to satisfy `pred`, and returns it.
pub async fn wait_for(
    api: &Api<Pod>,
    name: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    eventually(secs, &format!("pod {name}: {what}"), || {
        let api = api.clone();
        let name = name.to_string();
        let pred = &pred;
        async move {
            let p = api.get(&name).await.ok()?;
            let v = serde_json::to_value(&p).ok()?;
            pred(&v).then_some(v)
        }
    })
    .await
}

/// The pod's `status.phase`.
pub fn phase(p: &Value) -> &str {
    p.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The log of one container of the pod.
pub async fn logs(api: &Api<Pod>, name: &str, container: &str) -> String {
    api.logs(
        name,
        &LogParams {
            container: Some(container.into()),
            ..Default::default()
        },
    )
    .await
    .expect("logs")
}

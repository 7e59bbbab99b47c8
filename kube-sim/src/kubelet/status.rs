//! What the kubelet (and the scheduler) report about pods: the pod's status (phase,
//! conditions, container statuses), published when it changes, and core/v1 Events.

use serde_json::{Value, json};

use super::container::ContainerState;
use super::pods_key;
use super::runner::PodRunner;
use crate::apiserver::store::{NODE_NAME, Store};
use crate::json::str_at;
use crate::time::now_rfc3339;

/// Records a core/v1 Event about a pod, as the scheduler and kubelet do.
pub(super) fn pod_event(
    store: &Store,
    pod: &Value,
    type_: &str,
    reason: &str,
    message: &str,
    component: &str,
) {
    let Some(t) = store.find_type("", "v1", "events") else {
        return;
    };
    let now = now_rfc3339();
    let ns = str_at(pod, "/metadata/namespace");
    let ev = json!({
        "metadata": {"name": format!("{}.{:016x}", str_at(pod, "/metadata/name"), rand::random::<u64>())},
        "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": ns,
                           "name": str_at(pod, "/metadata/name"), "uid": str_at(pod, "/metadata/uid")},
        "type": type_,
        "reason": reason,
        "message": message,
        "source": {"component": component, "host": NODE_NAME},
        "reportingComponent": component,
        "reportingInstance": NODE_NAME,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    });
    if let Err(e) = store.create(&t, &ns, ev, &crate::apiserver::store::WriteOpts::default()) {
        tracing::debug!("event {reason} for pod {ns}: {e}");
    }
}

pub(super) fn set_condition(
    p: &mut Value,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &str,
) {
    if !p["status"].is_object() {
        p["status"] = json!({});
    }
    let conds = p["status"]
        .as_object_mut()
        .map(|o| o.entry("conditions").or_insert_with(|| json!([])));
    let Some(Value::Array(conds)) = conds else {
        return;
    };
    let mut c =
        json!({"type": type_, "status": status, "lastProbeTime": null, "lastTransitionTime": now});
    if !reason.is_empty() {
        c["reason"] = json!(reason);
    }
    if !message.is_empty() {
        c["message"] = json!(message);
    }
    match conds.iter_mut().find(|x| x["type"] == type_) {
        Some(existing) => {
            if existing["status"] != status {
                *existing = c;
            } else {
                existing["reason"] = c.get("reason").cloned().unwrap_or(Value::Null);
                existing["message"] = c.get("message").cloned().unwrap_or(Value::Null);
                if let Some(o) = existing.as_object_mut() {
                    o.retain(|k, v| !(v.is_null() && (k == "reason" || k == "message")));
                }
            }
        }
        None => conds.push(c),
    }
}

impl PodRunner {
    pub(super) fn flush_events(&mut self) {
        for (t, reason, msg) in std::mem::take(&mut self.events) {
            pod_event(&self.kubelet.store, &self.pod, t, reason, &msg, "kubelet");
        }
    }

    pub(super) fn publish(&mut self) {
        self.flush_events();
        let now = now_rfc3339();
        let init_done = self.initialized;
        let ready = self.phase == "Running"
            && self
                .mains
                .iter()
                .chain(self.inits.iter().filter(|c| c.sidecar))
                .all(|c| c.running() && c.ready);
        let st = |b: bool| if b { "True" } else { "False" };
        let mut status = json!({
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "qosClass": "BestEffort",
            "containerStatuses": self.mains.iter().map(ContainerState::status).collect::<Vec<_>>(),
        });
        if !self.inits.is_empty() {
            status["initContainerStatuses"] = json!(
                self.inits
                    .iter()
                    .map(ContainerState::status)
                    .collect::<Vec<_>>()
            );
        }
        if let Some((r, m)) = &self.reason {
            status["reason"] = json!(r);
            status["message"] = json!(m);
        }
        let uid = self.uid.clone();
        let not_ready_reason = if init_done {
            "ContainersNotReady"
        } else {
            "PodCompleted"
        };
        self.kubelet
            .store
            .modify(&pods_key(), &self.ns, &self.name, |p| {
                if str_at(p, "/metadata/uid") != uid {
                    return;
                }
                let conds = p.pointer("/status/conditions").cloned();
                let mut new_status = status.clone();
                new_status["conditions"] = conds.unwrap_or(json!([]));
                let old_status = std::mem::replace(&mut p["status"], new_status);
                set_condition(p, "PodScheduled", "True", "", "", &now);
                set_condition(
                    p,
                    "Initialized",
                    st(init_done),
                    if init_done {
                        ""
                    } else {
                        "ContainersNotInitialized"
                    },
                    "",
                    &now,
                );
                set_condition(
                    p,
                    "ContainersReady",
                    st(ready),
                    if ready { "" } else { not_ready_reason },
                    "",
                    &now,
                );
                set_condition(
                    p,
                    "Ready",
                    st(ready),
                    if ready { "" } else { not_ready_reason },
                    "",
                    &now,
                );
                // Keep transition times when nothing changed.
                if let (Some(old), Some(new)) = (
                    old_status.get("conditions").and_then(Value::as_array),
                    p.pointer_mut("/status/conditions")
                        .and_then(Value::as_array_mut),
                ) {
                    for c in new.iter_mut() {
                        if let Some(o) = old
                            .iter()
                            .find(|o| o["type"] == c["type"] && o["status"] == c["status"])
                        {
                            c["lastTransitionTime"] = o["lastTransitionTime"].clone();
                        }
                    }
                }
            });
    }

    pub(super) fn snapshot(&self) -> String {
        let c: Vec<Value> = self
            .inits
            .iter()
            .chain(self.mains.iter())
            .map(ContainerState::status)
            .collect();
        format!("{}{}{:?}", self.phase, self.initialized, c)
    }
}

//! ResourceQuota: the admission plugin and the quota controller.
//! - Admission (on create): a pod in a namespace whose quota tracks `cpu`/`memory`
//!   (`requests.*`, `limits.*`) must specify them for every container (403 `failed quota:
//!   NAME: must specify limits.cpu for: a,b`); a create that would take usage past `hard` is
//!   refused (403 `exceeded quota: NAME, requested: limits.cpu=500m, used: limits.cpu=0,
//!   limited: limits.cpu=100m`). Tracked: `pods`, `cpu`, `memory`, `ephemeral-storage`,
//!   `requests.*`, `limits.*` (extended resources as `requests.NAME`), `count/RESOURCE[.GROUP]`
//!   for any type, and the object counts `services`, `secrets`, `configmaps`,
//!   `persistentvolumeclaims`, `replicationcontrollers`, `resourcequotas`; the scopes
//!   `Terminating`, `NotTerminating`, `BestEffort`, `NotBestEffort` and `PriorityClass`.
//! - The controller keeps each quota's `status.hard` (its `spec.hard`) and `status.used`
//!   current: a pod's compute resources count while it is neither Succeeded nor Failed nor
//!   deleted, `count/pods` while it exists.
//!
//! Pod usage is computed as Kubernetes does: the sum of the containers and of the native
//! sidecars (init containers with `restartPolicy: Always`), or, when larger, what an init
//! container needs with the sidecars started before it; plus `spec.overhead`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::apiserver::errors::ApiError;
use crate::apiserver::quantity::Quantity;
use crate::apiserver::store::{Store, TypeKey};

/// Resource name to quantity.
pub type Resources = BTreeMap<String, Quantity>;

const COMPUTE_VALIDATED: &[&str] = &[
    "cpu",
    "memory",
    "requests.cpu",
    "requests.memory",
    "limits.cpu",
    "limits.memory",
];

/// Object counts with a name of their own (besides `count/...`).
const LEGACY_COUNTS: &[&str] = &[
    "pods",
    "services",
    "secrets",
    "configmaps",
    "persistentvolumeclaims",
    "replicationcontrollers",
    "resourcequotas",
];

fn parse_list(v: Option<&Value>) -> Resources {
    v.and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, q)| Quantity::from_json(q).ok().map(|q| (k.clone(), q)))
        .collect()
}

/// A pod's containers, then its init containers.
pub fn pod_containers(pod: &Value) -> impl Iterator<Item = &Value> {
    ["containers", "initContainers"].into_iter().flat_map(|l| {
        pod.pointer(&format!("/spec/{l}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    })
}

/// A container's `(requests, limits)`.
pub fn container_resources(c: &Value) -> (Resources, Resources) {
    (
        parse_list(c.pointer("/resources/requests")),
        parse_list(c.pointer("/resources/limits")),
    )
}

fn add_into(into: &mut Resources, add: &Resources) {
    for (k, q) in add {
        let sum = into.get(k).map_or(*q, |cur| cur.add(q));
        into.insert(k.clone(), sum);
    }
}

fn max_into(into: &mut Resources, other: &Resources) {
    for (k, q) in other {
        if into.get(k).is_none_or(|cur| q > cur) {
            into.insert(k.clone(), *q);
        }
    }
}

/// A pod's effective requests (`limits`: its limits), with native sidecars; with
/// `overhead`, plus `spec.overhead` (to every request; to the limits it sets).
fn pod_total(pod: &Value, limits: bool, overhead: bool) -> Resources {
    let pick = |c: &Value| {
        let (r, l) = container_resources(c);
        if limits { l } else { r }
    };
    let list = |name: &str| {
        pod.pointer(&format!("/spec/{name}"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut total = Resources::new();
    for c in list("containers") {
        add_into(&mut total, &pick(&c));
    }
    let mut sidecars = Resources::new();
    let mut init_max = Resources::new();
    for c in list("initContainers") {
        let own = pick(&c);
        let effective = if c["restartPolicy"] == "Always" {
            add_into(&mut total, &own);
            add_into(&mut sidecars, &own);
            sidecars.clone()
        } else {
            let mut t = own;
            add_into(&mut t, &sidecars);
            t
        };
        max_into(&mut init_max, &effective);
    }
    max_into(&mut total, &init_max);
    if overhead {
        for (k, q) in parse_list(pod.pointer("/spec/overhead")) {
            if !limits || total.contains_key(&k) {
                add_into(&mut total, &Resources::from([(k, q)]));
            }
        }
    }
    total
}

/// A pod's effective requests (`PodRequests`).
pub fn pod_requests(pod: &Value, overhead: bool) -> Resources {
    pod_total(pod, false, overhead)
}

/// A pod's effective limits (`PodLimits`).
pub fn pod_limits(pod: &Value, overhead: bool) -> Resources {
    pod_total(pod, true, overhead)
}

/// Whether a pod's compute resources count against quota: not Succeeded or Failed, and not
/// past the grace period of its deletion.
fn charged(pod: &Value) -> bool {
    let phase = pod.pointer("/status/phase").and_then(Value::as_str);
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return false;
    }
    if let Some(ts) = pod
        .pointer("/metadata/deletionTimestamp")
        .and_then(Value::as_str)
        .and_then(crate::time::parse_rfc3339)
    {
        let grace = pod
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        return crate::time::now_secs() < ts + grace;
    }
    true
}

/// A pod's usage as quota counts it.
pub fn pod_usage(pod: &Value) -> Resources {
    let one = Quantity::from_units(1);
    let mut out = Resources::from([("count/pods".to_string(), one)]);
    if !charged(pod) {
        return out;
    }
    out.insert("pods".into(), one);
    let requests = pod_requests(pod, true);
    let limits = pod_limits(pod, true);
    for (k, q) in &requests {
        match k.as_str() {
            "cpu" | "memory" | "ephemeral-storage" => {
                out.insert(k.clone(), *q);
                out.insert(format!("requests.{k}"), *q);
            }
            _ if k.starts_with("hugepages-") => {
                out.insert(k.clone(), *q);
                out.insert(format!("requests.{k}"), *q);
            }
            _ if k.contains('/') && !k.starts_with("kubernetes.io/") => {
                out.insert(format!("requests.{k}"), *q);
            }
            _ => {}
        }
    }
    for (k, q) in &limits {
        if matches!(k.as_str(), "cpu" | "memory" | "ephemeral-storage") {
            out.insert(format!("limits.{k}"), *q);
        }
    }
    out
}

/// The resource names a pod quota tracks among `hard`.
fn pod_resource(name: &str) -> bool {
    matches!(
        name,
        "count/pods"
            | "pods"
            | "cpu"
            | "memory"
            | "ephemeral-storage"
            | "requests.cpu"
            | "requests.memory"
            | "requests.ephemeral-storage"
            | "limits.cpu"
            | "limits.memory"
            | "limits.ephemeral-storage"
    ) || name.starts_with("hugepages-")
        || name.starts_with("requests.hugepages-")
        || (name.starts_with("requests.") && name.contains('/'))
}

/// The type a `count/RESOURCE[.GROUP]` or legacy count name counts.
fn counted_type(name: &str) -> Option<TypeKey> {
    if let Some(rest) = name.strip_prefix("count/") {
        return Some(match rest.split_once('.') {
            Some((plural, group)) => (group.to_string(), plural.to_string()),
            None => (String::new(), rest.to_string()),
        });
    }
    LEGACY_COUNTS
        .contains(&name)
        .then(|| (String::new(), name.to_string()))
}

/// The resources an object of `key` uses: an object count, or a pod's usage.
fn usage(key: &TypeKey, obj: &Value) -> Resources {
    if key.0.is_empty() && key.1 == "pods" {
        return pod_usage(obj);
    }
    let one = Quantity::from_units(1);
    let mut out = Resources::new();
    let count = if key.0.is_empty() {
        format!("count/{}", key.1)
    } else {
        format!("count/{}.{}", key.1, key.0)
    };
    out.insert(count, one);
    if key.0.is_empty() && LEGACY_COUNTS.contains(&key.1.as_str()) {
        out.insert(key.1.clone(), one);
    }
    if key.0.is_empty() && key.1 == "services" {
        match obj.pointer("/spec/type").and_then(Value::as_str) {
            Some("LoadBalancer") => {
                out.insert("services.loadbalancers".into(), one);
                out.insert("services.nodeports".into(), one);
            }
            Some("NodePort") => {
                out.insert("services.nodeports".into(), one);
            }
            _ => {}
        }
    }
    out
}

/// The resources among `hard` that objects of `key` use.
fn tracked(key: &TypeKey, hard: &Resources) -> Vec<String> {
    let pods = key.0.is_empty() && key.1 == "pods";
    hard.keys()
        .filter(|name| {
            if pods {
                pod_resource(name)
            } else {
                counted_type(name).as_ref() == Some(key)
                    || (key.0.is_empty()
                        && key.1 == "services"
                        && matches!(
                            name.as_str(),
                            "services.loadbalancers" | "services.nodeports"
                        ))
            }
        })
        .cloned()
        .collect()
}

/// The `(scope, operator, values)` a quota selects by.
fn scopes(q: &Value) -> Vec<(String, String, Vec<String>)> {
    let mut out: Vec<(String, String, Vec<String>)> = q
        .pointer("/spec/scopes")
        .map(crate::json::string_list)
        .unwrap_or_default()
        .into_iter()
        .map(|s| (s, "Exists".to_string(), Vec::new()))
        .collect();
    for e in q
        .pointer("/spec/scopeSelector/matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push((
            crate::json::str_at(e, "/scopeName"),
            crate::json::str_at(e, "/operator"),
            e.get("values")
                .map(crate::json::string_list)
                .unwrap_or_default(),
        ));
    }
    out
}

fn best_effort(pod: &Value) -> bool {
    pod_containers(pod).all(|c| {
        let (r, l) = container_resources(c);
        ["cpu", "memory"]
            .iter()
            .all(|k| !r.contains_key(*k) && !l.contains_key(*k))
    })
}

/// Whether a quota applies to an object of `key`: scoped quotas apply to pods only.
fn matches_scopes(q: &Value, key: &TypeKey, obj: &Value) -> bool {
    let sc = scopes(q);
    if sc.is_empty() {
        return true;
    }
    if !(key.0.is_empty() && key.1 == "pods") {
        return false;
    }
    sc.iter().all(|(scope, op, values)| {
        let terminating = obj
            .pointer("/spec/activeDeadlineSeconds")
            .and_then(Value::as_i64)
            .is_some_and(|d| d >= 0);
        match scope.as_str() {
            "Terminating" => terminating,
            "NotTerminating" => !terminating,
            "BestEffort" => best_effort(obj),
            "NotBestEffort" => !best_effort(obj),
            "PriorityClass" => {
                let pc = crate::json::str_at(obj, "/spec/priorityClassName");
                match op.as_str() {
                    "Exists" => !pc.is_empty(),
                    "DoesNotExist" => pc.is_empty(),
                    "In" => !pc.is_empty() && values.contains(&pc),
                    "NotIn" => pc.is_empty() || !values.contains(&pc),
                    _ => false,
                }
            }
            _ => false,
        }
    })
}

fn hard_of(q: &Value) -> Resources {
    parse_list(q.pointer("/spec/hard"))
}

fn pretty(r: &Resources, keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("{k}={}", r.get(k).copied().unwrap_or_else(Quantity::zero)))
        .collect::<Vec<_>>()
        .join(",")
}

/// What the objects of namespace `ns` use of the resources of `quota`.
fn used(store: &Store, ns: &str, quota: &Value) -> Resources {
    let hard = hard_of(quota);
    let mut used: Resources = hard.keys().map(|k| (k.clone(), Quantity::zero())).collect();
    let mut keys: BTreeSet<TypeKey> = BTreeSet::new();
    for name in hard.keys() {
        if pod_resource(name) {
            keys.insert((String::new(), "pods".into()));
        } else if let Some(k) = counted_type(name) {
            keys.insert(k);
        } else if name.starts_with("services.") {
            keys.insert((String::new(), "services".into()));
        }
    }
    for key in keys {
        for obj in store.list(&key, Some(ns)).0 {
            if !matches_scopes(quota, &key, &obj) {
                continue;
            }
            for (k, q) in usage(&key, &obj) {
                if let Some(cur) = used.get_mut(&k) {
                    *cur = cur.add(&q);
                }
            }
        }
    }
    used
}

/// Refuses the create of `obj` (of `key`, named `name`, in `ns`) that a quota of the
/// namespace does not allow.
pub fn admit(
    store: &Store,
    key: &TypeKey,
    ns: &str,
    name: &str,
    obj: &Value,
) -> Result<(), ApiError> {
    let quota_key: TypeKey = (String::new(), "resourcequotas".into());
    let quotas = store.list(&quota_key, Some(ns)).0;
    if quotas.is_empty() {
        return Ok(());
    }
    let pods = key.0.is_empty() && key.1 == "pods";
    let forbidden = |why: String| ApiError::forbidden(&key.0, &key.1, name, &why);
    let mut interesting = Vec::new();
    for q in &quotas {
        let hard = hard_of(q);
        let res = tracked(key, &hard);
        if res.is_empty() || !matches_scopes(q, key, obj) {
            continue;
        }
        let qname = crate::json::str_at(q, "/metadata/name");
        if pods && let Some(missing) = missing_resources(obj, &res) {
            return Err(forbidden(format!(
                "failed quota: {qname}: must specify {missing}"
            )));
        }
        interesting.push((q, qname, hard, res));
    }
    let delta = usage(key, obj);
    for (q, qname, hard, res) in interesting {
        let requested: Resources = delta
            .iter()
            .filter(|(k, _)| res.contains(k))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if requested.is_empty() {
            continue;
        }
        let used = used(store, ns, q);
        let exceeded: Vec<String> = requested
            .iter()
            .filter(|(k, r)| {
                let now = used.get(*k).copied().unwrap_or_else(Quantity::zero);
                hard.get(*k).is_some_and(|h| now.add(r) > *h)
            })
            .map(|(k, _)| k.clone())
            .collect();
        if !exceeded.is_empty() {
            return Err(forbidden(format!(
                "exceeded quota: {qname}, requested: {}, used: {}, limited: {}",
                pretty(&requested, &exceeded),
                pretty(&used, &exceeded),
                pretty(&hard, &exceeded)
            )));
        }
    }
    Ok(())
}

/// `limits.cpu for: a,b; requests.memory for: a` when containers leave out a tracked
/// compute resource.
fn missing_resources(pod: &Value, tracked: &[String]) -> Option<String> {
    let required: Vec<&str> = tracked
        .iter()
        .map(String::as_str)
        .filter(|r| COMPUTE_VALIDATED.contains(r))
        .collect();
    let mut missing: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for c in pod_containers(pod) {
        let (r, l) = container_resources(c);
        for res in &required {
            let has = match *res {
                "cpu" | "requests.cpu" => r.contains_key("cpu"),
                "memory" | "requests.memory" => r.contains_key("memory"),
                "limits.cpu" => l.contains_key("cpu"),
                _ => l.contains_key("memory"),
            };
            if !has {
                missing
                    .entry(res)
                    .or_default()
                    .insert(c["name"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    (!missing.is_empty()).then(|| {
        missing
            .iter()
            .map(|(r, names)| {
                format!(
                    "{r} for: {}",
                    names.iter().cloned().collect::<Vec<_>>().join(",")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// The quota controller: keeps every quota's status current as objects come and go.
pub async fn run(store: Arc<Store>) {
    let mut rx = store.subscribe();
    sync_all(&store);
    loop {
        match rx.recv().await {
            Ok(ev) => sync_namespace(&store, &ev.namespace),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => sync_all(&store),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn sync_all(store: &Store) {
    let key: TypeKey = (String::new(), "resourcequotas".into());
    let namespaces: BTreeSet<String> = store
        .list(&key, None)
        .0
        .iter()
        .map(|q| crate::json::str_at(q, "/metadata/namespace"))
        .collect();
    for ns in namespaces {
        sync_namespace(store, &ns);
    }
}

fn sync_namespace(store: &Store, ns: &str) {
    if ns.is_empty() {
        return;
    }
    let key: TypeKey = (String::new(), "resourcequotas".into());
    for q in store.list(&key, Some(ns)).0 {
        if q.pointer("/metadata/deletionTimestamp").is_some() {
            continue;
        }
        let hard = hard_of(&q);
        let used = used(store, ns, &q);
        let status = json!({
            "hard": hard.iter().map(|(k, v)| (k.clone(), json!(v.canonical()))).collect::<serde_json::Map<_, _>>(),
            "used": used.iter().map(|(k, v)| (k.clone(), json!(v.canonical()))).collect::<serde_json::Map<_, _>>(),
        });
        if q.get("status") != Some(&status) {
            let name = crate::json::str_at(&q, "/metadata/name");
            store.modify(&key, ns, &name, |o| o["status"] = status.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_usage_counts_native_sidecars_and_init_containers_like_kubernetes() {
        let c = |name: &str, cpu: &str, always: bool| {
            let mut c = json!({"name": name, "resources": {"requests": {"cpu": cpu}, "limits": {"cpu": cpu}}});
            if always {
                c["restartPolicy"] = json!("Always");
            }
            c
        };
        // sum(app 500m + sidecar 200m) = 700m; init after the sidecar: 1 + 200m = 1200m.
        let pod = json!({"spec": {
            "initContainers": [c("sidecar", "200m", true), c("setup", "1", false)],
            "containers": [c("app", "500m", false)]}});
        let u = pod_usage(&pod);
        assert_eq!(u["requests.cpu"].canonical(), "1200m");
        assert_eq!(u["limits.cpu"].canonical(), "1200m");
        assert_eq!(u["pods"].canonical(), "1");
        let pod = json!({"spec": {
            "initContainers": [c("setup", "100m", false), c("sidecar", "200m", true)],
            "containers": [c("app", "500m", false)]}});
        assert_eq!(pod_usage(&pod)["requests.cpu"].canonical(), "700m");
        let done = json!({"spec": {"containers": [c("app", "1", false)]}, "status": {"phase": "Succeeded"}});
        let u = pod_usage(&done);
        assert!(!u.contains_key("pods") && !u.contains_key("requests.cpu"));
        assert_eq!(u["count/pods"].canonical(), "1");
    }

    #[test]
    fn containers_missing_tracked_resources_are_named() {
        let pod = json!({"spec": {"containers": [
            {"name": "agent", "resources": {"requests": {"cpu": "1"}}},
            {"name": "agentrun-sidecar"}]}});
        assert_eq!(
            missing_resources(&pod, &["limits.cpu".into(), "requests.cpu".into()]).as_deref(),
            Some("limits.cpu for: agent,agentrun-sidecar; requests.cpu for: agentrun-sidecar")
        );
    }
}

//! The LimitRanger admission plugin: the LimitRanges of a pod's namespace give its containers
//! (init containers too) the default requests and limits they leave out (noted in the
//! `kubernetes.io/limit-ranger` annotation), then refuse pods outside their bounds with the
//! real 403 messages (`maximum cpu usage per Container is 1, but limit is 2`, `minimum memory
//! usage per Container is 64Mi, but request is 32Mi`, ratio, `Pod` totals) and claims outside
//! `PersistentVolumeClaim` bounds. Stored LimitRanges get the API server's defaults (`max` is
//! the default limit, the default limit the default request, `min` the default request).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::apiserver::quantity::Quantity;
use crate::apiserver::quota::{
    Resources, container_resources, pod_containers, pod_limits, pod_requests,
};

const ANNOTATION: &str = "kubernetes.io/limit-ranger";

/// The defaults the API server gives a LimitRange's `Container` items.
pub fn default_limit_range(obj: &mut Value) {
    let Some(items) = obj
        .pointer_mut("/spec/limits")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for item in items {
        if item["type"] != "Container" {
            continue;
        }
        let get = |item: &Value, k: &str| {
            item.get(k)
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default()
        };
        let max = get(item, "max");
        let min = get(item, "min");
        let mut default = get(item, "default");
        for (k, v) in max {
            default.entry(k).or_insert(v);
        }
        let mut default_request = get(item, "defaultRequest");
        for (k, v) in default.iter().chain(min.iter()) {
            default_request.entry(k.clone()).or_insert(v.clone());
        }
        if !default.is_empty() {
            item["default"] = Value::Object(default);
        }
        if !default_request.is_empty() {
            item["defaultRequest"] = Value::Object(default_request);
        }
    }
}

fn items_of<'a>(ranges: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> {
    ranges
        .iter()
        .flat_map(|r| {
            r.pointer("/spec/limits")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter(move |i| i["type"] == kind)
}

fn list(v: &Value, key: &str) -> Resources {
    v.get(key)
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, q)| Quantity::from_json(q).ok().map(|q| (k.clone(), q)))
        .collect()
}

/// Gives the containers of `pod` the defaults of each LimitRange in `ranges`.
pub fn mutate(ranges: &[Value], pod: &mut Value) {
    for range in ranges {
        let mut requests = Map::new();
        let mut limits = Map::new();
        for item in items_of(std::slice::from_ref(range), "Container") {
            for (src, dst) in [("defaultRequest", &mut requests), ("default", &mut limits)] {
                if let Some(m) = item.get(src).and_then(Value::as_object) {
                    dst.extend(m.clone());
                }
            }
        }
        if requests.is_empty() && limits.is_empty() {
            continue;
        }
        let mut notes = Vec::new();
        for (list_name, what) in [
            ("containers", "container"),
            ("initContainers", "init container"),
        ] {
            let Some(cs) = pod
                .pointer_mut(&format!("/spec/{list_name}"))
                .and_then(Value::as_array_mut)
            else {
                continue;
            };
            for c in cs {
                let name = c["name"].as_str().unwrap_or_default().to_string();
                let res = &mut c["resources"];
                if !res.is_object() {
                    *res = json!({});
                }
                let mut set = |field: &str, defaults: &Map<String, Value>| -> Vec<String> {
                    let target = &mut res[field];
                    if !target.is_object() {
                        *target = json!({});
                    }
                    let mut added = Vec::new();
                    if let Some(t) = target.as_object_mut() {
                        for (k, v) in defaults {
                            if !t.contains_key(k) {
                                t.insert(k.clone(), v.clone());
                                added.push(k.clone());
                            }
                        }
                    }
                    added.sort();
                    added
                };
                let req = set("requests", &requests);
                let lim = set("limits", &limits);
                for f in ["requests", "limits"] {
                    if res[f].as_object().is_some_and(Map::is_empty)
                        && let Some(o) = res.as_object_mut()
                    {
                        o.remove(f);
                    }
                }
                if !req.is_empty() {
                    notes.push(format!("{} request for {what} {name}", req.join(", ")));
                }
                if !lim.is_empty() {
                    notes.push(format!("{} limit for {what} {name}", lim.join(", ")));
                }
            }
        }
        if !notes.is_empty() {
            pod["metadata"]["annotations"][ANNOTATION] =
                Value::String(format!("LimitRanger plugin set: {}", notes.join("; ")));
        }
    }
}

/// The refusals of `pod` (a pod, or with `claim` a PersistentVolumeClaim) by `ranges`, joined
/// like the API server's aggregate error (`[a, b]` when more than one).
pub fn validate(ranges: &[Value], obj: &Value, claim: bool) -> Option<String> {
    let mut errs: Vec<String> = Vec::new();
    for range in ranges {
        for item in range
            .pointer("/spec/limits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let kind = item["type"].as_str().unwrap_or_default();
            let (min, max, ratio) = (
                list(item, "min"),
                list(item, "max"),
                list(item, "maxLimitRequestRatio"),
            );
            match (kind, claim) {
                ("Container", false) => {
                    for c in pod_containers(obj) {
                        let (req, lim) = container_resources(c);
                        check(kind, &min, &max, &ratio, &req, &lim, &mut errs);
                    }
                }
                ("Pod", false) => {
                    let (req, lim) = (pod_requests(obj, false), pod_limits(obj, false));
                    check(kind, &min, &max, &ratio, &req, &lim, &mut errs);
                }
                ("PersistentVolumeClaim", true) => {
                    let req = obj
                        .pointer("/spec/resources")
                        .map(|r| list(r, "requests"))
                        .unwrap_or_default();
                    for (k, e) in &min {
                        if let Some(msg) = min_constraint(kind, k, e, &req, &BTreeMap::new()) {
                            errs.push(msg);
                        }
                    }
                    for (k, e) in &max {
                        let msg = match req.get(k) {
                            None => Some(format!(
                                "maximum {k} usage per {kind} is {e}.  No request is specified"
                            )),
                            Some(r) if r.milli_value() > e.milli_value() => Some(format!(
                                "maximum {k} usage per {kind} is {e}, but request is {r}"
                            )),
                            _ => None,
                        };
                        errs.extend(msg);
                    }
                }
                _ => {}
            }
        }
    }
    let mut seen = Vec::new();
    for e in errs {
        if !seen.contains(&e) {
            seen.push(e);
        }
    }
    match seen.len() {
        0 => None,
        1 => seen.pop(),
        _ => Some(format!("[{}]", seen.join(", "))),
    }
}

fn check(
    kind: &str,
    min: &Resources,
    max: &Resources,
    ratio: &Resources,
    req: &Resources,
    lim: &Resources,
    errs: &mut Vec<String>,
) {
    for (k, e) in min {
        errs.extend(min_constraint(kind, k, e, req, lim));
    }
    for (k, e) in max {
        let msg = match (lim.get(k), req.get(k)) {
            (None, _) => Some(format!(
                "maximum {k} usage per {kind} is {e}.  No limit is specified"
            )),
            (Some(l), _) if l.milli_value() > e.milli_value() => Some(format!(
                "maximum {k} usage per {kind} is {e}, but limit is {l}"
            )),
            (_, Some(r)) if r.milli_value() > e.milli_value() => Some(format!(
                "maximum {k} usage per {kind} is {e}, but request is {r}"
            )),
            _ => None,
        };
        errs.extend(msg);
    }
    for (k, e) in ratio {
        let r = req.get(k).filter(|r| r.milli_value() != 0);
        let l = lim.get(k).filter(|l| l.milli_value() != 0);
        let msg = match (r, l) {
            (None, _) => Some(format!(
                "{k} max limit to request ratio per {kind} is {e}, but no request is specified or request is 0"
            )),
            (_, None) => Some(format!(
                "{k} max limit to request ratio per {kind} is {e}, but no limit is specified or limit is 0"
            )),
            (Some(r), Some(l)) => {
                let observed = l.milli_value() as f64 / r.milli_value() as f64;
                (observed * 1000.0 > e.milli_value() as f64).then(|| {
                    format!(
                        "{k} max limit to request ratio per {kind} is {e}, but provided ratio is {observed:.6}"
                    )
                })
            }
        };
        errs.extend(msg);
    }
}

fn min_constraint(
    kind: &str,
    k: &str,
    e: &Quantity,
    req: &Resources,
    lim: &Resources,
) -> Option<String> {
    match (req.get(k), lim.get(k)) {
        (None, _) => Some(format!(
            "minimum {k} usage per {kind} is {e}.  No request is specified"
        )),
        (Some(r), _) if r.milli_value() < e.milli_value() => Some(format!(
            "minimum {k} usage per {kind} is {e}, but request is {r}"
        )),
        (_, Some(l)) if l.milli_value() < e.milli_value() => Some(format!(
            "minimum {k} usage per {kind} is {e}, but limit is {l}"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range() -> Value {
        let mut r = json!({"spec": {"limits": [{"type": "Container",
            "max": {"cpu": "1"}, "min": {"memory": "64Mi"}, "defaultRequest": {"cpu": "100m"}}]}});
        default_limit_range(&mut r);
        r
    }

    #[test]
    fn limit_ranges_default_their_items_like_the_api_server() {
        assert_eq!(
            range()["spec"]["limits"][0],
            json!({"type": "Container", "max": {"cpu": "1"}, "min": {"memory": "64Mi"},
                   "default": {"cpu": "1"}, "defaultRequest": {"cpu": "100m", "memory": "64Mi"}})
        );
    }

    #[test]
    fn defaults_fill_what_containers_leave_out_and_bounds_refuse() {
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {
            "initContainers": [{"name": "init", "image": "x"}],
            "containers": [{"name": "app", "image": "x", "resources": {"requests": {"memory": "128Mi"}}}]}});
        mutate(&[range()], &mut pod);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1"}})
        );
        assert_eq!(
            pod["metadata"]["annotations"][ANNOTATION],
            "LimitRanger plugin set: cpu request for container app; cpu limit for container app; \
             cpu, memory request for init container init; cpu limit for init container init"
        );
        assert_eq!(validate(&[range()], &pod, false), None);
        pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] = json!("2");
        pod["spec"]["containers"][0]["resources"]["requests"]["memory"] = json!("32Mi");
        assert_eq!(
            validate(&[range()], &pod, false).as_deref(),
            Some(
                "[minimum memory usage per Container is 64Mi, but request is 32Mi, maximum cpu usage per Container is 1, but limit is 2]"
            )
        );
    }
}

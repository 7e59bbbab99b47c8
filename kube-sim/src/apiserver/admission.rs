// Long file: one admission chain, in the API server's order; split, that order would be hidden.
//! Admission: the stage every create and update of an object passes after the request is
//! decoded and before the object is stored (`store/writes.rs` calls [`admit`]). In the real
//! API server's order:
//! 1. defaulting of built-in types (pods' restart policy, `requests` from `limits`, volumes
//!    without a source as `emptyDir`, quantities in their canonical form, ...);
//! 2. mutating admission: LimitRanger's defaults (`limitrange.rs`);
//! 3. validation of built-in types (names, pods' containers, images, requests within limits;
//!    422);
//! 4. validating admission: PodSecurity (`podsecurity.rs`), LimitRanger's bounds, then
//!    ResourceQuota (`quota.rs`), each a 403 with the real message.
//!
//! Writes through kube-sim's own controllers (kubelet, garbage collector, quota controller)
//! do not pass here. Warnings (PodSecurity's `warn` level) go to the request's [`Warnings`],
//! which the handlers send as `Warning` headers.

use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::apiserver::errors::{ApiError, FieldError};
use crate::apiserver::quantity::{QUANTITY_ERROR, Quantity};
use crate::apiserver::resources::{ResourceType, crd_status};
use crate::apiserver::store::{Store, TypeKey, bad_shape, meta_mut};
use crate::apiserver::{limitrange, podsecurity, quota};

/// The warnings of one request, for its `Warning` response headers.
#[derive(Debug, Clone, Default)]
pub struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    pub fn push(&self, w: String) {
        if let Ok(mut v) = self.0.lock() {
            v.push(w);
        }
    }

    pub fn all(&self) -> Vec<String> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Whether a write makes a new object or changes a stored one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
}

/// A write as admission sees it.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub operation: Operation,
    pub t: &'a ResourceType,
    /// The namespace ("" for cluster-scoped types).
    pub namespace: &'a str,
    pub name: &'a str,
    /// The stored object, on update.
    pub old: Option<&'a Value>,
    /// `Some("status")` for a write through the `/status` subresource.
    pub subresource: Option<&'a str>,
    /// The store, for what plugins read (namespaces, LimitRanges, quotas, pods).
    pub store: &'a Store,
    pub warnings: Option<&'a Warnings>,
}

impl Request<'_> {
    fn is(&self, group: &str, plural: &str) -> bool {
        !self.t.custom && self.t.group == group && self.t.plural == plural
    }

    fn warn(&self, w: String) {
        if let Some(ws) = self.warnings {
            ws.push(w);
        }
    }

    fn namespace_labels(&self) -> Option<Map<String, Value>> {
        let key: TypeKey = (String::new(), "namespaces".into());
        self.store
            .get(&key, "", self.namespace)?
            .pointer("/metadata/labels")?
            .as_object()
            .cloned()
    }

    fn in_namespace(&self, plural: &str) -> Vec<Value> {
        let key: TypeKey = (String::new(), plural.into());
        self.store.list(&key, Some(self.namespace)).0
    }
}

/// Admits `obj` (defaulting it in place), or refuses the write with the error to answer.
pub fn admit(req: &Request<'_>, obj: &mut Value) -> Result<(), ApiError> {
    match (req.operation, req.old, req.subresource) {
        (Operation::Create, _, _) => {
            check_name(req.t, req.name)?;
            if req.is("", "pods") {
                return pod_on_create(req, obj);
            }
            defaults_on_create(req.t, obj, req.name)?;
            validating_plugins(req, obj, None)?;
            if req.t.namespaced {
                let key: TypeKey = (req.t.group.clone(), req.t.plural.clone());
                quota::admit(req.store, &key, req.namespace, req.name, obj)?;
            }
            Ok(())
        }
        (Operation::Update, Some(old), None) => {
            defaults_on_update(req.t, obj, old)?;
            validating_plugins(req, obj, Some(old))
        }
        (Operation::Update, _, _) => Ok(()),
    }
}

/// Pod creation: defaults, LimitRanger's defaults, validation, PodSecurity, LimitRanger's
/// bounds, quota.
fn pod_on_create(req: &Request<'_>, obj: &mut Value) -> Result<(), ApiError> {
    let name = req.name;
    canonical_quantities(obj, "Pod")?;
    default_pod(obj);
    let ranges = req.in_namespace("limitranges");
    limitrange::mutate(&ranges, obj);
    validate_pod(obj, name)?;
    obj["status"] = json!({"phase": "Pending", "qosClass": qos_class(obj)});
    let outcome = podsecurity::admit(
        req.namespace_labels().as_ref(),
        &obj["metadata"],
        &obj["spec"],
        true,
        req.store.server_minor(),
        name,
    )?;
    report(req, outcome);
    if let Some(why) = limitrange::validate(&ranges, obj, false) {
        return Err(ApiError::forbidden("", "pods", name, &why));
    }
    let key: TypeKey = (String::new(), "pods".into());
    quota::admit(req.store, &key, req.namespace, name, obj)
}

fn report(req: &Request<'_>, outcome: podsecurity::Outcome) {
    if let Some(a) = outcome.audit {
        tracing::info!(
            "audit: {} {}/{}: {a}",
            req.t.plural,
            req.namespace,
            req.name
        );
    }
    for w in outcome.warnings {
        req.warn(w);
    }
}

/// The validating plugins for objects other than new pods: PodSecurity for pod updates and
/// workloads' pod templates (warnings only), namespaces' PodSecurity labels, LimitRanger
/// for claims.
fn validating_plugins(req: &Request<'_>, obj: &Value, old: Option<&Value>) -> Result<(), ApiError> {
    let minor = req.store.server_minor();
    if req.is("", "pods")
        && let Some(old) = old
    {
        if significant_pod_update(old, obj) {
            let outcome = podsecurity::admit(
                req.namespace_labels().as_ref(),
                &obj["metadata"],
                &obj["spec"],
                true,
                minor,
                req.name,
            )?;
            report(req, outcome);
        }
        return Ok(());
    }
    if req.is("", "namespaces") {
        let labels = |o: &Value| {
            o.pointer("/metadata/labels")
                .and_then(Value::as_object)
                .cloned()
        };
        let pods = if old.is_some() {
            let key: TypeKey = (String::new(), "pods".into());
            req.store.list(&key, Some(req.name)).0
        } else {
            Vec::new()
        };
        let old_labels = old.map(|o| labels(o).unwrap_or_default());
        let warnings = podsecurity::namespace_change(
            req.name,
            old_labels.as_ref(),
            labels(obj).as_ref(),
            &pods,
            minor,
        )?;
        for w in warnings {
            req.warn(w);
        }
        return Ok(());
    }
    if req.is("", "persistentvolumeclaims") && old.is_none() {
        let ranges = req.in_namespace("limitranges");
        if let Some(why) = limitrange::validate(&ranges, obj, true) {
            return Err(ApiError::forbidden(
                "",
                "persistentvolumeclaims",
                req.name,
                &why,
            ));
        }
    }
    if !req.t.custom
        && let Some((meta, spec)) = podsecurity::pod_template(&req.t.group, &req.t.plural, obj)
    {
        let outcome = podsecurity::admit(
            req.namespace_labels().as_ref(),
            &meta,
            &spec,
            false,
            minor,
            req.name,
        )?;
        report(req, outcome);
    }
    Ok(())
}

/// Whether a pod update changes what PodSecurity looks at (containers or their images).
fn significant_pod_update(old: &Value, new: &Value) -> bool {
    let images = |o: &Value| -> Vec<Value> {
        quota::pod_containers(o)
            .map(|c| c["image"].clone())
            .collect()
    };
    images(old) != images(new)
}

/// The defaults the API server gives every pod (besides the fields below): `requests` from
/// `limits` where left out, volumes without a source as `emptyDir`.
fn default_pod(obj: &mut Value) {
    let spec = &mut obj["spec"];
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("serviceAccountName", json!("default")),
        ("schedulerName", json!("default-scheduler")),
    ] {
        if spec.get(k).is_none() {
            spec[k] = v;
        }
    }
    for list in ["containers", "initContainers"] {
        for c in spec
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let Some(limits) = c
                .pointer("/resources/limits")
                .and_then(Value::as_object)
                .cloned()
            else {
                continue;
            };
            let requests = &mut c["resources"]["requests"];
            if !requests.is_object() {
                *requests = json!({});
            }
            for (k, v) in limits {
                if requests.get(&k).is_none() {
                    requests[k] = v;
                }
            }
        }
    }
    const SOURCES: &[&str] = &[
        "emptyDir",
        "hostPath",
        "secret",
        "configMap",
        "projected",
        "downwardAPI",
        "persistentVolumeClaim",
        "ephemeral",
        "csi",
        "nfs",
        "iscsi",
        "gitRepo",
        "glusterfs",
        "rbd",
        "flexVolume",
        "cinder",
        "cephfs",
        "flocker",
        "fc",
        "azureFile",
        "azureDisk",
        "vsphereVolume",
        "quobyte",
        "photonPersistentDisk",
        "portworxVolume",
        "scaleIO",
        "storageos",
        "gcePersistentDisk",
        "awsElasticBlockStore",
        "image",
    ];
    for v in spec
        .get_mut("volumes")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if v.is_object() && !SOURCES.iter().any(|s| v.get(*s).is_some()) {
            v["emptyDir"] = json!({});
        }
    }
}

/// Containers (names, images) and their resources (requests within limits).
fn validate_pod(obj: &Value, name: &str) -> Result<(), ApiError> {
    let mut errs = Vec::new();
    let containers = obj.pointer("/spec/containers").and_then(Value::as_array);
    if containers.is_none_or(|c| c.is_empty()) {
        errs.push(FieldError::required("spec.containers"));
    }
    for (list, field) in [
        ("containers", "spec.containers"),
        ("initContainers", "spec.initContainers"),
    ] {
        for (i, c) in obj["spec"][list]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if c["name"].as_str().is_none_or(str::is_empty) {
                errs.push(FieldError::required(&format!("{field}[{i}].name")));
            }
            if c["image"].as_str().is_none_or(str::is_empty) {
                errs.push(FieldError::required(&format!("{field}[{i}].image")));
            }
            let (requests, limits) = quota::container_resources(c);
            for (res, req) in &requests {
                if let Some(lim) = limits.get(res)
                    && req > lim
                {
                    errs.push(FieldError::invalid(
                        &format!("{field}[{i}].resources.requests[{res}]"),
                        &Value::String(req.canonical()),
                        format!("must be less than or equal to {res} limit of {lim}"),
                    ));
                }
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid("Pod", "", name, &errs))
    }
}

/// The pod's QoS class: `Guaranteed` when every container limits cpu and memory and requests
/// what it limits, `BestEffort` when none asks for or limits either, else `Burstable`.
fn qos_class(pod: &Value) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for c in quota::pod_containers(pod) {
        let (req, lim) = quota::container_resources(c);
        for k in ["cpu", "memory"] {
            any |= req.contains_key(k) || lim.contains_key(k);
            guaranteed &= lim.contains_key(k) && req.get(k).is_none_or(|r| Some(r) == lim.get(k));
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        _ => "Burstable",
    }
}

/// Quantities in their canonical form (`0.5` is stored as `500m`), or the 400 the API server
/// answers for a quantity it cannot decode.
fn canonical_quantities(obj: &mut Value, kind: &str) -> Result<(), ApiError> {
    let mut lists: Vec<&mut Value> = Vec::new();
    match kind {
        "Pod" => {
            if let Some(s) = obj["spec"].as_object_mut() {
                for (k, v) in s.iter_mut() {
                    if k == "overhead" {
                        lists.push(v);
                        continue;
                    }
                    if !matches!(
                        k.as_str(),
                        "containers" | "initContainers" | "ephemeralContainers"
                    ) {
                        continue;
                    }
                    for c in v.as_array_mut().into_iter().flatten() {
                        if let Some(r) = c.get_mut("resources").and_then(Value::as_object_mut) {
                            for (f, l) in r.iter_mut() {
                                if f == "requests" || f == "limits" {
                                    lists.push(l);
                                }
                            }
                        }
                    }
                }
            }
        }
        "ResourceQuota" => {
            if let Some(h) = obj.pointer_mut("/spec/hard") {
                lists.push(h);
            }
        }
        _ => {
            for item in obj
                .pointer_mut("/spec/limits")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(o) = item.as_object_mut() {
                    for (f, l) in o.iter_mut() {
                        if f != "type" && l.is_object() {
                            lists.push(l);
                        }
                    }
                }
            }
        }
    }
    for l in lists {
        for (_, q) in l.as_object_mut().into_iter().flatten() {
            let parsed = Quantity::from_json(q).map_err(|_| {
                ApiError::bad_request(format!(
                    "{kind} in version \"v1\" cannot be handled as a {kind}: {QUANTITY_ERROR}"
                ))
            })?;
            *q = Value::String(parsed.canonical());
        }
    }
    Ok(())
}

/// Names are DNS subdomains; namespaces' and Services' are DNS labels.
fn check_name(t: &ResourceType, name: &str) -> Result<(), ApiError> {
    let label_only = t.group.is_empty() && matches!(t.plural.as_str(), "namespaces" | "services");
    let name_ok = if label_only {
        dns_label_ok(name)
    } else {
        dns_subdomain_ok(name)
    };
    if !name_ok {
        let what = if label_only {
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
        } else {
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        };
        return Err(ApiError::invalid(
            &t.kind,
            &t.group,
            name,
            &[FieldError::invalid(
                "metadata.name",
                &Value::String(name.to_string()),
                what,
            )],
        ));
    }
    Ok(())
}

fn dns_label_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_subdomain_ok(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label_ok)
}

/// Type-specific defaults and validation on create.
fn defaults_on_create(t: &ResourceType, obj: &mut Value, name: &str) -> Result<(), ApiError> {
    let builtin = !t.custom;
    match (t.group.as_str(), t.plural.as_str()) {
        ("", "resourcequotas") if builtin => {
            canonical_quantities(obj, "ResourceQuota")?;
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
        ("", "limitranges") if builtin => {
            canonical_quantities(obj, "LimitRange")?;
            limitrange::default_limit_range(obj);
        }
        ("", "namespaces") if builtin => {
            obj["status"] = json!({"phase": "Active"});
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            let Some(m) = meta_mut(obj) else {
                return Err(bad_shape());
            };
            let labels = m.entry("labels").or_insert_with(|| json!({}));
            labels["kubernetes.io/metadata.name"] = Value::String(name.to_string());
        }
        ("", "secrets") if builtin => {
            fold_string_data(obj);
            if obj.get("type").is_none() {
                obj["type"] = json!("Opaque");
            }
        }
        ("", "services") if builtin => {
            if obj.pointer("/spec/type").is_none() {
                obj["spec"]["type"] = json!("ClusterIP");
            }
            if let Some(ports) = obj.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
                for p in ports {
                    if p.get("protocol").is_none() {
                        p["protocol"] = json!("TCP");
                    }
                    if p.get("targetPort").is_none() {
                        p["targetPort"] = p["port"].clone();
                    }
                }
            }
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            let spec = &obj["spec"];
            let mut errs = Vec::new();
            for f in ["group", "names", "scope", "versions"] {
                if spec.get(f).is_none() {
                    errs.push(FieldError::required(&format!("spec.{f}")));
                }
            }
            let plural = spec
                .pointer("/names/plural")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let group = spec["group"].as_str().unwrap_or_default();
            if errs.is_empty() && name != format!("{plural}.{group}") {
                errs.push(FieldError::invalid(
                    "metadata.name",
                    &Value::String(name.into()),
                    "must be spec.names.plural+\".\"+spec.group",
                ));
            }
            if !errs.is_empty() {
                return Err(ApiError::invalid(&t.kind, &t.group, name, &errs));
            }
            obj["status"] = crd_status(obj);
        }
        _ => {
            if t.has_status
                && t.custom
                && let Some(o) = obj.as_object_mut()
            {
                o.remove("status");
            }
        }
    }
    Ok(())
}

/// Type-specific defaults on update of an object (not of its `/status`): what the stored
/// object keeps (a Service's cluster IP, a pod's node), Secrets' `stringData`, quantities.
fn defaults_on_update(t: &ResourceType, new: &mut Value, old: &Value) -> Result<(), ApiError> {
    let key = (t.group.as_str(), t.plural.as_str());
    if !t.custom && key == ("", "resourcequotas") {
        canonical_quantities(new, "ResourceQuota")?;
    }
    if !t.custom && key == ("", "limitranges") {
        canonical_quantities(new, "LimitRange")?;
        limitrange::default_limit_range(new);
    }
    if key.0.is_empty()
        && key.1 == "services"
        && let Some(ip) = old.pointer("/spec/clusterIP")
    {
        new["spec"]["clusterIP"] = ip.clone();
    }
    if key.0.is_empty() && key.1 == "pods" {
        // The pod spec is immutable but for a few fields; nodeName is set by binding.
        if let Some(n) = old.pointer("/spec/nodeName")
            && new.pointer("/spec/nodeName").is_none()
        {
            new["spec"]["nodeName"] = n.clone();
        }
    }
    if key.0.is_empty() && key.1 == "secrets" {
        fold_string_data(new);
    }
    Ok(())
}

/// Folds a Secret's `stringData` into `data` (base64), as the real API server does.
fn fold_string_data(obj: &mut Value) {
    if let Some(sd) = obj.get("stringData").and_then(Value::as_object).cloned() {
        let data = obj
            .as_object_mut()
            .map(|o| o.entry("data").or_insert_with(|| json!({})));
        if let Some(data) = data {
            for (k, v) in sd {
                let s = v.as_str().unwrap_or_default();
                data[k] = Value::String(base64::engine::general_purpose::STANDARD.encode(s));
            }
        }
        if let Some(o) = obj.as_object_mut() {
            o.remove("stringData");
        }
    }
}

//! Admission: the stage every create and update of an object passes after the request is
//! decoded and before the object is stored (`store/writes.rs` calls [`admit`]). Today it holds
//! the type-specific defaulting and validation of built-in types (names, pods' containers and
//! images, Secrets' `stringData`, Services' cluster IP and ports, namespaces, CRD names), so
//! writes through the API and kube-sim's own controllers are treated alike. Admission plugins
//! (Pod Security Admission, ResourceQuota, LimitRange, ...) plug in here: mutating ones before
//! validating ones, as in the real API server.

use base64::Engine;
use serde_json::{Value, json};

use crate::apiserver::errors::{ApiError, FieldError};
use crate::apiserver::resources::{ResourceType, crd_status};
use crate::apiserver::store::{bad_shape, meta_mut};

/// Whether a write makes a new object or changes a stored one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
}

/// A write as admission sees it.
#[derive(Debug, Clone, Copy)]
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
}

/// Admits `obj` (defaulting it in place), or refuses the write with the error to answer.
pub fn admit(req: &Request<'_>, obj: &mut Value) -> Result<(), ApiError> {
    match (req.operation, req.old, req.subresource) {
        (Operation::Create, _, _) => {
            check_name(req.t, req.name)?;
            defaults_on_create(req.t, obj, req.name)
        }
        (Operation::Update, Some(old), None) => {
            defaults_on_update(req.t, obj, old);
            Ok(())
        }
        (Operation::Update, _, _) => Ok(()),
    }
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
        ("", "pods") if builtin => {
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
                }
            }
            if !errs.is_empty() {
                return Err(ApiError::invalid(&t.kind, "", name, &errs));
            }
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
            obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
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
/// object keeps (a Service's cluster IP, a pod's node) and Secrets' `stringData`.
fn defaults_on_update(t: &ResourceType, new: &mut Value, old: &Value) {
    let key = (t.group.as_str(), t.plural.as_str());
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

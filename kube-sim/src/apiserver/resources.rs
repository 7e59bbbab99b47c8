//! The resource types kube-sim serves: the built-in ones and those that CRDs register.

use serde_json::{Value, json};

use crate::time::now_rfc3339;

/// An `additionalPrinterColumns` entry of a CRD version.
#[derive(Debug, Clone)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub json_path: String,
    pub priority: i64,
    pub description: String,
    pub format: String,
}

/// One served group/version/resource.
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub has_status: bool,
    /// Whether the type is a custom resource (its schema is enforced, spec changes bump generation).
    pub custom: bool,
    pub printer_columns: Vec<PrinterColumn>,
    /// `openAPIV3Schema` of a custom resource version.
    pub schema: Option<Value>,
    /// Whether this is the storage version (the one other versions are written as).
    pub storage: bool,
    /// Types that only answer `create` (reviews).
    pub create_only: bool,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        if self.create_only {
            vec!["create"]
        } else {
            vec![
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        }
    }

    pub fn discovery_entries(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": self.verbs(),
            "shortNames": self.short_names,
            "categories": self.categories,
        })];
        if self.has_status {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.plural == "pods" && self.group.is_empty() {
            out.push(json!({
                "name": "pods/log", "singularName": "", "namespaced": true,
                "kind": "Pod", "verbs": ["get"],
            }));
        }
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    has_status: bool,
    categories: &[&str],
) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: version.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: categories.iter().map(|s| s.to_string()).collect(),
        has_status,
        custom: false,
        printer_columns: Vec::new(),
        schema: None,
        storage: true,
        create_only: false,
    }
}

/// One built-in type: group, version, plural, kind, namespaced, short names, whether it has a
/// status subresource, categories.
type Builtin = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
    &'static [&'static str],
    bool,
    &'static [&'static str],
);

/// The built-in types, one a line.
#[rustfmt::skip]
const BUILTINS: &[Builtin] = &[
    ("", "v1", "namespaces", "Namespace", false, &["ns"], true, &[]),
    ("", "v1", "nodes", "Node", false, &["no"], true, &[]),
    ("", "v1", "pods", "Pod", true, &["po"], true, &["all"]),
    ("", "v1", "secrets", "Secret", true, &[], false, &[]),
    ("", "v1", "configmaps", "ConfigMap", true, &["cm"], false, &[]),
    ("", "v1", "services", "Service", true, &["svc"], true, &["all"]),
    ("", "v1", "endpoints", "Endpoints", true, &["ep"], false, &[]),
    ("", "v1", "serviceaccounts", "ServiceAccount", true, &["sa"], false, &[]),
    ("", "v1", "events", "Event", true, &["ev"], false, &[]),
    ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true, &["pvc"], true, &[]),
    ("", "v1", "resourcequotas", "ResourceQuota", true, &["quota"], true, &[]),
    ("", "v1", "limitranges", "LimitRange", true, &["limits"], false, &[]),
    ("events.k8s.io", "v1", "events", "Event", true, &["ev"], false, &[]),
    ("coordination.k8s.io", "v1", "leases", "Lease", true, &[], false, &[]),
    ("apps", "v1", "deployments", "Deployment", true, &["deploy"], true, &["all"]),
    ("apps", "v1", "statefulsets", "StatefulSet", true, &["sts"], true, &["all"]),
    ("apps", "v1", "replicasets", "ReplicaSet", true, &["rs"], true, &["all"]),
    ("apps", "v1", "daemonsets", "DaemonSet", true, &["ds"], true, &["all"]),
    ("batch", "v1", "jobs", "Job", true, &[], true, &["all"]),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", true, &["pdb"], true, &[]),
    ("networking.k8s.io", "v1", "ingresses", "Ingress", true, &["ing"], true, &[]),
    ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", true, &["netpol"], false, &[]),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role", true, &[], false, &[]),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", true, &[], false, &[]),
    ("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false, &[], false, &[]),
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", false, &[], false, &[]),
    ("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", false, &["crd", "crds"], true, &[]),
    ("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", true, &["hpa"], true, &["all"]),
];

/// The review types (version v1), which only take a create: group, plural, kind, namespaced.
#[rustfmt::skip]
const REVIEWS: &[(&str, &str, &str, bool)] = &[
    ("authentication.k8s.io", "tokenreviews", "TokenReview", false),
    ("authorization.k8s.io", "subjectaccessreviews", "SubjectAccessReview", false),
    ("authorization.k8s.io", "selfsubjectaccessreviews", "SelfSubjectAccessReview", false),
    ("authorization.k8s.io", "localsubjectaccessreviews", "LocalSubjectAccessReview", true),
];

/// The built-in types kube-sim serves.
pub fn builtin_types() -> Vec<ResourceType> {
    let mut v: Vec<ResourceType> = BUILTINS
        .iter()
        .map(
            |&(group, version, plural, kind, namespaced, short, status, categories)| {
                builtin(
                    group, version, plural, kind, namespaced, short, status, categories,
                )
            },
        )
        .collect();
    for &(group, plural, kind, namespaced) in REVIEWS {
        let mut t = builtin(group, "v1", plural, kind, namespaced, &[], false, &[]);
        t.create_only = true;
        v.push(t);
    }
    v
}

/// The resource types a CRD object registers (one per served version).
pub fn types_from_crd(crd: &Value) -> Vec<ResourceType> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let str_list = crate::json::string_list;
    let kind = names["kind"].as_str().unwrap_or_default().to_string();
    let plural = names["plural"].as_str().unwrap_or_default().to_string();
    let singular = names["singular"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| kind.to_lowercase());
    let mut out = Vec::new();
    for ver in spec["versions"].as_array().into_iter().flatten() {
        if ver["served"] == Value::Bool(false) {
            continue;
        }
        let printer_columns = ver["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| PrinterColumn {
                name: c["name"].as_str().unwrap_or_default().into(),
                type_: c["type"].as_str().unwrap_or("string").into(),
                json_path: c["jsonPath"].as_str().unwrap_or_default().into(),
                priority: c["priority"].as_i64().unwrap_or(0),
                description: c["description"].as_str().unwrap_or_default().into(),
                format: c["format"].as_str().unwrap_or_default().into(),
            })
            .collect();
        out.push(ResourceType {
            group: spec["group"].as_str().unwrap_or_default().into(),
            version: ver["name"].as_str().unwrap_or_default().into(),
            plural: plural.clone(),
            singular: singular.clone(),
            kind: kind.clone(),
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            short_names: str_list(&names["shortNames"]),
            categories: str_list(&names["categories"]),
            has_status: ver.pointer("/subresources/status").is_some(),
            custom: true,
            printer_columns,
            schema: ver.pointer("/schema/openAPIV3Schema").cloned(),
            storage: ver["storage"].as_bool().unwrap_or(false),
            create_only: false,
        });
    }
    out
}

/// The status of an accepted CRD: its names accepted, its storage versions, Established.
pub fn crd_status(crd: &Value) -> Value {
    let now = now_rfc3339();
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v["storage"] == Value::Bool(true))
        .map(|v| v["name"].clone())
        .collect();
    json!({
        "acceptedNames": names,
        "storedVersions": stored,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now},
        ]
    })
}

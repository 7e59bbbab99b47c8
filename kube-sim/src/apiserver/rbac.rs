//! Authorization of requests: what a request asks for (verb, API group, resource,
//! subresource, namespace, name; or a non-resource path), and whether an identity may do it
//! under the stored RBAC objects (Role, ClusterRole, RoleBinding, ClusterRoleBinding), the
//! auth config's `rules`, and the few grants every real cluster gives authenticated users
//! (`system:discovery`, `system:basic-user`, `system:public-info-viewer`).
//!
//! Requests are mapped to verbs like the real API server's `RequestInfoFactory`: GET of one
//! object is `get`, of a collection `list`, with `?watch=true` (or under `/watch/`) `watch`;
//! POST `create`, PUT `update`, PATCH `patch`, DELETE of one object `delete`, of a collection
//! `deletecollection`. A list or watch with `fieldSelector=metadata.name=X` names `X`, so
//! `resourceNames` rules apply to it, as on a real server.

use serde_json::Value;

use crate::apiserver::auth::Identity;
use crate::apiserver::store::Store;
use crate::apiserver::errors::ApiError;

const RBAC: &str = "rbac.authorization.k8s.io";

/// The requests kube-sim refused with 403, for tests to assert on (`KubeSim::denials`).
#[derive(Debug, Default)]
pub struct DenialLog(std::sync::Mutex<Vec<String>>);

/// How many refusals [`DenialLog`] keeps (the latest).
const DENIALS_KEPT: usize = 10_000;

impl DenialLog {
    pub fn record(&self, line: String) {
        let mut g = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.len() >= DENIALS_KEPT {
            g.remove(0);
        }
        g.push(line);
    }

    /// Every refusal so far: `METHOD URI: message`.
    pub fn all(&self) -> Vec<String> {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attrs {
    Resource {
        verb: String,
        group: String,
        resource: String,
        subresource: String,
        namespace: String,
        name: String,
    },
    NonResource {
        verb: String,
        path: String,
    },
}

impl Attrs {
    /// A resource request, for reviews and tests.
    pub fn resource(verb: &str, group: &str, resource: &str, namespace: &str) -> Attrs {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        Attrs::Resource {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespace: namespace.into(),
            name: String::new(),
        }
    }

    /// The request's attributes, as the real API server derives them from method, path and
    /// query.
    pub fn of_request(method: &str, path: &str, query: &dyn Fn(&str) -> Option<String>) -> Attrs {
        let segs: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let (group, rest) = match segs.as_slice() {
            ["api", _v, rest @ ..] if !rest.is_empty() => ("", rest),
            ["apis", g, _v, rest @ ..] if !rest.is_empty() => (*g, rest),
            _ => {
                return Attrs::NonResource {
                    verb: method.to_ascii_lowercase(),
                    path: format!("/{}", segs.join("/")),
                };
            }
        };
        let mut verb = match method {
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            _ => "get",
        }
        .to_string();
        let mut parts: &[&str] = rest;
        if parts.first() == Some(&"watch") {
            verb = "watch".into();
            parts = &parts[1..];
        }
        let mut namespace = String::new();
        if parts.first() == Some(&"namespaces") && parts.len() > 1 {
            namespace = parts[1].to_string();
            if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
                parts = &parts[2..];
            }
        }
        let at = |i: usize| parts.get(i).map(|s| s.to_string()).unwrap_or_default();
        let (resource, mut name, subresource) = (at(0), at(1), at(2));
        if name.is_empty() && verb == "get" {
            let watching = query("watch").is_some_and(|w| w == "true" || w == "1");
            verb = if watching { "watch" } else { "list" }.into();
        }
        if name.is_empty() && verb == "delete" {
            verb = "deletecollection".into();
        }
        if name.is_empty()
            && (verb == "list" || verb == "watch")
            && let Some(fs) = query("fieldSelector")
            && let Some(n) = exact_name(&fs)
        {
            name = n;
        }
        Attrs::Resource {
            verb,
            group: group.into(),
            resource,
            subresource,
            namespace,
            name,
        }
    }

    /// `resource` or `resource/subresource`, as rules and messages name it (empty for a
    /// non-resource request).
    pub fn full_resource(&self) -> String {
        match self {
            Attrs::Resource {
                resource,
                subresource,
                ..
            } if !subresource.is_empty() => format!("{resource}/{subresource}"),
            Attrs::Resource { resource, .. } => resource.clone(),
            Attrs::NonResource { .. } => String::new(),
        }
    }

    pub fn verb(&self) -> &str {
        match self {
            Attrs::Resource { verb, .. } | Attrs::NonResource { verb, .. } => verb,
        }
    }
}

/// `metadata.name=X` (or `==`) alone in a field selector.
fn exact_name(fs: &str) -> Option<String> {
    let parts: Vec<&str> = fs.split(',').filter(|p| !p.trim().is_empty()).collect();
    let [one] = parts.as_slice() else {
        return None;
    };
    let (k, v) = one.split_once("==").or_else(|| one.split_once('='))?;
    (k.trim() == "metadata.name" && !v.is_empty()).then(|| v.trim().into())
}

/// The 403 a real API server answers, e.g. `pods is forbidden: User "bob" cannot list
/// resource "pods" in API group "" in the namespace "team-b"`.
pub fn forbidden(user: &str, a: &Attrs) -> ApiError {
    match a {
        Attrs::NonResource { verb, path } => ApiError::new(
            403,
            "Forbidden",
            format!("forbidden: User \"{user}\" cannot {verb} path \"{path}\""),
        ),
        Attrs::Resource {
            verb,
            group,
            resource,
            namespace,
            name,
            ..
        } => {
            let full = a.full_resource();
            let scope = if namespace.is_empty() {
                "at the cluster scope".to_string()
            } else {
                format!("in the namespace \"{namespace}\"")
            };
            let why = format!(
                "User \"{user}\" cannot {verb} resource \"{full}\" in API group \"{group}\" {scope}"
            );
            let qualified = if group.is_empty() {
                resource.clone()
            } else {
                format!("{resource}.{group}")
            };
            let message = if name.is_empty() {
                format!("{qualified} is forbidden: {why}")
            } else {
                format!("{qualified} \"{name}\" is forbidden: {why}")
            };
            ApiError::new(403, "Forbidden", message)
                .with_details(serde_json::json!({"name": name, "group": group, "kind": resource}))
        }
    }
}

/// What every authenticated user may do on a real cluster (the default ClusterRoles
/// `system:discovery`, `system:basic-user` and `system:public-info-viewer`).
fn default_grant(a: &Attrs) -> bool {
    match a {
        Attrs::NonResource { verb, path } => {
            verb == "get"
                && (matches!(
                    path.as_str(),
                    "/" | "/api" | "/apis" | "/version" | "/healthz" | "/livez" | "/readyz"
                ) || ["/api/", "/apis/", "/openapi/", "/version/"]
                    .iter()
                    .any(|p| path.starts_with(p))
                    || path == "/openapi")
        }
        Attrs::Resource {
            verb,
            group,
            resource,
            ..
        } => {
            verb == "create"
                && group == "authorization.k8s.io"
                && matches!(
                    resource.as_str(),
                    "selfsubjectaccessreviews" | "selfsubjectrulesreviews"
                )
        }
    }
}

/// Whether `id` may do `a`: `system:masters` always may; otherwise a default grant, a stored
/// RBAC rule or an auth-config rule must allow it.
pub fn allowed(store: &Store, cfg: &crate::apiserver::auth::AuthConfig, id: &Identity, a: &Attrs) -> bool {
    id.groups.iter().any(|g| g == "system:masters")
        || default_grant(a)
        || cfg.rules_allow(id, a)
        || rbac_allows(store, id, a)
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn has(list: &[&str], want: &str) -> bool {
    list.iter().any(|x| *x == "*" || *x == want)
}

/// One PolicyRule against the request, with RBAC's matching (`*`, `*/sub`, URL prefixes `/x*`).
pub fn rule_allows(rule: &Value, a: &Attrs) -> bool {
    if !has(&strs(&rule["verbs"]), a.verb()) {
        return false;
    }
    match a {
        Attrs::NonResource { path, .. } => strs(&rule["nonResourceURLs"]).iter().any(|u| {
            *u == "*" || u == path || u.strip_suffix('*').is_some_and(|p| path.starts_with(p))
        }),
        Attrs::Resource {
            group,
            subresource,
            name,
            ..
        } => {
            let full = a.full_resource();
            let names = strs(&rule["resourceNames"]);
            has(&strs(&rule["apiGroups"]), group)
                && strs(&rule["resources"]).iter().any(|r| {
                    *r == "*"
                        || *r == full
                        || (!subresource.is_empty() && r.strip_prefix("*/") == Some(subresource))
                })
                && (names.is_empty() || (!name.is_empty() && names.contains(&name.as_str())))
        }
    }
}

/// Whether a binding names `id` (User, Group, or ServiceAccount `system:serviceaccount:NS:NAME`;
/// a ServiceAccount subject without a namespace is in the RoleBinding's).
fn binds(binding: &Value, id: &Identity, binding_ns: &str) -> bool {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| {
            let name = s["name"].as_str().unwrap_or_default();
            match s["kind"].as_str().unwrap_or_default() {
                "User" => id.username == name,
                "Group" => id.groups.iter().any(|g| g == name),
                "ServiceAccount" => {
                    let ns = s["namespace"]
                        .as_str()
                        .filter(|n| !n.is_empty())
                        .unwrap_or(binding_ns);
                    id.username == format!("system:serviceaccount:{ns}:{name}")
                }
                _ => false,
            }
        })
}

/// The rules of a binding's `roleRef` (a Role in `ns`, or a ClusterRole).
fn role_rules(store: &Store, binding: &Value, ns: &str) -> Vec<Value> {
    let name = binding
        .pointer("/roleRef/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let role = match binding.pointer("/roleRef/kind").and_then(Value::as_str) {
        Some("ClusterRole") => store.get(&(RBAC.into(), "clusterroles".into()), "", name),
        Some("Role") if !ns.is_empty() => store.get(&(RBAC.into(), "roles".into()), ns, name),
        _ => None,
    };
    role.and_then(|r| r["rules"].as_array().cloned())
        .unwrap_or_default()
}

fn rbac_allows(store: &Store, id: &Identity, a: &Attrs) -> bool {
    let grants = |binding: &Value, ns: &str| {
        binds(binding, id, ns)
            && role_rules(store, binding, ns)
                .iter()
                .any(|r| rule_allows(r, a))
    };
    let (crbs, _) = store.list(&(RBAC.into(), "clusterrolebindings".into()), None);
    if crbs.iter().any(|b| grants(b, "")) {
        return true;
    }
    let ns = match a {
        Attrs::Resource { namespace, .. } if !namespace.is_empty() => namespace,
        _ => return false,
    };
    let (rbs, _) = store.list(&(RBAC.into(), "rolebindings".into()), Some(ns));
    rbs.iter().any(|b| grants(b, ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(method: &str, path: &str, query: &[(&str, &str)]) -> Attrs {
        let q: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Attrs::of_request(method, path, &|k| {
            q.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone())
        })
    }

    fn res(verb: &str, group: &str, r: &str, sub: &str, ns: &str, name: &str) -> Attrs {
        Attrs::Resource {
            verb: verb.into(),
            group: group.into(),
            resource: r.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
        }
    }

    type Case = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        Attrs,
    );

    #[test]
    fn requests_map_to_verbs_like_the_api_server() {
        let cases: [Case; 8] = [
            (
                "GET",
                "/api/v1/namespaces/a/pods",
                &[],
                res("list", "", "pods", "", "a", ""),
            ),
            (
                "GET",
                "/api/v1/pods",
                &[("watch", "true")],
                res("watch", "", "pods", "", "", ""),
            ),
            (
                "GET",
                "/api/v1/watch/namespaces/a/pods",
                &[],
                res("watch", "", "pods", "", "a", ""),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/log",
                &[],
                res("get", "", "pods", "log", "a", "p"),
            ),
            (
                "PUT",
                "/apis/agentrun.dev/v1alpha1/namespaces/d/agentruns/x/status",
                &[],
                res("update", "agentrun.dev", "agentruns", "status", "d", "x"),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/a/secrets",
                &[],
                res("deletecollection", "", "secrets", "", "a", ""),
            ),
            (
                "GET",
                "/api/v1/namespaces/a",
                &[],
                res("get", "", "namespaces", "", "a", "a"),
            ),
            (
                "GET",
                "/apis/coordination.k8s.io/v1/namespaces/a/leases",
                &[("fieldSelector", "metadata.name=l")],
                res("list", "coordination.k8s.io", "leases", "", "a", "l"),
            ),
        ];
        for (method, path, query, want) in cases {
            assert_eq!(attrs(method, path, query), want, "{method} {path}");
        }
        assert_eq!(
            attrs("GET", "/apis/apps/v1", &[]),
            Attrs::NonResource {
                verb: "get".into(),
                path: "/apis/apps/v1".into()
            }
        );
    }

    #[test]
    fn rules_match_like_rbac() {
        let rule = serde_json::json!({"apiGroups": ["agentrun.dev"], "resources": ["agentruns", "*/status"], "verbs": ["get", "patch"]});
        assert!(rule_allows(
            &rule,
            &res("patch", "agentrun.dev", "agentruns", "status", "d", "x")
        ));
        assert!(!rule_allows(
            &rule,
            &res("update", "agentrun.dev", "agentruns", "status", "d", "x")
        ));
        assert!(!rule_allows(
            &rule,
            &res("get", "agentrun.dev", "agentruns", "finalizers", "d", "x")
        ));
        let named = serde_json::json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["c"], "verbs": ["*"]});
        assert!(rule_allows(
            &named,
            &res("get", "", "configmaps", "", "d", "c")
        ));
        assert!(!rule_allows(
            &named,
            &res("list", "", "configmaps", "", "d", "")
        ));
        let urls =
            serde_json::json!({"nonResourceURLs": ["/metrics", "/debug/*"], "verbs": ["get"]});
        let nr = |p: &str| Attrs::NonResource {
            verb: "get".into(),
            path: p.into(),
        };
        assert!(rule_allows(&urls, &nr("/metrics")));
        assert!(rule_allows(&urls, &nr("/debug/pprof")));
        assert!(!rule_allows(&urls, &nr("/version")));
    }

    #[test]
    fn forbidden_messages_read_like_the_real_server() {
        let e = forbidden(
            "system:serviceaccount:agentrun-system:agentrun-operator",
            &res(
                "update",
                "agentrun.dev",
                "agentruns",
                "status",
                "default",
                "x",
            ),
        );
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "agentruns.agentrun.dev \"x\" is forbidden: User \"system:serviceaccount:agentrun-system:agentrun-operator\" cannot update resource \"agentruns/status\" in API group \"agentrun.dev\" in the namespace \"default\""
        );
        let e = forbidden("bob", &res("list", "", "nodes", "", "", ""));
        assert_eq!(
            e.message,
            "nodes is forbidden: User \"bob\" cannot list resource \"nodes\" in API group \"\" at the cluster scope"
        );
    }
}

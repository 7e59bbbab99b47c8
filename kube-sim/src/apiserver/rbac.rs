//! Authorization: whether an identity may do what a request asks for (`attributes.rs`) under
//! the stored RBAC objects (Role, ClusterRole, RoleBinding, ClusterRoleBinding), the auth
//! config's `rules`, and the few grants every real cluster gives authenticated users
//! (`system:discovery`, `system:basic-user`, `system:public-info-viewer`); the 403 a refusal
//! answers, the log of refusals, and the (Local/Self)SubjectAccessReviews, which evaluate the
//! same for the user of the review.

use serde_json::{Value, json};

use crate::apiserver::attributes::Attrs;
use crate::apiserver::auth::{AuthConfig, Identity};
use crate::apiserver::errors::ApiError;
use crate::apiserver::store::Store;

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
            ApiError::forbidden(group, resource, name, &why)
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
pub fn allowed(store: &Store, cfg: &AuthConfig, id: &Identity, a: &Attrs) -> bool {
    id.groups.iter().any(|g| g == "system:masters")
        || default_grant(a)
        || config_rules_allow(cfg, id, a)
        || rbac_allows(store, id, a)
}

fn any(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

/// Whether one of the auth config's `rules` allows the request.
fn config_rules_allow(cfg: &AuthConfig, id: &Identity, a: &Attrs) -> bool {
    let Attrs::Resource {
        verb,
        group,
        namespace,
        name,
        ..
    } = a
    else {
        return false;
    };
    let resource = a.full_resource();
    cfg.rules.iter().any(|r| {
        r.subjects.iter().any(|sub| {
            sub == &id.username
                || sub
                    .strip_prefix("group:")
                    .is_some_and(|g| id.groups.iter().any(|x| x == g))
        }) && any(&r.verbs, verb)
            && any(&r.api_groups, group)
            && any(&r.resources, &resource)
            && (r.namespaces.is_empty() || any(&r.namespaces, namespace))
            && (r.resource_names.is_empty() || any(&r.resource_names, name))
    })
}

/// Fills in `status` of a (Local/Self)SubjectAccessReview from the auth config's rules and
/// the stored RBAC objects. A SelfSubjectAccessReview is about `requester` (None: the
/// unauthenticated admin, who may do anything).
pub fn access_review(
    store: &Store,
    cfg: &AuthConfig,
    mut review: Value,
    local_ns: Option<&str>,
    requester: Option<&Identity>,
    self_review: bool,
) -> Value {
    let spec = review.get("spec").cloned().unwrap_or(json!({}));
    let id = if self_review {
        requester.cloned()
    } else {
        let groups = crate::json::string_list(&spec["groups"]);
        Some(Identity {
            username: spec["user"].as_str().unwrap_or_default().to_string(),
            uid: spec["uid"].as_str().unwrap_or_default().to_string(),
            groups,
        })
    };
    let attrs = if let Some(ra) = spec.get("resourceAttributes") {
        let s = |k: &str| ra[k].as_str().unwrap_or_default().to_string();
        Some(Attrs::Resource {
            verb: s("verb"),
            group: s("group"),
            resource: s("resource"),
            subresource: s("subresource"),
            namespace: local_ns.map(String::from).unwrap_or_else(|| s("namespace")),
            name: s("name"),
        })
    } else {
        spec.get("nonResourceAttributes")
            .map(|n| Attrs::NonResource {
                verb: n["verb"].as_str().unwrap_or_default().to_string(),
                path: n["path"].as_str().unwrap_or_default().to_string(),
            })
    };
    let verdict = match (&id, &attrs) {
        (None, _) => true,
        (Some(id), Some(a)) => allowed(store, cfg, id, a),
        (Some(_), None) => false,
    };
    review["status"] = if verdict {
        json!({"allowed": true, "reason": "kube-sim: allowed by RBAC or the auth config"})
    } else {
        json!({"allowed": false, "reason": "kube-sim: no RBAC or auth config rule allows this"})
    };
    review
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
    use crate::apiserver::attributes::tests::res;

    #[test]
    fn rules_match_like_rbac() {
        let rule = json!({"apiGroups": ["agentrun.dev"], "resources": ["agentruns", "*/status"], "verbs": ["get", "patch"]});
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
        let named = json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["c"], "verbs": ["*"]});
        assert!(rule_allows(
            &named,
            &res("get", "", "configmaps", "", "d", "c")
        ));
        assert!(!rule_allows(
            &named,
            &res("list", "", "configmaps", "", "d", "")
        ));
        let urls = json!({"nonResourceURLs": ["/metrics", "/debug/*"], "verbs": ["get"]});
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

    #[test]
    fn subject_access_reviews_follow_the_config_rules() {
        let cfg: AuthConfig = serde_yaml::from_str(
            "users: [{token: t1, username: alice, groups: [viewers]}]\nrules: [{subjects: ['group:viewers'], verbs: [get], apiGroups: [agentrun.dev], resources: [agentruns], namespaces: [default]}]",
        )
        .unwrap_or_default();
        let store = Store::new(10);
        let sar = |verb: &str, ns: &str| {
            access_review(&store, &cfg, json!({"spec": {"user": "alice", "groups": ["viewers"], "resourceAttributes":
                {"verb": verb, "group": "agentrun.dev", "resource": "agentruns", "namespace": ns}}}), None, None, false)["status"]["allowed"].clone()
        };
        assert_eq!(sar("get", "default"), true);
        assert_eq!(sar("delete", "default"), false);
        assert_eq!(sar("get", "other"), false);
    }
}

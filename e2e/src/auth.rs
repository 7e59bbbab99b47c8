//! TokenReview and SubjectAccessReview answered from a small config file
//! (`--auth-config FILE`), so components that delegate authentication and authorization to
//! the API server can be tested.
//!
//! ```yaml
//! users:
//!   - token: secret-token-of-alice
//!     username: alice
//!     uid: "1001"
//!     groups: [viewers]
//! rules:
//!   - subjects: [alice, "group:viewers"]   # user names, or groups with a "group:" prefix
//!     verbs: [get, list, watch]            # "*" for all
//!     apiGroups: [agentrun.dev]            # "" is the core group, "*" all
//!     resources: [agentruns]               # may name subresources: agentruns/status
//!     namespaces: [default]                # empty: every namespace
//!     resourceNames: []                    # empty: every name
//! ```

use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthConfig {
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub token: String,
    pub username: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub subjects: Vec<String>,
    #[serde(default)]
    pub verbs: Vec<String>,
    #[serde(default)]
    pub api_groups: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub resource_names: Vec<String>,
}

fn any(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

impl AuthConfig {
    pub fn load(path: &std::path::Path) -> anyhow::Result<AuthConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading auth config {}: {e}", path.display()))?;
        serde_yaml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("parsing auth config {}: {e}", path.display()))
    }

    /// Fills in `status` of a TokenReview.
    pub fn token_review(&self, mut review: Value) -> Value {
        let token = review
            .pointer("/spec/token")
            .and_then(Value::as_str)
            .unwrap_or_default();
        review["status"] = match self.users.iter().find(|u| u.token == token) {
            Some(u) => {
                let mut groups = u.groups.clone();
                groups.push("system:authenticated".into());
                json!({"authenticated": true, "user": {"username": u.username, "uid": u.uid, "groups": groups}})
            }
            None => json!({"authenticated": false, "error": "kube-sim: unknown token"}),
        };
        review
    }

    /// Fills in `status` of a (Local/Self)SubjectAccessReview.
    pub fn access_review(&self, mut review: Value, local_ns: Option<&str>) -> Value {
        let spec = review.get("spec").cloned().unwrap_or(json!({}));
        let user = spec["user"].as_str().unwrap_or_default().to_string();
        let groups: Vec<String> = spec["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect();
        let allowed = match spec.get("resourceAttributes") {
            Some(ra) => {
                let s = |k: &str| ra[k].as_str().unwrap_or_default().to_string();
                let ns = local_ns.map(String::from).unwrap_or_else(|| s("namespace"));
                let mut resource = s("resource");
                if !s("subresource").is_empty() {
                    resource = format!("{resource}/{}", s("subresource"));
                }
                self.rules.iter().find(|r| {
                    r.subjects.iter().any(|sub| {
                        sub == &user
                            || sub
                                .strip_prefix("group:")
                                .is_some_and(|g| groups.iter().any(|x| x == g))
                    }) && any(&r.verbs, &s("verb"))
                        && any(&r.api_groups, &s("group"))
                        && any(&r.resources, &resource)
                        && (r.namespaces.is_empty() || any(&r.namespaces, &ns))
                        && (r.resource_names.is_empty() || any(&r.resource_names, &s("name")))
                })
            }
            None => None,
        };
        review["status"] = match allowed {
            Some(_) => json!({"allowed": true, "reason": "kube-sim: allowed by auth config"}),
            None => json!({"allowed": false, "reason": "kube-sim: no rule allows this"}),
        };
        review
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reviews() {
        let cfg: AuthConfig = serde_yaml::from_str(
            "users: [{token: t1, username: alice, groups: [viewers]}]\nrules: [{subjects: ['group:viewers'], verbs: [get], apiGroups: [agentrun.dev], resources: [agentruns], namespaces: [default]}]",
        )
        .unwrap_or_default();
        let r = cfg.token_review(json!({"spec": {"token": "t1"}}));
        assert_eq!(r["status"]["user"]["username"], "alice");
        assert_eq!(
            cfg.token_review(json!({"spec": {"token": "x"}}))["status"]["authenticated"],
            false
        );
        let sar = |verb: &str, ns: &str| {
            cfg.access_review(json!({"spec": {"user": "alice", "groups": ["viewers"], "resourceAttributes":
                {"verb": verb, "group": "agentrun.dev", "resource": "agentruns", "namespace": ns}}}), None)["status"]["allowed"].clone()
        };
        assert_eq!(sar("get", "default"), true);
        assert_eq!(sar("delete", "default"), false);
        assert_eq!(sar("get", "other"), false);
    }
}

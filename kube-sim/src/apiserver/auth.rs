//! Users and extra permissions from a small config file (`--auth-config FILE`): requests with
//! a bearer token are authenticated as its user and authorized by RBAC (`crate::apiserver::rbac`) and the
//! `rules` here; TokenReview and SubjectAccessReview are answered from the same, so components
//! that delegate authentication and authorization to the API server can be tested.
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

use crate::apiserver::rbac::Attrs;
use crate::apiserver::store::Store;

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

/// Who a request is from, as authentication found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub username: String,
    pub uid: String,
    /// The user's groups, then `system:serviceaccounts` and `system:serviceaccounts:NS` for a
    /// ServiceAccount (`system:serviceaccount:NS:NAME`), then `system:authenticated`.
    pub groups: Vec<String>,
}

impl User {
    pub fn identity(&self) -> Identity {
        let mut groups = self.groups.clone();
        let mut add = |g: String| {
            if !groups.contains(&g) {
                groups.push(g);
            }
        };
        if let Some(rest) = self.username.strip_prefix("system:serviceaccount:")
            && let Some((ns, _)) = rest.split_once(':')
        {
            add("system:serviceaccounts".into());
            add(format!("system:serviceaccounts:{ns}"));
        }
        add("system:authenticated".into());
        Identity {
            username: self.username.clone(),
            uid: self.uid.clone(),
            groups,
        }
    }
}

impl AuthConfig {
    pub fn load(path: &std::path::Path) -> anyhow::Result<AuthConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading auth config {}: {e}", path.display()))?;
        let cfg: AuthConfig = serde_yaml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("parsing auth config {}: {e}", path.display()))?;
        cfg.check()
            .map_err(|e| anyhow::anyhow!("auth config {}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Rejects empty or duplicate tokens and users without a name.
    pub fn check(&self) -> Result<(), String> {
        for (i, u) in self.users.iter().enumerate() {
            if u.token.is_empty() || u.username.is_empty() {
                return Err(format!("users[{i}]: token and username must not be empty"));
            }
            if self.users[..i].iter().any(|o| o.token == u.token) {
                return Err(format!(
                    "users[{i}] ({}): the token is already another user's",
                    u.username
                ));
            }
        }
        Ok(())
    }

    /// The user a bearer token belongs to.
    pub fn authenticate(&self, token: &str) -> Option<Identity> {
        self.users
            .iter()
            .find(|u| !token.is_empty() && u.token == token)
            .map(User::identity)
    }

    /// Whether one of the auth config's `rules` allows the request.
    pub fn rules_allow(&self, id: &Identity, a: &Attrs) -> bool {
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
        self.rules.iter().any(|r| {
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

    /// Fills in `status` of a TokenReview.
    pub fn token_review(&self, mut review: Value) -> Value {
        let token = review
            .pointer("/spec/token")
            .and_then(Value::as_str)
            .unwrap_or_default();
        review["status"] = match self.authenticate(token) {
            Some(id) => {
                json!({"authenticated": true, "user": {"username": id.username, "uid": id.uid, "groups": id.groups}})
            }
            None => json!({"authenticated": false, "error": "kube-sim: unknown token"}),
        };
        review
    }

    /// Fills in `status` of a (Local/Self)SubjectAccessReview from the auth config's rules and
    /// the stored RBAC objects. A SelfSubjectAccessReview is about `requester` (None: the
    /// unauthenticated admin, who may do anything).
    pub fn access_review(
        &self,
        store: &Store,
        mut review: Value,
        local_ns: Option<&str>,
        requester: Option<&Identity>,
        self_review: bool,
    ) -> Value {
        let spec = review.get("spec").cloned().unwrap_or(json!({}));
        let id = if self_review {
            requester.cloned()
        } else {
            let groups = crate::apiserver::errors::string_list(&spec["groups"]);
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
        let allowed = match (&id, &attrs) {
            (None, _) => true,
            (Some(id), Some(a)) => crate::apiserver::rbac::allowed(store, self, id, a),
            (Some(_), None) => false,
        };
        review["status"] = if allowed {
            json!({"allowed": true, "reason": "kube-sim: allowed by RBAC or the auth config"})
        } else {
            json!({"allowed": false, "reason": "kube-sim: no RBAC or auth config rule allows this"})
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
        let store = Store::new(10);
        let sar = |verb: &str, ns: &str| {
            cfg.access_review(&store, json!({"spec": {"user": "alice", "groups": ["viewers"], "resourceAttributes":
                {"verb": verb, "group": "agentrun.dev", "resource": "agentruns", "namespace": ns}}}), None, None, false)["status"]["allowed"].clone()
        };
        assert_eq!(sar("get", "default"), true);
        assert_eq!(sar("delete", "default"), false);
        assert_eq!(sar("get", "other"), false);
    }
}

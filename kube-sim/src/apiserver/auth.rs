//! Authentication: users (bearer tokens) and extra permissions from a small config file
//! (`--auth-config FILE`). A request with a bearer token is authenticated as its user (and then
//! authorized by `rbac.rs`, with the `rules` here); TokenReviews are answered from the same
//! users, so components that delegate authentication to the API server can be tested.
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

use axum::http::{HeaderMap, header};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::apiserver::errors::ApiError;

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
}

/// The requester: None without an `Authorization` header (the admin kubeconfig kube-sim
/// writes has no credentials and may do anything); 401 for a token the auth config does not
/// know, or for credentials other than a bearer token.
pub fn authenticate_request(
    auth: &AuthConfig,
    headers: &HeaderMap,
) -> Result<Option<Identity>, ApiError> {
    let Some(h) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let unauthorized = || ApiError::new(401, "Unauthorized", "Unauthorized");
    let value = h.to_str().map_err(|_| unauthorized())?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(unauthorized)?
        .trim();
    auth.authenticate(token).map(Some).ok_or_else(unauthorized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_reviews_answer_from_the_users() {
        let cfg: AuthConfig =
            serde_yaml::from_str("users: [{token: t1, username: alice, groups: [viewers]}]")
                .unwrap_or_default();
        let r = cfg.token_review(json!({"spec": {"token": "t1"}}));
        assert_eq!(r["status"]["user"]["username"], "alice");
        assert_eq!(
            cfg.token_review(json!({"spec": {"token": "x"}}))["status"]["authenticated"],
            false
        );
    }
}

//! Start-up checks, before the operator takes the leader Lease: the API server is new enough for
//! native sidecars, the operator may do everything it does in the scope it watches, and the CRD
//! is installed. Each failure is a message that names what is wrong and what to do, so the
//! operator exits with it instead of crash-looping on a 403 or creating pods nobody admits.
//!
//! Permissions are asked with SelfSubjectAccessReviews (which every authenticated user may
//! create: `system:basic-user`). Where even that is refused, the check is skipped with a warning
//! rather than blocking a working install.

use std::fmt;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::apimachinery::pkg::version::Info;
use kube::api::{ListParams, PostParams};
use kube::core::DeserializeGuard;
use kube::{Api, Client};
use tracing::{info, warn};

use crate::crd::AgentRun;

/// The oldest Kubernetes minor version (1.x) agent pods work on: native sidecars (init
/// containers with `restartPolicy: Always`) are on by default from 1.29.
pub const MIN_MINOR: u32 = 29;

/// Where the operator watches AgentRuns and makes their pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (cluster-wide RBAC).
    Cluster,
    /// One namespace (`--watch-namespace`, the chart's `operator.watchNamespace`).
    Namespace(String),
}

impl Scope {
    pub fn new(watch_namespace: Option<&str>) -> Self {
        match watch_namespace.filter(|ns| !ns.is_empty()) {
            Some(ns) => Self::Namespace(ns.to_string()),
            None => Self::Cluster,
        }
    }

    fn namespace(&self) -> Option<&str> {
        match self {
            Self::Cluster => None,
            Self::Namespace(ns) => Some(ns),
        }
    }

    /// The AgentRuns of this scope, as the controller watches them.
    pub fn agentruns(&self, client: &Client) -> Api<DeserializeGuard<AgentRun>> {
        match self {
            Self::Cluster => Api::all(client.clone()),
            Self::Namespace(ns) => Api::namespaced(client.clone(), ns),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cluster => f.write_str("in every namespace"),
            Self::Namespace(ns) => write!(f, "in namespace {ns} (--watch-namespace)"),
        }
    }
}

/// One thing the operator does through the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    /// `None`: in every namespace.
    pub namespace: Option<String>,
    /// What the operator needs it for.
    pub why: &'static str,
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        if let Some(sub) = self.subresource {
            write!(f, "/{sub}")?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " in namespace {ns}")?,
            None => f.write_str(" in every namespace")?,
        }
        write!(f, " ({})", self.why)
    }
}

/// Every verb on every resource the operator uses: on AgentRuns, pods, Secrets and events in the
/// watched scope, and on its Lease when it elects a leader.
pub fn required_permissions(scope: &Scope, lease_namespace: Option<&str>) -> Vec<Permission> {
    let ns = scope.namespace().map(str::to_string);
    let at = |verb, group, resource, subresource, why| Permission {
        verb,
        group,
        resource,
        subresource,
        namespace: ns.clone(),
        why,
    };
    let run = "agentrun.dev";
    let mut all = vec![
        at("list", run, "agentruns", None, "find AgentRuns"),
        at("watch", run, "agentruns", None, "follow AgentRuns"),
        at(
            "patch",
            run,
            "agentruns",
            None,
            "add and remove the finalizer",
        ),
        at("delete", run, "agentruns", None, "ttlSecondsAfterFinished"),
        at(
            "get",
            run,
            "agentruns",
            Some("status"),
            "report a malformed AgentRun",
        ),
        at(
            "patch",
            run,
            "agentruns",
            Some("status"),
            "write the status",
        ),
        at(
            "update",
            run,
            "agentruns",
            Some("finalizers"),
            "own pods and Secrets with blockOwnerDeletion",
        ),
        at("list", "", "pods", None, "find the agent pods"),
        at("watch", "", "pods", None, "follow the agent pods"),
        at("create", "", "pods", None, "start the agents"),
        at(
            "delete",
            "",
            "pods",
            None,
            "stop the agents at timeoutSeconds",
        ),
        at(
            "create",
            "",
            "secrets",
            None,
            "the run's Secret for its sidecars",
        ),
        at(
            "patch",
            "",
            "secrets",
            None,
            "the run's Secret for its sidecars",
        ),
        at(
            "create",
            "events.k8s.io",
            "events",
            None,
            "report what happened",
        ),
        at(
            "patch",
            "events.k8s.io",
            "events",
            None,
            "report repeated events",
        ),
    ];
    if let Some(lease) = lease_namespace {
        for verb in ["get", "create", "update"] {
            all.push(Permission {
                verb,
                group: "coordination.k8s.io",
                resource: "leases",
                subresource: None,
                namespace: Some(lease.to_string()),
                why: "leader election",
            });
        }
    }
    all
}

/// Refuses an API server older than 1.29 (native sidecars); a version it cannot read passes.
pub fn check_version(info: &Info) -> Result<(), String> {
    // Minor versions read like "33", or "33+" on some managed clusters.
    let number = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .ok()
    };
    let (Some(major), Some(minor)) = (number(&info.major), number(&info.minor)) else {
        warn!(version = %info.git_version, "could not read the API server's version; assuming it runs native sidecars (Kubernetes 1.29+)");
        return Ok(());
    };
    if major > 1 || (major == 1 && minor >= MIN_MINOR) {
        return Ok(());
    }
    Err(format!(
        "the Kubernetes API server is {} ({major}.{minor}); agentrun needs Kubernetes 1.{MIN_MINOR} or newer: agent pods run the agentrun sidecar as a native sidecar (an init container with restartPolicy: Always), which older clusters refuse. Upgrade the cluster to 1.{MIN_MINOR} or newer",
        info.git_version
    ))
}

/// The permissions the API server says this operator lacks; `None` when it may not even ask.
pub async fn missing_permissions(
    client: &Client,
    needed: &[Permission],
) -> Result<Option<Vec<Permission>>, String> {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for p in needed {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(p.verb.into()),
                    group: Some(p.group.into()),
                    resource: Some(p.resource.into()),
                    subresource: p.subresource.map(Into::into),
                    namespace: p.namespace.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match reviews.create(&PostParams::default(), &review).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => missing.push(p.clone()),
            Err(kube::Error::Api(s)) if (403..=405).contains(&s.code) => {
                warn!(error = %s.message, "may not create SelfSubjectAccessReviews; skipping the permission check (a missing permission shows as a 403 in the log)");
                return Ok(None);
            }
            Err(e) => {
                return Err(format!(
                    "could not ask the API server about the operator's permissions: {e}; check --kubeconfig / KUBECONFIG / the in-cluster config"
                ));
            }
        }
    }
    Ok(Some(missing))
}

/// The exit message for missing permissions: each on its own line.
pub fn missing_message(scope: &Scope, missing: &[Permission]) -> String {
    let list: String = missing.iter().map(|p| format!("\n  - {p}")).collect();
    let binding = match scope {
        Scope::Cluster => "its ClusterRoleBinding".to_string(),
        Scope::Namespace(ns) => format!("a RoleBinding in namespace {ns}"),
    };
    format!(
        "the operator, watching AgentRuns {scope}, may not do what it needs:{list}\ngrant these to its ServiceAccount (the Helm chart's operator ClusterRole through {binding}, and its Role for the Lease do), then restart the operator"
    )
}

/// Runs every check in order: version, permissions, CRD.
pub async fn check(
    client: &Client,
    scope: &Scope,
    lease_namespace: Option<&str>,
) -> Result<(), String> {
    let version = client.apiserver_version().await.map_err(|e| {
        format!(
            "could not reach the Kubernetes API server (GET /version): {e}; check --kubeconfig / KUBECONFIG / the in-cluster config"
        )
    })?;
    check_version(&version)?;
    info!(version = %version.git_version, "the API server runs native sidecars");

    let needed = required_permissions(scope, lease_namespace);
    if let Some(missing) = missing_permissions(client, &needed).await?
        && !missing.is_empty()
    {
        return Err(missing_message(scope, &missing));
    }

    match scope.agentruns(client).list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(
            "the AgentRun CRD (agentruns.agentrun.dev) is not installed in this cluster: install it with `kubectl apply -f crds/agentrun.dev_agentruns.yaml` (or `agentrun-operator crd | kubectl apply -f -`) and start the operator again".into(),
        ),
        Err(kube::Error::Api(s)) if s.code == 401 || s.code == 403 => Err(format!(
            "the operator may not list AgentRuns {scope} ({}): grant list/watch on agentruns.agentrun.dev (the Helm chart's ClusterRole does)",
            s.message
        )),
        Err(e) => Err(format!(
            "could not list AgentRuns {scope}: {e}; check --kubeconfig / KUBECONFIG / the in-cluster config"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{ApiServerVerifier, against_script};
    use http::Method;
    use serde_json::{Value, json};

    fn version(major: &str, minor: &str, git: &str) -> Info {
        Info {
            major: major.into(),
            minor: minor.into(),
            git_version: git.into(),
            ..Default::default()
        }
    }

    fn version_json(minor: &str) -> Value {
        json!({"major": "1", "minor": minor, "gitVersion": format!("v1.{minor}.0"), "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "", "platform": "linux/amd64"})
    }

    #[test]
    fn api_servers_before_1_29_are_refused_with_their_version() {
        let err = check_version(&version("1", "28", "v1.28.5-eks-1")).expect_err("1.28");
        assert!(
            err.contains("v1.28.5-eks-1")
                && err.contains("1.29 or newer")
                && err.contains("native sidecar"),
            "{err}"
        );
        for (major, minor) in [("1", "29"), ("1", "33+"), ("1", "35"), ("2", "0")] {
            check_version(&version(major, minor, "v")).expect("new enough");
        }
        check_version(&version("", "", "weird")).expect("an unreadable version passes");
    }

    #[test]
    fn the_permission_list_covers_the_watch_scope_and_the_lease() {
        let perms = required_permissions(&Scope::Namespace("agents".into()), Some("agentrun"));
        assert!(
            perms
                .iter()
                .filter(|p| p.resource != "leases")
                .all(|p| p.namespace.as_deref() == Some("agents"))
        );
        let leases: Vec<String> = perms
            .iter()
            .filter(|p| p.resource == "leases")
            .map(|p| format!("{} {:?}", p.verb, p.namespace))
            .collect();
        assert_eq!(
            leases,
            [
                "get Some(\"agentrun\")",
                "create Some(\"agentrun\")",
                "update Some(\"agentrun\")"
            ]
        );
        let cluster = required_permissions(&Scope::Cluster, None);
        assert!(cluster.iter().all(|p| p.namespace.is_none()));
        assert!(cluster.iter().all(|p| p.resource != "leases"));
        assert_eq!(
            cluster[5].to_string(),
            "patch agentruns.agentrun.dev/status in every namespace (write the status)"
        );
    }

    /// Answers `GET /version` and every SelfSubjectAccessReview (allowed unless `deny` says
    /// otherwise), and returns the reviews seen and the next request's URI.
    async fn answer_reviews(
        api: &mut ApiServerVerifier,
        minor: &str,
        deny: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        api.expect(Method::GET, "/version", 200, version_json(minor))
            .await;
        let mut reviews = Vec::new();
        while let Some(seen) = api
            .answer_while(
                |_, uri| uri.contains("/selfsubjectaccessreviews"),
                |body| {
                    let mut answer = body.clone();
                    answer["status"] =
                        json!({"allowed": !deny(&body["spec"]["resourceAttributes"])});
                    (201, answer)
                },
            )
            .await
        {
            reviews.push(seen.body["spec"]["resourceAttributes"].clone());
        }
        reviews
    }

    /// Runs the start-up checks for `scope` against an API server that `script` plays.
    async fn check_against<S, SF>(
        script: S,
        scope: Scope,
        lease_namespace: Option<&'static str>,
    ) -> Result<(), String>
    where
        S: FnOnce(ApiServerVerifier) -> SF,
        SF: Future<Output = ApiServerVerifier> + Send + 'static,
    {
        against_script(script, |client| async move {
            check(&client, &scope, lease_namespace).await
        })
        .await
    }

    fn agents() -> Scope {
        Scope::Namespace("agents".into())
    }

    #[tokio::test]
    async fn a_missing_permission_is_named_in_the_exit_message() {
        let script = |mut api: ApiServerVerifier| async move {
            let reviews = answer_reviews(&mut api, "33", |attrs| {
                attrs["resource"] == "agentruns"
                    && attrs["subresource"] == "status"
                    && attrs["verb"] == "patch"
            })
            .await;
            assert_eq!(reviews.len(), 18, "{reviews:#?}");
            assert!(
                reviews
                    .iter()
                    .filter(|r| r["resource"] != "leases")
                    .all(|r| r["namespace"] == "agents"),
                "the watched namespace is asked about: {reviews:#?}"
            );
            api
        };
        let err = check_against(script, agents(), Some("agentrun"))
            .await
            .expect_err("a permission is missing");
        let missing: Vec<&str> = err.lines().filter(|l| l.starts_with("  - ")).collect();
        assert_eq!(
            missing,
            ["  - patch agentruns.agentrun.dev/status in namespace agents (write the status)"]
        );
        assert!(
            err.contains("in namespace agents (--watch-namespace)")
                && err.contains("restart the operator"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn watching_one_namespace_lists_agentruns_only_there() {
        let script = |mut api: ApiServerVerifier| async move {
            answer_reviews(&mut api, "29", |_| false).await;
            let list = json!({"apiVersion": "agentrun.dev/v1alpha1", "kind": "AgentRunList", "metadata": {}, "items": []});
            let uri = "/apis/agentrun.dev/v1alpha1/namespaces/agents/agentruns?&limit=1";
            api.expect(Method::GET, uri, 200, list).await;
            api
        };
        check_against(script, agents(), Some("agentrun"))
            .await
            .expect("everything is allowed");
    }

    #[tokio::test]
    async fn an_old_cluster_is_refused_before_anything_else() {
        let script = |mut api: ApiServerVerifier| async move {
            api.expect(Method::GET, "/version", 200, version_json("28"))
                .await;
            api
        };
        let err = check_against(script, Scope::Cluster, None)
            .await
            .expect_err("1.28");
        assert!(err.contains("v1.28.0"), "{err}");
    }

    #[tokio::test]
    async fn without_access_reviews_the_check_is_skipped_and_a_missing_crd_is_named() {
        let script = |mut api: ApiServerVerifier| async move {
            api.expect(Method::GET, "/version", 200, version_json("30"))
                .await;
            let reviews = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews?";
            api.refuse(
                Method::POST,
                reviews,
                403,
                "selfsubjectaccessreviews.authorization.k8s.io is forbidden",
            )
            .await;
            let list = "/apis/agentrun.dev/v1alpha1/agentruns?&limit=1";
            api.refuse(
                Method::GET,
                list,
                404,
                "the server could not find the requested resource",
            )
            .await;
            api
        };
        let err = check_against(script, Scope::Cluster, None)
            .await
            .expect_err("no CRD");
        assert!(
            err.contains("kubectl apply -f crds/agentrun.dev_agentruns.yaml"),
            "{err}"
        );
    }
}

//! Why the API server refused to create a run's pod or Secret, turned into a status reason, a
//! message that says what to do, and whether to retry (pure: tested with the real API server
//! messages).
//!
//! Permanent refusals (Pod Security admission, an invalid pod) fail the variation: the same pod
//! would be refused again. Transient ones (a ResourceQuota, missing RBAC, a webhook, a server
//! error) leave it Pending with the reason and are retried after a pause, never in a hot loop.

use std::time::Duration;

use crate::status::reasons;

/// Pause before creating a pod again after a quota, RBAC or webhook refusal (quota frees up when
/// other pods end, which the operator does not watch).
pub const CREATE_RETRY: Duration = Duration::from_secs(30);
/// Pause before trying again after a server or network error.
pub const ERROR_RETRY: Duration = Duration::from_secs(15);

/// A refused creation, as the status and the Warning event show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Machine-readable reason (one of [`reasons`]).
    pub reason: &'static str,
    /// The API server's message followed by what to do.
    pub message: String,
    /// When to try again; `None` for a permanent refusal, which fails the variation.
    pub retry: Option<Duration>,
}

impl Refusal {
    /// Whether the variation fails for good.
    pub fn is_permanent(&self) -> bool {
        self.retry.is_none()
    }
}

/// What the API server said: its HTTP code and message, or the client error's text.
fn parts(error: &kube::Error) -> (Option<u16>, String) {
    match error {
        kube::Error::Api(s) => (Some(s.code), s.message.clone()),
        other => (None, other.to_string()),
    }
}

fn retry_text(retry: Duration) -> String {
    format!("the operator tries again every {}s", retry.as_secs())
}

/// Classifies a failed pod creation in `namespace` (a 409 is handled by the caller: it is not a
/// refusal but a pod that exists).
pub fn pod(error: &kube::Error, namespace: &str) -> Refusal {
    let (code, message) = parts(error);
    let quota = message.contains("exceeded quota:") || message.contains("failed quota:");
    match code {
        Some(403) if message.contains("violates PodSecurity") => Refusal {
            reason: reasons::POD_SECURITY,
            message: format!(
                "{message}; namespace {namespace} enforces a Pod Security level that this pod does not meet, so the run cannot start. For `restricted`, set spec.securityContext.runAsNonRoot: true on the AgentRun (and spec.securityContext.runAsUser when the image's user is root or not a number; a violation by an agentrun-* container is the operator's sidecar.securityContext setting), then delete and re-create the AgentRun"
            ),
            retry: None,
        },
        Some(403) if quota => Refusal {
            reason: reasons::QUOTA_EXCEEDED,
            message: format!(
                "{message}; a ResourceQuota of namespace {namespace} refused the pod, {}. A quota on limits needs spec.resources.limits on the AgentRun and limits in the operator's sidecar resources (chart value sidecar.resources)",
                retry_text(CREATE_RETRY)
            ),
            retry: Some(CREATE_RETRY),
        },
        Some(403) => Refusal {
            reason: reasons::POD_FORBIDDEN,
            message: format!(
                "{message}; {}. Grant the operator `create` on pods in namespace {namespace} (the Helm chart's ClusterRole does), or ask why an admission policy refuses the pod",
                retry_text(CREATE_RETRY)
            ),
            retry: Some(CREATE_RETRY),
        },
        Some(400) | Some(422) => Refusal {
            reason: reasons::POD_INVALID,
            message: format!(
                "{message}; the API server refused the pod as invalid, so the run cannot start. Fix the AgentRun field it names, then delete and re-create the AgentRun (Kubernetes older than 1.29 refuses the agentrun-sidecar native sidecar, an init container with restartPolicy: Always: upgrade the cluster)"
            ),
            retry: None,
        },
        _ => Refusal {
            reason: reasons::POD_CREATE_FAILED,
            message: format!(
                "could not create the pod: {message}; {}",
                retry_text(ERROR_RETRY)
            ),
            retry: Some(ERROR_RETRY),
        },
    }
}

/// Classifies a failed server-side apply of the run's Secret `name`. Always transient: the
/// Secret holds only operator settings, so nothing in the AgentRun can be the cause.
pub fn secret(error: &kube::Error, name: &str, namespace: &str) -> Refusal {
    let (code, message) = parts(error);
    let (hint, retry) = match code {
        Some(403) if message.contains("exceeded quota:") => (
            format!("a ResourceQuota of namespace {namespace} allows no more Secrets"),
            CREATE_RETRY,
        ),
        Some(403) => (
            format!(
                "grant the operator `create` and `patch` on secrets in namespace {namespace} (the Helm chart's ClusterRole does)"
            ),
            CREATE_RETRY,
        ),
        _ => (String::new(), ERROR_RETRY),
    };
    let hint = if hint.is_empty() {
        String::new()
    } else {
        format!("; {hint}")
    };
    Refusal {
        reason: reasons::SECRET_FAILED,
        message: format!(
            "could not write Secret {namespace}/{name} with the sidecars' Redis settings, so no pod is created: {message}{hint}; {}",
            retry_text(retry)
        ),
        retry: Some(retry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{
        EXCEEDED_QUOTA, MUST_SPECIFY_LIMITS, POD_SECURITY_REFUSAL, api_error as api,
    };

    #[test]
    fn pod_security_refusals_are_permanent_and_say_what_to_set() {
        let r = pod(&api(403, "Forbidden", POD_SECURITY_REFUSAL), "team-a");
        assert_eq!(r.reason, reasons::POD_SECURITY);
        assert!(r.is_permanent());
        assert!(r.message.starts_with(POD_SECURITY_REFUSAL), "{}", r.message);
        assert!(
            r.message
                .contains("spec.securityContext.runAsNonRoot: true")
                && r.message.contains("namespace team-a"),
            "{}",
            r.message
        );
    }

    #[test]
    fn quota_refusals_are_retried_with_the_quota_message() {
        for message in [EXCEEDED_QUOTA, MUST_SPECIFY_LIMITS] {
            let r = pod(&api(403, "Forbidden", message), "default");
            assert_eq!(r.reason, reasons::QUOTA_EXCEEDED, "{message}");
            assert_eq!(r.retry, Some(CREATE_RETRY));
            assert!(r.message.starts_with(message), "{}", r.message);
            assert!(r.message.contains("sidecar.resources"), "{}", r.message);
        }
    }

    #[test]
    fn other_refusals_are_classified_by_their_code() {
        let rbac = r#"pods is forbidden: User "system:serviceaccount:agentrun:agentrun-operator" cannot create resource "pods" in API group "" in the namespace "team-a""#;
        let r = pod(&api(403, "Forbidden", rbac), "team-a");
        assert_eq!(
            (r.reason, r.retry),
            (reasons::POD_FORBIDDEN, Some(CREATE_RETRY))
        );
        let invalid = r#"Pod "hello-default" is invalid: spec.initContainers[1].restartPolicy: Forbidden: may not be set for init containers"#;
        let r = pod(&api(422, "Invalid", invalid), "default");
        assert_eq!((r.reason, r.retry), (reasons::POD_INVALID, None));
        assert!(r.message.contains("1.29"), "{}", r.message);
        let r = pod(
            &api(500, "InternalError", "etcdserver: request timed out"),
            "default",
        );
        assert_eq!(
            (r.reason, r.retry),
            (reasons::POD_CREATE_FAILED, Some(ERROR_RETRY))
        );
        assert!(
            r.message.contains("etcdserver: request timed out"),
            "{}",
            r.message
        );
    }

    #[test]
    fn secret_refusals_are_always_retried_and_name_the_secret() {
        let quota = r#"secrets "hello-agentrun-redis" is forbidden: exceeded quota: q, requested: count/secrets=1, used: count/secrets=10, limited: count/secrets=10"#;
        let r = secret(
            &api(403, "Forbidden", quota),
            "hello-agentrun-redis",
            "default",
        );
        assert_eq!(
            (r.reason, r.retry),
            (reasons::SECRET_FAILED, Some(CREATE_RETRY))
        );
        assert!(
            r.message.contains("Secret default/hello-agentrun-redis") && r.message.contains(quota),
            "{}",
            r.message
        );
        let r = secret(&api(503, "ServiceUnavailable", "try later"), "s", "default");
        assert_eq!(r.retry, Some(ERROR_RETRY));
    }
}

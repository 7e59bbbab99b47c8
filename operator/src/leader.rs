//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator replicas can run
//! and only one reconciles.
//!
//! The holder renews the Lease every `duration / 3`; a candidate takes it over once
//! `renewTime + leaseDurationSeconds` has passed. Writes use the Lease's `resourceVersion`, so two
//! candidates cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tracing::{info, warn};

/// What a candidate should do with the Lease as it is.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (or the holder's lease expired): take it.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds a live lease.
    Wait { holder: String },
}

/// Decides from the Lease's spec (pure).
pub fn decide(
    spec: Option<&LeaseSpec>,
    identity: &str,
    now: Timestamp,
    default_duration: Duration,
) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == identity {
        return Decision::Renew;
    }
    let duration = spec
        .lease_duration_seconds
        .map(i64::from)
        .unwrap_or(default_duration.as_secs() as i64);
    let expired = match &spec.renew_time {
        Some(renewed) => renewed
            .0
            .checked_add(SignedDuration::from_secs(duration))
            .map(|until| now >= until)
            .unwrap_or(true),
        None => true,
    };
    if expired {
        Decision::Acquire
    } else {
        Decision::Wait { holder }
    }
}

/// A Lease that this process competes for.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        duration: Duration,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// One round: returns whether we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
            self.duration,
        );
        let transitions = current
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        let spec = |acquire: Option<MicroTime>, transitions: i32| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: acquire,
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let result = match (decision, current) {
            (Decision::Wait { .. }, _) => return Ok(false),
            (Decision::Acquire, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec(Some(MicroTime(now)), 0)),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Decision::Acquire, Some(mut lease)) => {
                lease.spec = Some(spec(Some(MicroTime(now)), transitions + 1));
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Decision::Renew, Some(mut lease)) => {
                let acquired = lease.spec.as_ref().and_then(|s| s.acquire_time.clone());
                lease.spec = Some(spec(acquired, transitions));
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Decision::Renew, None) => return Ok(false),
        };
        match result {
            Ok(()) => Ok(true),
            // Someone else wrote first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (on shutdown) so that another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let held = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.identity.as_str());
        if !held {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            warn!(error = %e, "could not release the leader Lease; another replica takes over when it expires");
        }
    }

    /// Waits until this process holds the Lease.
    pub async fn acquire(&self) {
        let retry = (self.duration / 3).max(Duration::from_secs(1));
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, lease = %self.name, "could not read or write the leader Lease")
                }
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews the Lease until it is lost (or cannot be renewed for a whole lease duration); then
    /// sends `false` on `leading`.
    pub async fn keep(&self, leading: watch::Sender<bool>) {
        let every = (self.duration / 3).max(Duration::from_secs(1));
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "lost the leader Lease to another replica");
                    let _ = leading.send(false);
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "could not renew the leader Lease");
                    if last_ok.elapsed() >= self.duration {
                        let _ = leading.send(false);
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: Timestamp, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    #[test]
    fn lease_decisions() {
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "a", now, d), Decision::Acquire);
        let fresh = lease("b", "2026-01-01T00:00:50Z".parse().unwrap(), 15);
        assert_eq!(
            decide(Some(&fresh), "a", now, d),
            Decision::Wait { holder: "b".into() }
        );
        assert_eq!(decide(Some(&fresh), "b", now, d), Decision::Renew);
        let stale = lease("b", "2026-01-01T00:00:40Z".parse().unwrap(), 15);
        assert_eq!(decide(Some(&stale), "a", now, d), Decision::Acquire);
        let released = LeaseSpec::default();
        assert_eq!(decide(Some(&released), "a", now, d), Decision::Acquire);
    }

    use crate::fixtures::mock_client;
    use http::Method;
    use serde_json::json;

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/default/leases/agentrun-operator";

    fn not_found() -> serde_json::Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
    }

    fn lock(client: kube::Client, me: &str) -> LeaseLock {
        LeaseLock::new(
            Api::namespaced(client, "default"),
            "agentrun-operator",
            me,
            Duration::from_secs(15),
        )
    }

    #[tokio::test]
    async fn a_missing_lease_is_created_and_held() {
        let (client, mut api) = mock_client();
        let server = tokio::spawn(async move {
            api.expect(Method::GET, PATH, 404, not_found()).await;
            let created = api
                .expect(
                    Method::POST,
                    "/apis/coordination.k8s.io/v1/namespaces/default/leases?",
                    201,
                    json!({}),
                )
                .await;
            assert_eq!(created.body["metadata"]["name"], "agentrun-operator");
            assert_eq!(created.body["spec"]["holderIdentity"], "pod-a");
            assert_eq!(created.body["spec"]["leaseDurationSeconds"], 15);
            api
        });
        assert!(
            lock(client, "pod-a")
                .try_acquire_or_renew()
                .await
                .expect("no error")
        );
        server
            .await
            .expect("scenario held")
            .expect_nothing_more()
            .await;
    }

    fn live_lease(holder: &str) -> serde_json::Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "agentrun-operator", "namespace": "default", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": Timestamp::now().to_string(), "leaseTransitions": 2}
        })
    }

    #[tokio::test]
    async fn a_live_lease_of_another_replica_is_left_alone() {
        let (client, mut api) = mock_client();
        let server = tokio::spawn(async move {
            api.expect(Method::GET, PATH, 200, live_lease("pod-b"))
                .await;
            api
        });
        assert!(
            !lock(client, "pod-a")
                .try_acquire_or_renew()
                .await
                .expect("no error")
        );
        server
            .await
            .expect("scenario held")
            .expect_nothing_more()
            .await;
    }

    #[tokio::test]
    async fn the_holder_renews_with_optimistic_concurrency_and_loses_on_conflict() {
        let (client, mut api) = mock_client();
        let server = tokio::spawn(async move {
            api.expect(Method::GET, PATH, 200, live_lease("pod-a"))
                .await;
            let renewed = api
                .expect(Method::PUT, PATH, 200, live_lease("pod-a"))
                .await;
            assert_eq!(
                renewed.body["metadata"]["resourceVersion"], "7",
                "replace carries the resourceVersion"
            );
            assert_eq!(renewed.body["spec"]["leaseTransitions"], 2);
            api.expect(Method::GET, PATH, 200, live_lease("pod-a"))
                .await;
            api.expect(Method::PUT, PATH, 409, json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"
            }))
            .await;
            api
        });
        let lock = lock(client, "pod-a");
        assert!(lock.try_acquire_or_renew().await.expect("renewed"));
        assert!(
            !lock
                .try_acquire_or_renew()
                .await
                .expect("a conflict is not an error")
        );
        drop(lock);
        server
            .await
            .expect("scenario held")
            .expect_nothing_more()
            .await;
    }
}

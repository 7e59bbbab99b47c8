//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator replicas can run
//! and only one reconciles.
//!
//! Expiry follows client-go: a candidate never compares the holder's `renewTime` with its own
//! wall clock (the two nodes' clocks may disagree by any amount). It notes, on its own monotonic
//! clock, when it last saw the Lease's record (holder, renew and acquire times, transitions,
//! duration) change, and takes the Lease over only once that record has stood still for the
//! holder's `leaseDurationSeconds`. Writes carry the Lease's `resourceVersion`, so two candidates
//! cannot both win.
//!
//! Every API call has a timeout. The leader renews every `retry_period`; when it has not renewed
//! for `renew_deadline` (shorter than the lease duration) it steps down, so it stops reconciling
//! before any other replica may take over, even when the API server hangs.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// What a candidate should do with the Lease as it is.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (or the holder's record stood still for a whole lease duration): take it.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds a live lease.
    Wait { holder: String },
}

/// The parts of a Lease that change when its holder renews or hands it on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    holder: String,
    renew_time: Option<MicroTime>,
    acquire_time: Option<MicroTime>,
    transitions: Option<i32>,
    duration_seconds: Option<i32>,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Self {
        Self {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renew_time: spec.renew_time.clone(),
            acquire_time: spec.acquire_time.clone(),
            transitions: spec.lease_transitions,
            duration_seconds: spec.lease_duration_seconds,
        }
    }
}

/// A record and when this candidate first saw it (its monotonic clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub record: Record,
    pub at: Instant,
}

/// Decides from the Lease's spec and what this candidate observed before (pure: `now` is this
/// candidate's monotonic clock). Updates `observed` when the record changed.
pub fn decide(
    spec: Option<&LeaseSpec>,
    identity: &str,
    observed: &mut Option<Observed>,
    now: Instant,
    default_duration: Duration,
) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let record = Record::of(spec);
    let seen_at = match observed {
        Some(o) if o.record == record => o.at,
        _ => {
            *observed = Some(Observed {
                record: record.clone(),
                at: now,
            });
            now
        }
    };
    if record.holder.is_empty() {
        return Decision::Acquire;
    }
    if record.holder == identity {
        return Decision::Renew;
    }
    let duration = record
        .duration_seconds
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s as u64))
        .unwrap_or(default_duration);
    if now >= seen_at + duration {
        Decision::Acquire
    } else {
        Decision::Wait {
            holder: record.holder,
        }
    }
}

/// How long the parts of leader election take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long the Lease stays valid without a renewal (`leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down; shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// Pause between renewals, and between attempts of a candidate.
    pub retry_period: Duration,
    /// Longest wait for one API request.
    pub call_timeout: Duration,
}

impl LeaseTiming {
    /// client-go's proportions: for 15 s, a 10 s renew deadline, 3 s between attempts, 3 s per
    /// request.
    pub fn for_lease(lease_duration: Duration) -> Self {
        Self {
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: lease_duration / 5,
            call_timeout: lease_duration / 5,
        }
    }
}

/// A Lease that this process competes for.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    observed: Mutex<Option<Observed>>,
}

impl LeaseLock {
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        duration: Duration,
    ) -> Self {
        Self::with_timing(api, name, identity, LeaseTiming::for_lease(duration))
    }

    pub fn with_timing(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        timing: LeaseTiming,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            timing,
            observed: Mutex::new(None),
        }
    }

    /// `leaseDurationSeconds` as written: whole seconds, at least one.
    fn duration_seconds(&self) -> i32 {
        let d = self.timing.lease_duration;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).clamp(1, i32::MAX as u64) as i32
    }

    /// Awaits one API request for at most `call_timeout`.
    async fn call<T>(
        &self,
        what: &'static str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T> {
        let after = self.timing.call_timeout;
        match tokio::time::timeout(after, request).await {
            Ok(answer) => Ok(answer?),
            Err(_) => Err(Error::Timeout { what, after }),
        }
    }

    fn observe(&self, spec: &LeaseSpec, at: Instant) {
        if let Ok(mut observed) = self.observed.lock() {
            *observed = Some(Observed {
                record: Record::of(spec),
                at,
            });
        }
    }

    /// One round: returns whether we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let started = Instant::now();
        let wall = Timestamp::now();
        let current = self
            .call("GET of the leader Lease", self.api.get_opt(&self.name))
            .await?;
        let spec_now = current.as_ref().and_then(|l| l.spec.as_ref());
        let decision = {
            let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
            decide(
                spec_now,
                &self.identity,
                &mut observed,
                started,
                self.timing.lease_duration,
            )
        };
        let transitions = spec_now.and_then(|s| s.lease_transitions).unwrap_or(0);
        let spec = |acquire: Option<MicroTime>, transitions: i32| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration_seconds()),
            acquire_time: acquire,
            renew_time: Some(MicroTime(wall)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let written = match (decision, current) {
            (Decision::Wait { .. }, _) | (Decision::Renew, None) => return Ok(false),
            (Decision::Acquire, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec(Some(MicroTime(wall)), 0)),
                };
                self.call(
                    "create of the leader Lease",
                    self.api.create(&PostParams::default(), &lease),
                )
                .await
            }
            (decision, Some(mut lease)) => {
                lease.spec = Some(if decision == Decision::Renew {
                    let acquired = lease.spec.as_ref().and_then(|s| s.acquire_time.clone());
                    spec(acquired, transitions)
                } else {
                    spec(Some(MicroTime(wall)), transitions + 1)
                });
                self.call(
                    "update of the leader Lease",
                    self.api.replace(&self.name, &PostParams::default(), &lease),
                )
                .await
            }
        };
        match written {
            Ok(lease) => {
                if let Some(spec) = &lease.spec {
                    self.observe(spec, started);
                }
                Ok(true)
            }
            // Someone else wrote first.
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (on shutdown) so that another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self
            .call("GET of the leader Lease", self.api.get_opt(&self.name))
            .await
        else {
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
            .call(
                "update of the leader Lease",
                self.api.replace(&self.name, &PostParams::default(), &lease),
            )
            .await
        {
            warn!(error = %e, "could not release the leader Lease; another replica takes over when it expires");
        }
    }

    /// Waits until this process holds the Lease; returns when the winning attempt started (the
    /// leadership counts from then, not from its answer).
    pub async fn acquire(&self) -> Instant {
        loop {
            let started = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return started;
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, lease = %self.name, "could not read or write the leader Lease")
                }
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews the Lease, acquired at `renewed` (from [`LeaseLock::acquire`]), until it is lost
    /// or not renewed within `renew_deadline` of the last renewal that started in time; then
    /// sends `false` on `leading`. A request that hangs is given up at that deadline.
    pub async fn keep(&self, leading: watch::Sender<bool>, renewed: Instant) {
        let mut renewed = renewed;
        loop {
            let deadline = renewed + self.timing.renew_deadline;
            tokio::time::sleep_until((Instant::now() + self.timing.retry_period).min(deadline))
                .await;
            let started = Instant::now();
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => renewed = started,
                Ok(Ok(false)) => {
                    warn!(lease = %self.name, "lost the leader Lease to another replica");
                    let _ = leading.send(false);
                    return;
                }
                Ok(Err(e)) => warn!(error = %e, "could not renew the leader Lease"),
                Err(_) => {}
            }
            if Instant::now() >= renewed + self.timing.renew_deadline {
                warn!(
                    lease = %self.name,
                    "could not renew the leader Lease for {}ms; stepping down before it expires",
                    self.timing.renew_deadline.as_millis()
                );
                let _ = leading.send(false);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    const D: Duration = Duration::from_secs(15);

    fn lease(holder: &str, renewed: Timestamp, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(secs),
            lease_transitions: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn lease_decisions() {
        let now = Instant::now();
        let mut seen = None;
        assert_eq!(decide(None, "a", &mut seen, now, D), Decision::Acquire);
        let held = lease("b", Timestamp::now(), 15);
        assert_eq!(
            decide(Some(&held), "a", &mut seen, now, D),
            Decision::Wait { holder: "b".into() }
        );
        assert_eq!(decide(Some(&held), "b", &mut seen, now, D), Decision::Renew);
        let released = LeaseSpec::default();
        assert_eq!(
            decide(Some(&released), "a", &mut seen, now, D),
            Decision::Acquire
        );
    }

    #[test]
    fn a_candidate_whose_clock_is_an_hour_off_does_not_take_a_fresh_lease() {
        let hour = SignedDuration::from_hours(1);
        for skew in [hour, -hour] {
            // The holder renewed just now by its own clock, which reads an hour earlier (or
            // later) than the candidate's.
            let renewed = Timestamp::now() - skew;
            let mut seen = None;
            let now = Instant::now();
            assert_eq!(
                decide(Some(&lease("b", renewed, 15)), "a", &mut seen, now, D),
                Decision::Wait { holder: "b".into() },
                "skew {skew:?}"
            );
            assert_eq!(seen.as_ref().map(|o| o.at), Some(now));
        }
    }

    #[test]
    fn the_lease_is_taken_over_once_its_record_stood_still_for_the_lease_duration() {
        let t0 = Instant::now();
        let renewed = Timestamp::now();
        let first = lease("b", renewed, 15);
        let mut seen = None;
        let wait = Decision::Wait { holder: "b".into() };
        assert_eq!(decide(Some(&first), "a", &mut seen, t0, D), wait);
        let almost = t0 + D - Duration::from_millis(1);
        assert_eq!(decide(Some(&first), "a", &mut seen, almost, D), wait);
        // The holder renews at t0 + 10 s: the clock starts again from there.
        let second = lease("b", renewed + SignedDuration::from_secs(10), 15);
        let t10 = t0 + Duration::from_secs(10);
        assert_eq!(decide(Some(&second), "a", &mut seen, t10, D), wait);
        assert_eq!(decide(Some(&second), "a", &mut seen, t0 + D, D), wait);
        assert_eq!(
            decide(Some(&second), "a", &mut seen, t10 + D, D),
            Decision::Acquire
        );
        // The holder's own leaseDurationSeconds counts, not the candidate's default.
        let long = lease("c", renewed, 60);
        let mut seen = None;
        assert_eq!(
            decide(Some(&long), "a", &mut seen, t0, D),
            Decision::Wait { holder: "c".into() }
        );
        assert_eq!(
            decide(Some(&long), "a", &mut seen, t0 + D, D),
            Decision::Wait { holder: "c".into() }
        );
        assert_eq!(
            decide(Some(&long), "a", &mut seen, t0 + Duration::from_secs(60), D),
            Decision::Acquire
        );
    }

    use crate::fixtures::{against_script, mock_client};
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
        against_script(
            |mut api| async move {
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
            },
            |client| async move {
                assert!(
                    lock(client, "pod-a")
                        .try_acquire_or_renew()
                        .await
                        .expect("no error")
                );
            },
        )
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
    async fn the_holder_renews_with_optimistic_concurrency_and_loses_on_conflict() {
        against_script(
            |mut api| async move {
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
            },
            |client| async move {
                let lock = lock(client, "pod-a");
                assert!(lock.try_acquire_or_renew().await.expect("renewed"));
                assert!(
                    !lock
                        .try_acquire_or_renew()
                        .await
                        .expect("a conflict is not an error")
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_live_lease_of_another_replica_is_left_alone_even_when_its_renew_time_looks_old() {
        against_script(
            |mut api| async move {
                api.expect(Method::GET, PATH, 200, live_lease("pod-b"))
                    .await;
                // The holder renews on a clock an hour behind this replica's.
                let mut skewed = live_lease("pod-b");
                skewed["spec"]["renewTime"] =
                    json!((Timestamp::now() - SignedDuration::from_hours(1)).to_string());
                api.expect(Method::GET, PATH, 200, skewed).await;
                api
            },
            |client| async move {
                let lock = lock(client, "pod-a");
                for round in ["fresh", "an hour old by this clock"] {
                    assert!(
                        !lock.try_acquire_or_renew().await.expect("no error"),
                        "{round}: wait a lease duration from when the record last changed"
                    );
                }
            },
        )
        .await;
    }

    /// Timing for tests that wait for real: the numbers keep their proportions.
    fn fast() -> LeaseTiming {
        LeaseTiming {
            lease_duration: Duration::from_millis(900),
            renew_deadline: Duration::from_millis(600),
            retry_period: Duration::from_millis(100),
            call_timeout: Duration::from_millis(150),
        }
    }

    #[tokio::test]
    async fn a_lease_request_that_never_answers_times_out() {
        let (client, mut api) = mock_client();
        let unanswered = tokio::spawn(async move { api.hold_next().await });
        let lock = LeaseLock::with_timing(
            Api::namespaced(client, "default"),
            "agentrun-operator",
            "pod-a",
            fast(),
        );
        let started = Instant::now();
        let err = lock
            .try_acquire_or_renew()
            .await
            .expect_err("no answer is an error");
        assert!(started.elapsed() >= fast().call_timeout);
        assert!(
            matches!(err, Error::Timeout { .. })
                && err.to_string().contains("GET of the leader Lease"),
            "{err}"
        );
        drop(unanswered);
    }

    #[tokio::test]
    async fn a_leader_whose_renewals_hang_steps_down_before_its_lease_ends() {
        let (client, mut api) = mock_client();
        let server = tokio::spawn(async move {
            // One renewal gets through, then the API server stops answering.
            api.expect(Method::GET, PATH, 200, live_lease("pod-a"))
                .await;
            api.expect(Method::PUT, PATH, 200, live_lease("pod-a"))
                .await;
            api.hold_all().await
        });
        let lock = LeaseLock::with_timing(
            Api::namespaced(client, "default"),
            "agentrun-operator",
            "pod-a",
            fast(),
        );
        let (tx, mut rx) = watch::channel(true);
        let renewed = Instant::now();
        let keeper = tokio::spawn(async move {
            lock.keep(tx, renewed).await;
        });
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|leading| !leading))
            .await
            .expect("the leader stepped down")
            .expect("the sender is alive until then");
        let stepped_down = renewed.elapsed();
        // It led until the renew deadline after its last renewal started (the one that got
        // through started after `renewed`), never beyond it: well inside the lease that other
        // replicas honour.
        assert!(
            stepped_down >= fast().renew_deadline,
            "stepped down after {stepped_down:?}, before the renew deadline"
        );
        assert!(fast().renew_deadline < fast().lease_duration);
        keeper.await.expect("keep returned");
        server.abort();
    }
}

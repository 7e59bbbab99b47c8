//! Reconcile scenarios against a mocked API server (the controller-rs `ApiServerVerifier`
//! pattern): each test lists, in order, the requests the reconciler must make, and fails on any
//! request beyond them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentrun_protocol::{ControlAction, RunState};
use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::*;
use crate::crd::{AgentRun, AgentRunStatus, RunPhase};
use crate::fixtures::*;
use crate::metrics::Metrics;
use crate::status::reasons;
use crate::store::{RecordingStore, StoreCall};

struct Outcome {
    result: Result<Action>,
    store: Arc<RecordingStore>,
    metrics: Arc<Metrics>,
    ctx_for_policy: Arc<Context>,
}

/// Runs one reconcile of `guard` while `script` plays the API server.
async fn scenario<F, Fut>(guard: DeserializeGuard<AgentRun>, redis_down: bool, script: F) -> Outcome
where
    F: FnOnce(ApiServerVerifier) -> Fut,
    Fut: Future<Output = ApiServerVerifier> + Send + 'static,
{
    let (ctx, verifier, store) = Context::test();
    if redis_down {
        store.fail_from_now();
    }
    let server = tokio::spawn(script(verifier));
    let reconciler = tokio::spawn(reconcile(Arc::new(guard), ctx.clone()));
    let verifier = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the scenario finished in time (the reconciler made fewer requests than expected?)")
        .expect("the scenario's expectations held");
    let metrics = ctx.metrics.clone();
    drop(ctx);
    // Any request beyond the script fails the test (and releases the reconciler).
    let stray = tokio::spawn(verifier.expect_nothing_more());
    let result = tokio::time::timeout(Duration::from_secs(10), reconciler)
        .await
        .expect("the reconcile finished in time")
        .expect("the reconcile did not panic");
    tokio::time::timeout(Duration::from_secs(10), stray)
        .await
        .expect("the client was released")
        .expect("no request beyond the scenario");
    let (ctx_for_policy, _, _) = Context::test();
    Outcome {
        result,
        store,
        metrics,
        ctx_for_policy,
    }
}

fn ok(run: AgentRun) -> DeserializeGuard<AgentRun> {
    DeserializeGuard(Ok(run))
}

fn statuses(store: &RecordingStore) -> Vec<(Option<String>, RunState, Option<String>)> {
    store
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            StoreCall::Status { event, .. } => Some((event.variation, event.state, event.reason)),
            _ => None,
        })
        .collect()
}

/// The status a first reconcile writes, for runs that are further along.
fn started(run: &AgentRun) -> AgentRunStatus {
    let run_id = pod::run_id(run).expect("id");
    AgentRunStatus {
        url: settings().run_url(&run_id),
        run_id: Some(run_id),
        start_time: Some(ago(30)),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_new_run_first_gets_the_finalizer() {
    let run = AgentRun::test();
    let answer = serde_json::to_value(run.clone().finalized()).expect("json");
    let out = scenario(ok(run), false, |mut api| async move {
        let seen = api
            .expect(
                Method::PATCH,
                "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello?",
                200,
                answer,
            )
            .await;
        assert_eq!(
            seen.body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ])
        );
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
    assert!(
        out.store.calls().is_empty(),
        "nothing goes to Redis before the finalizer is in place"
    );
}

#[tokio::test]
async fn the_first_reconcile_creates_the_secret_the_pod_and_the_status() {
    let run = AgentRun::test().finalized();
    let r = run.clone();
    let out = scenario(ok(run.clone()), false, |mut api| async move {
        api.expect_pod_list(&r, vec![]).await;
        let secret = api
            .expect(
                Method::PATCH,
                "/api/v1/namespaces/default/secrets/hello-agentrun-redis?",
                200,
                json!({}),
            )
            .await;
        assert_eq!(
            secret.body["stringData"]["AGENTRUN_REDIS_URL"],
            "redis://agentrun-redis:6379"
        );
        // The run gets its own Redis user, with a password derived from the operator's key
        // (never the operator's own password).
        let id = agentrun_protocol::RunId::new("default.hello.0f1e2d3c").expect("run id");
        assert_eq!(
            secret.body["stringData"]["AGENTRUN_REDIS_USERNAME"],
            "agentrun-run-default.hello.0f1e2d3c"
        );
        assert_eq!(
            secret.body["stringData"]["AGENTRUN_REDIS_PASSWORD"],
            agentrun_protocol::acl::derive_run_password("test-key", &id)
        );
        assert_ne!(
            secret.body["stringData"]["AGENTRUN_REDIS_PASSWORD"],
            "s3cret"
        );
        assert_eq!(
            secret.body["metadata"]["ownerReferences"][0]["controller"],
            true
        );
        assert!(
            secret.uri.contains("fieldManager=agentrun-operator"),
            "{}",
            secret.uri
        );
        let pod = api
            .expect(
                Method::POST,
                "/api/v1/namespaces/default/pods?",
                201,
                json!({}),
            )
            .await;
        assert_eq!(pod.body["metadata"]["name"], "hello-default");
        assert_eq!(
            pod.body["spec"]["containers"][0]["command"][0],
            "/agentrun/bin/agentrun-entrypoint"
        );
        let event = api.expect_event("PodCreated").await;
        assert_eq!(event["type"], "Normal");
        assert_eq!(event["action"], "CreatePod");
        assert_eq!(event["regarding"]["name"], "hello");
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.phase, Some(RunPhase::Pending));
        assert_eq!(status.run_id.as_deref(), Some("default.hello.0f1e2d3c"));
        assert_eq!(
            status.url.as_deref(),
            Some("https://agentrun.example.com/runs/default.hello.0f1e2d3c")
        );
        assert_eq!(status.start_time, Some(Time(now())));
        assert_eq!(
            status.variations[0].pod_name.as_deref(),
            Some("hello-default")
        );
        assert_eq!(status.variations[0].reason.as_deref(), Some("PodCreated"));
        assert_eq!(status.observed_generation, Some(1));
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::requeue(USER_RESYNC));
    let calls = out.store.calls();
    assert!(
        matches!(&calls[0], StoreCall::Register(info) if info.run_id == "default.hello.0f1e2d3c" && info.variations == ["default"]),
        "the run is registered for the relay first: {calls:?}"
    );
    assert_eq!(
        statuses(&out.store),
        vec![
            (
                Some("default".into()),
                RunState::Pending,
                Some("PodCreated".into())
            ),
            (None, RunState::Pending, Some("PodCreated".into())),
        ]
    );
    assert_eq!(out.metrics.pods_created.get(), 1);
}

#[tokio::test]
async fn reconciling_again_creates_no_duplicate_and_writes_nothing_when_unchanged() {
    let base = AgentRun::test().finalized();
    let run = base.clone().with_status(started(&base));
    let pods = vec![pod_of(&run, "default", running())];
    let (r, p) = (run.clone(), pods.clone());
    let out = scenario(ok(run.clone()), false, |mut api| async move {
        api.expect_pod_list(&r, p).await;
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.phase, Some(RunPhase::Running));
        api
    })
    .await;
    out.result.expect("ok");
    // Feed the written status back: the next reconcile only reads.
    let mut again = run.clone();
    let variations = again.spec.resolved_variations();
    let written = status::derive(&status::Observation {
        variations: &variations,
        pods: &pods,
        previous: &started(&base),
        generation: Some(1),
        timeout_seconds: None,
        now: now(),
    });
    again.status = Some(written);
    let r = again.clone();
    let out = scenario(ok(again), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::requeue(USER_RESYNC));
    assert!(
        statuses(&out.store).is_empty(),
        "no change, nothing published"
    );
}

#[tokio::test]
async fn parallelism_limits_the_pods_created() {
    let mut run = AgentRun::test()
        .finalized()
        .with_variations(&["a", "b", "c"]);
    run.spec.parallelism = Some(1);
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, vec![]).await;
        api.expect(
            Method::PATCH,
            "/api/v1/namespaces/default/secrets/hello-agentrun-redis?",
            200,
            json!({}),
        )
        .await;
        let pod = api
            .expect(
                Method::POST,
                "/api/v1/namespaces/default/pods?",
                201,
                json!({}),
            )
            .await;
        assert_eq!(pod.body["metadata"]["name"], "hello-a");
        api.expect_event("PodCreated").await;
        let status = api.expect_status_patch(&r).await;
        let reasons: Vec<_> = status
            .variations
            .iter()
            .map(|v| v.reason.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            reasons,
            [
                "PodCreated",
                reasons::WAITING_FOR_PARALLELISM,
                reasons::WAITING_FOR_PARALLELISM
            ]
        );
        assert_eq!(status.variations_done.as_deref(), Some("0/3"));
        api
    })
    .await;
    out.result.expect("ok");
}

#[tokio::test]
async fn an_existing_pod_from_a_race_is_not_an_error() {
    let run = AgentRun::test().finalized();
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, vec![]).await;
        api.expect(
            Method::PATCH,
            "/api/v1/namespaces/default/secrets/hello-agentrun-redis?",
            200,
            json!({}),
        )
        .await;
        api.expect(Method::POST, "/api/v1/namespaces/default/pods?", 409, json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
            "message": "pods \"hello-default\" already exists", "code": 409
        }))
        .await;
        let status = api.expect_status_patch(&r).await;
        assert_eq!(
            status.variations[0].reason.as_deref(),
            Some(reasons::POD_NAME_TAKEN)
        );
        assert_eq!(
            status.variations[0].pod_name, None,
            "a pod that may not be ours is not claimed"
        );
        api
    })
    .await;
    assert_eq!(
        out.result.expect("a 409 on create is not an error"),
        Action::requeue(Duration::from_secs(10)),
        "look again soon for the old pod to go"
    );
    assert_eq!(out.metrics.pods_created.get(), 0);
}

#[tokio::test]
async fn pending_reasons_reach_redis() {
    let base = AgentRun::test().finalized();
    let run = base.clone().with_status(started(&base));
    let pods = vec![pod_of(&run, "default", unschedulable())];
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        let status = api.expect_status_patch(&r).await;
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Unschedulable")
        );
        api
    })
    .await;
    out.result.expect("ok");
    let calls = out.store.calls();
    let event = calls
        .iter()
        .find_map(|c| match c {
            StoreCall::Status { event, .. } if event.variation.is_some() => Some(event.clone()),
            _ => None,
        })
        .expect("a status event");
    assert_eq!(event.state, RunState::Pending);
    assert_eq!(event.reason.as_deref(), Some("Unschedulable"));
    assert!(
        event
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("Insufficient memory")
    );
    assert_eq!(event.source.as_deref(), Some("operator"));
}

#[tokio::test]
async fn a_timeout_stops_the_agents_and_fails_the_run() {
    let mut base = AgentRun::test().finalized();
    base.spec.timeout_seconds = Some(60);
    let mut status = started(&base);
    status.start_time = Some(ago(61));
    let run = base.clone().with_status(status);
    let pods = vec![pod_of(&run, "default", running())];
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        api.expect(Method::DELETE, "/api/v1/namespaces/default/pods/hello-default?", 200, json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hello-default", "namespace": "default"}
        }))
        .await;
        let timeout = api.expect_event("Timeout").await;
        assert_eq!(timeout["type"], "Warning");
        assert!(timeout["note"].as_str().unwrap_or_default().contains("timeoutSeconds (60s)"));
        api.expect_event("Failed").await;
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.phase, Some(RunPhase::Failed));
        assert_eq!(status.completion_time, Some(Time(now())));
        let complete = status.conditions.iter().find(|c| c.type_ == "Complete").expect("Complete");
        assert_eq!((complete.status.as_str(), complete.reason.as_str()), ("True", "Timeout"));
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
    assert!(statuses(&out.store).contains(&(
        Some("default".into()),
        RunState::Failed,
        Some(reasons::TIMEOUT.into())
    )));
}

fn finished(run: &AgentRun, completed_secs_ago: i64) -> AgentRunStatus {
    AgentRunStatus {
        phase: Some(RunPhase::Succeeded),
        completion_time: Some(ago(completed_secs_ago)),
        observed_generation: Some(1),
        ..started(run)
    }
}

#[tokio::test]
async fn the_ttl_deletes_a_finished_run() {
    let mut base = AgentRun::test().finalized();
    base.spec.ttl_seconds_after_finished = Some(30);
    let run = base.clone().with_status(finished(&base, 31));
    let r = run.clone();
    let answer = serde_json::to_value(&run).expect("json");
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, vec![]).await;
        api.expect(
            Method::DELETE,
            "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello?",
            200,
            answer,
        )
        .await;
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
}

#[tokio::test]
async fn before_the_ttl_the_run_is_requeued_for_it() {
    let mut base = AgentRun::test().finalized();
    base.spec.ttl_seconds_after_finished = Some(3600);
    let run = base.clone().with_status(finished(&base, 600));
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, vec![]).await;
        api
    })
    .await;
    assert_eq!(
        out.result.expect("ok"),
        Action::requeue(Duration::from_secs(3000))
    );
}

#[tokio::test]
async fn paused_sends_pause_once_and_records_it() {
    let mut base = AgentRun::test().finalized();
    base.spec.paused = true;
    let run = base.clone().with_status(started(&base));
    let pods = vec![pod_of(&run, "default", running())];
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        api.expect_event("Paused").await;
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.paused, Some(true));
        api
    })
    .await;
    out.result.expect("ok");
    let controls: Vec<_> = out
        .store
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            StoreCall::Control { run_id, action } => Some((run_id, action)),
            _ => None,
        })
        .collect();
    assert_eq!(
        controls,
        vec![("default.hello.0f1e2d3c".to_string(), ControlAction::Pause)]
    );
}

#[tokio::test]
async fn cleanup_stops_agents_expires_redis_data_and_removes_the_finalizer() {
    let base = AgentRun::test().finalized().deleting();
    let mut status = started(&base);
    status.phase = Some(RunPhase::Running);
    let run = base.clone().with_status(status);
    let answer = serde_json::to_value(&run).expect("json");
    let out = scenario(ok(run), false, |mut api| async move {
        let event = api.expect_event("Deleting").await;
        assert!(
            event["note"]
                .as_str()
                .unwrap_or_default()
                .contains("604800s")
        );
        let seen = api
            .expect(
                Method::PATCH,
                "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello?",
                200,
                answer,
            )
            .await;
        assert_eq!(
            seen.body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ])
        );
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
    assert_eq!(
        out.store.calls(),
        vec![
            StoreCall::Control {
                run_id: "default.hello.0f1e2d3c".into(),
                action: ControlAction::Stop
            },
            StoreCall::Expire {
                run_id: "default.hello.0f1e2d3c".into(),
                variations: vec!["default".into()],
                ttl_seconds: 604_800
            },
            // The run's Redis user outlives its stopping pods (their final flush needs it);
            // it is deleted after their grace period.
        ]
    );
}

#[tokio::test]
async fn cleanup_copes_with_apply_never_having_run() {
    let mut run = AgentRun::test()
        .finalized()
        .deleting()
        .with_variations(&["a", "b"]);
    run.spec.retention_seconds = Some(3600);
    let answer = serde_json::to_value(&run).expect("json");
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_event("Deleting").await;
        api.expect(
            Method::PATCH,
            "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello?",
            200,
            answer,
        )
        .await;
        api
    })
    .await;
    out.result.expect("ok");
    assert_eq!(
        out.store.calls(),
        vec![StoreCall::Expire {
            run_id: "default.hello.0f1e2d3c".into(),
            variations: vec!["a".into(), "b".into()],
            ttl_seconds: 3600,
        },]
    );
}

#[tokio::test]
async fn cleanup_does_not_hang_on_an_unreachable_redis() {
    let base = AgentRun::test().finalized().deleting();
    let run = base.clone().with_status(started(&base));
    let answer = serde_json::to_value(&run).expect("json");
    let out = scenario(ok(run), true, |mut api| async move {
        api.expect_event("Deleting").await;
        api.expect(
            Method::PATCH,
            "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello?",
            200,
            answer,
        )
        .await;
        api
    })
    .await;
    out.result.expect("deletion goes on without Redis");
}

#[tokio::test]
async fn api_errors_go_to_the_error_policy() {
    let run = AgentRun::test().finalized();
    let guard = Arc::new(ok(run.clone()));
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect(Method::GET, "/api/v1/namespaces/default/pods?", 500, json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcdserver: request timed out", "code": 500
        }))
        .await;
        api
    })
    .await;
    let err = out.result.expect_err("a failed list is an error");
    assert!(
        err.to_string().contains("etcdserver: request timed out")
            || format!("{err:?}").contains("etcdserver"),
        "{err:?}"
    );
    assert_eq!(
        error_policy(guard, &err, out.ctx_for_policy),
        Action::requeue(ERROR_REQUEUE)
    );
    assert!(
        out.metrics
            .render()
            .contains("agentrun_operator_reconciles_total{result=\"finalizer_error\"} 1")
    );
}

#[tokio::test]
async fn an_invalid_spec_becomes_a_condition_not_a_crash_loop() {
    let mut run = AgentRun::test().finalized().with_variations(&["a", "a"]);
    run.spec.parallelism = Some(1);
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        let event = api.expect_event("InvalidSpec").await;
        assert_eq!(event["type"], "Warning");
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.phase, Some(RunPhase::Failed));
        let valid = status
            .conditions
            .iter()
            .find(|c| c.type_ == "SpecValid")
            .expect("SpecValid");
        assert_eq!(valid.status, "False");
        assert!(
            valid
                .message
                .contains("AgentRun default/hello: spec.variations[1].name \"a\" is used twice"),
            "{}",
            valid.message
        );
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
}

#[tokio::test]
async fn a_malformed_object_is_reported_and_skipped() {
    let guard: DeserializeGuard<AgentRun> = DeserializeGuard(Err(InvalidObject {
        error: "spec.command: invalid type: string \"echo\", expected a sequence".into(),
        metadata: kube::core::ObjectMeta {
            name: Some("broken".into()),
            namespace: Some("default".into()),
            generation: Some(3),
            ..Default::default()
        },
    }));
    let out = scenario(guard, false, |mut api| async move {
        let event = api.expect_event("InvalidSpec").await;
        assert!(event["note"].as_str().unwrap_or_default().contains("expected a sequence"));
        let seen = api
            .expect(Method::PATCH, "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/broken/status?", 200, json!({
                "apiVersion": "agentrun.dev/v1alpha1", "kind": "AgentRun", "metadata": {"name": "broken", "namespace": "default"}, "spec": {"command": "echo"}
            }))
            .await;
        assert_eq!(seen.body["status"]["phase"], "Failed");
        assert_eq!(seen.body["status"]["conditions"][0]["type"], "SpecValid");
        assert_eq!(seen.body["status"]["conditions"][0]["observedGeneration"], 3);
        let message: &Value = &seen.body["status"]["conditions"][0]["message"];
        assert!(message.as_str().unwrap_or_default().contains("kubectl edit agentrun broken -n default"));
        api
    })
    .await;
    assert_eq!(
        out.result.expect("a malformed object is not an error"),
        Action::await_change()
    );
    assert!(out.metrics.render().contains("result=\"malformed\"} 1"));
}

#[test]
fn status_events_only_for_changes() {
    let base = AgentRun::test();
    let prev = AgentRunStatus::default();
    let next = AgentRunStatus {
        phase: Some(RunPhase::Running),
        variations: vec![crate::crd::VariationStatus {
            name: "default".into(),
            phase: RunPhase::Running,
            reason: Some("Running".into()),
            ..Default::default()
        }],
        ..started(&base)
    };
    assert_eq!(status_events(&prev, &next).len(), 2);
    assert!(status_events(&next, &next).is_empty());
}

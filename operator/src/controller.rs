// Long file: the reconcile steps of one resource (apply, cleanup, pod creation, refusals); its tests are in controller_tests.rs.
//! The reconciler: one `finalizer()` entry point dispatching to idempotent `apply` and
//! `cleanup`.

use std::sync::Arc;
use std::time::Duration;

use agentrun_protocol::archive::{ArchiveDetails, ArchiveStatus};
use agentrun_protocol::{ControlAction, RunState, StatusEvent};
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::config::Settings;
use crate::crd::{
    AgentRun, AgentRunStatus, ArchiveInfo, MAX_RUN_NAME_LEN, RunPhase, VariationStatus,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::pod::{self, object_name};
use crate::refusal::{self, Refusal};
use crate::status::{self, Observation, conditions, reasons, set_condition};
use crate::store::{RunInfo, RunStore};

/// Finalizer that lets the operator stop agents and expire Redis data before a run goes.
pub const FINALIZER: &str = "agentrun.dev/cleanup";
/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "agentrun-operator";
/// How often an unfinished run is looked at even without changes.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How often a finished run whose archive is on its way is looked at.
pub const ARCHIVE_POLL: Duration = Duration::from_secs(10);
/// Back-off after a failed reconciliation.
pub const ERROR_REQUEUE: Duration = Duration::from_secs(15);
/// How often an unfinished run with its own Redis user is looked at, at the least.
pub const USER_RESYNC: Duration = Duration::from_secs(15);

/// Where the reconciler gets the time from (fixed in tests).
#[derive(Clone, Debug)]
pub enum Clock {
    System,
    Fixed(Timestamp),
}

impl Clock {
    pub fn now(&self) -> Timestamp {
        match self {
            Self::System => Timestamp::now(),
            Self::Fixed(t) => *t,
        }
    }
}

/// What every reconciliation needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    pub store: Arc<dyn RunStore>,
    pub clock: Clock,
}

/// Reconciles one AgentRun. A malformed object is reported and skipped, never retried in a loop.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<AgentRun>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let _timer = ctx.metrics.count_and_measure();
    let run = match &guard.0 {
        Ok(run) => Arc::new(run.clone()),
        Err(invalid) => {
            if guard.meta().deletion_timestamp.is_some() {
                // Being deleted: nothing to fix any more, and the finalizer must not keep it.
                release_malformed(&guard, &ctx).await?;
            } else {
                report_malformed(&guard, &invalid.error, &ctx).await;
            }
            ctx.metrics.reconciled("malformed");
            return Ok(Action::await_change());
        }
    };
    let ns = run.namespace().unwrap_or_else(|| "default".into());
    let api: Api<AgentRun> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, run, |event| async {
        match event {
            Finalizer::Apply(run) => apply(run, ctx.clone()).await,
            Finalizer::Cleanup(run) => cleanup(run, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(match &result {
        Ok(_) => "ok",
        Err(e) => e.metric_label(),
    });
    result
}

/// What to do after a failed reconciliation: log it and retry after a pause.
pub fn error_policy(
    guard: Arc<DeserializeGuard<AgentRun>>,
    error: &Error,
    _ctx: Arc<Context>,
) -> Action {
    let meta = guard.meta();
    warn!(
        namespace = meta.namespace.as_deref().unwrap_or_default(),
        name = meta.name.as_deref().unwrap_or_default(),
        %error,
        "reconcile failed; retrying in {}s",
        ERROR_REQUEUE.as_secs()
    );
    Action::requeue(ERROR_REQUEUE)
}

fn reference(meta: &kube::core::ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some(AgentRun::api_version(&()).into()),
        kind: Some(AgentRun::kind(&()).into()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        ..Default::default()
    }
}

async fn publish_event(
    ctx: &Context,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let mut note = note;
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        warn!(reason, error = %e, "could not publish a Kubernetes event");
    }
}

/// An object that does not parse as an AgentRun: say so in an event and in its status.
async fn report_malformed(guard: &DeserializeGuard<AgentRun>, error: &str, ctx: &Context) {
    let meta = guard.meta();
    let (Some(name), Some(ns)) = (meta.name.clone(), meta.namespace.clone()) else {
        return;
    };
    let message = format!(
        "AgentRun {ns}/{name} does not match the agentrun.dev/v1alpha1 schema: {error}; fix the object (kubectl edit agentrun {name} -n {ns}) or re-install the CRD"
    );
    warn!(%message, "skipping malformed AgentRun");
    publish_event(
        ctx,
        &reference(meta),
        EventType::Warning,
        reasons::INVALID_SPEC,
        "Validate",
        message.clone(),
    )
    .await;
    let condition = Condition {
        type_: conditions::SPEC_VALID.into(),
        status: "False".into(),
        reason: reasons::INVALID_SPEC.into(),
        message,
        observed_generation: meta.generation,
        last_transition_time: Time(ctx.clock.now()),
    };
    // The object does not parse, so its stored status is read untyped: the apply below must
    // carry every status field the operator owns, or a real API server removes them.
    let resource = ApiResource::erase::<AgentRun>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
    let stored = match raw.get_status(&name).await {
        Ok(obj) => obj.data.get("status").cloned(),
        Err(kube::Error::Api(s)) if s.code == 404 => return,
        Err(e) => {
            warn!(error = %e, "could not read the status of a malformed AgentRun; leaving it as it is");
            return;
        }
    };
    let status = malformed_status(stored.as_ref(), condition);
    if let Err(e) = patch_status(&raw, &name, &status).await {
        warn!(error = %e, "could not write the status of a malformed AgentRun");
    }
}

/// A malformed object that is being deleted: the run's Redis data is handled as for any run
/// ([`release_run`], with what its stored status says), then the finalizer is removed, so that
/// `kubectl delete` does not hang on an object that can no longer be read.
async fn release_malformed(guard: &DeserializeGuard<AgentRun>, ctx: &Context) -> Result<()> {
    let meta = guard.meta();
    let (Some(name), Some(ns)) = (meta.name.clone(), meta.namespace.clone()) else {
        return Ok(());
    };
    let finalizers = meta.finalizers.clone().unwrap_or_default();
    let Some(at) = finalizers.iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let resource = ApiResource::erase::<AgentRun>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
    let stored = match raw.get(&name).await {
        Ok(obj) => obj.data.get("status").cloned().unwrap_or_default(),
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(e) => return Err(Error::Kube(e)),
    };
    let short: String = meta
        .uid
        .as_deref()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(8)
        .collect();
    let registered = stored["runId"].as_str().map(str::to_owned);
    let run_id = registered
        .clone()
        .unwrap_or_else(|| format!("{ns}.{name}.{short}"));
    let variations: Vec<String> = stored["variations"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .filter_map(|v| v["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let unfinished = !serde_json::from_value::<RunPhase>(stored["phase"].clone())
        .is_ok_and(RunPhase::is_finished);
    let key = format!("{ns}/{name}");
    let release = Release {
        key: &key,
        run_id: &run_id,
        variations: &variations,
        retention: ctx.settings.default_retention_seconds.max(1) as u64,
        stop: unfinished && registered.is_some(),
        unfinished,
        streams_closed: stored["streamsClosed"].as_bool() == Some(true),
    };
    release_run(ctx, &reference(meta), &release).await;
    // Remove only our finalizer, and only if it is still where it was read (as kube's
    // finalizer helper does for well-formed runs).
    let patch = json!([
        {"op": "test", "path": format!("/metadata/finalizers/{at}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{at}")},
    ]);
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(|source| Error::Serialize {
            what: "the finalizer removal",
            source,
        })?;
    raw.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(Error::Kube)?;
    Ok(())
}

/// The status written for an object that does not parse: its stored status with phase `Failed`
/// and `condition` (SpecValid False), every other field kept. A stored status that does not
/// parse either is replaced by just those two.
pub fn malformed_status(
    stored: Option<&serde_json::Value>,
    condition: Condition,
) -> AgentRunStatus {
    let mut status: AgentRunStatus = stored
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default();
    status.phase = Some(RunPhase::Failed);
    set_condition(&mut status.conditions, condition);
    status
}

/// Checks that the schema cannot do (or that an API server without CEL did not do).
pub fn validate(run: &AgentRun) -> std::result::Result<(), (String, String)> {
    let spec = &run.spec;
    let name = run.name_any();
    if name.len() > MAX_RUN_NAME_LEN {
        return Err((
            "metadata.name".into(),
            format!(
                "is {} characters long; use at most {MAX_RUN_NAME_LEN} so that pod names <run>-<variation> stay valid",
                name.len()
            ),
        ));
    }
    if spec.command.is_empty() {
        return Err((
            "spec.command".into(),
            "is empty; list the agent's command, for example [\"python\", \"agent.py\"]".into(),
        ));
    }
    for (i, v) in spec.variations.iter().enumerate() {
        if let Err(e) = agentrun_protocol::Variation::new(v.name.clone()) {
            return Err((format!("spec.variations[{i}].name"), e.to_string()));
        }
        if spec.variations[..i].iter().any(|w| w.name == v.name) {
            return Err((
                format!("spec.variations[{i}].name"),
                format!("{:?} is used twice; variation names must be unique", v.name),
            ));
        }
    }
    if let Some(p) = spec.parallelism
        && p < 1
    {
        return Err((
            "spec.parallelism".into(),
            format!("is {p}; it must be at least 1"),
        ));
    }
    Ok(())
}

fn run_state(phase: RunPhase) -> RunState {
    match phase {
        RunPhase::Pending => RunState::Pending,
        RunPhase::Running => RunState::Running,
        RunPhase::Succeeded => RunState::Succeeded,
        RunPhase::Failed => RunState::Failed,
        RunPhase::Stopped => RunState::Stopped,
    }
}

/// Takes the run-wide final event out of `events`: it is published only when
/// [`producers_ended`] says so.
fn split_run_end(events: Vec<StatusEvent>) -> (Vec<StatusEvent>, Option<StatusEvent>) {
    let (end, rest): (Vec<_>, Vec<_>) = events
        .into_iter()
        .partition(|e| e.variation.is_none() && e.state.is_final());
    (rest, end.into_iter().next())
}

/// The run-wide event of a finished run, as [`status_events`] makes it.
fn final_run_event(next: &AgentRunStatus) -> StatusEvent {
    let finished = AgentRunStatus {
        phase: next.phase,
        conditions: next.conditions.clone(),
        ..Default::default()
    };
    let before = AgentRunStatus {
        variations: finished.variations.clone(),
        ..Default::default()
    };
    status_events(&before, &finished)
        .into_iter()
        .find(|e| e.variation.is_none())
        .unwrap_or_else(|| StatusEvent::new(None, run_state(next.phase.unwrap_or_default())))
}

/// Whether nothing more can reach the run's streams: every variation's pod has ended, its
/// sidecar included (a native sidecar publishes what it holds and what the entrypoint left in
/// its spool before it exits), or is gone. The agent container ending is not enough: output
/// spooled while the sidecar or Redis was away is published after it.
pub fn producers_ended(pods: &[Pod], next: &AgentRunStatus) -> bool {
    next.variations.iter().all(|v| {
        let Some(name) = v.pod_name.as_deref() else {
            return true;
        };
        let Some(pod) = pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
        else {
            return true;
        };
        let status = pod.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded") | Some("Failed")
        ) {
            return true;
        }
        status
            .and_then(|s| s.init_container_statuses.as_ref())
            .and_then(|c| c.iter().find(|c| c.name == pod::SIDECAR_CONTAINER))
            .and_then(|c| c.state.as_ref())
            .is_some_and(|s| s.terminated.is_some())
    })
}

/// Lifecycle facts to publish: every variation whose phase or reason changed, and the run when
/// its phase changed.
pub fn status_events(prev: &AgentRunStatus, next: &AgentRunStatus) -> Vec<StatusEvent> {
    let mut events = Vec::new();
    for v in &next.variations {
        let before = prev.variations.iter().find(|p| p.name == v.name);
        let changed = before.is_none_or(|b| b.phase != v.phase || b.reason != v.reason);
        if !changed {
            continue;
        }
        let mut ev = StatusEvent::new(Some(&v.name), run_state(v.phase)).source("operator");
        if let Some(r) = &v.reason {
            ev = ev.reason(r.clone());
        }
        if let Some(m) = &v.message {
            ev = ev.message(m.clone());
        }
        ev.exit_code = v.exit_code;
        events.push(ev);
    }
    if let Some(phase) = next.phase
        && prev.phase != Some(phase)
    {
        let mut ev = StatusEvent::new(None, run_state(phase)).source("operator");
        if let Some(c) = next
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
        {
            ev = ev.reason(c.reason.clone()).message(c.message.clone());
        }
        events.push(ev);
    }
    events
}

fn is_active(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(phase, Some("Succeeded") | Some("Failed"))
}

/// Creates what is missing, derives and writes the status, applies timeout, pause and TTL:
/// the steps below, in this order.
async fn apply(run: Arc<AgentRun>, ctx: Arc<Context>) -> Result<Action> {
    let now = ctx.clock.now();
    let ns = run.namespace().unwrap_or_else(|| "default".into());
    let api: Api<AgentRun> = Api::namespaced(ctx.client.clone(), &ns);
    let prev = run.status.clone().unwrap_or_default();
    let reference = reference(&run.metadata);
    if let Err((field, message)) = validate(&run) {
        return reject(&run, &ctx, &api, &reference, &prev, &field, &message, now).await;
    }
    let step = Step {
        key: format!("{ns}/{}", run.name_any()),
        run_id: pod::run_id(&run)?,
        pods_api: Api::namespaced(ctx.client.clone(), &ns),
        reference,
        run: &run,
        ctx: &ctx,
        prev: &prev,
        now,
    };
    let pods = step.owned_pods().await?;
    let mut next = step.derive_status(&pods);
    step.register(&mut next).await;
    step.ensure_run_user().await?;

    let was_finished = prev.phase.is_some_and(RunPhase::is_finished);
    let timed_out_now = !was_finished
        && next
            .variations
            .iter()
            .any(|v| v.reason.as_deref() == Some(reasons::TIMEOUT));
    let mut retry_creation = None;
    if timed_out_now {
        step.stop_timed_out(&pods).await?;
    } else if !next.phase.is_some_and(RunPhase::is_finished) {
        let creation = Creation {
            run: &run,
            ctx: &ctx,
            pods_api: &step.pods_api,
            reference: &step.reference,
            prev: &prev,
            now,
        };
        retry_creation = creation.create_missing(&pods, &mut next).await?;
        status::summarize(&mut next, now);
        status::set_conditions(&mut next, false, run.metadata.generation, now);
    }
    // A refused pod may have failed the run just now.
    let finished = next.phase.is_some_and(RunPhase::is_finished);
    if !finished {
        step.steer_pause(&mut next).await;
    }
    let close_retry = step.publish_to_redis(&pods, &mut next, finished).await;
    if finished && !was_finished {
        step.announce_completion(&next).await;
    }
    if next != prev {
        patch_status(&api, &run.name_any(), &next).await?;
    }
    ctx.metrics.set_phase(&step.key, next.phase);
    if finished {
        return step.after_finishing(&api, &next, close_retry).await;
    }
    Ok(Action::requeue(step.next_look(&next, retry_creation)))
}

/// What the steps of one [`apply`] share.
struct Step<'a> {
    run: &'a AgentRun,
    ctx: &'a Context,
    prev: &'a AgentRunStatus,
    pods_api: Api<Pod>,
    reference: ObjectReference,
    /// `namespace/name`, for logs.
    key: String,
    run_id: String,
    now: Timestamp,
}

impl Step<'_> {
    /// The run's pods (by label, and owned by this AgentRun).
    async fn owned_pods(&self) -> Result<Vec<Pod>> {
        Ok(self
            .pods_api
            .list(&ListParams::default().labels(&pod::run_selector(self.run)))
            .await?
            .items
            .into_iter()
            .filter(|p| pod::is_owned_by(p, self.run))
            .collect())
    }

    /// The status the pods say, with the run's page URL and its Redis id.
    fn derive_status(&self, pods: &[Pod]) -> AgentRunStatus {
        let variations = self.run.spec.resolved_variations();
        let mut next = status::derive(&Observation {
            variations: &variations,
            pods,
            previous: self.prev,
            generation: self.run.metadata.generation,
            timeout_seconds: self.run.spec.timeout_seconds,
            now: self.now,
        });
        next.url = self.ctx.settings.run_url(&self.run_id);
        next.run_id = self.prev.run_id.clone();
        next
    }

    /// Registers the run in Redis once (`status.runId` says it is).
    async fn register(&self, next: &mut AgentRunStatus) {
        if self.prev.run_id.is_some() {
            return;
        }
        let info = RunInfo {
            run_id: self.run_id.clone(),
            namespace: self.run.namespace().unwrap_or_else(|| "default".into()),
            name: self.run.name_any(),
            variations: self
                .run
                .spec
                .resolved_variations()
                .iter()
                .map(|v| v.name.clone())
                .collect(),
            created_ms: self
                .run
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond().max(0) as u64)
                .unwrap_or_else(|| self.now.as_millisecond().max(0) as u64),
        };
        match self.ctx.store.register(&info).await {
            Ok(()) => next.run_id = Some(self.run_id.clone()),
            Err(e) => {
                warn!(run = %self.key, error = %e, "could not register the run in Redis; retrying on the next reconcile")
            }
        }
    }

    /// The run's own Redis user, (re)created on every reconcile of an unfinished run: Redis
    /// keeps ACL users in memory only, so a restarted Redis forgets them.
    async fn ensure_run_user(&self) -> Result<()> {
        let finished_before = self.prev.phase.is_some_and(RunPhase::is_finished);
        if !finished_before
            && let Some((_, password)) = pod::run_credentials(self.run, &self.ctx.settings)?
            && let Err(e) = self
                .ctx
                .store
                .ensure_run_user(&self.run_id, &password)
                .await
        {
            warn!(run = %self.key, error = %e, "could not create the run's Redis user; its sidecars cannot publish until the next reconcile creates it");
        }
        Ok(())
    }

    /// Deletes the pods of a run that just exceeded `spec.timeoutSeconds`, and says so.
    async fn stop_timed_out(&self, pods: &[Pod]) -> Result<()> {
        for p in pods.iter().filter(|p| is_active(p)) {
            match self
                .pods_api
                .delete(&p.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        publish_event(
            self.ctx,
            &self.reference,
            EventType::Warning,
            reasons::TIMEOUT,
            "StopAgents",
            format!(
                "the run exceeded spec.timeoutSeconds ({}s); its agents were stopped",
                self.run.spec.timeout_seconds.unwrap_or_default()
            ),
        )
        .await;
        Ok(())
    }

    /// Declarative pause and resume: `spec.paused` turned into a control message once.
    async fn steer_pause(&self, next: &mut AgentRunStatus) {
        let want_paused = self.run.spec.paused;
        if want_paused == self.prev.paused.unwrap_or(false) {
            return;
        }
        let (action, reason) = if want_paused {
            (ControlAction::Pause, "Paused")
        } else {
            (ControlAction::Resume, "Resumed")
        };
        match self.ctx.store.send_control(&self.run_id, action).await {
            Ok(()) => {
                next.paused = Some(want_paused);
                publish_event(
                    self.ctx,
                    &self.reference,
                    EventType::Normal,
                    reason,
                    reason.trim_end_matches('d'),
                    format!("sent {action} to the agents"),
                )
                .await;
            }
            Err(e) => {
                warn!(run = %self.key, error = %e, "could not send {action}; retrying on the next reconcile")
            }
        }
    }

    /// Publishes the status changes to Redis; the run's end only once nothing more can reach
    /// its streams, then (with archiving on) the archive request. Returns when to look again
    /// because something could not be published.
    async fn publish_to_redis(
        &self,
        pods: &[Pod],
        next: &mut AgentRunStatus,
        finished: bool,
    ) -> Option<Duration> {
        let (events, run_end) = split_run_end(status_events(self.prev, next));
        for ev in events {
            if let Err(e) = self.ctx.store.publish_status(&self.run_id, &ev).await {
                warn!(run = %self.key, error = %e, "could not publish a status event to Redis");
                break;
            }
        }
        let mut close_retry = None;
        // Until every producer has ended, the pods' own changes (they are owned by the run)
        // wake this up again.
        if finished && self.prev.streams_closed != Some(true) && producers_ended(pods, next) {
            let end = run_end.unwrap_or_else(|| final_run_event(next));
            match self.ctx.store.publish_status(&self.run_id, &end).await {
                Ok(()) => next.streams_closed = Some(true),
                Err(e) => {
                    warn!(run = %self.key, error = %e, "could not publish the run's end to Redis; retrying");
                    close_retry = Some(ERROR_REQUEUE);
                }
            }
        }
        // Asked on every look at a finished run, so a request lost to a failure is made again
        // (the store makes it once).
        if self.ctx.settings.archive && finished && next.streams_closed == Some(true) {
            let names: Vec<String> = self
                .run
                .spec
                .resolved_variations()
                .iter()
                .map(|v| v.name.clone())
                .collect();
            let retention = retention_seconds(self.run, &self.ctx.settings);
            if let Err(e) = self
                .ctx
                .store
                .archive(&self.run_id, &names, retention, None)
                .await
            {
                warn!(run = %self.key, error = %e, "could not put the run on the archive queue; retrying");
                close_retry = Some(ERROR_REQUEUE);
            }
            let poll = self.follow_archive(next).await;
            close_retry = [close_retry, poll].into_iter().flatten().min();
        }
        close_retry
    }

    /// Copies the archive's progress from Redis into `status.archive`, with an event when it
    /// completes or fails. Returns when to look again: soon while it is on its way, now and
    /// then while it failed (an admin may requeue it), never once complete.
    async fn follow_archive(&self, next: &mut AgentRunStatus) -> Option<Duration> {
        let before = self.prev.archive.as_ref().map(|a| a.state.as_str());
        if before == Some(ArchiveStatus::Complete.as_str()) {
            return None;
        }
        match self.ctx.store.archive_details(&self.run_id).await {
            Ok(Some(details)) => next.archive = Some(archive_info(&details)),
            // The keys are gone (expired after the archive, or deleted): what status says stays.
            Ok(None) => {}
            Err(e) => {
                warn!(run = %self.key, error = %e, "could not read the archive's progress from Redis");
                return Some(ERROR_REQUEUE);
            }
        }
        let now = next.archive.as_ref().map(|a| a.state.as_str());
        if now != before {
            match (now, next.archive.as_ref()) {
                (Some("complete"), _) => {
                    let note = "the run's output is in the archive".to_string();
                    publish_event(
                        self.ctx,
                        &self.reference,
                        EventType::Normal,
                        "Archived",
                        "Archive",
                        note,
                    )
                    .await
                }
                (Some("failed"), Some(a)) => {
                    let note = format!(
                        "archiving failed: {}; the request is on the dead-letter stream (agentrun-archiver requeue-dead tries again)",
                        a.message.as_deref().unwrap_or("no reason given")
                    );
                    publish_event(
                        self.ctx,
                        &self.reference,
                        EventType::Warning,
                        "ArchiveFailed",
                        "Archive",
                        note,
                    )
                    .await
                }
                _ => {}
            }
        }
        match now {
            None | Some("complete") => None,
            Some("failed") => Some(RESYNC),
            _ => Some(ARCHIVE_POLL),
        }
    }

    /// The Kubernetes event of a run that just finished.
    async fn announce_completion(&self, next: &AgentRunStatus) {
        let phase = next.phase.unwrap_or_default();
        let (type_, note) = match phase {
            RunPhase::Succeeded => (
                EventType::Normal,
                "every agent exited with code 0".to_string(),
            ),
            RunPhase::Stopped => (
                EventType::Normal,
                "the run was stopped on request".to_string(),
            ),
            _ => (
                EventType::Warning,
                next.conditions
                    .iter()
                    .find(|c| c.type_ == conditions::READY)
                    .map(|c| c.message.clone())
                    .unwrap_or_else(|| "the run failed".into()),
            ),
        };
        publish_event(
            self.ctx,
            &self.reference,
            type_,
            phase.as_str(),
            "Complete",
            note,
        )
        .await;
    }

    /// A finished run: deleted once `ttlSecondsAfterFinished` is over (like a Job), else
    /// looked at again then, or sooner to retry what could not be published.
    async fn after_finishing(
        &self,
        api: &Api<AgentRun>,
        next: &AgentRunStatus,
        close_retry: Option<Duration>,
    ) -> Result<Action> {
        let (Some(ttl), Some(done)) = (
            self.run.spec.ttl_seconds_after_finished,
            next.completion_time.as_ref(),
        ) else {
            return Ok(close_retry.map_or_else(Action::await_change, Action::requeue));
        };
        let expires = done
            .0
            .checked_add(SignedDuration::from_secs(i64::from(ttl)))
            .unwrap_or(done.0);
        if self.now >= expires {
            info!(run = %self.key, "deleting the finished run: ttlSecondsAfterFinished ({ttl}s) is over");
            match api
                .delete(&self.run.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(Action::await_change());
        }
        let wait = until(self.now, expires);
        Ok(Action::requeue(close_retry.map_or(wait, |c| c.min(wait))))
    }

    /// When to look at an unfinished run again: its timeout, a pod name that was taken, the
    /// run user's re-creation after a Redis restart, a pod creation to retry; at most
    /// [`RESYNC`].
    fn next_look(&self, next: &AgentRunStatus, retry_creation: Option<Duration>) -> Duration {
        let mut requeue =
            match status::deadline(next.start_time.as_ref(), self.run.spec.timeout_seconds) {
                Some(deadline) => until(self.now, deadline).min(RESYNC),
                None => RESYNC,
            };
        if next
            .variations
            .iter()
            .any(|v| v.reason.as_deref() == Some(reasons::POD_NAME_TAKEN))
        {
            requeue = requeue.min(Duration::from_secs(10));
        }
        if self.ctx.settings.run_credential_key.is_some() {
            // Soon enough to re-create the run's Redis user after a Redis restart.
            requeue = requeue.min(USER_RESYNC);
        }
        if let Some(retry) = retry_creation {
            requeue = requeue.min(retry);
        }
        requeue
    }
}

/// `status.archive` from what Redis says.
fn archive_info(details: &ArchiveDetails) -> ArchiveInfo {
    ArchiveInfo {
        state: details.status.as_str().to_string(),
        message: details.error.clone(),
        archived_time: details
            .archived_ms
            .and_then(|ms| Timestamp::from_millisecond(ms as i64).ok())
            .map(Time),
    }
}

fn until(now: Timestamp, then: Timestamp) -> Duration {
    let d = then.duration_since(now);
    if d.is_negative() {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(d.as_secs().max(1) as u64)
    }
}

/// Writes a run's whole status with server-side apply (field manager [`FIELD_MANAGER`]): a real
/// API server removes the status fields the operator stops sending, so `status` must be all of
/// it. Works for runs that do not parse too (`K` is then a dynamic object).
async fn patch_status<K>(api: &Api<K>, name: &str, status: &AgentRunStatus) -> kube::Result<()>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({
        "apiVersion": AgentRun::api_version(&()),
        "kind": AgentRun::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn reject(
    run: &AgentRun,
    ctx: &Context,
    api: &Api<AgentRun>,
    reference: &ObjectReference,
    prev: &AgentRunStatus,
    field: &str,
    message: &str,
    now: Timestamp,
) -> Result<Action> {
    let text = format!("{}: {field} {message}", object_name(run));
    let mut next = prev.clone();
    next.observed_generation = run.metadata.generation;
    next.phase = Some(RunPhase::Failed);
    for type_ in [conditions::SPEC_VALID, conditions::READY] {
        set_condition(
            &mut next.conditions,
            Condition {
                type_: type_.into(),
                status: "False".into(),
                reason: reasons::INVALID_SPEC.into(),
                message: text.clone(),
                observed_generation: run.metadata.generation,
                last_transition_time: Time(now),
            },
        );
    }
    if next != *prev {
        warn!(%text, "refusing to run an invalid AgentRun");
        publish_event(
            ctx,
            reference,
            EventType::Warning,
            reasons::INVALID_SPEC,
            "Validate",
            text,
        )
        .await;
        patch_status(api, &run.name_any(), &next).await?;
    }
    Ok(Action::await_change())
}

/// What creating a run's missing pods needs.
struct Creation<'a> {
    run: &'a AgentRun,
    ctx: &'a Context,
    pods_api: &'a Api<Pod>,
    reference: &'a ObjectReference,
    /// The status as last written, to report each refusal once rather than on every retry.
    prev: &'a AgentRunStatus,
    now: Timestamp,
}

impl Creation<'_> {
    /// Applies the run's Secret and creates the pods of the variations that have none, up to
    /// `parallelism`. Every refusal is written into the variation (Failed when permanent,
    /// Pending with the reason while retried) and the `PodsCreated` condition, and reported in a
    /// Warning event; returns when to try again, if a refusal is retried.
    async fn create_missing(
        &self,
        pods: &[Pod],
        next: &mut AgentRunStatus,
    ) -> Result<Option<Duration>> {
        let run = self.run;
        let ns = run.namespace().unwrap_or_default();
        let active = pods.iter().filter(|p| is_active(p)).count();
        let mut slots = run.spec.effective_parallelism().saturating_sub(active);
        let variations = run.spec.resolved_variations();
        let missing: Vec<usize> = next
            .variations
            .iter()
            .enumerate()
            .filter(|(_, v)| v.phase == RunPhase::Pending && v.pod_name.is_none())
            .map(|(i, _)| i)
            .collect();
        if missing.is_empty() {
            // Recomputed from the variations whenever a refusal was reported: a reconcile that
            // started from a status read before the pods were created must not keep it.
            if next
                .conditions
                .iter()
                .any(|c| c.type_ == status::conditions::PODS_CREATED)
            {
                status::set_pods_created(next, run.metadata.generation, self.now);
            }
            return Ok(None);
        }
        let mut retry: Option<Duration> = None;
        if slots > 0 {
            let secret = pod::build_secret(run, &self.ctx.settings)?;
            let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &ns);
            let name = pod::secret_name(run);
            if let Err(e) = secrets
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&secret),
                )
                .await
            {
                let refusal = refusal::secret(&e, &name, &ns);
                for &i in missing.iter().take(slots) {
                    self.refused(&mut next.variations[i], &refusal, "ApplySecret")
                        .await;
                }
                status::set_pods_created(next, run.metadata.generation, self.now);
                return Ok(refusal.retry);
            }
        }
        for i in missing {
            let vs: &mut VariationStatus = &mut next.variations[i];
            if slots == 0 {
                vs.reason = Some(reasons::WAITING_FOR_PARALLELISM.into());
                vs.message = Some(format!(
                    "waiting for a free slot: spec.parallelism is {}",
                    run.spec.effective_parallelism()
                ));
                continue;
            }
            let Some(variation) = variations.iter().find(|v| v.name == vs.name) else {
                continue;
            };
            let pod = pod::build_pod(run, variation, &self.ctx.settings)?;
            let pod_name = pod.name_any();
            match self.pods_api.create(&PostParams::default(), &pod).await {
                Ok(_) => {
                    self.ctx.metrics.pods_created.inc();
                    info!(pod = %pod_name, "created agent pod");
                    publish_event(
                        self.ctx,
                        self.reference,
                        EventType::Normal,
                        "PodCreated",
                        "CreatePod",
                        format!("created pod {pod_name} for variation {}", vs.name),
                    )
                    .await;
                    vs.pod_name = Some(pod_name);
                    vs.reason = Some(reasons::POD_CREATED.into());
                    vs.message = Some("the pod was created and waits to be scheduled".into());
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // Ours from a concurrent reconcile (the next list shows it), or an earlier
                    // incarnation's pod that is still terminating: wait, do not claim it.
                    vs.reason = Some(reasons::POD_NAME_TAKEN.into());
                    vs.message = Some(format!(
                        "a pod named {pod_name} already exists; waiting for it (if it belongs to an earlier run of the same name, it goes when it finishes terminating)"
                    ));
                }
                Err(e) => {
                    // Nothing was created: the slot stays free and the clock does not start.
                    let refusal = refusal::pod(&e, &ns);
                    retry = match (retry, refusal.retry) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    self.refused(vs, &refusal, "CreatePod").await;
                    continue;
                }
            }
            slots -= 1;
            if next.start_time.is_none() {
                next.start_time = Some(Time(self.now));
            }
        }
        status::set_pods_created(next, run.metadata.generation, self.now);
        Ok(retry)
    }

    /// Writes a refusal into the variation and, when it is news (not the same reason and
    /// message as the status last written), logs it and reports it in a Warning event.
    async fn refused(&self, vs: &mut VariationStatus, refusal: &Refusal, action: &str) {
        if refusal.is_permanent() {
            vs.phase = RunPhase::Failed;
            vs.finish_time = Some(Time(self.now));
        }
        vs.reason = Some(refusal.reason.into());
        vs.message = Some(refusal.message.clone());
        let before = self.prev.variations.iter().find(|p| p.name == vs.name);
        let news = before.is_none_or(|b| b.reason != vs.reason || b.message != vs.message);
        if !news {
            return;
        }
        warn!(
            run = %object_name(self.run),
            variation = %vs.name,
            reason = refusal.reason,
            message = %refusal.message,
            "the API server refused what the run needs"
        );
        publish_event(
            self.ctx,
            self.reference,
            EventType::Warning,
            refusal.reason,
            action,
            format!("variation {}: {}", vs.name, refusal.message),
        )
        .await;
    }
}

/// Stops running agents and puts the retention TTL on the run's Redis data. Works when `apply`
/// never ran: the run id comes from the uid, and Redis failures do not block the deletion.
/// What [`release_run`] needs to know about a run that goes.
struct Release<'a> {
    /// `namespace/name`, for messages.
    key: &'a str,
    run_id: &'a str,
    variations: &'a [String],
    retention: u64,
    /// Send `stop` to its agents (it had started and has not finished).
    stop: bool,
    /// Its pods may still be stopping.
    unfinished: bool,
    /// Its end was published (`status.streamsClosed`): nothing more reaches its streams.
    streams_closed: bool,
}

/// The Redis side of a run that goes: stop its agents, queue it for archiving (with archiving
/// on), put the retention TTL on its keys,
/// delete its Redis user (after the pods' grace period when they are still stopping), say so
/// in an event. Redis failures are logged; they never keep the object.
async fn release_run(ctx: &Context, reference: &ObjectReference, r: &Release<'_>) {
    let key = r.key;
    if r.stop
        && let Err(e) = ctx.store.send_control(r.run_id, ControlAction::Stop).await
    {
        warn!(run = %key, error = %e, "could not send stop to the agents; their pods are deleted anyway");
    }
    if ctx.settings.archive {
        // Deleted before its streams closed: archived once its pods' grace period is over.
        let not_before = (!r.streams_closed).then(|| {
            let grace = ctx.settings.termination_grace_period_seconds.max(0) as u64 + 5;
            agentrun_protocol::now_ms() + grace * 1000
        });
        if let Err(e) = ctx
            .store
            .archive(r.run_id, r.variations, r.retention, not_before)
            .await
        {
            warn!(run = %key, error = %e, "could not put the run on the archive queue; its Redis keys stay until it is archived");
        }
    }
    if let Err(e) = ctx.store.expire(r.run_id, r.variations, r.retention).await {
        warn!(run = %key, error = %e, "could not set the retention TTL on the run's Redis keys; they stay until trimmed by hand");
    }
    if ctx.settings.run_credential_key.is_some() {
        if r.unfinished {
            // Its pods are still stopping: their sidecars need the user for their final
            // flush, which fits in the pods' grace period.
            let store = ctx.store.clone();
            let delay = Duration::from_secs(
                ctx.settings.termination_grace_period_seconds.max(0) as u64 + 5,
            );
            let (run_id, key) = (r.run_id.to_owned(), key.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Err(e) = store.delete_run_user(&run_id).await {
                    warn!(run = %key, error = %e, "could not delete the run's Redis user; delete it with ACL DELUSER by hand");
                }
            });
        } else if let Err(e) = ctx.store.delete_run_user(r.run_id).await {
            warn!(run = %key, error = %e, "could not delete the run's Redis user; delete it with ACL DELUSER by hand");
        }
    }
    publish_event(
        ctx,
        reference,
        EventType::Normal,
        "Deleting",
        "Cleanup",
        format!(
            "stopping the agents; the run's Redis data is kept for {}s",
            r.retention
        ),
    )
    .await;
}

async fn cleanup(run: Arc<AgentRun>, ctx: Arc<Context>) -> Result<Action> {
    let key = format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any());
    ctx.metrics.set_phase(&key, None);
    let status = run.status.clone().unwrap_or_default();
    let run_id = match status.run_id.clone() {
        Some(id) => id,
        None => match pod::run_id(&run) {
            Ok(id) => id,
            Err(_) => return Ok(Action::await_change()),
        },
    };
    let unfinished = !status.phase.is_some_and(RunPhase::is_finished);
    let retention = retention_seconds(&run, &ctx.settings);
    let variations: Vec<String> = run
        .spec
        .resolved_variations()
        .into_iter()
        .map(|v| v.name)
        .collect();
    let release = Release {
        key: &key,
        run_id: &run_id,
        variations: &variations,
        retention,
        stop: unfinished && status.run_id.is_some(),
        unfinished,
        streams_closed: status.streams_closed == Some(true),
    };
    release_run(&ctx, &reference(&run.metadata), &release).await;
    Ok(Action::await_change())
}

/// Seconds a run's Redis data is kept after it ended (`spec.retentionSeconds` or the default).
fn retention_seconds(run: &AgentRun, settings: &Settings) -> u64 {
    run.spec
        .retention_seconds
        .unwrap_or(settings.default_retention_seconds)
        .max(1) as u64
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;

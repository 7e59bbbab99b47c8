//! Deriving an AgentRun's status from its pods: a pure function, tested without any client.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::{AgentRunStatus, ResolvedVariation, RunPhase, VariationStatus};
use crate::pod::{AGENT_CONTAINER, variation_of};

/// Condition types written by the operator.
pub mod conditions {
    /// Agents are running or finished well; False with the reason a run is stuck or failed.
    pub const READY: &str = "Ready";
    /// The run reached a final phase (Succeeded, Failed or Stopped).
    pub const COMPLETE: &str = "Complete";
    /// The operator could turn the spec into pods.
    pub const SPEC_VALID: &str = "SpecValid";
    /// Every variation that may run has its pod; False with the reason and the API server's
    /// message when creating a pod or the run's Secret was refused.
    pub const PODS_CREATED: &str = "PodsCreated";
}

/// Machine-readable reasons used in conditions, variation status and `run:{RUN}:status`.
pub mod reasons {
    pub const POD_NOT_CREATED: &str = "PodNotCreated";
    pub const POD_CREATED: &str = "PodCreated";
    pub const POD_NAME_TAKEN: &str = "PodNameTaken";
    pub const WAITING_FOR_PARALLELISM: &str = "WaitingForParallelism";
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    pub const SCHEDULED: &str = "Scheduled";
    pub const PENDING: &str = "Pending";
    pub const RUNNING: &str = "Running";
    pub const COMPLETED: &str = "Completed";
    pub const FAILED: &str = "Failed";
    pub const ERROR: &str = "Error";
    pub const OOM_KILLED: &str = "OOMKilled";
    pub const EVICTED: &str = "Evicted";
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    pub const TIMEOUT: &str = "Timeout";
    pub const STOPPED: &str = "Stopped";
    pub const POD_DELETED: &str = "PodDeleted";
    pub const TERMINATING: &str = "Terminating";
    pub const NODE_LOST: &str = "NodeLost";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const SPEC_VALID: &str = "SpecValid";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// `PodsCreated=True`.
    pub const PODS_CREATED: &str = "PodsCreated";
    /// Pod Security admission refused the pod (permanent: the variation fails).
    pub const POD_SECURITY: &str = "PodSecurity";
    /// A ResourceQuota refused the pod (retried).
    pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";
    /// The API server refused the pod as invalid (permanent: the variation fails).
    pub const POD_INVALID: &str = "PodInvalid";
    /// RBAC or an admission webhook refused the pod (retried).
    pub const POD_FORBIDDEN: &str = "PodForbidden";
    /// Creating the pod failed for another reason, such as a server error (retried).
    pub const POD_CREATE_FAILED: &str = "PodCreateFailed";
    /// The run's Secret could not be written, so no pod was created (retried).
    pub const SECRET_FAILED: &str = "SecretFailed";

    /// Reasons of a variation whose pod the operator tried and failed to create.
    pub const NOT_CREATED: [&str; 7] = [
        POD_SECURITY,
        QUOTA_EXCEEDED,
        POD_INVALID,
        POD_FORBIDDEN,
        POD_CREATE_FAILED,
        SECRET_FAILED,
        POD_NAME_TAKEN,
    ];
}

/// The agent container writes this line in its termination message (`/dev/termination-log`)
/// when it ended the agent because of a user's stop request; the variation is then `Stopped`.
pub const STOPPED_TERMINATION_MESSAGE: &str = "agentrun: stopped";
/// A termination message line starting with this says that output did not reach the sidecar
/// before the agent container exited, why, and where it waits.
pub const UNDELIVERED_TERMINATION_PREFIX: &str = "agentrun: output not delivered: ";

/// What the agent container's termination message tells: stopped on request, and why output
/// was not delivered (one line each, written by the entrypoint).
pub fn read_termination_message(message: Option<&str>) -> (bool, Option<&str>) {
    let lines = || message.unwrap_or_default().lines().map(str::trim);
    let stopped = lines().any(|l| l == STOPPED_TERMINATION_MESSAGE);
    let undelivered = lines().find_map(|l| l.strip_prefix(UNDELIVERED_TERMINATION_PREFIX));
    (stopped, undelivered)
}

/// Everything the status derivation looks at.
pub struct Observation<'a> {
    /// The run's variations with defaults applied.
    pub variations: &'a [ResolvedVariation],
    /// The pods that this run owns (other incarnations' pods already filtered out).
    pub pods: &'a [Pod],
    /// The status as last written.
    pub previous: &'a AgentRunStatus,
    /// `metadata.generation` of the run.
    pub generation: Option<i64>,
    /// `spec.timeoutSeconds`.
    pub timeout_seconds: Option<i64>,
    /// Current time.
    pub now: Timestamp,
}

/// The status of a variation from its pod (or its absence).
pub fn variation_status(name: &str, pod: Option<&Pod>) -> VariationStatus {
    let mut vs = VariationStatus {
        name: name.to_string(),
        ..Default::default()
    };
    let Some(pod) = pod else {
        vs.phase = RunPhase::Pending;
        vs.reason = Some(reasons::POD_NOT_CREATED.into());
        return vs;
    };
    vs.pod_name = pod.metadata.name.clone();
    let status = pod.status.clone().unwrap_or_default();
    let agent = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == AGENT_CONTAINER);
    if let Some(running) = agent
        .and_then(|a| a.state.as_ref())
        .and_then(|s| s.running.as_ref())
    {
        vs.start_time = running.started_at.clone();
    }
    // The agent's own exit decides first: the pod may still be Running while the sidecar
    // flushes.
    if let Some(term) = agent
        .and_then(|a| a.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
    {
        vs.exit_code = Some(term.exit_code);
        vs.start_time = term.started_at.clone();
        vs.finish_time = term.finished_at.clone();
        let (stopped, undelivered) = read_termination_message(term.message.as_deref());
        if stopped {
            vs.phase = RunPhase::Stopped;
            vs.reason = Some(reasons::STOPPED.into());
            vs.message = Some("the agent was stopped on request".into());
        } else if term.exit_code == 0 {
            vs.phase = RunPhase::Succeeded;
            vs.reason = Some(reasons::COMPLETED.into());
        } else {
            vs.phase = RunPhase::Failed;
            let reason = term.reason.clone().unwrap_or_else(|| reasons::ERROR.into());
            vs.message = Some(match reason.as_str() {
                reasons::OOM_KILLED => format!(
                    "the agent was killed for using more memory than its limit (exit code {}); raise spec.resources.limits.memory",
                    term.exit_code
                ),
                _ => format!("the agent exited with code {}", term.exit_code),
            });
            vs.reason = Some(reason);
        }
        if let Some(why) = undelivered {
            let said = vs
                .message
                .take()
                .map(|m| format!("{m}; "))
                .unwrap_or_default();
            vs.message = Some(format!("{said}its output did not all reach Redis: {why}"));
        }
        return vs;
    }
    match status.phase.as_deref() {
        Some("Failed") => {
            vs.phase = RunPhase::Failed;
            let reason = status.reason.clone();
            vs.reason = Some(match reason.as_deref() {
                Some(reasons::EVICTED) => reasons::EVICTED.into(),
                Some(reasons::DEADLINE_EXCEEDED) => reasons::DEADLINE_EXCEEDED.into(),
                Some(other) => other.into(),
                None => reasons::FAILED.into(),
            });
            vs.message = status
                .message
                .clone()
                .or_else(|| Some("the pod failed before the agent reported an exit code".into()));
        }
        Some("Succeeded") => {
            // Without an agent status this should not happen; trust the pod.
            vs.phase = RunPhase::Succeeded;
            vs.reason = Some(reasons::COMPLETED.into());
        }
        Some("Running") if agent.is_some_and(is_running) => {
            vs.phase = RunPhase::Running;
            vs.reason = Some(reasons::RUNNING.into());
        }
        Some("Unknown") => {
            vs.phase = RunPhase::Pending;
            vs.reason = Some(reasons::NODE_LOST.into());
            vs.message = Some("the node of the pod stopped reporting".into());
        }
        _ => {
            vs.phase = RunPhase::Pending;
            let (reason, message) = pending_reason(pod);
            vs.reason = Some(reason);
            vs.message = message;
        }
    }
    if pod.metadata.deletion_timestamp.is_some() && !vs.phase.is_finished() {
        vs.reason = Some(reasons::TERMINATING.into());
        vs.message = Some("the pod is being deleted".into());
    }
    vs
}

fn is_running(c: &ContainerStatus) -> bool {
    c.state.as_ref().is_some_and(|s| s.running.is_some())
}

/// Why a pod has not started its agent yet: unschedulable, image pull errors, config errors.
fn pending_reason(pod: &Pod) -> (String, Option<String>) {
    let status = pod.status.clone().unwrap_or_default();
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        let reason = c
            .reason
            .clone()
            .unwrap_or_else(|| reasons::UNSCHEDULABLE.into());
        return (reason, c.message.clone());
    }
    let all = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in all {
        if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref())
            && let Some(reason) = w.reason.as_deref()
            && reason != "ContainerCreating"
            && reason != "PodInitializing"
        {
            let message = match &w.message {
                Some(m) => format!("container {}: {m}", c.name),
                None => format!("container {} is waiting: {reason}", c.name),
            };
            return (reason.to_string(), Some(message));
        }
    }
    if status.phase.as_deref() == Some("Running")
        || status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "PodScheduled" && c.status == "True")
    {
        return (
            reasons::SCHEDULED.into(),
            Some("the pod is starting its containers".into()),
        );
    }
    (reasons::PENDING.into(), None)
}

/// The whole run's phase from its variations.
pub fn run_phase(variations: &[VariationStatus]) -> RunPhase {
    if variations.is_empty() {
        return RunPhase::Pending;
    }
    if variations.iter().all(|v| v.phase.is_finished()) {
        if variations.iter().any(|v| v.phase == RunPhase::Failed) {
            RunPhase::Failed
        } else if variations.iter().any(|v| v.phase == RunPhase::Stopped) {
            RunPhase::Stopped
        } else {
            RunPhase::Succeeded
        }
    } else if variations
        .iter()
        .any(|v| v.phase == RunPhase::Running || v.phase.is_finished())
    {
        RunPhase::Running
    } else {
        RunPhase::Pending
    }
}

/// Derives the next status. Pure: no client, no clock (the time is in the observation).
///
/// A finished run keeps its final status (phase, exit codes, completion time) even when its pods
/// are gone. When `timeoutSeconds` has passed since `startTime`, every unfinished variation fails
/// with reason `Timeout`.
pub fn derive(obs: &Observation<'_>) -> AgentRunStatus {
    let prev = obs.previous;
    let mut next = prev.clone();
    next.observed_generation = obs.generation;
    if prev.phase.is_some_and(RunPhase::is_finished) {
        return next;
    }
    let timed_out = is_timed_out(prev.start_time.as_ref(), obs.timeout_seconds, obs.now);
    let mut variations: Vec<VariationStatus> = obs
        .variations
        .iter()
        .map(|v| {
            let pod = obs
                .pods
                .iter()
                .find(|p| variation_of(p) == Some(v.name.as_str()));
            let before = prev.variations.iter().find(|s| s.name == v.name);
            let mut vs = variation_status(&v.name, pod);
            if let Some(before) = before {
                if before.phase.is_finished() {
                    // Final results stay, even if the pod was deleted since.
                    return before.clone();
                }
                if pod.is_none() && before.pod_name.is_some() {
                    vs.pod_name = before.pod_name.clone();
                    // Past the deadline the operator deletes the pods itself; a reconcile that
                    // works from a status written before that must still say Timeout.
                    if !timed_out {
                        vs.phase = RunPhase::Failed;
                        vs.reason = Some(reasons::POD_DELETED.into());
                        vs.message = Some("the pod was deleted before the agent finished".into());
                    }
                }
            }
            if timed_out && !vs.phase.is_finished() {
                vs.phase = RunPhase::Failed;
                vs.reason = Some(reasons::TIMEOUT.into());
                vs.message = Some(format!(
                    "the run exceeded spec.timeoutSeconds ({}s); the agent was stopped",
                    obs.timeout_seconds.unwrap_or_default()
                ));
                vs.finish_time = Some(Time(obs.now));
            }
            vs
        })
        .collect();
    // Variations not created yet because of parallelism wait for a slot, not for Kubernetes.
    for vs in variations.iter_mut() {
        if vs.reason.as_deref() == Some(reasons::POD_NOT_CREATED) && vs.pod_name.is_none() {
            vs.message = Some("waiting for the operator to create the pod".into());
        }
    }
    if next.start_time.is_none() && variations.iter().any(|v| v.pod_name.is_some()) {
        next.start_time = Some(Time(obs.now));
    }
    next.variations = variations;
    summarize(&mut next, obs.now);
    set_conditions(&mut next, timed_out, obs.generation, obs.now);
    next
}

/// Sets the run's phase, `variationsDone`, and when it finished its `completionTime` and
/// `duration`, from its variations (call again after changing them).
pub fn summarize(next: &mut AgentRunStatus, now: Timestamp) {
    let phase = run_phase(&next.variations);
    let done = next
        .variations
        .iter()
        .filter(|v| v.phase.is_finished())
        .count();
    next.variations_done = Some(format!("{done}/{}", next.variations.len()));
    if phase.is_finished() {
        next.completion_time = Some(Time(now));
        if let Some(start) = &next.start_time {
            next.duration = Some(format_duration(now.duration_since(start.0)));
        }
    }
    next.phase = Some(phase);
}

/// Writes the `PodsCreated` condition from the variations, after the operator tried to create
/// the missing pods: False with the first refused variation's reason and message.
pub fn set_pods_created(next: &mut AgentRunStatus, generation: Option<i64>, now: Timestamp) {
    let refused = next.variations.iter().find(|v| {
        v.pod_name.is_none()
            && v.reason
                .as_deref()
                .is_some_and(|r| reasons::NOT_CREATED.contains(&r))
    });
    let (status, reason, message) = match refused {
        Some(v) => (
            "False",
            v.reason.clone().unwrap_or_default(),
            format!(
                "variation {}: {}",
                v.name,
                v.message.clone().unwrap_or_default()
            ),
        ),
        None => (
            "True",
            reasons::PODS_CREATED.to_string(),
            "every variation that may run has its pod".to_string(),
        ),
    };
    set_condition(
        &mut next.conditions,
        Condition {
            type_: conditions::PODS_CREATED.into(),
            status: status.into(),
            reason,
            message,
            observed_generation: generation,
            last_transition_time: Time(now),
        },
    );
}

/// Writes the `Ready`, `Complete` and `SpecValid` conditions from the phase and variations
/// (call again after changing the variations).
pub fn set_conditions(
    next: &mut AgentRunStatus,
    timed_out: bool,
    generation: Option<i64>,
    now: Timestamp,
) {
    let phase = next.phase.unwrap_or_default();
    let variations = &next.variations;
    let obs_now = now;
    let (ready_status, ready_reason, ready_message) = ready_condition(phase, variations);
    set_condition(
        &mut next.conditions,
        Condition {
            type_: conditions::READY.into(),
            status: ready_status.into(),
            reason: ready_reason,
            message: ready_message,
            observed_generation: generation,
            last_transition_time: Time(obs_now),
        },
    );
    let (complete_status, complete_reason, complete_message) = if phase.is_finished() {
        let reason = if timed_out {
            reasons::TIMEOUT
        } else {
            phase.as_str()
        };
        (
            "True",
            reason.to_string(),
            format!("the run finished: {}", phase.as_str()),
        )
    } else {
        (
            "False",
            phase.as_str().to_string(),
            "the run has not finished".to_string(),
        )
    };
    set_condition(
        &mut next.conditions,
        Condition {
            type_: conditions::COMPLETE.into(),
            status: complete_status.into(),
            reason: complete_reason,
            message: complete_message,
            observed_generation: generation,
            last_transition_time: Time(obs_now),
        },
    );
    set_condition(
        &mut next.conditions,
        Condition {
            type_: conditions::SPEC_VALID.into(),
            status: "True".into(),
            reason: reasons::SPEC_VALID.into(),
            message: "the spec was turned into pods".into(),
            observed_generation: generation,
            last_transition_time: Time(obs_now),
        },
    );
}

fn ready_condition(
    phase: RunPhase,
    variations: &[VariationStatus],
) -> (&'static str, String, String) {
    match phase {
        RunPhase::Running | RunPhase::Succeeded => {
            let stuck = variations.iter().find(|v| {
                v.phase == RunPhase::Pending
                    && v.reason.as_deref() != Some(reasons::POD_NOT_CREATED)
            });
            match stuck {
                Some(v) if phase == RunPhase::Running => (
                    "False",
                    v.reason.clone().unwrap_or_else(|| reasons::PENDING.into()),
                    format!(
                        "variation {}: {}",
                        v.name,
                        v.message.clone().unwrap_or_default()
                    ),
                ),
                _ => (
                    "True",
                    phase.as_str().into(),
                    format!("the run is {}", phase.as_str()),
                ),
            }
        }
        _ => {
            let culprit = variations
                .iter()
                .find(|v| v.phase == RunPhase::Failed)
                .or_else(|| variations.iter().find(|v| v.phase == phase))
                .or_else(|| variations.first());
            match culprit {
                Some(v) => (
                    "False",
                    v.reason.clone().unwrap_or_else(|| phase.as_str().into()),
                    format!(
                        "variation {}: {}",
                        v.name,
                        v.message
                            .clone()
                            .unwrap_or_else(|| phase.as_str().to_lowercase())
                    ),
                ),
                None => ("False", phase.as_str().into(), String::new()),
            }
        }
    }
}

/// Whether `timeoutSeconds` has passed since `start`.
pub fn is_timed_out(start: Option<&Time>, timeout_seconds: Option<i64>, now: Timestamp) -> bool {
    match (start, timeout_seconds) {
        (Some(start), Some(t)) => now.duration_since(start.0) >= SignedDuration::from_secs(t),
        _ => false,
    }
}

/// When a running run times out, if it has a timeout.
pub fn deadline(start: Option<&Time>, timeout_seconds: Option<i64>) -> Option<Timestamp> {
    let start = start?;
    start
        .0
        .checked_add(SignedDuration::from_secs(timeout_seconds?))
        .ok()
}

/// Replaces the condition of the same type, keeping `lastTransitionTime` when the status did not
/// change (Kubernetes API conventions).
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    if let Some(old) = conditions.iter_mut().find(|c| c.type_ == new.type_) {
        if old.status == new.status {
            new.last_transition_time = old.last_transition_time.clone();
        }
        *old = new;
    } else {
        conditions.push(new);
    }
}

/// `3m12s`-style duration, like `kubectl get jobs`.
pub fn format_duration(d: SignedDuration) -> String {
    let secs = d.as_secs().max(0);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{AgentRun, DEFAULT_VARIATION};
    use crate::fixtures::*;
    use k8s_openapi::api::core::v1::PodStatus;

    fn one(status: PodStatus) -> VariationStatus {
        let run = AgentRun::test();
        variation_status(
            DEFAULT_VARIATION,
            Some(&pod_of(&run, DEFAULT_VARIATION, status)),
        )
    }

    #[test]
    fn variation_status_table() {
        // (case, pod status, phase, reason, exit code, message contains)
        type Case = (
            &'static str,
            PodStatus,
            RunPhase,
            &'static str,
            Option<i32>,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                "unschedulable",
                unschedulable(),
                RunPhase::Pending,
                "Unschedulable",
                None,
                "Insufficient memory",
            ),
            (
                "image pull",
                waiting(
                    "agent",
                    false,
                    "ImagePullBackOff",
                    "Back-off pulling image \"nope:1\"",
                ),
                RunPhase::Pending,
                "ImagePullBackOff",
                None,
                "container agent: Back-off pulling",
            ),
            (
                "sidecar image pull",
                waiting("agentrun-sidecar", true, "ErrImagePull", "not found"),
                RunPhase::Pending,
                "ErrImagePull",
                None,
                "container agentrun-sidecar",
            ),
            (
                "config error",
                waiting(
                    "agent",
                    false,
                    "CreateContainerConfigError",
                    "secret \"x\" not found",
                ),
                RunPhase::Pending,
                "CreateContainerConfigError",
                None,
                "secret \"x\" not found",
            ),
            (
                "creating",
                waiting("agent", false, "ContainerCreating", ""),
                RunPhase::Pending,
                "Scheduled",
                None,
                "starting",
            ),
            ("running", running(), RunPhase::Running, "Running", None, ""),
            (
                "succeeded",
                exited("Succeeded", 0, Some("Completed"), None),
                RunPhase::Succeeded,
                "Completed",
                Some(0),
                "",
            ),
            (
                "exit 0 while sidecar flushes",
                exited("Running", 0, Some("Completed"), None),
                RunPhase::Succeeded,
                "Completed",
                Some(0),
                "",
            ),
            (
                "exit 3",
                exited("Failed", 3, Some("Error"), None),
                RunPhase::Failed,
                "Error",
                Some(3),
                "exited with code 3",
            ),
            (
                "no reason",
                exited("Failed", 1, None, None),
                RunPhase::Failed,
                "Error",
                Some(1),
                "exited with code 1",
            ),
            (
                "oom",
                exited("Failed", 137, Some("OOMKilled"), None),
                RunPhase::Failed,
                "OOMKilled",
                Some(137),
                "spec.resources.limits.memory",
            ),
            (
                "stopped",
                exited(
                    "Failed",
                    143,
                    Some("Error"),
                    Some(STOPPED_TERMINATION_MESSAGE),
                ),
                RunPhase::Stopped,
                "Stopped",
                Some(143),
                "stopped on request",
            ),
            (
                "stopped, output undelivered",
                exited(
                    "Failed",
                    143,
                    Some("Error"),
                    Some(
                        "agentrun: stopped\nagentrun: output not delivered: no sidecar ever answered",
                    ),
                ),
                RunPhase::Stopped,
                "Stopped",
                Some(143),
                "stopped on request; its output did not all reach Redis: no sidecar ever answered",
            ),
            (
                "succeeded, output undelivered",
                exited(
                    "Succeeded",
                    0,
                    Some("Completed"),
                    Some("agentrun: output not delivered: the sidecar did not take 3 frame(s)"),
                ),
                RunPhase::Succeeded,
                "Completed",
                Some(0),
                "its output did not all reach Redis: the sidecar did not take 3 frame(s)",
            ),
            (
                "evicted",
                evicted(),
                RunPhase::Failed,
                "Evicted",
                None,
                "low on resource",
            ),
            (
                "deadline",
                PodStatus {
                    phase: Some("Failed".into()),
                    reason: Some("DeadlineExceeded".into()),
                    ..Default::default()
                },
                RunPhase::Failed,
                "DeadlineExceeded",
                None,
                "failed before",
            ),
            (
                "node lost",
                PodStatus {
                    phase: Some("Unknown".into()),
                    ..Default::default()
                },
                RunPhase::Pending,
                "NodeLost",
                None,
                "stopped reporting",
            ),
            (
                "just created",
                PodStatus::default(),
                RunPhase::Pending,
                "Pending",
                None,
                "",
            ),
        ];
        for (case, status, phase, reason, exit, message) in cases {
            let vs = one(status);
            assert_eq!(vs.phase, phase, "{case}: phase");
            assert_eq!(vs.reason.as_deref(), Some(reason), "{case}: reason");
            assert_eq!(vs.exit_code, exit, "{case}: exit code");
            assert!(
                vs.message.clone().unwrap_or_default().contains(message),
                "{case}: message {:?} should contain {message:?}",
                vs.message
            );
            assert_eq!(
                vs.pod_name.as_deref(),
                Some("hello-default"),
                "{case}: pod name"
            );
        }
    }

    #[test]
    fn no_pod_is_pending_not_created() {
        let vs = variation_status("a", None);
        assert_eq!(vs.phase, RunPhase::Pending);
        assert_eq!(vs.reason.as_deref(), Some(reasons::POD_NOT_CREATED));
        assert_eq!(vs.pod_name, None);
    }

    #[test]
    fn deleting_pod_is_terminating() {
        let run = AgentRun::test();
        let mut pod = pod_of(&run, DEFAULT_VARIATION, running());
        pod.metadata.deletion_timestamp = Some(ago(1));
        let vs = variation_status(DEFAULT_VARIATION, Some(&pod));
        assert_eq!(vs.phase, RunPhase::Running);
        assert_eq!(vs.reason.as_deref(), Some(reasons::TERMINATING));
    }

    fn vs(phase: RunPhase) -> VariationStatus {
        VariationStatus {
            name: "v".into(),
            phase,
            ..Default::default()
        }
    }

    #[test]
    fn run_phase_table() {
        use RunPhase::*;
        let cases: Vec<(Vec<RunPhase>, RunPhase)> = vec![
            (vec![], Pending),
            (vec![Pending], Pending),
            (vec![Pending, Pending], Pending),
            (vec![Running, Pending], Running),
            (vec![Succeeded, Pending], Running),
            (vec![Succeeded], Succeeded),
            (vec![Succeeded, Succeeded], Succeeded),
            (vec![Succeeded, Failed], Failed),
            (vec![Failed, Running], Running),
            (vec![Stopped, Succeeded], Stopped),
            (vec![Stopped, Failed], Failed),
        ];
        for (phases, want) in cases {
            let variations: Vec<_> = phases.iter().copied().map(vs).collect();
            assert_eq!(run_phase(&variations), want, "{phases:?}");
        }
    }

    fn observe(run: &AgentRun, pods: &[Pod], prev: &AgentRunStatus) -> AgentRunStatus {
        let variations = run.spec.resolved_variations();
        derive(&Observation {
            variations: &variations,
            pods,
            previous: prev,
            generation: run.metadata.generation,
            timeout_seconds: run.spec.timeout_seconds,
            now: now(),
        })
    }

    fn condition<'a>(s: &'a AgentRunStatus, type_: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    #[test]
    fn derive_running_then_succeeded() {
        let run = AgentRun::test().with_variations(&["a", "b"]);
        let pods = vec![
            pod_of(&run, "a", running()),
            pod_of(&run, "b", unschedulable()),
        ];
        let s = observe(&run, &pods, &AgentRunStatus::default());
        assert_eq!(s.phase, Some(RunPhase::Running));
        assert_eq!(s.variations_done.as_deref(), Some("0/2"));
        assert_eq!(s.start_time, Some(Time(now())));
        assert_eq!(s.observed_generation, Some(1));
        let ready = condition(&s, conditions::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Unschedulable")
        );
        assert!(ready.message.contains("variation b"), "{}", ready.message);
        assert_eq!(condition(&s, conditions::COMPLETE).status, "False");

        let pods = vec![
            pod_of(&run, "a", exited("Succeeded", 0, Some("Completed"), None)),
            pod_of(&run, "b", exited("Succeeded", 0, Some("Completed"), None)),
        ];
        let mut prev = s.clone();
        prev.start_time = Some(ago(125));
        let done = observe(&run, &pods, &prev);
        assert_eq!(done.phase, Some(RunPhase::Succeeded));
        assert_eq!(done.variations_done.as_deref(), Some("2/2"));
        assert_eq!(done.completion_time, Some(Time(now())));
        assert_eq!(done.duration.as_deref(), Some("2m5s"));
        let complete = condition(&done, conditions::COMPLETE);
        assert_eq!(
            (complete.status.as_str(), complete.reason.as_str()),
            ("True", "Succeeded")
        );
        assert_eq!(condition(&done, conditions::READY).status, "True");
    }

    #[test]
    fn finished_status_is_kept_when_pods_vanish() {
        let run = AgentRun::test();
        let pods = vec![pod_of(
            &run,
            DEFAULT_VARIATION,
            exited("Failed", 2, Some("Error"), None),
        )];
        let failed = observe(&run, &pods, &AgentRunStatus::default());
        assert_eq!(failed.phase, Some(RunPhase::Failed));
        let again = observe(&run, &[], &failed);
        assert_eq!(again, failed, "a final status must not change");
    }

    #[test]
    fn a_deleted_pod_fails_its_variation() {
        let run = AgentRun::test();
        let pods = vec![pod_of(&run, DEFAULT_VARIATION, running())];
        let running = observe(&run, &pods, &AgentRunStatus::default());
        let after = observe(&run, &[], &running);
        assert_eq!(after.phase, Some(RunPhase::Failed));
        assert_eq!(
            after.variations[0].reason.as_deref(),
            Some(reasons::POD_DELETED)
        );
    }

    #[test]
    fn a_pod_gone_after_the_deadline_is_a_timeout_not_a_deletion() {
        let mut run = AgentRun::test();
        run.spec.timeout_seconds = Some(60);
        let pods = vec![pod_of(&run, DEFAULT_VARIATION, running())];
        let mut running = observe(&run, &pods, &AgentRunStatus::default());
        running.start_time = Some(ago(61));
        // The operator deleted the pod at the deadline; this reconcile still sees the status
        // from before, in which the variation was running.
        let after = observe(&run, &[], &running);
        assert_eq!(after.phase, Some(RunPhase::Failed));
        let v = &after.variations[0];
        assert_eq!(v.reason.as_deref(), Some(reasons::TIMEOUT));
        assert_eq!(v.pod_name, running.variations[0].pod_name);
    }

    #[test]
    fn timeout_fails_unfinished_variations() {
        let mut run = AgentRun::test().with_variations(&["fast", "slow"]);
        run.spec.timeout_seconds = Some(60);
        let prev = AgentRunStatus {
            start_time: Some(ago(61)),
            ..Default::default()
        };
        let pods = vec![
            pod_of(&run, "fast", exited("Succeeded", 0, None, None)),
            pod_of(&run, "slow", running()),
        ];
        let s = observe(&run, &pods, &prev);
        assert_eq!(s.phase, Some(RunPhase::Failed));
        assert_eq!(s.variations[0].phase, RunPhase::Succeeded);
        assert_eq!(s.variations[1].reason.as_deref(), Some(reasons::TIMEOUT));
        assert!(
            s.variations[1]
                .message
                .as_deref()
                .unwrap_or_default()
                .contains("timeoutSeconds (60s)")
        );
        assert_eq!(condition(&s, conditions::COMPLETE).reason, reasons::TIMEOUT);

        let not_yet = AgentRunStatus {
            start_time: Some(ago(59)),
            ..Default::default()
        };
        assert_eq!(
            observe(&run, &pods, &not_yet).phase,
            Some(RunPhase::Running)
        );
    }

    #[test]
    fn condition_transition_time_only_moves_on_change() {
        let mut conds = vec![];
        let c = |status: &str, t: Time| Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: "R".into(),
            message: "m".into(),
            observed_generation: Some(1),
            last_transition_time: t,
        };
        set_condition(&mut conds, c("False", ago(100)));
        set_condition(&mut conds, c("False", ago(10)));
        assert_eq!(conds[0].last_transition_time, ago(100));
        set_condition(&mut conds, c("True", ago(5)));
        assert_eq!(conds[0].last_transition_time, ago(5));
        assert_eq!(conds.len(), 1);
    }

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(format_duration(SignedDuration::from_secs(7)), "7s");
        assert_eq!(format_duration(SignedDuration::from_secs(192)), "3m12s");
        assert_eq!(format_duration(SignedDuration::from_secs(3725)), "1h2m5s");
    }
}

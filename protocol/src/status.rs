//! Lifecycle facts, published on `run:{RUN}:status` and summarised in `run:{RUN}:state`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The state of a variation (or of the whole run when `variation` is absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Accepted but not started; `reason` says what it waits for (Unschedulable, ImagePull...).
    Pending,
    /// The sidecar is up and the agent is being started.
    Starting,
    Running,
    Paused,
    /// The agent exited with code 0.
    Succeeded,
    /// The agent exited with a non-zero code, was killed, or could not start.
    Failed,
    /// The agent was stopped on request (control `stop`).
    Stopped,
}

impl RunState {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Stopped)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }

    /// The state a lowercase name stands for ([`Self::as_str`] read back).
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Starting,
            Self::Running,
            Self::Paused,
            Self::Succeeded,
            Self::Failed,
            Self::Stopped,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON content of a `status` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusEvent {
    /// The variation this is about; absent for the run as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variation: Option<String>,
    pub state: RunState,
    /// Machine-readable reason in PascalCase (`Unschedulable`, `ErrImagePull`, `OOMKilled`,
    /// `Timeout`, `Completed`, `Error`, `Signaled`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that killed the agent, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Who reported it: `sidecar`, `operator`, `relay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl StatusEvent {
    pub fn new(variation: Option<&str>, state: RunState) -> Self {
        Self {
            variation: variation.map(str::to_owned),
            state,
            reason: None,
            message: None,
            exit_code: None,
            signal: None,
            source: None,
        }
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

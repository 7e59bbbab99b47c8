//! Control messages, published on `run:{RUN}:control` (and kept in its stream for audit).

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlAction {
    /// Suspend the agent's process group (SIGSTOP).
    Pause,
    /// Continue it (SIGCONT).
    Resume,
    /// Ask the agent to stop (SIGTERM, then SIGKILL after the grace period).
    Stop,
    /// Write `data` and a newline to the agent's stdin.
    Stdin,
}

impl ControlAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Stop => "stop",
            Self::Stdin => "stdin",
        }
    }
}

impl fmt::Display for ControlAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"action":"pause","variation":null,"data":null}`: `variation` null means every variation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlMessage {
    pub action: ControlAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// Why a control message was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "control message is not valid: {0}; send {{\"action\": \"pause\"|\"resume\"|\"stop\"|\"stdin\", \"variation\": optional name, \"data\": text for stdin}}"
    )]
    Json(#[from] serde_json::Error),
    #[error("control action \"stdin\" needs \"data\": the text to write to the agent's stdin")]
    StdinWithoutData,
    #[error("control action {0:?} takes no \"data\"; only \"stdin\" does")]
    UnexpectedData(ControlAction),
}

impl ControlMessage {
    pub fn new(action: ControlAction) -> Self {
        Self {
            action,
            variation: None,
            data: None,
        }
    }

    /// Parses and checks a message as sent by clients.
    pub fn parse(json: &[u8]) -> Result<Self, ControlError> {
        let msg: Self = serde_json::from_slice(json)?;
        match (msg.action, &msg.data) {
            (ControlAction::Stdin, None) => Err(ControlError::StdinWithoutData),
            (a, Some(_)) if a != ControlAction::Stdin => Err(ControlError::UnexpectedData(a)),
            _ => Ok(msg),
        }
    }

    /// Whether this message is meant for `variation`.
    pub fn targets(&self, variation: &str) -> bool {
        self.variation.as_deref().is_none_or(|v| v == variation)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let m = ControlMessage::parse(br#"{"action":"stdin","data":"yes"}"#).unwrap();
        assert_eq!(m.action, ControlAction::Stdin);
        assert!(m.targets("any"));
        let m = ControlMessage::parse(br#"{"action":"pause","variation":"b"}"#).unwrap();
        assert!(m.targets("b") && !m.targets("a"));
        let e = ControlMessage::parse(br#"{"action":"explode"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pause"), "{e}");
        assert!(ControlMessage::parse(br#"{"action":"stdin"}"#).is_err());
        assert!(ControlMessage::parse(br#"{"action":"stop","data":"x"}"#).is_err());
    }
}

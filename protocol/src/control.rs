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

/// The largest control message accepted, in bytes of JSON. The relay refuses a larger body
/// (whatever its `--max-body-bytes`), and a sidecar ignores a larger entry: the message must
/// fit in one socket frame to the entrypoint (4 MiB), which refuses a larger frame by closing
/// the connection, so a larger message would be sent again and again and never applied.
pub const MAX_CONTROL_BYTES: usize = 1024 * 1024;

/// Why a control message was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "control message is not valid: {0}; send {{\"action\": \"pause\"|\"resume\"|\"stop\"|\"stdin\", \"variation\": optional name, \"data\": text for stdin}}"
    )]
    Json(#[from] serde_json::Error),
    #[error(
        "control message of {0} bytes is too large: at most {MAX_CONTROL_BYTES} bytes (its JSON)"
    )]
    TooLarge(usize),
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

    /// Parses and checks a message as sent by clients (at most [`MAX_CONTROL_BYTES`]).
    pub fn parse(json: &[u8]) -> Result<Self, ControlError> {
        if json.len() > MAX_CONTROL_BYTES {
            return Err(ControlError::TooLarge(json.len()));
        }
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

    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[ -~]{0,30}"]
    }

    fn action() -> impl Strategy<Value = ControlAction> {
        prop::sample::select(vec![
            ControlAction::Pause,
            ControlAction::Resume,
            ControlAction::Stop,
            ControlAction::Stdin,
        ])
    }

    /// JSON-ish text: objects with the message's keys (and others), of any JSON value.
    fn json_ish() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("action".to_owned()),
            Just("variation".to_owned()),
            Just("data".to_owned()),
            "[a-z]{1,6}",
        ];
        let value = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            "-?[0-9]{1,20}(\\.[0-9]{1,5})?",
            prop_oneof![
                Just("pause"),
                Just("resume"),
                Just("stop"),
                Just("stdin"),
                Just("explode")
            ]
            .prop_map(|a| format!("\"{a}\"")),
            text().prop_map(|t| serde_json::to_string(&t).unwrap()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
            Just("\"\\ud800\"".to_owned()),
        ];
        prop::collection::vec((key, value), 0..5).prop_map(|fields| {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest! {
        /// Arbitrary bytes, and JSON-ish objects built from the message's own keys and
        /// values, parse to a message or give a `ControlError`, never a panic; what parses is
        /// consistent (`data` exactly for `stdin`), no larger once serialised again, and
        /// survives its own serialisation.
        #[test]
        fn any_body_parses_or_is_refused_never_a_panic(
            body in prop_oneof![
                json_ish().prop_map(String::into_bytes),
                prop::collection::vec(any::<u8>(), 0..128),
            ],
        ) {
            if let Ok(msg) = ControlMessage::parse(&body) {
                prop_assert_eq!(msg.data.is_some(), msg.action == ControlAction::Stdin);
                // What is passed on is never larger than what was accepted.
                prop_assert!(msg.to_json().len() <= body.len());
                prop_assert_eq!(ControlMessage::parse(&msg.to_json()).unwrap(), msg);
            }
        }

        /// Every valid message round-trips through its JSON.
        #[test]
        fn valid_messages_round_trip(
            action in action(),
            variation in prop::option::of(text()),
            data in text(),
        ) {
            let msg = ControlMessage {
                action,
                variation,
                data: (action == ControlAction::Stdin).then_some(data),
            };
            let json = msg.to_json();
            prop_assert_eq!(ControlMessage::parse(&json).unwrap(), msg);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]

        /// A body over [`MAX_CONTROL_BYTES`] is refused before it is parsed (whatever it says);
        /// the largest one allowed is accepted.
        #[test]
        fn oversize_bodies_are_refused(extra in 1usize..4096, action in action()) {
            let mut msg = ControlMessage::new(action);
            msg.data = Some(String::new());
            let fixed = msg.to_json().len();
            msg.data = Some("x".repeat(MAX_CONTROL_BYTES + extra - fixed));
            let json = msg.to_json();
            prop_assert_eq!(json.len(), MAX_CONTROL_BYTES + extra);
            prop_assert!(matches!(
                ControlMessage::parse(&json),
                Err(ControlError::TooLarge(n)) if n == json.len()
            ));
            // The largest accepted body is accepted.
            msg.action = ControlAction::Stdin;
            msg.data = Some(String::new());
            let fixed = msg.to_json().len();
            msg.data = Some("x".repeat(MAX_CONTROL_BYTES - fixed));
            prop_assert!(ControlMessage::parse(&msg.to_json()).is_ok());
        }
    }
}

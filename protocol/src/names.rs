//! Names of the Redis keys and Pub/Sub channels of a run.
//!
//! Every key and channel of one run contains `{RUN}` with literal braces: that is a Redis
//! Cluster hash tag, so all of a run's data lives in one slot and one Redis function may touch
//! several of its keys at once. A stream key and the Pub/Sub channel that announces its new
//! entries share one name (channels are not keys, so they do not collide).

use std::fmt;

/// Sorted set of all runs known to Redis: member = run id, score = creation time (ms).
/// The relay lists runs from it; the operator (or `agentrun-sidecar run`) registers runs in it.
pub const RUNS_INDEX_KEY: &str = "agentrun:runs";

/// Name of the variation a run has when it declares none.
pub const DEFAULT_VARIATION: &str = "default";

/// Why a run id or variation name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "run id {0:?} is not valid: use 1 to 200 characters from a-z, A-Z, 0-9, '.', '_' and '-'"
    )]
    RunId(String),
    #[error(
        "variation name {0:?} is not valid: use a DNS label (1 to 63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit)"
    )]
    Variation(String),
}

/// The id of one run incarnation. A deleted and re-created run gets a new id, so its data
/// never mixes with the old one's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(String);

impl RunId {
    pub fn new(id: impl Into<String>) -> Result<Self, NameError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 200
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(id))
        } else {
            Err(NameError::RunId(id))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Prefix shared by every key and channel of the run: `run:{RUN}:`.
    pub fn prefix(&self) -> String {
        format!("run:{{{}}}:", self.0)
    }

    /// Hash with the latest status of each variation (`run:{RUN}:state`).
    pub fn state_key(&self) -> String {
        format!("run:{{{}}}:state", self.0)
    }

    /// Hash with the highest producer sequence applied per stream and producer
    /// (`run:{RUN}:producers`); it is how re-sends are deduplicated.
    pub fn producers_key(&self) -> String {
        format!("run:{{{}}}:producers", self.0)
    }

    /// Hash of the same kind for the control stream alone (`run:{RUN}:control-producers`):
    /// the relay, which publishes control messages, may write it and no other producers
    /// hash, so it cannot make the publish function skip a sidecar's output.
    pub fn control_producers_key(&self) -> String {
        format!("run:{{{}}}:control-producers", self.0)
    }

    /// Every key a run owns once these variations have written to it.
    pub fn all_keys<'a>(&self, variations: impl IntoIterator<Item = &'a Variation>) -> Vec<String> {
        let mut keys = vec![
            self.state_key(),
            self.producers_key(),
            self.control_producers_key(),
            StreamName::Status.key(self),
            StreamName::Control.key(self),
            StreamName::Metrics.key(self),
        ];
        for v in variations {
            keys.push(StreamName::Output(v.clone()).key(self));
            keys.push(StreamName::Logs(v.clone()).key(self));
        }
        keys
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An RFC 1123 label, as Kubernetes names namespaces: 1 to 63 characters of a-z, 0-9 and `-`,
/// starting and ending with a letter or digit.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A variation of a run: one agent pod. Named like a DNS label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variation(String);

impl Variation {
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if is_dns_label(&name) {
            Ok(Self(name))
        } else {
            Err(NameError::Variation(name))
        }
    }

    pub fn default_name() -> Self {
        Self(DEFAULT_VARIATION.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Variation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One stream of a run (and the Pub/Sub channel of the same name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamName {
    /// Agent stdout, byte-exact: `run:{RUN}:output:VAR`.
    Output(Variation),
    /// Agent stderr and sidecar logs: `run:{RUN}:logs:VAR`.
    Logs(Variation),
    /// Lifecycle of the run and its variations: `run:{RUN}:status`.
    Status,
    /// Control messages to the agents (and their audit trail): `run:{RUN}:control`.
    Control,
    /// Periodic figures: `run:{RUN}:metrics`.
    Metrics,
}

impl StreamName {
    /// The stream key, which is also the Pub/Sub channel name.
    pub fn key(&self, run: &RunId) -> String {
        match self {
            Self::Output(v) => format!("run:{{{run}}}:output:{v}"),
            Self::Logs(v) => format!("run:{{{run}}}:logs:{v}"),
            Self::Status => format!("run:{{{run}}}:status"),
            Self::Control => format!("run:{{{run}}}:control"),
            Self::Metrics => format!("run:{{{run}}}:metrics"),
        }
    }

    /// The hash that deduplicates this stream's producers: [`RunId::control_producers_key`]
    /// for the control stream, [`RunId::producers_key`] for every other.
    pub fn producers_key(&self, run: &RunId) -> String {
        match self {
            Self::Control => run.control_producers_key(),
            _ => run.producers_key(),
        }
    }

    /// The channel kind as clients name it: `output`, `logs`, `status`, `control`, `metrics`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Output(_) => "output",
            Self::Logs(_) => "logs",
            Self::Status => "status",
            Self::Control => "control",
            Self::Metrics => "metrics",
        }
    }

    pub fn variation(&self) -> Option<&Variation> {
        match self {
            Self::Output(v) | Self::Logs(v) => Some(v),
            _ => None,
        }
    }

    /// Parses a key or channel name back into its run and stream.
    pub fn parse(key: &str) -> Option<(RunId, StreamName)> {
        let rest = key.strip_prefix("run:{")?;
        let close = rest.find("}:")?;
        let run = RunId::new(&rest[..close]).ok()?;
        let stream = Self::parse_kind(&rest[close + 2..], ':')?;
        Some((run, stream))
    }

    /// Parses `KIND` or, for output and logs, `KIND{separator}VARIATION` (a key's tail with
    /// `:`; the archive's file names use `.`), `KIND` as [`StreamName::kind`] names it.
    pub fn parse_kind(text: &str, separator: char) -> Option<StreamName> {
        Some(match text.split_once(separator) {
            Some(("output", v)) => Self::Output(Variation::new(v).ok()?),
            Some(("logs", v)) => Self::Logs(Variation::new(v).ok()?),
            None if text == "status" => Self::Status,
            None if text == "control" => Self::Control,
            None if text == "metrics" => Self::Metrics,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_hash_tag() {
        let run = RunId::new("ns.hello.1a2b3c4d").unwrap();
        let v = Variation::new("fast-1").unwrap();
        assert_eq!(
            StreamName::Output(v.clone()).key(&run),
            "run:{ns.hello.1a2b3c4d}:output:fast-1"
        );
        assert_eq!(
            StreamName::Logs(v).key(&run),
            "run:{ns.hello.1a2b3c4d}:logs:fast-1"
        );
        assert_eq!(
            StreamName::Status.key(&run),
            "run:{ns.hello.1a2b3c4d}:status"
        );
        assert_eq!(
            StreamName::Control.key(&run),
            "run:{ns.hello.1a2b3c4d}:control"
        );
        assert_eq!(
            StreamName::Metrics.key(&run),
            "run:{ns.hello.1a2b3c4d}:metrics"
        );
        assert_eq!(run.state_key(), "run:{ns.hello.1a2b3c4d}:state");
    }

    #[test]
    fn parse_round_trips() {
        let run = RunId::new("r1").unwrap();
        for s in [
            StreamName::Output(Variation::default_name()),
            StreamName::Logs(Variation::new("b").unwrap()),
            StreamName::Status,
            StreamName::Control,
            StreamName::Metrics,
        ] {
            assert_eq!(StreamName::parse(&s.key(&run)), Some((run.clone(), s)));
        }
        assert_eq!(StreamName::parse("run:{r1}:state"), None);
        assert_eq!(StreamName::parse("other"), None);
    }

    #[test]
    fn bad_names_are_refused_with_a_hint() {
        assert!(RunId::new("a{b}").is_err());
        assert!(RunId::new("").is_err());
        assert!(RunId::new("a:b").is_err());
        let err = Variation::new("Bad_Name").unwrap_err().to_string();
        assert!(
            err.contains("Bad_Name") && err.contains("DNS label"),
            "{err}"
        );
        assert!(Variation::new("-a").is_err());
        assert!(Variation::new("a".repeat(64)).is_err());
        assert!(Variation::new("a-1").is_ok());
    }
}

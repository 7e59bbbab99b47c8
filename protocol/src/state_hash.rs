//! The run's state hash, `run:{RUN}:state`: the name of every field, and how each is read.
//! `docs/protocol.md` ("The state hash") says who writes what. No component spells a field
//! name itself: they use these constants and functions (agentrun's Redis functions, in
//! `agentrun.lua`, use the same names).

use crate::epoch::Epoch;
use crate::names::Variation;
use crate::status::RunState;
use std::collections::{BTreeSet, HashMap};
use std::fmt;

/// ms since the epoch when the run was registered.
pub const CREATED: &str = "created";
/// The declared variations, comma-separated.
pub const VARIATIONS: &str = "variations";
/// The run-level state (lowercase [`RunState`]).
pub const PHASE: &str = "phase";
/// ms since the epoch when `phase` became final.
pub const ENDED: &str = "ended";
/// The run's current [`Epoch`].
pub const EPOCH: &str = "epoch";
/// The AgentRun's name (written by the operator; `agentrun-sidecar run` writes the run id).
pub const NAME: &str = "name";
/// The AgentRun's namespace (only runs an operator registered have one).
pub const NAMESPACE: &str = "namespace";
/// The run's page in the web UI.
pub const URL: &str = "url";
pub use crate::archive::{
    FIELD_ARCHIVE as ARCHIVE, FIELD_ARCHIVE_ERROR as ARCHIVE_ERROR, FIELD_ARCHIVED as ARCHIVED,
};

const VAR_PREFIX: &str = "var:";
const CONTROL_PREFIX: &str = "control:";

/// The latest run-wide status event (JSON), written by the operator with `phase`.
pub const RUN: &str = "run";
/// Who registered the run (`operator`).
pub const SOURCE: &str = "source";

/// `var:VARIATION`: the latest status event of the variation (JSON).
pub fn var_field(variation: impl fmt::Display) -> String {
    format!("{VAR_PREFIX}{variation}")
}

/// `control:VARIATION`: every control message up to this `seq` is dealt with by the
/// variation's sidecar.
pub fn control_field(variation: impl fmt::Display) -> String {
    format!("{CONTROL_PREFIX}{variation}")
}

/// The variations a state hash knows: the declared ones and every one with a status.
pub fn variations(state: &HashMap<String, String>) -> BTreeSet<Variation> {
    let mut out = BTreeSet::new();
    if let Some(list) = state.get(VARIATIONS) {
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Ok(v) = Variation::new(name) {
                out.insert(v);
            }
        }
    }
    for key in state.keys() {
        if let Some(name) = key.strip_prefix(VAR_PREFIX)
            && let Ok(v) = Variation::new(name)
        {
            out.insert(v);
        }
    }
    out
}

/// The latest status event of a variation, as its JSON text.
pub fn variation_status<'a>(
    state: &'a HashMap<String, String>,
    variation: &Variation,
) -> Option<&'a str> {
    state.get(&var_field(variation)).map(String::as_str)
}

/// The run-level phase, if it is set and known.
pub fn phase(state: &HashMap<String, String>) -> Option<RunState> {
    state.get(PHASE).and_then(|p| RunState::parse(p))
}

/// The run's epoch (`None`: it has none).
pub fn epoch(state: &HashMap<String, String>) -> Option<Epoch> {
    state.get(EPOCH).and_then(|e| Epoch::parse(e))
}

/// A field holding ms since the epoch ([`CREATED`], [`ENDED`]).
pub fn millis(state: &HashMap<String, String>, field: &str) -> Option<u64> {
    state.get(field).and_then(|v| v.parse().ok())
}

/// A text field, unless it is missing or empty.
pub fn text<'a>(state: &'a HashMap<String, String>, field: &str) -> Option<&'a str> {
    state
        .get(field)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// The namespace and name of the run's AgentRun (runs no operator registered have none).
pub fn agentrun(state: &HashMap<String, String>) -> Option<(&str, &str)> {
    Some((text(state, NAMESPACE)?, text(state, NAME)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(fields: &[(&str, &str)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn variations_are_the_declared_ones_and_those_with_a_status() {
        let state = hash(&[
            (VARIATIONS, "a, b,,"),
            ("var:c", "{}"),
            ("var:Bad Name", "{}"),
            ("control:d", "3"),
        ]);
        let names: Vec<String> = variations(&state)
            .iter()
            .map(|v| v.as_str().to_owned())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        let c = Variation::new("c").unwrap();
        assert_eq!(var_field(&c), "var:c");
        assert_eq!(control_field(&c), "control:c");
        assert_eq!(variation_status(&state, &c), Some("{}"));
    }

    #[test]
    fn fields_read_as_their_types_or_not_at_all() {
        let state = hash(&[
            (PHASE, "running"),
            (CREATED, "12"),
            (ENDED, "soon"),
            (EPOCH, "00000000000000ff"),
            (NAMESPACE, "team"),
            (NAME, ""),
        ]);
        assert_eq!(phase(&state), Some(RunState::Running));
        assert_eq!(phase(&hash(&[(PHASE, "dancing")])), None);
        assert_eq!(millis(&state, CREATED), Some(12));
        assert_eq!(millis(&state, ENDED), None);
        assert!(epoch(&state).is_some());
        assert_eq!(text(&state, NAMESPACE), Some("team"));
        assert_eq!(agentrun(&state), None, "an empty name is no AgentRun");
    }
}

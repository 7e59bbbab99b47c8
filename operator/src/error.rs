//! The operator's error type.

/// Everything that can go wrong while reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[source] kube::Error),

    #[error(
        "{object}: {field} is missing; this is set by the API server, so the object is not a stored AgentRun"
    )]
    MissingField { object: String, field: &'static str },

    #[error("{object}: {field} {message}")]
    InvalidSpec {
        object: String,
        field: &'static str,
        message: String,
    },

    #[error(
        "Redis request for run {run_id} failed: {message}; check --redis-url and that Redis is reachable from the operator"
    )]
    Redis { run_id: String, message: String },

    #[error("finalizer failed: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    #[error(
        "the API server did not answer {what} within {}ms; check that it is reachable and not overloaded",
        after.as_millis()
    )]
    Timeout {
        what: &'static str,
        after: std::time::Duration,
    },

    #[error("could not serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self::Kube(e)
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Short label for the `result` dimension of the reconcile metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube_error",
            Self::MissingField { .. } => "missing_field",
            Self::InvalidSpec { .. } => "invalid_spec",
            Self::Redis { .. } => "redis_error",
            Self::Finalizer(_) => "finalizer_error",
            Self::Timeout { .. } => "timeout",
            Self::Serialize { .. } => "serialize_error",
        }
    }
}

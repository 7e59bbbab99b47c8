//! The archiver's errors. Each says what failed and, where a user can act, what to do.

/// Why archiving or reading an archive failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("store URL {url:?}: {reason}")]
    StoreUrl { url: String, reason: String },
    #[error("archive is damaged: {0}")]
    Corrupt(String),
    #[error("stream entry: {0}")]
    Entry(#[from] agentrun_protocol::entry::MalformedEntry),
    #[error("bad archive request: {0}")]
    Request(String),
    #[error("another archiver took the request over")]
    Lost,
    #[error("compression: {0}")]
    Io(#[from] std::io::Error),
}

impl ArchiveError {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Redis(_) => "redis",
            Self::Store(_) | Self::StoreUrl { .. } => "store",
            Self::Corrupt(_) | Self::Entry(_) => "corrupt",
            Self::Request(_) => "request",
            Self::Lost => "lost",
            Self::Io(_) => "io",
        }
    }

    /// Whether trying again cannot help (the request itself is wrong).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Request(_))
    }
}

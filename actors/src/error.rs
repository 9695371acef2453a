//! The engine's error types. The HTTP layer maps them to OCI error JSON (`src/error.rs`);
//! here they say what went wrong, by cause, keeping the underlying error as the source,
//! without credentials in any message.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::digest::Digest;

/// Something went wrong talking to an upstream registry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach upstream {upstream}: {detail}")]
    Connect { upstream: String, detail: String },
    #[error("upstream {upstream} timed out {stage}")]
    Timeout {
        upstream: String,
        stage: &'static str,
    },
    #[error("upstream {upstream} answered HTTP {status}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Status {
        upstream: String,
        status: u16,
        message: Option<String>,
        /// `Retry-After` seconds, relayed on 429.
        retry_after: Option<u64>,
    },
    /// 401 after a fresh token: anonymous access to a missing or private repository (Docker
    /// Hub's answer for both), or refused credentials.
    #[error("upstream {upstream} refused access{}", if *anonymous { " (anonymous)" } else { " with the configured credentials" })]
    Unauthorized { upstream: String, anonymous: bool },
    #[error("upstream {upstream} sent an invalid response: {detail}")]
    Protocol { upstream: String, detail: String },
}

impl UpstreamError {
    /// True when the upstream cannot currently answer (down, overloaded, rate-limiting):
    /// the cases in which a cached answer is served instead.
    pub fn is_unavailable(&self) -> bool {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Timeout { .. } => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Protocol { .. } => true,
            UpstreamError::Unauthorized { .. } => false,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, UpstreamError::Status { status: 404, .. })
    }
}

/// What a request was about, for errors: an upstream's 404 means "blob unknown", "manifest
/// unknown" or "repository unknown" depending on it.
#[derive(Debug, Clone)]
pub enum Object {
    Blob(Digest),
    Manifest { repo: String, reference: String },
    Repository(String),
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Object::Blob(d) => write!(f, "blob {d}"),
            Object::Manifest { repo, reference } => write!(f, "manifest {repo}:{reference}"),
            Object::Repository(r) => write!(f, "repository {r}"),
        }
    }
}

/// What a request to the engine can end in, besides success.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("blob unknown: {0}")]
    BlobUnknown(String),
    #[error("repository unknown: {0}")]
    NameUnknown(String),
    #[error("access denied: {0}")]
    Denied(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("upstream content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("manifest refused: {0}")]
    ManifestRefused(String),
    /// A file system call on the blob store failed.
    #[error("storage error {context}: {source}")]
    Storage {
        context: &'static str,
        #[source]
        source: Arc<io::Error>,
    },
    #[error(transparent)]
    Metadata(MetaError),
    #[error("cache engine unavailable: {0}")]
    Unavailable(#[from] actix::MailboxError),
    /// A broken invariant inside pullcache (a thread or task that died).
    #[error("internal error: {0}")]
    Internal(&'static str),
    #[error("download abandoned before it finished")]
    Abandoned,
    /// A reader waited for a download that showed no progress for `after`.
    #[error("timed out {stage}: no progress for {}", humantime::format_duration(*after))]
    WaitTimedOut {
        stage: &'static str,
        after: Duration,
    },
    /// Health probes say the upstream is down and the answer is not cached.
    #[error("upstream {0} is down (health probes failing) and this is not cached")]
    UpstreamDown(String),
    /// The upstream cannot confirm a tag and the cached answer is older than `max_stale`.
    #[error("upstream {upstream} is unavailable and the cached answer for {what} is too old (stale for {stale_for}, max_stale {max_stale})")]
    StaleTooOld {
        upstream: String,
        what: String,
        stale_for: String,
        max_stale: String,
    },
    /// The disk is full: the download could not be stored (it is streamed without storing).
    #[error("disk full: {0}")]
    DiskFull(String),
    /// As many blob downloads as `limits` allow are in flight: try again shortly.
    #[error("busy: {0}")]
    Busy(String),
}

impl EngineError {
    /// A blob store error, with what was being done.
    pub fn storage(context: &'static str, source: io::Error) -> EngineError {
        EngineError::Storage {
            context,
            source: Arc::new(source),
        }
    }

    /// Maps an upstream answer about `what` into the engine's vocabulary: a 404 becomes
    /// "unknown", an anonymous 401 becomes "repository unknown" (never relay a challenge to
    /// clients), refused credentials become "denied".
    pub fn from_upstream(e: UpstreamError, what: Object) -> EngineError {
        match e {
            UpstreamError::Status { status: 404, .. } => match what {
                Object::Blob(_) => EngineError::BlobUnknown(what.to_string()),
                Object::Manifest { .. } => EngineError::ManifestUnknown(what.to_string()),
                Object::Repository(_) => EngineError::NameUnknown(what.to_string()),
            },
            UpstreamError::Unauthorized {
                anonymous: true, ..
            } => EngineError::NameUnknown(format!(
                "{what} (the upstream denies anonymous access: missing or private)"
            )),
            UpstreamError::Unauthorized {
                anonymous: false,
                upstream,
            } => EngineError::Denied(format!(
                "{what}: upstream {upstream} refused the configured credentials"
            )),
            other => EngineError::Upstream(other),
        }
    }

    /// As the error a body stream ends with (the HTTP layer then aborts the connection).
    pub fn into_io(self) -> io::Error {
        match self {
            EngineError::WaitTimedOut { .. } => {
                io::Error::new(io::ErrorKind::TimedOut, "no progress from upstream")
            }
            EngineError::Abandoned => io::Error::other("download abandoned"),
            e => io::Error::other(e.to_string()),
        }
    }
}

impl From<MetaError> for EngineError {
    /// A stopped metadata actor is an unavailable engine, as any stopped actor is; the
    /// rest are metadata errors.
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Gone(mailbox) => EngineError::Unavailable(mailbox),
            other => EngineError::Metadata(other),
        }
    }
}

/// Errors of the metadata store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database: {0}")]
    Db(#[source] Arc<sled::Error>),
    #[error("metadata record corrupt: {0}")]
    Corrupt(String),
    /// The metadata actor does not answer (stopped).
    #[error("metadata actor unavailable: {0}")]
    Gone(#[source] actix::MailboxError),
}

impl From<sled::Error> for MetaError {
    fn from(e: sled::Error) -> Self {
        MetaError::Db(Arc::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_metadata_actor_is_an_unavailable_engine() {
        let e = EngineError::from(MetaError::Gone(actix::MailboxError::Closed));
        assert!(matches!(e, EngineError::Unavailable(_)), "{e:?}");
        let e = EngineError::from(MetaError::Corrupt("x".into()));
        assert!(matches!(e, EngineError::Metadata(_)), "{e:?}");
    }
}

//! Why the daemon cannot start or serve: each error names the flag or the
//! step, and keeps its cause.

use crate::control::StartError;
use crate::datapath::DatapathError;
use crate::identity::certs::CertError;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A flag's value cannot be used: `--node: ...`.
    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },
    /// A socket, file or signal operation: what it was, and why it failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The certificates named by a flag.
    #[error("{flag}: {source}")]
    Certificates {
        flag: String,
        #[source]
        source: CertError,
    },
    #[error("tunnel TLS: {0}")]
    Tls(#[from] crate::identity::tls::TlsConfigError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("--handover-socket {path}: {source}")]
    Handover {
        path: std::path::PathBuf,
        #[source]
        source: crate::handover::HandoverError,
    },
    #[cfg(feature = "kubernetes")]
    #[error(transparent)]
    Discovery(#[from] crate::discovery::watch::DiscoveryError),
    /// The readiness probe's answer, when it is not ready.
    #[error("{0}")]
    NotReady(String),
}

impl RunError {
    pub fn flag(flag: &str, message: impl std::fmt::Display) -> Self {
        RunError::Flag { flag: flag.to_owned(), message: message.to_string() }
    }
}

/// Maps an I/O error to [`RunError::Io`], saying what failed.
pub fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> RunError {
    move |source| RunError::Io { what: what.to_string(), source }
}

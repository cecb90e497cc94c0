//! The control plane's errors, one enum per boundary.

use super::*;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the state is at generation {current}, not {expected}: read it again and retry")]
    Conflict { current: u64, expected: u64 },
    #[error("the request is invalid:\n{0}")]
    Invalid(ValidationErrors),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the kernel maps could not be updated ({source}); {rollback}; nothing was saved")]
    Datapath { source: DatapathError, rollback: Box<Rollback> },
    #[error("the daemon is shutting down")]
    Stopped,
    #[error("a new mesh-daemon is taking over on this node; nothing was changed: retry in a few seconds")]
    HandingOver,
}

/// Why the control plane cannot start: each names the input and the fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] model::ConfigError),
    #[error("{0}")]
    Invalid(String),
    #[error("writing the maps: {0}")]
    Maps(DatapathError),
    #[error("--api-group {0}: no such group; create it (groupadd {0}) or drop the flag")]
    NoGroup(String),
    #[error("--api-socket {0}: another mesh-daemon is serving there")]
    SocketInUse(PathBuf),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sys(#[from] nix::Error),
}

/// Why the kernel maps cannot be read now.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("the datapath is not attached yet")]
    NotAttached,
    #[error(transparent)]
    Kernel(#[from] DatapathError),
}

/// Why a step of a handover could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the daemon's state lock is poisoned")]
    Poisoned,
    #[error("the datapath is let go already (shutting down or handing over)")]
    Released,
    #[error("the kernel maps could not be written after taking the datapath back: {0}")]
    Resync(DatapathError),
}

/// What became of the maps after a failed write.
#[derive(Debug)]
pub enum Rollback {
    Done { generation: u64 },
    Failed { generation: u64, error: DatapathError },
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rollback::Done { generation } => write!(f, "they were put back as generation {generation}"),
            Rollback::Failed { generation, error } => write!(
                f,
                "putting them back as generation {generation} failed too ({error}): they differ from it until the next write"
            ),
        }
    }
}

//! Errors of the data-parallel strategies.

use bonfire_collective::CommError;

/// Result of the strategies.
pub type Result<T, E = ParallelError> = std::result::Result<T, E>;

/// Why DDP or DP failed.
#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    /// A collective failed (a peer is gone, late, or disagrees).
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The ranks' modules do not have the same parameters.
    #[error("parameter layouts differ between ranks: {0}")]
    LayoutMismatch(String),
    /// Some parameters got no gradient in a synchronised step.
    #[error(
        "{0}; every rank must produce a gradient for every parameter in a synchronised step. \
         If some parameters are legitimately unused, enable `find_unused_parameters` in DdpConfig"
    )]
    UnusedParameters(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
}

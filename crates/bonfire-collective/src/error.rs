//! The one error type of the collectives layer.

use std::time::Duration;

/// Result of every collective and rendezvous call.
pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// Why a collective or the rendezvous failed.
///
/// Every variant that is caused by another worker names that worker's rank, so
/// that a user reading the log of any surviving rank knows which one to look at.
/// The fields say what their names say: `op` is the call, `rank` the rank at
/// fault, `waited` how long this rank waited, `detail` what went wrong.
/// An underlying I/O error (`cause`) is part of the message, not a separate
/// source, so that a chain of errors names it once.
#[allow(missing_docs)] // the fields, described above
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A peer did not answer within the timeout.
    #[error("timed out after {waited:?} in {op} waiting for rank {rank}")]
    Timeout { op: &'static str, rank: usize, waited: Duration },
    /// A call did not finish within the timeout, and the library that runs
    /// it (MPI) does not say which rank is missing.
    #[error("timed out after {waited:?} in {op}: a rank did not join (MPI does not tell which; the other ranks' logs show who stopped)")]
    Stalled { op: &'static str, waited: Duration },
    /// Several peers did not join within the timeout.
    #[error("timed out after {waited:?} in {op}: rank(s) {ranks:?} never arrived")]
    Missing { op: &'static str, ranks: Vec<usize>, waited: Duration },
    /// A peer closed its connection or its socket failed.
    #[error("lost rank {rank} during {op}: {cause}")]
    PeerLost { op: &'static str, rank: usize, cause: std::io::Error },
    /// Ranks called different collectives, or the same one with different arguments.
    #[error("rank {rank} disagrees in {op}: {detail}")]
    Mismatch { op: &'static str, rank: usize, detail: String },
    /// A peer sent something that is not the protocol.
    #[error("protocol error from {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    /// The rendezvous refused this worker (wrong job token, rank taken, ...).
    #[error("{peer} refused this worker: {detail}")]
    Refused { peer: String, detail: String },
    /// A bad argument from the caller (wrong length, root out of range, ...).
    #[error("invalid argument to {op}: {detail}")]
    Invalid { op: &'static str, detail: String },
    /// A missing or invalid environment variable of the torchrun contract.
    #[error("environment variable {var}: {detail}")]
    Env { var: &'static str, detail: String },
    /// A local socket operation failed (bind, connect, ...).
    #[error("{context}: {cause}")]
    Io { context: String, cause: std::io::Error },
    /// A library or device this communicator needs is not there.
    #[error("{0}")]
    Unavailable(String),
    /// The CUDA driver or NCCL failed.
    #[error("{op} failed on the device: {detail}")]
    Device { op: &'static str, detail: String },
    /// The MPI library returned an error.
    #[error("{op} failed in MPI: {detail}")]
    Mpi { op: &'static str, detail: String },
    /// An earlier collective failed; the group cannot be used any more.
    #[error("communicator is unusable after an earlier failure: {0}")]
    Aborted(String),
}

impl CommError {
    pub(crate) fn io(context: impl Into<String>, cause: std::io::Error) -> Self {
        CommError::Io { context: context.into(), cause }
    }

    /// The peer this error blames for not answering: the rank waited for,
    /// the first that never arrived, or the one lost.
    pub fn silent_peer(&self) -> Option<usize> {
        match self {
            CommError::Timeout { rank, .. } | CommError::PeerLost { rank, .. } => Some(*rank),
            CommError::Missing { ranks, .. } => ranks.first().copied(),
            _ => None,
        }
    }

    pub(crate) fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        CommError::Invalid { op, detail: detail.into() }
    }
}

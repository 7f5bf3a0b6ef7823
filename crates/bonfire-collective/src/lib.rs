//! Bonfire's collectives: the [`Communicator`] trait that data-parallel
//! training stands on, and its host-memory implementations.
//!
//! - [`InProcCommunicator`]: workers are threads of one process.
//! - [`TcpCommunicator`]: workers are processes on one or many hosts, joined
//!   by a chunked, pipelined TCP ring after meeting at a rendezvous store
//!   that rank 0 hosts, found through torchrun's environment variables
//!   ([`DistEnv`]).
//! - [`TensorCollective`]: collectives on Burn tensors, what DDP uses;
//!   every communicator provides it by staging tensors through the host.
//! - `MpiCommunicator` (feature `mpi`): the processes of an `mpirun` or
//!   `srun` job, through the system's MPI library.
//! - `NcclCommunicator` (feature `nccl`): NCCL between processes, on
//!   burn-cuda tensor memory; its stalls are named through a heartbeat
//!   each rank publishes in the rendezvous store.
#![warn(missing_docs)]

mod call;
mod communicator;
mod element;
mod env;
mod error;
#[cfg_attr(not(feature = "nccl"), allow(dead_code))] // NCCL's alone
mod heartbeat;
mod inproc;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
mod rendezvous;
mod segments;
mod store;
mod tcp;
#[cfg(feature = "tensor")]
mod tensor;
mod token_file;

pub use communicator::{Capabilities, Communicator, Group, DEFAULT_STALL_WARNING, DEFAULT_TIMEOUT};
pub use element::{BufMut, BufRef, DType, Element, ReduceOp};
pub use env::{
    DistEnv, JobToken, Placement, TorchrunStore, INSECURE_VAR, JOB_TOKEN_VAR, RESTART_COUNT_VAR, USE_AGENT_STORE_VAR,
};
pub use error::{CommError, Result};
pub use inproc::InProcCommunicator;
#[cfg(feature = "mpi")]
pub use mpi::MpiCommunicator;
#[cfg(feature = "nccl")]
pub use nccl::{CudaTensor, NcclCommunicator};
pub use tcp::{TcpCommunicator, TcpConfig};
#[cfg(feature = "tensor")]
pub use tensor::TensorCollective;
pub use token_file::random_token;

/// The rendezvous store's decoder of a connection's bytes, for the fuzz
/// target (cargo-fuzz builds with `--cfg fuzzing`).
#[cfg(fuzzing)]
pub use store::decode_connection;

//! Bonfire: data-parallel training for [Burn](https://burn.dev) modules, on
//! every Burn backend.
//!
//! - [`DistributedDataParallel`]: one worker per device, as threads of one
//!   process or as processes on one or many hosts; gradients are averaged in
//!   buckets while (or after) backward runs, as PyTorch's DDP does.
//! - [`DataParallel`]: one process driving several devices, as PyTorch's
//!   `DataParallel`.
//! - Communicators underneath: [`InProcCommunicator`] (threads),
//!   [`TcpCommunicator`] (processes, a pipelined TCP ring found through
//!   torchrun's environment variables) and, with the `nccl` feature,
//!   `NcclCommunicator` (CUDA).
//!
//! ```no_run
//! use bonfire::prelude::*;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In each worker process started by `bonfire launch` or torchrun:
//! let comm = TcpCommunicator::from_env(TcpConfig::default())?;
//! # let _ = comm;
//! # Ok(()) }
//! ```
//!
//! - [`learner::DdpLearning`]: burn-train's `Learner` trained with DDP.
//!
//! `examples/` holds complete programs: `quickstart` (the README's),
//! `ddp_custom_loop` (threads), `ddp_processes` (processes over TCP),
//! `comm_hooks` (PowerSGD and a hook of one's own), `sync_batch_norm`
//! (batch norm over every worker's batch), `data_parallel`,
//! `learner` (burn-train's Learner) and `wgpu`.
#![warn(missing_docs)]

pub use bonfire_collective as collective;
/// Bonfire's CPU kernels and the drop-in modules that use them
/// (`kernels::nn::{Conv2d, BatchNorm, MaxPool2d}`); their `BatchNorm` is the
/// one DDP's `sync_batch_norm` synchronises.
pub use bonfire_kernels as kernels;
/// burn-train's `Learner` with Bonfire's DDP (feature `learner`, on by default).
#[cfg(feature = "learner")]
pub use bonfire_learner as learner;
pub use bonfire_parallel as parallel;

#[cfg(feature = "nccl")]
pub use bonfire_collective::NcclCommunicator;
pub use bonfire_collective::{
    CommError, Communicator, DistEnv, Group, InProcCommunicator, ReduceOp, TcpCommunicator, TcpConfig, TensorCollective,
};
pub use bonfire_parallel::{
    comm_hook, keep_freed_memory, CommHook, DataParallel, DdpConfig, DistributedDataParallel, HookBackend,
    ParallelError, PerParameterRecord, ShardedOptimizer, Strategy,
};

/// `use bonfire::prelude::*;` gives the strategies, their configuration, the
/// communicators, their traits and the errors. `rank()` and `world_size()`
/// come from [`Group`], which both collective traits extend.
pub mod prelude {
    #[cfg(feature = "nccl")]
    pub use crate::NcclCommunicator;
    pub use crate::{
        CommError, CommHook, Communicator, DataParallel, DdpConfig, DistEnv, DistributedDataParallel, Group,
        HookBackend, InProcCommunicator, ParallelError, ReduceOp, Strategy, TcpCommunicator, TcpConfig,
        TensorCollective,
    };
}

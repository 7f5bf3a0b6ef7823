//! Data-parallel training for Burn modules on any backend.
//!
//! - [`DistributedDataParallel`]: one worker per device (threads or
//!   processes), gradients averaged in buckets while backward runs.
//! - [`DataParallel`]: one process driving several devices.
//! - [`Strategy`]: one step call over both and a single device.
//! - [`ShardedOptimizer`]: ZeRO stage 1, each DDP rank keeping the
//!   optimizer state of its shard of the parameters.
//! - [`keep_freed_memory`]: no page faults from step to step on the CPU.
#![warn(missing_docs)]

mod bucket;
mod buffers;
pub mod comm_hook;
mod comm_thread;
mod ddp;
mod device_move;
mod dp;
mod error;
mod hook;
mod host_bucket;
mod host_memory;
mod join;
mod params;
mod power_sgd;
mod reducer;
mod store;
mod strategy;
mod sync_batch_norm;
mod tensor_bucket;
mod zero;

pub use buffers::settle as settle_buffers;
pub use comm_hook::{Bf16Compress, CommHook, GradBucket, Mean, PowerSgd};
pub use ddp::{DdpConfig, DistributedDataParallel};
pub use device_move::{copies_directly, is_cubecl, move_differentiable, to_device, MoveBackend};
pub use dp::{DataParallel, Replicas};
pub use error::{ParallelError, Result};
pub use hook::HookBackend;
pub use host_memory::keep_freed_memory;
pub use strategy::Strategy;
pub use zero::{PerParameterRecord, ShardedOptimizer};

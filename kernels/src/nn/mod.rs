//! Drop-in replacements for Burn's `Conv2d`, `BatchNorm` and `MaxPool2d`:
//! the same configuration methods, the same fields, so the same record
//! layout and parameter names (weights files, checkpoints and PyTorch
//! interchange are unchanged), and a forward pass through [`crate::ops`]:
//! Bonfire's kernels on the Flex backend, Burn's ops on every other.
//!
//! The change in a model is its `use` line:
//!
//! ```
//! // use burn::nn::conv::{Conv2d, Conv2dConfig};
//! use bonfire_kernels::nn::{Conv2d, Conv2dConfig};
//! ```
//!
//! [`sync_batch_statistics`] makes every `BatchNorm` on a thread sum its
//! training statistics across a data-parallel group (PyTorch's
//! `SyncBatchNorm`); Bonfire's DDP does it with `sync_batch_norm`.

mod batch_norm;
mod conv2d;
mod max_pool2d;
mod padding;
mod sync;

pub use batch_norm::{BatchNorm, BatchNormConfig};
pub use conv2d::{Conv2d, Conv2dConfig};
pub use max_pool2d::{MaxPool2d, MaxPool2dConfig};
pub use sync::{sync_batch_statistics, SumAcrossRanks};

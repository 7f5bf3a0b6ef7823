//! Bonfire's own compute kernels, where Burn's are the bottleneck of
//! training on the CPU: 2-D convolution (forward, input and weight
//! gradients as packed matrix products), max pooling (the argmax kept for
//! backward) and batch norm (two passes each way).
//!
//! - [`cpu`]: the kernels, on plain f32 slices, spread over the threads of
//!   the current rayon pool (the pool Burn's Flex backend uses as well).
//! - `flex`: the kernels as operations on Burn's Flex backend and as nodes
//!   of `Autodiff<Flex>`'s graph.
//! - [`ops`]: backend-generic operations: the kernels on Flex, Burn's own
//!   operations on every other backend.
//! - [`nn`]: `Conv2d`, `BatchNorm` and `MaxPool2d`, drop-in replacements
//!   for Burn's modules (same configuration, fields and record layout) that
//!   go through [`ops`].
#![warn(missing_docs)]

pub mod cpu;
mod flex;
pub mod nn;
pub mod ops;

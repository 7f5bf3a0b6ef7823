//! The kernels on plain NCHW f32 slices, independent of Burn.

pub mod batch_norm;
pub mod conv2d;
pub mod gemm;
pub mod max_pool2d;
mod scratch;
mod sums;

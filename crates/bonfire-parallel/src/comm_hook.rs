//! Communication hooks: how a bucket of gradients is averaged across ranks,
//! what PyTorch's `register_comm_hook` takes. A hook is a trait a user can
//! implement; [`Mean`] (the default), [`Bf16Compress`] and [`PowerSgd`] are
//! three of them.

use std::ops::Range;

use bonfire_collective::{CommError, ReduceOp, TensorCollective};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

pub use crate::power_sgd::PowerSgd;

/// A bucket of gradients as a hook receives it.
pub struct GradBucket<B: Backend> {
    /// The bucket's place in the order buckets are sent within a step (0 is
    /// the first); the same on every rank, and the same from step to step.
    pub index: usize,
    /// The gradients one after another, as f32 on the gradients' device.
    /// Values outside every parameter's range (DDP's count of parameters
    /// without a gradient, at the end of the last bucket) are averaged too.
    pub buffer: Tensor<B, 1>,
    /// Each gradient's place in `buffer` and its parameter's shape.
    pub parameters: Vec<BucketParameter>,
}

/// Where one parameter's gradient lies in a [`GradBucket`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketParameter {
    /// Its values in [`GradBucket::buffer`].
    pub range: Range<usize>,
    /// The parameter's shape (a weight matrix is `[out, in]`).
    pub shape: Vec<usize>,
}

/// How DDP averages a bucket of gradients over all ranks. It runs on DDP's
/// communication thread, one bucket at a time, in the same order on every
/// rank, so every rank must issue the same collectives for a bucket. `self`
/// lives as long as the DDP strategy: state kept in it carries from step to
/// step (error feedback, for one).
pub trait CommHook<B: Backend>: Send + 'static {
    /// The bucket averaged over every rank of `comm`: the mean of the ranks'
    /// buffers, or an approximation of it, with the buffer's length.
    fn average(&mut self, comm: &mut dyn TensorCollective<B>, bucket: GradBucket<B>)
        -> Result<Tensor<B, 1>, CommError>;

    /// True only for a hook whose result is exactly the mean: DDP may then
    /// average the gradients in host memory where they lie, without calling
    /// [`average`](Self::average).
    fn is_plain_mean(&self) -> bool {
        false
    }
}

/// An all-reduce of the f32 values, divided by the world size (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mean;

impl<B: Backend> CommHook<B> for Mean {
    fn average(
        &mut self,
        comm: &mut dyn TensorCollective<B>,
        bucket: GradBucket<B>,
    ) -> Result<Tensor<B, 1>, CommError> {
        comm.all_reduce(bucket.buffer, ReduceOp::Mean)
    }

    fn is_plain_mean(&self) -> bool {
        true
    }
}

/// Sends bf16 instead of f32: half the bytes, at a relative error of about
/// 2^-8 per value per rounding (values are rounded once to bf16, and each
/// pairwise combination is rounded again). The bucket is cast on its
/// device, so the backend must have bf16 tensors (the CPU backends and CUDA
/// do; wgpu on most adapters does not).
#[derive(Debug, Clone, Copy, Default)]
pub struct Bf16Compress;

impl<B: Backend> CommHook<B> for Bf16Compress {
    fn average(
        &mut self,
        comm: &mut dyn TensorCollective<B>,
        bucket: GradBucket<B>,
    ) -> Result<Tensor<B, 1>, CommError> {
        let packed = bucket.buffer.cast(DType::BF16);
        Ok(comm.all_reduce(packed, ReduceOp::Mean)?.cast(DType::F32))
    }
}

//! Communication hooks: how a bucket of gradients is averaged across ranks,
//! as PyTorch's `register_comm_hook` chooses.

use bonfire_collective::{CommError, ReduceOp, TensorCollective};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// How a bucket (a 1-D f32 tensor of gradients) is averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommHook {
    /// An all-reduce of the f32 values, divided by the world size.
    #[default]
    Mean,
    /// Sends bf16 instead of f32: half the bytes, at a relative error of
    /// about 2^-8 per value per rounding (values are rounded once to bf16,
    /// and each pairwise combination is rounded again). The bucket is cast
    /// on its device, so the backend must have bf16 tensors (the CPU
    /// backends and CUDA do; wgpu on most adapters does not).
    Bf16Compress,
}

impl CommHook {
    /// Averages `bucket` across all ranks of `comm`.
    pub fn apply<B: Backend>(
        self,
        comm: &mut dyn TensorCollective<B>,
        bucket: Tensor<B, 1>,
    ) -> Result<Tensor<B, 1>, CommError> {
        match self {
            CommHook::Mean => comm.all_reduce(bucket, ReduceOp::Mean),
            CommHook::Bf16Compress => {
                let packed = bucket.cast(DType::BF16);
                Ok(comm.all_reduce(packed, ReduceOp::Mean)?.cast(DType::F32))
            }
        }
    }
}

//! Collectives on Burn tensors of any backend, staged through host memory.
//!
//! The tensor is read to the host, the collective runs on that buffer, and the
//! result becomes a tensor again on the tensor's own device, with the same
//! shape and element type. This is what wgpu and CPU backends use; CUDA
//! tensors can instead go straight to NCCL in device memory.

use burn::tensor::backend::Backend;
use burn::tensor::{DType as BurnDType, Tensor, TensorData};

use crate::communicator::Communicator;
use crate::element::{BufMut, ReduceOp};
use crate::error::{CommError, Result};

/// Combines `tensor` across all ranks; each rank gets the result on its own device.
pub fn all_reduce_tensor<B: Backend, const D: usize, C: Communicator + ?Sized>(
    comm: &mut C,
    tensor: Tensor<B, D>,
    op: ReduceOp,
) -> Result<Tensor<B, D>> {
    through_host("all_reduce", tensor, |buf| comm.all_reduce(buf, op))
}

/// Replaces `tensor` on every rank by rank `root`'s.
pub fn broadcast_tensor<B: Backend, const D: usize, C: Communicator + ?Sized>(
    comm: &mut C,
    tensor: Tensor<B, D>,
    root: usize,
) -> Result<Tensor<B, D>> {
    through_host("broadcast", tensor, |buf| comm.broadcast(buf, root))
}

fn through_host<B: Backend, const D: usize>(
    op: &'static str,
    tensor: Tensor<B, D>,
    collective: impl FnOnce(BufMut<'_>) -> Result<()>,
) -> Result<Tensor<B, D>> {
    let device = tensor.device();
    let mut data = tensor.into_data();
    host_buffer(op, &mut data, collective)?;
    Ok(Tensor::from_data(data, &device))
}

/// Runs `collective` on the values of `data` in place.
pub fn host_buffer(
    op: &'static str,
    data: &mut TensorData,
    collective: impl FnOnce(BufMut<'_>) -> Result<()>,
) -> Result<()> {
    let dtype = data.dtype;
    let unsupported =
        || CommError::invalid(op, format!("tensors of {dtype:?} are not supported; use f32, f16 or bf16"));
    let buf = match dtype {
        BurnDType::F32 => BufMut::F32(data.as_mut_slice::<f32>().map_err(|_| unsupported())?),
        BurnDType::F16 => BufMut::F16(data.as_mut_slice::<half::f16>().map_err(|_| unsupported())?),
        BurnDType::BF16 => BufMut::BF16(data.as_mut_slice::<half::bf16>().map_err(|_| unsupported())?),
        _ => return Err(unsupported()),
    };
    collective(buf)
}

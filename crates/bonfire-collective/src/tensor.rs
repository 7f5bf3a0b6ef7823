//! Collectives on Burn tensors: the [`TensorCollective`] trait that DDP's
//! reducer talks to, and its host-staged implementation for every
//! [`Communicator`].
//!
//! Host-staged: the tensor is read to the host, the collective runs on that
//! buffer, and the result becomes a tensor again on the tensor's own device,
//! with the same element type. This is what wgpu and the CPU backends use;
//! `NcclCommunicator` implements the trait for burn-cuda tensors in device
//! memory instead.

use burn::tensor::backend::Backend;
use burn::tensor::{DType as BurnDType, Tensor, TensorData};
use half::{bf16, f16};

use crate::communicator::{Capabilities, Communicator, Group};
use crate::element::{BufMut, BufRef, ReduceOp};
use crate::error::{CommError, Result};

/// Collectives on 1-D float tensors of backend `B`: what DDP needs from a
/// process group. The rules of [`Communicator`] hold: every rank makes the
/// same calls in the same order, with tensors of the same length and element
/// type, and a failed call leaves the group unusable.
pub trait TensorCollective<B: Backend>: Group + Send {
    /// The element-wise combination of every rank's `tensor`.
    fn all_reduce(&mut self, tensor: Tensor<B, 1>, op: ReduceOp) -> Result<Tensor<B, 1>>;

    /// Rank `root`'s `tensor`, on every rank.
    fn broadcast(&mut self, tensor: Tensor<B, 1>, root: usize) -> Result<Tensor<B, 1>>;

    /// Every rank's `tensor`, concatenated in rank order.
    fn all_gather(&mut self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>>;

    /// What this collective can do beyond the trait's calls.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Combines f32 values that lie in host memory, in place, as
    /// [`Communicator::all_reduce_segments`] does: for a collective whose
    /// [`capabilities`](Self::capabilities) say `host_memory`, so that DDP on
    /// the CPU reduces its gradients with no tensor to stage them through.
    fn all_reduce_host(&mut self, segments: &mut [&mut [f32]], op: ReduceOp) -> Result<()> {
        let _ = (segments, op);
        Err(CommError::invalid("all_reduce", "this collective works on device memory, not on host buffers"))
    }
}

/// Every host-memory communicator (the in-process group, the TCP ring) works
/// on tensors of any backend by staging them through the host.
impl<B: Backend, C: Communicator> TensorCollective<B> for C {
    fn all_reduce(&mut self, tensor: Tensor<B, 1>, op: ReduceOp) -> Result<Tensor<B, 1>> {
        in_place("all_reduce", tensor, |buf| Communicator::all_reduce(self, buf, op))
    }

    fn broadcast(&mut self, tensor: Tensor<B, 1>, root: usize) -> Result<Tensor<B, 1>> {
        in_place("broadcast", tensor, |buf| Communicator::broadcast(self, buf, root))
    }

    fn capabilities(&self) -> Capabilities {
        Communicator::capabilities(self)
    }

    fn all_reduce_host(&mut self, segments: &mut [&mut [f32]], op: ReduceOp) -> Result<()> {
        Communicator::all_reduce_segments(self, segments, op)
    }

    fn all_gather(&mut self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        let device = tensor.device();
        let input = tensor.into_data();
        let len = input.num_elements() * self.world_size();
        let mut output = match input.dtype {
            BurnDType::F32 => TensorData::new(vec![0f32; len], [len]),
            BurnDType::F16 => TensorData::new(vec![f16::ZERO; len], [len]),
            BurnDType::BF16 => TensorData::new(vec![bf16::ZERO; len], [len]),
            other => return Err(unsupported("all_gather", other)),
        };
        let input = host_ref("all_gather", &input)?;
        host_buffer("all_gather", &mut output, |out| Communicator::all_gather(self, input, out))?;
        Ok(Tensor::from_data(output, &device))
    }
}

/// Runs `collective` on a host copy of `tensor` and returns the result on
/// the tensor's device.
fn in_place<B: Backend>(
    op: &'static str,
    tensor: Tensor<B, 1>,
    collective: impl FnOnce(BufMut<'_>) -> Result<()>,
) -> Result<Tensor<B, 1>> {
    let device = tensor.device();
    let mut data = tensor.into_data();
    host_buffer(op, &mut data, collective)?;
    Ok(Tensor::from_data(data, &device))
}

/// Runs `collective` on the values of `data` in place.
fn host_buffer(
    op: &'static str,
    data: &mut TensorData,
    collective: impl FnOnce(BufMut<'_>) -> Result<()>,
) -> Result<()> {
    let dtype = data.dtype;
    let buf = match dtype {
        BurnDType::F32 => BufMut::F32(data.as_mut_slice::<f32>().map_err(|_| unsupported(op, dtype))?),
        BurnDType::F16 => BufMut::F16(data.as_mut_slice::<f16>().map_err(|_| unsupported(op, dtype))?),
        BurnDType::BF16 => BufMut::BF16(data.as_mut_slice::<bf16>().map_err(|_| unsupported(op, dtype))?),
        _ => return Err(unsupported(op, dtype)),
    };
    collective(buf)
}

fn host_ref<'a>(op: &'static str, data: &'a TensorData) -> Result<BufRef<'a>> {
    let dtype = data.dtype;
    Ok(match dtype {
        BurnDType::F32 => BufRef::F32(data.as_slice::<f32>().map_err(|_| unsupported(op, dtype))?),
        BurnDType::F16 => BufRef::F16(data.as_slice::<f16>().map_err(|_| unsupported(op, dtype))?),
        BurnDType::BF16 => BufRef::BF16(data.as_slice::<bf16>().map_err(|_| unsupported(op, dtype))?),
        _ => return Err(unsupported(op, dtype)),
    })
}

fn unsupported(op: &'static str, dtype: BurnDType) -> CommError {
    CommError::invalid(op, format!("tensors of {dtype:?} are not supported; use f32, f16 or bf16"))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Int, Tensor};

    use crate::{Communicator, InProcCommunicator, ReduceOp};

    #[test]
    fn unsupported_element_types_are_refused() {
        let mut comm = InProcCommunicator::group(1).unwrap().remove(0);
        let ints = Tensor::<burn::backend::Flex, 1, Int>::arange(0..4, &Default::default());
        let mut data = ints.into_data();
        let err = super::host_buffer("all_reduce", &mut data, |buf| comm.all_reduce(buf, ReduceOp::Sum)).unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
    }
}

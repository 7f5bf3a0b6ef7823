//! Moving tensors between two devices of one backend, on every backend.
//!
//! Burn's `to_device` copies device to device where the backend can: the CPU
//! backends (one device) and CUDA (peer copies). cubecl's other runtimes
//! (wgpu, its CPU runtime, ROCm) go through a server-to-server path that
//! cubecl 0.10 leaves `unimplemented!()`, and the panic happens on a
//! background server thread, not at the call. There the data is read to the
//! host and written to the other device instead: slower, but it works.
//!
//! [`to_device`] moves any tensor (inputs, targets, gradients, buffers)
//! without tracking; [`MoveBackend::move_float`] is the differentiable move
//! DataParallel gathers its outputs with: its backward moves the gradient
//! back the same way.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{BasicOps, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;

/// Whether `B` is one of cubecl's backends (wgpu, CUDA; fused or not): a
/// device that runs queued work apart from the host. Told by the backend's
/// name, the one thing Burn tells about it at run time.
pub fn is_cubecl<B: Backend>(device: &B::Device) -> bool {
    B::name(device).contains("cubecl<")
}

/// Whether `B` copies between two of its devices itself: every backend
/// does except cubecl's runtimes other than CUDA.
pub fn copies_directly<B: Backend>(device: &B::Device) -> bool {
    !is_cubecl::<B>(device) || B::name(device).contains("cuda")
}

/// `tensor` on `device`: Burn's `to_device` where the backend copies
/// directly, through host memory elsewhere. Not tracked by autodiff (the
/// result is a new leaf); see [`MoveBackend::move_float`] for that.
pub fn to_device<B: Backend, const D: usize, K: BasicOps<B>>(
    tensor: Tensor<B, D, K>,
    device: &B::Device,
) -> Tensor<B, D, K> {
    if &tensor.device() == device || copies_directly::<B>(device) {
        tensor.to_device(device)
    } else {
        Tensor::from_data(tensor.into_data(), device)
    }
}

/// The primitive form of [`to_device`] for float tensors.
fn float_to_device<B: Backend>(tensor: FloatTensor<B>, device: &B::Device) -> FloatTensor<B> {
    if &B::float_device(&tensor) == device || copies_directly::<B>(device) {
        B::float_to_device(tensor, device)
    } else {
        let data = burn::tensor::try_read_sync(B::float_into_data(tensor))
            .expect("this platform cannot read tensors synchronously")
            .unwrap_or_else(|e| panic!("reading a tensor to move it to {device:?} failed: {e:?}"));
        B::float_from_data(data, device)
    }
}

/// An autodiff backend that moves tensors between its devices on every
/// inner backend, differentiably: every `Autodiff<B, C>`.
pub trait MoveBackend: AutodiffBackend {
    /// `tensor` on `device`, tracked: in backward its gradient moves back to
    /// the device it came from, the same way (directly or through the host).
    fn move_float(tensor: FloatTensor<Self>, device: &Self::Device) -> FloatTensor<Self>;
}

/// The backward op; its state is the device the tensor came from.
#[derive(Debug)]
struct CrossDevice;

impl<B: Backend> Backward<B, 1> for CrossDevice {
    type State = B::Device;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let source = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| float_to_device::<B>(grad, &source));
    }
}

impl<B: Backend, C: CheckpointStrategy> MoveBackend for Autodiff<B, C> {
    fn move_float(tensor: FloatTensor<Self>, device: &B::Device) -> FloatTensor<Self> {
        let source = B::float_device(&tensor.primitive);
        let moved = float_to_device::<B>(tensor.primitive.clone(), device);
        match CrossDevice.prepare::<C>([tensor.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(source, moved),
            OpsKind::UnTracked(prep) => prep.finish(moved),
        }
    }
}

/// [`MoveBackend::move_float`] on a tensor.
pub fn move_differentiable<B: MoveBackend, const D: usize>(tensor: Tensor<B, D>, device: &B::Device) -> Tensor<B, D> {
    if &tensor.device() == device {
        return tensor;
    }
    Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(B::move_float(
        tensor.into_primitive().tensor(),
        device,
    )))
}

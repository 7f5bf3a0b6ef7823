//! The gradient-ready hook: an identity op whose backward hands the finished
//! gradient of one parameter to a [`GradientSink`].
//!
//! Burn has no per-parameter "gradient ready" callback. Placing this op
//! between each parameter and all its uses gives one: the autodiff graph runs
//! an op's backward only after every consumer has added its contribution, so
//! the hook sees the parameter's whole gradient exactly once, however many
//! times the forward pass used the parameter, and as early as possible.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;

use crate::device_move::MoveBackend;

/// Receives each hooked parameter's gradient once it is final.
pub trait GradientSink<B: Backend>: Send + Sync {
    /// `index` is the parameter's position in module visiting order.
    fn ready(&self, index: usize, grad: B::FloatTensorPrimitive);
}

/// An autodiff backend Bonfire trains on: it can hook parameter gradients,
/// sum batch statistics across ranks and move tensors between its devices
/// ([`MoveBackend`]). Every `Autodiff<B, C>`; the hook and the sum are
/// Bonfire's own business (sealed).
pub trait HookBackend: MoveBackend + sealed::GradientHook + crate::sync_batch_norm::sealed::SumAcrossRanksOp {}

impl<B: Backend, C: CheckpointStrategy> HookBackend for Autodiff<B, C> {}

pub(crate) mod sealed {
    use super::*;

    /// The hook behind [`HookBackend`]; out of reach outside this crate.
    pub trait GradientHook: burn::tensor::backend::AutodiffBackend {
        /// Returns `tensor` unchanged; in backward, its gradient goes to `sink`.
        fn gradient_hook(
            tensor: FloatTensor<Self>,
            sink: Arc<dyn GradientSink<Self::InnerBackend>>,
            index: usize,
        ) -> FloatTensor<Self>;
    }
}

/// The backward op's state: where the gradient goes.
struct Target<B: Backend> {
    sink: Arc<dyn GradientSink<B>>,
    index: usize,
}

impl<B: Backend> Clone for Target<B> {
    fn clone(&self) -> Self {
        Target { sink: self.sink.clone(), index: self.index }
    }
}

impl<B: Backend> std::fmt::Debug for Target<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GradientHook(parameter {})", self.index)
    }
}

#[derive(Debug)]
struct GradientReady;

impl<B: Backend> Backward<B, 1> for GradientReady {
    type State = Target<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        // The gradient goes to the sink alone, not on to the parameter: a
        // second handle on it in `grads` would live until backward ends,
        // and the reducer, which averages gradients where they lie, would
        // have to copy any it averages while backward still runs. Nothing
        // reads the parameter's own gradient: DDP returns the averaged ones.
        let target = ops.state;
        target.sink.ready(target.index, grads.consume::<B>(&ops.node));
    }
}

impl<B: Backend, C: CheckpointStrategy> sealed::GradientHook for Autodiff<B, C> {
    fn gradient_hook(tensor: FloatTensor<Self>, sink: Arc<dyn GradientSink<B>>, index: usize) -> FloatTensor<Self> {
        match GradientReady.prepare::<C>([tensor.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(Target { sink, index }, tensor.primitive.clone()),
            OpsKind::UnTracked(prep) => prep.finish(tensor.primitive.clone()),
        }
    }
}

//! One step API over the three ways to train: one device, [`DataParallel`]
//! and [`DistributedDataParallel`]. A training loop calls
//! [`Strategy::step`] and hands the gradients it returns to its optimizer,
//! whichever strategy runs underneath.

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use crate::error::Result;
use crate::{DataParallel, DistributedDataParallel, HookBackend};

/// How a training step is spread: see the module documentation.
pub enum Strategy<B: HookBackend> {
    /// One device, no communication.
    Single,
    /// One process, the batch split over several devices.
    Dp(DataParallel<B>),
    /// This worker is one rank of a DDP group.
    Ddp(Box<DistributedDataParallel<B>>),
}

impl<B: HookBackend> Strategy<B> {
    /// One training step: `forward` maps the model and an input to outputs,
    /// `loss` the outputs and `targets` to a scalar. `input` is this worker's
    /// share of the global batch under DDP, the whole batch otherwise (DP
    /// splits it and gathers the outputs on the first device before `loss`).
    /// Returns the loss and the gradients for the optimizer: averaged over
    /// the ranks under DDP, summed from the replicas under DP.
    pub fn step<M, T, const DI: usize, const DO: usize>(
        &mut self,
        model: &M,
        input: Tensor<B, DI>,
        targets: T,
        forward: impl Fn(&M, Tensor<B, DI>) -> Tensor<B, DO> + Sync,
        loss: impl FnOnce(Tensor<B, DO>, T) -> Tensor<B, 1>,
    ) -> Result<(Tensor<B, 1>, GradientsParams)>
    where
        M: AutodiffModule<B> + 'static,
    {
        match self {
            Strategy::Single => {
                let loss = loss(forward(model, input), targets);
                let grads = GradientsParams::from_grads(loss.backward(), model);
                Ok((loss, grads))
            }
            Strategy::Dp(dp) => {
                let (output, replicas) = dp.forward(model, input, forward)?;
                let loss = loss(output, targets);
                let grads = dp.backward(loss.clone(), model, replicas)?;
                Ok((loss, grads))
            }
            Strategy::Ddp(ddp) => {
                let loss = loss(forward(&ddp.forward_module(model), input), targets);
                let grads = ddp.backward(loss.clone())?;
                Ok((loss, grads))
            }
        }
    }

    /// Under DDP with uneven inputs, [`DistributedDataParallel::join`]:
    /// once this worker has run out of batches, it takes part in the steps
    /// the others still take, and all go on with the same model. Otherwise
    /// `model` as it is.
    pub fn join<M: AutodiffModule<B>>(&mut self, model: M) -> Result<M> {
        match self {
            Strategy::Ddp(ddp) if ddp.uneven_inputs() => ddp.join(model),
            _ => Ok(model),
        }
    }

    /// This worker's rank: 0 but under DDP.
    pub fn rank(&self) -> usize {
        match self {
            Strategy::Ddp(ddp) => ddp.rank(),
            _ => 0,
        }
    }

    /// Workers that each take a share of the global batch: 1 but under DDP.
    pub fn world_size(&self) -> usize {
        match self {
            Strategy::Ddp(ddp) => ddp.world_size(),
            _ => 1,
        }
    }
}

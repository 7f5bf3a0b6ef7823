//! `BatchNorm`: Burn's module, through [`crate::ops::batch_norm_train`],
//! keeping the running statistics as PyTorch does; synchronised across a
//! data-parallel group's ranks where one is installed ([`super::sync`]).

use burn::module::{Module, Param, RunningState};
use burn::nn::{BatchNorm as BurnBatchNorm, BatchNormConfig as BurnBatchNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::sync::{installed, SumAcrossRanks};
use crate::ops::{batch_norm_inference, batch_norm_train};

/// Burn's `BatchNormConfig`, whose `init` makes this crate's [`BatchNorm`].
#[derive(Debug, Clone)]
pub struct BatchNormConfig(BurnBatchNormConfig);

impl BatchNormConfig {
    /// Batch norm over `num_features` channels, with Burn's defaults (epsilon 1e-5, momentum 0.1).
    pub fn new(num_features: usize) -> Self {
        BatchNormConfig(BurnBatchNormConfig::new(num_features))
    }

    /// Sets the epsilon added to the variance.
    pub fn with_epsilon(self, epsilon: f64) -> Self {
        BatchNormConfig(self.0.with_epsilon(epsilon))
    }

    /// Sets how far the running statistics move towards each batch's.
    pub fn with_momentum(self, momentum: f64) -> Self {
        BatchNormConfig(self.0.with_momentum(momentum))
    }

    /// The module, on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> BatchNorm<B> {
        self.0.init(device).into()
    }
}

/// Batch norm over `[batch, channels, ...]` with the fields of Burn's
/// `BatchNorm` (`gamma` and `beta` are PyTorch's `weight` and `bias`).
///
/// Where a data-parallel strategy installed a group on the thread
/// ([`sync_batch_statistics`](super::sync_batch_statistics)), training
/// normalises with the statistics of the whole batch across the group's
/// ranks, as PyTorch's `SyncBatchNorm` does.
///
/// In training (an autodiff backend) it normalises with the batch's
/// statistics and moves the running ones towards them by `momentum`,
/// PyTorch's convention: the running variance takes the unbiased batch
/// variance (times n / (n - 1), n values per channel), where Burn's own
/// `BatchNorm` takes the biased one. Following PyTorch keeps a model's
/// evaluation outputs the same after its weights move between the two.
#[derive(Module, Debug)]
pub struct BatchNorm<B: Backend> {
    /// The scale.
    pub gamma: Param<Tensor<B, 1>>,
    /// The shift.
    pub beta: Param<Tensor<B, 1>>,
    /// The running mean, used in evaluation.
    pub running_mean: RunningState<Tensor<B, 1>>,
    /// The running (unbiased) variance, used in evaluation.
    pub running_var: RunningState<Tensor<B, 1>>,
    /// How far the running statistics move towards each batch's.
    pub momentum: f64,
    /// Added to the variance.
    pub epsilon: f64,
}

impl<B: Backend> From<BurnBatchNorm<B>> for BatchNorm<B> {
    fn from(b: BurnBatchNorm<B>) -> Self {
        BatchNorm {
            gamma: b.gamma,
            beta: b.beta,
            running_mean: b.running_mean,
            running_var: b.running_var,
            momentum: b.momentum,
            epsilon: b.epsilon,
        }
    }
}

impl<B: Backend> BatchNorm<B> {
    /// Normalises `x` `[batch, channels, ...]`: with the batch's statistics (updating the running ones) when autodiff is on, with the running ones otherwise.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        assert!(D >= 2, "batch norm needs [batch, channels, ...], not a {D}-D tensor");
        if B::ad_enabled(&x.device()) {
            self.forward_train(x)
        } else {
            self.forward_inference(x)
        }
    }

    fn forward_train<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if let Some(group) = installed::<B>() {
            return self.forward_synced(x, group.as_ref());
        }
        let dims = x.dims();
        let count = dims[0] * dims[2..].iter().product::<usize>();
        let (y, mean, var) = batch_norm_train(x, self.gamma.val(), self.beta.val(), self.epsilon);
        let unbiased = var.mul_scalar(count as f64 / count.saturating_sub(1).max(1) as f64);
        self.update_running(mean, unbiased);
        y
    }

    /// Training with the statistics of every rank's batch: each channel's
    /// count, sum and sum of squares summed across the ranks in one call
    /// (uneven batches weigh by their counts), then the normalisation as
    /// tensor operations, whose backward reaches the sum's own.
    fn forward_synced<const D: usize>(&self, x: Tensor<B, D>, group: &dyn SumAcrossRanks<B>) -> Tensor<B, D> {
        let dims = x.dims();
        let (channels, count) = (dims[1], dims[0] * dims[2..].iter().product::<usize>());
        let per_channel = |t: Tensor<B, D>| t.swap_dims(0, 1).reshape([channels, count]).sum_dim(1).reshape([channels]);
        let counted = Tensor::<B, 1>::from_floats([count as f32], &x.device());
        let local = Tensor::cat(vec![per_channel(x.clone()), per_channel(x.clone().powi_scalar(2)), counted], 0);
        let total = group.sum(local);
        let n = total.clone().slice(2 * channels..2 * channels + 1);
        let mean = total.clone().slice(0..channels).div(n.clone());
        // E[x²] - E[x]², clamped: rounding can take it a hair below 0.
        let var = total.slice(channels..2 * channels).div(n.clone()).sub(mean.clone().powi_scalar(2)).clamp_min(0.0);
        let channel_axis = |t: Tensor<B, 1>| {
            let mut shape = [1; D];
            shape[1] = channels;
            t.reshape(shape)
        };
        let scale = self.gamma.val().div(var.clone().add_scalar(self.epsilon).sqrt());
        let y = x.sub(channel_axis(mean.clone())).mul(channel_axis(scale)).add(channel_axis(self.beta.val()));
        let n = n.detach();
        let unbiased = var.detach().mul(n.clone().div(n.sub_scalar(1.0).clamp_min(1.0)));
        self.update_running(mean.detach(), unbiased);
        y
    }

    /// Moves the running statistics towards a batch's by `momentum`.
    fn update_running(&self, mean: Tensor<B, 1>, unbiased_var: Tensor<B, 1>) {
        let m = self.momentum;
        let update = |state: &RunningState<Tensor<B, 1>>, batch: Tensor<B, 1>| {
            let running = state.value_sync().to_device(&batch.device());
            state.update(running.mul_scalar(1.0 - m).add(batch.mul_scalar(m)).detach());
        };
        update(&self.running_mean, mean);
        update(&self.running_var, unbiased_var);
    }

    fn forward_inference<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let device = x.device();
        let (mean, var) = (self.running_mean.value().to_device(&device), self.running_var.value().to_device(&device));
        batch_norm_inference(x, mean, var, self.gamma.val(), self.beta.val(), self.epsilon)
    }
}

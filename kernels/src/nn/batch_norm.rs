//! `BatchNorm`: Burn's module, through [`crate::ops::batch_norm_train`],
//! keeping the running statistics as PyTorch does; synchronised across a
//! data-parallel group's ranks where one is installed ([`super::sync`]).

use burn::module::{Module, Param, RunningState};
use burn::nn::{BatchNorm as BurnBatchNorm, BatchNormConfig as BurnBatchNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::sync::installed;
use crate::ops::{batch_norm_inference, batch_norm_train, batch_norm_train_across};

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
            let (y, mean, unbiased) =
                batch_norm_train_across(x, self.gamma.val(), self.beta.val(), self.epsilon, &group);
            self.update_running(mean, unbiased);
            return y;
        }
        let dims = x.dims();
        let count = dims[0] * dims[2..].iter().product::<usize>();
        let (y, mean, var) = batch_norm_train(x, self.gamma.val(), self.beta.val(), self.epsilon);
        let unbiased = var.mul_scalar(count as f64 / count.saturating_sub(1).max(1) as f64);
        self.update_running(mean, unbiased);
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

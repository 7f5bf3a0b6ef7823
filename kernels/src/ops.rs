//! Backend-generic operations: Bonfire's kernels where the backend has them
//! (Flex, with or without autodiff, on f32 tensors and the shapes each
//! kernel covers), Burn's own operation everywhere else, so that a model
//! written with them runs on every backend.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::module::{conv2d as burn_conv2d, max_pool2d as burn_max_pool2d};
use burn::tensor::ops::PaddedConvOptions;
use burn::tensor::Tensor;

use crate::cpu::conv2d::Conv2dShape;
use crate::cpu::max_pool2d::Pool2dShape;
use crate::flex::{dispatch, has_kernels, is_f32, NormOutput, SumAcross};
use crate::nn::SumAcrossRanks;

/// Where a 2-D convolution or pooling window moves and what it adds around
/// the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window2d {
    /// `[rows, columns]` between windows.
    pub stride: [usize; 2],
    /// `[top, left]`.
    pub padding: [usize; 2],
    /// `[bottom, right]`.
    pub padding_end: [usize; 2],
    /// `[rows, columns]` between the window's taps.
    pub dilation: [usize; 2],
}

/// `conv2d(x, weight) + bias` for `x` `[batch, in, h, w]` and `weight`
/// `[out, in / groups, kh, kw]`. The kernel covers `groups = 1`.
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    window: Window2d,
    groups: usize,
) -> Tensor<B, 4> {
    let Window2d { stride, padding, padding_end, dilation } = window;
    let shape = (groups == 1 && has_kernels::<B>() && is_f32(&x) && is_f32(&weight))
        .then(|| Conv2dShape::new(x.dims(), weight.dims(), stride, padding, padding_end, dilation))
        .flatten();
    match shape {
        Some(shape) => dispatch!(B, conv2d(x, weight, bias, shape)),
        None => {
            burn_conv2d(x, weight, bias, PaddedConvOptions::asymmetric(stride, padding, padding_end, dilation, groups))
        }
    }
}

/// Max pooling of `x` `[batch, channels, h, w]` with the same padding on
/// both sides of each axis (`window.padding_end` is ignored). The kernel
/// covers floor mode with padding up to half the window, as PyTorch allows.
pub fn max_pool2d<B: Backend>(x: Tensor<B, 4>, kernel: [usize; 2], window: Window2d, ceil_mode: bool) -> Tensor<B, 4> {
    let Window2d { stride, padding, dilation, .. } = window;
    let shape = (!ceil_mode && has_kernels::<B>() && is_f32(&x))
        .then(|| Pool2dShape::new(x.dims(), kernel, stride, padding, dilation))
        .flatten();
    match shape {
        Some(shape) => dispatch!(B, max_pool2d(x, shape)),
        None => burn_max_pool2d(x, kernel, stride, padding, dilation, ceil_mode),
    }
}

/// Batch norm of `x` `[batch, channels, ...]` with the batch's own
/// statistics: the output, and the batch mean and biased variance of every
/// channel (outside the autodiff graph, for the running statistics).
pub fn batch_norm_train<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> (Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>) {
    let dims = x.dims();
    let (batch, channels) = (dims[0], dims[1]);
    let positions = dims[2..].iter().product::<usize>();
    let x = x.reshape([batch, channels, positions]);
    let (y, mean, var) = if has_kernels::<B>() && is_f32(&x) && is_f32(&gamma) && is_f32(&beta) {
        let out: (NormOutput<B>, f64) = dispatch!(B, batch_norm_train(x, gamma, beta, epsilon, None::<SumAcross>));
        out.0
    } else {
        batch_norm_train_reference(x, gamma, beta, epsilon)
    };
    (y.reshape(dims), mean, var)
}

/// [`batch_norm_train`] with the statistics of every rank's batch, summed
/// by `group` (PyTorch's `SyncBatchNorm`): the output, and the mean and the
/// unbiased variance over all ranks (outside the autodiff graph). Every
/// rank's count and each channel's mean and sum of squared deviations take
/// one call to the group in forward (each rank's in its own slot), and the
/// sums of the gradient another in backward.
pub fn batch_norm_train_across<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
    group: &Arc<dyn SumAcrossRanks<B>>,
) -> (Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>) {
    let dims = x.dims();
    if !(has_kernels::<B>() && is_f32(&x) && is_f32(&gamma) && is_f32(&beta)) {
        return batch_norm_train_across_reference(x, gamma, beta, epsilon, group.as_ref());
    }
    let (batch, channels) = (dims[0], dims[1]);
    let x = x.reshape([batch, channels, dims[2..].iter().product::<usize>()]);
    let sum = SumAcross {
        rank: group.rank(),
        ranks: group.ranks(),
        sum: {
            let group = group.clone();
            Arc::new(move |values: &mut [f32]| group.sum_host(values))
        },
    };
    let ((y, mean, var), count): (NormOutput<B>, f64) =
        dispatch!(B, batch_norm_train(x, gamma, beta, epsilon, Some(sum)));
    let unbiased = var.mul_scalar(count / (count - 1.0).max(1.0));
    (y.reshape(dims), mean, unbiased)
}

/// [`batch_norm_train_across`] in Burn's tensor operations, for every
/// backend, with the kernel's statistics: each rank's count, means and sums
/// of squared deviations in its own slot of the group's differentiable sum
/// (whose backward sums their gradients across the ranks), combined as
/// Chan et al.'s parallel variance.
fn batch_norm_train_across_reference<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
    group: &dyn SumAcrossRanks<B>,
) -> (Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>) {
    let (dims, device) = (x.dims(), x.device());
    let (channels, count) = (dims[1], dims[0] * dims[2..].iter().product::<usize>());
    let (rank, ranks, width) = (group.rank(), group.ranks(), 2 * channels + 1);
    let channel_axis = |t: Tensor<B, 1>| {
        let mut shape = [1; D];
        shape[1] = channels;
        t.reshape(shape)
    };
    let per_channel = |t: Tensor<B, D>| t.swap_dims(0, 1).reshape([channels, count]).sum_dim(1).reshape([channels]);
    let own_mean = per_channel(x.clone()).div_scalar(count as f64);
    let own_squares = per_channel((x.clone() - channel_axis(own_mean.clone())).powi_scalar(2));
    let zeros = |n: usize| Tensor::<B, 1>::zeros([n], &device);
    let mut slots = Vec::new();
    if rank > 0 {
        slots.push(zeros(rank * width));
    }
    slots.extend([own_mean, own_squares, Tensor::from_floats([count as f32], &device)]);
    if rank + 1 < ranks {
        slots.push(zeros((ranks - rank - 1) * width));
    }
    let all = group.sum(Tensor::cat(slots, 0)).reshape([ranks, width]);
    let counts = all.clone().slice([0..ranks, 2 * channels..width]);
    let means = all.clone().slice([0..ranks, 0..channels]);
    let squares = all.slice([0..ranks, channels..2 * channels]);
    let n = counts.clone().sum().detach();
    let mean = (means.clone() * counts.clone()).sum_dim(0).reshape([channels]).div(n.clone());
    let spread = (means - mean.clone().reshape([1, channels])).powi_scalar(2) * counts;
    // Clamped: rounding can take it a hair below 0.
    let var = (squares + spread).sum_dim(0).reshape([channels]).div(n.clone()).clamp_min(0.0);
    let scale = gamma.div(var.clone().add_scalar(epsilon).sqrt());
    let y = x.sub(channel_axis(mean.clone())).mul(channel_axis(scale)).add(channel_axis(beta));
    let unbiased = var.detach().mul(n.clone().div(n.sub_scalar(1.0).clamp_min(1.0)));
    (y, mean.detach(), unbiased)
}

/// Batch norm of `x` `[batch, channels, ...]` with given statistics
/// (inference).
pub fn batch_norm_inference<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    mean: Tensor<B, 1>,
    var: Tensor<B, 1>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, D> {
    let dims = x.dims();
    let (batch, channels) = (dims[0], dims[1]);
    let positions = dims[2..].iter().product::<usize>();
    let x = x.reshape([batch, channels, positions]);
    let all_f32 = [&mean, &var, &gamma, &beta].iter().all(|t| is_f32(*t));
    let y = if has_kernels::<B>() && is_f32(&x) && all_f32 {
        dispatch!(B, batch_norm_inference(x, mean, var, gamma, beta, epsilon))
    } else {
        batch_norm_inference_reference(x, mean, var, gamma, beta, epsilon)
    };
    y.reshape(dims)
}

pub(crate) fn batch_norm_inference_reference<B: Backend>(
    x: Tensor<B, 3>,
    mean: Tensor<B, 1>,
    var: Tensor<B, 1>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, 3> {
    let channels = x.dims()[1];
    let scale = var.add_scalar(epsilon).sqrt().recip() * gamma;
    let shift = beta - mean * scale.clone();
    x * scale.reshape([1, channels, 1]) + shift.reshape([1, channels, 1])
}

/// Batch norm with Burn's tensor operations, as Burn's `BatchNorm` does it.
fn batch_norm_train_reference<B: Backend>(
    x: Tensor<B, 3>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> (Tensor<B, 3>, Tensor<B, 1>, Tensor<B, 1>) {
    let [batch, channels, positions] = x.dims();
    let per_channel =
        |t: Tensor<B, 3>| t.swap_dims(0, 1).reshape([channels, batch * positions]).mean_dim(1).reshape([channels]);
    let mean = per_channel(x.clone());
    let centred = x - mean.clone().reshape([1, channels, 1]);
    let var = per_channel(centred.clone().square());
    let scale = var.clone().add_scalar(epsilon).sqrt().recip() * gamma;
    let y = centred * scale.reshape([1, channels, 1]) + beta.reshape([1, channels, 1]);
    (y, mean.detach(), var.detach())
}

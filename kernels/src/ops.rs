//! Backend-generic operations: Bonfire's kernels where the backend has them
//! (Flex, with or without autodiff, on f32 tensors and the shapes each
//! kernel covers), Burn's own operation everywhere else, so that a model
//! written with them runs on every backend.

use burn::tensor::backend::Backend;
use burn::tensor::module::{conv2d as burn_conv2d, max_pool2d as burn_max_pool2d};
use burn::tensor::ops::PaddedConvOptions;
use burn::tensor::Tensor;

use crate::cpu::conv2d::Conv2dShape;
use crate::cpu::max_pool2d::Pool2dShape;
use crate::flex::{dispatch, has_kernels, is_f32};

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
        dispatch!(B, batch_norm_train(x, gamma, beta, epsilon))
    } else {
        batch_norm_train_reference(x, gamma, beta, epsilon)
    };
    (y.reshape(dims), mean, var)
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

//! The kernels as operations on Burn's Flex backend, and on `Autodiff<Flex>`
//! as nodes of its graph with their own backward pass (the way Burn's
//! custom-kernel example adds an op), so that gradient hooks, `no_sync` and
//! checkpointing see one node per operation, as with Burn's own ops.
//!
//! [`Kernels`] is implemented for exactly the backends that have the
//! kernels; [`flex_backend`] finds out at run time whether a generic `B` is
//! one of them (by `TypeId`: the models stay generic over any backend), and
//! [`dispatch`] calls its kernel.

mod batch_norm;
mod conv2d;
mod max_pool2d;

use std::any::{Any, TypeId};

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};
use burn_autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};

use crate::cpu::conv2d::Conv2dShape;
use crate::cpu::max_pool2d::Pool2dShape;

/// Batch norm's training output: the normalised tensor, and the batch mean
/// and biased variance of every channel.
pub(crate) type NormOutput<B> = (Tensor<B, 3>, Tensor<B, 1>, Tensor<B, 1>);

/// A data-parallel group as batch norm across its ranks sees it: this
/// rank's place, and the sum that adds every rank's values to this rank's,
/// in place.
#[derive(Clone)]
pub(crate) struct SumAcross {
    pub rank: usize,
    pub ranks: usize,
    pub sum: std::sync::Arc<dyn Fn(&mut [f32]) + Send + Sync>,
}

/// The operations Bonfire's kernels provide, on a backend that has them.
pub(crate) trait Kernels: Backend {
    fn conv2d(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        bias: Option<Tensor<Self, 1>>,
        shape: Conv2dShape,
    ) -> Tensor<Self, 4>;

    fn max_pool2d(x: Tensor<Self, 4>, shape: Pool2dShape) -> Tensor<Self, 4>;

    /// Batch norm of `[batch, channels, positions]` with the batch's
    /// statistics, or with those of every rank's batch where `across` sums
    /// them: the output, the mean and biased variance (outside the autodiff
    /// graph), and the count of values a channel they cover.
    fn batch_norm_train(
        x: Tensor<Self, 3>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
        across: Option<SumAcross>,
    ) -> (NormOutput<Self>, f64);

    /// Batch norm of `[batch, channels, positions]` with given statistics.
    fn batch_norm_inference(
        x: Tensor<Self, 3>,
        mean: Tensor<Self, 1>,
        var: Tensor<Self, 1>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
    ) -> Tensor<Self, 3>;
}

/// The backends with [`Kernels`]: Flex, and Flex under autodiff with each
/// of Burn's checkpoint strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlexBackend {
    Plain,
    Autodiff,
    AutodiffBalanced,
}

/// Which of them `B` is, if any.
pub(crate) fn flex_backend<B: Backend>() -> Option<FlexBackend> {
    let b = TypeId::of::<B>();
    [
        (TypeId::of::<Flex>(), FlexBackend::Plain),
        (TypeId::of::<Autodiff<Flex, NoCheckpointing>>(), FlexBackend::Autodiff),
        (TypeId::of::<Autodiff<Flex, BalancedCheckpointing>>(), FlexBackend::AutodiffBalanced),
    ]
    .into_iter()
    .find_map(|(id, kind)| (id == b).then_some(kind))
}

/// Whether `B` is a backend with [`Kernels`], and they are not turned off
/// (`BONFIRE_KERNELS=off` gives Burn's operations everywhere, to compare).
pub(crate) fn has_kernels<B: Backend>() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("BONFIRE_KERNELS").is_ok_and(|v| v == "off"));
    !off && flex_backend::<B>().is_some()
}

/// `value`, moved into the type `U` it is (`T` and `U` are one type).
pub(crate) fn same<T: 'static, U: 'static>(value: T) -> U {
    let boxed: Box<dyn Any> = Box::new(value);
    *boxed.downcast::<U>().unwrap_or_else(|_| unreachable!("`same` between two different types"))
}

/// Runs `$op` of [`Kernels`] on the backend `$b` is, with every argument
/// moved to that backend's types and the result moved back. Call it only
/// where [`has_kernels`] holds.
macro_rules! dispatch {
    ($b:ty, $op:ident($($arg:expr),* $(,)?)) => {{
        use burn::backend::{flex::Flex, Autodiff};
        use burn_autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
        use $crate::flex::{flex_backend, same, FlexBackend, Kernels};
        match flex_backend::<$b>() {
            Some(FlexBackend::Plain) => same(<Flex as Kernels>::$op($(same($arg)),*)),
            Some(FlexBackend::Autodiff) => same(<Autodiff<Flex, NoCheckpointing> as Kernels>::$op($(same($arg)),*)),
            Some(FlexBackend::AutodiffBalanced) => {
                same(<Autodiff<Flex, BalancedCheckpointing> as Kernels>::$op($(same($arg)),*))
            }
            None => unreachable!("dispatch! on a backend without kernels"),
        }
    }};
}
pub(crate) use dispatch;

/// Whether `t` holds f32 values, the kernels' one type.
pub(crate) fn is_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    t.dtype() == DType::F32
}

/// `t` with its values in one contiguous run.
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The values of a contiguous f32 tensor.
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

impl Kernels for Flex {
    fn conv2d(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        bias: Option<Tensor<Self, 1>>,
        shape: Conv2dShape,
    ) -> Tensor<Self, 4> {
        conv2d::forward(x, weight, bias, shape)
    }

    fn max_pool2d(x: Tensor<Self, 4>, shape: Pool2dShape) -> Tensor<Self, 4> {
        max_pool2d::forward(x, shape)
    }

    fn batch_norm_train(
        x: Tensor<Self, 3>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
        across: Option<SumAcross>,
    ) -> (NormOutput<Self>, f64) {
        batch_norm::forward_train(x, gamma, beta, epsilon, across)
    }

    fn batch_norm_inference(
        x: Tensor<Self, 3>,
        mean: Tensor<Self, 1>,
        var: Tensor<Self, 1>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
    ) -> Tensor<Self, 3> {
        batch_norm::forward_inference(x, mean, var, gamma, beta, epsilon)
    }
}

impl<C: CheckpointStrategy> Kernels for Autodiff<Flex, C> {
    fn conv2d(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        bias: Option<Tensor<Self, 1>>,
        shape: Conv2dShape,
    ) -> Tensor<Self, 4> {
        conv2d::forward_autodiff::<C>(x, weight, bias, shape)
    }

    fn max_pool2d(x: Tensor<Self, 4>, shape: Pool2dShape) -> Tensor<Self, 4> {
        max_pool2d::forward_autodiff::<C>(x, shape)
    }

    fn batch_norm_train(
        x: Tensor<Self, 3>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
        across: Option<SumAcross>,
    ) -> (NormOutput<Self>, f64) {
        batch_norm::forward_train_autodiff::<C>(x, gamma, beta, epsilon, across)
    }

    /// Inference on an autodiff backend keeps Burn's operations, so that
    /// gradients still flow (batch norm infers only on inner backends).
    fn batch_norm_inference(
        x: Tensor<Self, 3>,
        mean: Tensor<Self, 1>,
        var: Tensor<Self, 1>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        epsilon: f64,
    ) -> Tensor<Self, 3> {
        crate::ops::batch_norm_inference_reference(x, mean, var, gamma, beta, epsilon)
    }
}

fn flex(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.into()))
}

fn primitive<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    contiguous(t.into_primitive().tensor())
}

fn tensor<const D: usize>(t: FlexTensor) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The autodiff tensor behind `t` (its Flex value and its graph node).
fn node<C: CheckpointStrategy, const D: usize>(t: Tensor<Autodiff<Flex, C>, D>) -> FloatTensor<Autodiff<Flex, C>> {
    t.into_primitive().tensor()
}

fn tracked<C: CheckpointStrategy, const D: usize>(t: FloatTensor<Autodiff<Flex, C>>) -> Tensor<Autodiff<Flex, C>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

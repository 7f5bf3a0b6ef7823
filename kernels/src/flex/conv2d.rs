//! Convolution on Flex, and its autodiff node.

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::Autodiff;
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};

use super::{flex, node, primitive, tensor, tracked, values};
use crate::cpu::conv2d::{self as kernel, Conv2dShape};

fn out_shape(s: &Conv2dShape) -> [usize; 4] {
    [s.batch, s.out_channels, s.out_height, s.out_width]
}

fn run(x: &FlexTensor, weight: &FlexTensor, bias: Option<&FlexTensor>, s: &Conv2dShape) -> FlexTensor {
    flex(kernel::forward(s, values(x), values(weight), bias.map(values)), out_shape(s))
}

pub fn forward(
    x: Tensor<Flex, 4>,
    weight: Tensor<Flex, 4>,
    bias: Option<Tensor<Flex, 1>>,
    s: Conv2dShape,
) -> Tensor<Flex, 4> {
    tensor(run(&primitive(x), &primitive(weight), bias.map(primitive).as_ref(), &s))
}

/// What backward needs: the input and the weight (shared with the forward
/// pass, not copied).
#[derive(Debug, Clone)]
struct Saved {
    x: FlexTensor,
    weight: FlexTensor,
    shape: Conv2dShape,
}

#[derive(Debug)]
struct Conv2dBackward;

#[derive(Debug)]
struct Conv2dNoBiasBackward;

/// The gradients of the input and the bias (when asked for) and the weight.
fn gradients(
    saved: Saved,
    dy: FlexTensor,
    need_x: bool,
    need_bias: bool,
) -> (Option<FlexTensor>, FlexTensor, Option<FlexTensor>) {
    let s = saved.shape;
    let dy = super::contiguous(dy);
    let g = kernel::backward(&s, values(&saved.x), values(&saved.weight), values(&dy), need_x, need_bias);
    (
        g.x.map(|dx| flex(dx, [s.batch, s.in_channels, s.height, s.width])),
        flex(g.weight, [s.out_channels, s.in_channels, s.kernel[0], s.kernel[1]]),
        g.bias.map(|db| flex(db, [s.out_channels])),
    )
}

impl Backward<Flex, 3> for Conv2dBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x, weight, bias] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (dx, dw, db) = gradients(ops.state, dy, x.is_some(), bias.is_some());
        if let (Some(node), Some(dx)) = (x, dx) {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = weight {
            grads.register::<Flex>(node.id, dw);
        }
        if let (Some(node), Some(db)) = (bias, db) {
            grads.register::<Flex>(node.id, db);
        }
    }
}

impl Backward<Flex, 2> for Conv2dNoBiasBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x, weight] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (dx, dw, _) = gradients(ops.state, dy, x.is_some(), false);
        if let (Some(node), Some(dx)) = (x, dx) {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = weight {
            grads.register::<Flex>(node.id, dw);
        }
    }
}

pub fn forward_autodiff<C: CheckpointStrategy>(
    x: Tensor<Autodiff<Flex, C>, 4>,
    weight: Tensor<Autodiff<Flex, C>, 4>,
    bias: Option<Tensor<Autodiff<Flex, C>, 1>>,
    s: Conv2dShape,
) -> Tensor<Autodiff<Flex, C>, 4> {
    let (x, weight, bias) = (node(x), node(weight), bias.map(node));
    let (xv, wv) = (super::contiguous(x.primitive.clone()), super::contiguous(weight.primitive.clone()));
    let bv = bias.as_ref().map(|b| super::contiguous(b.primitive.clone()));
    let y = run(&xv, &wv, bv.as_ref(), &s);
    let saved = Saved { x: xv, weight: wv, shape: s };
    tracked(match bias {
        Some(bias) => match Conv2dBackward.prepare::<C>([x.node, weight.node, bias.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(saved, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
        None => match Conv2dNoBiasBackward.prepare::<C>([x.node, weight.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(saved, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    })
}

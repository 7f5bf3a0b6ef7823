//! Max pooling on Flex, and its autodiff node.

use std::sync::Arc;

use burn::backend::flex::Flex;
use burn::backend::Autodiff;
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{unary, Backward, Ops, OpsKind};

use super::{contiguous, flex, node, primitive, tensor, tracked, values};
use crate::cpu::max_pool2d::{self as kernel, Pool2dShape};

fn out_shape(s: &Pool2dShape, x: [usize; 4]) -> [usize; 4] {
    [x[0], x[1], s.out_height, s.out_width]
}

pub fn forward(x: Tensor<Flex, 4>, s: Pool2dShape) -> Tensor<Flex, 4> {
    let dims = x.dims();
    let (y, _) = kernel::forward(&s, values(&primitive(x)));
    tensor(flex(y, out_shape(&s, dims)))
}

/// What backward needs: where each output's maximum was.
#[derive(Debug, Clone)]
struct Saved {
    argmax: Arc<Vec<u32>>,
    input: [usize; 4],
    shape: Pool2dShape,
}

#[derive(Debug)]
struct MaxPool2dBackward;

impl Backward<Flex, 1> for MaxPool2dBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let saved = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
            let dy = contiguous(dy);
            flex(kernel::backward(&saved.shape, &saved.argmax, values(&dy)), saved.input)
        });
    }
}

pub fn forward_autodiff<C: CheckpointStrategy>(
    x: Tensor<Autodiff<Flex, C>, 4>,
    s: Pool2dShape,
) -> Tensor<Autodiff<Flex, C>, 4> {
    let dims = x.dims();
    let x = node(x);
    let (y, argmax) = kernel::forward(&s, values(&contiguous(x.primitive.clone())));
    let y = flex(y, out_shape(&s, dims));
    tracked(match MaxPool2dBackward.prepare::<C>([x.node]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(Saved { argmax: Arc::new(argmax), input: dims, shape: s }, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    })
}

//! Batch norm in training mode on Flex, and its autodiff node.

use std::sync::Arc;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::Autodiff;
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};

use super::{contiguous, flex, node, primitive, tensor, tracked, values, NormOutput, SumAcross};
use crate::cpu::batch_norm::{self as kernel, NormForward, NormShape};

fn shape_of(dims: [usize; 3]) -> NormShape {
    NormShape { batch: dims[0], channels: dims[1], positions: dims[2] }
}

/// The forward kernel, with this rank's statistics or every rank's; also
/// the count of values a channel the statistics cover.
fn run(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    s: &NormShape,
    epsilon: f64,
    across: Option<&SumAcross>,
) -> (NormForward, f64) {
    let (x, gamma, beta) = (values(x), values(gamma), values(beta));
    match across {
        Some(group) => {
            kernel::forward_train_across(s, x, gamma, beta, epsilon, group.rank, group.ranks, group.sum.as_ref())
        }
        None => (kernel::forward_train(s, x, gamma, beta, epsilon), (s.batch * s.positions) as f64),
    }
}

pub fn forward_train(
    x: Tensor<Flex, 3>,
    gamma: Tensor<Flex, 1>,
    beta: Tensor<Flex, 1>,
    epsilon: f64,
    across: Option<SumAcross>,
) -> (NormOutput<Flex>, f64) {
    let dims = x.dims();
    let s = shape_of(dims);
    let (out, count) = run(&primitive(x), &primitive(gamma), &primitive(beta), &s, epsilon, across.as_ref());
    let output = (tensor(flex(out.y, dims)), tensor(flex(out.mean, [s.channels])), tensor(flex(out.var, [s.channels])));
    (output, count)
}

pub fn forward_inference(
    x: Tensor<Flex, 3>,
    mean: Tensor<Flex, 1>,
    var: Tensor<Flex, 1>,
    gamma: Tensor<Flex, 1>,
    beta: Tensor<Flex, 1>,
    epsilon: f64,
) -> Tensor<Flex, 3> {
    let dims = x.dims();
    let [x, mean, var, gamma, beta] =
        [primitive(x), primitive(mean), primitive(var), primitive(gamma), primitive(beta)];
    let y = kernel::forward_inference(
        &shape_of(dims),
        values(&x),
        values(&mean),
        values(&var),
        values(&gamma),
        values(&beta),
        epsilon,
    );
    tensor(flex(y, dims))
}

/// What backward needs: the input (shared, not copied), the batch
/// statistics and the scale; for statistics across ranks, the sum and the
/// count over all ranks.
#[derive(Debug, Clone)]
struct Saved {
    x: FlexTensor,
    mean: Arc<Vec<f32>>,
    invstd: Arc<Vec<f32>>,
    gamma: FlexTensor,
    shape: NormShape,
    across: Option<Across>,
}

#[derive(Clone)]
struct Across {
    sum: SumAcross,
    count: f64,
}

impl std::fmt::Debug for Across {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Across {{ count: {} }}", self.count)
    }
}

#[derive(Debug)]
struct BatchNormBackward;

impl Backward<Flex, 3> for BatchNormBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x, gamma, beta] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let saved = ops.state;
        let s = saved.shape;
        let (xv, dyv, gv) = (values(&saved.x), values(&dy), values(&saved.gamma));
        // Across ranks the sums are a collective: every rank makes the call,
        // whether or not it needs the input's gradient.
        let g = match &saved.across {
            Some(a) => {
                kernel::backward_across(&s, xv, dyv, &saved.mean, &saved.invstd, gv, a.count, a.sum.sum.as_ref())
            }
            None => kernel::backward(&s, xv, dyv, &saved.mean, &saved.invstd, gv, x.is_some()),
        };
        if let (Some(node), Some(dx)) = (x, g.x) {
            grads.register::<Flex>(node.id, flex(dx, [s.batch, s.channels, s.positions]));
        }
        if let Some(node) = gamma {
            grads.register::<Flex>(node.id, flex(g.gamma, [s.channels]));
        }
        if let Some(node) = beta {
            grads.register::<Flex>(node.id, flex(g.beta, [s.channels]));
        }
    }
}

pub fn forward_train_autodiff<C: CheckpointStrategy>(
    x: Tensor<Autodiff<Flex, C>, 3>,
    gamma: Tensor<Autodiff<Flex, C>, 1>,
    beta: Tensor<Autodiff<Flex, C>, 1>,
    epsilon: f64,
    across: Option<SumAcross>,
) -> (NormOutput<Autodiff<Flex, C>>, f64) {
    let dims = x.dims();
    let s = shape_of(dims);
    let (x, gamma, beta) = (node(x), node(gamma), node(beta));
    let (xv, gv) = (contiguous(x.primitive.clone()), contiguous(gamma.primitive.clone()));
    let (out, count) = run(&xv, &gv, &contiguous(beta.primitive.clone()), &s, epsilon, across.as_ref());
    let across = across.map(|sum| Across { sum, count });
    let y = flex(out.y, dims);
    let (mean, var) = (flex(out.mean.clone(), [s.channels]), flex(out.var, [s.channels]));
    let y = match BatchNormBackward.prepare::<C>([x.node, gamma.node, beta.node]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let saved =
                Saved { x: xv, mean: Arc::new(out.mean), invstd: Arc::new(out.invstd), gamma: gv, shape: s, across };
            prep.finish(saved, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    ((tracked(y), Tensor::from_inner(tensor(mean)), Tensor::from_inner(tensor(var))), count)
}

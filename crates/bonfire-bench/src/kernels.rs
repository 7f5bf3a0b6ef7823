//! Time of each kernel, forward and backward, against Burn's own operation
//! on the same backend (Flex), at the shapes of LeNet and of the small ResNet
//! (`bench/torch_kernels.py` times PyTorch on the same list). One JSON line
//! per operation and implementation. Backward is the time of `y.sum()`'s
//! backward pass less that of the sum itself (timed on a leaf of `y`'s shape).

use std::time::Instant;

use anyhow::Result;
use bonfire_kernels::nn::BatchNormConfig;
use bonfire_kernels::ops::{self, Window2d};
use burn::backend::Autodiff;
use burn::tensor::ops::PaddedConvOptions;
use burn::tensor::{Distribution, Tensor};

type B = Autodiff<burn::backend::Flex>;

#[derive(clap::Args)]
pub struct Args {
    /// Images per batch.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Timed repetitions of each operation (after 3 warm-up ones).
    #[arg(long, default_value_t = 20)]
    reps: usize,
}

/// The operations of the two models: (name, kind, input [c, h, w], out
/// channels, kernel, stride, padding, whether training needs the input's
/// gradient). A model's first convolution reads the images, whose gradient
/// nobody needs, so it is timed without it, as training runs it.
type Op = (&'static str, &'static str, [usize; 3], usize, usize, usize, usize, bool);
const OPS: &[Op] = &[
    ("lenet conv1 1->6 5x5", "conv", [1, 28, 28], 6, 5, 1, 2, false),
    ("lenet pool 6x28x28", "pool", [6, 28, 28], 6, 2, 2, 0, true),
    ("lenet conv2 6->16 5x5", "conv", [6, 14, 14], 16, 5, 1, 0, true),
    ("lenet pool 16x10x10", "pool", [16, 10, 10], 16, 2, 2, 0, true),
    ("resnet stem 1->16 3x3", "conv", [1, 28, 28], 16, 3, 1, 1, false),
    ("resnet conv 16->16 3x3", "conv", [16, 28, 28], 16, 3, 1, 1, true),
    ("resnet conv 16->32 3x3 s2", "conv", [16, 28, 28], 32, 3, 2, 1, true),
    ("resnet conv 16->32 1x1 s2", "conv", [16, 28, 28], 32, 1, 2, 0, true),
    ("resnet conv 32->32 3x3", "conv", [32, 14, 14], 32, 3, 1, 1, true),
    ("resnet conv 32->64 3x3 s2", "conv", [32, 14, 14], 64, 3, 2, 1, true),
    ("resnet conv 64->64 3x3", "conv", [64, 7, 7], 64, 3, 1, 1, true),
    ("resnet bn 16x28x28", "bn", [16, 28, 28], 16, 0, 0, 0, true),
    ("resnet bn 32x14x14", "bn", [32, 14, 14], 32, 0, 0, 0, true),
    ("resnet bn 64x7x7", "bn", [64, 7, 7], 64, 0, 0, 0, true),
];

pub fn run(args: Args) -> Result<()> {
    let device = Default::default();
    for &(name, kind, [c, h, w], out, k, s, p, input_grad) in OPS {
        for imp in ["bonfire", "burn"] {
            let x = Tensor::<B, 4>::random([args.batch, c, h, w], Distribution::Normal(0.0, 1.0), &device)
                .set_require_grad(input_grad);
            let weight = Tensor::<B, 4>::random([out, c, k.max(1), k.max(1)], Distribution::Normal(0.0, 0.1), &device)
                .require_grad();
            let bn_ours = BatchNormConfig::new(c).init::<B>(&device);
            let bn_burn = burn::nn::BatchNormConfig::new(c).init::<B>(&device);
            let window = Window2d { stride: [s, s], padding: [p, p], padding_end: [p, p], dilation: [1, 1] };
            let forward = || -> Tensor<B, 4> {
                match (kind, imp) {
                    ("conv", "bonfire") => ops::conv2d(x.clone(), weight.clone(), None, window, 1),
                    ("conv", _) => burn::tensor::module::conv2d(
                        x.clone(),
                        weight.clone(),
                        None,
                        PaddedConvOptions::asymmetric([s, s], [p, p], [p, p], [1, 1], 1),
                    ),
                    ("pool", "bonfire") => ops::max_pool2d(x.clone(), [k, k], window, false),
                    ("pool", _) => burn::tensor::module::max_pool2d(x.clone(), [k, k], [s, s], [p, p], [1, 1], false),
                    (_, "bonfire") => bn_ours.forward(x.clone()),
                    _ => bn_burn.forward(x.clone()),
                }
            };
            let time = |backward: bool| {
                let once = || {
                    let y = forward();
                    if backward {
                        drop(y.sum().backward());
                    } else {
                        drop(y.into_data());
                    }
                };
                (0..3).for_each(|_| once());
                let start = Instant::now();
                (0..args.reps).for_each(|_| once());
                start.elapsed().as_secs_f64() * 1e3 / args.reps as f64
            };
            let forward_ms = time(false);
            let total_ms = time(true);
            // What the loss adds to backward (the gradient of a sum, a
            // broadcast multiply): timed alone on a leaf of the output's shape
            // and left out.
            let out = forward().inner();
            let loss_ms = {
                let once = || {
                    let leaf = Tensor::<B, 4>::from_inner(out.clone()).require_grad();
                    drop(leaf.sum().backward());
                };
                (0..3).for_each(|_| once());
                let start = Instant::now();
                (0..args.reps).for_each(|_| once());
                start.elapsed().as_secs_f64() * 1e3 / args.reps as f64
            };
            println!(
                "{}",
                serde_json::json!({
                    "op": name,
                    "impl": imp,
                    "batch": args.batch,
                    "threads": rayon::current_num_threads(),
                    "forward_ms": forward_ms,
                    "backward_ms": (total_ms - forward_ms - loss_ms).max(0.0),
                })
            );
        }
    }
    Ok(())
}

//! DataParallel: one process, the batch split over several devices, each
//! replica in its own thread, gradients summed back onto the model.
//!
//!     cargo run --example data_parallel
//!
//! The CPU backend has one device, so the replicas share it here (each in
//! its own thread); with several GPUs, list them instead.

use bonfire::prelude::*;
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::loss::{MseLoss, Reduction};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

type B = Autodiff<Flex>;

#[derive(Module, Debug)]
struct Regression<B: Backend> {
    linear: Linear<B>,
}

/// 64 samples of y = 3·x0 − 2·x1 + 1.
fn batch(step: usize, device: &burn::tensor::Device<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let x: Vec<f32> = (0..64)
        .flat_map(|i| {
            let t = (step * 64 + i) as f32;
            [(t * 0.37).sin(), (t * 1.13).cos()]
        })
        .collect();
    let y: Vec<f32> = x.chunks(2).map(|p| 3.0 * p[0] - 2.0 * p[1] + 1.0).collect();
    (Tensor::from_data(TensorData::new(x, [64, 2]), device), Tensor::from_data(TensorData::new(y, [64, 1]), device))
}

fn main() -> anyhow::Result<()> {
    let device = Default::default();
    let dp = DataParallel::<B>::new(vec![device; 2])?;
    let mut model = Regression::<B> { linear: LinearConfig::new(2, 1).init(&device) };
    let mut optimizer = SgdConfig::new().init();
    for step in 0..200 {
        let (x, y) = batch(step, &device);
        // Each replica runs the closure on its share of the batch; the
        // outputs come back concatenated on the first device.
        let (prediction, replicas) = dp.forward(&model, x, |m, x| m.linear.forward(x))?;
        let loss = MseLoss::new().forward(prediction, y, Reduction::Mean);
        let report = loss.clone().into_scalar();
        let grads = dp.backward(loss, &model, replicas)?;
        model = optimizer.step(0.1, model, grads);
        if step % 50 == 0 || step == 199 {
            println!("step {step:>3}: loss {report:.5}");
        }
    }
    let w = model.linear.weight.val().into_data().to_vec::<f32>().expect("f32 weights");
    let b = model.linear.bias.as_ref().expect("a bias").val().into_scalar();
    println!("learned y = {:.3}·x0 + {:.3}·x1 + {b:.3} (truth: 3, -2, 1)", w[0], w[1]);
    let off = [(w[0] - 3.0).abs(), (w[1] + 2.0).abs(), (b - 1.0).abs()];
    // Written so that a NaN fails it.
    anyhow::ensure!(off.iter().all(|d| *d < 0.05), "the model is {off:?} away from the truth");
    Ok(())
}

//! A Burn model on Bonfire's kernels: the only change from Burn's own
//! modules is the `use` line. The same model type trains on Flex (the
//! kernels) and on NdArray (Burn's ops), and both learn.
//!
//!     cargo run --release -p bonfire-kernels --example conv_net

use bonfire_kernels::nn::{BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::backend::{Autodiff, Flex, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::activation::relu;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

#[derive(Module, Debug)]
struct Net<B: Backend> {
    conv: Conv2d<B>,
    bn: BatchNorm<B>,
    pool: MaxPool2d,
    fc: Linear<B>,
}

impl<B: Backend> Net<B> {
    fn new(device: &B::Device) -> Self {
        Net {
            conv: Conv2dConfig::new([1, 8], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(device),
            bn: BatchNormConfig::new(8).init(device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc: LinearConfig::new(8 * 8 * 8, 2).init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.pool.forward(relu(self.bn.forward(self.conv.forward(x))));
        let n = x.dims()[0];
        self.fc.forward(x.reshape([n, 8 * 8 * 8]))
    }
}

/// 16x16 images: class 1 has a bright square in the top-left quarter.
fn batch<B: Backend>(step: usize, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let n = 32;
    let mut x = vec![0.0f32; n * 16 * 16];
    let mut y = vec![0i64; n];
    for i in 0..n {
        let seed = (step * n + i) as u64;
        y[i] = (seed.wrapping_mul(0x9E3779B97F4A7C15) >> 63) as i64;
        for p in 0..256 {
            let noise = ((seed * 257 + p as u64).wrapping_mul(0xBF58476D1CE4E5B9) >> 40) as f32 / (1u64 << 24) as f32;
            let square = y[i] == 1 && p / 16 < 8 && p % 16 < 8;
            x[i * 256 + p] = noise + if square { 1.0 } else { 0.0 };
        }
    }
    (Tensor::from_data(TensorData::new(x, [n, 1, 16, 16]), device), Tensor::from_data(TensorData::new(y, [n]), device))
}

fn train<B: AutodiffBackend>(name: &str) -> f64 {
    let device = Default::default();
    let mut model = Net::<B>::new(&device);
    let mut opt = SgdConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut last = f64::NAN;
    for step in 0..40 {
        let (x, y) = batch::<B>(step, &device);
        let loss = loss_fn.forward(model.forward(x), y);
        last = loss.clone().into_scalar().elem::<f64>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = opt.step(0.1, model, grads);
    }
    // Evaluation runs on the inner backend with batch norm's running statistics.
    let (x, y) = batch::<B::InnerBackend>(1000, &device);
    let predicted = model.valid().forward(x).argmax(1).reshape([32]);
    let accuracy = predicted.equal(y).int().sum().into_scalar().elem::<f64>() / 32.0;
    println!("{name}: loss after 40 steps {last:.4}, accuracy on new images {accuracy:.2}");
    accuracy
}

fn main() {
    let flex = train::<Autodiff<Flex>>("Flex (Bonfire's kernels)");
    let ndarray = train::<Autodiff<NdArray>>("NdArray (Burn's ops)");
    assert!(flex >= 0.9 && ndarray >= 0.9, "the model did not learn: {flex}, {ndarray}");
}

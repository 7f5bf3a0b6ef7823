//! A small ResNet for benchmarks: heavier than LeNet (about 20 times the
//! arithmetic per image) with batch norm and residual connections, as the
//! networks people train with DDP are. `bench/torch_ddp_train.py` builds the
//! same network in PyTorch, with the same names. Convolution and batch norm
//! are Bonfire's kernels on the CPU backend and Burn's ops elsewhere.

use bonfire_kernels::nn::{BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig};
use burn::module::Module;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::Classifier;

/// stem conv 3x3 (c->16) - bn - relu - block(16) - block(32, stride 2) -
/// block(64, stride 2) - global average pool - linear(64->classes).
#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    conv1: Conv2d<B>,
    bn1: BatchNorm<B>,
    layer1: BasicBlock<B>,
    layer2: BasicBlock<B>,
    layer3: BasicBlock<B>,
    pool: AdaptiveAvgPool2d,
    fc: Linear<B>,
}

/// Two 3x3 convolutions with batch norm, plus the input (through a strided
/// 1x1 convolution where the shape changes).
#[derive(Module, Debug)]
pub struct BasicBlock<B: Backend> {
    conv1: Conv2d<B>,
    bn1: BatchNorm<B>,
    conv2: Conv2d<B>,
    bn2: BatchNorm<B>,
    downsample_conv: Option<Conv2d<B>>,
    downsample_bn: Option<BatchNorm<B>>,
}

fn conv<B: Backend>(cin: usize, cout: usize, kernel: usize, stride: usize, device: &B::Device) -> Conv2d<B> {
    let pad = kernel / 2;
    Conv2dConfig::new([cin, cout], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(false)
        .init(device)
}

impl<B: Backend> BasicBlock<B> {
    fn new(cin: usize, cout: usize, stride: usize, device: &B::Device) -> Self {
        let reshape = stride != 1 || cin != cout;
        BasicBlock {
            conv1: conv(cin, cout, 3, stride, device),
            bn1: BatchNormConfig::new(cout).init(device),
            conv2: conv(cout, cout, 3, 1, device),
            bn2: BatchNormConfig::new(cout).init(device),
            downsample_conv: reshape.then(|| conv(cin, cout, 1, stride, device)),
            downsample_bn: reshape.then(|| BatchNormConfig::new(cout).init(device)),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let out = relu(self.bn1.forward(self.conv1.forward(x.clone())));
        let out = self.bn2.forward(self.conv2.forward(out));
        let shortcut = match (&self.downsample_conv, &self.downsample_bn) {
            (Some(conv), Some(bn)) => bn.forward(conv.forward(x)),
            _ => x,
        };
        relu(out + shortcut)
    }
}

impl<B: Backend> ResNet<B> {
    /// The ResNet for images of `channels` channels.
    pub fn new(channels: usize, classes: usize, device: &B::Device) -> Self {
        ResNet {
            conv1: conv(channels, 16, 3, 1, device),
            bn1: BatchNormConfig::new(16).init(device),
            layer1: BasicBlock::new(16, 16, 1, device),
            layer2: BasicBlock::new(16, 32, 2, device),
            layer3: BasicBlock::new(32, 64, 2, device),
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(64, classes).init(device),
        }
    }
}

impl<B: Backend> Classifier<B> for ResNet<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = relu(self.bn1.forward(self.conv1.forward(x)));
        let x = self.layer3.forward(self.layer2.forward(self.layer1.forward(x)));
        let [n, c, _, _] = x.dims();
        self.fc.forward(self.pool.forward(x).reshape([n, c]))
    }
}

//! The GPU check's two models in Burn's own modules, as a Burn user writes
//! them: layer for layer Bonfire's `LeNet` and `ResNet` (and
//! `bench/torch_ddp_train.py`'s). Bonfire's own crates cannot be built with
//! Burn's `distributed` feature (it makes `Autodiff<B>` an autodiff backend
//! only where `B` is distributed), so the anchor cannot reuse them.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// conv(1->6, 5x5, pad 2) - relu - maxpool 2 - conv(6->16, 5x5) - relu -
/// maxpool 2 - linear(400->120) - relu - linear(120->84) - relu - linear(84->10).
#[derive(Module, Debug)]
pub struct LeNet<B: Backend> {
    conv1: Conv2d<B>,
    conv2: Conv2d<B>,
    pool: MaxPool2d,
    fc1: Linear<B>,
    fc2: Linear<B>,
    fc3: Linear<B>,
}

impl<B: Backend> LeNet<B> {
    pub fn new(classes: usize, device: &B::Device) -> Self {
        LeNet {
            conv1: Conv2dConfig::new([1, 6], [5, 5]).with_padding(PaddingConfig2d::Explicit(2, 2, 2, 2)).init(device),
            conv2: Conv2dConfig::new([6, 16], [5, 5]).init(device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc1: LinearConfig::new(16 * 5 * 5, 120).init(device),
            fc2: LinearConfig::new(120, 84).init(device),
            fc3: LinearConfig::new(84, classes).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.pool.forward(relu(self.conv1.forward(x)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        let x: Tensor<B, 2> = x.flatten(1, 3);
        self.fc3.forward(relu(self.fc2.forward(relu(self.fc1.forward(x)))))
    }
}

/// A `k`x`k` convolution without bias, padded to keep the size at stride 1.
fn conv<B: Backend>(channels: [usize; 2], k: usize, stride: usize, device: &B::Device) -> Conv2d<B> {
    let p = k / 2;
    Conv2dConfig::new(channels, [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .with_bias(false)
        .init(device)
}

#[derive(Module, Debug)]
pub struct BasicBlock<B: Backend> {
    conv1: Conv2d<B>,
    bn1: BatchNorm<B>,
    conv2: Conv2d<B>,
    bn2: BatchNorm<B>,
    downsample: Option<(Conv2d<B>, BatchNorm<B>)>,
}

impl<B: Backend> BasicBlock<B> {
    fn new(cin: usize, cout: usize, stride: usize, device: &B::Device) -> Self {
        let reshape = stride != 1 || cin != cout;
        BasicBlock {
            conv1: conv([cin, cout], 3, stride, device),
            bn1: BatchNormConfig::new(cout).init(device),
            conv2: conv([cout, cout], 3, 1, device),
            bn2: BatchNormConfig::new(cout).init(device),
            downsample: reshape
                .then(|| (conv([cin, cout], 1, stride, device), BatchNormConfig::new(cout).init(device))),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let out = relu(self.bn1.forward(self.conv1.forward(x.clone())));
        let out = self.bn2.forward(self.conv2.forward(out));
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward(conv.forward(x)),
            None => x,
        };
        relu(out + shortcut)
    }
}

/// conv(1->16, 3x3) - bn - relu, basic blocks of 16, 32 (stride 2) and 64
/// (stride 2) channels, global average pooling, linear(64->10).
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

impl<B: Backend> ResNet<B> {
    pub fn new(classes: usize, device: &B::Device) -> Self {
        ResNet {
            conv1: conv([1, 16], 3, 1, device),
            bn1: BatchNormConfig::new(16).init(device),
            layer1: BasicBlock::new(16, 16, 1, device),
            layer2: BasicBlock::new(16, 32, 2, device),
            layer3: BasicBlock::new(32, 64, 2, device),
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(64, classes).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = relu(self.bn1.forward(self.conv1.forward(x)));
        let x = self.layer3.forward(self.layer2.forward(self.layer1.forward(x)));
        self.fc.forward(self.pool.forward(x).flatten(1, 3))
    }
}

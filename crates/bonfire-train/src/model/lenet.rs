//! The seed article's `Net` (LeNet), laid out as PyTorch's so that weights
//! can move between the two. Convolution and pooling are Bonfire's kernels
//! on the CPU backend and Burn's ops elsewhere.

use bonfire_kernels::nn::{Conv2d, Conv2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::Classifier;

/// conv(c->6, 5x5) - relu - maxpool 2 - conv(6->16, 5x5) - relu - maxpool 2 -
/// linear(400->120) - relu - linear(120->84) - relu - linear(84->10).
/// For 28x28 inputs conv1 pads by 2, so that both 28x28 and 32x32 images
/// reach 16x5x5 features.
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
    /// LeNet-5 for `side` x `side` images of `channels` channels.
    pub fn new(channels: usize, side: usize, classes: usize, device: &B::Device) -> Self {
        let pad = if side == 28 { 2 } else { 0 };
        LeNet {
            conv1: Conv2dConfig::new([channels, 6], [5, 5])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .init(device),
            conv2: Conv2dConfig::new([6, 16], [5, 5]).init(device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc1: LinearConfig::new(16 * 5 * 5, 120).init(device),
            fc2: LinearConfig::new(120, 84).init(device),
            fc3: LinearConfig::new(84, classes).init(device),
        }
    }
}

impl<B: Backend> Classifier<B> for LeNet<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.pool.forward(relu(self.conv1.forward(x)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        let [n, c, h, w] = x.dims();
        let x = x.reshape([n, c * h * w]);
        let x = relu(self.fc1.forward(x));
        let x = relu(self.fc2.forward(x));
        self.fc3.forward(x)
    }
}

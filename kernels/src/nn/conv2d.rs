//! `Conv2d`: Burn's module, through [`crate::ops::conv2d`].

use burn::module::{Initializer, Module, Param};
use burn::nn::conv::{Conv2d as BurnConv2d, Conv2dConfig as BurnConv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::padding::resolve;
use crate::ops::{conv2d, Window2d};

/// Burn's `Conv2dConfig`, whose `init` makes this crate's [`Conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2dConfig(BurnConv2dConfig);

impl Conv2dConfig {
    /// A convolution from `channels[0]` to `channels[1]` channels with a `kernel_size` kernel.
    pub fn new(channels: [usize; 2], kernel_size: [usize; 2]) -> Self {
        Conv2dConfig(BurnConv2dConfig::new(channels, kernel_size))
    }

    /// Sets the stride.
    pub fn with_stride(self, stride: [usize; 2]) -> Self {
        Conv2dConfig(self.0.with_stride(stride))
    }

    /// Sets the dilation.
    pub fn with_dilation(self, dilation: [usize; 2]) -> Self {
        Conv2dConfig(self.0.with_dilation(dilation))
    }

    /// Sets the groups.
    pub fn with_groups(self, groups: usize) -> Self {
        Conv2dConfig(self.0.with_groups(groups))
    }

    /// Sets the padding.
    pub fn with_padding(self, padding: PaddingConfig2d) -> Self {
        Conv2dConfig(self.0.with_padding(padding))
    }

    /// Sets whether there is a bias.
    pub fn with_bias(self, bias: bool) -> Self {
        Conv2dConfig(self.0.with_bias(bias))
    }

    /// Sets the weights' initializer.
    pub fn with_initializer(self, initializer: Initializer) -> Self {
        Conv2dConfig(self.0.with_initializer(initializer))
    }

    /// The module, on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Conv2d<B> {
        self.0.init(device).into()
    }
}

/// A 2-D convolution with the fields (and so the record and parameter
/// names) of Burn's `Conv2d`.
#[derive(Module, Debug)]
pub struct Conv2d<B: Backend> {
    /// `[out, in / groups, kh, kw]`.
    pub weight: Param<Tensor<B, 4>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// `[rows, columns]` between windows.
    pub stride: [usize; 2],
    /// `[rows, columns]` of the kernel.
    pub kernel_size: [usize; 2],
    /// `[rows, columns]` between the kernel's taps.
    pub dilation: [usize; 2],
    /// Channel groups.
    pub groups: usize,
    /// The padding.
    pub padding: PaddingConfig2d,
}

impl<B: Backend> From<BurnConv2d<B>> for Conv2d<B> {
    fn from(c: BurnConv2d<B>) -> Self {
        Conv2d {
            weight: c.weight,
            bias: c.bias,
            stride: c.stride,
            kernel_size: c.kernel_size,
            dilation: c.dilation,
            groups: c.groups,
            padding: c.padding,
        }
    }
}

impl<B: Backend> Conv2d<B> {
    /// `[batch, in, h, w]` to `[batch, out, h', w']`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, height, width] = x.dims();
        let (padding, padding_end) = resolve(&self.padding, height, width, self.kernel_size, self.stride);
        let window = Window2d { stride: self.stride, padding, padding_end, dilation: self.dilation };
        conv2d(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()), window, self.groups)
    }
}

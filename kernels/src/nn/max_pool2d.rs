//! `MaxPool2d`: Burn's module, through [`crate::ops::max_pool2d`].

use burn::module::Module;
use burn::nn::pool::{MaxPool2d as BurnMaxPool2d, MaxPool2dConfig as BurnMaxPool2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::padding::resolve;
use crate::ops::{max_pool2d, Window2d};

/// Burn's `MaxPool2dConfig`, whose `init` makes this crate's [`MaxPool2d`].
#[derive(Debug, Clone)]
pub struct MaxPool2dConfig(BurnMaxPool2dConfig);

impl MaxPool2dConfig {
    /// Max pooling over `kernel_size` windows.
    pub fn new(kernel_size: [usize; 2]) -> Self {
        MaxPool2dConfig(BurnMaxPool2dConfig::new(kernel_size))
    }

    /// Sets the strides.
    pub fn with_strides(self, strides: [usize; 2]) -> Self {
        MaxPool2dConfig(self.0.with_strides(strides))
    }

    /// Sets the padding.
    pub fn with_padding(self, padding: PaddingConfig2d) -> Self {
        MaxPool2dConfig(self.0.with_padding(padding))
    }

    /// Sets the dilation.
    pub fn with_dilation(self, dilation: [usize; 2]) -> Self {
        MaxPool2dConfig(self.0.with_dilation(dilation))
    }

    /// Sets whether the output size rounds up.
    pub fn with_ceil_mode(self, ceil_mode: bool) -> Self {
        MaxPool2dConfig(self.0.with_ceil_mode(ceil_mode))
    }

    /// The module.
    pub fn init(&self) -> MaxPool2d {
        self.0.init().into()
    }
}

/// 2-D max pooling with the fields of Burn's `MaxPool2d`.
#[derive(Module, Clone, Debug)]
pub struct MaxPool2d {
    /// `[rows, columns]` between windows.
    pub stride: [usize; 2],
    /// `[rows, columns]` of the window.
    pub kernel_size: [usize; 2],
    /// The padding.
    pub padding: PaddingConfig2d,
    /// `[rows, columns]` between the window's taps.
    pub dilation: [usize; 2],
    /// Whether the output size rounds up.
    pub ceil_mode: bool,
}

impl From<BurnMaxPool2d> for MaxPool2d {
    fn from(p: BurnMaxPool2d) -> Self {
        MaxPool2d {
            stride: p.stride,
            kernel_size: p.kernel_size,
            padding: p.padding,
            dilation: p.dilation,
            ceil_mode: p.ceil_mode,
        }
    }
}

impl MaxPool2d {
    /// `[batch, channels, h, w]` to `[batch, channels, h', w']`.
    pub fn forward<B: Backend>(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, height, width] = x.dims();
        let (padding, padding_end) = resolve(&self.padding, height, width, self.kernel_size, self.stride);
        if padding != padding_end {
            // Uneven padding: pad with -inf first, as Burn's module does.
            let [top, left] = padding;
            let [bottom, right] = padding_end;
            let x = x.pad((left, right, top, bottom), burn::tensor::ops::PadMode::Constant(f32::NEG_INFINITY));
            let window =
                Window2d { stride: self.stride, padding: [0, 0], padding_end: [0, 0], dilation: self.dilation };
            return max_pool2d(x, self.kernel_size, window, self.ceil_mode);
        }
        let window = Window2d { stride: self.stride, padding, padding_end, dilation: self.dilation };
        max_pool2d(x, self.kernel_size, window, self.ceil_mode)
    }
}

//! Burn's padding configuration resolved to explicit padding, as Burn's
//! modules resolve it (its own resolver is private to burn-nn).

use burn::nn::PaddingConfig2d;

/// `([top, left], [bottom, right])` for an input of `height x width`.
pub fn resolve(
    padding: &PaddingConfig2d,
    height: usize,
    width: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
) -> ([usize; 2], [usize; 2]) {
    match padding {
        PaddingConfig2d::Valid => ([0, 0], [0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) => ([*top, *left], [*bottom, *right]),
        PaddingConfig2d::Same => {
            let (top, bottom) = same(kernel[0], stride[0], height);
            let (left, right) = same(kernel[1], stride[1], width);
            ([top, left], [bottom, right])
        }
    }
}

/// The padding that keeps `ceil(size / stride)` outputs, the extra one at the end.
fn same(kernel: usize, stride: usize, size: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = if out > 0 { ((out - 1) * stride + kernel).saturating_sub(size) } else { 0 };
    (total / 2, total - total / 2)
}

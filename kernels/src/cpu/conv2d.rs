//! 2-D convolution over NCHW f32 images as packed matrix products (im2col):
//!
//! - forward: `Y[n] = W · col(X[n])`, `W` as `[out, in·kh·kw]`;
//! - input gradient: for stride 1 and at least as many input channels as
//!   output channels, a convolution of `dY` with the flipped kernel (one
//!   GEMM with K = out·kh·kw, no scatter); otherwise `dcol = Wᵀ · dY[n]`,
//!   scattered back by col2im;
//! - weight gradient: `dW = Σₙ dY[n] · col(X[n])ᵀ`, one product per image
//!   accumulated in place, so the whole batch is one long reduction
//!   (K = N·Ho·Wo) rather than Burn's default, a direct convolution whose
//!   kernel is the whole output map;
//! - bias gradient: the row sums of `dY`.
//!
//! A 1x1 convolution with stride 1 and no padding on any side needs no im2col: an image
//! is its own column matrix. The weight gradient of a stride-1 convolution
//! on wide images with many channels skips it too: one GEMM per kernel tap
//! on the padded image ([`shifted`]). Images are split into one run per thread of the
//! current rayon pool; each run reuses one column buffer, kept by its thread
//! between calls, so the extra memory is one `in·kh·kw x Ho·Wo` matrix per thread. Groups other than 1 are not
//! covered here (the modules fall back to Burn for them).

use rayon::prelude::*;

use super::gemm::{matmul, Mat};
use super::scratch::Scratch;
use super::sums::sum;
use shifted::Padded;

mod shifted;

/// The geometry of a convolution with `groups = 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dShape {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Input rows.
    pub height: usize,
    /// Input columns.
    pub width: usize,
    /// Output channels.
    pub out_channels: usize,
    /// `[rows, columns]` of the kernel.
    pub kernel: [usize; 2],
    /// `[rows, columns]` between windows.
    pub stride: [usize; 2],
    /// Padding before the first row and column; padding after the last
    /// ones only shows in the output size.
    pub padding: [usize; 2],
    /// `[rows, columns]` between the kernel's taps.
    pub dilation: [usize; 2],
    /// Output rows.
    pub out_height: usize,
    /// Output columns.
    pub out_width: usize,
}

impl Conv2dShape {
    /// `x` is `[batch, in, height, width]`, `weight` `[out, in, kh, kw]`;
    /// `padding` holds `[top, left]` and `padding_end` `[bottom, right]`.
    /// None when the kernel does not fit the padded image.
    pub fn new(
        x: [usize; 4],
        weight: [usize; 4],
        stride: [usize; 2],
        padding: [usize; 2],
        padding_end: [usize; 2],
        dilation: [usize; 2],
    ) -> Option<Self> {
        let [batch, in_channels, height, width] = x;
        let [out_channels, weight_in, kh, kw] = weight;
        if weight_in != in_channels || stride.contains(&0) || dilation.contains(&0) || kh == 0 || kw == 0 {
            return None;
        }
        let out = |size: usize, pad: usize, pad_end: usize, k: usize, d: usize, s: usize| {
            let span = d * (k - 1) + 1;
            (size + pad + pad_end).checked_sub(span).map(|room| room / s + 1)
        };
        Some(Conv2dShape {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel: [kh, kw],
            stride,
            padding,
            dilation,
            out_height: out(height, padding[0], padding_end[0], kh, dilation[0], stride[0])?,
            out_width: out(width, padding[1], padding_end[1], kw, dilation[1], stride[1])?,
        })
    }

    /// Rows of the column matrix: `in · kh · kw`.
    fn patch(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }

    /// Columns of the column matrix: `Ho · Wo`.
    fn positions(&self) -> usize {
        self.out_height * self.out_width
    }

    fn image(&self) -> usize {
        self.in_channels * self.height * self.width
    }

    fn out_image(&self) -> usize {
        self.out_channels * self.positions()
    }

    /// An image is its own column matrix: a 1x1 kernel at stride 1 with no
    /// padding on either side (padding at the end shows as extra outputs).
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1]
            && self.stride == [1, 1]
            && self.padding == [0, 0]
            && [self.out_height, self.out_width] == [self.height, self.width]
    }

    /// The input gradient of a stride-1 convolution as a convolution of
    /// its own: `dY` convolved with the kernel flipped and its in and out
    /// channels swapped, padded by `dilation·(k-1) - padding` (None when
    /// that is negative, or the stride is not 1). This replaces a GEMM with
    /// K = out channels and a col2im pass by one GEMM with K = out·kh·kw,
    /// at the price of an im2col of `dY`, which grows with the output's
    /// channels: it pays where the input has at least as many channels as
    /// the output (the ResNet's 3x3 blocks), not where it has fewer (LeNet's
    /// conv2), so only then (`cargo xtask bench kernels` shows both).
    fn input_gradient_shape(&self) -> Option<Conv2dShape> {
        if self.stride != [1, 1] || self.in_channels < self.out_channels {
            return None;
        }
        let span = |axis: usize| self.dilation[axis] * (self.kernel[axis] - 1);
        let before = [span(0).checked_sub(self.padding[0])?, span(1).checked_sub(self.padding[1])?];
        let after = [
            (self.height + span(0)).checked_sub(self.out_height + before[0])?,
            (self.width + span(1)).checked_sub(self.out_width + before[1])?,
        ];
        let shape = Conv2dShape::new(
            [self.batch, self.out_channels, self.out_height, self.out_width],
            [self.in_channels, self.out_channels, self.kernel[0], self.kernel[1]],
            [1, 1],
            before,
            after,
            self.dilation,
        )?;
        (shape.out_height == self.height && shape.out_width == self.width).then_some(shape)
    }

    /// For kernel tap `k` along one axis: the output positions whose input
    /// position lies inside the image, and the input position of output 0.
    fn valid(&self, axis: usize, k: usize, outputs: usize, size: usize) -> (usize, usize, isize) {
        let stride = self.stride[axis];
        let first = (k * self.dilation[axis]) as isize - self.padding[axis] as isize;
        // Output o reads input o·stride + first; keep 0 <= that < size.
        let lo = if first >= 0 { 0 } else { (-first as usize).div_ceil(stride) };
        let hi = if (size as isize) <= first { 0 } else { (size as isize - first) as usize }.div_ceil(stride);
        let hi = hi.min(outputs);
        (lo.min(hi), hi, first)
    }
}

/// Writes the column matrix of one image: row `(c, i, j)` holds, for every
/// output position, the input value under kernel tap `(i, j)` of channel `c`
/// (0 in the padding).
fn im2col(s: &Conv2dShape, image: &[f32], col: &mut [f32]) {
    let (p, [kh, kw]) = (s.positions(), s.kernel);
    for (row, col_row) in col.chunks_exact_mut(p).enumerate().take(s.patch()) {
        let (c, i, j) = (row / (kh * kw), row / kw % kh, row % kw);
        let plane = &image[c * s.height * s.width..][..s.height * s.width];
        if s.stride == [1, 1] && s.out_width == s.width {
            shifted_row(s, plane, i, j, col_row);
            continue;
        }
        // Zeroed whole once, then the valid values written: a row holds only
        // a few padding values, and a fill each would be a memset call.
        col_row.fill(0.0);
        let (w_lo, w_hi, w_first) = s.valid(1, j, s.out_width, s.width);
        let (h_lo, h_hi, h_first) = s.valid(0, i, s.out_height, s.height);
        if w_lo == w_hi {
            continue;
        }
        let start = ((w_lo * s.stride[1]) as isize + w_first) as usize;
        for oh in h_lo..h_hi {
            let ih = ((oh * s.stride[0]) as isize + h_first) as usize;
            let src = &plane[ih * s.width..][..s.width];
            let out = &mut col_row[oh * s.out_width..][w_lo..w_hi];
            if s.stride[1] == 1 {
                out.copy_from_slice(&src[start..start + (w_hi - w_lo)]);
            } else {
                out.iter_mut().zip(src[start..].iter().step_by(s.stride[1])).for_each(|(o, v)| *o = *v);
            }
        }
    }
}

/// One row of [`im2col`] where output rows are as wide as input rows (stride
/// 1): the plane shifted by the tap's offset, so the valid output rows are one
/// contiguous copy. Columns the shift wraps in from the neighbouring image
/// row are padding, zeroed after the copy. This matters for small images,
/// where per-row copies of 7–28 values cost more than the values.
fn shifted_row(s: &Conv2dShape, plane: &[f32], i: usize, j: usize, out: &mut [f32]) {
    let width = s.width;
    let (h_lo, h_hi, h_first) = s.valid(0, i, s.out_height, s.height);
    let (w_lo, w_hi, w_first) = s.valid(1, j, s.out_width, s.width);
    out[..h_lo * width].fill(0.0);
    out[h_hi * width..].fill(0.0);
    if w_lo >= w_hi || h_lo >= h_hi {
        out[h_lo * width..h_hi * width].fill(0.0);
        return;
    }
    // Output q = oh·W + ow reads input q + shift: in the plane whenever
    // (oh, ow) is valid, and only the invalid columns can fall outside it.
    let shift = h_first * width as isize + w_first;
    let (lo, hi) = (h_lo * width, h_hi * width);
    let from = (lo as isize + shift).max(0) as usize;
    let to = ((hi as isize + shift) as usize).min(plane.len());
    let dst = (from as isize - shift) as usize;
    out[lo..dst].fill(0.0);
    out[dst..dst + (to - from)].copy_from_slice(&plane[from..to]);
    out[dst + (to - from)..hi].fill(0.0);
    // Column by column: a few values a row, where per-row fills would be a
    // memset call each.
    for column in (0..w_lo).chain(w_hi..width) {
        for v in out[lo + column..hi].iter_mut().step_by(width) {
            *v = 0.0;
        }
    }
}

/// Adds every entry of a column matrix back onto the input position it came
/// from (the adjoint of [`im2col`]).
fn col2im(s: &Conv2dShape, col: &[f32], image: &mut [f32]) {
    let (p, [kh, kw]) = (s.positions(), s.kernel);
    for (row, col_row) in col.chunks_exact(p).enumerate().take(s.patch()) {
        let (c, i, j) = (row / (kh * kw), row / kw % kh, row % kw);
        let plane = &mut image[c * s.height * s.width..][..s.height * s.width];
        let (w_lo, w_hi, w_first) = s.valid(1, j, s.out_width, s.width);
        let (h_lo, h_hi, h_first) = s.valid(0, i, s.out_height, s.height);
        for oh in h_lo..h_hi {
            let ih = (oh * s.stride[0]) as isize + h_first;
            let dst = &mut plane[ih as usize * s.width..][..s.width];
            let src = &col_row[oh * s.out_width..][..s.out_width];
            let start = ((w_lo * s.stride[1]) as isize + w_first) as usize;
            for (k, v) in src[w_lo..w_hi].iter().enumerate() {
                dst[start + k * s.stride[1]] += v;
            }
        }
    }
}

/// `weight` `[out, in, kh, kw]` as `[in, out, kh, kw]` with each kernel
/// turned by 180°: the kernel of [`Conv2dShape::input_gradient_shape`].
fn flipped(s: &Conv2dShape, weight: &[f32]) -> Vec<f32> {
    let ([kh, kw], (o, c)) = (s.kernel, (s.out_channels, s.in_channels));
    let mut out = vec![0.0f32; weight.len()];
    for oc in 0..o {
        for ic in 0..c {
            for i in 0..kh {
                for j in 0..kw {
                    out[((ic * o + oc) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)] =
                        weight[((oc * c + ic) * kh + i) * kw + j];
                }
            }
        }
    }
    out
}

/// Images per run: the batch split evenly over the pool's threads.
fn images_per_run(batch: usize) -> usize {
    batch.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// `y = conv(x, weight) + bias`, `[batch, out, Ho, Wo]`.
pub fn forward(s: &Conv2dShape, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (k, p, o) = (s.patch(), s.positions(), s.out_channels);
    assert_eq!(x.len(), s.batch * s.image(), "input size");
    assert_eq!(weight.len(), o * k, "weight size");
    let mut y = vec![0.0f32; s.batch * s.out_image()];
    if y.is_empty() {
        return y;
    }
    let run = images_per_run(s.batch);
    y.par_chunks_mut(run * s.out_image()).zip(x.par_chunks(run * s.image())).for_each(|(ys, xs)| {
        let mut col = Scratch::take(if s.is_pointwise() { 0 } else { k * p });
        for (y_n, x_n) in ys.chunks_exact_mut(s.out_image()).zip(xs.chunks_exact(s.image())) {
            let col: &[f32] = if s.is_pointwise() {
                x_n
            } else {
                im2col(s, x_n, &mut col);
                &col
            };
            if let Some(bias) = bias {
                for (row, b) in y_n.chunks_exact_mut(p).zip(bias) {
                    row.fill(*b);
                }
            }
            matmul(y_n, Mat::new(weight, o, k), Mat::new(col, k, p), bias.is_some());
        }
    });
    y
}

/// The gradients of a convolution; the input's and the bias's only when asked for.
pub struct Conv2dGrads {
    /// The input's gradient.
    pub x: Option<Vec<f32>>,
    /// The weight's gradient.
    pub weight: Vec<f32>,
    /// The bias's gradient.
    pub bias: Option<Vec<f32>>,
}

/// Gradients of `conv(x, weight) + bias` given `dy`, `[batch, out, Ho, Wo]`.
pub fn backward(s: &Conv2dShape, x: &[f32], weight: &[f32], dy: &[f32], need_x: bool, need_bias: bool) -> Conv2dGrads {
    let (k, p, o) = (s.patch(), s.positions(), s.out_channels);
    assert_eq!(x.len(), s.batch * s.image(), "input size");
    assert_eq!(dy.len(), s.batch * s.out_image(), "output gradient size");
    let mut dx = if need_x { vec![0.0f32; x.len()] } else { Vec::new() };
    let run = images_per_run(s.batch);
    let runs = s.batch.div_ceil(run);
    // Each run sums its images' weight gradients into its own partial.
    let mut partials = vec![0.0f32; runs * o * k];
    let as_convolution = if need_x && !s.is_pointwise() { s.input_gradient_shape() } else { None };
    let flipped_weight = as_convolution.as_ref().map(|_| flipped(s, weight));
    let shifted = Padded::where_it_pays(s);
    let mut dx_runs: Vec<&mut [f32]> =
        if need_x { dx.chunks_mut(run * s.image()).collect() } else { (0..runs).map(|_| &mut [][..]).collect() };
    partials
        .par_chunks_mut(o * k)
        .zip(dx_runs.par_iter_mut())
        .zip(x.par_chunks(run * s.image()).zip(dy.par_chunks(run * s.out_image())))
        .for_each(|((dw, dx_run), (xs, dys))| {
            let mut col = Scratch::take(if s.is_pointwise() || shifted.is_some() { 0 } else { k * p });
            let mut dcol = Scratch::take(match (&as_convolution, need_x && !s.is_pointwise()) {
                (Some(t), _) => t.patch() * t.positions(),
                (None, true) => k * p,
                (None, false) => 0,
            });
            for (n, (x_n, dy_n)) in xs.chunks_exact(s.image()).zip(dys.chunks_exact(s.out_image())).enumerate() {
                if let Some(g) = &shifted {
                    shifted::weight_grad_image(s, g, x_n, dy_n, dw, n > 0);
                } else {
                    let col: &[f32] = if s.is_pointwise() {
                        x_n
                    } else {
                        im2col(s, x_n, &mut col);
                        &col
                    };
                    matmul(dw, Mat::new(dy_n, o, p), Mat::transposed(col, p, k), n > 0);
                }
                if need_x {
                    let dx_n = &mut dx_run[n * s.image()..][..s.image()];
                    if s.is_pointwise() {
                        matmul(dx_n, Mat::transposed(weight, k, o), Mat::new(dy_n, o, p), false);
                    } else if let (Some(t), Some(w)) = (&as_convolution, &flipped_weight) {
                        im2col(t, dy_n, &mut dcol);
                        matmul(
                            dx_n,
                            Mat::new(w, t.out_channels, t.patch()),
                            Mat::new(&dcol, t.patch(), t.positions()),
                            false,
                        );
                    } else {
                        matmul(&mut dcol, Mat::transposed(weight, k, o), Mat::new(dy_n, o, p), false);
                        col2im(s, &dcol, dx_n);
                    }
                }
            }
        });
    let mut dw = vec![0.0f32; o * k];
    for partial in partials.chunks_exact(o * k) {
        dw.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
    }
    let bias = need_bias.then(|| {
        let mut bias = vec![0.0f32; o];
        for dy_n in dy.chunks_exact(s.out_image()) {
            for (b, row) in bias.iter_mut().zip(dy_n.chunks_exact(p)) {
                *b += sum(row);
            }
        }
        bias
    });
    Conv2dGrads { x: need_x.then_some(dx), weight: dw, bias }
}

#[cfg(test)]
mod tests;

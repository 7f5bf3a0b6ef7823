//! The weight gradient of a stride-1 convolution with no column matrix: one
//! GEMM per kernel tap on the zero-padded image.
//!
//! Lay each channel's padded plane out `Wp = Wo + d·(kw-1)` values wide and
//! treat the output as `Ho` rows of `Wp` columns, the last `Wp - Wo` of each
//! row being scratch. Then output position `q` under tap `(i, j)` reads
//! padded position `q + i·d·Wp + j·d` of every channel: the tap's operand
//! is the padded image itself, read from an offset (`in x Ho·Wp`, rows a
//! plane apart), and the GEMM packs it straight from the image:
//! `dW[:, :, i, j] += dŶ · shift(X̂)ᵀ`, with `dŶ` the output gradient
//! widened by zero columns, so that the scratch columns add nothing.
//!
//! Each tap's product is `out x in` with K = `Ho·Wp`, as efficient as
//! im2col's one product, without writing and re-reading the column matrix.
//! The forward pass in this form would be nine products with K = `in`
//! each, slower than im2col's one with K = `in·kh·kw`, so it stays on
//! im2col.

use super::super::gemm::{matmul_strided, Mat};
use super::super::scratch::Scratch;
use super::Conv2dShape;

/// The padded layout of one image of a stride-1 convolution.
pub(super) struct Padded {
    /// Columns of a padded row: `Wo + d·(kw-1)`.
    width: usize,
    /// Values of a padded plane: `(Ho + d·(kh-1)) · width`.
    plane: usize,
    /// Zero columns before and after an image row, rows before it.
    left: usize,
    top: usize,
    /// Values after the last plane that the last tap's window reads.
    slack: usize,
}

impl Padded {
    /// The layout where the shifted form beats im2col: stride 1, at least
    /// 16 input channels and output rows at least 24 wide (the scratch
    /// columns cost `d·(kw-1)/Wp` of every pass). It pays on the ResNet's
    /// 16-channel 28x28 convolutions; on its 14x14 and 7x7 ones im2col
    /// stays ahead (see docs/kernels.md).
    pub(super) fn where_it_pays(s: &Conv2dShape) -> Option<Self> {
        (s.in_channels >= 16 && s.out_width >= 24 && !s.is_pointwise()).then(|| Padded::new(s)).flatten()
    }

    /// None unless the stride is 1.
    pub(super) fn new(s: &Conv2dShape) -> Option<Self> {
        if s.stride != [1, 1] {
            return None;
        }
        let [kh, kw] = s.kernel;
        let width = s.out_width + s.dilation[1] * (kw - 1);
        let height = s.out_height + s.dilation[0] * (kh - 1);
        // The padding after the image, as the output size implies it.
        width.checked_sub(s.padding[1] + s.width)?;
        height.checked_sub(s.padding[0] + s.height)?;
        Some(Padded {
            width,
            plane: height * width,
            left: s.padding[1],
            top: s.padding[0],
            slack: s.dilation[1] * (kw - 1),
        })
    }

    fn len(&self, channels: usize) -> usize {
        channels * self.plane + self.slack
    }

    /// Writes `image` (`in x H x W`) padded with zeros, every value once.
    fn pad(&self, s: &Conv2dShape, image: &[f32], out: &mut [f32]) {
        let rows = self.plane / self.width;
        for (c, plane) in out.chunks_exact_mut(self.plane).take(s.in_channels).enumerate() {
            for (r, row) in plane.chunks_exact_mut(self.width).enumerate().take(rows) {
                match r.checked_sub(self.top).filter(|&ir| ir < s.height) {
                    Some(ir) => {
                        row[..self.left].fill(0.0);
                        row[self.left..self.left + s.width]
                            .copy_from_slice(&image[(c * s.height + ir) * s.width..][..s.width]);
                        row[self.left + s.width..].fill(0.0);
                    }
                    None => row.fill(0.0),
                }
            }
        }
        out[s.in_channels * self.plane..].fill(0.0);
    }

    /// Offset of tap `t = i·kw + j` in a padded plane.
    fn offset(&self, s: &Conv2dShape, t: usize) -> usize {
        let (i, j) = (t / s.kernel[1], t % s.kernel[1]);
        i * s.dilation[0] * self.width + j * s.dilation[1]
    }

    /// Tap `t`'s operand, transposed: `Ho·Wp x in`, channels a plane apart.
    fn window<'a>(&self, s: &Conv2dShape, xpad: &'a [f32], t: usize) -> Mat<'a> {
        Mat::strided(&xpad[self.offset(s, t)..], s.out_height * self.width, s.in_channels, 1, self.plane)
    }
}

/// `dw (+)= dy_n ⋆ x_n` for one image: `dw` is `[out, in, kh, kw]`.
pub(super) fn weight_grad_image(
    s: &Conv2dShape,
    g: &Padded,
    x_n: &[f32],
    dy_n: &[f32],
    dw: &mut [f32],
    accumulate: bool,
) {
    let (o, c, taps, wide) = (s.out_channels, s.in_channels, s.kernel[0] * s.kernel[1], s.out_height * g.width);
    let mut xpad = Scratch::take(g.len(c));
    g.pad(s, x_n, &mut xpad);
    let mut dypad = Scratch::take(o * wide);
    for (dst, src) in dypad.chunks_exact_mut(g.width).zip(dy_n.chunks_exact(s.out_width)) {
        dst[..s.out_width].copy_from_slice(src);
        dst[s.out_width..].fill(0.0);
    }
    let dy = Mat::new(&dypad, o, wide);
    for t in 0..taps {
        matmul_strided(&mut dw[t..], (c * taps, taps), dy, g.window(s, &xpad, t), accumulate);
    }
}

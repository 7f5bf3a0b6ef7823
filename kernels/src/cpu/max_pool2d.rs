//! 2-D max pooling over NCHW f32 images, keeping for every output the
//! position of its maximum in the input plane, which is all the backward
//! pass needs. Ties go to the first maximum in scan order (rows, then
//! columns), as Burn's CPU backends choose. A 2x2 window with stride 2 and
//! no padding (LeNet's) has its own loop; every other window takes the
//! general one. Planes are spread over the threads of the rayon pool.

use rayon::prelude::*;

/// The geometry of a max pooling (floor mode; padding on both sides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2dShape {
    /// `batch · channels`: pooling treats every plane alike.
    pub planes: usize,
    /// Input rows.
    pub height: usize,
    /// Input columns.
    pub width: usize,
    /// `[rows, columns]` of the window.
    pub kernel: [usize; 2],
    /// `[rows, columns]` between windows.
    pub stride: [usize; 2],
    /// `[rows, columns]` of padding on each side.
    pub padding: [usize; 2],
    /// `[rows, columns]` between the window's taps.
    pub dilation: [usize; 2],
    /// Output rows.
    pub out_height: usize,
    /// Output columns.
    pub out_width: usize,
}

impl Pool2dShape {
    /// None when the window does not fit the padded plane, or when padding
    /// is wider than half the window (a window could then see no input).
    pub fn new(
        x: [usize; 4],
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
    ) -> Option<Self> {
        let [batch, channels, height, width] = x;
        if stride.contains(&0) || dilation.contains(&0) || kernel.contains(&0) {
            return None;
        }
        if padding[0] > kernel[0] / 2 || padding[1] > kernel[1] / 2 {
            return None;
        }
        let out = |size: usize, axis: usize| {
            let span = dilation[axis] * (kernel[axis] - 1) + 1;
            (size + 2 * padding[axis]).checked_sub(span).map(|room| room / stride[axis] + 1)
        };
        Some(Pool2dShape {
            planes: batch * channels,
            height,
            width,
            kernel,
            stride,
            padding,
            dilation,
            out_height: out(height, 0)?,
            out_width: out(width, 1)?,
        })
    }

    fn plane(&self) -> usize {
        self.height * self.width
    }

    fn out_plane(&self) -> usize {
        self.out_height * self.out_width
    }

    fn is_2x2_stride_2(&self) -> bool {
        self.kernel == [2, 2] && self.stride == [2, 2] && self.padding == [0, 0] && self.dilation == [1, 1]
    }
}

/// Planes per parallel task: enough work to be worth a task.
fn planes_per_task(s: &Pool2dShape) -> usize {
    (16_384 / s.plane().max(1)).max(1)
}

/// The pooled planes, and for each output the index of its maximum within
/// its input plane.
pub fn forward(s: &Pool2dShape, x: &[f32]) -> (Vec<f32>, Vec<u32>) {
    assert_eq!(x.len(), s.planes * s.plane(), "input size");
    let mut y = vec![0.0f32; s.planes * s.out_plane()];
    let mut arg = vec![0u32; y.len()];
    if y.is_empty() {
        return (y, arg);
    }
    let per = planes_per_task(s);
    y.par_chunks_mut(per * s.out_plane())
        .zip(arg.par_chunks_mut(per * s.out_plane()))
        .zip(x.par_chunks(per * s.plane()))
        .for_each(|((ys, args), xs)| {
            for ((y, arg), x) in ys
                .chunks_exact_mut(s.out_plane())
                .zip(args.chunks_exact_mut(s.out_plane()))
                .zip(xs.chunks_exact(s.plane()))
            {
                if s.is_2x2_stride_2() {
                    plane_2x2(s, x, y, arg);
                } else {
                    plane_general(s, x, y, arg);
                }
            }
        });
    (y, arg)
}

fn plane_2x2(s: &Pool2dShape, x: &[f32], y: &mut [f32], arg: &mut [u32]) {
    let w = s.width;
    for (oh, (y_row, arg_row)) in y.chunks_exact_mut(s.out_width).zip(arg.chunks_exact_mut(s.out_width)).enumerate() {
        let (top, bottom) = (2 * oh * w, (2 * oh + 1) * w);
        for (ow, (out, at)) in y_row.iter_mut().zip(arg_row.iter_mut()).enumerate() {
            let candidates = [top + 2 * ow, top + 2 * ow + 1, bottom + 2 * ow, bottom + 2 * ow + 1];
            let mut best = candidates[0];
            for &c in &candidates[1..] {
                if x[c] > x[best] {
                    best = c;
                }
            }
            *out = x[best];
            *at = best as u32;
        }
    }
}

fn plane_general(s: &Pool2dShape, x: &[f32], y: &mut [f32], arg: &mut [u32]) {
    for oh in 0..s.out_height {
        for ow in 0..s.out_width {
            let mut best: Option<usize> = None;
            for i in 0..s.kernel[0] {
                let ih = (oh * s.stride[0] + i * s.dilation[0]) as isize - s.padding[0] as isize;
                if ih < 0 || ih >= s.height as isize {
                    continue;
                }
                for j in 0..s.kernel[1] {
                    let iw = (ow * s.stride[1] + j * s.dilation[1]) as isize - s.padding[1] as isize;
                    if iw < 0 || iw >= s.width as isize {
                        continue;
                    }
                    let at = ih as usize * s.width + iw as usize;
                    if best.is_none_or(|b| x[at] > x[b]) {
                        best = Some(at);
                    }
                }
            }
            // The shape's padding bound leaves every window an input.
            let best = best.expect("a window inside the padded plane");
            y[oh * s.out_width + ow] = x[best];
            arg[oh * s.out_width + ow] = best as u32;
        }
    }
}

/// The input gradient: each output's gradient goes to its maximum.
pub fn backward(s: &Pool2dShape, arg: &[u32], dy: &[f32]) -> Vec<f32> {
    assert_eq!(dy.len(), s.planes * s.out_plane(), "output gradient size");
    assert_eq!(arg.len(), dy.len(), "one index per output");
    let mut dx = vec![0.0f32; s.planes * s.plane()];
    if dx.is_empty() {
        return dx;
    }
    let per = planes_per_task(s);
    dx.par_chunks_mut(per * s.plane())
        .zip(arg.par_chunks(per * s.out_plane()).zip(dy.par_chunks(per * s.out_plane())))
        .for_each(|(dxs, (args, dys))| {
            for (dx, (arg, dy)) in dxs
                .chunks_exact_mut(s.plane())
                .zip(args.chunks_exact(s.out_plane()).zip(dys.chunks_exact(s.out_plane())))
            {
                for (&at, &g) in arg.iter().zip(dy) {
                    dx[at as usize] += g;
                }
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_first_maximum_and_gradients_follow_them() {
        let s = Pool2dShape::new([1, 1, 2, 4], [2, 2], [2, 2], [0, 0], [1, 1]).unwrap();
        let x = [1.0, 3.0, 5.0, 5.0, 3.0, 2.0, 5.0, 0.0];
        let (y, arg) = forward(&s, &x);
        assert_eq!(y, vec![3.0, 5.0]);
        assert_eq!(arg, vec![1, 2]);
        assert_eq!(backward(&s, &arg, &[1.0, 2.0]), vec![0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let general = Pool2dShape { padding: [0, 0], ..s };
        let mut y2 = vec![0.0; 2];
        let mut arg2 = vec![0; 2];
        plane_general(&general, &x, &mut y2, &mut arg2);
        assert_eq!((y2, arg2), (y, arg));
    }

    #[test]
    fn padding_wider_than_half_the_window_has_no_shape() {
        assert_eq!(Pool2dShape::new([1, 1, 4, 4], [2, 2], [2, 2], [2, 0], [1, 1]), None);
    }
}

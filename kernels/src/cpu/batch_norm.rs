//! Batch norm over `[batch, channels, positions]` f32 data (NCHW images
//! with height and width flattened), in two passes each way:
//!
//! - training forward: one pass for every channel's sum and sum of squares
//!   (shifted by one of its values, summed in f64 across planes), one pass writing `y = (x - mean) · invstd · gamma + beta`;
//! - backward: one pass for `Σ dy` and `Σ dy · x̂` per channel, one pass
//!   writing `dx = gamma · invstd · (dy - Σdy / M - x̂ · Σ(dy·x̂) / M)`,
//!   with `x̂` recomputed from `x`, so nothing but the per-channel mean and
//!   `invstd` is kept between the passes;
//! - inference: one pass with the running statistics (Burn's broadcasting
//!   arithmetic walks such shapes element by element through a strided
//!   iterator, which took most of an evaluation pass of the ResNet).
//!
//! Burn's `BatchNorm` takes about a dozen tensor operations for the same
//! work, each a pass over the data. Channels (statistics) and planes
//! (writes) are spread over the threads of the rayon pool.

use rayon::prelude::*;

use super::sums::lane_sums;

/// `[batch, channels, positions]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    /// Images.
    pub batch: usize,
    /// Channels, each normalised on its own.
    pub channels: usize,
    /// Values per channel per image (height x width).
    pub positions: usize,
}

impl NormShape {
    /// Values per channel.
    fn count(&self) -> usize {
        self.batch * self.positions
    }

    fn len(&self) -> usize {
        self.batch * self.channels * self.positions
    }

    /// The planes of channel `c`, one per image.
    fn planes<'a>(&self, data: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
        let (p, stride) = (self.positions, self.channels * self.positions);
        (0..self.batch).map(move |n| &data[n * stride + c * p..][..p])
    }
}

/// A training forward pass: the output and the batch's statistics.
pub struct NormForward {
    /// The normalised output.
    pub y: Vec<f32>,
    /// The batch mean of each channel.
    pub mean: Vec<f32>,
    /// The biased batch variance (divided by the count).
    pub var: Vec<f32>,
    /// `1 / sqrt(var + epsilon)`.
    pub invstd: Vec<f32>,
}

/// Normalises with the batch's own statistics.
pub fn forward_train(s: &NormShape, x: &[f32], gamma: &[f32], beta: &[f32], epsilon: f64) -> NormForward {
    assert_eq!(x.len(), s.len(), "input size");
    let m = s.count().max(1) as f64;
    let stats: Vec<(f32, f32, f32)> = (0..s.channels)
        .into_par_iter()
        .map(|c| {
            // Sums of (x - shift), shift being one of the channel's values,
            // so that a mean far from zero does not cancel the variance away.
            let shift = s.planes(x, c).next().and_then(|p| p.first()).copied().unwrap_or(0.0);
            let (mut sum, mut squares) = (0.0f64, 0.0f64);
            for plane in s.planes(x, c) {
                let (a, b) = lane_sums(plane, plane, |v, _| (v - shift, (v - shift) * (v - shift)));
                sum += a as f64;
                squares += b as f64;
            }
            let centred = sum / m;
            let mean = shift as f64 + centred;
            let var = (squares / m - centred * centred).max(0.0);
            (mean as f32, var as f32, (1.0 / (var + epsilon).sqrt()) as f32)
        })
        .collect();
    let mean: Vec<f32> = stats.iter().map(|t| t.0).collect();
    let var: Vec<f32> = stats.iter().map(|t| t.1).collect();
    let invstd: Vec<f32> = stats.iter().map(|t| t.2).collect();
    let scale: Vec<f32> = invstd.iter().zip(gamma).map(|(i, g)| i * g).collect();
    let shift: Vec<f32> = (0..s.channels).map(|c| beta[c] - mean[c] * scale[c]).collect();
    NormForward { y: affine(s, x, &scale, &shift), mean, var, invstd }
}

/// Normalises with given statistics (inference).
pub fn forward_inference(
    s: &NormShape,
    x: &[f32],
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
) -> Vec<f32> {
    assert_eq!(x.len(), s.len(), "input size");
    let scale: Vec<f32> = (0..s.channels).map(|c| gamma[c] / ((var[c] as f64 + epsilon).sqrt() as f32)).collect();
    let shift: Vec<f32> = (0..s.channels).map(|c| beta[c] - mean[c] * scale[c]).collect();
    affine(s, x, &scale, &shift)
}

/// `y = x · scale[c] + shift[c]`, plane by plane.
fn affine(s: &NormShape, x: &[f32], scale: &[f32], shift: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    if y.is_empty() {
        return y;
    }
    y.par_chunks_mut(s.positions).zip(x.par_chunks(s.positions)).enumerate().for_each(|(plane, (y, x))| {
        let c = plane % s.channels;
        let (a, b) = (scale[c], shift[c]);
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = x * a + b);
    });
    y
}

/// The gradients of a training forward pass; the input's only when asked for.
pub struct NormGrads {
    /// The input's gradient.
    pub x: Option<Vec<f32>>,
    /// The scale's gradient.
    pub gamma: Vec<f32>,
    /// The shift's gradient.
    pub beta: Vec<f32>,
}

/// The gradients of a training forward pass (`forward` gave `mean` and `var`) for the output gradient `dy`.
pub fn backward(
    s: &NormShape,
    x: &[f32],
    dy: &[f32],
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    need_x: bool,
) -> NormGrads {
    assert_eq!((x.len(), dy.len()), (s.len(), s.len()), "input and gradient sizes");
    let sums: Vec<(f32, f32)> = (0..s.channels)
        .into_par_iter()
        .map(|c| {
            let (mu, inv) = (mean[c], invstd[c]);
            let (mut sum_dy, mut sum_dy_xhat) = (0.0f64, 0.0f64);
            for (xp, dyp) in s.planes(x, c).zip(s.planes(dy, c)) {
                let (a, b) = lane_sums(xp, dyp, |x, g| (g, g * (x - mu) * inv));
                sum_dy += a as f64;
                sum_dy_xhat += b as f64;
            }
            (sum_dy as f32, sum_dy_xhat as f32)
        })
        .collect();
    let beta_grad: Vec<f32> = sums.iter().map(|t| t.0).collect();
    let gamma_grad: Vec<f32> = sums.iter().map(|t| t.1).collect();
    let dx = need_x.then(|| {
        let m = s.count().max(1) as f32;
        let mut dx = vec![0.0f32; x.len()];
        if dx.is_empty() {
            return dx;
        }
        dx.par_chunks_mut(s.positions)
            .zip(x.par_chunks(s.positions).zip(dy.par_chunks(s.positions)))
            .enumerate()
            .for_each(|(plane, (dx, (x, dy)))| {
                let c = plane % s.channels;
                let (mu, inv, k) = (mean[c], invstd[c], gamma[c] * invstd[c]);
                let (mean_dy, mean_dy_xhat) = (beta_grad[c] / m, gamma_grad[c] / m);
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
                    *dx = k * (g - mean_dy - (x - mu) * inv * mean_dy_xhat);
                }
            });
        dx
    });
    NormGrads { x: dx, gamma: gamma_grad, beta: beta_grad }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_of_a_training_pass_has_zero_mean_and_unit_variance_per_channel() {
        let s = NormShape { batch: 3, channels: 2, positions: 5 };
        let x: Vec<f32> = (0..s.len()).map(|i| ((i * 13) % 7) as f32 + if i % 10 < 5 { 10.0 } else { 0.0 }).collect();
        let out = forward_train(&s, &x, &[1.0, 1.0], &[0.0, 0.0], 0.0);
        for c in 0..2 {
            let v: Vec<f32> = s.planes(&out.y, c).flatten().copied().collect();
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            let var = v.iter().map(|y| (y - mean) * (y - mean)).sum::<f32>() / v.len() as f32;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "channel {c}: mean {mean}, var {var}");
        }
    }
}

//! Batch norm over `[batch, channels, positions]` f32 data (NCHW images
//! with height and width flattened), in two passes each way:
//!
//! - training forward: one pass for every channel's sum and sum of squares
//!   (shifted by one of its values, summed in f64 across planes), one pass
//!   writing `y = (x - mean) · invstd · gamma + beta`;
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
    normalised(s, x, gamma, beta, epsilon, moments(s, x), m)
}

/// Each channel's mean and sum of squared deviations from it. The sums are
/// of `x - shift`, shift being one of the channel's values, so that a mean
/// far from zero does not cancel the variance away.
fn moments(s: &NormShape, x: &[f32]) -> Vec<(f64, f64)> {
    let m = s.count().max(1) as f64;
    (0..s.channels)
        .into_par_iter()
        .map(|c| {
            let shift = s.planes(x, c).next().and_then(|p| p.first()).copied().unwrap_or(0.0);
            let (mut sum, mut squares) = (0.0f64, 0.0f64);
            for plane in s.planes(x, c) {
                let (a, b) = lane_sums(plane, plane, |v, _| (v - shift, (v - shift) * (v - shift)));
                sum += a as f64;
                squares += b as f64;
            }
            let centred = sum / m;
            (shift as f64 + centred, (squares - sum * centred).max(0.0))
        })
        .collect()
}

/// `x` normalised with the statistics of a training pass, given as each
/// channel's mean and sum of squared deviations over `m` values; and those
/// statistics.
fn normalised(
    s: &NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
    moments: impl IntoIterator<Item = (f64, f64)>,
    m: f64,
) -> NormForward {
    let (mut mean, mut var, mut invstd) = (Vec::new(), Vec::new(), Vec::new());
    for (mu, squares) in moments {
        let v = (squares / m).max(0.0);
        mean.push(mu as f32);
        var.push(v as f32);
        invstd.push((1.0 / (v + epsilon).sqrt()) as f32);
    }
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
    let (beta_grad, gamma_grad) = gradient_sums(s, x, dy, mean, invstd);
    let dx = need_x.then(|| input_grad(s, x, dy, mean, invstd, gamma, (&beta_grad, &gamma_grad), s.count()));
    NormGrads { x: dx, gamma: gamma_grad, beta: beta_grad }
}

/// Adds every rank's values to this rank's, in place: a data-parallel
/// group's all-reduce, for batch norm across ranks.
pub type SumAcross<'a> = &'a dyn Fn(&mut [f32]);

/// [`forward_train`] with the statistics of the batch of every rank of a
/// group (PyTorch's `SyncBatchNorm`). Each rank writes its count and each
/// channel's mean and sum of squared deviations into its own slot of a
/// vector of zeros, `sum` (one call) hands every rank all the slots, and
/// they combine as Chan et al.'s parallel variance: no rank sums raw
/// squares, whose difference from the squared mean cancels the variance
/// away when the mean is far from zero. PyTorch gathers the same
/// statistics. Also returns the count over all ranks.
#[allow(clippy::too_many_arguments)]
pub fn forward_train_across(
    s: &NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
    rank: usize,
    ranks: usize,
    sum: SumAcross<'_>,
) -> (NormForward, f64) {
    assert_eq!(x.len(), s.len(), "input size");
    assert!(rank < ranks, "rank {rank} of {ranks}");
    let width = slot_width(s);
    let mut slots = vec![0.0f32; ranks * width];
    slots[rank * width..][..width].copy_from_slice(&slot(s, x));
    sum(&mut slots);
    let slots: Vec<&[f32]> = slots.chunks_exact(width).collect();
    let count = |slot: &[f32]| slot[2 * s.channels] as f64;
    let n: f64 = slots.iter().map(|slot| count(slot)).sum();
    let m = n.max(1.0);
    let combined = (0..s.channels).map(|c| {
        let mu = slots.iter().map(|slot| count(slot) * slot[c] as f64).sum::<f64>() / m;
        let squares =
            slots.iter().map(|slot| slot[s.channels + c] as f64 + count(slot) * (slot[c] as f64 - mu).powi(2));
        (mu, squares.sum())
    });
    (normalised(s, x, gamma, beta, epsilon, combined, m), n)
}

/// Values in one rank's slot of [`forward_train_across`]'s sum.
fn slot_width(s: &NormShape) -> usize {
    2 * s.channels + 1
}

/// One rank's slot: each channel's mean, then each channel's sum of squared
/// deviations, then the count.
fn slot(s: &NormShape, x: &[f32]) -> Vec<f32> {
    let moments = moments(s, x);
    let means = moments.iter().map(|t| t.0 as f32);
    let squares = moments.iter().map(|t| t.1 as f32);
    means.chain(squares).chain([s.count() as f32]).collect()
}

/// [`backward`] of [`forward_train_across`]: the input's gradient needs the
/// sums of `dy` and `dy·x̂` over every rank's batch (one call to `sum`) and
/// the count over all ranks; `gamma`'s and `beta`'s are this rank's own,
/// which DDP averages with the others'.
#[allow(clippy::too_many_arguments)]
pub fn backward_across(
    s: &NormShape,
    x: &[f32],
    dy: &[f32],
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    count: f64,
    sum: SumAcross<'_>,
) -> NormGrads {
    let (beta_grad, gamma_grad) = gradient_sums(s, x, dy, mean, invstd);
    let mut total: Vec<f32> = beta_grad.iter().chain(&gamma_grad).copied().collect();
    sum(&mut total);
    let (sum_dy, sum_dy_xhat) = total.split_at(s.channels);
    let dx = input_grad(s, x, dy, mean, invstd, gamma, (sum_dy, sum_dy_xhat), count as usize);
    NormGrads { x: Some(dx), gamma: gamma_grad, beta: beta_grad }
}

/// Each channel's sum of `dy` and of `dy·x̂`: `beta`'s and `gamma`'s gradients.
fn gradient_sums(s: &NormShape, x: &[f32], dy: &[f32], mean: &[f32], invstd: &[f32]) -> (Vec<f32>, Vec<f32>) {
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
    (sums.iter().map(|t| t.0).collect(), sums.iter().map(|t| t.1).collect())
}

/// The input's gradient from the sums of `dy` and `dy·x̂` over `count` values a channel.
#[allow(clippy::too_many_arguments)]
fn input_grad(
    s: &NormShape,
    x: &[f32],
    dy: &[f32],
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    (sum_dy, sum_dy_xhat): (&[f32], &[f32]),
    count: usize,
) -> Vec<f32> {
    let m = count.max(1) as f32;
    let mut dx = vec![0.0f32; x.len()];
    if dx.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(s.positions).zip(x.par_chunks(s.positions).zip(dy.par_chunks(s.positions))).enumerate().for_each(
        |(plane, (dx, (x, dy)))| {
            let c = plane % s.channels;
            let (mu, inv, k) = (mean[c], invstd[c], gamma[c] * invstd[c]);
            let (mean_dy, mean_dy_xhat) = (sum_dy[c] / m, sum_dy_xhat[c] / m);
            for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
                *dx = k * (g - mean_dy - (x - mu) * inv * mean_dy_xhat);
            }
        },
    );
    dx
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

    /// What the sum across ranks adds for another rank holding `x` at `rank`:
    /// its slot, into the zeros this rank left there.
    fn other_rank_adds(s: &NormShape, x: &[f32], rank: usize) -> impl Fn(&mut [f32]) {
        let (theirs, width) = (slot(s, x), slot_width(s));
        move |v: &mut [f32]| v[rank * width..][..width].iter_mut().zip(&theirs).for_each(|(a, b)| *a += b)
    }

    /// Statistics across ranks of values far from zero (a mean of 1000, a
    /// spread of about 1) equal the whole batch's: sums of raw squares lose
    /// the variance in f32 there.
    #[test]
    fn halves_far_from_zero_keep_the_variance() {
        let whole = NormShape { batch: 4, channels: 2, positions: 64 };
        let half = NormShape { batch: 2, ..whole };
        let x: Vec<f32> = (0..whole.len()).map(|i| 1000.0 + ((i * 37) % 23) as f32 * 0.1 - 1.1).collect();
        let (gamma, beta) = ([1.0, 2.0], [0.0, 0.5]);
        let want = forward_train(&whole, &x, &gamma, &beta, 1e-5);
        for part in 0..2 {
            let (xs, xo) = (&x[part * half.len()..][..half.len()], &x[(1 - part) * half.len()..][..half.len()]);
            let (out, _) =
                forward_train_across(&half, xs, &gamma, &beta, 1e-5, part, 2, &other_rank_adds(&half, xo, 1 - part));
            for c in 0..2 {
                let rel = (out.var[c] - want.var[c]).abs() / want.var[c];
                assert!(rel < 1e-4, "half {part}, channel {c}: variance {} against {}", out.var[c], want.var[c]);
            }
            let y_err = out.y.iter().zip(&want.y[part * half.len()..]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(y_err < 1e-3, "half {part}: forward off by {y_err}");
        }
    }

    /// Two halves of a batch, each normalised with the statistics summed
    /// across both, give the whole batch's forward pass and input gradient;
    /// `gamma`'s and `beta`'s gradients are each half's own and add up to
    /// the whole's.
    #[test]
    fn halves_summed_across_equal_the_whole_batch() {
        let whole = NormShape { batch: 4, channels: 3, positions: 5 };
        let half = NormShape { batch: 2, ..whole };
        let x: Vec<f32> = (0..whole.len()).map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.0 + (i / 30) as f32).collect();
        let dy: Vec<f32> = (0..whole.len()).map(|i| ((i * 17) % 13) as f32 * 0.1 - 0.6).collect();
        let (gamma, beta) = ([1.5, 0.5, -1.0], [0.1, 0.2, 0.3]);
        let want = forward_train(&whole, &x, &gamma, &beta, 1e-5);
        let want_grads = backward(&whole, &x, &dy, &want.mean, &want.invstd, &gamma, true);
        // The other half's sums, computed apart, stand in for the other rank.
        let split = half.len();
        let (sums_of, other) = (
            |xs: &[f32], ys: &[f32], mean: &[f32], invstd: &[f32]| {
                let (a, b) = gradient_sums(&half, xs, ys, mean, invstd);
                a.into_iter().chain(b).collect::<Vec<f32>>()
            },
            |part: usize| (&x[part * split..][..split], &dy[part * split..][..split]),
        );
        let (mut dx, mut d_gamma) = (Vec::new(), vec![0.0f32; 3]);
        for part in 0..2 {
            let (xs, ys) = other(part);
            let (xo, _) = other(1 - part);
            let add_stats = other_rank_adds(&half, xo, 1 - part);
            let (out, n) = forward_train_across(&half, xs, &gamma, &beta, 1e-5, part, 2, &add_stats);
            assert_eq!(n, whole.count() as f64);
            let y_err = out.y.iter().zip(&want.y[part * split..]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(y_err < 1e-5, "half {part}: forward off by {y_err}");
            let (yo, _) = other(1 - part);
            let grad_sums_of_other = sums_of(yo, other(1 - part).1, &out.mean, &out.invstd);
            let add_grads = |v: &mut [f32]| v.iter_mut().zip(&grad_sums_of_other).for_each(|(a, b)| *a += b);
            let g = backward_across(&half, xs, ys, &out.mean, &out.invstd, &gamma, n, &add_grads);
            dx.extend(g.x.unwrap());
            d_gamma.iter_mut().zip(&g.gamma).for_each(|(a, b)| *a += b);
        }
        let dx_err = dx.iter().zip(want_grads.x.as_ref().unwrap()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(dx_err < 1e-5, "input gradient off by {dx_err}");
        let g_err = d_gamma.iter().zip(&want_grads.gamma).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(g_err < 1e-5, "gamma's gradient off by {g_err}");
    }
}

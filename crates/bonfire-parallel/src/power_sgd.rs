//! PowerSGD (Vogels et al., 2019), the comm hook of PyTorch's
//! `powerSGD_hook`: each gradient matrix `M` (`[rows, the rest]`) is sent as
//! two thin factors, `P = M·Q` (`rows x r`) and `Q = Mᵀ·P` (`cols x r`),
//! with one step of power iteration a training step:
//!
//! 1. `M += error` (what earlier steps' approximations left out);
//! 2. `P = M·Q`, all-reduced with the uncompressed values in one call, then
//!    orthonormalised (Gram-Schmidt; the same on every rank);
//! 3. `Q = Mᵀ·P`, averaged over the ranks in a second call;
//! 4. the bucket's matrix becomes `P·Qᵀ`, the average's projection onto
//!    `P`, and `error = M - P·Qᵀ`. `Q` is kept for the next step (warm start).
//!
//! Vectors (biases, batch norm), matrices too small to gain (`rows·cols` at
//! most `min_compression_rate · r·(rows + cols)`) and the bucket's values
//! outside every parameter are averaged as they are.

use std::collections::HashMap;
use std::ops::Range;

use bonfire_collective::{CommError, ReduceOp, TensorCollective};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::comm_hook::{CommHook, GradBucket};

/// PowerSGD with rank `rank` (1 to 4 is usual; higher is closer to the mean).
pub struct PowerSgd<B: Backend> {
    rank: usize,
    min_compression_rate: f64,
    /// Steps averaged as they are before compression starts.
    start_step: usize,
    /// Steps begun so far (a step begins with its bucket 0).
    steps: usize,
    /// Per (bucket, start of the gradient in it): the error and `Q`.
    state: HashMap<(usize, usize), Factors<B>>,
}

struct Factors<B: Backend> {
    error: Tensor<B, 2>,
    q: Tensor<B, 2>,
}

/// A gradient the hook compresses: where it lies and its matrix shape.
struct Matrix {
    range: Range<usize>,
    rows: usize,
    cols: usize,
    /// The hook's rank, or less where the matrix has fewer rows or columns.
    rank: usize,
}

impl<B: Backend> PowerSgd<B> {
    /// Rank-`rank` compression of every matrix where it sends at most half
    /// the values (PyTorch's default `min_compression_rate` of 2).
    pub fn new(rank: usize) -> Self {
        PowerSgd { rank: rank.max(1), min_compression_rate: 2.0, start_step: 0, steps: 0, state: HashMap::new() }
    }

    /// Averages the first `steps` steps' gradients as they are, and
    /// compresses from then on (PyTorch's `start_powerSGD_iter`, whose
    /// default is 1,000; here it is 0). The early gradients change fast, and
    /// low-rank factors of them slow the start of training.
    pub fn with_start_step(mut self, steps: usize) -> Self {
        self.start_step = steps;
        self
    }

    /// Compresses a matrix only where `rows·cols > rate · rank·(rows + cols)`;
    /// 0 compresses every matrix.
    pub fn with_min_compression_rate(mut self, rate: f64) -> Self {
        self.min_compression_rate = rate;
        self
    }

    /// The gradients to compress, by where they start in the bucket.
    fn matrices(&self, bucket: &GradBucket<B>) -> Vec<Matrix> {
        let r = self.rank as f64;
        let mut matrices: Vec<Matrix> = bucket
            .parameters
            .iter()
            .filter(|p| p.shape.len() >= 2)
            .map(|p| {
                let (rows, cols) = (p.shape[0], p.range.len() / p.shape[0].max(1));
                Matrix { range: p.range.clone(), rows, cols, rank: self.rank.min(rows).min(cols) }
            })
            .filter(|m| {
                m.rows > 0 && (m.rows * m.cols) as f64 > self.min_compression_rate * r * (m.rows + m.cols) as f64
            })
            .collect();
        matrices.sort_by_key(|m| m.range.start);
        matrices
    }
}

/// The same `cols x rank` start on every rank: a fixed pseudo-random
/// sequence per matrix, in [-1, 1).
fn first_q<B: Backend>(cols: usize, rank: usize, seed: u64, device: &B::Device) -> Tensor<B, 2> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let values: Vec<f32> = (0..cols * rank)
        .map(|_| {
            // SplitMix64.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [cols, rank]), device)
}

/// The columns of `p` made orthonormal, one after another (modified
/// Gram-Schmidt). A column that the earlier ones (nearly) span becomes zero:
/// normalising what rounding left of it would give a column that is not
/// orthogonal to them, and `P·Pᵀ` would no longer project. Masked rather
/// than tested, so that nothing waits for the device.
fn orthonormal<B: Backend>(p: Tensor<B, 2>) -> Tensor<B, 2> {
    let [rows, rank] = p.dims();
    let norm = |c: &Tensor<B, 2>| (c.clone() * c.clone()).sum().sqrt().unsqueeze::<2>();
    let mut columns: Vec<Tensor<B, 2>> = Vec::with_capacity(rank);
    for i in 0..rank {
        let mut column = p.clone().slice([0..rows, i..i + 1]);
        let before = norm(&column);
        for earlier in &columns {
            let along = (earlier.clone() * column.clone()).sum().unsqueeze::<2>();
            column = column - earlier.clone() * along;
        }
        let after = norm(&column);
        let kept = after.clone().greater(before.mul_scalar(1e-3)).float();
        columns.push(column * kept / after.add_scalar(1e-30));
    }
    Tensor::cat(columns, 1)
}

impl<B: Backend> CommHook<B> for PowerSgd<B> {
    fn average(
        &mut self,
        comm: &mut dyn TensorCollective<B>,
        bucket: GradBucket<B>,
    ) -> Result<Tensor<B, 1>, CommError> {
        if bucket.index == 0 {
            self.steps += 1;
        }
        let matrices = if self.steps > self.start_step { self.matrices(&bucket) } else { Vec::new() };
        if matrices.is_empty() {
            return comm.all_reduce(bucket.buffer, ReduceOp::Mean);
        }
        let device = bucket.buffer.device();
        let len = bucket.buffer.dims()[0];
        // What is sent as it is: every value outside the compressed matrices.
        let mut plain: Vec<Range<usize>> = Vec::new();
        let mut at = 0;
        for m in &matrices {
            if at < m.range.start {
                plain.push(at..m.range.start);
            }
            at = m.range.end;
        }
        if at < len {
            plain.push(at..len);
        }

        // M += error; P = M·Q.
        let mut inputs = Vec::with_capacity(matrices.len());
        let mut ps = Vec::with_capacity(matrices.len());
        for m in &matrices {
            let key = (bucket.index, m.range.start);
            let factors = self.state.entry(key).or_insert_with(|| Factors {
                error: Tensor::zeros([m.rows, m.cols], &device),
                q: first_q::<B>(m.cols, m.rank, ((key.0 as u64) << 32) | key.1 as u64, &device),
            });
            let input =
                bucket.buffer.clone().slice([m.range.clone()]).reshape([m.rows, m.cols]) + factors.error.clone();
            ps.push(input.clone().matmul(factors.q.clone()));
            inputs.push(input);
        }

        // One all-reduce for the plain values and every P.
        let plain_len: usize = plain.iter().map(|r| r.len()).sum();
        let mut first: Vec<Tensor<B, 1>> = plain.iter().map(|r| bucket.buffer.clone().slice([r.clone()])).collect();
        first.extend(ps.iter().zip(&matrices).map(|(p, m)| p.clone().reshape([m.rows * m.rank])));
        let reduced = comm.all_reduce(Tensor::cat(first, 0), ReduceOp::Mean)?;

        // Q = Mᵀ·P with P orthonormal, averaged in a second call.
        let mut offset = plain_len;
        let mut ps_done = Vec::with_capacity(matrices.len());
        let mut qs = Vec::with_capacity(matrices.len());
        for (m, input) in matrices.iter().zip(&inputs) {
            let p = reduced.clone().slice([offset..offset + m.rows * m.rank]).reshape([m.rows, m.rank]);
            offset += m.rows * m.rank;
            let p = orthonormal(p);
            qs.push(input.clone().transpose().matmul(p.clone()).reshape([m.cols * m.rank]));
            ps_done.push(p);
        }
        let qs = comm.all_reduce(Tensor::cat(qs, 0), ReduceOp::Mean)?;

        // The bucket back in order: plain values and P·Qᵀ, error kept.
        let mut pieces: Vec<(usize, Tensor<B, 1>)> = Vec::new();
        let mut taken = 0;
        for r in &plain {
            pieces.push((r.start, reduced.clone().slice([taken..taken + r.len()])));
            taken += r.len();
        }
        let mut offset = 0;
        for ((m, input), p) in matrices.iter().zip(inputs).zip(ps_done) {
            let q = qs.clone().slice([offset..offset + m.cols * m.rank]).reshape([m.cols, m.rank]);
            offset += m.cols * m.rank;
            let approx = p.matmul(q.clone().transpose());
            let factors = self.state.get_mut(&(bucket.index, m.range.start)).expect("made above");
            factors.error = input - approx.clone();
            factors.q = q;
            pieces.push((m.range.start, approx.reshape([m.rows * m.cols])));
        }
        pieces.sort_by_key(|(start, _)| *start);
        Ok(Tensor::cat(pieces.into_iter().map(|(_, t)| t).collect(), 0))
    }
}

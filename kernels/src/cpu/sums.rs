//! Sums of f32 values in independent lanes: one running sum is a chain of
//! dependent additions, which the compiler may not reorder into vector adds.

/// The sums of both halves of `term(a[i], b[i])` over `i`, in eight lanes.
pub fn lane_sums(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> (f32, f32)) -> (f32, f32) {
    const LANES: usize = 8;
    let (mut first, mut second) = ([0.0f32; LANES], [0.0f32; LANES]);
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = a_blocks.remainder().iter().zip(b_blocks.remainder());
    for (a, b) in a_blocks.zip(b_blocks) {
        for lane in 0..LANES {
            let (u, v) = term(a[lane], b[lane]);
            first[lane] += u;
            second[lane] += v;
        }
    }
    let (mut u_sum, mut v_sum) = (first.iter().sum::<f32>(), second.iter().sum::<f32>());
    for (&a, &b) in tail {
        let (u, v) = term(a, b);
        u_sum += u;
        v_sum += v;
    }
    (u_sum, v_sum)
}

/// The sum of `values`, in eight lanes.
pub fn sum(values: &[f32]) -> f32 {
    lane_sums(values, values, |v, _| (v, 0.0)).0
}

#[cfg(test)]
mod tests {
    #[test]
    fn lanes_and_the_tail_all_count() {
        for n in [0usize, 1, 7, 8, 9, 17, 100] {
            let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
            assert_eq!(super::sum(&values), (n * n.saturating_sub(1) / 2) as f32, "{n} values");
            let (a, b) = super::lane_sums(&values, &values, |x, y| (x, x * y));
            assert_eq!((a, b), (values.iter().sum(), values.iter().map(|v| v * v).sum()), "{n} values");
        }
    }
}

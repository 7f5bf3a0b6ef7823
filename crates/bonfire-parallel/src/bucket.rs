//! Assignment of parameters to gradient buckets, as PyTorch's reducer does:
//! in reverse parameter order (roughly the order backward finishes them), a
//! small first bucket so that communication starts early, then larger ones.

use std::ops::Range;

/// Which bucket and which range of it each parameter's gradient occupies.
#[derive(Debug, Clone)]
pub struct BucketPlan {
    /// Elements in each bucket, in launch order.
    pub lens: Vec<usize>,
    /// Parameter indices in each bucket.
    pub members: Vec<Vec<usize>>,
    /// Per parameter (visiting order): its bucket and range, or `None` when frozen.
    pub slots: Vec<Option<(usize, Range<usize>)>>,
}

impl BucketPlan {
    /// `numels[i]` is parameter i's element count, `None` when frozen. A bucket
    /// is closed once adding the next gradient would pass its cap (bytes of
    /// f32); a cap of 0 gives one bucket per parameter.
    pub fn new(numels: &[Option<usize>], first_cap_bytes: usize, cap_bytes: usize) -> Self {
        let mut plan = BucketPlan { lens: Vec::new(), members: Vec::new(), slots: vec![None; numels.len()] };
        let mut open: Vec<usize> = Vec::new();
        let mut len = 0usize;
        for index in (0..numels.len()).rev() {
            let Some(n) = numels[index] else { continue };
            let cap = if plan.lens.is_empty() { first_cap_bytes } else { cap_bytes } / 4;
            if !open.is_empty() && len + n > cap {
                plan.close(&mut open, &mut len);
            }
            plan.slots[index] = Some((plan.lens.len(), len..len + n));
            open.push(index);
            len += n;
        }
        if !open.is_empty() {
            plan.close(&mut open, &mut len);
        }
        plan
    }

    fn close(&mut self, open: &mut Vec<usize>, len: &mut usize) {
        self.lens.push(*len);
        self.members.push(std::mem::take(open));
        *len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_order_small_first_bucket_then_cap() {
        // 6 parameters of 100 floats (400 bytes); first cap 500 B, then 1000 B.
        let plan = BucketPlan::new(&[Some(100); 6], 500, 1000);
        assert_eq!(plan.members, vec![vec![5], vec![4, 3], vec![2, 1], vec![0]]);
        assert_eq!(plan.lens, vec![100, 200, 200, 100]);
        assert_eq!(plan.slots[3], Some((1, 100..200)));
    }

    #[test]
    fn frozen_parameters_get_no_slot_and_huge_ones_their_own_bucket() {
        let plan = BucketPlan::new(&[Some(10), None, Some(10_000_000), Some(10)], 1 << 20, 25 << 20);
        assert_eq!(plan.slots[1], None);
        assert_eq!(plan.members, vec![vec![3], vec![2], vec![0]]);
    }

    #[test]
    fn zero_cap_is_one_bucket_per_parameter() {
        let plan = BucketPlan::new(&[Some(3), Some(4), Some(5)], 0, 0);
        assert_eq!(plan.members, vec![vec![2], vec![1], vec![0]]);
    }
}

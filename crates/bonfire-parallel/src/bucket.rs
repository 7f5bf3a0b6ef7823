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

    /// Buckets sent each step: at least one, since the last also carries
    /// the unused-parameter count ([`count_slot`](Self::count_slot)).
    pub fn buckets(&self) -> usize {
        self.lens.len().max(1)
    }

    /// The parameters in bucket `b` (none in the bucket of a module with
    /// nothing to train, which carries only the count).
    pub fn members(&self, b: usize) -> &[usize] {
        self.members.get(b).map_or(&[], Vec::as_slice)
    }

    /// Values bucket `b` sends: its gradients, and in the last bucket the
    /// unused-parameter count after them.
    pub fn sent_len(&self, b: usize) -> usize {
        self.lens.get(b).copied().unwrap_or(0) + usize::from(b + 1 == self.buckets())
    }

    /// Where the count of parameters that got no gradient on this rank
    /// rides: one value after the last bucket's gradients, so that all
    /// ranks learn whether any rank had unused parameters with no
    /// collective of its own.
    pub fn count_slot(&self) -> (usize, Range<usize>) {
        let last = self.buckets() - 1;
        let at = self.lens.get(last).copied().unwrap_or(0);
        (last, at..at + 1)
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
    fn the_unused_parameter_count_follows_the_last_buckets_gradients() {
        let plan = BucketPlan::new(&[Some(100); 3], 500, 1000);
        assert_eq!((plan.buckets(), plan.sent_len(0), plan.sent_len(1)), (2, 100, 201));
        assert_eq!(plan.count_slot(), (1, 200..201));
        // Nothing to train: one bucket, of the count alone.
        let frozen = BucketPlan::new(&[None, None], 500, 1000);
        assert_eq!((frozen.buckets(), frozen.sent_len(0), frozen.members(0)), (1, 1, &[][..]));
        assert_eq!(frozen.count_slot(), (0, 0..1));
    }

    #[test]
    fn zero_cap_is_one_bucket_per_parameter() {
        let plan = BucketPlan::new(&[Some(3), Some(4), Some(5)], 0, 0);
        assert_eq!(plan.members, vec![vec![2], vec![1], vec![0]]);
    }
}

//! The distributed sampler: which samples each rank trains on, per epoch.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{DataError, Result};

/// As PyTorch's `DistributedSampler`: every rank sees the same ordering of
/// the data set (shuffled with `seed + epoch`, or in order), cut to a
/// multiple of the world size, and takes positions `rank, rank + world, ...`.
/// With `drop_last` the tail that does not divide evenly is dropped;
/// otherwise the ordering is padded with its own first samples.
#[derive(Debug, Clone)]
pub struct DistributedSampler {
    /// Samples in the data set.
    pub len: usize,
    /// This worker's rank.
    pub rank: usize,
    /// Workers sharing the data set.
    pub world: usize,
    /// Whether each epoch visits the samples in a new order.
    pub shuffle: bool,
    /// The shuffle's seed, the same on every rank.
    pub seed: u64,
    /// Drop the tail that does not fill a share for every rank, instead of padding it with repeated samples.
    pub drop_last: bool,
}

impl DistributedSampler {
    /// Checks that `rank` is below `world`.
    pub fn new(len: usize, rank: usize, world: usize, shuffle: bool, seed: u64, drop_last: bool) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(DataError::Invalid(format!("rank {rank} is not a rank of a world of {world}")));
        }
        if len == 0 || (drop_last && len < world) {
            return Err(DataError::Invalid(format!("a data set of {len} samples cannot be shared by {world} ranks")));
        }
        Ok(DistributedSampler { len, rank, world, shuffle, seed, drop_last })
    }

    /// Samples each rank gets per epoch.
    pub fn per_rank(&self) -> usize {
        if self.drop_last {
            self.len / self.world
        } else {
            self.len.div_ceil(self.world)
        }
    }

    /// This rank's sample indices for `epoch`, in order.
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        let mut order = self.order(epoch);
        let total = self.per_rank() * self.world;
        let mut k = 0;
        while order.len() < total {
            order.push(order[k]);
            k += 1;
        }
        order.truncate(total);
        order.into_iter().skip(self.rank).step_by(self.world).collect()
    }

    /// This rank's samples for `epoch` with neither padding nor dropping:
    /// every sample once over all ranks, the shares differing by at most
    /// one (for DDP with uneven inputs).
    pub fn exact_share(&self, epoch: u64) -> Vec<usize> {
        self.order(epoch).into_iter().skip(self.rank).step_by(self.world).collect()
    }

    /// Every sample, in the epoch's order.
    fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(self.seed.wrapping_add(epoch)));
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_shuffle_the_union_of_step_i_is_the_global_batch_i() {
        let (len, world, global) = (1000, 4, 100);
        let per = global / world;
        let shards: Vec<Vec<usize>> =
            (0..world).map(|r| DistributedSampler::new(len, r, world, false, 0, false).unwrap().indices(0)).collect();
        for step in 0..len / global {
            let mut union: Vec<usize> = shards.iter().flat_map(|s| s[step * per..(step + 1) * per].to_vec()).collect();
            union.sort();
            assert_eq!(union, (step * global..(step + 1) * global).collect::<Vec<_>>());
        }
    }

    #[test]
    fn shuffled_shards_partition_the_epoch_and_change_with_it() {
        let shards = |epoch| -> Vec<Vec<usize>> {
            (0..3).map(|r| DistributedSampler::new(10, r, 3, true, 7, true).unwrap().indices(epoch)).collect()
        };
        let e0 = shards(0);
        let mut all: Vec<usize> = e0.concat();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 9, "drop_last keeps 9 of 10, each once");
        assert_ne!(e0, shards(1), "another epoch, another order");
        assert_eq!(e0, shards(0), "the same seed and epoch, the same order");
    }

    #[test]
    fn padding_repeats_the_first_samples() {
        let s: Vec<Vec<usize>> =
            (0..3).map(|r| DistributedSampler::new(7, r, 3, false, 0, false).unwrap().indices(0)).collect();
        assert_eq!(s, vec![vec![0, 3, 6], vec![1, 4, 0], vec![2, 5, 1]]);
    }

    #[test]
    fn exact_shares_hold_every_sample_once_in_the_epochs_order() {
        let shares: Vec<Vec<usize>> =
            (0..3).map(|r| DistributedSampler::new(7, r, 3, true, 5, false).unwrap().exact_share(2)).collect();
        assert_eq!(shares.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 2, 2]);
        let mut all = shares.concat();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        let padded = DistributedSampler::new(7, 1, 3, true, 5, false).unwrap().indices(2);
        assert_eq!(padded[..2], shares[1][..], "the same order as the padded shares, without the padding");
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(DistributedSampler::new(10, 2, 2, false, 0, false).is_err());
        assert!(DistributedSampler::new(10, 0, 0, false, 0, false).is_err());
        assert!(DistributedSampler::new(1, 0, 2, false, 0, true).is_err());
    }
}

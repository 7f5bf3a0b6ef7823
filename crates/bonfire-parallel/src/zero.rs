//! ZeRO stage 1 for DDP (PyTorch's `ZeroRedundancyOptimizer`): each rank
//! keeps the optimizer state of its shard of the parameters only.
//!
//! A step: DDP's `backward` has averaged every gradient on every rank; the
//! rank steps its own shard with the wrapped optimizer, which therefore
//! builds state (Adam's moments, SGD's momentum) for that shard alone; then
//! each owner broadcasts its updated shard, and each rank takes the others'
//! values. PyTorch's version has the same traffic: DDP's all-reduce, then a
//! broadcast from each shard's owner.
//!
//! The shards are drawn as PyTorch draws them: parameters largest first,
//! each to the rank with the fewest values so far ([`partition`]), the same
//! on every rank because every rank has the same parameters in the same
//! order (DDP checks that).

use std::marker::PhantomData;
use std::sync::Arc;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::LearningRate;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{Tensor, TensorData};

use crate::comm_thread::CommThread;
use crate::ddp::host_call;
use crate::error::Result;
use crate::hook::HookBackend;

/// Where the parameters go: their owners and their places in the shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Partition {
    /// The rank that steps each float parameter, in visiting order (None:
    /// frozen, stepped by nobody).
    pub owners: Vec<Option<usize>>,
    /// Where each owned parameter's values start in its owner's shard.
    pub offsets: Vec<usize>,
    /// Each rank's shard, in values.
    pub shard_lens: Vec<usize>,
}

/// Shards `numels` (None for frozen parameters) over `world` ranks: the
/// largest parameter first, each to the rank with the fewest values so far
/// (ties to the lower rank); within a shard, parameters in visiting order.
pub(crate) fn partition(numels: &[Option<usize>], world: usize) -> Partition {
    let mut order: Vec<usize> = (0..numels.len()).filter(|&i| numels[i].is_some()).collect();
    // Stable: equal sizes keep visiting order.
    order.sort_by_key(|&i| std::cmp::Reverse(numels[i]));
    let mut owners = vec![None; numels.len()];
    let mut shard_lens = vec![0usize; world];
    for i in order {
        let rank = (0..world).min_by_key(|&r| (shard_lens[r], r)).expect("world is at least 1");
        owners[i] = Some(rank);
        shard_lens[rank] += numels[i].unwrap_or(0);
    }
    let mut filled = vec![0usize; world];
    let offsets = (0..numels.len())
        .map(|i| match owners[i] {
            Some(r) => {
                let at = filled[r];
                filled[r] += numels[i].unwrap_or(0);
                at
            }
            None => 0,
        })
        .collect();
    Partition { owners, offsets, shard_lens }
}

/// An optimizer that steps this rank's shard of the parameters and keeps
/// state for it alone; made by
/// [`DistributedDataParallel::shard_optimizer`](crate::DistributedDataParallel::shard_optimizer).
pub struct ShardedOptimizer<B: HookBackend, M, O> {
    inner: O,
    comm: Arc<CommThread<B::InnerBackend>>,
    device: B::Device,
    partition: Partition,
    rank: usize,
    _module: PhantomData<M>,
}

impl<B: HookBackend, M: AutodiffModule<B>, O: Optimizer<M, B>> ShardedOptimizer<B, M, O> {
    pub(crate) fn new(
        inner: O,
        comm: Arc<CommThread<B::InnerBackend>>,
        device: B::Device,
        numels: &[Option<usize>],
    ) -> Self {
        let (rank, world) = (comm.rank(), comm.world_size());
        ShardedOptimizer { inner, comm, device, partition: partition(numels, world), rank, _module: PhantomData }
    }

    /// Steps this rank's shard with `grads` (DDP's averaged gradients; the
    /// others' are dropped), then gives every rank every shard's new values.
    pub fn step(&mut self, lr: LearningRate, module: M, grads: GradientsParams) -> Result<M> {
        let mut keep = KeepOwn::<B> {
            all: grads,
            own: GradientsParams::new(),
            partition: &self.partition,
            rank: self.rank,
            index: 0,
            _b: PhantomData,
        };
        module.visit(&mut keep);
        let module = self.inner.step(lr, module, keep.own);
        self.gather(module)
    }

    /// Every shard's values from its owner, on every rank: one broadcast
    /// a rank, each of its shard's own length (an all-gather would pad every
    /// shard to the longest, and whole parameters make shards uneven).
    fn gather(&self, module: M) -> Result<M> {
        let world = self.comm.world_size();
        if world == 1 {
            return Ok(module);
        }
        let mut pack = Pack::<B> {
            shard: vec![0.0; self.partition.shard_lens[self.rank]],
            partition: &self.partition,
            rank: self.rank,
            index: 0,
            _b: PhantomData,
        };
        module.visit(&mut pack);
        let mut shards = Vec::with_capacity(world);
        for (root, &len) in self.partition.shard_lens.iter().enumerate() {
            let values = if root == self.rank { std::mem::take(&mut pack.shard) } else { vec![0.0; len] };
            shards.push(if len == 0 {
                values
            } else {
                host_call(&self.comm, &self.device, values, move |c, t| c.broadcast(t, root))?
            });
        }
        let mut unpack = Unpack { shards: &shards, partition: &self.partition, rank: self.rank, index: 0 };
        Ok(module.map(&mut unpack))
    }

    /// The wrapped optimizer, whose state covers this rank's shard (its
    /// `to_record()` is the shard's record).
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// Parameter values this rank steps and keeps state for.
    pub fn shard_len(&self) -> usize {
        self.partition.shard_lens[self.rank]
    }

    /// Whether this rank steps the `index`-th float parameter (visiting order).
    pub fn owns(&self, index: usize) -> bool {
        self.partition.owners.get(index).copied().flatten() == Some(self.rank)
    }
}

/// Moves this rank's gradients from `all` to `own`.
struct KeepOwn<'a, B: HookBackend> {
    all: GradientsParams,
    own: GradientsParams,
    partition: &'a Partition,
    rank: usize,
    index: usize,
    _b: PhantomData<B>,
}

impl<B: HookBackend> ModuleVisitor<B> for KeepOwn<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.partition.owners[self.index] == Some(self.rank) {
            if let Some(grad) = self.all.remove::<B::InnerBackend, D>(param.id) {
                self.own.register::<B::InnerBackend, D>(param.id, grad);
            }
        }
        self.index += 1;
    }
}

/// This rank's parameters' values, at their places in its shard.
struct Pack<'a, B> {
    shard: Vec<f32>,
    partition: &'a Partition,
    rank: usize,
    index: usize,
    _b: PhantomData<B>,
}

impl<B: HookBackend> ModuleVisitor<B> for Pack<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.partition.owners[self.index] == Some(self.rank) {
            let data = param.val().into_data().convert::<f32>();
            let values = data.as_slice::<f32>().expect("converted to f32");
            self.shard[self.partition.offsets[self.index]..][..values.len()].copy_from_slice(values);
        }
        self.index += 1;
    }
}

/// The other ranks' parameters from their shards.
struct Unpack<'a> {
    shards: &'a [Vec<f32>],
    partition: &'a Partition,
    rank: usize,
    index: usize,
}

impl<B: HookBackend> ModuleMapper<B> for Unpack<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let index = self.index;
        self.index += 1;
        let owner = match self.partition.owners[index] {
            Some(owner) if owner != self.rank => owner,
            _ => return param,
        };
        let (shard, start) = (&self.shards[owner], self.partition.offsets[index]);
        param.map(|tensor| {
            let shape = tensor.dims();
            let values = shard[start..start + shape.iter().product::<usize>()].to_vec();
            let data = TensorData::new(values, shape).convert_dtype(tensor.dtype());
            Tensor::from_data(data, &tensor.device()).set_require_grad(tensor.is_require_grad())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_go_first_to_the_emptiest_rank_and_frozen_ones_to_nobody() {
        let p = partition(&[Some(10), None, Some(40), Some(30), Some(5), Some(30)], 2);
        // 40 -> 0; 30 (index 3) -> 1; 30 (index 5) -> 1 (30 < 40); 10 -> 0; 5 -> 0 (50 vs 60).
        assert_eq!(p.owners, vec![Some(0), None, Some(0), Some(1), Some(0), Some(1)]);
        assert_eq!(p.shard_lens, vec![55, 60]);
        // Within a shard, visiting order: rank 0 holds indices 0, 2, 4.
        assert_eq!((p.offsets[0], p.offsets[2], p.offsets[4]), (0, 10, 50));
        assert_eq!((p.offsets[3], p.offsets[5]), (0, 30));
    }

    #[test]
    fn every_value_is_in_exactly_one_shard() {
        let numels: Vec<Option<usize>> = (0..17).map(|i| (i % 5 != 0).then_some(i * 37 % 101 + 1)).collect();
        for world in 1..6 {
            let p = partition(&numels, world);
            let total: usize = numels.iter().flatten().sum();
            assert_eq!(p.shard_lens.iter().sum::<usize>(), total);
            for rank in 0..world {
                let mut spans: Vec<(usize, usize)> = (0..numels.len())
                    .filter(|&i| p.owners[i] == Some(rank))
                    .map(|i| (p.offsets[i], p.offsets[i] + numels[i].unwrap()))
                    .collect();
                spans.sort();
                assert!(spans.windows(2).all(|w| w[0].1 == w[1].0), "world {world} rank {rank}: {spans:?}");
                assert_eq!(spans.last().map_or(0, |s| s.1), p.shard_lens[rank]);
            }
            assert_eq!(p.owners.iter().filter(|o| o.is_none()).count(), numels.iter().filter(|n| n.is_none()).count());
        }
    }
}

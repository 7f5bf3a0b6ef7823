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
//!
//! A checkpoint holds the whole optimizer's state, as PyTorch's
//! `consolidate_state_dict` gathers it: every rank serialises its shard's
//! record and broadcasts it, and each rank joins the shards into the record
//! one optimizer stepping every parameter would have. Records are keyed by
//! parameter id, and each rank made its module, and so its ids, itself:
//! shards travel keyed by the parameters' places in visiting order instead.
//! Sharding an optimizer that holds such a record keeps the shard's entries
//! only, so a checkpoint moves between sharded and whole runs, and between
//! world sizes.

use std::collections::HashSet;
use std::marker::PhantomData;
use std::sync::Arc;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::LearningRate;
use burn::optim::{GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::{Tensor, TensorData};
use hashbrown::HashMap;

use crate::comm_thread::CommThread;
use crate::ddp::host_call;
use crate::error::{ParallelError, Result};
use crate::hook::HookBackend;

/// An optimizer record of one entry per parameter, as the records of Burn's
/// optimizers (`OptimizerAdaptor`) are: a [`ShardedOptimizer`] keeps its
/// shard's entries and joins every rank's into the whole optimizer's record.
pub trait PerParameterRecord {
    /// Gives each entry the id `rekey` maps its id to, and drops the
    /// entries it maps to `None`.
    fn rekey(&mut self, rekey: &dyn Fn(ParamId) -> Option<ParamId>);

    /// Adds `other`'s entries.
    fn absorb(&mut self, other: Self);
}

impl<T> PerParameterRecord for HashMap<ParamId, T> {
    fn rekey(&mut self, rekey: &dyn Fn(ParamId) -> Option<ParamId>) {
        *self = self.drain().filter_map(|(id, entry)| rekey(id).map(|id| (id, entry))).collect();
    }

    fn absorb(&mut self, other: Self) {
        self.extend(other);
    }
}

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
    /// Every float parameter's id on this rank, in visiting order.
    ids: Vec<ParamId>,
    _module: PhantomData<M>,
}

impl<B: HookBackend, M: AutodiffModule<B>, O: Optimizer<M, B>> ShardedOptimizer<B, M, O>
where
    O::Record: PerParameterRecord,
{
    /// `inner` sharded for `module`, whose float parameters have `numels`
    /// values (None: frozen); whatever state `inner` holds beyond this
    /// rank's shard is dropped.
    pub(crate) fn new(
        inner: O,
        comm: Arc<CommThread<B::InnerBackend>>,
        device: B::Device,
        module: &M,
        numels: &[Option<usize>],
    ) -> Self {
        let (rank, world) = (comm.rank(), comm.world_size());
        let partition = partition(numels, world);
        let mut ids = Ids::<B>(Vec::new(), PhantomData);
        module.visit(&mut ids);
        let ids = ids.0;
        let own: HashSet<ParamId> =
            ids.iter().zip(&partition.owners).filter(|(_, o)| **o == Some(rank)).map(|(id, _)| *id).collect();
        let mut record = inner.to_record();
        record.rekey(&|id| own.contains(&id).then_some(id));
        let inner = inner.load_record(record);
        ShardedOptimizer { inner, comm, device, partition, rank, ids, _module: PhantomData }
    }

    /// The whole optimizer's state, on every rank: each rank's shard
    /// serialised, broadcast, and joined. A collective: every rank calls it
    /// at the same point. It is what a checkpoint saves; an optimizer loaded
    /// with it steps every parameter as this one would, sharded or not.
    pub fn record(&self) -> Result<O::Record> {
        let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
        let places: HashMap<ParamId, u64> = self.ids.iter().enumerate().map(|(i, id)| (*id, i as u64)).collect();
        let mut shard = self.inner.to_record();
        shard.rekey(&|id| places.get(&id).map(|&i| ParamId::from(i)));
        let encoded = Recorder::<B>::record(&recorder, shard, ())
            .map_err(|e| ParallelError::Invalid(format!("encoding the optimizer shard: {e:?}")))?;
        let mut whole: Option<O::Record> = None;
        for (root, bytes) in self.exchange(encoded)?.into_iter().enumerate() {
            let mut shard: O::Record = Recorder::<B>::load(&recorder, bytes, &self.device)
                .map_err(|e| ParallelError::Invalid(format!("decoding rank {root}'s optimizer shard: {e:?}")))?;
            shard.rekey(&|place| self.ids.get(place.val() as usize).copied());
            match &mut whole {
                Some(whole) => whole.absorb(shard),
                None => whole = Some(shard),
            }
        }
        Ok(whole.expect("a world of at least one rank"))
    }

    /// Every rank's `bytes`, in rank order, on every rank.
    fn exchange(&self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let world = self.comm.world_size();
        if world == 1 {
            return Ok(vec![bytes]);
        }
        let lens = host_call(&self.comm, &self.device, split_len(bytes.len()).to_vec(), |c, t| c.all_gather(t))?;
        let mut all = Vec::with_capacity(world);
        for root in 0..world {
            let len = joined_len([lens[2 * root], lens[2 * root + 1]]);
            let values = if root == self.rank { pack(&bytes) } else { vec![0.0; len.div_ceil(3)] };
            let values = host_call(&self.comm, &self.device, values, move |c, t| c.broadcast(t, root))?;
            all.push(unpack(&values, len));
        }
        Ok(all)
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

/// Bytes as f32 values, three to a value, each value an integer below
/// 2^24: exact in f32 whatever the collective or the device does with it.
fn pack(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks(3).map(|c| c.iter().rev().fold(0u32, |v, &b| (v << 8) | u32::from(b)) as f32).collect()
}

/// The first `len` bytes of [`pack`]ed values.
fn unpack(values: &[f32], len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = values.iter().flat_map(|&v| (v as u32).to_le_bytes().into_iter().take(3)).collect();
    bytes.truncate(len);
    bytes
}

/// A length as two f32 values of 24 bits each.
fn split_len(len: usize) -> [f32; 2] {
    [(len >> 24) as f32, (len & 0xFF_FFFF) as f32]
}

fn joined_len([high, low]: [f32; 2]) -> usize {
    ((high as usize) << 24) | low as usize
}

/// Every float parameter's id, in visiting order.
struct Ids<B>(Vec<ParamId>, PhantomData<B>);

impl<B: HookBackend> ModuleVisitor<B> for Ids<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.id);
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
    fn bytes_and_lengths_survive_their_f32_form() {
        for len in [0, 1, 2, 3, 4, 5, 1000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 97 % 256) as u8).collect();
            assert_eq!(unpack(&pack(&bytes), len), bytes);
            assert!(pack(&bytes).iter().all(|&v| v < (1 << 24) as f32 && v.fract() == 0.0));
        }
        assert_eq!(unpack(&pack(&[255, 255, 255]), 3), vec![255, 255, 255]);
        for len in [0, 5, (1 << 24) - 1, 1 << 24, 80_000_123, 1 << 40] {
            assert_eq!(joined_len(split_len(len)), len);
        }
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

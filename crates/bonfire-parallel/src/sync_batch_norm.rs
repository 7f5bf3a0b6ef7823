//! SyncBatchNorm's sum across ranks ([`DdpConfig::sync_batch_norm`]): DDP's
//! group as the [`SumAcrossRanks`] that batch norm uses for its statistics,
//! an autodiff op whose backward sums the gradient across the ranks too.
//!
//! The statistics are a few values per channel. They go through the host
//! and the communication thread, queued after whatever buckets wait there,
//! so that they keep their place in the one order of collectives that every
//! rank follows. A failed sum is kept for DDP's `backward` to report; until
//! then the rank goes on with its own statistics.
//!
//! [`DdpConfig::sync_batch_norm`]: crate::DdpConfig::sync_batch_norm

use std::sync::{Arc, Mutex};

use bonfire_collective::ReduceOp;
use bonfire_kernels::nn::SumAcrossRanks;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;

use crate::comm_thread::CommThread;
use crate::ddp::host_call;
use crate::error::ParallelError;
use crate::hook::HookBackend;
use crate::join::{Call, StepLog};

/// Sums tensors of the inner backend over the group, through the host
/// (public only to the sealed trait below: the module is private).
pub struct RankSum<B: Backend> {
    comm: Arc<CommThread<B>>,
    /// Where host values become a tensor for the collective.
    device: B::Device,
    failure: Mutex<Option<ParallelError>>,
    /// Where each sum is recorded, for uneven inputs.
    log: Arc<StepLog>,
}

impl<B: Backend> RankSum<B> {
    pub(crate) fn new(comm: Arc<CommThread<B>>, device: B::Device, log: Arc<StepLog>) -> Self {
        RankSum { comm, device, failure: Mutex::new(None), log }
    }

    /// Sums `values` in place; on failure keeps them and the error.
    fn sum_host(&self, values: &mut [f32]) {
        self.log.record(Call::Sum(values.len()));
        match host_call(&self.comm, &self.device, values.to_vec(), |c, t| c.all_reduce(t, ReduceOp::Sum)) {
            Ok(sum) => values.copy_from_slice(&sum),
            Err(e) => {
                self.failure.lock().expect("not poisoned").get_or_insert(e);
            }
        }
    }

    /// Sums a tensor through [`sum_host`](Self::sum_host).
    fn sum(&self, values: FloatTensor<B>) -> FloatTensor<B> {
        let tensor = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(values));
        let (device, dtype, len) = (tensor.device(), tensor.dtype(), tensor.dims()[0]);
        let mut host = tensor.into_data().convert::<f32>().to_vec::<f32>().expect("converted to f32");
        self.sum_host(&mut host);
        Tensor::<B, 1>::from_data(TensorData::new(host, [len]), &device).cast(dtype).into_primitive().tensor()
    }

    /// The first failed sum since the last call, if any.
    pub(crate) fn take_failure(&self) -> Option<ParallelError> {
        self.failure.lock().expect("not poisoned").take()
    }
}

/// DDP's group as batch norm sees it, on the autodiff backend `B`.
pub(crate) struct SyncStats<B: HookBackend> {
    pub(crate) ranks: Arc<RankSum<B::InnerBackend>>,
}

impl<B: HookBackend> SumAcrossRanks<B> for SyncStats<B> {
    fn sum(&self, values: Tensor<B, 1>) -> Tensor<B, 1> {
        let summed = B::sum_across_ranks(values.into_primitive().tensor(), self.ranks.clone());
        Tensor::from_primitive(TensorPrimitive::Float(summed))
    }

    fn sum_host(&self, values: &mut [f32]) {
        self.ranks.sum_host(values)
    }

    fn rank(&self) -> usize {
        self.ranks.comm.rank()
    }

    fn ranks(&self) -> usize {
        self.ranks.comm.world_size()
    }
}

pub(crate) mod sealed {
    use super::*;

    /// The sum as an op of `Autodiff<B, C>`; out of reach outside this crate.
    pub trait SumAcrossRanksOp: burn::tensor::backend::AutodiffBackend {
        fn sum_across_ranks(tensor: FloatTensor<Self>, ranks: Arc<RankSum<Self::InnerBackend>>) -> FloatTensor<Self>;
    }
}

/// The backward op's state: the group.
struct Ranks<B: Backend>(Arc<RankSum<B>>);

impl<B: Backend> Clone for Ranks<B> {
    fn clone(&self) -> Self {
        Ranks(self.0.clone())
    }
}

impl<B: Backend> std::fmt::Debug for Ranks<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SumAcrossRanks")
    }
}

#[derive(Debug)]
struct SumBackward;

impl<B: Backend> Backward<B, 1> for SumBackward {
    type State = Ranks<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        // Every rank sums here, whatever it does with the result: the call
        // is a collective.
        let summed = ops.state.0.sum(grads.consume::<B>(&ops.node));
        if let Some(node) = parent {
            grads.register::<B>(node.id, summed);
        }
    }
}

impl<B: Backend, C: CheckpointStrategy> sealed::SumAcrossRanksOp for Autodiff<B, C> {
    fn sum_across_ranks(tensor: FloatTensor<Self>, ranks: Arc<RankSum<B>>) -> FloatTensor<Self> {
        let summed = ranks.sum(tensor.primitive.clone());
        // Compute-bound: a checkpointed graph must not run the collective again.
        match SumBackward.prepare::<C>([tensor.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(Ranks(ranks), summed),
            OpsKind::UnTracked(prep) => prep.finish(summed),
        }
    }
}

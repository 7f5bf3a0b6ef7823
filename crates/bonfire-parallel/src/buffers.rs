//! Buffers: a module's float tensors that get no gradient, above all batch
//! norm's running statistics (Burn's `RunningState`). Each rank updates them
//! from its own batches; DDP gives every rank one rank's values (rank 0's,
//! or with uneven inputs those of the highest rank still training), as
//! PyTorch's `broadcast_buffers` does.
//!
//! Two facts of Burn 0.21 shape this file. A `RunningState` keeps the value
//! of its latest update aside (per thread) until something settles it, and
//! visiting a module reads the unsettled value: [`settle`] settles them
//! first. And clones of a module share their `RunningState`s, so writing the
//! broadcast values into any clone writes them into the caller's module.
//! DataParallel's replicas, which own their buffers, hand theirs back
//! through [`average_into`].

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};

use crate::comm_thread::CommThread;
use crate::device_move::to_device;
use crate::error::Result;

/// Folds every pending `RunningState` update of `module` into its value
/// (turning a clone into a record settles the states it shares).
pub fn settle<B: Backend, M: Module<B>>(module: &M) {
    drop(module.clone().into_record());
}

/// Gives every rank `root`'s buffers of `module` (and of every module that
/// shares them). A module without buffers costs no collective.
pub fn broadcast<B: AutodiffBackend, M: AutodiffModule<B>>(
    comm: &CommThread<B::InnerBackend>,
    module: &M,
    root: usize,
) -> Result<()> {
    settle::<B, M>(module);
    let mut gather = Gather::<B>(Vec::new());
    module.visit(&mut gather);
    if gather.0.is_empty() {
        return Ok(());
    }
    // Concatenated on the communication thread, as the reducer's buckets
    // are: cubecl orders a thread's GPU work on that thread's own stream,
    // and NCCL reads the memory directly.
    let parts = gather.0;
    let values = comm.call(move |c| c.broadcast(Tensor::cat(parts, 0), root))?;
    drop(module.clone().map(&mut Scatter::<B> { values, offset: 0 }));
    Ok(())
}

/// Sets every buffer of `module` to the mean of the `replicas`' values
/// (replicas of `module`, possibly on other devices).
pub fn average_into<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, replicas: &[M]) {
    let mut sum: Option<Tensor<B::InnerBackend, 1>> = None;
    for replica in replicas {
        settle::<B, M>(replica);
        let mut gather = Gather::<B>(Vec::new());
        replica.visit(&mut gather);
        if gather.0.is_empty() {
            return;
        }
        let values = Tensor::cat(gather.0, 0);
        sum = Some(match sum {
            Some(sum) => to_device(values, &sum.device()) + sum,
            None => values,
        });
    }
    if let Some(sum) = sum {
        let values = sum / replicas.len() as f32;
        drop(module.clone().map(&mut Scatter::<B> { values, offset: 0 }));
    }
}

fn is_buffer<B: Backend, const D: usize>(tensor: &Tensor<B, D>) -> bool {
    !tensor.is_require_grad()
}

/// Every buffer, flattened and as f32, in visiting order.
struct Gather<B: AutodiffBackend>(Vec<Tensor<B::InnerBackend, 1>>);

impl<B: AutodiffBackend> ModuleVisitor<B> for Gather<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if is_buffer(&value) {
            let n = value.shape().num_elements();
            self.0.push(value.inner().reshape([n]).cast(DType::F32));
        }
    }
}

/// Replaces every buffer by the next values of `values`, laid out as [`Gather`] made them.
struct Scatter<B: AutodiffBackend> {
    values: Tensor<B::InnerBackend, 1>,
    offset: usize,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Scatter<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|tensor| {
            if !is_buffer(&tensor) {
                return tensor;
            }
            let (shape, dtype, device) = (tensor.dims(), tensor.dtype(), tensor.device());
            let n = tensor.shape().num_elements();
            let part = self.values.clone().slice([self.offset..self.offset + n]);
            self.offset += n;
            Tensor::from_inner(to_device(part, &device).reshape(shape).cast(dtype))
        })
    }
}

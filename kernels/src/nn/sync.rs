//! Batch statistics summed across the ranks of a data-parallel group: what
//! makes every [`BatchNorm`](super::BatchNorm) that runs forward on this
//! thread in training a synchronised batch norm (PyTorch's `SyncBatchNorm`),
//! with no change to the model's type or its records. On Flex the batch
//! norm kernel makes the calls itself (`sum_host`), forward and backward;
//! on other backends the statistics go through the differentiable `sum`.
//!
//! A data-parallel strategy (Bonfire's DDP with `sync_batch_norm`) installs
//! its group's [`SumAcrossRanks`] on the thread that runs the forward pass,
//! as PyTorch's `SyncBatchNorm` uses the default process group. Batch norm
//! then gathers every rank's count and each channel's mean and sum of
//! squared deviations in one call (each rank's in its own slot of a sum)
//! and combines them, and the sum's backward sums the statistics' gradients
//! the same way, so that every rank normalises with the global batch's
//! statistics and gets the gradient of the global batch.

use std::any::Any;
use std::cell::RefCell;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// A differentiable sum over the ranks of a group: every rank calls it at
/// the same points with a tensor of the same length and gets the
/// element-wise sum of all ranks' tensors; in backward, the gradient that
/// reaches the result is summed over the ranks the same way.
pub trait SumAcrossRanks<B: Backend>: Send + Sync {
    /// The element-wise sum of every rank's `values`.
    fn sum(&self, values: Tensor<B, 1>) -> Tensor<B, 1>;

    /// The same sum on values in host memory, in place, outside any
    /// autodiff graph: what the CPU kernel calls in its forward and in its
    /// own backward.
    fn sum_host(&self, values: &mut [f32]);

    /// This rank's place in the group, `0..ranks()`.
    fn rank(&self) -> usize;

    /// The ranks in the group.
    fn ranks(&self) -> usize;
}

thread_local! {
    /// An `Arc<dyn SumAcrossRanks<B>>` for the backend the installer named.
    static GROUP: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Makes batch norm on this thread sum its training statistics with `group`
/// (None: each rank's own statistics again, as plain batch norm).
pub fn sync_batch_statistics<B: Backend>(group: Option<Arc<dyn SumAcrossRanks<B>>>) {
    GROUP.with(|g| *g.borrow_mut() = group.map(|group| Box::new(group) as Box<dyn Any>));
}

/// The group installed on this thread for backend `B`, if any.
pub(crate) fn installed<B: Backend>() -> Option<Arc<dyn SumAcrossRanks<B>>> {
    GROUP.with(|g| g.borrow().as_ref().and_then(|any| any.downcast_ref::<Arc<dyn SumAcrossRanks<B>>>().cloned()))
}

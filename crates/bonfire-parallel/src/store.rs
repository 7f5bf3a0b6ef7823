//! Where a DDP step's buckets live, from a gradient's arrival to its
//! averaged values: one interface, two stores. The reducer decides when a
//! bucket is filled, sent and finished; a store decides where its values
//! lie and how the collective reaches them.
//!
//! - `host_bucket.rs`: host memory, on Flex with a host communicator.
//! - `tensor_bucket.rs`: a tensor on the gradients' device, for every other
//!   backend and communicator (NCCL among them).

use std::collections::BTreeMap;
use std::ops::Range;

use bonfire_collective::{CommError, TensorCollective};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::comm_hook::{BucketParameter, CommHook};

/// The buckets of a DDP step, indexed by bucket, each holding the ranges
/// that [`BucketPlan`](crate::bucket::BucketPlan) gives its gradients.
pub trait BucketStore<B: Backend>: Send + 'static {
    /// A bucket on its way to the communication thread and back.
    type Flight: Send + 'static;

    /// Puts a parameter's whole gradient in `range` of bucket `b`, or adds
    /// it to what earlier `no_sync` passes left there.
    fn write(&mut self, b: usize, range: Range<usize>, grad: B::FloatTensorPrimitive);

    /// Fills `range` of bucket `b` with `value`, unless a gradient was
    /// written there since the bucket was last sent (a parameter without a
    /// gradient in this step keeps what `no_sync` passes left, or is 0).
    fn fill(&mut self, b: usize, range: Range<usize>, value: f32);

    /// Takes bucket `b` out to be averaged; from here until [`land`](Self::land)
    /// the next step's writes go elsewhere.
    fn send(&mut self, b: usize) -> Self::Flight;

    /// Averages bucket `b`, whose gradients lie as `parameters` says, over
    /// every rank of `comm` as `hook` says; runs on the communication thread.
    fn average(
        comm: &mut dyn TensorCollective<B>,
        hook: &mut dyn CommHook<B>,
        b: usize,
        parameters: Vec<BucketParameter>,
        flight: Self::Flight,
    ) -> Result<Self::Flight, CommError>;

    /// The averaged bucket back: what its parameters' gradients are taken
    /// from. The store keeps what it fills again in a later step.
    fn land(&mut self, b: usize, flight: Self::Flight) -> Reduced<B>;
}

/// A bucket averaged over all ranks: one tensor, or (where the gradients
/// were averaged where they lay) its parameters' gradients by where they
/// start in the bucket.
pub enum Reduced<B: Backend> {
    Whole(Tensor<B, 1>),
    Parts(BTreeMap<usize, Tensor<B, 1>>),
}

impl<B: Backend> Reduced<B> {
    /// The averaged values of `range` of the bucket, which a parameter's
    /// gradient (or the unused-parameter count) fills; a part is handed
    /// over, so that nothing else holds its memory.
    pub fn take(&mut self, range: Range<usize>) -> Tensor<B, 1> {
        match self {
            Reduced::Whole(bucket) => bucket.clone().slice([range]),
            Reduced::Parts(parts) => parts.remove(&range.start).expect("every slot of a bucket is a part, taken once"),
        }
    }
}

//! Communication hooks: how a bucket of gradients is averaged across ranks,
//! what PyTorch's `register_comm_hook` takes. A hook is a trait a user can
//! implement; [`Mean`] (the default), [`Bf16Compress`] and [`PowerSgd`] are
//! three of them, and [`Metered`] counts the bytes another one sends.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bonfire_collective::{Capabilities, CommError, Group, ReduceOp, TensorCollective};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

pub use crate::power_sgd::PowerSgd;

/// A bucket of gradients as a hook receives it.
pub struct GradBucket<B: Backend> {
    /// The bucket's place in the order buckets are sent within a step (0 is
    /// the first); the same on every rank, and the same from step to step.
    pub index: usize,
    /// The gradients one after another, as f32 on the gradients' device.
    /// Values outside every parameter's range (DDP's count of parameters
    /// without a gradient, at the end of the last bucket) are averaged too.
    pub buffer: Tensor<B, 1>,
    /// Each gradient's place in `buffer` and its parameter's shape.
    pub parameters: Vec<BucketParameter>,
}

/// Where one parameter's gradient lies in a [`GradBucket`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketParameter {
    /// Its values in [`GradBucket::buffer`].
    pub range: Range<usize>,
    /// The parameter's shape (a weight matrix is `[out, in]`).
    pub shape: Vec<usize>,
}

/// How DDP averages a bucket of gradients over all ranks. It runs on DDP's
/// communication thread, one bucket at a time, in the same order on every
/// rank, so every rank must issue the same collectives for a bucket. `self`
/// lives as long as the DDP strategy: state kept in it carries from step to
/// step (error feedback, for one).
pub trait CommHook<B: Backend>: Send + 'static {
    /// The bucket averaged over every rank of `comm`: the mean of the ranks'
    /// buffers, or an approximation of it, with the buffer's length.
    fn average(&mut self, comm: &mut dyn TensorCollective<B>, bucket: GradBucket<B>)
        -> Result<Tensor<B, 1>, CommError>;

    /// True only for a hook whose result is exactly the mean: DDP may then
    /// average the gradients in host memory where they lie, without calling
    /// [`average`](Self::average).
    fn is_plain_mean(&self) -> bool {
        false
    }
}

/// An all-reduce of the f32 values, divided by the world size (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mean;

impl<B: Backend> CommHook<B> for Mean {
    fn average(
        &mut self,
        comm: &mut dyn TensorCollective<B>,
        bucket: GradBucket<B>,
    ) -> Result<Tensor<B, 1>, CommError> {
        comm.all_reduce(bucket.buffer, ReduceOp::Mean)
    }

    fn is_plain_mean(&self) -> bool {
        true
    }
}

/// Sends bf16 instead of f32: half the bytes, at a relative error of about
/// 2^-8 per value per rounding (values are rounded once to bf16, and each
/// pairwise combination is rounded again). The bucket is cast on its
/// device, so the backend must have bf16 tensors (the CPU backends and CUDA
/// do; wgpu on most adapters does not).
#[derive(Debug, Clone, Copy, Default)]
pub struct Bf16Compress;

impl<B: Backend> CommHook<B> for Bf16Compress {
    fn average(
        &mut self,
        comm: &mut dyn TensorCollective<B>,
        bucket: GradBucket<B>,
    ) -> Result<Tensor<B, 1>, CommError> {
        let packed = bucket.buffer.cast(DType::BF16);
        Ok(comm.all_reduce(packed, ReduceOp::Mean)?.cast(DType::F32))
    }
}

/// Another hook, with a count of the bytes it hands to collectives on this
/// rank (each call's payload; a ring moves about twice that over the wire).
/// It never says [`is_plain_mean`](CommHook::is_plain_mean), so DDP always
/// calls it, and the mean is counted too.
pub struct Metered<H> {
    hook: H,
    bytes: Arc<AtomicU64>,
}

impl<H> Metered<H> {
    /// Counts what `hook` sends, from 0.
    pub fn new(hook: H) -> Self {
        Metered { hook, bytes: Arc::default() }
    }

    /// The count, readable after the hook is registered (and moved).
    pub fn counter(&self) -> SentBytes {
        SentBytes(self.bytes.clone())
    }
}

/// The bytes a [`Metered`] hook has sent so far.
#[derive(Debug, Clone)]
pub struct SentBytes(Arc<AtomicU64>);

impl SentBytes {
    /// Bytes handed to collectives since the hook was made.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl<B: Backend, H: CommHook<B>> CommHook<B> for Metered<H> {
    fn average(
        &mut self,
        comm: &mut dyn TensorCollective<B>,
        bucket: GradBucket<B>,
    ) -> Result<Tensor<B, 1>, CommError> {
        self.hook.average(&mut Metering { comm, bytes: &self.bytes }, bucket)
    }
}

/// A collective that counts the payload of each call before passing it on.
struct Metering<'a, B: Backend> {
    comm: &'a mut dyn TensorCollective<B>,
    bytes: &'a AtomicU64,
}

impl<B: Backend> Metering<'_, B> {
    fn count(&self, tensor: &Tensor<B, 1>) {
        let bytes = tensor.shape().num_elements() * tensor.dtype().size();
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl<B: Backend> Group for Metering<'_, B> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
}

impl<B: Backend> TensorCollective<B> for Metering<'_, B> {
    fn all_reduce(&mut self, tensor: Tensor<B, 1>, op: ReduceOp) -> Result<Tensor<B, 1>, CommError> {
        self.count(&tensor);
        self.comm.all_reduce(tensor, op)
    }

    fn broadcast(&mut self, tensor: Tensor<B, 1>, root: usize) -> Result<Tensor<B, 1>, CommError> {
        self.count(&tensor);
        self.comm.broadcast(tensor, root)
    }

    fn all_gather(&mut self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>, CommError> {
        self.count(&tensor);
        self.comm.all_gather(tensor)
    }

    fn capabilities(&self) -> Capabilities {
        self.comm.capabilities()
    }

    fn all_reduce_host(&mut self, segments: &mut [&mut [f32]], op: ReduceOp) -> Result<(), CommError> {
        let values: usize = segments.iter().map(|s| s.len()).sum();
        self.bytes.fetch_add((values * std::mem::size_of::<f32>()) as u64, Ordering::Relaxed);
        self.comm.all_reduce_host(segments, op)
    }
}

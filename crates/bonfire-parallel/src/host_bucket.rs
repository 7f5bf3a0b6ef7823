//! Gradient buckets kept in host memory, for DDP on Burn's Flex CPU
//! backend with a host communicator (the in-process group, the TCP ring, MPI)
//! and the plain mean: PyTorch's `gradient_as_bucket_view` on the CPU.
//!
//! - Where the communicator reduces a buffer in segments where they lie
//!   (the in-process group, the TCP ring), a gradient stays where backward
//!   left it and the all-reduce averages the bucket's gradients in place:
//!   the in-process group's ranks write their part of the result into every
//!   rank's gradients, the ring sends each chunk from the gradients it spans
//!   and receives into them. Nothing is copied in or out and a bucket has
//!   no memory of its own; each parameter's averaged gradient is the very
//!   tensor backward made, held by nobody else, so the optimizer may update
//!   it in place as it would without DDP.
//! - Otherwise (MPI) a gradient is copied (or, after `no_sync`
//!   passes, added) into its slot of the bucket on the thread where it
//!   arrives, straight from its storage: no intermediate tensor and no
//!   concatenation; the communication thread all-reduces the bucket in
//!   place, and every parameter's averaged gradient is a view of the
//!   bucket (Flex slices share memory), so nothing is copied out.
//!
//! A bucket's memory is a Flex tensor. The views handed to the optimizer may
//! outlive the step (SGD with momentum keeps its first gradient as the
//! velocity), so each bucket keeps two of them and fills whichever nobody
//! else holds; a third is made only if both are held. After warm-up no step
//! allocates memory for its buckets.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use bonfire_collective::{CommError, ReduceOp, TensorCollective};
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};

use crate::comm_hook::{BucketParameter, CommHook};
use crate::store::{BucketStore, Reduced};

/// Whether `B`'s float tensors are Flex's, the one backend whose memory the
/// host buckets can share.
pub fn is_flex<B: Backend>() -> bool {
    std::any::TypeId::of::<B::FloatTensorPrimitive>() == std::any::TypeId::of::<FlexTensor>()
}

/// `value` as the type `U` it is.
fn same<T: 'static, U: 'static>(value: T) -> U {
    let boxed: Box<dyn Any> = Box::new(value);
    *boxed.downcast::<U>().unwrap_or_else(|_| unreachable!("only called where the types are one"))
}

/// One bucket: the memory being filled in this step and the memory of
/// earlier steps, free again once the optimizer lets go of its views; or,
/// where the all-reduce works on the gradients in place, this step's
/// gradients by where they start in the bucket.
#[derive(Default)]
struct Bucket {
    filling: Option<FlexTensor>,
    spare: Vec<FlexTensor>,
    /// Where gradients were copied into `filling` since the bucket was sent.
    written: BTreeSet<usize>,
    kept: BTreeMap<usize, FlexTensor>,
}

/// Buckets in host memory, on Flex.
pub struct HostStore {
    /// Values in each bucket, as it is sent.
    lens: Vec<usize>,
    buckets: Vec<Bucket>,
    /// Keep gradients where they are for an all-reduce that works on them
    /// in place, instead of copying them into the bucket.
    keep: bool,
}

/// What a bucket holds, before its all-reduce and after: its memory, or
/// its gradients by where they start in it.
pub enum Contents {
    Memory(FlexTensor),
    Gradients(BTreeMap<usize, FlexTensor>),
}

/// `grad` as a flat, contiguous f32 Flex tensor, copied only if it is not
/// contiguous f32.
fn flat_f32(grad: FlexTensor, len: usize) -> FlexTensor {
    let grad = if grad.dtype() == DType::F32 && grad.as_slice::<f32>().is_some() {
        grad
    } else {
        FlexTensor::from_data(grad.into_data().convert::<f32>())
    };
    grad.reshape(Shape::new([len]))
}

fn values(len: usize, value: f32) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(vec![value; len], [len]))
}

/// The values of `grad` (flat, contiguous f32) to write to; copied first
/// if another tensor shares its memory.
fn values_mut(grad: &mut FlexTensor) -> &mut [f32] {
    if !grad.is_unique() {
        let copy = grad.as_slice::<f32>().expect("contiguous f32").to_vec();
        let len = copy.len();
        *grad = FlexTensor::from_data(TensorData::new(copy, [len]));
    }
    let (start, end) = grad.layout().contiguous_offsets().expect("contiguous");
    &mut grad.try_storage_mut::<f32>().expect("held only here")[start..end]
}

impl HostStore {
    /// Buckets of `lens` values; `keep`: the communicator reduces segments
    /// where they lie, so gradients stay where backward left them.
    pub fn new(lens: Vec<usize>, keep: bool) -> Self {
        let buckets = lens.iter().map(|_| Bucket::default()).collect();
        HostStore { lens, buckets, keep }
    }

    /// The memory bucket `b` is filled in this step: a spare one that no
    /// view holds any more, or new memory.
    fn filling(&mut self, b: usize) -> &mut FlexTensor {
        let len = self.lens[b];
        let bucket = &mut self.buckets[b];
        if bucket.filling.is_none() {
            let free = bucket.spare.iter().position(FlexTensor::is_unique);
            let memory = match free {
                Some(i) => bucket.spare.swap_remove(i),
                None => values(len, 0.0),
            };
            bucket.filling = Some(memory);
        }
        bucket.filling.as_mut().expect("set above")
    }

    fn values(&mut self, b: usize) -> &mut [f32] {
        self.filling(b).try_storage_mut::<f32>().expect("memory being filled is held only here")
    }
}

impl<B: Backend> BucketStore<B> for HostStore {
    type Flight = Contents;

    fn write(&mut self, b: usize, range: Range<usize>, grad: B::FloatTensorPrimitive) {
        let grad = flat_f32(same(grad), range.len());
        if self.keep {
            let kept = &mut self.buckets[b].kept;
            let grad = match kept.remove(&range.start) {
                Some(earlier) => burn::backend::Flex::float_add(earlier, grad),
                None => grad,
            };
            kept.insert(range.start, grad);
            return;
        }
        let add = !self.buckets[b].written.insert(range.start);
        let src = grad.as_slice::<f32>().expect("contiguous f32");
        let dst = &mut self.values(b)[range];
        if add {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        } else {
            dst.copy_from_slice(src);
        }
    }

    fn fill(&mut self, b: usize, range: Range<usize>, value: f32) {
        if self.keep {
            self.buckets[b].kept.entry(range.start).or_insert_with(|| values(range.len(), value));
        } else if !self.buckets[b].written.contains(&range.start) {
            self.values(b)[range].fill(value);
        }
    }

    fn send(&mut self, b: usize) -> Contents {
        if self.keep {
            let kept = std::mem::take(&mut self.buckets[b].kept);
            debug_assert_eq!(kept.values().map(|t| t.layout().num_elements()).sum::<usize>(), self.lens[b]);
            return Contents::Gradients(kept);
        }
        self.filling(b);
        self.buckets[b].written.clear();
        Contents::Memory(self.buckets[b].filling.take().expect("made above"))
    }

    /// The mean over all ranks, in place: DDP uses host buckets only with a
    /// hook that is the plain mean, and sends other hooks' buckets as tensors.
    fn average(
        comm: &mut dyn TensorCollective<B>,
        hook: &mut dyn CommHook<B>,
        _: usize,
        _: Vec<BucketParameter>,
        mut contents: Contents,
    ) -> Result<Contents, CommError> {
        debug_assert!(hook.is_plain_mean(), "other hooks use tensor buckets");
        let mut segments: Vec<&mut [f32]> = match &mut contents {
            Contents::Memory(memory) => vec![memory.try_storage_mut::<f32>().expect("taken memory is held only here")],
            Contents::Gradients(grads) => grads.values_mut().map(values_mut).collect(),
        };
        comm.all_reduce_host(&mut segments, ReduceOp::Mean)?;
        drop(segments);
        Ok(contents)
    }

    /// Bucket `b`'s reduced contents as what the parameters' gradients are
    /// taken from; the bucket keeps its memory for a later step.
    fn land(&mut self, b: usize, contents: Contents) -> Reduced<B> {
        let tensor = |t: FlexTensor| Tensor::from_primitive(TensorPrimitive::Float(same(t)));
        match contents {
            Contents::Memory(memory) => {
                let spare = &mut self.buckets[b].spare;
                spare.push(memory.clone());
                if spare.len() > 2 {
                    // Keep the two most recent; an older one is still held by views.
                    spare.remove(0);
                }
                Reduced::Whole(tensor(memory))
            }
            Contents::Gradients(grads) => Reduced::Parts(grads.into_iter().map(|(at, t)| (at, tensor(t))).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn grad(values: [f32; 3]) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values.to_vec(), [3]))
    }

    fn address(t: &Tensor<Flex, 1>) -> usize {
        t.clone().into_primitive().tensor().as_slice::<f32>().unwrap().as_ptr() as usize
    }

    /// One step's end: the bucket's memory back as the reduced tensor.
    fn step(buckets: &mut impl BucketStore<Flex>) -> Tensor<Flex, 1> {
        let contents = buckets.send(0);
        match buckets.land(0, contents) {
            Reduced::Whole(memory) => memory,
            Reduced::Parts(_) => unreachable!("a copying bucket reduces its memory"),
        }
    }

    #[test]
    fn buckets_reuse_their_memory_once_no_view_holds_it() {
        // As Flex's store: it serves every backend whose tensors are Flex's.
        fn flex_store(store: HostStore) -> impl BucketStore<Flex> {
            store
        }
        let buckets = &mut flex_store(HostStore::new(vec![4], false));
        buckets.write(0, 0..3, grad([1.0, 2.0, 3.0]));
        buckets.write(0, 0..3, grad([1.0, 1.0, 1.0]));
        buckets.fill(0, 3..4, 7.0);
        buckets.fill(0, 0..3, 0.0); // written since sent: left as it is
        let first = step(buckets);
        assert_eq!(first.to_data().to_vec::<f32>().unwrap(), vec![2.0, 3.0, 4.0, 7.0]);

        // While the optimizer holds a view of the first memory, the next
        // step fills other memory; once it lets go, the first is reused.
        let view = first.clone().slice([0..3]);
        buckets.write(0, 0..3, grad([5.0, 5.0, 5.0]));
        buckets.fill(0, 3..4, 0.0);
        let second = step(buckets);
        assert_eq!(second.to_data().to_vec::<f32>().unwrap(), vec![5.0, 5.0, 5.0, 0.0], "the new step adds to nothing");
        assert_ne!(address(&second), address(&first));
        assert_eq!(view.to_data().to_vec::<f32>().unwrap(), vec![2.0, 3.0, 4.0], "a held view was overwritten");
        let first_address = address(&first);
        drop((first, view, second));
        buckets.write(0, 0..3, grad([6.0, 6.0, 6.0]));
        buckets.fill(0, 3..4, 0.0);
        let third = step(buckets);
        assert_eq!(address(&third), first_address);
    }
}

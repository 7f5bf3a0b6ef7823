//! Gradient buckets kept in host memory, for DDP on Burn's Flex CPU
//! backend with a host communicator (the in-process group, the TCP ring, MPI):
//! PyTorch's `gradient_as_bucket_view` on the CPU.
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
use std::collections::BTreeMap;
use std::ops::Range;

use bonfire_collective::{BufMut, CommError, Communicator, ReduceOp, TensorCollective};
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};
use half::bf16;

use crate::comm_hook::CommHook;
use crate::reducer::Reduced;

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
    kept: BTreeMap<usize, FlexTensor>,
}

pub struct HostBuckets {
    /// Values in each bucket (the last one carries one value more).
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

impl HostBuckets {
    pub fn new(lens: Vec<usize>, keep: bool) -> Self {
        let buckets = lens.iter().map(|_| Bucket::default()).collect();
        HostBuckets { lens, buckets, keep }
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

    /// Puts `grad` (a Flex tensor of `B`) in `range` of bucket `b`, or adds
    /// it to what is there.
    pub fn write<B: Backend>(&mut self, b: usize, range: Range<usize>, grad: B::FloatTensorPrimitive, add: bool) {
        let grad = flat_f32(same(grad), range.len());
        if self.keep {
            let kept = &mut self.buckets[b].kept;
            let grad = match kept.remove(&range.start) {
                Some(earlier) if add => burn::backend::Flex::float_add(earlier, grad),
                _ => grad,
            };
            kept.insert(range.start, grad);
            return;
        }
        let src = grad.as_slice::<f32>().expect("contiguous f32");
        let dst = &mut self.values(b)[range];
        if add {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        } else {
            dst.copy_from_slice(src);
        }
    }

    /// Zeroes `range` of bucket `b` (a parameter without a gradient).
    pub fn zero(&mut self, b: usize, range: Range<usize>) {
        if self.keep {
            self.buckets[b].kept.insert(range.start, values(range.len(), 0.0));
        } else {
            self.values(b)[range].fill(0.0);
        }
    }

    /// Sets the last value of bucket `b`.
    pub fn set_last(&mut self, b: usize, value: f32) {
        if self.keep {
            self.buckets[b].kept.insert(self.lens[b] - 1, values(1, value));
        } else {
            *self.values(b).last_mut().expect("the last bucket has its extra value") = value;
        }
    }

    /// Takes bucket `b` to be reduced.
    pub fn take(&mut self, b: usize) -> Contents {
        if self.keep {
            let kept = std::mem::take(&mut self.buckets[b].kept);
            debug_assert_eq!(kept.values().map(|t| t.layout().num_elements()).sum::<usize>(), self.lens[b]);
            return Contents::Gradients(kept);
        }
        self.filling(b);
        Contents::Memory(self.buckets[b].filling.take().expect("made above"))
    }

    /// Bucket `b`'s reduced contents as what the parameters' gradients are
    /// taken from; the bucket keeps its memory for a later step.
    pub fn reduced<B: Backend>(&mut self, b: usize, contents: Contents) -> Reduced<B> {
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

/// Averages a bucket over every rank of `comm`, as `hook` says, in place.
pub fn reduce<B: Backend>(
    comm: &mut dyn TensorCollective<B>,
    hook: CommHook,
    mut contents: Contents,
) -> Result<Contents, CommError> {
    let host = comm.host().ok_or_else(|| CommError::Invalid {
        op: "all_reduce",
        detail: "host buckets need a host communicator".into(),
    })?;
    let mut segments: Vec<&mut [f32]> = match &mut contents {
        Contents::Memory(memory) => vec![memory.try_storage_mut::<f32>().expect("taken memory is held only here")],
        Contents::Gradients(grads) => grads.values_mut().map(values_mut).collect(),
    };
    match hook {
        CommHook::Mean => host.all_reduce_segments(&mut segments, ReduceOp::Mean)?,
        CommHook::Bf16Compress => bf16_mean(host, &mut segments)?,
    }
    drop(segments);
    Ok(contents)
}

/// The mean of `segments` over all ranks, sent as bf16.
fn bf16_mean(host: &mut dyn Communicator, segments: &mut [&mut [f32]]) -> Result<(), CommError> {
    let mut packed: Vec<bf16> = segments.iter().flat_map(|s| s.iter()).map(|&v| bf16::from_f32(v)).collect();
    host.all_reduce(BufMut::BF16(&mut packed), ReduceOp::Mean)?;
    let mut at = 0;
    for s in segments.iter_mut() {
        s.iter_mut().zip(&packed[at..]).for_each(|(v, p)| *v = p.to_f32());
        at += s.len();
    }
    Ok(())
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
    fn step(buckets: &mut HostBuckets) -> Tensor<Flex, 1> {
        let contents = buckets.take(0);
        match buckets.reduced::<Flex>(0, contents) {
            Reduced::Whole(memory) => memory,
            Reduced::Parts(_) => unreachable!("a copying bucket reduces its memory"),
        }
    }

    #[test]
    fn buckets_reuse_their_memory_once_no_view_holds_it() {
        let mut buckets = HostBuckets::new(vec![4], false);
        buckets.write::<Flex>(0, 0..3, grad([1.0, 2.0, 3.0]), false);
        buckets.write::<Flex>(0, 0..3, grad([1.0, 1.0, 1.0]), true);
        buckets.set_last(0, 7.0);
        let first = step(&mut buckets);
        assert_eq!(first.to_data().to_vec::<f32>().unwrap(), vec![2.0, 3.0, 4.0, 7.0]);

        // While the optimizer holds a view of the first memory, the next
        // step fills other memory; once it lets go, the first is reused.
        let view = first.clone().slice([0..3]);
        buckets.write::<Flex>(0, 0..3, grad([5.0, 5.0, 5.0]), false);
        let second = step(&mut buckets);
        assert_ne!(address(&second), address(&first));
        assert_eq!(view.to_data().to_vec::<f32>().unwrap(), vec![2.0, 3.0, 4.0], "a held view was overwritten");
        let first_address = address(&first);
        drop((first, view, second));
        buckets.write::<Flex>(0, 0..3, grad([6.0, 6.0, 6.0]), false);
        let third = step(&mut buckets);
        assert_eq!(address(&third), first_address);
    }
}

//! Gradient buckets kept in host memory from step to step, for DDP on
//! Burn's Flex CPU backend with a host communicator (the in-process group,
//! the TCP ring): PyTorch's `gradient_as_bucket_view` on the CPU.
//!
//! - Where the ranks are threads that read each other's memory (the
//!   in-process group), a gradient stays where backward left it: the
//!   all-reduce reads every rank's gradients in place and writes the result
//!   into every rank's bucket, so nothing is copied in.
//! - Otherwise (the TCP ring) a gradient is copied (or, after `no_sync`
//!   passes, added) into its slot of the bucket on the thread where it
//!   arrives, straight from its storage: no intermediate tensor and no
//!   concatenation; the communication thread all-reduces the bucket in place.
//! - Every parameter's averaged gradient is a view of the bucket (Flex
//!   slices share memory), so nothing is copied out.
//!
//! A bucket's memory is a Flex tensor. The views handed to the optimizer may
//! outlive the step (SGD with momentum keeps its first gradient as the
//! velocity), so each bucket keeps two of them and fills whichever nobody
//! else holds; a third is made only if both are held. After warm-up no step
//! allocates memory for its buckets.

use std::any::Any;
use std::collections::BTreeMap;
use std::ops::Range;

use bonfire_collective::{BufMut, CommError, ReduceOp, TensorCollective};
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use half::bf16;

use crate::comm_hook::CommHook;

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

/// One bucket: the memory being filled in this step, the memory of earlier
/// steps, free again once the optimizer lets go of its views, and (where
/// the all-reduce reads gradients in place) this step's gradients by where
/// they start in the bucket.
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
    /// Keep gradients where they are for an all-reduce that reads them in
    /// place, instead of copying them into the bucket.
    keep: bool,
}

/// A bucket ready to be reduced: the memory the result goes to, and the
/// gradients it is the reduction of when they were kept where they lie
/// (empty when they were copied into the memory).
pub struct Filled {
    memory: FlexTensor,
    kept: Vec<FlexTensor>,
}

/// `grad` as a contiguous f32 Flex tensor, copied only if it is not one.
fn contiguous_f32(grad: FlexTensor) -> FlexTensor {
    if grad.dtype() == DType::F32 && grad.as_slice::<f32>().is_some() {
        grad
    } else {
        FlexTensor::from_data(grad.into_data().convert::<f32>())
    }
}

fn values(len: usize, value: f32) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(vec![value; len], [len]))
}

impl HostBuckets {
    pub fn new(lens: Vec<usize>, keep: bool) -> Self {
        let buckets = lens.iter().map(|_| Bucket::default()).collect();
        HostBuckets { lens, buckets, keep }
    }

    /// Whether the all-reduce reads the gradients where they lie.
    pub fn reads_in_place(&self) -> bool {
        self.keep
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
        let grad = contiguous_f32(same(grad));
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
    pub fn take(&mut self, b: usize) -> Filled {
        self.filling(b);
        let memory = self.buckets[b].filling.take().expect("made above");
        let kept: Vec<FlexTensor> = std::mem::take(&mut self.buckets[b].kept).into_values().collect();
        debug_assert!(
            !self.keep
                || kept.iter().map(|t| t.as_slice::<f32>().map_or(0, <[f32]>::len)).sum::<usize>() == self.lens[b]
        );
        Filled { memory, kept }
    }

    /// Bucket `b`'s reduced memory, as the tensor whose slices are the
    /// parameters' gradients; the bucket keeps it for a later step.
    pub fn reduced<B: Backend>(&mut self, b: usize, memory: FlexTensor) -> Tensor<B, 1> {
        let spare = &mut self.buckets[b].spare;
        spare.push(memory.clone());
        if spare.len() > 2 {
            // Keep the two most recent; an older one is still held by views.
            spare.remove(0);
        }
        Tensor::from_primitive(TensorPrimitive::Float(same(memory)))
    }
}

/// Averages a bucket over every rank of `comm`, as `hook` says; returns the
/// memory that holds the result.
pub fn reduce<B: Backend>(
    comm: &mut dyn TensorCollective<B>,
    hook: CommHook,
    filled: Filled,
) -> Result<FlexTensor, CommError> {
    let host = comm.host().ok_or_else(|| CommError::Invalid {
        op: "all_reduce",
        detail: "host buckets need a host communicator".into(),
    })?;
    let Filled { mut memory, kept } = filled;
    let kept: Vec<&[f32]> = kept.iter().map(|t| t.as_slice::<f32>().expect("kept contiguous f32")).collect();
    let values = memory.try_storage_mut::<f32>().expect("taken memory is held only here");
    match hook {
        CommHook::Mean if kept.is_empty() => host.all_reduce(BufMut::F32(values), ReduceOp::Mean)?,
        CommHook::Mean => host.all_reduce_from(&kept, values, ReduceOp::Mean)?,
        CommHook::Bf16Compress => {
            let mut packed: Vec<bf16> = if kept.is_empty() {
                values.iter().map(|&v| bf16::from_f32(v)).collect()
            } else {
                kept.iter().flat_map(|s| s.iter()).map(|&v| bf16::from_f32(v)).collect()
            };
            host.all_reduce(BufMut::BF16(&mut packed), ReduceOp::Mean)?;
            values.iter_mut().zip(&packed).for_each(|(v, p)| *v = p.to_f32());
        }
    }
    Ok(memory)
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
        let filled = buckets.take(0);
        buckets.reduced::<Flex>(0, filled.memory)
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

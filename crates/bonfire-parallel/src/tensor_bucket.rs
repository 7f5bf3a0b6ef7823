//! Buckets as tensors on their device, for every backend and communicator
//! that has no host buckets (`host_bucket.rs`): wgpu and CUDA, NdArray,
//! NCCL, and the compression hooks. A bucket is one tensor holding its
//! gradients one after another; the collective reduces it (NCCL in GPU
//! memory, in place; a host communicator through the host) and each
//! parameter's averaged gradient is a view of it.
//!
//! The tensor a bucket was reduced in is kept and filled again in the next
//! step, as PyTorch's reducer keeps its bucket storage. By then the
//! optimizer has let go of the views it read, so the fill writes into the
//! same memory (Burn's `slice_assign` works in place on a tensor nobody else
//! holds) and no step allocates memory for its buckets. Where a view is still
//! held (SGD with momentum keeps its first gradient as the velocity), Burn
//! copies the bucket before writing, and the copy becomes the bucket.

use std::collections::BTreeMap;
use std::ops::Range;

use bonfire_collective::{CommError, TensorCollective};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};

use crate::comm_hook::{BucketParameter, CommHook, GradBucket};
use crate::store::{BucketStore, Reduced};

/// Buckets as tensors on the gradients' device.
pub struct TensorStore<B: Backend> {
    device: B::Device,
    /// Per bucket: the gradients written since it was last sent (flat f32),
    /// by where they start in it.
    parts: Vec<BTreeMap<usize, Tensor<B, 1>>>,
    /// Per bucket: the tensor it was last averaged in, to be filled again.
    memory: Vec<Option<Tensor<B, 1>>>,
}

impl<B: Backend> TensorStore<B> {
    pub fn new(buckets: usize, device: B::Device) -> Self {
        TensorStore { device, parts: vec![BTreeMap::new(); buckets], memory: vec![None; buckets] }
    }
}

/// A tensor bucket on the communication thread: its parts, then (once
/// averaged) the one tensor that holds them.
pub enum Flight<B: Backend> {
    Parts { memory: Option<Tensor<B, 1>>, parts: Vec<Tensor<B, 1>> },
    Averaged(Tensor<B, 1>),
}

impl<B: Backend> BucketStore<B> for TensorStore<B> {
    type Flight = Flight<B>;

    fn write(&mut self, b: usize, range: Range<usize>, grad: B::FloatTensorPrimitive) {
        let flat = B::float_reshape(grad, Shape::new([range.len()]));
        let grad = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(flat)).cast(DType::F32);
        let parts = &mut self.parts[b];
        let sum = match parts.remove(&range.start) {
            Some(earlier) => earlier + grad,
            None => grad,
        };
        parts.insert(range.start, sum);
    }

    fn fill(&mut self, b: usize, range: Range<usize>, value: f32) {
        let device = &self.device;
        self.parts[b].entry(range.start).or_insert_with(|| Tensor::full([range.len()], value, device));
    }

    fn send(&mut self, b: usize) -> Flight<B> {
        let parts = std::mem::take(&mut self.parts[b]).into_values().collect();
        Flight::Parts { memory: self.memory[b].take(), parts }
    }

    fn average(
        comm: &mut dyn TensorCollective<B>,
        hook: &mut dyn CommHook<B>,
        b: usize,
        parameters: Vec<BucketParameter>,
        flight: Flight<B>,
    ) -> Result<Flight<B>, CommError> {
        let Flight::Parts { memory, parts } = flight else { unreachable!("a bucket is averaged once") };
        // Filled here rather than where the gradients arrived: a GPU stream
        // belongs to the thread that uses it.
        let buffer = fill(memory, parts);
        let len = buffer.dims()[0];
        let averaged = hook.average(comm, GradBucket { index: b, buffer, parameters })?;
        if averaged.dims()[0] != len {
            return Err(CommError::Invalid {
                op: "comm hook",
                detail: format!("it returned {} values for bucket {b} of {len}", averaged.dims()[0]),
            });
        }
        Ok(Flight::Averaged(averaged))
    }

    fn land(&mut self, b: usize, flight: Flight<B>) -> Reduced<B> {
        let Flight::Averaged(bucket) = flight else { unreachable!("a bucket lands averaged") };
        self.memory[b] = Some(bucket.clone());
        Reduced::Whole(bucket)
    }
}

/// `parts` one after another, written into `memory` (last step's bucket)
/// where it has their length, else into new memory.
fn fill<B: Backend>(memory: Option<Tensor<B, 1>>, parts: Vec<Tensor<B, 1>>) -> Tensor<B, 1> {
    let len: usize = parts.iter().map(|p| p.dims()[0]).sum();
    match memory {
        Some(mut bucket) if bucket.dims()[0] == len => {
            let mut at = 0;
            for part in parts {
                let n = part.dims()[0];
                bucket = bucket.slice_assign([at..at + n], part);
                at += n;
            }
            bucket
        }
        _ => Tensor::cat(parts, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type T = Tensor<Flex, 1>;

    fn values(v: &[f32]) -> T {
        Tensor::from_floats(v, &Default::default())
    }

    fn address(t: &T) -> usize {
        t.clone().into_primitive().tensor().as_slice::<f32>().unwrap().as_ptr() as usize
    }

    #[test]
    fn a_bucket_is_filled_in_its_own_memory_once_no_view_holds_it() {
        let first = fill(None, vec![values(&[1.0, 2.0]), values(&[3.0])]);
        assert_eq!(first.to_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        let memory = address(&first);

        // Nothing else holds it: the next step writes where it is.
        let second = fill(Some(first), vec![values(&[4.0, 5.0]), values(&[6.0])]);
        assert_eq!(second.to_data().to_vec::<f32>().unwrap(), vec![4.0, 5.0, 6.0]);
        assert_eq!(address(&second), memory);

        // A view the optimizer still holds keeps its values.
        let view = second.clone().slice([0..2]);
        let third = fill(Some(second), vec![values(&[7.0, 8.0]), values(&[9.0])]);
        assert_eq!(third.to_data().to_vec::<f32>().unwrap(), vec![7.0, 8.0, 9.0]);
        assert_eq!(view.to_data().to_vec::<f32>().unwrap(), vec![4.0, 5.0], "a held view was overwritten");
        assert_ne!(address(&third), memory);
    }

    #[test]
    fn memory_of_another_length_is_not_used() {
        let bucket = fill(Some(values(&[0.0; 4])), vec![values(&[1.0]), values(&[2.0])]);
        assert_eq!(bucket.to_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
    }
}

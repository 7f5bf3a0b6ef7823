//! Buckets as tensors on their device, for every backend and communicator
//! that has no host buckets (`host_bucket.rs`): wgpu and CUDA, NdArray, and
//! NCCL. A bucket is one tensor holding its gradients one after another; the
//! collective reduces it (NCCL in GPU memory, in place; a host communicator
//! through the host) and each parameter's averaged gradient is a view of it.
//!
//! The tensor a bucket was reduced in is kept and filled again in the next
//! step, as PyTorch's reducer keeps its bucket storage. By then the
//! optimizer has let go of the views it read, so the fill writes into the
//! same memory (Burn's `slice_assign` works in place on a tensor nobody else
//! holds) and no step allocates memory for its buckets. Where a view is still
//! held (SGD with momentum keeps its first gradient as the velocity), Burn
//! copies the bucket before writing, and the copy becomes the bucket.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// `parts` one after another, written into `memory` (last step's bucket)
/// where it has their length, else into new memory.
pub fn fill<B: Backend>(memory: Option<Tensor<B, 1>>, parts: Vec<Tensor<B, 1>>) -> Tensor<B, 1> {
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

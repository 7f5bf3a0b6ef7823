//! Communication hooks: how a bucket of gradients is averaged across ranks.
//! Plain functions, as in PyTorch's `register_comm_hook`.

use bonfire_collective::{CommError, Communicator, ReduceOp};
use half::bf16;

/// Averages `bucket` across all ranks in place.
pub type CommHook = fn(&mut dyn Communicator, &mut [f32]) -> Result<(), CommError>;

/// The default: an all-reduce of the f32 values, divided by the world size.
pub fn mean(comm: &mut dyn Communicator, bucket: &mut [f32]) -> Result<(), CommError> {
    comm.all_reduce(bucket.into(), ReduceOp::Mean)
}

/// Sends bf16 instead of f32: half the bytes, at a relative error of about
/// 2^-8 per value per rounding (values are rounded once to bf16, and each
/// pairwise combination in the ring is rounded again).
pub fn bf16_compress(comm: &mut dyn Communicator, bucket: &mut [f32]) -> Result<(), CommError> {
    let mut packed: Vec<bf16> = bucket.iter().map(|&v| bf16::from_f32(v)).collect();
    comm.all_reduce(packed.as_mut_slice().into(), ReduceOp::Mean)?;
    for (dst, v) in bucket.iter_mut().zip(packed) {
        *dst = v.to_f32();
    }
    Ok(())
}

//! What every MPI call is made of: the ranks' agreement on the call, MPI's
//! names for counts and operations, and the f32 staging buffer.

use std::os::raw::{c_int, c_void};

use mpi_sys as ffi;

use super::thread::error_text;
use crate::call::{verdict, Call};
use crate::element::{with_slice, BufMut, BufRef, Element, ReduceOp};
use crate::error::{CommError, Result};

/// Why the ranks' call failed on the MPI thread.
pub(super) enum Verdict {
    Mismatch(usize, String),
    Failed(String),
}

/// Gathers every rank's call and checks them against rank 0's.
pub(super) fn agree(comm: ffi::MPI_Comm, world: usize, call: Call) -> std::result::Result<(), Verdict> {
    let mine = call.to_words();
    let mut all = vec![0u64; 5 * world];
    // SAFETY: `mine` holds 5 and `all` 5 * world u64 values, as described.
    let code = unsafe {
        ffi::MPI_Allgather(
            mine.as_ptr() as *const c_void,
            5,
            ffi::RSMPI_UINT64_T,
            all.as_mut_ptr() as *mut c_void,
            5,
            ffi::RSMPI_UINT64_T,
            comm,
        )
    };
    if code != 0 {
        return Err(Verdict::Failed(error_text(code)));
    }
    let calls: Option<Vec<Call>> = all.chunks(5).map(|w| Call::from_words(w.try_into().unwrap())).collect();
    let calls = calls.ok_or_else(|| Verdict::Failed("a rank sent a call this build cannot read".into()))?;
    verdict(&calls).map_err(|(rank, detail)| Verdict::Mismatch(rank, detail))
}

/// `len` as an MPI count, which is a C int.
pub(super) fn count(op: &'static str, len: usize) -> Result<c_int> {
    c_int::try_from(len).map_err(|_| {
        CommError::invalid(op, format!("{len} elements are more than one MPI call can take ({})", c_int::MAX))
    })
}

/// MPI's operation for `op` (Mean is a Sum, scaled after).
pub(super) fn mpi_op(op: ReduceOp) -> ffi::MPI_Op {
    // SAFETY: reading MPI's predefined handles, which rsmpi's shim exports.
    unsafe {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => ffi::RSMPI_SUM,
            ReduceOp::Max => ffi::RSMPI_MAX,
            ReduceOp::Min => ffi::RSMPI_MIN,
        }
    }
}

/// Copies (widening) `buf` into `staging`, which it resizes to fit.
pub(super) fn stage_in(buf: BufRef<'_>, staging: &mut Vec<f32>) {
    staging.clear();
    with_slice!(buf, BufRef, |s| staging.extend(s.iter().map(|v| v.to_f32())));
}

/// Copies (rounding) `staging` back into `buf`, scaled by `factor`.
pub(super) fn stage_out(staging: &[f32], buf: BufMut<'_>, factor: f32) {
    fn out<T: Element>(staging: &[f32], dst: &mut [T], factor: f32) {
        for (d, s) in dst.iter_mut().zip(staging) {
            *d = T::from_f32(if factor == 1.0 { *s } else { s * factor });
        }
    }
    with_slice!(buf, BufMut, |s| out(staging, s, factor));
}

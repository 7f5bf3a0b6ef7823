//! The `Communicator` trait: what DP, DDP and the trainer need from a process group.

use std::time::Duration;

use crate::element::{BufMut, BufRef, ReduceOp};
use crate::error::Result;

/// How long a blocking collective waits for a peer before it gives up.
/// The same default as `torch.distributed` (its NCCL and Gloo timeouts).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a call waits for its peers before the stall inspector logs which
/// ranks have not started it (the timeout still applies).
pub const DEFAULT_STALL_WARNING: Duration = Duration::from_secs(60);

/// A worker's place in its group of `world_size` workers: what every
/// communicator has, whether it works on host buffers ([`Communicator`]) or
/// on tensors ([`TensorCollective`](crate::TensorCollective)). One trait, so
/// `comm.rank()` means one thing on any communicator.
pub trait Group {
    /// This worker's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of workers in the group.
    fn world_size(&self) -> usize;
}

/// A group of `world_size` workers that run collectives together.
///
/// Every rank must call the same collectives in the same order with buffers of
/// the same length and element type; a rank that disagrees gets
/// [`CommError::Mismatch`](crate::CommError::Mismatch) rather than a wrong
/// result. Each call blocks for at most the timeout waiting for a peer, then
/// fails with an error naming the rank it waited for. After a failure the
/// communicator only returns [`CommError::Aborted`](crate::CommError::Aborted):
/// peers may be half-way through the failed call, so it cannot be resumed.
///
/// Buffers live in host memory. The methods take [`BufMut`]/[`BufRef`] rather
/// than generic slices so that the trait stays object-safe; `slice.into()`
/// makes one from `&mut [f32]`, `&mut [f16]` or `&mut [bf16]`.
pub trait Communicator: Group + Send {
    /// How long a call waits for a peer.
    fn timeout(&self) -> Duration;

    /// Changes how long later calls wait for a peer.
    fn set_timeout(&mut self, timeout: Duration);

    /// Combines `buf` across all ranks; every rank ends with the result.
    fn all_reduce(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<()>;

    /// Copies `buf` of rank `root` into `buf` of every other rank.
    fn broadcast(&mut self, buf: BufMut<'_>, root: usize) -> Result<()>;

    /// Concatenates the `input` of every rank, in rank order, into `output`,
    /// which must be `world_size` times as long as `input`.
    fn all_gather(&mut self, input: BufRef<'_>, output: BufMut<'_>) -> Result<()>;

    /// Combines `input` across ranks and leaves block `rank` of the result in
    /// `output`; `input` must be `world_size` times as long as `output`.
    fn reduce_scatter(&mut self, input: BufRef<'_>, output: BufMut<'_>, op: ReduceOp) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;

    /// Combines f32 values across ranks in place: each rank's buffer is its
    /// `segments` one after another (as long on every rank, though each rank
    /// may cut it differently), and ends holding the result. This default
    /// packs the segments into one buffer (unless there is only one),
    /// reduces it and unpacks it again; the in-process group and the TCP
    /// ring reduce the segments where they lie.
    fn all_reduce_segments(&mut self, segments: &mut [&mut [f32]], op: ReduceOp) -> Result<()> {
        if let [whole] = segments {
            return self.all_reduce(BufMut::F32(whole), op);
        }
        let mut packed: Vec<f32> = segments.iter().flat_map(|s| s.iter().copied()).collect();
        self.all_reduce(BufMut::F32(&mut packed), op)?;
        let mut at = 0;
        for s in segments.iter_mut() {
            s.copy_from_slice(&packed[at..at + s.len()]);
            at += s.len();
        }
        Ok(())
    }

    /// What this communicator can do beyond the trait's calls.
    fn capabilities(&self) -> Capabilities {
        Capabilities { host_memory: true, ..Capabilities::default() }
    }
}

/// What a communicator can do, as it reports it: read by the one place that
/// chooses how DDP stores and sends its buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// It works on host memory: it can reduce f32 buffers where they lie
    /// ([`TensorCollective::all_reduce_host`](crate::TensorCollective)).
    pub host_memory: bool,
    /// It reduces a buffer in segments where they lie, so that packing them
    /// beforehand would be a wasted copy.
    pub reduces_segments_in_place: bool,
    /// Its ranks are threads of one process: a collective is memory work on
    /// the cores that also compute, with no wire time of its own to hide.
    pub ranks_are_threads: bool,
}

impl<G: Group + ?Sized> Group for Box<G> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
}

/// A boxed communicator is one too, so that `Box<dyn Communicator>` can go
/// wherever a communicator is asked for.
impl<C: Communicator + ?Sized> Communicator for Box<C> {
    fn timeout(&self) -> Duration {
        (**self).timeout()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        (**self).set_timeout(timeout)
    }
    fn all_reduce(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<()> {
        (**self).all_reduce(buf, op)
    }
    fn broadcast(&mut self, buf: BufMut<'_>, root: usize) -> Result<()> {
        (**self).broadcast(buf, root)
    }
    fn all_gather(&mut self, input: BufRef<'_>, output: BufMut<'_>) -> Result<()> {
        (**self).all_gather(input, output)
    }
    fn reduce_scatter(&mut self, input: BufRef<'_>, output: BufMut<'_>, op: ReduceOp) -> Result<()> {
        (**self).reduce_scatter(input, output, op)
    }
    fn barrier(&mut self) -> Result<()> {
        (**self).barrier()
    }
    fn all_reduce_segments(&mut self, segments: &mut [&mut [f32]], op: ReduceOp) -> Result<()> {
        (**self).all_reduce_segments(segments, op)
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
}

/// Checks the shape of an all_gather or reduce_scatter call.
pub(crate) fn check_blocks(op: &'static str, world: usize, whole: usize, block: usize) -> Result<()> {
    if whole != block * world {
        return Err(crate::CommError::invalid(
            op,
            format!("the whole buffer has {whole} elements; expected world size {world} x block {block}"),
        ));
    }
    Ok(())
}

/// Splits `len` elements into `parts` contiguous ranges whose lengths differ by
/// at most one; the first `len % parts` ranges are the longer ones.
pub(crate) fn split(len: usize, parts: usize, index: usize) -> std::ops::Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    let end = start + base + usize::from(index < extra);
    start..end
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_covers_everything_once() {
        for len in [0usize, 1, 2, 7, 13, 100] {
            for parts in 1..=5 {
                let mut next = 0;
                for i in 0..parts {
                    let r = split(len, parts, i);
                    assert_eq!(r.start, next);
                    assert!(r.len() == len / parts || r.len() == len / parts + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}

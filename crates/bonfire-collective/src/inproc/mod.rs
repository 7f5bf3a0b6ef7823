//! Workers that are threads of one process, sharing memory.
//!
//! Algorithm: each rank reduces its own 1/N slice of the buffer, reading that
//! slice straight from every rank's buffer, then copies the other slices from
//! their owners: two barriers, and per rank about two reads and one write of
//! the buffer, all ranks working at once. A ring over shared memory moves the
//! same bytes (at N = 2 it is this very schedule) but needs 2(N-1)
//! synchronised steps instead of two, and staging through a shared scratch
//! buffer would add a full copy in and a full copy out. So the direct form is
//! the fastest on shared memory; docs/performance.md gives what it
//! reaches against the machine's memcpy bandwidth. `all_reduce_segments`
//! goes one step further for DDP: the values stay where they lie (a
//! bucket's gradients) and each rank writes its reduced part straight back
//! into every rank's segments, so a rank reads and writes the buffer's size
//! once, one barrier after the join.
//!
//! Safety: a rank publishes a raw pointer to its buffer when it joins a call.
//! Peers touch that buffer only between the join barrier and the final barrier
//! of the call, and a rank cannot leave the call before that final barrier.
//! Only the join barrier has a timeout: once every rank has joined, the rest of
//! the call is bounded memory work that cannot block, so the later barriers
//! wait without one, and no rank can free its buffer while a peer reads it.

mod meeting;

use std::sync::Arc;
use std::time::Duration;

use crate::call::{Call, Kind};
use crate::communicator::{check_blocks, split, Communicator, Group, DEFAULT_STALL_WARNING, DEFAULT_TIMEOUT};
use crate::element::{with_pair, with_slice, BufMut, BufRef, DType, Element, ReduceOp};
use crate::error::{CommError, Result};
use meeting::{Joined, Round, Shared};

/// One worker of an in-process group; create the whole group with [`InProcCommunicator::group`]
/// and move one into each thread.
pub struct InProcCommunicator {
    rank: usize,
    shared: Arc<Shared>,
    timeout: Duration,
    /// After this long waiting in a call, log which ranks have not started it.
    stall_warning: Duration,
}

impl InProcCommunicator {
    /// Creates the `world` workers of one group, rank `i` at index `i`.
    pub fn group(world: usize) -> Result<Vec<Self>> {
        if world == 0 {
            return Err(CommError::invalid("group", "world size must be at least 1"));
        }
        let shared = Arc::new(Shared::new(world));
        Ok((0..world)
            .map(|rank| InProcCommunicator {
                rank,
                shared: shared.clone(),
                timeout: DEFAULT_TIMEOUT,
                stall_warning: DEFAULT_STALL_WARNING,
            })
            .collect())
    }

    /// After `after` waiting for the other ranks to start a call, log which
    /// ones have not (60 s by default; the timeout still applies).
    pub fn set_stall_warning(&mut self, after: Duration) {
        self.stall_warning = after;
    }

    /// The barrier every call starts with; see [`Shared::join`].
    fn join(&self, name: &'static str, call: Joined) -> Result<Arc<Round>> {
        self.shared.join(self.rank, name, call, self.timeout, self.stall_warning)
    }

    /// A barrier inside a call, after every rank has joined.
    fn sync(&self) {
        self.shared.sync()
    }

    fn all_reduce_typed<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let world = self.shared.world;
        let base = buf.as_mut_ptr();
        let round =
            self.join("all_reduce", call(Kind::AllReduce, Some(T::DTYPE), Some(op), 0, buf.len(), base as usize))?;
        let mine = split(buf.len(), world, self.rank);
        // SAFETY: every rank's buffer has `len` elements of T (checked by the
        // verdict) and stays alive until the final sync. In this phase rank r
        // writes only slice r of its own buffer and reads slice r of the others.
        unsafe {
            let acc = std::slice::from_raw_parts_mut(base.add(mine.start), mine.len());
            for (peer, c) in round.calls.iter().enumerate() {
                if peer != self.rank {
                    let src = std::slice::from_raw_parts((c.src as *const T).add(mine.start), mine.len());
                    T::combine(acc, src, op);
                }
            }
            if op == ReduceOp::Mean {
                T::scale(acc, 1.0 / world as f32);
            }
        }
        self.sync();
        // SAFETY: slice j of rank j is final and no longer written; each rank
        // writes only the other slices of its own buffer.
        unsafe {
            for (peer, c) in round.calls.iter().enumerate() {
                if peer != self.rank {
                    let part = split(buf.len(), world, peer);
                    std::ptr::copy_nonoverlapping(
                        (c.src as *const T).add(part.start),
                        base.add(part.start),
                        part.len(),
                    );
                }
            }
        }
        self.sync();
        Ok(())
    }

    /// The all-reduce of segments where they lie, for DDP's gradients: rank
    /// r reduces part r of the whole, reading it from every rank's segments
    /// and writing the result straight back into every rank's segments. Per
    /// rank, one read and one write of the buffer's size, the write into
    /// memory it has just read (still in cache), and nothing packed or
    /// unpacked; against two reads and two writes for reducing one packed
    /// buffer, plus the packing.
    fn all_reduce_segments_f32(&self, segments: &mut [&mut [f32]], op: ReduceOp) -> Result<()> {
        let world = self.shared.world;
        // From here on the segments are reached only through these raw
        // parts, by this rank and its peers alike.
        let parts: Vec<Segment> = segments.iter_mut().map(|s| Segment { at: s.as_mut_ptr(), len: s.len() }).collect();
        let total = parts.iter().map(|p| p.len).sum();
        let published = Joined {
            parts: parts.len(),
            ..call(Kind::AllReduceSegments, Some(DType::F32), Some(op), 0, total, parts.as_ptr() as usize)
        };
        let round = self.join("all_reduce", published)?;
        // SAFETY: every rank published `parts` segments, alive (and not
        // otherwise touched) until the final sync, holding `total` values in
        // all (the verdict checked the lengths).
        let everyone: Vec<&[Segment]> = round
            .calls
            .iter()
            .map(|c| unsafe { std::slice::from_raw_parts(c.src as *const Segment, c.parts) })
            .collect();
        let mine = split(total, world, self.rank);
        // Block by block, so that each partial sum is still in cache when
        // the next rank's values are added to it and when it is written
        // back; summed in rank order, so that the result does not depend on
        // which rank reduced it.
        const BLOCK: usize = 16 << 10;
        let mut acc = vec![0f32; BLOCK.min(mine.len())];
        let mut start = mine.start;
        while start < mine.end {
            let block = start..(start + BLOCK).min(mine.end);
            start = block.end;
            let acc = &mut acc[..block.len()];
            // SAFETY: rank r reads and writes only part r of every rank's
            // segments, and no two ranks' parts overlap; segments of one
            // rank are distinct memory (they were distinct `&mut` slices).
            unsafe {
                pieces(everyone[0], block.clone(), |at, piece| acc[at..at + piece.len()].copy_from_slice(piece));
                for theirs in &everyone[1..] {
                    pieces(theirs, block.clone(), |at, piece| f32::combine(&mut acc[at..at + piece.len()], piece, op));
                }
                if op == ReduceOp::Mean {
                    f32::scale(acc, 1.0 / world as f32);
                }
                for theirs in &everyone {
                    pieces(theirs, block.clone(), |at, piece| piece.copy_from_slice(&acc[at..at + piece.len()]));
                }
            }
        }
        self.sync();
        Ok(())
    }

    fn broadcast_typed<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let world = self.shared.world;
        if root >= world {
            return Err(CommError::invalid("broadcast", format!("root {root} is not a rank of a group of {world}")));
        }
        let base = buf.as_mut_ptr();
        let round =
            self.join("broadcast", call(Kind::Broadcast, Some(T::DTYPE), None, root, buf.len(), base as usize))?;
        if self.rank != root {
            // SAFETY: the root's buffer has the same length and is only read by everyone.
            unsafe { std::ptr::copy_nonoverlapping(round.calls[root].src as *const T, base, buf.len()) };
        }
        self.sync();
        Ok(())
    }

    fn all_gather_typed<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        let world = self.shared.world;
        check_blocks("all_gather", world, output.len(), input.len())?;
        let round = self
            .join("all_gather", call(Kind::AllGather, Some(T::DTYPE), None, 0, input.len(), input.as_ptr() as usize))?;
        let block = input.len();
        for (peer, c) in round.calls.iter().enumerate() {
            // SAFETY: every input has `block` elements and is only read.
            let src = unsafe { std::slice::from_raw_parts(c.src as *const T, block) };
            output[peer * block..(peer + 1) * block].copy_from_slice(src);
        }
        self.sync();
        Ok(())
    }

    fn reduce_scatter_typed<T: Element>(&self, input: &[T], output: &mut [T], op: ReduceOp) -> Result<()> {
        let world = self.shared.world;
        check_blocks("reduce_scatter", world, input.len(), output.len())?;
        let round = self.join(
            "reduce_scatter",
            call(Kind::ReduceScatter, Some(T::DTYPE), Some(op), 0, input.len(), input.as_ptr() as usize),
        )?;
        let block = self.rank * output.len()..(self.rank + 1) * output.len();
        output.copy_from_slice(&input[block.clone()]);
        for (peer, c) in round.calls.iter().enumerate() {
            if peer != self.rank {
                // SAFETY: every input has `world * block` elements and is only read.
                let src = unsafe { std::slice::from_raw_parts((c.src as *const T).add(block.start), block.len()) };
                T::combine(output, src, op);
            }
        }
        if op == ReduceOp::Mean {
            T::scale(output, 1.0 / world as f32);
        }
        self.sync();
        Ok(())
    }
}

fn call(kind: Kind, dtype: Option<DType>, op: Option<ReduceOp>, root: usize, len: usize, src: usize) -> Joined {
    Joined { call: Call::new(kind, dtype, op, root, len), src, parts: 0 }
}

/// One segment of an `all_reduce_segments` call, as its peers reach it.
struct Segment {
    at: *mut f32,
    len: usize,
}

/// Calls `f(offset, piece)` for what of `segments`, laid one after another,
/// falls in `range`; `offset` is where the piece starts within `range`.
///
/// # Safety
///
/// Every segment must be valid for reads and writes of its length, and the
/// caller the only one to touch `range` of them while `f` runs.
unsafe fn pieces(segments: &[Segment], range: std::ops::Range<usize>, mut f: impl FnMut(usize, &mut [f32])) {
    let mut start = 0;
    for segment in segments {
        let end = start + segment.len;
        let (lo, hi) = (start.max(range.start), end.min(range.end));
        if lo < hi {
            // SAFETY: within the segment, which the caller vouches for.
            f(lo - range.start, unsafe { std::slice::from_raw_parts_mut(segment.at.add(lo - start), hi - lo) });
        }
        start = end;
    }
}

impl Group for InProcCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }
}

impl Communicator for InProcCommunicator {
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn all_reduce(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<()> {
        with_slice!(buf, BufMut, |s| self.all_reduce_typed(s, op))
    }

    fn all_reduce_segments(&mut self, segments: &mut [&mut [f32]], op: ReduceOp) -> Result<()> {
        self.all_reduce_segments_f32(segments, op)
    }

    fn reduces_segments_in_place(&self) -> bool {
        true
    }

    fn broadcast(&mut self, buf: BufMut<'_>, root: usize) -> Result<()> {
        with_slice!(buf, BufMut, |s| self.broadcast_typed(s, root))
    }

    fn all_gather(&mut self, input: BufRef<'_>, output: BufMut<'_>) -> Result<()> {
        with_pair!("all_gather", input, output, |i, o| self.all_gather_typed(i, o))
    }

    fn reduce_scatter(&mut self, input: BufRef<'_>, output: BufMut<'_>, op: ReduceOp) -> Result<()> {
        with_pair!("reduce_scatter", input, output, |i, o| self.reduce_scatter_typed(i, o, op))
    }

    fn barrier(&mut self) -> Result<()> {
        self.join("barrier", call(Kind::Barrier, None, None, 0, 0, 0)).map(|_| ())
    }
}

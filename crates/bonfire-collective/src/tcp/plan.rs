//! Schedules for the chunked, pipelined ring (as Gloo's `ring_chunked`).
//!
//! A plan lists, in order, the chunks this rank sends to the next rank and the
//! chunks it receives from the previous one, with the dependencies between
//! them. Both sides derive the same chunk boundaries from the same arguments,
//! so no chunk carries a header.

use std::ops::Range;

use crate::communicator::split;

/// A chunk to send, once `after_recv` chunks have been received (its data is
/// the result of one of them) .
#[derive(Debug, Clone)]
pub(crate) struct SendItem {
    pub range: Range<usize>,
    pub after_recv: usize,
}

/// A chunk to receive. Before it is written, `after_send` chunks must have been
/// sent: the region may still be on its way out from an earlier step.
#[derive(Debug, Clone)]
pub(crate) struct RecvItem {
    pub range: Range<usize>,
    /// Combine with the local values (reduce-scatter) or overwrite them (all-gather).
    pub reduce: bool,
    pub after_send: usize,
    /// This chunk is final for this rank's own segment: apply the Mean scaling.
    pub finish: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub sends: Vec<SendItem>,
    pub recvs: Vec<RecvItem>,
}

/// Which halves of the ring all-reduce to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phases {
    /// Reduce-scatter then all-gather: all_reduce.
    Both,
    /// Rank r ends with segment r fully reduced: reduce_scatter.
    ReduceScatter,
    /// Segment r of rank r is spread to everyone: all_gather.
    AllGather,
}

/// The ring over `len` elements cut into `world` segments (segment `i` is
/// `split(len, world, i)`).
///
/// Reduce-scatter step s sends segment r-s-1 and receives segment r-s-2, so
/// after n-1 steps rank r holds segment r fully reduced. All-gather step t
/// sends segment r-t and receives segment r-t-1. Each segment is cut into the
/// same number of chunks; a chunk is sent as soon as its previous step's chunk
/// has arrived, so transfers of one chunk overlap the reduction of another.
pub(crate) fn ring(len: usize, world: usize, rank: usize, chunk: usize, phases: Phases) -> Plan {
    let n = world;
    let mut plan = Plan::default();
    if n == 1 {
        return plan;
    }
    let longest = split(len, n, 0).len();
    let k = longest.div_ceil(chunk.max(1)).max(1);
    let seg = |i: usize| split(len, n, i % n);
    let piece = |s: Range<usize>, c: usize| {
        let p = split(s.len(), k, c);
        s.start + p.start..s.start + p.end
    };
    let rs_steps = if phases == Phases::AllGather { 0 } else { n - 1 };
    let ag_steps = if phases == Phases::ReduceScatter { 0 } else { n - 1 };
    for step in 0..rs_steps + ag_steps {
        let (send_seg, recv_seg, reduce) = if step < rs_steps {
            (seg(rank + 2 * n - step - 1), seg(rank + 2 * n - step - 2), true)
        } else {
            let t = step - rs_steps;
            (seg(rank + 2 * n - t), seg(rank + 2 * n - t - 1), false)
        };
        for c in 0..k {
            let index = step * k + c;
            plan.sends.push(SendItem {
                range: piece(send_seg.clone(), c),
                after_recv: if step == 0 { 0 } else { index - k + 1 },
            });
            // All-gather step t overwrites the segment that reduce-scatter step
            // t sent; that chunk must be out first.
            let after_send = if reduce || rs_steps == 0 { 0 } else { (step - rs_steps) * k + c + 1 };
            plan.recvs.push(RecvItem {
                range: piece(recv_seg.clone(), c),
                reduce,
                after_send,
                finish: reduce && step == rs_steps - 1,
            });
        }
    }
    plan
}

/// Broadcast from `root` along the ring: each rank forwards every chunk to the
/// next as soon as it has it, so all links carry data at once.
pub(crate) fn chain(len: usize, world: usize, rank: usize, root: usize, chunk: usize) -> Plan {
    let mut plan = Plan::default();
    if world == 1 {
        return plan;
    }
    let k = len.div_ceil(chunk.max(1)).max(1);
    let position = (rank + world - root) % world;
    for c in 0..k {
        let range = split(len, k, c);
        if position > 0 {
            plan.recvs.push(RecvItem { range: range.clone(), reduce: false, after_send: 0, finish: false });
        }
        if position < world - 1 {
            plan.sends.push(SendItem { range, after_recv: if position == 0 { 0 } else { c + 1 } });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the plans of all ranks in lock-step on plain vectors and checks the
    /// ring reaches the sum everywhere, without any sockets.
    fn simulate(len: usize, world: usize, chunk: usize) -> Vec<Vec<f64>> {
        let mut bufs: Vec<Vec<f64>> = (0..world).map(|r| (0..len).map(|i| (r * 1000 + i) as f64).collect()).collect();
        let plans: Vec<Plan> = (0..world).map(|r| ring(len, world, r, chunk, Phases::Both)).collect();
        let steps = plans[0].sends.len();
        for i in 0..steps {
            let sent: Vec<Vec<f64>> = (0..world).map(|r| bufs[r][plans[r].sends[i].range.clone()].to_vec()).collect();
            for r in 0..world {
                let from = (r + world - 1) % world;
                let item = &plans[r].recvs[i];
                assert_eq!(item.range.len(), sent[from].len());
                for (dst, v) in bufs[r][item.range.clone()].iter_mut().zip(&sent[from]) {
                    if item.reduce {
                        *dst += v
                    } else {
                        *dst = *v
                    }
                }
            }
        }
        bufs
    }

    #[test]
    fn lock_step_ring_sums() {
        for world in 1..=5 {
            for len in [0, 1, 7, 13, 64] {
                for chunk in [1, 3, 1000] {
                    let expect: Vec<f64> = (0..len).map(|i| (0..world).map(|r| (r * 1000 + i) as f64).sum()).collect();
                    for b in simulate(len, world, chunk) {
                        assert_eq!(b, expect, "world {world} len {len} chunk {chunk}");
                    }
                }
            }
        }
    }

    #[test]
    fn dependencies_point_backwards() {
        let p = ring(100, 4, 1, 7, Phases::Both);
        for (i, s) in p.sends.iter().enumerate() {
            assert!(s.after_recv <= i);
        }
        for (i, r) in p.recvs.iter().enumerate() {
            assert!(r.after_send <= i + 1);
        }
    }
}

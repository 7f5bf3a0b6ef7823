//! Checks shared by the thread and process tests: every collective against a
//! plain computation on the same inputs, which each rank can rebuild locally.

use bonfire_collective::{Communicator, ReduceOp};
use half::{bf16, f16};

/// The input of `rank` at position `i`: deterministic, varied, with ties
/// across ranks so that Max/Min are exercised both ways.
pub fn value(rank: usize, i: usize) -> f32 {
    let h = (i as u64).wrapping_mul(2654435761).wrapping_add(rank as u64 * 40503) % 2001;
    (h as f32 - 1000.0) / 1000.0
}

pub fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| value(rank, i)).collect()
}

/// Plain per-element reduction over all ranks, in f64.
pub fn expected(world: usize, len: usize, op: ReduceOp) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let vals = (0..world).map(|r| value(r, i) as f64);
            (match op {
                ReduceOp::Sum => vals.sum::<f64>(),
                ReduceOp::Mean => vals.sum::<f64>() / world as f64,
                ReduceOp::Max => vals.fold(f64::MIN, f64::max),
                ReduceOp::Min => vals.fold(f64::MAX, f64::min),
            }) as f32
        })
        .collect()
}

/// Each element within `tol` (relative, plus `tol` absolute) of `want`'s;
/// a NaN is never close (the outputs start as NaN, so an element a
/// collective never wrote fails).
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: length {} instead of {}", got.len(), want.len()));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let close = (g - w).abs() <= tol * (1.0 + w.abs());
        if !close {
            return Err(format!("{what}: element {i} is {g}, expected {w}"));
        }
    }
    Ok(())
}

/// The buffer lengths every implementation is checked on: empty, one, a
/// prime, one that no world size 2..4 divides, and 32 MiB of f32 (all_reduce
/// and broadcast only, to keep the suite quick).
pub const LENGTHS: [usize; 4] = [0, 1, 1009, 1001];
pub const BIG: usize = 32 << 18;

/// Runs every collective on `comm` and compares with the plain computation.
pub fn check_all(comm: &mut dyn Communicator, big: bool) -> Result<(), String> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let e = |what: String| move |err: bonfire_collective::CommError| format!("{what}: {err}");
    let mut lengths = LENGTHS.to_vec();
    if big {
        lengths.push(BIG);
    }
    for &len in &lengths {
        let ops: &[ReduceOp] =
            if len == BIG { &[ReduceOp::Sum] } else { &[ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] };
        for &op in ops {
            let mut buf = input(rank, len);
            comm.all_reduce(buf.as_mut_slice().into(), op).map_err(e(format!("all_reduce {op:?} len {len}")))?;
            assert_close(&format!("all_reduce {op:?} len {len}"), &buf, &expected(world, len, op), 1e-5)?;

            // all_reduce_segments: the same input in segments whose
            // boundaries differ from rank to rank (and an empty one).
            let mut whole = input(rank, len);
            let cuts = [
                0,
                (len / 3 + rank).min(len),
                (len / 3 + rank).min(len),
                (2 * len / 3).max(len / 3 + rank).min(len),
                len,
            ];
            let mut segments: Vec<&mut [f32]> = Vec::new();
            let mut rest = whole.as_mut_slice();
            for w in cuts.windows(2) {
                let (segment, tail) = rest.split_at_mut(w[1] - w[0]);
                segments.push(segment);
                rest = tail;
            }
            comm.all_reduce_segments(&mut segments, op).map_err(e(format!("all_reduce_segments {op:?} len {len}")))?;
            assert_close(&format!("all_reduce_segments {op:?} len {len}"), &whole, &expected(world, len, op), 1e-5)?;
        }
        let root = world - 1;
        let mut buf = input(rank, len);
        comm.broadcast(buf.as_mut_slice().into(), root).map_err(e(format!("broadcast len {len}")))?;
        assert_close(&format!("broadcast len {len}"), &buf, &input(root, len), 0.0)?;
        if len == BIG {
            continue;
        }

        // all_gather: blocks of `len` from every rank.
        let mine = input(rank, len);
        let mut out = vec![f32::NAN; len * world];
        comm.all_gather(mine.as_slice().into(), out.as_mut_slice().into())
            .map_err(e(format!("all_gather len {len}")))?;
        let want: Vec<f32> = (0..world).flat_map(|r| input(r, len)).collect();
        assert_close(&format!("all_gather len {len}"), &out, &want, 0.0)?;

        // reduce_scatter: rank r keeps block r of the reduction.
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
            let whole = input(rank, len * world);
            let mut out = vec![f32::NAN; len];
            comm.reduce_scatter(whole.as_slice().into(), out.as_mut_slice().into(), op)
                .map_err(e(format!("reduce_scatter {op:?} len {len}")))?;
            assert_eq!(whole, input(rank, len * world), "reduce_scatter must not change its input");
            let want = expected(world, len * world, op)[rank * len..(rank + 1) * len].to_vec();
            assert_close(&format!("reduce_scatter {op:?} len {len}"), &out, &want, 1e-5)?;
        }
    }

    // Half precision: sums of values with few significant bits are exact.
    let len = 257;
    let mut h: Vec<f16> = (0..len).map(|i| f16::from_f32((rank * 3 + i % 7) as f32)).collect();
    comm.all_reduce(h.as_mut_slice().into(), ReduceOp::Sum).map_err(e("all_reduce f16".into()))?;
    let mut b: Vec<bf16> = (0..len).map(|i| bf16::from_f32((rank * 3 + i % 7) as f32)).collect();
    comm.all_reduce(b.as_mut_slice().into(), ReduceOp::Max).map_err(e("all_reduce bf16".into()))?;
    for i in 0..len {
        let sum: usize = (0..world).map(|r| r * 3 + i % 7).sum();
        if h[i].to_f32() != sum as f32 {
            return Err(format!("f16 sum at {i}: {} instead of {sum}", h[i]));
        }
        if b[i].to_f32() != ((world - 1) * 3 + i % 7) as f32 {
            return Err(format!("bf16 max at {i}: {}", b[i]));
        }
    }
    comm.barrier().map_err(e("barrier".into()))?;
    Ok(())
}

//! A buffer that lies in segments: distinct slices that hold a collective's
//! values one after another, as DDP's gradients lie where backward left
//! them (`Communicator::all_reduce_segments`). Each rank may cut the same
//! buffer differently. The communicators that reduce such a buffer where it
//! lies (the in-process group, the TCP ring) reach it through raw
//! [`Segment`]s, which peers and helper threads can share, and walk it with
//! [`runs`].

use std::ops::Range;

/// One segment of a buffer, as raw parts.
pub(crate) struct Segment<T> {
    pub at: *mut T,
    pub len: usize,
}

// SAFETY: a segment is only an address and a length; reading or writing
// through it is `runs`'s job, which is unsafe and states what its caller
// must guarantee.
unsafe impl<T: Send> Send for Segment<T> {}
unsafe impl<T: Send> Sync for Segment<T> {}

/// The raw parts of `segments`. From here on the segments must be reached
/// only through them, until the borrow of `segments` ends.
pub(crate) fn raw_parts<T>(segments: &mut [&mut [T]]) -> Vec<Segment<T>> {
    segments.iter_mut().map(|s| Segment { at: s.as_mut_ptr(), len: s.len() }).collect()
}

/// Calls `f` with every rank's values of each run of `range` that no
/// rank's segment boundary cuts, in rank order, and stops at the first
/// error. `everyone` may hold a single rank's segments: its runs are then
/// the pieces of `range` in each of its segments.
///
/// # Safety
///
/// Every segment must be valid for reads and writes of its length, and the
/// caller the only one to touch `range` of them while `f` runs.
pub(crate) unsafe fn runs<T, E>(
    everyone: &[&[Segment<T>]],
    range: Range<usize>,
    mut f: impl FnMut(&mut [&mut [T]]) -> Result<(), E>,
) -> Result<(), E> {
    // Per rank: the segment that holds `at`, and where it starts.
    let mut cursors = vec![(0usize, 0usize); everyone.len()];
    let mut run: Vec<&mut [T]> = Vec::with_capacity(everyone.len());
    let mut at = range.start;
    while at < range.end {
        let mut end = range.end;
        for (segments, (index, start)) in everyone.iter().zip(&mut cursors) {
            while *start + segments[*index].len <= at {
                *start += segments[*index].len;
                *index += 1;
            }
            end = end.min(*start + segments[*index].len);
        }
        run.clear();
        for (segments, &(index, start)) in everyone.iter().zip(&cursors) {
            // SAFETY: `at..end` lies within this segment, which the caller vouches for.
            run.push(unsafe { std::slice::from_raw_parts_mut(segments[index].at.add(at - start), end - at) });
        }
        f(&mut run)?;
        at = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_cut_at_every_ranks_boundaries() {
        let (mut a0, mut a1) = (vec![0u32; 3], vec![0u32; 5]);
        let (mut b0, mut b1, mut b2) = (vec![0u32; 1], vec![0u32; 4], vec![0u32; 3]);
        let a = raw_parts(&mut [&mut a0[..], &mut a1[..]]);
        let b = raw_parts(&mut [&mut b0[..], &mut b1[..], &mut b2[..]]);
        let mut lens = Vec::new();
        // SAFETY: the vectors outlive the call and nothing else touches them.
        unsafe {
            runs(&[&a, &b], 2..8, |run| {
                assert_eq!(run[0].len(), run[1].len());
                lens.push(run[0].len());
                run.iter_mut().for_each(|values| values.fill(1));
                Ok::<(), ()>(())
            })
        }
        .unwrap();
        assert_eq!(lens, [1, 2, 3], "cut where a segment of either rank ends (3, then 5)");
        assert_eq!([&a0[..], &a1[..]].concat(), [0, 0, 1, 1, 1, 1, 1, 1]);
        assert_eq!([&b0[..], &b1[..], &b2[..]].concat(), [0, 0, 1, 1, 1, 1, 1, 1]);
    }
}

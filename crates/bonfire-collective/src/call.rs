//! What a rank asks of a collective, compared between ranks before any data
//! moves, so that ranks that disagree get [`CommError::Mismatch`] naming the
//! rank instead of a wrong result or a hang. Every communicator compares the
//! same [`Call`]: the in-process group across the calls its threads publish,
//! the TCP ring with its neighbour's header, MPI by gathering everyone's.
//!
//! [`CommError::Mismatch`]: crate::CommError::Mismatch

use crate::element::{DType, ReduceOp};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    AllReduce = 1,
    AllReduceSegments,
    Broadcast,
    AllGather,
    ReduceScatter,
    Barrier,
}

/// One rank's collective call: which one, on what buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Call {
    pub kind: Kind,
    pub dtype: Option<DType>,
    pub op: Option<ReduceOp>,
    pub root: usize,
    /// Elements of the buffer the call is given (its input).
    pub len: usize,
}

impl Call {
    pub fn new(kind: Kind, dtype: Option<DType>, op: Option<ReduceOp>, root: usize, len: usize) -> Self {
        Call { kind, dtype, op, root, len }
    }

    /// What `theirs` does differently from this call, which `reference`
    /// ("rank 0", "this rank") made, in words; `None` when they agree.
    pub fn difference(&self, theirs: &Call, reference: &str) -> Option<String> {
        Some(if theirs.kind != self.kind {
            format!("it called {:?} while {reference} called {:?}", theirs.kind, self.kind)
        } else if theirs.dtype != self.dtype {
            format!("its buffer is {:?}, {reference}'s is {:?}", theirs.dtype, self.dtype)
        } else if theirs.len != self.len {
            format!("its buffer has {} elements, {reference}'s has {}", theirs.len, self.len)
        } else if theirs.op != self.op {
            format!("it asked for {:?}, {reference} for {:?}", theirs.op, self.op)
        } else if theirs.root != self.root {
            format!("its root is {}, {reference}'s is {}", theirs.root, self.root)
        } else {
            return None;
        })
    }

    /// The call as numbers, for a wire or an MPI gather; read by [`Call::from_words`].
    pub fn to_words(self) -> [u64; 5] {
        [
            self.kind as u64,
            self.dtype.map_or(u64::MAX, |d| d as u64),
            self.op.map_or(u64::MAX, |o| o as u64),
            self.root as u64,
            self.len as u64,
        ]
    }

    pub fn from_words(w: [u64; 5]) -> Option<Self> {
        let kind = [
            Kind::AllReduce,
            Kind::AllReduceSegments,
            Kind::Broadcast,
            Kind::AllGather,
            Kind::ReduceScatter,
            Kind::Barrier,
        ]
        .into_iter()
        .find(|k| *k as u64 == w[0])?;
        let optional =
            |v: u64, all: &[u64]| if v == u64::MAX { Some(None) } else { all.contains(&v).then_some(Some(v)) };
        let dtype = optional(w[1], &[0, 1, 2])?.map(|d| [DType::F32, DType::F16, DType::BF16][d as usize]);
        let op = optional(w[2], &[0, 1, 2, 3])?
            .map(|o| [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min][o as usize]);
        Some(Call { kind, dtype, op, root: usize::try_from(w[3]).ok()?, len: usize::try_from(w[4]).ok()? })
    }
}

/// Rank 0's call is the reference; the first rank that differs is named
/// with what it did differently. Every rank that sees the same calls reaches
/// the same verdict, so they all fail or all go on.
pub(crate) fn verdict(calls: &[Call]) -> Result<(), (usize, String)> {
    let first = &calls[0];
    for (rank, c) in calls.iter().enumerate().skip(1) {
        if let Some(detail) = first.difference(c, "rank 0") {
            return Err((rank, detail));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_garbage_is_refused() {
        let calls = [
            Call::new(Kind::AllReduce, Some(DType::BF16), Some(ReduceOp::Min), 0, 1 << 40),
            Call::new(Kind::Barrier, None, None, 0, 0),
            Call::new(Kind::Broadcast, Some(DType::F16), None, 3, 7),
        ];
        for c in calls {
            assert_eq!(Call::from_words(c.to_words()), Some(c));
        }
        assert_eq!(Call::from_words([0, 0, 0, 0, 0]), None);
        assert_eq!(Call::from_words([1, 9, 0, 0, 0]), None);
        assert_eq!(Call::from_words([1, 0, 4, 0, 0]), None);
    }

    #[test]
    fn the_first_rank_that_differs_is_named_with_what_differs() {
        let base = Call::new(Kind::AllReduce, Some(DType::F32), Some(ReduceOp::Sum), 0, 10);
        assert_eq!(verdict(&[base, base, base]), Ok(()));
        let longer = Call { len: 11, ..base };
        let (rank, detail) = verdict(&[base, base, longer, Call { kind: Kind::Barrier, ..base }]).unwrap_err();
        assert_eq!(rank, 2);
        assert_eq!(detail, "its buffer has 11 elements, rank 0's has 10");
    }
}

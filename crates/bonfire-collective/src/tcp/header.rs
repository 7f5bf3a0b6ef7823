//! The header each rank sends the next before a call's data: which call it
//! is making, and its number, so ranks that disagree or fell out of step fail
//! with an error that says how, instead of reducing the wrong bytes.

use super::pipeline::{io_error, Link, Watch};
use crate::call::{Call, Kind};
use crate::element::{DType, ReduceOp};
use crate::error::{CommError, Result};

const CALL: u32 = u32::from_le_bytes(*b"BFRC");

/// Sent to the next rank before every call's data: the call and its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub call: Call,
    pub seq: u64,
}

impl Header {
    pub const BYTES: usize = 4 + 6 * 8;

    pub fn new(kind: Kind, dtype: DType, op: Option<ReduceOp>, root: usize, len: usize) -> Self {
        Header { call: Call::new(kind, Some(dtype), op, root, len), seq: 0 }
    }

    fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[0..4].copy_from_slice(&CALL.to_le_bytes());
        let words = self.call.to_words().into_iter().chain([self.seq]);
        for (i, w) in words.enumerate() {
            out[4 + 8 * i..12 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    fn decode(b: &[u8; Self::BYTES]) -> Option<Self> {
        let word = |i: usize| u64::from_le_bytes(b[4 + 8 * i..12 + 8 * i].try_into().unwrap());
        if b[0..4] != CALL.to_le_bytes() {
            return None;
        }
        Some(Header { call: Call::from_words(std::array::from_fn(word))?, seq: word(5) })
    }

    /// What the previous rank's call does differently, in words.
    fn difference(&self, theirs: &Header) -> Option<String> {
        if theirs.seq != self.seq {
            return Some(format!("it is at call number {}, this rank at {}", theirs.seq, self.seq));
        }
        self.call.difference(&theirs.call, "this rank")
    }
}

pub(super) fn exchange_header(watch: &Watch, link: &Link, mine: Header) -> Result<()> {
    let name = watch.op;
    link.transport.send(&mine.encode()).map_err(|e| io_error(name, link.next_rank, watch.timeout, e))?;
    let mut bytes = [0u8; Header::BYTES];
    watch.read(link.transport.as_ref(), &mut bytes, link.prev_rank, false)?;
    let theirs = Header::decode(&bytes).ok_or_else(|| CommError::Protocol {
        peer: format!("rank {}", link.prev_rank),
        detail: "not a collective header".into(),
    })?;
    match mine.difference(&theirs) {
        None => Ok(()),
        Some(detail) => Err(CommError::Mismatch { op: name, rank: link.prev_rank, detail }),
    }
}

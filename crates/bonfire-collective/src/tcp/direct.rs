//! All-reduce by reading the peers' memory directly, for a ring whose ranks
//! all run on one host (Linux's cross-memory attach, `process_vm_readv`, as
//! Open MPI's shared-memory transport uses for large messages). Over
//! loopback sockets every byte is copied by the kernel into the socket and
//! out of it again, on the very cores that train; here it is copied once,
//! from the peer's buffer, and nothing is staged. The sockets still carry
//! each call's header and the barriers, so the checks that ranks make the
//! same call, the timeouts and the errors naming a lost peer are the ring's.
//!
//! A call, as in the in-process group: every rank publishes where its
//! buffer lies (its segments' addresses, in a list whose place a small
//! header at a fixed address gives); after a barrier, rank r reduces part r
//! of the buffer into its own memory, pulling the peers' values of that part
//! a chunk at a time into a scratch buffer that stays in cache; after a
//! second barrier every rank pulls each other part from the rank that
//! reduced it, straight into its own buffer; a third barrier keeps every
//! buffer in place until all have pulled. Per rank that reads the buffer
//! from the peers once and from its own memory once and writes it once.
//!
//! Whether the ranks can do this is found out, not configured: each rank
//! publishes its process id and its header's address in the rendezvous
//! store, with a random value the header holds; the group reads peers'
//! memory only if every rank read every other's header and found that
//! value (on another host, or where the kernel forbids it, a read fails or
//! finds something else).
//!
//! Safety: between the first two barriers a rank writes only part r of its
//! own buffer (the part it reduces) and peers read only their own parts of
//! it; between the last two it writes only the other parts, and peers read
//! only part r. A rank changes its header and list only before the first
//! barrier, when every peer has left the previous call.

use std::io;

use crate::communicator::split;
use crate::element::{Element, ReduceOp};
use crate::error::{CommError, Result};

/// Values pulled from each peer per step of the reduction: 64 KiB of f32,
/// so that the scratch and the part of the buffer it is added to stay in
/// the L2 cache.
const CHUNK_BYTES: usize = 64 << 10;

/// What peers read to find this rank's buffer: a check value, the number
/// of segments, and where their list lies.
type Header = [u64; 3];

/// One segment of a rank's buffer: its address and its length in values.
type Piece = [u64; 2];

/// A peer as this rank reaches it.
pub(crate) struct Peer {
    pub pid: i32,
    /// Where its [`Header`] lies in its memory.
    pub header: u64,
    pub check: u64,
}

/// This rank's side of direct reads: its header (at a fixed address for
/// the life of the group), its list of segments, and every peer.
pub(crate) struct DirectReads {
    header: Box<Header>,
    list: Vec<Piece>,
    peers: Vec<Option<Peer>>,
    rank: usize,
    scratch: Vec<u64>,
}

impl DirectReads {
    /// This rank's header, holding `check`, before the peers are known.
    pub fn new(rank: usize, check: u64) -> Self {
        DirectReads { header: Box::new([check, 0, 0]), list: Vec::new(), peers: Vec::new(), rank, scratch: Vec::new() }
    }

    /// Where peers find this rank's header.
    pub fn header_address(&self) -> u64 {
        self.header.as_ptr() as u64
    }

    /// Records the peers (`None` at this rank's own index) and tells whether
    /// this rank can read every one's header and finds its check value.
    pub fn meet(&mut self, peers: Vec<Option<Peer>>) -> bool {
        self.peers = peers;
        self.peers.iter().flatten().all(|p| {
            let mut header: Header = [0; 3];
            read_into(p.pid, p.header, bytemuck::cast_slice_mut(&mut header)).is_ok() && header[0] == p.check
        })
    }

    /// Combines `segments` (one buffer cut in pieces, as long on every rank)
    /// across ranks, reading the peers' memory. `sync()` is a barrier over
    /// the ring.
    pub fn all_reduce<T: Element>(
        &mut self,
        segments: &mut [&mut [T]],
        op: ReduceOp,
        mut sync: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let (world, rank) = (self.peers.len(), self.rank);
        let total: usize = segments.iter().map(|s| s.len()).sum();
        if total == 0 {
            return Ok(()); // on every rank: the header said so
        }
        self.list.clear();
        self.list.extend(segments.iter_mut().map(|s| [s.as_mut_ptr() as u64, s.len() as u64]));
        self.header[1] = self.list.len() as u64;
        self.header[2] = self.list.as_ptr() as u64;
        sync()?;
        let lists = self.peer_lists()?;
        let size = std::mem::size_of::<T>();

        // Part r: pull each peer's values a chunk at a time and add them in.
        let part = split(total, world, rank);
        let chunk = (CHUNK_BYTES / size).max(1);
        let words = (chunk * size).div_ceil(8);
        if self.scratch.len() < words {
            self.scratch.resize(words, 0);
        }
        let scale = (op == ReduceOp::Mean).then(|| 1.0 / world as f32);
        let mut at = part.start;
        while at < part.end {
            let range = at..(at + chunk).min(part.end);
            let n = range.len();
            for (peer, list) in lists.iter().enumerate() {
                let Some(list) = list else { continue };
                let pid = self.peer(peer).pid;
                let scratch = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.scratch)[..n * size];
                for (offset, remote, len) in pieces(list, range.clone(), size) {
                    read_into(pid, remote, &mut scratch[offset * size..(offset + len) * size])
                        .map_err(|e| lost(peer, e))?;
                }
                let incoming: &[T] = &bytemuck::cast_slice::<u64, T>(&self.scratch)[..n];
                for_own(&self.list, range.clone(), |offset, mine: &mut [T]| {
                    T::combine(mine, &incoming[offset..offset + mine.len()], op)
                });
            }
            if let Some(factor) = scale {
                for_own(&self.list, range.clone(), |_, mine: &mut [T]| T::scale(mine, factor));
            }
            at = range.end;
        }
        sync()?;

        // Every other part: straight from the rank that reduced it.
        for (peer, list) in lists.iter().enumerate() {
            let Some(list) = list else { continue };
            let pid = self.peer(peer).pid;
            let theirs = split(total, world, peer);
            for (offset, remote, len) in pieces(list, theirs.clone(), size) {
                // The peer's piece may span several of this rank's.
                let start = theirs.start + offset;
                let mut result = Ok(());
                for_own(&self.list, start..start + len, |at, mine: &mut [T]| {
                    if result.is_ok() {
                        result = read_into(pid, remote + (at * size) as u64, bytemuck::cast_slice_mut(mine));
                    }
                });
                result.map_err(|e| lost(peer, e))?;
            }
        }
        sync()?;
        Ok(())
    }

    fn peer(&self, rank: usize) -> &Peer {
        self.peers[rank].as_ref().expect("a peer, not this rank")
    }

    /// Every peer's list of segments (`None` for this rank).
    fn peer_lists(&self) -> Result<Vec<Option<Vec<Piece>>>> {
        self.peers
            .iter()
            .enumerate()
            .map(|(rank, peer)| {
                let Some(peer) = peer else { return Ok(None) };
                let mut header: Header = [0; 3];
                read_into(peer.pid, peer.header, bytemuck::cast_slice_mut(&mut header)).map_err(|e| lost(rank, e))?;
                let mut list: Vec<Piece> = vec![[0; 2]; header[1] as usize];
                read_into(peer.pid, header[2], bytemuck::cast_slice_mut(&mut list)).map_err(|e| lost(rank, e))?;
                Ok(Some(list))
            })
            .collect()
    }
}

/// The pieces of `range` (in values) of a buffer laid out as `list`: for
/// each, where it starts relative to `range.start`, its address, and its
/// length in values.
fn pieces(list: &[Piece], range: std::ops::Range<usize>, size: usize) -> Vec<(usize, u64, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for piece in list {
        let [at, len] = *piece;
        let end = start + len as usize;
        let (from, to) = (range.start.max(start), range.end.min(end));
        if from < to {
            out.push((from - range.start, at + ((from - start) * size) as u64, to - from));
        }
        start = end;
        if start >= range.end {
            break;
        }
    }
    out
}

/// Calls `f(offset, values)` for each piece of `range` of this rank's own
/// buffer, `offset` being where it starts relative to `range.start`.
fn for_own<T>(list: &[Piece], range: std::ops::Range<usize>, mut f: impl FnMut(usize, &mut [T])) {
    for (offset, at, len) in pieces(list, range, std::mem::size_of::<T>()) {
        // SAFETY: the list describes this rank's own segments, borrowed for
        // the call; the caller touches only what the module comment allows.
        f(offset, unsafe { std::slice::from_raw_parts_mut(at as *mut T, len) });
    }
}

fn lost(rank: usize, source: io::Error) -> CommError {
    CommError::PeerLost { op: "all_reduce", rank, source }
}

/// Fills `dst` from `remote` in process `pid`'s memory.
fn read_into(pid: i32, remote: u64, dst: &mut [u8]) -> io::Result<()> {
    let local = libc::iovec { iov_base: dst.as_mut_ptr().cast(), iov_len: dst.len() };
    let theirs = libc::iovec { iov_base: remote as *mut libc::c_void, iov_len: dst.len() };
    // SAFETY: `local` is memory this call borrows mutably; the kernel checks `theirs`.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &theirs, 1, 0) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize == dst.len() => Ok(()),
        _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a partial read of a peer's memory")),
    }
}

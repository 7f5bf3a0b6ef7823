//! All-reduce through shared memory, for a ring whose ranks all run on one
//! host. Over loopback sockets the kernel copies every byte twice (into the
//! socket and out of it) on the very cores that train, and the TCP stack
//! adds its own work; through memory the ranks reduce each other's data
//! directly. The sockets still carry each call's header and the barriers,
//! so the checks that ranks make the same call, the timeouts and the errors
//! naming a lost peer are the ring's own.
//!
//! Each rank owns one file in /dev/shm, which every rank of the group maps.
//! An all-reduce copies the buffer into the rank's own file; after a barrier
//! each rank runs the in-process group's algorithm over the files (rank r
//! reduces part r of every rank's copy and writes the result back into every
//! copy); after a second barrier each rank copies the result out of its own
//! file. Per rank that is one read and one write of the buffer more than the
//! in-process group, and no system call but the barriers'.
//!
//! Whether the ranks share a host is found out, not configured: every rank
//! creates its file under a name unique to the group, then opens every other
//! rank's; the group uses the files only if every rank could open them all.
//! Once all have, each rank unlinks its own file, so nothing is left behind
//! in /dev/shm when a process dies. The files grow, all at once, when a call
//! needs more room; room that /dev/shm cannot give turns the fast path off
//! for the group, and the call goes around the ring.
//!
//! Safety: a rank writes into a peer's file only within the part it reduces,
//! between the two barriers of a call, and into its own file only before the
//! first barrier or after the second; no two ranks touch the same bytes
//! between two barriers (the argument of the in-process group).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use memmap2::MmapRaw;

use super::pipeline::{self, Link, Watch};
use super::plan::{self, Phases};
use crate::communicator::split;
use crate::element::{Element, ReduceOp};
use crate::error::Result;
use crate::inproc::reduce_run;

/// Where the files live: a memory-backed file system on Linux.
const DIR: &str = "/dev/shm";

/// The file of `rank` in the group named `group`.
fn path(group: &str, rank: usize) -> PathBuf {
    PathBuf::from(DIR).join(format!("{group}-{rank}"))
}

/// This rank's file, created (empty) before the group checks that everyone
/// can open everyone's; unlinked when `unlink` is dropped.
pub(crate) struct OwnFile {
    file: File,
    unlink: Unlink,
}

impl OwnFile {
    pub fn create(group: &str, rank: usize) -> io::Result<Self> {
        let path = path(group, rank);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        Ok(OwnFile { file, unlink: Unlink(path) })
    }

    /// Opens every other rank's file of the group; `None` if any is missing
    /// (the rank runs on another host, or sees another /dev/shm).
    pub fn open_peers(self, group: &str, world: usize, rank: usize) -> (Option<SharedFiles>, Unlink) {
        let unlink = self.unlink;
        let mut files = Vec::with_capacity(world);
        let mut own = Some(self.file);
        for peer in 0..world {
            let file = if peer == rank {
                own.take()
            } else {
                OpenOptions::new().read(true).write(true).open(path(group, peer)).ok()
            };
            let Some(file) = file else { return (None, unlink) };
            files.push(file);
        }
        let maps = Vec::new();
        (Some(SharedFiles { files, maps, capacity: 0, rank }), unlink)
    }
}

/// Removes this rank's file from /dev/shm when dropped (its memory lives on
/// while a rank has it open or mapped).
pub(crate) struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Every rank's file, mapped.
pub(crate) struct SharedFiles {
    /// By rank; kept open so that a file can be mapped again when it grows.
    files: Vec<File>,
    maps: Vec<MmapRaw>,
    /// Bytes each file holds.
    capacity: usize,
    rank: usize,
}

/// Reserves `bytes` for `file` in /dev/shm: a file only extended would take
/// its pages when first written, and a full /dev/shm would then kill the
/// process (SIGBUS) instead of failing here.
fn reserve(file: &File, bytes: usize) -> io::Result<()> {
    let len = libc::off_t::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a plain system call on a descriptor this file owns.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// What [`SharedFiles::all_reduce`] did.
pub(crate) enum Outcome {
    Reduced,
    /// Some rank could not make room: the group no longer uses the files,
    /// and this call must go around the ring.
    NoRoom,
}

impl SharedFiles {
    /// Every rank's file as `len` values of `T`.
    ///
    /// # Safety
    ///
    /// The files must hold `len` values (`capacity`), and the caller must
    /// touch the values only as the module comment allows.
    unsafe fn regions<T: Element>(&mut self, len: usize) -> Vec<&mut [T]> {
        self.maps.iter().map(|m| unsafe { std::slice::from_raw_parts_mut(m.as_mut_ptr().cast::<T>(), len) }).collect()
    }

    /// Grows every file to at least `bytes`, every rank its own, and maps
    /// them again. False (on every rank) if some rank could not.
    fn make_room(&mut self, bytes: usize, sync: &mut impl FnMut(bool) -> Result<bool>) -> Result<bool> {
        let capacity = bytes.next_power_of_two();
        if !sync(reserve(&self.files[self.rank], capacity).is_ok())? {
            return Ok(false);
        }
        // Every file has grown: map them all again.
        self.maps.clear();
        let mapped: io::Result<Vec<MmapRaw>> = self.files.iter().map(MmapRaw::map_raw).collect();
        let ok = mapped.map(|maps| self.maps = maps).is_ok();
        self.capacity = capacity;
        sync(ok)
    }

    /// Combines `segments` (one buffer cut in pieces, as long on every rank)
    /// across ranks, through the files. `sync(ok)` is a barrier over the
    /// ring that says whether every rank passed `ok = true`.
    pub fn all_reduce<T: Element>(
        &mut self,
        segments: &mut [&mut [T]],
        op: ReduceOp,
        mut sync: impl FnMut(bool) -> Result<bool>,
    ) -> Result<Outcome> {
        let (world, rank) = (self.files.len(), self.rank);
        let total: usize = segments.iter().map(|s| s.len()).sum();
        if total == 0 {
            return Ok(Outcome::Reduced); // on every rank: the header said so
        }
        let bytes = total * std::mem::size_of::<T>();
        if bytes > self.capacity && !self.make_room(bytes, &mut sync)? {
            return Ok(Outcome::NoRoom);
        }
        // SAFETY (each step): the files hold `capacity` >= `bytes`, and each
        // step touches only what the module comment allows it. The slices
        // are made anew for every step, so that none lives across a barrier
        // while a peer writes the memory it covers.
        let own = unsafe { self.regions::<T>(total) }.swap_remove(rank);
        let mut at = 0;
        for s in segments.iter() {
            own[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
        sync(true)?;
        let part = split(total, world, rank);
        let mut run: Vec<&mut [T]> =
            unsafe { self.regions::<T>(total) }.into_iter().map(|r| &mut r[part.clone()]).collect();
        reduce_run(&mut run, op, (op == ReduceOp::Mean).then(|| 1.0 / world as f32));
        sync(true)?;
        let own = unsafe { self.regions::<T>(total) }.swap_remove(rank);
        let mut at = 0;
        for s in segments.iter_mut() {
            s.copy_from_slice(&own[at..at + s.len()]);
            at += s.len();
        }
        Ok(Outcome::Reduced)
    }
}

/// A barrier over the ring that also tells whether every rank passed
/// `ok = true`: an all-reduce of one flag per rank, without a header of its
/// own (it runs inside a call whose header the ranks have exchanged).
pub(crate) fn agree(watch: &Watch, link: &Link, world: usize, rank: usize, ok: bool) -> Result<bool> {
    let mut flags = vec![0f32; world];
    flags[rank] = f32::from(u8::from(ok));
    let plan = plan::ring(world, world, rank, world, Phases::Both);
    let mut scratch = Vec::new();
    pipeline::run(watch, link, &mut flags, &plan, ReduceOp::Sum, 1.0, &mut scratch)?;
    Ok(flags.iter().sum::<f32>() == world as f32)
}

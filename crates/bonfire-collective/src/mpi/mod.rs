//! MPI as a communicator (feature `mpi`): the processes of an `mpirun` or
//! `srun` job, over whatever the MPI library picks for the machine (shared
//! memory within a node; InfiniBand or TCP between nodes) and with its
//! collective algorithms, which a hand-written ring cannot match on a
//! cluster's topology. Built on the system's MPI through `mpi-sys` (rsmpi's
//! bindings, generated against the installed `mpi.h`: Open MPI or MPICH).
//!
//! Three things MPI does not do, and how this module makes up for them:
//!
//! - **A timeout.** An MPI collective blocks until every rank has joined; it
//!   cannot be cancelled. Every MPI call of this process therefore runs on
//!   one thread of its own (`bonfire-mpi`, which also initialises and
//!   finalises MPI, so MPI needs no more than `MPI_THREAD_FUNNELED`), and the
//!   caller waits for its answer at most the timeout. A call that times out
//!   stays blocked on that thread with the buffers it was given, which it
//!   owns: they were moved to it (the staging buffers below), so nothing is
//!   freed under MPI's feet. The communicator then fails every later call,
//!   and the process is expected to exit: MPI cannot be finalised with a
//!   collective pending, and `mpirun` ends the job when one rank exits with
//!   an error.
//! - **Half precision.** MPI has no f16 or bf16 type. Values are widened to
//!   f32 into the staging buffer, moved and reduced there, and rounded back
//!   once, like the ring's accumulation in f32.
//! - **A check that every rank made the same call.** Each call first gathers
//!   every rank's [`Call`] (five integers) and fails with a
//!   [`CommError::Mismatch`] naming the first rank that differs from rank 0,
//!   instead of letting MPI mix two collectives.
//!
//! The price of the staging is one copy of the buffer in and one out per
//! call, on top of MPI's own work.

mod parts;
mod thread;

use std::os::raw::{c_char, c_int};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use mpi_sys as ffi;

use parts::{agree, count, mpi_op, stage_in, stage_out, Verdict};
use thread::{error_text, MpiThread};

use crate::call::{Call, Kind};
use crate::communicator::{check_blocks, Communicator, Group};
use crate::element::{BufMut, BufRef, ReduceOp};
use crate::error::{CommError, Result};

/// One process of an MPI job: see the module documentation.
pub struct MpiCommunicator {
    thread: Arc<MpiThread>,
    comm: Handle,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// The send and receive staging buffers, reused from call to call.
    staging: (Vec<f32>, Vec<f32>),
    failed: Option<String>,
}

/// An MPI communicator handle (a pointer in Open MPI, an integer in MPICH).
#[derive(Clone, Copy)]
struct Handle(ffi::MPI_Comm);

// SAFETY: the handle is only passed to MPI on the `bonfire-mpi` thread.
unsafe impl Send for Handle {}

impl MpiCommunicator {
    /// Joins every process of the MPI job (a duplicate of `MPI_COMM_WORLD`,
    /// so that these collectives never match the program's own MPI calls).
    /// Initialises MPI unless the program already has, with at least
    /// `MPI_THREAD_SERIALIZED`; then MPI is the program's to finalise, else
    /// it is finalised when the last communicator is dropped. Every process
    /// of the job must call this, within `timeout` of each other.
    pub fn world(timeout: Duration) -> Result<Self> {
        let thread = MpiThread::get()?;
        let (tx, rx) = mpsc::channel();
        thread.run(Box::new(move || {
            let _ = tx.send(duplicate_world());
        }))?;
        let (comm, rank, world) = match rx.recv_timeout(timeout) {
            Ok(joined) => joined?,
            Err(_) => {
                thread.stuck.store(true, Ordering::SeqCst);
                return Err(CommError::Stalled { op: "MPI_Comm_dup", waited: timeout });
            }
        };
        Ok(MpiCommunicator { thread, comm, rank, world, timeout, staging: Default::default(), failed: None })
    }

    /// The MPI library's own description, such as "Open MPI v4.1.4, ...".
    pub fn library_version() -> String {
        let mut text = vec![0u8; ffi::MPI_MAX_LIBRARY_VERSION_STRING as usize + 1];
        let mut len: c_int = 0;
        // SAFETY: MPI_Get_library_version may be called before MPI_Init; the
        // buffer holds MPI_MAX_LIBRARY_VERSION_STRING characters.
        unsafe { ffi::MPI_Get_library_version(text.as_mut_ptr() as *mut c_char, &mut len) };
        text.truncate(len.max(0) as usize);
        String::from_utf8_lossy(&text).trim().to_string()
    }

    /// All-reduces the send staging buffer, which the caller filled, into
    /// the receive one.
    fn all_reduce_staged(&mut self, name: &'static str, call: Call, op: ReduceOp) -> Result<()> {
        let n = count(name, self.staging.0.len())?;
        self.run(name, call, move |comm, send, recv| {
            recv.resize(send.len(), 0.0);
            // SAFETY: both buffers hold n f32 values.
            unsafe {
                ffi::MPI_Allreduce(
                    send.as_ptr().cast(),
                    recv.as_mut_ptr().cast(),
                    n,
                    ffi::RSMPI_FLOAT,
                    mpi_op(op),
                    comm,
                )
            }
        })
    }

    /// The factor that finishes `op` on summed values: 1 / world for Mean.
    fn finish(&self, op: ReduceOp) -> f32 {
        if op == ReduceOp::Mean {
            1.0 / self.world as f32
        } else {
            1.0
        }
    }

    /// Runs `collective` on the MPI thread with the staging buffers after
    /// every rank agreed on `call`, waiting at most the timeout.
    fn run(
        &mut self,
        name: &'static str,
        call: Call,
        collective: impl FnOnce(ffi::MPI_Comm, &mut Vec<f32>, &mut Vec<f32>) -> c_int + Send + 'static,
    ) -> Result<()> {
        if let Some(why) = &self.failed {
            return Err(CommError::Aborted(why.clone()));
        }
        let (comm, world) = (self.comm, self.world);
        let (mut send, mut recv) = std::mem::take(&mut self.staging);
        let (tx, rx) = mpsc::channel();
        self.thread.run(Box::new(move || {
            let handle = comm;
            let outcome =
                agree(handle.0, world, call).and_then(|()| match collective(handle.0, &mut send, &mut recv) {
                    0 => Ok(()),
                    code => Err(Verdict::Failed(error_text(code))),
                });
            let _ = tx.send((outcome, send, recv));
        }))?;
        let failure = match rx.recv_timeout(self.timeout) {
            Ok((outcome, send, recv)) => {
                self.staging = (send, recv);
                match outcome {
                    Ok(()) => return Ok(()),
                    Err(Verdict::Mismatch(rank, detail)) => CommError::Mismatch { op: name, rank, detail },
                    Err(Verdict::Failed(detail)) => CommError::Mpi { op: name, detail },
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.thread.stuck.store(true, Ordering::SeqCst);
                CommError::Stalled { op: name, waited: self.timeout }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                CommError::Mpi { op: name, detail: "the MPI thread stopped".into() }
            }
        };
        self.failed = Some(failure.to_string());
        Err(failure)
    }
}

impl Group for MpiCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }
}

impl Communicator for MpiCommunicator {
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn all_reduce(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<()> {
        stage_in(buf.as_buf_ref(), &mut self.staging.0);
        let call = Call::new(Kind::AllReduce, Some(buf.dtype()), Some(op), 0, buf.len());
        self.all_reduce_staged("all_reduce", call, op)?;
        stage_out(&self.staging.1, buf, self.finish(op));
        Ok(())
    }

    fn broadcast(&mut self, buf: BufMut<'_>, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(CommError::invalid("broadcast", format!("root {root} is not a rank of {}", self.world)));
        }
        let n = count("broadcast", buf.len())?;
        stage_in(buf.as_buf_ref(), &mut self.staging.0);
        let call = Call::new(Kind::Broadcast, Some(buf.dtype()), None, root, buf.len());
        self.run("broadcast", call, move |comm, send, _| {
            // SAFETY: the buffer holds n f32 values; root is a rank of comm.
            unsafe { ffi::MPI_Bcast(send.as_mut_ptr().cast(), n, ffi::RSMPI_FLOAT, root as c_int, comm) }
        })?;
        stage_out(&self.staging.0, buf, 1.0);
        Ok(())
    }

    fn all_gather(&mut self, input: BufRef<'_>, output: BufMut<'_>) -> Result<()> {
        check_blocks("all_gather", self.world, output.len(), input.len())?;
        if input.dtype() != output.dtype() {
            return Err(CommError::invalid("all_gather", "input and output element types differ"));
        }
        // The whole output must fit one MPI count too.
        count("all_gather", output.len())?;
        let n = count("all_gather", input.len())?;
        stage_in(input, &mut self.staging.0);
        let call = Call::new(Kind::AllGather, Some(output.dtype()), None, 0, n as usize);
        let whole = output.len();
        self.run("all_gather", call, move |comm, send, recv| {
            recv.resize(whole, 0.0);
            // SAFETY: send holds n and recv world * n f32 values.
            unsafe {
                ffi::MPI_Allgather(
                    send.as_ptr().cast(),
                    n,
                    ffi::RSMPI_FLOAT,
                    recv.as_mut_ptr().cast(),
                    n,
                    ffi::RSMPI_FLOAT,
                    comm,
                )
            }
        })?;
        stage_out(&self.staging.1, output, 1.0);
        Ok(())
    }

    fn reduce_scatter(&mut self, input: BufRef<'_>, output: BufMut<'_>, op: ReduceOp) -> Result<()> {
        check_blocks("reduce_scatter", self.world, input.len(), output.len())?;
        if input.dtype() != output.dtype() {
            return Err(CommError::invalid("reduce_scatter", "input and output element types differ"));
        }
        count("reduce_scatter", input.len())?;
        let n = count("reduce_scatter", output.len())?;
        let call = Call::new(Kind::ReduceScatter, Some(input.dtype()), Some(op), 0, input.len());
        stage_in(input, &mut self.staging.0);
        self.run("reduce_scatter", call, move |comm, send, recv| {
            recv.resize(n as usize, 0.0);
            // SAFETY: send holds world * n and recv n f32 values.
            unsafe {
                ffi::MPI_Reduce_scatter_block(
                    send.as_ptr().cast(),
                    recv.as_mut_ptr().cast(),
                    n,
                    ffi::RSMPI_FLOAT,
                    mpi_op(op),
                    comm,
                )
            }
        })?;
        stage_out(&self.staging.1, output, self.finish(op));
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        // Gathering the calls is itself a barrier.
        self.run("barrier", Call::new(Kind::Barrier, None, None, 0, 0), |_, _, _| 0)
    }
}

impl Drop for MpiCommunicator {
    fn drop(&mut self) {
        if !self.thread.stuck.load(Ordering::SeqCst) {
            let comm = self.comm;
            // Freeing a communicator is local: it does not wait for peers.
            let _ = self.thread.run(Box::new(move || {
                let mut handle = comm;
                // SAFETY: this communicator's duplicate, no longer used.
                unsafe { ffi::MPI_Comm_free(&mut handle.0) };
            }));
        }
    }
}

/// MPI_COMM_WORLD duplicated, errors returned rather than fatal, with this
/// process's rank and the world size.
fn duplicate_world() -> Result<(Handle, usize, usize)> {
    let failed = |op: &'static str, code: c_int| Err(CommError::Mpi { op, detail: error_text(code) });
    // SAFETY: MPI is initialised on this thread; each call gets valid pointers.
    unsafe {
        let mut comm: ffi::MPI_Comm = ffi::RSMPI_COMM_NULL;
        let code = ffi::MPI_Comm_dup(ffi::RSMPI_COMM_WORLD, &mut comm);
        if code != 0 {
            return failed("MPI_Comm_dup", code);
        }
        ffi::MPI_Comm_set_errhandler(comm, ffi::RSMPI_ERRORS_RETURN);
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        ffi::MPI_Comm_rank(comm, &mut rank);
        ffi::MPI_Comm_size(comm, &mut size);
        Ok((Handle(comm), rank as usize, size as usize))
    }
}

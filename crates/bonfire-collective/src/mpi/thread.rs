//! The one thread of the process that calls MPI: it initialises MPI (unless
//! the program did), runs every call the communicators send it, one at a
//! time, and finalises MPI when the last communicator is gone.

use std::os::raw::{c_char, c_int};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};

use mpi_sys as ffi;

use crate::error::{CommError, Result};

/// The `bonfire-mpi` thread, shared by every MpiCommunicator of the process.
pub(super) struct MpiThread {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// A call never returned: the thread is blocked in MPI for good.
    pub stuck: AtomicBool,
}

pub(super) type Job = Box<dyn FnOnce() + Send>;

/// The live MPI thread, if any.
static THREAD: Mutex<Weak<MpiThread>> = Mutex::new(Weak::new());

impl MpiThread {
    pub fn get() -> Result<Arc<MpiThread>> {
        let mut slot = THREAD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(thread) = slot.upgrade() {
            return Ok(thread);
        }
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("bonfire-mpi".into())
            .spawn(move || {
                let ours = match initialize() {
                    Ok(ours) => ours,
                    Err(e) => return drop(ready.send(Err(e))),
                };
                let _ = ready.send(Ok(()));
                for job in queue {
                    job();
                }
                if ours {
                    // SAFETY: every communicator is freed; on the thread that initialised.
                    unsafe { ffi::MPI_Finalize() };
                }
            })
            .map_err(|e| CommError::io("starting the MPI thread", e))?;
        started.recv().map_err(|_| CommError::Unavailable("the MPI thread stopped while starting MPI".into()))??;
        let thread = Arc::new(MpiThread {
            jobs: Mutex::new(Some(jobs)),
            handle: Mutex::new(Some(handle)),
            stuck: AtomicBool::new(false),
        });
        *slot = Arc::downgrade(&thread);
        Ok(thread)
    }

    pub fn run(&self, job: Job) -> Result<()> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| CommError::Mpi { op: "MPI", detail: "the MPI thread has stopped".into() })
    }
}

impl Drop for MpiThread {
    /// Lets the thread finalise MPI and waits for it, unless it is blocked
    /// in a collective that never finished: then the process exits without.
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle.filter(|_| !self.stuck.load(Ordering::SeqCst)) {
            let _ = handle.join();
        }
    }
}

/// Starts MPI on this thread, unless the program did; returns whether it
/// did (and so must finalise).
fn initialize() -> Result<bool> {
    let unavailable = |what: String| Err(CommError::Unavailable(what));
    let (mut initialized, mut finalized): (c_int, c_int) = (0, 0);
    // SAFETY: both may be called at any time.
    unsafe {
        ffi::MPI_Initialized(&mut initialized);
        ffi::MPI_Finalized(&mut finalized);
    }
    if finalized != 0 {
        return unavailable(
            "MPI was already finalised in this process (MPI starts once: keep an MpiCommunicator \
             alive while others are created)"
                .into(),
        );
    }
    // SAFETY: reading MPI's thread-level constants.
    let (funneled, serialized) = unsafe { (ffi::RSMPI_THREAD_FUNNELED, ffi::RSMPI_THREAD_SERIALIZED) };
    if initialized != 0 {
        let mut level: c_int = 0;
        // SAFETY: MPI is initialised.
        unsafe { ffi::MPI_Query_thread(&mut level) };
        if level < serialized {
            return unavailable(
                "the program initialised MPI below MPI_THREAD_SERIALIZED; Bonfire calls MPI from a thread \
                 of its own and needs MPI_Init_thread with MPI_THREAD_SERIALIZED or MPI_THREAD_MULTIPLE"
                    .into(),
            );
        }
        return Ok(false);
    }
    let mut provided: c_int = 0;
    // SAFETY: MPI is not initialised; null argc/argv are allowed.
    let code = unsafe { ffi::MPI_Init_thread(std::ptr::null_mut(), std::ptr::null_mut(), funneled, &mut provided) };
    if code != 0 {
        return unavailable(format!("MPI_Init_thread failed: {}", error_text(code)));
    }
    if provided < funneled {
        return unavailable("the MPI library does not support MPI_THREAD_FUNNELED".into());
    }
    Ok(true)
}

/// MPI's own words for an error code.
pub(super) fn error_text(code: c_int) -> String {
    let mut text = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: the buffer holds MPI_MAX_ERROR_STRING characters.
    unsafe { ffi::MPI_Error_string(code, text.as_mut_ptr() as *mut c_char, &mut len) };
    text.truncate(len.max(0) as usize);
    format!("{} (MPI error {code})", String::from_utf8_lossy(&text))
}

//! A thread that owns the communicator and runs collectives in order, so
//! that bucket all-reduces proceed while the backward pass goes on.

use std::sync::mpsc;
use std::thread::JoinHandle;

use bonfire_collective::TensorCollective;
use burn::tensor::backend::Backend;

type Job<B> = Box<dyn FnOnce(&mut dyn TensorCollective<B>) + Send>;

pub struct CommThread<B: Backend> {
    jobs: Option<mpsc::Sender<Job<B>>>,
    handle: Option<JoinHandle<()>>,
    rank: usize,
    world: usize,
}

impl<B: Backend> CommThread<B> {
    pub fn start(mut comm: Box<dyn TensorCollective<B>>) -> Self {
        let (rank, world) = (comm.rank(), comm.world_size());
        let (jobs, queue) = mpsc::channel::<Job<B>>();
        let handle = std::thread::Builder::new()
            .name(format!("bonfire-comm-{rank}"))
            .spawn(move || {
                for job in queue {
                    job(comm.as_mut());
                }
            })
            .expect("spawning the communication thread");
        CommThread { jobs: Some(jobs), handle: Some(handle), rank, world }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Queues `job`; jobs run one at a time in the order they were queued.
    pub fn submit(&self, job: impl FnOnce(&mut dyn TensorCollective<B>) + Send + 'static) {
        // The thread only stops when this handle drops, so the send succeeds.
        let _ = self.jobs.as_ref().expect("running").send(Box::new(job));
    }

    /// Runs `f` on the communicator after everything queued before it.
    pub fn call<R: Send + 'static>(&self, f: impl FnOnce(&mut dyn TensorCollective<B>) -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::channel();
        self.submit(move |c| {
            let _ = tx.send(f(c));
        });
        rx.recv().expect("the communication thread ended early")
    }
}

impl<B: Backend> Drop for CommThread<B> {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

//! The reducer: collects finished gradients into buckets and all-reduces each
//! bucket as soon as it is full, while the backward pass goes on.
//!
//! Readiness (which gradients have arrived), launching (buckets go to the
//! communication thread strictly in bucket order, so every rank issues the
//! same collectives in the same order) and finalisation (unused parameters,
//! waiting for the results) are kept apart, as in PyTorch's reducer.

use std::marker::PhantomData;
use std::sync::{mpsc, Mutex};

use bonfire_collective::CommError;
use burn::tensor::backend::Backend;
use burn::tensor::read_sync;

use crate::bucket::BucketPlan;
use crate::comm_hook::CommHook;
use crate::comm_thread::CommThread;
use crate::error::{ParallelError, Result};
use crate::hook::GradientSink;

pub struct Reducer<B: Backend> {
    plan: BucketPlan,
    names: Vec<String>,
    comm: CommThread,
    hook: CommHook,
    /// Launch buckets during backward (true) or only once it has finished.
    overlap: bool,
    find_unused: bool,
    step: Mutex<Step>,
    done_tx: mpsc::Sender<Done>,
    done_rx: Mutex<mpsc::Receiver<Done>>,
    _backend: PhantomData<fn() -> B>,
}

struct Step {
    /// Bucket buffers; `None` while on the communication thread.
    buffers: Vec<Option<Vec<f32>>>,
    /// Gradients each bucket still waits for.
    pending: Vec<usize>,
    arrived: Vec<bool>,
    /// The parameter's slot holds gradients accumulated by `no_sync` passes
    /// (add to it); otherwise it holds last step's stale values (overwrite).
    accumulated: Vec<bool>,
    next_launch: usize,
    /// False during a `no_sync` backward: gradients only accumulate.
    sync: bool,
    misuse: Option<String>,
}

struct Done {
    bucket: usize,
    buffer: Vec<f32>,
    result: Result<(), CommError>,
}

impl<B: Backend> Reducer<B> {
    /// `names[i]` names parameter i (visiting order) in error messages.
    pub fn new(
        plan: BucketPlan,
        names: Vec<String>,
        comm: CommThread,
        hook: CommHook,
        overlap: bool,
        find_unused: bool,
    ) -> Self {
        let mut buffers: Vec<Option<Vec<f32>>> = plan.lens.iter().map(|&n| Some(vec![0.0; n])).collect();
        // The last bucket launched carries one more value: how many
        // parameters got no gradient on this rank, so that all ranks agree on
        // whether the step had unused parameters.
        match buffers.last_mut() {
            Some(Some(last)) => last.push(0.0),
            _ => buffers.push(Some(vec![0.0])),
        }
        let n = buffers.len();
        let (done_tx, done_rx) = mpsc::channel();
        Reducer {
            step: Mutex::new(Step {
                buffers,
                pending: vec![0; n],
                arrived: vec![false; names.len()],
                accumulated: vec![false; names.len()],
                next_launch: 0,
                sync: true,
                misuse: None,
            }),
            plan,
            names,
            comm,
            hook,
            overlap,
            find_unused,
            done_tx,
            done_rx: Mutex::new(done_rx),
            _backend: PhantomData,
        }
    }

    pub fn comm(&self) -> &CommThread {
        &self.comm
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Step> {
        self.step.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a backward pass; `sync` is false for `no_sync` accumulation.
    pub fn begin(&self, sync: bool) {
        let mut st = self.lock();
        st.sync = sync;
        st.next_launch = 0;
        st.arrived.iter_mut().for_each(|a| *a = false);
        let buckets = st.buffers.len();
        for b in 0..buckets {
            st.pending[b] = self.plan.members.get(b).map_or(0, Vec::len);
        }
        if let Some(Some(last)) = st.buffers.last_mut() {
            *last.last_mut().expect("the counter slot") = 0.0;
        }
        st.misuse = None;
    }

    /// Launches every bucket that is full and whose predecessors are launched.
    fn launch_ready(&self, st: &mut Step) {
        while st.next_launch < st.buffers.len() && st.pending[st.next_launch] == 0 {
            let bucket = st.next_launch;
            let mut buffer = st.buffers[bucket].take().expect("a bucket is launched once per step");
            let hook = self.hook;
            let done = self.done_tx.clone();
            self.comm.submit(move |comm| {
                let result = hook(comm, &mut buffer);
                let _ = done.send(Done { bucket, buffer, result });
            });
            st.next_launch += 1;
        }
    }

    /// Ends a synchronised backward pass: launches what is left, waits for
    /// every bucket, and hands the averaged buckets to `build`.
    pub fn finish<T>(&self, build: impl FnOnce(&BucketPlan, &[Vec<f32>]) -> T) -> Result<T> {
        let unused: Vec<usize>;
        {
            let mut st = self.lock();
            unused = (0..self.names.len()).filter(|&i| self.plan.slots[i].is_some() && !st.arrived[i]).collect();
            // An unused parameter contributes what earlier no_sync passes
            // accumulated for it, or zero.
            for &i in &unused {
                if !st.accumulated[i] {
                    let (bucket, range) = self.plan.slots[i].clone().expect("filtered on slots");
                    if let Some(buf) = st.buffers[bucket].as_mut() {
                        buf[range].fill(0.0);
                    }
                }
            }
            let last = st.buffers.len() - 1;
            // Unlaunched when anything is unused: launching is in order, and
            // the bucket holding an unused parameter cannot have gone.
            if let Some(buf) = st.buffers[last].as_mut() {
                *buf.last_mut().expect("the counter slot") = unused.len() as f32;
            }
            st.pending.iter_mut().for_each(|p| *p = 0);
            self.launch_ready(&mut st);
        }
        let mut reduced: Vec<Option<Vec<f32>>> = vec![None; self.plan.lens.len().max(1)];
        let mut first_error = None;
        {
            let rx = self.done_rx.lock().unwrap_or_else(|e| e.into_inner());
            for _ in 0..reduced.len() {
                let done = rx.recv().expect("the communication thread ended early");
                if let Err(e) = done.result {
                    first_error.get_or_insert(e);
                }
                reduced[done.bucket] = Some(done.buffer);
            }
        }
        let reduced: Vec<Vec<f32>> = reduced.into_iter().map(|b| b.expect("every bucket returns")).collect();
        let result = self.verdict(first_error, &unused, &reduced).map(|()| build(&self.plan, &reduced));
        // The buffers come back holding stale values: the next step
        // overwrites each slot on its first gradient.
        let mut st = self.lock();
        for (slot, buf) in st.buffers.iter_mut().zip(reduced) {
            *slot = Some(buf);
        }
        st.accumulated.iter_mut().for_each(|a| *a = false);
        result
    }

    fn verdict(&self, comm_error: Option<CommError>, unused: &[usize], reduced: &[Vec<f32>]) -> Result<()> {
        if let Some(e) = comm_error {
            return Err(e.into());
        }
        if let Some(m) = self.lock().misuse.take() {
            return Err(ParallelError::Invalid(m));
        }
        let any_rank_unused = reduced.last().and_then(|b| b.last()).is_some_and(|&n| n > 0.0);
        if any_rank_unused && !self.find_unused {
            let detail = if unused.is_empty() {
                "another rank had parameters without a gradient in this step".to_string()
            } else {
                let names: Vec<&str> = unused.iter().map(|&i| self.names[i].as_str()).collect();
                format!("parameters without a gradient in this step: {}", names.join(", "))
            };
            return Err(ParallelError::UnusedParameters(detail));
        }
        Ok(())
    }
}

impl<B: Backend> GradientSink<B> for Reducer<B> {
    fn ready(&self, index: usize, grad: B::FloatTensorPrimitive) {
        let Some((bucket, range)) = self.plan.slots.get(index).cloned().flatten() else { return };
        // Read to the host outside the lock, so that other hooks are not held up.
        let data = match read_sync(B::float_into_data(grad)) {
            Ok(d) => d.convert::<f32>(),
            Err(e) => {
                self.lock().misuse = Some(format!("reading the gradient of {}: {e:?}", self.names[index]));
                return;
            }
        };
        let values = data.as_slice::<f32>().expect("converted to f32");
        let mut st = self.lock();
        if st.arrived[index] {
            st.misuse = Some(format!(
                "parameter {} received a second gradient in one step (was backward run twice on one forward module?)",
                self.names[index]
            ));
            return;
        }
        st.arrived[index] = true;
        let no_sync = !st.sync;
        let accumulate = std::mem::replace(&mut st.accumulated[index], no_sync);
        match st.buffers[bucket].as_mut() {
            Some(buf) if accumulate => {
                for (dst, v) in buf[range].iter_mut().zip(values) {
                    *dst += v;
                }
            }
            Some(buf) => buf[range].copy_from_slice(values),
            None => {
                st.misuse = Some(format!("the bucket of parameter {} was already sent", self.names[index]));
                return;
            }
        }
        st.pending[bucket] -= 1;
        if st.sync && self.overlap {
            self.launch_ready(&mut st);
        }
    }
}

//! The reducer: collects finished gradients into buckets and all-reduces each
//! bucket as soon as it is full, while the backward pass goes on.
//!
//! Readiness (which gradients have arrived), launching (buckets go to the
//! communication thread strictly in bucket order, so every rank issues the
//! same collectives in the same order) and finalisation (unused parameters,
//! waiting for the results) are kept apart, as in PyTorch's reducer. Where
//! the buckets' values lie is a [`BucketStore`]'s business; [`reducer`]
//! picks the store from what the communicator can do.

use std::sync::{mpsc, Arc, Mutex};

use bonfire_collective::{Capabilities, CommError};
use burn::tensor::backend::Backend;
use burn::tensor::ElementConversion;

use crate::bucket::BucketPlan;
use crate::comm_hook::{BucketParameter, CommHook};
use crate::comm_thread::CommThread;
use crate::error::{ParallelError, Result};
use crate::hook::GradientSink;
use crate::host_bucket::{self, HostStore};
use crate::join::{Call, StepLog};
use crate::store::{BucketStore, Reduced};
use crate::tensor_bucket::TensorStore;

/// A DDP step as the strategy drives it, whichever store holds the buckets.
pub trait Reduce<B: Backend>: Send + Sync {
    /// Starts a backward pass; `sync` is false for `no_sync` accumulation.
    fn begin(&self, sync: bool);

    /// Ends a synchronised backward pass: launches what is left and returns
    /// every bucket averaged over all ranks, in bucket order.
    fn finish(&self) -> Result<Vec<Reduced<B>>>;

    /// A joined rank's part in bucket `b` of a step it does not take: the
    /// bucket's collectives on zeros, no parameter counted as unused.
    fn shadow(&self, b: usize);

    /// Waits for the `buckets` buckets [`shadow`](Self::shadow) launched;
    /// their results are dropped.
    fn finish_shadows(&self, buckets: usize) -> Result<()>;
}

/// How a reducer is set up, besides its comm hook.
#[derive(Clone)]
pub struct ReducerConfig {
    pub plan: BucketPlan,
    /// `names[i]` names parameter i (visiting order) in error messages.
    pub names: Vec<String>,
    /// `shapes[i]` is parameter i's shape, for the comm hook.
    pub shapes: Vec<Vec<usize>>,
    /// `DdpConfig::overlap`: None lets [`reducer`] choose.
    pub overlap: Option<bool>,
    pub find_unused: bool,
    /// Where each step's bucket launches are recorded, for uneven inputs.
    pub log: Arc<StepLog>,
}

/// A reducer over `comm` on `device` that averages buckets with `hook`, with
/// the bucket store that suits the communicator, and whether it launches
/// buckets while backward runs. This is the one place that reads the
/// communicator's capabilities:
///
/// - host buckets where the gradients are Flex's and a host communicator
///   averages them with the plain mean (other hooks get tensors),
///   kept where backward left them when it reduces segments in place;
/// - tensor buckets everywhere else;
/// - buckets wait for the end of backward where the ranks are threads
///   sharing the host's memory: the all-reduce is memory work on the very
///   cores that run backward, and overlapping only makes the two compete (a
///   network or a GPU has time of its own to hide).
pub fn reducer<B: Backend>(
    config: ReducerConfig,
    hook: Box<dyn CommHook<B>>,
    device: B::Device,
    comm: Arc<CommThread<B>>,
) -> (Arc<dyn Reduce<B>>, Arc<dyn GradientSink<B>>, bool) {
    let caps: Capabilities = comm.call(|c| c.capabilities());
    let host = caps.host_memory && host_bucket::is_flex::<B>() && hook.is_plain_mean();
    let overlap = config.overlap.unwrap_or(!(host && caps.ranks_are_threads));
    let buckets = config.plan.buckets();
    if host {
        let lens = (0..buckets).map(|b| config.plan.sent_len(b)).collect();
        let store = HostStore::new(lens, caps.reduces_segments_in_place);
        let reducer = Arc::new(Reducer::new(config, hook, comm, overlap, store));
        (reducer.clone(), reducer, overlap)
    } else {
        let reducer = Arc::new(Reducer::new(config, hook, comm, overlap, TensorStore::new(buckets, device)));
        (reducer.clone(), reducer, overlap)
    }
}

struct Reducer<B: Backend, S: BucketStore<B>> {
    plan: BucketPlan,
    names: Vec<String>,
    comm: Arc<CommThread<B>>,
    /// Used on the communication thread only, one bucket at a time.
    hook: Arc<Mutex<Box<dyn CommHook<B>>>>,
    /// Per bucket: where its gradients lie, as the hook is told.
    parameters: Vec<Vec<BucketParameter>>,
    /// Launch buckets during backward (true) or only once it has finished.
    overlap: bool,
    find_unused: bool,
    log: Arc<StepLog>,
    step: Mutex<Step<S>>,
    done_tx: mpsc::Sender<Done<S::Flight>>,
    done_rx: Mutex<mpsc::Receiver<Done<S::Flight>>>,
}

/// What one step knows: readiness, launch order and the buckets.
struct Step<S> {
    store: S,
    /// Gradients each bucket still waits for.
    pending: Vec<usize>,
    arrived: Vec<bool>,
    next_launch: usize,
    /// How many parameters got no gradient on this rank (known at finish).
    unused: usize,
    /// False during a `no_sync` backward: gradients only accumulate.
    sync: bool,
    misuse: Option<String>,
}

struct Done<F> {
    bucket: usize,
    result: Result<F, CommError>,
}

impl<B: Backend, S: BucketStore<B>> Reducer<B, S> {
    fn new(
        config: ReducerConfig,
        hook: Box<dyn CommHook<B>>,
        comm: Arc<CommThread<B>>,
        overlap: bool,
        store: S,
    ) -> Self {
        let ReducerConfig { plan, names, shapes, find_unused, log, .. } = config;
        let parameters = (0..plan.buckets())
            .map(|b| {
                let range = |i: usize| plan.slots[i].as_ref().map(|(_, r)| r.clone()).expect("a member has a slot");
                plan.members(b).iter().map(|&i| BucketParameter { range: range(i), shape: shapes[i].clone() }).collect()
            })
            .collect();
        let (done_tx, done_rx) = mpsc::channel();
        Reducer {
            step: Mutex::new(Step {
                store,
                pending: vec![0; plan.buckets()],
                arrived: vec![false; names.len()],
                next_launch: 0,
                unused: 0,
                sync: true,
                misuse: None,
            }),
            plan,
            names,
            comm,
            hook: Arc::new(Mutex::new(hook)),
            parameters,
            overlap,
            find_unused,
            log,
            done_tx,
            done_rx: Mutex::new(done_rx),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Step<S>> {
        self.step.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Launches every bucket that is full and whose predecessors are launched.
    fn launch_ready(&self, st: &mut Step<S>) {
        while st.next_launch < self.plan.buckets() && st.pending[st.next_launch] == 0 {
            let bucket = st.next_launch;
            st.next_launch += 1;
            self.log.record(Call::Bucket(bucket));
            self.launch(st, bucket);
        }
    }

    /// Sends `bucket` to the communication thread to be averaged.
    fn launch(&self, st: &mut Step<S>, bucket: usize) {
        // The count is exact when the last bucket goes early too:
        // launching is in order, so a bucket holding an unused parameter
        // (known only at finish) holds the last one back.
        let (last, count) = self.plan.count_slot();
        if bucket == last {
            st.store.fill(last, count, st.unused as f32);
        }
        let flight = st.store.send(bucket);
        let (hook, done) = (self.hook.clone(), self.done_tx.clone());
        let parameters = self.parameters[bucket].clone();
        self.comm.submit(move |comm| {
            let mut hook = hook.lock().unwrap_or_else(|e| e.into_inner());
            let result = S::average(comm, hook.as_mut(), bucket, parameters, flight);
            let _ = done.send(Done { bucket, result });
        });
    }

    /// Receives `buckets` averaged buckets and lands them; the first error.
    fn receive(&self, buckets: usize) -> Result<Vec<Option<Reduced<B>>>> {
        let mut reduced: Vec<Option<Reduced<B>>> = (0..self.plan.buckets()).map(|_| None).collect();
        let mut first_error = None;
        let rx = self.done_rx.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..buckets {
            let done = rx.recv().expect("the communication thread ended early");
            match done.result {
                Ok(flight) => reduced[done.bucket] = Some(self.lock().store.land(done.bucket, flight)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(reduced),
        }
    }

    fn verdict(&self, unused: &[usize], reduced: &mut [Reduced<B>]) -> Result<()> {
        if let Some(m) = self.lock().misuse.take() {
            return Err(ParallelError::Invalid(m));
        }
        let trainable = self.plan.slots.iter().filter(|s| s.is_some()).count();
        if trainable > 0 && unused.len() == trainable {
            return Err(ParallelError::Invalid(
                "no parameter received a gradient in this step: compute the loss through the module that \
                 `ddp.forward_module(&model)` returns, whose parameters hand their gradients to DDP"
                    .into(),
            ));
        }
        let (last, count) = self.plan.count_slot();
        let any_rank_unused = reduced[last].take(count).into_scalar().elem::<f32>() > 0.0;
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

impl<B: Backend, S: BucketStore<B>> Reduce<B> for Reducer<B, S> {
    fn begin(&self, sync: bool) {
        let mut st = self.lock();
        st.sync = sync;
        st.next_launch = 0;
        st.unused = 0;
        st.arrived.iter_mut().for_each(|a| *a = false);
        for b in 0..self.plan.buckets() {
            st.pending[b] = self.plan.members(b).len();
        }
        st.misuse = None;
    }

    fn finish(&self) -> Result<Vec<Reduced<B>>> {
        let unused: Vec<usize>;
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            unused = (0..self.names.len()).filter(|&i| self.plan.slots[i].is_some() && !st.arrived[i]).collect();
            // An unused parameter contributes what earlier no_sync passes
            // accumulated for it, or zero.
            for &i in &unused {
                let (bucket, range) = self.plan.slots[i].clone().expect("filtered on slots");
                st.store.fill(bucket, range, 0.0);
            }
            st.unused = unused.len();
            st.pending.iter_mut().for_each(|p| *p = 0);
            self.launch_ready(st);
        }
        let reduced = self.receive(self.plan.buckets())?;
        let mut reduced: Vec<Reduced<B>> = reduced.into_iter().map(|b| b.expect("every bucket returns")).collect();
        self.verdict(&unused, &mut reduced)?;
        Ok(reduced)
    }

    fn shadow(&self, b: usize) {
        let mut guard = self.lock();
        let st = &mut *guard;
        for &i in self.plan.members(b) {
            let (_, range) = self.plan.slots[i].clone().expect("a member has a slot");
            st.store.fill(b, range, 0.0);
        }
        st.unused = 0;
        self.launch(st, b);
    }

    fn finish_shadows(&self, buckets: usize) -> Result<()> {
        self.receive(buckets).map(drop)
    }
}

impl<B: Backend, S: BucketStore<B>> GradientSink<B> for Reducer<B, S> {
    fn ready(&self, index: usize, grad: B::FloatTensorPrimitive) {
        let Some((bucket, range)) = self.plan.slots.get(index).cloned().flatten() else { return };
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.arrived[index] {
            st.misuse = Some(format!(
                "parameter {} received a second gradient in one step (was backward run twice on one forward module?)",
                self.names[index]
            ));
            return;
        }
        if bucket < st.next_launch {
            st.misuse = Some(format!("the bucket of parameter {} was already sent", self.names[index]));
            return;
        }
        st.arrived[index] = true;
        st.store.write(bucket, range, grad);
        st.pending[bucket] -= 1;
        if st.sync && self.overlap {
            self.launch_ready(st);
        }
    }
}

//! The reducer: collects finished gradients into buckets and all-reduces each
//! bucket as soon as it is full, while the backward pass goes on.
//!
//! Readiness (which gradients have arrived), launching (buckets go to the
//! communication thread strictly in bucket order, so every rank issues the
//! same collectives in the same order) and finalisation (unused parameters,
//! waiting for the results) are kept apart, as in PyTorch's reducer.
//!
//! On Flex with a host communicator the buckets live in host memory
//! (`host_bucket.rs`): threads and the TCP ring average the gradients where
//! backward left them, MPI a bucket the reducer keeps from step to step.
//! Everywhere else gradients stay tensors on their device: a bucket is a
//! tensor kept from step to step (`tensor_bucket.rs`), filled with its
//! gradients on the communication thread, and the collective decides where
//! the values travel ([`TensorCollective`]: through the host for the ring, in
//! GPU memory for NCCL).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{mpsc, Mutex};

use bonfire_collective::CommError;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Shape, Tensor, TensorPrimitive};

use crate::bucket::BucketPlan;
use crate::comm_hook::CommHook;
use crate::comm_thread::CommThread;
use crate::error::{ParallelError, Result};
use crate::hook::GradientSink;
use crate::host_bucket::{self, Contents, HostBuckets};
use crate::tensor_bucket;

pub struct Reducer<B: Backend> {
    plan: BucketPlan,
    names: Vec<String>,
    /// Where zero gradients and the unused-parameter count are made.
    device: B::Device,
    comm: CommThread<B>,
    hook: CommHook,
    /// Launch buckets during backward (true) or only once it has finished.
    overlap: bool,
    find_unused: bool,
    step: Mutex<Step<B>>,
    done_tx: mpsc::Sender<Done<B>>,
    done_rx: Mutex<mpsc::Receiver<Done<B>>>,
}

struct Step<B: Backend> {
    /// Each parameter's flattened f32 gradient, from its arrival until its
    /// bucket is launched. Between steps it holds what `no_sync` passes
    /// accumulated.
    grads: Vec<Option<Tensor<B, 1>>>,
    /// The buckets' own host memory, instead of `grads`, on Flex with a
    /// host communicator (see `host_bucket.rs`).
    host: Option<HostBuckets>,
    /// Otherwise: the tensor each bucket was last reduced in, to be filled
    /// again (see `tensor_bucket.rs`).
    memory: Vec<Option<Tensor<B, 1>>>,
    /// Per parameter: its slot of the host bucket holds a gradient (or what
    /// `no_sync` passes accumulated) since its bucket was last sent.
    filled: Vec<bool>,
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

struct Done<B: Backend> {
    bucket: usize,
    result: Result<Outcome<B>, CommError>,
}

/// What the communication thread hands back for a bucket.
enum Outcome<B: Backend> {
    Tensor(Tensor<B, 1>),
    Host(Contents),
}

/// A bucket averaged over all ranks: one tensor, or (where the gradients
/// were averaged where they lay) its parameters' gradients by where they
/// start in the bucket.
pub enum Reduced<B: Backend> {
    Whole(Tensor<B, 1>),
    Parts(BTreeMap<usize, Tensor<B, 1>>),
}

impl<B: Backend> Reduced<B> {
    /// The averaged values of `range` of the bucket, which a parameter's
    /// gradient (or the unused-parameter count) fills; a part is handed
    /// over, so that nothing else holds its memory.
    pub fn take(&mut self, range: Range<usize>) -> Tensor<B, 1> {
        match self {
            Reduced::Whole(bucket) => bucket.clone().slice([range]),
            Reduced::Parts(parts) => parts.remove(&range.start).expect("every slot of a bucket is a part, taken once"),
        }
    }
}

impl<B: Backend> Reducer<B> {
    /// `names[i]` names parameter i (visiting order) in error messages.
    pub fn new(
        plan: BucketPlan,
        names: Vec<String>,
        device: B::Device,
        comm: CommThread<B>,
        hook: CommHook,
        overlap: Option<bool>,
        find_unused: bool,
    ) -> Self {
        // With no trainable parameter there is still one bucket, which
        // carries only the unused-parameter count.
        let buckets = plan.lens.len().max(1);
        let (done_tx, done_rx) = mpsc::channel();
        // For a host communicator: whether it reduces gradients in place,
        // and whether its ranks are threads.
        let host_comm = comm.call(|c| c.host().map(|h| (h.reduces_segments_in_place(), h.ranks_are_threads())));
        let host = host_comm.filter(|_| host_bucket::is_flex::<B>()).map(|(keep, _)| {
            // The last bucket carries the unused-parameter count too.
            let lens = (0..buckets).map(|b| plan.lens.get(b).copied().unwrap_or(0) + usize::from(b + 1 == buckets));
            HostBuckets::new(lens.collect(), keep)
        });
        // Measured (`cargo xtask bench ddp`): where the ranks are threads
        // reading each other's gradients, the all-reduce is memory work on
        // the very cores that run backward, and overlapping it only makes
        // the two compete; a network or a GPU has time of its own to hide.
        let threads = host.is_some() && host_comm.is_some_and(|(_, threads)| threads);
        let overlap = overlap.unwrap_or(!threads);
        Reducer {
            step: Mutex::new(Step {
                grads: vec![None; names.len()],
                host,
                memory: vec![None; buckets],
                filled: vec![false; names.len()],
                pending: vec![0; buckets],
                arrived: vec![false; names.len()],
                next_launch: 0,
                unused: 0,
                sync: true,
                misuse: None,
            }),
            plan,
            names,
            device,
            comm,
            hook,
            overlap,
            find_unused,
            done_tx,
            done_rx: Mutex::new(done_rx),
        }
    }

    pub fn overlaps(&self) -> bool {
        self.overlap
    }

    pub fn comm(&self) -> &CommThread<B> {
        &self.comm
    }

    pub fn plan(&self) -> &BucketPlan {
        &self.plan
    }

    fn buckets(&self) -> usize {
        self.plan.lens.len().max(1)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Step<B>> {
        self.step.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a backward pass; `sync` is false for `no_sync` accumulation.
    pub fn begin(&self, sync: bool) {
        let mut st = self.lock();
        st.sync = sync;
        st.next_launch = 0;
        st.unused = 0;
        st.arrived.iter_mut().for_each(|a| *a = false);
        for b in 0..self.buckets() {
            st.pending[b] = self.plan.members.get(b).map_or(0, Vec::len);
        }
        st.misuse = None;
    }

    /// Launches every bucket that is full and whose predecessors are launched.
    fn launch_ready(&self, st: &mut Step<B>) {
        let last = self.buckets() - 1;
        while st.next_launch <= last && st.pending[st.next_launch] == 0 {
            let bucket = st.next_launch;
            let hook = self.hook;
            let done = self.done_tx.clone();
            st.next_launch += 1;
            if let Some(host) = st.host.as_mut() {
                if bucket == last {
                    host.set_last(bucket, st.unused as f32);
                }
                for &i in self.plan.members.get(bucket).map_or(&[][..], Vec::as_slice) {
                    st.filled[i] = false;
                }
                let contents = host.take(bucket);
                self.comm.submit(move |comm| {
                    let result = host_bucket::reduce(comm, hook, contents).map(Outcome::Host);
                    let _ = done.send(Done { bucket, result });
                });
                continue;
            }
            let mut parts: Vec<Tensor<B, 1>> = self.plan.members.get(bucket).map_or_else(Vec::new, |members| {
                members.iter().map(|&i| st.grads[i].take().expect("a full bucket has every gradient")).collect()
            });
            // The last bucket carries one more value: how many parameters got
            // no gradient on this rank, so that all ranks agree on whether the
            // step had unused parameters. It is exact when launched early:
            // launching is in order, so a bucket holding an unused parameter
            // (whose count is known only at finish) holds the last one back.
            if bucket == last {
                parts.push(Tensor::from_floats([st.unused as f32], &self.device));
            }
            let memory = st.memory[bucket].take();
            self.comm.submit(move |comm| {
                let result = hook.apply(comm, tensor_bucket::fill(memory, parts)).map(Outcome::Tensor);
                let _ = done.send(Done { bucket, result });
            });
        }
    }

    /// Ends a synchronised backward pass: launches what is left and returns
    /// every bucket averaged over all ranks, in bucket order.
    pub fn finish(&self) -> Result<Vec<Reduced<B>>> {
        let unused: Vec<usize>;
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            unused = (0..self.names.len()).filter(|&i| self.plan.slots[i].is_some() && !st.arrived[i]).collect();
            // An unused parameter contributes what earlier no_sync passes
            // accumulated for it, or zero.
            for &i in &unused {
                let (bucket, range) = self.plan.slots[i].clone().expect("filtered on slots");
                match st.host.as_mut() {
                    Some(host) if !st.filled[i] => host.zero(bucket, range),
                    Some(_) => {}
                    None if st.grads[i].is_none() => st.grads[i] = Some(Tensor::zeros([range.len()], &self.device)),
                    None => {}
                }
            }
            st.unused = unused.len();
            st.pending.iter_mut().for_each(|p| *p = 0);
            self.launch_ready(st);
        }
        let mut reduced: Vec<Option<Reduced<B>>> = (0..self.buckets()).map(|_| None).collect();
        let mut first_error = None;
        {
            let rx = self.done_rx.lock().unwrap_or_else(|e| e.into_inner());
            for _ in 0..reduced.len() {
                let done = rx.recv().expect("the communication thread ended early");
                match done.result {
                    Ok(Outcome::Tensor(tensor)) => {
                        self.lock().memory[done.bucket] = Some(tensor.clone());
                        reduced[done.bucket] = Some(Reduced::Whole(tensor));
                    }
                    Ok(Outcome::Host(contents)) => {
                        let mut st = self.lock();
                        let host = st.host.as_mut().expect("host buckets reduce only in host mode");
                        reduced[done.bucket] = Some(host.reduced::<B>(done.bucket, contents));
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e.into());
        }
        let mut reduced: Vec<Reduced<B>> = reduced.into_iter().map(|b| b.expect("every bucket returns")).collect();
        self.verdict(&unused, &mut reduced)?;
        Ok(reduced)
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
        // The unused-parameter count follows the last bucket's gradients.
        let at = self.plan.lens.get(self.buckets() - 1).copied().unwrap_or(0);
        let count = reduced.last_mut().expect("at least one bucket").take(at..at + 1);
        let any_rank_unused = count.into_scalar().elem::<f32>() > 0.0;
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
        // A gradient left by no_sync passes is added to; otherwise this is the first.
        if let Some(host) = st.host.as_mut() {
            host.write::<B>(bucket, range, grad, st.filled[index]);
            st.filled[index] = true;
        } else {
            let flat = B::float_reshape(grad, Shape::new([range.len()]));
            let grad = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(flat)).cast(DType::F32);
            let sum = match st.grads[index].take() {
                Some(accumulated) => accumulated + grad,
                None => grad,
            };
            st.grads[index] = Some(sum);
        }
        st.pending[bucket] -= 1;
        if st.sync && self.overlap {
            self.launch_ready(st);
        }
    }
}

//! DistributedDataParallel: one replica per worker, gradients averaged in
//! buckets while the backward pass is still running.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bonfire_collective::{ReduceOp, TensorCollective};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use crate::bucket::BucketPlan;
use crate::buffers;
use crate::comm_hook::{CommHook, Mean};
use crate::comm_thread::CommThread;
use crate::error::{ParallelError, Result};
use crate::hook::{GradientSink, HookBackend};
use crate::join::{self, Announcement, Call, StepLog};
use crate::params::{
    describe, encode_layout, first_difference, param_infos, values_from_host, values_to_host, ParamInfo,
};
use crate::reducer::{reducer, Reduce, ReducerConfig};
use crate::sync_batch_norm::{RankSum, SyncStats};
use crate::zero::{PerParameterRecord, ShardedOptimizer};

/// Options of [`DistributedDataParallel`]; the defaults are PyTorch's.
#[derive(Debug, Clone)]
pub struct DdpConfig {
    /// Cap of every bucket but the first, in bytes of f32 gradients.
    pub bucket_cap_bytes: usize,
    /// Cap of the first bucket, small so that communication starts early.
    pub first_bucket_cap_bytes: usize,
    /// Tolerate parameters that get no gradient in a step (their gradient
    /// counts as zero); without it such a step is an error on every rank.
    pub find_unused_parameters: bool,
    /// All-reduce buckets while backward runs (`Some(true)`), or only after
    /// it (`Some(false)`). `None`: after backward where the workers are
    /// threads on the CPU backend (Flex with the in-process group, whose
    /// all-reduce is memory work on the cores that run backward),
    /// overlapping everywhere else.
    pub overlap: Option<bool>,
    /// Give every rank rank 0's buffers (batch norm's running statistics;
    /// with uneven inputs, those of the highest rank still training) at
    /// the end of every synchronising `backward`, so that every rank holds
    /// the same model after each step. PyTorch's `broadcast_buffers` does the
    /// same at the start of each forward pass; in training mode batch norm
    /// normalises with the batch's own statistics, so the two train alike.
    pub broadcast_buffers: bool,
    /// Normalise with the whole batch's statistics across all ranks
    /// (PyTorch's `SyncBatchNorm`): every `bonfire_kernels::nn::BatchNorm`
    /// run in training on the thread that calls
    /// [`forward_module`](DistributedDataParallel::forward_module) gathers
    /// every rank's count and each channel's mean and sum of squared
    /// deviations, and its backward sums the gradients of those statistics.
    /// Off at world size 1.
    pub sync_batch_norm: bool,
    /// Ranks may have different numbers of batches (PyTorch's `Join`): a
    /// rank that has run out calls
    /// [`join`](DistributedDataParallel::join), which takes part in the
    /// steps the others still take. Costs one small all-reduce a step; with
    /// it every step must start with
    /// [`forward_module`](DistributedDataParallel::forward_module) and end
    /// with [`backward`](DistributedDataParallel::backward) (no `no_sync`).
    pub uneven_inputs: bool,
}

impl Default for DdpConfig {
    fn default() -> Self {
        DdpConfig {
            bucket_cap_bytes: 25 << 20,
            first_bucket_cap_bytes: 1 << 20,
            find_unused_parameters: false,
            overlap: None,
            broadcast_buffers: true,
            sync_batch_norm: false,
            uneven_inputs: false,
        }
    }
}

/// The inner (non-autodiff) backend of `B`, where gradients live.
type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Gives every rank one rank's buffers of the module last run forward.
type BufferSync<B> = Box<dyn FnOnce(&CommThread<Inner<B>>, usize) -> Result<()> + Send>;

/// Registers a parameter's gradient from its averaged values (flattened, f32).
type Registrar<B> = Box<dyn Fn(Tensor<Inner<B>, 1>, &mut GradientsParams) + Send + Sync>;

/// Data-parallel training over the ranks of a [`TensorCollective`] (any
/// [`Communicator`](bonfire_collective::Communicator), or NCCL).
///
/// ```ignore
/// let (mut ddp, mut model) = DistributedDataParallel::new(model, comm, DdpConfig::default())?;
/// // Optional, before the first forward pass: ddp.register_comm_hook(Bf16Compress)?;
/// for batch in my_shard {
///     let loss = loss_of(ddp.forward_module(&model), batch);
///     let grads = ddp.backward(loss)?; // averaged over all ranks
///     model = optimizer.step(lr, model, grads);
/// }
/// ```
pub struct DistributedDataParallel<B: HookBackend> {
    comm: Arc<CommThread<B::InnerBackend>>,
    reducer: Arc<dyn Reduce<B::InnerBackend>>,
    /// The reducer as the gradient hooks see it.
    sink: Arc<dyn GradientSink<B::InnerBackend>>,
    overlap: bool,
    /// What the reducer was made from (the bucket plan among it), to make it
    /// again with another hook.
    reducer_config: ReducerConfig,
    /// Whether [`forward_module`](Self::forward_module) has handed out the reducer.
    forwarded: AtomicBool,
    registrars: Vec<Registrar<B>>,
    broadcast_buffers: bool,
    /// Set by [`forward_module`](Self::forward_module), run by [`backward`](Self::backward).
    buffer_sync: Mutex<Option<BufferSync<B>>>,
    /// The module's device, where small collectives ([`any_rank`](Self::any_rank)) run.
    device: B::Device,
    /// Batch norm's sum across ranks, with [`DdpConfig::sync_batch_norm`].
    sync_stats: Option<Arc<SyncStats<B>>>,
    /// [`DdpConfig::uneven_inputs`], at a world size above 1.
    uneven_inputs: bool,
    /// The collectives of this rank's steps, recorded with uneven inputs.
    log: Arc<StepLog>,
    /// This step's announcement, from `forward_module` to `backward`.
    announcement: Mutex<Option<Announcement>>,
    /// The highest rank that took the last step anyone took.
    last_trainer: Mutex<Option<usize>>,
}

impl<B: HookBackend> DistributedDataParallel<B> {
    /// Checks that every rank's `module` has the same parameters (count,
    /// shapes, order), then gives every rank rank 0's values. Returns the
    /// strategy and the module to train.
    ///
    /// `comm` is any [`TensorCollective`] of the inner backend: a boxed
    /// host-memory communicator (`Box::new(InProcCommunicator ...)`, the TCP
    /// ring) for any backend, or NCCL for CUDA.
    pub fn new<M: AutodiffModule<B>>(
        module: M,
        comm: Box<dyn TensorCollective<B::InnerBackend>>,
        config: DdpConfig,
    ) -> Result<(Self, M)> {
        let infos = param_infos::<B, M>(&module);
        let device: B::Device = module.devices().into_iter().next().unwrap_or_default();
        let comm = Arc::new(CommThread::start(comm));
        check_layout(&comm, &infos, &device)?;
        let module = parameters_from::<B, M>(&comm, &device, module, 0)?;

        let numels: Vec<Option<usize>> = infos.iter().map(|p| p.trainable.then(|| p.numel())).collect();
        let plan = BucketPlan::new(&numels, config.first_bucket_cap_bytes, config.bucket_cap_bytes);
        tracing::debug!("DDP: {} parameters in {} buckets of {:?} values", infos.len(), plan.lens.len(), plan.lens);
        let uneven_inputs = config.uneven_inputs && comm.world_size() > 1;
        let log = Arc::new(StepLog::new(uneven_inputs));
        let reducer_config = ReducerConfig {
            plan,
            names: infos.iter().map(|p| p.name.clone()).collect(),
            shapes: infos.iter().map(|p| p.shape.clone()).collect(),
            overlap: config.overlap,
            find_unused: config.find_unused_parameters,
            log: log.clone(),
        };
        let (reducer, sink, overlap) = reducer(reducer_config.clone(), Box::new(Mean), device.clone(), comm.clone());
        let registrars = registrars::<B, M>(&module);
        let sync_stats = (config.sync_batch_norm && comm.world_size() > 1)
            .then(|| Arc::new(SyncStats { ranks: Arc::new(RankSum::new(comm.clone(), device.clone(), log.clone())) }));
        let ddp = DistributedDataParallel {
            comm,
            reducer,
            sink,
            overlap,
            reducer_config,
            forwarded: AtomicBool::new(false),
            registrars,
            broadcast_buffers: config.broadcast_buffers,
            buffer_sync: Mutex::new(None),
            device,
            sync_stats,
            uneven_inputs,
            log,
            announcement: Mutex::new(None),
            last_trainer: Mutex::new(None),
        };
        Ok((ddp, module))
    }

    /// Averages gradient buckets with `hook` instead of [`Mean`], as
    /// PyTorch's `register_comm_hook`; every rank must register the same kind
    /// of hook. Only before the first [`forward_module`](Self::forward_module).
    pub fn register_comm_hook(&mut self, hook: impl CommHook<B::InnerBackend>) -> Result<()> {
        if self.forwarded.load(Ordering::Relaxed) {
            return Err(ParallelError::Invalid(
                "register_comm_hook after forward_module: register the hook before the first forward pass".into(),
            ));
        }
        let config = self.reducer_config.clone();
        (self.reducer, self.sink, self.overlap) =
            reducer(config, Box::new(hook), self.device.clone(), self.comm.clone());
        Ok(())
    }

    /// This worker's rank in its group.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The number of workers in the group.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Whether ranks may have different numbers of batches
    /// ([`DdpConfig::uneven_inputs`], at a world size above 1).
    pub fn uneven_inputs(&self) -> bool {
        self.uneven_inputs
    }

    /// Whether buckets are all-reduced while backward runs (what
    /// [`DdpConfig::overlap`] asked for, or chose).
    pub fn overlaps(&self) -> bool {
        self.overlap
    }

    /// The module to run the forward pass with: `module` with a gradient hook
    /// on every trainable parameter. Gradients still land on `module`'s
    /// parameters, so the optimizer steps `module` itself.
    /// With [`DdpConfig::sync_batch_norm`], batch norm on the calling
    /// thread sums its statistics across the ranks from here on. With
    /// [`DdpConfig::uneven_inputs`] it starts a step, which every rank still
    /// training or joined takes part in.
    pub fn forward_module<M: AutodiffModule<B> + 'static>(&self, module: &M) -> M {
        self.forwarded.store(true, Ordering::Relaxed);
        if self.uneven_inputs {
            self.log.start();
            *self.announcement.lock().expect("not poisoned") = Some(join::announce(&self.comm, &self.device, true));
        }
        if let Some(sync) = &self.sync_stats {
            bonfire_kernels::nn::sync_batch_statistics::<B>(Some(sync.clone()));
        }
        if self.broadcast_buffers && self.world_size() > 1 {
            let module = module.clone();
            let sync: BufferSync<B> = Box::new(move |comm, root| buffers::broadcast::<B, M>(comm, &module, root));
            *self.buffer_sync.lock().expect("not poisoned") = Some(sync);
        }
        module.clone().map(&mut Hooker::<B> { sink: self.sink.clone(), index: 0, _b: Default::default() })
    }

    /// Runs `loss.backward()` with bucketed all-reduces overlapping it and
    /// returns the gradients averaged over all ranks (plus whatever earlier
    /// [`backward_no_sync`](Self::backward_no_sync) calls accumulated).
    pub fn backward(&mut self, loss: Tensor<B, 1>) -> Result<GradientsParams> {
        self.backward_with(|| drop(loss.backward()))
    }

    /// [`backward`](Self::backward) for a loop that runs the backward pass
    /// itself, such as burn-train's `TrainStep::step`: `run` must run the
    /// forward pass on [`forward_module`](Self::forward_module)'s module and
    /// the backward pass (whatever gradients it returns besides are this
    /// rank's alone). Returns the averaged gradients.
    pub fn backward_with(&mut self, run: impl FnOnce()) -> Result<GradientsParams> {
        self.reducer.begin(true);
        run();
        let mut buckets = self.reducer.finish()?;
        self.sync_failure()?;
        let root = self.step_root()?;
        if let Some(sync) = self.buffer_sync.lock().expect("not poisoned").take() {
            sync(&self.comm, root)?;
        }
        self.log.finish();
        let mut grads = GradientsParams::new();
        for (index, slot) in self.reducer_config.plan.slots.iter().enumerate() {
            if let Some((bucket, range)) = slot {
                (self.registrars[index])(buckets[*bucket].take(range.clone()), &mut grads);
            }
        }
        Ok(grads)
    }

    /// Runs `loss.backward()` and keeps the gradients for the next
    /// [`backward`](Self::backward), without any communication (gradient
    /// accumulation). Scale each micro-batch loss as the accumulated sum
    /// requires (for example by 1 / micro-steps for a mean).
    pub fn backward_no_sync(&mut self, loss: Tensor<B, 1>) -> Result<()> {
        self.backward_no_sync_with(|| drop(loss.backward()))
    }

    /// [`backward_no_sync`](Self::backward_no_sync) for a loop that runs the
    /// backward pass itself, as [`backward_with`](Self::backward_with).
    pub fn backward_no_sync_with(&mut self, run: impl FnOnce()) -> Result<()> {
        if self.uneven_inputs {
            return Err(ParallelError::Invalid(
                "backward_no_sync with uneven inputs: a joined rank shadows whole steps, so every step must \
                 synchronise (accumulate in the loss instead, or turn DdpConfig::uneven_inputs off)"
                    .into(),
            ));
        }
        self.reducer.begin(false);
        run();
        self.sync_failure()
    }

    /// The rank whose buffers every rank takes at the end of this step:
    /// rank 0, or with uneven inputs the highest rank that takes the step.
    fn step_root(&self) -> Result<usize> {
        if !self.uneven_inputs {
            return Ok(0);
        }
        let Some(announcement) = self.announcement.lock().expect("not poisoned").take() else {
            return Err(ParallelError::Invalid(
                "backward without forward_module: with uneven inputs each step starts with forward_module".into(),
            ));
        };
        let root = join::answer(announcement)?.expect("this rank announced itself");
        *self.last_trainer.lock().expect("not poisoned") = Some(root);
        Ok(root)
    }

    /// Uneven inputs ([`DdpConfig::uneven_inputs`]; PyTorch's `Join`): call
    /// it with the model once this rank has run out of batches. Until every
    /// rank has called it, it takes part in each step the others still take
    /// as a rank whose gradients and batch norm sums are zeros (the mean
    /// still divides by the whole world size, as PyTorch's does by default).
    /// Then every rank gets the parameters and buffers of the highest rank
    /// that took the last step, and the model goes on from there; the
    /// optimizer state stays this rank's own. Collectives of one's own
    /// between steps ([`any_rank`](Self::any_rank)) are not shadowed, and
    /// [`shard_optimizer`](Self::shard_optimizer)'s step cannot be joined.
    pub fn join<M: AutodiffModule<B>>(&mut self, module: M) -> Result<M> {
        if self.world_size() == 1 {
            return Ok(module);
        }
        if !self.uneven_inputs {
            return Err(ParallelError::Invalid(
                "join without uneven inputs: set DdpConfig::uneven_inputs on every rank".into(),
            ));
        }
        while let Some(root) = join::answer(join::announce(&self.comm, &self.device, false))? {
            *self.last_trainer.lock().expect("not poisoned") = Some(root);
            self.shadow_step(&module, root)?;
        }
        let Some(root) = *self.last_trainer.lock().expect("not poisoned") else {
            return Ok(module);
        };
        let module = parameters_from::<B, M>(&self.comm, &self.device, module, root)?;
        buffers::broadcast::<B, M>(&self.comm, &module, root)?;
        Ok(module)
    }

    /// A joined rank's part in a step that `root` and others take: the
    /// collectives of this rank's own last step, on zeros, in its order.
    fn shadow_step<M: AutodiffModule<B>>(&self, module: &M, root: usize) -> Result<()> {
        let calls = match self.log.last() {
            Some(calls) => calls,
            None if self.sync_stats.is_none() => (0..self.reducer_config.plan.buckets()).map(Call::Bucket).collect(),
            None => {
                return Err(ParallelError::Invalid(
                    "this rank joined before taking a step, so it cannot know the batch norm sums of the others' \
                     steps: give every rank at least one batch"
                        .into(),
                ))
            }
        };
        let (mut buckets, mut first_error) = (0, None);
        for call in calls {
            match call {
                Call::Sum(len) => {
                    let zeros = vec![0.0; len];
                    if let Err(e) = host_call(&self.comm, &self.device, zeros, |c, t| c.all_reduce(t, ReduceOp::Sum)) {
                        first_error.get_or_insert(e);
                    }
                }
                Call::Bucket(b) => {
                    self.reducer.shadow(b);
                    buckets += 1;
                }
            }
        }
        // Every launched bucket is waited for, even after an error.
        let shadows = self.reducer.finish_shadows(buckets);
        if let Some(e) = first_error {
            return Err(e);
        }
        shadows?;
        if self.broadcast_buffers {
            buffers::broadcast::<B, M>(&self.comm, module, root)?;
        }
        Ok(())
    }

    /// The first failed sum of batch statistics since the last check.
    fn sync_failure(&self) -> Result<()> {
        match self.sync_stats.as_ref().and_then(|sync| sync.ranks.take_failure()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// ZeRO stage 1 (PyTorch's `ZeroRedundancyOptimizer`): `optimizer`
    /// wrapped so that this rank steps, and keeps state for, only its shard
    /// of `module`'s trainable parameters (about 1/world of the values), and
    /// every rank gets the others' updated values after each step. Step it
    /// with [`backward`](Self::backward)'s gradients; it ends where
    /// `optimizer` on every rank ends. State `optimizer` already holds (a
    /// checkpoint's [`ShardedOptimizer::record`], or an unsharded one's)
    /// is kept for this rank's shard only.
    pub fn shard_optimizer<M: AutodiffModule<B>, O: Optimizer<M, B>>(
        &self,
        optimizer: O,
        module: &M,
    ) -> ShardedOptimizer<B, M, O>
    where
        O::Record: PerParameterRecord,
    {
        let numels: Vec<Option<usize>> =
            param_infos::<B, M>(module).iter().map(|p| p.trainable.then(|| p.numel())).collect();
        ShardedOptimizer::new(optimizer, self.comm.clone(), self.device.clone(), module, &numels)
    }

    /// Whether `flag` holds on any rank: a collective that every rank calls
    /// at the same point, so that all ranks stop together (an interrupted
    /// or early-stopped run) rather than some waiting for the others.
    pub fn any_rank(&self, flag: bool) -> Result<bool> {
        let max = host_call(&self.comm, &self.device, vec![f32::from(u8::from(flag))], |c, t| {
            c.all_reduce(t, ReduceOp::Max)
        })?;
        Ok(max[0] > 0.0)
    }
}

impl<B: HookBackend> Drop for DistributedDataParallel<B> {
    /// Batch norm on this thread stops summing across the group, whose
    /// peers may be gone.
    fn drop(&mut self) {
        if self.sync_stats.is_some() {
            bonfire_kernels::nn::sync_batch_statistics::<B>(None);
        }
    }
}

/// Puts the gradient hook on every trainable parameter.
struct Hooker<B: HookBackend> {
    sink: Arc<dyn GradientSink<B::InnerBackend>>,
    index: usize,
    _b: std::marker::PhantomData<B>,
}

impl<B: HookBackend> ModuleMapper<B> for Hooker<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let index = self.index;
        self.index += 1;
        let sink = self.sink.clone();
        param.map(|tensor| {
            if !tensor.is_require_grad() {
                return tensor;
            }
            let hooked = B::gradient_hook(tensor.into_primitive().tensor(), sink, index);
            Tensor::from_primitive(TensorPrimitive::Float(hooked))
        })
    }
}

fn registrars<B: HookBackend, M: AutodiffModule<B>>(module: &M) -> Vec<Registrar<B>> {
    struct Make<B: HookBackend>(Vec<Registrar<B>>, std::marker::PhantomData<B>);
    impl<B: HookBackend> ModuleVisitor<B> for Make<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let id: ParamId = param.id;
            let value = param.val();
            let (device, shape, dtype): (_, [usize; D], DType) = (value.device(), value.dims(), value.dtype());
            self.0.push(Box::new(move |values: Tensor<Inner<B>, 1>, grads: &mut GradientsParams| {
                let grad = values.reshape(shape).cast(dtype).to_device(&device);
                grads.register::<B::InnerBackend, D>(id, grad);
            }));
        }
    }
    let mut make = Make::<B>(Vec::new(), Default::default());
    module.visit(&mut make);
    make.0
}

/// `module` with `root`'s values of every float parameter, on every rank.
fn parameters_from<B: HookBackend, M: AutodiffModule<B>>(
    comm: &CommThread<B::InnerBackend>,
    device: &B::Device,
    module: M,
    root: usize,
) -> Result<M> {
    let values = values_to_host::<B, M>(&module);
    if values.is_empty() {
        return Ok(module);
    }
    let values = host_call(comm, device, values, move |c, t| c.broadcast(t, root))?;
    Ok(values_from_host::<B, M>(module, &values))
}

/// Runs a collective on `values`, as an f32 tensor on `device`, on the
/// communication thread, and returns the result's values.
pub(crate) fn host_call<B: Backend>(
    comm: &CommThread<B>,
    device: &B::Device,
    values: Vec<f32>,
    collective: impl FnOnce(&mut dyn TensorCollective<B>, Tensor<B, 1>) -> bonfire_collective::Result<Tensor<B, 1>>
        + Send
        + 'static,
) -> Result<Vec<f32>> {
    let device = device.clone();
    // Made and read on the communication thread: a GPU stream belongs to
    // one thread (see `reducer::pack`).
    let result = comm.call(move |c| {
        let n = values.len();
        collective(c, Tensor::from_data(TensorData::new(values, [n]), &device)).map(|t| t.into_data())
    })?;
    Ok(result.convert::<f32>().to_vec::<f32>().expect("converted to f32"))
}

/// Every rank compares its parameter layout with rank 0's, and all ranks
/// learn the first difference any rank found, so that all fail together.
fn check_layout<B: Backend>(comm: &CommThread<B>, infos: &[ParamInfo], device: &B::Device) -> Result<()> {
    // Counts and dimensions are exact in f32 up to 2^24.
    let ours = encode_layout(infos);
    let len = host_call(comm, device, vec![ours.len() as f32], |c, t| c.broadcast(t, 0))?[0] as usize;
    let mine = if comm.rank() == 0 { ours.clone() } else { vec![0.0; len] };
    let theirs = host_call(comm, device, mine, |c, t| c.broadcast(t, 0))?;
    let first = first_difference(&ours, &theirs).map_or(f32::MAX, |i| i as f32);
    let firsts = host_call(comm, device, vec![first], |c, t| c.all_gather(t))?;
    let Some((rank, index)) = firsts
        .iter()
        .enumerate()
        .filter(|(_, &f)| f != f32::MAX)
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(r, &f)| (r, f as usize))
    else {
        return Ok(());
    };
    let here = match infos.get(index) {
        Some(p) => format!("here parameter #{index} is `{}` with shape {:?}", p.name, p.shape),
        None => format!("this rank has only {} parameters", infos.len()),
    };
    let rank0 = describe(&theirs, index);
    Err(ParallelError::LayoutMismatch(format!(
        "rank {rank} differs from rank 0 first at parameter #{index}; {here}; rank 0 has {rank0}"
    )))
}

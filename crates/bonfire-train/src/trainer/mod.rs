//! The training loop: one worker's view of single-device, DP or DDP training.
//!
//! - this file: the model and optimizer a run asks for, the loop over
//!   epochs and steps, and `Stepper::step`, the one place a step's
//!   gradients and update happen (where a learning-rate schedule or
//!   gradient accumulation goes);
//! - `state.rs`: resuming from a checkpoint and writing one;
//! - `epoch.rs`: an epoch's progress bar and metrics;
//! - `pending.rs`: a step's loss, read once the next step is queued where
//!   the device runs ahead of the host;
//! - `batch.rs`: batches, the loss's value, accuracy.

mod batch;
mod config;
mod epoch;
mod pending;
mod state;

use std::time::Instant;

use anyhow::{Context, Result};
use bonfire_data::{DistributedSampler, ImageDataset};
use bonfire_parallel::comm_hook::{Bf16Compress, CommHook, Metered, PowerSgd, SentBytes};
use bonfire_parallel::{
    DataParallel, DdpConfig, DistributedDataParallel, HookBackend, PerParameterRecord, ShardedOptimizer, Strategy,
};
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::checkpoint::Position;
use crate::model::{LeNet, ModelKind, ResNet, TrainableClassifier};
pub use batch::{accuracy, check_batch};
use batch::{ensure_finite, to_tensors};
pub use config::{CommHookKind, EpochMetrics, HostPhases, OptimizerKind, Parallel, Report, Resume, TrainOptions};
use epoch::Epoch;
use pending::{Losses, Queued};

/// Trains one worker (or, with DP, one process driving several devices)
/// and returns what it measured; rank 0 also evaluates on `test` after
/// each epoch. Every rank of a DDP job calls this with the same options.
pub fn train<B: HookBackend>(
    device: &B::Device,
    train: &ImageDataset,
    test: &ImageDataset,
    options: &TrainOptions,
    parallel: Parallel<B>,
) -> Result<Report> {
    match options.model {
        ModelKind::Lenet => {
            let model = seeded::<B, _>(device, options.seed, || {
                LeNet::new(train.channels, train.height, train.classes, device)
            });
            with_optimizer(device, train, test, options, parallel, model)
        }
        ModelKind::Resnet => {
            let model = seeded::<B, _>(device, options.seed, || ResNet::new(train.channels, train.classes, device));
            with_optimizer(device, train, test, options, parallel, model)
        }
    }
}

/// `make()` with the backend's random numbers seeded by `seed`. Burn's CPU
/// backends keep one generator per process: workers that are threads take
/// turns, or their draws would interleave and rank 0's initial weights
/// (which every rank gets) would change from run to run. Burn draws a
/// parameter's initial values when it is first read, so every parameter is
/// read within the turn.
fn seeded<B: HookBackend, M: Module<B>>(device: &B::Device, seed: u64, make: impl FnOnce() -> M) -> M {
    struct ReadEach;
    impl<B: Backend> ModuleVisitor<B> for ReadEach {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    static SEEDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = SEEDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    B::seed(device, seed);
    let model = make();
    model.visit(&mut ReadEach);
    model
}

fn with_optimizer<B: HookBackend, M: TrainableClassifier<B>>(
    device: &B::Device,
    train: &ImageDataset,
    test: &ImageDataset,
    options: &TrainOptions,
    parallel: Parallel<B>,
    mut model: M,
) -> Result<Report> {
    if let Some(file) = &options.init {
        model = crate::weights::init(model, file)?;
    }
    match options.optimizer {
        OptimizerKind::Sgd => {
            // PyTorch's SGD has no dampening; Burn's default is 0.1.
            let momentum = (options.momentum > 0.0)
                .then(|| MomentumConfig::new().with_momentum(options.momentum).with_dampening(0.0));
            let opt = SgdConfig::new().with_momentum(momentum).init();
            run(device, train, test, options, parallel, model, opt)
        }
        OptimizerKind::Adam => run(device, train, test, options, parallel, model, AdamConfig::new().init()),
    }
}

fn run<B: HookBackend, M: TrainableClassifier<B>, O: Optimizer<M, B>>(
    device: &B::Device,
    train: &ImageDataset,
    test: &ImageDataset,
    options: &TrainOptions,
    parallel: Parallel<B>,
    model: M,
    opt: O,
) -> Result<Report>
where
    O::Record: PerParameterRecord,
{
    let state::Start { mut model, opt, position, from } = state::resume(options, device, model, opt)?;
    let mut sent = None;
    let mut opt = Stepping::Whole(opt);
    let strategy = match parallel {
        Parallel::Single => Strategy::Single,
        Parallel::Dp { devices } => Strategy::Dp(DataParallel::<B>::new(devices)?),
        Parallel::Ddp { comm } => {
            // Every rank starts from rank 0's weights.
            let config = DdpConfig {
                sync_batch_norm: options.sync_batch_norm,
                uneven_inputs: options.uneven_inputs,
                ..DdpConfig::default()
            };
            let (mut ddp, m) = DistributedDataParallel::new(model, comm, config)?;
            model = m;
            sent = match options.comm_hook {
                CommHookKind::Mean => None,
                CommHookKind::Bf16 => Some(metered(&mut ddp, Bf16Compress)?),
                CommHookKind::PowerSgd => Some(metered(&mut ddp, PowerSgd::new(options.power_sgd_rank))?),
            };
            if options.shard_optimizer {
                opt = opt.sharded_by(&ddp, &model);
                if let (Stepping::Sharded(sharded), 0) = (&opt, ddp.rank()) {
                    let (mine, all) = (sharded.shard_len(), model.num_params());
                    println!("shard-optimizer: rank 0 keeps optimizer state for {mine} of {all} parameter values");
                }
            }
            Strategy::Ddp(Box::new(ddp))
        }
    };
    let (rank, world) = (strategy.rank(), strategy.world_size());
    check_batch(options.global_batch, world)?;
    let per_rank = options.global_batch / world;
    let sampler = DistributedSampler::new(train.len(), rank, world, options.shuffle, options.seed, false)?;
    let shard = |epoch: usize| match options.uneven_inputs {
        true => sampler.exact_share(epoch as u64),
        false => sampler.indices(epoch as u64),
    };
    // A share's length is the same every epoch.
    let steps_per_epoch = shard(0).len().div_ceil(per_rank);
    let mut stepper = Stepper { strategy, opt, loss: CrossEntropyLossConfig::new().init(device), options };
    if let (Some(file), 0) = (&from, rank) {
        state::announce(position, file);
    }
    // Every rank decides alike when to write one (a sharded optimizer's
    // state is gathered from all); rank 0 writes it.
    let checkpoints = options.checkpoint_dir.as_deref();
    let mut done_steps = position.steps_done as usize;
    let mut report = Report { rank, ..Report::default() };
    let mut losses = Losses::new(rank, Instant::now());
    let runs_ahead = pending::runs_ahead::<B>(device);
    'epochs: for epoch in position.epoch as usize..options.epochs {
        // Resumed inside this epoch: the sampler's order is the same, so
        // skipping the steps done continues it.
        let skip = if epoch == position.epoch as usize { position.step_in_epoch as usize } else { 0 };
        let mut tally = Epoch::start(epoch, options.epochs, steps_per_epoch, skip, options.progress && rank == 0);
        let mut step_in_epoch = skip;
        let mut queued = None;
        for indices in shard(epoch).chunks(per_rank).skip(skip) {
            let start = Instant::now();
            let (x, y) = to_tensors::<B>(train, indices, device);
            let data = start.elapsed().as_secs_f64();
            let (loss, phases);
            (model, loss, phases) = stepper.step(model, x, y)?;
            done_steps += 1;
            step_in_epoch += 1;
            let step = Queued {
                loss,
                number: done_steps,
                at: epoch * steps_per_epoch + step_in_epoch,
                images: indices.len() * world,
                start,
                phases: HostPhases { data, ..phases },
            };
            if let Some(previous) = queued.take() {
                losses.read(previous, &mut report, &mut tally)?;
            }
            let every = options.checkpoint_every.is_some_and(|n| done_steps.is_multiple_of(n));
            // The last step of an epoch gets the epoch's checkpoint below.
            let checkpoint = checkpoints.filter(|_| every && step_in_epoch < steps_per_epoch);
            let last = options.max_steps.is_some_and(|m| done_steps >= m);
            if checkpoint.is_none() && !last && runs_ahead {
                queued = Some(step);
                continue;
            }
            losses.read(step, &mut report, &mut tally)?;
            if let Some(dir) = checkpoint {
                let at = Position {
                    epoch: epoch as u64,
                    step_in_epoch: step_in_epoch as u64,
                    steps_done: done_steps as u64,
                };
                stepper.checkpoint(dir, at, &model, rank)?;
            }
            if last {
                report.epochs.push(tally.finish(rank, &model, test, device));
                break 'epochs;
            }
        }
        if let Some(step) = queued {
            losses.read(step, &mut report, &mut tally)?;
        }
        // A rank with fewer batches takes part in the others' last steps.
        model = stepper.strategy.join(model)?;
        report.epochs.push(tally.finish(rank, &model, test, device));
        if let Some(dir) = checkpoints {
            let at = Position { epoch: epoch as u64 + 1, step_in_epoch: 0, steps_done: done_steps as u64 };
            stepper.checkpoint(dir, at, &model, rank)?;
        }
    }
    let steps_run = done_steps - position.steps_done as usize;
    report.hook_bytes_per_step = sent.filter(|_| steps_run > 0).map(|s| s.get() as f64 / steps_run as f64);
    if let (Some(file), 0) = (&options.save, rank) {
        ensure_finite(&model, "--save")?;
        crate::weights::save(&model, file)?;
    }
    Ok(report)
}

/// Registers `hook` with a count of the bytes it sends.
fn metered<B: HookBackend>(
    ddp: &mut DistributedDataParallel<B>,
    hook: impl CommHook<B::InnerBackend>,
) -> Result<SentBytes> {
    let hook = Metered::new(hook);
    let sent = hook.counter();
    ddp.register_comm_hook(hook)?;
    Ok(sent)
}

/// The optimizer: whole on every rank, or each DDP rank stepping its
/// shard of the parameters (`--shard-optimizer`, ZeRO stage 1).
enum Stepping<B: HookBackend, M, O> {
    Whole(O),
    Sharded(ShardedOptimizer<B, M, O>),
}

impl<B: HookBackend, M: TrainableClassifier<B>, O: Optimizer<M, B>> Stepping<B, M, O>
where
    O::Record: PerParameterRecord,
{
    fn sharded_by(self, ddp: &DistributedDataParallel<B>, model: &M) -> Self {
        match self {
            Stepping::Whole(opt) => Stepping::Sharded(ddp.shard_optimizer(opt, model)),
            sharded => sharded,
        }
    }

    /// The whole optimizer's state on rank 0, for its checkpoint (other
    /// ranks only help gather a sharded optimizer's shards).
    fn record_on(&self, rank: usize) -> Result<Option<O::Record>> {
        Ok(match self {
            Stepping::Whole(opt) => (rank == 0).then(|| opt.to_record()),
            Stepping::Sharded(opt) => {
                let whole = opt.record().context("gathering the sharded optimizer's state")?;
                (rank == 0).then_some(whole)
            }
        })
    }

    fn step(&mut self, lr: f64, model: M, grads: GradientsParams) -> Result<M> {
        match self {
            Stepping::Whole(opt) => Ok(opt.step(lr, model, grads)),
            Stepping::Sharded(opt) => opt.step(lr, model, grads).context("the sharded optimizer's step"),
        }
    }
}

/// What a training step needs besides the model.
struct Stepper<'a, B: HookBackend, M, O> {
    strategy: Strategy<B>,
    opt: Stepping<B, M, O>,
    loss: CrossEntropyLoss<B>,
    options: &'a TrainOptions,
}

impl<B: HookBackend, M: TrainableClassifier<B>, O: Optimizer<M, B>> Stepper<'_, B, M, O>
where
    O::Record: PerParameterRecord,
{
    /// One step on this rank's share of a batch: the gradients, averaged
    /// as the strategy does, then the update. Returns the model after it,
    /// the batch's loss, still on the device (see `pending.rs`), and the
    /// host's time in the two.
    fn step(&mut self, model: M, x: Tensor<B, 4>, y: Tensor<B, 1, Int>) -> Result<(M, Tensor<B, 1>, HostPhases)> {
        let loss_fn = &self.loss;
        let start = Instant::now();
        let (loss, grads) = self
            .strategy
            .step(&model, x, y, |m, x| m.forward(x), |logits, y| loss_fn.forward(logits, y))
            .context("the training step")?;
        let gradients = start.elapsed().as_secs_f64();
        let model = self.opt.step(self.options.lr, model, grads)?;
        let update = start.elapsed().as_secs_f64() - gradients;
        Ok((model, loss, HostPhases { gradients, update, ..HostPhases::default() }))
    }

    /// Rank 0 writes a checkpoint of `model` and the whole optimizer at
    /// `at`; every rank calls it at the same point.
    fn checkpoint(&self, dir: &std::path::Path, at: Position, model: &M, rank: usize) -> Result<()> {
        match self.opt.record_on(rank)? {
            Some(record) => state::save::<B, M, O>(dir, at, model, record),
            None => Ok(()),
        }
    }
}

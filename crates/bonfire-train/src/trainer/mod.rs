//! The training loop: one worker's view of single-device, DP or DDP training.

mod batch;
mod config;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use bonfire_data::{DistributedSampler, ImageDataset};
use bonfire_parallel::{DataParallel, DdpConfig, DistributedDataParallel, HookBackend, Strategy};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, Optimizer, SgdConfig};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::{self, Checkpoint, Position};
use crate::model::{LeNet, ModelKind, ResNet, TrainableClassifier};
pub use batch::{accuracy, check_batch};
use batch::{ensure_finite, loss_value, to_tensors};
pub use config::{EpochMetrics, OptimizerKind, Parallel, Report, Resume, TrainOptions};

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
    B::seed(device, options.seed);
    match options.model {
        ModelKind::Lenet => {
            let model = LeNet::<B>::new(train.channels, train.height, train.classes, device);
            with_optimizer(device, train, test, options, parallel, model)
        }
        ModelKind::Resnet => {
            let model = ResNet::<B>::new(train.channels, train.classes, device);
            with_optimizer(device, train, test, options, parallel, model)
        }
    }
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
    mut model: M,
    mut opt: O,
) -> Result<Report> {
    let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
    let mut position = Position { epoch: 0, step_in_epoch: 0, steps_done: 0 };
    let mut resumed_from = None;
    if options.resume != Resume::Never {
        let dir = options.checkpoint_dir.as_deref().context("--resume needs --checkpoint-dir")?;
        match checkpoint::load(dir)? {
            Some((ckpt, file)) => {
                let model_record = recorder.load(ckpt.model, device).map_err(|e| {
                    anyhow::anyhow!("the checkpoint {} does not hold a {}: {e:?}", file.display(), options.model)
                })?;
                model = model.load_record(model_record);
                let opt_record = recorder.load(ckpt.optimizer, device).map_err(|e| {
                    anyhow::anyhow!("the checkpoint {} does not hold this optimizer's state: {e:?}", file.display())
                })?;
                opt = opt.load_record(opt_record);
                position = ckpt.position;
                resumed_from = Some(file);
            }
            None if options.resume == Resume::Required => {
                bail!("--resume: there is no checkpoint in {}", dir.display())
            }
            None => {}
        }
    }
    let mut strategy = match parallel {
        Parallel::Single => Strategy::Single,
        Parallel::Dp { devices } => Strategy::Dp(DataParallel::<B>::new(devices)?),
        Parallel::Ddp { comm } => {
            let (ddp, m) = DistributedDataParallel::new(model, comm, DdpConfig::default())?;
            model = m;
            Strategy::Ddp(Box::new(ddp))
        }
    };
    let (rank, world) = (strategy.rank(), strategy.world_size());
    check_batch(options.global_batch, world)?;
    let per_rank = options.global_batch / world;
    let sampler = DistributedSampler::new(train.len(), rank, world, options.shuffle, options.seed, false)?;
    let steps_per_epoch = sampler.per_rank().div_ceil(per_rank);
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut done_steps = position.steps_done as usize;
    let mut epochs = Vec::new();
    let mut step_losses = Vec::new();
    let mut step_seconds = Vec::new();
    let mut step_ends = Vec::new();
    let began = Instant::now();
    if let (Some(file), 0) = (&resumed_from, rank) {
        let Position { epoch, step_in_epoch, steps_done } = position;
        if step_in_epoch == 0 {
            eprintln!("resuming after epoch {epoch} from {}", file.display());
        } else {
            eprintln!(
                "resuming in epoch {} after its step {step_in_epoch} ({steps_done} steps done) from {}",
                epoch + 1,
                file.display()
            );
        }
    }
    'epochs: for epoch in position.epoch as usize..options.epochs {
        let bar = progress_bar(options.progress && rank == 0, steps_per_epoch as u64, epoch, options.epochs);
        let start = Instant::now();
        let (mut loss_sum, mut steps, mut images) = (0.0f64, 0usize, 0usize);
        // Resumed inside this epoch: the sampler's order is the same, so
        // skipping the steps done continues it.
        let skip = if epoch == position.epoch as usize { position.step_in_epoch as usize } else { 0 };
        bar.inc(skip as u64);
        let mut step_in_epoch = skip;
        for indices in sampler.indices(epoch as u64).chunks(per_rank).skip(skip) {
            let step_start = Instant::now();
            let (x, y) = to_tensors::<B>(train, indices, device);
            let (loss, grads) = strategy
                .step(&model, x, y, |m, x| m.forward(x), |logits, y| loss_fn.forward(logits, y))
                .context("the training step")?;
            let loss = loss_value(&loss);
            if !loss.is_finite() {
                // Stop before the optimizer spreads it into the weights, and
                // before any checkpoint could be written from them.
                bail!(
                    "the loss is {loss} at step {} on rank {rank}; stopping (a learning rate too high, \
                     or bad input data); the last checkpoint, if any, is left as it was",
                    done_steps + 1
                );
            }
            model = opt.step(options.lr, model, grads);
            step_seconds.push(step_start.elapsed().as_secs_f64());
            step_ends.push(began.elapsed().as_secs_f64());
            loss_sum += loss;
            steps += 1;
            step_in_epoch += 1;
            step_losses.push((epoch * steps_per_epoch + step_in_epoch, loss));
            images += indices.len() * world;
            done_steps += 1;
            bar.inc(1);
            bar.set_message(format!("loss {:.4}", loss_sum / steps as f64));
            let every = options.checkpoint_every.is_some_and(|n| done_steps.is_multiple_of(n));
            // The last step of an epoch gets the epoch's checkpoint below.
            if let (true, Some(dir), 0) = (every && step_in_epoch < steps_per_epoch, &options.checkpoint_dir, rank) {
                let at = Position {
                    epoch: epoch as u64,
                    step_in_epoch: step_in_epoch as u64,
                    steps_done: done_steps as u64,
                };
                save_checkpoint(dir, at, &model, &opt, &recorder)?;
            }
            if options.max_steps.is_some_and(|m| done_steps >= m) {
                finish_epoch(&mut epochs, &bar, rank, &model, test, device, epoch, steps, loss_sum, images, start);
                break 'epochs;
            }
        }
        finish_epoch(&mut epochs, &bar, rank, &model, test, device, epoch, steps, loss_sum, images, start);
        if let (Some(dir), 0) = (&options.checkpoint_dir, rank) {
            let at = Position { epoch: epoch as u64 + 1, step_in_epoch: 0, steps_done: done_steps as u64 };
            save_checkpoint(dir, at, &model, &opt, &recorder)?;
        }
    }
    if let (Some(file), 0) = (&options.save, rank) {
        ensure_finite(&model, "--save")?;
        crate::weights::save(&model, file)?;
    }
    Ok(Report { rank, epochs, step_losses, step_seconds, step_ends })
}

/// Rank 0's checkpoint of `model` and `opt` at `position`, refused when the
/// weights hold a non-finite number (the previous checkpoints stay).
fn save_checkpoint<B: HookBackend, M: TrainableClassifier<B>, O: Optimizer<M, B>>(
    dir: &std::path::Path,
    position: Position,
    model: &M,
    opt: &O,
    recorder: &NamedMpkBytesRecorder<FullPrecisionSettings>,
) -> Result<()> {
    ensure_finite(model, "checkpoint")?;
    let to_bytes = |e| anyhow::anyhow!("encoding the checkpoint: {e:?}");
    let ckpt = Checkpoint {
        position,
        model: recorder.record(model.clone().into_record(), ()).map_err(to_bytes)?,
        optimizer: recorder.record(opt.to_record(), ()).map_err(to_bytes)?,
    };
    checkpoint::save(dir, &ckpt)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn finish_epoch<B: HookBackend, M: TrainableClassifier<B>>(
    epochs: &mut Vec<EpochMetrics>,
    bar: &ProgressBar,
    rank: usize,
    model: &M,
    test: &ImageDataset,
    device: &B::Device,
    epoch: usize,
    steps: usize,
    loss_sum: f64,
    images: usize,
    start: Instant,
) {
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let test_accuracy = (rank == 0).then(|| accuracy::<B::InnerBackend, _>(&model.valid(), test, device));
    let m = EpochMetrics {
        epoch: epoch + 1,
        steps,
        train_loss: loss_sum / steps.max(1) as f64,
        test_accuracy,
        images_per_sec: images as f64 / seconds,
        seconds,
    };
    if rank == 0 {
        eprintln!(
            "epoch {}: {} steps, train loss {:.4}, test accuracy {:.4}, {:.0} images/s, {:.1} s",
            m.epoch,
            m.steps,
            m.train_loss,
            m.test_accuracy.unwrap_or(f64::NAN),
            m.images_per_sec,
            m.seconds
        );
    }
    epochs.push(m);
}

fn progress_bar(show: bool, steps: u64, epoch: usize, epochs: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} steps {per_sec} {msg} (eta {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{epochs}", epoch + 1));
    bar
}

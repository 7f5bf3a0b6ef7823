//! Runs this process's share of a training run: one device alone, DP
//! replicas, DDP worker threads, or one DDP worker process, on a backend the
//! caller chose, and writes rank 0's metrics.

use anyhow::Result;
use bonfire_collective::{DistEnv, Placement, TensorCollective};
use bonfire_data::ImageDataset;
use bonfire_parallel::HookBackend;
use bonfire_train::launch;
use bonfire_train::metrics::write_metrics;
use bonfire_train::trainer::{self, Parallel, Resume, TrainOptions};
use burn::tensor::backend::AutodiffBackend;

use crate::args::{StrategyKind, TrainArgs};
use crate::group;

/// Trains with worker (or DP replica) `i` on `devices[i % devices.len()]`;
/// a process started by a launcher is worker LOCAL_RANK of its host, and
/// joins the others with `join`.
pub fn run<B: HookBackend>(
    args: &TrainArgs,
    devices: Vec<B::Device>,
    train_set: &ImageDataset,
    test_set: &ImageDataset,
    join: impl FnOnce(&B::Device) -> Result<Box<dyn TensorCollective<<B as AutodiffBackend>::InnerBackend>>>,
) -> Result<()> {
    let opts = options(args);
    let worker_device = |i: usize| devices[i % devices.len()].clone();
    let report = match (args.strategy, group::Exchange::of(args)) {
        (StrategyKind::Single, _) => trainer::train::<B>(&devices[0], train_set, test_set, &opts, Parallel::Single)?,
        (StrategyKind::Dp, _) => {
            let replicas = (0..args.workers).map(worker_device).collect();
            trainer::train::<B>(&devices[0], train_set, test_set, &opts, Parallel::Dp { devices: replicas })?
        }
        (StrategyKind::Ddp, group::Exchange::InProcess) => {
            let comms = group::threads(args)?;
            let reports = std::thread::scope(|s| {
                let handles: Vec<_> = comms
                    .into_iter()
                    .enumerate()
                    .map(|(i, comm)| {
                        let (device, opts) = (worker_device(i), opts.clone());
                        s.spawn(move || {
                            let comm = Box::new(comm);
                            trainer::train::<B>(&device, train_set, test_set, &opts, Parallel::Ddp { comm })
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("a worker thread panicked")).collect::<Result<Vec<_>>>()
            })?;
            reports.into_iter().next().expect("at least one worker")
        }
        (StrategyKind::Ddp, _) => {
            let local_rank = if DistEnv::launched() { Placement::from_env()?.local_rank } else { 0 };
            let device = worker_device(local_rank);
            let comm = join(&device)?;
            trainer::train::<B>(&device, train_set, test_set, &opts, Parallel::Ddp { comm })?
        }
    };
    if report.rank == 0 {
        write_metrics(&args.out, &report)?;
        if let Some(acc) = report.epochs.last().and_then(|e| e.test_accuracy) {
            println!("test accuracy: {acc:.4}");
        }
        if let Some(bytes) = report.hook_bytes_per_step {
            println!("comm hook: {bytes:.0} bytes a step handed to collectives by rank 0");
        }
    }
    Ok(())
}

/// The trainer's options from the command's flags; a restarted job resumes from
/// its last checkpoint.
fn options(args: &TrainArgs) -> TrainOptions {
    TrainOptions {
        model: args.model,
        epochs: args.epochs,
        max_steps: args.steps,
        global_batch: args.batch_size,
        optimizer: args.optimizer,
        lr: args.lr,
        momentum: args.momentum,
        comm_hook: args.comm_hook,
        power_sgd_rank: args.power_sgd_rank,
        sync_batch_norm: args.sync_batch_norm,
        shard_optimizer: args.shard_optimizer,
        uneven_inputs: args.uneven_inputs,
        seed: args.seed,
        shuffle: !args.no_shuffle,
        progress: true,
        checkpoint_dir: args.checkpoint_dir.clone(),
        checkpoint_every: args.checkpoint_every.map(|n| n as usize),
        resume: if args.resume || launch::restart_count() > 0 { Resume::Newest } else { Resume::Never },
        init: args.init.clone(),
        save: args.save.clone(),
    }
}

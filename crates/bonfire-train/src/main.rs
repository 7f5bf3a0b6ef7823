//! `bonfire`: train a Burn model over several workers, or launch workers.

mod args;
mod cuda;
mod join;
mod wgpu_devices;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use bonfire_collective::{Communicator, InProcCommunicator, TensorCollective};
use bonfire_data::ImageDataset;
use bonfire_parallel::HookBackend;
use bonfire_train::launch::LaunchArgs;
use bonfire_train::metrics::write_metrics;
use bonfire_train::trainer::{Parallel, Resume, TrainOptions};
use bonfire_train::{data, launch, trainer, weights};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;

use args::{check_comm, check_flags, comm_kind, BackendKind, Cli, Cmd, CommKind, StrategyKind, TrainArgs};
use join::join_host;

/// Exit code for a backend that cannot run here.
const EXIT_UNAVAILABLE: u8 = 2;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unavailable(String);

fn main() -> ExitCode {
    bonfire_parallel::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Train(args) => train(args),
        Cmd::Launch(args) => launch::launch(&args),
        Cmd::NcclCheck { sizes_mib } => cuda::nccl_check(&sizes_mib),
        Cmd::DiffWeights { a, b, tolerance, nan_equal } => diff_weights(&a, &b, tolerance, nan_equal),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            launch::report_failure(&e);
            if e.downcast_ref::<Unavailable>().is_some() {
                ExitCode::from(EXIT_UNAVAILABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let launched = bonfire_collective::DistEnv::launched();
    check_flags(&args, launched)?;
    check_comm(&args)?;
    if args.backend == BackendKind::Cuda {
        // Fail once, before starting workers, when CUDA is not there.
        cuda::devices(1)?;
        if comm_kind(&args) == CommKind::Nccl && !launched && args.workers > 1 {
            cuda::nccl_preflight(args.workers)?;
        }
    }
    if comm_kind(&args) == CommKind::Mpi && !launched && args.workers > 1 {
        bail!(
            "--comm mpi: start the workers with mpirun or srun (for example `mpirun -np {0} bonfire train \
             --comm mpi` or `srun -n {0} bonfire train --comm mpi`); bonfire starts workers itself only for \
             the ring and NCCL",
            args.workers
        );
    }
    if args.strategy == StrategyKind::Ddp && !args.threads && !launched && args.workers > 1 {
        // Make sure the data is there once, then start the workers.
        data::load(args.dataset, args.data_dir.as_deref(), true)?;
        let mut command = vec![std::env::current_exe()?.to_string_lossy().into_owned()];
        command.extend(std::env::args().skip(1));
        return launch::launch(&LaunchArgs {
            nproc_per_node: args.workers,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            max_restarts: args.max_restarts,
            min_workers: args.min_workers,
            command,
        });
    }
    let (train_set, test_set) = data::load(args.dataset, args.data_dir.as_deref(), !launched)?;
    match args.backend {
        BackendKind::Cpu => {
            run::<Autodiff<burn::backend::Flex>>(&args, vec![Default::default()], &train_set, &test_set, |_| {
                join_host(&args)
            })
        }
        BackendKind::Ndarray => {
            run::<Autodiff<burn::backend::NdArray>>(&args, vec![Default::default()], &train_set, &test_set, |_| {
                join_host(&args)
            })
        }
        BackendKind::Wgpu => {
            let devices = wgpu_devices::choose(&args.devices)?;
            if devices.len() > 1 && !launched {
                let used: Vec<_> = devices.iter().take(args.workers).collect();
                tracing::info!("workers on the wgpu devices {used:?} (worker i on device i mod {})", devices.len());
            }
            run::<Autodiff<burn::backend::Wgpu>>(&args, devices, &train_set, &test_set, |_| join_host(&args))
        }
        BackendKind::Cuda => cuda::run(&args, &train_set, &test_set),
    }
}

fn diff_weights(a: &std::path::Path, b: &std::path::Path, tolerance: f64, nan_equal: bool) -> Result<()> {
    let diffs = weights::diff(a, b, nan_equal)?;
    for (name, worst) in &diffs {
        println!("{name}: max |diff| {worst:.3e}");
    }
    let worst = diffs.iter().map(|(_, w)| *w).fold(0.0, f64::max);
    println!("largest difference {worst:.3e} (tolerance {tolerance:.1e})");
    // Differences are never NaN (`weights::diff`), so this also catches a NaN in one file only.
    let over: Vec<String> = diffs
        .iter()
        .filter(|(_, w)| *w > tolerance)
        .map(|(name, w)| match w.is_finite() {
            true => format!("{name} ({w:.3e})"),
            false => format!("{name} (a NaN or an infinity the other file does not match)"),
        })
        .collect();
    if !over.is_empty() {
        bail!("the weights differ by more than {tolerance:.1e} in {}", over.join(", "));
    }
    Ok(())
}

/// Runs `f` with panics caught and not printed, returning a panic's message
/// as the error: GPU libraries panic when their hardware is missing.
fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    outcome.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into())
    })
}

fn options(args: &TrainArgs) -> TrainOptions {
    TrainOptions {
        model: args.model,
        epochs: args.epochs,
        max_steps: args.steps,
        global_batch: args.batch_size,
        optimizer: args.optimizer,
        lr: args.lr,
        momentum: args.momentum,
        seed: args.seed,
        shuffle: !args.no_shuffle,
        progress: true,
        checkpoint_dir: args.checkpoint_dir.clone(),
        checkpoint_every: args.checkpoint_every.map(|n| n as usize),
        resume: if args.resume {
            Resume::Required
        } else if launch::restart_count() > 0 {
            Resume::IfAny
        } else {
            Resume::Never
        },
        init: args.init.clone(),
        save: args.save.clone(),
    }
}

/// Trains with worker (or DP replica) `i` on `devices[i % devices.len()]`;
/// a process started by the launcher is worker LOCAL_RANK of its node, and
/// joins the others with `join`.
fn run<B: HookBackend>(
    args: &TrainArgs,
    devices: Vec<B::Device>,
    train_set: &ImageDataset,
    test_set: &ImageDataset,
    join: impl FnOnce(&B::Device) -> Result<Box<dyn TensorCollective<<B as AutodiffBackend>::InnerBackend>>>,
) -> Result<()> {
    let opts = options(args);
    let worker_device = |i: usize| devices[i % devices.len()].clone();
    let report = match (args.strategy, args.threads) {
        (StrategyKind::Single, _) => trainer::train::<B>(&devices[0], train_set, test_set, &opts, Parallel::Single)?,
        (StrategyKind::Dp, _) => {
            let replicas = (0..args.workers).map(worker_device).collect();
            trainer::train::<B>(&devices[0], train_set, test_set, &opts, Parallel::Dp { devices: replicas })?
        }
        (StrategyKind::Ddp, true) => {
            let mut comms = InProcCommunicator::group(args.workers)?;
            for c in &mut comms {
                c.set_timeout(Duration::from_secs_f64(args.timeout));
                c.set_stall_warning(Duration::from_secs_f64(args.stall_warning));
            }
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
        (StrategyKind::Ddp, false) => {
            let launched = bonfire_collective::DistEnv::launched();
            let local_rank = if launched { bonfire_collective::Placement::from_env()?.local_rank } else { 0 };
            let device = worker_device(local_rank);
            let comm = if launched { join(&device)? } else { Box::new(InProcCommunicator::group(1)?.remove(0)) };
            trainer::train::<B>(&device, train_set, test_set, &opts, Parallel::Ddp { comm })?
        }
    };
    if report.rank == 0 {
        write_metrics(&args.out, &report)?;
        if let Some(acc) = report.epochs.last().and_then(|e| e.test_accuracy) {
            println!("test accuracy: {acc:.4}");
        }
    }
    Ok(())
}

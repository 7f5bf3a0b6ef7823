//! `bonfire`: train a Burn model over several workers, or launch workers.

mod args;
mod cuda;
mod group;
mod guard;
mod wgpu_devices;
mod workers;

use std::process::ExitCode;

use anyhow::{bail, Result};
use bonfire_train::launch::LaunchArgs;
use bonfire_train::{data, launch, weights};
use burn::backend::Autodiff;
use clap::Parser;

use args::{check_flags, BackendKind, Cli, Cmd, StrategyKind, TrainArgs};
use group::Exchange;

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
    if launched {
        launch::take_share_of_cores();
    }
    check_flags(&args, launched)?;
    group::check(&args)?;
    let exchange = Exchange::of(&args);
    if args.backend == BackendKind::Cuda {
        // Fail once, before starting workers, when CUDA is not there.
        cuda::devices(1)?;
        if exchange == Exchange::Nccl && !launched && args.workers > 1 {
            cuda::nccl_preflight(args.workers)?;
        }
    }
    if exchange == Exchange::Mpi && !launched && args.workers > 1 {
        bail!(
            "--comm mpi: start the workers with mpirun or srun (for example `mpirun -np {0} bonfire train \
             --comm mpi` or `srun -n {0} bonfire train --comm mpi`); bonfire starts workers itself only for \
             the ring and NCCL",
            args.workers
        );
    }
    if args.strategy == StrategyKind::Ddp && exchange != Exchange::InProcess && !launched && args.workers > 1 {
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
    let (train, test) = (&train_set, &test_set);
    match args.backend {
        BackendKind::Cpu => {
            let cpu = vec![Default::default()];
            workers::run::<Autodiff<burn::backend::Flex>>(&args, cpu, train, test, |_| group::join(&args))
        }
        BackendKind::Ndarray => {
            let cpu = vec![Default::default()];
            workers::run::<Autodiff<burn::backend::NdArray>>(&args, cpu, train, test, |_| group::join(&args))
        }
        BackendKind::Wgpu => {
            let devices = wgpu_devices::choose(&args.devices)?;
            if devices.len() > 1 && !launched {
                let used: Vec<_> = devices.iter().take(args.workers).collect();
                tracing::info!("workers on the wgpu devices {used:?} (worker i on device i mod {})", devices.len());
            }
            workers::run::<Autodiff<burn::backend::Wgpu>>(&args, devices, train, test, |_| group::join(&args))
        }
        BackendKind::Cuda => cuda::run(&args, train, test),
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

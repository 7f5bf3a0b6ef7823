//! `bonfire`: train a Burn model over several workers, or launch workers.

mod checkpoint;
mod cuda;
mod data;
mod launch;
mod model;
mod plot;
mod trainer;
mod weights;
mod wgpu_devices;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bonfire_collective::{Communicator, InProcCommunicator, TcpCommunicator, TcpConfig, TensorCollective};
use bonfire_data::ImageDataset;
use bonfire_parallel::HookBackend;
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use clap::{Parser, Subcommand, ValueEnum};

use launch::LaunchArgs;
use model::ModelKind;
use trainer::{OptimizerKind, Parallel, Report, Resume, TrainOptions};

#[derive(Parser)]
#[command(name = "bonfire", about = "Data-parallel training for Burn", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model on a data set, on one device or several workers.
    Train(TrainArgs),
    /// Start one process per worker with torchrun's environment variables.
    Launch(LaunchArgs),
    /// Compare two weight files (safetensors): the largest difference of each tensor.
    DiffWeights {
        a: PathBuf,
        b: PathBuf,
        /// Fail when any element differs by more than this.
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f64,
    },
    /// Check NCCL on this GPU: all-reduce correctness and bandwidth (needs the `cuda` feature).
    NcclCheck {
        /// Buffer sizes in MiB of f32.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        sizes_mib: Vec<usize>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// The CPU, through Burn's Flex backend (measured faster here than NdArray).
    Cpu,
    /// The CPU through Burn's NdArray backend, for comparison.
    Ndarray,
    /// wgpu (Vulkan, Metal, DX12; lavapipe on machines without a GPU).
    Wgpu,
    /// CUDA (a build with the `cuda` feature; DDP workers take device LOCAL_RANK, shared round-robin).
    Cuda,
}

/// How DDP workers exchange gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CommKind {
    /// The host-staged TCP ring: any backend, and workers may share a GPU.
    Ring,
    /// NCCL in GPU memory: --backend cuda, one GPU per worker.
    Nccl,
    /// MPI through host memory: any backend, processes started by mpirun or srun (a build
    /// with the `mpi` feature).
    Mpi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StrategyKind {
    Single,
    Dp,
    Ddp,
}

#[derive(Debug, Clone, clap::Args)]
struct TrainArgs {
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    #[arg(long, value_enum, default_value = "ddp")]
    strategy: StrategyKind,
    /// Workers: DDP processes (or threads with --threads), or DP replicas.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Run DDP workers as threads of this process instead of processes.
    #[arg(long)]
    threads: bool,
    /// wgpu devices, comma-separated; worker or DP replica i runs on device i mod n: default, cpu,
    /// discrete:N, integrated:N, virtual:N [default: every GPU adapter where there are several,
    /// else the default device]
    #[arg(long, value_delimiter = ',', value_parser = wgpu_devices::parse)]
    devices: Vec<burn::backend::wgpu::WgpuDevice>,
    /// How DDP workers exchange gradients [default: nccl with --backend cuda, else ring].
    #[arg(long, value_enum)]
    comm: Option<CommKind>,
    #[arg(long, value_enum, default_value = "fashion-mnist")]
    dataset: data::DatasetKind,
    /// Folder of the data set files (Fashion-MNIST defaults to Debian's).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "lenet")]
    model: ModelKind,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Stop after this many steps in all.
    #[arg(long)]
    steps: Option<usize>,
    /// Samples per step over all workers.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    #[arg(long, value_enum, default_value = "sgd")]
    optimizer: OptimizerKind,
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Visit samples in order (rank r takes every world-th sample).
    #[arg(long)]
    no_shuffle: bool,
    /// Start from these weights (safetensors with PyTorch's names and layouts).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Write the final weights here (safetensors with PyTorch's names and layouts).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Folder where rank 0 writes a checkpoint after every epoch.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Also write a checkpoint every this many steps (the last two checkpoints are kept).
    #[arg(long, requires = "checkpoint_dir", value_parser = clap::value_parser!(u64).range(1..))]
    checkpoint_every: Option<u64>,
    /// Continue from the newest checkpoint in --checkpoint-dir.
    #[arg(long, requires = "checkpoint_dir")]
    resume: bool,
    /// DDP over processes: when a worker dies or times out, restart every worker from the last
    /// checkpoint, up to this many times.
    #[arg(long, default_value_t = 0)]
    max_restarts: usize,
    /// DDP over processes: when the workers still fail after the restarts, continue from the last
    /// checkpoint with one worker fewer (the same global batch, a larger share each), down to
    /// this many.
    #[arg(long, requires = "checkpoint_dir")]
    min_workers: Option<usize>,
    /// Seconds a DDP worker waits for a silent peer before failing.
    #[arg(long, default_value_t = 300.0, value_parser = positive_seconds)]
    timeout: f64,
    /// Seconds of waiting in a collective after which a worker logs which rank and call it waits for.
    #[arg(long, default_value_t = 60.0, value_parser = positive_seconds)]
    stall_warning: f64,
    /// Folder for metrics (metrics.csv, metrics.json, steps.csv) and the plot (loss.png).
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
}

/// Exit code for a backend that cannot run here.
const EXIT_UNAVAILABLE: u8 = 2;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unavailable(String);

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

fn main() -> ExitCode {
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
        Cmd::DiffWeights { a, b, tolerance } => diff_weights(&a, &b, tolerance),
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

/// Flags that can be checked before any worker starts, so that a mistake is
/// reported once, by the launching process, not once per worker.
fn check_flags(args: &TrainArgs, launched: bool) -> Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let world = if args.strategy == StrategyKind::Ddp && !launched { args.workers } else { 1 };
    trainer::check_batch(args.batch_size, world)?;
    if let Some(min) = args.min_workers.filter(|_| world > 1) {
        if min == 0 || min > world {
            bail!("--min-workers {min} must be between 1 and --workers {world}");
        }
        // Every world the job may shrink to shares the same global batch.
        for fewer in min..world {
            trainer::check_batch(args.batch_size, fewer)
                .with_context(|| format!("--min-workers {min} may leave {fewer} worker(s)"))?;
        }
    }
    if !(args.lr.is_finite() && args.lr >= 0.0) {
        bail!("--lr {} must be a number of at least 0", args.lr);
    }
    if !(args.momentum.is_finite() && args.momentum >= 0.0) {
        bail!("--momentum {} must be a number of at least 0", args.momentum);
    }
    if args.epochs == 0 || args.steps == Some(0) {
        bail!("--epochs and --steps must be at least 1");
    }
    if !args.devices.is_empty() && args.backend != BackendKind::Wgpu {
        bail!("--devices applies to --backend wgpu");
    }
    if let Some(file) = &args.init {
        std::fs::File::open(file).with_context(|| format!("--init {}: cannot read the weights", file.display()))?;
    }
    Ok(())
}

/// The communication each strategy accepts.
fn check_comm(args: &TrainArgs) -> Result<()> {
    let Some(comm) = args.comm else { return Ok(()) };
    if args.strategy != StrategyKind::Ddp {
        bail!("--comm applies to --strategy ddp only");
    }
    if comm == CommKind::Nccl && args.backend != BackendKind::Cuda {
        bail!("--comm nccl needs --backend cuda; the other backends use the ring");
    }
    if comm == CommKind::Nccl && args.threads {
        bail!("--comm nccl runs one process per GPU; leave out --threads, or use --comm ring");
    }
    if comm == CommKind::Mpi {
        if !cfg!(feature = "mpi") {
            bail!("--comm mpi: this bonfire was built without MPI; build it with the `mpi` feature \
                   (it needs an MPI library's headers and libclang, e.g. Debian's libopenmpi-dev and libclang-dev)");
        }
        if args.threads {
            bail!("--comm mpi runs one process per worker, started by mpirun or srun; leave out --threads");
        }
    }
    Ok(())
}

fn comm_kind(args: &TrainArgs) -> CommKind {
    let cuda_processes = args.strategy == StrategyKind::Ddp && args.backend == BackendKind::Cuda && !args.threads;
    args.comm.unwrap_or(if cuda_processes { CommKind::Nccl } else { CommKind::Ring })
}

/// A launched worker joins the others through host memory: in the TCP ring,
/// or in MPI with `--comm mpi`.
fn join_host<B: burn::tensor::backend::Backend>(args: &TrainArgs) -> Result<Box<dyn TensorCollective<B>>> {
    let timeout = Duration::from_secs_f64(args.timeout);
    if comm_kind(args) == CommKind::Mpi {
        return join_mpi(timeout);
    }
    let config =
        TcpConfig { timeout, stall_warning: Duration::from_secs_f64(args.stall_warning), ..TcpConfig::default() };
    Ok(Box::new(TcpCommunicator::from_env(config).context("joining the workers")?))
}

/// Joins the MPI job this process belongs to, which must be the job its
/// launcher's variables describe (`bonfire launch` starts no MPI job).
#[cfg(feature = "mpi")]
fn join_mpi<B: burn::tensor::backend::Backend>(timeout: Duration) -> Result<Box<dyn TensorCollective<B>>> {
    use bonfire_collective::{Communicator, MpiCommunicator, Placement};
    let comm = MpiCommunicator::world(timeout).context("joining the MPI job")?;
    let place = Placement::from_env()?;
    // (Communicator's, not TensorCollective's: the same numbers.)
    let (rank, world) = (Communicator::rank(&comm), Communicator::world_size(&comm));
    if (rank, world) != (place.rank, place.world_size) {
        bail!(
            "MPI makes this process rank {rank} of {world}, but the launcher's variables say rank {} of {}: \
             with --comm mpi, start the workers with mpirun or srun",
            place.rank,
            place.world_size
        );
    }
    if rank == 0 {
        tracing::info!("MPI: {}", MpiCommunicator::library_version().lines().next().unwrap_or_default());
    }
    Ok(Box::new(comm))
}

#[cfg(not(feature = "mpi"))]
fn join_mpi<B: burn::tensor::backend::Backend>(_: Duration) -> Result<Box<dyn TensorCollective<B>>> {
    unreachable!("check_comm refuses --comm mpi without the mpi feature")
}

fn diff_weights(a: &std::path::Path, b: &std::path::Path, tolerance: f64) -> Result<()> {
    let diffs = weights::diff(a, b)?;
    for (name, worst) in &diffs {
        println!("{name}: max |diff| {worst:.3e}");
    }
    let worst = diffs.iter().map(|(_, w)| *w).fold(0.0, f64::max);
    println!("largest difference {worst:.3e} (tolerance {tolerance:.1e})");
    if worst > tolerance {
        bail!("the weights differ by {worst:.3e}, more than {tolerance:.1e}");
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

fn write_metrics(dir: &std::path::Path, report: &Report) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut csv = String::from("epoch,steps,train_loss,test_accuracy,images_per_sec,seconds\n");
    for e in &report.epochs {
        csv += &format!(
            "{},{},{:.6},{},{:.1},{:.3}\n",
            e.epoch,
            e.steps,
            e.train_loss,
            e.test_accuracy.map_or(String::new(), |a| format!("{a:.6}")),
            e.images_per_sec,
            e.seconds
        );
    }
    std::fs::write(dir.join("metrics.csv"), csv)?;
    let mut steps = String::from("step,loss,seconds\n");
    for ((step, loss), seconds) in report.step_losses.iter().zip(&report.step_seconds) {
        steps += &format!("{step},{loss:.6},{seconds:.6}\n");
    }
    std::fs::write(dir.join("steps.csv"), steps)?;
    std::fs::write(dir.join("metrics.json"), serde_json::to_string_pretty(&report.epochs)?)?;
    plot::write(&dir.join("loss.png"), report)?;
    Ok(())
}

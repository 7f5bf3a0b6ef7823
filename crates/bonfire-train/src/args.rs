//! The command line: `bonfire train | launch | diff-weights | nccl-check`
//! and their flags, and the checks of the flags that need no worker.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bonfire_train::data;
use bonfire_train::launch::{self, LaunchArgs};
use bonfire_train::model::ModelKind;
use bonfire_train::trainer::{self, CommHookKind, OptimizerKind};
use clap::{Parser, Subcommand, ValueEnum};

use crate::wgpu_devices;

#[derive(Parser)]
#[command(
    name = "bonfire",
    about = "Data-parallel training for Burn",
    version,
    after_help = "Workers can also be started by torchrun (which needs --no-python to start a program \
                  that is not Python), mpirun or srun:\n  \
                  torchrun --standalone --nproc-per-node 2 --no-python bonfire train --strategy ddp\n  \
                  mpirun -np 2 bonfire train --strategy ddp\n  \
                  srun -n 2 bonfire train --strategy ddp"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Train a model on a data set, on one device or several workers.
    Train(TrainArgs),
    /// Start one process per worker with torchrun's environment variables.
    Launch(LaunchArgs),
    /// Compare two weight files (safetensors): the largest difference of each tensor.
    DiffWeights {
        a: PathBuf,
        b: PathBuf,
        /// Fail when any element differs by more than this (a NaN or an infinity in one file only always does).
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f64,
        /// Count a NaN as equal to a NaN at the same place in the other file.
        #[arg(long)]
        nan_equal: bool,
    },
    /// Check NCCL on this GPU: all-reduce correctness and bandwidth (needs the `cuda` feature).
    NcclCheck {
        /// Buffer sizes in MiB of f32.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        sizes_mib: Vec<usize>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The CPU, through Burn's Flex backend, with Bonfire's kernels.
    Cpu,
    /// The CPU through Burn's NdArray backend (without the kernels), for comparison.
    Ndarray,
    /// wgpu (Vulkan, Metal, DX12; lavapipe on machines without a GPU).
    Wgpu,
    /// CUDA (a build with the `cuda` feature; DDP workers take device LOCAL_RANK, shared round-robin).
    Cuda,
}

/// How DDP workers exchange gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CommKind {
    /// The host-staged ring (shared memory between workers on one host, TCP between hosts):
    /// any backend, and workers may share a GPU.
    Ring,
    /// NCCL in GPU memory: --backend cuda, one GPU per worker.
    Nccl,
    /// MPI through host memory: any backend, processes started by mpirun or srun (a build
    /// with the `mpi` feature).
    Mpi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyKind {
    Single,
    Dp,
    Ddp,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    #[arg(long, value_enum, default_value = "ddp")]
    pub strategy: StrategyKind,
    /// Workers: DDP processes (or threads with --threads), or DP replicas.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Run DDP workers as threads of this process instead of processes.
    #[arg(long)]
    pub threads: bool,
    /// wgpu devices, comma-separated; worker or DP replica i runs on device i mod n: default, cpu,
    /// discrete:N, integrated:N, virtual:N [default: every GPU adapter where there are several,
    /// else the default device]
    #[arg(long, value_delimiter = ',', value_parser = wgpu_devices::parse)]
    pub devices: Vec<burn::backend::wgpu::WgpuDevice>,
    /// How DDP workers exchange gradients [default: nccl with --backend cuda, else ring].
    #[arg(long, value_enum)]
    pub comm: Option<CommKind>,
    /// How DDP averages gradients: the plain mean, the mean sent as bf16, or PowerSGD's
    /// low-rank factors with error feedback (rank --power-sgd-rank).
    #[arg(long, value_enum, default_value = "mean")]
    pub comm_hook: CommHookKind,
    /// The rank of PowerSGD's factors (with --comm-hook power-sgd).
    #[arg(long, default_value_t = 1)]
    pub power_sgd_rank: usize,
    /// Normalise batch norm with the statistics of the whole batch across all DDP workers
    /// (PyTorch's SyncBatchNorm) rather than each worker's own (--model resnet).
    #[arg(long)]
    pub sync_batch_norm: bool,
    /// Each DDP worker keeps the optimizer state of its shard of the parameters only and steps
    /// that shard (PyTorch's ZeroRedundancyOptimizer); checkpoints hold the whole optimizer's state.
    #[arg(long)]
    pub shard_optimizer: bool,
    /// Each DDP worker trains its exact share of every epoch, without the repeated samples that
    /// even the shares out; a worker with a batch fewer joins the others' last step (PyTorch's
    /// Join). Not with --steps, checkpoints or --shard-optimizer.
    #[arg(long)]
    pub uneven_inputs: bool,
    #[arg(long, value_enum, default_value = "fashion-mnist")]
    pub dataset: data::DatasetKind,
    /// Folder of the data set files (Fashion-MNIST defaults to Debian's).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "lenet")]
    pub model: ModelKind,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop after this many steps in all.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Samples per step over all workers.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: OptimizerKind,
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Visit samples in order (rank r takes every world-th sample).
    #[arg(long)]
    pub no_shuffle: bool,
    /// Start from these weights (safetensors with PyTorch's names and layouts).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Write the final weights here (safetensors with PyTorch's names and layouts).
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Folder where rank 0 writes a checkpoint after every epoch.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Also write a checkpoint every this many steps (the last two checkpoints are kept).
    #[arg(long, requires = "checkpoint_dir", value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: Option<u64>,
    /// Continue from the newest checkpoint in --checkpoint-dir, or start from the beginning when
    /// there is none yet (a restarted job resumes without this flag).
    #[arg(long, requires = "checkpoint_dir")]
    pub resume: bool,
    /// DDP over processes: when a worker dies or times out, restart every worker from the last
    /// checkpoint, up to this many times.
    #[arg(long, default_value_t = 0)]
    pub max_restarts: usize,
    /// DDP over processes: when the workers still fail after the restarts, continue from the last
    /// checkpoint with one worker fewer (the same global batch, a larger share each), down to
    /// this many.
    #[arg(long, requires = "checkpoint_dir")]
    pub min_workers: Option<usize>,
    /// Seconds a DDP worker waits for a silent peer before failing.
    #[arg(long, default_value_t = 300.0, value_parser = positive_seconds)]
    pub timeout: f64,
    /// Seconds of waiting in a collective after which a worker logs which rank and call it waits for.
    #[arg(long, default_value_t = 60.0, value_parser = positive_seconds)]
    pub stall_warning: f64,
    /// Folder for metrics (metrics.csv, metrics.json, steps.csv) and the plot (loss.png).
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// Flags that can be checked before any worker starts, so that a mistake is
/// reported once, by the launching process, not once per worker.
pub fn check_flags(args: &TrainArgs, launched: bool) -> Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let world = if args.strategy == StrategyKind::Ddp && !launched { args.workers } else { 1 };
    trainer::check_batch(args.batch_size, world)?;
    if world > 1 {
        // Every world the job may shrink to shares the same global batch.
        for fewer in launch::worlds(args.min_workers, world, "--workers")? {
            trainer::check_batch(args.batch_size, fewer).with_context(|| {
                format!("--min-workers {} may leave {fewer} worker(s)", args.min_workers.unwrap_or(world))
            })?;
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
    if args.comm_hook != CommHookKind::Mean && args.strategy != StrategyKind::Ddp {
        bail!("--comm-hook applies to --strategy ddp");
    }
    if args.power_sgd_rank == 0 {
        bail!("--power-sgd-rank must be at least 1");
    }
    if args.power_sgd_rank != 1 && args.comm_hook != CommHookKind::PowerSgd {
        bail!("--power-sgd-rank applies to --comm-hook power-sgd");
    }
    if args.shard_optimizer && args.strategy != StrategyKind::Ddp {
        bail!("--shard-optimizer applies to --strategy ddp");
    }
    if args.uneven_inputs && args.strategy != StrategyKind::Ddp {
        bail!("--uneven-inputs applies to --strategy ddp");
    }
    if args.uneven_inputs && (args.steps.is_some() || args.checkpoint_dir.is_some() || args.shard_optimizer) {
        bail!(
            "--uneven-inputs gives the workers different numbers of steps: leave out --steps, --checkpoint-dir \
             and --shard-optimizer, which count on the same steps everywhere"
        );
    }
    if args.sync_batch_norm && args.strategy != StrategyKind::Ddp {
        bail!("--sync-batch-norm applies to --strategy ddp");
    }
    if args.sync_batch_norm && args.model != ModelKind::Resnet {
        bail!("--sync-batch-norm needs a model with batch norm: --model resnet");
    }
    if !args.devices.is_empty() && args.backend != BackendKind::Wgpu {
        bail!("--devices applies to --backend wgpu");
    }
    if let Some(file) = &args.init {
        std::fs::File::open(file).with_context(|| format!("--init {}: cannot read the weights", file.display()))?;
    }
    Ok(())
}

//! What a training run is asked to do, and what it reports.

use std::path::PathBuf;

use bonfire_collective::TensorCollective;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use crate::model::ModelKind;

/// The optimizers `bonfire train` offers (`--optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerKind {
    /// SGD, with momentum when `--momentum` is not 0.
    Sgd,
    /// Adam.
    Adam,
}

/// How DDP averages each bucket of gradients (`--comm-hook`): the built-in
/// comm hooks of `bonfire_parallel::comm_hook`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CommHookKind {
    /// The plain mean, in f32.
    Mean,
    /// The mean with each bucket sent as bf16.
    Bf16,
    /// PowerSGD: each matrix sent as two factors of rank `--power-sgd-rank`.
    PowerSgd,
}

/// What one training run does; the command's flags, as the trainer takes them.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The network.
    pub model: ModelKind,
    /// Epochs to run (unless `max_steps` ends the run first).
    pub epochs: usize,
    /// Stop after this many steps in all (a smoke run).
    pub max_steps: Option<usize>,
    /// Samples per step over all workers.
    pub global_batch: usize,
    /// The optimizer.
    pub optimizer: OptimizerKind,
    /// The learning rate.
    pub lr: f64,
    /// SGD's momentum.
    pub momentum: f64,
    /// How DDP averages gradients (ignored by single-device and DP runs).
    pub comm_hook: CommHookKind,
    /// The rank of PowerSGD's factors (PyTorch's `matrix_approximation_rank`).
    pub power_sgd_rank: usize,
    /// Whether DDP's batch norm normalises with every rank's batch (SyncBatchNorm).
    pub sync_batch_norm: bool,
    /// Whether each DDP rank steps, and keeps optimizer state for, its shard of the parameters (ZeRO-1).
    pub shard_optimizer: bool,
    /// Whether each DDP rank trains its exact share of an epoch, joining the others' last steps.
    pub uneven_inputs: bool,
    /// The seed of the weights and of the data order.
    pub seed: u64,
    /// Whether each epoch visits the data in a new order.
    pub shuffle: bool,
    /// Whether rank 0 shows a progress bar.
    pub progress: bool,
    /// Where rank 0 writes a checkpoint after every epoch.
    pub checkpoint_dir: Option<PathBuf>,
    /// Also write one every this many steps.
    pub checkpoint_every: Option<usize>,
    /// Whether to continue from the newest checkpoint in `checkpoint_dir`.
    pub resume: Resume,
    /// Start from these weights (safetensors, PyTorch names).
    pub init: Option<PathBuf>,
    /// Write the final weights here (rank 0).
    pub save: Option<PathBuf>,
}

/// Whether a run starts from a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Start from the beginning.
    Never,
    /// From the newest checkpoint, or from the beginning when there is none
    /// yet (`--resume`, and every restarted job): so one command line serves
    /// a first start and its restarts alike.
    Newest,
}

/// How the work is spread.
pub enum Parallel<B: AutodiffBackend> {
    /// One device.
    Single,
    /// One process driving a replica on each of `devices`.
    Dp {
        /// The devices, the module's first.
        devices: Vec<B::Device>,
    },
    /// This worker is one rank of `comm`.
    Ddp {
        /// The group.
        comm: Box<dyn TensorCollective<B::InnerBackend>>,
    },
}

/// What one epoch measured.
#[derive(Debug, Clone, Serialize)]
pub struct EpochMetrics {
    /// The epoch, from 1.
    pub epoch: usize,
    /// Steps taken in it.
    pub steps: usize,
    /// Mean training loss of its steps, on this worker.
    pub train_loss: f64,
    /// Accuracy on the test split (rank 0 only; `None` elsewhere).
    pub test_accuracy: Option<f64>,
    /// Images (of the global batch) trained per second.
    pub images_per_sec: f64,
    /// Wall-clock seconds it took.
    pub seconds: f64,
}

/// The host's seconds in the phases of one step. On a GPU backend the
/// device runs behind the host: a phase is the time to queue its work, and
/// a wait shows where the host stops for the device (DDP's averaged
/// gradients in `gradients`, the loss in `read`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostPhases {
    /// Making the batch's tensors.
    pub data: f64,
    /// Forward, backward and the strategy's averaging of the gradients.
    pub gradients: f64,
    /// The optimizer's update.
    pub update: f64,
    /// Reading the step's loss.
    pub read: f64,
}

/// What a run measured, epoch by epoch and step by step.
#[derive(Default)]
pub struct Report {
    /// The rank that measured it.
    pub rank: usize,
    /// Every epoch's metrics.
    pub epochs: Vec<EpochMetrics>,
    /// (step, loss) of every step of this worker.
    pub step_losses: Vec<(usize, f64)>,
    /// Wall-clock seconds of every step of this worker, in order.
    pub step_seconds: Vec<f64>,
    /// Seconds since training began at the end of every step.
    pub step_ends: Vec<f64>,
    /// Where the host spent every step, in order.
    pub step_phases: Vec<HostPhases>,
    /// Bytes this rank's comm hook handed to collectives per step (DDP with
    /// `--comm-hook` other than the mean).
    pub hook_bytes_per_step: Option<f64>,
}

//! What a training run is asked to do, and what it reports.

use std::path::PathBuf;

use bonfire_collective::TensorCollective;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use crate::model::ModelKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub model: ModelKind,
    pub epochs: usize,
    /// Stop after this many steps in all (a smoke run).
    pub max_steps: Option<usize>,
    /// Samples per step over all workers.
    pub global_batch: usize,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub momentum: f64,
    pub seed: u64,
    pub shuffle: bool,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Start from the beginning.
    Never,
    /// From the newest checkpoint if there is one (a restarted job).
    IfAny,
    /// From the newest checkpoint, which must exist (`--resume`).
    Required,
}

/// How the work is spread.
pub enum Parallel<B: AutodiffBackend> {
    Single,
    /// One process driving a replica on each of `devices`.
    Dp {
        devices: Vec<B::Device>,
    },
    /// This worker is one rank of `comm`.
    Ddp {
        comm: Box<dyn TensorCollective<B::InnerBackend>>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub steps: usize,
    pub train_loss: f64,
    /// Accuracy on the test split (rank 0 only; `None` elsewhere).
    pub test_accuracy: Option<f64>,
    pub images_per_sec: f64,
    pub seconds: f64,
}

pub struct Report {
    pub rank: usize,
    pub epochs: Vec<EpochMetrics>,
    /// (step, loss) of every step of this worker.
    pub step_losses: Vec<(usize, f64)>,
    /// Wall-clock seconds of every step of this worker, in order.
    pub step_seconds: Vec<f64>,
}

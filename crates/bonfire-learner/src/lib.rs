//! burn-train's `Learner` trained with Bonfire's [`DistributedDataParallel`]:
//! a training strategy that a Learner-based program plugs in with one line.
//!
//! ```ignore
//! let training = SupervisedTraining::new(dir, train_loader, valid_loader)
//!     .metrics((LossMetric::new(),))
//!     .num_epochs(2)
//!     .with_training_strategy(DdpLearning::threads(vec![device0, device1]).into_strategy());
//! let result = training.launch(Learner::new(model, optimizer, lr));
//! ```
//!
//! Each worker trains on its own contiguous share of the training loader
//! (burn-train's `split_dataloader` for threads, the same slice by rank for
//! processes) with the loader's batch size, so the global batch is that size
//! times the number of workers. Gradients are averaged in buckets while the
//! backward pass of the model's own `TrainStep` runs (the gradients the step
//! returns are ignored: they are this worker's alone). Rank 0 processes
//! burn-train's events (metrics, renderer), validates and checkpoints.
//! Every step the ranks agree on whether to go on (any rank out of data, or
//! interrupted, stops them all), and after every epoch on early stopping,
//! so no rank is left waiting in a collective.
//!
//! burn-train's strategies cannot return an error, so a failed rank (a
//! peer gone, a timeout) can only panic inside `SupervisedTraining::launch`.
//! [`DdpLearning::launch`] runs the training instead and returns the failure
//! as a [`TrainingFailed`] that names the rank and the cause.
//!
//! [`DistributedDataParallel`]: bonfire_parallel::DistributedDataParallel
#![warn(missing_docs)]

mod worker;

use std::sync::{Arc, Mutex};

use bonfire_collective::{InProcCommunicator, TensorCollective};
use bonfire_parallel::{DdpConfig, HookBackend, ParallelError};
use burn::data::dataloader::split::split_dataloader;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Device;
use burn::train::{
    Learner, LearningComponentsTypes, LearningResult, SupervisedLearningStrategy, SupervisedTraining,
    SupervisedTrainingEventProcessor, TrainLoader, TrainingBackend, TrainingComponents, TrainingModel,
    TrainingStrategy, ValidLoader,
};

use worker::{Rank0, Shared};

/// The gradients' backend of a Learner's components.
type Inner<LC> = <TrainingBackend<LC> as AutodiffBackend>::InnerBackend;

/// A burn-train training strategy that trains with Bonfire's DDP.
pub struct DdpLearning<LC: LearningComponentsTypes> {
    workers: Workers<LC>,
    config: DdpConfig,
    /// Where a failed rank's error goes when [`DdpLearning::launch`] runs
    /// the training; None when the strategy was plugged in by hand.
    failure: Option<Arc<Mutex<Option<TrainingFailed>>>>,
}

/// DDP training through the Learner failed on `rank`.
#[derive(Debug, thiserror::Error)]
#[error("DDP training failed on rank {rank}: {cause}")]
pub struct TrainingFailed {
    /// The rank that failed (the first one, where several did).
    pub rank: usize,
    /// Why (part of the message, so a chain of errors names it once).
    pub cause: ParallelError,
}

enum Workers<LC: LearningComponentsTypes> {
    /// One worker thread per device, over an in-process group.
    Threads(Vec<Device<TrainingBackend<LC>>>),
    /// This process is one rank of `comm`; taken by the one training run.
    Process { device: Device<TrainingBackend<LC>>, comm: Mutex<Option<Box<dyn TensorCollective<Inner<LC>>>>> },
}

impl<LC: LearningComponentsTypes> DdpLearning<LC> {
    /// One worker thread per device in this process (a device may repeat).
    pub fn threads(devices: Vec<Device<TrainingBackend<LC>>>) -> Self {
        assert!(!devices.is_empty(), "DdpLearning::threads needs at least one device");
        DdpLearning { workers: Workers::Threads(devices), config: DdpConfig::default(), failure: None }
    }

    /// This process is one rank of `comm` (the TCP ring from the launcher's
    /// environment, NCCL, ...), training on `device`. Every rank runs the
    /// same program and launches its own Learner.
    pub fn process(comm: Box<dyn TensorCollective<Inner<LC>>>, device: Device<TrainingBackend<LC>>) -> Self {
        let workers = Workers::Process { device, comm: Mutex::new(Some(comm)) };
        DdpLearning { workers, config: DdpConfig::default(), failure: None }
    }

    /// DDP's options (buckets, overlap, comm hook).
    pub fn with_config(mut self, config: DdpConfig) -> Self {
        self.config = config;
        self
    }
}

impl<LC> DdpLearning<LC>
where
    LC: LearningComponentsTypes + Send + 'static,
    TrainingBackend<LC>: HookBackend,
{
    /// For `SupervisedTraining::with_training_strategy`. A rank that fails
    /// panics with its error, burn-train's strategies having no other way
    /// out; [`DdpLearning::launch`] returns the error instead.
    pub fn into_strategy(self) -> TrainingStrategy<LC> {
        TrainingStrategy::Custom(Arc::new(self))
    }

    /// `training.launch(learner)` with this strategy: the trained model, or
    /// the error of the rank that failed. After a failure no further epoch
    /// starts on any rank.
    pub fn launch(
        mut self,
        training: SupervisedTraining<LC>,
        learner: Learner<LC>,
    ) -> Result<LearningResult<LC::InferenceModel>, TrainingFailed> {
        let failure = Arc::new(Mutex::new(None));
        self.failure = Some(failure.clone());
        let result = training.with_training_strategy(self.into_strategy()).launch(learner);
        let failed = failure.lock().unwrap_or_else(|e| e.into_inner()).take();
        match failed {
            Some(failed) => Err(failed),
            None => Ok(result),
        }
    }
}

impl<LC> SupervisedLearningStrategy<LC> for DdpLearning<LC>
where
    LC: LearningComponentsTypes + Send + 'static,
    TrainingBackend<LC>: HookBackend,
{
    fn fit(
        &self,
        components: TrainingComponents<LC>,
        learner: Learner<LC>,
        dataloader_train: TrainLoader<LC>,
        dataloader_valid: ValidLoader<LC>,
        starting_epoch: usize,
    ) -> (TrainingModel<LC>, SupervisedTrainingEventProcessor<LC>) {
        let events = Mutex::new(components.event_processor);
        let shared = Shared {
            num_epochs: components.num_epochs,
            starting_epoch,
            grad_accumulation: components.grad_accumulation,
            interrupter: components.interrupter,
            event_store: components.event_store,
            events: &events,
            config: self.config.clone(),
        };
        let mut rank0 = Some(Rank0 {
            valid: dataloader_valid,
            checkpointer: components.checkpointer,
            early_stopping: components.early_stopping,
        });
        let untrained = learner.model();
        let trained = match &self.workers {
            Workers::Threads(devices) => {
                let comms =
                    InProcCommunicator::group(devices.len()).map_err(|e| TrainingFailed { rank: 0, cause: e.into() });
                comms.and_then(|comms| {
                    let loaders = split_dataloader(dataloader_train, devices);
                    let shared = &shared;
                    let results: Vec<_> = std::thread::scope(|s| {
                        let handles: Vec<_> = devices
                            .iter()
                            .zip(comms)
                            .zip(loaders)
                            .map(|((device, comm), loader)| {
                                let (learner, rank0) = (learner.clone(), rank0.take());
                                s.spawn(move || {
                                    worker::run(learner, device.clone(), Box::new(comm), loader, shared, rank0)
                                })
                            })
                            .collect();
                        handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| Err(panicked(panic)))).collect()
                    });
                    let mut model = None;
                    for (rank, result) in results.into_iter().enumerate() {
                        match result {
                            Ok(m) => model = model.or(Some(m)),
                            Err(cause) => return Err(TrainingFailed { rank, cause }),
                        }
                    }
                    Ok(model.expect("at least one worker"))
                })
            }
            Workers::Process { device, comm } => {
                let comm = comm.lock().unwrap_or_else(|e| e.into_inner()).take();
                let comm = comm.expect("a DdpLearning::process trains once");
                let (rank, world) = (comm.rank(), comm.world_size());
                let n = dataloader_train.num_items();
                let shard = dataloader_train.slice(rank * n / world, (rank + 1) * n / world).to_device(device);
                let rank0 = if rank == 0 { rank0.take() } else { None };
                worker::run(learner, device.clone(), comm, shard, &shared, rank0)
                    .map_err(|cause| TrainingFailed { rank, cause })
            }
        };
        let model = match (trained, &self.failure) {
            (Ok(model), _) => model,
            // burn-train still wants a model: the one training started from.
            (Err(failed), Some(slot)) => {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(failed);
                untrained
            }
            (Err(failed), None) => panic!("{failed}"),
        };
        (model, events.into_inner().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A worker thread's panic as an error.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> ParallelError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    ParallelError::Invalid(format!("the worker thread panicked: {message}"))
}

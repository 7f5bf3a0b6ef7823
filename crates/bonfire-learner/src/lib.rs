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
//! [`DistributedDataParallel`]: bonfire_parallel::DistributedDataParallel
#![warn(missing_docs)]

mod worker;

use std::sync::{Arc, Mutex};

use bonfire_collective::{InProcCommunicator, TensorCollective};
use bonfire_parallel::{DdpConfig, HookBackend};
use burn::data::dataloader::split::split_dataloader;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Device;
use burn::train::{
    Learner, LearningComponentsTypes, SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader,
    TrainingBackend, TrainingComponents, TrainingModel, TrainingStrategy, ValidLoader,
};

use worker::{Rank0, Shared};

/// The gradients' backend of a Learner's components.
type Inner<LC> = <TrainingBackend<LC> as AutodiffBackend>::InnerBackend;

/// A burn-train training strategy that trains with Bonfire's DDP.
pub struct DdpLearning<LC: LearningComponentsTypes> {
    workers: Workers<LC>,
    config: DdpConfig,
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
        DdpLearning { workers: Workers::Threads(devices), config: DdpConfig::default() }
    }

    /// This process is one rank of `comm` (the TCP ring from the launcher's
    /// environment, NCCL, ...), training on `device`. Every rank runs the
    /// same program and launches its own Learner.
    pub fn process(comm: Box<dyn TensorCollective<Inner<LC>>>, device: Device<TrainingBackend<LC>>) -> Self {
        DdpLearning { workers: Workers::Process { device, comm: Mutex::new(Some(comm)) }, config: DdpConfig::default() }
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
    /// For `SupervisedTraining::with_training_strategy`.
    pub fn into_strategy(self) -> TrainingStrategy<LC> {
        TrainingStrategy::Custom(Arc::new(self))
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
        let model = match &self.workers {
            Workers::Threads(devices) => {
                let comms = InProcCommunicator::group(devices.len()).expect("an in-process group of the devices");
                let loaders = split_dataloader(dataloader_train, devices);
                let shared = &shared;
                let results: Vec<_> = std::thread::scope(|s| {
                    let handles: Vec<_> = devices
                        .iter()
                        .zip(comms)
                        .zip(loaders)
                        .map(|((device, comm), loader)| {
                            let (learner, rank0) = (learner.clone(), rank0.take());
                            s.spawn(move || worker::run(learner, device.clone(), Box::new(comm), loader, shared, rank0))
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().expect("a DDP worker thread panicked")).collect()
                });
                let mut model = None;
                for (rank, result) in results.into_iter().enumerate() {
                    match result {
                        Ok(m) => model = model.or(Some(m)),
                        Err(e) => panic!("DDP training failed on rank {rank}: {e}"),
                    }
                }
                model.expect("at least one worker")
            }
            Workers::Process { device, comm } => {
                let comm = comm.lock().expect("not poisoned").take().expect("a DdpLearning::process trains once");
                let (rank, world) = (comm.rank(), comm.world_size());
                let n = dataloader_train.num_items();
                let shard = dataloader_train.slice(rank * n / world, (rank + 1) * n / world).to_device(device);
                let rank0 = if rank == 0 { rank0.take() } else { None };
                worker::run(learner, device.clone(), comm, shard, &shared, rank0)
                    .unwrap_or_else(|e| panic!("DDP training failed on rank {rank}: {e}"))
            }
        };
        (model, events.into_inner().expect("not poisoned"))
    }
}

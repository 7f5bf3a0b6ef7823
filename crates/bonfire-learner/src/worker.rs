//! One DDP rank of a Learner's training: its epochs, and on rank 0 the
//! events, validation and checkpoints.

use std::sync::{Arc, Mutex};

use bonfire_collective::TensorCollective;
use bonfire_parallel::{DdpConfig, DistributedDataParallel, HookBackend, ParallelError};
use burn::data::dataloader::Progress;
use burn::module::{AutodiffModule, Module};
use burn::tensor::Device;
use burn::train::metric::store::EventStoreClient;
use burn::train::{
    CloneEarlyStoppingStrategy, EventProcessorTraining, InferenceStep, Interrupter, Learner, LearnerEvent,
    LearningCheckpointer, LearningComponentsTypes, SupervisedTrainingEventProcessor, TrainLoader, TrainStep,
    TrainingBackend, TrainingItem, TrainingModel, ValidLoader,
};

use crate::Inner;

/// What every rank shares.
pub(crate) struct Shared<'a, LC: LearningComponentsTypes> {
    pub num_epochs: usize,
    /// The first epoch to train (1-based; later when resuming).
    pub starting_epoch: usize,
    pub grad_accumulation: Option<usize>,
    pub interrupter: Interrupter,
    pub event_store: Arc<EventStoreClient>,
    /// burn-train's metrics and renderer; only rank 0 sends them events.
    pub events: &'a Mutex<SupervisedTrainingEventProcessor<LC>>,
    pub config: DdpConfig,
}

/// What only rank 0 does: validation, checkpoints, early stopping.
pub(crate) struct Rank0<LC: LearningComponentsTypes> {
    pub valid: ValidLoader<LC>,
    pub checkpointer: Option<LearningCheckpointer<LC>>,
    pub early_stopping: Option<Box<dyn CloneEarlyStoppingStrategy>>,
}

/// Trains `learner` as one rank of `comm` on `train` (this rank's share)
/// and returns the trained model.
pub(crate) fn run<LC>(
    mut learner: Learner<LC>,
    device: Device<TrainingBackend<LC>>,
    comm: Box<dyn TensorCollective<Inner<LC>>>,
    train: TrainLoader<LC>,
    shared: &Shared<'_, LC>,
    mut rank0: Option<Rank0<LC>>,
) -> Result<TrainingModel<LC>, ParallelError>
where
    LC: LearningComponentsTypes,
    TrainingBackend<LC>: HookBackend,
{
    learner.fork(&device);
    let (mut ddp, model) = DistributedDataParallel::new(learner.model(), comm, shared.config.clone())?;
    // Every rank starts from rank 0's weights.
    learner.load_model(model.into_record());
    let valid = rank0.as_ref().map(|r| r.valid.to_device(&device));
    for epoch in shared.starting_epoch..=shared.num_epochs {
        let global = Progress::new(epoch, shared.num_epochs);
        let finished = train_epoch(&mut learner, &mut ddp, &train, &global, shared, rank0.is_some())?;
        if !finished {
            if rank0.is_some() {
                let reason = shared.interrupter.get_message().unwrap_or_else(|| "Reason unknown".into());
                log::info!("Training interrupted: {reason}");
            }
            break;
        }
        let mut stop = false;
        if let (Some(rank0), Some(valid)) = (&mut rank0, &valid) {
            validate(&learner, valid, &global, shared);
            if let Some(checkpointer) = &mut rank0.checkpointer {
                checkpointer.checkpoint(&learner, epoch, &shared.event_store);
            }
            stop = rank0.early_stopping.as_mut().is_some_and(|e| e.should_stop(epoch, &shared.event_store));
        }
        if ddp.any_rank(stop)? {
            break;
        }
    }
    Ok(learner.model())
}

/// One epoch of DDP steps on this rank's share. Returns false when
/// interrupted.
fn train_epoch<LC>(
    learner: &mut Learner<LC>,
    ddp: &mut DistributedDataParallel<TrainingBackend<LC>>,
    train: &TrainLoader<LC>,
    global: &Progress,
    shared: &Shared<'_, LC>,
    is_rank0: bool,
) -> Result<bool, ParallelError>
where
    LC: LearningComponentsTypes,
    TrainingBackend<LC>: HookBackend,
{
    // burn-train's experiment log gets the lines its single-device strategy writes.
    if is_rank0 {
        log::info!("Executing training step for epoch {}", global.items_processed);
    }
    let world = ddp.world_size();
    let mut iterator = train.iter();
    let (mut iteration, mut accumulated) = (0, 0);
    loop {
        // The shares may differ by a batch: the ranks stop together when
        // the first runs out (or is interrupted).
        let item = iterator.next();
        let interrupted = shared.interrupter.should_stop();
        if ddp.any_rank(item.is_none() || interrupted)? {
            if is_rank0 {
                let mut events = shared.events.lock().expect("not poisoned");
                events.process_train(LearnerEvent::EndEpoch(global.items_processed));
            }
            return Ok(!ddp.any_rank(interrupted)?);
        }
        let item = item.expect("checked above");
        iteration += 1;
        learner.lr_step();
        if is_rank0 {
            log::info!("Iteration {iteration}");
        }
        let hooked = ddp.forward_module(&learner.model());
        let mut output = None;
        accumulated += 1;
        if shared.grad_accumulation.is_none_or(|n| accumulated >= n) {
            let grads = ddp.backward_with(|| output = Some(hooked.step(item)))?;
            learner.optimizer_step(grads);
            accumulated = 0;
        } else {
            ddp.backward_no_sync_with(|| output = Some(hooked.step(item)))?;
        }
        if is_rank0 {
            let output = output.expect("the step ran");
            let mut progress = iterator.progress();
            progress.items_processed *= world;
            progress.items_total *= world;
            let item =
                TrainingItem::new(output.item, progress, global.clone(), Some(iteration), Some(learner.lr_current()));
            shared.events.lock().expect("not poisoned").process_train(LearnerEvent::ProcessedItem(item));
        }
    }
}

/// Rank 0's validation pass, reported to burn-train's metrics.
fn validate<LC: LearningComponentsTypes>(
    learner: &Learner<LC>,
    valid: &ValidLoader<LC>,
    global: &Progress,
    shared: &Shared<'_, LC>,
) {
    log::info!("Executing validation step for epoch {}", global.items_processed);
    let model = learner.model().valid();
    let mut events = shared.events.lock().expect("not poisoned");
    let mut iterator = valid.iter();
    let mut iteration = 0;
    while let Some(item) = iterator.next() {
        iteration += 1;
        let output = model.step(item);
        let item = TrainingItem::new(output, iterator.progress(), global.clone(), Some(iteration), None);
        events.process_valid(LearnerEvent::ProcessedItem(item));
        if shared.interrupter.should_stop() {
            break;
        }
    }
    events.process_valid(LearnerEvent::EndEpoch(global.items_processed));
}

//! What a run carries across a restart: resuming from the newest
//! checkpoint, and writing one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bonfire_parallel::HookBackend;
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};

use super::batch::ensure_finite;
use super::config::{Resume, TrainOptions};
use crate::checkpoint::{self, Checkpoint, Position};
use crate::model::TrainableClassifier;

fn recorder() -> NamedMpkBytesRecorder<FullPrecisionSettings> {
    NamedMpkBytesRecorder::default()
}

/// Where a run starts: at the beginning, or where the checkpoint it resumed
/// from left off.
pub(super) struct Start<M, O> {
    pub model: M,
    pub opt: O,
    pub position: Position,
    /// The checkpoint, when there was one.
    pub from: Option<PathBuf>,
}

/// `model` and `opt` as the newest checkpoint left them, when the options
/// ask to resume and there is one.
pub(super) fn resume<B: HookBackend, M: TrainableClassifier<B>, O: Optimizer<M, B>>(
    options: &TrainOptions,
    device: &B::Device,
    mut model: M,
    mut opt: O,
) -> Result<Start<M, O>> {
    let beginning = Position { epoch: 0, step_in_epoch: 0, steps_done: 0 };
    if options.resume == Resume::Never {
        return Ok(Start { model, opt, position: beginning, from: None });
    }
    let dir = options.checkpoint_dir.as_deref().context("--resume needs --checkpoint-dir")?;
    let Some((ckpt, file)) = checkpoint::load(dir)? else {
        eprintln!("no checkpoint in {} yet: starting from the beginning", dir.display());
        return Ok(Start { model, opt, position: beginning, from: None });
    };
    let model_record = recorder()
        .load(ckpt.model, device)
        .map_err(|e| anyhow::anyhow!("the checkpoint {} does not hold a {}: {e:?}", file.display(), options.model))?;
    model = model.load_record(model_record);
    let opt_record = recorder().load(ckpt.optimizer, device).map_err(|e| {
        anyhow::anyhow!("the checkpoint {} does not hold this optimizer's state: {e:?}", file.display())
    })?;
    opt = opt.load_record(opt_record);
    Ok(Start { model, opt, position: ckpt.position, from: Some(file) })
}

/// Says where a resumed run continues.
pub(super) fn announce(position: Position, file: &Path) {
    let Position { epoch, step_in_epoch, steps_done } = position;
    if step_in_epoch == 0 {
        eprintln!("resuming after epoch {epoch} from {}", file.display());
    } else {
        eprintln!(
            "resuming in epoch {} after its step {step_in_epoch} ({steps_done} steps done) from {}",
            epoch + 1,
            file.display()
        );
    }
}

/// Rank 0's checkpoint of `model` and the optimizer state `opt` at
/// `position`, refused when the weights hold a non-finite number (the
/// previous checkpoints stay).
pub(super) fn save<B: HookBackend, M: TrainableClassifier<B>, O: Optimizer<M, B>>(
    dir: &Path,
    position: Position,
    model: &M,
    opt: O::Record,
) -> Result<()> {
    ensure_finite(model, "checkpoint")?;
    let to_bytes = |e| anyhow::anyhow!("encoding the checkpoint: {e:?}");
    let ckpt = Checkpoint {
        position,
        model: recorder().record(model.clone().into_record(), ()).map_err(to_bytes)?,
        optimizer: recorder().record(opt, ()).map_err(to_bytes)?,
    };
    checkpoint::save(dir, &ckpt)?;
    Ok(())
}

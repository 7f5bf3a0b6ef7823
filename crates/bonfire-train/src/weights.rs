//! Weights in safetensors, named and laid out as PyTorch's `state_dict` of
//! the same LeNet (`conv1.weight`, ..., `fc3.bias`; linear weights as
//! [out, in]), so that weights move between Bonfire and PyTorch.

use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};

/// Loads every parameter of `model` from `file`; a missing, misshapen or
/// unexpected tensor is an error naming it.
pub fn init<B: Backend, M: Module<B>>(mut model: M, file: &Path) -> Result<M> {
    if !file.is_file() {
        bail!("--init {}: no such file", file.display());
    }
    let mut store = SafetensorsStore::from_file(file).with_from_adapter(PyTorchToBurnAdapter).allow_partial(true);
    let result = model.load_from(&mut store).map_err(|e| anyhow::anyhow!("--init {}: {e}", file.display()))?;
    let mut problems = Vec::new();
    if !result.errors.is_empty() {
        problems.push(format!("{:?}", result.errors));
    }
    if !result.missing.is_empty() {
        let names: Vec<&str> = result.missing.iter().map(|(n, _)| n.as_str()).collect();
        problems.push(format!("missing tensors: {}", names.join(", ")));
    }
    if !result.unused.is_empty() {
        problems.push(format!("tensors this model does not have: {}", result.unused.join(", ")));
    }
    if !problems.is_empty() {
        bail!("--init {}: {}", file.display(), problems.join("; "));
    }
    Ok(model)
}

/// Writes `model` to `file` (through a temporary file and a rename).
pub fn save<B: Backend, M: Module<B>>(model: &M, file: &Path) -> Result<()> {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = file.with_extension("safetensors.tmp");
    let mut store = SafetensorsStore::from_file(&tmp).with_to_adapter(BurnToPyTorchAdapter);
    model.save_into(&mut store).map_err(|e| anyhow::anyhow!("--save {}: {e}", file.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("--save: renaming into {}", file.display()))?;
    Ok(())
}

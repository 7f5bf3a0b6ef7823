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

/// The largest |a - b| of every tensor of two weight files (f32), by name;
/// an error when their names or shapes differ.
pub fn diff(a: &Path, b: &Path) -> Result<Vec<(String, f64)>> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let (bytes_a, bytes_b) = (read(a)?, read(b)?);
    fn parse<'a>(bytes: &'a [u8], p: &Path) -> Result<safetensors::SafeTensors<'a>> {
        safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a safetensors file: {e}", p.display()))
    }
    let (ta, tb) = (parse(&bytes_a, a)?, parse(&bytes_b, b)?);
    let mut names = ta.names();
    names.sort();
    let mut other = tb.names();
    other.sort();
    if names != other {
        bail!("{} and {} hold different tensors: {names:?} and {other:?}", a.display(), b.display());
    }
    let floats = |t: &safetensors::tensor::TensorView<'_>, name: &str| -> Result<Vec<f32>> {
        if t.dtype() != safetensors::Dtype::F32 {
            bail!("{name} is {:?}, not F32", t.dtype());
        }
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    };
    names
        .into_iter()
        .map(|name| {
            let (x, y) = (ta.tensor(name)?, tb.tensor(name)?);
            if x.shape() != y.shape() {
                bail!("{name} has shape {:?} in one file and {:?} in the other", x.shape(), y.shape());
            }
            let worst =
                floats(&x, name)?.iter().zip(floats(&y, name)?).map(|(p, q)| (p - q).abs() as f64).fold(0.0, f64::max);
            Ok((name.to_string(), worst))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(file: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let bytes: Vec<Vec<u8>> =
            tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views: Vec<_> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                (*name, safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).unwrap())
            })
            .collect();
        std::fs::write(file, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    #[test]
    fn diff_finds_the_largest_difference_of_each_tensor_and_refuses_other_layouts() {
        let dir = std::env::temp_dir().join(format!("bonfire-diff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, c) = (dir.join("a.safetensors"), dir.join("b.safetensors"), dir.join("c.safetensors"));
        write(&a, &[("w", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]), ("b", vec![1], vec![0.5])]);
        write(&b, &[("w", vec![2, 2], vec![1.0, 2.25, 3.0, 3.0]), ("b", vec![1], vec![0.5])]);
        write(&c, &[("w", vec![4], vec![1.0, 2.0, 3.0, 4.0]), ("b", vec![1], vec![0.5])]);
        assert_eq!(diff(&a, &b).unwrap(), vec![("b".to_string(), 0.0), ("w".to_string(), 1.0)]);
        let err = diff(&a, &c).unwrap_err().to_string();
        assert!(err.contains("w has shape [2, 2]"), "{err}");
    }
}

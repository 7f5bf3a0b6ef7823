//! Weights in safetensors, named and laid out as PyTorch's `state_dict` of
//! the same network (`conv1.weight`, ..., `fc3.bias`; linear weights as
//! [out, in]; batch norm's scale and shift as `weight` and `bias`, with its
//! `running_mean`, `running_var` and `num_batches_tracked`), so that weights
//! move between Bonfire and PyTorch for every model.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::DType;
use burn_store::{
    ApplyError, BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
};

/// How PyTorch names the tensors of a model where Burn names them otherwise.
struct TorchNaming {
    /// (Burn's path, PyTorch's name) of every tensor whose names differ:
    /// batch norm's `gamma` and `beta` are PyTorch's `weight` and `bias`.
    renamed: Vec<(String, String)>,
    /// The path of every batch norm, where PyTorch also keeps a
    /// `num_batches_tracked` counter that Burn does not have.
    batch_norms: Vec<String>,
}

fn torch_naming<B: Backend, M: Module<B>>(model: &M) -> TorchNaming {
    // Burn's own PyTorch adapter knows which modules rename what; collecting
    // with and without it pairs every Burn path with its PyTorch name.
    let burn = model.collect(None, None, false);
    let torch = model.collect(None, Some(Box::new(BurnToPyTorchAdapter)), false);
    let mut naming = TorchNaming { renamed: Vec::new(), batch_norms: Vec::new() };
    for (b, t) in burn.iter().zip(&torch) {
        let (burn_path, torch_path) = (b.full_path(), t.full_path());
        if burn_path != torch_path {
            naming.renamed.push((burn_path.clone(), torch_path));
        }
        if b.module_type().is_some_and(|m| m.ends_with(":BatchNorm")) {
            let parent = burn_path.rsplit_once('.').map_or("", |(p, _)| p).to_string();
            if !naming.batch_norms.contains(&parent) {
                naming.batch_norms.push(parent);
            }
        }
    }
    naming
}

fn counter_name(batch_norm: &str) -> String {
    if batch_norm.is_empty() {
        "num_batches_tracked".into()
    } else {
        format!("{batch_norm}.num_batches_tracked")
    }
}

/// Loads every tensor of `model` (parameters and batch-norm statistics) from
/// `file`, written by [`save`] or by PyTorch; a missing, misshapen or
/// unexpected tensor is an error naming it. PyTorch's `num_batches_tracked`
/// is accepted and ignored: Burn's batch norm has no such counter.
pub fn init<B: Backend, M: Module<B>>(mut model: M, file: &Path) -> Result<M> {
    if !file.is_file() {
        bail!("--init {}: no such file", file.display());
    }
    // A batch-norm update still pending from an earlier forward pass would
    // otherwise replace the loaded statistics later.
    bonfire_parallel::settle_buffers::<B, M>(&model);
    let naming = torch_naming::<B, M>(&model);
    let exact = |name: &str| format!("^{}$", name.replace('.', r"\."));
    let remapper =
        KeyRemapper::from_patterns(naming.renamed.iter().map(|(burn, torch)| (exact(torch), burn.clone())).collect())
            .context("building the PyTorch-to-Burn name map")?;
    let mut store = SafetensorsStore::from_file(file)
        .remap(remapper)
        .with_from_adapter(PyTorchToBurnAdapter)
        .allow_partial(true)
        .validate(false);
    let result = model.load_from(&mut store).map_err(|e| anyhow::anyhow!("--init {}: {e}", file.display()))?;
    let counters: Vec<String> = naming.batch_norms.iter().map(|b| counter_name(b)).collect();
    let torch_name: HashMap<&str, &str> = naming.renamed.iter().map(|(b, t)| (b.as_str(), t.as_str())).collect();
    let named = |burn: &str| torch_name.get(burn).copied().unwrap_or(burn).to_string();
    let mut problems: Vec<String> = result
        .errors
        .iter()
        .map(|e| match e {
            ApplyError::ShapeMismatch { path, expected, found } => {
                format!(
                    "{} has shape {:?} in the file, {:?} in the model",
                    named(path),
                    found.to_vec(),
                    expected.to_vec()
                )
            }
            ApplyError::DTypeMismatch { path, .. }
            | ApplyError::AdapterError { path, .. }
            | ApplyError::LoadError { path, .. } => format!("{}: {e}", named(path)),
        })
        .collect();
    if !result.missing.is_empty() {
        let names: Vec<String> = result.missing.iter().map(|(n, _)| named(n)).collect();
        problems.push(format!("missing tensors: {}", names.join(", ")));
    }
    let unused: Vec<&str> = result.unused.iter().filter(|n| !counters.contains(n)).map(String::as_str).collect();
    if !unused.is_empty() {
        problems.push(format!("tensors this model does not have: {}", unused.join(", ")));
    }
    if !problems.is_empty() {
        bail!("--init {}: {}", file.display(), problems.join("; "));
    }
    Ok(model)
}

/// Writes `model` to `file` with PyTorch's names, such that PyTorch's
/// `load_state_dict(..., strict=True)` accepts it for the same network
/// (`num_batches_tracked` is written as 0: Burn does not count batches, and
/// PyTorch reads the counter only for a batch norm without momentum).
/// Written through a temporary file, fsync and rename, so that an
/// interrupted write leaves any earlier file whole.
pub fn save<B: Backend, M: Module<B>>(model: &M, file: &Path) -> Result<()> {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    bonfire_parallel::settle_buffers::<B, M>(model);
    let naming = torch_naming::<B, M>(model);
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for snapshot in model.collect(None, Some(Box::new(BurnToPyTorchAdapter)), false) {
        let name = snapshot.full_path();
        let data = snapshot.to_data().map_err(|e| anyhow::anyhow!("--save: reading {name}: {e:?}"))?;
        let dtype = match data.dtype {
            DType::F64 => safetensors::Dtype::F64,
            DType::F32 | DType::Flex32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::I64 => safetensors::Dtype::I64,
            DType::I32 => safetensors::Dtype::I32,
            other => bail!("--save: {name} is {other:?}, which the file format here does not take"),
        };
        tensors.push((name, dtype, data.shape.to_vec(), data.as_bytes().to_vec()));
    }
    for batch_norm in &naming.batch_norms {
        tensors.push((counter_name(batch_norm), safetensors::Dtype::I64, Vec::new(), 0i64.to_le_bytes().to_vec()));
    }
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map_err(|e| anyhow::anyhow!("--save: {name}: {e}"))?;
            Ok((name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata =
        HashMap::from([("format".to_string(), "pt".to_string()), ("producer".to_string(), "bonfire".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| anyhow::anyhow!("--save: {e}"))?;
    let tmp = file.with_extension("safetensors.tmp");
    let mut out = std::fs::File::create(&tmp).with_context(|| format!("--save: creating {}", tmp.display()))?;
    out.write_all(&bytes)
        .and_then(|()| out.sync_all())
        .with_context(|| format!("--save: writing {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("--save: renaming into {}", file.display()))?;
    Ok(())
}

/// The largest |a - b| of every tensor of two weight files (f32), by name;
/// an error when their names or shapes differ. A NaN or an infinity in one
/// file where the other has another value is an infinite difference; NaN
/// against NaN is one too, unless `nan_equal`.
pub fn diff(a: &Path, b: &Path, nan_equal: bool) -> Result<Vec<(String, f64)>> {
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
    // The weights are F32; batch norm's `num_batches_tracked` is I64.
    let values = |t: &safetensors::tensor::TensorView<'_>, name: &str| -> Result<Vec<f64>> {
        let data = t.data();
        Ok(match t.dtype() {
            safetensors::Dtype::F32 => {
                data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64).collect()
            }
            safetensors::Dtype::I64 => {
                data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64).collect()
            }
            other => bail!("{name} is {other:?}, not F32 or I64"),
        })
    };
    names
        .into_iter()
        .map(|name| {
            let (x, y) = (ta.tensor(name)?, tb.tensor(name)?);
            if x.shape() != y.shape() {
                bail!("{name} has shape {:?} in one file and {:?} in the other", x.shape(), y.shape());
            }
            if x.dtype() != y.dtype() {
                bail!("{name} is {:?} in one file and {:?} in the other", x.dtype(), y.dtype());
            }
            let worst = values(&x, name)?
                .iter()
                .zip(values(&y, name)?)
                .map(|(&p, q)| difference(p, q, nan_equal))
                .fold(0.0, f64::max);
            Ok((name.to_string(), worst))
        })
        .collect()
}

/// |p - q|, never NaN: equal values (equal infinities too) differ by 0, and
/// any other pair with a NaN or an infinity by infinity.
fn difference(p: f64, q: f64, nan_equal: bool) -> f64 {
    if p == q || (nan_equal && p.is_nan() && q.is_nan()) {
        return 0.0;
    }
    let d = (p - q).abs();
    if d.is_finite() {
        d
    } else {
        f64::INFINITY
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Classifier, LeNet, ResNet};
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, Tensor};

    type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

    fn read(file: &Path) -> Tensors {
        let bytes = std::fs::read(file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Tensors =
            st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("bonfire-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    /// A ResNet whose batch norms have seen a batch, so that none of its
    /// running statistics is the default.
    fn trained_resnet(seed: u64) -> ResNet<Autodiff<Flex>> {
        let device = Default::default();
        <Autodiff<Flex> as burn::tensor::backend::Backend>::seed(&device, seed);
        let model = ResNet::new(1, 10, &device);
        let x = Tensor::random([4, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
        drop(model.forward(x));
        model
    }

    #[test]
    fn every_model_round_trips_bit_exactly() {
        let device = Default::default();
        let (a, b) = (temp("lenet-a.safetensors"), temp("lenet-b.safetensors"));
        save(&LeNet::<Flex>::new(1, 28, 10, &device), &a).unwrap();
        save(&init(LeNet::<Flex>::new(1, 28, 10, &device), &a).unwrap(), &b).unwrap();
        assert_eq!(read(&a), read(&b));
        assert_eq!(read(&a).len(), 10);

        let (a, b) = (temp("resnet-a.safetensors"), temp("resnet-b.safetensors"));
        save(&trained_resnet(1), &a).unwrap();
        save(&init(trained_resnet(2), &a).unwrap(), &b).unwrap();
        assert_eq!(read(&a), read(&b));
        let names: Vec<String> = read(&a).into_iter().map(|t| t.0).collect();
        for name in ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"] {
            assert!(names.contains(&name.to_string()), "{name} not in {names:?}");
        }
        assert!(names.contains(&"layer2.downsample_bn.running_var".to_string()), "{names:?}");
    }

    /// resnet_torch.safetensors is PyTorch's `state_dict` of the same network
    /// (tests/fixtures/resnet_torch.py made it): it loads, and saves again
    /// with the same names, shapes and values, but for the batch counters.
    #[test]
    fn pytorch_state_dict_of_the_resnet_loads_and_saves_unchanged() {
        // The manifest directory at run time: a build folder shared by two clones
        // may run this test compiled in the other one.
        let fixture =
            Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("tests/fixtures/resnet_torch.safetensors");
        let out = temp("resnet-from-torch.safetensors");
        save(&init(ResNet::<Flex>::new(1, 10, &Default::default()), &fixture).unwrap(), &out).unwrap();
        let (theirs, ours) = (read(&fixture), read(&out));
        assert_eq!(theirs.len(), 56);
        for (t, o) in theirs.iter().zip(&ours) {
            assert_eq!((&t.0, t.1, &t.2), (&o.0, o.1, &o.2), "name, dtype or shape differ");
            if t.0.ends_with("num_batches_tracked") {
                assert_eq!(o.3, 0i64.to_le_bytes(), "{}", o.0);
            } else {
                assert_eq!(t.3, o.3, "{} differs", t.0);
            }
        }
    }

    #[test]
    fn a_file_of_another_network_is_refused_naming_the_tensors() {
        let device = Default::default();
        let lenet = temp("lenet-for-resnet.safetensors");
        save(&LeNet::<Flex>::new(1, 28, 10, &device), &lenet).unwrap();
        let err = init(ResNet::<Flex>::new(1, 10, &device), &lenet).unwrap_err().to_string();
        assert!(err.contains("conv1.weight has shape [6, 1, 5, 5] in the file, [16, 1, 3, 3] in the model"), "{err}");
        assert!(
            err.contains("missing tensors: ") && err.contains("bn1.weight") && err.contains("layer1.conv1.weight"),
            "{err}"
        );
        assert!(err.contains("tensors this model does not have: conv1.bias, conv2.bias"), "{err}");
        assert!(!err.contains("gamma"), "Burn's names leak into the message: {err}");
    }

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
        assert_eq!(diff(&a, &b, false).unwrap(), vec![("b".to_string(), 0.0), ("w".to_string(), 1.0)]);
        let err = diff(&a, &c, false).unwrap_err().to_string();
        assert!(err.contains("w has shape [2, 2]"), "{err}");
    }

    #[test]
    fn a_nan_or_an_infinity_in_one_file_only_is_an_infinite_difference() {
        let dir = std::env::temp_dir().join(format!("bonfire-diff-nan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, w: Vec<f32>| {
            let path = dir.join(name);
            write(&path, &[("w", vec![3], w), ("b", vec![1], vec![0.5])]);
            path
        };
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        let plain = file("plain.safetensors", vec![1.0, 2.0, 3.0]);
        let with_nan = file("nan.safetensors", vec![1.0, nan, 3.0]);
        let with_inf = file("inf.safetensors", vec![1.0, 2.0, inf]);
        let worst = |a: &Path, b: &Path, nan_equal: bool| diff(a, b, nan_equal).unwrap()[1].1;
        assert_eq!(worst(&plain, &with_nan, false), f64::INFINITY);
        assert_eq!(
            worst(&with_nan, &plain, true),
            f64::INFINITY,
            "NaN against a number differs even when NaNs are equal"
        );
        assert_eq!(worst(&plain, &with_inf, false), f64::INFINITY);
        assert_eq!(worst(&with_inf, &with_inf, false), 0.0, "equal infinities are equal");
        assert_eq!(worst(&with_nan, &with_nan, false), f64::INFINITY, "NaN is not NaN unless asked");
        assert_eq!(worst(&with_nan, &with_nan, true), 0.0);
    }
}

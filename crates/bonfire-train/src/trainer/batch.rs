//! Batches as tensors, and the checks around them: batch sizes, finite
//! weights, accuracy.

use anyhow::{bail, Result};
use bonfire_data::ImageDataset;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use crate::model::Classifier;

/// The global batch is split evenly over the `world` workers.
pub fn check_batch(global_batch: usize, world: usize) -> Result<()> {
    if global_batch == 0 || global_batch % world != 0 {
        bail!("--batch-size {global_batch} must be a positive multiple of the {world} workers");
    }
    Ok(())
}

/// Refuses to write `what` from weights that hold a NaN or an infinity.
pub(super) fn ensure_finite<B: Backend, M: Module<B>>(model: &M, what: &str) -> Result<()> {
    struct Finite(Option<String>);
    impl<B: Backend> ModuleVisitor<B> for Finite {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            // A NaN or an infinity anywhere makes the sum one.
            let bad = !param.val().sum().into_scalar().elem::<f64>().is_finite();
            if bad && self.0.is_none() {
                self.0 = Some(format!("{:?}", param.id));
            }
        }
    }
    let mut check = Finite(None);
    model.visit(&mut check);
    match check.0 {
        Some(id) => bail!("not writing the {what}: the weights hold a NaN or an infinity (parameter {id})"),
        None => Ok(()),
    }
}

pub(super) fn loss_value<B: Backend>(loss: &Tensor<B, 1>) -> f64 {
    loss.clone().into_scalar().elem::<f64>()
}

pub(super) fn to_tensors<B: Backend>(
    data: &ImageDataset,
    indices: &[usize],
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let (x, y) = data.batch(indices);
    let n = indices.len();
    let x = Tensor::from_data(TensorData::new(x, [n, data.channels, data.height, data.width]), device);
    let y = Tensor::from_data(TensorData::new(y, [n]), device);
    (x, y)
}

/// Fraction of `data` that `model` classifies correctly.
pub fn accuracy<B: Backend, M: Classifier<B>>(model: &M, data: &ImageDataset, device: &B::Device) -> f64 {
    let mut correct = 0usize;
    let all: Vec<usize> = (0..data.len()).collect();
    for chunk in all.chunks(1000) {
        let (x, y) = to_tensors::<B>(data, chunk, device);
        let predicted = model.forward(x).argmax(1).reshape([chunk.len()]);
        let hits: i64 = predicted.equal(y).int().sum().into_scalar().elem::<i64>();
        correct += hits as usize;
    }
    correct as f64 / data.len().max(1) as f64
}

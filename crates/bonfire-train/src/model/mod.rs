//! The models `bonfire train` can train, behind one trait so that the trainer
//! is written once.

mod lenet;
mod resnet;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

pub use lenet::LeNet;
pub use resnet::ResNet;

/// An image classifier: [batch, channels, height, width] to logits [batch, classes].
pub trait Classifier<B: Backend>: Module<B> {
    /// Logits `[batch, classes]` of images `[batch, channels, height, width]`.
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2>;
}

/// A classifier that trains: its inference copy classifies too.
pub trait TrainableClassifier<B: AutodiffBackend>:
    Classifier<B> + AutodiffModule<B, InnerModule: Classifier<B::InnerBackend>> + 'static
{
}

impl<B: AutodiffBackend, M> TrainableClassifier<B> for M where
    M: Classifier<B> + AutodiffModule<B, InnerModule: Classifier<B::InnerBackend>> + 'static
{
}

/// The models `bonfire train` trains (`--model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelKind {
    /// The seed article's LeNet (62 k parameters).
    Lenet,
    /// A small ResNet: 3 stages of one basic block, 16/32/64 channels, batch norm (78 k parameters).
    Resnet,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Lenet => "LeNet",
            ModelKind::Resnet => "ResNet",
        })
    }
}

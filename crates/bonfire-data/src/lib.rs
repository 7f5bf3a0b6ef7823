//! Data for Bonfire's trainer: Fashion-MNIST (IDX, raw or gzipped),
//! CIFAR-10 (binary batches), a synthetic set, and the distributed sampler.
#![warn(missing_docs)]

pub mod cifar;
mod dataset;
mod error;
pub mod fashion_mnist;
pub mod idx;
mod sampler;
pub mod synthetic;

pub use dataset::ImageDataset;
pub use error::{DataError, Result};
pub use fashion_mnist::Split;
pub use sampler::DistributedSampler;

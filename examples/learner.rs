//! burn-train's `Learner` with Bonfire's DistributedDataParallel as its
//! training strategy: a Learner-based program changes one line (marked
//! `// DDP`).
//!
//!     cargo run --example learner
//!
//! Two worker threads, each on its half of a synthetic task (is the sum of
//! the inputs positive?), gradients averaged every step; rank 0 logs
//! burn-train's metrics (to `target/learner-example/`) and validates.

use std::sync::Arc;

use bonfire::learner::DdpLearning;
use burn::backend::{Autodiff, Flex};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::AdamConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{activation::relu, Int, Tensor, TensorData};
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep};

type B = Autodiff<Flex>;

const FEATURES: usize = 16;

#[derive(Module, Debug)]
struct Net<B: Backend> {
    hidden: Linear<B>,
    out: Linear<B>,
}

impl<B: Backend> Net<B> {
    fn new(device: &B::Device) -> Self {
        Net { hidden: LinearConfig::new(FEATURES, 64).init(device), out: LinearConfig::new(64, 2).init(device) }
    }

    fn classify(&self, batch: Batch<B>) -> ClassificationOutput<B> {
        let logits = self.out.forward(relu(self.hidden.forward(batch.x)));
        let loss = CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.clone(), batch.y.clone());
        ClassificationOutput::new(loss, logits, batch.y)
    }
}

impl<B: AutodiffBackend> TrainStep for Net<B> {
    type Input = Batch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: Batch<B>) -> TrainOutput<ClassificationOutput<B>> {
        let output = self.classify(batch);
        TrainOutput::new(self, output.loss.backward(), output)
    }
}

impl<B: Backend> InferenceStep for Net<B> {
    type Input = Batch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: Batch<B>) -> ClassificationOutput<B> {
        self.classify(batch)
    }
}

#[derive(Clone, Debug)]
struct Sample {
    x: [f32; FEATURES],
    positive: bool,
}

#[derive(Clone, Debug)]
struct Batch<B: Backend> {
    x: Tensor<B, 2>,
    y: Tensor<B, 1, Int>,
}

#[derive(Clone)]
struct SampleBatcher;

impl<B: Backend> Batcher<B, Sample, Batch<B>> for SampleBatcher {
    fn batch(&self, items: Vec<Sample>, device: &B::Device) -> Batch<B> {
        let n = items.len();
        let x: Vec<f32> = items.iter().flat_map(|s| s.x).collect();
        let y: Vec<i64> = items.iter().map(|s| i64::from(s.positive)).collect();
        Batch {
            x: Tensor::from_data(TensorData::new(x, [n, FEATURES]), device),
            y: Tensor::from_data(y.as_slice(), device),
        }
    }
}

/// `n` samples with inputs in [-1, 1), positive where their sum is.
fn samples(n: usize, seed: u64) -> Vec<Sample> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            let x: [f32; FEATURES] = std::array::from_fn(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            });
            Sample { x, positive: x.iter().sum::<f32>() > 0.0 }
        })
        .collect()
}

fn loader<Bk: Backend>(samples: Vec<Sample>) -> Arc<dyn DataLoader<Bk, Batch<Bk>>> {
    DataLoaderBuilder::new(SampleBatcher).batch_size(32).shuffle(1).build(InMemDataset::new(samples))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    let training =
        SupervisedTraining::new("target/learner-example", loader::<B>(samples(4096, 1)), loader(samples(512, 2)))
            .metrics((LossMetric::new(), AccuracyMetric::new()))
            .num_epochs(3)
            .with_application_logger(None);
    let learner = Learner::new(Net::<B>::new(&device), AdamConfig::new().init(), 1e-3);
    // Instead of `training.launch(learner)`; a failed rank is an error that names it.
    let result = DdpLearning::threads(vec![device; 2]).launch(training, learner)?; // DDP

    // The trained model classifies held-out samples.
    let test: Batch<Flex> = SampleBatcher.batch(samples(1000, 3), &device);
    let predicted = result.model.classify(test).output.argmax(1).flatten::<1>(0, 1);
    let truth: Vec<i64> = samples(1000, 3).iter().map(|s| i64::from(s.positive)).collect();
    let predicted: Vec<i64> = predicted.into_data().convert::<i64>().to_vec().unwrap();
    let accuracy = predicted.iter().zip(&truth).filter(|(p, t)| p == t).count() as f64 / truth.len() as f64;
    println!("held-out accuracy after 3 epochs of DDP through the Learner: {accuracy:.3}");
    assert!(accuracy > 0.9, "the Learner did not learn the task");
    Ok(())
}

//! Burn 0.21's own DDP, as a Burn user runs it: burn-train's Learner with
//! the DDP strategy (Burn's `distributed` feature: gradients all-reduced
//! during backward through cubecl's NCCL), training the LeNet or the ResNet
//! of `bonfire train` (in Burn's modules, `model.rs`) on Fashion-MNIST with
//! SGD (lr 0.01, momentum 0.9, no dampening), the work `bonfire train` does
//! in the GPU check.
//!
//! Prints one JSON line: images/s over the steps after the warm-up (from
//! the start of one step to the start of the next: the Learner's loss
//! metric reads every step's loss), the mean test loss of the model before
//! and after training (`loss_start`, `loss_end`), and its test accuracy.
//!
//!     burn-ddp --model lenet --batch 100 --steps 300 --data-dir data

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use bonfire_data::{fashion_mnist, ImageDataset, Split};
mod model;

use burn::backend::cuda::CudaDevice;
use burn::backend::{Autodiff, Cuda};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::SgdConfig;
use burn::tensor::backend::distributed::{DistributedConfig, ReduceOperation};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use burn::train::metric::LossMetric;
use burn::train::{
    ClassificationOutput, ExecutionStrategy, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep,
};
use clap::Parser;
use model::{LeNet, ResNet};

type B = Autodiff<Cuda>;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ModelKind {
    Lenet,
    Resnet,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value_t = ModelKind::Lenet)]
    model: ModelKind,
    /// Images per step.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Training steps (one epoch of exactly this many batches).
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Steps left out of the images/s at the start (kernel compilation, autotune).
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    data_dir: PathBuf,
    /// GPUs, one DDP rank each.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
}

/// When each training step started.
static STEP_STARTS: Mutex<Vec<Instant>> = Mutex::new(Vec::new());

#[derive(Clone, Debug)]
struct Batch<B: Backend> {
    x: Tensor<B, 4>,
    y: Tensor<B, 1, Int>,
}

/// Batches of images by index from the dataset.
#[derive(Clone)]
struct Images(Arc<ImageDataset>);

impl<B: Backend> Batcher<B, usize, Batch<B>> for Images {
    fn batch(&self, indices: Vec<usize>, device: &B::Device) -> Batch<B> {
        let d = &self.0;
        let (x, y) = d.batch(&indices);
        Batch {
            x: Tensor::from_data(TensorData::new(x, [indices.len(), d.channels, d.height, d.width]), device),
            y: Tensor::from_data(TensorData::new(y, [indices.len()]), device),
        }
    }
}

/// A model as the Learner trains it: a loss and its outputs per batch.
macro_rules! learner_model {
    ($name:ident, $model:ident) => {
        #[derive(Module, Debug)]
        struct $name<B: Backend> {
            model: $model<B>,
        }

        impl<B: Backend> $name<B> {
            fn classify(&self, batch: Batch<B>) -> ClassificationOutput<B> {
                let logits = self.model.forward(batch.x);
                let loss =
                    CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.clone(), batch.y.clone());
                ClassificationOutput::new(loss, logits, batch.y)
            }
        }

        impl<B: AutodiffBackend> TrainStep for $name<B> {
            type Input = Batch<B>;
            type Output = ClassificationOutput<B>;

            fn step(&self, batch: Batch<B>) -> TrainOutput<ClassificationOutput<B>> {
                STEP_STARTS.lock().unwrap().push(Instant::now());
                let output = self.classify(batch);
                TrainOutput::new(self, output.loss.backward(), output)
            }
        }

        impl<B: Backend> InferenceStep for $name<B> {
            type Input = Batch<B>;
            type Output = ClassificationOutput<B>;

            fn step(&self, batch: Batch<B>) -> ClassificationOutput<B> {
                self.classify(batch)
            }
        }
    };
}

learner_model!(LeNetLearner, LeNet);
learner_model!(ResNetLearner, ResNet);

fn main() -> Result<()> {
    let args = Args::parse();
    let train = Arc::new(fashion_mnist::load(&args.data_dir, Split::Train).context("the training images")?);
    let test = Arc::new(fashion_mnist::load(&args.data_dir, Split::Test).context("the test images")?);
    anyhow::ensure!(args.steps > args.warmup + 1, "--steps must exceed --warmup + 1");
    let devices: Vec<CudaDevice> = (0..args.gpus).map(CudaDevice::new).collect();
    let row = match args.model {
        ModelKind::Lenet => {
            let model = LeNet::new(train.classes, &devices[0]);
            run(&args, devices, train, test, LeNetLearner { model }, |m: &LeNetLearner<Cuda>, b| m.classify(b))
        }
        ModelKind::Resnet => {
            let model = ResNet::new(train.classes, &devices[0]);
            run(&args, devices, train, test, ResNetLearner { model }, |m: &ResNetLearner<Cuda>, b| m.classify(b))
        }
    }?;
    println!("{row}");
    Ok(())
}

fn run<M>(
    args: &Args,
    devices: Vec<CudaDevice>,
    train: Arc<ImageDataset>,
    test: Arc<ImageDataset>,
    model: M,
    classify: impl Fn(&M::InnerModule, Batch<Cuda>) -> ClassificationOutput<Cuda>,
) -> Result<serde_json::Value>
where
    M: TrainStep<Input = Batch<B>, Output = ClassificationOutput<B>> + AutodiffModule<B> + std::fmt::Display + 'static,
    M::InnerModule: InferenceStep<Input = Batch<Cuda>, Output = ClassificationOutput<Cuda>>,
{
    let device = devices[0].clone();
    let evaluate = |m: &M::InnerModule| {
        let indices: Vec<usize> = (0..test.len().min(2000)).collect();
        let out = classify(m, Images(test.clone()).batch(indices, &device));
        let loss = out.loss.into_scalar().elem::<f64>();
        let right = out.output.argmax(1).flatten::<1>(0, 1).equal(out.targets).int().sum().into_scalar().elem::<f64>();
        (loss, right / test.len().min(2000) as f64)
    };
    let (loss_start, _) = evaluate(&model.valid());
    // Exactly `steps` batches: the training indices, repeated as needed.
    let indices: Vec<usize> = (0..args.steps * args.batch).map(|i| i % train.len()).collect();
    let loader = |data: &Arc<ImageDataset>, indices: Vec<usize>| -> Arc<dyn DataLoader<B, Batch<B>>> {
        DataLoaderBuilder::new(Images(data.clone())).batch_size(args.batch).build(InMemDataset::new(indices))
    };
    let valid: Arc<dyn DataLoader<Cuda, Batch<Cuda>>> = DataLoaderBuilder::new(Images(test.clone()))
        .batch_size(args.batch)
        .build(InMemDataset::new((0..args.batch).collect()));
    let dir = std::env::temp_dir().join(format!("burn-ddp-{}", std::process::id()));
    let training = SupervisedTraining::new(&dir, loader(&train, indices), valid)
        .metric_train_numeric(LossMetric::new())
        .num_epochs(1)
        .with_application_logger(None)
        .with_training_strategy(
            ExecutionStrategy::ddp(devices, DistributedConfig { all_reduce_op: ReduceOperation::Mean }).into(),
        );
    let momentum = MomentumConfig::new().with_momentum(0.9).with_dampening(0.0);
    let learner = Learner::new(model, SgdConfig::new().with_momentum(Some(momentum)).init(), 0.01);
    let result = training.launch(learner);
    let _ = std::fs::remove_dir_all(&dir);
    let starts = STEP_STARTS.lock().unwrap().clone();
    let timed = &starts[args.warmup.min(starts.len())..];
    anyhow::ensure!(timed.len() > 1, "the Learner ran {} steps", starts.len());
    let seconds = (timed[timed.len() - 1] - timed[0]).as_secs_f64();
    let (loss_end, accuracy) = evaluate(&result.model);
    Ok(serde_json::json!({
        "impl": "burn-ddp",
        "model": format!("{:?}", args.model).to_lowercase(),
        "gpus": args.gpus,
        "global_batch": args.batch,
        "steps": starts.len(),
        "images_per_sec": (timed.len() - 1) as f64 * args.batch as f64 / seconds,
        "loss_start": loss_start,
        "loss_end": loss_end,
        "test_accuracy": accuracy,
    }))
}

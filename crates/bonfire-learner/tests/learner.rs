//! burn-train's Learner with Bonfire's DDP over 2 workers (threads, and
//! processes over the TCP ring) must end with the weights of the Learner on
//! one device taking both workers' rows in each step, and burn-train's
//! metrics must be logged.

use std::sync::Arc;

use bonfire_collective::{TcpCommunicator, TcpConfig};
use bonfire_learner::DdpLearning;
use bonfire_testkit::{free_port, max_abs_diff, read_values, scratch_dir, write_values, SelfWorkers};
use burn::backend::{Autodiff, Flex};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::{Module, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::momentum::MomentumConfig;
use burn::optim::SgdConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{activation::relu, Int, Tensor, TensorData};
use burn::train::metric::LossMetric;
use burn::train::{ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep};

type B = Autodiff<Flex>;

const FEATURES: usize = 8;
const CLASSES: usize = 4;
const ROWS: usize = 48;
/// Rows per step on each of the 2 workers.
const PER_WORKER: usize = 6;

#[derive(Module, Debug)]
struct Net<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
}

impl<B: Backend> Net<B> {
    /// The same weights every time, without the backend's random generator
    /// (global, and shared by the tests running at once).
    fn new(device: &B::Device) -> Self {
        let linear = |inputs: usize, outputs: usize, seed: usize| {
            let mut layer = LinearConfig::new(inputs, outputs).init(device);
            let values = |n: usize, offset: usize| -> Vec<f32> {
                (0..n).map(|i| (((i + offset) as f32 * 0.754877).fract() - 0.5) / (inputs as f32).sqrt()).collect()
            };
            layer.weight = Param::from_data(TensorData::new(values(inputs * outputs, seed), [inputs, outputs]), device);
            layer.bias = Some(Param::from_data(TensorData::new(values(outputs, seed + 999), [outputs]), device));
            layer
        };
        Net { fc1: linear(FEATURES, 16, 1), fc2: linear(16, CLASSES, 2) }
    }

    fn classify(&self, batch: Rows<B>) -> ClassificationOutput<B> {
        let output = self.fc2.forward(relu(self.fc1.forward(batch.x)));
        let loss = CrossEntropyLossConfig::new().init(&output.device()).forward(output.clone(), batch.y.clone());
        ClassificationOutput::new(loss, output, batch.y)
    }

    fn weights(&self) -> Vec<f32> {
        [self.fc1.weight.val(), self.fc2.weight.val()]
            .into_iter()
            .flat_map(|w| w.into_data().to_vec::<f32>().unwrap())
            .chain(
                [&self.fc1.bias, &self.fc2.bias]
                    .into_iter()
                    .flat_map(|b| b.as_ref().unwrap().val().into_data().to_vec::<f32>().unwrap()),
            )
            .collect()
    }
}

impl<B: AutodiffBackend> TrainStep for Net<B> {
    type Input = Rows<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: Rows<B>) -> TrainOutput<ClassificationOutput<B>> {
        let output = self.classify(batch);
        TrainOutput::new(self, output.loss.backward(), output)
    }
}

impl<B: Backend> InferenceStep for Net<B> {
    type Input = Rows<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: Rows<B>) -> ClassificationOutput<B> {
        self.classify(batch)
    }
}

#[derive(Clone, Debug)]
struct Row {
    x: [f32; FEATURES],
    y: i64,
}

#[derive(Clone, Debug)]
struct Rows<B: Backend> {
    x: Tensor<B, 2>,
    y: Tensor<B, 1, Int>,
}

#[derive(Clone)]
struct RowBatcher;

impl<B: Backend> Batcher<B, Row, Rows<B>> for RowBatcher {
    fn batch(&self, items: Vec<Row>, device: &B::Device) -> Rows<B> {
        let n = items.len();
        let x: Vec<f32> = items.iter().flat_map(|r| r.x).collect();
        let y: Vec<i64> = items.iter().map(|r| r.y).collect();
        Rows {
            x: Tensor::from_data(TensorData::new(x, [n, FEATURES]), device),
            y: Tensor::from_data(y.as_slice(), device),
        }
    }
}

fn rows() -> Vec<Row> {
    let value = |i: usize| ((i as f32 * 0.618).fract() - 0.5) * 2.0;
    (0..ROWS)
        .map(|r| Row { x: std::array::from_fn(|c| value(r * FEATURES + c + 1)), y: (r * 7 % CLASSES) as i64 })
        .collect()
}

fn loader<Bk: Backend>(rows: Vec<Row>, batch: usize) -> Arc<dyn DataLoader<Bk, Rows<Bk>>> {
    DataLoaderBuilder::new(RowBatcher).batch_size(batch).build(InMemDataset::new(rows))
}

/// How [`train`] trains.
enum Workers {
    /// burn-train's single-device default.
    One,
    /// Bonfire's DDP, one thread per device.
    Threads(Vec<burn::tensor::Device<B>>),
    /// Bonfire's DDP, this process being one rank of the TCP ring.
    Process(TcpCommunicator),
}

/// Trains 2 epochs; returns the weights. Only DDP over threads writes
/// burn-train's experiment log (a logger is installed once per process).
fn train(dir: &std::path::Path, rows: Vec<Row>, batch: usize, workers: Workers) -> Vec<f32> {
    let device = Default::default();
    let mut training = SupervisedTraining::new(dir, loader::<B>(rows.clone(), batch), loader(rows, batch))
        .metrics((LossMetric::new(),))
        .num_epochs(2);
    if !matches!(workers, Workers::Threads(_)) {
        training = training.with_application_logger(None);
    }
    match workers {
        Workers::One => {}
        Workers::Threads(devices) => {
            training = training.with_training_strategy(DdpLearning::threads(devices).into_strategy());
        }
        Workers::Process(comm) => {
            training = training
                .with_training_strategy(DdpLearning::process(Box::new(comm), Default::default()).into_strategy());
        }
    }
    let optimizer = SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_dampening(0.0))).init();
    let result = training.launch(Learner::new(Net::<B>::new(&device), optimizer, 0.05));
    result.model.weights()
}

#[test]
fn ddp_learner_over_2_threads_equals_one_device_and_logs_metrics() {
    let dir = scratch_dir("learner-threads");
    let want = one_device(&dir);
    let got = train(&dir.join("ddp"), rows(), PER_WORKER, Workers::Threads(vec![Default::default(); 2]));
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-5, "DDP through the Learner differs from one device by {diff}");
    assert!(want.iter().zip(&rows_untrained()).any(|(a, b)| a != b), "the Learner trained nothing");
    for split in ["train", "valid"] {
        let log = dir.join("ddp").join(split).join("epoch-2").join("Loss.log");
        let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        assert!(!text.trim().is_empty(), "{} is empty", log.display());
    }
    // The experiment log has the lines burn-train's single-device strategy writes.
    let log = std::fs::read_to_string(dir.join("ddp").join("experiment.log")).unwrap();
    for line in ["Executing training step for epoch 2", "Iteration 3", "Executing validation step for epoch 2"] {
        assert!(log.contains(line), "the experiment log lacks {line:?}: {log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Learner on one device, whose step k takes the rows both workers take
/// in their step k: worker r trains on rows [r * 24, (r + 1) * 24) in
/// steps of 6.
fn one_device(dir: &std::path::Path) -> Vec<f32> {
    let data = rows();
    let half = ROWS / 2;
    let order: Vec<Row> = (0..half / PER_WORKER)
        .flat_map(|k| {
            let w0 = data[k * PER_WORKER..(k + 1) * PER_WORKER].iter();
            let w1 = data[half + k * PER_WORKER..half + (k + 1) * PER_WORKER].iter();
            w0.chain(w1).cloned().collect::<Vec<_>>()
        })
        .collect();
    train(&dir.join("single"), order, 2 * PER_WORKER, Workers::One)
}

/// A worker's role is the file it writes its weights to.
const WORKERS: SelfWorkers = SelfWorkers::new("learner_worker_process", "BONFIRE_TEST_LEARNER_WORKER");

#[test]
#[ignore = "run as a worker process by the process test"]
fn learner_worker_process() {
    let Some(out) = WORKERS.role() else { return };
    let comm = TcpCommunicator::from_env(TcpConfig::default()).unwrap();
    let out = std::path::PathBuf::from(out);
    write_values(&out, &train(&out.with_extension("run"), rows(), PER_WORKER, Workers::Process(comm)));
}

#[test]
fn ddp_learner_over_2_processes_equals_one_device() {
    let dir = scratch_dir("learner-processes");
    let want = one_device(&dir);
    let port = free_port();
    let children: Vec<_> =
        (0..2).map(|rank| WORKERS.rank(dir.join(format!("rank{rank}")), rank, 2, port).spawn().unwrap()).collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    for rank in 0..2 {
        let diff = max_abs_diff(&read_values(&dir.join(format!("rank{rank}"))), &want);
        assert!(diff <= 1e-5, "rank {rank}: DDP through the Learner over processes differs by {diff}");
    }
    // Rank 0 logged burn-train's metrics.
    assert!(dir.join("rank0.run").join("train").join("epoch-2").join("Loss.log").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rank whose peer never trains: `DdpLearning::launch` returns an error
/// naming the failed rank and the peer it waited for, instead of panicking
/// inside burn-train.
#[test]
fn a_failed_rank_is_an_error_naming_it_and_the_cause() {
    let dir = scratch_dir("learner-failure");
    let mut comms = bonfire_collective::InProcCommunicator::group(2).unwrap();
    let _idle = comms.pop().unwrap(); // rank 1 never calls
    let mut comm = comms.pop().unwrap();
    bonfire_collective::Communicator::set_timeout(&mut comm, std::time::Duration::from_millis(500));
    let training = SupervisedTraining::new(&dir, loader::<B>(rows(), PER_WORKER), loader(rows(), PER_WORKER))
        .num_epochs(1)
        .with_application_logger(None);
    let optimizer = SgdConfig::new().init();
    let learner = Learner::new(Net::<B>::new(&Default::default()), optimizer, 0.05);
    let failed = DdpLearning::process(Box::new(comm), Default::default()).launch(training, learner).err();
    let failed = failed.expect("a rank whose peer never answers must fail");
    assert_eq!(failed.rank, 0);
    let message = failed.to_string();
    assert!(message.starts_with("DDP training failed on rank 0: ") && message.contains("[1]"), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn rows_untrained() -> Vec<f32> {
    Net::<B>::new(&Default::default()).weights()
}

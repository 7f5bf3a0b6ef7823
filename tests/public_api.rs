//! The public API as a user sees it, through `bonfire::prelude`: DDP over
//! worker threads and DP over replicas each end where one worker does on
//! the whole batch.

use bonfire::prelude::*;
use bonfire_testkit::max_abs_diff;
use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{activation::relu, Int, Tensor, TensorData};

type B = Autodiff<Flex>;

const STEPS: usize = 5;
const BATCH: usize = 12;

#[derive(Module, Debug)]
struct Net<B: Backend> {
    a: Linear<B>,
    b: Linear<B>,
}

impl<B: Backend> Net<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.b.forward(relu(self.a.forward(x)))
    }
}

/// The same starting weights everywhere (a Burn seed is per device, so build
/// the values by hand).
fn net(device: &burn::tensor::Device<B>) -> Net<B> {
    let mut net = Net { a: LinearConfig::new(6, 10).init(device), b: LinearConfig::new(10, 3).init(device) };
    let values = |n: usize, k: f32| (0..n).map(|i| ((i as f32 + k) * 0.77).sin() * 0.4).collect::<Vec<f32>>();
    let matrix = |shape: [usize; 2], k: f32| {
        Tensor::<B, 2>::from_data(TensorData::new(values(shape[0] * shape[1], k), shape), device)
    };
    let vector = |n: usize, k: f32| Tensor::<B, 1>::from_data(TensorData::new(values(n, k), [n]), device);
    net.a.weight = net.a.weight.map(|_| matrix([6, 10], 1.0).require_grad());
    net.b.weight = net.b.weight.map(|_| matrix([10, 3], 2.0).require_grad());
    net.a.bias = net.a.bias.map(|p| p.map(|_| vector(10, 3.0).require_grad()));
    net.b.bias = net.b.bias.map(|p| p.map(|_| vector(3, 4.0).require_grad()));
    net
}

/// Rows `rows` of step `step`'s global batch.
fn rows(
    step: usize,
    rows: std::ops::Range<usize>,
    device: &burn::tensor::Device<B>,
) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let n = rows.len();
    let x: Vec<f32> =
        rows.clone().flat_map(|r| (0..6).map(move |j| (((step * BATCH + r) * 6 + j) as f32 * 0.311).cos())).collect();
    let y: Vec<i64> = rows.map(|r| ((step * BATCH + r) % 3) as i64).collect();
    (Tensor::from_data(TensorData::new(x, [n, 6]), device), Tensor::from_data(TensorData::new(y, [n]), device))
}

fn loss(logits: Tensor<B, 2>, y: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    CrossEntropyLossConfig::new().init(&logits.device()).forward(logits, y)
}

fn sgd() -> impl Optimizer<Net<B>, B> {
    SgdConfig::new().with_momentum(Some(MomentumConfig::new())).init()
}

fn values(net: &Net<B>) -> Vec<f32> {
    let net = net.valid();
    let biases = [&net.a.bias, &net.b.bias].map(|b| b.as_ref().unwrap().val().into_data().to_vec::<f32>().unwrap());
    [net.a.weight.val(), net.b.weight.val()]
        .into_iter()
        .flat_map(|w| w.into_data().to_vec::<f32>().unwrap())
        .chain(biases.into_iter().flatten())
        .collect()
}

fn one_worker() -> Vec<f32> {
    let device = Default::default();
    let (mut model, mut opt) = (net(&device), sgd());
    for step in 0..STEPS {
        let (x, y) = rows(step, 0..BATCH, &device);
        let grads = GradientsParams::from_grads(loss(model.logits(x), y).backward(), &model);
        model = opt.step(0.1, model, grads);
    }
    let trained = values(&model);
    // The oracle must have learned something, or every comparison is empty.
    assert!(trained.iter().all(|v| v.is_finite()), "one worker's training left non-finite weights");
    assert!(
        max_abs_diff(&trained, &values(&net(&device))) > 1e-2,
        "one worker's training left the weights where they were"
    );
    trained
}

/// Runs `worker(comm, rank's rows of a step's batch)` on each rank of a
/// group of two threads and asserts each rank ends at `want`.
fn on_two_threads(
    want: &[f32],
    worker: impl Fn(InProcCommunicator, &dyn Fn(usize) -> std::ops::Range<usize>) -> Vec<f32> + Sync,
) {
    let comms = InProcCommunicator::group(2).unwrap();
    let got: Vec<Vec<f32>> = std::thread::scope(|s| {
        let workers: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let worker = &worker;
                s.spawn(move || {
                    let half = BATCH / 2;
                    let rank = comm.rank();
                    worker(comm, &move |_| rank * half..(rank + 1) * half)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for (rank, got) in got.iter().enumerate() {
        let d = max_abs_diff(got, want);
        assert!(d <= 1e-5, "rank {rank} is {d} away from one worker");
    }
}

#[test]
fn ddp_over_two_threads_equals_one_worker_on_the_whole_batch() {
    on_two_threads(&one_worker(), |comm, my_rows| {
        let device = Default::default();
        let (mut ddp, mut model) =
            DistributedDataParallel::new(net(&device), Box::new(comm), DdpConfig::default()).unwrap();
        let mut opt = sgd();
        for step in 0..STEPS {
            let (x, y) = rows(step, my_rows(step), &device);
            let grads = ddp.backward(loss(ddp.forward_module(&model).logits(x), y)).unwrap();
            model = opt.step(0.1, model, grads);
        }
        values(&model)
    });
}

#[test]
fn dp_over_two_replicas_equals_one_worker_on_the_whole_batch() {
    let want = one_worker();
    let device = Default::default();
    let dp = DataParallel::<B>::new(vec![device; 2]).unwrap();
    let (mut model, mut opt) = (net(&device), sgd());
    for step in 0..STEPS {
        let (x, y) = rows(step, 0..BATCH, &device);
        let (logits, replicas) = dp.forward(&model, x, |m, x| m.logits(x)).unwrap();
        let grads = dp.backward(loss(logits, y), &model, replicas).unwrap();
        model = opt.step(0.1, model, grads);
    }
    let d = max_abs_diff(&values(&model), &want);
    assert!(d <= 1e-5, "DP is {d} away from one worker");
}

/// Trains `model` for the test's steps through `strategy.step`, on rows
/// `my_rows(step)` of each step's batch.
fn train_from(
    mut strategy: Strategy<B>,
    mut model: Net<B>,
    my_rows: &dyn Fn(usize) -> std::ops::Range<usize>,
) -> Vec<f32> {
    let device = Default::default();
    let mut opt = sgd();
    for step in 0..STEPS {
        let (x, y) = rows(step, my_rows(step), &device);
        let (_, grads) = strategy.step(&model, x, y, |m, x| m.logits(x), loss).unwrap();
        model = opt.step(0.1, model, grads);
    }
    values(&model)
}

/// `Strategy::step`, the one call a training loop makes, gives one worker's
/// weights under each strategy.
#[test]
fn every_strategy_step_equals_one_worker_on_the_whole_batch() {
    let want = one_worker();
    let device = Default::default();
    let d = max_abs_diff(&train_from(Strategy::Single, net(&device), &|_| 0..BATCH), &want);
    assert!(d <= 1e-5, "single is {d} away from one worker");
    let dp = DataParallel::<B>::new(vec![device; 2]).unwrap();
    let d = max_abs_diff(&train_from(Strategy::Dp(dp), net(&device), &|_| 0..BATCH), &want);
    assert!(d <= 1e-5, "DP is {d} away from one worker");

    on_two_threads(&want, |comm, my_rows| {
        let device = Default::default();
        let (ddp, model) = DistributedDataParallel::new(net(&device), Box::new(comm), DdpConfig::default()).unwrap();
        train_from(Strategy::Ddp(Box::new(ddp)), model, my_rows)
    });
}

/// The README's example is `examples/quickstart.rs` word for word, so that
/// what readers copy is what the tests build and run.
#[test]
fn the_readmes_example_is_the_quickstart_example() {
    // At run time: a build folder shared by two clones may run this test
    // compiled in the other one, which would read that clone's README.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    let root = std::path::Path::new(&manifest_dir);
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("examples/quickstart.rs")).unwrap();
    assert!(
        readme.contains(&format!("```rust\n{example}```")),
        "README.md's example differs from examples/quickstart.rs"
    );
}

//! Models, data and training loops shared by the equivalence tests.
#![allow(dead_code)]

use bonfire_collective::InProcCommunicator;
use bonfire_parallel::{settle_buffers, DdpConfig, DistributedDataParallel, HookBackend, ParallelError};
use bonfire_testkit::{flat_values, with_values};
use burn::module::{AutodiffModule, Module};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{activation::relu, Int, Tensor, TensorData};

pub const STEPS: usize = 5;
pub const LR: f64 = 0.05;
pub const FEATURES: usize = 8;
pub const CLASSES: usize = 4;

/// Models the tests train; `input` is [batch, FEATURES] or [batch, 1, 8, 8].
pub trait Net<B: Backend>: Module<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2>;
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn new(device: &B::Device, hidden: usize) -> Self {
        Mlp {
            fc1: LinearConfig::new(FEATURES, hidden).init(device),
            fc2: LinearConfig::new(hidden, CLASSES).init(device),
        }
    }
}

impl<B: Backend> Net<B> for Mlp<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.fc2.forward(relu(self.fc1.forward(x)))
    }
}

/// A small conv net on 8x8 single-channel images (flattened rows of 64).
#[derive(Module, Debug)]
pub struct ConvNet<B: Backend> {
    conv: Conv2d<B>,
    pool: MaxPool2d,
    fc: Linear<B>,
}

impl<B: Backend> ConvNet<B> {
    pub fn new(device: &B::Device) -> Self {
        ConvNet {
            conv: Conv2dConfig::new([1, 4], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc: LinearConfig::new(4 * 4 * 4, CLASSES).init(device),
        }
    }
}

impl<B: Backend> Net<B> for ConvNet<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, _] = x.dims();
        let x = x.reshape([n, 1, 8, 8]);
        let x = self.pool.forward(relu(self.conv.forward(x)));
        self.fc.forward(x.reshape([n, 4 * 4 * 4]))
    }
}

/// [`ConvNet`] built from Bonfire's kernel modules (the kernels on Flex,
/// Burn's ops elsewhere), with batch norm: what `bonfire train` runs, and a
/// module with buffers.
#[derive(Module, Debug)]
pub struct KernelConvNet<B: Backend> {
    pub conv: bonfire_kernels::nn::Conv2d<B>,
    pub bn: bonfire_kernels::nn::BatchNorm<B>,
    pool: bonfire_kernels::nn::MaxPool2d,
    fc: Linear<B>,
}

impl<B: Backend> KernelConvNet<B> {
    pub fn new(device: &B::Device) -> Self {
        use bonfire_kernels::nn::{BatchNormConfig, Conv2dConfig, MaxPool2dConfig};
        KernelConvNet {
            conv: Conv2dConfig::new([1, 4], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(device),
            bn: BatchNormConfig::new(4).init(device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc: LinearConfig::new(4 * 4 * 4, CLASSES).init(device),
        }
    }
}

impl<B: Backend> KernelConvNet<B> {
    /// The same parameters (the same autodiff nodes: gradients flow to
    /// them), with running statistics of its own that nothing reads back.
    fn with_own_running_stats(&self) -> Self {
        let own = |state: &burn::module::RunningState<Tensor<B, 1>>| burn::module::RunningState::new(state.value());
        let bn = bonfire_kernels::nn::BatchNorm {
            running_mean: own(&self.bn.running_mean),
            running_var: own(&self.bn.running_var),
            ..self.bn.clone()
        };
        KernelConvNet { bn, ..self.clone() }
    }
}

impl<B: Backend> Net<B> for KernelConvNet<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, _] = x.dims();
        let x = x.reshape([n, 1, 8, 8]);
        let x = self.pool.forward(relu(self.bn.forward(self.conv.forward(x))));
        self.fc.forward(x.reshape([n, 4 * 4 * 4]))
    }
}

/// The same weight applied twice: its gradient has two contributions.
#[derive(Module, Debug)]
pub struct Twice<B: Backend> {
    square: Linear<B>,
    head: Linear<B>,
}

impl<B: Backend> Twice<B> {
    pub fn new(device: &B::Device) -> Self {
        Twice {
            square: LinearConfig::new(FEATURES, FEATURES).init(device),
            head: LinearConfig::new(FEATURES, CLASSES).init(device),
        }
    }
}

impl<B: Backend> Net<B> for Twice<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.head.forward(self.square.forward(relu(self.square.forward(x))))
    }
}

/// An MLP with a layer the forward pass never uses.
#[derive(Module, Debug)]
pub struct WithUnused<B: Backend> {
    mlp: Mlp<B>,
    unused: Linear<B>,
}

impl<B: Backend> WithUnused<B> {
    pub fn new(device: &B::Device) -> Self {
        WithUnused { mlp: Mlp::new(device, 16), unused: LinearConfig::new(3, 3).init(device) }
    }
}

impl<B: Backend> Net<B> for WithUnused<B> {
    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.mlp.logits(x)
    }
}

/// Gives every parameter deterministic values from `seed`, so that every
/// process and thread can rebuild the same starting point.
pub fn seeded<B: Backend, M: Module<B>>(module: M, seed: u64) -> M {
    let n = flat_values::<B, M>(&module).len();
    let values: Vec<f32> = (0..n as u64).map(|i| uniform(seed, i) * 0.5).collect();
    with_values::<B, M>(module, &values)
}

/// A hash-based uniform value in [-1, 1).
pub fn uniform(seed: u64, i: u64) -> f32 {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) ^ i.wrapping_mul(0xBF58476D1CE4E5B9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D049BB133111EB);
    x ^= x >> 29;
    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Rows `rows` of the data set: 64 features (8x8 images; the MLP uses the first 8).
pub fn batch<B: Backend>(
    rows: std::ops::Range<usize>,
    width: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let n = rows.len();
    let x: Vec<f32> = rows.clone().flat_map(|r| (0..width).map(move |c| uniform(7, (r * 64 + c) as u64))).collect();
    let y: Vec<i64> = rows.map(|r| (uniform(11, r as u64).abs() * CLASSES as f32) as i64 % CLASSES as i64).collect();
    (Tensor::from_data(TensorData::new(x, [n, width]), device), Tensor::from_data(TensorData::new(y, [n]), device))
}

pub fn loss<B: Backend, M: Net<B>>(model: &M, x: Tensor<B, 2>, y: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    CrossEntropyLossConfig::new().init(&x.device()).forward(model.logits(x), y)
}

pub fn sgd<B: AutodiffBackend, M: AutodiffModule<B>>() -> impl Optimizer<M, B> {
    SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_dampening(0.0))).init()
}

/// The device `model` lives on (its first parameter's).
pub fn device_of<B: Backend, M: Module<B>>(model: &M) -> B::Device {
    model.devices().into_iter().next().expect("a model with parameters")
}

/// One worker on the whole global batch of every step.
pub fn train_single<B: AutodiffBackend, M: AutodiffModule<B> + Net<B>>(
    mut model: M,
    global: usize,
    width: usize,
) -> Vec<f32> {
    let device = device_of(&model);
    let mut opt = sgd::<B, M>();
    for step in 0..STEPS {
        let (x, y) = batch::<B>(step * global..(step + 1) * global, width, &device);
        let grads = GradientsParams::from_grads(loss(&model, x, y).backward(), &model);
        model = opt.step(LR, model, grads);
    }
    settle_buffers::<B, M>(&model);
    flat_values::<B, M>(&model)
}

/// One DDP rank: its share of every step's global batch (rank r takes rows
/// [r*b, (r+1)*b) of it), `micro` micro-batches per step through `no_sync`.
pub fn train_ddp<B: HookBackend, M: AutodiffModule<B> + Net<B> + 'static>(
    ddp: &mut DistributedDataParallel<B>,
    mut model: M,
    per_rank: usize,
    micro: usize,
    width: usize,
) -> Result<Vec<f32>, ParallelError> {
    let device = device_of(&model);
    let (rank, world) = (ddp.rank(), ddp.world_size());
    let global = per_rank * world;
    let mut opt = sgd::<B, M>();
    for step in 0..STEPS {
        let mine = step * global + rank * per_rank;
        let micro_len = per_rank / micro;
        let mut grads = None;
        for m in 0..micro {
            let (x, y) = batch::<B>(mine + m * micro_len..mine + (m + 1) * micro_len, width, &device);
            let l = loss(&ddp.forward_module(&model), x, y) / micro as f32;
            if m + 1 < micro {
                ddp.backward_no_sync(l)?;
            } else {
                grads = Some(ddp.backward(l)?);
            }
        }
        model = opt.step(LR, model, grads.unwrap());
    }
    settle_buffers::<B, M>(&model);
    Ok(flat_values::<B, M>(&model))
}

/// One worker doing what `world` DDP ranks with batch norm do together
/// (rank r's rows as [`train_ddp`] cuts them): each rank's rows normalised
/// on their own and the losses averaged, so that the gradient is the mean
/// of the ranks'. The running statistics follow rank 0's rows alone (the
/// other ranks' share keeps its own), as DDP's buffer broadcast gives them to
/// every rank.
pub fn train_single_ranks_apart<B: AutodiffBackend>(
    mut model: KernelConvNet<B>,
    world: usize,
    per_rank: usize,
    width: usize,
) -> Vec<f32> {
    let device = device_of(&model);
    let mut opt = sgd::<B, KernelConvNet<B>>();
    for step in 0..STEPS {
        let shares = (0..world).map(|rank| {
            let first = (step * world + rank) * per_rank;
            let (x, y) = batch::<B>(first..first + per_rank, width, &device);
            match rank {
                0 => loss(&model, x, y),
                _ => loss(&model.with_own_running_stats(), x, y),
            }
        });
        let total = shares.reduce(|a, b| a + b).expect("at least one rank") / world as f32;
        let grads = GradientsParams::from_grads(total.backward(), &model);
        model = opt.step(LR, model, grads);
    }
    settle_buffers::<B, KernelConvNet<B>>(&model);
    flat_values::<B, KernelConvNet<B>>(&model)
}

/// DataParallel over `devices`, `global` rows a step.
pub fn train_dp<B: bonfire_parallel::MoveBackend, M: AutodiffModule<B> + Net<B>>(
    mut model: M,
    devices: Vec<B::Device>,
    global: usize,
    width: usize,
) -> Vec<f32> {
    let dp = bonfire_parallel::DataParallel::<B>::new(devices).unwrap();
    let mut opt = sgd::<B, M>();
    for step in 0..STEPS {
        let (x, y) = batch::<B>(step * global..(step + 1) * global, width, &dp.devices()[0]);
        let (logits, replicas) = dp.forward(&model, x, |m, x| m.logits(x)).unwrap();
        let loss = burn::nn::loss::CrossEntropyLossConfig::new().init(&logits.device()).forward(logits, y);
        let grads = dp.backward(loss, &model, replicas).unwrap();
        model = opt.step(LR, model, grads);
    }
    settle_buffers::<B, M>(&model);
    flat_values::<B, M>(&model)
}

/// Runs `rank(r, comm)` for every rank of an in-process group of `world`,
/// each on a thread of its own, and returns the results in rank order.
pub fn on_rank_threads<T: Send>(world: usize, rank: impl Fn(usize, InProcCommunicator) -> T + Sync) -> Vec<T> {
    let comms = InProcCommunicator::group(world).unwrap();
    std::thread::scope(|s| {
        let rank = &rank;
        let handles: Vec<_> = comms.into_iter().enumerate().map(|(r, comm)| s.spawn(move || rank(r, comm))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Runs one DDP rank per device as threads (rank r on `devices[r]`). Rank 0
/// starts from seed 1, the others from other values, which the initial
/// broadcast must replace.
pub fn ddp_threads_on<B, M>(
    devices: Vec<B::Device>,
    make: impl Fn(usize, &B::Device) -> M + Sync,
    config: DdpConfig,
    per_rank: usize,
    micro: usize,
    width: usize,
) -> Vec<Result<Vec<f32>, ParallelError>>
where
    B: HookBackend,
    M: AutodiffModule<B> + Net<B> + 'static,
{
    ddp_threads_prepared::<B, M>(devices, make, config, |_, _| Ok(()), per_rank, micro, width)
}

/// [`ddp_threads_on`] with `prepare(rank, ddp)` run on each rank's strategy
/// before training (to register a comm hook, say).
pub fn ddp_threads_prepared<B, M>(
    devices: Vec<B::Device>,
    make: impl Fn(usize, &B::Device) -> M + Sync,
    config: DdpConfig,
    prepare: impl Fn(usize, &mut DistributedDataParallel<B>) -> Result<(), ParallelError> + Sync,
    per_rank: usize,
    micro: usize,
    width: usize,
) -> Vec<Result<Vec<f32>, ParallelError>>
where
    B: HookBackend,
    M: AutodiffModule<B> + Net<B> + 'static,
{
    let comms = InProcCommunicator::group(devices.len()).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(rank, (comm, device))| {
                let (make, prepare, config) = (&make, &prepare, config.clone());
                s.spawn(move || {
                    let model = seeded::<B, M>(make(rank, &device), if rank == 0 { 1 } else { 100 + rank as u64 });
                    let (mut ddp, model) = DistributedDataParallel::new(model, Box::new(comm), config)?;
                    prepare(rank, &mut ddp)?;
                    train_ddp(&mut ddp, model, per_rank, micro, width)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

//! Synchronised batch norm: DDP's `sync_batch_norm` makes every
//! `bonfire::kernels::nn::BatchNorm` normalise with the statistics of the
//! whole batch across the workers, as PyTorch's `SyncBatchNorm` does.
//!
//!     cargo run --example sync_batch_norm
//!
//! Two workers on threads see shards from different places: rank 0's inputs
//! lie around -2, rank 1's around +2. Batch norm sits on the inputs. With
//! each worker's own statistics, rank 0 normalises around -2 and its running
//! mean ends there (DDP gives every rank rank 0's buffers); with the
//! statistics summed across the workers, both normalise around the whole
//! batch's mean, 0, and the running mean ends there.

use bonfire::kernels::nn::{BatchNorm, BatchNormConfig};
use bonfire::prelude::*;
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{activation::relu, Int, Tensor, TensorData};

type B = Autodiff<Flex>;

const WORKERS: usize = 2;
const FEATURES: usize = 8;
const BATCH_PER_WORKER: usize = 32;
const STEPS: usize = 100;

#[derive(Module, Debug)]
struct Net<B: Backend> {
    norm: BatchNorm<B>,
    hidden: Linear<B>,
    out: Linear<B>,
}

impl<B: Backend> Net<B> {
    fn new(device: &B::Device) -> Self {
        Net {
            norm: BatchNormConfig::new(FEATURES).init(device),
            hidden: LinearConfig::new(FEATURES, 64).init(device),
            out: LinearConfig::new(64, 2).init(device),
        }
    }

    fn loss(&self, x: Tensor<B, 2>, y: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        let logits = self.out.forward(relu(self.hidden.forward(self.norm.forward(x))));
        CrossEntropyLossConfig::new().init(&logits.device()).forward(logits, y)
    }
}

/// Batch `step` of `rank`'s shard: inputs around -2 (rank 0) or +2 (rank
/// 1), label 1 where the first half of a row's offsets outweighs the second.
fn batch(rank: usize, step: usize, device: &burn::tensor::Device<B>) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let mut state = (rank * 1_000_003 + step * 7919 + 1) as u64;
    let noise: Vec<f32> = (0..BATCH_PER_WORKER * FEATURES)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let y: Vec<i64> = noise
        .chunks(FEATURES)
        .map(|row| {
            let (a, b) = row.split_at(FEATURES / 2);
            i64::from(a.iter().sum::<f32>() > b.iter().sum::<f32>())
        })
        .collect();
    let centre = if rank == 0 { -2.0 } else { 2.0 };
    let x: Vec<f32> = noise.iter().map(|v| v + centre).collect();
    let x = Tensor::from_data(TensorData::new(x, [BATCH_PER_WORKER, FEATURES]), device);
    (x, Tensor::from_data(TensorData::new(y, [BATCH_PER_WORKER]), device))
}

/// One worker; returns its running mean of feature 0 and its last loss.
fn worker(comm: InProcCommunicator, sync_batch_norm: bool) -> Result<(f32, f32), ParallelError> {
    let device = Default::default();
    let rank = comm.rank();
    B::seed(&device, 7);
    let config = DdpConfig { sync_batch_norm, ..DdpConfig::default() };
    let (mut ddp, mut model) = DistributedDataParallel::new(Net::<B>::new(&device), Box::new(comm), config)?;
    let mut optimizer = SgdConfig::new().init();
    let mut last = 0.0;
    for step in 0..STEPS {
        let (x, y) = batch(rank, step, &device);
        let loss = ddp.forward_module(&model).loss(x, y);
        last = loss.clone().into_scalar();
        let grads = ddp.backward(loss)?;
        model = optimizer.step(0.1, model, grads);
    }
    let running = model.norm.running_mean.value().into_data().to_vec::<f32>().expect("f32");
    Ok((running[0], last))
}

/// Trains on `WORKERS` threads; returns rank 0's running mean of feature 0.
fn train(sync_batch_norm: bool) -> anyhow::Result<f32> {
    let comms = InProcCommunicator::group(WORKERS)?;
    let results = std::thread::scope(|s| {
        let workers: Vec<_> = comms.into_iter().map(|comm| s.spawn(move || worker(comm, sync_batch_norm))).collect();
        workers.into_iter().map(|w| w.join().expect("a worker panicked")).collect::<Result<Vec<_>, _>>()
    })?;
    let (mean, loss) = results[0];
    let name = if sync_batch_norm { "synchronised" } else { "each worker's own" };
    println!("{name:<18} running mean of feature 0: {mean:+.3}, last loss {loss:.4}");
    Ok(mean)
}

fn main() -> anyhow::Result<()> {
    bonfire::keep_freed_memory();
    let own = train(false)?;
    let synced = train(true)?;
    anyhow::ensure!((own + 2.0).abs() < 0.2, "each worker's own statistics: rank 0's mean, about -2");
    anyhow::ensure!(synced.abs() < 0.2, "synchronised statistics: the whole batch's mean, about 0");
    Ok(())
}

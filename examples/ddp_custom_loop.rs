//! DistributedDataParallel over worker threads, with your own Burn model and
//! training loop: the three lines that change are marked `// DDP`.
//!
//!     cargo run --example ddp_custom_loop
//!
//! Two workers, one per thread, each on its own shard of a synthetic task
//! (is the sum of the inputs positive?). DDP gives every rank rank 0's
//! initial weights and averages the gradients every step, so the ranks end
//! with the same model, as the last line checks.

use bonfire::prelude::*;
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{activation::relu, Int, Tensor, TensorData};

type B = Autodiff<Flex>;

const WORKERS: usize = 2;
const FEATURES: usize = 16;
const BATCH_PER_WORKER: usize = 32;
const STEPS: usize = 60;

#[derive(Module, Debug)]
struct Net<B: Backend> {
    hidden: Linear<B>,
    out: Linear<B>,
}

impl<B: Backend> Net<B> {
    fn new(device: &B::Device) -> Self {
        Net { hidden: LinearConfig::new(FEATURES, 64).init(device), out: LinearConfig::new(64, 2).init(device) }
    }

    fn loss(&self, x: Tensor<B, 2>, y: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        let logits = self.out.forward(relu(self.hidden.forward(x)));
        CrossEntropyLossConfig::new().init(&logits.device()).forward(logits, y)
    }
}

/// Batch `step` of `rank`'s shard: inputs in [-1, 1), label 1 where their sum is positive.
fn batch(rank: usize, step: usize, device: &burn::tensor::Device<B>) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let mut state = (rank * 1_000_003 + step * 7919 + 1) as u64;
    let x: Vec<f32> = (0..BATCH_PER_WORKER * FEATURES)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let y: Vec<i64> = x.chunks(FEATURES).map(|row| i64::from(row.iter().sum::<f32>() > 0.0)).collect();
    let x = Tensor::from_data(TensorData::new(x, [BATCH_PER_WORKER, FEATURES]), device);
    (x, Tensor::from_data(TensorData::new(y, [BATCH_PER_WORKER]), device))
}

/// One worker: an ordinary Burn training loop.
fn worker(comm: InProcCommunicator) -> Result<Vec<f32>, ParallelError> {
    let device = Default::default();
    let rank = comm.rank();
    let model = Net::<B>::new(&device);
    // DDP: every rank starts from rank 0's weights.
    let (mut ddp, mut model) = DistributedDataParallel::new(model, Box::new(comm), DdpConfig::default())?;
    let mut optimizer = AdamConfig::new().init();
    for step in 0..STEPS {
        let (x, y) = batch(rank, step, &device);
        let loss = ddp.forward_module(&model).loss(x, y); // DDP: forward through the hooked module
        let report = loss.clone().into_scalar();
        let grads = ddp.backward(loss)?; // DDP: gradients averaged over the ranks
        model = optimizer.step(1e-2, model, grads);
        if rank == 0 && (step % 20 == 0 || step + 1 == STEPS) {
            println!("step {step:>3}: loss on rank 0's batch {report:.4}");
        }
    }
    Ok(model.hidden.weight.val().into_data().to_vec::<f32>().expect("f32 weights"))
}

fn main() -> anyhow::Result<()> {
    // On the CPU: keep the memory Flex frees every step rather than fault it
    // in again on the next one (before any worker thread starts).
    bonfire::keep_freed_memory();
    let comms = InProcCommunicator::group(WORKERS)?;
    let weights = std::thread::scope(|s| {
        let workers: Vec<_> = comms.into_iter().map(|comm| s.spawn(move || worker(comm))).collect();
        workers.into_iter().map(|w| w.join().expect("a worker panicked")).collect::<Result<Vec<_>, _>>()
    })?;
    // Every worker holds the very same weights (a NaN anywhere is unequal).
    let same = weights[1..].iter().all(|w| w == &weights[0]);
    println!("{WORKERS} workers trained {STEPS} steps; their weights are identical: {same}");
    anyhow::ensure!(same, "the workers' models differ");
    Ok(())
}

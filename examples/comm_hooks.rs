//! Communication hooks: how DDP averages each bucket of gradients, chosen
//! with `register_comm_hook` as in PyTorch.
//!
//!     cargo run --example comm_hooks
//!
//! The same two-worker training runs three times: with the default mean,
//! with PowerSGD (rank-2 factors of each weight matrix, with error
//! feedback), and with a hook written here, `F16Compress`, which sends the
//! bucket as f16. `Metered` around each hook counts the bytes it hands to
//! collectives. Each run prints its final loss and bytes per step.

use bonfire::comm_hook::{GradBucket, Mean, Metered, PowerSgd};
use bonfire::prelude::*;
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{activation::relu, DType, Int, Tensor, TensorData};

type B = Autodiff<Flex>;
type Inner = Flex;

const WORKERS: usize = 2;
const FEATURES: usize = 32;
const HIDDEN: usize = 256;
const BATCH_PER_WORKER: usize = 32;
const STEPS: usize = 150;

/// A hook of one's own: the mean, sent as f16 (PyTorch's
/// `fp16_compress_hook`). Half the bytes of f32; f16 keeps 10 bits of
/// mantissa but overflows above 65504, which gradients rarely reach.
struct F16Compress;

impl<B: Backend> CommHook<B> for F16Compress {
    fn average(
        &mut self,
        comm: &mut dyn TensorCollective<B>,
        bucket: GradBucket<B>,
    ) -> Result<Tensor<B, 1>, CommError> {
        let packed = bucket.buffer.cast(DType::F16);
        Ok(comm.all_reduce(packed, ReduceOp::Mean)?.cast(DType::F32))
    }
}

#[derive(Module, Debug)]
struct Net<B: Backend> {
    hidden: Linear<B>,
    out: Linear<B>,
}

impl<B: Backend> Net<B> {
    fn new(device: &B::Device) -> Self {
        Net { hidden: LinearConfig::new(FEATURES, HIDDEN).init(device), out: LinearConfig::new(HIDDEN, 2).init(device) }
    }

    fn loss(&self, x: Tensor<B, 2>, y: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        let logits = self.out.forward(relu(self.hidden.forward(x)));
        CrossEntropyLossConfig::new().init(&logits.device()).forward(logits, y)
    }
}

/// Batch `step` of `rank`'s shard: inputs in [-1, 1), label 1 where the
/// first half of the inputs outweighs the second.
fn batch(rank: usize, step: usize, device: &burn::tensor::Device<B>) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let mut state = (rank * 1_000_003 + step * 7919 + 1) as u64;
    let x: Vec<f32> = (0..BATCH_PER_WORKER * FEATURES)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let y: Vec<i64> = x
        .chunks(FEATURES)
        .map(|row| {
            let (a, b) = row.split_at(FEATURES / 2);
            i64::from(a.iter().sum::<f32>() > b.iter().sum::<f32>())
        })
        .collect();
    let x = Tensor::from_data(TensorData::new(x, [BATCH_PER_WORKER, FEATURES]), device);
    (x, Tensor::from_data(TensorData::new(y, [BATCH_PER_WORKER]), device))
}

/// What one worker ends with: the mean loss of its last 10 steps, the bytes
/// its hook sent per step, and its output layer's weights.
struct Outcome {
    loss: f32,
    bytes_per_step: f64,
    weights: Vec<f32>,
}

/// One worker, training with `hook`.
fn worker(comm: InProcCommunicator, hook: impl CommHook<Inner>) -> Result<Outcome, ParallelError> {
    let device = Default::default();
    let rank = comm.rank();
    // The same initial weights for each hook's run (DDP then gives every
    // rank rank 0's).
    B::seed(&device, 7);
    let model = Net::<B>::new(&device);
    let (mut ddp, mut model) = DistributedDataParallel::new(model, Box::new(comm), DdpConfig::default())?;
    let hook = Metered::new(hook);
    let sent = hook.counter();
    ddp.register_comm_hook(hook)?; // before the first forward pass
    let mut optimizer = SgdConfig::new().init();
    let mut last = Vec::new();
    for step in 0..STEPS {
        let (x, y) = batch(rank, step, &device);
        let loss = ddp.forward_module(&model).loss(x, y);
        if step + 10 >= STEPS {
            last.push(loss.clone().into_scalar());
        }
        let grads: GradientsParams = ddp.backward(loss)?;
        model = optimizer.step(0.1, model, grads);
    }
    Ok(Outcome {
        loss: last.iter().sum::<f32>() / last.len() as f32,
        bytes_per_step: sent.get() as f64 / STEPS as f64,
        weights: model.out.weight.val().into_data().to_vec::<f32>().expect("f32 weights"),
    })
}

/// Trains on `WORKERS` threads with a hook made by `hook` on each.
fn train<H: CommHook<Inner>>(name: &str, hook: impl Fn() -> H + Sync) -> anyhow::Result<()> {
    let comms = InProcCommunicator::group(WORKERS)?;
    let outcomes = std::thread::scope(|s| {
        let hook = &hook;
        let workers: Vec<_> = comms.into_iter().map(|comm| s.spawn(move || worker(comm, hook()))).collect();
        workers.into_iter().map(|w| w.join().expect("a worker panicked")).collect::<Result<Vec<_>, _>>()
    })?;
    let first = &outcomes[0];
    println!("{name:<14} loss over the last 10 steps {:.4}, {:>7.0} bytes a step", first.loss, first.bytes_per_step);
    // Every hook gives every rank the same average, so the ranks stay in
    // step (a NaN anywhere is unequal).
    anyhow::ensure!(outcomes.iter().all(|o| o.weights == first.weights), "{name}: the workers' models differ");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    bonfire::keep_freed_memory();
    train("mean", || Mean)?;
    train("PowerSGD r=2", || PowerSgd::new(2))?;
    train("f16 (own hook)", || F16Compress)?;
    Ok(())
}

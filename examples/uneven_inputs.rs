//! Uneven inputs: workers with different numbers of batches, as PyTorch's
//! `Join` allows. With `DdpConfig::uneven_inputs`, a worker that has run
//! out calls `ddp.join(model)`, which takes part in the steps the others
//! still take; then every worker holds the same model.
//!
//!     cargo run --example uneven_inputs
//!
//! Three workers on threads have 5, 7 and 9 batches. With `join` all three
//! finish together with the same weights. Without it, the workers still
//! training wait for one that has left, and after the collectives' timeout
//! (1 s here) their step fails with an error that names the missing rank.

use std::time::Duration;

use bonfire::prelude::*;
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::loss::MseLoss;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

type B = Autodiff<Flex>;

const BATCHES: [usize; 3] = [5, 7, 9];
const ROWS: usize = 16;

#[derive(Module, Debug)]
struct Net<B: Backend> {
    fc: Linear<B>,
}

/// Batch `step` of `rank`: rows of 4 inputs, the target their sum.
fn batch(rank: usize, step: usize, device: &burn::tensor::Device<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let x: Vec<f32> = (0..ROWS * 4).map(|i| ((rank * 131 + step * 17 + i * 7) % 23) as f32 / 23.0).collect();
    let y: Vec<f32> = x.chunks(4).map(|row| row.iter().sum()).collect();
    let x = Tensor::from_data(TensorData::new(x, [ROWS, 4]), device);
    (x, Tensor::from_data(TensorData::new(y, [ROWS, 1]), device))
}

/// One worker: its batches, then (with `join`) the others' last steps.
/// Returns its final weights.
fn worker(mut comm: InProcCommunicator, join: bool) -> Result<Vec<f32>, ParallelError> {
    comm.set_timeout(Duration::from_secs(1));
    let (device, rank) = (Default::default(), comm.rank());
    let net = Net::<B> { fc: LinearConfig::new(4, 1).init(&device) };
    let config = DdpConfig { uneven_inputs: join, ..DdpConfig::default() };
    let (mut ddp, mut model) = DistributedDataParallel::new(net, Box::new(comm), config)?;
    let mut optimizer = SgdConfig::new().init();
    for step in 0..BATCHES[rank] {
        let (x, y) = batch(rank, step, &device);
        let loss = MseLoss::new().forward(ddp.forward_module(&model).fc.forward(x), y, burn::nn::loss::Reduction::Mean);
        let grads = ddp.backward(loss)?;
        model = optimizer.step(0.05, model, grads);
    }
    if join {
        model = ddp.join(model)?;
    }
    let weights = model.fc.weight.val().into_data().to_vec::<f32>().expect("f32");
    Ok(weights)
}

/// Runs the three workers on threads.
fn train(join: bool) -> anyhow::Result<Vec<Result<Vec<f32>, ParallelError>>> {
    let comms = InProcCommunicator::group(BATCHES.len())?;
    Ok(std::thread::scope(|s| {
        let workers: Vec<_> = comms.into_iter().map(|comm| s.spawn(move || worker(comm, join))).collect();
        workers.into_iter().map(|w| w.join().expect("a worker panicked")).collect()
    }))
}

fn main() -> anyhow::Result<()> {
    bonfire::keep_freed_memory();
    let joined = train(true)?;
    let weights: Vec<Vec<f32>> = joined.into_iter().collect::<Result<_, _>>()?;
    for (rank, w) in weights.iter().enumerate() {
        println!("with join, rank {rank} ({} batches): weights {w:.4?}", BATCHES[rank]);
    }
    anyhow::ensure!(weights.iter().all(|w| w == &weights[0]), "with join every worker ends with the same weights");

    let alone = train(false)?;
    for (rank, result) in alone.iter().enumerate() {
        match result {
            Ok(_) => println!("without join, rank {rank}: finished"),
            Err(e) => println!("without join, rank {rank}: {e}"),
        }
    }
    anyhow::ensure!(alone[2].is_err(), "without join the worker with the most batches waits in vain");
    Ok(())
}

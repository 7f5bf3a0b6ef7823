//! DistributedDataParallel on the wgpu backend (Vulkan, Metal, DX12; Mesa's
//! lavapipe on a machine without a GPU): two worker threads sharing the
//! default device, their gradients staged through host memory by the
//! in-process group.
//!
//!     cargo run --example wgpu

use bonfire::prelude::*;
use burn::backend::{Autodiff, Wgpu};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{activation::relu, Int, Tensor, TensorData};

type B = Autodiff<Wgpu>;

#[derive(Module, Debug)]
struct Net<B: Backend> {
    hidden: Linear<B>,
    out: Linear<B>,
}

/// Rank `rank`'s batch `step`: 32 points, labelled by whether they lie
/// inside the unit circle.
fn batch(rank: usize, step: usize, device: &burn::tensor::Device<B>) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let x: Vec<f32> = (0..64).map(|i| ((rank * 5_003 + step * 257 + i) as f32 * 0.731).sin() * 1.6).collect();
    let y: Vec<i64> = x.chunks(2).map(|p| i64::from(p[0] * p[0] + p[1] * p[1] < 1.0)).collect();
    (Tensor::from_data(TensorData::new(x, [32, 2]), device), Tensor::from_data(TensorData::new(y, [32]), device))
}

fn worker(comm: InProcCommunicator) -> Result<f32, ParallelError> {
    let device = Default::default();
    let rank = comm.rank();
    let model =
        Net::<B> { hidden: LinearConfig::new(2, 32).init(&device), out: LinearConfig::new(32, 2).init(&device) };
    let (mut ddp, mut model) = DistributedDataParallel::new(model, Box::new(comm), DdpConfig::default())?;
    let mut optimizer = AdamConfig::new().init();
    let mut last = f32::NAN;
    for step in 0..30 {
        let (x, y) = batch(rank, step, &device);
        let m = ddp.forward_module(&model);
        let logits = m.out.forward(relu(m.hidden.forward(x)));
        let loss = CrossEntropyLossConfig::new().init(&device).forward(logits, y);
        last = loss.clone().into_scalar();
        model = optimizer.step(2e-2, model, ddp.backward(loss)?);
        if rank == 0 && step % 10 == 0 {
            println!("step {step:>2}: loss on rank 0's batch {last:.4}");
        }
    }
    Ok(last)
}

fn main() -> anyhow::Result<()> {
    let comms = InProcCommunicator::group(2)?;
    let losses = std::thread::scope(|s| {
        let workers: Vec<_> = comms.into_iter().map(|comm| s.spawn(move || worker(comm))).collect();
        workers.into_iter().map(|w| w.join().expect("a worker panicked")).collect::<Result<Vec<_>, _>>()
    })?;
    println!("2 workers on wgpu trained 30 steps; final losses {losses:?}");
    Ok(())
}

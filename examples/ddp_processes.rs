//! DistributedDataParallel over processes, through the ring (shared memory
//! between processes of one host, TCP between hosts).
//!
//!     cargo run --example ddp_processes
//!
//! Run plainly, it starts two copies of itself as rank 0 and rank 1 on this
//! machine, as a launcher would. Under a launcher (`bonfire launch
//! --nproc-per-node 2 -- PROGRAM`, or torchrun, on one host or several)
//! each process finds its rank and the rendezvous in RANK, WORLD_SIZE,
//! MASTER_ADDR and MASTER_PORT and joins the ring directly.

use std::process::Command;

use bonfire::prelude::*;
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

type B = Autodiff<Flex>;

const WORKERS: usize = 2;
const STEPS: usize = 40;

#[derive(Module, Debug)]
struct Classifier<B: Backend> {
    linear: Linear<B>,
}

/// Batch `step` of `rank`'s shard: 32 points of the plane, labelled by the
/// quadrant they fall in.
fn batch(rank: usize, step: usize, device: &burn::tensor::Device<B>) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let point = |i: usize| {
        let t = (rank * 7_919 + step * 104_729 + i * 31) as f32;
        [(t * 0.618).sin(), (t * 0.414).cos()]
    };
    let xs: Vec<[f32; 2]> = (0..32).map(point).collect();
    let y: Vec<i64> = xs.iter().map(|[a, b]| i64::from(*a > 0.0) * 2 + i64::from(*b > 0.0)).collect();
    let x = Tensor::from_data(TensorData::new(xs.concat(), [32, 2]), device);
    (x, Tensor::from_data(TensorData::new(y, [32]), device))
}

fn worker() -> anyhow::Result<()> {
    // RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: rank 0 hosts the
    // rendezvous, every rank joins the ring there.
    let comm = TcpCommunicator::from_env(TcpConfig::default())?;
    let rank = comm.rank();
    let device = Default::default();
    let model = Classifier::<B> { linear: LinearConfig::new(2, 4).init(&device) };
    let (mut ddp, mut model) = DistributedDataParallel::new(model, Box::new(comm), DdpConfig::default())?;
    let mut optimizer = SgdConfig::new().init();
    for step in 0..STEPS {
        let (x, y) = batch(rank, step, &device);
        let logits = ddp.forward_module(&model).linear.forward(x);
        let loss = CrossEntropyLossConfig::new().init(&device).forward(logits, y);
        let report = loss.clone().into_scalar();
        model = optimizer.step(0.5, model, ddp.backward(loss)?);
        if rank == 0 && (step % 10 == 0 || step + 1 == STEPS) {
            println!("rank 0, step {step:>2}: loss {report:.4}");
        }
    }
    Ok(())
}

/// Starts this program once per rank, as `bonfire launch` would, and waits.
fn launch() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let exe = std::env::current_exe()?;
    let children = (0..WORKERS)
        .map(|rank| Command::new(&exe).envs(DistEnv::local(rank, WORKERS, port).vars()).spawn())
        .collect::<Result<Vec<_>, _>>()?;
    for (rank, mut child) in children.into_iter().enumerate() {
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "rank {rank} failed: {status}");
    }
    println!("{WORKERS} processes trained {STEPS} steps");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("RANK").is_some() {
        worker()
    } else {
        launch()
    }
}

//! ZeRO stage 1 against whole optimizers: DDP with Adam on the 10.0 M
//! parameter MLP of the DDP benchmark, over `world` workers as threads,
//! each rank's Adam state (its record, serialised at full precision) and the
//! median step time of the slowest worker, with Adam whole on every rank
//! and with `shard_optimizer`.

use std::time::Instant;

use anyhow::Result;
use bonfire_collective::InProcCommunicator;
use bonfire_parallel::{DdpConfig, DistributedDataParallel};
use burn::optim::{AdamConfig, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};

use crate::ddp::{data, Wide, B, WARMUP};

#[derive(clap::Args)]
pub struct Args {
    /// Timed steps per run (after the warm-up steps).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Samples per worker per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// World sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    worlds: Vec<usize>,
}

pub fn run(args: Args) -> Result<()> {
    for &world in &args.worlds {
        for sharded in [false, true] {
            let comms = InProcCommunicator::group(world)?;
            let ranks = std::thread::scope(|s| {
                let handles: Vec<_> = comms
                    .into_iter()
                    .map(|comm| s.spawn(move || train_rank(comm, sharded, args.steps, args.batch)))
                    .collect();
                handles.into_iter().map(|h| h.join().expect("a worker panicked")).collect::<Result<Vec<_>>>()
            })?;
            // Each step's time is its slowest worker's.
            let mut steps: Vec<f64> =
                (0..args.steps).map(|i| ranks.iter().map(|r| r.1[i]).fold(0.0, f64::max)).collect();
            steps.sort_by(f64::total_cmp);
            let bytes: Vec<usize> = ranks.iter().map(|r| r.0).collect();
            println!(
                "{}",
                serde_json::json!({
                    "world": world,
                    "optimizer": if sharded { "sharded" } else { "whole" },
                    "state_bytes": bytes,
                    "median_step_ms": steps[steps.len() / 2] * 1e3,
                })
            );
        }
    }
    Ok(())
}

/// One rank: its optimizer record's size and each timed step's seconds.
fn train_rank(comm: InProcCommunicator, sharded: bool, steps: usize, batch: usize) -> Result<(usize, Vec<f64>)> {
    let device = Default::default();
    let (mut ddp, mut model) =
        DistributedDataParallel::new(Wide::<B>::new(&device), Box::new(comm), DdpConfig::default())?;
    let mut whole = AdamConfig::new().init::<B, Wide<B>>();
    let mut shard = sharded.then(|| ddp.shard_optimizer(AdamConfig::new().init::<B, Wide<B>>(), &model));
    let mut seconds = Vec::new();
    for step in 0..WARMUP + steps {
        let (x, y) = data(batch);
        let start = Instant::now();
        let loss = ddp.forward_module(&model).loss(x, y);
        let grads = ddp.backward(loss)?;
        model = match &mut shard {
            Some(opt) => opt.step(1e-3, model, grads)?,
            None => whole.step(1e-3, model, grads),
        };
        if step >= WARMUP {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = match &shard {
        Some(opt) => recorder.record(opt.inner().to_record(), ())?.len(),
        None => recorder.record(whole.to_record(), ())?.len(),
    };
    Ok((bytes, seconds))
}

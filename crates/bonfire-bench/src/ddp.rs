//! Per-step time of data-parallel training on the CPU: Bonfire's DDP with
//! and without overlap, with one all-reduce per parameter, and Burn 0.21's
//! own multi-device path (burn-collective's all-reduce through
//! `GradientsParams::all_reduce`, what burn-train's DDP strategy calls after
//! each backward pass). Every variant runs 2 workers as threads of this
//! process on the Flex backend, on the same model, data and batch.

use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Result};
use bonfire_collective::InProcCommunicator;
use bonfire_parallel::{DdpConfig, DistributedDataParallel};
use burn::backend::Autodiff;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{momentum::MomentumConfig, GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{activation::relu, Distribution, Int, Tensor};

type Inner = burn::backend::Flex;
type B = Autodiff<Inner>;

#[derive(clap::Args)]
pub struct Args {
    /// Timed steps per variant (after 3 warm-up steps).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Samples per worker per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Variants to run.
    #[arg(long, value_delimiter = ',', default_value = "local,overlap,no-overlap,per-parameter,burn")]
    variants: Vec<String>,
}

/// 784-2048-2048-2048-10: 10.0 M parameters, 40 MB of gradients a step.
#[derive(Module, Debug)]
struct Wide<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
    fc3: Linear<B>,
    fc4: Linear<B>,
}

impl<B: Backend> Wide<B> {
    fn new(device: &B::Device) -> Self {
        Wide {
            fc1: LinearConfig::new(784, 2048).init(device),
            fc2: LinearConfig::new(2048, 2048).init(device),
            fc3: LinearConfig::new(2048, 2048).init(device),
            fc4: LinearConfig::new(2048, 10).init(device),
        }
    }

    fn loss(&self, x: Tensor<B, 2>, y: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        let h = relu(self.fc1.forward(x));
        let h = relu(self.fc2.forward(h));
        let h = relu(self.fc3.forward(h));
        CrossEntropyLossConfig::new().init(&y.device()).forward(self.fc4.forward(h), y)
    }
}

const WARMUP: usize = 3;

fn data(batch: usize) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let device = Default::default();
    let x = Tensor::random([batch, 784], Distribution::Uniform(-1.0, 1.0), &device);
    let y = Tensor::<B, 1, Int>::random([batch], Distribution::Uniform(0.0, 10.0), &device);
    (x, y)
}

fn sgd() -> impl Optimizer<Wide<B>, B> {
    SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_dampening(0.0))).init()
}

/// Runs `work(rank)` for ranks 0 and 1 on two threads; returns rank 0's result.
fn on_two_workers(work: impl Fn(usize) -> Result<f64> + Sync) -> Result<f64> {
    let times = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn({
                    let work = &work;
                    move || work(rank)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker panicked")).collect::<Result<Vec<f64>>>()
    })?;
    Ok(times[0])
}

/// Milliseconds per step of SGD on `model`, with gradients from `grads`,
/// over the timed steps after the warm-up.
fn time_training(
    args: &Args,
    mut model: Wide<B>,
    mut grads: impl FnMut(&Wide<B>, Tensor<B, 2>, Tensor<B, 1, Int>) -> Result<GradientsParams>,
) -> Result<f64> {
    let (x, y) = data(args.batch);
    let mut opt = sgd();
    let mut start = Instant::now();
    for step in 0..WARMUP + args.steps {
        if step == WARMUP {
            start = Instant::now();
        }
        let g = grads(&model, x.clone(), y.clone())?;
        model = opt.step(0.01, model, g);
    }
    Ok(start.elapsed().as_secs_f64() * 1e3 / args.steps as f64)
}

/// Bonfire's DDP over two in-process workers.
fn bonfire(args: &Args, config: DdpConfig) -> Result<f64> {
    let comms: Vec<Mutex<Option<InProcCommunicator>>> =
        InProcCommunicator::group(2)?.into_iter().map(|c| Mutex::new(Some(c))).collect();
    on_two_workers(|rank| {
        let comm = comms[rank].lock().unwrap().take().expect("one worker per rank");
        let (mut ddp, model) =
            DistributedDataParallel::new(Wide::<B>::new(&Default::default()), Box::new(comm), config.clone())?;
        time_training(args, model, |m, x, y| Ok(ddp.backward(ddp.forward_module(m).loss(x, y))?))
    })
}

/// No communication at all: two workers training alone, the floor for any
/// data-parallel variant on this machine.
fn local(args: &Args) -> Result<f64> {
    on_two_workers(|_| {
        time_training(args, Wide::<B>::new(&Default::default()), |m, x, y| {
            Ok(GradientsParams::from_grads(m.loss(x, y).backward(), m))
        })
    })
}

#[cfg(feature = "burn-baseline")]
fn burn_collective(args: &Args) -> Result<f64> {
    use burn::collective::{finish_collective, register, CollectiveConfig, PeerId, ReduceOperation};
    // burn-train clones one model onto every device, so parameter ids (which
    // order burn-collective's all-reduces) agree across workers.
    let model = Wide::<B>::new(&Default::default());
    on_two_workers(|rank| {
        let peer = PeerId::from(rank);
        register::<Inner>(peer, Default::default(), CollectiveConfig::default().with_num_devices(2))
            .map_err(|e| anyhow::anyhow!("burn-collective register: {e:?}"))?;
        let ms = time_training(args, model.clone(), |m, x, y| {
            GradientsParams::from_grads(m.loss(x, y).backward(), m)
                .all_reduce::<Inner>(peer, ReduceOperation::Mean)
                .map_err(|e| anyhow::anyhow!("burn-collective all_reduce: {e:?}"))
        })?;
        finish_collective::<Inner>(peer).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(ms)
    })
}

#[cfg(not(feature = "burn-baseline"))]
fn burn_collective(_: &Args) -> Result<f64> {
    bail!("built without the burn-baseline feature (cargo xtask bench ddp enables it)")
}

pub fn run(args: Args) -> Result<()> {
    for variant in &args.variants {
        let ms = match variant.as_str() {
            "overlap" => bonfire(&args, DdpConfig::default())?,
            "no-overlap" => bonfire(&args, DdpConfig { overlap: false, ..DdpConfig::default() })?,
            "per-parameter" => bonfire(
                &args,
                DdpConfig { overlap: false, bucket_cap_bytes: 0, first_bucket_cap_bytes: 0, ..DdpConfig::default() },
            )?,
            "burn" => burn_collective(&args)?,
            "local" => local(&args)?,
            other => bail!("unknown variant {other:?}; expected local, overlap, no-overlap, per-parameter or burn"),
        };
        println!(r#"{{"variant": "{variant}", "step_ms": {ms:.2}}}"#);
    }
    Ok(())
}

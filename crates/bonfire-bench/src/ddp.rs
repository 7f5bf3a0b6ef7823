//! Per-step time of data-parallel training on the CPU: Bonfire's DDP with
//! and without overlap, with one all-reduce per parameter, and Burn 0.21's
//! own multi-device path (burn-collective's all-reduce through
//! `GradientsParams::all_reduce`, what burn-train's DDP strategy calls after
//! each backward pass), beside the floor: the same workers with no
//! communication, and the floor in lockstep: no gradients exchanged, but the
//! workers wait for each other once a step where DDP's all-reduce would be,
//! as every synchronous data-parallel step must. Every variant runs 2
//! workers on the Flex backend, on the same model, data and batch: as threads
//! of this process over the in-process group, or (`--processes`) as two
//! processes over the ring (through shared memory, or its sockets alone).
//! A variant's step time is its slowest worker's, as for a training job
//! (workers that never wait for each other drift apart). Each row also
//! carries the page faults per worker and step, the cost of memory that is
//! made anew every step.
//!
//! Rounds interleave the variants; a variant's ratio to an anchor (the
//! floor, lockstep, Burn's own) is the median of its ratios to that anchor
//! measured in the same round.
//!
//! Every measurement runs in a fresh process, so that no variant inherits
//! the memory (and the allocator's state) that the one before it left, which
//! slowed whichever variant came right after another in one process.

use std::process::Stdio;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bonfire_collective::{Communicator, InProcCommunicator, TcpCommunicator, TcpConfig};
use bonfire_parallel::{DdpConfig, DistributedDataParallel};
use burn::backend::Autodiff;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{momentum::MomentumConfig, GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{activation::relu, Distribution, Int, Tensor};

type Inner = burn::backend::Flex;
pub(crate) type B = Autodiff<Inner>;

#[derive(clap::Args)]
pub struct Args {
    /// Timed steps per variant (after 3 warm-up steps).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Samples per worker per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Variants to run ("sockets": DDP's default over the TCP ring without
    /// shared memory, as between hosts; processes only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "local,lockstep,default,sockets,overlap,no-overlap,per-parameter,burn"
    )]
    variants: Vec<String>,
    /// Rounds over all variants; each variant reports its median, and its
    /// median ratio to the floor, to lockstep and to Burn's own measured in
    /// the same round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Two processes over the TCP ring instead of two threads (Burn's own
    /// path has no multi-process form and is skipped).
    #[arg(long)]
    processes: bool,
}

/// One measurement of one variant (started by `ddp`): one rank of the
/// two-process form, or with `--threads` both workers as threads.
#[derive(clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    variant: String,
    #[arg(long)]
    steps: usize,
    #[arg(long)]
    batch: usize,
    /// Run both workers as threads of this process.
    #[arg(long)]
    threads: bool,
}

/// 784-2048-2048-2048-10: 10.0 M parameters, 40 MB of gradients a step.
#[derive(Module, Debug)]
pub(crate) struct Wide<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
    fc3: Linear<B>,
    fc4: Linear<B>,
}

impl<B: Backend> Wide<B> {
    pub(crate) fn new(device: &B::Device) -> Self {
        Wide {
            fc1: LinearConfig::new(784, 2048).init(device),
            fc2: LinearConfig::new(2048, 2048).init(device),
            fc3: LinearConfig::new(2048, 2048).init(device),
            fc4: LinearConfig::new(2048, 10).init(device),
        }
    }

    pub(crate) fn loss(&self, x: Tensor<B, 2>, y: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        let h = relu(self.fc1.forward(x));
        let h = relu(self.fc2.forward(h));
        let h = relu(self.fc3.forward(h));
        CrossEntropyLossConfig::new().init(&y.device()).forward(self.fc4.forward(h), y)
    }
}

pub(crate) const WARMUP: usize = 3;

pub(crate) fn data(batch: usize) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let device = Default::default();
    let x = Tensor::random([batch, 784], Distribution::Uniform(-1.0, 1.0), &device);
    let y = Tensor::<B, 1, Int>::random([batch], Distribution::Uniform(0.0, 10.0), &device);
    (x, y)
}

fn sgd() -> impl Optimizer<Wide<B>, B> {
    SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_dampening(0.0))).init()
}

/// What a variant measured on one worker.
#[derive(Clone, Copy)]
struct Timing {
    step_ms: f64,
    /// Minor page faults of the whole process over the timed steps, per step.
    faults_per_step: f64,
    /// Bonfire's variants: whether buckets overlapped backward.
    overlap: Option<bool>,
}

/// Minor page faults of this process so far (`/proc/self/stat`, field 10).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which may hold spaces, start at field 3.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after_name.split_whitespace().nth(7).and_then(|f| f.parse().ok()).unwrap_or(0)
}

/// The timing of a group of workers: a step of the group ends when its
/// slowest worker's does (workers that do not communicate drift apart, and
/// the one ahead finishes early), so the group's step time is the slowest
/// worker's; faults are the workers' mean.
fn group_timing(workers: &[Timing]) -> Timing {
    let step_ms = workers.iter().map(|t| t.step_ms).fold(0.0, f64::max);
    let faults_per_step = workers.iter().map(|t| t.faults_per_step).sum::<f64>() / workers.len() as f64;
    Timing { step_ms, faults_per_step, ..workers[0] }
}

/// Runs `work(rank)` for ranks 0 and 1 on two threads; returns their group timing.
fn on_two_workers(work: impl Fn(usize) -> Result<Timing> + Sync) -> Result<Timing> {
    let times = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn({
                    let work = &work;
                    move || work(rank)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker panicked")).collect::<Result<Vec<Timing>>>()
    })?;
    // Both threads counted the faults of the whole process.
    let group = group_timing(&times);
    Ok(Timing { faults_per_step: group.faults_per_step / 2.0, ..group })
}

/// Milliseconds per step of SGD on `model`, with gradients from `grads`,
/// over the timed steps after the warm-up.
fn time_training(
    steps: usize,
    batch: usize,
    mut model: Wide<B>,
    mut grads: impl FnMut(&Wide<B>, Tensor<B, 2>, Tensor<B, 1, Int>) -> Result<GradientsParams>,
) -> Result<Timing> {
    let (x, y) = data(batch);
    let mut opt = sgd();
    let (mut start, mut faults) = (Instant::now(), 0);
    for step in 0..WARMUP + steps {
        if step == WARMUP {
            (start, faults) = (Instant::now(), minor_faults());
        }
        let g = grads(&model, x.clone(), y.clone())?;
        model = opt.step(0.01, model, g);
    }
    Ok(Timing {
        step_ms: start.elapsed().as_secs_f64() * 1e3 / steps as f64,
        faults_per_step: (minor_faults() - faults) as f64 / steps as f64,
        overlap: None,
    })
}

/// The configuration each Bonfire variant names.
fn config(variant: &str) -> Option<DdpConfig> {
    match variant {
        "default" | "sockets" => Some(DdpConfig::default()),
        "overlap" => Some(DdpConfig { overlap: Some(true), ..DdpConfig::default() }),
        "no-overlap" => Some(DdpConfig { overlap: Some(false), ..DdpConfig::default() }),
        "per-parameter" => Some(DdpConfig {
            overlap: Some(false),
            bucket_cap_bytes: 0,
            first_bucket_cap_bytes: 0,
            ..DdpConfig::default()
        }),
        _ => None,
    }
}

/// Trains with Bonfire's DDP over `comm`.
fn bonfire_worker(
    steps: usize,
    batch: usize,
    comm: Box<dyn bonfire_collective::TensorCollective<Inner>>,
    config: DdpConfig,
) -> Result<Timing> {
    let (mut ddp, model) = DistributedDataParallel::new(Wide::<B>::new(&Default::default()), comm, config)?;
    let overlap = ddp.overlaps();
    let timing = time_training(steps, batch, model, |m, x, y| Ok(ddp.backward(ddp.forward_module(m).loss(x, y))?))?;
    Ok(Timing { overlap: Some(overlap), ..timing })
}

/// A worker training alone.
fn local_worker(steps: usize, batch: usize) -> Result<Timing> {
    time_training(steps, batch, Wide::<B>::new(&Default::default()), |m, x, y| {
        Ok(GradientsParams::from_grads(m.loss(x, y).backward(), m))
    })
}

/// A worker training alone but in lockstep with its peers over `comm`: one
/// barrier after each backward pass, where DDP's all-reduce would be.
fn lockstep_worker(steps: usize, batch: usize, mut comm: impl Communicator) -> Result<Timing> {
    time_training(steps, batch, Wide::<B>::new(&Default::default()), |m, x, y| {
        let grads = GradientsParams::from_grads(m.loss(x, y).backward(), m);
        comm.barrier()?;
        Ok(grads)
    })
}

/// `work(communicator)` on two threads, each with its rank of an in-process group.
fn on_two_threads_in_group(work: impl Fn(InProcCommunicator) -> Result<Timing> + Sync) -> Result<Timing> {
    let comms: Vec<Mutex<Option<InProcCommunicator>>> =
        InProcCommunicator::group(2)?.into_iter().map(|c| Mutex::new(Some(c))).collect();
    on_two_workers(|rank| work(comms[rank].lock().unwrap().take().expect("one worker per rank")))
}

/// This program's `ddp-worker` for `variant`, with the step count and batch of `args`.
fn worker_command(args: &Args, variant: &str, mut command: std::process::Command) -> std::process::Command {
    command
        .args(["ddp-worker", "--variant", variant])
        .args(["--steps", &args.steps.to_string(), "--batch", &args.batch.to_string()])
        .stdout(Stdio::piped());
    command
}

/// What a worker printed: its step time, faults per step and overlap.
fn parse_timing(line: &str, variant: &str) -> Result<Timing> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let parsed = match fields[..] {
        [ms, faults, overlap] => (|| {
            Some(Timing {
                step_ms: ms.parse().ok()?,
                faults_per_step: faults.parse().ok()?,
                overlap: config(variant).is_some().then(|| overlap == "true"),
            })
        })(),
        _ => None,
    };
    parsed.with_context(|| format!("the {variant} worker printed {line:?}"))
}

/// `variant` with both workers as threads of a fresh process of this program.
fn in_fresh_process(args: &Args, variant: &str) -> Result<Timing> {
    let mut command = worker_command(args, variant, std::process::Command::new(std::env::current_exe()?));
    let out = command.arg("--threads").spawn().context("starting a benchmark worker")?.wait_with_output()?;
    if !out.status.success() {
        bail!("DDP benchmark worker ({variant}) failed: {}", out.status);
    }
    parse_timing(&String::from_utf8_lossy(&out.stdout), variant)
}

/// `variant` as two processes of this program over the TCP ring; their
/// group timing.
fn on_two_processes(args: &Args, variant: &str) -> Result<Timing> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let children = (0..2)
        .map(|rank| {
            let mut command = worker_command(args, variant, crate::local_rank_command(rank, 2, port)?);
            // Each process gets one of the cores, as the threads do.
            command.env("RAYON_NUM_THREADS", "1").spawn().context("starting a benchmark worker")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut timings = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("DDP benchmark worker {rank} ({variant}) failed: {}", out.status);
        }
        timings.push(parse_timing(&String::from_utf8_lossy(&out.stdout), variant)?);
    }
    Ok(group_timing(&timings))
}

/// One measurement (`ddp-worker`): prints the step time, the faults per
/// step and whether buckets overlapped backward.
pub fn worker(args: WorkerArgs) -> Result<()> {
    let (steps, batch) = (args.steps, args.batch);
    let timing = match (config(&args.variant), args.variant.as_str()) {
        (_, "burn") if args.threads => burn_collective(steps, batch)?,
        (_, "local") if args.threads => on_two_workers(|_| local_worker(steps, batch))?,
        (_, "local") => local_worker(steps, batch)?,
        (_, "lockstep") if args.threads => on_two_threads_in_group(|comm| lockstep_worker(steps, batch, comm))?,
        (_, "lockstep") => lockstep_worker(steps, batch, TcpCommunicator::from_env(TcpConfig::default())?)?,
        (Some(config), _) if args.threads => {
            on_two_threads_in_group(|comm| bonfire_worker(steps, batch, Box::new(comm), config.clone()))?
        }
        (Some(config), variant) => {
            // "sockets": the ring as between hosts, without shared memory.
            let tcp = TcpConfig { shared_memory: variant != "sockets", ..TcpConfig::default() };
            bonfire_worker(steps, batch, Box::new(TcpCommunicator::from_env(tcp)?), config)?
        }
        (None, other) => {
            bail!("unknown variant {other:?}; expected local, lockstep, default, sockets, overlap, no-overlap, per-parameter or burn")
        }
    };
    println!("{} {} {}", timing.step_ms, timing.faults_per_step, timing.overlap.unwrap_or(false));
    Ok(())
}

#[cfg(feature = "burn-baseline")]
fn burn_collective(steps: usize, batch: usize) -> Result<Timing> {
    use burn::collective::{finish_collective, register, CollectiveConfig, PeerId, ReduceOperation};
    // burn-train clones one model onto every device, so parameter ids (which
    // order burn-collective's all-reduces) agree across workers.
    let model = Wide::<B>::new(&Default::default());
    on_two_workers(|rank| {
        let peer = PeerId::from(rank);
        register::<Inner>(peer, Default::default(), CollectiveConfig::default().with_num_devices(2))
            .map_err(|e| anyhow::anyhow!("burn-collective register: {e:?}"))?;
        let ms = time_training(steps, batch, model.clone(), |m, x, y| {
            GradientsParams::from_grads(m.loss(x, y).backward(), m)
                .all_reduce::<Inner>(peer, ReduceOperation::Mean)
                .map_err(|e| anyhow::anyhow!("burn-collective all_reduce: {e:?}"))
        })?;
        finish_collective::<Inner>(peer).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(ms)
    })
}

#[cfg(not(feature = "burn-baseline"))]
fn burn_collective(_: usize, _: usize) -> Result<Timing> {
    bail!("built without the burn-baseline feature (cargo xtask bench ddp enables it)")
}

/// One measurement of `variant`, in processes of its own.
fn measure(args: &Args, variant: &str) -> Result<Timing> {
    if args.processes {
        on_two_processes(args, variant)
    } else {
        in_fresh_process(args, variant)
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The median over rounds of `ratio(this round's time, the anchor's time in
/// the same round)`, as JSON (`null` without the anchor). Pairing each
/// round with its own anchor cancels the machine's slow drift, which moves
/// whole rounds by more than DDP costs.
fn paired_ratio(times: &[Timing], anchor: Option<&[Timing]>, ratio: fn(f64, f64) -> f64) -> String {
    anchor.map_or("null".to_string(), |anchor| {
        format!("{:.4}", median(times.iter().zip(anchor).map(|(t, a)| ratio(t.step_ms, a.step_ms)).collect()))
    })
}

pub fn run(args: Args) -> Result<()> {
    let transport = if args.processes { "tcp" } else { "inproc" };
    // Burn's own path has no multi-process form.
    // Burn's own path has no multi-process form; threads have no sockets.
    let skipped = if args.processes { "burn" } else { "sockets" };
    let variants: Vec<&str> = args.variants.iter().map(String::as_str).filter(|v| *v != skipped).collect();
    // Rounds interleave the variants, so a slow spell of the machine touches
    // all of them rather than one; each variant reports its median round.
    let mut timings = vec![Vec::new(); variants.len()];
    for _ in 0..args.rounds {
        for (variant, timings) in variants.iter().zip(&mut timings) {
            timings.push(measure(&args, variant)?);
        }
    }
    let of = |name: &str| variants.iter().position(|v| *v == name).map(|i| timings[i].as_slice());
    let (floor, lockstep, burn) = (of("local"), of("lockstep"), of("burn"));
    for (variant, timings) in variants.iter().zip(&timings) {
        let step_ms = median(timings.iter().map(|t| t.step_ms).collect());
        let faults = median(timings.iter().map(|t| t.faults_per_step).collect());
        let rounds: Vec<String> = timings.iter().map(|t| format!("{:.2}", t.step_ms)).collect();
        let overlap = timings[0].overlap.map_or("null".to_string(), |o| o.to_string());
        let x_floor = paired_ratio(timings, floor, |ms, floor| ms / floor);
        let x_lockstep = paired_ratio(timings, lockstep, |ms, lockstep| ms / lockstep);
        let speedup_over_burn = paired_ratio(timings, burn, |ms, burn| burn / ms);
        println!(
            r#"{{"variant": "{variant}", "transport": "{transport}", "step_ms": {step_ms:.2}, "rounds_ms": [{}], "x_floor": {x_floor}, "x_lockstep": {x_lockstep}, "speedup_over_burn": {speedup_over_burn}, "faults_per_step": {faults:.0}, "overlap": {overlap}, "default": {}}}"#,
            rounds.join(", "),
            *variant == "default"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(step_ms: f64, faults_per_step: f64) -> Timing {
        Timing { step_ms, faults_per_step, overlap: None }
    }

    #[test]
    fn a_group_step_is_its_slowest_workers() {
        let group = group_timing(&[timing(70.0, 2.0), timing(74.0, 4.0)]);
        assert_eq!(group.step_ms, 74.0);
        assert_eq!(group.faults_per_step, 3.0);
    }

    #[test]
    fn ratios_pair_each_round_with_its_anchor_in_the_same_round() {
        // The machine slows down in round 2: every variant's time rises, the ratio does not.
        let floor = [timing(70.0, 0.0), timing(90.0, 0.0), timing(72.0, 0.0)];
        let ddp = [timing(73.5, 0.0), timing(94.5, 0.0), timing(75.6, 0.0)];
        assert_eq!(paired_ratio(&ddp, Some(&floor), |ms, floor| ms / floor), "1.0500");
        // One round slowed down for one variant alone is an outlier the median drops
        // (the ratio of the medians would say 90.0 / 72.0 = 1.25).
        let ddp = [timing(73.5, 0.0), timing(94.5, 0.0), timing(90.0, 0.0)];
        assert_eq!(paired_ratio(&ddp, Some(&floor), |ms, floor| ms / floor), "1.0500");
        assert_eq!(paired_ratio(&ddp, None, |ms, floor| ms / floor), "null");
    }
}

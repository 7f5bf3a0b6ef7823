//! `cargo xtask bench WHAT`: builds the benchmark program in release, runs
//! it, runs the matching anchor (PyTorch, when `BONFIRE_TORCH_PYTHON` names a
//! Python with torch), and prints both as JSON lines or as a table of ratios.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo_build, release_dir, root};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
    /// Print one JSON object a line instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum What {
    /// All-reduce bus bandwidth: in-process, TCP ring and MPI (where installed) against PyTorch Gloo.
    Allreduce {
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// Buffer sizes in MiB of f32.
        #[arg(long, default_value = "1,4,25,100")]
        sizes_mib: String,
    },
    /// Per-step time of DDP (2 workers, CPU, 10 M parameters) against Burn's own.
    Ddp {
        /// Timed steps per variant.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Samples per worker per step.
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// Forward and backward time of each kernel against Burn's op and PyTorch, at LeNet's and the ResNet's shapes.
    Kernels {
        /// Images per batch.
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// Timed repetitions of each operation.
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Threads of each side (rayon's pool for Bonfire and Burn, torch.set_num_threads).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Training images/s of `bonfire train` (DDP over 2 processes, DP, alone; CPU) against PyTorch, at equal threads.
    Train {
        /// Timed steps per run (after 5 warm-up steps).
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Global batch (split over the 2 workers).
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Models to measure.
        #[arg(long, default_value = "lenet,resnet")]
        models: String,
    },
    /// All-reduce over simulated hosts (network namespaces on rate-limited links; root only), TCP ring
    /// and MPI (where installed), beside the alpha-beta model and its extrapolation to larger worlds.
    Cluster {
        /// Simulated hosts, one rank on each.
        #[arg(long, default_value_t = 4)]
        hosts: usize,
        /// Link rates to measure, as tc writes them.
        #[arg(long, default_value = "10gbit,1gbit")]
        rates: String,
    },
    /// DP step time over two distinct wgpu devices against two replicas on one device and one device alone.
    DpWgpu {
        /// Timed steps per run (after 5 warm-up steps).
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Global batch (split over the 2 replicas).
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Models to measure.
        #[arg(long, default_value = "lenet")]
        models: String,
        /// The two devices (`bonfire train --devices`); lavapipe's two by default.
        #[arg(long, default_value = "default,cpu")]
        devices: String,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Allreduce { world, sizes_mib } => allreduce(world, &sizes_mib, args.json),
        What::Ddp { steps, batch } => ddp(steps, batch, args.json),
        What::Kernels { batch, reps, threads } => kernels(batch, reps, threads, args.json),
        What::Train { steps, batch, models } => train(steps, batch, &models, args.json),
        What::DpWgpu { steps, batch, models, devices } => dp_wgpu(steps, batch, &models, &devices, args.json),
        What::Cluster { hosts, rates } => {
            crate::cluster::run(&build_bench()?, hosts, &rates, mpi_installed(), args.json)
        }
    }
}

/// Builds `bonfire-bench` in release. The feature set is always the same on
/// a machine (MPI is in it where an MPI library and its headers are), so
/// that each benchmark reuses the others' build.
fn build_bench() -> Result<std::path::PathBuf> {
    eprintln!("building the benchmarks (release)...");
    let features = if mpi_installed() { "burn-baseline,mpi" } else { "burn-baseline" };
    cargo_build(&["--release", "--quiet", "-p", "bonfire-bench", "--features", features], &[], "bonfire-bench")?;
    Ok(release_dir().join("bonfire-bench"))
}

/// Whether MPI's compiler wrapper and launcher are on the PATH.
fn mpi_installed() -> bool {
    ["mpicc", "mpirun"]
        .iter()
        .all(|tool| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// Runs `cmd` and parses each stdout line that is a JSON object.
fn json_lines(cmd: &mut Command, what: &str) -> Result<Vec<Value>> {
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", out.status);
    }
    Ok(json_objects(&out.stdout))
}

/// The lines of a benchmark's stdout that are JSON objects (its results).
pub fn json_objects(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect()
}

/// The PyTorch interpreter for anchors, if the user named one.
fn torch_python() -> Option<String> {
    let py = std::env::var("BONFIRE_TORCH_PYTHON").ok().filter(|p| !p.is_empty());
    if py.is_none() {
        eprintln!("note: PyTorch baseline skipped; set BONFIRE_TORCH_PYTHON to a Python that has torch");
    }
    py
}

fn allreduce(world: usize, sizes: &str, json: bool) -> Result<()> {
    let bench = build_bench()?;
    let mut rows = json_lines(
        Command::new(&bench)
            .args(["allreduce", "--world", &world.to_string(), "--sizes-mib", sizes])
            .args(["--impl", if mpi_installed() { "inproc,tcp,mpi" } else { "inproc,tcp" }]),
        "the all-reduce benchmark",
    )?;
    if let Some(py) = torch_python() {
        eprintln!("running the PyTorch Gloo baseline...");
        rows.extend(json_lines(
            Command::new(py).arg(root().join("bench/torch_allreduce.py")).args([
                "--world",
                &world.to_string(),
                "--sizes-mib",
                sizes,
                "--json",
            ]),
            "the PyTorch Gloo baseline",
        )?);
    }
    if json {
        for r in &rows {
            println!("{r}");
        }
        return Ok(());
    }
    // bytes -> impl -> busbw
    let mut table: BTreeMap<u64, BTreeMap<String, f64>> = BTreeMap::new();
    for r in &rows {
        if let (Some(b), Some(i), Some(bw)) = (r["bytes"].as_u64(), r["impl"].as_str(), r["busbw_gbs"].as_f64()) {
            table.entry(b).or_default().insert(i.to_string(), bw);
        }
    }
    let memcpy = json_lines(Command::new(&bench).arg("memcpy"), "the memcpy measurement")?
        .first()
        .and_then(|v| v["memcpy_gbs"].as_f64());
    println!("all-reduce, world {world}, f32; busbw in GB/s (nccl-tests definition)");
    if let Some(m) = memcpy {
        println!("machine memcpy, 1 thread, 256 MiB: {m:.2} GB/s");
    }
    println!("| size | in-process | TCP ring | MPI | PyTorch Gloo | in-process / Gloo | TCP / Gloo | MPI / Gloo |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (bytes, by_impl) in &table {
        let cell = |k: &str| by_impl.get(k).map_or("-".to_string(), |v| format!("{v:.2}"));
        let ratio = |k: &str| match (by_impl.get(k), by_impl.get("gloo")) {
            (Some(a), Some(g)) if *g > 0.0 => format!("{:.2}x", a / g),
            _ => "-".to_string(),
        };
        println!(
            "| {} MiB | {} | {} | {} | {} | {} | {} | {} |",
            bytes >> 20,
            cell("inproc"),
            cell("tcp"),
            cell("mpi"),
            cell("gloo"),
            ratio("inproc"),
            ratio("tcp"),
            ratio("mpi")
        );
    }
    Ok(())
}

fn ddp(steps: usize, batch: usize, json: bool) -> Result<()> {
    let bench = build_bench()?;
    let (steps, batch_arg) = (steps.to_string(), batch.to_string());
    let mut rows = json_lines(
        Command::new(&bench).args(["ddp", "--steps", &steps, "--batch", &batch_arg]),
        "the DDP benchmark (threads)",
    )?;
    rows.extend(json_lines(
        Command::new(&bench).args(["ddp", "--processes", "--steps", &steps, "--batch", &batch_arg]),
        "the DDP benchmark (processes)",
    )?);
    if json {
        for r in &rows {
            println!("{r}");
        }
        return Ok(());
    }
    for (transport, title) in [("inproc", "2 workers as threads"), ("tcp", "2 processes over the TCP ring")] {
        let row = |v: &str| rows.iter().find(|r| r["variant"] == v && r["transport"] == transport);
        let step_ms = |v: &str| row(v).and_then(|r| r["step_ms"].as_f64());
        let (floor, burn) = (step_ms("local"), step_ms("burn"));
        println!("DDP step time, {title}, Flex CPU backend, 10.0 M parameters, batch {batch} per worker");
        println!("| variant | ms / step | x floor | speed-up over Burn's own | page faults / step |");
        println!("|---|---:|---:|---:|---:|");
        for (name, label) in [
            ("local", "floor: 2 workers training alone, no communication"),
            ("default", "Bonfire DDP, `DdpConfig::default()`"),
            ("overlap", "Bonfire DDP, buckets overlapping backward"),
            ("no-overlap", "Bonfire DDP, buckets after backward"),
            ("per-parameter", "Bonfire, one all-reduce per parameter"),
            ("burn", "Burn 0.21 (burn-collective, GradientsParams::all_reduce)"),
        ] {
            let Some(r) = row(name) else { continue };
            let ms = r["step_ms"].as_f64().unwrap_or(f64::NAN);
            let ratio = |anchor: Option<f64>, f: fn(f64, f64) -> f64| {
                anchor.map_or("-".to_string(), |a| format!("{:.2}x", f(ms, a)))
            };
            let label = match r["overlap"].as_bool() {
                Some(o) if r["default"] == true => {
                    format!("{label} ({})", if o { "overlapping" } else { "after backward" })
                }
                _ => label.to_string(),
            };
            println!(
                "| {label} | {ms:.1} | {} | {} | {} |",
                ratio(floor, |ms, f| ms / f),
                ratio(burn, |ms, b| b / ms),
                r["faults_per_step"]
            );
        }
        println!();
    }
    Ok(())
}

fn kernels(batch: usize, reps: usize, threads: usize, json: bool) -> Result<()> {
    let bench = build_bench()?;
    let (batch, reps, threads) = (batch.to_string(), reps.to_string(), threads.to_string());
    let mut rows = json_lines(
        Command::new(&bench).args(["kernels", "--batch", &batch, "--reps", &reps]).env("RAYON_NUM_THREADS", &threads),
        "the kernel benchmark",
    )?;
    if let Some(py) = torch_python() {
        eprintln!("running the PyTorch baseline...");
        rows.extend(json_lines(
            Command::new(py).arg(root().join("bench/torch_kernels.py")).args([
                "--batch",
                &batch,
                "--reps",
                &reps,
                "--threads",
                &threads,
            ]),
            "the PyTorch kernel baseline",
        )?);
    }
    if json {
        for r in &rows {
            println!("{r}");
        }
        return Ok(());
    }
    let ms = |op: &str, imp: &str, field: &str| {
        rows.iter().find(|r| r["op"] == op && r["impl"] == imp).and_then(|r| r[field].as_f64())
    };
    let total = |op: &str, imp: &str| Some(ms(op, imp, "forward_ms")? + ms(op, imp, "backward_ms")?);
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    let speedup = |them: Option<f64>, us: Option<f64>| match (them, us) {
        (Some(t), Some(u)) if u > 0.0 => format!("{:.2}x", t / u),
        _ => "-".to_string(),
    };
    println!(
        "kernels, batch {batch}, {threads} thread(s); ms forward / backward; speed-up = their fwd+bwd time / Bonfire's"
    );
    println!("| operation | Bonfire | Burn (Flex) | PyTorch | speed-up over Burn | speed-up over PyTorch |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut ops: Vec<&str> = Vec::new();
    for op in rows.iter().filter_map(|r| r["op"].as_str()) {
        if !ops.contains(&op) {
            ops.push(op);
        }
    }
    for op in ops {
        let cell = |imp: &str| format!("{} / {}", fmt(ms(op, imp, "forward_ms")), fmt(ms(op, imp, "backward_ms")));
        println!(
            "| {op} | {} | {} | {} | {} | {} |",
            cell("bonfire"),
            cell("burn"),
            cell("torch"),
            speedup(total(op, "burn"), total(op, "bonfire")),
            speedup(total(op, "torch"), total(op, "bonfire"))
        );
    }
    Ok(())
}

/// Warm-up steps left out of the timing, on both sides.
const WARMUP_STEPS: usize = 5;

/// One measured configuration of `bench train`, the same on both sides.
#[derive(Clone, Copy)]
struct TrainRun<'a> {
    model: &'a str,
    /// `ddp` (one process a worker), `dp` (one process, a replica a
    /// worker) or `single`.
    strategy: &'a str,
    workers: usize,
    /// Compute threads of each process.
    threads: usize,
    global_batch: usize,
    backend: &'a str,
    /// `bonfire train --devices`, where given.
    devices: Option<&'a str>,
}

impl<'a> TrainRun<'a> {
    fn label(&self) -> String {
        match self.strategy {
            "ddp" => format!("DDP, {} processes x {} thread", self.workers, self.threads),
            "dp" => format!("DP, 1 process, {} replicas, {} threads", self.workers, self.threads),
            _ => format!("alone, 1 process, {} thread(s)", self.threads),
        }
    }

    fn cpu(model: &'a str, strategy: &'a str, workers: usize, threads: usize, global_batch: usize) -> Self {
        TrainRun { model, strategy, workers, threads, global_batch, backend: "cpu", devices: None }
    }
}

fn train(steps: usize, batch: usize, models: &str, json: bool) -> Result<()> {
    eprintln!("building bonfire (release)...");
    cargo_build(&["--release", "--quiet", "-p", "bonfire-train", "--bin", "bonfire"], &[], "bonfire")?;
    let bonfire = release_dir().join("bonfire");
    let python = torch_python();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let models: Vec<&str> = models.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for &model in &models {
        runs.push(TrainRun::cpu(model, "ddp", 2, 1, batch));
        runs.push(TrainRun::cpu(model, "dp", 2, cores, batch));
        runs.push(TrainRun::cpu(model, "single", 1, 1, batch / 2));
        runs.push(TrainRun::cpu(model, "single", 1, cores, batch / 2));
    }
    for run in &runs {
        eprintln!("bonfire: {}, {}, batch {}...", run.model, run.label(), run.global_batch);
        let ips = bonfire_images_per_sec(&bonfire, run, steps)?;
        rows.push(row("bonfire", run, ips));
        // PyTorch's DataParallel needs CUDA devices: on the CPU it runs the
        // module once, so there is no PyTorch DP row.
        if let (Some(py), false) = (&python, run.strategy == "dp") {
            eprintln!("PyTorch: {}, {}, batch {}...", run.model, run.label(), run.global_batch);
            let out = json_lines(
                Command::new(py).arg(root().join("bench/torch_ddp_train.py")).args([
                    "--world",
                    &run.workers.to_string(),
                    "--threads",
                    &run.threads.to_string(),
                    "--steps",
                    &steps.to_string(),
                    "--batch",
                    &run.global_batch.to_string(),
                    "--model",
                    run.model,
                    "--json",
                ]),
                "the PyTorch baseline",
            )?;
            if let Some(ips) = out.first().and_then(|r| r["images_per_sec"].as_f64()) {
                rows.push(row("torch", run, ips));
            }
        }
    }
    if json {
        for r in &rows {
            println!("{r}");
        }
        return Ok(());
    }
    let ips = |imp: &str, run: &TrainRun| {
        rows.iter()
            .find(|r| r["impl"] == imp && r["config"] == run.label() && r["model"] == run.model)
            .and_then(|r| r["images_per_sec"].as_f64())
    };
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    println!(
        "training images/s, Fashion-MNIST, SGD, {steps} steps after {WARMUP_STEPS} warm-up; global batch {batch} \
         (alone: {}); the same threads on both sides",
        batch / 2
    );
    println!("| model | configuration | Bonfire | PyTorch | Bonfire / PyTorch |");
    println!("|---|---|---:|---:|---:|");
    for run in &runs {
        let (ours, theirs) = (ips("bonfire", run), ips("torch", run));
        let ratio = match (ours, theirs) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".to_string(),
        };
        println!("| {} | {} | {} | {} | {ratio} |", run.model, run.label(), fmt(ours), fmt(theirs));
    }
    Ok(())
}

/// DP over two wgpu devices, where every move between them is staged
/// through host memory, against its two replicas on one device and one
/// device alone on the whole batch: what the staging costs.
fn dp_wgpu(steps: usize, batch: usize, models: &str, devices: &str, json: bool) -> Result<()> {
    eprintln!("building bonfire (release)...");
    cargo_build(&["--release", "--quiet", "-p", "bonfire-train", "--bin", "bonfire"], &[], "bonfire")?;
    let bonfire = release_dir().join("bonfire");
    let Some((first, _)) = devices.split_once(',') else { bail!("--devices {devices:?}: name two devices") };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    for model in models.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let run = |strategy, workers, devices| TrainRun {
            model,
            strategy,
            workers,
            threads: cores,
            global_batch: batch,
            backend: "wgpu",
            devices: Some(devices),
        };
        let runs = [
            ("two devices", run("dp", 2, devices)),
            ("one device", run("dp", 2, first)),
            ("alone", run("single", 1, first)),
        ];
        let mut times = Vec::new();
        for (label, run) in runs {
            eprintln!("bonfire: {model}, wgpu, {label} ({})...", run.devices.unwrap_or_default());
            let ms = 1e3 * batch as f64 / bonfire_images_per_sec(&bonfire, &run, steps)?;
            rows.push(serde_json::json!({
                "model": model, "devices": run.devices, "strategy": run.strategy, "replicas": run.workers,
                "global_batch": batch, "step_ms": ms,
            }));
            times.push((label, run, ms));
        }
        if !json {
            println!("DP step time on wgpu, {model}, global batch {batch}, {steps} steps after {WARMUP_STEPS} warm-up");
            println!("| configuration | devices | ms/step | two devices' time / this |");
            println!("|---|---|---:|---:|");
            let two = times[0].2;
            for (label, run, ms) in &times {
                println!("| {label} | {} | {ms:.1} | {:.2}x |", run.devices.unwrap_or_default(), two / ms);
            }
        }
    }
    if json {
        for r in &rows {
            println!("{r}");
        }
    }
    Ok(())
}

fn row(imp: &str, run: &TrainRun, images_per_sec: f64) -> Value {
    serde_json::json!({
        "impl": imp,
        "model": run.model,
        "config": run.label(),
        "strategy": run.strategy,
        "world": run.workers,
        "threads": run.threads,
        "global_batch": run.global_batch,
        "images_per_sec": images_per_sec,
    })
}

/// Runs `bonfire train` for warm-up plus `steps` steps, with `threads`
/// compute threads a process (rayon's pool, which Burn's Flex backend and
/// Bonfire's kernels share), and returns the images/s of the timed steps,
/// from rank 0's `steps.csv`.
fn bonfire_images_per_sec(bonfire: &std::path::Path, run: &TrainRun, steps: usize) -> Result<f64> {
    let out = std::env::temp_dir().join(format!(
        "bonfire-bench-train-{}-{}-{}-{}-{}-{}",
        std::process::id(),
        run.model,
        run.strategy,
        run.workers,
        run.threads,
        run.devices.unwrap_or(run.backend).replace(',', "+")
    ));
    let mut command = Command::new(bonfire);
    command.args(["train", "--strategy", run.strategy, "--workers", &run.workers.to_string()]).args([
        "--backend",
        run.backend,
        "--model",
        run.model,
    ]);
    if let Some(devices) = run.devices {
        command.args(["--devices", devices]);
    }
    let output = command
        .args(["--steps", &(WARMUP_STEPS + steps).to_string(), "--batch-size", &run.global_batch.to_string()])
        .arg("--out")
        .arg(&out)
        .env("RAYON_NUM_THREADS", run.threads.to_string())
        .output()
        .context("running bonfire")?;
    if !output.status.success() {
        bail!("bonfire train failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    let csv = std::fs::read_to_string(out.join("steps.csv")).context("reading steps.csv")?;
    let _ = std::fs::remove_dir_all(&out);
    let seconds: f64 =
        csv.lines().skip(1 + WARMUP_STEPS).filter_map(|l| l.rsplit(',').next()?.parse::<f64>().ok()).sum();
    if seconds <= 0.0 {
        bail!("steps.csv of bonfire train holds no timed steps");
    }
    Ok((steps * run.global_batch) as f64 / seconds)
}

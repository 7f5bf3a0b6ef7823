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
    /// All-reduce bus bandwidth: in-process and TCP ring against PyTorch Gloo.
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
    /// Training images/s of `bonfire train` (DDP over 2 processes and alone, CPU) against PyTorch over Gloo.
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
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Allreduce { world, sizes_mib } => allreduce(world, &sizes_mib, args.json),
        What::Ddp { steps, batch } => ddp(steps, batch, args.json),
        What::Train { steps, batch, models } => train(steps, batch, &models, args.json),
    }
}

/// Builds `bonfire-bench` in release. The feature set is always the same, so
/// that each benchmark reuses the others' build.
fn build_bench() -> Result<std::path::PathBuf> {
    eprintln!("building the benchmarks (release)...");
    cargo_build(&["--release", "--quiet", "-p", "bonfire-bench", "--features", "burn-baseline"], &[], "bonfire-bench")?;
    Ok(release_dir().join("bonfire-bench"))
}

/// Runs `cmd` and parses each stdout line that is a JSON object.
fn json_lines(cmd: &mut Command, what: &str) -> Result<Vec<Value>> {
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect())
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
        Command::new(&bench).args(["allreduce", "--world", &world.to_string(), "--sizes-mib", sizes]),
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
    println!("| size | in-process | TCP ring | PyTorch Gloo | in-process / Gloo | TCP / Gloo |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (bytes, by_impl) in &table {
        let cell = |k: &str| by_impl.get(k).map_or("-".to_string(), |v| format!("{v:.2}"));
        let ratio = |k: &str| match (by_impl.get(k), by_impl.get("gloo")) {
            (Some(a), Some(g)) if *g > 0.0 => format!("{:.2}x", a / g),
            _ => "-".to_string(),
        };
        println!(
            "| {} MiB | {} | {} | {} | {} | {} |",
            bytes >> 20,
            cell("inproc"),
            cell("tcp"),
            cell("gloo"),
            ratio("inproc"),
            ratio("tcp")
        );
    }
    Ok(())
}

fn ddp(steps: usize, batch: usize, json: bool) -> Result<()> {
    let bench = build_bench()?;
    let rows = json_lines(
        Command::new(&bench).args(["ddp", "--steps", &steps.to_string(), "--batch", &batch.to_string()]),
        "the DDP benchmark",
    )?;
    if json {
        for r in &rows {
            println!("{r}");
        }
        return Ok(());
    }
    let step_ms = |v: &str| rows.iter().find(|r| r["variant"] == v).and_then(|r| r["step_ms"].as_f64());
    let burn = step_ms("burn");
    println!("DDP step time, 2 workers (threads), Flex CPU backend, 10.0 M parameters, batch {batch} per worker");
    println!("| variant | ms / step | speed-up over Burn's own |");
    println!("|---|---:|---:|");
    for (name, label) in [
        ("local", "floor: 2 workers training alone, no communication"),
        ("overlap", "Bonfire DDP, buckets overlapping backward"),
        ("no-overlap", "Bonfire DDP, buckets after backward"),
        ("per-parameter", "Bonfire, one all-reduce per parameter"),
        ("burn", "Burn 0.21 (burn-collective, GradientsParams::all_reduce)"),
    ] {
        if let Some(ms) = step_ms(name) {
            let ratio = burn.map_or("-".to_string(), |b| format!("{:.2}x", b / ms));
            println!("| {label} | {ms:.1} | {ratio} |");
        }
    }
    Ok(())
}

/// Warm-up steps left out of the timing, on both sides.
const WARMUP_STEPS: usize = 5;

/// One measured configuration of `bench train`.
struct TrainRun<'a> {
    model: &'a str,
    /// `bonfire train --backend`.
    backend: &'a str,
    /// DDP over 2 processes, or one process alone (the floor).
    workers: usize,
    global_batch: usize,
}

fn train(steps: usize, batch: usize, models: &str, json: bool) -> Result<()> {
    eprintln!("building bonfire (release)...");
    cargo_build(&["--release", "--quiet", "-p", "bonfire-train", "--bin", "bonfire"], &[], "bonfire")?;
    let bonfire = release_dir().join("bonfire");
    let python = torch_python();
    let models: Vec<&str> = models.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
    let mut rows = Vec::new();
    for &model in &models {
        // NdArray is measured on LeNet only: it is the slower CPU backend by
        // far, and on the ResNet a run would take minutes.
        let backends: &[&str] = if model == "lenet" { &["cpu", "ndarray"] } else { &["cpu"] };
        for &backend in backends {
            for (workers, global_batch) in [(2, batch), (1, batch / 2)] {
                let run = TrainRun { model, backend, workers, global_batch };
                eprintln!("bonfire: {model}, {backend}, {workers} worker(s), batch {global_batch}...");
                let ips = bonfire_images_per_sec(&bonfire, &run, steps)?;
                rows.push(serde_json::json!({
                    "impl": format!("bonfire-{backend}"),
                    "model": model,
                    "world": workers,
                    "global_batch": global_batch,
                    "images_per_sec": ips,
                }));
            }
        }
        if let Some(py) = &python {
            for (world, global_batch) in [(2, batch), (1, batch / 2)] {
                eprintln!("PyTorch (Gloo): {model}, {world} process(es), batch {global_batch}...");
                rows.extend(json_lines(
                    Command::new(py).arg(root().join("bench/torch_ddp_train.py")).args([
                        "--world",
                        &world.to_string(),
                        "--steps",
                        &steps.to_string(),
                        "--batch",
                        &global_batch.to_string(),
                        "--model",
                        model,
                        "--json",
                    ]),
                    "the PyTorch DDP baseline",
                )?);
            }
        }
    }
    if json {
        for r in &rows {
            println!("{r}");
        }
        return Ok(());
    }
    let ips = |model: &str, imp: &str, world: u64| {
        rows.iter()
            .find(|r| r["model"] == model && r["impl"] == imp && r["world"].as_u64() == Some(world))
            .and_then(|r| r["images_per_sec"].as_f64())
    };
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".to_string(),
    };
    println!(
        "training images/s, Fashion-MNIST, SGD, {steps} steps after {WARMUP_STEPS} warm-up; DDP: 2 processes of 1 \
         thread, global batch {batch}; alone: 1 process, batch {}",
        batch / 2
    );
    println!("| model | implementation | DDP, 2 processes | alone | DDP / (2 x alone) | DDP / PyTorch DDP |");
    println!("|---|---|---:|---:|---:|---:|");
    for &model in &models {
        let torch = ips(model, "torch", 2);
        for (imp, label) in
            [("bonfire-cpu", "Bonfire, Flex"), ("bonfire-ndarray", "Bonfire, NdArray"), ("torch", "PyTorch, Gloo")]
        {
            let (ddp, alone) = (ips(model, imp, 2), ips(model, imp, 1));
            if ddp.is_none() {
                continue;
            }
            println!(
                "| {model} | {label} | {} | {} | {} | {} |",
                fmt(ddp),
                fmt(alone),
                ratio(ddp, alone.map(|a| 2.0 * a)),
                ratio(ddp, torch)
            );
        }
    }
    Ok(())
}

/// Runs `bonfire train` for warm-up plus `steps` steps and returns the
/// images/s of the timed steps, from rank 0's `steps.csv`.
fn bonfire_images_per_sec(bonfire: &std::path::Path, run: &TrainRun, steps: usize) -> Result<f64> {
    let out = std::env::temp_dir().join(format!(
        "bonfire-bench-train-{}-{}-{}-{}",
        std::process::id(),
        run.backend,
        run.model,
        run.workers
    ));
    let strategy = if run.workers > 1 { "ddp" } else { "single" };
    let output = Command::new(bonfire)
        .args(["train", "--strategy", strategy, "--workers", &run.workers.to_string()])
        .args(["--backend", run.backend, "--model", run.model])
        .args(["--steps", &(WARMUP_STEPS + steps).to_string(), "--batch-size", &run.global_batch.to_string()])
        .arg("--out")
        .arg(&out)
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

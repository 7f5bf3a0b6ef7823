//! Whole training runs: `bonfire train` against PyTorch at equal threads,
//! and DP over two wgpu devices.

use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{allocator_note, json_lines, same_allocator, torch_python};
use crate::{cargo_build, release_dir, root};

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
    /// `bonfire train --sync-batch-norm` (no PyTorch row: its SyncBatchNorm
    /// needs CUDA devices).
    sync_batch_norm: bool,
}

impl<'a> TrainRun<'a> {
    fn label(&self) -> String {
        match self.strategy {
            "ddp" if self.sync_batch_norm => {
                format!("DDP, {} processes x {} thread, SyncBatchNorm", self.workers, self.threads)
            }
            "ddp" => format!("DDP, {} processes x {} thread", self.workers, self.threads),
            "dp" => format!("DP, 1 process, {} replicas, {} threads", self.workers, self.threads),
            _ => format!("alone, 1 process, {} thread(s)", self.threads),
        }
    }

    fn cpu(model: &'a str, strategy: &'a str, workers: usize, threads: usize, global_batch: usize) -> Self {
        TrainRun {
            model,
            strategy,
            workers,
            threads,
            global_batch,
            backend: "cpu",
            devices: None,
            sync_batch_norm: false,
        }
    }
}

pub fn train(steps: usize, batch: usize, models: &str, json: bool) -> Result<()> {
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
        if model == "resnet" {
            runs.push(TrainRun { sync_batch_norm: true, ..TrainRun::cpu(model, "ddp", 2, 1, batch) });
        }
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
        if let (Some(py), false) = (&python, run.strategy == "dp" || run.sync_batch_norm) {
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
         (alone: {}); the same threads on both sides; both timed on rank 0's wall clock from the end of the \
         warm-up to the end of the last step",
        batch / 2
    );
    println!("{}", allocator_note());
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
    for synced in runs.iter().filter(|r| r.sync_batch_norm) {
        let plain = TrainRun { sync_batch_norm: false, ..*synced };
        if let (Some(a), Some(b)) = (ips("bonfire", synced), ips("bonfire", &plain)) {
            println!(
                "{}: SyncBatchNorm trains at {:.2}x the images/s of plain batch norm under DDP",
                synced.model,
                a / b
            );
        }
    }
    Ok(())
}

/// DP over two wgpu devices, where every move between them is staged
/// through host memory, against its two replicas on one device and one
/// device alone on the whole batch: what the staging costs.
pub fn dp_wgpu(steps: usize, batch: usize, models: &str, devices: &str, json: bool) -> Result<()> {
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
            sync_batch_norm: false,
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
/// Bonfire's kernels share), and returns the images/s of the timed steps:
/// rank 0's wall-clock time from the end of the last warm-up step to the
/// end of the last step (`steps.csv`'s `elapsed`), the window PyTorch's
/// baseline times between its two barriers.
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
    if run.sync_batch_norm {
        command.arg("--sync-batch-norm");
    }
    let output = same_allocator(&mut command)
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
    let ends: Vec<f64> = csv.lines().skip(1).filter_map(|l| l.split(',').nth(3)?.parse::<f64>().ok()).collect();
    if ends.len() != WARMUP_STEPS + steps {
        bail!("steps.csv of bonfire train has {} steps, not {}", ends.len(), WARMUP_STEPS + steps);
    }
    let seconds = ends[ends.len() - 1] - ends[WARMUP_STEPS - 1];
    if seconds <= 0.0 {
        bail!("steps.csv of bonfire train holds no timed steps");
    }
    Ok((steps * run.global_batch) as f64 / seconds)
}

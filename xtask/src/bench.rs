//! `cargo xtask bench WHAT`: builds the benchmark program in release, runs
//! it, runs the matching anchor (PyTorch, when `BONFIRE_TORCH_PYTHON` names a
//! Python with torch), and prints both as JSON lines or as a table of ratios.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{release_dir, root};

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
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Allreduce { world, sizes_mib } => allreduce(world, &sizes_mib, args.json),
        What::Ddp { steps, batch } => ddp(steps, batch, args.json),
    }
}

/// Builds `bonfire-bench` in release. The feature set is always the same, so
/// that each benchmark reuses the others' build.
fn build_bench() -> Result<std::path::PathBuf> {
    eprintln!("building the benchmarks (release)...");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--quiet", "-p", "bonfire-bench", "--features", "burn-baseline"])
        .current_dir(root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("building bonfire-bench failed");
    }
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

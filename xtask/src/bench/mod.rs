//! `cargo xtask bench WHAT`: builds the benchmark program in release, runs
//! it, runs the matching anchor (PyTorch, when `BONFIRE_TORCH_PYTHON` names a
//! Python with torch), and prints both as JSON lines or as a table of ratios.

mod cluster;
mod comm_hooks;
mod micro;
mod training;

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo_build, release_dir};

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
    /// Adam's state per rank and the step time of DDP (10 M parameters, CPU), whole and sharded (ZeRO-1).
    Zero {
        /// Timed steps per run.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// World sizes, comma-separated.
        #[arg(long, default_value = "2,4")]
        worlds: String,
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
    /// Comm hooks (mean, bf16, PowerSGD at rank 1, 2, 4): LeNet's step time over 2 simulated hosts on
    /// rate-limited links (root only), and bytes a step and test accuracy after some epochs on this host.
    CommHooks {
        /// Link rates to measure, as tc writes them.
        #[arg(long, default_value = "100mbit,1gbit")]
        rates: String,
        /// Steps per run over the hosts (the first 10 are left out).
        #[arg(long, default_value_t = 150)]
        steps: usize,
        /// Epochs of Fashion-MNIST per run on this host.
        #[arg(long, default_value_t = 2)]
        epochs: usize,
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
        What::Allreduce { world, sizes_mib } => micro::allreduce(world, &sizes_mib, args.json),
        What::Ddp { steps, batch } => micro::ddp(steps, batch, args.json),
        What::Kernels { batch, reps, threads } => micro::kernels(batch, reps, threads, args.json),
        What::Zero { steps, worlds } => micro::zero(steps, &worlds, args.json),
        What::Train { steps, batch, models } => training::train(steps, batch, &models, args.json),
        What::DpWgpu { steps, batch, models, devices } => training::dp_wgpu(steps, batch, &models, &devices, args.json),
        What::CommHooks { rates, steps, epochs } => comm_hooks::run(&rates, steps, epochs, args.json),
        What::Cluster { hosts, rates } => cluster::run(&build_bench()?, hosts, &rates, mpi_installed(), args.json),
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

/// Runs `cmd` with the benchmarks' allocator settings and parses each
/// stdout line that is a JSON object.
fn json_lines(cmd: &mut Command, what: &str) -> Result<Vec<Value>> {
    let out = same_allocator(cmd).stderr(Stdio::inherit()).output().with_context(|| format!("starting {what}"))?;
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

/// The C allocator's settings every side of a benchmark runs with, given to
/// each process through glibc's tunables: the values Bonfire's
/// `keep_freed_memory` sets through mallopt (blocks under 32 MiB from the
/// heap, no trimming, 256 MiB kept at the top), which PyTorch's allocations
/// then get too.
pub const GLIBC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647:glibc.malloc.top_pad=268435456";

/// `command` with the benchmarks' allocator settings ([`GLIBC_TUNABLES`]).
fn same_allocator(command: &mut Command) -> &mut Command {
    command.env("GLIBC_TUNABLES", GLIBC_TUNABLES)
}

/// The line a table of ratios starts with, saying what both sides shared.
fn allocator_note() -> String {
    format!("allocator: glibc with GLIBC_TUNABLES={GLIBC_TUNABLES} on both sides")
}

/// The PyTorch interpreter for anchors, if the user named one.
fn torch_python() -> Option<String> {
    let py = std::env::var("BONFIRE_TORCH_PYTHON").ok().filter(|p| !p.is_empty());
    if py.is_none() {
        eprintln!("note: PyTorch baseline skipped; set BONFIRE_TORCH_PYTHON to a Python that has torch");
    }
    py
}

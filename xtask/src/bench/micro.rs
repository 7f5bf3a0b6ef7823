//! The micro-benchmarks: all-reduce bandwidth, a DDP step, and each kernel,
//! against Gloo, Burn's own and PyTorch.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::Result;

use super::{allocator_note, build_bench, json_lines, mpi_installed, torch_python};
use crate::root;

pub fn allreduce(world: usize, sizes: &str, json: bool) -> Result<()> {
    let bench = build_bench()?;
    let mut rows = json_lines(
        Command::new(&bench)
            .args(["allreduce", "--world", &world.to_string(), "--sizes-mib", sizes])
            .args(["--impl", if mpi_installed() { "inproc,shm,tcp,mpi" } else { "inproc,shm,tcp" }]),
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
    println!("{}", allocator_note());
    if let Some(m) = memcpy {
        println!("machine memcpy, 1 thread, 256 MiB: {m:.2} GB/s");
    }
    println!("ring: through shared memory between the processes, and over loopback sockets alone");
    println!(
        "| size | in-process | ring, shared memory | ring, sockets | MPI | PyTorch Gloo | in-process / Gloo | shared memory / Gloo | sockets / Gloo | MPI / Gloo |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (bytes, by_impl) in &table {
        let cell = |k: &str| by_impl.get(k).map_or("-".to_string(), |v| format!("{v:.2}"));
        let ratio = |k: &str| match (by_impl.get(k), by_impl.get("gloo")) {
            (Some(a), Some(g)) if *g > 0.0 => format!("{:.2}x", a / g),
            _ => "-".to_string(),
        };
        println!(
            "| {} MiB | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            bytes >> 20,
            cell("inproc"),
            cell("shm"),
            cell("tcp"),
            cell("mpi"),
            cell("gloo"),
            ratio("inproc"),
            ratio("shm"),
            ratio("tcp"),
            ratio("mpi")
        );
    }
    Ok(())
}

pub fn ddp(steps: usize, batch: usize, json: bool) -> Result<()> {
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
    for (transport, title) in [("inproc", "2 workers as threads"), ("tcp", "2 processes over the ring")] {
        let row = |v: &str| rows.iter().find(|r| r["variant"] == v && r["transport"] == transport);
        println!("DDP step time, {title}, Flex CPU backend, 10.0 M parameters, batch {batch} per worker");
        println!("| variant | ms / step | x floor | x lockstep | speed-up over Burn's own | page faults / step |");
        println!("|---|---:|---:|---:|---:|---:|");
        for (name, label) in [
            ("local", "floor: 2 workers training alone, no communication"),
            ("lockstep", "floor in lockstep: one barrier a step, no gradients exchanged"),
            ("default", "Bonfire DDP, `DdpConfig::default()`"),
            ("sockets", "Bonfire DDP, `DdpConfig::default()`, the ring's sockets alone"),
            ("overlap", "Bonfire DDP, buckets overlapping backward"),
            ("no-overlap", "Bonfire DDP, buckets after backward"),
            ("per-parameter", "Bonfire, one all-reduce per parameter"),
            ("burn", "Burn 0.21 (burn-collective, GradientsParams::all_reduce)"),
        ] {
            let Some(r) = row(name) else { continue };
            let ms = r["step_ms"].as_f64().unwrap_or(f64::NAN);
            // Each round's ratio to the anchor measured in the same round, median over rounds.
            let ratio = |key: &str| r[key].as_f64().map_or("-".to_string(), |x| format!("{x:.2}x"));
            let label = match r["overlap"].as_bool() {
                Some(o) if r["default"] == true => {
                    format!("{label} ({})", if o { "overlapping" } else { "after backward" })
                }
                _ => label.to_string(),
            };
            println!(
                "| {label} | {ms:.1} | {} | {} | {} | {} |",
                ratio("x_floor"),
                ratio("x_lockstep"),
                ratio("speedup_over_burn"),
                r["faults_per_step"]
            );
        }
        println!();
    }
    Ok(())
}

pub fn zero(steps: usize, worlds: &str, json: bool) -> Result<()> {
    let bench = build_bench()?;
    let rows = json_lines(
        Command::new(&bench).args(["zero", "--steps", &steps.to_string(), "--worlds", worlds]),
        "the ZeRO benchmark",
    )?;
    if json {
        for r in &rows {
            println!("{r}");
        }
        return Ok(());
    }
    println!(
        "DDP with Adam, workers as threads, Flex CPU backend, 10.0 M parameters, batch 32 per worker, {steps} steps"
    );
    println!("| workers | Adam | state per rank (MB, each rank) | ms / step | x whole |");
    println!("|---:|---|---|---:|---:|");
    for r in &rows {
        let whole = rows.iter().find(|w| w["world"] == r["world"] && w["optimizer"] == "whole");
        let ms = r["median_step_ms"].as_f64().unwrap_or(f64::NAN);
        let ratio = whole.and_then(|w| w["median_step_ms"].as_f64()).map_or(f64::NAN, |w| ms / w);
        let bytes: Vec<String> = r["state_bytes"]
            .as_array()
            .map(|a| a.iter().filter_map(|b| b.as_f64()).map(|b| format!("{:.1}", b / 1e6)).collect())
            .unwrap_or_default();
        println!(
            "| {} | {} | {} | {ms:.1} | {ratio:.2}x |",
            r["world"],
            r["optimizer"].as_str().unwrap_or("?"),
            bytes.join(", ")
        );
    }
    Ok(())
}

pub fn kernels(batch: usize, reps: usize, threads: usize, json: bool) -> Result<()> {
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
        "kernels, batch {batch}, {threads} thread(s); ms forward / backward; speed-up = their fwd+bwd time / Bonfire's; \
         a first convolution (on the images) without the input's gradient, on every side"
    );
    println!("{}", allocator_note());
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

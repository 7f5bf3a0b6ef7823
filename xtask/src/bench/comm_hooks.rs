//! `cargo xtask bench comm-hooks`: what each comm hook of `bonfire train
//! --comm-hook` sends and what it costs, against the plain mean measured in
//! the same run: LeNet's step time over 2 simulated hosts on rate-limited
//! links (root only; one worker a host), and, on this host, the bytes a step
//! and the test accuracy after some epochs of DDP over 2 processes.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::cluster::{hosts_script, Hosts};
use super::same_allocator;
use crate::{cargo_build, release_dir};

/// The hooks measured: a label and the flags that pick it.
const HOOKS: [(&str, &[&str]); 5] = [
    ("mean", &["--comm-hook", "mean"]),
    ("bf16", &["--comm-hook", "bf16"]),
    ("PowerSGD, rank 1", &["--comm-hook", "power-sgd", "--power-sgd-rank", "1"]),
    ("PowerSGD, rank 2", &["--comm-hook", "power-sgd", "--power-sgd-rank", "2"]),
    ("PowerSGD, rank 4", &["--comm-hook", "power-sgd", "--power-sgd-rank", "4"]),
];

/// Steps left out of the step times.
const WARMUP_STEPS: usize = 10;

pub fn run(rates: &str, steps: usize, epochs: usize, json: bool) -> Result<()> {
    eprintln!("building bonfire (release)...");
    cargo_build(&["--release", "--quiet", "-p", "bonfire-train", "--bin", "bonfire"], &[], "bonfire")?;
    let bonfire = release_dir().join("bonfire");
    let scratch = std::env::temp_dir().join("bonfire-bench-comm-hooks");
    let mut rows = Vec::new();
    for (k, rate) in rates.split(',').map(str::trim).filter(|r| !r.is_empty()).enumerate() {
        let (name, subnet) = (format!("bfh{k}"), 80 + k);
        let _hosts = Hosts::up(&name, 2, subnet, rate)?;
        for (hook, flags) in HOOKS {
            eprintln!("2 hosts at {rate}: {hook}, {steps} steps...");
            let out = scratch.join(format!("link-{k}-{}", hook.replace([',', ' '], "")));
            let ms = over_hosts(&bonfire, &name, subnet, steps, flags, &out)?;
            rows.push(json!({"what": "step", "rate": rate, "hook": hook, "median_step_ms": ms}));
        }
    }
    for (hook, flags) in HOOKS {
        eprintln!("this host, 2 processes: {hook}, {epochs} epochs...");
        let out = scratch.join(format!("epochs-{}", hook.replace([',', ' '], "")));
        let o = same_allocator(Command::new(&bonfire).args(["train", "--epochs", &epochs.to_string()]).args(flags))
            .arg("--out")
            .arg(&out)
            .output()
            .context("starting bonfire train")?;
        if !o.status.success() {
            bail!("{hook}: bonfire train failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        let accuracy = printed(&o, "test accuracy: ").context("no test accuracy printed")?;
        let bytes = printed(&o, "comm hook: ");
        rows.push(json!({"what": "epochs", "hook": hook, "epochs": epochs, "test_accuracy": accuracy, "bytes": bytes}));
    }
    if json {
        rows.iter().for_each(|r| println!("{r}"));
        return Ok(());
    }
    print_tables(&rows, steps, epochs);
    Ok(())
}

/// One worker on each of the two hosts; rank 0's median step in ms.
fn over_hosts(bonfire: &Path, name: &str, subnet: usize, steps: usize, flags: &[&str], out: &Path) -> Result<f64> {
    let workers = (0..2)
        .map(|i| {
            let mut cmd = hosts_script();
            cmd.args(["exec", name, &i.to_string(), "env", "BONFIRE_JOB_TOKEN=bench"])
                .arg(bonfire)
                .args(["launch", "--nnodes", "2", "--node-rank", &i.to_string(), "--nproc-per-node", "1"])
                .args(["--master-addr", &format!("10.{subnet}.0.1"), "--master-port", "29512", "--"])
                .arg(bonfire)
                .args(["train", "--steps", &steps.to_string()])
                .args(flags)
                .arg("--out")
                .arg(out.join(i.to_string()));
            same_allocator(&mut cmd).stdout(std::process::Stdio::null()).spawn().context("starting a host's worker")
        })
        .collect::<Result<Vec<_>>>()?;
    for (i, w) in workers.into_iter().enumerate() {
        let o = w.wait_with_output()?;
        if !o.status.success() {
            bail!("the worker on host {i} failed: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let csv = std::fs::read_to_string(out.join("0/steps.csv")).context("reading rank 0's steps.csv")?;
    let mut seconds: Vec<f64> =
        csv.lines().skip(1 + WARMUP_STEPS).filter_map(|l| l.split(',').nth(2)?.parse().ok()).collect();
    if seconds.is_empty() {
        bail!("no steps after the warm-up: ask for more than {WARMUP_STEPS} steps");
    }
    seconds.sort_by(f64::total_cmp);
    Ok(seconds[seconds.len() / 2] * 1e3)
}

/// The number at the start of what follows `prefix` on a line of stdout.
fn printed(o: &Output, prefix: &str) -> Option<f64> {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix(prefix))?;
    line.split_whitespace().next()?.parse().ok()
}

fn print_tables(rows: &[Value], steps: usize, epochs: usize) {
    let of = |what: &'static str| rows.iter().filter(move |r| r["what"] == what);
    println!(
        "LeNet, DDP over 2 simulated hosts (one worker each), batch 100: median step of {steps} after {WARMUP_STEPS}"
    );
    println!("| link | hook | ms a step | / mean |");
    println!("|---|---|---:|---:|");
    for r in of("step") {
        let mean = of("step").find(|m| m["rate"] == r["rate"] && m["hook"] == "mean");
        let ms = r["median_step_ms"].as_f64().unwrap_or(f64::NAN);
        let base = mean.and_then(|m| m["median_step_ms"].as_f64()).unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {ms:.1} | {:.2}x |",
            r["rate"].as_str().unwrap_or(""),
            r["hook"].as_str().unwrap_or(""),
            ms / base
        );
    }
    println!();
    println!("LeNet, DDP over 2 processes on this host, batch 100, {epochs} epoch(s) of Fashion-MNIST");
    println!("| hook | bytes a step (rank 0, payload) | test accuracy |");
    println!("|---|---:|---:|");
    // The mean is not metered (DDP averages it where the gradients lie):
    // it sends 4 bytes for each value bf16 sends in 2.
    let bf16 = of("epochs").find(|r| r["hook"] == "bf16").and_then(|r| r["bytes"].as_f64());
    for r in of("epochs") {
        let bytes = r["bytes"].as_f64().or(bf16.filter(|_| r["hook"] == "mean").map(|b| 2.0 * b));
        let bytes = bytes.map_or("-".into(), |b| format!("{b:.0}"));
        println!(
            "| {} | {bytes} | {:.4} |",
            r["hook"].as_str().unwrap_or(""),
            r["test_accuracy"].as_f64().unwrap_or(f64::NAN)
        );
    }
}

//! `cargo xtask bench cluster`: the all-reduce over simulated hosts (network
//! namespaces on rate-limited links, made by `tests/cluster/hosts.sh`; root
//! only), one rank per host, beside the alpha-beta model of a ring,
//!
//!   t(n, S) = 2(n-1)·α + 2(n-1)/n · S/β,
//!
//! with β the link rate and α, the cost of one ring step apart from its
//! bytes, measured from the smallest message. The same model then gives
//! larger worlds on paper, beside the halving-doubling algorithm MPI
//! libraries use for short messages, t = 2·log2(n)·α + 2(n-1)/n · S/β.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::json_objects;
use crate::root;

/// Message sizes: the smallest gives α, the others the bandwidth regime.
const SIZES: [usize; 4] = [4 << 10, 1 << 20, 25 << 20, 100 << 20];

pub fn run(bench: &Path, hosts: usize, rates: &str, with_mpi: bool, json: bool) -> Result<()> {
    if hosts < 2 {
        bail!("--hosts must be at least 2");
    }
    let mut rows = Vec::new();
    let mut models = Vec::new();
    for (k, rate) in rates.split(',').enumerate() {
        let bits = rate_bits(rate)?;
        let name = format!("bfb{k}");
        let subnet = 90 + k;
        let _hosts = Hosts::up(&name, hosts, subnet, rate)?;
        eprintln!("{hosts} hosts at {rate}: TCP ring...");
        let mut measured = ring(bench, &name, hosts, subnet)?;
        if with_mpi {
            eprintln!("{hosts} hosts at {rate}: MPI...");
            measured.extend(mpi(bench, &name, hosts)?);
        }
        let beta = bits / 8.0;
        let seconds = |imp: &str, bytes: usize| {
            measured.iter().find(|r| r["impl"] == imp && r["bytes"] == bytes).and_then(|r| r["seconds"].as_f64())
        };
        let small = SIZES[0];
        let steps = 2.0 * (hosts - 1) as f64;
        let alpha = seconds("tcp", small)
            .map(|t| ((t - bandwidth_term(hosts, small, beta)) / steps).max(0.0))
            .context("no time for the smallest message")?;
        for &bytes in &SIZES {
            let model = ring_model(hosts, bytes, alpha, beta);
            rows.push(json!({
                "rate": rate, "hosts": hosts, "bytes": bytes, "alpha_us": alpha * 1e6,
                "ring_s": seconds("tcp", bytes), "model_s": model, "mpi_s": seconds("mpi", bytes),
            }));
        }
        models.push((rate.to_string(), alpha, beta));
    }
    if json {
        rows.iter().for_each(|r| println!("{r}"));
        return Ok(());
    }
    println!("all-reduce over {hosts} simulated hosts (one rank each), f32; seconds per call");
    println!("| link | size | TCP ring | model 2(n-1)α + 2(n-1)/n·S/β | ring / model | MPI |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        let s = |k: &str| r[k].as_f64().map_or("-".into(), |v| format!("{v:.4}"));
        let ratio = match (r["ring_s"].as_f64(), r["model_s"].as_f64()) {
            (Some(a), Some(b)) => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {ratio} | {} |",
            r["rate"].as_str().unwrap(),
            size(r["bytes"].as_u64().unwrap() as usize),
            s("ring_s"),
            s("model_s"),
            s("mpi_s")
        );
    }
    println!();
    println!("the model extrapolated (α measured above, β the link rate); seconds per all-reduce");
    println!("| link | α | ranks | size | ring | halving-doubling | ring's latency share |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (rate, alpha, beta) in &models {
        for n in [hosts, 64, 1024] {
            for bytes in [1 << 20, 25 << 20] {
                let ring = ring_model(n, bytes, *alpha, *beta);
                let hd = 2.0 * (n as f64).log2() * alpha + bandwidth_term(n, bytes, *beta);
                let latency = 2.0 * (n - 1) as f64 * alpha / ring;
                println!(
                    "| {rate} | {:.0} µs | {n} | {} | {ring:.4} | {hd:.4} | {:.0}% |",
                    alpha * 1e6,
                    size(bytes),
                    latency * 100.0
                );
            }
        }
    }
    Ok(())
}

fn bandwidth_term(n: usize, bytes: usize, beta: f64) -> f64 {
    2.0 * (n - 1) as f64 / n as f64 * bytes as f64 / beta
}

fn ring_model(n: usize, bytes: usize, alpha: f64, beta: f64) -> f64 {
    2.0 * (n - 1) as f64 * alpha + bandwidth_term(n, bytes, beta)
}

fn size(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// Bits per second of a tc rate such as `10gbit` or `100mbit`.
fn rate_bits(rate: &str) -> Result<f64> {
    let (number, scale) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)]
        .iter()
        .find_map(|(unit, scale)| rate.strip_suffix(unit).map(|n| (n, *scale)))
        .with_context(|| format!("rate {rate:?}: expected a number with gbit, mbit or kbit"))?;
    Ok(number.parse::<f64>().with_context(|| format!("rate {rate:?}"))? * scale)
}

fn sizes_arg() -> String {
    SIZES.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
}

/// The TCP ring, its store on host 0's address.
fn ring(bench: &Path, name: &str, hosts: usize, subnet: usize) -> Result<Vec<Value>> {
    let workers = (0..hosts)
        .map(|i| {
            let vars = [
                format!("RANK={i}"),
                format!("WORLD_SIZE={hosts}"),
                "LOCAL_RANK=0".into(),
                "LOCAL_WORLD_SIZE=1".into(),
                format!("MASTER_ADDR=10.{subnet}.0.1"),
                "MASTER_PORT=29500".into(),
                "BONFIRE_JOB_TOKEN=bench".into(),
            ];
            hosts_script()
                .args(["exec", name, &i.to_string(), "env"])
                .args(vars)
                .arg(bench)
                .args(["allreduce-worker", "--sizes-bytes", &sizes_arg()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("starting a benchmark rank")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    for (i, w) in workers.into_iter().enumerate() {
        let out = w.wait_with_output()?;
        if !out.status.success() {
            bail!("rank {i} of the ring failed: {}", out.status);
        }
        rows.extend(json_objects(&out.stdout));
    }
    Ok(rows)
}

/// One `mpirun` on host 0 whose remote shell enters the other hosts.
fn mpi(bench: &Path, name: &str, hosts: usize) -> Result<Vec<Value>> {
    let hostfile = std::env::temp_dir().join(format!("{name}-hostfile"));
    std::fs::write(&hostfile, (0..hosts).map(|i| format!("{name}-h{i} slots=1\n")).collect::<String>())?;
    let agent = format!("bash {} rsh", root().join("tests/cluster/hosts.sh").display());
    let out = hosts_script()
        .args(["exec", name, "0", "env", "OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1", "mpirun"])
        .args(["--hostfile", hostfile.to_str().unwrap(), "--mca", "plm_rsh_agent", &agent])
        .args(["--mca", "btl_tcp_if_include", "eth0", "--mca", "oob_tcp_if_include", "eth0"])
        // The simulated hosts share this machine's cores, but each has one
        // slot, so Open MPI would spin while it waits as on a dedicated node.
        .args(["--mca", "mpi_yield_when_idle", "1"])
        .args(["-x", "OMPI_ALLOW_RUN_AS_ROOT", "-x", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "-np", &hosts.to_string()])
        .arg(bench)
        .args(["allreduce-worker", "--mpi", "--sizes-bytes", &sizes_arg()])
        .output()
        .context("starting mpirun")?;
    if !out.status.success() {
        bail!("mpirun over the hosts failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(json_objects(&out.stdout))
}

/// `tests/cluster/hosts.sh`, to be given its arguments.
pub(super) fn hosts_script() -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("tests/cluster/hosts.sh"));
    cmd
}

/// The simulated hosts of one run; dropping removes them.
pub(super) struct Hosts {
    name: String,
    count: usize,
}

impl Hosts {
    pub(super) fn up(name: &str, count: usize, subnet: usize, rate: &str) -> Result<Hosts> {
        // Leftovers of an interrupted run would make `ip` refuse the names.
        let _ = hosts_script().args(["down", name, &count.to_string()]).output();
        let out = hosts_script().args(["up", name, &count.to_string(), &subnet.to_string(), rate]).output()?;
        if !out.status.success() {
            bail!("making the simulated hosts (needs root and iproute2): {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Hosts { name: name.into(), count })
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = hosts_script().args(["down", &self.name, &self.count.to_string()]).output();
    }
}

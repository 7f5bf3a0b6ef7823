//! Benchmark programs. `cargo xtask bench` builds this in release, runs it,
//! and sets its figures beside the anchors measured in the same run.

mod allreduce;
mod ddp;
mod kernels;
mod zero;

use clap::{Parser, Subcommand};

/// This program again, as rank `rank` of a `world`-process job on this host
/// whose rendezvous is at 127.0.0.1:`port` (torchrun's variables).
pub fn local_rank_command(rank: usize, world: usize, port: u16) -> std::io::Result<std::process::Command> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command.envs(bonfire_collective::DistEnv::local(rank, world, port).vars());
    Ok(command)
}

#[derive(Parser)]
#[command(about = "Bonfire benchmarks (run through `cargo xtask bench`)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// All-reduce bus bandwidth of the in-process and TCP communicators.
    Allreduce(allreduce::Args),
    /// Per-step time of DDP variants and Burn's own multi-device training.
    Ddp(ddp::Args),
    /// Forward and backward time of each kernel against Burn's own op, at LeNet's and the ResNet's shapes.
    Kernels(kernels::Args),
    /// Adam's state per rank and the step time, whole and sharded (ZeRO-1), over DDP.
    Zero(zero::Args),
    /// Single-thread memcpy bandwidth of 256 MiB: the ceiling of a host-staged collective.
    Memcpy,
    /// One rank of the TCP all-reduce benchmark (started by `allreduce`).
    #[command(hide = true)]
    AllreduceWorker(allreduce::WorkerArgs),
    /// One rank of the two-process DDP benchmark (started by `ddp --processes`).
    #[command(hide = true)]
    DdpWorker(ddp::WorkerArgs),
}

fn main() -> anyhow::Result<()> {
    bonfire_parallel::keep_freed_memory();
    match Cli::parse().command {
        Command::Allreduce(args) => allreduce::run(args),
        Command::Ddp(args) => ddp::run(args),
        Command::Kernels(args) => kernels::run(args),
        Command::Zero(args) => zero::run(args),
        Command::Memcpy => {
            allreduce::memcpy();
            Ok(())
        }
        Command::AllreduceWorker(args) => allreduce::worker(args),
        Command::DdpWorker(args) => ddp::worker(args),
    }
}

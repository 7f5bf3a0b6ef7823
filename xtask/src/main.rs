//! `cargo xtask`: the project's commands beyond `cargo build` and `cargo test`.

mod bench;
mod gpu_check;
mod test;
mod train;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Bonfire's project commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train (the `bonfire train` command; `cargo xtask train --help` for its flags).
    #[command(disable_help_flag = true)]
    Train {
        /// Arguments for `bonfire train`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks (release build), each beside an anchor measured in the same run.
    Bench(bench::Args),
    /// Prepare the CUDA check for a GPU machine: stripped binary, data subset, run.sh.
    GpuCheck(gpu_check::Args),
    /// The whole test suite and every example; installs the Debian packages the tests need first (as root).
    Test,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Train { args } => train::run(&args),
        Command::Bench(args) => bench::run(args),
        Command::GpuCheck(args) => gpu_check::run(args),
        Command::Test => test::run(),
    }
}

/// Runs `cargo build ARGS` in the workspace with extra environment `env`;
/// `what` names the build in the error.
pub fn cargo_build(args: &[&str], env: &[(&str, &str)], what: &str) -> anyhow::Result<()> {
    cargo(&[&["build"], args].concat(), env).map_err(|_| anyhow::anyhow!("building {what} failed"))
}

/// Runs `cargo ARGS` in the workspace with extra environment `env`.
pub fn cargo(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .status()
        .map_err(|e| anyhow::anyhow!("running cargo: {e}"))?;
    if !status.success() {
        anyhow::bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}

/// The workspace root.
///
/// `cargo run` (which `cargo xtask` is) says at run time where xtask's
/// manifest is; the path compiled in is only the fallback, because a build
/// folder shared by several clones of the same sources may hold an xtask
/// compiled in another clone, which would then test that clone.
pub fn root() -> PathBuf {
    let manifest =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    manifest.parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Where cargo puts its builds.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

/// Where cargo puts release binaries.
pub fn release_dir() -> PathBuf {
    target_dir().join("release")
}

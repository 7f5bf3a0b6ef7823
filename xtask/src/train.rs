//! `cargo xtask train ARGS`: builds the `bonfire` command and runs
//! `bonfire train ARGS`.
//!
//! It uses the dev profile, whose dependencies (Burn) are optimised, so that
//! it shares the test build instead of spending half an hour on a release
//! build; the training itself runs inside Burn's optimised kernels.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{root, target_dir};

pub fn run(args: &[String]) -> Result<()> {
    eprintln!("building bonfire...");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "-p", "bonfire-train", "--bin", "bonfire"])
        .current_dir(root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("building bonfire failed");
    }
    let status = Command::new(target_dir().join("debug").join("bonfire"))
        .arg("train")
        .args(args)
        .current_dir(root())
        .status()
        .context("running bonfire")?;
    std::process::exit(status.code().unwrap_or(1));
}

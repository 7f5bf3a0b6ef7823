//! `cargo xtask train ARGS`: builds the `bonfire` command and runs
//! `bonfire train ARGS`.
//!
//! It uses the dev profile, whose dependencies (Burn) are optimised, so that
//! it shares the test build instead of spending half an hour on a release
//! build; the training itself runs inside Burn's optimised kernels.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{cargo_build, root, target_dir};

pub fn run(args: &[String]) -> Result<()> {
    eprintln!("building bonfire...");
    cargo_build(&["--quiet", "-p", "bonfire-train", "--bin", "bonfire"], &[], "bonfire")?;
    let status = Command::new(target_dir().join("debug").join("bonfire"))
        .arg("train")
        .args(args)
        .current_dir(root())
        .status()
        .context("running bonfire")?;
    std::process::exit(status.code().unwrap_or(1));
}

//! `cargo xtask gpu-check`: prepares a folder that checks the CUDA path on a
//! machine with an NVIDIA GPU, CUDA and PyTorch but no Rust toolchain:
//! a stripped release `bonfire` built with the `cuda` feature (gzipped:
//! `run.sh` unpacks it, so that the folder fits what a check may carry), a
//! Fashion-MNIST subset, the PyTorch baseline, `run.sh` and the speed
//! table's `table.py`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo_build, release_dir, root, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Where to put the bundle.
    #[arg(long, default_value = "target/gpu-check")]
    out: PathBuf,
    /// Fashion-MNIST files to take the subset from.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    data_dir: PathBuf,
    /// Training images in the subset (the test split keeps a sixth as many);
    /// with the binary, the bundle must stay under 60 MiB.
    #[arg(long, default_value_t = 8_000)]
    train_images: usize,
    /// Also build Burn's own DDP (`bench/burn-ddp`, Burn's `distributed`
    /// feature, a build of its own) for the speed table's Burn row.
    #[arg(long)]
    burn_ddp: bool,
}

pub fn run(args: Args) -> Result<()> {
    eprintln!("building bonfire with the cuda feature (release, stripped)...");
    cargo_build(
        &["--release", "--quiet", "-p", "bonfire-train", "--bin", "bonfire", "--features", "cuda"],
        &[("CARGO_PROFILE_RELEASE_STRIP", "symbols")],
        "bonfire with the cuda feature",
    )?;
    let out = root().join(&args.out);
    let data = out.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    packed(&release_dir().join("bonfire"), &out.join("bonfire.gz"))?;
    if args.burn_ddp {
        eprintln!("building Burn's own DDP (bench/burn-ddp, release, its own build folder)...");
        let dir = target_dir().join("burn-ddp");
        cargo_build(
            &["--release", "--quiet", "--manifest-path", "bench/burn-ddp/Cargo.toml"],
            &[("CARGO_TARGET_DIR", dir.to_str().context("a build folder path that is not UTF-8")?)],
            "bench/burn-ddp",
        )?;
        packed(&dir.join("release/burn-ddp"), &out.join("burn-ddp.gz"))?;
    } else {
        // Not one left from an earlier bundle of other sources.
        let _ = std::fs::remove_file(out.join("burn-ddp.gz"));
    }
    for unpacked in ["bonfire", "burn-ddp"] {
        let _ = std::fs::remove_file(out.join(unpacked));
    }
    std::fs::copy(root().join("bench/torch_ddp_train.py"), out.join("torch_ddp_train.py"))?;
    std::fs::copy(root().join("xtask/gpu-check/table.py"), out.join("table.py"))?;
    for (split, n) in [("train", args.train_images), ("t10k", args.train_images / 6)] {
        for (kind, record) in [("images-idx3-ubyte", 28 * 28), ("labels-idx1-ubyte", 1)] {
            let name = format!("{split}-{kind}.gz");
            subset(&args.data_dir.join(&name), &data.join(&name), n, record)?;
        }
    }
    std::fs::write(out.join("cubecl.toml"), CUBECL_TOML)?;
    let script = out.join("run.sh");
    std::fs::write(&script, RUN_SH)?;
    Command::new("chmod").arg("+x").arg(&script).status()?;
    let bytes: u64 = walk(&out)?.iter().map(|f| f.metadata().map_or(0, |m| m.len())).sum();
    eprintln!("ready: {} ({:.1} MiB); on the GPU machine run ./run.sh in it", out.display(), bytes as f64 / 1048576.0);
    if bytes > 60 << 20 {
        bail!("the bundle is {:.1} MiB, over the 60 MiB a check may carry", bytes as f64 / 1048576.0);
    }
    Ok(())
}

/// Gzips the program `from` into `to`.
fn packed(from: &Path, to: &Path) -> Result<()> {
    let mut input = std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let output = std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let mut gz = flate2::write::GzEncoder::new(output, flate2::Compression::default());
    std::io::copy(&mut input, &mut gz).with_context(|| format!("packing {}", from.display()))?;
    gz.finish()?;
    Ok(())
}

/// Writes the first `n` records of the gzipped IDX file `from` to `to`,
/// with the count in the header changed to `n`.
fn subset(from: &Path, to: &Path, n: usize, record: usize) -> Result<()> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading {}", from.display()))?;
    let header = 4 + 4 * raw.get(3).copied().unwrap_or(0) as usize;
    let available = raw.len().saturating_sub(header) / record;
    if raw.len() < header || available < n {
        bail!("{} holds {available} records, fewer than the {n} asked for", from.display());
    }
    raw[4..8].copy_from_slice(&(n as u32).to_be_bytes());
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(to)?, flate2::Compression::default());
    gz.write_all(&raw[..header + n * record])?;
    gz.finish()?;
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

/// The check itself. Each step prints what it measured; the script goes on
/// after a failed step and exits non-zero at the end if any failed.
const RUN_SH: &str = include_str!("../gpu-check/run.sh");

/// CubeCL's settings for the check: compiled kernels (PTX) and autotune
/// results kept in the folder, so that only the first program of a run
/// compiles and tunes each kernel; and each compilation and tuning logged, so
/// that `run.sh` can count what a step's time went to.
const CUBECL_TOML: &str = r#"[compilation]
cache = "local"

[compilation.logger]
level = "basic"
file = "runs/cubecl-compilation.log"

[autotune]
cache = "local"

[autotune.logger]
level = "minimal"
file = "runs/cubecl-autotune.log"
"#;

//! Picking and loading the data set named on the command line.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use bonfire_data::{cifar, fashion_mnist, synthetic, ImageDataset, Split};

/// The data sets `bonfire train` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetKind {
    /// Fashion-MNIST (Debian's `dataset-fashion-mnist`, or `--data-dir`).
    FashionMnist,
    /// CIFAR-10's binary batches (`--data-dir`).
    Cifar10,
    /// Generated data that needs no file.
    Synthetic,
}

/// The training and test splits. With `may_install`, a missing Fashion-MNIST
/// in its default place is installed from Debian's package when this runs as
/// root with apt; otherwise the error gives the command.
pub fn load(kind: DatasetKind, dir: Option<&Path>, may_install: bool) -> Result<(ImageDataset, ImageDataset)> {
    match kind {
        DatasetKind::FashionMnist => {
            let dir = dir.unwrap_or(Path::new(fashion_mnist::DEFAULT_DIR));
            if !fashion_mnist::present(dir) {
                if dir == Path::new(fashion_mnist::DEFAULT_DIR) && may_install && can_install() {
                    eprintln!("Fashion-MNIST is missing: installing Debian's dataset-fashion-mnist with apt-get");
                    install()?;
                } else {
                    bail!(
                        "Fashion-MNIST not found in {}; install it with `apt-get install dataset-fashion-mnist` \
                         (as root), or pass --data-dir with the four IDX files",
                        dir.display()
                    );
                }
            }
            Ok((fashion_mnist::load(dir, Split::Train)?, fashion_mnist::load(dir, Split::Test)?))
        }
        DatasetKind::Cifar10 => {
            let Some(dir) = dir else {
                bail!("CIFAR-10 needs --data-dir: the folder cifar-10-batches-bin with data_batch_1..5.bin and test_batch.bin")
            };
            Ok((cifar::load(dir, Split::Train)?, cifar::load(dir, Split::Test)?))
        }
        DatasetKind::Synthetic => {
            Ok((synthetic::generate(6000, 1, 28, 28, 10, 1), synthetic::generate(1000, 1, 28, 28, 10, 2)))
        }
    }
}

fn can_install() -> bool {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    root && Command::new("apt-get").arg("--version").output().is_ok()
}

fn install() -> Result<()> {
    let ok = |args: &[&str]| -> Result<bool> {
        Ok(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?
            .success())
    };
    if !ok(&["install", "-y", "-qq", "dataset-fashion-mnist"])?
        && !(ok(&["update", "-qq"])? && ok(&["install", "-y", "-qq", "dataset-fashion-mnist"])?)
    {
        bail!("apt-get could not install dataset-fashion-mnist");
    }
    Ok(())
}

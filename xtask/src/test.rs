//! `cargo xtask test`: the whole test suite, on a machine that may not yet
//! have what it needs. It installs Debian's packages the tests use (Mesa's
//! lavapipe for the wgpu tests, the Fashion-MNIST files, Open MPI with its
//! headers, libclang, Slurm) when run as root
//! with apt, or names the one command to run otherwise, and PyTorch (for
//! its `torchrun`) from PyPI into a virtual environment outside the clone;
//! then it runs the workspace's tests, every example, and the CUDA tests
//! (which, without a GPU, check that the CUDA build fails cleanly).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::root;

/// Debian packages the tests need: Vulkan on the CPU (lavapipe) for the
/// wgpu tests, the real Fashion-MNIST files, Open MPI's `mpirun` and a
/// one-node Slurm cluster (slurm-wlm, munge), which start DDP jobs in the
/// tests, and what the `mpi` feature builds against (Open MPI's headers,
/// and libclang for the bindings).
const PACKAGES: [&str; 8] = [
    "mesa-vulkan-drivers",
    "libvulkan1",
    "dataset-fashion-mnist",
    "openmpi-bin",
    "libopenmpi-dev",
    "libclang-dev",
    "slurm-wlm",
    "munge",
];

/// Features the workspace's tests are built with: MPI, so that its
/// communicator and `--comm mpi` are tested. Pass the same to run one test
/// file (`cargo test --workspace --features ... --test NAME`), or the build
/// cache is thrown away.
pub const FEATURES: &str = "bonfire-collective/mpi,bonfire-train/mpi";

/// The PyTorch whose `torchrun` starts workers in the torchrun tests.
const TORCH: &str = "torch==2.15.0";

pub fn run() -> Result<()> {
    install_packages()?;
    install_torch();
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // wgpu's Vulkan loader wants a runtime directory; containers often lack one.
        let dir = std::env::temp_dir().join("bonfire-xdg");
        std::fs::create_dir_all(&dir)?;
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
    // Builds every example too, with the workspace's feature set: running
    // them from here avoids `cargo run`'s rebuild under the root package's.
    cargo(&["test", "--workspace", "--features", FEATURES])?;
    for example in examples(&root().join("examples"))? {
        run_example(&example)?;
    }
    run_example("conv_net")?;
    cargo(&["test", "-p", "bonfire-train", "--features", "cuda", "--test", "cuda"])?;
    eprintln!("all tests and examples passed");
    Ok(())
}

/// The examples' names, in order.
fn examples(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".rs").map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

/// Runs an example that `cargo test --workspace` built.
fn run_example(name: &str) -> Result<()> {
    let binary = crate::target_dir().join("debug").join("examples").join(name);
    eprintln!("+ {}", binary.display());
    let status = Command::new(&binary)
        .current_dir(root())
        .status()
        .with_context(|| format!("running the example {name} ({})", binary.display()))?;
    if !status.success() {
        bail!("the example {name} failed ({status})");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("+ cargo {}", args.join(" "));
    crate::cargo(args, &[])
}

/// Points `BONFIRE_TORCH_PYTHON` at a Python with PyTorch, installing it
/// into `~/.cache/bonfire-torch` when the user named none. Without one (no
/// network), the torchrun tests say in their output that they did not run.
fn install_torch() {
    if std::env::var_os("BONFIRE_TORCH_PYTHON").is_some() {
        return;
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let venv = Path::new(&home).join(".cache").join("bonfire-torch");
    let python = venv.join("bin").join("python");
    let has_torch = || Command::new(&python).args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    if !has_torch() {
        // PyTorch takes about 5.4 GB; the build needs its own 8.5 GB first.
        let free = free_bytes(Path::new(&home));
        if free.is_some_and(|b| b < 20 << 30) {
            eprintln!(
                "note: under 20 GiB free in {}; PyTorch not installed, the torchrun tests will say they did not run",
                Path::new(&home).display()
            );
            return;
        }
        eprintln!("+ python3 -m venv {0} && {0}/bin/pip install {TORCH}", venv.display());
        let made = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().is_ok_and(|s| s.success());
        let installed = made
            && Command::new(venv.join("bin").join("pip"))
                .args(["install", "--quiet", TORCH])
                .status()
                .is_ok_and(|s| s.success());
        if !installed || !has_torch() {
            eprintln!("note: could not install PyTorch; the torchrun tests will say they did not run");
            return;
        }
    }
    std::env::set_var("BONFIRE_TORCH_PYTHON", &python);
}

/// Free bytes on the file system of `dir`, as `df` reports them.
fn free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df").args(["--output=avail", "-B1"]).arg(dir).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().nth(1)?.trim().parse().ok()
}

fn install_packages() -> Result<()> {
    let Ok(probe) = Command::new("dpkg").arg("--version").output() else {
        eprintln!("note: no dpkg here; make sure a Vulkan driver and Fashion-MNIST are installed");
        return Ok(());
    };
    if !probe.status.success() {
        return Ok(());
    }
    let missing: Vec<&str> = PACKAGES
        .into_iter()
        .filter(|p| !Command::new("dpkg").args(["-s", p]).output().is_ok_and(|o| o.status.success()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let command = format!("apt-get install -y --no-install-recommends {}", missing.join(" "));
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        bail!("the tests need Debian packages that are missing; as root, run:\n    {command}");
    }
    eprintln!("+ apt-get update && {command}");
    let apt = |args: &[&str]| {
        Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status().context("running apt-get")
    };
    if !apt(&["update", "-qq"])?.success() {
        bail!("apt-get update failed");
    }
    let install: Vec<&str> =
        ["install", "-y", "-qq", "--no-install-recommends"].into_iter().chain(missing.iter().copied()).collect();
    if !apt(&install)?.success() {
        bail!("apt-get could not install {}", missing.join(" "));
    }
    Ok(())
}

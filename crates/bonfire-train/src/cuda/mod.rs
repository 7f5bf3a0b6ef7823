//! The CUDA backend's entry points for the command. With the `cuda` feature
//! they train on GPUs (`gpu.rs`); without it each is a clear
//! [`Unavailable`] error (exit code 2), so that the rest of the command
//! never needs to know which build it is.

#[cfg(feature = "cuda")]
mod gpu;

use anyhow::Result;

use bonfire_data::ImageDataset;

use crate::{TrainArgs, Unavailable};

/// Trains on CUDA: for DP replica i on device i mod the device count, else
/// the device of LOCAL_RANK. The ring lets workers share devices
/// round-robin; NCCL needs a device of its own for each.
#[cfg(feature = "cuda")]
pub fn run(args: &TrainArgs, train_set: &ImageDataset, test_set: &ImageDataset) -> Result<()> {
    use bonfire_collective::{DistEnv, Placement};
    use burn::backend::{Autodiff, Cuda};

    use crate::args::StrategyKind;
    use crate::group::{self, Exchange};

    let local = if DistEnv::launched() { Placement::from_env()?.local_rank } else { 0 };
    let devices = match args.strategy {
        StrategyKind::Dp => devices(args.workers)?,
        _ if Exchange::of(args) == Exchange::Nccl => {
            vec![gpu::device(local).map_err(|e| Unavailable(format!("{e}; {}", gpu::SHARE_HINT)))?]
        }
        _ => vec![gpu::device(local % gpu::device_count()?)?],
    };
    crate::workers::run::<Autodiff<Cuda>>(args, devices, train_set, test_set, |device| group::join_cuda(args, device))
}

/// NCCL between this process and the others, on `device`.
#[cfg(feature = "cuda")]
pub use gpu::nccl;

/// Before starting NCCL workers: the library is there and each has a GPU.
#[cfg(feature = "cuda")]
pub fn nccl_preflight(workers: usize) -> Result<()> {
    bonfire_collective::NcclCommunicator::libraries_present().map_err(Unavailable)?;
    let count = gpu::device_count()?;
    if workers > count {
        return Err(Unavailable(format!(
            "{workers} workers over NCCL need {workers} GPUs, and this machine has {count}; {}",
            gpu::SHARE_HINT
        ))
        .into());
    }
    Ok(())
}

/// `bonfire nccl-check`.
#[cfg(feature = "cuda")]
pub fn nccl_check(sizes_mib: &[usize]) -> Result<()> {
    gpu::nccl_check(sizes_mib)
}

/// CUDA devices for `n` replicas: replica i on device i mod the machine's
/// count, so that DP runs on one GPU too.
#[cfg(feature = "cuda")]
pub fn devices(n: usize) -> Result<Vec<burn::backend::cuda::CudaDevice>, Unavailable> {
    let count = gpu::device_count()?;
    (0..n).map(|i| gpu::device(i % count)).collect()
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: &TrainArgs, _: &ImageDataset, _: &ImageDataset) -> Result<()> {
    Err(missing().into())
}

#[cfg(not(feature = "cuda"))]
pub fn nccl_preflight(_: usize) -> Result<()> {
    Err(missing().into())
}

#[cfg(not(feature = "cuda"))]
pub fn nccl_check(_: &[usize]) -> Result<()> {
    Err(missing().into())
}

#[cfg(not(feature = "cuda"))]
pub fn devices(_: usize) -> Result<Vec<()>, Unavailable> {
    Err(missing())
}

#[cfg(not(feature = "cuda"))]
fn missing() -> Unavailable {
    Unavailable("the cuda backend is not part of this build; build bonfire with `--features cuda`".into())
}

//! The CUDA backend's preflight: every way CUDA can be missing becomes a
//! clear [`Unavailable`] error (exit code 2) before Burn touches the driver,
//! because cubecl-cuda answers a missing driver or device with a panic.

use std::time::Duration;

use bonfire_collective::{DistEnv, NcclCommunicator};
use burn::backend::cuda::CudaDevice;

use crate::Unavailable;

/// What to do when NCCL workers outnumber the GPUs.
pub const SHARE_HINT: &str = "NCCL needs one GPU per worker; use --comm ring to let workers share GPUs";

/// How many CUDA devices this machine has; an error when the driver is
/// missing or there are none.
pub fn device_count() -> Result<usize, Unavailable> {
    // SAFETY: only tries to dlopen libcuda; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Unavailable(
            "the cuda backend needs the NVIDIA driver (libcuda.so), which this machine does not have".into(),
        ));
    }
    let count = guarded("querying the CUDA devices", || {
        cudarc::driver::result::init().map_err(|e| format!("the CUDA driver failed to start: {e:?}"))?;
        cudarc::driver::result::device::get_count().map_err(|e| format!("cannot count CUDA devices: {e:?}"))
    })?;
    if count <= 0 {
        return Err(Unavailable("the CUDA driver is installed, but this machine has no CUDA device".into()));
    }
    Ok(count as usize)
}

/// Checks that device `index` exists and returns Burn's handle for it.
pub fn device(index: usize) -> Result<CudaDevice, Unavailable> {
    let count = device_count()?;
    if index >= count {
        return Err(Unavailable(format!(
            "CUDA device {index} does not exist: this machine has {count} (indices 0 to {})",
            count - 1
        )));
    }
    Ok(CudaDevice::new(index))
}

/// Runs `f`, turning an error or a panic inside the CUDA libraries into
/// [`Unavailable`].
pub fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, Unavailable> {
    crate::guard::catch_panic(f).and_then(|r| r).map_err(|e| Unavailable(format!("{what}: {e}")))
}

/// Joins the NCCL group of `env` on `device`. A missing library or a panic
/// in it is [`Unavailable`]; a peer that does not come is a plain error.
pub fn nccl(env: &DistEnv, device: &CudaDevice, timeout: Duration) -> anyhow::Result<NcclCommunicator> {
    NcclCommunicator::libraries_present().map_err(Unavailable)?;
    match crate::guard::catch_panic(|| NcclCommunicator::connect(env, device, timeout)) {
        Ok(Ok(comm)) => Ok(comm),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("joining the workers through NCCL")),
        Err(panic) => Err(Unavailable(format!("starting NCCL: {panic}")).into()),
    }
}

/// `bonfire nccl-check`: an NCCL all-reduce on this GPU, checked against
/// the plain sum, with its time and bandwidth. Alone it is a group of one;
/// under `bonfire launch` (one process per GPU) it is the launcher's group.
pub fn nccl_check(sizes_mib: &[usize]) -> anyhow::Result<()> {
    use bonfire_collective::{Group, ReduceOp, TensorCollective};
    use burn::tensor::{Tensor, TensorData};
    use std::time::Instant;

    NcclCommunicator::libraries_present().map_err(Unavailable)?;
    let env = if bonfire_collective::DistEnv::launched() {
        DistEnv::from_env()?
    } else {
        DistEnv::local(0, 1, std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
    };
    let device = device(env.local_rank)?;
    let mut comm = nccl(&env, &device, Duration::from_secs(60))?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let rank_sum: f32 = (1..=world).sum::<usize>() as f32;
    // Gradient buckets rarely fill whole MiB: an odd count checks the tail
    // of a buffer too, for every reduction. These tensors are held by
    // nothing else, so NCCL reduces them in place, as DDP's buckets; the
    // sized ones below stay held for the timing and go out of place.
    let odd = 61_707;
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
        let values: Vec<f32> = (0..odd).map(|i| ((rank + 1) * (i % 7)) as f32).collect();
        let input = Tensor::<burn::backend::Cuda, 1>::from_data(TensorData::new(values, [odd]), &device);
        let got = comm
            .all_reduce(input, op)?
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let want = |i: usize| {
            let v = (i % 7) as f32;
            match op {
                ReduceOp::Sum => rank_sum * v,
                ReduceOp::Mean => rank_sum * v / world as f32,
                ReduceOp::Max => world as f32 * v,
                ReduceOp::Min => v,
            }
        };
        if let Some(i) = (0..odd).find(|&i| (got[i] - want(i)).abs() > 1e-5 * want(i).abs()) {
            anyhow::bail!(
                "NCCL all-reduce ({op:?}) of {odd} values is wrong at element {i}: {} instead of {}",
                got[i],
                want(i)
            );
        }
    }
    if rank == 0 {
        println!(
            "{{\"impl\":\"nccl\",\"world\":{world},\"values\":{odd},\"ops\":\"sum,mean,max,min\",\"correct\":true}}"
        );
    }
    for &mib in sizes_mib {
        let n = (mib << 20) / 4;
        let values: Vec<f32> = (0..n).map(|i| ((rank + 1) * (i % 7)) as f32).collect();
        let input = Tensor::<burn::backend::Cuda, 1>::from_data(TensorData::new(values, [n]), &device);
        let out = comm.all_reduce(input.clone(), ReduceOp::Sum)?;
        let got = out.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        if let Some(i) = (0..n).find(|&i| got[i] != rank_sum * (i % 7) as f32) {
            anyhow::bail!("NCCL all-reduce of {mib} MiB is wrong at element {i}: {}", got[i]);
        }
        let iters = 10;
        let start = Instant::now();
        for _ in 0..iters {
            comm.all_reduce(input.clone(), ReduceOp::Sum)?;
        }
        let seconds = start.elapsed().as_secs_f64() / iters as f64;
        let algbw = (mib << 20) as f64 / seconds / 1e9;
        let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
        if rank == 0 {
            println!(
                "{{\"impl\":\"nccl\",\"world\":{world},\"bytes\":{},\"correct\":true,\"ms\":{:.3},\"algbw_gbs\":{algbw:.2},\"busbw_gbs\":{busbw:.2}}}",
                mib << 20,
                seconds * 1e3
            );
        }
    }
    Ok(())
}

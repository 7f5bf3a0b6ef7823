//! How a worker joins the others: the command's flags and a device in, a
//! communicator out. The one place that reads `--comm` and `--threads`; the
//! rest of the command calls down into it.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bonfire_collective::{Communicator, DistEnv, InProcCommunicator, TcpCommunicator, TcpConfig, TensorCollective};
use burn::tensor::backend::Backend;

use crate::args::{BackendKind, CommKind, StrategyKind, TrainArgs};

/// How this run's DDP workers exchange gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// Worker threads of this process, through shared memory (`--threads`).
    InProcess,
    /// Processes, through the host-staged ring (shared memory on one host, TCP between hosts).
    Ring,
    /// Processes started by mpirun or srun, through MPI.
    Mpi,
    /// Processes on CUDA, through NCCL in GPU memory.
    Nccl,
}

impl Exchange {
    /// What `--threads`, `--comm` and the backend ask for: threads share
    /// memory; otherwise `--comm`, by default NCCL on CUDA and the ring
    /// elsewhere.
    pub fn of(args: &TrainArgs) -> Self {
        if args.threads {
            return Exchange::InProcess;
        }
        match args.comm {
            Some(CommKind::Ring) => Exchange::Ring,
            Some(CommKind::Mpi) => Exchange::Mpi,
            Some(CommKind::Nccl) => Exchange::Nccl,
            None if args.backend == BackendKind::Cuda && args.strategy == StrategyKind::Ddp => Exchange::Nccl,
            None => Exchange::Ring,
        }
    }
}

/// The `--comm` each strategy and backend accepts.
pub fn check(args: &TrainArgs) -> Result<()> {
    let Some(comm) = args.comm else { return Ok(()) };
    if args.strategy != StrategyKind::Ddp {
        bail!("--comm applies to --strategy ddp only");
    }
    if comm == CommKind::Nccl && args.backend != BackendKind::Cuda {
        bail!("--comm nccl needs --backend cuda; the other backends use the ring");
    }
    if comm == CommKind::Nccl && args.threads {
        bail!("--comm nccl runs one process per GPU; leave out --threads, or use --comm ring");
    }
    if comm == CommKind::Mpi {
        if !cfg!(feature = "mpi") {
            bail!(
                "--comm mpi: this bonfire was built without MPI; build it with the `mpi` feature \
                   (it needs an MPI library's headers and libclang, e.g. Debian's libopenmpi-dev and libclang-dev)"
            );
        }
        if args.threads {
            bail!("--comm mpi runs one process per worker, started by mpirun or srun; leave out --threads");
        }
    }
    Ok(())
}

/// The in-process group of `--workers` threads, with the run's timeouts.
pub fn threads(args: &TrainArgs) -> Result<Vec<InProcCommunicator>> {
    let mut comms = InProcCommunicator::group(args.workers)?;
    for c in &mut comms {
        c.set_timeout(timeout(args));
        c.set_stall_warning(Duration::from_secs_f64(args.stall_warning));
    }
    Ok(comms)
}

/// This process's place among the DDP worker processes: a launched worker
/// joins the others through host memory (the ring, or MPI); one that no
/// launcher started is a group of one.
pub fn join<B: Backend>(args: &TrainArgs) -> Result<Box<dyn TensorCollective<B>>> {
    if !DistEnv::launched() {
        return Ok(Box::new(InProcCommunicator::group(1)?.remove(0)));
    }
    match Exchange::of(args) {
        Exchange::Mpi => join_mpi(timeout(args)),
        _ => {
            let config = TcpConfig {
                timeout: timeout(args),
                stall_warning: Duration::from_secs_f64(args.stall_warning),
                ..TcpConfig::default()
            };
            Ok(Box::new(TcpCommunicator::from_env(config).context("joining the workers")?))
        }
    }
}

/// [`join`] on CUDA, where the workers may also meet in NCCL, on `device`.
#[cfg(feature = "cuda")]
pub fn join_cuda(
    args: &TrainArgs,
    device: &burn::backend::cuda::CudaDevice,
) -> Result<Box<dyn TensorCollective<burn::backend::Cuda>>> {
    if Exchange::of(args) != Exchange::Nccl || !DistEnv::launched() {
        return join(args);
    }
    Ok(Box::new(crate::cuda::nccl(&DistEnv::from_env()?, device, timeout(args))?))
}

fn timeout(args: &TrainArgs) -> Duration {
    Duration::from_secs_f64(args.timeout)
}

/// Joins the MPI job this process belongs to, which must be the job its
/// launcher's variables describe (`bonfire launch` starts no MPI job).
#[cfg(feature = "mpi")]
fn join_mpi<B: Backend>(timeout: Duration) -> Result<Box<dyn TensorCollective<B>>> {
    use bonfire_collective::{Group, MpiCommunicator, Placement};
    let comm = MpiCommunicator::world(timeout).context("joining the MPI job")?;
    let place = Placement::from_env()?;
    let (rank, world) = (comm.rank(), comm.world_size());
    if (rank, world) != (place.rank, place.world_size) {
        bail!(
            "MPI makes this process rank {rank} of {world}, but the launcher's variables say rank {} of {}: \
             with --comm mpi, start the workers with mpirun or srun",
            place.rank,
            place.world_size
        );
    }
    if rank == 0 {
        tracing::info!("MPI: {}", MpiCommunicator::library_version().lines().next().unwrap_or_default());
    }
    Ok(Box::new(comm))
}

#[cfg(not(feature = "mpi"))]
fn join_mpi<B: Backend>(_: Duration) -> Result<Box<dyn TensorCollective<B>>> {
    unreachable!("check refuses --comm mpi without the mpi feature")
}

//! How a launched worker joins the others: the TCP ring, or MPI.

use std::time::Duration;

use anyhow::{Context, Result};
use bonfire_collective::{TcpCommunicator, TcpConfig, TensorCollective};

use crate::args::{comm_kind, CommKind, TrainArgs};

/// A launched worker joins the others through host memory: in the TCP ring,
/// or in MPI with `--comm mpi`.
pub fn join_host<B: burn::tensor::backend::Backend>(args: &TrainArgs) -> Result<Box<dyn TensorCollective<B>>> {
    let timeout = Duration::from_secs_f64(args.timeout);
    if comm_kind(args) == CommKind::Mpi {
        return join_mpi(timeout);
    }
    let config =
        TcpConfig { timeout, stall_warning: Duration::from_secs_f64(args.stall_warning), ..TcpConfig::default() };
    Ok(Box::new(TcpCommunicator::from_env(config).context("joining the workers")?))
}

/// Joins the MPI job this process belongs to, which must be the job its
/// launcher's variables describe (`bonfire launch` starts no MPI job).
#[cfg(feature = "mpi")]
fn join_mpi<B: burn::tensor::backend::Backend>(timeout: Duration) -> Result<Box<dyn TensorCollective<B>>> {
    use bonfire_collective::{Group, MpiCommunicator, Placement};
    let comm = MpiCommunicator::world(timeout).context("joining the MPI job")?;
    let place = Placement::from_env()?;
    let (rank, world) = (comm.rank(), comm.world_size());
    if (rank, world) != (place.rank, place.world_size) {
        anyhow::bail!(
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
fn join_mpi<B: burn::tensor::backend::Backend>(_: Duration) -> Result<Box<dyn TensorCollective<B>>> {
    unreachable!("check_comm refuses --comm mpi without the mpi feature")
}

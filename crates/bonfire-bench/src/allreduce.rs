//! All-reduce bus bandwidth, measured as the PyTorch anchor measures Gloo:
//! two warm-up calls, a barrier, ten timed calls, a barrier; the mean time
//! per call on rank 0. busbw = bytes / time * 2(n-1)/n (nccl-tests).

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bonfire_collective::{Communicator, InProcCommunicator, ReduceOp, TcpCommunicator, TcpConfig};

const WARMUP: usize = 2;
const ITERS: usize = 10;

#[derive(clap::Args)]
pub struct Args {
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Buffer sizes in MiB of f32 (fractions too: 0.25 is 256 KiB).
    #[arg(long, value_delimiter = ',', default_value = "1,4,25,100")]
    sizes_mib: Vec<f64>,
    /// Which communicators to measure: inproc, shm (the ring between
    /// processes through shared memory), tcp (the ring over its sockets
    /// alone, as between hosts), mpi (a build with the `mpi` feature; ranks
    /// started by mpirun).
    #[arg(long, value_delimiter = ',', default_value = "inproc,shm,tcp")]
    r#impl: Vec<String>,
    /// Bytes per pipelined chunk of the TCP ring.
    #[arg(long)]
    chunk_bytes: Option<usize>,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[arg(long, value_delimiter = ',')]
    sizes_bytes: Vec<usize>,
    #[arg(long)]
    chunk_bytes: Option<usize>,
    /// Join through MPI (this process is a rank of an mpirun job) instead of the ring.
    #[arg(long)]
    mpi: bool,
    /// The ring over its sockets alone, without shared memory.
    #[arg(long)]
    sockets: bool,
}

/// Seconds per all-reduce of `bytes` of f32 on this rank.
fn time_all_reduce(comm: &mut dyn Communicator, bytes: usize) -> Result<f64> {
    let mut buf = vec![1f32; bytes / 4];
    for _ in 0..WARMUP {
        comm.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum)?;
    }
    comm.barrier()?;
    let start = Instant::now();
    for _ in 0..ITERS {
        comm.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum)?;
    }
    comm.barrier()?;
    Ok(start.elapsed().as_secs_f64() / ITERS as f64)
}

fn report(kind: &str, world: usize, bytes: usize, seconds: f64) {
    let busbw = bytes as f64 / seconds / 1e9 * 2.0 * (world - 1) as f64 / world as f64;
    println!(
        r#"{{"impl": "{kind}", "world": {world}, "bytes": {bytes}, "seconds": {seconds:.9}, "busbw_gbs": {busbw:.3}}}"#
    );
}

/// Whole f32 values.
fn bytes_of(mib: f64) -> usize {
    (mib * (1 << 20) as f64 / 4.0).round() as usize * 4
}

pub fn run(args: Args) -> Result<()> {
    if args.world < 2 {
        bail!("--world must be at least 2 for a bus bandwidth to mean anything");
    }
    for kind in &args.r#impl {
        match kind.as_str() {
            "inproc" => inproc(&args)?,
            "shm" => ring(&args, false)?,
            "tcp" => ring(&args, true)?,
            "mpi" => mpi(&args)?,
            other => bail!("unknown --impl {other:?}; expected inproc, shm, tcp or mpi"),
        }
    }
    Ok(())
}

fn inproc(args: &Args) -> Result<()> {
    for &mib in &args.sizes_mib {
        let comms = InProcCommunicator::group(args.world)?;
        let times = std::thread::scope(|s| {
            let handles: Vec<_> =
                comms.into_iter().map(|mut c| s.spawn(move || time_all_reduce(&mut c, bytes_of(mib)))).collect();
            handles.into_iter().map(|h| h.join().expect("benchmark thread panicked")).collect::<Result<Vec<_>>>()
        })?;
        report("inproc", args.world, bytes_of(mib), times[0]);
    }
    Ok(())
}

/// The ring between processes of this program; `sockets`: without shared memory.
fn ring(args: &Args, sockets: bool) -> Result<()> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let sizes: Vec<String> = args.sizes_mib.iter().map(|&s| bytes_of(s).to_string()).collect();
    let children = (0..args.world)
        .map(|rank| {
            let mut cmd = crate::local_rank_command(rank, args.world, port)?;
            cmd.arg("allreduce-worker").arg("--sizes-bytes").arg(sizes.join(","));
            if let Some(c) = args.chunk_bytes {
                cmd.arg("--chunk-bytes").arg(c.to_string());
            }
            if sockets {
                cmd.arg("--sockets");
            }
            cmd.stdout(if rank == 0 { Stdio::inherit() } else { Stdio::null() })
                .spawn()
                .context("starting a benchmark worker")
        })
        .collect::<Result<Vec<_>>>()?;
    for (rank, mut child) in children.into_iter().enumerate() {
        let status = child.wait()?;
        if !status.success() {
            bail!("ring benchmark worker {rank} failed: {status}");
        }
    }
    Ok(())
}

/// The ranks as an `mpirun` job over the system's MPI.
fn mpi(args: &Args) -> Result<()> {
    if !cfg!(feature = "mpi") {
        bail!("--impl mpi needs a build with the `mpi` feature");
    }
    let sizes: Vec<String> = args.sizes_mib.iter().map(|&s| bytes_of(s).to_string()).collect();
    let status = std::process::Command::new("mpirun")
        .args(["-np", &args.world.to_string(), "--oversubscribe"])
        .arg(std::env::current_exe()?)
        .args(["allreduce-worker", "--mpi", "--sizes-bytes", &sizes.join(",")])
        // Containers run as root, which mpirun refuses unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .status()
        .context("starting mpirun")?;
    if !status.success() {
        bail!("the MPI benchmark failed: {status}");
    }
    Ok(())
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    let (kind, mut comm): (_, Box<dyn Communicator>) = if args.mpi {
        ("mpi", join_mpi()?)
    } else {
        let mut config = TcpConfig { shared_memory: !args.sockets, ..TcpConfig::default() };
        if let Some(c) = args.chunk_bytes {
            config.chunk_bytes = c;
        }
        (if args.sockets { "tcp" } else { "shm" }, Box::new(TcpCommunicator::from_env(config)?))
    };
    for &bytes in &args.sizes_bytes {
        let seconds = time_all_reduce(comm.as_mut(), bytes)?;
        if comm.rank() == 0 {
            report(kind, comm.world_size(), bytes, seconds);
        }
    }
    Ok(())
}

#[cfg(feature = "mpi")]
fn join_mpi() -> Result<Box<dyn Communicator>> {
    Ok(Box::new(bonfire_collective::MpiCommunicator::world(bonfire_collective::DEFAULT_TIMEOUT)?))
}

#[cfg(not(feature = "mpi"))]
fn join_mpi() -> Result<Box<dyn Communicator>> {
    bail!("this benchmark was built without the `mpi` feature")
}

/// Best of five single-thread copies of 256 MiB, as the anchor's membw.c.
pub fn memcpy() {
    let n = (256 << 20) / 4;
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let best = (0..5)
        .map(|_| {
            let start = Instant::now();
            dst.copy_from_slice(&src);
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min);
    std::hint::black_box(&dst);
    println!(r#"{{"memcpy_gbs": {:.3}}}"#, (n * 4) as f64 / best / 1e9);
}

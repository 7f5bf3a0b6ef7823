//! `bonfire launch`: starts one process per worker with torchrun's
//! environment variables and watches them; when one fails, the others are
//! stopped, and either all are started again (`--max-restarts`, with a new
//! rendezvous port and token; `bonfire train` then continues from its last
//! checkpoint) or the launcher exits non-zero naming the rank and how it ended.
//! With `--min-workers`, a failure that outlasts the restarts costs a worker
//! instead of the job: the others start again, one fewer, from the last
//! checkpoint, with a fresh restart budget.
//!
//! Each worker runs in a process group of its own, so that stopping it also
//! stops whatever it started; Ctrl-C or SIGTERM to the launcher stops every
//! group before the launcher exits.

use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bonfire_collective::{CommError, DistEnv, JobToken, Placement, JOB_TOKEN_VAR, RESTART_COUNT_VAR};
use bonfire_parallel::ParallelError;

/// The folder where a failing worker leaves a note naming the peer that
/// stopped answering it, for the launcher's final message.
const REPORT_DIR_VAR: &str = "BONFIRE_REPORT_DIR";

/// How many times the launcher (this one or torchrun) has restarted this
/// worker's job: 0 on the first start.
pub fn restart_count() -> usize {
    std::env::var(RESTART_COUNT_VAR).ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Called by a failing worker: if `error` blames a silent peer and a
/// launcher asked for reports, leaves `rank-R` in its folder: the peer's
/// rank, then the error.
pub fn report_failure(error: &anyhow::Error) {
    let Some(dir) = std::env::var_os(REPORT_DIR_VAR) else { return };
    let Ok(rank) = std::env::var("RANK") else { return };
    let peer = error.chain().find_map(|cause| {
        let comm = cause.downcast_ref::<CommError>().or_else(|| match cause.downcast_ref::<ParallelError>() {
            Some(ParallelError::Comm(comm)) => Some(comm),
            _ => None,
        });
        comm.and_then(CommError::silent_peer)
    });
    if let Some(peer) = peer {
        let _ = std::fs::write(Path::new(&dir).join(format!("rank-{rank}")), format!("{peer}\n{error:#}"));
    }
}

/// The rank that the failed workers' reports blame and that did not fail
/// itself, with the first report that blames it.
fn silent_rank(dir: &Path, failed: &[usize]) -> Option<(usize, String)> {
    failed.iter().find_map(|rank| {
        let report = std::fs::read_to_string(dir.join(format!("rank-{rank}"))).ok()?;
        let (peer, message) = report.split_once('\n')?;
        let peer: usize = peer.parse().ok()?;
        (!failed.contains(&peer)).then(|| (peer, format!("rank {rank}: {message}")))
    })
}

/// `bonfire launch`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// Worker processes on this host.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Hosts in the job.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This host's index among them.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Host of rank 0 (runs the rendezvous store).
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of the rendezvous store; 0 picks a free one (single host only).
    #[arg(long, default_value_t = 0)]
    pub master_port: u16,
    /// When a worker dies or times out, stop the others and start them all again, up to this many times.
    #[arg(long, default_value_t = 0)]
    pub max_restarts: usize,
    /// When the workers still fail after the restarts, continue with one worker fewer (from the
    /// last checkpoint, the same global batch shared by fewer), down to this many; one host only.
    #[arg(long)]
    pub min_workers: Option<usize>,
    /// The worker command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Compute threads for each of `workers` processes on this host: the cores
/// shared out, unless the user set `RAYON_NUM_THREADS` (the pool of Burn's
/// CPU backend and Bonfire's kernels). Without it every worker would start
/// a pool as large as the machine and they would fight over the cores.
/// (torchrun sets `OMP_NUM_THREADS=1` for the same reason; Bonfire reads
/// only `RAYON_NUM_THREADS`.)
fn worker_threads(workers: usize) -> Option<String> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / workers.max(1)).max(1).to_string())
}

/// Under a launcher that does not share out the cores (torchrun, mpirun,
/// srun), gives this worker its share: the cores over the workers on this
/// host, as `bonfire launch` does. Must run before the pool starts.
pub fn take_share_of_cores() {
    let Ok(place) = Placement::from_env() else { return };
    if place.local_world_size == 1 {
        return;
    }
    if let Some(threads) = worker_threads(place.local_world_size) {
        tracing::info!(
            "rank {}: {threads} compute threads, the cores shared among the {} workers on this host \
             (RAYON_NUM_THREADS sets it)",
            place.rank,
            place.local_world_size
        );
        std::env::set_var("RAYON_NUM_THREADS", threads);
    }
}

/// The world sizes a job of `workers` may run with, largest last: down to
/// `min_workers` when given. `workers_flag` names the flag that set
/// `workers`, for the error.
pub fn worlds(min_workers: Option<usize>, workers: usize, workers_flag: &str) -> Result<RangeInclusive<usize>> {
    let min = min_workers.unwrap_or(workers);
    if min == 0 || min > workers {
        bail!("--min-workers {min} must be between 1 and {workers_flag} {workers}");
    }
    Ok(min..=workers)
}

/// Runs the job; returns when every worker succeeded, or with an error naming
/// the rank that failed last, once the restarts are spent.
pub fn launch(args: &LaunchArgs) -> Result<()> {
    if args.nproc_per_node == 0 || args.nnodes == 0 {
        bail!("--nproc-per-node and --nnodes must be at least 1");
    }
    if args.node_rank >= args.nnodes {
        bail!("--node-rank {} is not below --nnodes {}", args.node_rank, args.nnodes);
    }
    if args.master_port == 0 && args.nnodes > 1 {
        bail!("--master-port is required when --nnodes > 1");
    }
    worlds(args.min_workers, args.nproc_per_node, "--nproc-per-node")?;
    if args.min_workers.is_some() {
        if args.nnodes > 1 {
            bail!(
                "--min-workers works on one host: the launchers of several hosts would have to agree on the new world"
            );
        }
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    // Only one handler per process; a second launch in the same process
    // keeps the first one, which sets the same kind of flag.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    let mut workers = args.nproc_per_node;
    // Restarts at the current number of workers.
    let mut restarts = 0;
    for start in 0.. {
        let failure = match start_and_watch(args, workers, start, &interrupted)? {
            Ok(()) => return Ok(()),
            Err(failure) => failure,
        };
        if interrupted.load(Ordering::SeqCst) {
            return Err(failure);
        }
        if restarts < args.max_restarts {
            restarts += 1;
            eprintln!(
                "bonfire launch: {failure:#}; restarting every worker (restart {restarts} of {})",
                args.max_restarts
            );
        } else if let Some(min) = args.min_workers.filter(|&min| workers > min) {
            workers -= 1;
            restarts = 0;
            eprintln!(
                "bonfire launch: {failure:#}; the restarts are spent: continuing with {workers} worker(s) \
                 (world size {workers}) from the last checkpoint (--min-workers {min})"
            );
        } else {
            return Err(match restarts {
                0 => failure,
                n => failure.context(format!("the last of {n} restart(s) failed too")),
            });
        }
    }
    unreachable!("the starts are counted")
}

/// Starts every worker of this host and watches them. The outer error is
/// the launcher's own (a worker that cannot start), the inner one a
/// worker's failure, which a restart may cure.
fn start_and_watch(args: &LaunchArgs, workers: usize, restart: usize, interrupted: &AtomicBool) -> Result<Result<()>> {
    // A fresh rendezvous for every start: the old store may still hold the
    // port, and the old workers' token must not be accepted.
    let port = match args.master_port {
        0 => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        p => p,
    };
    let token = job_token(args.nnodes)?;
    let world = workers * args.nnodes;
    let threads = worker_threads(workers);
    let reports = std::env::temp_dir().join(format!("bonfire-launch-{}-{restart}", std::process::id()));
    std::fs::create_dir_all(&reports).context("creating the folder for the workers' failure reports")?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..workers {
        let rank = args.node_rank * workers + local;
        let mut command = Command::new(&args.command[0]);
        if let Some(threads) = &threads {
            command.env("RAYON_NUM_THREADS", threads);
        }
        let place = DistEnv {
            rank,
            world_size: world,
            local_rank: local,
            local_world_size: workers,
            master_addr: args.master_addr.clone(),
            master_port: port,
            job_token: JobToken::Given(token.clone()),
            torchrun_store: None,
        };
        let child = command
            .args(&args.command[1..])
            .envs(place.vars())
            .env(REPORT_DIR_VAR, &reports)
            .env(RESTART_COUNT_VAR, restart.to_string())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting rank {rank}: {}", args.command[0]));
        match child {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                stop(&mut children);
                return Err(e);
            }
        }
    }
    let result = watch(children, interrupted, &reports);
    let _ = std::fs::remove_dir_all(&reports);
    Ok(result)
}

/// The secret the workers present at the rendezvous: the user's
/// `BONFIRE_JOB_TOKEN` when set (it must be the same on every host), else a
/// fresh random one for this single-host job.
fn job_token(nnodes: usize) -> Result<String> {
    if let Some(token) = std::env::var(JOB_TOKEN_VAR).ok().filter(|t| !t.is_empty()) {
        return Ok(token);
    }
    if nnodes > 1 {
        bail!(
            "a job over several hosts needs a shared secret: set {JOB_TOKEN_VAR} to the same value on every host \
             (for example: export {JOB_TOKEN_VAR}=$(head -c 16 /dev/urandom | xxd -p))"
        );
    }
    bonfire_collective::random_token().context("reading /dev/urandom for the job token")
}

fn watch(mut children: Vec<(usize, Child)>, interrupted: &AtomicBool, reports: &Path) -> Result<()> {
    while !children.is_empty() {
        if interrupted.load(Ordering::SeqCst) {
            stop(&mut children);
            bail!("interrupted; stopped every worker");
        }
        let mut failed = Vec::new();
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait()? {
                None => i += 1,
                Some(status) => {
                    let (rank, child) = children.remove(i);
                    if !status.success() {
                        failed.push((rank, child, status));
                    }
                }
            }
        }
        if failed.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        // A worker that died of a signal is the cause; the others that ended
        // in the same instant most likely failed because they lost it.
        failed
            .sort_by_key(|(rank, _, status)| (std::os::unix::process::ExitStatusExt::signal(status).is_none(), *rank));
        let mut what: Vec<String> =
            failed.iter().map(|(rank, _, status)| format!("rank {rank} {}", describe(*status))).collect();
        // A worker that froze fails nobody's exit status; those that waited
        // for it name it in their reports.
        let ranks: Vec<usize> = failed.iter().map(|(rank, _, _)| *rank).collect();
        if let Some((silent, why)) = silent_rank(reports, &ranks) {
            what.insert(0, format!("rank {silent} stopped answering ({why})"));
        }
        // Whatever the failed workers started goes with them.
        let gone: Vec<(usize, Child)> = failed.into_iter().map(|(rank, child, _)| (rank, child)).collect();
        signal_groups(&gone, libc::SIGKILL);
        stop(&mut children);
        bail!("{}; stopped the other workers", what.join("; "));
    }
    Ok(())
}

/// Asks the remaining workers' process groups to stop (SIGTERM), then kills
/// what is left of them (SIGKILL).
fn stop(children: &mut Vec<(usize, Child)>) {
    signal_groups(children, libc::SIGTERM);
    // A stopped worker (SIGSTOP) would hold its SIGTERM until continued.
    signal_groups(children, libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None))) {
        std::thread::sleep(Duration::from_millis(20));
    }
    signal_groups(children, libc::SIGKILL);
    for (_, child) in children.iter_mut() {
        let _ = child.wait();
    }
    children.clear();
}

fn signal_groups(children: &[(usize, Child)], signal: i32) {
    for (_, child) in children {
        // SAFETY: kill(2) on the process group this launcher created for
        // its own child (the group id is the child's pid).
        unsafe { libc::kill(-(child.id() as i32), signal) };
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => {
            format!("was killed by signal {sig}{}", if sig == libc::SIGKILL { " (SIGKILL)" } else { "" })
        }
        _ => format!("ended: {status}"),
    }
}

//! What a launcher tells each worker: torchrun's environment contract, and
//! the variables Open MPI's `mpirun`, MPICH's (PMI) and Slurm's `srun` set,
//! so that `mpirun -np 2 bonfire train` and `srun -n 2 bonfire train` work
//! without torchrun's variables. torchrun's win where both are set.

mod launchers;
#[cfg(test)]
mod tests;

use crate::error::{CommError, Result};
use launchers::{first_host, slurm_tasks_on_node, Launcher, LAUNCHERS, SLURM_PORTS};

/// Where this worker sits in the job, as torchrun (and `bonfire launch`)
/// describe it; the fields are named after torchrun's variables, whichever
/// launcher set them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`: this worker's global rank.
    pub rank: usize,
    /// `WORLD_SIZE`: how many workers the job has.
    pub world_size: usize,
    /// `LOCAL_RANK`: the rank on this host (picks the device). Defaults to `RANK`.
    pub local_rank: usize,
    /// `LOCAL_WORLD_SIZE`: workers on this host. Defaults to `WORLD_SIZE`.
    pub local_world_size: usize,
    /// `MASTER_ADDR`: the host of rank 0, which runs the rendezvous store.
    pub master_addr: String,
    /// `MASTER_PORT`: the store's port.
    pub master_port: u16,
    /// The secret every worker of the job presents to the rendezvous store
    /// and to its ring peers.
    pub job_token: JobToken,
    /// torchrun's own store, when its agent shares it with the workers:
    /// then no rank hosts a store of its own.
    pub torchrun_store: Option<TorchrunStore>,
}

/// torchrun's store, which its agent hosts at `MASTER_ADDR:MASTER_PORT` and
/// shares with the workers it starts (`TORCHELASTIC_USE_AGENT_STORE=True`).
/// It outlives a restart of the workers, so each attempt keeps its keys
/// under a prefix of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchrunStore {
    /// `TORCHELASTIC_RUN_ID`.
    pub run_id: String,
    /// `TORCHELASTIC_RESTART_COUNT`: 0 on the first start.
    pub attempt: usize,
}

impl TorchrunStore {
    /// Where this attempt's keys lie in the store.
    pub fn key_prefix(&self) -> String {
        format!("/bonfire/{}/attempt_{}/", self.run_id, self.attempt)
    }

    fn read(lookup: &impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        if lookup(USE_AGENT_STORE_VAR).as_deref() != Some("True") {
            return Ok(None);
        }
        let attempt = match lookup(RESTART_COUNT_VAR) {
            None => 0,
            Some(count) => count.trim().parse().map_err(|_| CommError::Env {
                var: RESTART_COUNT_VAR,
                detail: format!("{count:?} is not a non-negative integer"),
            })?,
        };
        let run_id = lookup("TORCHELASTIC_RUN_ID").unwrap_or_else(|| "none".into());
        Ok(Some(TorchrunStore { run_id, attempt }))
    }
}

/// Where a job's secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobToken {
    /// `BONFIRE_JOB_TOKEN`, the same on every worker (`bonfire launch` makes
    /// a fresh one per job).
    Given(String),
    /// Every worker runs on this host and none was given: rank 0 makes one
    /// and shares it through a file only this user can read.
    HostFile,
    /// None: anyone who reaches the store may join. Only where the user
    /// asked for it (`BONFIRE_INSECURE_RENDEZVOUS=1`).
    Open,
    /// None was given and torchrun's store is shared: rank 0 makes one for
    /// the ring and leaves it there. That store has no secret of its own (as
    /// for PyTorch's own workers), so the job is as closed as its port.
    InTorchrunStore,
}

/// The variable that carries the job token.
pub const JOB_TOKEN_VAR: &str = "BONFIRE_JOB_TOKEN";

/// The variable that opts out of the job token (`1`): an open rendezvous.
pub const INSECURE_VAR: &str = "BONFIRE_INSECURE_RENDEZVOUS";

/// torchrun's variable that says its agent shares its store (`True`).
pub const USE_AGENT_STORE_VAR: &str = "TORCHELASTIC_USE_AGENT_STORE";

/// How many times the launcher restarted the workers (torchrun's name,
/// which `bonfire launch` sets too): 0 on the first start.
pub const RESTART_COUNT_VAR: &str = "TORCHELASTIC_RESTART_COUNT";

/// The value of `var`, which a launcher must set.
fn required(lookup: &impl Fn(&str) -> Option<String>, var: &'static str) -> Result<String> {
    lookup(var).ok_or_else(|| CommError::Env {
        var,
        detail: "is not set (a launcher such as `bonfire launch`, torchrun, mpirun or srun sets it)".into(),
    })
}

impl DistEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Whether a launcher started this process as one worker of a job:
    /// torchrun's `RANK`, or Open MPI's, PMI's or Slurm's rank (Slurm's only
    /// inside an `srun` step, not in a batch script itself).
    pub fn launched() -> bool {
        Self::launched_by(|name| std::env::var(name).ok()).is_some()
    }

    /// The launcher whose variables describe this worker, if any.
    fn launched_by(lookup: impl Fn(&str) -> Option<String>) -> Option<&'static Launcher> {
        LAUNCHERS.iter().find(|l| lookup(l.rank).is_some() && l.inside.is_none_or(|var| lookup(var).is_some()))
    }

    /// Reads the variables through `lookup`, so that a caller (or a test) can
    /// supply them without touching the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let (launcher, place) = Placement::read(&lookup)?;
        let Placement { rank, world_size, local_rank, local_world_size } = place;
        let required = |var: &'static str| required(&lookup, var);
        let master_addr = match lookup("MASTER_ADDR") {
            Some(addr) => addr,
            // Slurm names the step's hosts; rank 0 runs on the first.
            None if launcher.name == "Slurm" => {
                let list = required("SLURM_STEP_NODELIST").or_else(|_| required("SLURM_JOB_NODELIST"))?;
                first_host(&list).ok_or_else(|| CommError::Env {
                    var: "SLURM_JOB_NODELIST",
                    detail: format!("{list:?} names no host"),
                })?
            }
            // Every worker on this host: rank 0 is here too.
            None if launcher.name != "torchrun" && local_world_size == world_size => "127.0.0.1".into(),
            None if launcher.name != "torchrun" => {
                return Err(CommError::Env {
                    var: "MASTER_ADDR",
                    detail: format!(
                        "is not set: the {} workers are on several hosts, so give rank 0's host \
                         (for mpirun: -x MASTER_ADDR=HOST -x MASTER_PORT=PORT)",
                        launcher.name
                    ),
                })
            }
            None => required("MASTER_ADDR")?,
        };
        let port = match lookup("MASTER_PORT") {
            Some(port) => port,
            // Every worker of a Slurm job agrees on a port from its job id.
            None if launcher.name == "Slurm" => {
                let job = required("SLURM_JOB_ID")?;
                let id: u64 = job.trim().parse().map_err(|_| CommError::Env {
                    var: "SLURM_JOB_ID",
                    detail: format!("{job:?} is not a job number"),
                })?;
                (SLURM_PORTS.start + id % (SLURM_PORTS.end - SLURM_PORTS.start)).to_string()
            }
            None => required("MASTER_PORT")?,
        };
        if master_addr.trim().is_empty() {
            return Err(CommError::Env { var: "MASTER_ADDR", detail: "is empty".into() });
        }
        let master_port = match port.trim().parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Err(CommError::Env {
                    var: "MASTER_PORT",
                    detail: format!("{port:?} is not a port number between 1 and 65535"),
                })
            }
        };
        let torchrun_store = TorchrunStore::read(&lookup)?;
        let job_token = job_token(&lookup, local_world_size == world_size, torchrun_store.is_some())?;
        Ok(DistEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            job_token,
            torchrun_store,
        })
    }

    /// Rank `rank` of a job of `world` workers on this host, whose
    /// rendezvous is at `port` on loopback and whose secret rank 0 shares
    /// through a file.
    pub fn local(rank: usize, world: usize, port: u16) -> Self {
        DistEnv {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            job_token: JobToken::HostFile,
            torchrun_store: None,
        }
    }

    /// The environment variables that describe this worker to
    /// [`DistEnv::from_env`], in torchrun's names: what a launcher sets for
    /// each worker it starts.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world_size.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ];
        match &self.job_token {
            JobToken::Given(token) => vars.push((JOB_TOKEN_VAR, token.clone())),
            JobToken::Open => vars.push((INSECURE_VAR, "1".into())),
            JobToken::HostFile | JobToken::InTorchrunStore => {}
        }
        if let Some(store) = &self.torchrun_store {
            vars.push((USE_AGENT_STORE_VAR, "True".into()));
            vars.push(("TORCHELASTIC_RUN_ID", store.run_id.clone()));
            vars.push((RESTART_COUNT_VAR, store.attempt.to_string()));
        }
        vars
    }

    /// `MASTER_ADDR:MASTER_PORT`, bracketing an IPv6 address.
    pub fn store_addr(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

/// The job's secret: the one given, else (every worker on this host) one
/// shared through a file, else one shared through torchrun's store, else an
/// error unless the user opted out.
fn job_token(lookup: &impl Fn(&str) -> Option<String>, one_host: bool, torchrun_store: bool) -> Result<JobToken> {
    if let Some(token) = lookup(JOB_TOKEN_VAR).filter(|t| !t.is_empty()) {
        if token.len() > crate::store::MAX_TOKEN {
            return Err(CommError::Env {
                var: JOB_TOKEN_VAR,
                detail: format!("is longer than {} bytes", crate::store::MAX_TOKEN),
            });
        }
        return Ok(JobToken::Given(token));
    }
    match lookup(INSECURE_VAR).as_deref() {
        Some("1") => return Ok(JobToken::Open),
        None | Some("0" | "") => {}
        Some(other) => return Err(CommError::Env { var: INSECURE_VAR, detail: format!("{other:?} is not 0 or 1") }),
    }
    if torchrun_store {
        return Ok(JobToken::InTorchrunStore);
    }
    if one_host {
        return Ok(JobToken::HostFile);
    }
    Err(CommError::Env {
        var: JOB_TOKEN_VAR,
        detail: format!(
            "is not set, and the workers are on several hosts: without a shared secret anyone who reaches \
             MASTER_ADDR:MASTER_PORT could join the job. Give every worker the same secret (for example \
             `export {JOB_TOKEN_VAR}=$(head -c 16 /dev/urandom | xxd -p)` before the launcher, with \
             `mpirun -x {JOB_TOKEN_VAR}`; srun and torchrun pass the environment on), or set \
             {INSECURE_VAR}=1 to run the rendezvous open to anyone"
        ),
    })
}

/// Where this worker sits in the job: a [`DistEnv`] without the rendezvous
/// address, which a communicator that finds its peers itself (MPI) does not
/// need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// This worker's global rank.
    pub rank: usize,
    /// How many workers the job has.
    pub world_size: usize,
    /// The rank on this host.
    pub local_rank: usize,
    /// Workers on this host.
    pub local_world_size: usize,
}

impl Placement {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self> {
        Self::read(|name| std::env::var(name).ok()).map(|(_, place)| place)
    }

    /// The launcher whose variables are read, and what they say.
    fn read(lookup: impl Fn(&str) -> Option<String>) -> Result<(&'static Launcher, Self)> {
        let launcher = DistEnv::launched_by(&lookup).unwrap_or(&LAUNCHERS[0]);
        let required = |var: &'static str| required(&lookup, var);
        let number = |var: &'static str, value: String| {
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| CommError::Env { var, detail: format!("{value:?} is not a non-negative integer") })
        };
        let first = |vars: &[&'static str]| vars.iter().find_map(|&v| lookup(v).map(|value| (v, value)));
        let (rank_var, size_var) = (launcher.rank, launcher.size);
        let rank = number(rank_var, required(rank_var)?)?;
        let world_size = number(size_var, required(size_var)?)?;
        if world_size == 0 {
            return Err(CommError::Env { var: size_var, detail: "must be at least 1".into() });
        }
        if rank >= world_size {
            return Err(CommError::Env {
                var: rank_var,
                detail: format!("{rank} is not below {size_var}={world_size}"),
            });
        }
        let (local_rank_var, local_rank) = match first(launcher.local_rank) {
            Some((var, v)) => (var, number(var, v)?),
            None => ("LOCAL_RANK", rank),
        };
        let (local_size_var, local_world_size) = match first(launcher.local_size) {
            Some(("SLURM_STEP_TASKS_PER_NODE", v)) => {
                let node = lookup("SLURM_NODEID").and_then(|n| n.trim().parse().ok()).unwrap_or(0);
                let tasks = slurm_tasks_on_node(&v, node).ok_or_else(|| CommError::Env {
                    var: "SLURM_STEP_TASKS_PER_NODE",
                    detail: format!("{v:?} does not give node {node}'s task count"),
                })?;
                ("SLURM_STEP_TASKS_PER_NODE", tasks)
            }
            Some((var, v)) => (var, number(var, v)?),
            None => ("LOCAL_WORLD_SIZE", world_size),
        };
        if local_world_size == 0 || local_world_size > world_size {
            return Err(CommError::Env {
                var: local_size_var,
                detail: format!("{local_world_size} must be between 1 and {size_var}={world_size}"),
            });
        }
        if local_rank >= local_world_size {
            return Err(CommError::Env {
                var: local_rank_var,
                detail: format!("{local_rank} is not below {local_size_var}={local_world_size}"),
            });
        }
        Ok((launcher, Placement { rank, world_size, local_rank, local_world_size }))
    }
}

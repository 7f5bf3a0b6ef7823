//! What a launcher tells each worker: torchrun's environment contract, and
//! the variables Open MPI's `mpirun`, MPICH's (PMI) and Slurm's `srun` set,
//! so that `mpirun -np 2 bonfire train` and `srun -n 2 bonfire train` work
//! without torchrun's variables. torchrun's win where both are set.

use crate::error::{CommError, Result};

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
    /// `BONFIRE_JOB_TOKEN`: the secret every worker of the job presents to
    /// the rendezvous store and to its ring peers. `bonfire launch` makes a
    /// fresh one per job; empty when unset.
    pub job_token: String,
}

/// The variable that carries the job token.
pub const JOB_TOKEN_VAR: &str = "BONFIRE_JOB_TOKEN";

/// One launcher's names for a worker's place in the job.
struct Launcher {
    name: &'static str,
    rank: &'static str,
    size: &'static str,
    /// The first of these that is set.
    local_rank: &'static [&'static str],
    local_size: &'static [&'static str],
    /// Counts only where this is set too.
    inside: Option<&'static str>,
}

/// In order of precedence: torchrun's variables win.
const LAUNCHERS: [Launcher; 4] = [
    Launcher {
        name: "torchrun",
        rank: "RANK",
        size: "WORLD_SIZE",
        local_rank: &["LOCAL_RANK"],
        local_size: &["LOCAL_WORLD_SIZE"],
        inside: None,
    },
    Launcher {
        name: "Open MPI",
        rank: "OMPI_COMM_WORLD_RANK",
        size: "OMPI_COMM_WORLD_SIZE",
        local_rank: &["OMPI_COMM_WORLD_LOCAL_RANK"],
        local_size: &["OMPI_COMM_WORLD_LOCAL_SIZE"],
        inside: None,
    },
    Launcher {
        name: "PMI",
        rank: "PMI_RANK",
        size: "PMI_SIZE",
        local_rank: &["MPI_LOCALRANKID"],
        local_size: &["MPI_LOCALNRANKS"],
        inside: None,
    },
    Launcher {
        name: "Slurm",
        rank: "SLURM_PROCID",
        size: "SLURM_STEP_NUM_TASKS",
        local_rank: &["SLURM_LOCALID"],
        local_size: &["SLURM_STEP_TASKS_PER_NODE"],
        // A batch script has SLURM_PROCID too; only an srun step's tasks are workers.
        inside: Some("SLURM_STEP_ID"),
    },
];

/// The value of `var`, which a launcher must set.
fn required(lookup: &impl Fn(&str) -> Option<String>, var: &'static str) -> Result<String> {
    lookup(var).ok_or_else(|| CommError::Env {
        var,
        detail: "is not set (a launcher such as `bonfire launch`, torchrun, mpirun or srun sets it)".into(),
    })
}

/// The ports a Slurm job's rendezvous is put on, by job id, when
/// `MASTER_PORT` is not set.
const SLURM_PORTS: std::ops::Range<u64> = 20_000..40_000;

/// The first host of a Slurm host list: `node[07-09,12],gpu1` gives `node07`.
fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find(',').filter(|&c| list.find('[').is_none_or(|b| c < b)).unwrap_or(list.len());
    let entry = &list[..end];
    let Some(open) = entry.find('[') else {
        return (!entry.is_empty()).then(|| entry.to_string());
    };
    let close = list[open..].find(']')? + open;
    let first = list[open + 1..close].split([',', '-']).next()?;
    let suffix: String = list[close + 1..].chars().take_while(|&c| c != ',').collect();
    Some(format!("{}{first}{suffix}", &entry[..open]))
}

/// Tasks on node `node` from Slurm's compressed per-node counts, such as
/// `2(x3),1` (three nodes of 2 tasks, then one of 1).
fn slurm_tasks_on_node(counts: &str, node: usize) -> Option<usize> {
    let mut seen = 0;
    for entry in counts.trim().split(',') {
        let (count, repeat) = match entry.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (entry, 1),
        };
        seen += repeat;
        if node < seen {
            return count.parse().ok();
        }
    }
    None
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
        let job_token = lookup(JOB_TOKEN_VAR).unwrap_or_default();
        if job_token.len() > crate::store::MAX_TOKEN {
            return Err(CommError::Env {
                var: JOB_TOKEN_VAR,
                detail: format!("is longer than {} bytes", crate::store::MAX_TOKEN),
            });
        }
        Ok(DistEnv { rank, world_size, local_rank, local_world_size, master_addr, master_port, job_token })
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

/// Where this worker sits in the job: a [`DistEnv`] without the rendezvous
/// address, which a communicator that finds its peers itself (MPI) does not
/// need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_lookup(|k| map.get(k).cloned())
    }

    const GOOD: [(&str, &str); 6] = [
        ("RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];

    fn without(var: &str) -> Vec<(&'static str, &'static str)> {
        GOOD.iter().copied().filter(|(k, _)| *k != var).collect()
    }

    fn with(var: &'static str, value: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut v = without(var);
        v.push((var, value));
        v
    }

    #[test]
    fn reads_the_torchrun_contract() {
        let e = env(&GOOD).unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (1, 4, 1, 2));
        assert_eq!(e.store_addr(), "127.0.0.1:29500");
    }

    #[test]
    fn local_variables_default_to_the_global_ones() {
        let pairs: Vec<_> = without("LOCAL_RANK").into_iter().filter(|(k, _)| *k != "LOCAL_WORLD_SIZE").collect();
        let e = env(&pairs).unwrap();
        assert_eq!((e.local_rank, e.local_world_size), (1, 4));
    }

    #[test]
    fn every_missing_required_variable_is_named() {
        for var in ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
            let err = env(&without(var)).unwrap_err().to_string();
            assert!(err.contains(var) && err.contains("not set"), "{var}: {err}");
        }
    }

    #[test]
    fn every_invalid_variable_is_named() {
        let cases = [
            ("RANK", "one"),
            ("RANK", "4"),
            ("RANK", "-1"),
            ("WORLD_SIZE", "0"),
            ("WORLD_SIZE", "x"),
            ("LOCAL_RANK", "2"),
            ("LOCAL_WORLD_SIZE", "9"),
            ("MASTER_ADDR", " "),
            ("MASTER_PORT", "70000"),
            ("MASTER_PORT", "0"),
            ("MASTER_PORT", "http"),
        ];
        for (var, value) in cases {
            let err = env(&with(var, value)).unwrap_err();
            assert!(matches!(err, CommError::Env { var: v, .. } if v == var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn open_mpi_on_one_host_needs_no_torchrun_variable_but_a_port() {
        let ompi = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("MASTER_PORT", "29511"),
        ];
        let e = env(&ompi).unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (1, 2, 1, 2));
        assert_eq!(e.store_addr(), "127.0.0.1:29511");
        // Over several hosts rank 0's address must be given.
        let spread = [("OMPI_COMM_WORLD_LOCAL_SIZE", "1"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0")];
        let pairs: Vec<_> = ompi.iter().copied().filter(|(k, _)| !k.contains("LOCAL")).chain(spread).collect();
        let err = env(&pairs).unwrap_err().to_string();
        assert!(err.contains("MASTER_ADDR") && err.contains("mpirun"), "{err}");
    }

    #[test]
    fn pmi_is_read_as_mpich_sets_it() {
        let e = env(&[
            ("PMI_RANK", "2"),
            ("PMI_SIZE", "3"),
            ("MPI_LOCALRANKID", "2"),
            ("MPI_LOCALNRANKS", "3"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (2, 3, 2, 3));
    }

    const SLURM: [(&str, &str); 7] = [
        ("SLURM_STEP_ID", "0"),
        ("SLURM_PROCID", "3"),
        ("SLURM_STEP_NUM_TASKS", "5"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODEID", "1"),
        ("SLURM_STEP_TASKS_PER_NODE", "3,2"),
        ("SLURM_JOB_ID", "123456"),
    ];

    #[test]
    fn an_srun_step_finds_rank_0_on_its_first_node_and_a_port_from_its_job() {
        let mut pairs = SLURM.to_vec();
        pairs.push(("SLURM_STEP_NODELIST", "node[07-08]"));
        let e = env(&pairs).unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (3, 5, 0, 2));
        assert_eq!(e.store_addr(), format!("node07:{}", 20_000 + 123_456 % 20_000));
        // A batch script (no step) is not a worker.
        let batch: Vec<_> = pairs.iter().copied().filter(|(k, _)| *k != "SLURM_STEP_ID").collect();
        assert!(DistEnv::launched_by(|k| batch.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).is_none());
    }

    #[test]
    fn torchruns_variables_win_over_the_others() {
        let mut pairs = GOOD.to_vec();
        pairs.extend([("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "8")]);
        pairs.extend(SLURM);
        let e = env(&pairs).unwrap();
        assert_eq!((e.rank, e.world_size), (1, 4));
    }

    #[test]
    fn a_launchers_numbers_that_do_not_add_up_name_its_variables() {
        let err =
            env(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(
            err.to_string().contains("OMPI_COMM_WORLD_RANK") && err.to_string().contains("OMPI_COMM_WORLD_SIZE=2"),
            "{err}"
        );
        let err = env(&[("PMI_RANK", "0"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(matches!(err, CommError::Env { var: "PMI_SIZE", .. }), "{err}");
    }

    #[test]
    fn slurm_host_lists_and_task_counts() {
        assert_eq!(first_host("node[07-09,12],gpu1").as_deref(), Some("node07"));
        assert_eq!(first_host("gpu1,node[1-2]").as_deref(), Some("gpu1"));
        assert_eq!(first_host("rack[3-4]-n").as_deref(), Some("rack3-n"));
        assert_eq!(first_host("solo").as_deref(), Some("solo"));
        assert_eq!(first_host("").as_deref(), None);
        assert_eq!(slurm_tasks_on_node("2(x3),1", 2), Some(2));
        assert_eq!(slurm_tasks_on_node("2(x3),1", 3), Some(1));
        assert_eq!(slurm_tasks_on_node("2(x3),1", 4), None);
    }

    #[test]
    fn ipv6_master_is_bracketed() {
        let e = env(&with("MASTER_ADDR", "::1")).unwrap();
        assert_eq!(e.store_addr(), "[::1]:29500");
    }
}

//! Each launcher's names for a worker's place in the job, in order of
//! precedence, and what Slurm's compressed host lists and task counts mean.

/// One launcher's names for a worker's place in the job.
pub(super) struct Launcher {
    pub name: &'static str,
    pub rank: &'static str,
    pub size: &'static str,
    /// The first of these that is set.
    pub local_rank: &'static [&'static str],
    pub local_size: &'static [&'static str],
    /// Counts only where this is set too.
    pub inside: Option<&'static str>,
}

/// In order of precedence: torchrun's variables win.
pub(super) const LAUNCHERS: [Launcher; 4] = [
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

/// The ports a Slurm job's rendezvous is put on, by job id, when
/// `MASTER_PORT` is not set.
pub(super) const SLURM_PORTS: std::ops::Range<u64> = 20_000..40_000;

/// The first host of a Slurm host list: `node[07-09,12],gpu1` gives `node07`.
pub(super) fn first_host(list: &str) -> Option<String> {
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
pub(super) fn slurm_tasks_on_node(counts: &str, node: usize) -> Option<usize> {
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

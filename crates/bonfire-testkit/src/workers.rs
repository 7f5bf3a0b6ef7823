//! Test binaries that run themselves as worker processes.
//!
//! A test starts its own executable once per rank, filtered to one ignored
//! "worker" test whose body returns at once unless a marker variable is set.
//! Each worker gets torchrun's variables, and the variables the test process
//! itself may have been given are removed first, so a test run from inside a
//! job (under mpirun, srun or `bonfire launch`) does not leak its own rank.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

/// The launcher variables a worker reads: removed from every worker's
/// environment, then set for the job the test describes.
pub const LAUNCHER_VARS: [&str; 11] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "BONFIRE_JOB_TOKEN",
    "BONFIRE_INSECURE_RENDEZVOUS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
];

/// The ignored test `test` of this binary, run as a worker when the
/// variable `marker` is set; its value is the worker's role (an output path,
/// a case name).
///
/// ```ignore
/// const WORKERS: SelfWorkers = SelfWorkers::new("ddp_worker", "BONFIRE_TEST_DDP_WORKER");
///
/// #[test]
/// #[ignore = "run as a worker process by the process tests"]
/// fn ddp_worker() {
///     let Some(out) = WORKERS.role() else { return };
///     // ... join the job, train, write the weights to `out`
/// }
/// ```
pub struct SelfWorkers {
    test: &'static str,
    marker: &'static str,
}

impl SelfWorkers {
    /// The ignored test `test`, marked as a worker by the variable `marker`.
    pub const fn new(test: &'static str, marker: &'static str) -> Self {
        SelfWorkers { test, marker }
    }

    /// This process's role when it runs as a worker; `None` in the test.
    pub fn role(&self) -> Option<String> {
        std::env::var(self.marker).ok()
    }

    /// The worker with role `role`, with no launcher variables; its stdout
    /// is dropped and its stderr inherited.
    pub fn command(&self, role: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([self.test, "--exact", "--ignored", "--nocapture", "--test-threads=1"]).env(self.marker, role);
        for var in LAUNCHER_VARS {
            cmd.env_remove(var);
        }
        cmd.stdout(Stdio::null());
        cmd
    }

    /// Rank `rank` of a `world`-rank job on this host meeting at `port`,
    /// with torchrun's variables.
    pub fn rank(&self, role: impl AsRef<OsStr>, rank: usize, world: usize, port: u16) -> Command {
        let mut cmd = self.command(role);
        for (var, value) in torchrun_vars(rank, world, port) {
            cmd.env(var, value);
        }
        cmd
    }
}

/// torchrun's variables for rank `rank` of a one-host job of `world`
/// meeting at `port` on loopback.
pub fn torchrun_vars(rank: usize, world: usize, port: u16) -> Vec<(&'static str, String)> {
    bonfire_collective::DistEnv::local(rank, world, port).vars()
}

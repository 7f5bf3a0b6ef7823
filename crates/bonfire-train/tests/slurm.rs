//! `srun` through a real Slurm: the test starts a one-node cluster on this
//! machine from Debian's slurm-wlm and munge (munged, slurmctld and slurmd,
//! with a generated minimal slurm.conf and no cgroups), runs a DDP job with
//! `srun -N1 -n2 bonfire train`, and stops the cluster again. It needs root
//! (slurmd starts the job's tasks) and the two packages, which `cargo xtask
//! test` installs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

use bonfire_testkit::free_port;
use bonfire_testkit::text;
use common::assert_like_one_worker;

fn run(program: &str, args: &[&str], conf: &Path) -> Output {
    Command::new(program)
        .args(args)
        .env("SLURM_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (Debian's slurm-wlm and munge; `cargo xtask test` installs them)"))
}

/// Whether process `pid` still runs (a zombie, whose parent has not reaped
/// it, does not).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// A running one-node cluster; dropping it stops every daemon.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!("bonfire-slurm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["state", "spool", "munge"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let host = String::from_utf8(Command::new("hostname").arg("-s").output().unwrap().stdout).unwrap();
        let host = host.trim();
        let cluster = Cluster { conf: dir.join("slurm.conf"), dir };
        let d = |p: &str| cluster.dir.join(p).display().to_string();

        // munged runs as its own user, with its socket in our folder.
        let munge_dir = cluster.dir.join("munge");
        let ids = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, "munge"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().expect("a munge user (Debian's munge)")
        };
        std::os::unix::fs::chown(&munge_dir, Some(ids("-u")), Some(ids("-g"))).unwrap();
        let socket = d("munge/munge.socket");
        let munged = run(
            "runuser",
            &[
                "-u",
                "munge",
                "--",
                "/usr/sbin/munged",
                &format!("--socket={socket}"),
                &format!("--pid-file={}", d("munge/munged.pid")),
                &format!("--log-file={}", d("munge/munged.log")),
                &format!("--seed-file={}", d("munge/munged.seed")),
            ],
            &cluster.conf,
        );
        assert!(munged.status.success(), "munged: {}", text(&munged));

        let (ctld_port, slurmd_port) = (free_port(), free_port());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let conf = [
            "ClusterName=bonfire".to_string(),
            format!("SlurmctldHost={host}"),
            "SlurmUser=root".into(),
            "SlurmdUser=root".into(),
            "AuthType=auth/munge".into(),
            format!("AuthInfo=socket={socket}"),
            "CredType=cred/munge".into(),
            format!("StateSaveLocation={}", d("state")),
            format!("SlurmdSpoolDir={}", d("spool")),
            format!("SlurmctldPidFile={}", d("slurmctld.pid")),
            format!("SlurmdPidFile={}", d("slurmd.pid")),
            format!("SlurmctldLogFile={}", d("slurmctld.log")),
            format!("SlurmdLogFile={}", d("slurmd.log")),
            format!("SlurmctldPort={ctld_port}"),
            format!("SlurmdPort={slurmd_port}"),
            // No cgroups: processes are tracked through /proc.
            "ProctrackType=proctrack/linuxproc".into(),
            "TaskPlugin=task/none".into(),
            "MpiDefault=none".into(),
            "JobAcctGatherType=jobacct_gather/none".into(),
            "AccountingStorageType=accounting_storage/none".into(),
            "SchedulerType=sched/builtin".into(),
            "SelectType=select/cons_tres".into(),
            "SelectTypeParameters=CR_CPU".into(),
            "ReturnToService=2".into(),
            format!("NodeName={host} CPUs={cpus} State=UNKNOWN"),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP".into(),
        ]
        .join("\n");
        std::fs::write(&cluster.conf, conf).unwrap();
        let conf_path = cluster.conf.to_str().unwrap();
        let ctld = run("slurmctld", &["-c", "-f", conf_path], &cluster.conf);
        assert!(ctld.status.success(), "slurmctld: {}", text(&ctld));
        let slurmd = run("slurmd", &["-f", conf_path], &cluster.conf);
        assert!(slurmd.status.success(), "slurmd: {}", text(&slurmd));

        // Ready once the node is idle.
        let start = Instant::now();
        loop {
            let state = run("sinfo", &["-h", "-o", "%T"], &cluster.conf);
            if String::from_utf8_lossy(&state.stdout).trim() == "idle" {
                return cluster;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "the node never became idle: {}", cluster.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self) -> String {
        ["slurmctld.log", "slurmd.log", "munge/munged.log"]
            .iter()
            .map(|f| format!("--- {f}\n{}", std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Asks slurmctld and slurmd to stop, then makes sure of every daemon.
        let _ = run("scontrol", &["shutdown"], &self.conf);
        for pid_file in ["slurmd.pid", "slurmctld.pid", "munge/munged.pid"] {
            let Ok(pid) = std::fs::read_to_string(self.dir.join(pid_file)) else { continue };
            let pid = pid.trim().to_string();
            let start = Instant::now();
            while alive(&pid) && start.elapsed() < Duration::from_secs(5) {
                let _ = Command::new("kill").arg(&pid).status();
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
    }
}

/// `srun -N1 -n2 bonfire train`: the tasks find their ranks in Slurm's
/// variables and train as one job; without BONFIRE_JOB_TOKEN they share a
/// secret through a file, so a stranger on the store's port is refused.
#[test]
fn srun_runs_a_ddp_job_that_equals_one_worker() {
    let cluster = Cluster::start();
    let out = cluster.dir.join("runs");
    let ddp = out.join("ddp.safetensors");
    let common = ["--steps", "20", "--batch-size", "50", "--no-shuffle"];
    let bonfire = env!("CARGO_BIN_EXE_bonfire");
    let port = free_port();
    let stranger = common::stranger(port, &cluster.dir.join("stranger"));
    let job = Command::new("srun")
        // --overcommit: two tasks even where the machine has one CPU.
        .args([
            "-N1",
            "-n2",
            "--overcommit",
            bonfire,
            "train",
            "--out",
            out.to_str().unwrap(),
            "--save",
            ddp.to_str().unwrap(),
        ])
        .args(common)
        .env("SLURM_CONF", &cluster.conf)
        // srun passes the environment on: the port the stranger knows.
        .env("MASTER_PORT", port.to_string())
        .env_remove("BONFIRE_JOB_TOKEN")
        .output()
        .unwrap();
    assert!(job.status.success(), "{}\n{}", text(&job), cluster.logs());
    assert_eq!(text(&job).matches("epoch 1:").count(), 1, "one report, from rank 0: {}", text(&job));
    assert_like_one_worker("srun's job", &out, &ddp, &common);
    common::assert_refused(stranger);
}

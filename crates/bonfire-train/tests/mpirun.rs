//! Workers started by Open MPI's `mpirun`: through the ring, and with
//! `--comm mpi` through MPI itself.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bonfire_testkit::text;
use common::{assert_like_one_worker, assert_refused, bonfire, out_dir, stranger};

/// Open MPI's `mpirun` starts the workers; they find their ranks in its
/// variables, meet on one host without MASTER_ADDR, and train as one job:
/// one report, and the weights of one worker on the whole batch. Without
/// BONFIRE_JOB_TOKEN the workers share a secret through a file, so a
/// stranger who reaches the store's port is refused.
#[test]
fn mpirun_starts_a_ddp_job_without_torchruns_variables() {
    let port = bonfire_testkit::free_port();
    let stranger = stranger(port, &out_dir("mpirun-stranger"));
    mpirun_trains_like_one_worker("mpirun", &[], port);
    assert_refused(stranger);
}

/// `--comm mpi`: the gradients go through MPI itself (no rendezvous store,
/// no MASTER_PORT), with the same result.
#[cfg(feature = "mpi")]
#[test]
fn ddp_over_mpi_equals_one_worker_and_the_ring() {
    let mpi = mpirun_trains_like_one_worker("mpi-comm", &["--comm", "mpi"], 0);
    let port = bonfire_testkit::free_port();
    let ring = mpirun_trains_like_one_worker("mpi-ring", &["--comm", "ring"], port);
    let same = bonfire(&["diff-weights", mpi.to_str().unwrap(), ring.to_str().unwrap(), "--tolerance", "1e-5"]);
    assert!(same.status.success(), "MPI against the ring: {}", text(&same));
}

/// A rank killed in the middle of a `--comm mpi` job ends it with a
/// non-zero exit well within the timeout, and `mpirun` names the rank.
#[cfg(feature = "mpi")]
#[test]
fn a_killed_mpi_rank_ends_the_job_naming_it() {
    let dir = out_dir("mpi-killed");
    let started = Instant::now();
    let o = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "sh", "-c"])
        // Rank 1 kills itself once training is under way.
        .arg(format!(
            "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then (sleep 3; kill -9 $$) & fi; exec {} train --comm mpi \
             --steps 100000 --timeout 60 --out {}",
            env!("CARGO_BIN_EXE_bonfire"),
            dir.display()
        ))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("rank 1") && out.contains("signal 9"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(45), "took {:?}: {out}", started.elapsed());
}

/// Trains 20 steps under `mpirun -np 2` (with `--comm` from `train_args`,
/// MASTER_PORT set when `port` is not 0) and compares with one worker.
fn mpirun_trains_like_one_worker(name: &str, train_args: &[&str], port: u16) -> PathBuf {
    let dir = out_dir(name);
    let ddp_weights = dir.join("ddp.safetensors");
    let common = ["--steps", "20", "--batch-size", "50", "--no-shuffle"];
    let mut mpirun = Command::new("mpirun");
    mpirun.args(["-np", "2", "--oversubscribe"]);
    if port != 0 {
        mpirun.args(["-x", &format!("MASTER_PORT={port}")]);
    }
    let o = mpirun
        .arg(env!("CARGO_BIN_EXE_bonfire"))
        .args(["train", "--out", dir.to_str().unwrap(), "--save", ddp_weights.to_str().unwrap()])
        .args(common)
        .args(train_args)
        // Containers and CI run as root, which mpirun refuses unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env_remove("MASTER_PORT")
        .env_remove("BONFIRE_JOB_TOKEN")
        .env_remove("RAYON_NUM_THREADS")
        .output()
        .expect("mpirun (Debian's openmpi-bin; `cargo xtask test` installs it)");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("epoch 1:").count(), 1, "one report, from rank 0: {}", text(&o));
    // mpirun shares out no cores: each worker takes its half itself.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = format!("{} compute threads", (cores / 2).max(1));
    assert_eq!(text(&o).matches(&share).count(), 2, "each worker takes its share of the cores: {}", text(&o));
    assert_like_one_worker("mpirun's job", &dir, &ddp_weights, &common);
    ddp_weights
}

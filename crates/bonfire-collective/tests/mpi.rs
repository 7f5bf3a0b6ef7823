//! MPI (feature `mpi`): this test binary started again by a real `mpirun`
//! as the ranks of an MPI job, each running one case and exiting with a
//! code the test reads.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bonfire_collective::{CommError, Communicator, Group, MpiCommunicator, ReduceOp};
use bonfire_testkit::text;

const CASE: &str = "BONFIRE_MPI_CASE";

/// Not a test of its own: the body of an MPI rank started by the tests below.
#[test]
#[ignore = "run by mpirun as a rank of the MPI tests"]
fn mpi_rank() {
    let Ok(case) = std::env::var(CASE) else { return };
    let timeout = if case == "silent" { Duration::from_secs(1) } else { Duration::from_secs(60) };
    let mut comm = match MpiCommunicator::world(timeout) {
        Ok(comm) => comm,
        Err(e) => {
            eprintln!("rank error: {e}");
            std::process::exit(3);
        }
    };
    let code = match case.as_str() {
        "conformance" => {
            match common::check_all(&mut comm, std::env::var("OMPI_COMM_WORLD_SIZE").as_deref() == Ok("2")) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("rank {} check failed: {e}", comm.rank());
                    4
                }
            }
        }
        "mismatch" => {
            let mut buf = vec![1.0f32; 10 + comm.rank()];
            let e = comm.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap_err();
            eprintln!("rank {}: {e}", comm.rank());
            let named = matches!(e, CommError::Mismatch { rank: 1, .. });
            // As after any failure, the communicator refuses further calls.
            let mut ok = vec![1.0f32; 4];
            let after = comm.all_reduce(ok.as_mut_slice().into(), ReduceOp::Sum);
            if named && matches!(after, Err(CommError::Aborted(_))) {
                0
            } else {
                5
            }
        }
        "silent" => {
            if comm.rank() == 1 {
                std::thread::sleep(Duration::from_secs(60));
            }
            let mut buf = vec![1.0f32; 10];
            let e = comm.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap_err();
            eprintln!("rank {}: {e}", comm.rank());
            let again = comm.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap_err();
            eprintln!("rank {} then: {again}", comm.rank());
            if matches!(e, CommError::Stalled { .. }) && matches!(again, CommError::Aborted(_)) {
                7
            } else {
                8
            }
        }
        other => panic!("unknown case {other}"),
    };
    drop(comm);
    std::process::exit(code);
}

/// Runs `np` ranks of `case` under mpirun.
fn mpirun(np: usize, case: &str) -> Output {
    Command::new("mpirun")
        .args(["-np", &np.to_string(), "--oversubscribe"])
        .arg(std::env::current_exe().unwrap())
        .args(["mpi_rank", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CASE, case)
        // Containers and CI run as root, which mpirun refuses unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun (Debian's openmpi-bin; `cargo xtask test` installs it)")
}

#[test]
fn mpirun_2_and_3_ranks_every_op_matches_a_plain_computation() {
    for np in [2, 3] {
        let o = mpirun(np, "conformance");
        assert!(o.status.success(), "{np} ranks: {}", text(&o));
    }
}

#[test]
fn ranks_that_disagree_are_told_which_rank_and_how() {
    let o = mpirun(2, "mismatch");
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert_eq!(
        out.matches("rank 1 disagrees in all_reduce: its buffer has 11 elements, rank 0's has 10").count(),
        2,
        "{out}"
    );
}

#[test]
fn a_rank_that_never_joins_times_out_the_others_and_the_job_ends() {
    let started = Instant::now();
    let o = mpirun(2, "silent");
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("rank 0: timed out after 1s in all_reduce"), "{out}");
    assert!(out.contains("rank 0 then: communicator is unusable"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}: {out}", started.elapsed());
}

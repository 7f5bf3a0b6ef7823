//! The TCP ring: workers as threads of this test over loopback, and as real
//! processes (this test binary started again as a worker).

mod common;

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use bonfire_collective::{CommError, Communicator, DistEnv, Group, JobToken, ReduceOp, TcpCommunicator, TcpConfig};
use bonfire_testkit::{free_port, torchrun_vars, SelfWorkers};

fn env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv { job_token: JobToken::Given("test-job".into()), ..DistEnv::local(rank, world, port) }
}

fn config(timeout: Duration) -> TcpConfig {
    // Small chunks so that the pipeline runs many steps even on small buffers;
    // a short stall warning for the stall inspector's test.
    TcpConfig { timeout, chunk_bytes: 64 << 10, stall_warning: Duration::from_millis(300), ..TcpConfig::default() }
}

/// Runs `f` on ranks `ranks` of a `world`-rank group, each in its own thread.
fn run_ranks<R: Send>(
    world: usize,
    ranks: &[usize],
    timeout: Duration,
    f: impl Fn(Result<TcpCommunicator, CommError>) -> R + Sync,
) -> Vec<R> {
    run_ranks_with(world, ranks, config(timeout), f)
}

fn run_ranks_with<R: Send>(
    world: usize,
    ranks: &[usize],
    config: TcpConfig,
    f: impl Fn(Result<TcpCommunicator, CommError>) -> R + Sync,
) -> Vec<R> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .map(|&rank| {
                let (f, config) = (&f, config.clone());
                s.spawn(move || f(TcpCommunicator::connect(&env(rank, world, port), config)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn threads_every_op_matches_a_plain_computation_for_worlds_1_to_4() {
    for world in 1..=4 {
        let all: Vec<usize> = (0..world).collect();
        for r in run_ranks(world, &all, Duration::from_secs(60), |c| common::check_all(&mut c.unwrap(), world <= 2)) {
            r.unwrap_or_else(|e| panic!("world {world}: {e}"));
        }
    }
}

/// Ranks on one host pass bytes through shared memory unless told not to:
/// the sockets alone, as between hosts, give the same results.
#[test]
fn threads_over_sockets_alone_every_op_matches_a_plain_computation() {
    for world in [2, 3] {
        let all: Vec<usize> = (0..world).collect();
        let sockets = TcpConfig { shared_memory: false, ..config(Duration::from_secs(60)) };
        for r in run_ranks_with(world, &all, sockets, |c| common::check_all(&mut c.unwrap(), world <= 2)) {
            r.unwrap_or_else(|e| panic!("world {world}: {e}"));
        }
    }
}

#[test]
fn threads_on_one_host_pass_bytes_through_shared_memory_unless_told_not_to() {
    for shared_memory in [true, false] {
        let port = free_port();
        let logs: Vec<String> = std::thread::scope(|s| {
            let ranks: Vec<_> = (0..2)
                .map(|rank| {
                    s.spawn(move || {
                        let log = bonfire_testkit::Captured::default();
                        let sink = log.clone();
                        let subscriber = tracing_subscriber::fmt()
                            .with_ansi(false)
                            .with_max_level(tracing::Level::DEBUG)
                            .with_writer(move || sink.clone())
                            .finish();
                        let config = TcpConfig { shared_memory, ..config(Duration::from_secs(30)) };
                        let mut comm = tracing::subscriber::with_default(subscriber, || {
                            TcpCommunicator::connect(&env(rank, 2, port), config)
                        })
                        .unwrap();
                        let mut buf = vec![1f32; 1 << 20];
                        comm.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap();
                        assert!(buf.iter().all(|&v| v == 2.0));
                        log.text()
                    })
                })
                .collect();
            ranks.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for log in logs {
            let both_ways = log.contains("sends through shared memory: true; receives through it: true");
            assert_eq!(both_ways, shared_memory, "{log}");
        }
    }
}

#[test]
fn threads_a_rank_that_never_joins_is_named() {
    let errors = run_ranks(3, &[0, 1], Duration::from_millis(800), |c| c.err().expect("rendezvous must fail"));
    for e in errors {
        assert!(matches!(&e, CommError::Missing { ranks, .. } if ranks == &[2]), "{e}");
        assert!(e.to_string().contains("[2]"), "{e}");
    }
}

#[test]
fn threads_a_peer_that_leaves_is_named() {
    let results = run_ranks(2, &[0, 1], Duration::from_secs(10), |c| {
        let mut c = c.unwrap();
        if c.rank() == 1 {
            drop(c); // closes its sockets
            return None;
        }
        let mut buf = vec![1f32; 1 << 16];
        Some(c.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap_err())
    });
    let err = results.into_iter().flatten().next().unwrap();
    assert!(matches!(err, CommError::PeerLost { rank: 1, .. }), "{err}");
}

#[test]
fn threads_a_silent_peer_times_out_naming_it() {
    let results = run_ranks(2, &[0, 1], Duration::from_secs(10), |c| {
        let mut c = c.unwrap();
        c.set_timeout(Duration::from_millis(300));
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(1500)); // alive, but silent
            return None;
        }
        let mut buf = vec![1f32; 8];
        let started = std::time::Instant::now();
        let err = c.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(1200), "took {:?}", started.elapsed());
        // Afterwards the communicator refuses work instead of desynchronising.
        let again = c.barrier().unwrap_err();
        Some((err, again))
    });
    let (err, again) = results.into_iter().flatten().next().unwrap();
    assert!(matches!(err, CommError::Timeout { rank: 1, .. }), "{err}");
    assert!(matches!(again, CommError::Aborted(_)), "{again}");
}

#[test]
fn threads_mismatched_calls_are_named() {
    let results = run_ranks(2, &[0, 1], Duration::from_secs(10), |c| {
        let mut c = c.unwrap();
        let mut buf = vec![0f32; 10 + c.rank()];
        c.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap_err()
    });
    for (rank, err) in results.into_iter().enumerate() {
        let other = 1 - rank;
        assert!(
            matches!(&err, CommError::Mismatch { rank: r, detail, .. } if *r == other && detail.contains("its buffer has")),
            "{err}"
        );
    }
}

#[test]
fn threads_a_worker_with_another_job_token_is_refused() {
    let port = free_port();
    let timeout = Duration::from_millis(800);
    let (first, stranger) = std::thread::scope(|s| {
        let first = s.spawn(|| TcpCommunicator::connect(&env(0, 2, port), config(timeout)));
        let stranger = s.spawn(|| {
            let env = DistEnv { job_token: JobToken::Given("another-job".into()), ..env(1, 2, port) };
            TcpCommunicator::connect(&env, config(timeout))
        });
        (first.join().unwrap(), stranger.join().unwrap())
    });
    let err = stranger.err().expect("the stranger is refused");
    assert!(matches!(err, CommError::Refused { .. }) && err.to_string().contains("job token"), "{err}");
    let err = first.err().expect("rank 1 never joined");
    assert!(matches!(&err, CommError::Missing { ranks, .. } if ranks == &[1]), "{err}");
}

#[test]
fn threads_world_sizes_that_disagree_are_named() {
    let port = free_port();
    let timeout = Duration::from_millis(800);
    let (rank0, rank1) = std::thread::scope(|s| {
        let rank0 = s.spawn(|| TcpCommunicator::connect(&env(0, 2, port), config(timeout)));
        let rank1 = s.spawn(|| TcpCommunicator::connect(&env(1, 3, port), config(timeout)));
        (rank0.join().unwrap(), rank1.join().unwrap())
    });
    let err = rank1.err().expect("rank 1 disagrees");
    assert!(
        matches!(&err, CommError::Mismatch { rank: 0, detail, .. } if detail.contains("WORLD_SIZE is 2, this worker's is 3")),
        "{err}"
    );
    assert!(rank0.is_err(), "rank 0 cannot complete a group with rank 1 gone");
}

#[test]
fn threads_two_workers_claiming_one_rank_are_caught() {
    let port = free_port();
    // Everyone keeps its communicator until all three have their answer:
    // otherwise the rightful pair may finish, and rank 0 take its store down,
    // before a slow second claimant has even reached it.
    let all_answered = std::sync::Barrier::new(3);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = [0, 1, 1]
            .into_iter()
            .map(|rank| {
                let all_answered = &all_answered;
                s.spawn(move || {
                    let result = TcpCommunicator::connect(&env(rank, 2, port), config(Duration::from_secs(10)))
                        .and_then(|mut c| {
                            let mut buf = vec![1f32; 4];
                            c.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum)?;
                            Ok((c, buf))
                        });
                    all_answered.wait();
                    result.map(|(_, buf)| buf)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 1, "exactly the second claimant is refused: {results:?}");
    assert!(refused[0].to_string().contains("rank 1 is already taken"), "{}", refused[0]);
    for r in results.into_iter().flatten() {
        assert_eq!(r, vec![2f32; 4], "the rightful pair works");
    }
}

#[test]
fn threads_a_store_port_in_use_is_named() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = TcpCommunicator::connect(&env(0, 2, port), config(Duration::from_millis(500))).err().unwrap();
    let text = err.to_string();
    assert!(text.contains("cannot host the rendezvous store") && text.contains("holds that port"), "{text}");
}

/// The store binds MASTER_ADDR, not every interface: with MASTER_ADDR
/// 127.0.0.1 it is unreachable at 127.0.0.2, another address of the loopback
/// interface (all of 127/8 is local on Linux), where a store bound to every
/// interface would answer. No other interface is needed.
#[test]
fn the_store_listens_only_on_master_addr() {
    let port = free_port();
    let _comm = TcpCommunicator::connect(&env(0, 1, port), config(Duration::from_secs(5))).unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "reachable at MASTER_ADDR");
    let other = std::net::SocketAddr::from(([127, 0, 0, 2], port));
    let outside = std::net::TcpStream::connect_timeout(&other, Duration::from_secs(2));
    assert!(outside.is_err(), "the store must not be reachable at {other}");
}

#[test]
fn threads_the_stall_inspector_names_the_rank_that_is_behind_and_the_call() {
    let results = run_ranks(3, &[0, 1, 2], Duration::from_secs(10), |c| {
        let mut c = c.unwrap();
        let log = bonfire_testkit::Captured::default();
        tracing::subscriber::with_default(log.subscriber(), || {
            let mut buf = vec![1f32; 1 << 12];
            c.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap();
            if c.rank() == 2 {
                std::thread::sleep(Duration::from_millis(700)); // behind, but within the timeout
            }
            c.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap();
            assert!(buf.iter().all(|&v| v == 9.0), "the late call still completes correctly");
        });
        (c.rank(), log.text())
    });
    // Rank 0 waits on rank 2 directly, for a call rank 2 has not started.
    let (_, log0) = &results[0];
    assert!(log0.contains("stall: rank 0 has waited") && log0.contains("in all_reduce #"), "{log0}");
    assert!(log0.contains("for rank 2, which has not started it"), "{log0}");
    // Rank 2 itself waited for nobody.
    assert!(!results[2].1.contains("stall"), "{}", results[2].1);
}

// ---- real processes ----------------------------------------------------------

/// A worker's role is its timeout in milliseconds.
const WORKERS: SelfWorkers = SelfWorkers::new("worker_process", "BONFIRE_TEST_WORKER");

/// Not a test of its own: the body of a worker process started by the tests
/// below.
#[test]
#[ignore = "run as a worker process by the process tests"]
fn worker_process() {
    let Some(timeout_ms) = WORKERS.role() else { return };
    let timeout = Duration::from_millis(timeout_ms.parse().unwrap());
    let code = match TcpCommunicator::from_env(config(timeout)) {
        Err(e) => {
            eprintln!("worker error: {e}");
            3
        }
        Ok(mut comm) => match common::check_all(&mut comm, true) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("worker check failed: {e}");
                4
            }
        },
    };
    std::process::exit(code);
}

fn spawn_worker(vars: &[(&str, String)], timeout_ms: u64) -> std::process::Child {
    let mut cmd = WORKERS.command(timeout_ms.to_string());
    cmd.envs(vars.iter().map(|(k, v)| (k, v))).stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

/// Starts `ranks` of a `world`-rank job; returns (exit code, stderr) of each.
fn run_processes(world: usize, ranks: &[usize], timeout_ms: u64) -> Vec<(i32, String)> {
    let port = free_port();
    let children: Vec<_> = ranks.iter().map(|&r| spawn_worker(&torchrun_vars(r, world, port), timeout_ms)).collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
        })
        .collect()
}

#[test]
fn processes_every_op_matches_a_plain_computation_for_worlds_2_and_3() {
    for world in [2, 3] {
        let all: Vec<usize> = (0..world).collect();
        for (rank, (code, stderr)) in run_processes(world, &all, 60_000).into_iter().enumerate() {
            assert_eq!(code, 0, "world {world} rank {rank}: {stderr}");
        }
    }
}

#[test]
fn processes_a_rank_that_never_joins_is_named() {
    let started = std::time::Instant::now();
    for (code, stderr) in run_processes(3, &[0, 1], 1000) {
        assert_eq!(code, 3, "{stderr}");
        assert!(stderr.contains("rank(s) [2] never arrived"), "{stderr}");
    }
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn processes_a_bad_environment_variable_is_named() {
    let port = free_port();
    let mut vars = torchrun_vars(0, 2, port);
    vars[1].1 = "two".into();
    let out = spawn_worker(&vars, 1000).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("WORLD_SIZE") && stderr.contains("\"two\""), "{stderr}");

    let vars: Vec<_> = torchrun_vars(0, 2, port).into_iter().filter(|(k, _)| *k != "MASTER_PORT").collect();
    let out = spawn_worker(&vars, 1000).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("MASTER_PORT") && stderr.contains("not set"), "{stderr}");
}

//! Soak: thousands of all-reduces of random sizes across 3 real processes,
//! each result checked, and the resident memory of every worker bounded.
//!
//! `soak_short` (in the normal test run) makes 200 calls; `soak_full` makes
//! the full 2 000 and runs with `cargo test -p bonfire-collective --test soak
//! -- --ignored`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bonfire_collective::{Communicator, Group, ReduceOp, TcpCommunicator, TcpConfig};
use bonfire_testkit::{free_port, SelfWorkers};

/// A worker's role is the number of calls it makes.
const WORKERS: SelfWorkers = SelfWorkers::new("soak_worker", "BONFIRE_SOAK_WORKER");
const WORLD: usize = 3;
const MAX_BYTES: usize = 4 << 20;

/// The same pseudo-random sizes on every rank (xorshift, fixed seed).
fn sizes(calls: usize) -> Vec<usize> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..calls)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (MAX_BYTES / 4 + 1) as u64) as usize
        })
        .collect()
}

/// This rank's input for call `call`: small integers, so sums are exact.
fn value(rank: usize, call: usize, i: usize) -> f32 {
    ((rank + 1) * ((i + call) % 13)) as f32
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Not a test of its own: the body of each soak worker process.
#[test]
#[ignore = "run as a worker process by the soak tests"]
fn soak_worker() {
    let Some(calls) = WORKERS.role() else { return };
    let calls: usize = calls.parse().unwrap();
    let config = TcpConfig { timeout: Duration::from_secs(30), ..TcpConfig::default() };
    let mut comm = TcpCommunicator::from_env(config).unwrap();
    let rank = comm.rank();
    let rank_factor: f32 = (1..=WORLD).sum::<usize>() as f32;
    let mut warm_kib = 0;
    for (call, &len) in sizes(calls).iter().enumerate() {
        let mut buf: Vec<f32> = (0..len).map(|i| value(rank, call, i)).collect();
        comm.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap();
        for (i, &got) in buf.iter().enumerate() {
            let want = rank_factor * ((i + call) % 13) as f32;
            assert_eq!(got, want, "call {call} (length {len}), element {i}");
        }
        if call == calls / 10 {
            warm_kib = resident_kib();
        }
    }
    let grown = resident_kib().saturating_sub(warm_kib);
    // Buffers of up to 4 MiB come and go; the allocator may keep a few.
    assert!(grown < 32 * 1024, "rank {rank}: resident memory grew by {grown} KiB after warming up");
    println!("rank {rank}: {calls} calls checked; resident memory grew {grown} KiB after warm-up");
}

fn soak(calls: usize, limit: Duration) {
    let port = free_port();
    let started = Instant::now();
    let children: Vec<_> = (0..WORLD)
        .map(|rank| {
            WORKERS
                .rank(calls.to_string(), rank, WORLD, port)
                .env("BONFIRE_JOB_TOKEN", "soak")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "rank {rank}: {log}");
        assert!(log.contains(&format!("{calls} calls checked")), "rank {rank}: {log}");
        eprintln!("{}", log.lines().find(|l| l.contains("calls checked")).unwrap_or_default());
    }
    assert!(started.elapsed() < limit, "the soak took {:?}", started.elapsed());
}

#[test]
fn soak_short() {
    soak(200, Duration::from_secs(300));
}

#[test]
#[ignore = "the full soak: 2 000 calls, about a minute in release, several in the dev profile"]
fn soak_full() {
    soak(2000, Duration::from_secs(1800));
}

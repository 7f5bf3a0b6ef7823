//! The heartbeat through a real rendezvous store: three ranks as threads,
//! each with its own store connection, and stand-ins for a collective that
//! blocks (a sleep inside `enter`), since the libraries that need the
//! heartbeat (NCCL) do not run here.

#[allow(dead_code)] // this file uses only the log capture
mod common;

use std::time::{Duration, Instant};

use bonfire_collective::heartbeat::Heartbeat;
use bonfire_collective::store::{StoreClient, StoreServer};

const STALL: Duration = Duration::from_millis(800);

fn store() -> (StoreServer, String) {
    let server = StoreServer::bind("127.0.0.1:0", "job").unwrap();
    let addr = server.addr().to_string();
    (server, addr)
}

fn beat(addr: &str, rank: usize) -> Heartbeat {
    Heartbeat::start(StoreClient::connect(addr, "job", Duration::from_secs(5)).unwrap(), rank, 3, STALL)
}

/// Ranks 0 and 1 wait in their first call; rank 2 never starts it (blocked
/// before the collective) or started it and then froze (its beat stops).
/// Each waiting rank must name rank 2 within the stall interval and a beat
/// or two more, and name no other rank.
#[test]
fn the_ranks_in_a_stalled_call_name_the_rank_that_is_behind_or_silent() {
    let log = common::Captured::default();
    tracing::subscriber::set_global_default(log.subscriber()).unwrap();
    let (_server, addr) = store();

    // Rank 2 is alive but never starts the call.
    let started = Instant::now();
    std::thread::scope(|s| {
        let rank2 = beat(&addr, 2);
        for rank in 0..2 {
            let addr = addr.clone();
            s.spawn(move || {
                let heartbeat = beat(&addr, rank);
                let _call = heartbeat.enter("all_reduce");
                std::thread::sleep(STALL + Duration::from_millis(1500));
            });
        }
        std::thread::sleep(STALL + Duration::from_millis(1600));
        drop(rank2);
    });
    let text = log.text();
    for rank in 0..2 {
        assert!(
            text.contains(&format!("stall: rank {rank} has waited"))
                && text.contains("in all_reduce (call 1); behind: rank 2 has not started a collective yet"),
            "rank {rank} names rank 2 as behind: {text}"
        );
    }
    assert!(!text.contains("stall: rank 2"), "rank 2 waits for nobody: {text}");
    assert!(!text.contains("behind: rank 0") && !text.contains("behind: rank 1"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Rank 2 starts the call like the others, then freezes: its beat stops.
    let (_server, addr) = store();
    std::thread::scope(|s| {
        let rank2 = beat(&addr, 2);
        let call = rank2.enter("broadcast");
        std::thread::sleep(Duration::from_millis(600)); // published once at least
        std::mem::forget(call);
        drop(rank2); // stops beating, as a frozen process would
        for rank in 0..2 {
            let addr = addr.clone();
            s.spawn(move || {
                let heartbeat = beat(&addr, rank);
                let _call = heartbeat.enter("broadcast");
                std::thread::sleep(STALL + Duration::from_millis(2500));
            });
        }
    });
    let text = log.text();
    let silent =
        text.lines().filter(|l| l.contains("in broadcast (call 1)") && l.contains("stopped beating: rank 2")).count();
    assert_eq!(silent, 2, "both waiting ranks name rank 2 as silent: {text}");
}

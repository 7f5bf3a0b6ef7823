//! The ring's rendezvous against a stranger who reads the store (which
//! only this crate can do) and connects to a ring port without a word.

use std::time::Duration;

use super::{TcpCommunicator, TcpConfig};
use crate::env::{DistEnv, JobToken};
use crate::store::{Store, StoreClient};

fn env(rank: usize, port: u16) -> DistEnv {
    DistEnv { job_token: JobToken::Given("test-job".into()), ..DistEnv::local(rank, 2, port) }
}

#[test]
fn a_silent_stranger_on_a_ring_port_does_not_stall_the_rendezvous() {
    let port = bonfire_testkit::free_port();
    let timeout = Duration::from_secs(10);
    let results: Vec<(bool, Duration)> = std::thread::scope(|s| {
        let timed = |rank: usize| {
            let started = std::time::Instant::now();
            (
                TcpCommunicator::connect(&env(rank, port), TcpConfig { timeout, ..TcpConfig::default() }).is_ok(),
                started.elapsed(),
            )
        };
        let rank0 = s.spawn(move || timed(0));
        // Rank 0 publishes its ring address and waits for rank 1; a stranger
        // who learnt the address connects before rank 1 and says nothing.
        let stranger = s.spawn(|| {
            let addr = format!("127.0.0.1:{port}");
            let mut store = StoreClient::connect(&addr, "test-job", timeout).unwrap();
            let ring0 = store.get("ring/0", timeout).unwrap().unwrap();
            let silent = std::net::TcpStream::connect(String::from_utf8(ring0).unwrap()).unwrap();
            std::thread::sleep(Duration::from_secs(7));
            drop(silent);
        });
        let rank1 = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(1000));
            timed(1)
        });
        let out = vec![rank0.join().unwrap(), rank1.join().unwrap()];
        stranger.join().unwrap();
        out
    });
    assert!(results.iter().all(|(ok, _)| *ok), "both ranks join despite the stranger: {results:?}");
    // Rank 1 came after 1 s; the stranger cost rank 0 at most 2 s more, not
    // the whole timeout.
    assert!(results[0].1 < Duration::from_secs(6), "rank 0 took {:?}", results[0].1);
}

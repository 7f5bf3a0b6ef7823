//! Which rank is behind, for communicators whose library cannot say (NCCL:
//! a call whose peer never comes just waits inside the GPU). Every rank
//! publishes through the rendezvous store, once per beat, the number of the
//! collective call it is in or last finished; a rank that has waited in a
//! call longer than the stall interval reads everyone's and logs which ranks
//! have not started that call, where they are, and which stopped beating
//! (a dead or frozen process), as the TCP ring's stall inspector does from
//! its own sockets.
//!
//! The beat runs on a thread of its own with its own store connection, so a
//! rank blocked in a collective keeps beating: a rank whose beat stops is
//! not merely slow. What a rank publishes (`heartbeat/RANK`): its call number
//! (u64), whether it is inside that call (u8), a beat counter (u64), then the
//! call's name.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::store::Store;

/// How often a rank publishes its progress.
pub const BEAT: Duration = Duration::from_millis(500);

/// One rank's published progress.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Progress {
    /// Calls started so far (the current one included).
    seq: u64,
    in_call: bool,
    op: String,
}

impl Progress {
    fn encode(&self, beat: u64) -> Vec<u8> {
        let mut out = self.seq.to_le_bytes().to_vec();
        out.push(u8::from(self.in_call));
        out.extend(beat.to_le_bytes());
        out.extend(self.op.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<(Progress, u64)> {
        let seq = u64::from_le_bytes(bytes.get(0..8)?.try_into().ok()?);
        let in_call = *bytes.get(8)? != 0;
        let beat = u64::from_le_bytes(bytes.get(9..17)?.try_into().ok()?);
        let op = String::from_utf8_lossy(bytes.get(17..)?).into_owned();
        Some((Progress { seq, in_call, op }, beat))
    }
}

struct Shared {
    progress: Mutex<(Progress, Instant)>,
    stop: AtomicBool,
}

/// This rank's heartbeat; see the module documentation. Stops when dropped.
pub struct Heartbeat {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Marks one collective call; the call ends when this is dropped.
pub struct InCall(Arc<Shared>);

impl Drop for InCall {
    fn drop(&mut self) {
        self.0.progress.lock().unwrap_or_else(|e| e.into_inner()).0.in_call = false;
    }
}

impl Heartbeat {
    /// Starts beating for `rank` of `world` over `store` (a connection of
    /// its own), warning after `stall_warning` in one call.
    pub fn start(mut store: Box<dyn Store>, rank: usize, world: usize, stall_warning: Duration) -> Self {
        let progress = Progress { seq: 0, in_call: false, op: String::new() };
        let shared =
            Arc::new(Shared { progress: Mutex::new((progress, Instant::now())), stop: AtomicBool::new(false) });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("bonfire-heartbeat-{rank}"))
                .spawn(move || beat(store.as_mut(), &shared, rank, world, stall_warning))
                .expect("starting the heartbeat thread")
        };
        Heartbeat { shared, thread: Some(thread) }
    }

    /// Marks the start of a collective call named `op`, until the returned
    /// guard is dropped.
    pub fn enter(&self, op: &str) -> InCall {
        let mut progress = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        progress.0.seq += 1;
        progress.0.in_call = true;
        progress.0.op = op.to_string();
        progress.1 = Instant::now();
        InCall(self.shared.clone())
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The heartbeat thread: publish, and past the stall interval in one call,
/// name the ranks that are behind, once per call.
fn beat(store: &mut dyn Store, shared: &Shared, rank: usize, world: usize, stall_warning: Duration) {
    let key = |r: usize| format!("heartbeat/{r}");
    let mut count = 0u64;
    let mut warned = 0u64;
    // The last beat counter seen of each rank, and when it last changed.
    let mut seen: Vec<Option<(u64, Instant)>> = vec![None; world];
    while !shared.stop.load(Ordering::SeqCst) {
        count += 1;
        let (mine, since) = shared.progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if store.set(&key(rank), &mine.encode(count)).is_err() {
            return; // the store is gone with rank 0: the job is ending
        }
        if mine.in_call && mine.seq > warned && since.elapsed() >= stall_warning {
            let mut behind = Vec::new();
            let mut silent = Vec::new();
            for (r, last) in seen.iter_mut().enumerate().filter(|(r, _)| *r != rank) {
                let Ok(Some(bytes)) = store.get(&key(r), Duration::ZERO) else {
                    behind.push(format!("rank {r} has not published any progress"));
                    continue;
                };
                let Some((theirs, their_beat)) = Progress::decode(&bytes) else { continue };
                match *last {
                    Some((b, at)) if b == their_beat && at.elapsed() >= 3 * BEAT => {
                        silent.push(format!("rank {r} (no beat for {:.1} s)", at.elapsed().as_secs_f64()))
                    }
                    Some((b, _)) if b == their_beat => {}
                    _ => *last = Some((their_beat, Instant::now())),
                }
                if theirs.seq == 0 {
                    behind.push(format!("rank {r} has not started a collective yet"));
                } else if theirs.seq < mine.seq {
                    let state = if theirs.in_call { "in" } else { "after" };
                    behind.push(format!("rank {r} is {state} call {} ({})", theirs.seq, theirs.op));
                }
            }
            if !behind.is_empty() || !silent.is_empty() {
                warned = mine.seq;
                tracing::warn!(
                    "stall: rank {rank} has waited {:.1} s in {} (call {}); behind: {}; stopped beating: {}",
                    since.elapsed().as_secs_f64(),
                    mine.op,
                    mine.seq,
                    if behind.is_empty() { "none".into() } else { behind.join(", ") },
                    if silent.is_empty() { "none".into() } else { silent.join(", ") },
                );
            }
        }
        std::thread::sleep(BEAT);
    }
}

#[cfg(test)]
mod tests {
    //! The heartbeat through a real rendezvous store: three ranks as
    //! threads, each with its own store connection, and stand-ins for a
    //! collective that blocks (a sleep inside `enter`), since the libraries
    //! that need the heartbeat (NCCL) do not run here.

    use std::time::{Duration, Instant};

    use super::{Heartbeat, Progress};
    use crate::store::{StoreClient, StoreServer};

    #[test]
    fn progress_round_trips() {
        let p = Progress { seq: 17, in_call: true, op: "all_reduce".into() };
        assert_eq!(Progress::decode(&p.encode(5)), Some((p, 5)));
        assert_eq!(Progress::decode(&[1, 2, 3]), None);
    }

    const STALL: Duration = Duration::from_millis(800);

    fn store() -> (StoreServer, String) {
        let server = StoreServer::bind("127.0.0.1:0", "job").unwrap();
        let addr = server.addr().to_string();
        (server, addr)
    }

    fn beat(addr: &str, rank: usize) -> Heartbeat {
        Heartbeat::start(Box::new(StoreClient::connect(addr, "job", Duration::from_secs(5)).unwrap()), rank, 3, STALL)
    }

    /// Ranks 0 and 1 wait in their first call; rank 2 never starts it (blocked
    /// before the collective) or started it and then froze (its beat stops).
    /// Each waiting rank must name rank 2 within the stall interval and a beat
    /// or two more, and name no other rank.
    #[test]
    fn the_ranks_in_a_stalled_call_name_the_rank_that_is_behind_or_silent() {
        let log = bonfire_testkit::Captured::default();
        // The only global subscriber of this test binary: no other test here
        // logs a stall.
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
        let silent = text
            .lines()
            .filter(|l| l.contains("in broadcast (call 1)") && l.contains("stopped beating: rank 2"))
            .count();
        assert_eq!(silent, 2, "both waiting ranks name rank 2 as silent: {text}");
    }
}

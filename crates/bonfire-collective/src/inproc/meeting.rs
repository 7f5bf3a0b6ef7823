//! Where the ranks of an in-process group meet: the barrier each call
//! starts with (it publishes the call and where its buffers lie, waits at
//! most the timeout, logs a stall, and gives every rank the same verdict on
//! whether they all asked for the same thing), and the barriers inside a
//! call, which need no timeout (see the module comment of `inproc`).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::call::{verdict, Call};
use crate::error::{CommError, Result};

/// What one rank published when it joined a call: the call, and where
/// its buffers lie for the peers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Joined {
    pub call: Call,
    /// Address of the input buffer; peers read it between the join and final barriers.
    pub src: usize,
    /// `all_reduce_segments` only: how many segments `src` lists.
    pub parts: usize,
}

pub(super) struct Round {
    pub calls: Vec<Joined>,
    /// The same verdict for every rank, so they all fail or all proceed.
    verdict: Result<(), (usize, String)>,
}

pub(super) struct Shared {
    pub world: usize,
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    generation: u64,
    arrived: Vec<Option<Joined>>,
    count: usize,
    round: Option<Arc<Round>>,
    failed: Option<String>,
}

impl Shared {
    pub fn new(world: usize) -> Self {
        Shared {
            world,
            state: Mutex::new(State { generation: 0, arrived: vec![None; world], count: 0, round: None, failed: None }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another worker thread panicked; the state
        // itself is always left consistent, so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The barrier every call starts with: publishes `call`, waits at most the
    /// timeout for all ranks, and checks that they all asked for the same thing.
    pub fn join(
        &self,
        rank: usize,
        name: &'static str,
        call: Joined,
        timeout: Duration,
        stall_warning: Duration,
    ) -> Result<Arc<Round>> {
        let world = self.world;
        let started = Instant::now();
        let deadline = started + timeout;
        let mut warn_at = Some(started + stall_warning);
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(CommError::Aborted(why.clone()));
        }
        let generation = st.generation;
        st.arrived[rank] = Some(call);
        st.count += 1;
        if st.count == world {
            let calls: Vec<Joined> = st.arrived.iter_mut().map(|c| c.take().unwrap()).collect();
            let verdict = verdict(&calls.iter().map(|j| j.call).collect::<Vec<_>>());
            st.round = Some(Arc::new(Round { calls, verdict }));
            st.count = 0;
            st.generation += 1;
            self.changed.notify_all();
        } else {
            loop {
                if st.generation != generation {
                    break;
                }
                if let Some(why) = &st.failed {
                    return Err(CommError::Aborted(why.clone()));
                }
                let now = Instant::now();
                if now >= deadline {
                    let ranks: Vec<usize> = (0..world).filter(|&r| st.arrived[r].is_none()).collect();
                    let err = CommError::Missing { op: name, ranks, waited: timeout };
                    // Nobody may complete this barrier any more: we are leaving,
                    // and our buffer with us.
                    st.failed = Some(err.to_string());
                    self.changed.notify_all();
                    return Err(err);
                }
                if warn_at.is_some_and(|at| now >= at) {
                    warn_at = None;
                    let ranks: Vec<usize> = (0..world).filter(|&r| st.arrived[r].is_none()).collect();
                    tracing::warn!(
                        "stall: rank {} has waited {:.1} s in {name} for rank(s) {ranks:?}, which have not started it",
                        rank,
                        (now - started).as_secs_f64()
                    );
                }
                let wake = warn_at.map_or(deadline, |at| at.min(deadline));
                st = self.changed.wait_timeout(st, wake - now).unwrap_or_else(|e| e.into_inner()).0;
            }
        }
        let round = st.round.clone().expect("a completed barrier publishes its round");
        drop(st);
        match &round.verdict {
            Ok(()) => Ok(round),
            Err((rank, detail)) => Err(CommError::Mismatch { op: name, rank: *rank, detail: detail.clone() }),
        }
    }

    /// A barrier inside a call, after every rank has joined: no timeout, see
    /// the module comment.
    pub fn sync(&self) {
        let mut st = self.lock();
        let generation = st.generation;
        st.count += 1;
        if st.count == self.world {
            st.count = 0;
            st.generation += 1;
            self.changed.notify_all();
            return;
        }
        while st.generation == generation {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

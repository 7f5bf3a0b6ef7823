//! The in-process communicator: N threads of this test.

mod common;

use std::time::Duration;

use bonfire_collective::{BufMut, BufRef, CommError, Communicator, Group, InProcCommunicator, ReduceOp};

fn run_group<R: Send>(world: usize, f: impl Fn(InProcCommunicator) -> R + Sync) -> Vec<R> {
    let comms = InProcCommunicator::group(world).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn every_op_matches_a_plain_computation_for_worlds_1_to_4() {
    for world in 1..=4 {
        for result in run_group(world, |mut c| common::check_all(&mut c, true)) {
            result.unwrap_or_else(|e| panic!("world {world}: {e}"));
        }
    }
}

/// An in-process communicator with one collective that does nothing, to
/// show that the conformance suite notices.
struct Broken {
    inner: InProcCommunicator,
    skip: &'static str,
}

impl Group for Broken {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
}

impl Communicator for Broken {
    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.inner.set_timeout(timeout)
    }
    fn all_reduce(&mut self, buf: BufMut<'_>, op: ReduceOp) -> bonfire_collective::Result<()> {
        self.inner.all_reduce(buf, op)
    }
    fn broadcast(&mut self, buf: BufMut<'_>, root: usize) -> bonfire_collective::Result<()> {
        self.inner.broadcast(buf, root)
    }
    fn all_gather(&mut self, input: BufRef<'_>, output: BufMut<'_>) -> bonfire_collective::Result<()> {
        match self.skip {
            "all_gather" => Ok(()),
            _ => self.inner.all_gather(input, output),
        }
    }
    fn reduce_scatter(
        &mut self,
        input: BufRef<'_>,
        output: BufMut<'_>,
        op: ReduceOp,
    ) -> bonfire_collective::Result<()> {
        match self.skip {
            "reduce_scatter" => Ok(()),
            _ => self.inner.reduce_scatter(input, output, op),
        }
    }
    fn barrier(&mut self) -> bonfire_collective::Result<()> {
        self.inner.barrier()
    }
}

#[test]
fn the_conformance_suite_fails_a_collective_that_writes_nothing() {
    for skip in ["all_gather", "reduce_scatter"] {
        for world in [1, 2] {
            for result in run_group(world, |inner| common::check_all(&mut Broken { inner, skip }, false)) {
                let err = result.expect_err(&format!("a no-op {skip} passed the suite at world {world}"));
                assert!(err.starts_with(skip), "world {world}: {err}");
            }
        }
    }
}

#[test]
fn a_rank_that_never_joins_is_named() {
    let mut comms = InProcCommunicator::group(3).unwrap();
    let late = comms.pop().unwrap(); // rank 2 never calls
    let errors: Vec<CommError> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    c.set_timeout(Duration::from_millis(300));
                    let mut buf = vec![1.0f32; 10];
                    c.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap_err()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The first to time out names rank 2; the other learns the group failed
    // for that same reason.
    for e in &errors {
        assert!(e.to_string().contains("[2]"), "{e}");
    }
    assert!(errors.iter().any(|e| matches!(e, CommError::Missing { ranks, .. } if ranks == &[2])));
    // The late rank finds the group aborted rather than hanging.
    let mut late = late;
    late.set_timeout(Duration::from_secs(60));
    let err = late.barrier().unwrap_err();
    assert!(matches!(err, CommError::Aborted(_)), "{err}");
}

#[test]
fn the_stall_inspector_names_the_ranks_that_have_not_started_the_call() {
    let logs = run_group(3, |mut c| {
        c.set_stall_warning(Duration::from_millis(200));
        let log = bonfire_testkit::Captured::default();
        tracing::subscriber::with_default(log.subscriber(), || {
            if c.rank() == 2 {
                std::thread::sleep(Duration::from_millis(600)); // behind, within the timeout
            }
            let mut buf = vec![1f32; 16];
            c.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum).unwrap();
            assert_eq!(buf, vec![3f32; 16], "the late call still completes correctly");
        });
        log.text()
    });
    for rank in [0, 1] {
        let log = &logs[rank];
        assert!(log.contains(&format!("stall: rank {rank} has waited")), "{log}");
        assert!(log.contains("in all_reduce for rank(s) [2], which have not started it"), "{log}");
    }
    assert!(!logs[2].contains("stall"), "{}", logs[2]);
}

#[test]
fn mismatched_calls_are_an_error_on_every_rank() {
    let results = run_group(3, |mut c| {
        let len = if c.rank() == 2 { 5 } else { 4 };
        let mut buf = vec![0f32; len];
        c.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum)
    });
    for r in results {
        let err = r.unwrap_err();
        assert!(matches!(err, CommError::Mismatch { rank: 2, .. }), "{err}");
    }
    let results = run_group(2, |mut c| {
        let mut buf = vec![0f32; 4];
        if c.rank() == 0 {
            c.all_reduce(buf.as_mut_slice().into(), ReduceOp::Sum)
        } else {
            c.broadcast(buf.as_mut_slice().into(), 0)
        }
    });
    for r in results {
        assert!(matches!(r.unwrap_err(), CommError::Mismatch { rank: 1, .. }));
    }
}

#[test]
fn bad_arguments_are_clear_errors() {
    assert!(InProcCommunicator::group(0).is_err());
    let results = run_group(2, |mut c| {
        let mut buf = vec![0f32; 4];
        let root = c.broadcast(buf.as_mut_slice().into(), 2).unwrap_err().to_string();
        let mut out = vec![0f32; 7];
        let gather = c.all_gather(buf.as_slice().into(), out.as_mut_slice().into()).unwrap_err().to_string();
        (root, gather)
    });
    for (root, gather) in results {
        assert!(root.contains("root 2"), "{root}");
        assert!(gather.contains("world size 2"), "{gather}");
    }
}

//! Uneven inputs ([`DdpConfig::uneven_inputs`]; PyTorch's `Join`): a rank
//! that has run out of batches keeps answering the collectives of the steps
//! its peers still take, so that no rank waits for a call that never comes.
//!
//! Every step of a rank that trains starts with an announcement, one value
//! all-reduced with `Max`: its rank + 1. A rank in
//! [`join`](crate::DistributedDataParallel::join) announces 0 and learns
//! from the result whether anyone still trains (and who the highest such
//! rank is: the root of that step's buffer broadcast, whose buffers are
//! current). If someone does, it shadows that step: it replays the
//! collectives of its own last step ([`StepLog`]), in the same order, with
//! zeros, so a step's sums count only the ranks that train and the mean
//! divides by the whole world (PyTorch's default,
//! `divide_by_initial_world_size`). When nobody trains any more, every rank
//! takes the parameters and buffers of the highest rank that trained last.
//!
//! [`DdpConfig::uneven_inputs`]: crate::DdpConfig::uneven_inputs

use std::sync::{mpsc, Mutex};

use bonfire_collective::ReduceOp;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::comm_thread::CommThread;
use crate::error::{ParallelError, Result};

/// A collective of a step, as a rank that does not take the step makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// A sum of this many values (SyncBatchNorm's statistics).
    Sum(usize),
    /// A gradient bucket, as the reducer averages it.
    Bucket(usize),
}

/// The collectives of this rank's steps, in the order it made them: the
/// step in progress and the last finished one, which a joined rank replays.
#[derive(Default)]
pub(crate) struct StepLog {
    /// Off (nothing recorded) without uneven inputs.
    on: bool,
    current: Mutex<Vec<Call>>,
    last: Mutex<Option<Vec<Call>>>,
}

impl StepLog {
    pub fn new(on: bool) -> Self {
        StepLog { on, ..StepLog::default() }
    }

    pub fn record(&self, call: Call) {
        if self.on {
            self.current.lock().expect("not poisoned").push(call);
        }
    }

    /// A step starts: what an unfinished one recorded is dropped.
    pub fn start(&self) {
        self.current.lock().expect("not poisoned").clear();
    }

    /// A step finished: it becomes the one to replay.
    pub fn finish(&self) {
        let calls = std::mem::take(&mut *self.current.lock().expect("not poisoned"));
        *self.last.lock().expect("not poisoned") = Some(calls);
    }

    /// The last finished step's collectives, if this rank finished one.
    pub fn last(&self) -> Option<Vec<Call>> {
        self.last.lock().expect("not poisoned").clone()
    }
}

/// A step's announcement on its way: the highest rank that takes the step.
pub(crate) type Announcement = mpsc::Receiver<Result<Option<usize>>>;

/// Announces, after everything queued on `comm`, whether this rank takes the
/// next step; the answer says which is the highest rank that does (none:
/// every rank has joined).
pub(crate) fn announce<B: Backend>(comm: &CommThread<B>, device: &B::Device, takes_step: bool) -> Announcement {
    let mine = if takes_step { comm.rank() as f32 + 1.0 } else { 0.0 };
    let device = device.clone();
    let (tx, rx) = mpsc::channel();
    comm.submit(move |c| {
        // Made on the communication thread, as `ddp::host_call` does.
        let result = c.all_reduce(Tensor::from_data(TensorData::new(vec![mine], [1]), &device), ReduceOp::Max);
        let highest = result.map_err(ParallelError::from).map(|t| {
            let max = t.into_data().convert::<f32>().to_vec::<f32>().expect("converted to f32")[0];
            // Ranks are exact in f32 far beyond any world size.
            (max > 0.0).then(|| max as usize - 1)
        });
        let _ = tx.send(highest);
    });
    rx
}

/// The answer to an [`announce`]ment.
pub(crate) fn answer(announcement: Announcement) -> Result<Option<usize>> {
    announcement.recv().expect("the communication thread ended early")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_replays_its_last_finished_step_only_when_on() {
        let log = StepLog::new(true);
        assert_eq!(log.last(), None);
        log.start();
        log.record(Call::Sum(9));
        log.record(Call::Bucket(0));
        log.finish();
        log.start();
        log.record(Call::Bucket(1));
        assert_eq!(log.last(), Some(vec![Call::Sum(9), Call::Bucket(0)]), "an unfinished step is not replayed");
        log.start();
        log.finish();
        assert_eq!(log.last(), Some(vec![]));

        let off = StepLog::new(false);
        off.start();
        off.record(Call::Bucket(0));
        off.finish();
        assert_eq!(off.last(), Some(vec![]));
    }
}

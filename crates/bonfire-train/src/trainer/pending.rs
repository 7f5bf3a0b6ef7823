//! A step's loss, read one step late where the device runs ahead.
//!
//! Reading a loss waits for the device to finish its step. On a GPU
//! backend (cubecl's: wgpu, CUDA) the trainer queues step k+1 before it
//! reads step k's loss, so that the device always has a step to run while
//! the host waits. The CPU backends have finished a step when it returns,
//! so there it is read at once, and each step's time in steps.csv is its
//! own. A step whose weights are about to be written (a checkpoint, the
//! last step) is always read at once, so that no file is ever written from
//! weights a non-finite loss has reached.

use std::time::Instant;

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::batch::loss_value;
use super::config::{HostPhases, Report};
use super::epoch::Epoch;

/// A step whose work is queued and whose loss is not read yet.
pub(super) struct Queued<B: Backend> {
    pub loss: Tensor<B, 1>,
    /// The step's number in the run (from 1), and its index in the plot's
    /// numbering (epoch * steps per epoch + step in the epoch).
    pub number: usize,
    pub at: usize,
    /// Images of the step over all ranks.
    pub images: usize,
    pub start: Instant,
    /// The host's time in the step so far (all but reading its loss).
    pub phases: HostPhases,
}

/// Whether `B`'s device runs ahead of the host: its steps are queued, not
/// finished, when they return, as on cubecl's backends.
pub(super) fn runs_ahead<B: Backend>(device: &B::Device) -> bool {
    bonfire_parallel::is_cubecl::<B>(device)
}

/// What reading the losses keeps between steps.
pub(super) struct Losses {
    rank: usize,
    began: Instant,
    /// When the last step read had ended.
    last_end: Option<Instant>,
}

impl Losses {
    pub fn new(rank: usize, began: Instant) -> Self {
        Losses { rank, began, last_end: None }
    }

    /// Reads `step`'s loss into the report and the epoch's tally; a
    /// non-finite loss stops the run. A step's time runs from its start, or
    /// from the end of the step before where it was queued earlier.
    pub fn read<B: Backend>(&mut self, step: Queued<B>, report: &mut Report, tally: &mut Epoch) -> Result<()> {
        let reading = Instant::now();
        let loss = loss_value(&step.loss);
        if !loss.is_finite() {
            bail!(
                "the loss is {loss} at step {} on rank {}; stopping (a learning rate too high, or bad input \
                 data); the last checkpoint, if any, is left as it was",
                step.number,
                self.rank
            );
        }
        let end = Instant::now();
        let from = self.last_end.map_or(step.start, |last| last.max(step.start));
        self.last_end = Some(end);
        report.step_seconds.push((end - from).as_secs_f64());
        report.step_ends.push((end - self.began).as_secs_f64());
        report.step_losses.push((step.at, loss));
        report.step_phases.push(HostPhases { read: (end - reading).as_secs_f64(), ..step.phases });
        tally.add(loss, step.images);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use burn::backend::Flex;
    use burn::tensor::Tensor;

    use super::{runs_ahead, Losses, Queued};
    use crate::trainer::config::Report;
    use crate::trainer::epoch::Epoch;

    fn step(loss: f32, number: usize, start: Instant) -> Queued<Flex> {
        let loss = Tensor::from_floats([loss], &Default::default());
        Queued { loss, number, at: number, images: 10, start, phases: Default::default() }
    }

    #[test]
    fn a_step_queued_while_the_one_before_ran_is_timed_from_that_ones_end() {
        let began = Instant::now();
        let (mut losses, mut report) = (Losses::new(0, began), Report::default());
        let mut tally = Epoch::start(0, 1, 2, 0, false);
        // Step 2 is queued before step 1's loss is read, as on a GPU.
        let (first, second) = (step(2.0, 1, began), step(1.0, 2, began + Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        losses.read(first, &mut report, &mut tally).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        losses.read(second, &mut report, &mut tally).unwrap();
        let (s, e) = (&report.step_seconds, &report.step_ends);
        assert!(s[0] >= 0.005 && (s[1] - (e[1] - e[0])).abs() < 1e-9, "{s:?} {e:?}");
        assert_eq!(report.step_losses, vec![(1, 2.0), (2, 1.0)]);
        assert_eq!(report.step_phases.len(), 2);
    }

    #[test]
    fn a_non_finite_loss_stops_the_run_naming_its_step_and_rank() {
        let (mut losses, mut report) = (Losses::new(3, Instant::now()), Report::default());
        let mut tally = Epoch::start(0, 1, 1, 0, false);
        let err = losses.read(step(f32::NAN, 7, Instant::now()), &mut report, &mut tally).unwrap_err();
        assert!(err.to_string().contains("at step 7 on rank 3"), "{err}");
        assert!(report.step_losses.is_empty());
    }

    #[test]
    fn only_cubecl_backends_run_ahead() {
        assert!(!runs_ahead::<Flex>(&Default::default()));
        assert!(!runs_ahead::<burn::backend::NdArray>(&Default::default()));
    }
}

//! One epoch as the trainer tallies it: its progress bar, its steps, and
//! the metrics it reports at the end.

use std::time::Instant;

use bonfire_data::ImageDataset;
use bonfire_parallel::HookBackend;
use indicatif::{ProgressBar, ProgressStyle};

use super::batch::accuracy;
use super::config::EpochMetrics;
use crate::model::TrainableClassifier;

pub(super) struct Epoch {
    /// 0-based.
    index: usize,
    start: Instant,
    bar: ProgressBar,
    steps: usize,
    loss_sum: f64,
    images: usize,
}

impl Epoch {
    /// Epoch `index` of `epochs`, of `steps` steps of which `skip` were done
    /// before a restart; `show` draws the progress bar.
    pub fn start(index: usize, epochs: usize, steps: usize, skip: usize, show: bool) -> Self {
        let bar = progress_bar(show, steps as u64, index, epochs);
        bar.inc(skip as u64);
        Epoch { index, start: Instant::now(), bar, steps: 0, loss_sum: 0.0, images: 0 }
    }

    /// A step done, of `images` images over all ranks.
    pub fn add(&mut self, loss: f64, images: usize) {
        self.loss_sum += loss;
        self.steps += 1;
        self.images += images;
        self.bar.inc(1);
        self.bar.set_message(format!("loss {:.4}", self.loss_sum / self.steps as f64));
    }

    /// The epoch's metrics; rank 0 evaluates `model` on `test` and prints them.
    pub fn finish<B: HookBackend, M: TrainableClassifier<B>>(
        self,
        rank: usize,
        model: &M,
        test: &ImageDataset,
        device: &B::Device,
    ) -> EpochMetrics {
        self.bar.finish_and_clear();
        let seconds = self.start.elapsed().as_secs_f64();
        let test_accuracy = (rank == 0).then(|| accuracy::<B::InnerBackend, _>(&model.valid(), test, device));
        let m = EpochMetrics {
            epoch: self.index + 1,
            steps: self.steps,
            train_loss: self.loss_sum / self.steps.max(1) as f64,
            test_accuracy,
            images_per_sec: self.images as f64 / seconds,
            seconds,
        };
        if rank == 0 {
            eprintln!(
                "epoch {}: {} steps, train loss {:.4}, test accuracy {:.4}, {:.0} images/s, {:.1} s",
                m.epoch,
                m.steps,
                m.train_loss,
                m.test_accuracy.unwrap_or(f64::NAN),
                m.images_per_sec,
                m.seconds
            );
        }
        m
    }
}

fn progress_bar(show: bool, steps: u64, epoch: usize, epochs: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} steps {per_sec} {msg} (eta {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{epochs}", epoch + 1));
    bar
}

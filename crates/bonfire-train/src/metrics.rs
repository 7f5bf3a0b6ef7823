//! What a run leaves in `--out`: metrics.csv (per epoch), steps.csv (per
//! step), metrics.json and the loss plot.

use anyhow::{Context, Result};

use crate::plot;
use crate::trainer::Report;

/// Writes `metrics.csv`, `metrics.json`, `steps.csv` and `loss.png` of `report` into `dir`.
pub fn write_metrics(dir: &std::path::Path, report: &Report) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut csv = String::from("epoch,steps,train_loss,test_accuracy,images_per_sec,seconds\n");
    for e in &report.epochs {
        csv += &format!(
            "{},{},{:.6},{},{:.1},{:.3}\n",
            e.epoch,
            e.steps,
            e.train_loss,
            e.test_accuracy.map_or(String::new(), |a| format!("{a:.6}")),
            e.images_per_sec,
            e.seconds
        );
    }
    std::fs::write(dir.join("metrics.csv"), csv)?;
    // `seconds`: the step's own time (on a GPU, from the end of the step
    // before where it was queued while that one ran); `elapsed`: since
    // training began, at the step's end (when its loss was read); then the
    // host's seconds in each phase of the step (`HostPhases`).
    let mut steps = String::from("step,loss,seconds,elapsed,data,gradients,update,read\n");
    let rows = report.step_losses.iter().zip(&report.step_seconds).zip(&report.step_ends).zip(&report.step_phases);
    for ((((step, loss), seconds), elapsed), p) in rows {
        steps += &format!(
            "{step},{loss:.6},{seconds:.6},{elapsed:.6},{:.6},{:.6},{:.6},{:.6}\n",
            p.data, p.gradients, p.update, p.read
        );
    }
    std::fs::write(dir.join("steps.csv"), steps)?;
    std::fs::write(dir.join("metrics.json"), serde_json::to_string_pretty(&report.epochs)?)?;
    plot::write(&dir.join("loss.png"), report)?;
    Ok(())
}

//! `loss.png`: training loss per step and test accuracy per epoch.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::trainer::Report;

/// Fonts tried for the labels (plotters draws text only with a font it was
/// given); without any, the plot is drawn without text.
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

fn register_font() -> bool {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REGISTERED.get_or_init(|| {
        FONTS.iter().filter_map(|p| std::fs::read(p).ok()).any(|bytes| {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        })
    })
}

/// Draws the loss of every step and the test accuracy of every epoch into `file` (PNG).
pub fn write(file: &Path, report: &Report) -> Result<()> {
    let text = register_font();
    let root = BitMapBackend::new(file, (900, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(450);

    let losses = &report.step_losses;
    let steps = losses.last().map_or(1, |(s, _)| *s).max(1);
    let top = losses.iter().map(|(_, l)| *l).fold(0.0, f64::max).max(1e-3) * 1.05;
    let mut chart = ChartBuilder::on(&left);
    chart.margin(10);
    if text {
        chart.caption("training loss", ("sans-serif", 18)).x_label_area_size(30).y_label_area_size(45);
    }
    let mut chart = chart.build_cartesian_2d(0..steps, 0.0..top)?;
    if text {
        chart.configure_mesh().x_desc("step").draw()?;
    }
    chart.draw_series(LineSeries::new(losses.iter().copied(), &BLUE))?;

    let accuracy: Vec<(usize, f64)> =
        report.epochs.iter().filter_map(|e| e.test_accuracy.map(|a| (e.epoch, a))).collect();
    let epochs = report.epochs.last().map_or(1, |e| e.epoch).max(1);
    let mut chart = ChartBuilder::on(&right);
    chart.margin(10);
    if text {
        chart.caption("test accuracy", ("sans-serif", 18)).x_label_area_size(30).y_label_area_size(45);
    }
    let mut chart = chart.build_cartesian_2d(0..epochs + 1, 0.0..1.0)?;
    if text {
        chart.configure_mesh().x_desc("epoch").draw()?;
    }
    chart.draw_series(LineSeries::new(accuracy.iter().copied(), &RED))?;
    chart.draw_series(accuracy.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
    root.present().with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

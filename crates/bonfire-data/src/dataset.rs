//! An in-memory image classification data set.

use crate::error::{DataError, Result};

/// Images as bytes (channel-major, `channels x height x width` each) with one
/// label per image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDataset {
    /// Channels per image.
    pub channels: usize,
    /// Rows per image.
    pub height: usize,
    /// Columns per image.
    pub width: usize,
    /// How many classes the labels come from (`0..classes`).
    pub classes: usize,
    /// Every image's bytes, one after another.
    pub pixels: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u8>,
}

impl ImageDataset {
    /// Checks that `pixels` holds exactly one image per label and every label is below `classes`.
    pub fn new(
        channels: usize,
        height: usize,
        width: usize,
        classes: usize,
        pixels: Vec<u8>,
        labels: Vec<u8>,
    ) -> Result<Self> {
        let per = channels * height * width;
        if per == 0 || pixels.len() != per * labels.len() {
            return Err(DataError::Invalid(format!(
                "{} pixel bytes do not make {} images of {channels}x{height}x{width}",
                pixels.len(),
                labels.len()
            )));
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes) {
            return Err(DataError::Invalid(format!("label {bad} is not below the {classes} classes")));
        }
        Ok(ImageDataset { channels, height, width, classes, pixels, labels })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether it holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The images at `indices`, scaled as (x/255 - 0.5)/0.5, flattened, and their labels.
    pub fn batch(&self, indices: &[usize]) -> (Vec<f32>, Vec<i64>) {
        let per = self.image_len();
        let mut x = Vec::with_capacity(indices.len() * per);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            x.extend(self.pixels[i * per..(i + 1) * per].iter().map(|&p| (p as f32 / 255.0 - 0.5) / 0.5));
            y.push(self.labels[i] as i64);
        }
        (x, y)
    }

    /// The first `n` samples (all if fewer).
    pub fn take(mut self, n: usize) -> Self {
        let n = n.min(self.len());
        self.pixels.truncate(n * self.image_len());
        self.labels.truncate(n);
        self
    }
}

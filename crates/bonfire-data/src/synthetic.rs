//! A synthetic data set that needs no files: each class is a fixed random
//! pattern plus noise, so a model can learn it and tests stay fast.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::dataset::ImageDataset;

/// A separable data set made from `seed`, the same on every call.
pub fn generate(
    samples: usize,
    channels: usize,
    height: usize,
    width: usize,
    classes: usize,
    seed: u64,
) -> ImageDataset {
    let per = channels * height * width;
    let mut pattern_rng = StdRng::seed_from_u64(0x5eed);
    let patterns: Vec<Vec<u8>> = (0..classes).map(|_| (0..per).map(|_| pattern_rng.random()).collect()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pixels = Vec::with_capacity(samples * per);
    let mut labels = Vec::with_capacity(samples);
    for _ in 0..samples {
        let class = rng.random_range(0..classes);
        labels.push(class as u8);
        pixels.extend(patterns[class].iter().map(|&p| (p as i32 + rng.random_range(-40..=40)).clamp(0, 255) as u8));
    }
    ImageDataset::new(channels, height, width, classes, pixels, labels).expect("consistent by construction")
}

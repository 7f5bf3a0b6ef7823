//! CIFAR-10 in its binary format: records of one label byte and 3072 pixel
//! bytes (1024 red, 1024 green, 1024 blue, 32x32 each).

use std::path::Path;

use crate::dataset::ImageDataset;
use crate::error::{DataError, Result};
use crate::fashion_mnist::Split;

const RECORD: usize = 1 + 3 * 32 * 32;

/// The files of a split, in the folder `cifar-10-batches-bin` unpacks to.
pub fn files(split: Split) -> Vec<String> {
    match split {
        Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        Split::Test => vec!["test_batch.bin".into()],
    }
}

/// Reads CIFAR-10's binary batches from `dir`: `data_batch_1.bin` to `_5` for training, `test_batch.bin` for testing.
pub fn load(dir: &Path, split: Split) -> Result<ImageDataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for name in files(split) {
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(|cause| DataError::Io { path: path.clone(), cause })?;
        parse_records(&path, &bytes, &mut pixels, &mut labels)?;
    }
    ImageDataset::new(3, 32, 32, 10, pixels, labels)
}

/// Appends the records of one file's bytes to `pixels` and `labels`; `path`
/// names the file in errors. Also the entry point of the CIFAR-10 fuzz target.
pub fn parse_records(path: &Path, bytes: &[u8], pixels: &mut Vec<u8>, labels: &mut Vec<u8>) -> Result<()> {
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        return Err(DataError::format(
            path,
            format!("{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records (truncated?)", bytes.len()),
        ));
    }
    for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
        if record[0] >= 10 {
            return Err(DataError::format(path, format!("record {i} has label {}, not a CIFAR-10 class", record[0])));
        }
        labels.push(record[0]);
        pixels.extend_from_slice(&record[1..]);
    }
    Ok(())
}

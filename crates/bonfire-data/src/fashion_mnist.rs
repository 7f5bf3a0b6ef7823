//! Fashion-MNIST (60 000 training and 10 000 test images of 28x28, 10 classes).

use std::path::{Path, PathBuf};

use crate::dataset::ImageDataset;
use crate::error::{DataError, Result};
use crate::idx::read_images_and_labels;

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The split to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The 60 000 training images.
    Train,
    /// The 10 000 test images.
    Test,
}

/// `name` or `name.gz` in `dir`, whichever exists.
fn find(dir: &Path, name: &str) -> Result<PathBuf> {
    for candidate in [dir.join(name), dir.join(format!("{name}.gz"))] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(DataError::Io {
        path: dir.join(format!("{name}[.gz]")),
        cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
    })
}

/// True when both splits are present in `dir`.
pub fn present(dir: &Path) -> bool {
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
        .iter()
        .all(|n| find(dir, n).is_ok())
}

/// Reads the IDX files of `split` from `dir`, gzipped or raw.
pub fn load(dir: &Path, split: Split) -> Result<ImageDataset> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (h, w, pixels, labels_data) = read_images_and_labels(&images, &labels)?;
    ImageDataset::new(1, h, w, 10, pixels, labels_data).map_err(|e| DataError::format(&labels, e.to_string()))
}

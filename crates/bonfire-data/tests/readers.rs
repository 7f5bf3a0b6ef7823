//! The readers on small files in the real formats, written here, and on the
//! real Fashion-MNIST files.

use std::io::Write;
use std::path::{Path, PathBuf};

use bonfire_data::{cifar, fashion_mnist, DataError, Split};

fn temp_dir(name: &str) -> PathBuf {
    bonfire_testkit::scratch_dir(&format!("data-{name}"))
}

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Three 2x2 images with labels 0, 9, 4 as a Fashion-MNIST folder; the
/// training files gzipped, the test files raw.
fn write_fashion(dir: &Path) {
    let pixels: Vec<u8> = (0..12).collect();
    std::fs::write(dir.join("train-images-idx3-ubyte.gz"), gz(&idx(&[3, 2, 2], &pixels))).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte.gz"), gz(&idx(&[3], &[0, 9, 4]))).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx(&[3, 2, 2], &pixels)).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx(&[3], &[0, 9, 4])).unwrap();
}

#[test]
fn fashion_mnist_reads_gzipped_and_raw_idx() {
    let dir = temp_dir("fm");
    write_fashion(&dir);
    assert!(fashion_mnist::present(&dir));
    for split in [Split::Train, Split::Test] {
        let d = fashion_mnist::load(&dir, split).unwrap();
        assert_eq!((d.len(), d.channels, d.height, d.width), (3, 1, 2, 2));
        assert_eq!(d.labels, vec![0, 9, 4]);
        assert_eq!(d.pixels, (0..12).collect::<Vec<u8>>());
        let (x, y) = d.batch(&[2]);
        assert_eq!(y, vec![4]);
        assert_eq!(x[0], (8.0 / 255.0 - 0.5) / 0.5);
    }
}

fn format_error(err: DataError) -> (PathBuf, String) {
    match err {
        DataError::Format { path, what } => (path, what),
        other => panic!("expected a format error, got {other}"),
    }
}

#[test]
fn broken_idx_files_are_named_with_what_is_wrong() {
    let dir = temp_dir("fm-bad");
    write_fashion(&dir);
    let images = dir.join("t10k-images-idx3-ubyte");

    std::fs::write(&images, [0x12, 0x34, 0x56, 0x78, 0, 0, 0, 1]).unwrap();
    let (path, what) = format_error(fashion_mnist::load(&dir, Split::Test).unwrap_err());
    assert_eq!(path, images);
    assert!(what.contains("wrong magic"), "{what}");

    let mut truncated = idx(&[3, 2, 2], &(0..12).collect::<Vec<u8>>());
    truncated.truncate(truncated.len() - 5);
    std::fs::write(&images, truncated).unwrap();
    let (_, what) = format_error(fashion_mnist::load(&dir, Split::Test).unwrap_err());
    assert!(what.contains("need 12 data bytes") && what.contains("has 7"), "{what}");

    std::fs::write(&images, idx(&[2, 2, 2], &[0; 8])).unwrap();
    let (path, what) = format_error(fashion_mnist::load(&dir, Split::Test).unwrap_err());
    assert!(path.ends_with("t10k-labels-idx1-ubyte") && what.contains("3 labels"), "{what}");

    let gzipped = dir.join("train-images-idx3-ubyte.gz");
    let mut bytes = std::fs::read(&gzipped).unwrap();
    let mid = bytes.len() / 2;
    bytes.truncate(mid);
    std::fs::write(&gzipped, bytes).unwrap();
    let (path, what) = format_error(fashion_mnist::load(&dir, Split::Train).unwrap_err());
    assert_eq!(path, gzipped);
    assert!(what.contains("gzip"), "{what}");

    std::fs::remove_file(dir.join("train-labels-idx1-ubyte.gz")).unwrap();
    let err = fashion_mnist::load(&dir, Split::Train).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }) && err.to_string().contains("train-labels-idx1-ubyte"), "{err}");
}

fn cifar_record(label: u8, fill: u8) -> Vec<u8> {
    let mut r = vec![label];
    r.extend(std::iter::repeat_n(fill, 3072));
    r
}

#[test]
fn cifar10_reads_binary_batches_and_names_broken_files() {
    let dir = temp_dir("cifar");
    for i in 1..=5u8 {
        let records = [cifar_record(i, i * 10), cifar_record(9, 1)].concat();
        std::fs::write(dir.join(format!("data_batch_{i}.bin")), records).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), cifar_record(3, 7)).unwrap();
    let train = cifar::load(&dir, Split::Train).unwrap();
    assert_eq!((train.len(), train.channels, train.height, train.width), (10, 3, 32, 32));
    assert_eq!(train.labels, vec![1, 9, 2, 9, 3, 9, 4, 9, 5, 9]);
    assert_eq!(train.pixels[0], 10);
    let test = cifar::load(&dir, Split::Test).unwrap();
    assert_eq!(test.labels, vec![3]);

    let broken = dir.join("data_batch_3.bin");
    std::fs::write(&broken, &cifar_record(1, 1)[..3000]).unwrap();
    let (path, what) = format_error(cifar::load(&dir, Split::Train).unwrap_err());
    assert_eq!(path, broken);
    assert!(what.contains("3000 bytes") && what.contains("truncated"), "{what}");

    std::fs::write(&broken, cifar_record(200, 1)).unwrap();
    let (_, what) = format_error(cifar::load(&dir, Split::Train).unwrap_err());
    assert!(what.contains("label 200"), "{what}");
}

/// The real files of Debian's dataset-fashion-mnist (installed by .ci/run).
#[test]
fn real_fashion_mnist() {
    let dir = Path::new(fashion_mnist::DEFAULT_DIR);
    assert!(fashion_mnist::present(dir), "install Debian's dataset-fashion-mnist (see README)");
    let train = fashion_mnist::load(dir, Split::Train).unwrap();
    let test = fashion_mnist::load(dir, Split::Test).unwrap();
    assert_eq!((train.len(), test.len(), train.height, train.width), (60_000, 10_000, 28, 28));
    for class in 0..10u8 {
        assert_eq!(train.labels.iter().filter(|&&l| l == class).count(), 6_000);
    }
}

//! The IDX format of MNIST and Fashion-MNIST, raw or gzipped.

use std::io::Read;
use std::path::Path;

use crate::error::{DataError, Result};

/// The largest file accepted after gunzipping (Fashion-MNIST's largest is
/// 47 MB): a small hostile gzip stream cannot expand without bound.
pub const MAX_DECODED: u64 = 1 << 30;

/// `raw`, gunzipped when it starts with the gzip magic. `path` names the file
/// in errors.
fn gunzip_if_gzipped(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .take(MAX_DECODED + 1)
        .read_to_end(&mut out)
        .map_err(|e| DataError::format(path, format!("corrupt gzip stream: {e}")))?;
    if out.len() as u64 > MAX_DECODED {
        return Err(DataError::format(path, format!("expands to more than {MAX_DECODED} bytes")));
    }
    Ok(out)
}

/// An IDX file of unsigned bytes: its dimensions and data.
pub(crate) fn parse_u8(path: &Path, bytes: &[u8], dims_expected: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 {
        return Err(DataError::format(path, format!("{} bytes is too short for an IDX header", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(DataError::format(
            path,
            format!(
                "wrong magic {:02x} {:02x} {:02x} {:02x}: not an IDX file of unsigned bytes",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims != dims_expected {
        return Err(DataError::format(path, format!("has {ndims} dimensions, expected {dims_expected}")));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::format(path, "truncated in its header"));
    }
    let dims: Vec<usize> =
        (0..ndims).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let want = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match want {
        Some(n) if bytes.len() - header == n => Ok((dims, bytes[header..].to_vec())),
        Some(n) => Err(DataError::format(
            path,
            format!("dimensions {dims:?} need {n} data bytes, the file has {}", bytes.len() - header),
        )),
        None => Err(DataError::format(path, format!("dimensions {dims:?} overflow"))),
    }
}

/// Reads an images file (3 dimensions) and a labels file (1 dimension).
pub fn read_images_and_labels(images: &Path, labels: &Path) -> Result<(usize, usize, Vec<u8>, Vec<u8>)> {
    let read = |path: &Path| std::fs::read(path).map_err(|cause| DataError::Io { path: path.to_path_buf(), cause });
    parse_images_and_labels(images, read(images)?, labels, read(labels)?)
}

/// [`read_images_and_labels`] on the files' bytes (raw or gzipped): the
/// images' height, width and pixels, and the labels. The paths name the
/// files in errors. Also the entry point of the IDX fuzz target.
pub fn parse_images_and_labels(
    images: &Path,
    images_raw: Vec<u8>,
    labels: &Path,
    labels_raw: Vec<u8>,
) -> Result<(usize, usize, Vec<u8>, Vec<u8>)> {
    let (idims, pixels) = parse_u8(images, &gunzip_if_gzipped(images, images_raw)?, 3)?;
    let (ldims, labels_data) = parse_u8(labels, &gunzip_if_gzipped(labels, labels_raw)?, 1)?;
    if idims[0] != ldims[0] {
        return Err(DataError::format(
            labels,
            format!("has {} labels but {} has {} images", ldims[0], images.display(), idims[0]),
        ));
    }
    Ok((idims[1], idims[2], pixels, labels_data))
}

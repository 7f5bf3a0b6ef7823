//! The IDX format of MNIST and Fashion-MNIST, raw or gzipped.

use std::io::Read;
use std::path::Path;

use crate::error::{DataError, Result};

/// Reads a whole file, gunzipping it when it starts with the gzip magic.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
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
    let (idims, pixels) = parse_u8(images, &read_maybe_gz(images)?, 3)?;
    let (ldims, labels_data) = parse_u8(labels, &read_maybe_gz(labels)?, 1)?;
    if idims[0] != ldims[0] {
        return Err(DataError::format(
            labels,
            format!("has {} labels but {} has {} images", ldims[0], images.display(), idims[0]),
        ));
    }
    Ok((idims[1], idims[2], pixels, labels_data))
}

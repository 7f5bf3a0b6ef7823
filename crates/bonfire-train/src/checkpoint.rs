//! Checkpoints: the model, the optimizer state and the number of finished
//! epochs (the sampler's position: the next epoch starts from its seed), in
//! one file written atomically by rank 0.
//!
//! Layout: `BFCKPT01`, then little-endian u64s: epochs done, model length,
//! optimizer length, a 64-bit FNV-1a checksum of everything after the
//! header; then the model and optimizer records (Burn's named MessagePack).
//! A truncated or altered file is refused before anything is decoded.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const MAGIC: &[u8; 8] = b"BFCKPT01";
const HEADER: usize = 8 + 4 * 8;
pub const FILE_NAME: &str = "checkpoint.bfck";

pub struct Checkpoint {
    pub epochs_done: u64,
    pub model: Vec<u8>,
    pub optimizer: Vec<u8>,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Writes `dir/checkpoint.bfck` through a temporary file and a rename, so
/// that a crash at any moment leaves either the old checkpoint or the new one.
pub fn save(dir: &Path, ckpt: &Checkpoint) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = path(dir);
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let mut out = Vec::with_capacity(HEADER + ckpt.model.len() + ckpt.optimizer.len());
    out.extend_from_slice(MAGIC);
    for v in
        [ckpt.epochs_done, ckpt.model.len() as u64, ckpt.optimizer.len() as u64, fnv1a(&[&ckpt.model, &ckpt.optimizer])]
    {
        out.extend(v.to_le_bytes());
    }
    out.extend_from_slice(&ckpt.model);
    out.extend_from_slice(&ckpt.optimizer);
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(&out).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &target).with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads `dir/checkpoint.bfck`; `None` when there is none.
pub fn load(dir: &Path) -> Result<Option<Checkpoint>> {
    let file = path(dir);
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let bad = |what: String| anyhow::anyhow!("{}: {what}", file.display());
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(bad("not a Bonfire checkpoint (wrong magic or too short)".into()));
    }
    let word = |i: usize| u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().unwrap());
    let (epochs_done, model_len, opt_len, sum) = (word(0), word(1) as usize, word(2) as usize, word(3));
    let want = model_len.checked_add(opt_len).and_then(|n| n.checked_add(HEADER));
    if want != Some(bytes.len()) {
        return Err(bad(format!(
            "truncated or padded: the header promises {want:?} bytes, the file has {}",
            bytes.len()
        )));
    }
    let (model, optimizer) = bytes[HEADER..].split_at(model_len);
    if fnv1a(&[model, optimizer]) != sum {
        bail!("{}: checksum mismatch, the file is corrupt", file.display());
    }
    Ok(Some(Checkpoint { epochs_done, model: model.to_vec(), optimizer: optimizer.to_vec() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("bonfire-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(load(&dir).unwrap().is_none());
        save(&dir, &Checkpoint { epochs_done: 3, model: vec![1, 2, 3], optimizer: vec![9; 10] }).unwrap();
        let back = load(&dir).unwrap().unwrap();
        assert_eq!((back.epochs_done, back.model, back.optimizer), (3, vec![1, 2, 3], vec![9; 10]));
        assert!(!dir.join(format!("{FILE_NAME}.tmp")).exists());

        let file = path(&dir);
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 1]).unwrap();
        assert!(load(&dir).err().unwrap().to_string().contains("truncated"));
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&file, &flipped).unwrap();
        assert!(load(&dir).err().unwrap().to_string().contains("checksum"));
        std::fs::write(&file, b"hello").unwrap();
        assert!(load(&dir).err().unwrap().to_string().contains("not a Bonfire checkpoint"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Checkpoints: the model, the optimizer state and the position in the run
//! (epoch, steps done in it, steps done in all; the sampler's order follows
//! from the seed and the epoch, so skipping the steps done restores it),
//! written atomically by rank 0 after every epoch and every
//! `--checkpoint-every` steps. The last two are kept.
//!
//! Each is a safetensors file, `checkpoint-STEPS.safetensors`, that standard
//! tools open: two byte tensors, `model` and `optimizer` (Burn's named
//! MessagePack records), and the position and a CRC-32 of both tensors in
//! the metadata. A file that fails its check is refused before anything is
//! decoded, and the one before it is used instead.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

const FORMAT: &str = "bonfire-checkpoint/2";
const PREFIX: &str = "checkpoint-";
const SUFFIX: &str = ".safetensors";
/// Checkpoints kept: a write cut short never leaves fewer than one good one.
const KEEP: usize = 2;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The epoch in progress (0-based); after an epoch's last step, the next one.
    pub epoch: u64,
    /// Steps of `epoch` done.
    pub step_in_epoch: u64,
    /// Steps done since the start of the run.
    pub steps_done: u64,
}

/// What a checkpoint holds.
#[derive(Debug)]
pub struct Checkpoint {
    /// Where in the run it was written.
    pub position: Position,
    /// The model's record (Burn's named MessagePack).
    pub model: Vec<u8>,
    /// The optimizer's state, likewise.
    pub optimizer: Vec<u8>,
}

fn crc32(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    parts.iter().for_each(|p| h.update(p));
    h.finalize()
}

/// The checkpoint files in `dir`, oldest first.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let steps = path.file_name()?.to_str()?.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?.parse().ok()?;
            Some((steps, path))
        })
        .collect();
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Writes `dir/checkpoint-STEPS.safetensors` through a temporary file, an
/// fsync and a rename, so that a crash at any moment leaves the previous
/// checkpoints as they were; then removes all but the last two.
pub fn save(dir: &Path, ckpt: &Checkpoint) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let p = ckpt.position;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("epoch".to_string(), p.epoch.to_string()),
        ("step_in_epoch".to_string(), p.step_in_epoch.to_string()),
        ("steps_done".to_string(), p.steps_done.to_string()),
        ("crc32".to_string(), format!("{:08x}", crc32(&[&ckpt.model, &ckpt.optimizer]))),
    ]);
    fn view(bytes: &[u8]) -> Result<TensorView<'_>, safetensors::SafeTensorError> {
        TensorView::new(Dtype::U8, vec![bytes.len()], bytes)
    }
    let tensors = [("model", view(&ckpt.model)?), ("optimizer", view(&ckpt.optimizer)?)];
    let bytes = safetensors::serialize(tensors, Some(metadata)).context("encoding the checkpoint")?;
    let target = dir.join(format!("{PREFIX}{:09}{SUFFIX}", p.steps_done));
    let tmp = dir.join(format!(".{PREFIX}{:09}{SUFFIX}.tmp", p.steps_done));
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(&bytes).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &target).with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    let all = files(dir)?;
    for old in &all[..all.len().saturating_sub(KEEP)] {
        std::fs::remove_file(old).with_context(|| format!("removing the old checkpoint {}", old.display()))?;
    }
    // What a write cut short by a crash left behind (only rank 0 writes).
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{PREFIX}")) && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(target)
}

/// Reads and checks one checkpoint file.
fn read(file: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("not a safetensors file ({e})"))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{e}"))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        bail!("not a Bonfire checkpoint (format {:?}, expected {FORMAT:?})", meta.get("format"));
    }
    let number = |key: &str| -> Result<u64> {
        meta.get(key).and_then(|v| v.parse().ok()).with_context(|| format!("the metadata has no number {key:?}"))
    };
    let position = Position {
        epoch: number("epoch")?,
        step_in_epoch: number("step_in_epoch")?,
        steps_done: number("steps_done")?,
    };
    let blob = |name: &str| -> Result<Vec<u8>> {
        let t = st.tensor(name).map_err(|e| anyhow!("tensor {name:?}: {e}"))?;
        if t.dtype() != Dtype::U8 {
            bail!("tensor {name:?} is {:?}, expected U8", t.dtype());
        }
        Ok(t.data().to_vec())
    };
    let (model, optimizer) = (blob("model")?, blob("optimizer")?);
    let sum = format!("{:08x}", crc32(&[&model, &optimizer]));
    if meta.get("crc32") != Some(&sum) {
        bail!("CRC-32 mismatch (stored {:?}, computed {sum}): the file is corrupt", meta.get("crc32"));
    }
    Ok(Checkpoint { position, model, optimizer })
}

/// The newest checkpoint in `dir` that passes its check, and its file;
/// `None` when there is none. A newer one that fails is reported and
/// skipped; when every one fails, the newest's error is returned.
pub fn load(dir: &Path) -> Result<Option<(Checkpoint, PathBuf)>> {
    let mut newest_error = None;
    for file in files(dir)?.into_iter().rev() {
        match read(&file) {
            Ok(ckpt) => return Ok(Some((ckpt, file))),
            Err(e) => {
                eprintln!("skipping the checkpoint {}: {e:#}", file.display());
                newest_error.get_or_insert(e.context(format!("{}", file.display())));
            }
        }
    }
    newest_error.map_or(Ok(None), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(steps_done: u64) -> Checkpoint {
        let position = Position { epoch: steps_done / 10, step_in_epoch: steps_done % 10, steps_done };
        Checkpoint { position, model: vec![1, 2, steps_done as u8], optimizer: vec![9; 10] }
    }

    #[test]
    fn round_trip_keeps_the_last_two_and_falls_back_past_a_bad_one() {
        let dir = std::env::temp_dir().join(format!("bonfire-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(load(&dir).unwrap().is_none());
        for steps in [5, 10, 17] {
            save(&dir, &at(steps)).unwrap();
        }
        let names: Vec<String> =
            files(&dir).unwrap().iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["checkpoint-000000010.safetensors", "checkpoint-000000017.safetensors"]);
        let (back, file) = load(&dir).unwrap().unwrap();
        assert_eq!(back.position, Position { epoch: 1, step_in_epoch: 7, steps_done: 17 });
        assert_eq!((back.model, back.optimizer), (vec![1, 2, 17], vec![9; 10]));

        // A flipped byte in the newest: refused, the one before is used.
        let mut bytes = std::fs::read(&file).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        assert!(read(&file).unwrap_err().to_string().contains("CRC-32 mismatch"));
        assert_eq!(load(&dir).unwrap().unwrap().0.position.steps_done, 10);
        // A truncated one, and a file that is not a checkpoint.
        std::fs::write(&file, &bytes[..bytes.len() - 3]).unwrap();
        assert!(read(&file).unwrap_err().to_string().contains("not a safetensors file"));
        let other = safetensors::serialize([("x", TensorView::new(Dtype::U8, vec![1], &[0]).unwrap())], None).unwrap();
        std::fs::write(&file, other).unwrap();
        assert!(read(&file).unwrap_err().to_string().contains("not a Bonfire checkpoint"));
        // When every file is bad, the newest's error.
        std::fs::write(files(&dir).unwrap()[0].clone(), b"hello").unwrap();
        assert!(format!("{:#}", load(&dir).err().unwrap()).contains("checkpoint-000000017"));
        assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! What the command's end-to-end tests share: the oracle that a job's
//! weights are those of one worker on the whole batch.

use std::path::Path;
use std::process::Command;

use bonfire_testkit::text;

/// Trains one worker with the job's `common` flags on the whole batch (into
/// `dir/one.safetensors`, its metrics in `dir/one`) and requires the job's
/// `weights` to equal it within 1e-4; `job` names the job in the message.
pub fn assert_like_one_worker(job: &str, dir: &Path, weights: &Path, common: &[&str]) {
    let bonfire = env!("CARGO_BIN_EXE_bonfire");
    let one = dir.join("one.safetensors");
    let single = Command::new(bonfire)
        .args(["train", "--strategy", "single", "--out", dir.join("one").to_str().unwrap()])
        .args(["--save", one.to_str().unwrap()])
        .args(common)
        .output()
        .unwrap();
    assert!(single.status.success(), "{}", text(&single));
    let same = Command::new(bonfire)
        .args(["diff-weights", weights.to_str().unwrap(), one.to_str().unwrap(), "--tolerance", "1e-4"])
        .output()
        .unwrap();
    assert!(same.status.success(), "{job} against one worker: {}", text(&same));
}

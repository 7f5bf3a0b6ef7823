//! What the command's end-to-end tests share: running the command, and the
//! oracle that a job's weights are those of one worker on the whole batch.
#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bonfire_testkit::text;

/// Runs `bonfire ARGS` to the end.
pub fn bonfire(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bonfire")).args(args).output().unwrap()
}

/// A fresh folder for one test's files.
pub fn out_dir(name: &str) -> PathBuf {
    bonfire_testkit::scratch_dir(&format!("cli-{name}"))
}

/// The test accuracy a run printed.
pub fn final_accuracy(o: &Output) -> f64 {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout.lines().find(|l| l.starts_with("test accuracy:")).unwrap_or_else(|| panic!("{}", text(o)));
    line["test accuracy:".len()..].trim().parse().unwrap()
}

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

/// A stranger who reaches a job's rendezvous store at `port` on loopback
/// without the job's secret (an open worker, as every worker was before the
/// rendezvous had a secret by default) and claims rank 1 of 2.
pub fn stranger(port: u16, dir: &Path) -> std::process::Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bonfire"));
    command.args(["train", "--steps", "20", "--timeout", "30", "--out", dir.to_str().unwrap()]);
    for var in bonfire_testkit::LAUNCHER_VARS {
        command.env_remove(var);
    }
    for (var, value) in bonfire_testkit::torchrun_vars(1, 2, port) {
        command.env(var, value);
    }
    command.env("BONFIRE_INSECURE_RENDEZVOUS", "1");
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
}

/// The stranger was turned away for its token, not let in.
pub fn assert_refused(stranger: std::process::Child) {
    let o = stranger.wait_with_output().unwrap();
    assert!(!o.status.success(), "a stranger without the job's secret trained: {}", text(&o));
    assert!(text(&o).contains("its job token differs"), "the stranger failed for another reason: {}", text(&o));
}

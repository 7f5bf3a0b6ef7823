//! What the command's end-to-end tests share: running the command, and the
//! oracle that a job's weights are those of one worker on the whole batch.
#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

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

/// The pid of the child of `parent` whose environment has `RANK=rank`.
pub fn worker_pid(parent: u32, rank: usize, within: Duration) -> u32 {
    let deadline = Instant::now() + within;
    let want = format!("RANK={rank}");
    loop {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // Fields after the command name in parentheses: state, ppid, ...
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if ppid == Some(parent) && environ.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "no worker with {want} under pid {parent}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(pid: u32, name: &str) {
    assert!(Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap().success());
}

pub fn wait_for_file(file: &Path, within: Duration, job: &mut Child) {
    wait_until(&file.display().to_string(), within, job, || file.is_file());
}

/// Waits until `written` says `what` is on disk, failing the test if the job
/// ends first or `within` passes.
pub fn wait_until(what: &str, within: Duration, job: &mut Child, written: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !written() {
        assert!(job.try_wait().unwrap().is_none(), "the job ended before writing {what}");
        assert!(Instant::now() < deadline, "{what} never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `job`, failing the test if it outlives `within`.
pub fn finish(mut job: Child, within: Duration) -> (Output, Duration) {
    let started = Instant::now();
    while job.try_wait().unwrap().is_none() {
        if started.elapsed() > within {
            let _ = job.kill();
            panic!("the job did not stop within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (job.wait_with_output().unwrap(), started.elapsed())
}

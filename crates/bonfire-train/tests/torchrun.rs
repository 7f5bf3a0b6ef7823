//! Workers started by PyTorch's own `torchrun`, as a PyTorch user starts
//! them (`--no-python bonfire train ...`), in each of its rendezvous modes:
//! they join torchrun's store instead of hosting one, train as `bonfire
//! launch`'s workers do, take their share of the cores, and a restart
//! resumes from the last checkpoint. Needs a Python with torch
//! (`BONFIRE_TORCH_PYTHON`; `cargo xtask test` installs one); without it
//! each test says in the test output that it did not run.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bonfire_testkit::text;
use common::{bonfire, finish, out_dir, signal, wait_for_file, worker_pid};

/// `python -m torch.distributed.run` (what the `torchrun` script runs), or
/// None, said in the test output, when no Python with torch was named.
fn torchrun(test: &str) -> Option<Command> {
    let python = bonfire_testkit::torch_python(test)?;
    let mut command = Command::new(python);
    command.args(["-m", "torch.distributed.run"]);
    for var in bonfire_testkit::LAUNCHER_VARS {
        command.env_remove(var);
    }
    command.env_remove("RAYON_NUM_THREADS");
    Some(command)
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn same_weights(a: &Path, b: &Path, tolerance: &str) -> Output {
    bonfire(&["diff-weights", a.to_str().unwrap(), b.to_str().unwrap(), "--tolerance", tolerance])
}

/// 50 steps under torchrun's standalone, c10d and static rendezvous each
/// equal 50 steps under `bonfire launch` (same seed); every worker takes
/// half the cores.
#[test]
fn torchrun_in_each_rendezvous_mode_trains_as_bonfire_launch_does() {
    let Some(_) = torchrun("torchrun_in_each_rendezvous_mode_trains_as_bonfire_launch_does") else { return };
    let dir = out_dir("torchrun-modes");
    let d = |rest: &str| dir.join(rest).to_str().unwrap().to_string();
    let train = |name: &str| {
        ["train", "--strategy", "ddp", "--steps", "50", "--batch-size", "50"]
            .map(String::from)
            .into_iter()
            .chain(["--out".into(), d(name), "--save".into(), d(&format!("{name}.safetensors"))])
            .collect::<Vec<String>>()
    };
    let launch = ["launch", "--nproc-per-node", "2", "--", env!("CARGO_BIN_EXE_bonfire")].map(String::from);
    let reference = bonfire(&strs(&[&launch[..], &train("launch")].concat()));
    assert!(reference.status.success(), "bonfire launch: {}", text(&reference));

    let port = bonfire_testkit::free_port().to_string();
    let endpoint = format!("127.0.0.1:{port}");
    let modes: [(&str, Vec<&str>); 3] = [
        ("standalone", vec!["--standalone"]),
        ("c10d", vec!["--rdzv-backend", "c10d", "--rdzv-endpoint", &endpoint, "--nnodes", "1"]),
        ("static", vec!["--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", &port]),
    ];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = format!("{} compute threads", (cores / 2).max(1));
    for (mode, flags) in modes {
        let mut command = torchrun(mode).unwrap();
        command.args(flags).args(["--nproc-per-node", "2", "--no-python", env!("CARGO_BIN_EXE_bonfire")]);
        let o = command.args(train(mode)).output().unwrap();
        let log = text(&o);
        assert!(o.status.success(), "torchrun {mode}: {log}");
        assert!(log.contains(&share), "torchrun {mode}: each worker takes its share of the cores: {log}");
        let same = same_weights(&dir.join("launch.safetensors"), &dir.join(format!("{mode}.safetensors")), "1e-6");
        assert!(same.status.success(), "torchrun {mode} against bonfire launch: {}", text(&same));
    }
}

/// A worker SIGKILLed under `torchrun --max-restarts 1` is restarted with
/// the others (TORCHELASTIC_RESTART_COUNT), which resume from the last step
/// checkpoint under a fresh key prefix of torchrun's store and end with the
/// weights of an uninterrupted run (tolerance 0). The same command line
/// (with `--resume`) serves the first start, which has no checkpoint yet.
#[test]
fn a_worker_killed_under_torchrun_is_restarted_from_its_checkpoint_with_nothing_lost() {
    let Some(mut torchrun) =
        torchrun("a_worker_killed_under_torchrun_is_restarted_from_its_checkpoint_with_nothing_lost")
    else {
        return;
    };
    let args = |dir: &Path| -> Vec<String> {
        let d = |rest: &str| dir.join(rest).to_string_lossy().into_owned();
        let args = ["train", "--strategy", "ddp", "--dataset", "synthetic", "--batch-size", "20", "--epochs", "2"];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.extend(["--timeout", "5", "--checkpoint-every", "100", "--resume"].map(String::from));
        args.extend(["--checkpoint-dir".into(), d("ckpt"), "--out".into(), d("out")]);
        args.extend(["--save".into(), d("final.safetensors")]);
        args
    };
    let reference = out_dir("torchrun-restart-reference");
    let mut reference_args = args(&reference);
    reference_args.splice(1..1, ["--workers".to_string(), "2".to_string()]);
    let o = bonfire(&strs(&reference_args));
    assert!(o.status.success(), "{}", text(&o));

    let dir = out_dir("torchrun-restart");
    torchrun.args(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--no-python"]);
    torchrun.arg(env!("CARGO_BIN_EXE_bonfire")).args(args(&dir));
    let mut job = torchrun.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_file(&dir.join("ckpt").join("checkpoint-000000100.safetensors"), Duration::from_secs(180), &mut job);
    signal(worker_pid(job.id(), 1, Duration::from_secs(5)), "KILL");
    let (out, _) = finish(job, Duration::from_secs(180));
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("yet: starting from the beginning"), "the first start: {log}");
    assert!(log.contains("resuming in epoch 1 after its step "), "the restart: {log}");
    let same = same_weights(&reference.join("final.safetensors"), &dir.join("final.safetensors"), "0");
    assert!(same.status.success() && text(&same).contains("largest difference 0.000e0"), "{}", text(&same));
}

//! The `bonfire` command end to end: real data, real processes.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn bonfire(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bonfire")).args(args).output().unwrap()
}

fn out_dir(name: &str) -> PathBuf {
    bonfire_testkit::scratch_dir(&format!("cli-{name}"))
}

mod common;

use bonfire_testkit::text;
use common::assert_like_one_worker;

fn final_accuracy(o: &Output) -> f64 {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout.lines().find(|l| l.starts_with("test accuracy:")).unwrap_or_else(|| panic!("{}", text(o)));
    line["test accuracy:".len()..].trim().parse().unwrap()
}

/// The acceptance run: the default configuration (DDP over 2 processes,
/// LeNet, SGD lr 0.01 momentum 0.9, global batch 100) for two epochs of
/// Fashion-MNIST. PyTorch reached 0.850 with this configuration.
#[test]
fn two_epochs_of_fashion_mnist_reach_084() {
    let dir = out_dir("accuracy");
    let o = bonfire(&["train", "--epochs", "2", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let acc = final_accuracy(&o);
    assert!(acc >= 0.84, "test accuracy {acc} after 2 epochs");
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    let png = std::fs::read(dir.join("loss.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "loss.png is not a drawn PNG");
    assert!(text(&o).contains("epoch 2: 600 steps"), "{}", text(&o));
}

#[test]
fn wgpu_trains_a_few_steps() {
    let dir = out_dir("wgpu");
    let o = bonfire(&[
        "train",
        "--backend",
        "wgpu",
        "--strategy",
        "ddp",
        "--threads",
        "--steps",
        "5",
        "--dataset",
        "synthetic",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("epoch 1: 5 steps"), "{}", text(&o));
}

/// DP with its replicas on lavapipe's two wgpu devices (every move between
/// them staged through the host) trains the real LeNet and ResNet (batch
/// norm) to the weights of the same split on one device.
#[test]
fn dp_over_two_wgpu_devices_equals_one_device() {
    let dir = out_dir("dp-wgpu");
    for model in ["lenet", "resnet"] {
        let weights = |strategy: &str, devices: &str| {
            let file = dir.join(format!("{model}-{strategy}-{devices}.safetensors"));
            let (out, save) = (dir.to_str().unwrap(), file.to_str().unwrap());
            let o = bonfire(&[
                "train",
                "--backend",
                "wgpu",
                "--strategy",
                strategy,
                "--workers",
                "2",
                "--devices",
                devices,
                "--model",
                model,
                "--steps",
                "5",
                "--batch-size",
                "16",
                "--dataset",
                "synthetic",
                "--out",
                out,
                "--save",
                save,
            ]);
            assert!(o.status.success(), "{model} on {devices}: {}", text(&o));
            assert!(!text(&o).contains("panicked"), "{model} on {devices}: {}", text(&o));
            (file, text(&o))
        };
        let same = |a: &PathBuf, b: &PathBuf| {
            let o = bonfire(&["diff-weights", a.to_str().unwrap(), b.to_str().unwrap(), "--tolerance", "1e-4"]);
            assert!(o.status.success(), "{model}: {}", text(&o));
        };
        let ((two, log), (one, _)) = (weights("dp", "default,cpu"), weights("dp", "default"));
        assert!(log.contains("workers on the wgpu devices [DefaultDevice, Cpu]"), "{log}");
        same(&two, &one);
        if model == "lenet" {
            // No batch norm: DP also equals one device on the whole batch.
            same(&two, &weights("single", "default").0);
        }
    }
}

#[test]
fn single_and_dp_strategies_train() {
    for strategy in ["single", "dp"] {
        let dir = out_dir(strategy);
        let o = bonfire(&[
            "train",
            "--strategy",
            strategy,
            "--steps",
            "30",
            "--dataset",
            "synthetic",
            "--lr",
            "0.05",
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{strategy}: {}", text(&o));
        // Ten well-separated classes: 30 steps learn them.
        assert!(final_accuracy(&o) > 0.5, "{strategy}: {}", text(&o));
    }
}

/// The benchmark ResNet (batch norm, residual blocks) trains under DDP over
/// 2 processes, and its steps are timed in steps.csv.
#[test]
fn resnet_trains_under_ddp() {
    let dir = out_dir("resnet");
    let o = bonfire(&[
        "train",
        "--model",
        "resnet",
        "--steps",
        "30",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--dataset",
        "synthetic",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(final_accuracy(&o) > 0.5, "{}", text(&o));
    let steps = std::fs::read_to_string(dir.join("steps.csv")).unwrap();
    assert_eq!(steps.lines().count(), 1 + 30, "{steps}");
    assert!(steps.lines().skip(1).all(|l| l.split(',').nth(2).unwrap().parse::<f64>().unwrap() > 0.0));
}

#[test]
fn bad_input_gets_clear_errors() {
    // Each refused once, by the launching process, before any worker starts.
    let without_mpi = "built without MPI";
    let mpi = |with: &'static str| if cfg!(feature = "mpi") { with } else { without_mpi };
    let cases: [(&[&str], &str); 17] = [
        (&["train", "--threads", "--batch-size", "101"], "multiple of the 2 workers"),
        (&["train", "--batch-size", "0"], "--batch-size 0 must be a positive multiple of the 2 workers"),
        (&["train", "--lr", "nan"], "--lr NaN must be a number of at least 0"),
        (
            &["train", "--init", "/nonexistent/weights.safetensors"],
            "--init /nonexistent/weights.safetensors: cannot read",
        ),
        (&["train", "--comm", "nccl"], "--comm nccl needs --backend cuda"),
        (&["train", "--strategy", "dp", "--comm", "ring"], "--comm applies to --strategy ddp only"),
        (&["train", "--backend", "cuda", "--threads", "--comm", "nccl"], "leave out --threads"),
        (&["train", "--comm", "mpi"], mpi("start the workers with mpirun or srun")),
        (&["train", "--comm", "mpi", "--threads"], mpi("runs one process per worker, started by mpirun or srun")),
        (&["train", "--dataset", "cifar10"], "needs --data-dir"),
        (&["train", "--data-dir", "/nonexistent/fm", "--strategy", "single"], "not found in /nonexistent/fm"),
        (&["train", "--workers", "0"], "at least 1"),
        (
            &["train", "--min-workers", "3", "--checkpoint-dir", "/tmp/c"],
            "--min-workers 3 must be between 1 and --workers 2",
        ),
        (
            &["train", "--workers", "3", "--batch-size", "99", "--min-workers", "2", "--checkpoint-dir", "/tmp/c"],
            "--min-workers 2 may leave 2 worker(s)",
        ),
        (&["train", "--backend", "tpu"], "invalid value 'tpu'"),
        (&["train", "--devices", "cpu"], "--devices applies to --backend wgpu"),
        (&["train", "--backend", "wgpu", "--devices", "default,gpu1"], "\"gpu1\" is not a wgpu device"),
    ];
    for (args, want) in cases {
        let o = bonfire(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(text(&o).matches(want).count(), 1, "{args:?}: {}", text(&o));
        assert!(!text(&o).contains("rank"), "{args:?} started workers: {}", text(&o));
    }
    for args in [&["train", "--backend", "cuda"][..], &["nccl-check"]] {
        let o = bonfire(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("not part of this build"), "{args:?}: {}", text(&o));
    }
}

#[test]
fn a_diverging_run_stops_at_its_first_non_finite_loss_without_writing_weights() {
    let dir = out_dir("diverging");
    let save = dir.join("final.safetensors");
    for strategy in ["single", "ddp"] {
        let o = bonfire(&[
            "train",
            "--strategy",
            strategy,
            "--lr",
            "1e9",
            "--steps",
            "40",
            "--batch-size",
            "50",
            "--save",
            save.to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert!(!o.status.success(), "{strategy}: a diverging run exited 0: {}", text(&o));
        assert!(text(&o).contains("the loss is") && text(&o).contains("at step"), "{strategy}: {}", text(&o));
        assert!(!save.exists(), "{strategy}: weights were written from a diverged model");
    }
}

/// Open MPI's `mpirun` starts the workers; they find their ranks in its
/// variables, meet on one host without MASTER_ADDR, and train as one job:
/// one report, and the weights of one worker on the whole batch.
#[test]
fn mpirun_starts_a_ddp_job_without_torchruns_variables() {
    let port = bonfire_testkit::free_port();
    mpirun_trains_like_one_worker("mpirun", &[], port);
}

/// `--comm mpi`: the gradients go through MPI itself (no rendezvous store,
/// no MASTER_PORT), with the same result.
#[cfg(feature = "mpi")]
#[test]
fn ddp_over_mpi_equals_one_worker_and_the_ring() {
    let mpi = mpirun_trains_like_one_worker("mpi-comm", &["--comm", "mpi"], 0);
    let port = bonfire_testkit::free_port();
    let ring = mpirun_trains_like_one_worker("mpi-ring", &["--comm", "ring"], port);
    let same = bonfire(&["diff-weights", mpi.to_str().unwrap(), ring.to_str().unwrap(), "--tolerance", "1e-5"]);
    assert!(same.status.success(), "MPI against the ring: {}", text(&same));
}

/// A rank killed in the middle of a `--comm mpi` job ends it with a
/// non-zero exit well within the timeout, and `mpirun` names the rank.
#[cfg(feature = "mpi")]
#[test]
fn a_killed_mpi_rank_ends_the_job_naming_it() {
    let dir = out_dir("mpi-killed");
    let started = Instant::now();
    let o = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "sh", "-c"])
        // Rank 1 kills itself once training is under way.
        .arg(format!(
            "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then (sleep 3; kill -9 $$) & fi; exec {} train --comm mpi \
             --steps 100000 --timeout 60 --out {}",
            env!("CARGO_BIN_EXE_bonfire"),
            dir.display()
        ))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("rank 1") && out.contains("signal 9"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(45), "took {:?}: {out}", started.elapsed());
}

/// Trains 20 steps under `mpirun -np 2` (with `--comm` from `train_args`,
/// MASTER_PORT set when `port` is not 0) and compares with one worker.
fn mpirun_trains_like_one_worker(name: &str, train_args: &[&str], port: u16) -> PathBuf {
    let dir = out_dir(name);
    let ddp_weights = dir.join("ddp.safetensors");
    let common = ["--steps", "20", "--batch-size", "50", "--no-shuffle"];
    let mut mpirun = Command::new("mpirun");
    mpirun.args(["-np", "2", "--oversubscribe"]);
    if port != 0 {
        mpirun.args(["-x", &format!("MASTER_PORT={port}")]);
    }
    let o = mpirun
        .arg(env!("CARGO_BIN_EXE_bonfire"))
        .args(["train", "--out", dir.to_str().unwrap(), "--save", ddp_weights.to_str().unwrap()])
        .args(common)
        .args(train_args)
        // Containers and CI run as root, which mpirun refuses unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env_remove("MASTER_PORT")
        .output()
        .expect("mpirun (Debian's openmpi-bin; `cargo xtask test` installs it)");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("epoch 1:").count(), 1, "one report, from rank 0: {}", text(&o));
    assert_like_one_worker("mpirun's job", &dir, &ddp_weights, &common);
    ddp_weights
}

#[test]
fn the_launcher_stops_everyone_when_a_worker_fails() {
    let started = Instant::now();
    let o = bonfire(&[
        "launch",
        "--nproc-per-node",
        "3",
        "--",
        "sh",
        "-c",
        "if [ \"$RANK\" = 1 ]; then exit 7; fi; sleep 30",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("rank 1 exited with code 7"), "{}", text(&o));
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());

    let o = bonfire(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "sh",
        "-c",
        "if [ \"$RANK\" = 0 ]; then kill -9 $$; fi; sleep 30",
    ]);
    assert!(text(&o).contains("rank 0 was killed by signal 9"), "{}", text(&o));

    // The environment a worker sees.
    let o = bonfire(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "sh",
        "-c",
        "echo $RANK/$WORLD_SIZE/$LOCAL_RANK/$LOCAL_WORLD_SIZE/$MASTER_ADDR",
    ]);
    assert!(o.status.success());
    let mut lines: Vec<String> = String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect();
    lines.sort();
    assert_eq!(lines, vec!["0/2/0/2/127.0.0.1", "1/2/1/2/127.0.0.1"]);
}

/// Every tensor of a safetensors file, by name.
fn tensors(file: &std::path::Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec())).collect();
    out.sort();
    out
}

#[test]
fn a_run_stopped_after_epoch_1_and_resumed_ends_with_the_same_weights() {
    let (a, b) = (out_dir("resume-a"), out_dir("resume-b"));
    let s = |d: &PathBuf, rest: &str| d.join(rest).to_str().unwrap().to_string();
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = bonfire(&args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        o
    };
    let common = |d: &PathBuf, epochs: &str| -> Vec<String> {
        [
            "train",
            "--dataset",
            "synthetic",
            "--epochs",
            epochs,
            "--checkpoint-dir",
            &s(d, "ckpt"),
            "--out",
            &s(d, "out"),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    run([common(&a, "2"), vec!["--save".into(), s(&a, "final.safetensors")]].concat());
    run(common(&b, "1"));
    assert!(b.join("ckpt").join("checkpoint-000000060.safetensors").is_file());
    let o = run([common(&b, "2"), vec!["--resume".into(), "--save".into(), s(&b, "final.safetensors")]].concat());
    assert!(text(&o).contains("resuming after epoch 1"), "{}", text(&o));
    assert_eq!(tensors(&a.join("final.safetensors")), tensors(&b.join("final.safetensors")));
    let same = bonfire(&["diff-weights", &s(&a, "final.safetensors"), &s(&b, "final.safetensors"), "--tolerance", "0"]);
    assert!(same.status.success() && text(&same).contains("largest difference 0.000e0"), "{}", text(&same));

    // PyTorch's names and layouts.
    let names: Vec<(String, Vec<usize>)> =
        tensors(&a.join("final.safetensors")).into_iter().map(|(n, s, _)| (n, s)).collect();
    assert_eq!(names.iter().find(|(n, _)| n == "fc1.weight").unwrap().1, vec![120, 400]);
    assert_eq!(names.iter().find(|(n, _)| n == "conv1.weight").unwrap().1, vec![6, 1, 5, 5]);
    assert_eq!(names.len(), 10);

    // --init from those weights: the untrained run starts where the other ended.
    let o = run(vec![
        "train".into(),
        "--dataset".into(),
        "synthetic".into(),
        "--strategy".into(),
        "single".into(),
        "--steps".into(),
        "1".into(),
        "--lr".into(),
        "0".into(),
        "--init".into(),
        s(&a, "final.safetensors"),
        "--out".into(),
        s(&b, "init"),
    ]);
    assert_eq!(final_accuracy(&o), 1.0, "{}", text(&o));

    // Bad --init and --resume input is refused by name.
    let o = bonfire(&["train", "--dataset", "synthetic", "--init", "/nonexistent.safetensors"]);
    assert!(!o.status.success() && text(&o).contains("--init /nonexistent.safetensors: cannot read"), "{}", text(&o));
    let empty = out_dir("empty");
    let o = bonfire(&["train", "--dataset", "synthetic", "--resume", "--checkpoint-dir", empty.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("there is no checkpoint"), "{}", text(&o));
}

/// PyTorch's `state_dict` of the ResNet (tests/fixtures/resnet_torch.py)
/// starts a run, and the run saves a file with the same names and shapes;
/// a ResNet's own file starts the next run.
#[test]
fn the_resnet_starts_from_pytorchs_weights_and_from_its_own() {
    let dir = out_dir("resnet-weights");
    let s = |rest: &str| dir.join(rest).to_str().unwrap().to_string();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/resnet_torch.safetensors");
    let run = |init: &str, save: &str| {
        let o = bonfire(&[
            "train",
            "--model",
            "resnet",
            "--strategy",
            "single",
            "--steps",
            "1",
            "--batch-size",
            "10",
            "--init",
            init,
            "--save",
            save,
            "--out",
            &s("out"),
        ]);
        assert!(o.status.success(), "{}", text(&o));
    };
    run(fixture, &s("a.safetensors"));
    let layout = |f: &str| -> Vec<(String, Vec<usize>)> {
        tensors(std::path::Path::new(f)).into_iter().map(|(n, s, _)| (n, s)).collect()
    };
    assert_eq!(layout(&s("a.safetensors")), layout(fixture));
    run(&s("a.safetensors"), &s("b.safetensors"));
    assert_eq!(layout(&s("b.safetensors")), layout(fixture));
}

//! The `bonfire` command end to end: real data, real processes.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bonfire_testkit::text;
use common::{bonfire, final_accuracy, out_dir};

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

/// `--comm-hook power-sgd`: DDP over 2 threads learns with rank-1 PowerSGD,
/// and rank 0 reports the bytes its hook sent a step: fewer than the mean's
/// f32 values of every gradient.
#[test]
fn ddp_trains_with_power_sgd_and_reports_the_bytes_it_sends() {
    let bytes_per_step = |o: &std::process::Output| -> f64 {
        let line = text(o).lines().find(|l| l.starts_with("comm hook: ")).map(str::to_owned);
        let line = line.unwrap_or_else(|| panic!("no bytes reported: {}", text(o)));
        line["comm hook: ".len()..].split(' ').next().unwrap().parse().unwrap()
    };
    let mut sent = Vec::new();
    for hook in ["bf16", "power-sgd"] {
        let dir = out_dir(hook);
        let o = bonfire(&[
            "train",
            "--threads",
            "--steps",
            "60",
            "--dataset",
            "synthetic",
            "--lr",
            "0.05",
            "--comm-hook",
            hook,
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{hook}: {}", text(&o));
        assert!(final_accuracy(&o) > 0.5, "{hook}: {}", text(&o));
        sent.push(bytes_per_step(&o));
    }
    // bf16 sends every value in 2 bytes; rank-1 factors send far fewer.
    assert!(sent[1] > 0.0 && sent[1] < sent[0] / 4.0, "bf16 {} bytes a step, PowerSGD {}", sent[0], sent[1]);
}

/// Workers as threads share Burn's one random generator per process, yet
/// every run starts from the weights one worker starts from: the seeded
/// initial weights do not depend on how the threads interleave.
#[test]
fn workers_as_threads_start_from_the_seeded_weights_every_time() {
    let saved = |name: &str, strategy: &[&str]| {
        let dir = out_dir(name);
        let file = dir.join("w.safetensors");
        let mut args = vec!["train", "--steps", "1", "--lr", "0", "--dataset", "synthetic"];
        args.extend_from_slice(&["--out", dir.to_str().unwrap(), "--save"]);
        args.push(file.to_str().unwrap());
        args.extend_from_slice(strategy);
        let o = bonfire(&args);
        assert!(o.status.success(), "{name}: {}", text(&o));
        file
    };
    let one = saved("seed-single", &["--strategy", "single"]);
    for run in 0..3 {
        let threads = saved(&format!("seed-threads-{run}"), &["--threads", "--workers", "4"]);
        let o = bonfire(&["diff-weights", one.to_str().unwrap(), threads.to_str().unwrap(), "--tolerance", "0"]);
        assert!(o.status.success(), "run {run}: {}", text(&o));
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
    let column = |i: usize| -> Vec<f64> {
        steps.lines().skip(1).map(|l| l.split(',').nth(i).unwrap().parse().unwrap()).collect()
    };
    assert!(column(2).iter().all(|&s| s > 0.0), "{steps}");
    // `elapsed` grows by at least each step's own time.
    let (seconds, elapsed) = (column(2), column(3));
    assert!(elapsed.windows(2).zip(&seconds[1..]).all(|(e, s)| e[1] - e[0] >= *s), "{steps}");
    // The host's phases: the gradients take time, and no phase outlasts its step.
    assert!(steps.starts_with("step,loss,seconds,elapsed,data,gradients,update,read\n"), "{steps}");
    assert!(column(5).iter().all(|&g| g > 0.0), "{steps}");
    for (i, s) in seconds.iter().enumerate() {
        let phases: f64 = (4..8).map(|c| column(c)[i]).sum();
        assert!(phases <= s + 1e-3, "step {i}: phases {phases} s in a step of {s} s\n{steps}");
    }
}

/// `--sync-batch-norm`: the ResNet under DDP over 2 workers normalises with
/// the whole batch, so a few steps end where one worker on the whole batch
/// ends (the sampler's shards of a step are that batch's samples), running
/// statistics included; without it they end elsewhere.
#[test]
fn the_resnet_with_sync_batch_norm_ends_where_one_worker_on_the_whole_batch_does() {
    let dir = out_dir("sync-batch-norm");
    let train = |name: &str, how: &[&str]| {
        let save = dir.join(format!("{name}.safetensors"));
        let mut args = vec!["train", "--model", "resnet", "--dataset", "synthetic", "--steps", "3"];
        args.extend_from_slice(&["--batch-size", "16", "--lr", "0.05", "--seed", "3", "--out"]);
        let out = dir.join(name);
        args.push(out.to_str().unwrap());
        args.push("--save");
        args.push(save.to_str().unwrap());
        args.extend_from_slice(how);
        let o = bonfire(&args);
        assert!(o.status.success(), "{name}: {}", text(&o));
        save.to_str().unwrap().to_string()
    };
    let one = train("single", &["--strategy", "single"]);
    let synced = train("synced", &["--threads", "--sync-batch-norm"]);
    let plain = train("plain", &["--threads"]);
    let o = bonfire(&["diff-weights", &one, &synced, "--tolerance", "1e-4"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = bonfire(&["diff-weights", &one, &plain, "--tolerance", "1e-3"]);
    assert!(!o.status.success(), "plain batch norm over 2 workers ends where one worker does: {}", text(&o));
}

/// `--shard-optimizer`: DDP over 2 workers with Adam, each worker stepping
/// its shard of the parameters, ends where Adam whole on every worker ends.
#[test]
fn ddp_with_a_sharded_adam_ends_where_the_whole_adam_does() {
    let dir = out_dir("shard-optimizer");
    let train_for = |name: &str, steps: &str, how: &[&str]| {
        let save = dir.join(format!("{name}.safetensors"));
        let out = dir.join(name);
        let mut args = vec!["train", "--threads", "--dataset", "synthetic", "--steps", steps, "--optimizer", "adam"];
        args.extend_from_slice(&["--lr", "0.001", "--out", out.to_str().unwrap(), "--save", save.to_str().unwrap()]);
        args.extend_from_slice(how);
        let o = bonfire(&args);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let shard = text(&o)
            .lines()
            .find_map(|l| l.strip_prefix("shard-optimizer: rank 0 keeps optimizer state for "))
            .map(|rest| rest.split(' ').filter_map(|w| w.parse::<usize>().ok()).collect::<Vec<_>>());
        (save.to_str().unwrap().to_string(), shard, text(&o))
    };
    let train = |name: &str, how: &[&str]| {
        let (save, shard, _) = train_for(name, "10", how);
        (save, shard)
    };
    let ((whole, none), (sharded, shard)) = (train("whole", &[]), train("sharded", &["--shard-optimizer"]));
    assert_eq!(none, None, "the whole optimizer reports no shard");
    // Shards hold whole parameters, largest first: LeNet's fc1 weight
    // (48,000 of its 61,706 values) on rank 0, all the rest on rank 1.
    assert_eq!(shard, Some(vec![48_000, 61_706]));
    let o = bonfire(&["diff-weights", &whole, &sharded, "--tolerance", "1e-6"]);
    assert!(o.status.success(), "{}", text(&o));

    // A checkpoint after 5 steps holds the whole optimizer's state: a
    // sharded run's resumes whole and a whole run's resumes sharded, each
    // ending where the whole optimizer ends after 10.
    for (first, then) in [("--shard-optimizer", ""), ("", "--shard-optimizer")] {
        let ckpt = dir.join(format!("ckpt{first}"));
        let ckpt = ckpt.to_str().unwrap();
        let flags = |more: &[&'static str], flag: &'static str| {
            let mut flags = vec!["--checkpoint-dir", ckpt, "--checkpoint-every", "5"];
            flags.extend_from_slice(more);
            flags.extend((!flag.is_empty()).then_some(flag));
            flags
        };
        train_for(&format!("first{first}"), "5", &flags(&[], first));
        let (resumed, _, said) = train_for(&format!("then{then}"), "10", &flags(&["--resume"], then));
        assert!(said.contains("after its step 5 (5 steps done)"), "{first} then {then}: {said}");
        let o = bonfire(&["diff-weights", &whole, &resumed, "--tolerance", "1e-6"]);
        assert!(o.status.success(), "{first} then {then}: {}", text(&o));
    }
}

/// `--uneven-inputs`: 7 workers share the 6,000 synthetic samples exactly
/// (858 for rank 0, 857 for the others); at 857 a worker a step, rank 0
/// takes a second step of one sample, which the others join, two epochs
/// running, as threads and as processes over the ring.
#[test]
fn workers_with_a_step_fewer_join_the_last_step_of_each_epoch() {
    for threads in [true, false] {
        let dir = out_dir(if threads { "uneven-inputs-threads" } else { "uneven-inputs-processes" });
        let mut args = vec!["train", "--workers", "7", "--dataset", "synthetic", "--epochs", "2"];
        args.extend_from_slice(&["--batch-size", "5999", "--uneven-inputs", "--timeout", "60"]);
        args.extend_from_slice(&["--out", dir.to_str().unwrap()]);
        args.extend(threads.then_some("--threads"));
        let o = bonfire(&args);
        assert!(o.status.success(), "threads {threads}: {}", text(&o));
        let said = text(&o);
        assert!(said.contains("epoch 1: 2 steps") && said.contains("epoch 2: 2 steps"), "threads {threads}: {said}");
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    // Each refused once, by the launching process, before any worker starts.
    let without_mpi = "built without MPI";
    let mpi = |with: &'static str| if cfg!(feature = "mpi") { with } else { without_mpi };
    let cases: [(&[&str], &str); 25] = [
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
        (&["train", "--strategy", "dp", "--comm-hook", "bf16"], "--comm-hook applies to --strategy ddp"),
        (&["train", "--comm-hook", "power-sgd", "--power-sgd-rank", "0"], "--power-sgd-rank must be at least 1"),
        (&["train", "--power-sgd-rank", "2"], "--power-sgd-rank applies to --comm-hook power-sgd"),
        (
            &["train", "--strategy", "single", "--model", "resnet", "--sync-batch-norm"],
            "--sync-batch-norm applies to --strategy ddp",
        ),
        (&["train", "--sync-batch-norm"], "--sync-batch-norm needs a model with batch norm: --model resnet"),
        (&["train", "--strategy", "dp", "--shard-optimizer"], "--shard-optimizer applies to --strategy ddp"),
        (&["train", "--strategy", "dp", "--uneven-inputs"], "--uneven-inputs applies to --strategy ddp"),
        (&["train", "--uneven-inputs", "--steps", "3"], "leave out --steps, --checkpoint-dir and --shard-optimizer"),
        (&["train", "--backend", "tpu"], "invalid value 'tpu'"),
        (&["train", "--devices", "cpu"], "--devices applies to --backend wgpu"),
        (&["train", "--backend", "wgpu", "--devices", "default,gpu1"], "\"gpu1\" is not a wgpu device"),
    ];
    for (args, want) in cases {
        let o = bonfire(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(text(&o).matches(want).count(), 1, "{args:?}: {}", text(&o));
        assert!(!text(&o).contains("rank 0"), "{args:?} started workers: {}", text(&o));
    }
    for args in [&["train", "--backend", "cuda"][..], &["nccl-check"]] {
        let o = bonfire(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("not part of this build"), "{args:?}: {}", text(&o));
    }
}

/// The ResNet, a few steps with Bonfire's kernels, ends where Burn's own
/// operations take it (`BONFIRE_KERNELS=off`): every convolution path the
/// model has (its 3x3 stride-1 blocks as a flipped-kernel input gradient,
/// the strided ones, the 1x1 shortcuts), max pooling and batch norm,
/// forward and backward, through a whole model and its optimizer.
#[test]
fn the_resnet_with_the_kernels_ends_where_burns_operations_take_it() {
    let dir = out_dir("resnet-kernels");
    let train = |name: &str, kernels: &str| {
        let save = dir.join(format!("{name}.safetensors"));
        let o = Command::new(env!("CARGO_BIN_EXE_bonfire"))
            .args(["train", "--strategy", "single", "--model", "resnet", "--dataset", "synthetic"])
            .args(["--steps", "3", "--batch-size", "16", "--lr", "0.05", "--seed", "3"])
            .args(["--out", dir.join(name).to_str().unwrap(), "--save", save.to_str().unwrap()])
            .env("BONFIRE_KERNELS", kernels)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", text(&o));
        save.to_str().unwrap().to_string()
    };
    let (ours, burns) = (train("kernels", "on"), train("burn", "off"));
    let o = bonfire(&["diff-weights", &ours, &burns, "--tolerance", "1e-4"]);
    assert!(o.status.success(), "{}", text(&o));
}

/// `diff-weights` exits non-zero and names the tensor where one file has a
/// NaN or an infinity the other does not match; NaN against NaN passes
/// only with `--nan-equal`.
#[test]
fn diff_weights_names_a_tensor_with_an_unmatched_nan_or_infinity() {
    let dir = out_dir("diff-nan");
    let file = |name: &str, w: [f32; 2]| {
        let path = dir.join(name);
        let (w, b): (Vec<u8>, Vec<u8>) =
            (w.iter().flat_map(|v| v.to_le_bytes()).collect(), 0.5f32.to_le_bytes().to_vec());
        fn view(bytes: &[u8]) -> safetensors::tensor::TensorView<'_> {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![bytes.len() / 4], bytes).unwrap()
        }
        let tensors = [("fc.weight", view(&w)), ("fc.bias", view(&b))];
        std::fs::write(&path, safetensors::serialize(tensors, None).unwrap()).unwrap();
        path.to_str().unwrap().to_string()
    };
    let plain = file("plain.safetensors", [1.0, 2.0]);
    let nan = file("nan.safetensors", [1.0, f32::NAN]);
    let inf = file("inf.safetensors", [f32::INFINITY, 2.0]);
    for other in [&nan, &inf] {
        let o = bonfire(&["diff-weights", &plain, other, "--tolerance", "1"]);
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("in fc.weight (a NaN or an infinity"), "{}", text(&o));
        assert!(!text(&o).contains("in fc.bias"), "{}", text(&o));
    }
    assert!(!bonfire(&["diff-weights", &nan, &nan]).status.success(), "NaN equals NaN only when asked");
    let o = bonfire(&["diff-weights", &nan, &nan, "--nan-equal", "--tolerance", "0"]);
    assert!(o.status.success(), "{}", text(&o));
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

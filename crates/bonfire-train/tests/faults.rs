//! Faults with real processes: a worker killed or frozen in the middle of
//! training, and bad files handed to the trainer. Timeouts are short so that
//! each test takes seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bonfire_testkit::text;
use common::{finish, signal, wait_for_file, wait_until, worker_pid};

mod common;

fn bonfire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bonfire"))
}

fn out_dir(name: &str) -> PathBuf {
    bonfire_testkit::scratch_dir(&format!("faults-{name}"))
}

fn run(args: &[&str]) -> Output {
    bonfire().args(args).output().unwrap()
}

/// The checkpoint after epoch 1 of [`training_args`]: 6000 samples in steps of 20.
const EPOCH_1: &str = "checkpoint-000000300.safetensors";

/// Synthetic data, small batches so that an epoch lasts a few seconds, a
/// checkpoint every epoch, and a 3-second collective timeout.
fn training_args(dir: &Path, epochs: &str) -> Vec<String> {
    let d = |rest: &str| dir.join(rest).to_string_lossy().into_owned();
    let args = ["train", "--dataset", "synthetic", "--batch-size", "20", "--epochs", epochs, "--timeout", "3"];
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.extend(["--checkpoint-dir".into(), d("ckpt"), "--out".into(), d("out")]);
    args
}

#[test]
fn a_worker_killed_mid_epoch_stops_the_job_and_resume_finishes_it() {
    let dir = out_dir("sigkill");
    let ckpt = dir.join("ckpt").join(EPOCH_1);
    let mut job =
        bonfire().args(training_args(&dir, "3")).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_file(&ckpt, Duration::from_secs(120), &mut job);
    std::thread::sleep(Duration::from_millis(500)); // into epoch 2
    signal(worker_pid(job.id(), 1, Duration::from_secs(5)), "KILL");
    let (out, took) = finish(job, Duration::from_secs(20));
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("rank 1 was killed by signal 9"), "{log}");
    assert!(took < Duration::from_secs(3 + 5), "stopping took {took:?}");
    // The last checkpoint is whole: resuming from it finishes the run.
    let resumed = run(&[training_args(&dir, "3"), vec!["--resume".into()]]
        .concat()
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let log = text(&resumed);
    assert!(resumed.status.success(), "{log}");
    assert!(log.contains("resuming after epoch"), "{log}");
    let metrics = std::fs::read_to_string(dir.join("out").join("metrics.csv")).unwrap();
    assert!(metrics.lines().last().unwrap().starts_with("3,"), "the run finished epoch 3: {metrics}");
}

/// Rank 0 hosts the rendezvous store; frozen, it is still the one named.
#[test]
fn a_frozen_rank_0_is_named_as_the_cause() {
    let dir = out_dir("sigstop0");
    let mut job =
        bonfire().args(training_args(&dir, "3")).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_file(&dir.join("ckpt").join(EPOCH_1), Duration::from_secs(120), &mut job);
    signal(worker_pid(job.id(), 0, Duration::from_secs(5)), "STOP");
    let (out, _) = finish(job, Duration::from_secs(30));
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    let last = log.lines().filter(|l| l.starts_with("error:")).last().unwrap_or_default();
    assert!(last.contains("rank 0 stopped answering") && last.contains("waiting for rank 0"), "{log}");
}

#[test]
fn a_frozen_worker_is_reported_by_the_stall_inspector_and_caught_by_the_timeout() {
    let dir = out_dir("sigstop");
    let mut args = training_args(&dir, "3");
    args.extend(["--stall-warning".into(), "1".into()]);
    let mut job = bonfire().args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Let training start, then freeze rank 1.
    wait_for_file(&dir.join("ckpt").join(EPOCH_1), Duration::from_secs(120), &mut job);
    let frozen = worker_pid(job.id(), 1, Duration::from_secs(5));
    signal(frozen, "STOP");
    let (out, took) = finish(job, Duration::from_secs(30));
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("stall: rank 0 has waited") && log.contains("rank 1"), "{log}");
    assert!(log.contains("timed out after 3s") && log.contains("waiting for rank 1"), "{log}");
    assert!(log.contains("rank 0 exited with code 1"), "{log}");
    assert!(log.contains("rank 1 stopped answering (rank 0: "), "the final line names the frozen rank: {log}");
    assert!(took < Duration::from_secs(3 + 10), "stopping took {took:?}");
    // The launcher took the frozen worker down with the rest.
    assert!(
        !Path::new(&format!("/proc/{frozen}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{frozen}/stat")).unwrap_or_default();
            stat.contains(") Z ")
        }
    );
}

#[test]
fn bad_checkpoints_and_weights_are_refused_and_left_untouched() {
    let dir = out_dir("bad-files");
    let d = |rest: &str| dir.join(rest).to_string_lossy().into_owned();
    let single = ["train", "--dataset", "synthetic", "--strategy", "single"];
    let o = run(&[&single[..], &["--checkpoint-dir", &d("ckpt"), "--out", &d("out")]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let ckpt = dir.join("ckpt").join("checkpoint-000000060.safetensors");
    let original = std::fs::read(&ckpt).unwrap();

    // A checkpoint of another model.
    let o =
        run(&[&single[..], &["--model", "resnet", "--epochs", "2", "--resume", "--checkpoint-dir", &d("ckpt")]]
            .concat());
    assert!(!o.status.success() && text(&o).contains("does not hold a ResNet"), "{}", text(&o));
    assert_eq!(std::fs::read(&ckpt).unwrap(), original, "a refused checkpoint is left as it was");

    // A truncated checkpoint.
    std::fs::create_dir_all(dir.join("cut")).unwrap();
    std::fs::write(dir.join("cut").join("checkpoint-000000060.safetensors"), &original[..original.len() / 2]).unwrap();
    let o = run(&[&single[..], &["--epochs", "2", "--resume", "--checkpoint-dir", &d("cut")]].concat());
    let log = text(&o);
    assert!(!o.status.success() && log.contains("checkpoint-000000060.safetensors: not a safetensors file"), "{log}");

    // --init with a misshapen tensor, then with missing ones.
    let write = |name: &str, shape: Vec<usize>| {
        let weights = vec![0u8; shape.iter().product::<usize>() * 4];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &weights).unwrap();
        std::fs::write(dir.join(name), safetensors::serialize([("conv1.weight", view)], None).unwrap()).unwrap();
        d(name)
    };
    let o =
        run(&[&single[..], &["--steps", "1", "--init", &write("misshapen.safetensors", vec![6, 1, 3, 3])]].concat());
    let log = text(&o);
    assert!(!o.status.success() && log.contains("conv1.weight") && log.contains("[6, 1, 3, 3]"), "{log}");
    let o = run(&[&single[..], &["--steps", "1", "--init", &write("partial.safetensors", vec![6, 1, 5, 5])]].concat());
    let log = text(&o);
    assert!(!o.status.success() && log.contains("missing tensors") && log.contains("fc3.bias"), "{log}");
}

/// A worker killed or frozen in the middle of epoch 1 of a 2-epoch DDP run
/// over 2 processes costs a restart from the last step checkpoint, not the
/// run: the job ends with exit 0, says what failed and that it restarted,
/// and its weights equal those of an uninterrupted run (max |Δ| = 0 on the
/// CPU). Killing rank 0, which hosts the rendezvous store, is survived the
/// same way; with no restart allowed the job fails naming the rank.
#[test]
fn a_killed_or_frozen_worker_is_restarted_from_the_last_checkpoint_with_nothing_lost() {
    let args = |dir: &Path, extra: &[&str]| -> Vec<String> {
        let mut args = training_args(dir, "2");
        args.extend(["--checkpoint-every", "100", "--save"].iter().map(|s| s.to_string()));
        args.push(dir.join("final.safetensors").to_string_lossy().into_owned());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let reference = out_dir("restart-reference");
    let o = bonfire().args(args(&reference, &[])).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let want = reference.join("final.safetensors");

    for (name, victim, how, cause) in [
        ("kill-1", 1, "KILL", "rank 1 was killed by signal 9"),
        ("kill-0", 0, "KILL", "rank 0 was killed by signal 9"),
        ("stop-1", 1, "STOP", "rank 1 stopped answering"),
    ] {
        let dir = out_dir(&format!("restart-{name}"));
        let mut job = bonfire()
            .args(args(&dir, &["--max-restarts", "1"]))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The first step checkpoint, 100 steps into epoch 1 (of 300).
        wait_for_file(&dir.join("ckpt").join("checkpoint-000000100.safetensors"), Duration::from_secs(120), &mut job);
        signal(worker_pid(job.id(), victim, Duration::from_secs(5)), how);
        let (out, _) = finish(job, Duration::from_secs(120));
        let log = text(&out);
        assert!(out.status.success(), "{name}: {log}");
        assert!(log.contains(cause) && log.contains("restarting every worker (restart 1 of 1)"), "{name}: {log}");
        assert!(log.contains("resuming in epoch 1 after its step "), "{name}: {log}");
        let got = dir.join("final.safetensors");
        let same = run(&["diff-weights", &want.to_string_lossy(), &got.to_string_lossy(), "--tolerance", "0"]);
        assert!(same.status.success() && text(&same).contains("largest difference 0.000e0"), "{name}: {}", text(&same));
    }

    let dir = out_dir("restart-none");
    let mut job = bonfire().args(args(&dir, &[])).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_file(&dir.join("ckpt").join("checkpoint-000000100.safetensors"), Duration::from_secs(120), &mut job);
    signal(worker_pid(job.id(), 1, Duration::from_secs(5)), "KILL");
    let (out, _) = finish(job, Duration::from_secs(30));
    let log = text(&out);
    assert!(!out.status.success() && log.contains("rank 1 was killed by signal 9"), "{log}");
    assert!(!log.contains("restarting"), "{log}");
}

/// `--min-workers 1`: rank 1 is killed in the middle of epoch 1 and then
/// cannot be started again (it fails at once whenever the launcher restarts
/// it), so once the restart is spent the job continues on one worker from
/// the last step checkpoint, with the same global batch. Since the union of
/// the workers' batches at each step does not depend on how many share it,
/// the job ends with the weights of the uninterrupted two-worker run.
#[test]
fn a_worker_lost_for_good_leaves_the_job_to_the_others() {
    let train = |dir: &Path| -> Vec<String> {
        let mut args = training_args(dir, "2");
        args.extend(["--checkpoint-every", "100", "--save"].iter().map(|s| s.to_string()));
        args.push(dir.join("final.safetensors").to_string_lossy().into_owned());
        args
    };
    let reference = out_dir("shrink-reference");
    let o = bonfire().args(train(&reference)).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));

    let dir = out_dir("shrink");
    let worker = format!(
        "if [ \"$RANK\" = 1 ] && [ \"$TORCHELASTIC_RESTART_COUNT\" != 0 ]; then echo rank 1 cannot start >&2; exit 9; fi; \
         exec {} {}",
        env!("CARGO_BIN_EXE_bonfire"),
        train(&dir).join(" ")
    );
    let launch = ["launch", "--nproc-per-node", "2", "--max-restarts", "1", "--min-workers", "1", "--", "sh", "-c"];
    let mut job = bonfire().args(launch).arg(&worker).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_file(&dir.join("ckpt").join("checkpoint-000000100.safetensors"), Duration::from_secs(120), &mut job);
    signal(worker_pid(job.id(), 1, Duration::from_secs(5)), "KILL");
    let (out, _) = finish(job, Duration::from_secs(180));
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("rank 1 was killed by signal 9") && log.contains("restart 1 of 1"), "{log}");
    assert!(log.contains("rank 1 exited with code 9"), "{log}");
    assert!(log.contains("continuing with 1 worker(s) (world size 1) from the last checkpoint"), "{log}");
    assert!(log.contains("resuming in epoch 1 after its step "), "{log}");
    let (want, got) = (reference.join("final.safetensors"), dir.join("final.safetensors"));
    let same = run(&["diff-weights", &want.to_string_lossy(), &got.to_string_lossy(), "--tolerance", "1e-4"]);
    assert!(same.status.success(), "{}", text(&same));
    eprintln!("one worker from the checkpoint against two throughout: {}", text(&same).lines().last().unwrap_or(""));
}

/// SIGKILL at a random moment of a run that writes a checkpoint every two
/// steps (so that some kills land in the middle of a write: the count is
/// printed), twenty times in a row: every time, the next run resumes from a
/// checkpoint that passes its check, and skips none.
#[test]
fn checkpoints_survive_sigkill_at_random_moments() {
    use std::io::{BufRead, BufReader};

    let dir = out_dir("random-kills");
    let d = |rest: &str| dir.join(rest).to_string_lossy().into_owned();
    let args = [
        "train",
        "--strategy",
        "single",
        "--dataset",
        "synthetic",
        "--batch-size",
        "20",
        "--epochs",
        "1000",
        "--checkpoint-every",
        "2",
    ];
    let mut state = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let (mut delays, mut mid_write) = (Vec::new(), 0);
    for round in 0..21 {
        let mut job = bonfire()
            .args(args)
            .args(["--checkpoint-dir", &d("ckpt"), "--out", &d("out")])
            .args(if round > 0 { &["--resume"][..] } else { &[] })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(job.stderr.take().unwrap()).lines();
        if round == 0 {
            // Any checkpoint: the run keeps only the last two, so the first
            // may come and go between two looks.
            let checkpoint = |name: &str| name.starts_with("checkpoint-") && name.ends_with(".safetensors");
            wait_until("a checkpoint", Duration::from_secs(60), &mut job, || {
                std::fs::read_dir(dir.join("ckpt"))
                    .is_ok_and(|files| files.flatten().any(|f| checkpoint(&f.file_name().to_string_lossy())))
            });
        } else {
            let mut seen = Vec::new();
            for line in lines.map_while(Result::ok) {
                seen.push(line);
                let last = seen.last().unwrap();
                assert!(!last.contains("skipping"), "round {round}: {seen:?}");
                if last.contains("resuming") {
                    break;
                }
            }
            assert!(seen.last().is_some_and(|l| l.contains("resuming")), "round {round} did not resume: {seen:?}");
        }
        if round == 20 {
            let _ = job.kill();
            let _ = job.wait();
            break;
        }
        // The next pseudo-random delay, 0 to 400 ms (xorshift).
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let delay = Duration::from_millis(state % 400);
        delays.push(delay);
        std::thread::sleep(delay);
        signal(job.id(), "KILL");
        let _ = job.wait();
        let files = std::fs::read_dir(dir.join("ckpt")).unwrap();
        mid_write += files.flatten().any(|f| f.file_name().to_string_lossy().ends_with(".tmp")) as usize;
    }
    eprintln!("killed after {delays:?}; {mid_write} of the kills left a checkpoint half written");
}

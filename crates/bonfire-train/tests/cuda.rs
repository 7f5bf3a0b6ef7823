//! `--backend cuda` in a build with the `cuda` feature. On a machine without
//! the NVIDIA driver every CUDA request must end with a clear message and exit
//! code 2, never a panic; where a driver and a device exist, it must train.

use std::process::{Command, Output};

fn bonfire(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bonfire")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Whether this machine can load the CUDA driver library at all.
fn has_driver() -> bool {
    ["libcuda.so.1", "libcuda.so"].iter().any(|lib| {
        Command::new("sh")
            .args(["-c", &format!("ldconfig -p 2>/dev/null | grep -q '{lib}'")])
            .status()
            .is_ok_and(|s| s.success())
    })
}

const SMOKE: [&str; 8] = ["train", "--backend", "cuda", "--dataset", "synthetic", "--steps", "3", "--out"];

#[test]
fn cuda_without_a_driver_is_a_clear_error_or_with_one_it_trains() {
    let out = std::env::temp_dir().join(format!("bonfire-cuda-{}", std::process::id()));
    // DDP twice: through NCCL (the default on CUDA) and through the ring,
    // which shares one GPU between workers.
    let runs: [&[&str]; 4] = [&["single"], &["ddp"], &["ddp", "--comm", "ring"], &["dp"]];
    for run in runs {
        let strategy = run.join(" ");
        let o = bonfire(&[&SMOKE[..], &[out.to_str().unwrap(), "--strategy"], run].concat());
        let log = text(&o);
        assert!(!log.contains("panicked"), "{strategy}: {log}");
        if has_driver() {
            assert!(o.status.success() || o.status.code() == Some(2), "{strategy}: {log}");
        } else {
            assert_eq!(o.status.code(), Some(2), "{strategy}: {log}");
            assert!(log.contains("libcuda.so"), "{strategy}: {log}");
        }
    }
}

#[test]
fn a_cuda_device_index_out_of_range_is_a_clear_error() {
    // DP over 64 replicas asks for devices 0..63: no machine here has them.
    let out = std::env::temp_dir().join(format!("bonfire-cuda-dp-{}", std::process::id()));
    let o = bonfire(&[&SMOKE[..], &[out.to_str().unwrap(), "--strategy", "dp", "--workers", "64"]].concat());
    let log = text(&o);
    assert_eq!(o.status.code(), Some(2), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    if has_driver() {
        assert!(log.contains("CUDA device") && log.contains("does not exist"), "{log}");
    }
}

#[test]
fn nccl_check_without_the_libraries_is_a_clear_error() {
    let o = bonfire(&["nccl-check", "--sizes-mib", "1"]);
    let log = text(&o);
    assert!(!log.contains("panicked"), "{log}");
    if !has_driver() {
        assert_eq!(o.status.code(), Some(2), "{log}");
        assert!(log.contains("libcuda.so"), "{log}");
    }
}

#[test]
fn ddp_over_nccl_needs_a_gpu_per_worker() {
    let out = std::env::temp_dir().join(format!("bonfire-cuda-ddp-{}", std::process::id()));
    let out = out.to_str().unwrap();
    // 64 workers: more than any machine here has GPUs.
    let nccl = bonfire(&[&SMOKE[..], &[out, "--strategy", "ddp", "--workers", "64", "--batch-size", "64"]].concat());
    let log = text(&nccl);
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(nccl.status.code(), Some(2), "{log}");
    if has_driver() {
        assert!(log.contains("--comm ring") || log.contains("libnccl"), "{log}");
    } else {
        assert!(log.contains("libcuda.so"), "{log}");
    }
}

#[test]
fn a_launched_worker_joins_through_nccl_or_fails_cleanly() {
    // One launched worker: a world of one through NCCL, the path DDP takes
    // on CUDA by default, as far as a single GPU allows.
    let out = std::env::temp_dir().join(format!("bonfire-cuda-launch-{}", std::process::id()));
    let exe = env!("CARGO_BIN_EXE_bonfire");
    let o = bonfire(
        &[
            &["launch", "--nproc-per-node", "1", "--", exe][..],
            &SMOKE[..],
            &[out.to_str().unwrap(), "--strategy", "ddp", "--workers", "1"],
        ]
        .concat(),
    );
    let log = text(&o);
    assert!(!log.contains("panicked"), "{log}");
    if !has_driver() {
        assert!(!o.status.success(), "{log}");
        assert!(log.contains("libcuda.so"), "{log}");
    }
}

//! The GPU check's speed table (`xtask/gpu-check/table.py`) on what
//! `bonfire train --out` writes and what the PyTorch baseline prints, here
//! on the CPU: the check must not fail on a GPU, where time is scarce, for a
//! reason this machine can find (a renamed column, another JSON line, a row
//! that does not learn in the check's steps). Needs a Python with torch
//! (`BONFIRE_TORCH_PYTHON`), and says in the test output when there is none.

use std::path::Path;
use std::process::{Command, Output};

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// LeNet's rows as the check runs them (batch 100, 300 steps, seed 7),
/// on the CPU instead of the GPU; DDP through NCCL becomes one ring worker.
#[test]
fn the_gpu_checks_table_reads_the_runs_it_times() {
    let Some(python) = bonfire_testkit::torch_python("the_gpu_checks_table_reads_the_runs_it_times") else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let speed = bonfire_testkit::scratch_dir("gpu-check-table");
    let torch = Command::new(&python)
        .arg(root.join("bench/torch_ddp_train.py"))
        .args(["--world", "1", "--device", "cpu", "--model", "lenet", "--batch", "100", "--steps", "300", "--json"])
        .output()
        .unwrap();
    assert!(torch.status.success(), "the PyTorch baseline: {}", text(&torch));
    std::fs::write(speed.join("lenet-torch.json"), &torch.stdout).unwrap();
    let rows: [(&str, &[&str]); 4] = [
        ("alone", &["--strategy", "single"]),
        ("ddp-nccl-1", &["--strategy", "ddp", "--workers", "1"]),
        ("dp-2", &["--strategy", "dp", "--workers", "2"]),
        ("ring-2", &["--strategy", "ddp", "--workers", "2", "--comm", "ring"]),
    ];
    for (row, strategy) in rows {
        let out = speed.join(format!("lenet-{row}"));
        let o = Command::new(env!("CARGO_BIN_EXE_bonfire"))
            .args(["train", "--backend", "cpu"])
            .args(strategy)
            .args(["--model", "lenet", "--batch-size", "100", "--seed", "7", "--epochs", "100", "--steps", "300"])
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{row}: {}", text(&o));
    }
    let table = Command::new(&python)
        .arg(root.join("xtask/gpu-check/table.py"))
        .arg(&speed)
        .env("MODELS", "lenet")
        .output()
        .unwrap();
    let printed = text(&table);
    assert!(table.status.success(), "the table failed the rows:\n{printed}");
    for row in ["alone", "ddp-nccl-1", "dp-2", "ring-2", "PyTorch"] {
        let line = printed.lines().find(|l| l.starts_with(&format!("| lenet | {row} |")));
        assert!(line.is_some_and(|l| l.ends_with("| yes |")), "no learned row {row}:\n{printed}");
        // Bonfire's rows carry the host's time in each phase of a step.
        let phases = line.unwrap().split('|').nth(7).unwrap().trim();
        assert_eq!(phases.split('/').count(), if row == "PyTorch" { 1 } else { 4 }, "{row}: {phases}");
    }
    // Burn's own DDP needs CUDA: its row is the one left unmeasured.
    assert!(printed.contains("| lenet | Burn DDP | not measured"), "{printed}");
    let _ = std::fs::remove_dir_all(&speed);
}

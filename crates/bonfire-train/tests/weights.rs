//! Weights and checkpoint files end to end: a run stopped and resumed, the
//! files' PyTorch names, `--init` from them and from PyTorch's own.

mod common;

use std::path::PathBuf;

use bonfire_testkit::text;
use common::{bonfire, final_accuracy, out_dir};

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

    // A bad --init is refused by name; --resume with no checkpoint yet (a
    // first start under a restarting launcher) starts from the beginning.
    let o = bonfire(&["train", "--dataset", "synthetic", "--init", "/nonexistent.safetensors"]);
    assert!(!o.status.success() && text(&o).contains("--init /nonexistent.safetensors: cannot read"), "{}", text(&o));
    let empty = out_dir("empty");
    let dir = empty.to_str().unwrap();
    let metrics = empty.join("metrics");
    let out = ["--out", metrics.to_str().unwrap()];
    let o = bonfire(
        &[&["train", "--dataset", "synthetic", "--steps", "2", "--resume", "--checkpoint-dir", dir][..], &out].concat(),
    );
    assert!(o.status.success() && text(&o).contains("yet: starting from the beginning"), "{}", text(&o));
}

/// PyTorch's `state_dict` of the ResNet (tests/fixtures/resnet_torch.py)
/// starts a run, and the run saves a file with the same names and shapes;
/// a ResNet's own file starts the next run.
#[test]
fn the_resnet_starts_from_pytorchs_weights_and_from_its_own() {
    let dir = out_dir("resnet-weights");
    let s = |rest: &str| dir.join(rest).to_str().unwrap().to_string();
    // At run time: a build folder shared by two clones may run this test
    // compiled in the other one.
    let fixture = &format!("{}/tests/fixtures/resnet_torch.safetensors", std::env::var("CARGO_MANIFEST_DIR").unwrap());
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

//! PowerSGD's comm hook on its own, over real in-process ranks.

use bonfire_collective::InProcCommunicator;
use bonfire_parallel::comm_hook::{BucketParameter, CommHook, GradBucket, PowerSgd};
use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729) % 23) as f32 / 8.0 - 1.375).collect()
}

fn tensor(v: &[f32]) -> Tensor<Flex, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
}

fn vec_of(t: Tensor<Flex, 1>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// A bucket of a 6x5 matrix at 0..30, a vector at 30..34 and one value of
/// DDP's own at 34.
fn bucket(v: &[f32]) -> GradBucket<Flex> {
    let parameters =
        vec![BucketParameter { range: 0..30, shape: vec![6, 5] }, BucketParameter { range: 30..34, shape: vec![4] }];
    GradBucket { index: 0, buffer: tensor(v), parameters }
}

#[test]
fn at_full_rank_it_is_the_mean_of_every_value() {
    let comms = InProcCommunicator::group(2).unwrap();
    let inputs: Vec<Vec<f32>> = (0..2).map(|r| values(35, r + 1)).collect();
    let got: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(inputs.clone())
            .map(|(mut comm, v)| {
                s.spawn(move || {
                    let mut hook = PowerSgd::<Flex>::new(8).with_min_compression_rate(0.0);
                    vec_of(hook.average(&mut comm, bucket(&v)).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mean: Vec<f32> = (0..35).map(|i| (inputs[0][i] + inputs[1][i]) / 2.0).collect();
    for (rank, got) in got.iter().enumerate() {
        let worst = bonfire_testkit::max_abs_diff(got, &mean);
        assert!(worst < 1e-4, "rank {rank}: {worst}");
    }
}

#[test]
fn error_feedback_makes_rank_one_steps_add_up_to_the_gradient() {
    // One rank, the same full-rank gradient every step: a rank-1 step alone
    // is far from it, but what each step leaves out is sent later, so the
    // steps' mean approaches it.
    let mut comm = InProcCommunicator::group(1).unwrap().remove(0);
    let gradient = values(35, 3);
    let mut hook = PowerSgd::<Flex>::new(1).with_min_compression_rate(0.0);
    let norm = |v: &[f32]| v[..30].iter().map(|x| x * x).sum::<f32>().sqrt();
    let steps = 200;
    let mut sum = vec![0.0f32; 35];
    for step in 0..steps {
        let out = vec_of(hook.average(&mut comm, bucket(&gradient)).unwrap());
        if step == 0 {
            let off: Vec<f32> = out.iter().zip(&gradient).map(|(a, b)| a - b).collect();
            assert!(norm(&off) > 0.1 * norm(&gradient), "rank 1 should not reproduce a 6x5 matrix");
        }
        assert_eq!(out[30..], gradient[30..], "the vector and DDP's value pass as they are");
        sum.iter_mut().zip(&out).for_each(|(s, o)| *s += o);
    }
    let off: Vec<f32> = sum.iter().zip(&gradient).map(|(s, g)| s / steps as f32 - g).collect();
    assert!(norm(&off) < 0.05 * norm(&gradient), "the steps' mean is {} away", norm(&off) / norm(&gradient));
}

#[test]
fn small_matrices_and_vectors_are_sent_as_they_are() {
    let mut comm = InProcCommunicator::group(1).unwrap().remove(0);
    let v = values(35, 4);
    // 6x5 at rank 2: 30 values against 2·(6 + 5) = 22, under the default rate of 2.
    let out = vec_of(PowerSgd::<Flex>::new(2).average(&mut comm, bucket(&v)).unwrap());
    assert_eq!(out, v);
}

#[test]
fn before_its_start_step_it_is_the_plain_mean() {
    let mut comm = InProcCommunicator::group(1).unwrap().remove(0);
    let gradient = values(35, 5);
    let mut hook = PowerSgd::<Flex>::new(1).with_min_compression_rate(0.0).with_start_step(3);
    for step in 0..4 {
        let out = vec_of(hook.average(&mut comm, bucket(&gradient)).unwrap());
        // At world 1 the mean is the gradient itself; rank 1 is not.
        assert_eq!(out == gradient, step < 3, "step {step}");
    }
}

//! DataParallel over several devices must equal one device.

mod common;

use bonfire_parallel::{DataParallel, ParallelError};
use bonfire_testkit::max_abs_diff;
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use common::*;

type Flex = Autodiff<burn::backend::Flex>;
type Wgpu = Autodiff<burn::backend::Wgpu>;

#[test]
fn dp_over_two_devices_equals_one_device() {
    let device = Default::default();
    // An odd global batch: the two shares are uneven (6 and 5 rows).
    let want = train_single::<Flex, _>(seeded::<Flex, _>(ConvNet::new(&device), 1), 11, 64);
    let got = train_dp::<Flex, _>(seeded::<Flex, _>(ConvNet::new(&device), 1), vec![device; 2], 11, 64);
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-5, "DP differs from one device by {diff}");
    let got = train_dp::<Flex, _>(seeded::<Flex, _>(Mlp::new(&device, 16), 1), vec![device; 3], 10, FEATURES);
    let want = train_single::<Flex, _>(seeded::<Flex, _>(Mlp::new(&device, 16), 1), 10, FEATURES);
    assert!(max_abs_diff(&got, &want) <= 1e-5);
}

/// Every step folds the replicas' batch-norm updates into the module's
/// running statistics (their mean): with fixed weights and equal shares the
/// running mean after 3 steps is one device's on the whole batches.
#[test]
fn dp_keeps_every_steps_running_statistics() {
    let device = Default::default();
    let (one, two) =
        (seeded::<Flex, _>(KernelConvNet::new(&device), 1), seeded::<Flex, _>(KernelConvNet::new(&device), 1));
    let dp = DataParallel::<Flex>::new(vec![device; 2]).unwrap();
    for step in 0..3 {
        let (x, _) = batch::<Flex>(step * 12..(step + 1) * 12, 64, &device);
        drop(one.logits(x.clone()));
        drop(dp.forward(&two, x, |m, x| m.logits(x)).unwrap());
    }
    let (a, b) = (one.valid().bn.running_mean.value(), two.valid().bn.running_mean.value());
    let diff = max_abs_diff(&a.to_data().to_vec::<f32>().unwrap(), &b.to_data().to_vec::<f32>().unwrap());
    assert!(diff <= 1e-6, "DP's running mean differs from one device's by {diff}");
}

#[test]
fn dp_with_two_wgpu_replicas_equals_one() {
    // Two replicas on one wgpu device (distinct devices: distinct_devices.rs).
    let devices = vec![burn::backend::wgpu::WgpuDevice::DefaultDevice; 2];
    let want = train_single::<Wgpu, _>(seeded::<Wgpu, _>(Mlp::new(&devices[0], 16), 1), 12, FEATURES);
    let got = train_dp::<Wgpu, _>(seeded::<Wgpu, _>(Mlp::new(&devices[0], 16), 1), devices, 12, FEATURES);
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-4, "DP on wgpu differs by {diff}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let err = DataParallel::<Flex>::new(vec![]).err().unwrap();
    assert!(err.to_string().contains("at least one device"));
    let device = Default::default();
    let dp = DataParallel::<Flex>::new(vec![device; 3]).unwrap();
    let model = Mlp::<Flex>::new(&device, 4);
    let (x, _) = batch::<Flex>(0..2, FEATURES, &device);
    let err = dp.forward(&model, x, |m, x| m.logits(x)).err().unwrap();
    assert!(matches!(err, ParallelError::Invalid(_)));
    assert!(err.to_string().contains("batch of 2") && err.to_string().contains("3 devices"), "{err}");
}

//! DP and DDP over two distinct wgpu devices (here lavapipe's default device
//! and its CPU device, each with its own queue) must equal one device.
//! Burn 0.21 cannot copy between two wgpu devices, and it says so by
//! panicking on a background server thread rather than at the call: so any
//! panic anywhere in this process fails these tests, not only a wrong value.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use bonfire_parallel::DdpConfig;
use bonfire_testkit::max_abs_diff;
use burn::backend::wgpu::WgpuDevice;
use burn::backend::Autodiff;
use common::*;

type Wgpu = Autodiff<burn::backend::Wgpu>;

fn two_devices() -> Vec<WgpuDevice> {
    vec![WgpuDevice::DefaultDevice, WgpuDevice::Cpu]
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts every panic of the process, on any thread, from now on.
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let print = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            print(info);
        }));
    });
}

fn assert_no_panic() {
    let n = PANICS.load(Ordering::SeqCst);
    assert_eq!(n, 0, "{n} panic(s) on some thread (see the output above)");
}

#[test]
fn dp_over_two_wgpu_devices_equals_one_device() {
    count_panics();
    let main = &two_devices()[0];
    let want = train_single::<Wgpu, _>(seeded::<Wgpu, _>(Mlp::new(main, 16), 1), 12, FEATURES);
    let got = train_dp::<Wgpu, _>(seeded::<Wgpu, _>(Mlp::new(main, 16), 1), two_devices(), 12, FEATURES);
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-4, "MLP: DP over two wgpu devices differs from one device by {diff}");
    // An odd batch: the shares are uneven (6 and 5 rows).
    let want = train_single::<Wgpu, _>(seeded::<Wgpu, _>(ConvNet::new(main), 1), 11, 64);
    let got = train_dp::<Wgpu, _>(seeded::<Wgpu, _>(ConvNet::new(main), 1), two_devices(), 11, 64);
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-4, "conv net: DP over two wgpu devices differs from one device by {diff}");
    assert_no_panic();
}

/// With batch norm each replica normalises with its own share's statistics,
/// so DP equals DP with the same split on one device: the weights and the
/// running statistics (the replicas' mean) after every step.
#[test]
fn dp_with_batch_norm_over_two_wgpu_devices_equals_one_device() {
    count_panics();
    let main = &two_devices()[0];
    let model = || seeded::<Wgpu, _>(KernelConvNet::new(main), 1);
    let want = train_dp::<Wgpu, _>(model(), vec![main.clone(); 2], 12, 64);
    let got = train_dp::<Wgpu, _>(model(), two_devices(), 12, 64);
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-4, "DP with batch norm over two wgpu devices differs from one device by {diff}");
    assert_no_panic();
}

#[test]
fn ddp_threads_on_two_wgpu_devices_equal_one_worker() {
    count_panics();
    const PER_RANK: usize = 6;
    let main = two_devices()[0].clone();
    let want = train_single::<Wgpu, _>(seeded::<Wgpu, _>(ConvNet::new(&main), 1), PER_RANK * 2, 64);
    let got = ddp_threads_on::<Wgpu, _>(two_devices(), |_, d| ConvNet::new(d), DdpConfig::default(), PER_RANK, 1, 64);
    for (rank, got) in got.into_iter().enumerate() {
        let diff = max_abs_diff(&got.unwrap(), &want);
        assert!(diff <= 1e-4, "rank {rank} on {:?}: differs from one worker by {diff}", two_devices()[rank]);
    }
    assert_no_panic();
}

//! SyncBatchNorm (`DdpConfig::sync_batch_norm`): DDP whose batch norm sums
//! its statistics across the ranks must equal one worker on the whole
//! batch, weights and running statistics, with even and uneven shares.

mod common;

use bonfire_parallel::{settle_buffers, DdpConfig, DistributedDataParallel, HookBackend};
use bonfire_testkit::{flat_values, max_abs_diff};
use burn::backend::Autodiff;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use common::*;

type Flex = Autodiff<burn::backend::Flex>;
type Wgpu = Autodiff<burn::backend::Wgpu>;
type NdArray = Autodiff<burn::backend::NdArray>;

/// Parameters, then the running mean and variance.
fn state<B: AutodiffBackend>(model: &KernelConvNet<B>) -> Vec<f32> {
    settle_buffers::<B, KernelConvNet<B>>(model);
    let values = |t: Tensor<B, 1>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    let mut all = flat_values::<B, KernelConvNet<B>>(model);
    all.extend(values(model.bn.running_mean.value()));
    all.extend(values(model.bn.running_var.value()));
    all
}

/// The model seeded with `seed`, its convolution's bias raised by `offset`:
/// what batch norm sees then sits `offset` from zero, with the same spread.
fn model<B: AutodiffBackend>(seed: u64, offset: f32) -> KernelConvNet<B> {
    let mut model = seeded::<B, _>(KernelConvNet::<B>::new(&Default::default()), seed);
    model.conv.bias = model.conv.bias.map(|b| b.map(|t| t.add_scalar(offset)));
    model
}

/// One worker on every step's whole batch: `sizes.iter().sum()` rows.
fn single<B: AutodiffBackend>(sizes: &[usize], offset: f32) -> Vec<f32> {
    let device = Default::default();
    let global: usize = sizes.iter().sum();
    let mut model = model::<B>(1, offset);
    let mut opt = sgd::<B, KernelConvNet<B>>();
    for step in 0..STEPS {
        let (x, y) = batch::<B>(step * global..(step + 1) * global, 64, &device);
        let grads = GradientsParams::from_grads(loss(&model, x, y).backward(), &model);
        model = opt.step(LR, model, grads);
    }
    state(&model)
}

/// DDP over `sizes.len()` threads, rank r taking the next `sizes[r]` rows
/// of each step's batch. Each rank's mean loss is weighted by its share
/// (times the world size, which DDP's mean divides by again), so that the
/// averaged gradient is that of the mean over the whole batch.
fn ddp<B: HookBackend>(sizes: &[usize], sync_batch_norm: bool, offset: f32) -> Vec<Vec<f32>> {
    let global: usize = sizes.iter().sum();
    let world = sizes.len();
    let config = DdpConfig { sync_batch_norm, ..DdpConfig::default() };
    on_rank_threads(world, |rank, comm| {
        let device = Default::default();
        let model = model::<B>(1 + rank as u64 * 100, offset);
        let (mut ddp, mut model) = DistributedDataParallel::new(model, Box::new(comm), config.clone()).unwrap();
        let mut opt = sgd::<B, KernelConvNet<B>>();
        let offset: usize = sizes[..rank].iter().sum();
        let weight = (sizes[rank] * world) as f32 / global as f32;
        for step in 0..STEPS {
            let first = step * global + offset;
            let (x, y) = batch::<B>(first..first + sizes[rank], 64, &device);
            let l = loss(&ddp.forward_module(&model), x, y) * weight;
            let grads = ddp.backward(l).unwrap();
            model = opt.step(LR, model, grads);
        }
        state(&model)
    })
}

fn assert_sync_matches_single<B: HookBackend>(sizes: &[usize], tolerance: f32) {
    let want = single::<B>(sizes, 0.0);
    for (rank, got) in ddp::<B>(sizes, true, 0.0).iter().enumerate() {
        let diff = max_abs_diff(got, &want);
        assert!(diff <= tolerance, "shares {sizes:?}, rank {rank}: max |difference| {diff} > {tolerance}");
    }
    // Without the sum each rank normalises its own rows: the same check
    // must then fail, or it proves nothing.
    let apart = max_abs_diff(&ddp::<B>(sizes, false, 0.0)[0], &want);
    assert!(apart > 10.0 * tolerance, "shares {sizes:?}: plain batch norm is only {apart} from one worker");
}

#[test]
fn flex_over_2_and_3_threads_equals_one_worker_on_the_whole_batch() {
    assert_sync_matches_single::<Flex>(&[4, 4], 1e-5);
    assert_sync_matches_single::<Flex>(&[4, 4, 4], 1e-5);
}

#[test]
fn flex_with_uneven_shares_weights_each_rank_by_its_rows() {
    assert_sync_matches_single::<Flex>(&[2, 3, 5], 1e-5);
}

#[test]
fn wgpu_over_2_threads_with_uneven_shares_equals_one_worker() {
    assert_sync_matches_single::<Wgpu>(&[4, 4], 1e-4);
    assert_sync_matches_single::<Wgpu>(&[3, 5], 1e-4);
}

#[test]
fn a_lone_worker_asking_for_it_trains_as_plain_batch_norm() {
    let want = single::<Flex>(&[6], 0.0);
    let diff = max_abs_diff(&ddp::<Flex>(&[6], true, 0.0)[0], &want);
    assert!(diff <= 1e-6, "world 1: max |difference| {diff}");
}

/// Batch norm's input 1000 from zero, its spread about 1: summed raw
/// squares lose the variance in f32 there (they differ from the squared
/// mean in the last digits), so the statistics must be gathered as means
/// and squared deviations. The kernel (Flex) and Burn's tensor operations
/// (NdArray) both; the running mean near 1000 holds its last digits only to
/// about 1e-4, hence the tolerance.
#[test]
fn inputs_far_from_zero_keep_their_variance_on_the_kernel_and_the_tensor_path() {
    fn check<B: HookBackend>(sizes: &[usize]) {
        let want = single::<B>(sizes, 1000.0);
        for (rank, got) in ddp::<B>(sizes, true, 1000.0).iter().enumerate() {
            let diff = max_abs_diff(got, &want);
            assert!(diff <= 1e-3, "shares {sizes:?}, rank {rank}: max |difference| {diff} > 1e-3");
        }
    }
    check::<Flex>(&[4, 4]);
    check::<NdArray>(&[3, 5]);
}

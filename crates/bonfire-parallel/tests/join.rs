//! Uneven inputs (`DdpConfig::uneven_inputs`, `join`): ranks with different
//! numbers of batches finish together, and every rank ends where one worker
//! ends that takes, at each step, the batches of the ranks still training,
//! with their gradients summed and divided by the whole world size.

mod common;

use bonfire_collective::Communicator;
use bonfire_parallel::comm_hook::Metered;
use bonfire_parallel::{settle_buffers, DdpConfig, DistributedDataParallel, HookBackend, Mean, ParallelError};
use bonfire_testkit::{flat_values, max_abs_diff};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use common::*;

type Flex = Autodiff<burn::backend::Flex>;

/// Rows each rank takes a step.
const ROWS: usize = 4;

/// Rank `rank`'s rows at step `step`, apart from every other rank's and step's.
fn rows(step: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let first = (step * world + rank) * ROWS;
    first..first + ROWS
}

/// Parameters, and for the batch norm net its running statistics.
trait State<B: AutodiffBackend>: AutodiffModule<B> + Net<B> + 'static {
    fn state(&self) -> Vec<f32> {
        settle_buffers::<B, Self>(self);
        flat_values::<B, Self>(self)
    }
}

impl<B: AutodiffBackend> State<B> for Mlp<B> {}

impl<B: AutodiffBackend> State<B> for KernelConvNet<B> {
    fn state(&self) -> Vec<f32> {
        settle_buffers::<B, Self>(self);
        let values = |t: Tensor<B, 1>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let mut all = flat_values::<B, Self>(self);
        all.extend(values(self.bn.running_mean.value()));
        all.extend(values(self.bn.running_var.value()));
        all
    }
}

/// One worker: at step t the rows of every rank with more than t batches,
/// as one batch, its mean loss scaled by (ranks training) / `divisor`, which
/// is what summing those ranks' mean losses and dividing by `divisor` gives.
fn single<B: AutodiffBackend, M: State<B>>(model: M, batches: &[usize], divisor: usize, width: usize) -> Vec<f32> {
    let (device, world) = (device_of(&model), batches.len());
    let (mut model, mut opt) = (model, sgd::<B, M>());
    for step in 0..batches.iter().copied().max().unwrap_or(0) {
        let training: Vec<usize> = (0..world).filter(|&r| batches[r] > step).collect();
        let parts: Vec<_> = training.iter().map(|&r| batch::<B>(rows(step, r, world), width, &device)).collect();
        let x = Tensor::cat(parts.iter().map(|p| p.0.clone()).collect(), 0);
        let y = Tensor::cat(parts.into_iter().map(|p| p.1).collect(), 0);
        let l = loss(&model, x, y) * (training.len() as f32 / divisor as f32);
        let grads = GradientsParams::from_grads(l.backward(), &model);
        model = opt.step(LR, model, grads);
    }
    model.state()
}

/// DDP over `batches.len()` threads, rank r training `batches[r]` steps and
/// then joining; `prepare` runs on each strategy before training.
fn ddp<B: HookBackend, M: State<B>>(
    make: impl Fn(&B::Device) -> M + Sync,
    batches: &[usize],
    config: DdpConfig,
    prepare: impl Fn(&mut DistributedDataParallel<B>) + Sync,
    width: usize,
) -> Vec<Result<Vec<f32>, ParallelError>> {
    let world = batches.len();
    on_rank_threads(world, |rank, comm| {
        let device = Default::default();
        let model = seeded::<B, M>(make(&device), 1 + rank as u64 * 100);
        let (mut ddp, mut model) = DistributedDataParallel::new(model, Box::new(comm), config.clone())?;
        prepare(&mut ddp);
        let mut opt = sgd::<B, M>();
        for step in 0..batches[rank] {
            let (x, y) = batch::<B>(rows(step, rank, world), width, &device);
            let grads = ddp.backward(loss(&ddp.forward_module(&model), x, y))?;
            model = opt.step(LR, model, grads);
        }
        Ok(ddp.join(model)?.state())
    })
}

fn uneven() -> DdpConfig {
    DdpConfig { uneven_inputs: true, ..DdpConfig::default() }
}

/// Every rank's result within `tolerance` of `want`.
fn assert_all_near(got: Vec<Result<Vec<f32>, ParallelError>>, want: &[f32], tolerance: f32, what: &str) {
    for (rank, got) in got.into_iter().enumerate() {
        let got = got.unwrap_or_else(|e| panic!("{what}: rank {rank} failed: {e}"));
        let diff = max_abs_diff(&got, want);
        assert!(diff <= tolerance, "{what}: rank {rank} is {diff} from one worker (> {tolerance})");
    }
}

#[test]
fn ranks_with_5_7_and_9_batches_end_where_one_worker_ends() {
    let batches = [5, 7, 9];
    let mlp = |device: &_| Mlp::<Flex>::new(device, 16);
    let want = single::<Flex, _>(seeded(mlp(&Default::default()), 1), &batches, 3, FEATURES);
    let got = ddp::<Flex, _>(mlp, &batches, uneven(), |_| (), FEATURES);
    assert_all_near(got, &want, 1e-5, "host buckets");

    // The division is part of the claim: dividing by the ranks still
    // training instead ends elsewhere, so the check can fail.
    let by_training: Vec<f32> = {
        let (device, world) = (Default::default(), batches.len());
        let (mut model, mut opt) = (seeded(mlp(&device), 1), sgd::<Flex, Mlp<Flex>>());
        for step in 0..9 {
            let training: Vec<usize> = (0..world).filter(|&r| batches[r] > step).collect();
            let parts = training.iter().map(|&r| {
                let (x, y) = batch::<Flex>(rows(step, r, world), FEATURES, &device);
                loss(&model, x, y)
            });
            let l = parts.reduce(|a, b| a + b).unwrap() / training.len() as f32;
            model = opt.step(LR, model.clone(), GradientsParams::from_grads(l.backward(), &model));
        }
        model.state()
    };
    let apart = max_abs_diff(&by_training, &want);
    assert!(apart > 1e-3, "dividing by the ranks training is only {apart} away");
}

#[test]
fn tensor_buckets_and_a_rank_without_a_batch_join_too() {
    let mlp = |device: &_| Mlp::<Flex>::new(device, 16);
    // Tiny buckets: several a step, each shadowed in its place.
    let config = DdpConfig { bucket_cap_bytes: 64, first_bucket_cap_bytes: 64, ..uneven() };
    for batches in [[2, 5, 3], [0, 2, 4]] {
        let want = single::<Flex, _>(seeded(mlp(&Default::default()), 1), &batches, 3, FEATURES);
        // A hook other than the plain mean gets its buckets as tensors.
        let tensors = |ddp: &mut DistributedDataParallel<Flex>| ddp.register_comm_hook(Metered::new(Mean)).unwrap();
        let got = ddp::<Flex, _>(mlp, &batches, config.clone(), tensors, FEATURES);
        assert_all_near(got, &want, 1e-5, &format!("tensor buckets, batches {batches:?}"));
        let got = ddp::<Flex, _>(mlp, &batches, config.clone(), |_| (), FEATURES);
        assert_all_near(got, &want, 1e-5, &format!("host buckets, batches {batches:?}"));
    }
}

#[test]
fn sync_batch_norm_and_buffers_follow_the_ranks_still_training() {
    let batches = [2, 3, 4];
    let net = |device: &_| KernelConvNet::<Flex>::new(device);
    let want = single::<Flex, _>(seeded(net(&Default::default()), 1), &batches, 3, 64);
    // Overlap puts bucket launches between batch norm's backward sums,
    // which the joined ranks must replay in the same order.
    let config = DdpConfig {
        sync_batch_norm: true,
        overlap: Some(true),
        bucket_cap_bytes: 64,
        first_bucket_cap_bytes: 64,
        ..uneven()
    };
    let got = ddp::<Flex, _>(net, &batches, config, |_| (), 64);
    // The buffers come from the highest rank training: rank 0's, stale
    // since it joined, would miss by far more.
    assert_all_near(got, &want, 1e-5, "SyncBatchNorm");
}

#[test]
fn a_rank_without_uneven_inputs_fails_both_with_the_collectives_error() {
    let results: Vec<Result<Vec<f32>, ParallelError>> = on_rank_threads(2, |rank, mut comm| {
        // A rank left alone after the mismatch waits this long for its peer.
        comm.set_timeout(std::time::Duration::from_secs(2));
        let device = Default::default();
        let config = DdpConfig { uneven_inputs: rank == 0, ..DdpConfig::default() };
        let (mut ddp, model) = DistributedDataParallel::new(Mlp::<Flex>::new(&device, 16), Box::new(comm), config)?;
        let (x, y) = batch::<Flex>(rows(0, rank, 2), FEATURES, &device);
        ddp.backward(loss(&ddp.forward_module(&model), x, y))?;
        Ok(model.state())
    });
    for (rank, result) in results.into_iter().enumerate() {
        let e = result.expect_err("the ranks disagree on the step's first collective");
        assert!(e.to_string().contains("rank"), "rank {rank}: the error names no rank: {e}");
    }
}

#[test]
fn join_asks_for_uneven_inputs_and_no_sync_is_refused_with_them() {
    let results = on_rank_threads(2, |rank, comm| {
        let device = Default::default();
        let config = DdpConfig { uneven_inputs: rank == 1, ..DdpConfig::default() };
        let (mut ddp, model) = DistributedDataParallel::new(Mlp::<Flex>::new(&device, 16), Box::new(comm), config)?;
        if rank == 0 {
            return ddp.join(model).map(|_| ());
        }
        // Refused before anything runs, hence no forward_module (whose
        // announcement rank 0 would never answer).
        let (x, y) = batch::<Flex>(rows(0, rank, 2), FEATURES, &device);
        ddp.backward_no_sync(loss(&model, x, y))
    });
    let message = |r: &Result<(), ParallelError>| r.as_ref().expect_err("refused").to_string();
    assert!(message(&results[0]).contains("uneven_inputs"), "{}", message(&results[0]));
    assert!(message(&results[1]).contains("no_sync"), "{}", message(&results[1]));
}

//! DistributedDataParallel must equal one worker on the whole batch.

mod common;

use std::time::Duration;

use bonfire_collective::{
    CommError, Group, InProcCommunicator, ReduceOp, TcpCommunicator, TcpConfig, TensorCollective,
};
use bonfire_parallel::comm_hook::{Bf16Compress, BucketParameter, CommHook, GradBucket, Metered, PowerSgd};
use bonfire_parallel::{DdpConfig, DistributedDataParallel, HookBackend, ParallelError};
use bonfire_testkit::{free_port, max_abs_diff, read_values, scratch_dir, write_values, SelfWorkers};
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::tensor::Tensor;
use common::*;

type Flex = Autodiff<burn::backend::Flex>;
type NdArray = Autodiff<burn::backend::NdArray>;
type Wgpu = Autodiff<burn::backend::Wgpu>;

const PER_RANK: usize = 6;

/// Runs `world` DDP ranks as threads on the default device.
fn ddp_threads<B, M>(
    world: usize,
    make: impl Fn(usize, &B::Device) -> M + Sync,
    config: DdpConfig,
    per_rank: usize,
    micro: usize,
    width: usize,
) -> Vec<Result<Vec<f32>, ParallelError>>
where
    B: HookBackend,
    M: AutodiffModule<B> + Net<B> + 'static,
{
    ddp_threads_on::<B, M>(vec![Default::default(); world], make, config, per_rank, micro, width)
}

fn assert_matches_single<B, M>(world: usize, make: impl Fn(usize, &B::Device) -> M + Sync, width: usize, tol: f32)
where
    B: HookBackend,
    M: AutodiffModule<B> + Net<B> + 'static,
{
    let device = Default::default();
    let want = train_single::<B, M>(seeded::<B, M>(make(0, &device), 1), PER_RANK * world, width);
    for (rank, got) in
        ddp_threads::<B, M>(world, &make, DdpConfig::default(), PER_RANK, 1, width).into_iter().enumerate()
    {
        let diff = max_abs_diff(&got.unwrap(), &want);
        assert!(diff <= tol, "world {world} rank {rank}: max |difference| {diff} > {tol}");
    }
}

#[test]
fn flex_mlp_and_conv_over_2_and_3_threads_equal_one_worker() {
    for world in [2, 3] {
        assert_matches_single::<Flex, _>(world, |_, d| Mlp::new(d, 16), FEATURES, 1e-5);
        assert_matches_single::<Flex, _>(world, |_, d| ConvNet::new(d), 64, 1e-5);
    }
}

/// With batch norm each rank normalises its own rows, so DDP equals one
/// worker that normalises each rank's share apart and averages the losses
/// ([`train_single_ranks_apart`]). The ranks get different rows and start
/// from different weights, so a DDP that skipped the initial broadcast or
/// the gradients' all-reduce would end elsewhere. The model runs on
/// Bonfire's kernels.
#[test]
fn kernel_modules_over_2_and_3_threads_equal_one_worker_normalising_each_share_apart() {
    let device = Default::default();
    for world in [2, 3] {
        let model = seeded::<Flex, _>(KernelConvNet::new(&device), 1);
        let want = train_single_ranks_apart::<Flex>(model, world, PER_RANK, 64);
        let got = ddp_threads::<Flex, _>(world, |_, d| KernelConvNet::new(d), DdpConfig::default(), PER_RANK, 1, 64);
        for (rank, got) in got.into_iter().enumerate() {
            let diff = max_abs_diff(&got.unwrap(), &want);
            assert!(diff <= 1e-5, "world {world} rank {rank}: max |difference| {diff}");
        }
    }
}

#[test]
fn ndarray_conv_over_2_threads_equals_one_worker() {
    assert_matches_single::<NdArray, _>(2, |_, d| ConvNet::new(d), 64, 1e-5);
    assert_matches_single::<NdArray, _>(3, |_, d| Mlp::new(d, 16), FEATURES, 1e-5);
}

#[test]
fn wgpu_mlp_and_conv_over_2_threads_equal_one_worker() {
    assert_matches_single::<Wgpu, _>(2, |_, d| Mlp::new(d, 16), FEATURES, 1e-4);
    assert_matches_single::<Wgpu, _>(2, |_, d| ConvNet::new(d), 64, 1e-4);
}

/// Batch norm's running statistics (buffers): with `broadcast_buffers` every
/// rank ends each step with rank 0's, so that every rank holds the same
/// model; without it each rank keeps those of its own batches.
#[test]
fn broadcast_buffers_gives_every_rank_rank_0s_running_statistics() {
    for broadcast_buffers in [true, false] {
        let config = DdpConfig { broadcast_buffers, ..DdpConfig::default() };
        let ranks: Vec<Vec<f32>> = ddp_threads::<Flex, _>(2, |_, d| KernelConvNet::new(d), config, PER_RANK, 1, 64)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let diff = max_abs_diff(&ranks[0], &ranks[1]);
        if broadcast_buffers {
            assert_eq!(diff, 0.0, "the ranks' models differ with broadcast_buffers");
        } else {
            assert!(diff > 1e-3, "the ranks' running statistics are equal without broadcast_buffers ({diff})");
        }
    }
}

#[test]
fn a_parameter_used_twice_gets_one_whole_gradient() {
    assert_matches_single::<Flex, _>(2, |_, d| Twice::new(d), FEATURES, 1e-5);
}

#[test]
fn tiny_and_default_bucket_caps_give_the_same_parameters() {
    let tiny = DdpConfig { bucket_cap_bytes: 1024, first_bucket_cap_bytes: 1024, ..DdpConfig::default() };
    let small = ddp_threads::<Flex, _>(2, |_, d| ConvNet::new(d), tiny, PER_RANK, 1, 64);
    let large = ddp_threads::<Flex, _>(2, |_, d| ConvNet::new(d), DdpConfig::default(), PER_RANK, 1, 64);
    for (a, b) in small.into_iter().zip(large) {
        let diff = max_abs_diff(&a.unwrap(), &b.unwrap());
        assert!(diff <= 1e-6, "bucket caps changed the result by {diff}");
    }
    // Without overlap, and one bucket per parameter: the same again.
    let late =
        DdpConfig { overlap: Some(false), bucket_cap_bytes: 0, first_bucket_cap_bytes: 0, ..DdpConfig::default() };
    let device = Default::default();
    let want = train_single::<Flex, _>(seeded::<Flex, _>(ConvNet::new(&device), 1), PER_RANK * 2, 64);
    for got in ddp_threads::<Flex, _>(2, |_, d| ConvNet::new(d), late, PER_RANK, 1, 64) {
        assert!(max_abs_diff(&got.unwrap(), &want) <= 1e-5);
    }
}

#[test]
fn no_sync_over_two_micro_steps_equals_one_step_on_their_union() {
    let device = Default::default();
    let want = train_single::<Flex, _>(seeded::<Flex, _>(ConvNet::new(&device), 1), 2 * 8, 64);
    for got in ddp_threads::<Flex, _>(2, |_, d| ConvNet::new(d), DdpConfig::default(), 8, 2, 64) {
        let diff = max_abs_diff(&got.unwrap(), &want);
        assert!(diff <= 1e-5, "no_sync accumulation differs by {diff}");
    }
}

#[test]
fn mismatched_layouts_fail_on_every_rank_naming_the_parameter() {
    let results =
        ddp_threads::<Flex, _>(2, |rank, d| Mlp::new(d, 16 + rank), DdpConfig::default(), PER_RANK, 1, FEATURES);
    for r in results {
        let err = r.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ParallelError::LayoutMismatch(_)), "{msg}");
        assert!(msg.contains("rank 1") && msg.contains("#0") && msg.contains("fc1.weight"), "{msg}");
    }
}

#[test]
fn unused_parameters_are_an_error_unless_allowed() {
    for r in ddp_threads::<Flex, _>(2, |_, d| WithUnused::new(d), DdpConfig::default(), PER_RANK, 1, FEATURES) {
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("unused.weight") && msg.contains("find_unused_parameters"), "{msg}");
    }
    let allow = DdpConfig { find_unused_parameters: true, ..DdpConfig::default() };
    let device = Default::default();
    let want = train_single::<Flex, _>(seeded::<Flex, _>(WithUnused::new(&device), 1), PER_RANK * 2, FEATURES);
    for got in ddp_threads::<Flex, _>(2, |_, d| WithUnused::new(d), allow, PER_RANK, 1, FEATURES) {
        assert!(max_abs_diff(&got.unwrap(), &want) <= 1e-5);
    }
}

#[test]
fn a_loss_not_computed_through_forward_module_is_named() {
    let comms = InProcCommunicator::group(2).unwrap();
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let device = Default::default();
                    let (mut ddp, model) = DistributedDataParallel::new(
                        Mlp::<Flex>::new(&device, 16),
                        Box::new(comm),
                        DdpConfig::default(),
                    )
                    .unwrap();
                    let (x, y) = batch::<Flex>(0..4, FEATURES, &device);
                    // The model itself, not `ddp.forward_module(&model)`.
                    ddp.backward(loss(&model, x, y)).unwrap_err().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for msg in errors {
        assert!(msg.contains("forward_module"), "{msg}");
    }
}

#[test]
fn bf16_compression_stays_within_its_error_bound() {
    // The hook alone: rounding each value to bf16 (relative error 2^-9), the
    // pairwise sum and the scaling (2^-9 each) bound the error by
    // 3 * 2^-9 of the largest magnitude involved.
    let comms = InProcCommunicator::group(2).unwrap();
    let inputs: Vec<Vec<f32>> = (0..2).map(|r| (0..4097).map(|i| uniform(r, i) * 3.0).collect()).collect();
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .zip(inputs.clone())
            .map(|(mut c, v)| {
                s.spawn(move || {
                    let n = v.len();
                    let bucket = burn::tensor::Tensor::<burn::backend::Flex, 1>::from_data(
                        burn::tensor::TensorData::new(v, [n]),
                        &Default::default(),
                    );
                    let bucket = GradBucket { index: 0, buffer: bucket, parameters: Vec::new() };
                    let averaged = Bf16Compress.average(&mut c, bucket).unwrap();
                    averaged.into_data().to_vec::<f32>().unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let bound = 3.0 * 3.0 * 2f32.powi(-9);
    let mut worst = 0f32;
    for i in 0..4097 {
        let exact = (inputs[0][i] + inputs[1][i]) / 2.0;
        for r in &results {
            worst = worst.max((r[i] - exact).abs());
        }
    }
    assert!(worst <= bound, "bf16 error {worst} exceeds {bound}");
    assert!(worst > 0.0, "bf16 compression should not be exact");

    // Whole training: five steps with compressed gradients stay close.
    let device = Default::default();
    let want = train_single::<Flex, _>(seeded::<Flex, _>(ConvNet::new(&device), 1), PER_RANK * 2, 64);
    let bf16 = |_: usize, ddp: &mut DistributedDataParallel<Flex>| ddp.register_comm_hook(Bf16Compress);
    let devices = vec![Default::default(); 2];
    for got in
        ddp_threads_prepared::<Flex, _>(devices, |_, d| ConvNet::new(d), DdpConfig::default(), bf16, PER_RANK, 1, 64)
    {
        let diff = max_abs_diff(&got.unwrap(), &want);
        assert!(diff <= 2e-3, "bf16 training drifted by {diff}");
    }
}

/// A hook as a user writes one: a sum over ranks divided by the world size,
/// noting each bucket it is given.
struct SumThenDivide {
    /// Per call: the bucket's index, its length and its parameters' ranges and shapes.
    seen: std::sync::Arc<std::sync::Mutex<Vec<(usize, usize, Vec<BucketParameter>)>>>,
}

impl<B: burn::tensor::backend::Backend> CommHook<B> for SumThenDivide {
    fn average(
        &mut self,
        comm: &mut dyn TensorCollective<B>,
        bucket: GradBucket<B>,
    ) -> Result<burn::tensor::Tensor<B, 1>, CommError> {
        let len = bucket.buffer.dims()[0];
        self.seen.lock().unwrap().push((bucket.index, len, bucket.parameters));
        let world = comm.world_size() as f64;
        Ok(comm.all_reduce(bucket.buffer, ReduceOp::Sum)?.div_scalar(world))
    }
}

#[test]
fn a_comm_hook_written_by_the_user_averages_every_bucket_in_order() {
    let device = Default::default();
    let want = train_single::<Flex, _>(seeded::<Flex, _>(ConvNet::new(&device), 1), PER_RANK * 2, 64);
    let params = ConvNet::<Flex>::new(&device).num_params();
    let seen: Vec<_> = (0..2).map(|_| std::sync::Arc::new(std::sync::Mutex::new(Vec::new()))).collect();
    let sent: Vec<_> = (0..2).map(|_| std::sync::Mutex::new(None)).collect();
    let hook = |rank: usize, ddp: &mut DistributedDataParallel<Flex>| {
        // Metered counts what the hook hands to collectives.
        let hook = Metered::new(SumThenDivide { seen: seen[rank].clone() });
        *sent[rank].lock().unwrap() = Some(hook.counter());
        ddp.register_comm_hook(hook)
    };
    // Small buckets, so that a step has several.
    let config = DdpConfig { bucket_cap_bytes: 4096, first_bucket_cap_bytes: 1024, ..DdpConfig::default() };
    let devices = vec![Default::default(); 2];
    for got in ddp_threads_prepared::<Flex, _>(devices, |_, d| ConvNet::new(d), config, hook, PER_RANK, 1, 64) {
        let diff = max_abs_diff(&got.unwrap(), &want);
        assert!(diff <= 1e-5, "a sum divided by the world size differs from one worker by {diff}");
    }
    for (rank, seen) in seen.iter().enumerate() {
        let seen = seen.lock().unwrap();
        // A step's calls run from one bucket 0 to the next.
        let buckets = seen.iter().skip(1).position(|(index, ..)| *index == 0).map_or(seen.len(), |p| p + 1);
        assert!(buckets > 1, "rank {rank}: one bucket only; the test wants several");
        assert_eq!(seen.len(), buckets * STEPS, "rank {rank}: one call per bucket per step");
        for (call, (index, len, parameters)) in seen.iter().enumerate() {
            assert_eq!(*index, call % buckets, "rank {rank}: buckets out of order");
            let mut end = 0;
            for p in parameters {
                assert_eq!(p.range.len(), p.shape.iter().product::<usize>(), "rank {rank}: {p:?}");
                assert!(p.range.start >= end && p.range.end <= *len, "rank {rank}: {p:?} overlaps or overruns");
                end = p.range.end;
            }
        }
        let per_step: usize = seen[..buckets].iter().flat_map(|(_, _, ps)| ps.iter().map(|p| p.range.len())).sum();
        assert_eq!(per_step, params, "rank {rank}: the buckets of a step hold every parameter once");
        // One f32 all-reduce of each whole bucket.
        let values: usize = seen.iter().map(|(_, len, _)| len).sum();
        let counted = sent[rank].lock().unwrap().as_ref().unwrap().get();
        assert_eq!(counted, 4 * values as u64, "rank {rank}: Metered's count");
    }
}

#[test]
fn power_sgd_at_full_rank_equals_one_worker_and_at_rank_one_still_learns() {
    let device = Default::default();
    let start = seeded::<Flex, _>(ConvNet::new(&device), 1);
    let want = train_single::<Flex, _>(start.clone(), PER_RANK * 2, 64);
    let devices = || vec![Default::default(); 2];
    // At a rank of every matrix's size, P·Qᵀ is the mean itself.
    let full = |_: usize, ddp: &mut DistributedDataParallel<Flex>| {
        ddp.register_comm_hook(PowerSgd::new(4096).with_min_compression_rate(0.0))
    };
    for got in
        ddp_threads_prepared::<Flex, _>(devices(), |_, d| ConvNet::new(d), DdpConfig::default(), full, PER_RANK, 1, 64)
    {
        let diff = max_abs_diff(&got.unwrap(), &want);
        assert!(diff <= 1e-4, "PowerSGD at full rank differs from one worker by {diff}");
    }
    // At rank 1 the ranks still agree, and the weights move.
    let low = |_: usize, ddp: &mut DistributedDataParallel<Flex>| {
        ddp.register_comm_hook(PowerSgd::new(1).with_min_compression_rate(0.0))
    };
    let got: Vec<Vec<f32>> =
        ddp_threads_prepared::<Flex, _>(devices(), |_, d| ConvNet::new(d), DdpConfig::default(), low, PER_RANK, 1, 64)
            .into_iter()
            .map(Result::unwrap)
            .collect();
    assert_eq!(got[0], got[1], "ranks differ after PowerSGD steps");
    let moved = max_abs_diff(&got[0], &bonfire_testkit::flat_values::<Flex, _>(&start));
    assert!(moved > 1e-4, "rank-1 PowerSGD did not move the weights ({moved})");
}

#[test]
fn a_comm_hook_is_refused_after_the_first_forward_pass_and_a_wrong_length_fails() {
    let device = Default::default();
    let mut comms = InProcCommunicator::group(1).unwrap();
    let model = ConvNet::<Flex>::new(&device);
    let (mut ddp, model) =
        DistributedDataParallel::new(model, Box::new(comms.remove(0)), DdpConfig::default()).unwrap();
    let _ = ddp.forward_module(&model);
    let err = ddp.register_comm_hook(Bf16Compress).unwrap_err();
    assert!(err.to_string().contains("before the first forward pass"), "{err}");

    struct Halves;
    impl<B: burn::tensor::backend::Backend> CommHook<B> for Halves {
        fn average(
            &mut self,
            _: &mut dyn TensorCollective<B>,
            bucket: GradBucket<B>,
        ) -> Result<burn::tensor::Tensor<B, 1>, CommError> {
            let half = bucket.buffer.dims()[0] / 2;
            Ok(bucket.buffer.slice([0..half]))
        }
    }
    let devices = vec![Default::default(); 2];
    let halves = |_: usize, ddp: &mut DistributedDataParallel<Flex>| ddp.register_comm_hook(Halves);
    for got in ddp_threads_prepared::<Flex, _>(devices, |_, d| ConvNet::new(d), DdpConfig::default(), halves, 1, 1, 64)
    {
        let err = got.unwrap_err().to_string();
        assert!(err.contains("comm hook") && err.contains("values for bucket"), "{err}");
    }
}

/// Passes every call on to `inner`, noting the length and element type of
/// each all-reduce: what DDP hands a collective such as NCCL.
struct Recording<C> {
    inner: C,
    all_reduces: std::sync::Arc<std::sync::Mutex<Vec<(usize, burn::tensor::DType)>>>,
}

impl<C: Group> Group for Recording<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
}

impl<B: burn::tensor::backend::Backend, C: TensorCollective<B>> TensorCollective<B> for Recording<C> {
    fn all_reduce(&mut self, t: Tensor<B, 1>, op: ReduceOp) -> bonfire_collective::Result<Tensor<B, 1>> {
        self.all_reduces.lock().unwrap().push((t.dims()[0], t.dtype()));
        self.inner.all_reduce(t, op)
    }
    fn broadcast(&mut self, t: Tensor<B, 1>, root: usize) -> bonfire_collective::Result<Tensor<B, 1>> {
        self.inner.broadcast(t, root)
    }
    fn all_gather(&mut self, t: Tensor<B, 1>) -> bonfire_collective::Result<Tensor<B, 1>> {
        self.inner.all_gather(t)
    }
}

#[test]
fn each_bucket_is_one_f32_tensor_collective_in_bucket_order() {
    // Caps of 1 KiB (256 floats) split the ConvNet (4x1x3x3 + 4 + 64x4 + 4
    // = 300 values) into buckets in reverse parameter order: fc.bias (4) and
    // fc.weight (256) pass the first cap, so fc.weight starts the second.
    let caps = DdpConfig { bucket_cap_bytes: 1024, first_bucket_cap_bytes: 1024, ..DdpConfig::default() };
    let calls: Vec<_> = (0..2).map(|_| std::sync::Arc::new(std::sync::Mutex::new(Vec::new()))).collect();
    let comms = InProcCommunicator::group(2).unwrap();
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(&calls)
            .map(|(inner, all_reduces)| {
                let (caps, all_reduces) = (caps.clone(), all_reduces.clone());
                s.spawn(move || {
                    let device = Default::default();
                    let model = seeded::<Flex, _>(ConvNet::new(&device), 1);
                    let comm = Box::new(Recording { inner, all_reduces });
                    let (mut ddp, model) = DistributedDataParallel::new(model, comm, caps).unwrap();
                    train_ddp(&mut ddp, model, PER_RANK, 1, 64).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Per step: fc.bias; fc.weight; conv.bias and conv.weight, plus the
    // unused-parameter count at the end of the last bucket.
    let per_step = [4, 256, 4 + 36 + 1];
    for calls in &calls {
        let calls = calls.lock().unwrap();
        let lens: Vec<usize> = calls.iter().map(|c| c.0).collect();
        assert_eq!(lens, per_step.repeat(STEPS), "bucket lengths over {STEPS} steps");
        assert!(calls.iter().all(|c| c.1 == burn::tensor::DType::F32));
    }
    let device = Default::default();
    let want = train_single::<Flex, _>(seeded::<Flex, _>(ConvNet::new(&device), 1), PER_RANK * 2, 64);
    for got in results {
        assert!(max_abs_diff(&got, &want) <= 1e-5);
    }
}

// ---- real processes over TCP ----------------------------------------------

/// A worker's role is the file it writes its weights to.
const WORKERS: SelfWorkers = SelfWorkers::new("ddp_worker_process", "BONFIRE_TEST_DDP_WORKER");

#[test]
#[ignore = "run as a worker process by the process tests"]
fn ddp_worker_process() {
    let Some(out) = WORKERS.role() else { return };
    let comm =
        TcpCommunicator::from_env(TcpConfig { timeout: Duration::from_secs(60), ..TcpConfig::default() }).unwrap();
    let rank = comm.rank();
    let device = Default::default();
    let model = seeded::<Flex, _>(ConvNet::new(&device), if rank == 0 { 1 } else { 50 });
    let (mut ddp, model) = DistributedDataParallel::new(model, Box::new(comm), DdpConfig::default()).unwrap();
    write_values(out.as_ref(), &train_ddp(&mut ddp, model, PER_RANK, 1, 64).unwrap());
}

#[test]
fn conv_over_2_and_3_processes_equals_one_worker() {
    let device = Default::default();
    for world in [2usize, 3] {
        let want = train_single::<Flex, _>(seeded::<Flex, _>(ConvNet::new(&device), 1), PER_RANK * world, 64);
        let (port, dir) = (free_port(), scratch_dir(&format!("ddp-{world}")));
        let children: Vec<_> = (0..world)
            .map(|rank| WORKERS.rank(dir.join(format!("rank{rank}")), rank, world, port).spawn().unwrap())
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
        for rank in 0..world {
            let diff = max_abs_diff(&read_values(&dir.join(format!("rank{rank}"))), &want);
            assert!(diff <= 1e-5, "world {world} rank {rank}: {diff}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

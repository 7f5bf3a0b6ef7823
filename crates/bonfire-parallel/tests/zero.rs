//! ZeRO stage 1 (`DistributedDataParallel::shard_optimizer`): Adam stepped
//! shard by shard, each rank keeping state for its shard alone, ends where
//! DDP with the whole optimizer on every rank ends.

mod common;

use bonfire_parallel::{DdpConfig, DistributedDataParallel, HookBackend};
use bonfire_testkit::{flat_values, max_abs_diff};
use burn::backend::Autodiff;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::Backend;
use burn::tensor::{activation::relu, Tensor};
use common::*;

type Flex = Autodiff<burn::backend::Flex>;
type Wgpu = Autodiff<burn::backend::Wgpu>;

const ZERO_STEPS: usize = 20;
const PER_RANK: usize = 6;

/// Five layers of different sizes, so that shards differ in what they hold.
#[derive(Module, Debug)]
struct Deep<B: Backend> {
    layers: Vec<Linear<B>>,
}

impl<B: Backend> Deep<B> {
    fn new(device: &B::Device) -> Self {
        let widths = [FEATURES, 32, 24, 16, 12, CLASSES];
        Deep { layers: widths.windows(2).map(|w| LinearConfig::new(w[0], w[1]).init(device)).collect() }
    }
}

impl<B: Backend> Net<B> for Deep<B> {
    fn logits(&self, mut x: Tensor<B, 2>) -> Tensor<B, 2> {
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = relu(x);
            }
        }
        x
    }
}

/// What one rank ends with.
struct Outcome {
    weights: Vec<f32>,
    /// Parameters the rank's optimizer holds state for.
    states: usize,
    /// Values of the parameters it steps (all of them unsharded).
    stepped: usize,
}

/// DDP over `world` threads with Adam, sharded or whole.
fn train<B: HookBackend>(world: usize, sharded: bool) -> Vec<Outcome> {
    on_rank_threads(world, |rank, comm| {
        let device = Default::default();
        let model = seeded::<B, _>(Deep::<B>::new(&device), 1 + rank as u64);
        let (mut ddp, mut model) = DistributedDataParallel::new(model, Box::new(comm), DdpConfig::default()).unwrap();
        let total = model.num_params();
        let mut sharded_adam = sharded.then(|| ddp.shard_optimizer(AdamConfig::new().init(), &model));
        let mut whole = AdamConfig::new().init::<B, Deep<B>>();
        for step in 0..ZERO_STEPS {
            let first = (step * world + rank) * PER_RANK;
            let (x, y) = batch::<B>(first..first + PER_RANK, FEATURES, &device);
            let grads = ddp.backward(loss(&ddp.forward_module(&model), x, y)).unwrap();
            model = match &mut sharded_adam {
                Some(opt) => opt.step(1e-2, model, grads).unwrap(),
                None => whole.step(1e-2, model, grads),
            };
        }
        let (states, stepped) = match &sharded_adam {
            Some(opt) => (opt.inner().to_record().len(), opt.shard_len()),
            None => (whole.to_record().len(), total),
        };
        Outcome { weights: flat_values::<B, Deep<B>>(&model), states, stepped }
    })
}

fn assert_sharded_matches_whole<B: HookBackend>(world: usize, tolerance: f32) {
    let whole = train::<B>(world, false);
    let sharded = train::<B>(world, true);
    let total = whole[0].stepped;
    for (rank, got) in sharded.iter().enumerate() {
        let diff = max_abs_diff(&got.weights, &whole[0].weights);
        assert!(diff <= tolerance, "world {world} rank {rank}: max |difference| {diff} > {tolerance}");
        // A shard is about 1/world of the values: never more than an even
        // share plus the largest parameter (32x24 = 768 values).
        assert!(got.stepped <= total / world + 768, "world {world} rank {rank}: {} of {total} values", got.stepped);
    }
    // Every parameter has its state on exactly one rank.
    let params = whole[0].states;
    assert_eq!(params, 10, "the whole optimizer holds state for every parameter");
    assert_eq!(sharded.iter().map(|o| o.states).sum::<usize>(), params, "world {world}");
    assert_eq!(sharded.iter().map(|o| o.stepped).sum::<usize>(), total, "world {world}");
    assert!(sharded.iter().all(|o| o.states > 0), "world {world}: a rank without a shard");
}

#[test]
fn flex_adam_sharded_over_2_and_3_threads_ends_where_the_whole_optimizer_does() {
    assert_sharded_matches_whole::<Flex>(2, 1e-6);
    assert_sharded_matches_whole::<Flex>(3, 1e-6);
}

#[test]
fn wgpu_adam_sharded_over_2_threads_ends_where_the_whole_optimizer_does() {
    assert_sharded_matches_whole::<Wgpu>(2, 1e-6);
}

/// Rows each step over all ranks, shared evenly by 2 or 3 ranks.
const GLOBAL: usize = 12;

/// A checkpoint as bytes: the model's record and the whole optimizer's.
struct Checkpoint {
    model: Vec<u8>,
    optimizer: Vec<u8>,
}

/// `steps` steps of Adam under DDP over `world` threads, sharded or whole,
/// from `from` (or seeded weights and fresh Adam); every step takes rows
/// [step * GLOBAL, (step + 1) * GLOBAL), whatever the world size. Returns
/// rank 0's checkpoint and every rank's weights.
fn phase<B: HookBackend>(
    world: usize,
    sharded: bool,
    steps: std::ops::Range<usize>,
    from: Option<&Checkpoint>,
) -> (Checkpoint, Vec<Vec<f32>>) {
    let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
    let results = on_rank_threads(world, |rank, comm| {
        let device = Default::default();
        let (mut model, mut adam) =
            (seeded::<B, _>(Deep::<B>::new(&device), 1), AdamConfig::new().init::<B, Deep<B>>());
        if let Some(c) = from {
            model = model.load_record(Recorder::<B>::load(&recorder, c.model.clone(), &device).unwrap());
            adam = adam.load_record(Recorder::<B>::load(&recorder, c.optimizer.clone(), &device).unwrap());
        }
        let (mut ddp, mut model) = DistributedDataParallel::new(model, Box::new(comm), DdpConfig::default()).unwrap();
        let mut sharded_adam = sharded.then(|| ddp.shard_optimizer(adam.clone(), &model));
        if let Some(opt) = &sharded_adam {
            let whole = from.map_or(0, |_| 10);
            assert!(opt.inner().to_record().len() < whole.max(1), "rank {rank} kept state beyond its shard");
        }
        let share = GLOBAL / world;
        for step in steps.clone() {
            let first = step * GLOBAL + rank * share;
            let (x, y) = batch::<B>(first..first + share, FEATURES, &device);
            let grads = ddp.backward(loss(&ddp.forward_module(&model), x, y)).unwrap();
            model = match &mut sharded_adam {
                Some(opt) => opt.step(1e-2, model, grads).unwrap(),
                None => adam.step(1e-2, model, grads),
            };
        }
        // A collective when sharded: every rank asks for it.
        let record = match &sharded_adam {
            Some(opt) => opt.record().unwrap(),
            None => adam.to_record(),
        };
        assert_eq!(record.len(), 10, "rank {rank}: the whole optimizer's record has every parameter");
        let checkpoint = Checkpoint {
            model: Recorder::<B>::record(&recorder, model.clone().into_record(), ()).unwrap(),
            optimizer: Recorder::<B>::record(&recorder, record, ()).unwrap(),
        };
        (checkpoint, flat_values::<B, Deep<B>>(&model))
    });
    let mut results = results.into_iter();
    let (checkpoint, first) = results.next().unwrap();
    (checkpoint, std::iter::once(first).chain(results.map(|r| r.1)).collect())
}

/// 10 steps in one configuration, a checkpoint, 10 in another: where 20
/// steps of the whole optimizer over 2 ranks end.
fn assert_checkpoint_carries<B: HookBackend>(first: (usize, bool), second: (usize, bool)) {
    let (_, want) = phase::<B>(2, false, 0..20, None);
    let (checkpoint, _) = phase::<B>(first.0, first.1, 0..10, None);
    let (_, got) = phase::<B>(second.0, second.1, 10..20, Some(&checkpoint));
    for (rank, weights) in got.iter().enumerate() {
        let diff = max_abs_diff(weights, &want[0]);
        assert!(diff <= 1e-6, "{first:?} then {second:?}, rank {rank}: max |difference| {diff}");
    }
    // Resuming without the optimizer's state ends elsewhere.
    let (mut bare, _) = phase::<B>(first.0, first.1, 0..10, None);
    bare.optimizer = Recorder::<B>::record(
        &NamedMpkBytesRecorder::<FullPrecisionSettings>::default(),
        AdamConfig::new().init::<B, Deep<B>>().to_record(),
        (),
    )
    .unwrap();
    let (_, fresh) = phase::<B>(second.0, second.1, 10..20, Some(&bare));
    assert!(max_abs_diff(&fresh[0], &want[0]) > 1e-4, "the optimizer's state made no difference");
}

#[test]
fn a_sharded_checkpoint_resumes_whole_and_sharded_over_other_world_sizes() {
    // Sharded over 3, then whole over 2; whole over 2, then sharded over 3;
    // sharded over 2, then sharded over 3.
    assert_checkpoint_carries::<Flex>((3, true), (2, false));
    assert_checkpoint_carries::<Flex>((2, false), (3, true));
    assert_checkpoint_carries::<Flex>((2, true), (3, true));
}

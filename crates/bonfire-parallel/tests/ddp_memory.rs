//! DDP's memory after warm-up: nothing a step makes is kept. This is a leak
//! bound on the whole process; that a bucket's memory is reused from step to
//! step is checked where the buckets are stored (the unit tests of
//! `host_bucket.rs` and `tensor_bucket.rs`). A test binary of its own, so that
//! no other test's allocations share the process whose resident memory it reads.

mod common;

use bonfire_collective::InProcCommunicator;
use bonfire_parallel::{DdpConfig, DistributedDataParallel};
use burn::backend::Autodiff;
use burn::optim::Optimizer;
use common::*;

type Flex = Autodiff<burn::backend::Flex>;

/// Resident memory of this process, in bytes.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

/// 50 DDP steps after warm-up leave resident memory within 32 MiB of where
/// it was, ten times less than the gradients those steps reduce (3 MiB a
/// step), so no step's gradients or buckets are kept.
#[test]
fn resident_memory_does_not_grow_over_50_steps() {
    let comms = InProcCommunicator::group(2).unwrap();
    let growth: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let device = Default::default();
                    let model = seeded::<Flex, _>(Mlp::new(&device, 65_536), 1);
                    let (mut ddp, mut model) =
                        DistributedDataParallel::new(model, Box::new(comm), DdpConfig::default()).unwrap();
                    let mut opt = sgd::<Flex, Mlp<Flex>>();
                    let mut before = 0;
                    for step in 0..60 {
                        if step == 10 {
                            before = resident_bytes();
                        }
                        let (x, y) = batch::<Flex>(0..8, FEATURES, &device);
                        let grads = ddp.backward(loss(&ddp.forward_module(&model), x, y)).unwrap();
                        model = opt.step(1e-4, model, grads);
                    }
                    resident_bytes().saturating_sub(before)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let worst = growth.into_iter().max().unwrap();
    assert!(worst < 32 << 20, "resident memory grew by {} MiB over 50 steps", worst >> 20);
}

//! Collectives on Burn tensors through the host ([`TensorCollective`] of a
//! host-memory communicator): two in-process workers per backend, each with
//! its own tensor; the result must come back with the right length, element
//! type and device.

use bonfire_collective::{Group, InProcCommunicator, ReduceOp, TensorCollective};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

fn rank_tensor<B: Backend>(rank: usize, device: &B::Device) -> Tensor<B, 1> {
    let values: Vec<f32> = (0..24).map(|i| (rank * 100 + i) as f32 * 0.5).collect();
    Tensor::from_data(TensorData::new(values, [24]), device)
}

fn check_backend<B: Backend>(device: B::Device) {
    let world = 2;
    let comms = InProcCommunicator::group(world).unwrap();
    let results: Vec<[Tensor<B, 1>; 3]> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let device = device.clone();
                s.spawn(move || {
                    let rank = comm.rank();
                    let mut comm: Box<dyn TensorCollective<B>> = Box::new(comm);
                    let mine = rank_tensor::<B>(rank, &device);
                    let summed = comm.all_reduce(mine.clone(), ReduceOp::Sum).unwrap();
                    let from_one = comm.broadcast(mine.clone(), 1).unwrap();
                    let gathered = comm.all_gather(mine).unwrap();
                    [summed, from_one, gathered]
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let want_sum: Vec<f32> = (0..24).map(|i| (i as f32 * 0.5) + ((100 + i) as f32 * 0.5)).collect();
    let want_bcast = rank_tensor::<B>(1, &device).into_data();
    let mut want_gather = rank_tensor::<B>(0, &device).into_data().to_vec::<f32>().unwrap();
    want_gather.extend(rank_tensor::<B>(1, &device).into_data().to_vec::<f32>().unwrap());
    for [summed, from_one, gathered] in results {
        assert_eq!(summed.device(), device);
        let data = summed.into_data();
        assert_eq!(data.dtype, burn::tensor::DType::F32);
        assert_eq!(data.to_vec::<f32>().unwrap(), want_sum);
        assert_eq!(from_one.into_data(), want_bcast);
        assert_eq!(gathered.into_data().to_vec::<f32>().unwrap(), want_gather);
    }
}

#[test]
fn flex() {
    check_backend::<burn::backend::Flex>(Default::default());
}

#[test]
fn ndarray() {
    check_backend::<burn::backend::NdArray>(Default::default());
}

#[test]
fn wgpu() {
    check_backend::<burn::backend::Wgpu>(Default::default());
}

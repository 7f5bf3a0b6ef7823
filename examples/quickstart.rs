//! The README's example: DDP over two worker threads with a Burn model.
use bonfire::prelude::*;
use burn::backend::{Autodiff, Flex};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{Optimizer, SgdConfig};
use burn::tensor::Tensor;

type B = Autodiff<Flex>;

fn worker(comm: InProcCommunicator) -> Result<(), ParallelError> {
    let device = Default::default();
    let model: Linear<B> = LinearConfig::new(4, 1).init(&device);
    // Every rank starts from rank 0's weights.
    let (mut ddp, mut model) = DistributedDataParallel::new(model, Box::new(comm), DdpConfig::default())?;
    let mut optimizer = SgdConfig::new().init();
    for _ in 0..10 {
        let x = Tensor::<B, 2>::ones([8, 4], &device); // this worker's share of the batch
        let loss = ddp.forward_module(&model).forward(x).powi_scalar(2).mean();
        let grads = ddp.backward(loss)?; // averaged over the workers
        model = optimizer.step(0.1, model, grads);
    }
    Ok(())
}

fn main() {
    // Threads here; processes join with TcpCommunicator::from_env instead.
    let comms = InProcCommunicator::group(2).expect("a group of two");
    std::thread::scope(|s| {
        let workers: Vec<_> = comms.into_iter().map(|comm| s.spawn(move || worker(comm))).collect();
        workers.into_iter().for_each(|w| w.join().expect("a worker panicked").expect("a worker failed"));
    });
    println!("2 workers trained 10 steps");
}

//! DataParallel: one process, several devices of one backend. The batch is
//! scattered along dimension 0, the module replicated on every device, the
//! replicas run in parallel threads, the outputs gathered on the first
//! device, and after backward the replicas' gradients are summed back onto
//! the original module's parameters.
//!
//! Every move between devices goes through [`crate::device_move`], so DP
//! runs over distinct devices of backends that cannot copy between them
//! (wgpu). Each replica owns its buffers: Burn's clones of a module share
//! their batch-norm statistics in one place, which cannot be on two devices
//! at once, so a replica is rebuilt from the module's values
//! (`from_inner(valid())`, new statistics objects) and the replicas'
//! statistics are folded back into the module after the forward pass.

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Bool, Int, Tensor};

use crate::device_move::{move_differentiable, to_device, MoveBackend};
use crate::error::{ParallelError, Result};

/// DataParallel: one process splits each batch over replicas of the model on its devices, and sums their gradients into the module; see the module documentation.
pub struct DataParallel<B: MoveBackend> {
    devices: Vec<B::Device>,
}

/// The per-device copies of the module made by one [`DataParallel::forward`];
/// hand them to [`DataParallel::backward`].
pub struct Replicas<M> {
    modules: Vec<M>,
}

impl<B: MoveBackend> DataParallel<B> {
    /// The first device gathers the outputs. A device may appear more than
    /// once (replicas then share it, each in its own thread).
    pub fn new(devices: Vec<B::Device>) -> Result<Self> {
        if devices.is_empty() {
            return Err(ParallelError::Invalid("DataParallel needs at least one device".into()));
        }
        Ok(DataParallel { devices })
    }

    /// The devices the replicas live on, the module's first.
    pub fn devices(&self) -> &[B::Device] {
        &self.devices
    }

    /// Runs `forward` on every device's share of `input` (split along
    /// dimension 0 into parts that differ by at most one row) and returns the
    /// outputs concatenated on the first device, still differentiable.
    pub fn forward<M, F, const DI: usize, const DO: usize>(
        &self,
        module: &M,
        input: Tensor<B, DI>,
        forward: F,
    ) -> Result<(Tensor<B, DO>, Replicas<M>)>
    where
        M: AutodiffModule<B>,
        F: Fn(&M, Tensor<B, DI>) -> Tensor<B, DO> + Sync,
    {
        let n = self.devices.len();
        let batch = input.dims()[0];
        if batch < n {
            return Err(ParallelError::Invalid(format!(
                "a batch of {batch} cannot be split over {n} devices; use at least one sample per device"
            )));
        }
        let mut start = 0;
        let shares: Vec<(M, Tensor<B, DI>)> = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, device)| {
                let len = batch / n + usize::from(i < batch % n);
                let chunk = move_differentiable(input.clone().narrow(0, start, len), device);
                start += len;
                (replicate(module, device), chunk)
            })
            .collect();
        let forward = &forward;
        let results: Vec<(M, Tensor<B, DO>)> = std::thread::scope(|s| {
            let handles: Vec<_> = shares
                .into_iter()
                .map(|(replica, chunk)| {
                    s.spawn(move || {
                        let device = chunk.device();
                        let out = forward(&replica, chunk);
                        // Run what this thread queued before it ends: Burn
                        // 0.21's fusion mishandles the operations a finished
                        // thread leaves queued (DP with batch norm on fused
                        // wgpu then differed from run to run).
                        let _ = B::sync(&device);
                        (replica, out)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("a replica's forward pass panicked")).collect()
        });
        let (modules, outputs): (Vec<M>, Vec<Tensor<B, DO>>) = results.into_iter().unzip();
        // The statistics' mean, as one module updated from every replica's
        // thread would hold it.
        crate::buffers::average_into::<B, M>(module, &modules);
        let gathered = Tensor::cat(outputs.into_iter().map(|o| move_differentiable(o, &self.devices[0])).collect(), 0);
        Ok((gathered, Replicas { modules }))
    }

    /// Runs `loss.backward()` and sums every replica's gradients onto the
    /// device of the corresponding parameter of `module`.
    pub fn backward<M: AutodiffModule<B>>(
        &self,
        loss: Tensor<B, 1>,
        module: &M,
        replicas: Replicas<M>,
    ) -> Result<GradientsParams> {
        let mut grads = loss.backward();
        let per_replica: Vec<GradientsParams> =
            replicas.modules.iter().map(|r| GradientsParams::from_module(&mut grads, r)).collect();
        let mut sum = SumOnto::<B> { per_replica, out: GradientsParams::new(), _b: Default::default() };
        module.visit(&mut sum);
        Ok(sum.out)
    }
}

/// `module` on `device`, sharing nothing with it: parameters are new leaves
/// (gradients come back by parameter id), buffers new objects.
fn replicate<B: MoveBackend, M: AutodiffModule<B>>(module: &M, device: &B::Device) -> M {
    M::from_inner(module.valid()).map(&mut MoveTo::<B> { device })
}

/// Moves every tensor of a module to one device, keeping which ones require
/// a gradient.
struct MoveTo<'a, B: AutodiffBackend> {
    device: &'a B::Device,
}

impl<B: AutodiffBackend> ModuleMapper<B> for MoveTo<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|tensor| {
            if tensor.device() == *self.device {
                return tensor;
            }
            let require_grad = tensor.is_require_grad();
            let moved = to_device(tensor.detach(), self.device);
            if require_grad {
                moved.require_grad()
            } else {
                moved
            }
        })
    }

    fn map_int<const D: usize>(&mut self, param: Param<Tensor<B, D, Int>>) -> Param<Tensor<B, D, Int>> {
        param.map(|tensor| to_device(tensor, self.device))
    }

    fn map_bool<const D: usize>(&mut self, param: Param<Tensor<B, D, Bool>>) -> Param<Tensor<B, D, Bool>> {
        param.map(|tensor| to_device(tensor, self.device))
    }
}

struct SumOnto<B: AutodiffBackend> {
    per_replica: Vec<GradientsParams>,
    out: GradientsParams,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SumOnto<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let device = param.val().device();
        let total = self
            .per_replica
            .iter_mut()
            .filter_map(|g| g.remove::<B::InnerBackend, D>(param.id))
            .map(|g| to_device(g, &device))
            .reduce(|a, b| a + b);
        if let Some(total) = total {
            self.out.register::<B::InnerBackend, D>(param.id, total);
        }
    }
}

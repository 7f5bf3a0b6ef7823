//! DistributedDataParallel: one replica per worker, gradients averaged in
//! buckets while the backward pass is still running.

use std::sync::Arc;

use bonfire_collective::Communicator;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use crate::bucket::BucketPlan;
use crate::comm_hook::{self, CommHook};
use crate::comm_thread::CommThread;
use crate::error::{ParallelError, Result};
use crate::hook::{GradientSink, HookBackend};
use crate::params::{param_infos, values_from_host, values_to_host, ParamInfo};
use crate::reducer::Reducer;

/// Options of [`DistributedDataParallel`]; the defaults are PyTorch's.
#[derive(Debug, Clone)]
pub struct DdpConfig {
    /// Cap of every bucket but the first, in bytes of f32 gradients.
    pub bucket_cap_bytes: usize,
    /// Cap of the first bucket, small so that communication starts early.
    pub first_bucket_cap_bytes: usize,
    /// Tolerate parameters that get no gradient in a step (their gradient
    /// counts as zero); without it such a step is an error on every rank.
    pub find_unused_parameters: bool,
    /// All-reduce buckets while backward runs (true), or only after it.
    pub overlap: bool,
    /// How a bucket is averaged: [`comm_hook::mean`] or [`comm_hook::bf16_compress`].
    pub comm_hook: CommHook,
}

impl Default for DdpConfig {
    fn default() -> Self {
        DdpConfig {
            bucket_cap_bytes: 25 << 20,
            first_bucket_cap_bytes: 1 << 20,
            find_unused_parameters: false,
            overlap: true,
            comm_hook: comm_hook::mean,
        }
    }
}

/// Builds a parameter's gradient tensor from its averaged values.
type Registrar = Box<dyn Fn(&[f32], &mut GradientsParams) + Send + Sync>;

/// Data-parallel training over the ranks of a [`Communicator`].
///
/// ```ignore
/// let (mut ddp, mut model) = DistributedDataParallel::new(model, comm, DdpConfig::default())?;
/// for batch in my_shard {
///     let loss = loss_of(ddp.forward_module(&model), batch);
///     let grads = ddp.backward(loss)?; // averaged over all ranks
///     model = optimizer.step(lr, model, grads);
/// }
/// ```
pub struct DistributedDataParallel<B: HookBackend> {
    reducer: Arc<Reducer<B::InnerBackend>>,
    infos: Vec<ParamInfo>,
    registrars: Vec<Registrar>,
}

impl<B: HookBackend> DistributedDataParallel<B> {
    /// Checks that every rank's `module` has the same parameters (count,
    /// shapes, order), then gives every rank rank 0's values. Returns the
    /// strategy and the module to train.
    pub fn new<M: AutodiffModule<B>>(module: M, comm: Box<dyn Communicator>, config: DdpConfig) -> Result<(Self, M)> {
        let infos = param_infos::<B, M>(&module);
        let comm = CommThread::start(comm);
        check_layout(&comm, &infos)?;
        let mut values = values_to_host::<B, M>(&module);
        values = comm.call(move |c| c.broadcast(values.as_mut_slice().into(), 0).map(|()| values))?;
        let module = values_from_host::<B, M>(module, &values);

        let numels: Vec<Option<usize>> = infos.iter().map(|p| p.trainable.then(|| p.numel())).collect();
        let plan = BucketPlan::new(&numels, config.first_bucket_cap_bytes, config.bucket_cap_bytes);
        tracing::debug!("DDP: {} parameters in {} buckets of {:?} values", infos.len(), plan.lens.len(), plan.lens);
        let names = infos.iter().map(|p| p.name.clone()).collect();
        let reducer = Reducer::new(plan, names, comm, config.comm_hook, config.overlap, config.find_unused_parameters);
        let registrars = registrars::<B, M>(&module);
        Ok((DistributedDataParallel { reducer: Arc::new(reducer), infos, registrars }, module))
    }

    pub fn rank(&self) -> usize {
        self.reducer.comm().rank()
    }

    pub fn world_size(&self) -> usize {
        self.reducer.comm().world_size()
    }

    /// The module's parameters, in the order the layout check compares them.
    pub fn params(&self) -> &[ParamInfo] {
        &self.infos
    }

    /// The module to run the forward pass with: `module` with a gradient hook
    /// on every trainable parameter. Gradients still land on `module`'s
    /// parameters, so the optimizer steps `module` itself.
    pub fn forward_module<M: AutodiffModule<B>>(&self, module: &M) -> M {
        let sink: Arc<dyn GradientSink<B::InnerBackend>> = self.reducer.clone();
        module.clone().map(&mut Hooker::<B> { sink, index: 0, _b: Default::default() })
    }

    /// Runs `loss.backward()` with bucketed all-reduces overlapping it and
    /// returns the gradients averaged over all ranks (plus whatever earlier
    /// [`backward_no_sync`](Self::backward_no_sync) calls accumulated).
    pub fn backward(&mut self, loss: Tensor<B, 1>) -> Result<GradientsParams> {
        self.reducer.begin(true);
        drop(loss.backward());
        self.reducer.finish(|plan, buckets| {
            let mut grads = GradientsParams::new();
            for (index, slot) in plan.slots.iter().enumerate() {
                if let Some((bucket, range)) = slot {
                    (self.registrars[index])(&buckets[*bucket][range.clone()], &mut grads);
                }
            }
            grads
        })
    }

    /// Runs `loss.backward()` and keeps the gradients for the next
    /// [`backward`](Self::backward), without any communication (gradient
    /// accumulation). Scale each micro-batch loss as the accumulated sum
    /// requires (for example by 1 / micro-steps for a mean).
    pub fn backward_no_sync(&mut self, loss: Tensor<B, 1>) -> Result<()> {
        self.reducer.begin(false);
        drop(loss.backward());
        Ok(())
    }
}

/// Puts the gradient hook on every trainable parameter.
struct Hooker<B: HookBackend> {
    sink: Arc<dyn GradientSink<B::InnerBackend>>,
    index: usize,
    _b: std::marker::PhantomData<B>,
}

impl<B: HookBackend> ModuleMapper<B> for Hooker<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let index = self.index;
        self.index += 1;
        let sink = self.sink.clone();
        param.map(|tensor| {
            if !tensor.is_require_grad() {
                return tensor;
            }
            let hooked = B::gradient_hook(tensor.into_primitive().tensor(), sink, index);
            Tensor::from_primitive(TensorPrimitive::Float(hooked))
        })
    }
}

fn registrars<B: HookBackend, M: AutodiffModule<B>>(module: &M) -> Vec<Registrar> {
    struct Make<B: HookBackend>(Vec<Registrar>, std::marker::PhantomData<B>);
    impl<B: HookBackend> ModuleVisitor<B> for Make<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let id: ParamId = param.id;
            let value = param.val();
            let (device, shape, dtype): (_, [usize; D], DType) = (value.device(), value.dims(), value.dtype());
            self.0.push(Box::new(move |values: &[f32], grads: &mut GradientsParams| {
                let data = TensorData::new(values.to_vec(), shape).convert_dtype(dtype);
                grads.register::<B::InnerBackend, D>(id, Tensor::from_data(data, &device));
            }));
        }
    }
    let mut make = Make::<B>(Vec::new(), Default::default());
    module.visit(&mut make);
    make.0
}

/// Every rank compares its parameter layout with rank 0's, and all ranks
/// learn the first difference any rank found, so that all fail together.
fn check_layout(comm: &CommThread, infos: &[ParamInfo]) -> Result<()> {
    // Counts and dimensions are exact in f32 up to 2^24.
    let ours = encode_layout(infos);
    let (theirs, firsts) = comm.call(move |c| -> Result<(Vec<f32>, Vec<f32>)> {
        let mut len = [ours.len() as f32];
        c.broadcast(len.as_mut_slice().into(), 0)?;
        let mut theirs = vec![0f32; len[0] as usize];
        if c.rank() == 0 {
            theirs.copy_from_slice(&ours);
        }
        c.broadcast(theirs.as_mut_slice().into(), 0)?;
        let first = first_difference(&ours, &theirs).map_or(f32::MAX, |i| i as f32);
        let mut firsts = vec![0f32; c.world_size()];
        c.all_gather([first].as_slice().into(), firsts.as_mut_slice().into())?;
        Ok((theirs, firsts))
    })?;
    let Some((rank, index)) = firsts
        .iter()
        .enumerate()
        .filter(|(_, &f)| f != f32::MAX)
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(r, &f)| (r, f as usize))
    else {
        return Ok(());
    };
    let here = match infos.get(index) {
        Some(p) => format!("here parameter #{index} is `{}` with shape {:?}", p.name, p.shape),
        None => format!("this rank has only {} parameters", infos.len()),
    };
    let rank0 = describe(&theirs, index);
    Err(ParallelError::LayoutMismatch(format!(
        "rank {rank} differs from rank 0 first at parameter #{index}; {here}; rank 0 has {rank0}"
    )))
}

/// `[count, (ndims, dims...) per parameter]`.
fn encode_layout(infos: &[ParamInfo]) -> Vec<f32> {
    let mut out = vec![infos.len() as f32];
    for p in infos {
        out.push(p.shape.len() as f32);
        out.extend(p.shape.iter().map(|&d| d as f32));
    }
    out
}

/// Index of the first parameter whose encoded shape differs (or the shorter count).
fn first_difference(a: &[f32], b: &[f32]) -> Option<usize> {
    let (mut i, mut j, mut index) = (1usize, 1usize, 0usize);
    let count = |v: &[f32]| v.first().copied().unwrap_or(0.0) as usize;
    loop {
        let (left, right) = (index < count(a), index < count(b));
        if !left && !right {
            return None;
        }
        if left != right {
            return Some(index);
        }
        let (na, nb) = (a[i] as usize, b[j] as usize);
        if a[i..=i + na] != b[j..=j + nb] {
            return Some(index);
        }
        i += na + 1;
        j += nb + 1;
        index += 1;
    }
}

fn describe(encoded: &[f32], index: usize) -> String {
    let mut i = 1;
    for k in 0..encoded.first().copied().unwrap_or(0.0) as usize {
        let n = encoded[i] as usize;
        if k == index {
            let dims: Vec<usize> = encoded[i + 1..=i + n].iter().map(|&d| d as usize).collect();
            return format!("shape {dims:?} there");
        }
        i += n + 1;
    }
    format!("only {} parameters", encoded.first().copied().unwrap_or(0.0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(shape: &[usize]) -> ParamInfo {
        ParamInfo { name: String::new(), id: ParamId::new(), shape: shape.to_vec(), trainable: true }
    }

    #[test]
    fn first_difference_finds_shapes_ranks_and_counts() {
        let a = encode_layout(&[info(&[2, 3]), info(&[3])]);
        assert_eq!(first_difference(&a, &a), None);
        assert_eq!(first_difference(&a, &encode_layout(&[info(&[2, 3]), info(&[4])])), Some(1));
        assert_eq!(first_difference(&a, &encode_layout(&[info(&[6]), info(&[3])])), Some(0));
        assert_eq!(first_difference(&a, &encode_layout(&[info(&[2, 3])])), Some(1));
        assert_eq!(first_difference(&a, &encode_layout(&[info(&[2, 3]), info(&[3]), info(&[1])])), Some(2));
        assert_eq!(describe(&a, 1), "shape [3] there");
        assert_eq!(describe(&a, 5), "only 2 parameters");
    }
}

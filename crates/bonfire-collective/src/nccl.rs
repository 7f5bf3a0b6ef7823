//! NCCL between processes, directly on burn-cuda tensor memory.
//!
//! Ranks meet at the same rendezvous as the TCP ring ([`Rendezvous`]); rank 0
//! creates the NCCL unique id and passes it to the others through the store.
//! Each collective reads and writes the device memory of Burn's tensors
//! through cubecl's resource API: no host copy.
//!
//! Burn's CUDA backend is fused (`Fusion<CubeBackend<..>>`, Burn's default):
//! a call first runs the fused operations that produce its input and takes
//! the device memory under it (`resolve_tensor_float`, as Burn's own ops do),
//! and hands its output back to fusion as a new tensor.
//!
//! Ordering with Burn's kernels: cubecl 0.10 exposes neither the CUDA streams
//! its kernels run on nor events on them, so the order is kept from the host,
//! on the thread that makes the call (DDP's communication thread), never on
//! the thread that trains:
//! 1. taking the input's memory (`get_resource`) makes this thread's cubecl
//!    stream wait, on the device, for the stream that wrote it; waiting for
//!    this thread's stream (`Backend::sync`, a fence, not the whole device)
//!    then means every kernel that wrote the input has run;
//! 2. the collective runs on this communicator's own CUDA stream;
//! 3. the call waits for that stream before returning the output tensor, so
//!    no kernel queued afterwards can read it early, and the input stays
//!    alive (held by this function) until NCCL has read it.
//!
//! NCCL itself has no timeout: a call whose peers never come blocks inside
//! the GPU. Step 3 therefore polls the stream and, past the timeout, aborts
//! the communicator (`ncclCommAbort`), which makes the call return; the
//! communicator is unusable afterwards, as after any failure. Nor does NCCL
//! say which rank it waits for: each rank's [`Heartbeat`] publishes its
//! progress in the store, and past the stall interval names the ranks behind.

use std::time::{Duration, Instant};

use burn::backend::cuda::CudaDevice;
use burn::backend::ir::{BackendIr, InitOperationIr, OperationIr, OperationOutput};
use burn::backend::Cuda as CudaBackend;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorMetadata, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::OperationStreams;
use burn_fusion::{get_client, NoOp};
use cudarc::driver::{result as cu, sys as cu_sys};
use cudarc::nccl::{result as nccl, sys as nccl_sys};

use crate::communicator::{Group, DEFAULT_STALL_WARNING};
use crate::element::ReduceOp;
use crate::env::DistEnv;
use crate::error::{CommError, Result};
use crate::heartbeat::Heartbeat;
use crate::rendezvous::Rendezvous;
use crate::tensor::TensorCollective;

/// Burn's CUDA backend with f32 floats, as `bonfire` trains with it: fused.
type Cuda = CudaBackend<f32>;
/// The backend under the fusion, whose tensors are device memory.
type CudaCube = CubeBackend<CudaRuntime, f32, i32, u8>;
/// Device memory of a CUDA tensor.
type DeviceTensor = CubeTensor<CudaRuntime>;

/// A 1-D float tensor on a CUDA device.
pub type CudaTensor = Tensor<Cuda, 1>;

/// One rank of an NCCL group; see [`NcclCommunicator::connect`].
pub struct NcclCommunicator {
    rank: usize,
    world: usize,
    device: CudaDevice,
    context: cu_sys::CUcontext,
    comm: nccl_sys::ncclComm_t,
    stream: cu_sys::CUstream,
    timeout: Duration,
    failed: Option<String>,
    /// Publishes this rank's progress, and names the ranks behind a stall.
    heartbeat: Heartbeat,
    /// Rank 0 hosts the rendezvous store for as long as the group lives.
    _rendezvous: Rendezvous,
}

// SAFETY: the raw handles are used only through `&mut self`, one call at a
// time, and each call makes the context current on the calling thread.
unsafe impl Send for NcclCommunicator {}

impl NcclCommunicator {
    /// Whether the NCCL and CUDA driver libraries can be loaded (nothing is called).
    pub fn libraries_present() -> std::result::Result<(), String> {
        // SAFETY: both only try to dlopen their library.
        if !unsafe { cu_sys::is_culib_present() } {
            return Err("the NVIDIA driver library (libcuda.so) was not found".into());
        }
        if !unsafe { nccl_sys::is_culib_present() } {
            return Err("libnccl.so.2 was not found (install NCCL, for example the Python package \
                        nvidia-nccl-cu13, and add its lib folder to LD_LIBRARY_PATH)"
                .into());
        }
        Ok(())
    }

    /// Joins the group of `env` on `device`. Every rank must use a distinct
    /// GPU: NCCL refuses two ranks on one device.
    pub fn connect(env: &DistEnv, device: &CudaDevice, timeout: Duration) -> Result<Self> {
        Self::libraries_present().map_err(CommError::Unavailable)?;
        let deadline = Instant::now() + timeout;
        let mut rendezvous = Rendezvous::join(env, deadline, timeout)?;
        let id = if env.rank == 0 {
            let id = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            rendezvous.store.set("nccl/id", &bytes)?;
            id
        } else {
            let bytes = rendezvous
                .store
                .get("nccl/id", crate::rendezvous::remaining(deadline))?
                .ok_or(CommError::Timeout { op: "NCCL rendezvous", rank: 0, waited: timeout })?;
            let mut id = nccl_sys::ncclUniqueId { internal: [0; 128] };
            if bytes.len() != id.internal.len() {
                return Err(CommError::Protocol { peer: env.store_addr(), detail: "a malformed NCCL id".into() });
            }
            for (dst, src) in id.internal.iter_mut().zip(bytes) {
                *dst = src as _;
            }
            id
        };
        let context = primary_context(device.index)?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(device_error("stream"))?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by ncclCommInitRank on success; the id
        // is the group's, and rank < world was checked by DistEnv.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), env.world_size as i32, id, env.rank as i32)
                .map_err(|e| nccl_error("ncclCommInitRank", e))?;
            comm.assume_init()
        };
        let beat_store = rendezvous.connect(env, crate::rendezvous::remaining(deadline))?;
        let heartbeat = Heartbeat::start(beat_store, env.rank, env.world_size, DEFAULT_STALL_WARNING);
        Ok(NcclCommunicator {
            rank: env.rank,
            world: env.world_size,
            device: device.clone(),
            context,
            comm,
            stream,
            timeout,
            failed: None,
            heartbeat,
            _rendezvous: rendezvous,
        })
    }

    /// Runs one collective from `input` into `output`, or in place where
    /// `output` is `None` (see the module comment for the ordering), `count`
    /// being the input's length.
    fn run(
        &mut self,
        op: &'static str,
        input: DeviceTensor,
        output: Option<DeviceTensor>,
        call: impl FnOnce(
            *const std::ffi::c_void,
            *mut std::ffi::c_void,
            usize,
            nccl_sys::ncclDataType_t,
            nccl_sys::ncclComm_t,
            nccl_sys::cudaStream_t,
        ) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<DeviceTensor> {
        if let Some(why) = &self.failed {
            return Err(CommError::Aborted(why.clone()));
        }
        let _in_call = self.heartbeat.enter(op);
        let dtype = match input.dtype() {
            DType::F32 => nccl_sys::ncclDataType_t::ncclFloat32,
            DType::F16 => nccl_sys::ncclDataType_t::ncclFloat16,
            DType::BF16 => nccl_sys::ncclDataType_t::ncclBfloat16,
            other => return Err(CommError::invalid(op, format!("{other:?} tensors are not supported"))),
        };
        let count = input.shape()[0];
        if !input.is_contiguous() {
            return Err(CommError::invalid(op, "the tensor is not contiguous"));
        }
        // 1. This thread's stream waits for the ones that wrote the buffers;
        // then this thread waits for its stream.
        let resource = |t: &DeviceTensor| t.client.get_resource(t.handle.clone()).map_err(device_error(op));
        let src = resource(&input)?;
        let dst = output.as_ref().map(resource).transpose()?;
        <CudaCube as Backend>::sync(&self.device).map_err(device_error(op))?;
        let dst_ptr = dst.as_ref().unwrap_or(&src).resource().ptr;
        // SAFETY: the primary context retained in `connect`.
        unsafe { cu::ctx::set_current(self.context) }.map_err(device_error("set the CUDA context"))?;
        // 2. The collective, on this communicator's stream.
        let launched =
            call(src.resource().ptr as *const _, dst_ptr as *mut _, count, dtype, self.comm, self.stream as _);
        // 3. Wait for it (bounded by the timeout), before anything reads the output.
        let result = launched.map_err(|e| nccl_error(op, e)).and_then(|_| self.wait(op));
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result?;
        drop((src, dst));
        Ok(output.unwrap_or(input))
    }

    /// An empty tensor of `len` values of `dtype` on this communicator's GPU.
    fn empty(&self, len: usize, dtype: DType) -> DeviceTensor {
        device_tensor(CudaTensor::empty([len], &self.device).cast(dtype))
    }

    /// Waits for this communicator's stream; past the timeout, aborts NCCL.
    fn wait(&mut self, op: &'static str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: a valid stream of the current context.
            match unsafe { cu_sys::cuStreamQuery(self.stream) } {
                cu_sys::CUresult::CUDA_SUCCESS => return Ok(()),
                cu_sys::CUresult::CUDA_ERROR_NOT_READY if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(50))
                }
                cu_sys::CUresult::CUDA_ERROR_NOT_READY => {
                    // SAFETY: the communicator is live; after abort it is never used again.
                    let _ = unsafe { nccl::comm_abort(self.comm) };
                    return Err(CommError::Device {
                        op,
                        detail: format!("no answer from the other ranks within {:?}; NCCL aborted", self.timeout),
                    });
                }
                other => return Err(CommError::Device { op, detail: format!("the CUDA stream failed: {other:?}") }),
            }
        }
    }
}

impl Group for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }
}

impl TensorCollective<Cuda> for NcclCommunicator {
    fn all_reduce(&mut self, tensor: CudaTensor, op: ReduceOp) -> Result<CudaTensor> {
        // In place (NCCL allows the output to be the input) where nothing
        // else holds the tensor, as DDP's bucket: no memory is allocated.
        let input = device_tensor(tensor.to_device(&self.device));
        let out = (!input.can_mut()).then(|| self.empty(input.shape()[0], input.dtype()));
        // A mean is a sum divided on the device afterwards, as PyTorch's DDP
        // does: ncclAvg once left a bucket's tail wrong on cubecl's buffers
        // (docs/cuda.md), and `bonfire nccl-check` checks every reduction on
        // an odd size.
        let nccl_op = match op {
            ReduceOp::Sum | ReduceOp::Mean => nccl_sys::ncclRedOp_t::ncclSum,
            ReduceOp::Max => nccl_sys::ncclRedOp_t::ncclMax,
            ReduceOp::Min => nccl_sys::ncclRedOp_t::ncclMin,
        };
        let sum = self.run("all_reduce", input, out, |src, dst, count, dtype, comm, stream| {
            // SAFETY: src and dst are live device buffers of `count` elements.
            unsafe { nccl::all_reduce(src, dst, count, dtype, nccl_op, comm, stream) }
        })?;
        let sum = fused_tensor(sum);
        Ok(match op {
            ReduceOp::Mean if self.world > 1 => sum.div_scalar(self.world as f32),
            _ => sum,
        })
    }

    fn broadcast(&mut self, tensor: CudaTensor, root: usize) -> Result<CudaTensor> {
        if root >= self.world {
            return Err(CommError::invalid("broadcast", format!("root {root} is not a rank of {}", self.world)));
        }
        let input = device_tensor(tensor.to_device(&self.device));
        let out = self.empty(input.shape()[0], input.dtype());
        let out = self.run("broadcast", input, Some(out), |src, dst, count, dtype, comm, stream| {
            // SAFETY: as in all_reduce.
            unsafe { nccl::broadcast(src, dst, count, dtype, root as i32, comm, stream) }
        })?;
        Ok(fused_tensor(out))
    }

    fn all_gather(&mut self, tensor: CudaTensor) -> Result<CudaTensor> {
        let input = device_tensor(tensor.to_device(&self.device));
        let out = self.empty(input.shape()[0] * self.world, input.dtype());
        let out = self.run("all_gather", input, Some(out), |src, dst, count, dtype, comm, stream| {
            // SAFETY: dst holds world * count elements.
            unsafe { nccl::all_gather(src, dst, count, dtype, comm, stream) }
        })?;
        Ok(fused_tensor(out))
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        if self.failed.is_none() {
            // SAFETY: the communicator is live and no call is in flight.
            let _ = unsafe { nccl::comm_destroy(self.comm) };
        }
    }
}

/// The device memory under a fused tensor, once the fused operations that
/// produce it have run (as Burn's own ops take it).
fn device_tensor(t: CudaTensor) -> DeviceTensor {
    let fused = t.into_primitive().tensor();
    fused.client.clone().resolve_tensor_float::<CudaCube>(fused)
}

/// Device memory handed back to fusion as a tensor (as Burn's `from_data` does).
fn fused_tensor(t: DeviceTensor) -> CudaTensor {
    let client = get_client::<CudaCube>(&t.device);
    let (shape, dtype) = (t.shape(), t.dtype);
    let handle = <CudaCube as BackendIr>::float_tensor_handle(t);
    let init = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    let fused = client.register(OperationStreams::default(), OperationIr::Init(init), NoOp::<CudaCube>::new()).output();
    Tensor::from_primitive(TensorPrimitive::Float(fused))
}

/// The device's primary context, the one cubecl-cuda runs Burn's kernels in.
fn primary_context(index: usize) -> Result<cu_sys::CUcontext> {
    cu::init().map_err(device_error("cuInit"))?;
    let device = cu::device::get(index as i32).map_err(device_error("cuDeviceGet"))?;
    // SAFETY: a valid device; the primary context is retained for the process's life.
    let context = unsafe { cu::primary_ctx::retain(device) }.map_err(device_error("retain the context"))?;
    // SAFETY: the context just retained.
    unsafe { cu::ctx::set_current(context) }.map_err(device_error("set the CUDA context"))?;
    Ok(context)
}

/// A failed CUDA or cubecl call `op`, as an error.
fn device_error<E: std::fmt::Debug>(op: &'static str) -> impl Fn(E) -> CommError {
    move |e| CommError::Device { op, detail: format!("{e:?}") }
}

fn nccl_error(op: &'static str, e: nccl::NcclError) -> CommError {
    CommError::Device { op, detail: format!("NCCL: {e:?}") }
}

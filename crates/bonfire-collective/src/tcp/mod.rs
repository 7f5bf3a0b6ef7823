//! Workers in separate processes, on one host or many, joined by a TCP ring.

mod header;
mod pipeline;
mod plan;
#[cfg(target_os = "linux")]
mod shm;
#[cfg(test)]
mod tests;
mod transport;
mod wiring;

use std::time::{Duration, Instant};

use crate::call::Kind;
use crate::communicator::{check_blocks, Capabilities, Communicator, Group, DEFAULT_STALL_WARNING, DEFAULT_TIMEOUT};
use crate::element::{with_pair, with_slice, BufMut, BufRef, DType, Element, ReduceOp};
use crate::env::DistEnv;
use crate::error::{CommError, Result};
use crate::rendezvous::Rendezvous;
use header::{exchange_header, Header};
use pipeline::{Link, Watch};
use plan::Phases;

/// Tuning of the TCP ring.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// How long a call (and the rendezvous) waits for a peer.
    pub timeout: Duration,
    /// Bytes per pipelined chunk: large enough that a chunk's fixed costs
    /// vanish, small enough that the reduction and the network overlap.
    pub chunk_bytes: usize,
    /// `SO_SNDBUF`/`SO_RCVBUF` of the ring sockets.
    pub socket_buffer: usize,
    /// After this long without word from a peer, a call logs a stall warning
    /// naming the peer and the call (the timeout still applies).
    pub stall_warning: Duration,
    /// Whether neighbours on one host pass bytes through shared memory
    /// (a buffer of `socket_buffer` bytes each way, Linux only) instead of
    /// the sockets.
    pub shared_memory: bool,
}

impl TcpConfig {
    /// How often a waiting read wakes to check the stall warning and timeout.
    fn poll_tick(&self) -> Duration {
        self.stall_warning.min(self.timeout).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            timeout: DEFAULT_TIMEOUT,
            chunk_bytes: 1 << 20,
            socket_buffer: 4 << 20,
            stall_warning: DEFAULT_STALL_WARNING,
            shared_memory: true,
        }
    }
}

/// One worker of a TCP ring; see [`TcpCommunicator::connect`].
pub struct TcpCommunicator {
    rank: usize,
    world: usize,
    config: TcpConfig,
    /// `None` for a group of one.
    link: Option<Link>,
    scratch: Vec<u64>,
    /// Numbers calls, so that ranks that fell out of step are caught.
    seq: u64,
    failed: Option<String>,
    /// Rank 0 hosts the rendezvous store (and its token file) for as long
    /// as the group lives.
    _rendezvous: Rendezvous,
}

impl TcpCommunicator {
    /// Joins the group described by torchrun's environment variables.
    pub fn from_env(config: TcpConfig) -> Result<Self> {
        Self::connect(&DistEnv::from_env()?, config)
    }

    /// Joins the group: rank 0 starts the rendezvous store at
    /// `MASTER_ADDR:MASTER_PORT`, every rank publishes the address of its ring
    /// listener there, connects to the next rank and accepts the previous one.
    /// Ranks that do not arrive within the timeout are named in the error.
    pub fn connect(env: &DistEnv, config: TcpConfig) -> Result<Self> {
        let (rank, world) = (env.rank, env.world_size);
        let timeout = config.timeout;
        let deadline = Instant::now() + timeout;
        let mut rendezvous = Rendezvous::join(env, deadline, timeout)?;
        if world == 1 {
            return Ok(Self::assemble(rank, world, config, None, rendezvous));
        }

        let link = wiring::form_ring(env, rendezvous.store.as_mut(), &rendezvous.token, &config, deadline)?;
        let mut comm = Self::assemble(rank, world, config, Some(link), rendezvous);
        comm.apply_timeout()?;
        // Everyone is connected only when everyone has seen everyone's data.
        comm.barrier()?;
        Ok(comm)
    }

    fn assemble(rank: usize, world: usize, config: TcpConfig, link: Option<Link>, rendezvous: Rendezvous) -> Self {
        TcpCommunicator {
            rank,
            world,
            config,
            link,
            scratch: Vec::new(),
            seq: 0,
            failed: None,
            _rendezvous: rendezvous,
        }
    }

    fn apply_timeout(&self) -> Result<()> {
        if let Some(link) = &self.link {
            let (tick, timeout) = (self.config.poll_tick(), self.config.timeout);
            link.transport.set_timeouts(tick, timeout).map_err(|e| CommError::io("ring transport", e))?;
        }
        Ok(())
    }

    /// Checks that this rank and the previous one make the same call, then
    /// runs `plan` on the buffer that lies in `segments`. Any failure leaves
    /// the communicator aborted.
    fn collective<T: Element>(
        &mut self,
        name: &'static str,
        header: Header,
        segments: &mut [&mut [T]],
        plan: plan::Plan,
        op: ReduceOp,
    ) -> Result<()> {
        if let Some(why) = &self.failed {
            return Err(CommError::Aborted(why.clone()));
        }
        let Some(link) = &self.link else { return Ok(()) };
        let header = Header { seq: self.seq, ..header };
        let watch = Watch {
            op: name,
            seq: self.seq,
            rank: self.rank,
            timeout: self.config.timeout,
            stall_warning: self.config.stall_warning,
        };
        self.seq += 1;
        let result = exchange_header(&watch, link, header).and_then(|()| {
            pipeline::run(&watch, link, segments, &plan, op, 1.0 / self.world as f32, &mut self.scratch)
        });
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    fn chunk_elems<T>(&self) -> usize {
        (self.config.chunk_bytes / std::mem::size_of::<T>()).max(1)
    }

    fn all_reduce_typed<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_in_place(Kind::AllReduce, &mut [buf], op)
    }

    /// The ring over a buffer that lies in `segments` (one, or a bucket's
    /// gradients): each chunk is sent from and received into the segments
    /// it spans, so nothing is packed.
    fn all_reduce_in_place<T: Element>(&mut self, kind: Kind, segments: &mut [&mut [T]], op: ReduceOp) -> Result<()> {
        let len = segments.iter().map(|s| s.len()).sum();
        let plan = plan::ring(len, self.world, self.rank, self.chunk_elems::<T>(), Phases::Both);
        let header = Header::new(kind, T::DTYPE, Some(op), 0, len);
        self.collective("all_reduce", header, segments, plan, op)
    }

    fn broadcast_typed<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(CommError::invalid(
                "broadcast",
                format!("root {root} is not a rank of a group of {}", self.world),
            ));
        }
        let plan = plan::chain(buf.len(), self.world, self.rank, root, self.chunk_elems::<T>());
        let header = Header::new(Kind::Broadcast, T::DTYPE, None, root, buf.len());
        self.collective("broadcast", header, &mut [buf], plan, ReduceOp::Sum)
    }

    fn all_gather_typed<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        check_blocks("all_gather", self.world, output.len(), input.len())?;
        let block = input.len();
        output[self.rank * block..(self.rank + 1) * block].copy_from_slice(input);
        let plan = plan::ring(output.len(), self.world, self.rank, self.chunk_elems::<T>(), Phases::AllGather);
        let header = Header::new(Kind::AllGather, T::DTYPE, None, 0, output.len());
        self.collective("all_gather", header, &mut [output], plan, ReduceOp::Sum)
    }

    fn reduce_scatter_typed<T: Element>(&mut self, input: &[T], output: &mut [T], op: ReduceOp) -> Result<()> {
        check_blocks("reduce_scatter", self.world, input.len(), output.len())?;
        // The ring reduces in place; work on a copy so that `input` stays as it was.
        let mut work = input.to_vec();
        let plan = plan::ring(work.len(), self.world, self.rank, self.chunk_elems::<T>(), Phases::ReduceScatter);
        let header = Header::new(Kind::ReduceScatter, T::DTYPE, Some(op), 0, work.len());
        self.collective("reduce_scatter", header, &mut [&mut work[..]], plan, op)?;
        let block = output.len();
        output.copy_from_slice(&work[self.rank * block..(self.rank + 1) * block]);
        Ok(())
    }
}

impl Group for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }
}

impl Communicator for TcpCommunicator {
    fn timeout(&self) -> Duration {
        self.config.timeout
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.config.timeout = timeout;
        if let Err(e) = self.apply_timeout() {
            self.failed = Some(e.to_string());
        }
    }

    fn all_reduce(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<()> {
        with_slice!(buf, BufMut, |s| self.all_reduce_typed(s, op))
    }

    fn all_reduce_segments(&mut self, segments: &mut [&mut [f32]], op: ReduceOp) -> Result<()> {
        self.all_reduce_in_place(Kind::AllReduceSegments, segments, op)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { host_memory: true, reduces_segments_in_place: true, ranks_are_threads: false }
    }

    fn broadcast(&mut self, buf: BufMut<'_>, root: usize) -> Result<()> {
        with_slice!(buf, BufMut, |s| self.broadcast_typed(s, root))
    }

    fn all_gather(&mut self, input: BufRef<'_>, output: BufMut<'_>) -> Result<()> {
        with_pair!("all_gather", input, output, |i, o| self.all_gather_typed(i, o))
    }

    fn reduce_scatter(&mut self, input: BufRef<'_>, output: BufMut<'_>, op: ReduceOp) -> Result<()> {
        with_pair!("reduce_scatter", input, output, |i, o| self.reduce_scatter_typed(i, o, op))
    }

    /// An all-reduce of one value per rank: every rank's result depends on
    /// every rank having arrived.
    fn barrier(&mut self) -> Result<()> {
        let mut token = vec![0f32; self.world];
        let plan = plan::ring(token.len(), self.world, self.rank, self.chunk_elems::<f32>(), Phases::Both);
        let header = Header::new(Kind::Barrier, DType::F32, None, 0, token.len());
        self.collective("barrier", header, &mut [&mut token[..]], plan, ReduceOp::Sum)
    }
}

//! Workers in separate processes, on one host or many, joined by a TCP ring.
//! Where every rank runs on one host, all-reduces read the peers' memory
//! directly instead (`direct.rs`), and the ring carries only the calls'
//! headers and barriers.

mod direct;
mod header;
mod pipeline;
mod plan;
#[cfg(test)]
mod tests;
mod wiring;

use std::time::{Duration, Instant};

use crate::call::Kind;
use crate::communicator::{check_blocks, packed, Communicator, Group, DEFAULT_STALL_WARNING, DEFAULT_TIMEOUT};
use crate::element::{with_pair, with_slice, BufMut, BufRef, DType, Element, ReduceOp};
use crate::env::DistEnv;
use crate::error::{CommError, Result};
use crate::rendezvous::{remaining, Rendezvous};
use crate::store::{StoreClient, StoreServer};
use direct::{DirectReads, Peer};
use header::{exchange_header, Header};
use pipeline::{Link, Watch};
use plan::Phases;

/// Tuning of the TCP ring.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// How long a call (and the rendezvous) waits for a peer.
    pub timeout: Duration,
    /// Bytes per pipelined chunk. 1 MiB measured best at 25 and 100 MiB on
    /// loopback (256 KiB and 512 KiB were within noise, 64 KiB clearly slower).
    pub chunk_bytes: usize,
    /// `SO_SNDBUF`/`SO_RCVBUF` of the ring sockets.
    pub socket_buffer: usize,
    /// After this long without word from a peer, a call logs a stall warning
    /// naming the peer and the call (the timeout still applies).
    pub stall_warning: Duration,
    /// Where every rank runs on one host (and the kernel lets them),
    /// all-reduce by reading the peers' memory directly instead of through
    /// the sockets.
    pub read_peer_memory: bool,
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
            read_peer_memory: true,
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
    /// Where the group all-reduces by reading the peers' memory.
    direct: Option<DirectReads>,
    /// Rank 0 hosts the rendezvous store for as long as the group lives.
    _store: Option<StoreServer>,
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
        let Rendezvous { mut store, server: store_server } = Rendezvous::join(env, deadline, timeout)?;
        if world == 1 {
            return Ok(Self::assemble(rank, world, config, None, store_server));
        }

        let link = wiring::form_ring(env, &mut store, &config, deadline)?;
        let mut comm = Self::assemble(rank, world, config, Some(link), store_server);
        comm.apply_timeout()?;
        // Everyone is connected only when everyone has seen everyone's data.
        comm.barrier()?;
        if comm.config.read_peer_memory {
            comm.meet_peers_memory(&mut store, deadline)?;
        }
        Ok(comm)
    }

    fn assemble(rank: usize, world: usize, config: TcpConfig, link: Option<Link>, store: Option<StoreServer>) -> Self {
        TcpCommunicator {
            rank,
            world,
            config,
            link,
            scratch: Vec::new(),
            seq: 0,
            failed: None,
            direct: None,
            _store: store,
        }
    }

    /// Whether all-reduces read the peers' memory directly (every rank on
    /// one host).
    pub fn reads_peer_memory(&self) -> bool {
        self.direct.is_some()
    }

    /// Sets up direct reads if every rank can read every other's memory
    /// (see `direct.rs`): each rank publishes its process id, where its
    /// header lies and the random value it holds; one agreement over the
    /// ring says whether every rank read every other's.
    fn meet_peers_memory(&mut self, store: &mut StoreClient, deadline: Instant) -> Result<()> {
        use std::hash::{BuildHasher, Hasher};
        let check = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let mut direct = DirectReads::new(self.rank, check);
        let mine = format!("{} {} {check}", std::process::id(), direct.header_address());
        store.set(&format!("direct/{}", self.rank), mine.as_bytes())?;
        let mut peers = Vec::with_capacity(self.world);
        for rank in 0..self.world {
            if rank == self.rank {
                peers.push(None);
                continue;
            }
            let published = store.get(&format!("direct/{rank}"), remaining(deadline))?;
            let peer = published.and_then(|v| String::from_utf8(v).ok()).and_then(|s| {
                let mut fields = s.split(' ').map(|f| f.parse::<u64>().ok());
                Some(Peer {
                    pid: i32::try_from(fields.next()??).ok()?,
                    header: fields.next()??,
                    check: fields.next()??,
                })
            });
            peers.push(Some(peer));
        }
        // A peer whose entry cannot be read makes direct reads impossible.
        let readable = peers.iter().all(|p| !matches!(p, Some(None)));
        let ok = readable && direct.meet(peers.into_iter().map(Option::flatten).collect());
        if self.agree("peer memory", ok)? {
            self.direct = Some(direct);
        }
        Ok(())
    }

    /// A barrier that says whether every rank passed `ok = true`.
    fn agree(&mut self, name: &'static str, ok: bool) -> Result<bool> {
        let mut verdict = false;
        let header = Header::new(Kind::Barrier, DType::F32, None, 0, self.world);
        let (world, rank) = (self.world, self.rank);
        self.collective(name, header, |watch, link, _, _| {
            verdict = ring_agree(watch, link, world, rank, ok)?;
            Ok(())
        })?;
        Ok(verdict)
    }

    fn apply_timeout(&self) -> Result<()> {
        if let Some(link) = &self.link {
            let tick = Some(self.config.poll_tick());
            link.prev.set_read_timeout(tick).map_err(|e| CommError::io("ring socket", e))?;
            link.next.set_write_timeout(Some(self.config.timeout)).map_err(|e| CommError::io("ring socket", e))?;
        }
        Ok(())
    }

    /// Checks that this rank and the previous one make the same call, then
    /// moves the data with `data` (given the link, the scratch memory and the
    /// direct reads, where the group has them). Any failure leaves the communicator aborted.
    fn collective(
        &mut self,
        name: &'static str,
        header: Header,
        data: impl FnOnce(&Watch, &Link, &mut Vec<u64>, &mut Option<DirectReads>) -> Result<()>,
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
        let result = exchange_header(&watch, link, header)
            .and_then(|()| data(&watch, link, &mut self.scratch, &mut self.direct));
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    /// Runs `plan` on `buf` around the ring, as the call `name`.
    fn on_ring<T: Element>(
        &mut self,
        name: &'static str,
        header: Header,
        buf: &mut [T],
        plan: plan::Plan,
        op: ReduceOp,
    ) -> Result<()> {
        let scale = 1.0 / self.world as f32;
        self.collective(name, header, |watch, link, scratch, _| {
            pipeline::run(watch, link, buf, &plan, op, scale, scratch)
        })
    }

    /// All-reduces `segments` (one buffer in pieces): by reading the peers'
    /// memory where the group can, else around the ring (packing the pieces).
    fn all_reduce_in_segments<T: Element>(
        &mut self,
        kind: Kind,
        segments: &mut [&mut [T]],
        op: ReduceOp,
    ) -> Result<()> {
        let total = segments.iter().map(|s| s.len()).sum();
        let header = Header::new(kind, T::DTYPE, Some(op), 0, total);
        let (world, rank, chunk) = (self.world, self.rank, self.chunk_elems::<T>());
        self.collective("all_reduce", header, |watch, link, scratch, direct| {
            if let Some(direct) = direct {
                return direct.all_reduce(segments, op, || ring_agree(watch, link, world, rank, true).map(|_| ()));
            }
            let plan = plan::ring(total, world, rank, chunk, Phases::Both);
            packed(segments, |buf| pipeline::run(watch, link, buf, &plan, op, 1.0 / world as f32, scratch))
        })
    }

    fn chunk_elems<T>(&self) -> usize {
        (self.config.chunk_bytes / std::mem::size_of::<T>()).max(1)
    }

    fn all_reduce_typed<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_in_segments(Kind::AllReduce, &mut [buf], op)
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
        self.on_ring("broadcast", header, buf, plan, ReduceOp::Sum)
    }

    fn all_gather_typed<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        check_blocks("all_gather", self.world, output.len(), input.len())?;
        let block = input.len();
        output[self.rank * block..(self.rank + 1) * block].copy_from_slice(input);
        let plan = plan::ring(output.len(), self.world, self.rank, self.chunk_elems::<T>(), Phases::AllGather);
        let header = Header::new(Kind::AllGather, T::DTYPE, None, 0, output.len());
        self.on_ring("all_gather", header, output, plan, ReduceOp::Sum)
    }

    fn reduce_scatter_typed<T: Element>(&mut self, input: &[T], output: &mut [T], op: ReduceOp) -> Result<()> {
        check_blocks("reduce_scatter", self.world, input.len(), output.len())?;
        // The ring reduces in place; work on a copy so that `input` stays as it was.
        let mut work = input.to_vec();
        let plan = plan::ring(work.len(), self.world, self.rank, self.chunk_elems::<T>(), Phases::ReduceScatter);
        let header = Header::new(Kind::ReduceScatter, T::DTYPE, Some(op), 0, work.len());
        self.on_ring("reduce_scatter", header, &mut work, plan, op)?;
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
        self.all_reduce_in_segments(Kind::AllReduceSegments, segments, op)
    }

    /// Reading the peers' memory works on the pieces where they lie; the
    /// ring packs them itself.
    fn reduces_segments_in_place(&self) -> bool {
        self.direct.is_some()
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
        self.on_ring("barrier", header, &mut token, plan, ReduceOp::Sum)
    }
}

/// A barrier over the ring that also tells whether every rank passed
/// `ok = true`: an all-reduce of one flag per rank, without a header of its
/// own (it runs inside a call whose header the ranks have exchanged).
fn ring_agree(watch: &Watch, link: &Link, world: usize, rank: usize, ok: bool) -> Result<bool> {
    let mut flags = vec![0f32; world];
    flags[rank] = f32::from(u8::from(ok));
    let plan = plan::ring(world, world, rank, world, Phases::Both);
    pipeline::run(watch, link, &mut flags, &plan, ReduceOp::Sum, 1.0, &mut Vec::new())?;
    Ok(flags.iter().sum::<f32>() == world as f32)
}

//! Workers in separate processes, on one host or many, joined by a TCP ring.

mod pipeline;
mod plan;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};

use crate::call::{Call, Kind};
use crate::communicator::{check_blocks, Communicator, Group, DEFAULT_STALL_WARNING, DEFAULT_TIMEOUT};
use crate::element::{with_pair, with_slice, BufMut, BufRef, DType, Element, ReduceOp};
use crate::env::DistEnv;
use crate::error::{CommError, Result};
use crate::rendezvous::{remaining, Rendezvous};
use crate::store::StoreServer;
use pipeline::{io_error, Link, Watch};
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
    /// Rank 0 hosts the rendezvous store for as long as the group lives.
    _store: Option<StoreServer>,
}

const HELLO: u32 = u32::from_le_bytes(*b"BFRH");
const CALL: u32 = u32::from_le_bytes(*b"BFRC");

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

        let listener = listen(SocketAddr::new(store.local_ip()?, 0), config.socket_buffer)?;
        let my_addr = listener.local_addr().map_err(|e| CommError::io("ring listener address", e))?;
        store.set(&format!("ring/{rank}"), my_addr.to_string().as_bytes())?;
        let keys: Vec<String> = (0..world).map(|r| format!("ring/{r}")).collect();
        let missing = store.wait(&keys, remaining(deadline))?;
        if !missing.is_empty() {
            // Every rank that came must read this verdict before rank 0 takes
            // the store down with it: each says it has, and rank 0 waits for
            // them (at most one more timeout: their deadlines differ from
            // rank 0's only by how much later they started).
            let _ = store.set(&format!("ring/seen/{rank}"), b"");
            if rank == 0 {
                let came: Vec<String> =
                    (0..world).filter(|r| !missing.contains(r)).map(|r| format!("ring/seen/{r}")).collect();
                let _ = store.wait(&came, timeout);
            }
            return Err(CommError::Missing { op: "rendezvous", ranks: missing, waited: timeout });
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next_addr = store
            .get(&keys[next_rank], remaining(deadline))?
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.parse::<SocketAddr>().ok())
            .ok_or_else(|| CommError::Protocol {
                peer: env.store_addr(),
                detail: format!("no valid ring address for rank {next_rank}"),
            })?;

        let next = dial(next_addr, config.socket_buffer, deadline, next_rank, timeout)?;
        let mut hello = Vec::with_capacity(16 + env.job_token.len());
        for v in [HELLO, rank as u32, world as u32, env.job_token.len() as u32] {
            hello.extend(v.to_le_bytes());
        }
        hello.extend(env.job_token.as_bytes());
        (&next).write_all(&hello).map_err(|e| io_error("rendezvous", next_rank, timeout, e))?;
        let prev = accept_prev(&listener, prev_rank, world, env.job_token.as_bytes(), deadline, timeout)?;
        let link = Link { next, prev, next_rank, prev_rank };
        let mut comm = Self::assemble(rank, world, config, Some(link), store_server);
        comm.apply_timeout()?;
        // Everyone is connected only when everyone has seen everyone's data.
        comm.barrier()?;
        Ok(comm)
    }

    fn assemble(rank: usize, world: usize, config: TcpConfig, link: Option<Link>, store: Option<StoreServer>) -> Self {
        TcpCommunicator { rank, world, config, link, scratch: Vec::new(), seq: 0, failed: None, _store: store }
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
    /// runs `plan` on `buf`. Any failure leaves the communicator aborted.
    fn collective<T: Element>(
        &mut self,
        name: &'static str,
        header: Header,
        buf: &mut [T],
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
        let result = exchange_header(&watch, link, header)
            .and_then(|()| pipeline::run(&watch, link, buf, &plan, op, 1.0 / self.world as f32, &mut self.scratch));
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    fn chunk_elems<T>(&self) -> usize {
        (self.config.chunk_bytes / std::mem::size_of::<T>()).max(1)
    }

    fn all_reduce_typed<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let plan = plan::ring(buf.len(), self.world, self.rank, self.chunk_elems::<T>(), Phases::Both);
        let header = Header::new(Kind::AllReduce, T::DTYPE, Some(op), 0, buf.len());
        self.collective("all_reduce", header, buf, plan, op)
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
        self.collective("broadcast", header, buf, plan, ReduceOp::Sum)
    }

    fn all_gather_typed<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        check_blocks("all_gather", self.world, output.len(), input.len())?;
        let block = input.len();
        output[self.rank * block..(self.rank + 1) * block].copy_from_slice(input);
        let plan = plan::ring(output.len(), self.world, self.rank, self.chunk_elems::<T>(), Phases::AllGather);
        let header = Header::new(Kind::AllGather, T::DTYPE, None, 0, output.len());
        self.collective("all_gather", header, output, plan, ReduceOp::Sum)
    }

    fn reduce_scatter_typed<T: Element>(&mut self, input: &[T], output: &mut [T], op: ReduceOp) -> Result<()> {
        check_blocks("reduce_scatter", self.world, input.len(), output.len())?;
        // The ring reduces in place; work on a copy so that `input` stays as it was.
        let mut work = input.to_vec();
        let plan = plan::ring(work.len(), self.world, self.rank, self.chunk_elems::<T>(), Phases::ReduceScatter);
        let header = Header::new(Kind::ReduceScatter, T::DTYPE, Some(op), 0, work.len());
        self.collective("reduce_scatter", header, &mut work, plan, op)?;
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
        self.collective("barrier", header, &mut token, plan, ReduceOp::Sum)
    }
}

/// Sent to the next rank before every call's data: the call and its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    call: Call,
    seq: u64,
}

impl Header {
    const BYTES: usize = 4 + 6 * 8;

    fn new(kind: Kind, dtype: DType, op: Option<ReduceOp>, root: usize, len: usize) -> Self {
        Header { call: Call::new(kind, Some(dtype), op, root, len), seq: 0 }
    }

    fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[0..4].copy_from_slice(&CALL.to_le_bytes());
        let words = self.call.to_words().into_iter().chain([self.seq]);
        for (i, w) in words.enumerate() {
            out[4 + 8 * i..12 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    fn decode(b: &[u8; Self::BYTES]) -> Option<Self> {
        let word = |i: usize| u64::from_le_bytes(b[4 + 8 * i..12 + 8 * i].try_into().unwrap());
        if b[0..4] != CALL.to_le_bytes() {
            return None;
        }
        Some(Header { call: Call::from_words(std::array::from_fn(word))?, seq: word(5) })
    }

    /// What the previous rank's call does differently, in words.
    fn difference(&self, theirs: &Header) -> Option<String> {
        if theirs.seq != self.seq {
            return Some(format!("it is at call number {}, this rank at {}", theirs.seq, self.seq));
        }
        self.call.difference(&theirs.call, "this rank")
    }
}

fn exchange_header(watch: &Watch, link: &Link, mine: Header) -> Result<()> {
    let name = watch.op;
    (&link.next).write_all(&mine.encode()).map_err(|e| io_error(name, link.next_rank, watch.timeout, e))?;
    let mut bytes = [0u8; Header::BYTES];
    watch.read(&link.prev, &mut bytes, link.prev_rank, false)?;
    let theirs = Header::decode(&bytes).ok_or_else(|| CommError::Protocol {
        peer: format!("rank {}", link.prev_rank),
        detail: "not a collective header".into(),
    })?;
    match mine.difference(&theirs) {
        None => Ok(()),
        Some(detail) => Err(CommError::Mismatch { op: name, rank: link.prev_rank, detail }),
    }
}

fn tune(socket: &SockRef<'_>, buffer: usize) -> Result<()> {
    let io = |e| CommError::io("ring socket options", e);
    socket.set_send_buffer_size(buffer).map_err(io)?;
    socket.set_recv_buffer_size(buffer).map_err(io)?;
    Ok(())
}

/// The ring listener; buffer sizes are set before `listen` so that accepted
/// sockets inherit them and the TCP window scale is negotiated for them.
fn listen(addr: SocketAddr, buffer: usize) -> Result<TcpListener> {
    let io = |e| CommError::io(format!("cannot listen for ring peers on {addr}"), e);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(io)?;
    tune(&SockRef::from(&socket), buffer)?;
    socket.bind(&addr.into()).map_err(io)?;
    socket.listen(128).map_err(io)?;
    let listener: TcpListener = socket.into();
    listener.set_nonblocking(true).map_err(io)?;
    Ok(listener)
}

/// Connects to the next rank, retrying until the deadline.
fn dial(addr: SocketAddr, buffer: usize, deadline: Instant, rank: usize, timeout: Duration) -> Result<TcpStream> {
    loop {
        let socket =
            Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(|e| CommError::io("ring socket", e))?;
        tune(&SockRef::from(&socket), buffer)?;
        match socket.connect_timeout(&addr.into(), remaining(deadline).max(Duration::from_millis(1))) {
            Ok(()) => {
                let stream: TcpStream = socket.into();
                stream.set_nodelay(true).map_err(|e| CommError::io("ring socket", e))?;
                return Ok(stream);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(io_error("rendezvous", rank, timeout, e)),
        }
    }
}

/// Accepts the previous rank, checking its hello (rank, world size, job
/// token); anything else that connects is dropped and logged.
fn accept_prev(
    listener: &TcpListener,
    prev: usize,
    world: usize,
    token: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    loop {
        match listener.accept() {
            Ok((stream, from)) => {
                stream.set_nonblocking(false).map_err(|e| CommError::io("ring socket", e))?;
                stream.set_nodelay(true).map_err(|e| CommError::io("ring socket", e))?;
                // The real peer sends its hello at once; a silent stranger
                // may hold up the rendezvous for two seconds at most.
                let hello_wait = remaining(deadline).min(Duration::from_secs(2)).max(Duration::from_millis(1));
                stream.set_read_timeout(Some(hello_wait)).map_err(|e| CommError::io("ring socket", e))?;
                let mut hello = [0u8; 16];
                let w = |hello: &[u8; 16], i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().unwrap());
                let ok = (&stream).read_exact(&mut hello).is_ok()
                    && w(&hello, 0) == HELLO
                    && w(&hello, 4) as usize == prev
                    && w(&hello, 8) as usize == world
                    && w(&hello, 12) as usize == token.len()
                    && {
                        let mut theirs = vec![0u8; token.len()];
                        (&stream).read_exact(&mut theirs).is_ok() && crate::store::same_token(&theirs, token)
                    };
                if ok {
                    return Ok(stream);
                }
                tracing::warn!(
                    "ring listener: refused a connection from {from}: not rank {prev} of {world} with this job's token"
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(CommError::Timeout { op: "rendezvous", rank: prev, waited: timeout });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(CommError::io("ring listener", e)),
        }
    }
}

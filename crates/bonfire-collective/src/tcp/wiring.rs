//! Forming the ring: each rank listens, publishes its address in the
//! rendezvous store, dials the next rank with a hello (its rank, the world
//! size, the job's token) and accepts the previous rank, refusing anyone
//! else who connects.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};

use super::pipeline::{io_error, Link};
#[cfg(target_os = "linux")]
use super::shm::HostPair;
use super::transport::TcpPair;
use super::TcpConfig;
use crate::env::DistEnv;
use crate::error::{CommError, Result};
use crate::rendezvous::remaining;
use crate::store::Store;

const HELLO: u32 = u32::from_le_bytes(*b"BFRH");

/// Connects this rank to its neighbours; ranks that do not publish an
/// address before `deadline` are named in the error.
pub(super) fn form_ring(
    env: &DistEnv,
    store: &mut dyn Store,
    token: &str,
    config: &TcpConfig,
    deadline: Instant,
) -> Result<Link> {
    let (rank, world, timeout) = (env.rank, env.world_size, config.timeout);
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
    let mut hello = Vec::with_capacity(16 + token.len());
    for v in [HELLO, rank as u32, world as u32, token.len() as u32] {
        hello.extend(v.to_le_bytes());
    }
    hello.extend(token.as_bytes());
    (&next).write_all(&hello).map_err(|e| io_error("rendezvous", next_rank, timeout, e))?;
    let prev = accept_prev(&listener, prev_rank, world, token.as_bytes(), deadline, timeout)?;
    // The kernel reports twice the buffer it grants (the rest is its own
    // bookkeeping) and may grant less than asked (`net.core.wmem_max`). An
    // eighth of the report leaves room for two calls' data unread in the
    // sender's buffer alone: a rank that finished a call has seen every
    // rank send in it, so the next rank has read all but the last two.
    let granted = SockRef::from(&next).send_buffer_size().map_err(|e| CommError::io("ring socket options", e))?;
    let sockets = TcpPair { next, prev };
    #[cfg(target_os = "linux")]
    if config.shared_memory {
        let pair = HostPair::negotiate(sockets, config.socket_buffer, deadline)
            .map_err(|e| io_error("rendezvous", next_rank, timeout, e))?;
        let (out, inp) = pair.shared();
        tracing::debug!("ring: rank {rank} sends through shared memory: {out}; receives through it: {inp}");
        // A buffer in shared memory is the only one between the ranks: a
        // quarter of it leaves room for two calls' data unread, as above.
        let inline_bytes = pair.out_capacity().map_or(granted / 8, |c| c / 4);
        return Ok(Link { transport: Box::new(pair), next_rank, prev_rank, inline_bytes });
    }
    Ok(Link { transport: Box::new(sockets), next_rank, prev_rank, inline_bytes: granted / 8 })
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

//! The rendezvous store: a small TCP key-value store hosted by rank 0, or,
//! under torchrun, torchrun's own ([`TorchStoreClient`]); joining a job asks
//! only what [`Store`] offers of either.
//!
//! Workers use it to find each other (ring peer addresses, the NCCL unique
//! id) and, with NCCL, to publish their [heartbeat](crate::heartbeat). Every
//! message is a frame: a little-endian `u32` length, then that many bytes;
//! lengths are checked against `MAX_FRAME` before anything is allocated,
//! and a malformed frame closes only its connection. What a request looks
//! like on the wire is written once, in `wire.rs`, where it is encoded (by
//! the client) and decoded (by the server).
//!
//! The first frame of every connection must carry the job token (the
//! launcher's `BONFIRE_JOB_TOKEN`); a connection without it, or with another,
//! is refused, logged and closed before it can read or write a key.

mod client;
mod server;
mod torch;
mod wire;

use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::Result;

pub use client::StoreClient;
pub use server::StoreServer;
pub use torch::TorchStoreClient;
#[cfg(fuzzing)]
pub use wire::decode_connection;
pub(crate) use wire::same_token;
pub use wire::MAX_TOKEN;

/// What joining a job asks of a key-value store.
pub(crate) trait Store: Send {
    fn set(&mut self, key: &str, value: &[u8]) -> Result<()>;

    /// The value of `key`, waiting up to `timeout` for some worker to set it.
    fn get(&mut self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>>;

    /// Waits up to `timeout` until all `keys` are set; returns the indices of
    /// those still missing then (empty when all arrived).
    fn wait(&mut self, keys: &[String], timeout: Duration) -> Result<Vec<usize>>;

    /// Adds `delta` to the counter at `key` (0 when unset) and returns the new value.
    fn add(&mut self, key: &str, delta: i64) -> Result<i64>;

    /// The local address of this connection: the interface that reaches the
    /// store, which is where this worker's ring listener binds.
    fn local_ip(&self) -> Result<IpAddr>;
}

/// A connection to `addr` ("host:port"), retried until `timeout` because
/// the store may not be listening yet; the last failure when it never was.
fn connect(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        // Every address the name has: `localhost` may give ::1 first to a
        // store that listens on 127.0.0.1 only.
        let attempt = addr.to_socket_addrs().and_then(|addrs| {
            let mut last = wire::invalid(format!("{addr} resolves to no address"));
            for a in addrs {
                match TcpStream::connect_timeout(&a, Duration::from_secs(1)) {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = e,
                }
            }
            Err(last)
        });
        match attempt {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("store at {addr} not reachable yet: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

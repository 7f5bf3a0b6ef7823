//! The rendezvous store: a small TCP key-value store hosted by rank 0.
//!
//! Workers use it once, at start-up, to find each other (ring peer addresses,
//! the NCCL unique id). Every message is a frame: a little-endian `u32` length,
//! then that many bytes; lengths are checked against [`MAX_FRAME`] before
//! anything is allocated, and a malformed frame closes only its connection.
//!
//! The first frame of every connection must carry the job token (the
//! launcher's `BONFIRE_JOB_TOKEN`); a connection without it, or with another,
//! is refused, logged and closed before it can read or write a key.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{CommError, Result};

/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

const SET: u8 = 1;
const GET: u8 = 2;
const WAIT: u8 = 3;
const ADD: u8 = 4;
const JOIN: u8 = 5;

/// The longest job token accepted.
pub const MAX_TOKEN: usize = 256;

/// The store's server side. It serves until dropped.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    connections: Connections,
}

/// Open connections by id, so that dropping the server can close them.
type Connections = Arc<Mutex<HashMap<u64, TcpStream>>>;

#[derive(Default)]
struct Table {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl StoreServer {
    /// Listens on `addr` (port 0 picks a free port, see [`StoreServer::addr`])
    /// for clients that present `token`.
    pub fn bind(addr: impl ToSocketAddrs + std::fmt::Debug, token: &str) -> Result<Self> {
        if token.len() > MAX_TOKEN {
            return Err(CommError::invalid("rendezvous", format!("the job token is longer than {MAX_TOKEN} bytes")));
        }
        let token: Arc<[u8]> = token.as_bytes().into();
        let listener = TcpListener::bind(&addr)
            .map_err(|e| CommError::io(format!("rendezvous store cannot listen on {addr:?}"), e))?;
        let addr = listener.local_addr().map_err(|e| CommError::io("rendezvous store address", e))?;
        listener.set_nonblocking(true).map_err(|e| CommError::io("rendezvous store listener", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Connections::default();
        let table = Arc::new(Table::default());
        let accept = {
            let stop = stop.clone();
            let connections = connections.clone();
            std::thread::Builder::new()
                .name("bonfire-store".into())
                .spawn(move || accept_loop(listener, stop, connections, table, token))
                .map_err(|e| CommError::io("rendezvous store thread", e))?
        };
        Ok(StoreServer { addr, stop, accept: Some(accept), connections })
    }

    /// The address the store listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.connections.lock().unwrap_or_else(|e| e.into_inner()).values() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    connections: Connections,
    table: Arc<Table>,
    token: Arc<[u8]>,
) {
    let mut next_id = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                let id = next_id;
                next_id += 1;
                if let Ok(clone) = stream.try_clone() {
                    connections.lock().unwrap_or_else(|e| e.into_inner()).insert(id, clone);
                }
                let table = table.clone();
                let connections = connections.clone();
                let token = token.clone();
                let _ = std::thread::Builder::new().name("bonfire-store-conn".into()).spawn(move || {
                    if let Err(e) = admit(&stream, &token).and_then(|()| serve(&stream, &table)) {
                        tracing::warn!("rendezvous store: closing connection from {peer}: {e}");
                    }
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    connections.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                tracing::warn!("rendezvous store: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Reads the connection's first frame, which must present the job token.
/// A refusal is answered (so that a worker with the wrong token learns why)
/// and then closes the connection.
fn admit(mut stream: &TcpStream, token: &[u8]) -> io::Result<()> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut frame = Vec::new();
    read_frame(&mut stream, &mut frame)?;
    let _ = stream.set_read_timeout(None);
    let refusal = match frame.split_first() {
        Some((&JOIN, presented)) if same_token(presented, token) => None,
        Some((&JOIN, _)) => Some("wrong job token"),
        _ => Some("no job token"),
    };
    match refusal {
        None => write_frame(&mut stream, &[1]),
        Some(why) => {
            let _ = write_frame(&mut stream, &[0]);
            Err(invalid(format!("refused: {why}")))
        }
    }
}

/// Compares in time independent of where the tokens differ.
pub(crate) fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves one connection until the peer closes it or sends something invalid.
fn serve(mut stream: &TcpStream, table: &Table) -> io::Result<()> {
    let mut frame = Vec::new();
    loop {
        match read_frame(&mut stream, &mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let reply = handle(table, &frame)?;
        write_frame(&mut stream, &reply)?;
    }
}

/// One decoded request.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Set { key: String, value: Vec<u8> },
    Get { key: String, timeout: Duration },
    Wait { keys: Vec<String>, timeout: Duration },
    Add { key: String, delta: i64 },
}

impl Request {
    fn decode(frame: &[u8]) -> io::Result<Self> {
        let mut r = Reader(frame);
        let request = match r.u8()? {
            SET => Request::Set { key: r.key()?, value: r.rest().to_vec() },
            GET => {
                let timeout = Duration::from_millis(r.u32()? as u64);
                Request::Get { key: r.key()?, timeout }
            }
            WAIT => {
                let timeout = Duration::from_millis(r.u32()? as u64);
                let n = r.u16()? as usize;
                Request::Wait { keys: (0..n).map(|_| r.key()).collect::<io::Result<_>>()?, timeout }
            }
            ADD => {
                let delta = r.i64()?;
                Request::Add { key: r.key()?, delta }
            }
            other => return Err(invalid(format!("unknown request type {other}"))),
        };
        if !r.0.is_empty() {
            return Err(invalid(format!("{} stray bytes after the request", r.0.len())));
        }
        Ok(request)
    }
}

/// Decodes `bytes` exactly as the server reads a connection: frames, each
/// one request, until the bytes end or something is invalid. Returns how
/// many requests were valid. The entry point of the store's fuzz target.
#[doc(hidden)]
pub fn decode_connection(mut bytes: &[u8]) -> usize {
    let mut frame = Vec::new();
    let mut valid = 0;
    while read_frame(&mut bytes, &mut frame).is_ok() && Request::decode(&frame).is_ok() {
        valid += 1;
    }
    valid
}

fn handle(table: &Table, frame: &[u8]) -> io::Result<Vec<u8>> {
    let lock = || table.map.lock().unwrap_or_else(|e| e.into_inner());
    Ok(match Request::decode(frame)? {
        Request::Set { key, value } => {
            lock().insert(key, value);
            table.changed.notify_all();
            vec![1]
        }
        Request::Get { key, timeout } => {
            let map = wait_until(table, timeout, |m| m.contains_key(&key));
            match map.get(&key) {
                Some(v) => [&[1u8][..], v].concat(),
                None => vec![0],
            }
        }
        Request::Wait { keys, timeout } => {
            let map = wait_until(table, timeout, |m| keys.iter().all(|k| m.contains_key(k)));
            let missing: Vec<u16> = (0..keys.len() as u16).filter(|&i| !map.contains_key(&keys[i as usize])).collect();
            let mut out = vec![u8::from(missing.is_empty())];
            out.extend((missing.len() as u16).to_le_bytes());
            for i in missing {
                out.extend(i.to_le_bytes());
            }
            out
        }
        Request::Add { key, delta } => {
            let mut map = lock();
            let old = map.get(&key).and_then(|v| v.as_slice().try_into().ok()).map(i64::from_le_bytes).unwrap_or(0);
            let new = old.wrapping_add(delta);
            map.insert(key, new.to_le_bytes().to_vec());
            drop(map);
            table.changed.notify_all();
            new.to_le_bytes().to_vec()
        }
    })
}

fn wait_until<'a>(
    table: &'a Table,
    timeout: Duration,
    ready: impl Fn(&HashMap<String, Vec<u8>>) -> bool,
) -> std::sync::MutexGuard<'a, HashMap<String, Vec<u8>>> {
    let deadline = Instant::now() + timeout;
    let mut map = table.map.lock().unwrap_or_else(|e| e.into_inner());
    while !ready(&map) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        map = table.changed.wait_timeout(map, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
    }
    map
}

/// A worker's connection to the store.
pub struct StoreClient {
    stream: TcpStream,
    server: String,
    frame: Vec<u8>,
}

impl StoreClient {
    /// Connects to the store at `addr` ("host:port") and presents `token`,
    /// retrying until `timeout` because rank 0 may not be listening yet.
    pub fn connect(addr: &str, token: &str, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let last_error = loop {
            let attempt = addr
                .to_socket_addrs()
                .and_then(|mut a| a.next().ok_or_else(|| invalid(format!("{addr} resolves to no address"))))
                .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)));
            match attempt {
                Ok(stream) => {
                    stream.set_nodelay(true).map_err(|e| CommError::io("rendezvous socket", e))?;
                    let mut client = StoreClient { stream, server: addr.to_string(), frame: Vec::new() };
                    client.join(token)?;
                    return Ok(client);
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("rendezvous store at {addr} not reachable yet: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => break e,
            }
        };
        Err(CommError::Timeout { op: "rendezvous (the store is hosted by rank 0)", rank: 0, waited: timeout })
            .inspect_err(|_| tracing::error!("rendezvous store at {addr}: {last_error}"))
    }

    fn join(&mut self, token: &str) -> Result<()> {
        let reply = self.request(&[&[JOIN][..], token.as_bytes()].concat(), Duration::ZERO)?;
        if reply != [1] {
            return Err(CommError::Refused {
                peer: format!("the rendezvous store at {}", self.server),
                detail: "its job token differs from this worker's BONFIRE_JOB_TOKEN".into(),
            });
        }
        Ok(())
    }

    /// The local address of this connection: the interface that reaches rank 0,
    /// which is where this worker's ring listener binds.
    pub fn local_ip(&self) -> Result<std::net::IpAddr> {
        self.stream.local_addr().map(|a| a.ip()).map_err(|e| CommError::io("rendezvous socket", e))
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let mut req = vec![SET];
        put_key(&mut req, key)?;
        req.extend_from_slice(value);
        self.request(&req, Duration::from_secs(30))?;
        Ok(())
    }

    /// The value of `key`, waiting up to `timeout` for some worker to set it.
    pub fn get(&mut self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let mut req = vec![GET];
        req.extend(millis(timeout).to_le_bytes());
        put_key(&mut req, key)?;
        let reply = self.request(&req, timeout)?;
        Ok(match reply.split_first() {
            Some((1, value)) => Some(value.to_vec()),
            _ => None,
        })
    }

    /// Waits up to `timeout` until all `keys` are set; returns the indices of
    /// those still missing then (empty when all arrived).
    pub fn wait(&mut self, keys: &[String], timeout: Duration) -> Result<Vec<usize>> {
        let mut req = vec![WAIT];
        req.extend(millis(timeout).to_le_bytes());
        req.extend((keys.len() as u16).to_le_bytes());
        for k in keys {
            put_key(&mut req, k)?;
        }
        let reply = self.request(&req, timeout)?;
        let mut r = Reader(&reply);
        let proto = |e: io::Error| CommError::Protocol { peer: self.server.clone(), detail: e.to_string() };
        r.u8().map_err(proto)?;
        let n = r.u16().map_err(proto)?;
        (0..n).map(|_| r.u16().map(usize::from).map_err(proto)).collect()
    }

    /// Adds `delta` to the counter at `key` (0 when unset) and returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let mut req = vec![ADD];
        req.extend(delta.to_le_bytes());
        put_key(&mut req, key)?;
        let reply = self.request(&req, Duration::from_secs(30))?;
        let bytes: [u8; 8] = reply.as_slice().try_into().map_err(|_| CommError::Protocol {
            peer: self.server.clone(),
            detail: "counter reply is not 8 bytes".into(),
        })?;
        Ok(i64::from_le_bytes(bytes))
    }

    fn request(&mut self, req: &[u8], wait: Duration) -> Result<Vec<u8>> {
        let lost = |e: io::Error| CommError::PeerLost { op: "rendezvous", rank: 0, source: e };
        // The server answers a waiting request only after `wait`; allow for that.
        self.stream.set_read_timeout(Some(wait + Duration::from_secs(30))).map_err(lost)?;
        write_frame(&mut self.stream, req).map_err(lost)?;
        let mut frame = std::mem::take(&mut self.frame);
        read_frame(&mut self.stream, &mut frame).map_err(lost)?;
        let reply = frame.clone();
        self.frame = frame;
        Ok(reply)
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

fn put_key(out: &mut Vec<u8>, key: &str) -> Result<()> {
    let len = u16::try_from(key.len()).map_err(|_| CommError::invalid("rendezvous", "key longer than 65535 bytes"))?;
    out.extend(len.to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    Ok(())
}

/// Reads one frame into `buf`, refusing lengths above [`MAX_FRAME`] before allocating.
pub(crate) fn read_frame(stream: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(invalid(format!("frame of {len} bytes exceeds the limit of {MAX_FRAME}")));
    }
    buf.resize(len, 0);
    stream.read_exact(buf)
}

pub(crate) fn write_frame(stream: &mut impl Write, body: &[u8]) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(invalid(format!("frame of {} bytes exceeds the limit of {MAX_FRAME}", body.len())));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend((body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    stream.write_all(&out)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A bounds-checked cursor over a frame.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(invalid(format!("frame ends early: wanted {n} more bytes, {} left", self.0.len())));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn i64(&mut self) -> io::Result<i64> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn key(&mut self) -> io::Result<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| invalid("key is not UTF-8".into()))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_wait_add() {
        let server = StoreServer::bind("127.0.0.1:0", "secret").unwrap();
        let addr = server.addr().to_string();
        let mut a = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        let mut b = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        a.set("x", b"hello").unwrap();
        assert_eq!(b.get("x", Duration::from_secs(1)).unwrap().as_deref(), Some(&b"hello"[..]));
        assert_eq!(b.get("absent", Duration::from_millis(50)).unwrap(), None);
        let keys = vec!["x".to_string(), "y".to_string(), "z".to_string()];
        assert_eq!(b.wait(&keys, Duration::from_millis(50)).unwrap(), vec![1, 2]);
        assert_eq!(a.add("n", 2).unwrap(), 2);
        assert_eq!(b.add("n", 3).unwrap(), 5);
    }

    #[test]
    fn get_waits_for_a_later_set() {
        let server = StoreServer::bind("127.0.0.1:0", "secret").unwrap();
        let addr = server.addr().to_string();
        let mut a = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            a.set("late", b"v").unwrap();
        });
        let mut b = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        assert_eq!(b.get("late", Duration::from_secs(5)).unwrap().as_deref(), Some(&b"v"[..]));
        setter.join().unwrap();
    }

    #[test]
    fn oversized_or_garbled_frames_close_only_that_connection() {
        let server = StoreServer::bind("127.0.0.1:0", "secret").unwrap();
        let addr = server.addr().to_string();
        let mut raw = TcpStream::connect(&addr).unwrap();
        raw.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert_closed(&mut raw, "an oversized frame");
        let mut raw = joined(&addr);
        raw.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert_closed(&mut raw, "an oversized frame after joining");
        let mut raw = joined(&addr);
        write_frame(&mut raw, &[GET, 1]).unwrap();
        assert_closed(&mut raw, "a truncated request");
        let mut raw = joined(&addr);
        write_frame(&mut raw, &[99]).unwrap();
        assert_closed(&mut raw, "an unknown request");
        let mut ok = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        ok.set("still", b"alive").unwrap();
        assert_eq!(ok.get("still", Duration::from_secs(1)).unwrap().as_deref(), Some(&b"alive"[..]));
    }

    /// A raw connection that has presented the right token.
    fn joined(addr: &str) -> TcpStream {
        let mut raw = TcpStream::connect(addr).unwrap();
        write_frame(&mut raw, &[&[JOIN][..], b"secret"].concat()).unwrap();
        let mut reply = Vec::new();
        read_frame(&mut raw, &mut reply).unwrap();
        assert_eq!(reply, [1]);
        raw
    }

    #[test]
    fn a_connection_without_the_job_token_is_refused_and_the_store_serves_on() {
        let server = StoreServer::bind("127.0.0.1:0", "secret").unwrap();
        let addr = server.addr().to_string();
        let err = StoreClient::connect(&addr, "guess", Duration::from_secs(5)).err().expect("a wrong token is refused");
        assert!(matches!(err, CommError::Refused { .. }), "{err}");
        assert!(err.to_string().contains("job token"), "{err}");
        assert!(StoreClient::connect(&addr, "", Duration::from_secs(5)).is_err(), "an empty token is refused");
        // A request sent without joining first is refused and closed.
        let mut raw = TcpStream::connect(&addr).unwrap();
        let mut set = vec![SET];
        put_key(&mut set, "stolen").unwrap();
        write_frame(&mut raw, &set).unwrap();
        let mut reply = Vec::new();
        read_frame(&mut raw, &mut reply).unwrap();
        assert_eq!(reply, [0], "refused");
        assert_closed(&mut raw, "a connection that skipped the token");
        let mut ok = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        assert_eq!(ok.get("stolen", Duration::from_millis(50)).unwrap(), None, "nothing was written");
    }

    /// The server closes the connection at once: end of stream or reset, not
    /// a read timeout.
    fn assert_closed(raw: &mut TcpStream, what: &str) {
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        match raw.read(&mut buf) {
            Ok(0) => {}
            Err(e) if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            other => panic!("{what}: the store must close the connection, got {other:?}"),
        }
    }

    #[test]
    fn unreachable_store_is_a_timeout_naming_rank_0() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err =
            StoreClient::connect(&format!("127.0.0.1:{port}"), "secret", Duration::from_millis(300)).err().unwrap();
        assert!(err.to_string().contains("rank 0"), "{err}");
    }
}

//! The store's server: rank 0 runs it for as long as the group lives.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::wire::{invalid, read_frame, same_token, write_frame, Request, MAX_TOKEN};
use crate::error::{CommError, Result};

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
    let refusal = match Request::decode(&frame) {
        Ok(Request::Join { token: presented }) if same_token(&presented, token) => None,
        Ok(Request::Join { .. }) => Some("wrong job token"),
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

fn handle(table: &Table, frame: &[u8]) -> io::Result<Vec<u8>> {
    let lock = || table.map.lock().unwrap_or_else(|e| e.into_inner());
    Ok(match Request::decode(frame)? {
        Request::Join { .. } => return Err(invalid("a second job token".into())),
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::error::CommError;
    use crate::store::{Store, StoreClient};

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
        write_frame(&mut raw, &Request::Get { key: "k".into(), timeout: Duration::ZERO }.encode().unwrap()[..3])
            .unwrap();
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
        write_frame(&mut raw, &Request::Join { token: b"secret".to_vec() }.encode().unwrap()).unwrap();
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
        let set = Request::Set { key: "stolen".into(), value: vec![] }.encode().unwrap();
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

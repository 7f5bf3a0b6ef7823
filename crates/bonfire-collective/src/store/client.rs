//! A worker's side of the store.

use std::io;
use std::net::TcpStream;
use std::time::Duration;

use super::wire::{read_frame, write_frame, Reader, Request};
use super::Store;
use crate::error::{CommError, Result};

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
        let stream = super::connect(addr, timeout).map_err(|last_error| {
            tracing::error!("rendezvous store at {addr}: {last_error}");
            CommError::Timeout { op: "rendezvous (the store is hosted by rank 0)", rank: 0, waited: timeout }
        })?;
        let mut client = StoreClient { stream, server: addr.to_string(), frame: Vec::new() };
        client.join(token)?;
        Ok(client)
    }

    fn join(&mut self, token: &str) -> Result<()> {
        let reply = self.request(Request::Join { token: token.as_bytes().to_vec() }, Duration::ZERO)?;
        if reply != [1] {
            return Err(CommError::Refused {
                peer: format!("the rendezvous store at {}", self.server),
                detail: "its job token differs from this worker's BONFIRE_JOB_TOKEN".into(),
            });
        }
        Ok(())
    }

    fn request(&mut self, request: Request, wait: Duration) -> Result<Vec<u8>> {
        let req = request.encode().map_err(|e| CommError::invalid("rendezvous", e.to_string()))?;
        let lost = |e: io::Error| CommError::PeerLost { op: "rendezvous", rank: 0, cause: e };
        // The server answers a waiting request only after `wait`; allow for that.
        self.stream.set_read_timeout(Some(wait + Duration::from_secs(30))).map_err(lost)?;
        write_frame(&mut self.stream, &req).map_err(lost)?;
        let mut frame = std::mem::take(&mut self.frame);
        read_frame(&mut self.stream, &mut frame).map_err(lost)?;
        let reply = frame.clone();
        self.frame = frame;
        Ok(reply)
    }
}

impl Store for StoreClient {
    fn local_ip(&self) -> Result<std::net::IpAddr> {
        self.stream.local_addr().map(|a| a.ip()).map_err(|e| CommError::io("rendezvous socket", e))
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.request(Request::Set { key: key.into(), value: value.to_vec() }, Duration::from_secs(30))?;
        Ok(())
    }

    fn get(&mut self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let reply = self.request(Request::Get { key: key.into(), timeout }, timeout)?;
        Ok(match reply.split_first() {
            Some((1, value)) => Some(value.to_vec()),
            _ => None,
        })
    }

    fn wait(&mut self, keys: &[String], timeout: Duration) -> Result<Vec<usize>> {
        let reply = self.request(Request::Wait { keys: keys.to_vec(), timeout }, timeout)?;
        let mut r = Reader(&reply);
        let proto = |e: io::Error| CommError::Protocol { peer: self.server.clone(), detail: e.to_string() };
        r.u8().map_err(proto)?;
        let n = r.u16().map_err(proto)?;
        (0..n).map(|_| r.u16().map(usize::from).map_err(proto)).collect()
    }

    fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let reply = self.request(Request::Add { key: key.into(), delta }, Duration::from_secs(30))?;
        let bytes: [u8; 8] = reply.as_slice().try_into().map_err(|_| CommError::Protocol {
            peer: self.server.clone(),
            detail: "counter reply is not 8 bytes".into(),
        })?;
        Ok(i64::from_le_bytes(bytes))
    }
}

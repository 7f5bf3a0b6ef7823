//! A client of PyTorch's TCPStore: the store torchrun's agent hosts at
//! `MASTER_ADDR:MASTER_PORT` and shares with the workers it starts
//! (`TORCHELASTIC_USE_AGENT_STORE=True`).
//!
//! PyTorch's framing (c10d's `TCPStore.cpp` and its servers): a request is a
//! one-byte query type, then its fields, with no frame around it; integers
//! are little-endian, and a key or a value is a `u64` length, then its
//! bytes. `SET` has no reply; `GET` answers a value, `ADD` an `i64`,
//! `CHECK` one byte (ready or not), `WAIT` one byte when every key is set,
//! and `CANCEL_WAIT` ends a wait the client gave up on. The store has no
//! secret: anyone who reaches it can read and write every key.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use super::Store;
use crate::error::{CommError, Result};

// PyTorch's `QueryType`, in its order.
const VALIDATE: u8 = 0;
const SET: u8 = 1;
const GET: u8 = 3;
const ADD: u8 = 4;
const CHECK: u8 = 5;
const WAIT: u8 = 6;
const CANCEL_WAIT: u8 = 12;
const PING: u8 = 13;

/// What `VALIDATE` carries: PyTorch's `validationMagicNumber`.
const MAGIC: u32 = 0x3C85_F7CE;

/// `CHECK`'s reply when every key is set (`CheckResponseType::READY`).
const READY: u8 = 0;
/// `WAIT`'s replies (`WaitResponseType`).
const STOP_WAITING: u8 = 0;
const WAIT_CANCELED: u8 = 1;

/// How long a reply that needs no waiting may take.
const REPLY: Duration = Duration::from_secs(30);

/// One request, as PyTorch's client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Query {
    Validate,
    Ping(u32),
    Set(String, Vec<u8>),
    Get(String),
    Add(String, i64),
    Check(Vec<String>),
    Wait(Vec<String>),
    CancelWait,
}

impl Query {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend((b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        };
        let keys = |out: &mut Vec<u8>, keys: &[String]| {
            out.extend((keys.len() as u64).to_le_bytes());
            keys.iter().for_each(|k| bytes(out, k.as_bytes()));
        };
        match self {
            Query::Validate => {
                out.push(VALIDATE);
                out.extend(MAGIC.to_le_bytes());
            }
            Query::Ping(nonce) => {
                out.push(PING);
                out.extend(nonce.to_le_bytes());
            }
            Query::Set(key, value) => {
                out.push(SET);
                bytes(&mut out, key.as_bytes());
                bytes(&mut out, value);
            }
            Query::Get(key) => {
                out.push(GET);
                bytes(&mut out, key.as_bytes());
            }
            Query::Add(key, delta) => {
                out.push(ADD);
                bytes(&mut out, key.as_bytes());
                out.extend(delta.to_le_bytes());
            }
            Query::Check(k) => {
                out.push(CHECK);
                keys(&mut out, k);
            }
            Query::Wait(k) => {
                out.push(WAIT);
                keys(&mut out, k);
            }
            Query::CancelWait => out.push(CANCEL_WAIT),
        }
        out
    }
}

/// A worker's connection to torchrun's store; every key it reads or writes
/// lies under its prefix, which is this attempt's own.
pub struct TorchStoreClient {
    stream: TcpStream,
    server: String,
    prefix: String,
}

impl TorchStoreClient {
    /// Connects to the TCPStore at `addr` ("host:port") and checks that it
    /// answers as one.
    pub fn connect(addr: &str, prefix: &str, timeout: Duration) -> Result<Self> {
        let stream = super::connect(addr, timeout)
            .map_err(|e| CommError::io(format!("reaching torchrun's store at {addr} (MASTER_ADDR:MASTER_PORT)"), e))?;
        let mut client = TorchStoreClient { stream, server: addr.to_string(), prefix: prefix.to_string() };
        client.send(&Query::Validate)?;
        let nonce = std::process::id();
        client.send(&Query::Ping(nonce))?;
        let answer = client.read::<4>(REPLY).map_err(|e| client.not_a_store(e.to_string()))?;
        if u32::from_le_bytes(answer) != nonce {
            return Err(client.not_a_store("it answered a ping with another number".into()));
        }
        Ok(client)
    }

    fn not_a_store(&self, detail: String) -> CommError {
        CommError::Protocol {
            peer: format!("torchrun's store at {} (MASTER_ADDR:MASTER_PORT)", self.server),
            detail: format!("{detail}; is it PyTorch's TCPStore?"),
        }
    }

    fn lost(&self, source: io::Error) -> CommError {
        CommError::io(format!("torchrun's store at {}", self.server), source)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn send(&mut self, query: &Query) -> Result<()> {
        self.stream.write_all(&query.encode()).map_err(|e| self.lost(e))
    }

    /// Reads `N` bytes, waiting at most `wait`.
    fn read<const N: usize>(&mut self, wait: Duration) -> io::Result<[u8; N]> {
        self.stream.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let mut out = [0; N];
        self.stream.read_exact(&mut out)?;
        Ok(out)
    }

    fn reply<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.read(REPLY).map_err(|e| self.lost(e))
    }

    /// Whether every key (prefixed) is set, now.
    fn check(&mut self, keys: Vec<String>) -> Result<bool> {
        self.send(&Query::Check(keys))?;
        Ok(self.reply::<1>()?[0] == READY)
    }

    /// Waits up to `timeout` until every key (prefixed) is set; false when
    /// some are still missing then. A wait given up on is cancelled, as
    /// PyTorch's client does, so the connection stays usable.
    fn wait_for(&mut self, keys: Vec<String>, timeout: Duration) -> Result<bool> {
        if timeout.is_zero() {
            return self.check(keys);
        }
        self.send(&Query::Wait(keys))?;
        match self.read::<1>(timeout) {
            Ok([STOP_WAITING]) => return Ok(true),
            Ok([other]) => return Err(self.not_a_store(format!("a wait ended with {other}"))),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(self.lost(e)),
        }
        self.send(&Query::CancelWait)?;
        match self.reply::<1>()? {
            [WAIT_CANCELED] => Ok(false),
            // The keys came just before the cancel; its answer follows.
            [STOP_WAITING] => match self.reply::<1>()? {
                [WAIT_CANCELED] => Ok(true),
                [other] => Err(self.not_a_store(format!("a cancelled wait ended with {other}"))),
            },
            [other] => Err(self.not_a_store(format!("a cancelled wait ended with {other}"))),
        }
    }
}

impl Store for TorchStoreClient {
    fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.send(&Query::Set(self.key(key), value.to_vec()))
    }

    fn get(&mut self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let key = self.key(key);
        if !self.wait_for(vec![key.clone()], timeout)? {
            return Ok(None);
        }
        self.send(&Query::Get(key))?;
        let len = u64::from_le_bytes(self.reply::<8>()?);
        if len > super::wire::MAX_FRAME as u64 {
            return Err(self.not_a_store(format!("a value of {len} bytes")));
        }
        let mut value = vec![0; len as usize];
        self.stream.read_exact(&mut value).map_err(|e| self.lost(e))?;
        Ok(Some(value))
    }

    fn wait(&mut self, keys: &[String], timeout: Duration) -> Result<Vec<usize>> {
        let all: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        if self.wait_for(all.clone(), timeout)? {
            return Ok(Vec::new());
        }
        let mut missing = Vec::new();
        for (i, key) in all.into_iter().enumerate() {
            if !self.check(vec![key])? {
                missing.push(i);
            }
        }
        Ok(missing)
    }

    fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        self.send(&Query::Add(self.key(key), delta))?;
        Ok(i64::from_le_bytes(self.reply::<8>()?))
    }

    fn local_ip(&self) -> Result<IpAddr> {
        self.stream.local_addr().map(|a| a.ip()).map_err(|e| CommError::io("torchrun's store socket", e))
    }
}

#[cfg(test)]
#[path = "torch_tests.rs"]
mod tests;

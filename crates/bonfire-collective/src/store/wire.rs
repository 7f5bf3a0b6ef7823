//! The store's wire format: frames, and the requests inside them, each
//! encoded beside its decoding so that client and server cannot drift.

use std::io::{self, Read, Write};
use std::time::Duration;

/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// The longest job token accepted.
pub const MAX_TOKEN: usize = 256;

const SET: u8 = 1;
const GET: u8 = 2;
const WAIT: u8 = 3;
const ADD: u8 = 4;
const JOIN: u8 = 5;

/// One request; `Join` must be a connection's first and only there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    Join { token: Vec<u8> },
    Set { key: String, value: Vec<u8> },
    Get { key: String, timeout: Duration },
    Wait { keys: Vec<String>, timeout: Duration },
    Add { key: String, delta: i64 },
}

impl Request {
    /// The frame body; fails on a key longer than 65535 bytes.
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        match self {
            Request::Join { token } => {
                out.push(JOIN);
                out.extend_from_slice(token);
            }
            Request::Set { key, value } => {
                out.push(SET);
                put_key(&mut out, key)?;
                out.extend_from_slice(value);
            }
            Request::Get { key, timeout } => {
                out.push(GET);
                out.extend(millis(*timeout).to_le_bytes());
                put_key(&mut out, key)?;
            }
            Request::Wait { keys, timeout } => {
                out.push(WAIT);
                out.extend(millis(*timeout).to_le_bytes());
                let n = u16::try_from(keys.len()).map_err(|_| invalid("more than 65535 keys".into()))?;
                out.extend(n.to_le_bytes());
                for key in keys {
                    put_key(&mut out, key)?;
                }
            }
            Request::Add { key, delta } => {
                out.push(ADD);
                out.extend(delta.to_le_bytes());
                put_key(&mut out, key)?;
            }
        }
        Ok(out)
    }

    pub fn decode(frame: &[u8]) -> io::Result<Self> {
        let mut r = Reader(frame);
        let request = match r.u8()? {
            JOIN => Request::Join { token: r.rest().to_vec() },
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
#[cfg(any(test, fuzzing))]
pub fn decode_connection(mut bytes: &[u8]) -> usize {
    let mut frame = Vec::new();
    let mut valid = 0;
    while read_frame(&mut bytes, &mut frame).is_ok() && Request::decode(&frame).is_ok() {
        valid += 1;
    }
    valid
}

/// Compares in time independent of where the tokens differ.
pub(crate) fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

fn put_key(out: &mut Vec<u8>, key: &str) -> io::Result<()> {
    let len = u16::try_from(key.len()).map_err(|_| invalid("key longer than 65535 bytes".into()))?;
    out.extend(len.to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    Ok(())
}

/// Reads one frame into `buf`, refusing lengths above [`MAX_FRAME`] before allocating.
pub fn read_frame(stream: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(invalid(format!("frame of {len} bytes exceeds the limit of {MAX_FRAME}")));
    }
    buf.resize(len, 0);
    stream.read_exact(buf)
}

pub fn write_frame(stream: &mut impl Write, body: &[u8]) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(invalid(format!("frame of {} bytes exceeds the limit of {MAX_FRAME}", body.len())));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend((body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    stream.write_all(&out)
}

pub(crate) fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A bounds-checked cursor over a frame.
pub(crate) struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(invalid(format!("frame ends early: wanted {n} more bytes, {} left", self.0.len())));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    pub fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn i64(&mut self) -> io::Result<i64> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn key(&mut self) -> io::Result<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| invalid("key is not UTF-8".into()))
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_decodes_to_what_was_encoded() {
        let requests = [
            Request::Join { token: b"secret".to_vec() },
            Request::Set { key: "ring/1".into(), value: vec![1, 2, 3] },
            Request::Get { key: "nccl/id".into(), timeout: Duration::from_millis(1500) },
            Request::Wait { keys: vec!["a".into(), "bb".into()], timeout: Duration::ZERO },
            Request::Add { key: "claim/0".into(), delta: -7 },
        ];
        for request in requests {
            assert_eq!(Request::decode(&request.encode().unwrap()).unwrap(), request);
        }
        assert!(Request::Set { key: "k".repeat(70_000), value: vec![] }.encode().is_err());
    }

    /// The fuzz target's entry point counts the valid requests of a
    /// connection and stops at the first invalid frame.
    #[test]
    fn a_connection_decodes_up_to_its_first_invalid_frame() {
        let mut bytes = Vec::new();
        for request in [Request::Join { token: b"t".to_vec() }, Request::Add { key: "n".into(), delta: 1 }] {
            write_frame(&mut bytes, &request.encode().unwrap()).unwrap();
        }
        assert_eq!(decode_connection(&bytes), 2);
        write_frame(&mut bytes, &[0xff; 9]).unwrap();
        write_frame(&mut bytes, &Request::Add { key: "n".into(), delta: 1 }.encode().unwrap()).unwrap();
        assert_eq!(decode_connection(&bytes), 2);
        assert_eq!(decode_connection(&[0xff, 0xff, 0xff, 0xff]), 0, "a frame longer than the limit");
    }
}

//! The link under the ring: how a rank's bytes reach the next rank, and the
//! previous rank's reach it. The ring's schedule (`plan.rs`) and the code
//! that runs it (`pipeline.rs`, `header.rs`) see only [`Transport`], as
//! Gloo's algorithms see only its `transport::Pair`: TCP sockets are one
//! transport, and another (shared memory between the processes of one host,
//! RDMA) runs the same schedule and passes the same tests.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

/// One rank's two directions of the ring.
pub(crate) trait Transport: Send + Sync {
    /// Writes all of `bytes` to the next rank; fails past the send timeout.
    fn send(&self, bytes: &[u8]) -> io::Result<()>;

    /// Reads at most `buf.len()` bytes from the previous rank: how many (0
    /// when it has closed the link), or `WouldBlock` / `TimedOut` when none
    /// came within one polling tick.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;

    /// How long `recv` waits before it reports that nothing came, and how
    /// long `send` may block.
    fn set_timeouts(&self, poll_tick: Duration, send_timeout: Duration) -> io::Result<()>;

    /// Makes a `send` blocked on this rank fail (a call aborting).
    fn interrupt_send(&self);

    /// Makes a `recv` blocked on this rank fail.
    fn interrupt_recv(&self);
}

/// The ring over TCP: a socket to the next rank and one from the previous.
pub(crate) struct TcpPair {
    pub next: TcpStream,
    pub prev: TcpStream,
}

impl Transport for TcpPair {
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        (&self.next).write_all(bytes)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.prev).read(buf)
    }

    fn set_timeouts(&self, poll_tick: Duration, send_timeout: Duration) -> io::Result<()> {
        self.prev.set_read_timeout(Some(poll_tick))?;
        self.next.set_write_timeout(Some(send_timeout))
    }

    fn interrupt_send(&self) {
        let _ = self.next.shutdown(Shutdown::Write);
    }

    fn interrupt_recv(&self) {
        let _ = self.prev.shutdown(Shutdown::Read);
    }
}

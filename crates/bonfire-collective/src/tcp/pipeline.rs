//! Runs a [`Plan`] over the ring's [`Transport`]: a sender thread writes
//! chunks to the next rank while this thread reads chunks from the previous
//! rank and reduces them, so the transfer and the reduction overlap; a call
//! small enough to fit in the transport's buffers runs on this thread alone.

use std::convert::Infallible;
use std::io;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::plan::{Plan, RecvItem, SendItem};
use super::transport::Transport;
use crate::element::{Element, ReduceOp};
use crate::error::{CommError, Result};
use crate::segments::{raw_parts, runs, Segment};

/// This rank's place in the ring.
pub(crate) struct Link {
    pub transport: Box<dyn Transport>,
    pub next_rank: usize,
    pub prev_rank: usize,
    /// A call that sends at most this many bytes runs on the calling thread
    /// alone (see [`run`]).
    pub inline_bytes: usize,
}

#[derive(Default)]
struct Progress {
    state: Mutex<Counters>,
    changed: Condvar,
}

#[derive(Default)]
struct Counters {
    received: usize,
    sent: usize,
    aborted: bool,
}

impl Progress {
    /// Waits until `ready` holds; false if the other side aborted.
    fn wait(&self, ready: impl Fn(&Counters) -> bool) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.aborted {
                return false;
            }
            if ready(&st) {
                return true;
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Marks the run as failed; true for the first caller, whose error is the cause.
    fn abort(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let first = !st.aborted;
        st.aborted = true;
        self.changed.notify_all();
        first
    }

    fn update(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
    }
}

/// One collective call as the stall inspector and the timeout see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Watch {
    pub op: &'static str,
    /// The call's number in this group.
    pub seq: u64,
    /// This rank.
    pub rank: usize,
    /// How long a read may go without progress before the call fails.
    pub timeout: Duration,
    /// How long a read may go without progress before a stall is logged.
    pub stall_warning: Duration,
}

impl Watch {
    /// Fills `buf` from `peer`, the previous rank, whose transport wakes
    /// every polling tick ([`TcpConfig::poll_tick`](super::TcpConfig)). Silence longer than
    /// `stall_warning` is logged once, naming the peer and the call; silence
    /// longer than `timeout` is a [`CommError::Timeout`] naming the peer.
    /// `started` says whether the peer has begun this call (it sent its
    /// header): a peer that has not started is the one that is behind.
    pub fn read(&self, transport: &dyn Transport, buf: &mut [u8], peer: usize, started: bool) -> Result<()> {
        let mut filled = 0;
        let mut quiet_since = Instant::now();
        let mut warned = false;
        while filled < buf.len() {
            match transport.recv(&mut buf[filled..]) {
                Ok(0) => return Err(io_error(self.op, peer, self.timeout, io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => {
                    filled += n;
                    quiet_since = Instant::now();
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    let quiet = quiet_since.elapsed();
                    if quiet >= self.timeout {
                        return Err(io_error(self.op, peer, self.timeout, e));
                    }
                    if quiet >= self.stall_warning && !warned {
                        warned = true;
                        let what = if started { "for data from" } else { "for" };
                        let behind = if started { "" } else { ", which has not started it" };
                        tracing::warn!(
                            "stall: rank {} has waited {:.1} s in {} #{} {what} rank {peer}{behind}",
                            self.rank,
                            quiet.as_secs_f64(),
                            self.op,
                            self.seq
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(self.op, peer, self.timeout, e)),
            }
        }
        Ok(())
    }
}

/// Executes `plan` on a buffer that lies in `segments` (one, or a DDP
/// bucket's gradients where backward left them; the plan's ranges count
/// from the start of the first). `scratch` holds one received chunk at a
/// time and is reused across calls, so the data path allocates nothing.
///
/// A call that sends more than `link.inline_bytes` runs its sends on a
/// thread of their own, so that the transfer and the reduction overlap. A
/// smaller one (DDP's buckets of a small model, a barrier) runs on the
/// calling thread alone: its sends fit in the transport's buffers, so no write
/// waits for a peer that is itself writing, and the call saves starting a
/// thread and handing every chunk between two, which on busy cores costs
/// more than the transfer.
pub(crate) fn run<T: Element>(
    watch: &Watch,
    link: &Link,
    segments: &mut [&mut [T]],
    plan: &Plan,
    op: ReduceOp,
    scale: f32,
    scratch: &mut Vec<u64>,
) -> Result<()> {
    let longest = plan.recvs.iter().map(|r| r.range.len()).max().unwrap_or(0);
    let words = (longest * std::mem::size_of::<T>()).div_ceil(8);
    if scratch.len() < words {
        scratch.resize(words, 0);
    }
    // From here on the buffer is reached only through these raw parts, by
    // this thread and the sender alike.
    let parts = raw_parts(segments);
    let buf: &[&[Segment<T>]] = &[&parts];
    let sent_bytes = plan.sends.iter().map(|s| s.range.len()).sum::<usize>() * std::mem::size_of::<T>();
    let chunks = Chunks { watch, link, buf, op, scale };
    if sent_bytes <= link.inline_bytes {
        chunks.run_inline(plan, scratch)
    } else {
        chunks.run_threaded(plan, scratch)
    }
}

/// What sending and receiving one chunk of a call needs.
struct Chunks<'a, T> {
    watch: &'a Watch,
    link: &'a Link,
    buf: &'a [&'a [Segment<T>]],
    op: ReduceOp,
    scale: f32,
}

impl<T: Element> Chunks<'_, T> {
    /// Writes `item`'s range to the next rank.
    ///
    /// # Safety
    ///
    /// Nobody writes the range until this send is counted: the plan's
    /// `RecvItem::after_send` says when a receive may.
    unsafe fn send(&self, item: &SendItem) -> io::Result<()> {
        let transport = &self.link.transport;
        // SAFETY: the plan's ranges lie inside the buffer; see above.
        unsafe { runs(self.buf, item.range.clone(), |run| transport.send(bytemuck::cast_slice(run[0]))) }
    }

    /// Reads `item`'s range from the previous rank, combining it with the
    /// values there or overwriting them.
    ///
    /// # Safety
    ///
    /// Nothing else touches the range until this item is counted as
    /// received: sends wait for it (`SendItem::after_recv`).
    unsafe fn receive(&self, item: &RecvItem, scratch: &mut [u64]) -> Result<()> {
        let (link, op, scale) = (self.link, self.op, self.scale);
        let finish = |dst: &mut [T]| {
            if item.finish && op == ReduceOp::Mean {
                T::scale(dst, scale);
            }
        };
        if item.reduce {
            let bytes = item.range.len() * std::mem::size_of::<T>();
            let words = bytes.div_ceil(8);
            let raw = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut scratch[..words])[..bytes];
            self.watch.read(link.transport.as_ref(), raw, link.prev_rank, true)?;
            let incoming: &[T] = &bytemuck::cast_slice::<u64, T>(&scratch[..words])[..item.range.len()];
            let mut at = 0;
            // SAFETY: the plan's ranges lie inside the buffer; see above.
            let Ok(()) = unsafe {
                runs(self.buf, item.range.clone(), |run| {
                    let dst = &mut *run[0];
                    T::combine(dst, &incoming[at..at + dst.len()], op);
                    finish(dst);
                    at += dst.len();
                    Ok::<(), Infallible>(())
                })
            };
            Ok(())
        } else {
            // SAFETY: as above.
            unsafe {
                runs(self.buf, item.range.clone(), |run| {
                    self.watch.read(link.transport.as_ref(), bytemuck::cast_slice_mut(run[0]), link.prev_rank, true)?;
                    finish(run[0]);
                    Ok(())
                })
            }
        }
    }

    fn send_error(&self, e: io::Error) -> CommError {
        io_error(self.watch.op, self.link.next_rank, self.watch.timeout, e)
    }

    /// Every send as soon as the receives it depends on are done, and every
    /// receive in order, on this thread.
    fn run_inline(&self, plan: &Plan, scratch: &mut [u64]) -> Result<()> {
        let mut sent = 0;
        for (received, item) in plan.recvs.iter().enumerate() {
            while sent < plan.sends.len() && plan.sends[sent].after_recv <= received {
                // SAFETY: one thread runs the plan in its order, so every
                // receive this send waits for is done and none that waits
                // for it has started.
                unsafe { self.send(&plan.sends[sent]) }.map_err(|e| self.send_error(e))?;
                sent += 1;
            }
            debug_assert!(sent >= item.after_send, "a plan's dependencies point backwards");
            // SAFETY: as for the sends.
            unsafe { self.receive(item, scratch) }?;
        }
        for item in &plan.sends[sent..] {
            // SAFETY: as above.
            unsafe { self.send(item) }.map_err(|e| self.send_error(e))?;
        }
        Ok(())
    }

    /// Sends on a thread of their own while this thread receives.
    fn run_threaded(&self, plan: &Plan, scratch: &mut [u64]) -> Result<()> {
        let link = self.link;
        let progress = Progress::default();
        let (sent, received) = std::thread::scope(|s| {
            let sender = s.spawn(|| {
                for (i, item) in plan.sends.iter().enumerate() {
                    if !progress.wait(|c| c.received >= item.after_recv) {
                        return Ok(());
                    }
                    // SAFETY: the receives it waits for are counted, and
                    // the receives that wait for it wait for its count.
                    if let Err(e) = unsafe { self.send(item) } {
                        if !progress.abort() {
                            return Ok(()); // the receiver failed first and closed the link
                        }
                        // Wake the receiver, which may be blocked reading.
                        link.transport.interrupt_recv();
                        return Err(self.send_error(e));
                    }
                    progress.update(|c| c.sent = i + 1);
                }
                Ok(())
            });

            let mut receive = || -> Result<()> {
                for (i, item) in plan.recvs.iter().enumerate() {
                    if !progress.wait(|c| c.sent >= item.after_send) {
                        return Ok(());
                    }
                    // SAFETY: the sends it waits for are counted, and the
                    // sends that wait for it wait for its count.
                    unsafe { self.receive(item, scratch) }?;
                    progress.update(|c| c.received = i + 1);
                }
                Ok(())
            };
            let mut received = receive();
            if received.is_err() {
                if progress.abort() {
                    // Wake the sender, which may be blocked writing.
                    link.transport.interrupt_send();
                } else {
                    received = Ok(()); // the sender failed first; its error is the cause
                }
            }
            let sent =
                sender.join().unwrap_or_else(|_| Err(CommError::Aborted("the ring sender thread panicked".into())));
            (sent, received)
        });
        // The first failure is the cause; the other side only saw the abort.
        sent.and(received)
    }
}

/// Names the peer behind a socket error: silence past the timeout is a
/// timeout, anything else (reset, end of stream) means the peer is gone.
pub(crate) fn io_error(op: &'static str, rank: usize, timeout: Duration, e: io::Error) -> CommError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CommError::Timeout { op, rank, waited: timeout },
        _ => CommError::PeerLost { op, rank, cause: e },
    }
}

/// Runs an all-reduce of `len` values in chunks of `chunk` over a ring whose
/// rank `r` sends and receives through `transports[r]`, and checks that
/// every rank ends with the plain sum: what every transport's test asks.
#[cfg(test)]
pub(super) fn ring_sums(transports: Vec<Box<dyn Transport>>, len: usize, chunk: usize, inline_bytes: usize) {
    use super::plan::{ring, Phases};
    let world = transports.len();
    let value = |rank: usize, i: usize| ((rank * 7919 + i * 31) % 97) as f32;
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let ranks: Vec<_> = transports
            .into_iter()
            .enumerate()
            .map(|(rank, transport)| {
                s.spawn(move || {
                    let (next_rank, prev_rank) = ((rank + 1) % world, (rank + world - 1) % world);
                    let link = Link { transport, next_rank, prev_rank, inline_bytes };
                    let timeout = Duration::from_secs(10);
                    let watch = Watch { op: "all_reduce", seq: 0, rank, timeout, stall_warning: timeout };
                    let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
                    let plan = ring(len, world, rank, chunk, Phases::Both);
                    run(&watch, &link, &mut [&mut buf[..]], &plan, ReduceOp::Sum, 1.0, &mut Vec::new()).unwrap();
                    buf
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let want: Vec<f32> = (0..len).map(|i| (0..world).map(|r| value(r, i)).sum()).collect();
    for (rank, got) in results.iter().enumerate() {
        assert_eq!(got, &want, "world {world}, rank {rank}, inline below {inline_bytes} bytes");
    }
}

#[cfg(test)]
mod tests {
    //! The pipeline over a transport without sockets: the seam another
    //! transport plugs into runs the same schedule to the same result.

    use std::collections::VecDeque;
    use std::sync::Arc;

    use super::*;

    /// Bytes from one rank to the next, in memory; closed once interrupted.
    #[derive(Default)]
    struct Pipe {
        bytes: Mutex<(VecDeque<u8>, bool)>,
        ready: Condvar,
    }

    impl Pipe {
        fn close(&self) {
            self.bytes.lock().unwrap().1 = true;
            self.ready.notify_all();
        }
    }

    struct MemoryPair {
        next: Arc<Pipe>,
        prev: Arc<Pipe>,
    }

    impl Transport for MemoryPair {
        fn send(&self, bytes: &[u8]) -> io::Result<()> {
            let mut pipe = self.next.bytes.lock().unwrap();
            if pipe.1 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            pipe.0.extend(bytes);
            self.next.ready.notify_all();
            Ok(())
        }

        fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            let mut pipe = self.prev.bytes.lock().unwrap();
            if pipe.0.is_empty() && !pipe.1 {
                pipe = self.prev.ready.wait_timeout(pipe, Duration::from_millis(10)).unwrap().0;
            }
            if pipe.0.is_empty() {
                return if pipe.1 { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
            }
            let n = buf.len().min(pipe.0.len());
            buf.iter_mut().zip(pipe.0.drain(..n)).for_each(|(d, s)| *d = s);
            Ok(n)
        }

        fn set_timeouts(&self, _: Duration, _: Duration) -> io::Result<()> {
            Ok(())
        }

        fn interrupt_send(&self) {
            self.next.close();
        }

        fn interrupt_recv(&self) {
            self.prev.close();
        }
    }

    #[test]
    fn the_ring_runs_its_plan_over_a_transport_in_memory() {
        for world in [2, 3] {
            // Everything on the calling thread, and sends on a thread of their own.
            for inline_bytes in [usize::MAX, 0] {
                let pipes: Vec<Arc<Pipe>> = (0..world).map(|_| Arc::default()).collect();
                let transports = (0..world)
                    .map(|rank| {
                        let prev = pipes[(rank + world - 1) % world].clone();
                        Box::new(MemoryPair { next: pipes[rank].clone(), prev }) as Box<dyn Transport>
                    })
                    .collect();
                ring_sums(transports, 1001, 64, inline_bytes);
            }
        }
    }
}

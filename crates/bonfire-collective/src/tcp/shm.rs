//! The ring's link between processes on one host: each direction's bytes
//! pass through a ring buffer in shared memory (a file in `/dev/shm`)
//! instead of the loopback TCP stack, which costs two kernel copies and a
//! system call per few kilobytes on the cores that run backward.
//!
//! The ring's sockets stay open beside it: the offer of a buffer travels
//! over them, so a buffer is used only where the neighbour could open the
//! very file its rank created (same host, same `/dev/shm`), and a
//! neighbour's death closes them, which is how a waiting rank learns of it.
//! A direction whose buffer was not taken stays on its socket. A waiting
//! side sleeps on a futex in the buffer's header, woken by the other side
//! only when it said it sleeps.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::transport::{TcpPair, Transport};

const MAGIC: u64 = u64::from_le_bytes(*b"BFRSHM01");
/// Where the data starts in a buffer's file: its header has a page.
const DATA: usize = 4096;
/// Where buffers' files are made, and how their names start: the only
/// files a rank maps or removes on its neighbour's word.
const PREFIX: (&str, &str) = ("/dev/shm", "bonfire-ring-");
/// How long a waiting side spins before it sleeps: a chunk from a busy
/// peer often lands within it, and a sleep costs two system calls.
const SPINS: u32 = 200;

/// The header at the start of a buffer's file; each field that one side
/// writes sits on a cache line of its own.
#[repr(C)]
struct Header {
    magic: AtomicU64,
    nonce: [AtomicU64; 2],
    /// Bytes written since the start, by the sender.
    head: Line<AtomicU64>,
    /// Bytes read since the start, by the receiver.
    tail: Line<AtomicU64>,
    /// Bumped by the sender after each write; the receiver sleeps on it.
    written: Line<Futex>,
    /// Bumped by the receiver after each read; the sender sleeps on it.
    read: Line<Futex>,
    /// Set by either side when it leaves: no more bytes will come or go.
    closed: Line<AtomicU32>,
}

#[repr(C, align(64))]
struct Line<T>(T);

#[repr(C)]
struct Futex {
    seq: AtomicU32,
    /// Non-zero while the other side sleeps on `seq` (or is about to).
    sleeping: AtomicU32,
}

impl Futex {
    /// Wakes the other side if it sleeps: after a write or a read is published.
    fn bump(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) != 0 {
            futex(&self.seq, libc::FUTEX_WAKE, i32::MAX as u32, None);
        }
    }

    /// Waits until `ready` holds or `wait` has passed; whether it holds.
    fn wait_for(&self, wait: Duration, ready: impl Fn() -> bool) -> bool {
        for _ in 0..SPINS {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        self.sleeping.store(1, Ordering::SeqCst);
        let seen = self.seq.load(Ordering::SeqCst);
        // A bump after `seen` was read makes the wait return at once.
        if !ready() {
            futex(&self.seq, libc::FUTEX_WAIT, seen, Some(wait));
        }
        self.sleeping.store(0, Ordering::SeqCst);
        ready()
    }
}

fn futex(word: &AtomicU32, op: libc::c_int, val: u32, wait: Option<Duration>) {
    let ts = wait.map(|d| libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as _ });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` lives in a mapping shared between processes, so the
    // futex is not private; a timeout, a wake or a changed value all return.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), op, val, ts_ptr, std::ptr::null::<u32>(), 0) };
}

/// One direction's buffer, mapped into this process.
struct Region {
    base: *mut u8,
    capacity: usize,
}

// SAFETY: the mapping is shared memory reached through atomics and, for
// the data, by one writer and one reader whose ranges the atomics separate.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn map(file: &File, capacity: usize) -> io::Result<Self> {
        let len = DATA + capacity;
        // SAFETY: a fresh shared mapping of a file at least `len` long.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region { base: base.cast(), capacity })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a page for the header, all atomics.
        unsafe { &*(self.base as *const Header) }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: inside the mapping.
        unsafe { self.base.add(DATA) }
    }

    /// Copies as much of `bytes` as fits; how much.
    fn write(&self, bytes: &[u8]) -> usize {
        let h = self.header();
        let head = h.head.0.load(Ordering::Relaxed);
        let tail = h.tail.0.load(Ordering::Acquire);
        let n = (self.capacity - (head - tail) as usize).min(bytes.len());
        if n == 0 {
            return 0;
        }
        let at = head as usize % self.capacity;
        let first = n.min(self.capacity - at);
        // SAFETY: bytes from `head` to `tail + capacity` are the sender's
        // until it publishes them by moving `head`.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data().add(at), first);
            std::ptr::copy_nonoverlapping(bytes[first..].as_ptr(), self.data(), n - first);
        }
        h.head.0.store(head + n as u64, Ordering::Release);
        h.written.0.bump();
        n
    }

    /// Copies at most `buf.len()` of the bytes waiting; how many.
    fn read(&self, buf: &mut [u8]) -> usize {
        let h = self.header();
        let tail = h.tail.0.load(Ordering::Relaxed);
        let head = h.head.0.load(Ordering::Acquire);
        let n = ((head - tail) as usize).min(buf.len());
        if n == 0 {
            return 0;
        }
        let at = tail as usize % self.capacity;
        let first = n.min(self.capacity - at);
        // SAFETY: bytes from `tail` to `head` are published and the
        // receiver's until it moves `tail`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data().add(at), buf.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(self.data(), buf[first..].as_mut_ptr(), n - first);
        }
        h.tail.0.store(tail + n as u64, Ordering::Release);
        h.read.0.bump();
        n
    }

    fn has_data(&self) -> bool {
        let h = self.header();
        h.head.0.load(Ordering::Acquire) != h.tail.0.load(Ordering::Relaxed)
    }

    fn has_room(&self) -> bool {
        let h = self.header();
        h.head.0.load(Ordering::Relaxed) - h.tail.0.load(Ordering::Acquire) < self.capacity as u64
    }

    fn closed(&self) -> bool {
        self.header().closed.0.load(Ordering::Acquire) != 0
    }

    /// No more bytes go either way; wakes whichever side sleeps.
    fn close(&self) {
        let h = self.header();
        h.closed.0.store(1, Ordering::Release);
        h.written.0.bump();
        h.read.0.bump();
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.close();
        // SAFETY: the mapping made in `map`, used by nobody after this.
        unsafe { libc::munmap(self.base.cast(), DATA + self.capacity) };
    }
}

/// A ring link whose directions go through shared memory where the
/// neighbour took the offer, and through the sockets otherwise.
pub(crate) struct HostPair {
    sockets: TcpPair,
    /// To the next rank.
    out: Option<Region>,
    /// From the previous rank.
    inp: Option<Region>,
    poll_tick_ns: AtomicU64,
    send_timeout_ns: AtomicU64,
    send_interrupted: AtomicBool,
    recv_interrupted: AtomicBool,
}

impl HostPair {
    /// Offers the next rank a buffer of `capacity` bytes and takes the
    /// previous rank's offer, over the ring's sockets; a direction whose
    /// offer fails for any reason (another host, no `/dev/shm`) keeps its
    /// socket. Fails only if the sockets do, or past `deadline`.
    pub fn negotiate(sockets: TcpPair, capacity: usize, deadline: Instant) -> io::Result<Self> {
        let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        sockets.prev.set_read_timeout(Some(wait))?;
        sockets.next.set_read_timeout(Some(wait))?;
        let capacity = capacity.next_power_of_two().max(4096);
        let offer = create(capacity)
            .map_err(|e| tracing::debug!("ring: no shared-memory buffer for the next rank ({e}); it stays on TCP"))
            .ok();
        // Each rank writes its offer before it reads one: both fit in the sockets' buffers.
        (&sockets.next).write_all(&encode_offer(offer.as_ref().map(|(path, nonce, _)| (path, *nonce))))?;
        let inp = read_offer(&sockets.prev)?.and_then(|(path, nonce)| {
            let taken = open(&path, nonce);
            if taken.is_ok() {
                let _ = std::fs::remove_file(&path); // both sides hold it mapped; nothing is left behind
            }
            taken
                .map_err(|e| tracing::debug!("ring: the previous rank's buffer {path:?} is not usable here ({e})"))
                .ok()
        });
        (&sockets.prev).write_all(&[inp.is_some() as u8])?;
        let mut answer = [0u8];
        (&sockets.next).read_exact(&mut answer)?;
        let out = match offer {
            Some((path, _, region)) => {
                let _ = std::fs::remove_file(path);
                (answer[0] == 1).then_some(region)
            }
            None => None,
        };
        Ok(HostPair {
            sockets,
            out,
            inp,
            poll_tick_ns: AtomicU64::new(10_000_000),
            send_timeout_ns: AtomicU64::new(u64::MAX),
            send_interrupted: AtomicBool::new(false),
            recv_interrupted: AtomicBool::new(false),
        })
    }

    /// Whether (to the next rank, from the previous) go through shared memory.
    pub fn shared(&self) -> (bool, bool) {
        (self.out.is_some(), self.inp.is_some())
    }

    /// Room in the buffer to the next rank, or the socket's where there is none.
    pub fn out_capacity(&self) -> Option<usize> {
        self.out.as_ref().map(|r| r.capacity)
    }

    fn poll_tick(&self) -> Duration {
        Duration::from_nanos(self.poll_tick_ns.load(Ordering::Relaxed))
    }
}

impl Transport for HostPair {
    fn send(&self, mut bytes: &[u8]) -> io::Result<()> {
        let Some(out) = &self.out else { return self.sockets.send(bytes) };
        let started = Instant::now();
        let timeout = Duration::from_nanos(self.send_timeout_ns.load(Ordering::Relaxed));
        while !bytes.is_empty() {
            if self.send_interrupted.load(Ordering::Acquire) || out.closed() {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = out.write(bytes);
            if n > 0 {
                bytes = &bytes[n..];
                continue;
            }
            if started.elapsed() >= timeout {
                return Err(io::ErrorKind::TimedOut.into());
            }
            if !out.header().read.0.wait_for(self.poll_tick(), || out.has_room() || out.closed())
                && hung_up(&self.sockets.next)
            {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(inp) = &self.inp else { return self.sockets.recv(buf) };
        let ready = || inp.has_data() || inp.closed() || self.recv_interrupted.load(Ordering::Acquire);
        if !inp.header().written.0.wait_for(self.poll_tick(), ready) {
            // A tick of silence: the previous rank is slow, or dead.
            return if hung_up(&self.sockets.prev) { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
        }
        if self.recv_interrupted.load(Ordering::Acquire) {
            return Ok(0);
        }
        // A closed buffer still hands out what was written before it closed.
        Ok(inp.read(buf))
    }

    fn set_timeouts(&self, poll_tick: Duration, send_timeout: Duration) -> io::Result<()> {
        self.poll_tick_ns.store(poll_tick.as_nanos() as u64, Ordering::Relaxed);
        self.send_timeout_ns.store(send_timeout.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.sockets.set_timeouts(poll_tick, send_timeout)
    }

    fn interrupt_send(&self) {
        self.send_interrupted.store(true, Ordering::Release);
        if let Some(out) = &self.out {
            out.close();
        }
        self.sockets.interrupt_send();
    }

    fn interrupt_recv(&self) {
        self.recv_interrupted.store(true, Ordering::Release);
        if let Some(inp) = &self.inp {
            inp.close();
        }
        self.sockets.interrupt_recv();
    }
}

/// Whether the peer at the other end of `socket` has gone (its process
/// ended or it closed the link). Neither neighbour writes to the socket of
/// a direction that runs through shared memory, so any end of stream there
/// is the peer leaving.
fn hung_up(socket: &std::net::TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local, without blocking.
    let n = unsafe {
        libc::recv(socket.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    n == 0
        || (n < 0
            && !matches!(io::Error::last_os_error().kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted))
}

/// A fresh buffer file, readable by this user alone, named at random.
fn create(capacity: usize) -> io::Result<(PathBuf, [u64; 2], Region)> {
    let nonce = random_nonce()?;
    let path = PathBuf::from(PREFIX.0).join(format!("{}{}-{:016x}", PREFIX.1, std::process::id(), nonce[0]));
    let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
    // Reserved now, so that a full `/dev/shm` fails here and not as a
    // SIGBUS on a later write into the mapping.
    // SAFETY: a file this function just opened.
    let reserved = match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, (DATA + capacity) as libc::off_t) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    };
    let mapped = reserved.and_then(|()| Region::map(&file, capacity));
    let region = match mapped {
        Ok(region) => region,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    };
    let h = region.header();
    h.nonce[0].store(nonce[0], Ordering::Relaxed);
    h.nonce[1].store(nonce[1], Ordering::Relaxed);
    h.magic.store(MAGIC, Ordering::Release);
    Ok((path, nonce, region))
}

/// Maps the previous rank's buffer if it is the one it offered.
fn open(path: &PathBuf, nonce: [u64; 2]) -> io::Result<Region> {
    let name = path.strip_prefix(PREFIX.0).ok().and_then(|n| n.to_str()).unwrap_or("");
    if !name.starts_with(PREFIX.1) || name.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a ring buffer's name"));
    }
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len() as usize;
    let capacity = len.checked_sub(DATA).filter(|c| c.is_power_of_two()).ok_or(io::ErrorKind::InvalidData)?;
    // The header's first words (magic, nonce), read before mapping, so that
    // another file is never mapped, nor marked closed when dropped.
    let mut head = [0u8; 24];
    file.read_exact(&mut head)?;
    let word = |i: usize| u64::from_ne_bytes(head[8 * i..8 * i + 8].try_into().unwrap());
    if word(0) != MAGIC || [word(1), word(2)] != nonce {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "another file under that name"));
    }
    Region::map(&file, capacity)
}

fn random_nonce() -> io::Result<[u64; 2]> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok([u64::from_le_bytes(bytes[..8].try_into().unwrap()), u64::from_le_bytes(bytes[8..].try_into().unwrap())])
}

/// An offer on the wire: the nonce, and the path's length and bytes (no
/// path: no offer).
fn encode_offer(offer: Option<(&PathBuf, [u64; 2])>) -> Vec<u8> {
    let (path, nonce) = offer.map_or((&[][..], [0, 0]), |(p, n)| (p.as_os_str().as_encoded_bytes(), n));
    let mut out = Vec::with_capacity(20 + path.len());
    out.extend(nonce[0].to_le_bytes());
    out.extend(nonce[1].to_le_bytes());
    out.extend((path.len() as u32).to_le_bytes());
    out.extend(path);
    out
}

fn read_offer(mut socket: &std::net::TcpStream) -> io::Result<Option<(PathBuf, [u64; 2])>> {
    let mut fixed = [0u8; 20];
    socket.read_exact(&mut fixed)?;
    let word = |i: usize| u64::from_le_bytes(fixed[i..i + 8].try_into().unwrap());
    let len = u32::from_le_bytes(fixed[16..20].try_into().unwrap()) as usize;
    if len > 4096 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a shared-memory offer with an overlong path"));
    }
    let mut path = vec![0u8; len];
    socket.read_exact(&mut path)?;
    let path = String::from_utf8(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    Ok((len > 0).then(|| (PathBuf::from(path), [word(0), word(8)])))
}

#[cfg(test)]
mod tests {
    //! The pipeline over shared memory between threads of this test: the
    //! buffers are real mappings of `/dev/shm` files and the offers cross
    //! real loopback sockets, as between processes.

    use std::net::{TcpListener, TcpStream};

    use super::super::pipeline::ring_sums;
    use super::*;

    /// The ring's sockets for `world` ranks, each rank's pair negotiated
    /// on a thread of its own (every rank reads its neighbour's offer).
    fn host_pairs(world: usize, capacity: usize) -> Vec<HostPair> {
        let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let nexts: Vec<TcpStream> =
            (0..world).map(|r| TcpStream::connect(listeners[(r + 1) % world].local_addr().unwrap()).unwrap()).collect();
        let prevs: Vec<TcpStream> = listeners.iter().map(|l| l.accept().unwrap().0).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        std::thread::scope(|s| {
            let handles: Vec<_> = nexts
                .into_iter()
                .zip(prevs)
                .map(|(next, prev)| s.spawn(move || HostPair::negotiate(TcpPair { next, prev }, capacity, deadline)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        })
    }

    #[test]
    fn the_ring_runs_its_plan_through_shared_memory() {
        for world in [2, 3] {
            // Everything on the calling thread (whose sends must fit in the
            // buffer), and sends on a thread of their own through a buffer
            // of one page, so that writes wrap around it and both sides
            // wait for each other.
            for (inline_bytes, capacity) in [(usize::MAX, 1 << 20), (0, 4096)] {
                let pairs = host_pairs(world, capacity);
                assert!(pairs.iter().all(|p| p.shared() == (true, true)), "neighbours on one host share memory");
                let transports = pairs.into_iter().map(|p| Box::new(p) as Box<dyn Transport>).collect();
                ring_sums(transports, 10_001, 333, inline_bytes);
            }
        }
    }

    #[test]
    fn a_neighbour_that_leaves_ends_the_stream_and_fails_sends() {
        let mut pairs = host_pairs(2, 4096);
        let rank1 = pairs.pop().unwrap();
        let rank0 = pairs.pop().unwrap();
        rank0.set_timeouts(Duration::from_millis(20), Duration::from_secs(10)).unwrap();
        rank1.send(&[7; 100]).unwrap();
        drop(rank1);
        // What it wrote before it left still arrives; then the stream ends.
        let mut buf = [0u8; 256];
        assert_eq!(rank0.recv(&mut buf).unwrap(), 100);
        assert_eq!(rank0.recv(&mut buf).unwrap(), 0);
        assert_eq!(rank0.send(&[0; 8192]).unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn silence_is_reported_each_tick_and_an_interrupt_wakes_a_waiting_receive() {
        let pairs = host_pairs(2, 4096);
        let rank0 = &pairs[0];
        rank0.set_timeouts(Duration::from_millis(20), Duration::from_secs(10)).unwrap();
        let mut buf = [0u8; 16];
        let started = Instant::now();
        assert_eq!(rank0.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert!(started.elapsed() < Duration::from_secs(1), "a tick, not the timeout: {:?}", started.elapsed());
        rank0.set_timeouts(Duration::from_secs(30), Duration::from_secs(30)).unwrap();
        std::thread::scope(|s| {
            let waiting = s.spawn(|| {
                let started = Instant::now();
                (rank0.recv(&mut [0u8; 16]).unwrap(), started.elapsed())
            });
            std::thread::sleep(Duration::from_millis(100));
            rank0.interrupt_recv();
            let (n, waited) = waiting.join().unwrap();
            assert_eq!(n, 0);
            assert!(waited < Duration::from_secs(5), "woken by the interrupt, not the tick: {waited:?}");
        });
    }

    #[test]
    fn a_buffer_is_mapped_only_with_the_nonce_it_was_offered_with() {
        let (path, nonce, _region) = create(4096).unwrap();
        let err = open(&path, [nonce[0], !nonce[1]]).err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(open(&path, nonce).unwrap().capacity, 4096);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn an_offer_of_a_file_outside_the_ring_buffers_is_refused() {
        let dir = std::env::temp_dir().join(format!("bonfire-shm-test-{}", std::process::id()));
        std::fs::write(&dir, [0u8; 8192]).unwrap();
        let err = open(&dir, [1, 2]).err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(dir.exists(), "a file that is not a ring buffer is left alone");
        std::fs::remove_file(dir).unwrap();
    }
}

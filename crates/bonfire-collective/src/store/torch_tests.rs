//! The TCPStore client against PyTorch's framing, byte for byte, and
//! against a store that speaks it (written here from PyTorch's server, so
//! the client is tested without Python); the real torchrun is tested in
//! `bonfire-train`'s torchrun tests.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::{Communicator, DistEnv, JobToken, ReduceOp, TcpCommunicator, TcpConfig, TorchrunStore};

/// A byte string of PyTorch's framing: a length as u64, then the bytes.
fn s(bytes: &[u8]) -> Vec<u8> {
    [&(bytes.len() as u64).to_le_bytes()[..], bytes].concat()
}

#[test]
fn every_query_is_framed_as_pytorchs_client_frames_it() {
    let golden: [(Query, Vec<u8>); 8] = [
        (Query::Validate, vec![0, 0xCE, 0xF7, 0x85, 0x3C]),
        (Query::Ping(0x0102_0304), vec![13, 4, 3, 2, 1]),
        (Query::Set("ab".into(), vec![9]), [vec![1], s(b"ab"), s(&[9])].concat()),
        (Query::Get("k".into()), [vec![3], s(b"k")].concat()),
        (Query::Add("k".into(), -2), [vec![4], s(b"k"), (-2i64).to_le_bytes().to_vec()].concat()),
        (
            Query::Check(vec!["a".into(), "bc".into()]),
            [vec![5], 2u64.to_le_bytes().to_vec(), s(b"a"), s(b"bc")].concat(),
        ),
        (Query::Wait(vec!["a".into()]), [vec![6], 1u64.to_le_bytes().to_vec(), s(b"a")].concat()),
        (Query::CancelWait, vec![12]),
    ];
    for (query, bytes) in golden {
        assert_eq!(query.encode(), bytes, "{query:?}");
    }
}

/// A TCPStore server as PyTorch's answers: a thread per connection over
/// one map; `ADD` keeps its counter as decimal text, as PyTorch's does.
struct PytorchFramedStore {
    port: u16,
}

#[derive(Default)]
struct Keys {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl PytorchFramedStore {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let keys = Arc::new(Keys::default());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let keys = keys.clone();
                std::thread::spawn(move || serve(conn, &keys));
            }
        });
        PytorchFramedStore { port }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn serve(mut conn: TcpStream, keys: &Keys) -> Option<()> {
    fn u64_(c: &mut TcpStream) -> Option<u64> {
        let mut b = [0; 8];
        c.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn bytes(c: &mut TcpStream) -> Option<Vec<u8>> {
        let mut b = vec![0; u64_(c)? as usize];
        c.read_exact(&mut b).ok()?;
        Some(b)
    }
    fn string(c: &mut TcpStream) -> Option<String> {
        String::from_utf8(bytes(c)?).ok()
    }
    fn strings(c: &mut TcpStream) -> Option<Vec<String>> {
        (0..u64_(c)?).map(|_| string(c)).collect()
    }
    let all_set = |k: &[String]| {
        let map = keys.map.lock().unwrap();
        k.iter().all(|k| map.contains_key(k))
    };
    loop {
        let mut query = [0u8];
        conn.read_exact(&mut query).ok()?;
        match query[0] {
            0 => {
                let mut magic = [0; 4];
                conn.read_exact(&mut magic).ok()?;
                (u32::from_le_bytes(magic) == 0x3C85_F7CE).then_some(())?;
            }
            13 => {
                let mut nonce = [0; 4];
                conn.read_exact(&mut nonce).ok()?;
                conn.write_all(&nonce).ok()?;
            }
            1 => {
                let (key, value) = (string(&mut conn)?, bytes(&mut conn)?);
                keys.map.lock().unwrap().insert(key, value);
                keys.changed.notify_all();
            }
            3 => {
                let key = string(&mut conn)?;
                let value = keys.map.lock().unwrap().get(&key).cloned()?;
                conn.write_all(&s(&value)).ok()?;
            }
            4 => {
                let key = string(&mut conn)?;
                let mut delta = [0; 8];
                conn.read_exact(&mut delta).ok()?;
                let mut map = keys.map.lock().unwrap();
                let old: i64 = map.get(&key).map_or(0, |v| String::from_utf8_lossy(v).parse().unwrap());
                let new = old + i64::from_le_bytes(delta);
                map.insert(key, new.to_string().into_bytes());
                drop(map);
                keys.changed.notify_all();
                conn.write_all(&new.to_le_bytes()).ok()?;
            }
            5 => {
                let k = strings(&mut conn)?;
                conn.write_all(&[u8::from(!all_set(&k))]).ok()?;
            }
            6 => {
                // Answers once every key is set, or a cancel comes first.
                let k = strings(&mut conn)?;
                conn.set_read_timeout(Some(Duration::from_millis(10))).ok()?;
                let answer = loop {
                    if all_set(&k) {
                        break 0;
                    }
                    let mut cancel = [0u8];
                    match conn.read(&mut cancel) {
                        Ok(1) if cancel[0] == 12 => break 1,
                        Ok(_) => return None,
                        Err(_) => {}
                    }
                };
                conn.set_read_timeout(None).ok()?;
                conn.write_all(&[answer]).ok()?;
            }
            12 => conn.write_all(&[1]).ok()?,
            _ => return None,
        }
    }
}

#[test]
fn the_client_sets_gets_adds_and_waits_on_a_store_framed_as_pytorchs() {
    exercise(&PytorchFramedStore::start().addr());
}

/// The same against PyTorch's own TCPStore server, when a Python with
/// torch is named (`BONFIRE_TORCH_PYTHON`); says so when there is none.
#[test]
fn the_client_sets_gets_adds_and_waits_on_pytorchs_own_tcpstore() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let Some(python) = bonfire_testkit::torch_python("PyTorch's TCPStore") else { return };
    let script = "import sys, datetime\n\
                  from torch.distributed import TCPStore\n\
                  s = TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))\n\
                  print(s.port, flush=True)\n\
                  sys.stdin.read()\n";
    let mut server =
        Command::new(python).args(["-c", script]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut port = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut port).unwrap();
    exercise(&format!("127.0.0.1:{}", port.trim()));
    drop(server.stdin.take()); // the server ends with its input
    server.wait().unwrap();
}

/// Sets, gets, adds and waits (one wait timing out and cancelled) through
/// two clients of the store at `addr`, and a third of another attempt.
fn exercise(addr: &str) {
    let second = Duration::from_secs(1);
    let mut a = TorchStoreClient::connect(addr, "/job/attempt_0/", second).unwrap();
    let mut b = TorchStoreClient::connect(addr, "/job/attempt_0/", second).unwrap();
    a.set("x", b"value").unwrap();
    assert_eq!(b.get("x", second).unwrap().as_deref(), Some(&b"value"[..]));
    assert_eq!(a.add("n", 2).unwrap(), 2);
    assert_eq!(b.add("n", 5).unwrap(), 7);
    // A wait that times out is cancelled, and the connection goes on.
    let started = Instant::now();
    assert_eq!(b.get("late", Duration::from_millis(200)).unwrap(), None);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(b.get("late", Duration::ZERO).unwrap(), None);
    assert_eq!(b.wait(&["x".into(), "late".into(), "n".into()], Duration::from_millis(50)).unwrap(), vec![1]);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            a.set("late", b"").unwrap();
        });
        assert_eq!(b.wait(&["x".into(), "late".into()], Duration::from_secs(10)).unwrap(), Vec::<usize>::new());
    });
    // Another attempt's prefix sees none of these keys.
    let mut next = TorchStoreClient::connect(addr, "/job/attempt_1/", second).unwrap();
    assert_eq!(next.get("x", Duration::ZERO).unwrap(), None);
    assert_eq!(next.add("n", 1).unwrap(), 1);
}

#[test]
fn a_port_that_is_not_a_tcpstore_is_named_not_waited_on() {
    // Bonfire's own store reads PyTorch's first bytes as an oversized frame
    // and hangs up.
    let server = crate::store::StoreServer::bind("127.0.0.1:0", "job").unwrap();
    let err = TorchStoreClient::connect(&server.addr().to_string(), "/", Duration::from_secs(2)).err().unwrap();
    assert!(err.to_string().contains("is it PyTorch's TCPStore?"), "{err}");
}

#[test]
fn a_ring_forms_through_torchruns_store_and_a_restarted_attempt_forms_again() {
    let store = PytorchFramedStore::start();
    for attempt in 0..2 {
        let sums: Vec<Vec<f32>> = std::thread::scope(|scope| {
            let ranks: Vec<_> = (0..3)
                .map(|rank| {
                    let env = DistEnv {
                        job_token: JobToken::InTorchrunStore,
                        torchrun_store: Some(TorchrunStore { run_id: "test".into(), attempt }),
                        ..DistEnv::local(rank, 3, store.port)
                    };
                    scope.spawn(move || {
                        let timeout = Duration::from_secs(20);
                        let mut comm = TcpCommunicator::connect(&env, TcpConfig { timeout, ..TcpConfig::default() })
                            .unwrap_or_else(|e| panic!("rank {rank}, attempt {attempt}: {e}"));
                        let mut data = vec![rank as f32 + 1.0; 1000];
                        comm.all_reduce(data.as_mut_slice().into(), ReduceOp::Sum).unwrap();
                        data
                    })
                })
                .collect();
            ranks.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for sum in sums {
            assert!(sum.iter().all(|&x| x == 6.0), "attempt {attempt}: {:?}", &sum[..3]);
        }
    }
}

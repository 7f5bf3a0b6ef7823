//! Joining a job: rank 0 hosts the rendezvous store at
//! `MASTER_ADDR:MASTER_PORT` (or, under torchrun, torchrun's agent already
//! serves its own there); every worker connects to it with the job token,
//! claims its rank, and checks that it agrees with rank 0 on the world size.
//! The TCP ring and NCCL both start here.

use std::time::{Duration, Instant};

use crate::env::{DistEnv, JobToken};
use crate::error::{CommError, Result};
use crate::store::{Store, StoreClient, StoreServer, TorchStoreClient};
use crate::token_file::{self, TokenFile};

/// The time left until `deadline`: every wait of joining a job (here, in
/// the ring's and NCCL's own setup) counts against one deadline.
pub(crate) fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// This worker's place at the rendezvous.
pub(crate) struct Rendezvous {
    pub store: Box<dyn Store>,
    /// The job's secret, which ring peers present to each other too.
    pub token: String,
    /// Rank 0's store server, which must live as long as the group.
    _server: Option<StoreServer>,
    /// Rank 0's token file, where the other ranks read the secret.
    _token_file: Option<TokenFile>,
}

impl Rendezvous {
    pub fn join(env: &DistEnv, deadline: Instant, timeout: Duration) -> Result<Self> {
        let addr = env.store_addr();
        let (store, token, server, token_file): (Box<dyn Store>, _, _, _) = match (&env.torchrun_store, &env.job_token)
        {
            (Some(torchrun), job_token) => {
                let mut store = TorchStoreClient::connect(&addr, &torchrun.key_prefix(), timeout)?;
                let token = match job_token {
                    JobToken::Given(token) => token.clone(),
                    _ => share_token(&mut store, env, deadline)?,
                };
                (Box::new(store), token, None, None)
            }
            (None, JobToken::HostFile) if env.rank == 0 => {
                let token = fresh_token()?;
                let server = host_store(env, &token)?;
                let file = TokenFile::publish(token_file::path(&addr)?, token.clone())?;
                (Box::new(StoreClient::connect(&addr, &token, timeout)?), token, Some(server), Some(file))
            }
            (None, JobToken::HostFile) => {
                let (store, token) = connect_through_file(env, deadline, timeout)?;
                (Box::new(store), token, None, None)
            }
            (None, given) => {
                let token = match given {
                    JobToken::Given(token) => token.clone(),
                    _ => String::new(),
                };
                if env.rank == 0 && token.is_empty() {
                    tracing::warn!(
                        "the rendezvous store at {addr} is open: anyone who reaches it can join the job ({}=1)",
                        crate::INSECURE_VAR
                    );
                }
                let server = if env.rank == 0 { Some(host_store(env, &token)?) } else { None };
                (Box::new(StoreClient::connect(&addr, &token, timeout)?), token, server, None)
            }
        };
        let mut rendezvous = Rendezvous { store, token, _server: server, _token_file: token_file };
        agree_on_group(rendezvous.store.as_mut(), env, deadline)?;
        Ok(rendezvous)
    }

    /// Another connection to the store, for a thread of its own.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))] // NCCL's heartbeat
    pub fn connect(&self, env: &DistEnv, timeout: Duration) -> Result<Box<dyn Store>> {
        Ok(match &env.torchrun_store {
            Some(torchrun) => Box::new(TorchStoreClient::connect(&env.store_addr(), &torchrun.key_prefix(), timeout)?),
            None => Box::new(StoreClient::connect(&env.store_addr(), &self.token, timeout)?),
        })
    }
}

/// A new job secret, made by rank 0.
fn fresh_token() -> Result<String> {
    token_file::random_token().map_err(|e| CommError::io("making the job token", e))
}

/// The ring's secret under torchrun's store: rank 0 makes it and leaves it
/// there, the others read it.
fn share_token(store: &mut TorchStoreClient, env: &DistEnv, deadline: Instant) -> Result<String> {
    if env.rank == 0 {
        let token = fresh_token()?;
        store.set("token", token.as_bytes())?;
        return Ok(token);
    }
    let waiting = remaining(deadline);
    let token =
        store.get("token", waiting)?.ok_or(CommError::Timeout { op: "rendezvous", rank: 0, waited: waiting })?;
    String::from_utf8(token)
        .map_err(|_| CommError::Protocol { peer: env.store_addr(), detail: "the job token is not UTF-8".into() })
}

/// Connects with the token rank 0 left in its file. A file an earlier job
/// left holds another token, which the store refuses: read it again until
/// rank 0 has replaced it.
fn connect_through_file(env: &DistEnv, deadline: Instant, timeout: Duration) -> Result<(StoreClient, String)> {
    let path = token_file::path(&env.store_addr())?;
    loop {
        let token = token_file::read(&path, deadline, timeout)?;
        match StoreClient::connect(&env.store_addr(), &token, remaining(deadline)) {
            Err(CommError::Refused { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            connected => return connected.map(|store| (store, token)),
        }
    }
}

/// Rank 0's store, listening only on `MASTER_ADDR`.
fn host_store(env: &DistEnv, token: &str) -> Result<StoreServer> {
    let server = StoreServer::bind(env.store_addr(), token).map_err(|e| match e {
        CommError::Io { cause, .. } => CommError::io(
            format!(
                "rank 0 cannot host the rendezvous store at {} (MASTER_ADDR:MASTER_PORT){}",
                env.store_addr(),
                if cause.kind() == std::io::ErrorKind::AddrInUse {
                    "; another program, another job or a second rank 0 holds that port"
                } else {
                    ""
                }
            ),
            cause,
        ),
        other => other,
    })?;
    tracing::debug!("rank 0 hosts the rendezvous store on {}", server.addr());
    Ok(server)
}

/// Makes sure this worker may join: its rank is not taken by another process
/// (the first to claim a rank keeps it), and its world size is rank 0's.
fn agree_on_group(store: &mut dyn Store, env: &DistEnv, deadline: Instant) -> Result<()> {
    let refused =
        |detail: String| CommError::Refused { peer: format!("the rendezvous at {}", env.store_addr()), detail };
    if store.add(&format!("claim/{}", env.rank), 1)? > 1 {
        return Err(refused(format!("rank {} is already taken by another worker (check RANK)", env.rank)));
    }
    if env.rank == 0 {
        return store.set("world", &(env.world_size as u64).to_le_bytes());
    }
    let waiting = remaining(deadline);
    let theirs =
        store.get("world", waiting)?.ok_or(CommError::Timeout { op: "rendezvous", rank: 0, waited: waiting })?;
    let theirs = theirs
        .try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| CommError::Protocol { peer: env.store_addr(), detail: "the world size is not 8 bytes".into() })?;
    if theirs != env.world_size as u64 {
        return Err(CommError::Mismatch {
            op: "rendezvous",
            rank: 0,
            detail: format!("its WORLD_SIZE is {theirs}, this worker's is {}", env.world_size),
        });
    }
    Ok(())
}

//! Joining a job: rank 0 hosts the rendezvous store at
//! `MASTER_ADDR:MASTER_PORT`; every worker connects to it with the job token,
//! claims its rank, and checks that it agrees with rank 0 on the world size.
//! The TCP ring and NCCL both start here.

use std::time::{Duration, Instant};

use crate::env::DistEnv;
use crate::error::{CommError, Result};
use crate::store::{StoreClient, StoreServer};

/// The time left until `deadline`: every wait of joining a job (here, in
/// the ring's and NCCL's own setup) counts against one deadline.
pub(crate) fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// This worker's place at the rendezvous.
pub(crate) struct Rendezvous {
    pub store: StoreClient,
    /// Rank 0's store server, which must live as long as the group.
    pub server: Option<StoreServer>,
}

impl Rendezvous {
    pub fn join(env: &DistEnv, deadline: Instant, timeout: Duration) -> Result<Self> {
        let server = if env.rank == 0 { Some(host_store(env)?) } else { None };
        let mut store = StoreClient::connect(&env.store_addr(), &env.job_token, timeout)?;
        agree_on_group(&mut store, env, deadline)?;
        Ok(Rendezvous { store, server })
    }
}

/// Rank 0's store, listening only on `MASTER_ADDR`.
fn host_store(env: &DistEnv) -> Result<StoreServer> {
    let server = StoreServer::bind(env.store_addr(), &env.job_token).map_err(|e| match e {
        CommError::Io { source, .. } => CommError::io(
            format!(
                "rank 0 cannot host the rendezvous store at {} (MASTER_ADDR:MASTER_PORT){}",
                env.store_addr(),
                if source.kind() == std::io::ErrorKind::AddrInUse {
                    "; another program, another job or a second rank 0 holds that port"
                } else {
                    ""
                }
            ),
            source,
        ),
        other => other,
    })?;
    tracing::debug!("rank 0 hosts the rendezvous store on {}", server.addr());
    Ok(server)
}

/// Makes sure this worker may join: its rank is not taken by another process
/// (the first to claim a rank keeps it), and its world size is rank 0's.
fn agree_on_group(store: &mut StoreClient, env: &DistEnv, deadline: Instant) -> Result<()> {
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

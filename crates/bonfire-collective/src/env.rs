//! torchrun's environment contract: what a launcher tells each worker.

use crate::error::{CommError, Result};

/// Where this worker sits in the job, as torchrun (and `bonfire launch`) describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`: this worker's global rank.
    pub rank: usize,
    /// `WORLD_SIZE`: how many workers the job has.
    pub world_size: usize,
    /// `LOCAL_RANK`: the rank on this host (picks the device). Defaults to `RANK`.
    pub local_rank: usize,
    /// `LOCAL_WORLD_SIZE`: workers on this host. Defaults to `WORLD_SIZE`.
    pub local_world_size: usize,
    /// `MASTER_ADDR`: the host of rank 0, which runs the rendezvous store.
    pub master_addr: String,
    /// `MASTER_PORT`: the store's port.
    pub master_port: u16,
    /// `BONFIRE_JOB_TOKEN`: the secret every worker of the job presents to
    /// the rendezvous store and to its ring peers. `bonfire launch` makes a
    /// fresh one per job; empty when unset.
    pub job_token: String,
}

/// The variable that carries the job token.
pub const JOB_TOKEN_VAR: &str = "BONFIRE_JOB_TOKEN";

impl DistEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `lookup`, so that a caller (or a test) can
    /// supply them without touching the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let required = |var: &'static str| {
            lookup(var).ok_or_else(|| CommError::Env {
                var,
                detail: "is not set (a launcher such as `bonfire launch` or torchrun sets it)".into(),
            })
        };
        let number = |var: &'static str, value: String| {
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| CommError::Env { var, detail: format!("{value:?} is not a non-negative integer") })
        };
        let rank = number("RANK", required("RANK")?)?;
        let world_size = number("WORLD_SIZE", required("WORLD_SIZE")?)?;
        if world_size == 0 {
            return Err(CommError::Env { var: "WORLD_SIZE", detail: "must be at least 1".into() });
        }
        if rank >= world_size {
            return Err(CommError::Env { var: "RANK", detail: format!("{rank} is not below WORLD_SIZE={world_size}") });
        }
        let local_rank = match lookup("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", v)?,
            None => rank,
        };
        let local_world_size = match lookup("LOCAL_WORLD_SIZE") {
            Some(v) => number("LOCAL_WORLD_SIZE", v)?,
            None => world_size,
        };
        if local_world_size == 0 || local_world_size > world_size {
            return Err(CommError::Env {
                var: "LOCAL_WORLD_SIZE",
                detail: format!("{local_world_size} must be between 1 and WORLD_SIZE={world_size}"),
            });
        }
        if local_rank >= local_world_size {
            return Err(CommError::Env {
                var: "LOCAL_RANK",
                detail: format!("{local_rank} is not below LOCAL_WORLD_SIZE={local_world_size}"),
            });
        }
        let master_addr = required("MASTER_ADDR")?;
        if master_addr.trim().is_empty() {
            return Err(CommError::Env { var: "MASTER_ADDR", detail: "is empty".into() });
        }
        let port = required("MASTER_PORT")?;
        let master_port = match port.trim().parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Err(CommError::Env {
                    var: "MASTER_PORT",
                    detail: format!("{port:?} is not a port number between 1 and 65535"),
                })
            }
        };
        let job_token = lookup(JOB_TOKEN_VAR).unwrap_or_default();
        if job_token.len() > crate::store::MAX_TOKEN {
            return Err(CommError::Env {
                var: JOB_TOKEN_VAR,
                detail: format!("is longer than {} bytes", crate::store::MAX_TOKEN),
            });
        }
        Ok(DistEnv { rank, world_size, local_rank, local_world_size, master_addr, master_port, job_token })
    }

    /// `MASTER_ADDR:MASTER_PORT`, bracketing an IPv6 address.
    pub fn store_addr(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_lookup(|k| map.get(k).cloned())
    }

    const GOOD: [(&str, &str); 6] = [
        ("RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];

    fn without(var: &str) -> Vec<(&'static str, &'static str)> {
        GOOD.iter().copied().filter(|(k, _)| *k != var).collect()
    }

    fn with(var: &'static str, value: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut v = without(var);
        v.push((var, value));
        v
    }

    #[test]
    fn reads_the_torchrun_contract() {
        let e = env(&GOOD).unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (1, 4, 1, 2));
        assert_eq!(e.store_addr(), "127.0.0.1:29500");
    }

    #[test]
    fn local_variables_default_to_the_global_ones() {
        let pairs: Vec<_> = without("LOCAL_RANK").into_iter().filter(|(k, _)| *k != "LOCAL_WORLD_SIZE").collect();
        let e = env(&pairs).unwrap();
        assert_eq!((e.local_rank, e.local_world_size), (1, 4));
    }

    #[test]
    fn every_missing_required_variable_is_named() {
        for var in ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
            let err = env(&without(var)).unwrap_err().to_string();
            assert!(err.contains(var) && err.contains("not set"), "{var}: {err}");
        }
    }

    #[test]
    fn every_invalid_variable_is_named() {
        let cases = [
            ("RANK", "one"),
            ("RANK", "4"),
            ("RANK", "-1"),
            ("WORLD_SIZE", "0"),
            ("WORLD_SIZE", "x"),
            ("LOCAL_RANK", "2"),
            ("LOCAL_WORLD_SIZE", "9"),
            ("MASTER_ADDR", " "),
            ("MASTER_PORT", "70000"),
            ("MASTER_PORT", "0"),
            ("MASTER_PORT", "http"),
        ];
        for (var, value) in cases {
            let err = env(&with(var, value)).unwrap_err();
            assert!(matches!(err, CommError::Env { var: v, .. } if v == var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn ipv6_master_is_bracketed() {
        let e = env(&with("MASTER_ADDR", "::1")).unwrap();
        assert_eq!(e.store_addr(), "[::1]:29500");
    }
}

//! The rendezvous store: a small TCP key-value store hosted by rank 0.
//!
//! Workers use it to find each other (ring peer addresses, the NCCL unique
//! id) and, with NCCL, to publish their [heartbeat](crate::heartbeat). Every
//! message is a frame: a little-endian `u32` length, then that many bytes;
//! lengths are checked against `MAX_FRAME` before anything is allocated,
//! and a malformed frame closes only its connection. What a request looks
//! like on the wire is written once, in `wire.rs`, where it is encoded (by
//! the client) and decoded (by the server).
//!
//! The first frame of every connection must carry the job token (the
//! launcher's `BONFIRE_JOB_TOKEN`); a connection without it, or with another,
//! is refused, logged and closed before it can read or write a key.

mod client;
mod server;
mod wire;

pub use client::StoreClient;
pub use server::StoreServer;
#[cfg(fuzzing)]
pub use wire::decode_connection;
pub(crate) use wire::same_token;
pub use wire::MAX_TOKEN;

//! Where sessions live.
//!
//! - [`sled::SledStore`]: the node's own disk. The whole store when no Redis is
//!   configured; otherwise the mirror of what this node served, and the journal
//!   of what it acknowledged while Redis was away.
//! - [`redis::RedisStore`]: the cluster's single source of truth when reachable.
//! - [`failover::Store`]: what the HTTP layer talks to. It composes the two and
//!   owns the switching, the probe and the replay.

pub mod failover;
pub mod journal;
pub mod redis;
pub mod sled;

pub use failover::Store;

use crate::session::{InputError, Session};

/// The outcome of a PATCH.
#[derive(Debug)]
pub enum PatchOutcome {
    Updated(Session),
    NotFound,
    /// `If-Match` named another version than the stored one.
    VersionMismatch {
        current: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("local store error: {0}")]
    Sled(#[from] ::sled::Error),
    #[error("redis: {0}")]
    Redis(String),
    /// Redis answered, but the record an operation touched is not one a
    /// node wrote (wrong key type, a field that is not a number...): the
    /// record is treated as absent, counted and logged; Redis is fine.
    #[error("corrupt record in redis: {0}")]
    CorruptRecord(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// What `/api/health` and `/metrics` report about the stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Redis,
    Sled,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Redis => "redis",
            Mode::Sled => "sled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreStatus {
    pub active: Mode,
    pub redis_configured: bool,
    pub redis_reachable: bool,
    pub pending_sync: u64,
    pub sessions_active: u64,
    pub failovers: u64,
    pub reconciliations: u64,
    pub replayed_ops: u64,
    pub corrupt_records: u64,
}

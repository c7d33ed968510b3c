//! Where sessions live.
//!
//! - [`local::SledStore`]: the node's own disk (its trees in the node's
//!   database, [`crate::disk`]). The whole store when no Redis is configured;
//!   otherwise the mirror of what this node served, and the journal of what
//!   it acknowledged while Redis was away.
//! - [`redis::RedisStore`]: the cluster's single source of truth when reachable.
//! - [`failover::Store`]: what the HTTP layer talks to. It composes the two and
//!   owns the switching, the probe and the replay.

pub mod failover;
pub mod local;
pub mod near;
pub mod redis;

pub use failover::Store;

use crate::disk::DiskError;
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
    /// Redis refuses the node's credentials or database: a configuration
    /// error, not an outage (it does not pass by itself).
    #[error("redis refuses this node's configuration: {0}")]
    RedisConfig(String),
    /// Redis answered, but the record an operation touched is not one a
    /// node wrote (wrong key type, a field that is not a number...): the
    /// record is treated as absent, counted and logged; Redis is fine.
    #[error("corrupt record in redis: {0}")]
    CorruptRecord(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// In fallback, a session this node does not hold: it may live in Redis,
    /// so it is neither "not found" nor replaced by a new one.
    #[error("this node does not hold the session and redis is unreachable")]
    NotHeld,
    /// The data directory's free space is at the reserve.
    #[error("disk almost full: {free} bytes free, {reserve} kept in reserve")]
    DiskFull { free: u64, reserve: u64 },
    /// Writing to the local disk failed (EIO, read-only file system...).
    #[error("local disk fault: {0}")]
    DiskFault(String),
    /// `max_sessions` are stored: no more are created.
    #[error("{stored} sessions stored, the ceiling is {max}")]
    Full { stored: u64, max: u64 },
    /// The fallback journal is at `max_journal_mb`.
    #[error("the fallback journal is at its budget of {0} bytes")]
    JournalFull(u64),
}

/// The disk layer's errors, as the session store always reported them: the
/// same variants, so the HTTP layer's status codes and error codes stay.
impl From<DiskError> for StoreError {
    fn from(e: DiskError) -> StoreError {
        match e {
            DiskError::Sled(e) => StoreError::Sled(e),
            DiskError::Full { free, reserve } => StoreError::DiskFull { free, reserve },
            DiskError::Fault(m) => StoreError::DiskFault(m),
            DiskError::Closed(m) => StoreError::Unavailable(m),
        }
    }
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
    /// Journal entries Redis refused for good, dropped after bounded tries.
    pub replay_dropped: u64,
    /// Deletions and rotations made on other nodes, heard through Redis.
    pub deletions_heard: u64,
    pub corrupt_records: u64,
    pub journal_bytes: u64,
    pub touches_unjournaled: u64,
    /// What is wrong, if anything (health says `degraded` with it).
    pub degraded: Option<String>,
    /// Why the node should not take traffic now, if it should not
    /// (`/api/ready` answers 503 with it): a disk fault, an unset clock, or
    /// Redis unavailable under `require_redis`.
    pub unready: Option<String>,
    /// Redis refuses the node's credentials or database.
    pub redis_config_error: bool,
    /// The near cache, when there is one.
    pub near: Option<near::NearStats>,
}

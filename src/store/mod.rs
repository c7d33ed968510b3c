//! Where sessions live.
//!
//! - [`local::SledStore`]: the node's own disk (its trees in the node's
//!   database, [`crate::disk`]). The whole store when no Redis is configured;
//!   otherwise the mirror of what this node served, and the journal of what
//!   it acknowledged while Redis was away.
//! - [`redis::RedisStore`]: the cluster's single source of truth when
//!   reachable. It only talks to Redis.
//! - [`near`]: the near cache of sessions served in Redis mode; the one module
//!   that reads and writes it (its copies, its counts written behind, what
//!   the tracking connection hears).
//! - [`Store`]: what the HTTP layer talks to. It composes the three, each job
//!   in its own room: [`route`] (the Redis-first routing of every operation,
//!   and the fault rules), `ops` (the operations themselves), `background`
//!   (housekeeping, the probe, the near cache's link, the write-behind, the
//!   deletion feed), `reconcile` (the journal replay and the re-seed of an
//!   emptied Redis), `status` (health and readiness), `lifecycle` (start,
//!   drain, close).
//!
//! A touch passes: `ops` → `near` (a hit: answered), or `ops` → `near` →
//! `redis` (a fill) → `ops` → `local` (the mirror's copy).

mod background;
mod lifecycle;
pub mod local;
pub mod near;
mod ops;
mod reconcile;
pub mod redis;
pub mod route;
mod status;

use crate::session::{now_ms, InputError, Session};
use local::SledStore;
use near::Near;
use redis::RedisStore;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::RwLock;

use crate::disk::DiskError;
pub type Result<T> = std::result::Result<T, StoreError>;

/// The session store: Redis first, the local disk when Redis is away (see
/// [`route`]). Cheap to clone: every clone is the same store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    sled: SledStore,
    redis: Option<RedisStore>,
    /// True while operations go to Redis.
    redis_mode: AtomicBool,
    /// Last probe or operation result.
    redis_reachable: AtomicBool,
    /// Fallback writes hold it shared; the replayer takes it exclusively to
    /// flip back to Redis mode only when no fallback write is mid-flight.
    switch: RwLock<()>,
    failovers: AtomicU64,
    /// The journal replay's and the re-seed's state and counters.
    replay: reconcile::Replay,
    /// Deletions and rotations of other nodes heard through Redis pub/sub.
    deletions_heard: Arc<AtomicU64>,
    /// Sessions are neither created nor slid with a clock before this (ms):
    /// the build time, so a Pi that booted without its clock waits for NTP.
    clock_floor: u64,
    /// Sessions a user may hold; the oldest beyond it are deleted.
    max_per_user: u64,
    /// Stored sessions above which creates are refused (503).
    max_sessions: u64,
    /// Unready whenever not serving from Redis.
    require_redis: bool,
    /// Longest wait for a mirror flush in Redis mode (the store timeout).
    mirror_flush_wait: Duration,
    /// Why Redis refuses this node (credentials, database), until it stops.
    redis_config_error: Mutex<Option<String>>,
    /// The near cache of sessions served in Redis mode (`None` without
    /// Redis, or with `near_cache_mb = 0`).
    near: Option<Near>,
    /// Set at shutdown: the near cache stays bypassed.
    draining: AtomicBool,
}

/// The store's bounds, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// No session is created or slid with a clock before this (unix ms).
    pub clock_floor: u64,
    pub replay_batch: usize,
    pub max_sessions_per_user: u64,
    pub max_sessions: u64,
    pub require_redis: bool,
    pub store_timeout: Duration,
    /// The near cache's bound; 0 turns it off.
    pub near_cache_bytes: u64,
    pub touch_flush: Duration,
    /// A session not held by the near cache is cached only when used again
    /// within this (`near_admit_ms`; zero: always).
    pub near_admit: Duration,
}

/// What a DELETE did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// Done everywhere at once: how many sessions were deleted (for one
    /// session, 0 means it was not found).
    Now(u64),
    /// Journaled in fallback, applied when Redis returns; `held`: whether
    /// this node held the session (or, for a user, how many it held).
    Accepted { held: u64 },
}

impl Store {
    pub fn new(sled: SledStore, redis: Option<RedisStore>, limits: StoreLimits) -> Store {
        let near = (redis.is_some() && limits.near_cache_bytes > 0).then(|| {
            Near::new(
                limits.near_cache_bytes,
                *sled.limits(),
                limits.touch_flush,
                limits.near_admit,
            )
        });
        Store {
            inner: Arc::new(Inner {
                sled,
                redis,
                // Start pessimistic: the probe promotes us once Redis answers
                // and any journal left from a previous run has been replayed.
                redis_mode: AtomicBool::new(false),
                redis_reachable: AtomicBool::new(false),
                switch: RwLock::new(()),
                failovers: AtomicU64::new(0),
                replay: reconcile::Replay::new(limits.replay_batch),
                deletions_heard: Arc::new(AtomicU64::new(0)),
                clock_floor: limits.clock_floor,
                max_per_user: limits.max_sessions_per_user,
                max_sessions: limits.max_sessions,
                require_redis: limits.require_redis,
                mirror_flush_wait: limits.store_timeout,
                redis_config_error: Mutex::new(None),
                near,
                draining: AtomicBool::new(false),
            }),
        }
    }

    pub fn sled(&self) -> &SledStore {
        &self.inner.sled
    }

    pub fn mode(&self) -> Mode {
        if self.inner.redis_mode.load(Ordering::Acquire) {
            Mode::Redis
        } else {
            Mode::Sled
        }
    }

    /// Whether the clock is past the build time (see `clock_floor`).
    pub fn clock_is_sane(&self) -> bool {
        now_ms() >= self.inner.clock_floor
    }
}

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
    Sled(::sled::Error),
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
    /// A write found the file system full (ENOSPC): 507, like the reserve.
    #[error("disk full: {0}")]
    DiskNoSpace(String),
    /// Writing to the local disk failed (EIO, read-only file system...), a
    /// read failed, or a flush missed its deadline: 503.
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
            DiskError::NoSpace(m) => StoreError::DiskNoSpace(m),
            DiskError::Fault(m) => StoreError::DiskFault(m),
            DiskError::Closed(m) => StoreError::Unavailable(m),
        }
    }
}

/// sled's errors, sorted as the disk layer sorts them (an I/O error is a
/// disk fault, by its kind; see [`DiskError`]).
impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> StoreError {
        DiskError::from(e).into()
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
    /// Operations Redis refused as already applied (late duplicates), on
    /// every path.
    pub duplicate_ops_refused: u64,
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

//! The shared cache (`/api/cache/{namespace}/{key}`): values of any content
//! type that every node can read, in three tiers.
//!
//! - [`memory`]: this node's own, bounded in bytes. Trusted only while the
//!   node hears the cluster's invalidations (or cannot reach Redis at all).
//! - Redis ([`redis`]): the copy every node shares, the source of truth
//!   whenever it is reachable. Every key there has a TTL.
//! - [`disk`]: this node's sled tier, bounded in bytes, read only while
//!   Redis is unreachable.
//!
//! Coherence. Every write, deletion and purge publishes an event (inside
//! the same Redis script as the change); every node's subscriber drops the
//! key from its memory and disk tiers, or raises the namespace's purge
//! floor. Each local entry carries the node-local sequence number taken
//! when its read or write began; an entry at or below its namespace's
//! floor, or the global floor, is stale. Purges and reconnections raise a
//! floor: O(1), nothing is scanned. A subscription that breaks means events
//! may have been missed, so until it is back the memory tier is bypassed
//! (while Redis answers), and when it is back the global floor drops
//! everything held locally before.
//!
//! Outages. While Redis is unreachable, reads are served from memory, then
//! disk; writes go to both and stay on this node (they are not written to
//! Redis later: a newer value may be there by then). Deletions and purges
//! are applied locally and journaled durably (sled tree `cache_journal`),
//! and replayed into Redis, with their events, before the node uses Redis
//! again, so that no node serves a value deleted during the outage.
//!
//! Leases (memcache's): a `GET ?lease=1` that misses takes the key's fill
//! lease (Redis `SET NX PX`) if nobody holds it, and its client fills the
//! key with a PUT carrying the token. Other lease requests meanwhile wait
//! (asynchronously, a bounded number of them) until a write of the key
//! lands on any node, heard through the events, or their wait ends. Every
//! write and deletion drops the lease and a purge moves the key to a new
//! generation, so a PUT with an old or foreign token is refused: a slow
//! filler never overwrites a newer value.

pub mod disk;
mod entry;
mod feed;
mod lookup;
pub mod memory;
mod op;
mod outage;
pub mod redis;
mod write;

use crate::config::settings::CacheSettings;
use crate::disk::{Database, DiskError};
use disk::Disk;
use entry::etag_of;
pub use entry::{decode, encode, now_ms, Entry};
use memory::Memory;
pub use op::Operation;
use redis::{CacheRedis, Op};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Longest a namespace may be.
pub const MAX_NAMESPACE_LEN: usize = 64;
/// Longest a key may be.
pub const MAX_KEY_LEN: usize = 250;
/// Longest a content type may be.
pub const MAX_CONTENT_TYPE_LEN: usize = 255;
/// Journaled invalidations above which a deletion during an outage is
/// refused (507): a bound on the disk an outage can take.
const MAX_JOURNAL_ENTRIES: u64 = 100_000;
/// Namespaces with a purge floor of their own; past this many, one global
/// floor replaces them all (everything held locally is dropped: safe).
const MAX_FLOORS: usize = 4096;
/// Leases granted locally (while Redis is unreachable) at once.
const MAX_LOCAL_LEASES: usize = 4096;
/// A waiter re-reads at least this often, in case an event was lost.
const RECHECK: Duration = Duration::from_millis(200);
const JOURNAL: &str = "cache_journal";

/// Whether `s` is a valid namespace or key: 1 to `max` characters of
/// `A-Z a-z 0-9 . _ ~ -`, and not `.` or `..` (which paths and proxies
/// treat as directories). Nothing else is ever escaped or decoded.
pub fn valid_name(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
        && s != "."
        && s != ".."
}

/// Where a hit came from (the `X-Cache` header, the metrics' `tier`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory = 0,
    Redis = 1,
    Disk = 2,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Memory, Tier::Redis, Tier::Disk];
    pub fn as_str(self) -> &'static str {
        ["memory", "redis", "disk"][self as usize]
    }
}

/// What a GET gets.
pub enum Lookup {
    Hit(Arc<Entry>, Tier),
    /// Not there. `waited`: a lease request waited for another client's
    /// fill, in vain.
    Miss {
        waited: bool,
    },
    /// Not there, and this client holds the fill lease: the token.
    Lease(String),
}

/// Where a PUT went.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    /// Where every node reads (Redis; or, without Redis, this node).
    Shared,
    /// Only on this node: Redis is unreachable.
    Local,
}

/// What a DELETE or purge did.
pub enum Removed {
    /// Done everywhere; whether a value was there.
    Done(bool),
    /// Redis is unreachable: done here, journaled, replayed when it returns.
    Journaled,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    LeaseMismatch(&'static str),
    #[error("the cache's outage journal holds {0} entries, its bound")]
    JournalFull(u64),
    /// The disk tier's and the outage journal's faults answer as the
    /// session store's do (507 for a full disk, 503 for a fault): one disk,
    /// one answer (see `http::cache`).
    #[error(transparent)]
    Disk(#[from] DiskError),
}

/// Counters for `/metrics` and `/api/health`.
#[derive(Default)]
struct Counters {
    hits: [AtomicU64; 3],
    misses: [AtomicU64; 3],
    lease_grants: AtomicU64,
    lease_waits: AtomicU64,
    lease_wait_timeouts: AtomicU64,
    lease_refused: AtomicU64,
    events_heard: AtomicU64,
    replayed: AtomicU64,
}

/// The figures, read at once.
#[derive(Debug, Clone, Default)]
pub struct CacheStats {
    pub hits: [u64; 3],
    pub misses: [u64; 3],
    pub lease_grants: u64,
    pub lease_waits: u64,
    pub lease_wait_timeouts: u64,
    pub lease_refused: u64,
    pub lease_waiting: u64,
    pub events_heard: u64,
    pub replayed: u64,
    pub pending_invalidations: u64,
    pub memory_bytes: u64,
    pub memory_budget: u64,
    pub memory_evictions: u64,
    pub disk_bytes: u64,
    pub disk_budget: u64,
    pub disk_evictions: u64,
    pub disk_errors: u64,
    pub redis_configured: bool,
    pub redis_reachable: bool,
    pub subscribed: bool,
}

#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    memory: Memory,
    disk: Disk,
    redis: Option<Arc<CacheRedis>>,
    db: Database,
    /// This process's id in events (its own are skipped).
    origin: u64,
    /// Redis answered last time (set false by a failed request, true by
    /// the subscriber task once any journal is replayed).
    redis_up: AtomicBool,
    /// The subscription is live: events are being heard.
    subscribed: AtomicBool,
    seq: AtomicU64,
    global_floor: AtomicU64,
    floors: RwLock<HashMap<Box<str>, u64>>,
    /// Per key with lease waiters: toggled by every write heard or made.
    waiters: Mutex<HashMap<Box<str>, watch::Sender<bool>>>,
    waiting: AtomicUsize,
    max_waiters: usize,
    local_leases: Mutex<HashMap<Box<str>, (String, Instant)>>,
    journal_len: AtomicU64,
    lease_wait: Duration,
    lease_ttl: Duration,
    probe: (Duration, Duration),
    counters: Counters,
}

impl Cache {
    /// Opens the disk tier (emptied) in the node's database and prepares
    /// the Redis client; connecting is the background task's.
    pub fn new(settings: &CacheSettings, db: Database) -> Result<Cache, String> {
        let redis = match &settings.redis_url {
            Some(url) => Some(Arc::new(CacheRedis::new(
                url,
                &settings.key_prefix,
                settings.timeout,
                settings.max_ttl_ms,
                &settings.tls,
            )?)),
            None => None,
        };
        let disk = Disk::open(db.clone(), settings.disk_bytes)
            .map_err(|e| format!("cannot open the cache's disk tier: {e}"))?;
        let journal_len = db.tree(JOURNAL).map(|t| t.len() as u64).unwrap_or(0);
        Ok(Cache {
            inner: Arc::new(Inner {
                memory: Memory::new(settings.memory_bytes),
                disk,
                redis,
                db,
                origin: uuid::Uuid::new_v4().as_u128() as u64,
                redis_up: AtomicBool::new(true),
                subscribed: AtomicBool::new(false),
                seq: AtomicU64::new(1),
                global_floor: AtomicU64::new(0),
                floors: RwLock::new(HashMap::new()),
                waiters: Mutex::new(HashMap::new()),
                waiting: AtomicUsize::new(0),
                max_waiters: settings.max_waiters,
                local_leases: Mutex::new(HashMap::new()),
                journal_len: AtomicU64::new(journal_len),
                lease_wait: settings.lease_wait,
                lease_ttl: settings.lease_ttl,
                probe: settings.probe,
                counters: Counters::default(),
            }),
        })
    }

    pub fn stats(&self) -> CacheStats {
        let i = &self.inner;
        let c = &i.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: [0, 1, 2].map(|t| load(&c.hits[t])),
            misses: [0, 1, 2].map(|t| load(&c.misses[t])),
            lease_grants: load(&c.lease_grants),
            lease_waits: load(&c.lease_waits),
            lease_wait_timeouts: load(&c.lease_wait_timeouts),
            lease_refused: load(&c.lease_refused),
            lease_waiting: i.waiting.load(Ordering::Relaxed) as u64,
            events_heard: load(&c.events_heard),
            replayed: load(&c.replayed),
            pending_invalidations: load(&i.journal_len),
            memory_bytes: i.memory.bytes(),
            memory_budget: i.memory.budget(),
            memory_evictions: i.memory.evictions(),
            disk_bytes: i.disk.bytes(),
            disk_budget: i.disk.budget(),
            disk_evictions: i.disk.evictions(),
            disk_errors: i.disk.errors(),
            redis_configured: i.redis.is_some(),
            redis_reachable: i.redis.is_some() && i.redis_up.load(Ordering::Acquire),
            subscribed: i.subscribed.load(Ordering::Acquire),
        }
    }

    fn next_seq(&self) -> u64 {
        self.inner.seq.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Entries of `ns` at or below this are stale.
    fn floor(&self, ns: &str) -> u64 {
        let own = self
            .inner
            .floors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(ns)
            .copied()
            .unwrap_or(0);
        own.max(self.inner.global_floor.load(Ordering::Acquire))
    }

    /// Makes everything of `ns` held locally stale (a purge).
    fn raise_floor(&self, ns: &str) {
        let seq = self.next_seq();
        let mut floors = self.inner.floors.write().unwrap_or_else(|p| p.into_inner());
        if floors.len() >= MAX_FLOORS && !floors.contains_key(ns) {
            self.inner.global_floor.store(seq, Ordering::Release);
            floors.clear();
        } else {
            floors.insert(ns.into(), seq);
        }
    }

    /// The memory tier can be believed: the node hears every invalidation,
    /// or has no Redis to hear them from (none configured, or an outage,
    /// when local tiers are all there is).
    fn memory_trusted(&self) -> bool {
        let i = &self.inner;
        i.redis.is_none()
            || i.subscribed.load(Ordering::Acquire)
            || !i.redis_up.load(Ordering::Acquire)
    }

    fn redis_if_up(&self) -> Option<&CacheRedis> {
        let i = &self.inner;
        i.redis
            .as_deref()
            .filter(|_| i.redis_up.load(Ordering::Acquire))
    }

    fn mark_down(&self, e: &dyn std::fmt::Display) {
        if self.inner.redis_up.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = %e, "cache: redis unreachable; serving the cache from memory and disk");
        }
    }

    fn fresh_gen(&self, seq: u64) -> String {
        format!("{:x}.{seq:x}", self.inner.origin)
    }

    fn op<'a>(&self, ns: &'a str, key: &'a str, op: Operation) -> Op<'a> {
        Op {
            ns,
            key,
            op,
            value: &[],
            ttl_ms: 0,
            token: "",
            origin: self.inner.origin,
        }
    }

    fn count(&self, tier: Tier, hit: bool) {
        let c = &self.inner.counters;
        let a = if hit { &c.hits } else { &c.misses };
        a[tier as usize].fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_documented_safe_set() {
        for ok in ["a", "A-z_0.9~", &"k".repeat(250), "..."] {
            assert!(valid_name(ok, MAX_KEY_LEN), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "é",
            "a%2f",
            &"k".repeat(251),
        ] {
            assert!(!valid_name(bad, MAX_KEY_LEN), "{bad}");
        }
    }
}

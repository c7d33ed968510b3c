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
pub mod memory;
pub mod redis;

use crate::config::{Config, MAX_CACHE_TTL_SECS};
use crate::disk::{Database, DiskError, Space};
use crate::store::StoreError;
use bytes::Bytes;
use disk::Disk;
use memory::Memory;
use redis::{CacheRedis, Fetched, Op};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
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

/// One value as stored.
#[derive(Debug)]
pub struct Entry {
    pub content_type: Box<str>,
    /// Hash of the content type and body: the `ETag`.
    pub etag: u64,
    /// Unix ms of the PUT (for `Age`).
    pub stored_at: u64,
    /// Unix ms after which the value is gone.
    pub expires_at: u64,
    pub body: Bytes,
}

/// How an entry is written in Redis and on disk: version 1, stored-at,
/// expires-at and etag (big-endian u64s), the content type's length (u16)
/// and bytes, then the body.
pub fn encode(e: &Entry, out: &mut Vec<u8>) {
    out.push(1);
    for n in [e.stored_at, e.expires_at, e.etag] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.extend_from_slice(&(e.content_type.len() as u16).to_be_bytes());
    out.extend_from_slice(e.content_type.as_bytes());
    out.extend_from_slice(&e.body);
}

/// The inverse of [`encode`]; `None` for anything it did not write.
pub fn decode(b: Bytes) -> Option<Entry> {
    let n = |at: usize| Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?));
    if b.first() != Some(&1) {
        return None;
    }
    let ct_len = usize::from(u16::from_be_bytes(b.get(25..27)?.try_into().ok()?));
    let content_type = std::str::from_utf8(b.get(27..27 + ct_len)?).ok()?.into();
    Some(Entry {
        stored_at: n(1)?,
        expires_at: n(9)?,
        etag: n(17)?,
        content_type,
        body: b.slice(27 + ct_len..),
    })
}

fn etag_of(content_type: &str, body: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    h.write(content_type.as_bytes());
    h.write_u8(0);
    h.write(body);
    h.finish()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The disk tier's and the outage journal's faults answer as the session
/// store's do (507 for a full disk, 503 for a fault): one disk, one answer.
impl From<DiskError> for CacheError {
    fn from(e: DiskError) -> CacheError {
        CacheError::Store(e.into())
    }
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

/// What [`Cache::find`] found.
enum Found {
    Hit(Arc<Entry>, Tier),
    Miss,
    Granted(String),
    Held,
}

impl Cache {
    /// Opens the disk tier (emptied) in the node's database and prepares
    /// the Redis client; connecting is the background task's.
    pub fn new(config: &Config, db: Database) -> Result<Cache, String> {
        let redis = match &config.cache_redis_url {
            Some(url) => Some(Arc::new(CacheRedis::new(
                url,
                &config.key_prefix,
                config.store_timeout,
                MAX_CACHE_TTL_SECS * 1000,
            )?)),
            None => None,
        };
        let disk = Disk::open(db.clone(), config.cache_disk_bytes)
            .map_err(|e| format!("cannot open the cache's disk tier: {e}"))?;
        let journal_len = db.tree(JOURNAL).map(|t| t.len() as u64).unwrap_or(0);
        Ok(Cache {
            inner: Arc::new(Inner {
                memory: Memory::new(config.cache_memory_bytes),
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
                max_waiters: (config.max_in_flight / 2).max(1),
                local_leases: Mutex::new(HashMap::new()),
                journal_len: AtomicU64::new(journal_len),
                lease_wait: config.cache_lease_wait,
                lease_ttl: config.cache_lease_ttl,
                probe: (config.redis_probe_interval, config.redis_probe_max),
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

    fn op<'a>(&self, ns: &'a str, key: &'a str, op: u8) -> Op<'a> {
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

    /// `GET`: the value, from the nearest tier that can be believed; with
    /// `lease`, a miss takes the fill lease or waits for another's fill.
    pub async fn get(&self, ns: &str, key: &str, lease: bool) -> Lookup {
        let mkey = format!("{ns}/{key}");
        if let Some(e) = self.memory_hit(ns, &mkey) {
            return Lookup::Hit(e, Tier::Memory);
        }
        match self.find(ns, key, &mkey, lease).await {
            Found::Hit(e, t) => Lookup::Hit(e, t),
            Found::Miss => Lookup::Miss { waited: false },
            Found::Granted(token) => {
                self.inner
                    .counters
                    .lease_grants
                    .fetch_add(1, Ordering::Relaxed);
                Lookup::Lease(token)
            }
            Found::Held => self.wait_for_fill(ns, key, &mkey).await,
        }
    }

    /// The memory tier's entry, when the tier can be believed.
    fn memory_hit(&self, ns: &str, mkey: &str) -> Option<Arc<Entry>> {
        if !self.memory_trusted() {
            return None;
        }
        let floor = self.floor(ns);
        let hit = self.inner.memory.get(mkey, now_ms(), |seq| seq > floor);
        self.count(Tier::Memory, hit.is_some());
        hit
    }

    /// Beyond the memory tier: Redis, or while it is unreachable (or
    /// absent) the disk tier and a lease of this node's own. Boxed: two
    /// callers, one state machine in the binary.
    fn find<'a>(
        &'a self,
        ns: &'a str,
        key: &'a str,
        mkey: &'a str,
        lease: bool,
    ) -> Pin<Box<dyn Future<Output = Found> + Send + 'a>> {
        Box::pin(async move {
            let i = &self.inner;
            let now = now_ms();
            if let Some(r) = self.redis_if_up() {
                let ticket = i.memory.ticket(mkey);
                let seq = self.next_seq();
                let token = if lease {
                    format!("r{}", uuid::Uuid::new_v4().simple())
                } else {
                    String::new()
                };
                let mut op = self.op(ns, key, b'f');
                op.token = &token;
                op.ttl_ms = i.lease_ttl.as_millis() as u64;
                let found = match r.run(&op, &self.fresh_gen(seq)).await {
                    Ok(v) => match CacheRedis::fetched(v) {
                        Fetched::Value(b) => match decode(Bytes::from(b)) {
                            Some(e) if e.expires_at > now => {
                                let e = Arc::new(e);
                                i.memory.insert(mkey, e.clone(), seq, Some(ticket));
                                self.count(Tier::Redis, true);
                                return Found::Hit(e, Tier::Redis);
                            }
                            _ => Some(Found::Miss),
                        },
                        Fetched::Miss => Some(Found::Miss),
                        Fetched::LeaseGranted => Some(Found::Granted(token)),
                        Fetched::LeaseHeld => Some(Found::Held),
                    },
                    Err(e) => {
                        self.mark_down(&e);
                        None
                    }
                };
                if let Some(found) = found {
                    self.count(Tier::Redis, false);
                    return found;
                }
                // Now an outage: the memory tier is believed again.
                if let Some(e) = self.memory_hit(ns, mkey) {
                    return Found::Hit(e, Tier::Memory);
                }
            }
            // Redis unreachable (or none): what this node holds is all there is.
            if let Some((seq, e)) = i.disk.get(mkey) {
                if e.expires_at > now && seq > self.floor(ns) {
                    let e = Arc::new(e);
                    i.memory.insert(mkey, e.clone(), seq, None);
                    self.count(Tier::Disk, true);
                    return Found::Hit(e, Tier::Disk);
                }
            }
            self.count(Tier::Disk, false);
            if !lease {
                return Found::Miss;
            }
            // A lease of this node only: nobody else can be asked.
            let mut leases = i.local_leases.lock().unwrap_or_else(|p| p.into_inner());
            let t = Instant::now();
            if leases.get(mkey).is_some_and(|(_, until)| *until > t) {
                return Found::Held;
            }
            if leases.len() >= MAX_LOCAL_LEASES {
                leases.retain(|_, (_, until)| *until > t);
                if leases.len() >= MAX_LOCAL_LEASES {
                    return Found::Miss;
                }
            }
            let token = format!("l{}", uuid::Uuid::new_v4().simple());
            leases.insert(mkey.into(), (token.clone(), t + i.lease_ttl));
            Found::Granted(token)
        })
    }

    /// A lease request while another client holds the lease: waits (without
    /// a thread) until a write of the key is heard or made here, re-reading
    /// at least every [`RECHECK`], up to `cache_lease_wait_ms`.
    async fn wait_for_fill(&self, ns: &str, key: &str, mkey: &str) -> Lookup {
        let i = &self.inner;
        if i.waiting.fetch_add(1, Ordering::AcqRel) >= i.max_waiters {
            i.waiting.fetch_sub(1, Ordering::AcqRel);
            return Lookup::Miss { waited: false };
        }
        i.counters.lease_waits.fetch_add(1, Ordering::Relaxed);
        let rx = i
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(mkey.into())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe();
        let mut w = Waiting {
            cache: self,
            key: mkey,
            rx,
        };
        let deadline = Instant::now() + i.lease_wait;
        loop {
            // Seen: a write from here on wakes this waiter.
            w.rx.borrow_and_update();
            if let Some(e) = self.memory_hit(ns, mkey) {
                return Lookup::Hit(e, Tier::Memory);
            }
            if let Found::Hit(e, t) = self.find(ns, key, mkey, false).await {
                return Lookup::Hit(e, t);
            }
            let now = Instant::now();
            if now >= deadline {
                i.counters
                    .lease_wait_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return Lookup::Miss { waited: true };
            }
            let nap = tokio::time::sleep((deadline - now).min(RECHECK));
            tokio::pin!(nap);
            tokio::select! {
                changed = w.rx.changed() => if changed.is_err() { nap.await },
                _ = &mut nap => {}
            }
        }
    }

    /// Wakes this node's lease waiters on `mkey`.
    fn wake(&self, mkey: &str) {
        let i = &self.inner;
        if i.waiting.load(Ordering::Acquire) > 0 {
            if let Some(n) = i
                .waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(mkey)
            {
                let _ = n.send(true);
            }
        }
    }

    /// `PUT`. `lease`: the token of a fill lease, checked (409 when it is
    /// not the key's live lease).
    pub async fn put(
        &self,
        ns: &str,
        key: &str,
        content_type: &str,
        body: Bytes,
        ttl_secs: u64,
        lease: Option<&str>,
    ) -> Result<(Arc<Entry>, Stored), CacheError> {
        let i = &self.inner;
        let now = now_ms();
        let entry = Arc::new(Entry {
            content_type: content_type.into(),
            etag: etag_of(content_type, &body),
            stored_at: now,
            expires_at: now.saturating_add(ttl_secs.saturating_mul(1000)),
            body,
        });
        let mkey = format!("{ns}/{key}");
        let mut redis_token = "";
        match lease {
            Some(t) if t.starts_with('l') => {
                let mut leases = i.local_leases.lock().unwrap_or_else(|p| p.into_inner());
                let live = leases
                    .get(mkey.as_str())
                    .is_some_and(|(held, until)| held == t && *until > Instant::now());
                if !live {
                    drop(leases);
                    return Err(self.refused("the lease is not this key's: it expired, was superseded, or was never granted"));
                }
                leases.remove(mkey.as_str());
            }
            Some(t) => redis_token = t,
            None => {}
        }
        if let Some(r) = self.redis_if_up() {
            let ticket = i.memory.ticket(&mkey);
            let seq = self.next_seq();
            let mut value = Vec::with_capacity(27 + content_type.len() + entry.body.len());
            encode(&entry, &mut value);
            let mut op = self.op(ns, key, b'p');
            op.value = &value;
            op.ttl_ms = ttl_secs.saturating_mul(1000);
            op.token = redis_token;
            match r.run(&op, &self.fresh_gen(seq)).await {
                Ok(v) if CacheRedis::count(&v) == 1 => {
                    self.keep(&mkey, &entry, seq, Some(ticket));
                    return Ok((entry, Stored::Shared));
                }
                Ok(_) => return Err(self.refused("the lease is not this key's: it expired, was superseded by a write, deletion or purge, or was never granted")),
                Err(e) => self.mark_down(&e),
            }
        }
        if !redis_token.is_empty() {
            return Err(
                self.refused("the lease cannot be checked while the cache's redis is unreachable")
            );
        }
        let seq = self.next_seq();
        self.keep(&mkey, &entry, seq, None);
        let stored = match i.redis {
            Some(_) => Stored::Local,
            None => Stored::Shared,
        };
        Ok((entry, stored))
    }

    fn refused(&self, why: &'static str) -> CacheError {
        self.inner
            .counters
            .lease_refused
            .fetch_add(1, Ordering::Relaxed);
        CacheError::LeaseMismatch(why)
    }

    /// Keeps a value this node wrote in its memory and disk tiers and wakes
    /// its waiters.
    fn keep(&self, mkey: &str, entry: &Arc<Entry>, seq: u64, ticket: Option<u64>) {
        self.inner.memory.insert(mkey, entry.clone(), seq, ticket);
        // A value the disk tier cannot take (disk at its reserve, a fault)
        // is served from memory and Redis all the same.
        let _ = self.inner.disk.put(mkey, entry, seq);
        self.wake(mkey);
    }

    /// Drops a key from this node's tiers.
    fn drop_local(&self, mkey: &str) -> bool {
        let in_memory = self.inner.memory.remove(mkey);
        match self.inner.disk.remove(mkey) {
            Ok(on_disk) => in_memory || on_disk,
            Err(e) => {
                tracing::warn!(error = %e, "cache: dropping a value from the disk tier failed");
                in_memory
            }
        }
    }

    /// `DELETE` of one key.
    pub async fn delete(&self, ns: &str, key: &str) -> Result<Removed, CacheError> {
        let mkey = format!("{ns}/{key}");
        if let Some(r) = self.redis_if_up() {
            let seq = self.next_seq();
            match r.run(&self.op(ns, key, b'd'), &self.fresh_gen(seq)).await {
                Ok(v) => {
                    self.drop_local(&mkey);
                    return Ok(Removed::Done(CacheRedis::count(&v) > 0));
                }
                Err(e) => self.mark_down(&e),
            }
        }
        if self.inner.redis.is_some() {
            self.journal(b'd', &mkey).await?;
            self.drop_local(&mkey);
            return Ok(Removed::Journaled);
        }
        Ok(Removed::Done(self.drop_local(&mkey)))
    }

    /// `DELETE` of a namespace: a new generation in Redis, a new floor here.
    pub async fn purge(&self, ns: &str) -> Result<Removed, CacheError> {
        if let Some(r) = self.redis_if_up() {
            let seq = self.next_seq();
            match r.run(&self.op(ns, "", b'g'), &self.fresh_gen(seq)).await {
                Ok(_) => {
                    self.raise_floor(ns);
                    return Ok(Removed::Done(true));
                }
                Err(e) => self.mark_down(&e),
            }
        }
        if self.inner.redis.is_some() {
            self.journal(b'g', ns).await?;
            self.raise_floor(ns);
            return Ok(Removed::Journaled);
        }
        self.raise_floor(ns);
        Ok(Removed::Done(true))
    }

    /// Records an invalidation made during an outage, durably, before it is
    /// acknowledged.
    async fn journal(&self, op: u8, what: &str) -> Result<(), CacheError> {
        let i = &self.inner;
        if i.journal_len.load(Ordering::Acquire) >= MAX_JOURNAL_ENTRIES {
            return Err(CacheError::JournalFull(MAX_JOURNAL_ENTRIES));
        }
        i.db.check_space(Space::Release)?;
        let seq = i.db.next_seq()?;
        let mut record = Vec::with_capacity(1 + what.len());
        record.push(op);
        record.extend_from_slice(what.as_bytes());
        i.db.tree(JOURNAL)?
            .insert(seq.to_be_bytes(), record)
            .map_err(DiskError::from)?;
        i.journal_len.fetch_add(1, Ordering::AcqRel);
        i.db.durable().await?;
        Ok(())
    }

    /// Replays the journal into Redis, oldest first, each entry removed
    /// once Redis took it.
    async fn replay(&self, r: &CacheRedis) -> Result<(), StoreError> {
        let i = &self.inner;
        let tree = i.db.tree(JOURNAL)?;
        let mut n = 0u64;
        for item in tree.iter() {
            let (k, v) = item?;
            let text = v.get(1..).and_then(|t| std::str::from_utf8(t).ok());
            let target = match (v.first(), text) {
                (Some(b'd'), Some(t)) => t.split_once('/').map(|(ns, key)| (b'd', ns, key)),
                (Some(b'g'), Some(ns)) => Some((b'g', ns, "")),
                _ => None,
            };
            if let Some((op, ns, key)) = target {
                let seq = self.next_seq();
                r.run(&self.op(ns, key, op), &self.fresh_gen(seq)).await?;
                n += 1;
            }
            tree.remove(k)?;
            i.journal_len.fetch_sub(1, Ordering::AcqRel);
        }
        if n > 0 {
            i.db.durable().await?;
            i.counters.replayed.fetch_add(n, Ordering::Relaxed);
            tracing::info!(
                replayed = n,
                "cache: deletions and purges made during the outage replayed into redis"
            );
        }
        Ok(())
    }

    /// An event from another node.
    fn heard(&self, payload: &[u8]) {
        let Some((op, origin, ns, key)) = redis::parse_event(payload) else {
            return;
        };
        if origin == self.inner.origin {
            return;
        }
        self.inner
            .counters
            .events_heard
            .fetch_add(1, Ordering::Relaxed);
        match key {
            Some(key) => {
                let mkey = format!("{ns}/{key}");
                self.drop_local(&mkey);
                if op == b'p' {
                    self.wake(&mkey);
                }
            }
            None => self.raise_floor(ns),
        }
    }

    /// The background task: subscribes to the events (reconnecting with
    /// backoff), replays the outage journal whenever Redis is back, and
    /// probes Redis while requests found it unreachable. Ends on shutdown.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Some(r) = self.inner.redis.clone() else {
            return;
        };
        let (first, max) = self.inner.probe;
        let mut delay = first;
        loop {
            if *shutdown.borrow() {
                return;
            }
            match r.subscribe().await {
                Ok(mut pubsub) => {
                    delay = first;
                    let stop = match self.recover(&r).await {
                        true => self.listen(&r, &mut pubsub, &mut shutdown).await,
                        false => false,
                    };
                    self.inner.subscribed.store(false, Ordering::Release);
                    if stop {
                        return;
                    }
                }
                Err(e) => self.mark_down(&e),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
            delay = (delay * 2).min(max);
        }
    }

    /// Just subscribed: replays the journal, then drops everything held
    /// locally (events may have been missed) and serves from Redis again.
    async fn recover(&self, r: &CacheRedis) -> bool {
        if let Err(e) = self.replay(r).await {
            self.mark_down(&e);
            return false;
        }
        let i = &self.inner;
        i.global_floor.store(self.next_seq(), Ordering::Release);
        i.subscribed.store(true, Ordering::Release);
        self.back_up();
        true
    }

    fn back_up(&self) {
        if !self.inner.redis_up.swap(true, Ordering::AcqRel) {
            tracing::info!("cache: redis reachable; serving the cache from redis");
        }
    }

    /// Hears events until the subscription breaks; meanwhile brings Redis
    /// back into use after a request found it unreachable. True on shutdown.
    async fn listen(
        &self,
        r: &CacheRedis,
        pubsub: &mut ::redis::aio::PubSub,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        use futures_util::StreamExt;
        let i = &self.inner;
        let mut stream = pubsub.on_message();
        let mut tick = tokio::time::interval(i.probe.0);
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(m) => self.heard(m.get_payload_bytes()),
                    None => {
                        if let Err(e) = r.ping().await {
                            self.mark_down(&e);
                        }
                        return false;
                    }
                },
                _ = tick.tick() => {
                    if !i.redis_up.load(Ordering::Acquire) || i.journal_len.load(Ordering::Acquire) > 0 {
                        let back = match r.ping().await {
                            Ok(()) => self.replay(r).await,
                            Err(e) => Err(StoreError::from(e)),
                        };
                        match back {
                            Ok(()) => self.back_up(),
                            // The subscription may be as dead as the
                            // connection: start over (and drop what is
                            // held locally once it is back).
                            Err(e) => {
                                self.mark_down(&e);
                                return false;
                            }
                        }
                    }
                }
                _ = shutdown.changed() => return true,
            }
        }
    }
}

/// One lease waiter, counted while it waits; the last one on a key
/// removes the key's wake-up.
struct Waiting<'a> {
    cache: &'a Cache,
    key: &'a str,
    rx: watch::Receiver<bool>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let i = &self.cache.inner;
        let mut w = i.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // this waiter's receiver is the only one left
        if w.get(self.key).is_some_and(|tx| tx.receiver_count() <= 1) {
            w.remove(self.key);
        }
        i.waiting.fetch_sub(1, Ordering::AcqRel);
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

    #[test]
    fn entries_round_trip_and_junk_does_not_decode() {
        let e = Entry {
            content_type: "image/png".into(),
            etag: 42,
            stored_at: 1,
            expires_at: 2,
            body: Bytes::from_static(b"\x00\x01binary\x00"),
        };
        let mut out = Vec::new();
        encode(&e, &mut out);
        let d = decode(Bytes::from(out.clone())).unwrap();
        assert_eq!(
            (
                &*d.content_type,
                d.etag,
                d.stored_at,
                d.expires_at,
                &d.body[..]
            ),
            ("image/png", 42, 1, 2, &b"\x00\x01binary\x00"[..])
        );
        assert!(decode(Bytes::from(out[..20].to_vec())).is_none());
        assert!(decode(Bytes::from_static(b"\x02junk")).is_none());
    }
}

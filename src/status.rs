//! The node's status, read at once: the store, the worker pool, the near
//! cache and the shared cache. `/api/health` and `/metrics` are both
//! rendered from one [`NodeStatus`], through one table ([`FIGURES`]) that
//! declares each figure once: where it goes in the health JSON, and its
//! metric's name, type and help. A new figure is one entry there.

use crate::admission::{Admission, PoolStats};
use crate::cache::{Cache, CacheStats, Tier};
use crate::store::{Store, StoreStatus};
use serde_json::{Map, Value};

/// Everything `/api/health` and `/metrics` report, read at one moment.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub store: StoreStatus,
    pub pool: PoolStats,
    /// Requests waiting on the disk (group commit): the only queue there
    /// is; the worker pool itself never queues (it refuses).
    pub disk_flush_waiters: u64,
    /// What the node has written to storage (`/proc/self/io`), if readable.
    pub disk_written_bytes: Option<u64>,
    /// Flushes of the local database that synced data.
    pub disk_fsyncs: u64,
    /// Uses whose mirror copy was recent enough not to be rewritten.
    pub mirror_touches_skipped: u64,
    /// Bytes of the uses' log not yet folded into the session records.
    pub uses_log_bytes: u64,
    pub cache: CacheStats,
}

impl NodeStatus {
    pub fn read(store: &Store, admission: &Admission, cache: &Cache) -> NodeStatus {
        NodeStatus {
            store: store.status(),
            pool: admission.stats(),
            disk_flush_waiters: store.sled().commits_waiting(),
            disk_written_bytes: crate::disk::Database::process_written_bytes(),
            disk_fsyncs: store.sled().disk_syncs(),
            mirror_touches_skipped: store.sled().mirror_touches_skipped(),
            uses_log_bytes: store.sled().uses_log_bytes(),
            cache: cache.stats(),
        }
    }
}

/// A metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// One figure's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    Number(u64),
    /// JSON `true`/`false`; a metric's 1/0.
    Flag(bool),
    /// JSON only: a string, or `null`.
    Text(Option<String>),
    /// Metric only: one value per cache tier (label `tier`).
    PerTier(Vec<(Tier, u64)>),
}

/// One figure: where it goes, and how it is read. `json`: the section
/// (`[]` the top level) and key in `/api/health`; `metric`: name, type and
/// help in `/metrics`. A reading of `None` is a figure that does not exist
/// now (the near cache is off): absent from the metrics, and its JSON
/// section is `null`.
pub struct Figure {
    pub json: Option<(&'static [&'static str], &'static str)>,
    pub metric: Option<(&'static str, Kind, &'static str)>,
    pub read: fn(&NodeStatus) -> Option<Reading>,
}

use Kind::{Counter, Gauge};
use Reading::{Flag, Number, PerTier, Text};

const STORE: &[&str] = &["store"];
const NEAR: &[&str] = &["store", "near_cache"];
const SESSIONS: &[&str] = &["sessions"];
const POOL: &[&str] = &["pool"];
const CACHE: &[&str] = &["cache"];
const DISK: &[&str] = &["disk"];

macro_rules! figure {
    ($json:expr, $metric:expr, |$s:ident| $read:expr) => {
        Figure {
            json: $json,
            metric: $metric,
            read: |$s: &NodeStatus| $read,
        }
    };
}

/// Every figure, in the order of `/metrics` (the health JSON's keys are
/// sorted).
pub const FIGURES: &[Figure] = &[
    figure!(Some((&[], "status")), None, |s| Some(Text(Some(
        if s.store.degraded.is_some() { "degraded" } else { "ok" }.into()
    )))),
    figure!(Some((&[], "degraded_reason")), None, |s| Some(Text(
        s.store.degraded.clone()
    ))),
    figure!(Some((STORE, "active")), None, |s| Some(Text(Some(
        s.store.active.as_str().into()
    )))),
    figure!(Some((STORE, "redis_configured")), None, |s| Some(Flag(
        s.store.redis_configured
    ))),
    figure!(
        Some((STORE, "redis_reachable")),
        Some(("edgenode_redis_reachable", Gauge, "1 when the last Redis operation or probe succeeded")),
        |s| Some(Flag(s.store.redis_reachable))
    ),
    figure!(
        Some((SESSIONS, "active")),
        Some(("edgenode_sessions_active", Gauge, "Live sessions (Redis index in Redis mode, local store otherwise)")),
        |s| Some(Number(s.store.sessions_active))
    ),
    figure!(
        Some((STORE, "pending_sync")),
        Some(("edgenode_pending_sync", Gauge, "Journaled operations waiting to be replayed into Redis")),
        |s| Some(Number(s.store.pending_sync))
    ),
    figure!(
        Some((STORE, "failovers")),
        Some(("edgenode_redis_failovers", Counter, "Switches from Redis to the local store")),
        |s| Some(Number(s.store.failovers))
    ),
    figure!(
        Some((STORE, "reconciliations")),
        Some(("edgenode_reconciliations", Counter, "Completed journal replays into Redis")),
        |s| Some(Number(s.store.reconciliations))
    ),
    figure!(
        None,
        Some(("edgenode_replayed_operations", Counter, "Journal operations replayed into Redis")),
        |s| Some(Number(s.store.replayed_ops))
    ),
    figure!(
        Some((STORE, "corrupt_records")),
        Some(("edgenode_corrupt_records", Counter, "Records at rest that failed to decode")),
        |s| Some(Number(s.store.corrupt_records))
    ),
    figure!(
        Some((STORE, "duplicate_ops_refused")),
        Some(("edgenode_duplicate_ops_refused", Counter, "Operations Redis refused because their id was already applied (a late duplicate), on every path, also those whose answers the node never read (counted in Redis, read about once a second)")),
        |s| Some(Number(s.store.duplicate_ops_refused))
    ),
    figure!(
        Some((STORE, "deletions_heard")),
        Some(("edgenode_deletions_heard", Counter, "Deletions and rotations made on other nodes, heard through Redis pub/sub")),
        |s| Some(Number(s.store.deletions_heard))
    ),
    figure!(
        Some((STORE, "replay_dropped")),
        Some(("edgenode_replay_dropped", Counter, "Journal operations Redis rejected for good, dropped after bounded tries")),
        |s| Some(Number(s.store.replay_dropped))
    ),
    figure!(
        Some((STORE, "journal_bytes")),
        Some(("edgenode_journal_bytes", Gauge, "Bytes of the outage journal (budget: max_journal_mb)")),
        |s| Some(Number(s.store.journal_bytes))
    ),
    figure!(
        Some((STORE, "touches_unjournaled")),
        Some(("edgenode_touches_unjournaled", Counter, "Requests served while the journal or the disk was full, whose counts never reach Redis")),
        |s| Some(Number(s.store.touches_unjournaled))
    ),
    figure!(
        Some((STORE, "redis_config_error")),
        Some(("edgenode_redis_config_error", Gauge, "1 while Redis refuses this node's credentials or database (fix redis_url)")),
        |s| Some(Flag(s.store.redis_config_error))
    ),
    figure!(
        None,
        Some(("edgenode_degraded", Gauge, "1 while health says degraded: a disk fault or the disk at its reserve, an unset clock, a Redis configuration error, or no Redis under require_redis")),
        |s| Some(Flag(s.store.degraded.is_some()))
    ),
    figure!(
        Some((NEAR, "up")),
        Some(("edgenode_near_cache_up", Gauge, "1 while the near cache's invalidation stream from Redis is up and the cache serves")),
        |s| s.store.near.map(|n| Flag(n.link_up))
    ),
    figure!(
        Some((NEAR, "hits")),
        Some(("edgenode_near_cache_hits", Counter, "Touches answered from the near cache, without a Redis round trip")),
        |s| s.store.near.map(|n| Number(n.hits))
    ),
    figure!(
        Some((NEAR, "misses")),
        Some(("edgenode_near_cache_misses", Counter, "Touches of sessions the near cache did not hold (read from Redis and cached)")),
        |s| s.store.near.map(|n| Number(n.misses))
    ),
    figure!(
        Some((NEAR, "invalidations")),
        Some(("edgenode_near_cache_invalidations", Counter, "Near-cache copies dropped because the session changed (anywhere) or the stream went down")),
        |s| s.store.near.map(|n| Number(n.invalidations))
    ),
    figure!(
        Some((NEAR, "evictions")),
        Some(("edgenode_near_cache_evictions", Counter, "Near-cache copies evicted to stay within near_cache_mb")),
        |s| s.store.near.map(|n| Number(n.evictions))
    ),
    figure!(
        Some((NEAR, "unadmitted")),
        Some(("edgenode_near_cache_unadmitted", Counter, "Touches of sessions not used again within near_admit_ms: read through and counted with the write-behind, not cached")),
        |s| s.store.near.map(|n| Number(n.unadmitted))
    ),
    figure!(
        Some((NEAR, "bytes")),
        Some(("edgenode_near_cache_bytes", Gauge, "Estimated memory held by near-cache copies (bound: near_cache_mb)")),
        |s| s.store.near.map(|n| Number(n.bytes))
    ),
    figure!(
        Some((NEAR, "entries")),
        Some(("edgenode_near_cache_entries", Gauge, "Sessions held in the near cache")),
        |s| s.store.near.map(|n| Number(n.entries))
    ),
    figure!(
        Some((NEAR, "pending_touches")),
        Some(("edgenode_near_cache_pending_touches", Gauge, "Requests counted in the near cache and not yet written to Redis")),
        |s| s.store.near.map(|n| Number(n.pending))
    ),
    figure!(Some((NEAR, "capacity_bytes")), None, |s| s
        .store
        .near
        .map(|n| Number(n.capacity_bytes))),
    figure!(
        Some((POOL, "workers")),
        Some(("edgenode_pool_workers", Gauge, "Request worker threads")),
        |s| Some(Number(s.pool.workers as u64))
    ),
    figure!(
        Some((POOL, "in_flight")),
        Some(("edgenode_pool_in_flight", Gauge, "Requests being served")),
        |s| Some(Number(s.pool.in_flight as u64))
    ),
    figure!(
        Some((POOL, "queued")),
        Some(("edgenode_disk_flush_waiters", Gauge, "Requests waiting for a disk flush")),
        |s| Some(Number(s.disk_flush_waiters))
    ),
    figure!(
        Some((DISK, "written_bytes")),
        Some(("edgenode_disk_written_bytes", Counter, "Bytes the node has caused to be written to storage (/proc/self/io write_bytes): an upper bound on the SD card's wear")),
        |s| s.disk_written_bytes.map(Number)
    ),
    figure!(
        Some((DISK, "fsyncs")),
        Some(("edgenode_disk_fsyncs", Counter, "Flushes of the local database that wrote and synced data to disk (group commits and lazy flushes; a flush with nothing new syncs nothing)")),
        |s| Some(Number(s.disk_fsyncs))
    ),
    figure!(
        Some((DISK, "mirror_touches_skipped")),
        Some(("edgenode_mirror_touches_skipped", Counter, "Uses served in Redis mode whose disk-mirror copy was within mirror_lag_secs and so was not rewritten")),
        |s| Some(Number(s.mirror_touches_skipped))
    ),
    figure!(
        Some((DISK, "uses_log_bytes")),
        Some(("edgenode_disk_uses_log_bytes", Gauge, "Bytes written to uses.log since its last fold: uses counted without Redis (or in an outage), in whole pages at the lazy flush, not yet folded into their session records (folded at 8 MiB)")),
        |s| Some(Number(s.uses_log_bytes))
    ),
    figure!(
        Some((POOL, "connections")),
        Some(("edgenode_open_connections", Gauge, "Open client connections")),
        |s| Some(Number(s.pool.connections as u64))
    ),
    figure!(
        Some((POOL, "completed")),
        Some(("edgenode_pool_completed", Counter, "Requests served")),
        |s| Some(Number(s.pool.completed))
    ),
    figure!(
        Some((POOL, "rejected")),
        Some(("edgenode_rejected_requests", Counter, "Requests and connections refused with 503 by admission control")),
        |s| Some(Number(s.pool.rejected))
    ),
    figure!(
        None,
        Some(("edgenode_cache_hits", Counter, "Shared cache lookups answered by a tier")),
        |s| Some(PerTier(Tier::ALL.map(|t| (t, s.cache.hits[t as usize])).into()))
    ),
    figure!(
        None,
        Some(("edgenode_cache_misses", Counter, "Shared cache lookups a tier could not answer")),
        |s| Some(PerTier(Tier::ALL.map(|t| (t, s.cache.misses[t as usize])).into()))
    ),
    figure!(
        None,
        Some(("edgenode_cache_evictions", Counter, "Values pushed out of a local tier to stay within its bytes")),
        |s| Some(PerTier(vec![
            (Tier::Memory, s.cache.memory_evictions),
            (Tier::Disk, s.cache.disk_evictions),
        ]))
    ),
    figure!(
        None,
        Some(("edgenode_cache_bytes", Gauge, "Bytes a local tier holds (values, keys and bookkeeping)")),
        |s| Some(PerTier(vec![
            (Tier::Memory, s.cache.memory_bytes),
            (Tier::Disk, s.cache.disk_bytes),
        ]))
    ),
    figure!(Some((CACHE, "memory_bytes")), None, |s| Some(Number(
        s.cache.memory_bytes
    ))),
    figure!(Some((CACHE, "disk_bytes")), None, |s| Some(Number(
        s.cache.disk_bytes
    ))),
    figure!(
        Some((CACHE, "disk_errors")),
        Some(("edgenode_cache_disk_errors", Counter, "Shared cache disk tier operations that failed on the disk (a read is then a miss, a write left to the other tiers; the disk fault itself degrades the node)")),
        |s| Some(Number(s.cache.disk_errors))
    ),
    figure!(
        None,
        Some(("edgenode_cache_bytes_limit", Gauge, "The byte bound of a local tier (cache_memory_mb, cache_disk_mb)")),
        |s| Some(PerTier(vec![
            (Tier::Memory, s.cache.memory_budget),
            (Tier::Disk, s.cache.disk_budget),
        ]))
    ),
    figure!(
        None,
        Some(("edgenode_cache_lease_grants", Counter, "Fill leases granted")),
        |s| Some(Number(s.cache.lease_grants))
    ),
    figure!(
        None,
        Some(("edgenode_cache_lease_waits", Counter, "Lease requests that waited for another client's fill")),
        |s| Some(Number(s.cache.lease_waits))
    ),
    figure!(
        None,
        Some(("edgenode_cache_lease_wait_timeouts", Counter, "Lease waits that ended without a value")),
        |s| Some(Number(s.cache.lease_wait_timeouts))
    ),
    figure!(
        None,
        Some(("edgenode_cache_lease_refused", Counter, "PUTs refused (409) for an expired or foreign lease")),
        |s| Some(Number(s.cache.lease_refused))
    ),
    figure!(
        None,
        Some(("edgenode_cache_events_heard", Counter, "Invalidations from other nodes heard through Redis")),
        |s| Some(Number(s.cache.events_heard))
    ),
    figure!(
        None,
        Some(("edgenode_cache_replayed", Counter, "Deletions and purges made during an outage, replayed into Redis")),
        |s| Some(Number(s.cache.replayed))
    ),
    figure!(
        None,
        Some(("edgenode_cache_lease_waiting", Gauge, "Lease requests waiting now")),
        |s| Some(Number(s.cache.lease_waiting))
    ),
    figure!(
        Some((CACHE, "pending_invalidations")),
        Some(("edgenode_cache_pending_invalidations", Gauge, "Deletions and purges journaled during an outage, not yet replayed")),
        |s| Some(Number(s.cache.pending_invalidations))
    ),
    figure!(
        Some((CACHE, "redis_reachable")),
        Some(("edgenode_cache_redis_reachable", Gauge, "1 while the cache's Redis answers")),
        |s| Some(Flag(s.cache.redis_reachable))
    ),
    figure!(
        Some((CACHE, "subscribed")),
        Some(("edgenode_cache_subscribed", Gauge, "1 while this node hears the cache's invalidations")),
        |s| Some(Flag(s.cache.subscribed))
    ),
];

impl NodeStatus {
    /// The figures of `/api/health`, in their sections (the caller adds
    /// what is not status: the instance, the version, the uptime).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut root = Map::new();
        for f in FIGURES {
            let Some((path, key)) = f.json else { continue };
            let section = path.iter().try_fold(&mut root, |map, name| {
                let entry = map
                    .entry(name.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                if entry.is_null() {
                    *entry = Value::Object(Map::new());
                }
                entry.as_object_mut()
            });
            let Some(section) = section else { continue };
            match (f.read)(self) {
                Some(Number(n)) => section.insert(key.into(), n.into()),
                Some(Flag(b)) => section.insert(key.into(), b.into()),
                Some(Text(t)) => section.insert(key.into(), t.into()),
                Some(PerTier(_)) => None,
                // A section that does not exist now (the near cache is off).
                None => {
                    if section.is_empty() {
                        null_section(&mut root, path);
                    }
                    None
                }
            };
        }
        root
    }
}

/// Turns an empty section at `path` into `null`.
fn null_section(root: &mut Map<String, Value>, path: &[&str]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut map = root;
    for name in parents {
        match map.get_mut(*name).and_then(Value::as_object_mut) {
            Some(m) => map = m,
            None => return,
        }
    }
    map.insert(last.to_string(), Value::Null);
}

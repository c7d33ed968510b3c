//! The session store's side of the node's own disk: sessions, their
//! indexes, the mirror of Redis and the fallback journal, as postcard
//! records in trees of the node's database ([`crate::disk`]).
//!
//! The plan: the database itself (opening, the free-space reserve, group
//! commit, reopening after a fault, the closing snapshot) is the disk
//! layer's, shared with the cache; what is here is the session store's
//! use of it, one job per file:
//! - this file: the [`SledStore`] handle, its trees and striped locks,
//!   open and close, the counters;
//! - `sessions`: create, touch, get, patch, delete, rotate, list, evict;
//! - `change`: the one place a session changes, with index upkeep;
//! - `mirror`: Redis mode's copy of what this node served;
//! - [`journal`] and [`journal_ops`]: the fallback journal and its entries;
//! - `sweep`: expiry and tombstone sweeps;
//! - `uses`: the uses this node counts itself, in memory and in a compact
//!   log beside the database (`uses.log`), folded into the records rarely.
//!
//! Trees and keys:
//! - `sessions`: id (16 bytes) → versioned record.
//! - `by_user`: user_id, 0x00, id → (). Per-user listing is a prefix scan.
//! - `by_expiry`: expiry ms (big-endian u64), id → (). The key is a *lower bound*
//!   on the session's expiry: touches slide the real expiry later without
//!   rewriting the index (that would double the write cost of the hot path); the
//!   sweep re-files entries it finds still alive.
//! - `journal`: sequence (big-endian u64) → operation acknowledged in fallback.
//! - `deleted`: id → deletion time (big-endian u64 ms): sessions this node
//!   saw deleted or rotated away, here or (through Redis) anywhere, kept for
//!   the absolute session lifetime. In fallback they tell "deleted" (404)
//!   from "not held here" (503), and a re-seed of an emptied Redis skips them.
//! - `meta`: the node's origin id, the Redis epoch last seen, the clean
//!   shutdown's session count.
//!
//! The disk is never allowed to fill: every write first checks the disk's
//! reserve ([`crate::disk::space`]) and is refused with
//! [`StoreError::DiskFull`](super::StoreError::DiskFull) below it; deletes
//! may use half of it, so a logout still lands when nothing else does. A
//! failed flush is a fault (health says so) until a later flush succeeds,
//! and the database is then reopened ([`SledStore::reopen`]).
//!
//! Every change of one session happens under one of a fixed set of striped
//! locks, so concurrent touches are exact and a PATCH never interleaves with a
//! rotate. Locks are held only for in-memory sled work, never across an await.
//! Durability is separate: writers call [`SledStore::durable`], the disk's
//! group commit ([`crate::disk::commit`]) that runs one `fsync` on the
//! blocking pool for everyone waiting.

mod change;
pub mod journal;
pub mod journal_ops;
mod mirror;
mod sessions;
mod sweep;
mod uses;

use crate::disk::{Database, DiskConfig, DiskError, Opened, Space};
use crate::session::{Limits, Session};
use sled::Tree;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const LOCK_STRIPES: usize = 64;

pub type Result<T> = std::result::Result<T, super::StoreError>;

#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The node's database; its trees are named in [`TREES`].
    db: Database,
    locks: Vec<Mutex<()>>,
    limits: Limits,
    /// Sessions present minus those known gone; a gauge, not an exact count
    /// (expired sessions stay counted until the sweep removes them).
    active: AtomicI64,
    /// Journal entries, kept as a counter: `Tree::len` walks every key, and
    /// health, metrics and the probe loop ask often during a long outage.
    journal_entries: AtomicU64,
    /// Encoded bytes of the journal's entries, against `max_journal_bytes`.
    journal_bytes: AtomicU64,
    /// Fallback touches not yet journaled, one map per lock stripe:
    /// id → (requests, last request time). See [`journal_ops::Op::Touches`].
    pending_touches: Vec<Mutex<HashMap<[u8; 16], journal::PendingTouches>>>,
    /// Touches that could not be journaled (journal at its budget, or the
    /// disk at its reserve): served, but their counts never reach Redis.
    touches_unjournaled: AtomicU64,
    /// This data directory's id in operation ids (see `journal_ops`).
    origin: u64,
    local: LocalLimits,
    /// Where the rolling sweep of `deleted` continues.
    tombstone_cursor: Mutex<Vec<u8>>,
    corrupt: AtomicU64,
    /// Touch results from Redis not yet written to the mirror, one map per
    /// lock stripe. Written by the housekeeping flush (and at once on a
    /// failover), so the Redis-mode hot path does no sled write at all.
    touched: Vec<Mutex<HashMap<[u8; 16], Session>>>,
    /// What the mirror holds of each session served here, compactly, one
    /// map per lock stripe: a touch whose expiry the mirror's copy is within
    /// `mirror_lag_ms` of writes nothing (see `mirror::MirrorWritten`).
    written: Vec<Mutex<HashMap<u64, mirror::MirrorWritten>>>,
    /// How far the mirror's copy of a session may lag Redis's expiry before
    /// a touch rewrites it (`mirror_lag_secs`, at most a tenth of the TTL).
    mirror_lag_ms: AtomicU64,
    /// The stripe of `written` the next lazy flush prunes of expired entries.
    prune_cursor: AtomicUsize,
    /// Touch results from Redis the mirror did not need to write.
    mirror_touches_skipped: AtomicU64,
    /// Uses counted here (without Redis, or in an outage) and not yet in
    /// their records: see `uses`.
    uses: uses::Uses,
}

/// Declares the session store's trees once: their names, in the order the
/// database opens them ([`TREES`]), and an accessor for each on an open
/// database ([`Trees`]), each name beside its place in that order.
macro_rules! trees {
    ($($index:literal $name:ident),* $(,)?) => {
        /// The session store's trees (see the module doc), opened with the
        /// database in this order.
        const TREES: &[&str] = &[$(stringify!($name)),*];

        /// The session store's trees of one open database, by name.
        trait Trees {
            $(fn $name(&self) -> &Tree;)*
        }

        impl Trees for Opened {
            $(fn $name(&self) -> &Tree {
                self.tree($index)
            })*
        }
    };
}

trees!(
    0 sessions,
    1 by_user,
    2 by_expiry,
    3 journal,
    4 deleted,
    5 meta,
);

/// Where a clean shutdown leaves the session count, so the next start need
/// not walk every key.
const CLEAN_COUNT_KEY: &[u8] = b"clean_shutdown_session_count";
/// This data directory's random origin (see `journal_ops`), drawn anew at
/// every start whose journal is empty.
const ORIGIN_KEY: &[u8] = b"origin";
/// The Redis epoch this node last synchronised its mirror with.
const EPOCH_KEY: &[u8] = b"redis_epoch";

/// The node's own bounds on its disk.
#[derive(Debug, Clone, Copy)]
pub struct LocalLimits {
    /// sled's page cache, the bulk of the node's memory.
    pub cache_bytes: u64,
    /// Journal size above which fallback creates, changes and rotations are
    /// refused (deletes never are; touches stop being counted).
    pub max_journal_bytes: u64,
    /// Free space of the data directory's file system kept in reserve.
    pub min_free_bytes: u64,
    /// The longest wait for a flush (`disk_flush_timeout_ms`).
    pub flush_timeout: std::time::Duration,
}

/// How a write uses the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journal {
    /// Not journaled (no Redis configured, or a mirror write).
    Off,
    /// Journaled under a new sequence number.
    Next,
    /// Journaled under this sequence number: the id a live Redis request
    /// already carried before it timed out.
    At(u64),
}

impl SledStore {
    /// Opens (or creates) the database in `dir`. `cache_bytes` bounds sled's
    /// page cache, the bulk of the node's memory.
    pub fn open(dir: &Path, local: LocalLimits, limits: Limits) -> Result<SledStore> {
        let config = DiskConfig {
            cache_bytes: local.cache_bytes,
            min_free_bytes: local.min_free_bytes,
            // A session record, or a shared-cache entry (bounded by the
            // request body, 64 KiB by default), whichever is larger.
            largest_value_bytes: (limits.max_metadata_bytes as u64 + 1024).max(64 << 10),
            flush_timeout: local.flush_timeout,
        };
        let db = Database::open(dir, config, TREES)?;
        let trees = db.current()?;
        // A fresh origin whenever nothing journaled depends on the old one:
        // two boards started from one cloned SD card must not share one.
        let kept = match trees.meta().get(ORIGIN_KEY)? {
            Some(v) if v.len() == 8 && !trees.journal().is_empty() => {
                Some(u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
            }
            _ => None,
        };
        let origin = match kept {
            Some(o) => o,
            None => {
                let o = u64::from_be_bytes(
                    uuid::Uuid::new_v4().as_bytes()[..8]
                        .try_into()
                        .unwrap_or([1; 8]),
                );
                trees.meta().insert(ORIGIN_KEY, &o.to_be_bytes())?;
                o
            }
        };
        drop(trees);
        let recovered = uses::UseLog::open(dir).map_err(|e| {
            super::StoreError::from(DiskError::Fault(format!(
                "opening {} failed: {e}",
                uses::FILE_NAME
            )))
        })?;
        if recovered.bad_pages > 0 {
            tracing::error!(
                pages = recovered.bad_pages,
                "pages of {} failed their checksum (a write cut short); their uses are not counted",
                uses::FILE_NAME
            );
        }
        let corrupt = AtomicU64::new(recovered.bad_pages);
        let store = SledStore {
            inner: Arc::new(Inner {
                db,
                journal_bytes: AtomicU64::new(0),
                pending_touches: (0..LOCK_STRIPES)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect(),
                touches_unjournaled: AtomicU64::new(0),
                origin,
                local,
                tombstone_cursor: Mutex::new(Vec::new()),
                locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
                limits,
                active: AtomicI64::new(0),
                corrupt,
                journal_entries: AtomicU64::new(0),
                touched: (0..LOCK_STRIPES)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect(),
                written: (0..LOCK_STRIPES)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect(),
                mirror_lag_ms: AtomicU64::new(limits.ttl_ms / 10),
                prune_cursor: AtomicUsize::new(0),
                mirror_touches_skipped: AtomicU64::new(0),
                uses: uses::Uses::new(recovered),
            }),
        };
        store.count()?;
        Ok(store)
    }

    /// The open trees, or a disk fault while the database is being
    /// reopened.
    fn t(&self) -> Result<Arc<Opened>> {
        Ok(self.inner.db.current()?)
    }

    /// A sled error met by a read, remembered by the database (see
    /// [`Database::sled`]) and answered as a disk fault (503) whatever its
    /// kind: a read that fails on a full disk (one that waited for a write
    /// sled abandoned) is not the reader's write being refused (507), and
    /// never "absent" (404).
    fn failed(&self, e: sled::Error) -> super::StoreError {
        let e = self.inner.db.noted(DiskError::from(e));
        super::StoreError::DiskFault(format!("reading the local store failed: {e}"))
    }

    /// Remembers a disk error the store met (the database is then dead
    /// until reopened) and hands it back.
    fn noted(&self, e: super::StoreError) -> super::StoreError {
        use super::StoreError as E;
        match e {
            E::DiskNoSpace(m) => self.inner.db.noted(DiskError::NoSpace(m)).into(),
            E::DiskFault(m) => self.inner.db.noted(DiskError::Fault(m)).into(),
            other => other,
        }
    }

    /// The node's database, for the other parts of the node that keep
    /// trees in it (the shared cache's disk tier and its journal).
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    /// Sets the gauges from what is on disk: the session count a clean
    /// shutdown left (consumed, so a crash after this start forces a
    /// recount) or one walk of the keys; the journal's entries and bytes.
    fn count(&self) -> Result<()> {
        self.count_in(&*self.t()?, true)
    }

    /// [`count`](Self::count) over given trees (a reopen counts the new ones
    /// before anyone else can write to them). A reopen keeps the session
    /// gauge (`sessions`: false): walking every session reads every record
    /// (blob files for large ones), which would keep the node unready for
    /// seconds after a disk fault; the journal, bounded by its budget and
    /// counted exactly for the replay, is walked.
    fn count_in(&self, t: &Opened, sessions: bool) -> Result<()> {
        let clean = t.meta().remove(CLEAN_COUNT_KEY)?;
        if sessions {
            let n = match clean {
                Some(v) if v.len() == 8 => {
                    i64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))
                }
                _ => t.sessions().len() as i64,
            };
            self.inner.active.store(n, Ordering::Relaxed);
        }
        let (mut entries, mut bytes) = (0u64, 0u64);
        for (_, v) in t.journal().iter().flatten() {
            entries += 1;
            bytes += v.len() as u64;
        }
        self.inner.journal_entries.store(entries, Ordering::Relaxed);
        self.inner.journal_bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Whether a write to disk failed (sled then refuses every write until
    /// the database is reopened).
    pub fn needs_reopen(&self) -> bool {
        self.inner.db.needs_reopen()
    }

    /// Reopens the database after a write error (see
    /// [`Database::reopen`]), counting the new trees before anyone else can
    /// write to them. Blocking: run it on the blocking pool.
    pub fn reopen(&self) -> Result<()> {
        // What the failed flush did not write is gone: the mirror's record
        // of what it holds is forgotten, so the next touches write again.
        self.forget_written();
        self.inner.db.reopen(|t| self.count_in(t, false))?;
        // Record writes the failed flush did not sync are gone, and with
        // them uses that left memory for their records (a fold, a PATCH):
        // the uses' log still holds them.
        self.reload_uses()
    }

    /// A tree of this database for another part of the node (see
    /// [`Database::tree`]). Take it per use and never keep it.
    pub fn tree(&self, name: &str) -> Result<Tree> {
        Ok(self.inner.db.tree(name)?)
    }

    /// Refuses ([`super::StoreError::DiskFull`]) a write of another part of the
    /// node that would take the disk into its reserve; a `release` (a
    /// deletion) may use half of it, as a logout does.
    pub fn check_space_for(&self, release: bool) -> Result<()> {
        self.check_space(if release {
            Space::Release
        } else {
            Space::Write
        })
    }

    /// This data directory's id in the ids of its journal's operations.
    pub fn origin(&self) -> u64 {
        self.inner.origin
    }

    /// A new operation id, for a live Redis request that may end up
    /// journaled (see [`Journal::At`]).
    pub fn next_seq(&self) -> Result<u64> {
        Ok(self.inner.db.next_seq()?)
    }

    /// The Redis epoch this node's mirror was last synchronised with.
    pub fn redis_epoch(&self) -> Option<String> {
        self.t()
            .ok()?
            .meta()
            .get(EPOCH_KEY)
            .ok()
            .flatten()
            .and_then(|v| String::from_utf8(v.to_vec()).ok())
    }

    pub fn set_redis_epoch(&self, epoch: &str) -> Result<()> {
        self.t()?.meta().insert(EPOCH_KEY, epoch.as_bytes())?;
        Ok(())
    }

    /// Why the local store cannot take writes now, if it cannot: the disk at
    /// its reserve, or a write to it that failed.
    pub fn fault(&self) -> Option<String> {
        self.inner.db.fault()
    }

    pub fn journal_bytes(&self) -> u64 {
        self.inner.journal_bytes.load(Ordering::Relaxed)
    }

    pub fn touches_unjournaled(&self) -> u64 {
        self.inner.touches_unjournaled.load(Ordering::Relaxed)
    }

    /// Whether this node saw the session deleted (or rotated away).
    pub fn is_deleted(&self, id: &[u8; 16]) -> bool {
        self.t()
            .is_ok_and(|t| matches!(t.deleted().get(id), Ok(Some(_))))
    }

    /// Refuses a write that would take the disk into its reserve.
    fn check_space(&self, space: Space) -> Result<()> {
        Ok(self.inner.db.check_space(space)?)
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn sessions_active(&self) -> u64 {
        self.inner.active.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn corrupt_records(&self) -> u64 {
        self.inner.corrupt.load(Ordering::Relaxed)
    }

    pub fn commits_waiting(&self) -> u64 {
        self.inner.db.commits_waiting()
    }

    /// Flushes that wrote and synced data (see [`Database::syncs`]), and
    /// syncs of the uses' log.
    pub fn disk_syncs(&self) -> u64 {
        self.inner.db.syncs() + self.uses_syncs()
    }

    /// Waits until everything written before this call is on disk.
    pub async fn durable(&self) -> Result<()> {
        Ok(self.inner.db.durable().await?)
    }

    /// Flushes lazily-written data (mirror updates, sweeps), and first the
    /// buffered mirror touches when `touched` (every few seconds: see
    /// `Store::run_housekeeping`), and the uses counted here to their log.
    /// With nothing written since the last flush, nothing is written or
    /// synced.
    pub async fn flush_lazy(&self, touched: bool) -> Result<()> {
        if touched {
            self.flush_touched()?;
        }
        // The database is synced whatever the uses' log does.
        let logged = self.write_uses_off_worker().await;
        self.durable().await.and(logged)
    }

    /// [`write_uses`](Self::write_uses) on the blocking pool, within the
    /// flush deadline.
    async fn write_uses_off_worker(&self) -> Result<()> {
        let store = self.clone();
        let write = tokio::task::spawn_blocking(move || store.write_uses());
        match tokio::time::timeout(self.inner.local.flush_timeout, write).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(super::StoreError::DiskFault(format!(
                "writing {} panicked: {e}",
                uses::FILE_NAME
            ))),
            Err(_) => Err(super::StoreError::DiskFault(format!(
                "writing {} takes longer than the flush deadline",
                uses::FILE_NAME
            ))),
        }
    }

    /// Folds the uses' log into the records when it is due (see `uses`):
    /// the records written, made durable, then the log emptied.
    pub async fn fold_uses_if_due(&self) -> Result<()> {
        if !self.uses_due_fold() {
            return Ok(());
        }
        let store = self.clone();
        let folded = tokio::task::spawn_blocking(move || store.fold_uses())
            .await
            .map_err(|e| super::StoreError::DiskFault(format!("folding uses panicked: {e}")))??;
        self.durable().await?;
        self.clear_uses_log();
        tracing::info!(
            records = folded,
            "folded the uses' log into the session records"
        );
        Ok(())
    }

    /// Whether a flush is stuck past its deadline, and for how long.
    pub fn flush_stuck_for(&self) -> Option<std::time::Duration> {
        self.inner.db.flush_stuck_for()
    }

    /// Final flush on a clean shutdown; records the session count so the
    /// next start skips the recount, and leaves sled's snapshot behind
    /// ([`Database::leave_snapshot`]). On a faulty disk it writes nothing:
    /// everything acknowledged was flushed before it was acknowledged, the
    /// next start recounts, and the process must end within the shutdown
    /// grace whatever the disk does (every wait here has the flush
    /// deadline).
    pub async fn close(&self) -> Result<()> {
        if let Some(e) = self.inner.db.dead() {
            tracing::warn!(error = %e, "the local store's disk is faulty: no closing flush, no snapshot; the next start recounts");
            return Ok(());
        }
        self.flush_touched()?;
        self.flush_pending_touches()?;
        if let Err(e) = self.write_uses_off_worker().await {
            tracing::warn!(error = %e, "the last uses could not be written to the uses' log");
        }
        let n = self.inner.active.load(Ordering::Relaxed);
        self.t()?.meta().insert(CLEAN_COUNT_KEY, &n.to_be_bytes())?;
        self.durable().await?;
        // sled's open reads files: the blocking pool's work, not a worker's.
        // Bounded: a close that cannot finish is left to the next start.
        let db = self.inner.db.clone();
        let snapshot = tokio::task::spawn_blocking(move || db.leave_snapshot());
        if tokio::time::timeout(self.inner.local.flush_timeout, snapshot)
            .await
            .is_err()
        {
            tracing::warn!("leaving the local store's snapshot takes too long; not waiting for it");
        }
        Ok(())
    }

    fn lock(&self, id: &[u8; 16]) -> MutexGuard<'_, ()> {
        // A poisoned stripe only means another request panicked mid-change;
        // the data itself is sled's, so carry on.
        self.inner.locks[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Reads and decodes a record, with the use memory holds for it taken
    /// in (see `uses`); a corrupt one is logged, counted and
    /// treated as absent. A read that fails is a disk fault (503), never
    /// "absent": a full or failing disk must not log anyone out.
    fn load(&self, id: &[u8; 16]) -> Result<Option<Session>> {
        let bytes = match self.t()?.sessions().get(id) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::error!(error = %e, "reading session failed");
                return Err(self.failed(e));
            }
        };
        match Session::decode(&bytes) {
            Ok(s) => Ok(Some(self.with_use(s))),
            Err(e) => {
                self.inner.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::error!(id = %crate::session::format_id(id), error = %e, "corrupt session record; treating as absent");
                Ok(None)
            }
        }
    }

    /// Writes raw bytes as a session record and flushes (tests of corrupt
    /// data at rest).
    #[doc(hidden)]
    pub fn put_raw_for_test(&self, id: &[u8; 16], bytes: &[u8]) -> Result<()> {
        self.t()?.sessions().insert(id, bytes)?;
        self.inner.db.flush_for_test()?;
        Ok(())
    }
}

/// The session ids of one shard of a per-session buffer, copied out so the
/// shard's lock is not held while each is handled.
fn ids_in<V>(shard: &Mutex<HashMap<[u8; 16], V>>) -> Vec<[u8; 16]> {
    shard
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .copied()
        .collect()
}

/// The lock stripe (and touch-buffer shard) of a session id. Ids are random,
/// so their first bytes spread evenly.
fn stripe(id: &[u8; 16]) -> usize {
    u64::from_le_bytes([id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7]]) as usize
        % LOCK_STRIPES
}

fn user_prefix(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + 17);
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k
}

fn user_key(user: &str, id: &[u8; 16]) -> Vec<u8> {
    let mut k = user_prefix(user);
    k.extend_from_slice(id);
    k
}

fn expiry_key(at: u64, id: &[u8; 16]) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&at.to_be_bytes());
    k[8..].copy_from_slice(id);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vendored sled starts a reverse scan (`last()`, `iter().rev()`) at
    /// a key of 1 KiB of 0xFF bytes instead of upstream's 1 MiB (see
    /// vendor/sled/EDGENODE-PATCH.md). That is only right while every key the
    /// store writes sorts below it, which any key shorter than 1 KiB does.
    #[test]
    fn every_key_the_store_writes_is_shorter_than_sleds_1_kib_upper_bound() {
        let longest_user = "\u{10FFFF}".repeat(crate::session::MAX_USER_ID_LEN / 4);
        assert!(longest_user.len() <= crate::session::MAX_USER_ID_LEN);
        let lengths = [
            user_key(&"x".repeat(crate::session::MAX_USER_ID_LEN), &[0xff; 16]).len(),
            user_key(&longest_user, &[0xff; 16]).len(),
            expiry_key(u64::MAX, &[0xff; 16]).len(),
            16, // sessions and deleted: a session id
            8,  // journal: a sequence number
            CLEAN_COUNT_KEY.len(),
            ORIGIN_KEY.len(),
            EPOCH_KEY.len(),
        ];
        for len in lengths {
            assert!(len < 1024, "a key of {len} bytes");
        }
    }

    /// Each accessor reaches the tree of its own name: the file layout on
    /// disk (tree names) is what an existing data directory is opened by.
    #[test]
    fn each_tree_accessor_opens_the_tree_of_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let config = DiskConfig {
            cache_bytes: 1 << 20,
            min_free_bytes: 0,
            largest_value_bytes: 1 << 16,
            flush_timeout: std::time::Duration::from_secs(5),
        };
        let db = Database::open(dir.path(), config, TREES).unwrap();
        let t = db.current().unwrap();
        let named: [(&Tree, &str); 6] = [
            (t.sessions(), "sessions"),
            (t.by_user(), "by_user"),
            (t.by_expiry(), "by_expiry"),
            (t.journal(), "journal"),
            (t.deleted(), "deleted"),
            (t.meta(), "meta"),
        ];
        assert_eq!(TREES.len(), named.len());
        for (tree, name) in named {
            assert_eq!(&tree.name()[..], name.as_bytes());
        }
    }
}

//! The node's own disk: sled trees holding postcard records.
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
//! The disk is never allowed to fill: every write first checks the free space
//! of the data directory (statvfs, cached for a moment) against
//! `min_free_bytes`, and is refused with [`StoreError::DiskFull`] below it;
//! deletes may use half of that reserve, so a logout still lands when nothing
//! else does. A failed flush is remembered as a fault (health says so) until
//! a later flush succeeds.
//!
//! Every change of one session happens under one of a fixed set of striped
//! locks, so concurrent touches are exact and a PATCH never interleaves with a
//! rotate. Locks are held only for in-memory sled work, never across an await.
//! Durability is separate: writers call [`SledStore::durable`], a group commit
//! that runs one `fsync` on the blocking pool for everyone waiting.

use super::journal::{self, Op};
use super::{PatchOutcome, StoreError};
use crate::session::{InputError, Limits, Patch, Session};
use sled::{Db, Tree};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

const LOCK_STRIPES: usize = 64;

pub type Result<T> = std::result::Result<T, super::StoreError>;

#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The open database. Swapped for a fresh one by [`SledStore::reopen`]
    /// after a write error, which sled keeps (sticky) until then.
    /// `None` only while [`SledStore::reopen`] holds the lock for writing.
    trees: std::sync::RwLock<Option<Arc<Trees>>>,
    dir: PathBuf,
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
    /// id → (requests, last request time). See [`Op::Touches`].
    pending_touches: Vec<Mutex<HashMap<[u8; 16], PendingTouches>>>,
    /// Touches that could not be journaled (journal at its budget, or the
    /// disk at its reserve): served, but their counts never reach Redis.
    touches_unjournaled: AtomicU64,
    /// This data directory's id in operation ids (see `journal`).
    origin: u64,
    local: LocalLimits,
    disk: DiskGuard,
    /// Where the rolling sweep of `deleted` continues.
    tombstone_cursor: Mutex<Vec<u8>>,
    corrupt: AtomicU64,
    commit: GroupCommit,
    /// Touch results from Redis not yet written to the mirror, one map per
    /// lock stripe. Written by the housekeeping flush (and at once on a
    /// failover), so the Redis-mode hot path does no sled write at all.
    touched: Vec<Mutex<HashMap<[u8; 16], Session>>>,
}

impl Inner {
    fn t(&self) -> Arc<Trees> {
        match self
            .trees
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(t) => t.clone(),
            // Empty only under `reopen`'s write lock, which it never
            // releases empty (it exits instead), and after a `close` whose
            // last reopen failed, when nothing uses the store any more.
            None => unreachable!("the local store is used while reopened or after close"),
        }
    }
}

/// The database and its trees (see the module doc).
struct Trees {
    db: Db,
    sessions: Tree,
    by_user: Tree,
    by_expiry: Tree,
    journal: Tree,
    deleted: Tree,
    meta: Tree,
}

impl Trees {
    fn open(dir: &Path, local: &LocalLimits) -> Result<Trees> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(local.cache_bytes)
            .segment_size(256 * 1024)
            // edgenode flushes on its own schedule, on its own bounded pool.
            .flush_every_ms(None)
            .mode(sled::Mode::LowSpace)
            .open()?;
        Ok(Trees {
            sessions: db.open_tree("sessions")?,
            by_user: db.open_tree("by_user")?,
            by_expiry: db.open_tree("by_expiry")?,
            journal: db.open_tree("journal")?,
            deleted: db.open_tree("deleted")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }
}

/// Requests counted on one session since its last journal entry, and the
/// time of the last one.
type PendingTouches = (u64, u64);

/// Most buffered touches per stripe; past it a touch is written through.
const TOUCHED_PER_STRIPE: usize = 512;

/// Where a clean shutdown leaves the session count, so the next start need
/// not walk every key.
const CLEAN_COUNT_KEY: &[u8] = b"clean_shutdown_session_count";
/// This data directory's random origin (see `journal`), drawn anew at every
/// start whose journal is empty.
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

/// How much of the disk reserve a write may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Space {
    /// Creates, changes, mirror copies: stop at the reserve.
    Write,
    /// Deletes: may use half of the reserve.
    Release,
}

/// What a modification decided to do with the session it looked at.
enum Change {
    Keep,
    Put(Session),
    Remove,
    /// Remove it if held, and record the deletion either way.
    Tombstone,
    /// Remove this id and store the session under its (new) id.
    Move(Session),
}

impl SledStore {
    /// Opens (or creates) the database in `dir`. `cache_bytes` bounds sled's
    /// page cache, the bulk of the node's memory.
    pub fn open(dir: &Path, local: LocalLimits, limits: Limits) -> Result<SledStore> {
        let trees = Trees::open(dir, &local)?;
        // A fresh origin whenever nothing journaled depends on the old one:
        // two boards started from one cloned SD card must not share one.
        let kept = match trees.meta.get(ORIGIN_KEY)? {
            Some(v) if v.len() == 8 && !trees.journal.is_empty() => {
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
                trees.meta.insert(ORIGIN_KEY, &o.to_be_bytes())?;
                o
            }
        };
        let store = SledStore {
            inner: Arc::new(Inner {
                trees: std::sync::RwLock::new(Some(Arc::new(trees))),
                dir: dir.to_path_buf(),
                journal_bytes: AtomicU64::new(0),
                pending_touches: (0..LOCK_STRIPES)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect(),
                touches_unjournaled: AtomicU64::new(0),
                origin,
                local,
                disk: DiskGuard::new(dir.to_path_buf()),
                tombstone_cursor: Mutex::new(Vec::new()),
                locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
                limits,
                active: AtomicI64::new(0),
                corrupt: AtomicU64::new(0),
                journal_entries: AtomicU64::new(0),
                commit: GroupCommit::new(),
                touched: (0..LOCK_STRIPES)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect(),
            }),
        };
        store.count()?;
        Ok(store)
    }

    /// The open trees.
    fn t(&self) -> Arc<Trees> {
        self.inner.t()
    }

    /// Sets the gauges from what is on disk: the session count a clean
    /// shutdown left (consumed, so a crash after this start forces a
    /// recount) or one walk of the keys; the journal's entries and bytes.
    fn count(&self) -> Result<()> {
        self.count_in(&self.t())
    }

    /// [`count`](Self::count) over given trees (a reopen counts the new ones
    /// before anyone else can write to them).
    fn count_in(&self, t: &Trees) -> Result<()> {
        let n = match t.meta.remove(CLEAN_COUNT_KEY)? {
            Some(v) if v.len() == 8 => i64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
            _ => t.sessions.len() as i64,
        };
        self.inner.active.store(n, Ordering::Relaxed);
        let (mut entries, mut bytes) = (0u64, 0u64);
        for (_, v) in t.journal.iter().flatten() {
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
        self.inner.disk.flush_failed()
    }

    /// Reopens the database after a write error, once the data directory
    /// takes writes again (a probe file is written and synced first). What
    /// was acknowledged had been flushed before it was acknowledged, so it
    /// is all there; what was not (lazy mirror copies, touches) may be lost.
    /// Blocking: run it on the blocking pool. Requests wait on the swap for
    /// as long as the open takes.
    pub fn reopen(&self) -> Result<()> {
        let probe = self.inner.dir.join(".edgenode-write-probe");
        let probed = std::fs::write(&probe, b"ok")
            .and_then(|_| std::fs::File::open(&probe)?.sync_all())
            .and_then(|_| std::fs::remove_file(&probe));
        if let Err(e) = probed {
            return Err(StoreError::DiskFault(format!(
                "the data directory still refuses writes: {e}"
            )));
        }
        // Every request that reaches the store waits on this lock while it
        // is held, on a runtime worker: it is held for well under a second
        // (a longer wait is given up and tried again at the next tick), so
        // no request hangs behind a reopen.
        let mut slot = self.inner.trees.write().unwrap_or_else(|p| p.into_inner());
        // sled holds an exclusive lock on its file until every handle of the
        // old database is gone; in-flight users drop theirs within moments
        // (nobody takes a new one while the slot is locked).
        if let Some(old) = slot.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            if Arc::strong_count(&old) > 1 {
                // Still in use (a flush stuck on the failing disk, say):
                // back as it was, and another try at the next tick.
                *slot = Some(old);
                return Err(StoreError::DiskFault(
                    "the local store is still in use; reopening it at the next try".into(),
                ));
            }
            drop(old);
        }
        match self.open_trees() {
            Ok(t) => {
                // Counting writes (the clean-shutdown count is consumed): a
                // failure is returned with the new trees in place.
                let counted = self.count_in(&t);
                *slot = Some(Arc::new(t));
                drop(slot);
                counted?;
                self.inner.disk.flushed(None);
                tracing::warn!("the local store was reopened after a disk fault");
                Ok(())
            }
            Err(e) => {
                // The slot stays empty while it is locked, so nothing was
                // written or acknowledged meanwhile; a restart by the
                // service manager is the honest way on.
                tracing::error!(error = %e, "cannot reopen the local store; exiting so that the service manager restarts the node");
                std::process::exit(1);
            }
        }
    }

    /// A tree of this database for another part of the node (the shared
    /// cache's disk tier and its invalidation journal): one database means
    /// no second flusher thread, one page cache and one group commit
    /// ([`durable`](Self::durable)). Take it per use and never keep it: a
    /// handle held across [`reopen`](Self::reopen) would keep the old
    /// database, and its file lock, alive.
    pub fn tree(&self, name: &str) -> Result<Tree> {
        Ok(self.t().db.open_tree(name)?)
    }

    /// Refuses ([`StoreError::DiskFull`]) a write of another part of the
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
        Ok(self.t().db.generate_id()?)
    }

    /// The Redis epoch this node's mirror was last synchronised with.
    pub fn redis_epoch(&self) -> Option<String> {
        self.t()
            .meta
            .get(EPOCH_KEY)
            .ok()
            .flatten()
            .and_then(|v| String::from_utf8(v.to_vec()).ok())
    }

    pub fn set_redis_epoch(&self, epoch: &str) -> Result<()> {
        self.t().meta.insert(EPOCH_KEY, epoch.as_bytes())?;
        Ok(())
    }

    /// Why the local store cannot take writes now, if it cannot: the disk at
    /// its reserve, or a write to it that failed.
    pub fn fault(&self) -> Option<String> {
        self.inner.disk.fault(self.inner.local.min_free_bytes)
    }

    pub fn journal_bytes(&self) -> u64 {
        self.inner.journal_bytes.load(Ordering::Relaxed)
    }

    pub fn touches_unjournaled(&self) -> u64 {
        self.inner.touches_unjournaled.load(Ordering::Relaxed)
    }

    /// Whether this node saw the session deleted (or rotated away).
    pub fn is_deleted(&self, id: &[u8; 16]) -> bool {
        matches!(self.t().deleted.get(id), Ok(Some(_)))
    }

    /// Refuses a write that would take the disk into its reserve.
    fn check_space(&self, space: Space) -> Result<()> {
        let reserve = match space {
            Space::Write => self.inner.local.min_free_bytes,
            Space::Release => self.inner.local.min_free_bytes / 2,
        };
        self.inner.disk.check(reserve)
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
        self.inner.commit.waiting.load(Ordering::Relaxed)
    }

    /// Waits until everything written before this call is on disk.
    pub async fn durable(&self) -> Result<()> {
        self.group_commit().await
    }

    // ---- session operations ------------------------------------------------

    /// Stores a new session. Durable after [`durable`](Self::durable).
    pub fn create(&self, session: &Session, journal: Journal) -> Result<()> {
        self.check_space(Space::Write)?;
        self.modify(&session.id, session.created_at, journal, |_| {
            let op = Some(Op::Create(session.clone()));
            Ok((Change::Put(session.clone()), (), op))
        })
    }

    /// Counts one request, slides the expiry and returns the session. Not
    /// flushed: a touch lost to a crash costs one count, not a session.
    /// With [`Journal::Next`] the count is coalesced in memory and journaled
    /// by [`flush_pending_touches`](Self::flush_pending_touches). With the
    /// disk at its reserve the session is served as it is, uncounted.
    pub fn touch(&self, id: &[u8; 16], now: u64, journal: Journal) -> Result<Option<Session>> {
        let limits = self.inner.limits;
        if self.check_space(Space::Write).is_err() {
            self.inner
                .touches_unjournaled
                .fetch_add(1, Ordering::Relaxed);
            return Ok(self.get(id, now));
        }
        let coalesce = journal == Journal::Next;
        let touched = self.modify(id, now, journal, |current| match current {
            None => Ok((Change::Keep, None, None)),
            Some(s) => {
                let mut s = s.clone();
                s.touch(now, &limits);
                let op = (!coalesce).then_some(Op::Touch { id: *id, at: now });
                Ok((Change::Put(s.clone()), Some(s), op))
            }
        })?;
        if coalesce && touched.is_some() {
            let mut map = self.inner.pending_touches[stripe(id)]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let entry = map.entry(*id).or_insert((0, now));
            entry.0 += 1;
            entry.1 = entry.1.max(now);
        }
        Ok(touched)
    }

    /// Journals the coalesced fallback touches: one entry per session.
    pub fn flush_pending_touches(&self) -> Result<()> {
        for shard in &self.inner.pending_touches {
            for id in ids_in(shard) {
                let _guard = self.lock(&id);
                self.journal_pending_touches_locked(&id)?;
            }
        }
        Ok(())
    }

    /// Journals the pending touches of one session; its stripe lock is held.
    fn journal_pending_touches_locked(&self, id: &[u8; 16]) -> Result<()> {
        let taken = self.inner.pending_touches[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some((count, at)) = taken {
            let op = Op::Touches { id: *id, count, at };
            if !self.journal_append(&op, None)? {
                self.inner
                    .touches_unjournaled
                    .fetch_add(count, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Takes counts the near cache acknowledged in Redis mode and could not
    /// write: they are journaled like fallback touches (coalesced, and before
    /// any later entry of the session). The mirror's copy is not counted
    /// again: the cache's copies reach it through `mirror_touch`.
    pub fn add_pending_touches(&self, id: &[u8; 16], count: u64, at: u64) {
        let mut map = self.inner.pending_touches[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(*id).or_insert((0, at));
        entry.0 += count;
        entry.1 = entry.1.max(at);
    }

    /// Journals a write-behind count that Redis may or may not have applied
    /// under the id its call carried, so a replay applies it exactly once.
    pub fn journal_touches_at(&self, id: &[u8; 16], count: u64, at: u64, seq: u64) -> Result<()> {
        let _guard = self.lock(id);
        let op = Op::Touches { id: *id, count, at };
        if !self.journal_append(&op, Some(seq))? {
            self.inner
                .touches_unjournaled
                .fetch_add(count, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads without counting (used for mirror restores and tests).
    pub fn get(&self, id: &[u8; 16], now: u64) -> Option<Session> {
        self.load(id).filter(|s| !s.is_expired(now))
    }

    pub fn patch(
        &self,
        id: &[u8; 16],
        patch: &Patch,
        if_match: Option<u64>,
        now: u64,
        journal: Journal,
    ) -> Result<PatchOutcome> {
        let limits = self.inner.limits;
        self.check_space(Space::Write)?;
        self.modify(id, now, journal, |current| {
            let Some(s) = current else {
                return Ok((Change::Keep, PatchOutcome::NotFound, None));
            };
            if let Some(v) = if_match {
                if v != s.version {
                    return Ok((
                        Change::Keep,
                        PatchOutcome::VersionMismatch { current: s.version },
                        None,
                    ));
                }
            }
            let mut s = s.clone();
            s.apply_patch(patch, now, &limits)?;
            let op = Some(Op::PatchAt {
                id: *id,
                patch: patch.clone(),
                at: now,
            });
            Ok((Change::Put(s.clone()), PatchOutcome::Updated(s), op))
        })
    }

    /// Deletes a session and remembers the deletion. Journaled whether or
    /// not this node holds the session: another node may, and the logout
    /// must reach Redis all the same. Returns whether it was held here.
    pub fn delete(&self, id: &[u8; 16], now: u64, journal: Journal) -> Result<bool> {
        self.check_space(Space::Release)?;
        let op = (journal != Journal::Off).then_some(Op::Delete { id: *id });
        self.modify(id, now, journal, |current| match current {
            None => Ok((Change::Tombstone, false, op)),
            Some(_) => Ok((Change::Remove, true, op)),
        })
    }

    /// Log-out-everywhere in fallback: deletes the user's sessions held here
    /// and journals one entry that deletes, in Redis, every session of the
    /// user created up to `now`. Returns how many were held here.
    pub fn delete_user(&self, user: &str, now: u64, journal: Journal) -> Result<u64> {
        self.check_space(Space::Release)?;
        let mut deleted = 0;
        for s in self.list_user(user, now) {
            if self.delete(&s.id, now, Journal::Off)? {
                deleted += 1;
            }
        }
        if journal != Journal::Off {
            let op = Op::DeleteUser {
                user: user.to_string(),
                before: now,
            };
            self.journal_append(&op, None)?;
        }
        Ok(deleted)
    }

    /// Moves the session to `new_id` (chosen by the caller so a retry in
    /// another store reuses it) and bumps its version.
    pub fn rotate(
        &self,
        id: &[u8; 16],
        new_id: [u8; 16],
        now: u64,
        journal: Journal,
    ) -> Result<Option<Session>> {
        self.check_space(Space::Write)?;
        self.modify(id, now, journal, |current| match current {
            None => Ok((Change::Keep, None, None)),
            Some(s) => {
                let mut moved = s.clone();
                moved.id = new_id;
                moved.version += 1;
                let op = Some(Op::Rotate {
                    old: *id,
                    new: new_id,
                });
                Ok((Change::Move(moved.clone()), Some(moved), op))
            }
        })
    }

    /// Live sessions of one user (this node's view), oldest first.
    /// Anonymous sessions are not indexed: none are listed.
    pub fn list_user(&self, user: &str, now: u64) -> Vec<Session> {
        if user == crate::session::ANONYMOUS {
            return Vec::new();
        }
        let mut list: Vec<Session> = self
            .user_session_ids(user)
            .iter()
            .filter_map(|id| self.get(id, now))
            .filter(|s| s.user_id == user)
            .collect();
        // oldest first: by when each became the user's (created or logged
        // in), as Redis orders a user's index
        list.sort_by_key(|s| (s.born(), s.id));
        list
    }

    /// One page of [`list_user`](Self::list_user) and the next offset.
    pub fn list_user_page(
        &self,
        user: &str,
        now: u64,
        offset: u64,
        limit: u64,
    ) -> (Vec<Session>, Option<u64>) {
        let all = self.list_user(user, now);
        let start = (offset as usize).min(all.len());
        let end = start.saturating_add(limit as usize).min(all.len());
        let next = (end < all.len()).then_some(end as u64);
        (all[start..end].to_vec(), next)
    }

    /// Keeps `user` at `max` sessions: deletes the oldest beyond it (journaled
    /// as `journal` says). Returns how many were deleted.
    pub fn evict_oldest(&self, user: &str, max: u64, now: u64, journal: Journal) -> Result<u64> {
        // Every create asks. `list_user` reads only the sessions the user
        // index names (some stale), so at most `max` entries means at most
        // `max` sessions: nothing to evict, and no session need be read.
        // Reading them all on every create decoded each of the user's
        // sessions and pulled their leaf pages (scattered: ids are random)
        // through sled's cache, for nothing in the usual case.
        if self.user_session_ids(user).len() as u64 <= max {
            return Ok(0);
        }
        let list = self.list_user(user, now);
        let over = list.len().saturating_sub(max as usize);
        let mut evicted = 0;
        for s in list.iter().take(over) {
            if self.delete(&s.id, now, journal)? {
                evicted += 1;
            }
        }
        Ok(evicted)
    }

    /// Ids filed under a user; may include stale entries, callers re-check.
    pub fn user_session_ids(&self, user: &str) -> Vec<[u8; 16]> {
        let prefix = user_prefix(user);
        self.t()
            .by_user
            .scan_prefix(&prefix)
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| {
                k.get(prefix.len()..)
                    .and_then(|id| <[u8; 16]>::try_from(id).ok())
            })
            .collect()
    }

    // ---- mirror maintenance (Redis mode) ------------------------------------

    /// Stores a session as Redis returned it (newest wins against what the
    /// mirror and the touch buffer hold). Not flushed by itself.
    pub fn mirror_put(&self, session: &Session) -> Result<()> {
        self.check_space(Space::Write)?;
        self.modify(&session.id, 0, Journal::Off, |current| {
            let merged = match current {
                Some(c) => newest(session, c),
                None => session.clone(),
            };
            Ok((Change::Put(merged), (), None))
        })
    }

    /// Buffers a touch result from Redis for the mirror (see `touched`).
    pub fn mirror_touch(&self, session: Session) -> Result<()> {
        let mut map = self.inner.touched[stripe(&session.id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(prev) = map.get_mut(&session.id) {
            *prev = newest(&session, prev);
            return Ok(());
        }
        if map.len() < TOUCHED_PER_STRIPE {
            map.insert(session.id, session);
            return Ok(());
        }
        drop(map);
        self.mirror_put(&session)
    }

    /// Writes every buffered touch into the mirror.
    pub fn flush_touched(&self) -> Result<()> {
        if self.check_space(Space::Write).is_err() {
            // The buffered copies are dropped, not written: the mirror is a
            // copy for outages, and the reserve is for what was acknowledged.
            for shard in &self.inner.touched {
                shard.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
            return Ok(());
        }
        for shard in &self.inner.touched {
            for id in ids_in(shard) {
                // `modify` writes a buffered touch before anything else.
                self.modify(&id, 0, Journal::Off, |_| Ok((Change::Keep, (), None)))?;
            }
        }
        Ok(())
    }

    /// Removes a buffered touch; called under the session's stripe lock (by
    /// `modify`) so it orders with the mirror write that follows.
    fn take_touched(&self, id: &[u8; 16]) -> Option<Session> {
        self.inner.touched[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Drops a session deleted or rotated away through this node, and
    /// remembers the deletion.
    pub fn mirror_deleted(&self, id: &[u8; 16]) -> Result<bool> {
        self.modify(id, 0, Journal::Off, |current| {
            Ok((Change::Tombstone, current.is_some(), None))
        })
    }

    /// A deletion another node made (reported by Redis): remembered only for
    /// a session this node holds. The others it can neither serve nor
    /// re-seed, and a log-out-everywhere of a large user must not cost every
    /// node a disk write per session.
    pub fn deleted_elsewhere(&self, id: &[u8; 16]) -> Result<bool> {
        self.modify(id, 0, Journal::Off, |current| {
            // held: in the mirror, or only in the buffer of touches not yet
            // written to it (`modify` has written that already)
            let held = current.is_some();
            Ok((
                if held {
                    Change::Tombstone
                } else {
                    Change::Keep
                },
                held,
                None,
            ))
        })
    }

    /// Drops a session Redis no longer holds (expired, or a corrupt record)
    /// without recording a deletion.
    pub fn mirror_forget(&self, id: &[u8; 16]) -> Result<bool> {
        self.modify(id, 0, Journal::Off, |current| {
            let held = current.is_some();
            Ok((if held { Change::Remove } else { Change::Keep }, held, None))
        })
    }

    /// The live sessions among the next `batch` keys after `after` (for the
    /// re-seed of an emptied Redis), and the key the next page starts after
    /// (`None` at the end).
    pub fn sessions_page(
        &self,
        after: Option<[u8; 16]>,
        batch: usize,
        now: u64,
    ) -> (Vec<Session>, Option<[u8; 16]>) {
        let t = self.t();
        let iter = match after {
            Some(a) => t.sessions.range((
                std::ops::Bound::Excluded(a.to_vec()),
                std::ops::Bound::Unbounded,
            )),
            None => t.sessions.iter(),
        };
        let ids: Vec<[u8; 16]> = iter
            .keys()
            .filter_map(|k| k.ok())
            .take(batch)
            .filter_map(|k| <[u8; 16]>::try_from(k.as_ref()).ok())
            .collect();
        let next = (ids.len() == batch).then(|| ids.last().copied()).flatten();
        let live = ids.iter().filter_map(|id| self.get(id, now)).collect();
        (live, next)
    }

    // ---- journal -------------------------------------------------------------

    pub fn journal_len(&self) -> u64 {
        self.inner.journal_entries.load(Ordering::Relaxed)
    }

    /// Sets the journal's counters from the tree itself (when they disagree
    /// with it, as a reopen racing a write could leave them).
    pub fn recount_journal(&self) {
        let (mut entries, mut bytes) = (0u64, 0u64);
        for (_, v) in self.t().journal.iter().flatten() {
            entries += 1;
            bytes += v.len() as u64;
        }
        self.inner.journal_entries.store(entries, Ordering::Relaxed);
        self.inner.journal_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The oldest `n` journal entries, in order. An entry that does not decode
    /// is counted, logged and skipped (returned as `None` so it can be dropped).
    pub fn journal_head(&self, n: usize) -> Vec<(u64, Option<Op>)> {
        self.t().journal
            .iter()
            .take(n)
            .filter_map(|r| r.ok())
            .map(|(k, v)| {
                let seq = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
                let op = journal::decode(&v)
                    .map_err(|e| {
                        self.inner.corrupt.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(seq, error = %e, "journal entry does not decode; dropping it");
                    })
                    .ok();
                (seq, op)
            })
            .collect()
    }

    pub fn journal_remove(&self, seq: u64) -> Result<()> {
        if let Some(old) = self.t().journal.remove(seq.to_be_bytes())? {
            self.inner.journal_entries.fetch_sub(1, Ordering::Relaxed);
            self.inner
                .journal_bytes
                .fetch_sub(old.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Appends an operation to the journal (under `seq` when given). Within
    /// the byte budget always; beyond it only a delete, which is never
    /// refused: returns whether it was written.
    fn journal_append(&self, op: &Op, seq: Option<u64>) -> Result<bool> {
        let bytes = journal::encode(op);
        let over = self.journal_bytes() + bytes.len() as u64 > self.inner.local.max_journal_bytes;
        if over && !matches!(op, Op::Delete { .. } | Op::DeleteUser { .. }) {
            return Ok(false);
        }
        let seq = match seq {
            Some(s) => s,
            None => self.t().db.generate_id()?,
        };
        let len = bytes.len() as u64;
        if self.t().journal.insert(seq.to_be_bytes(), bytes)?.is_none() {
            self.inner.journal_entries.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.journal_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(true)
    }

    /// The newest journal sequence number, or 0 when empty.
    pub fn journal_last_seq(&self) -> u64 {
        self.t()
            .journal
            .last()
            .ok()
            .flatten()
            .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0)
    }

    /// The mirror's copy of a session and the journal position it includes,
    /// as one consistent snapshot (under the session's lock, after its
    /// coalesced touches, which the copy already counts, are journaled).
    pub fn snapshot_for_restore(&self, id: &[u8; 16], now: u64) -> Result<(Option<Session>, u64)> {
        let _guard = self.lock(id);
        self.journal_pending_touches_locked(id)?;
        Ok((self.get(id, now), self.journal_last_seq()))
    }

    // ---- expiry sweep --------------------------------------------------------

    /// Removes up to `budget` expired sessions; returns how many were removed.
    /// Bounded work per call keeps a sweep from stalling a small board.
    pub fn sweep(&self, now: u64, budget: usize) -> usize {
        let mut removed = 0;
        let due: Vec<_> = self
            .t()
            .by_expiry
            .range(..now.to_be_bytes().to_vec())
            .keys()
            .take(budget)
            .filter_map(|k| k.ok())
            .collect();
        for key in due {
            let Some(id) = key.get(8..24).and_then(|b| <[u8; 16]>::try_from(b).ok()) else {
                let _ = self.t().by_expiry.remove(&key);
                continue;
            };
            let _guard = self.lock(&id);
            match self.load(&id) {
                Some(s) if s.is_expired(now) && self.remove_locked(&s).is_ok() => removed += 1,
                Some(s) if s.is_expired(now) => {}
                Some(s) => {
                    // Still alive: re-file at its real expiry.
                    let _ = self
                        .t()
                        .by_expiry
                        .insert(expiry_key(s.expires_at, &id), &[]);
                }
                None => {}
            }
            let _ = self.t().by_expiry.remove(&key);
        }
        removed
    }

    /// Drops up to `budget` deletion records older than the absolute session
    /// lifetime (nothing they name can still be alive), continuing where the
    /// last call stopped.
    pub fn sweep_tombstones(&self, now: u64, budget: usize) -> usize {
        let mut cursor = self
            .inner
            .tombstone_cursor
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let horizon = now.saturating_sub(self.inner.limits.max_lifetime_ms);
        let batch: Vec<_> = self
            .t()
            .deleted
            .range((
                std::ops::Bound::Excluded(cursor.clone()),
                std::ops::Bound::Unbounded,
            ))
            .take(budget)
            .filter_map(|r| r.ok())
            .collect();
        let mut removed = 0;
        for (k, v) in &batch {
            let at = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if at < horizon && self.t().deleted.remove(k).is_ok() {
                removed += 1;
            }
        }
        *cursor = match batch.last() {
            Some((k, _)) if batch.len() == budget => k.to_vec(),
            _ => Vec::new(),
        };
        removed
    }

    /// Flushes lazily-written data (touches, mirror updates, sweeps).
    pub async fn flush_lazy(&self) -> Result<()> {
        self.flush_touched()?;
        self.durable().await
    }

    /// Final flush on a clean shutdown; records the session count so the
    /// next start skips the recount.
    pub async fn close(&self) -> Result<()> {
        self.flush_touched()?;
        self.flush_pending_touches()?;
        let n = self.inner.active.load(Ordering::Relaxed);
        self.t().meta.insert(CLEAN_COUNT_KEY, &n.to_be_bytes())?;
        self.durable().await?;
        // sled's open reads files: the blocking pool's work, not a worker's.
        let store = self.clone();
        let _ = tokio::task::spawn_blocking(move || store.leave_snapshot()).await;
        Ok(())
    }

    /// sled writes its snapshot (the page table, where the next open starts
    /// reading its log from) only when it opens a database, after reading
    /// every log segment written since the last one. A node that took many
    /// writes would pay that read at its next start (100 000 sessions made
    /// since the last start: 90 ms of a 106 ms start on a 2-core x86, more on
    /// a Pi's SD card); closing the database and opening it once more on the
    /// way out pays it here, where nobody waits for it. Best effort: if that
    /// fails, the next start reads the log, as it would after a crash.
    fn leave_snapshot(&self) {
        let started = std::time::Instant::now();
        let mut slot = self.inner.trees.write().unwrap_or_else(|p| p.into_inner());
        let Some(old) = slot.take() else { return };
        let old = match Arc::try_unwrap(old) {
            Ok(trees) => trees,
            Err(shared) => {
                *slot = Some(shared);
                tracing::warn!(
                    "the local store is still in use at close; the next start reads its whole log"
                );
                return;
            }
        };
        drop(old);
        match self.open_trees() {
            Ok(t) => {
                *slot = Some(Arc::new(t));
                tracing::debug!(
                    ms = started.elapsed().as_millis() as u64,
                    "local store snapshot written"
                );
            }
            // Nothing uses the store after close; the next start recovers.
            Err(e) => {
                tracing::warn!(error = %e, "no snapshot of the local store left; the next start reads its whole log")
            }
        }
    }

    /// Opens the trees again after the old database was dropped: sled lets
    /// go of its file lock moments after the last handle is gone.
    fn open_trees(&self) -> Result<Trees> {
        let mut tries = 0;
        loop {
            match Trees::open(&self.inner.dir, &self.inner.local) {
                Ok(t) => return Ok(t),
                Err(e) if tries >= 20 => return Err(e),
                Err(_) => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }

    // ---- internals -----------------------------------------------------------

    fn lock(&self, id: &[u8; 16]) -> MutexGuard<'_, ()> {
        // A poisoned stripe only means another request panicked mid-change;
        // the data itself is sled's, so carry on.
        self.inner.locks[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Reads and decodes a record; a corrupt one is logged, counted and
    /// treated as absent.
    fn load(&self, id: &[u8; 16]) -> Option<Session> {
        let bytes = match self.t().sessions.get(id) {
            Ok(b) => b?,
            Err(e) => {
                tracing::error!(error = %e, "reading session failed");
                return None;
            }
        };
        match Session::decode(&bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                self.inner.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::error!(id = %crate::session::format_id(id), error = %e, "corrupt session record; treating as absent");
                None
            }
        }
    }

    /// The one place sessions change: lock, load (expired counts as absent and
    /// is removed), decide, apply with index upkeep, journal.
    /// `op` is journaled as `journal` says: its coalesced touches first, so
    /// the order per session holds. Creates, changes and rotations beyond the
    /// journal's budget are refused before anything changes.
    fn modify<R>(
        &self,
        id: &[u8; 16],
        now: u64,
        journal: Journal,
        decide: impl FnOnce(
            Option<&Session>,
        ) -> std::result::Result<(Change, R, Option<Op>), InputError>,
    ) -> Result<R> {
        let _guard = self.lock(id);
        let mut current = self.load(id);
        // A touch Redis answered and the lazy flush has not written yet is
        // the newest copy: it lands first, so whatever runs now (a fallback
        // write just after a failover, racing the flush) sees it.
        if let Some(buffered) = self.take_touched(id) {
            let merged = match &current {
                Some(c) => newest(&buffered, c),
                None => buffered,
            };
            self.put_locked(current.as_ref(), &merged)?;
            current = Some(merged);
        }
        if let Some(s) = &current {
            if now != 0 && s.is_expired(now) {
                self.remove_locked(s)?;
                current = None;
            }
        }
        let (change, reply, op) = decide(current.as_ref())?;
        let op = op.filter(|_| journal != Journal::Off);
        if let Some(op) = &op {
            let size = journal::encode(op).len() as u64;
            if !matches!(op, Op::Delete { .. } | Op::Touch { .. })
                && self.journal_bytes() + size > self.inner.local.max_journal_bytes
            {
                return Err(StoreError::JournalFull(self.inner.local.max_journal_bytes));
            }
            self.journal_pending_touches_locked(id)?;
        }
        match change {
            Change::Keep => {}
            Change::Tombstone => {
                if let Some(old) = &current {
                    self.remove_locked(old)?;
                }
                self.t()
                    .deleted
                    .insert(id, &now_or_clock(now).to_be_bytes())?;
            }
            Change::Put(new) => self.put_locked(current.as_ref(), &new)?,
            Change::Remove => {
                if let Some(old) = &current {
                    self.remove_locked(old)?;
                }
            }
            Change::Move(new) => {
                // The new id is fresh and unknown to anyone else, so it needs
                // no lock; write it before removing the old one so a crash in
                // between leaves both rather than neither.
                self.put_locked(None, &new)?;
                if let Some(old) = &current {
                    self.remove_locked(old)?;
                }
                self.t()
                    .deleted
                    .insert(id, &now_or_clock(now).to_be_bytes())?;
            }
        }
        if let Some(op) = op {
            let seq = match journal {
                Journal::At(seq) => Some(seq),
                _ => None,
            };
            if !self.journal_append(&op, seq)? {
                self.inner
                    .touches_unjournaled
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(reply)
    }

    fn put_locked(&self, old: Option<&Session>, new: &Session) -> Result<()> {
        let inner = &self.inner;
        let t = self.t();
        if new.user_id != crate::session::ANONYMOUS
            && old.map(|o| o.user_id != new.user_id).unwrap_or(true)
        {
            t.by_user.insert(user_key(&new.user_id, &new.id), &[])?;
        }
        if old.map(|o| new.expires_at < o.expires_at).unwrap_or(true) {
            t.by_expiry
                .insert(expiry_key(new.expires_at, &new.id), &[])?;
        }
        t.sessions.insert(new.id, new.encode())?;
        match old {
            None => {
                inner.active.fetch_add(1, Ordering::Relaxed);
            }
            Some(o) if o.user_id != new.user_id => {
                t.by_user.remove(user_key(&o.user_id, &o.id))?;
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Removes a record and its user index entry. Its expiry entry is left for
    /// the sweep, which drops entries whose record is gone.
    fn remove_locked(&self, old: &Session) -> Result<()> {
        self.t().sessions.remove(old.id)?;
        self.t().by_user.remove(user_key(&old.user_id, &old.id))?;
        self.inner.active.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes raw bytes as a session record and flushes (tests of corrupt
    /// data at rest).
    #[doc(hidden)]
    pub fn put_raw_for_test(&self, id: &[u8; 16], bytes: &[u8]) -> Result<()> {
        self.t().sessions.insert(id, bytes)?;
        self.t().db.flush()?;
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

/// Merges two copies of one session seen at different times: data from the
/// higher version, counters and times from whichever is further along.
fn newest(a: &Session, b: &Session) -> Session {
    let mut out = if b.version > a.version {
        b.clone()
    } else {
        a.clone()
    };
    out.request_count = a.request_count.max(b.request_count);
    out.last_accessed = a.last_accessed.max(b.last_accessed);
    out.expires_at = a.expires_at.max(b.expires_at);
    out
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

/// Group commit: any number of writers share one `fsync` at a time. A writer's
/// data is durable once a flush that *started after* its write has finished, so
/// each waiter takes a ticket and waits for a flush generation covering it.
/// The flush runs as its own task on the blocking pool, so a request that is
/// cancelled mid-wait (client gone) cannot leave the commit wedged.
struct GroupCommit {
    requested: AtomicU64,
    /// (highest ticket covered by a finished flush, did that flush succeed)
    done: watch::Sender<(u64, bool)>,
    running: AtomicBool,
    waiting: AtomicU64,
}

impl GroupCommit {
    fn new() -> GroupCommit {
        GroupCommit {
            requested: AtomicU64::new(0),
            done: watch::channel((0, true)).0,
            running: AtomicBool::new(false),
            waiting: AtomicU64::new(0),
        }
    }
}

impl SledStore {
    async fn group_commit(&self) -> Result<()> {
        let commit = &self.inner.commit;
        let mut rx = commit.done.subscribe();
        let ticket = commit.requested.fetch_add(1, Ordering::SeqCst) + 1;
        commit.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = DecrementOnDrop(&commit.waiting);
        loop {
            let (done, ok) = *rx.borrow_and_update();
            if done >= ticket {
                return if ok {
                    Ok(())
                } else {
                    Err(StoreError::DiskFault(
                        "flushing the local store to disk failed".into(),
                    ))
                };
            }
            if !commit.running.swap(true, Ordering::SeqCst) {
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    let target = inner.commit.requested.load(Ordering::SeqCst);
                    let db = inner.t().db.clone();
                    let res = tokio::task::spawn_blocking(move || db.flush()).await;
                    let ok = matches!(res, Ok(Ok(_)));
                    match &res {
                        Ok(Ok(_)) => inner.disk.flushed(None),
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "flushing the local store failed");
                            inner
                                .disk
                                .flushed(Some(format!("writing to disk failed: {e}")));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "flushing the local store failed");
                            inner
                                .disk
                                .flushed(Some(format!("writing to disk failed: {e}")));
                        }
                    }
                    inner.commit.running.store(false, Ordering::SeqCst);
                    inner.commit.done.send_replace((target, ok));
                });
            }
            if rx.changed().await.is_err() {
                return Err(super::StoreError::Unavailable("local store closed".into()));
            }
        }
    }
}

struct DecrementOnDrop<'a>(&'a AtomicU64);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The time to record a deletion at: the request's, or the clock's for
/// mirror maintenance (which passes 0).
fn now_or_clock(now: u64) -> u64 {
    if now == 0 {
        crate::session::now_ms()
    } else {
        now
    }
}

/// Watches the data directory's free space and remembers failed flushes.
///
/// `statvfs` is cheap but not free, so its answer is kept for
/// [`DiskGuard::FRESH_MS`]; the reserve is checked against that.
struct DiskGuard {
    dir: PathBuf,
    /// When the free space was last read, and what it was.
    last: Mutex<Option<(std::time::Instant, u64)>>,
    /// The last flush's failure, until a flush succeeds.
    flush_error: Mutex<Option<String>>,
}

impl DiskGuard {
    const FRESH_MS: u64 = 100;

    fn new(dir: PathBuf) -> DiskGuard {
        DiskGuard {
            dir,
            last: Mutex::new(None),
            flush_error: Mutex::new(None),
        }
    }

    /// Available bytes for an unprivileged writer (`f_bavail`); `u64::MAX`
    /// when the file system cannot say.
    fn available(&self) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some((at, free)) if at.elapsed().as_millis() as u64 <= Self::FRESH_MS => free,
            _ => {
                let free = statvfs_available(&self.dir).unwrap_or(u64::MAX);
                *last = Some((std::time::Instant::now(), free));
                free
            }
        }
    }

    fn check(&self, reserve: u64) -> Result<()> {
        let free = self.available();
        if free < reserve {
            return Err(StoreError::DiskFull { free, reserve });
        }
        Ok(())
    }

    fn flush_failed(&self) -> bool {
        self.flush_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn flushed(&self, error: Option<String>) {
        *self.flush_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    fn fault(&self, reserve: u64) -> Option<String> {
        if let Some(e) = self
            .flush_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Some(e);
        }
        let free = self.available();
        (free < reserve).then(|| {
            format!(
                "disk almost full: {} KiB free, {} KiB kept in reserve; writes refused",
                free / 1024,
                reserve / 1024
            )
        })
    }
}

fn statvfs_available(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we own from a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(version: u64, count: u64, accessed: u64, expires: u64, meta: &str) -> Session {
        Session {
            id: [1; 16],
            user_id: "u".into(),
            created_at: 1,
            last_accessed: accessed,
            expires_at: expires,
            request_count: count,
            version,
            metadata: meta.into(),
            login_at: 0,
        }
    }

    /// The mirror's merge rule: data (user, metadata) from the higher version,
    /// counters and times from whichever copy is further along, whichever
    /// order the copies arrive in.
    #[test]
    fn the_mirror_merges_data_by_version_and_counters_by_maximum() {
        let patched = session(3, 5, 100, 1_000, r#"{"new":1}"#);
        let touched = session(2, 9, 200, 2_000, r#"{"old":1}"#);
        for merged in [newest(&patched, &touched), newest(&touched, &patched)] {
            assert_eq!(merged.version, 3);
            assert_eq!(merged.metadata, r#"{"new":1}"#);
            assert_eq!(merged.request_count, 9);
            assert_eq!(merged.last_accessed, 200);
            assert_eq!(merged.expires_at, 2_000);
        }
    }

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
}

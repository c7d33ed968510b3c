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
//!
//! Every change of one session happens under one of a fixed set of striped
//! locks, so concurrent touches are exact and a PATCH never interleaves with a
//! rotate. Locks are held only for in-memory sled work, never across an await.
//! Durability is separate: writers call [`SledStore::durable`], a group commit
//! that runs one `fsync` on the blocking pool for everyone waiting.

use super::journal::{self, Op};
use super::PatchOutcome;
use crate::session::{InputError, Limits, Patch, Session};
use sled::{Db, Tree};
use std::collections::HashMap;
use std::path::Path;
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
    db: Db,
    sessions: Tree,
    by_user: Tree,
    by_expiry: Tree,
    journal: Tree,
    locks: Vec<Mutex<()>>,
    limits: Limits,
    /// Sessions present minus those known gone; a gauge, not an exact count
    /// (expired sessions stay counted until the sweep removes them).
    active: AtomicI64,
    /// Journal entries, kept as a counter: `Tree::len` walks every key, and
    /// health, metrics and the probe loop ask often during a long outage.
    journal_entries: AtomicU64,
    corrupt: AtomicU64,
    commit: GroupCommit,
    /// Touch results from Redis not yet written to the mirror, one map per
    /// lock stripe. Written by the housekeeping flush (and at once on a
    /// failover), so the Redis-mode hot path does no sled write at all.
    touched: Vec<Mutex<HashMap<[u8; 16], Session>>>,
    meta: Tree,
}

/// Most buffered touches per stripe; past it a touch is written through.
const TOUCHED_PER_STRIPE: usize = 512;

/// Where a clean shutdown leaves the session count, so the next start need
/// not walk every key.
const CLEAN_COUNT_KEY: &[u8] = b"clean_shutdown_session_count";

/// What a modification decided to do with the session it looked at.
enum Change {
    Keep,
    Put(Session),
    Remove,
    /// Remove this id and store the session under its (new) id.
    Move(Session),
}

impl SledStore {
    /// Opens (or creates) the database in `dir`. `cache_bytes` bounds sled's
    /// page cache, the bulk of the node's memory.
    pub fn open(dir: &Path, cache_bytes: u64, limits: Limits) -> Result<SledStore> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .segment_size(256 * 1024)
            // edgenode flushes on its own schedule, on its own bounded pool.
            .flush_every_ms(None)
            .mode(sled::Mode::LowSpace)
            .open()?;
        let store = SledStore {
            inner: Arc::new(Inner {
                sessions: db.open_tree("sessions")?,
                by_user: db.open_tree("by_user")?,
                by_expiry: db.open_tree("by_expiry")?,
                journal: db.open_tree("journal")?,
                meta: db.open_tree("meta")?,
                db,
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
        // The gauge starts from the count a clean shutdown left (consumed, so
        // a crash after this start forces a recount) or, after a crash, from
        // one walk of the keys before anything can change them.
        let n = match store.inner.meta.remove(CLEAN_COUNT_KEY)? {
            Some(v) if v.len() == 8 => i64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
            _ => store.inner.sessions.len() as i64,
        };
        store.inner.active.store(n, Ordering::Relaxed);
        let j = store.inner.journal.len() as u64;
        store.inner.journal_entries.store(j, Ordering::Relaxed);
        Ok(store)
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
    pub fn create(&self, session: &Session, journaled: bool) -> Result<()> {
        self.modify(&session.id, session.created_at, |_| {
            let op = journaled.then(|| Op::Create(session.clone()));
            Ok((Change::Put(session.clone()), (), op))
        })
    }

    /// Counts one request, slides the expiry and returns the session. Not
    /// flushed: a touch lost to a crash costs one count, not a session.
    pub fn touch(&self, id: &[u8; 16], now: u64, journaled: bool) -> Result<Option<Session>> {
        let limits = self.inner.limits;
        self.modify(id, now, |current| match current {
            None => Ok((Change::Keep, None, None)),
            Some(s) => {
                let mut s = s.clone();
                s.touch(now, &limits);
                let op = journaled.then_some(Op::Touch { id: *id, at: now });
                Ok((Change::Put(s.clone()), Some(s), op))
            }
        })
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
        journaled: bool,
    ) -> Result<PatchOutcome> {
        let limits = self.inner.limits;
        self.modify(id, now, |current| {
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
            s.apply_patch(patch, &limits)?;
            let op = journaled.then(|| Op::Patch {
                id: *id,
                patch: patch.clone(),
            });
            Ok((Change::Put(s.clone()), PatchOutcome::Updated(s), op))
        })
    }

    pub fn delete(&self, id: &[u8; 16], now: u64, journaled: bool) -> Result<bool> {
        self.modify(id, now, |current| match current {
            None => Ok((Change::Keep, false, None)),
            Some(_) => Ok((
                Change::Remove,
                true,
                journaled.then_some(Op::Delete { id: *id }),
            )),
        })
    }

    /// Moves the session to `new_id` (chosen by the caller so a retry in
    /// another store reuses it) and bumps its version.
    pub fn rotate(
        &self,
        id: &[u8; 16],
        new_id: [u8; 16],
        now: u64,
        journaled: bool,
    ) -> Result<Option<Session>> {
        self.modify(id, now, |current| match current {
            None => Ok((Change::Keep, None, None)),
            Some(s) => {
                let mut moved = s.clone();
                moved.id = new_id;
                moved.version += 1;
                let op = journaled.then_some(Op::Rotate {
                    old: *id,
                    new: new_id,
                });
                Ok((Change::Move(moved.clone()), Some(moved), op))
            }
        })
    }

    /// Live sessions of one user (this node's view).
    pub fn list_user(&self, user: &str, now: u64) -> Vec<Session> {
        self.user_session_ids(user)
            .iter()
            .filter_map(|id| self.get(id, now))
            .filter(|s| s.user_id == user)
            .collect()
    }

    /// Ids filed under a user; may include stale entries, callers re-check.
    pub fn user_session_ids(&self, user: &str) -> Vec<[u8; 16]> {
        let prefix = user_prefix(user);
        self.inner
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
        self.modify(&session.id, 0, |current| {
            let mut merged = session.clone();
            if let Some(b) = self.take_touched(&session.id) {
                merged = newest(&merged, &b);
            }
            if let Some(c) = current {
                merged = newest(&merged, c);
            }
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
        for shard in &self.inner.touched {
            let ids: Vec<[u8; 16]> = shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied()
                .collect();
            for id in ids {
                self.modify(&id, 0, |current| {
                    Ok(match (self.take_touched(&id), current) {
                        (Some(b), Some(c)) => (Change::Put(newest(&b, c)), (), None),
                        (Some(b), None) => (Change::Put(b), (), None),
                        (None, _) => (Change::Keep, (), None),
                    })
                })?;
            }
        }
        Ok(())
    }

    /// Removes a buffered touch; called under the session's stripe lock so it
    /// orders with the mirror write that follows.
    fn take_touched(&self, id: &[u8; 16]) -> Option<Session> {
        self.inner.touched[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Drops a session another node deleted or rotated away.
    pub fn mirror_remove(&self, id: &[u8; 16]) -> Result<bool> {
        self.modify(id, 0, |current| {
            self.take_touched(id);
            Ok((
                if current.is_some() {
                    Change::Remove
                } else {
                    Change::Keep
                },
                current.is_some(),
                None,
            ))
        })
    }

    // ---- journal -------------------------------------------------------------

    pub fn journal_len(&self) -> u64 {
        self.inner.journal_entries.load(Ordering::Relaxed)
    }

    /// The oldest `n` journal entries, in order. An entry that does not decode
    /// is counted, logged and skipped (returned as `None` so it can be dropped).
    pub fn journal_head(&self, n: usize) -> Vec<(u64, Option<Op>)> {
        self.inner
            .journal
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
        if self.inner.journal.remove(seq.to_be_bytes())?.is_some() {
            self.inner.journal_entries.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The newest journal sequence number, or 0 when empty.
    pub fn journal_last_seq(&self) -> u64 {
        self.inner
            .journal
            .last()
            .ok()
            .flatten()
            .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0)
    }

    /// Runs `f` while holding the lock of `id`'s stripe: used by replay to read
    /// the mirror and the journal position as one consistent snapshot.
    pub fn with_lock<R>(&self, id: &[u8; 16], f: impl FnOnce() -> R) -> R {
        let _guard = self.lock(id);
        f()
    }

    // ---- expiry sweep --------------------------------------------------------

    /// Removes up to `budget` expired sessions; returns how many were removed.
    /// Bounded work per call keeps a sweep from stalling a small board.
    pub fn sweep(&self, now: u64, budget: usize) -> usize {
        let mut removed = 0;
        let due: Vec<_> = self
            .inner
            .by_expiry
            .range(..now.to_be_bytes().to_vec())
            .keys()
            .take(budget)
            .filter_map(|k| k.ok())
            .collect();
        for key in due {
            let Some(id) = key.get(8..24).and_then(|b| <[u8; 16]>::try_from(b).ok()) else {
                let _ = self.inner.by_expiry.remove(&key);
                continue;
            };
            let _guard = self.lock(&id);
            match self.load(&id) {
                Some(s) if s.is_expired(now) && self.remove_locked(&s).is_ok() => removed += 1,
                Some(s) if s.is_expired(now) => {}
                Some(s) => {
                    // Still alive: re-file at its real expiry.
                    let _ = self
                        .inner
                        .by_expiry
                        .insert(expiry_key(s.expires_at, &id), &[]);
                }
                None => {}
            }
            let _ = self.inner.by_expiry.remove(&key);
        }
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
        let n = self.inner.active.load(Ordering::Relaxed);
        self.inner.meta.insert(CLEAN_COUNT_KEY, &n.to_be_bytes())?;
        self.durable().await
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
        let bytes = match self.inner.sessions.get(id) {
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
    fn modify<R>(
        &self,
        id: &[u8; 16],
        now: u64,
        decide: impl FnOnce(
            Option<&Session>,
        ) -> std::result::Result<(Change, R, Option<Op>), InputError>,
    ) -> Result<R> {
        let _guard = self.lock(id);
        let mut current = self.load(id);
        if let Some(s) = &current {
            if now != 0 && s.is_expired(now) {
                self.remove_locked(s)?;
                current = None;
            }
        }
        let (change, reply, op) = decide(current.as_ref())?;
        match change {
            Change::Keep => {}
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
            }
        }
        if let Some(op) = op {
            let seq = self.inner.db.generate_id()?;
            self.inner
                .journal
                .insert(seq.to_be_bytes(), journal::encode(&op))?;
            self.inner.journal_entries.fetch_add(1, Ordering::Relaxed);
        }
        Ok(reply)
    }

    fn put_locked(&self, old: Option<&Session>, new: &Session) -> Result<()> {
        let inner = &self.inner;
        if old.map(|o| o.user_id != new.user_id).unwrap_or(true) {
            inner.by_user.insert(user_key(&new.user_id, &new.id), &[])?;
        }
        if old.map(|o| new.expires_at < o.expires_at).unwrap_or(true) {
            inner
                .by_expiry
                .insert(expiry_key(new.expires_at, &new.id), &[])?;
        }
        inner.sessions.insert(new.id, new.encode())?;
        match old {
            None => {
                inner.active.fetch_add(1, Ordering::Relaxed);
            }
            Some(o) if o.user_id != new.user_id => {
                inner.by_user.remove(user_key(&o.user_id, &o.id))?;
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Removes a record and its user index entry. Its expiry entry is left for
    /// the sweep, which drops entries whose record is gone.
    fn remove_locked(&self, old: &Session) -> Result<()> {
        self.inner.sessions.remove(old.id)?;
        self.inner.by_user.remove(user_key(&old.user_id, &old.id))?;
        self.inner.active.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes raw bytes as a session record and flushes (tests of corrupt
    /// data at rest).
    #[doc(hidden)]
    pub fn put_raw_for_test(&self, id: &[u8; 16], bytes: &[u8]) -> Result<()> {
        self.inner.sessions.insert(id, bytes)?;
        self.inner.db.flush()?;
        Ok(())
    }
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
                    Err(super::StoreError::Unavailable(
                        "flushing the local store to disk failed".into(),
                    ))
                };
            }
            if !commit.running.swap(true, Ordering::SeqCst) {
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    let target = inner.commit.requested.load(Ordering::SeqCst);
                    let db = inner.db.clone();
                    let res = tokio::task::spawn_blocking(move || db.flush()).await;
                    let ok = matches!(res, Ok(Ok(_)));
                    if !ok {
                        tracing::error!(result = ?res, "flushing the local store failed");
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

//! Bringing Redis back in line with this node: the journal replay that
//! ends an outage (`Store::reconcile`), the restore of a session Redis
//! lost from the mirror, and the re-seed of a Redis that lost its data
//! (its epoch changed, `Store::sync_epoch`).

use super::local::journal_ops::Op;
use super::redis::{CreateReply, Replayed};
use super::{RedisStore, Result, Store, StoreError};
use crate::session::{now_ms, Session};
use crate::shutdown::Shutdown;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// How many times a journal entry that Redis rejects (a script error, not an
/// outage) is tried before it is dropped, logged and counted.
const MAX_REJECTIONS: u32 = 5;

/// The replay's state and counters.
pub(super) struct Replay {
    pub(super) reconciliations: AtomicU64,
    pub(super) replayed: AtomicU64,
    /// Journal entries Redis rejected for good and that were dropped.
    pub(super) dropped: AtomicU64,
    /// Failed tries per journal entry that Redis rejects (not for outages).
    rejections: Mutex<HashMap<u64, u32>>,
    /// Set when a touch found Redis emptied: the background task re-seeds.
    pub(super) reseed_wanted: AtomicBool,
    /// Journal entries per pipelined replay round trip.
    batch: usize,
}

impl Replay {
    pub(super) fn new(batch: usize) -> Replay {
        Replay {
            reconciliations: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            rejections: Mutex::new(HashMap::new()),
            reseed_wanted: AtomicBool::new(false),
            batch,
        }
    }
}

impl Store {
    /// Whether Redis lost its data since this node last synchronised: its
    /// epoch is not the one this node remembers (a fresh one is set when
    /// Redis holds none).
    pub(super) async fn redis_lost_data(&self, redis: &RedisStore) -> Result<bool> {
        // A node that has not met this Redis yet compares nothing: its first
        // synchronisation re-seeds whatever Redis lacks anyway.
        let Some(known) = self.inner.sled.redis_epoch() else {
            return Ok(false);
        };
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        let current = redis.epoch(&fresh).await?;
        Ok(known != current)
    }

    /// Re-seeds Redis from the mirror when Redis lost its data (or this node
    /// meets this Redis for the first time): every live session the mirror
    /// holds that Redis lacks and that this node saw no deletion of. Redis
    /// skips sessions it holds, has a tombstone of, or whose user logged out
    /// everywhere after their creation.
    pub(super) async fn sync_epoch(&self, redis: &RedisStore, shutdown: &Shutdown) -> Result<()> {
        let sled = &self.inner.sled;
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        let current = redis.epoch(&fresh).await?;
        if sled.redis_epoch().as_deref() == Some(current.as_str()) {
            self.inner
                .replay
                .reseed_wanted
                .store(false, Ordering::Release);
            return Ok(());
        }
        // The copies still buffered (the last 5 s of creates and uses) are
        // part of what this node holds.
        sled.flush_touched()?;
        let started = std::time::Instant::now();
        let (mut after, mut written) = (None, 0u64);
        loop {
            if shutdown.is_shutdown() {
                return Ok(());
            }
            let now = now_ms();
            let (live, next) = sled.sessions_page(after, self.inner.replay.batch, now)?;
            let batch: Vec<Session> = live
                .into_iter()
                .filter(|s| !sled.is_deleted(&s.id))
                .map(|s| self.with_answered_count(s))
                .collect();
            if !batch.is_empty() {
                written += redis.restore_batch(&batch).await?;
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        sled.set_redis_epoch(&current)?;
        sled.durable().await?;
        self.inner
            .replay
            .reseed_wanted
            .store(false, Ordering::Release);
        if written > 0 {
            tracing::warn!(
                restored = written,
                took_ms = started.elapsed().as_millis() as u64,
                "redis had lost sessions this node holds; re-seeded them from the mirror"
            );
        }
        Ok(())
    }

    /// A mirror copy about to be re-seeded, its count raised to what this
    /// node's near cache answered, if it holds a copy: the mirror's copy
    /// may lag (its touch writes are coarse, to spare the SD card). The
    /// counts still waiting to be written behind are left out: they land on
    /// top of the re-seeded record.
    fn with_answered_count(&self, mut s: Session) -> Session {
        if let Some((copy, unwritten)) = self.near_knowledge(&s.id) {
            let answered = copy.request_count.saturating_sub(unwritten);
            if answered > s.request_count {
                s.request_count = answered;
                s.last_accessed = s.last_accessed.max(copy.last_accessed);
            }
        }
        s
    }

    /// Replays the journal into Redis, oldest first, then returns to Redis
    /// mode once it is empty. Requests keep being served (from sled, and
    /// journaled) while it runs, until the last pass (see `gate`); a
    /// shutdown stops it between batches.
    ///
    /// A batch is the journal's head, pipelined; Redis applies it as a chain
    /// that stops at the first entry it cannot apply (see the Redis store),
    /// and the next attempt starts again from there, so nothing lands out of
    /// order. Every entry's id makes a repeated one a no-op.
    pub(super) async fn reconcile(&self, redis: &RedisStore, shutdown: &Shutdown) -> Result<()> {
        let sled = &self.inner.sled;
        let started = std::time::Instant::now();
        let mut replayed = 0u64;
        // Sessions restored whole from the mirror, with the journal position
        // the copy already includes: their older entries are skipped.
        let mut restored: HashMap<[u8; 16], u64> = HashMap::new();
        sled.flush_touched()?;
        sled.flush_pending_touches()?;
        let was_fallback = !self.inner.redis_mode.load(Ordering::Acquire);
        if was_fallback && sled.journal_len() > 0 {
            tracing::info!(
                pending = sled.journal_len(),
                "redis is back; replaying the journal"
            );
        }
        // Taken once the journal first looks empty, and kept: what fallback
        // writes landed meanwhile is replayed with new ones held at the
        // gate. Let go between passes, a node under steady traffic found a
        // few new entries every time and never switched back (a create a
        // millisecond outran a replay pass).
        let mut gate = None;
        loop {
            if shutdown.is_shutdown() {
                return Ok(());
            }
            let batch = sled.journal_head(self.inner.replay.batch)?;
            if batch.is_empty() {
                if gate.is_none() {
                    gate = Some(self.inner.switch.write().await);
                }
                sled.flush_pending_touches()?;
                if sled.journal_len() > 0 {
                    if sled.journal_head(1)?.is_empty() {
                        // The counter is off (no fallback write is in flight
                        // under the gate): trust the tree.
                        sled.recount_journal()?;
                    }
                    continue;
                }
                // Every id in doubt was replayed (or dropped for good): the
                // floor may pass them, and a late copy of one is refused.
                redis.clear_doubt();
                if !self.inner.redis_mode.swap(true, Ordering::AcqRel) {
                    // Only a return from a real outage is a reconciliation;
                    // a start with nothing to replay is just a start.
                    if replayed > 0 || self.inner.failovers.load(Ordering::Relaxed) > 0 {
                        self.inner
                            .replay
                            .reconciliations
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            replayed,
                            took_ms = started.elapsed().as_millis() as u64,
                            "journal drained; back on redis"
                        );
                    } else {
                        tracing::info!("redis reachable; serving from redis");
                    }
                }
                return Ok(());
            }
            // Entries that do not decode were logged and counted; drop them.
            // Entries already contained in a restored mirror copy are skipped.
            let mut todo: Vec<(u64, Op)> = Vec::with_capacity(batch.len());
            for (seq, op) in batch {
                let Some(op) = op else {
                    sled.journal_remove(seq)?;
                    continue;
                };
                if op
                    .id()
                    .is_some_and(|id| restored.get(&id).is_some_and(|&upto| seq <= upto))
                {
                    sled.journal_remove(seq)?;
                    continue;
                }
                todo.push((seq, op));
            }
            if todo.is_empty() {
                continue;
            }
            let ops: Vec<(u64, &Op)> = todo.iter().map(|(seq, op)| (*seq, op)).collect();
            let outcomes = redis.replay_batch(&ops).await?;
            // Every entry Redis applied (or refused for good) leaves the
            // journal. A failed entry stays, and this attempt ends once the
            // batch is sorted.
            let mut failed: Option<String> = None;
            for ((seq, op), outcome) in todo.iter().zip(outcomes) {
                let covered = op
                    .id()
                    .is_some_and(|id| restored.get(&id).is_some_and(|&upto| *seq <= upto));
                match outcome {
                    Replayed::Applied | Replayed::Tombstoned => {}
                    Replayed::Refused(why) => {
                        tracing::warn!(seq, why, "journal entry could not be applied; dropped")
                    }
                    Replayed::Failed(why) => {
                        failed.get_or_insert(why);
                        continue;
                    }
                    // More to do: it stays at the head; the next batch
                    // starts with it.
                    Replayed::Partial => continue,
                    Replayed::Rejected(why) => {
                        let tries = {
                            let mut map = self
                                .inner
                                .replay
                                .rejections
                                .lock()
                                .unwrap_or_else(|p| p.into_inner());
                            let n = map.entry(*seq).or_insert(0);
                            *n += 1;
                            *n
                        };
                        if tries < MAX_REJECTIONS {
                            failed.get_or_insert(format!("entry {seq} rejected: {why}"));
                            continue;
                        }
                        self.inner.replay.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(seq, tries, error = %why, "redis keeps rejecting a journal entry; dropped");
                    }
                    Replayed::Missing if covered => {}
                    Replayed::Missing => {
                        // Redis lost the session (restarted empty, say):
                        // restore the mirror's copy, which already holds
                        // every journaled change up to `upto`.
                        if let Err(e) = self.restore_from_mirror(redis, op, &mut restored).await {
                            failed.get_or_insert(e.to_string());
                            continue;
                        }
                    }
                }
                self.inner
                    .replay
                    .rejections
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(seq);
                sled.journal_remove(*seq)?;
                replayed += 1;
                self.inner.replay.replayed.fetch_add(1, Ordering::Relaxed);
            }
            // What left the journal stays gone across a crash.
            sled.durable().await?;
            if let Some(why) = failed {
                return Err(StoreError::Redis(format!("replay stopped: {why}")));
            }
        }
    }

    /// Writes the mirror's copy of the session a journal entry refers to
    /// into Redis (and, for a rotation, removes the old id there).
    async fn restore_from_mirror(
        &self,
        redis: &RedisStore,
        op: &Op,
        restored: &mut HashMap<[u8; 16], u64>,
    ) -> Result<()> {
        let sled = &self.inner.sled;
        let Some(target) = (match op {
            Op::Rotate { new, .. } => Some(*new),
            other => other.id(),
        }) else {
            return Ok(());
        };
        let (copy, upto) = sled.snapshot_for_restore(&target, now_ms())?;
        if let Some(copy) = copy {
            // Marked as including this node's entries up to `upto`: their
            // replay is skipped by Redis itself, however often it repeats.
            // Another node may have restored its own copy meanwhile: this
            // one is compared and set against it (the higher version wins,
            // counters take the max), and Redis's floor for this node is
            // raised to `upto` either way.
            match redis.restore(&copy, upto).await? {
                CreateReply::Created | CreateReply::Raised | CreateReply::Exists => {
                    restored.insert(target, upto);
                }
                CreateReply::Deleted => {}
            }
        }
        if let Op::Rotate { old, .. } = op {
            redis.delete(old).await?;
            restored.insert(*old, upto);
        }
        Ok(())
    }
}

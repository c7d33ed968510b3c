//! Writing the near cache's counts behind: a touch answered from the cache
//! counts there, and its count reaches Redis later, each session's once
//! per `touch_flush_ms`, 64 sessions to a script call. This room holds every way a
//! count leaves the cache: the write-behind itself (`Store::write_behind`,
//! with the journal for what Redis may not have applied), the settling of
//! one session before a change that must come after its counts, the flush
//! of everything (each tick, the drain, the close), and the hand-over to
//! the journal when the node fails over.

use super::admit::Doorkeeper;
use super::{NearCache, Pending};
use crate::session::{Limits, Session};
use crate::store::redis::{Flush, Flushed};
use crate::store::{Mode, Store};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The near cache and its write-behind, as the store holds them.
pub struct Near {
    pub(super) cache: Arc<NearCache>,
    /// How often the counts are written behind.
    touch_flush: Duration,
    /// Held by a write-behind flush while it runs: a rotation waits for the
    /// session's counts to land before moving the session.
    flush_lock: tokio::sync::Mutex<()>,
    /// Which uses fill the cache (`near_admit_ms`).
    pub(super) door: Doorkeeper,
}

impl Near {
    pub(in crate::store) fn new(
        capacity_bytes: u64,
        limits: Limits,
        touch_flush: Duration,
        admit_window: Duration,
    ) -> Near {
        Near {
            cache: Arc::new(NearCache::new(capacity_bytes, limits)),
            touch_flush,
            flush_lock: tokio::sync::Mutex::new(()),
            door: Doorkeeper::new(admit_window),
        }
    }

    /// How often the background loop calls `Store::flush_near`.
    pub(in crate::store) fn touch_flush(&self) -> Duration {
        self.touch_flush
    }
}

impl Store {
    /// Counts the near cache's unwritten counts into the journal (in
    /// fallback, or when their write failed before it was sent), and their
    /// sessions' copies into the mirror.
    fn near_to_journal(&self, near: &NearCache) {
        let taken = near.take_pending();
        let ids: Vec<[u8; 16]> = taken.iter().map(|(id, _)| *id).collect();
        for (id, p) in taken {
            if let Some(copy) = near.copy(&id) {
                self.mirror("touch", |m| m.mirror_touch(copy));
            }
            self.inner.sled.add_pending_touches(&id, p.count, p.at);
        }
        near.landed(&ids);
    }

    /// The node just switched to fallback: the near cache's copies are not
    /// served in fallback, and may be stale when Redis returns; its counts
    /// not yet written go to the journal (coalesced, before any later entry
    /// of their session), its copies of them to the mirror.
    pub(in crate::store) fn near_failed_over(&self) {
        if let Some(near) = &self.inner.near {
            self.near_to_journal(&near.cache);
            near.cache.invalidate_all();
        }
    }

    /// What the near cache knows of a session for a re-seed: its copy (the
    /// count this node answered last) and the counts not yet written.
    pub(in crate::store) fn near_knowledge(&self, id: &[u8; 16]) -> Option<(Session, u64)> {
        let near = self.inner.near.as_ref()?;
        let copy = near.cache.copy(id)?;
        Some((copy, near.cache.pending_count(id)))
    }

    /// Before a rotation or a PATCH: the session's counts not yet written
    /// land first (waiting for a flush in progress), so they are not written
    /// to an id that is gone, nor carry an operation id lower than a change
    /// Redis already applied (a replay would skip them).
    pub(in crate::store) async fn settle_near(&self, id: &[u8; 16]) {
        let Some(near) = self.inner.near.as_ref() else {
            return;
        };
        near.cache.invalidate(id);
        if !near.cache.has_unwritten(id) {
            return;
        }
        // Held by a flush in progress: once it is ours, that flush landed.
        let _flush = near.flush_lock.lock().await;
        if let Some(p) = near.cache.take_pending_to_write(id) {
            self.write_behind(&near.cache, vec![(*id, p)]).await;
        }
    }

    /// A use counted in the near cache just as the drain began may have
    /// missed the drain's flush: it is written now. (Its count is added
    /// under the same lock the flush takes them under, so either the flush
    /// took it or this sees the flag.)
    pub(in crate::store) async fn settle_if_draining(&self, id: &[u8; 16]) {
        if self.inner.draining.load(Ordering::Acquire) {
            self.settle_near(id).await;
        }
    }

    /// Writes every count the near cache holds now: each tick of the
    /// write-behind, at the drain and at the close.
    pub(in crate::store) async fn flush_near(&self) {
        if let Some(near) = &self.inner.near {
            let _flush = near.flush_lock.lock().await;
            let taken = near.cache.take_pending();
            if !taken.is_empty() {
                self.write_behind(&near.cache, taken).await;
            }
        }
    }

    /// Redis no longer has a session whose counts were written behind:
    /// usually it expired or was deleted, but if Redis lost its data the
    /// re-seed that follows must not lose the uses this node answered. The
    /// mirror's live copy (if it holds one) is raised to what this node
    /// answered: the near cache's copy, or the mirror's count plus these.
    fn counts_to_mirror(&self, f: &Flush, near_copy: Option<Session>) {
        let sled = &self.inner.sled;
        let Ok(Some(mut copy)) = sled.get(&f.id, crate::session::now_ms()) else {
            return;
        };
        if sled.is_deleted(&f.id) {
            return;
        }
        let answered = near_copy.map_or(0, |c| c.request_count);
        copy.request_count = answered.max(copy.request_count.saturating_add(f.count));
        copy.last_accessed = copy.last_accessed.max(f.at);
        self.mirror("touch", |m| m.mirror_touch(copy));
    }

    /// Raises the mirror's live copy (if it holds one) to a count Redis
    /// answered, unless the mirror's own bounds cover it.
    fn count_to_mirror(&self, id: &[u8; 16], count: u64, at: u64) {
        let sled = &self.inner.sled;
        // No disk read on the write-behind's path for a session the mirror
        // holds (this node answered it lately, see `mirror_holds`).
        if sled.mirror_holds(id) {
            return;
        }
        let Ok(Some(mut copy)) = sled.get(id, crate::session::now_ms()) else {
            return;
        };
        if copy.request_count >= count || sled.is_deleted(id) {
            return;
        }
        copy.request_count = count;
        copy.last_accessed = copy.last_accessed.max(at);
        self.mirror("touch", |m| m.mirror_touch(copy));
    }

    /// Writes counts to Redis, one `touch_many` call per chunk of sessions;
    /// what Redis may not have applied is journaled under the id its call
    /// carried (exactly once on replay), and the rest, in fallback, is
    /// journaled as fallback touches. Called with `flush_lock` held.
    async fn write_behind(&self, near: &NearCache, taken: Vec<([u8; 16], Pending)>) {
        /// Sessions per call: well under a millisecond of Redis (~10 µs a
        /// session), so a read queued behind a call waits little. Calls of
        /// 256 held Redis ~2.6 ms each, and the p99 of spread traffic was
        /// 2 to 4 ms higher for it (measured: docs/performance.md).
        const CHUNK: usize = 64;
        let redis = match &self.inner.redis {
            Some(r) if self.mode() == Mode::Redis => r,
            _ => {
                let ids: Vec<[u8; 16]> = taken.iter().map(|(id, _)| *id).collect();
                for (id, p) in taken {
                    self.inner.sled.add_pending_touches(&id, p.count, p.at);
                }
                near.landed(&ids);
                return;
            }
        };
        // Those not landed chunk by chunk below: kept for the next flush,
        // or journaled after a failed call.
        let mut unlanded = Vec::new();
        let mut batch = Vec::with_capacity(taken.len());
        for (id, pending) in taken {
            match redis.draw_op(|| self.inner.sled.next_seq()) {
                Ok(seq) => batch.push(Flush {
                    id,
                    count: pending.count,
                    at: pending.at,
                    seq,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "no operation id for a write-behind count; kept for the next flush");
                    near.restore_pending(&id, pending);
                    unlanded.push(id);
                }
            }
        }
        // The copies the mirror gets, taken now: a failure below empties
        // the cache.
        let mut copies: Vec<Option<Session>> = batch.iter().map(|f| near.copy(&f.id)).collect();
        // Cached sessions' counts go over the tracking connection (so they
        // do not invalidate this node's copies), the others' (read through,
        // not kept) over the main connection: one call per chunk each.
        let (cached, uncached): (Vec<usize>, Vec<usize>) =
            (0..batch.len()).partition(|&i| copies[i].is_some());
        // The uncached first: a session read through and then used again
        // (admitted to the cache) is read but not kept while its counts
        // are in flight, so theirs should land soonest.
        let groups = uncached
            .chunks(CHUNK)
            .map(|c| (c, false))
            .chain(cached.chunks(CHUNK).map(|c| (c, true)));
        let mut failed = vec![false; batch.len()];
        let mut failing = false;
        for (indices, tracked_copies) in groups {
            if failing {
                indices.iter().for_each(|&i| failed[i] = true);
                continue;
            }
            let chunk: Vec<Flush> = indices.iter().map(|&i| batch[i]).collect();
            let flushed = if tracked_copies {
                let tracked = near.is_up();
                let mut flushed = redis.flush_touches(&chunk, near, false).await;
                if flushed.is_err() && tracked {
                    // The cache's connection failed (and is closed now), the
                    // main one may not have: the same counts under the same
                    // ids once more over it, as a replay, so none counts twice.
                    flushed = redis.flush_touches(&chunk, near, true).await;
                }
                flushed
            } else {
                redis.flush_uncached(&chunk).await
            };
            match flushed {
                Ok(results) => {
                    for (&i, result) in indices.iter().zip(results) {
                        let f = &batch[i];
                        match result {
                            Flushed::Counted(count) => {
                                // Without a copy (read through, or another
                                // node's change invalidated it), the mirror
                                // still learns Redis's count: a re-seed after
                                // Redis loses its data must not go below it.
                                match copies[i].take() {
                                    Some(copy) => self.mirror("touch", |m| m.mirror_touch(copy)),
                                    None => self.count_to_mirror(&f.id, count, f.at),
                                }
                            }
                            Flushed::Gone => {
                                near.invalidate(&f.id);
                                self.counts_to_mirror(f, copies[i].take());
                            }
                            Flushed::Corrupt => near.invalidate(&f.id),
                        }
                    }
                    // Landed chunk by chunk: a session whose counts are in
                    // flight is read but not kept (see `NearCache::fill`),
                    // so each is in flight only for its own chunk's call.
                    let landed: Vec<[u8; 16]> = indices.iter().map(|&i| batch[i].id).collect();
                    near.landed(&landed);
                }
                Err(e) => {
                    self.redis_failed("touch write-behind", &e);
                    indices.iter().for_each(|&i| failed[i] = true);
                    failing = true;
                }
            }
        }
        // Ids answered are settled; those of a failed chunk stay in doubt
        // until the journal replay that applies them under the same ids.
        for (f, &failed) in batch.iter().zip(&failed) {
            match failed {
                true => redis.doubt_op(f.seq),
                false => redis.settle_op(f.seq),
            }
        }
        for (i, f) in batch.iter().enumerate().filter(|(i, _)| failed[*i]) {
            if let Some(copy) = copies[i].take() {
                self.mirror("touch", |m| m.mirror_touch(copy));
            }
            let Flush { id, count, at, seq } = *f;
            if let Err(e) = self.inner.sled.journal_touches_at(&id, count, at, seq) {
                tracing::error!(error = %e, "journaling write-behind counts failed; they are lost");
            }
            unlanded.push(id);
        }
        near.landed(&unlanded);
    }
}

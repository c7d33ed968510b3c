//! What the routing of each operation asks of the near cache: a hit, a fill
//! through the tracking connection, and the bookkeeping a change to a
//! session needs (its copy dropped, its counts moved or dropped). The
//! operations (`store::ops`) call these and never the cache itself.

use super::{NearCache, NearStats};
use crate::session::Session;
use crate::store::redis::{RedisStore, TrackingSink};
use crate::store::{Result, Store};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Store {
    /// The near cache, in Redis mode.
    fn near_serving(&self) -> Option<&NearCache> {
        self.inner
            .near
            .as_ref()
            .map(|n| &*n.cache)
            .filter(|_| self.inner.redis_mode.load(Ordering::Acquire))
    }

    /// The near cache as the tracking connection's [`TrackingSink`].
    pub(in crate::store) fn near_sink(&self) -> Option<Arc<dyn TrackingSink>> {
        let near = self.inner.near.as_ref()?;
        Some(near.cache.clone())
    }

    /// Whether a touch of a session the near cache does not hold goes
    /// through it (read, cached unless refused, counted behind): there is
    /// one, and the session was used within `near_admit_ms` (see `admit`)
    /// or still has counts here not yet written (a count sent now, ahead
    /// of them, would carry a higher operation id and could make a replay
    /// of theirs be skipped). While the cache is bypassed every use goes
    /// through it, so this node's counts keep the order of their ids.
    pub(in crate::store) fn near_admits(&self, id: &[u8; 16], now: u64) -> bool {
        let Some(near) = self.inner.near.as_ref() else {
            return false;
        };
        !near.cache.is_up() || near.door.admits(id, now) || near.cache.has_unwritten(id)
    }

    /// A touch answered from the near cache (counted there, written behind);
    /// `None`: ask Redis.
    pub(in crate::store) fn near_hit(&self, id: &[u8; 16], now: u64) -> Option<Session> {
        self.near_serving().and_then(|near| near.touch(id, now))
    }

    /// A touch of a session the near cache does not hold: read over the
    /// tracking connection (so Redis tracks the key for this node) and
    /// stored in the cache unless an invalidation raced it. The read writes
    /// nothing, so filling one node's cache does not invalidate another's.
    ///
    /// The request is counted like a cached touch, written behind, and so
    /// is every use while the tracking connection is down (read over the
    /// main connection, not kept): all of this node's counts then reach
    /// Redis through the write-behind, in the order of their operation ids,
    /// and a batch sent again after its connection failed (as a replay,
    /// skipped where Redis applied it) is never overtaken by a newer count.
    pub(in crate::store) async fn near_fill(
        &self,
        redis: &RedisStore,
        id: &[u8; 16],
        now: u64,
    ) -> Result<Option<Session>> {
        let Some(near) = self.inner.near.as_ref() else {
            return Ok(None);
        };
        let answered = near.cache.answered_unwritten(id);
        let ticket = near.cache.ticket(id);
        let read = redis.read_tracked(&*near.cache, id, now).await?;
        Ok(read.map(|session| near.cache.fill(session, answered, ticket, now)))
    }

    /// A touch of a session the near cache does not take (used once, not
    /// again within `near_admit_ms`): one plain read over the main
    /// connection, its count written behind with the cached sessions'
    /// counts. No script runs on the request's path, and Redis tracks
    /// nothing for it: most sessions of a LAN are used now and then, and
    /// their writes then cost Redis one share of a pipelined batch each.
    pub(in crate::store) async fn near_read_through(
        &self,
        redis: &RedisStore,
        id: &[u8; 16],
        now: u64,
    ) -> Result<Option<Session>> {
        let Some(near) = self.inner.near.as_ref() else {
            return Ok(None);
        };
        let answered = near.cache.answered_unwritten(id);
        let read = redis.read_untracked(id, now).await?;
        Ok(read.map(|session| near.cache.count_read(session, answered, now)))
    }

    /// A change to a session made through this node: its near-cache copy
    /// goes at once (Redis's own invalidation follows, asynchronously).
    pub(in crate::store) fn forget_near(&self, id: &[u8; 16]) {
        if let Some(near) = &self.inner.near {
            near.cache.invalidate(id);
        }
    }

    /// A session about to be deleted: its counts are moot, its copy goes.
    pub(in crate::store) fn near_dropped(&self, id: &[u8; 16]) {
        if let Some(near) = &self.inner.near {
            near.cache.take_pending_of(id);
            near.cache.invalidate(id);
        }
    }

    /// A rotation Redis applied: uses counted while it was on its way
    /// belong to the new id.
    pub(in crate::store) fn near_moved(&self, old: &[u8; 16], new: &[u8; 16]) {
        if let Some(near) = &self.inner.near {
            if let Some(p) = near.cache.take_pending_of(old) {
                near.cache.restore_pending(new, p);
            }
        }
    }

    /// Uses of the session this node counted and has not written yet.
    pub(in crate::store) fn near_unwritten(&self, id: &[u8; 16]) -> u64 {
        self.inner
            .near
            .as_ref()
            .map_or(0, |near| near.cache.pending_count(id))
    }

    /// The near cache's counters, when there is one.
    pub(in crate::store) fn near_stats(&self) -> Option<NearStats> {
        self.inner.near.as_ref().map(|n| NearStats {
            unadmitted: n.door.refused(),
            ..n.cache.stats()
        })
    }
}

//! What the [`Store`] reports about itself: `/api/health`, `/metrics` and
//! `/api/ready` read it, and the probe records here why Redis refuses the
//! node.

use super::{Mode, RedisStore, Store, StoreStatus};
use std::sync::atomic::Ordering;

impl Store {
    /// The stored-session count `status` reports, without the rest.
    pub(super) fn status_sessions(&self) -> u64 {
        match &self.inner.redis {
            Some(r) if self.mode() == Mode::Redis => r.cached_active(),
            _ => self.inner.sled.sessions_active(),
        }
    }

    pub fn status(&self) -> StoreStatus {
        let redis_mode = self.mode() == Mode::Redis;
        let sled = &self.inner.sled;
        let config_error = self
            .inner
            .redis_config_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map(|e| format!("redis refuses this node's configuration: {e}"));
        let unready = sled
            .fault()
            .or_else(|| {
                (!self.clock_is_sane()).then(|| {
                    "the system clock is behind this build's date; waiting for time sync".into()
                })
            })
            .or_else(|| {
                (self.inner.require_redis && self.inner.redis.is_some() && !redis_mode).then(|| {
                    config_error
                        .clone()
                        .unwrap_or_else(|| "not serving from redis (require_redis)".into())
                })
            });
        StoreStatus {
            active: self.mode(),
            redis_configured: self.inner.redis.is_some(),
            redis_reachable: self.inner.redis_reachable.load(Ordering::Relaxed),
            pending_sync: if self.inner.redis.is_some() {
                sled.journal_len()
            } else {
                0
            },
            sessions_active: match (&self.inner.redis, redis_mode) {
                (Some(r), true) => r.cached_active(),
                _ => sled.sessions_active(),
            },
            failovers: self.inner.failovers.load(Ordering::Relaxed),
            reconciliations: self.inner.replay.reconciliations.load(Ordering::Relaxed),
            replayed_ops: self.inner.replay.replayed.load(Ordering::Relaxed),
            replay_dropped: self.inner.replay.dropped.load(Ordering::Relaxed),
            deletions_heard: self.inner.deletions_heard.load(Ordering::Relaxed),
            corrupt_records: sled.corrupt_records()
                + self
                    .inner
                    .redis
                    .as_ref()
                    .map_or(0, RedisStore::corrupt_records),
            duplicate_ops_refused: self
                .inner
                .redis
                .as_ref()
                .map_or(0, RedisStore::duplicates_refused),
            journal_bytes: sled.journal_bytes(),
            touches_unjournaled: sled.touches_unjournaled(),
            degraded: unready.clone().or_else(|| config_error.clone()),
            unready,
            redis_config_error: config_error.is_some(),
            near: self.near_stats(),
        }
    }

    pub(super) fn set_config_error(&self, why: Option<String>) {
        *self
            .inner
            .redis_config_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = why;
    }
}

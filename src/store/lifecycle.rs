//! The [`Store`]'s start and end: straight to Redis at start when it
//! answers, the drain at shutdown (the near cache's counts written, every
//! use written through), and the last flush.

use super::{Result, Store, StoreError};
use std::sync::atomic::Ordering;

impl Store {
    /// At start: Redis mode at once when Redis answers (within the store
    /// timeout) and nothing waits in the journal, so a node does not begin by
    /// answering like one in an outage (503 for sessions it does not hold).
    /// Otherwise the probe takes over, as after any outage.
    pub async fn start_on_redis(&self) {
        let Some(redis) = &self.inner.redis else {
            return;
        };
        if self.inner.sled.journal_len() > 0 {
            return;
        }
        if redis.ping().await.is_ok() {
            self.inner.redis_reachable.store(true, Ordering::Release);
            self.inner.redis_mode.store(true, Ordering::Release);
        }
    }

    /// Shutdown begins: the counts the near cache holds are written now,
    /// and from here every use is written through to Redis while in-flight
    /// requests finish, so a browser that moves to another node sees its
    /// count there at once.
    pub async fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
        // While the copies are still there: the mirror gets them.
        self.flush_near().await;
        if let (Some(near), Some(redis)) = (self.near_sink(), &self.inner.redis) {
            // also voids a connection being opened right now
            redis.close_tracking(&*near);
        }
    }

    /// Flushes everything; called on shutdown, after every background task
    /// has returned and the last request was answered: the near cache's
    /// last counts go to Redis (or the journal), then the disk is flushed.
    /// A disk that is full or failing is logged, not an error: everything
    /// acknowledged was on disk before it was acknowledged, and the stop
    /// must end within the shutdown grace (and exit 0) whatever the disk
    /// does; what is lost is uncounted touches, and the closing snapshot.
    pub async fn close(&self) -> Result<()> {
        if self.inner.near.is_some() {
            self.flush_near().await;
            if let Err(e) = self.inner.sled.flush_pending_touches() {
                tracing::warn!(error = %e, "journaling the last touches failed");
            }
        }
        match self.inner.sled.close().await {
            Err(
                e @ (StoreError::DiskFault(_)
                | StoreError::DiskNoSpace(_)
                | StoreError::DiskFull { .. }),
            ) => {
                tracing::warn!(error = %e, "the local store's disk is faulty at close; acknowledged writes were flushed before");
                Ok(())
            }
            other => other,
        }
    }
}

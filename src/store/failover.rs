//! The store the HTTP layer talks to.
//!
//! With no Redis configured it is the sled store and nothing more. With Redis,
//! it sends every operation to Redis (bounded by the store timeout), mirrors
//! the result into sled, and on the first error or timeout switches to *fallback*:
//! operations go to sled, are acknowledged once durable there, and are journaled.
//! A background probe watches for Redis to come back; the journal is then
//! replayed in order and only when it is empty does the node return to Redis
//! mode. See DESIGN.md, "Stores and the failure model".
//!
//! In Redis mode the mirror is a copy for outages: creates, patches and
//! touches reach it lazily (flushed every 500 ms, touches batched per
//! session), while deletes and rotations are flushed before the answer, so a
//! revoked session cannot reappear from the mirror after a crash.

use super::redis::RedisStore;
use super::sled::SledStore;
use super::{Mode, PatchOutcome, StoreError, StoreStatus};
use crate::session::{now_ms, Patch, Session};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::RwLock;

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    sled: SledStore,
    redis: Option<RedisStore>,
    /// True while operations go to Redis.
    redis_mode: AtomicBool,
    /// Last probe or operation result.
    redis_reachable: AtomicBool,
    /// Fallback writes hold it shared; the replayer takes it exclusively to
    /// flip back to Redis mode only when no fallback write is mid-flight.
    switch: RwLock<()>,
    failovers: AtomicU64,
    reconciliations: AtomicU64,
    replayed: AtomicU64,
}

/// Where one operation ran.
enum Route {
    Redis(RedisStore),
    Sled,
}

impl Store {
    pub fn new(sled: SledStore, redis: Option<RedisStore>) -> Store {
        Store {
            inner: Arc::new(Inner {
                sled,
                redis,
                // Start pessimistic: the probe promotes us once Redis answers
                // and any journal left from a previous run has been replayed.
                redis_mode: AtomicBool::new(false),
                redis_reachable: AtomicBool::new(false),
                switch: RwLock::new(()),
                failovers: AtomicU64::new(0),
                reconciliations: AtomicU64::new(0),
                replayed: AtomicU64::new(0),
            }),
        }
    }

    pub fn sled(&self) -> &SledStore {
        &self.inner.sled
    }

    pub fn mode(&self) -> Mode {
        if self.inner.redis_mode.load(Ordering::Acquire) {
            Mode::Redis
        } else {
            Mode::Sled
        }
    }

    fn route(&self) -> Route {
        match &self.inner.redis {
            Some(r) if self.inner.redis_mode.load(Ordering::Acquire) => Route::Redis(r.clone()),
            _ => Route::Sled,
        }
    }

    /// Whether writes to sled must be journaled: only when a Redis exists to
    /// replay them into.
    fn journaled(&self) -> bool {
        self.inner.redis.is_some()
    }

    /// Records that Redis failed an operation and switches to fallback.
    fn redis_failed(&self, what: &str, err: &StoreError) {
        self.inner.redis_reachable.store(false, Ordering::Release);
        if self.inner.redis_mode.swap(false, Ordering::AcqRel) {
            // The mirror must hold the latest touches before it serves.
            if let Err(e) = self.inner.sled.flush_touched() {
                tracing::error!(error = %e, "writing buffered touches to the mirror failed");
            }
            self.inner.failovers.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(operation = what, error = %err, "redis unavailable; switching to the local sled store");
        }
    }

    /// A session record in Redis that no node could have written (counted by
    /// the Redis store): logged, and the session is treated as absent, here
    /// and in the mirror (a later outage must not bring it back). Redis
    /// itself is fine, so the node stays in Redis mode.
    fn corrupt_in_redis(&self, what: &str, id: &[u8; 16], err: &StoreError) -> Result<()> {
        tracing::error!(operation = what, id = %crate::session::format_id(id), error = %err, "corrupt session record in redis; treated as absent");
        self.inner.sled.mirror_remove(id)?;
        Ok(())
    }

    /// Creates a session; `counted` when the creating request itself uses it
    /// (`GET /api/session`), so its request_count starts at 1.
    pub async fn create(
        &self,
        user_id: String,
        metadata: String,
        counted: bool,
    ) -> Result<Session> {
        let now = now_ms();
        let mut session = Session::new(user_id, metadata, now, self.inner.sled.limits());
        session.request_count = u64::from(counted);
        if let Route::Redis(r) = self.route() {
            match r.create(&session).await {
                Ok(()) => {
                    // Redis holds it; the mirror copy is for outages and is
                    // flushed with the next lazy flush, sparing the SD card
                    // an fsync per create.
                    self.inner.sled.mirror_put(&session)?;
                    return Ok(session);
                }
                Err(e) => self.redis_failed("create", &e),
            }
        }
        let _gate = self.inner.switch.read().await;
        self.inner.sled.create(&session, self.journaled())?;
        self.inner.sled.durable().await?;
        Ok(session)
    }

    /// Counts one request and slides the expiry.
    pub async fn touch(&self, id: &[u8; 16]) -> Result<Option<Session>> {
        let now = now_ms();
        if let Route::Redis(r) = self.route() {
            match r.touch(id, now).await {
                Ok(found) => {
                    match &found {
                        Some(s) => self.inner.sled.mirror_touch(s.clone())?,
                        None => {
                            self.inner.sled.mirror_remove(id)?;
                        }
                    }
                    return Ok(found);
                }
                Err(e @ StoreError::CorruptRecord(_)) => {
                    self.corrupt_in_redis("touch", id, &e)?;
                    return Ok(None);
                }
                Err(e) => self.redis_failed("touch", &e),
            }
        }
        let _gate = self.inner.switch.read().await;
        self.inner.sled.touch(id, now, self.journaled())
    }

    pub async fn patch(
        &self,
        id: &[u8; 16],
        patch: &Patch,
        if_match: Option<u64>,
    ) -> Result<PatchOutcome> {
        let now = now_ms();
        if let Route::Redis(r) = self.route() {
            match r.patch(id, patch, if_match, now).await {
                Ok(outcome) => {
                    match &outcome {
                        PatchOutcome::Updated(s) => self.inner.sled.mirror_put(s)?,
                        PatchOutcome::NotFound => {
                            self.inner.sled.mirror_remove(id)?;
                        }
                        PatchOutcome::VersionMismatch { .. } => {}
                    }
                    return Ok(outcome);
                }
                Err(StoreError::Input(e)) => return Err(StoreError::Input(e)),
                Err(e @ StoreError::CorruptRecord(_)) => {
                    self.corrupt_in_redis("patch", id, &e)?;
                    return Ok(PatchOutcome::NotFound);
                }
                Err(e) => self.redis_failed("patch", &e),
            }
        }
        let _gate = self.inner.switch.read().await;
        let outcome = self
            .inner
            .sled
            .patch(id, patch, if_match, now, self.journaled())?;
        if matches!(outcome, PatchOutcome::Updated(_)) {
            self.inner.sled.durable().await?;
        }
        Ok(outcome)
    }

    pub async fn delete(&self, id: &[u8; 16]) -> Result<bool> {
        let now = now_ms();
        if let Route::Redis(r) = self.route() {
            match r.delete(id).await {
                Ok(existed) => {
                    self.inner.sled.mirror_remove(id)?;
                    self.inner.sled.durable().await?;
                    return Ok(existed);
                }
                Err(e @ StoreError::CorruptRecord(_)) => {
                    self.corrupt_in_redis("delete", id, &e)?;
                    return Err(e);
                }
                Err(e) => self.redis_failed("delete", &e),
            }
        }
        let _gate = self.inner.switch.read().await;
        let existed = self.inner.sled.delete(id, now, self.journaled())?;
        if existed {
            self.inner.sled.durable().await?;
        }
        Ok(existed)
    }

    /// New id, same data, old id gone.
    pub async fn rotate(&self, id: &[u8; 16]) -> Result<Option<Session>> {
        let now = now_ms();
        // Chosen once, so that if Redis applied the rotation before timing
        // out, the fallback path and the later replay agree on the new id.
        let new_id = *uuid::Uuid::new_v4().as_bytes();
        if let Route::Redis(r) = self.route() {
            match r.rotate(id, &new_id).await {
                Ok(found) => {
                    self.inner.sled.mirror_remove(id)?;
                    if let Some(s) = &found {
                        self.inner.sled.mirror_put(s)?;
                    }
                    self.inner.sled.durable().await?;
                    return Ok(found);
                }
                Err(e @ StoreError::CorruptRecord(_)) => {
                    self.corrupt_in_redis("rotate", id, &e)?;
                    return Ok(None);
                }
                Err(e) => self.redis_failed("rotate", &e),
            }
        }
        let _gate = self.inner.switch.read().await;
        let moved = self.inner.sled.rotate(id, new_id, now, self.journaled())?;
        if moved.is_some() {
            self.inner.sled.durable().await?;
        }
        Ok(moved)
    }

    pub async fn list_user(&self, user: &str) -> Result<Vec<Session>> {
        let now = now_ms();
        if let Route::Redis(r) = self.route() {
            match r.list_user(user, now).await {
                Ok(list) => return Ok(list),
                Err(e @ StoreError::CorruptRecord(_)) => return Err(e),
                Err(e) => self.redis_failed("list_user", &e),
            }
        }
        Ok(self.inner.sled.list_user(user, now))
    }

    /// Logs a user out everywhere; returns how many sessions were deleted.
    pub async fn delete_user(&self, user: &str) -> Result<u64> {
        let now = now_ms();
        if let Route::Redis(r) = self.route() {
            match r.delete_user(user).await {
                Ok(ids) => {
                    for id in self
                        .inner
                        .sled
                        .user_session_ids(user)
                        .iter()
                        .chain(ids.iter())
                    {
                        self.inner.sled.mirror_remove(id)?;
                    }
                    self.inner.sled.durable().await?;
                    return Ok(ids.len() as u64);
                }
                Err(e @ StoreError::CorruptRecord(_)) => return Err(e),
                Err(e) => self.redis_failed("delete_user", &e),
            }
        }
        let _gate = self.inner.switch.read().await;
        let mut deleted = 0;
        for s in self.inner.sled.list_user(user, now) {
            if self.inner.sled.delete(&s.id, now, self.journaled())? {
                deleted += 1;
            }
        }
        if deleted > 0 {
            self.inner.sled.durable().await?;
        }
        Ok(deleted)
    }

    pub fn status(&self) -> StoreStatus {
        let redis_mode = self.mode() == Mode::Redis;
        StoreStatus {
            active: self.mode(),
            redis_configured: self.inner.redis.is_some(),
            redis_reachable: self.inner.redis_reachable.load(Ordering::Relaxed),
            pending_sync: if self.inner.redis.is_some() {
                self.inner.sled.journal_len()
            } else {
                0
            },
            sessions_active: match (&self.inner.redis, redis_mode) {
                (Some(r), true) => r.cached_active(),
                _ => self.inner.sled.sessions_active(),
            },
            failovers: self.inner.failovers.load(Ordering::Relaxed),
            reconciliations: self.inner.reconciliations.load(Ordering::Relaxed),
            replayed_ops: self.inner.replayed.load(Ordering::Relaxed),
            corrupt_records: self.inner.sled.corrupt_records()
                + self
                    .inner
                    .redis
                    .as_ref()
                    .map_or(0, RedisStore::corrupt_records),
        }
    }

    /// Background upkeep: the expiry sweep and the lazy flush of touches.
    pub async fn run_housekeeping(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rounds: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            rounds += 1;
            if rounds % 2 == 0 {
                let sled = self.inner.sled.clone();
                let removed = tokio::task::spawn_blocking(move || sled.sweep(now_ms(), 1_000))
                    .await
                    .unwrap_or(0);
                if removed > 0 {
                    tracing::debug!(removed, "swept expired sessions");
                }
            }
            if let Err(e) = self.inner.sled.flush_lazy().await {
                tracing::warn!(error = %e, "lazy flush failed");
            }
        }
    }

    /// Redis upkeep while the node runs: the probe that notices Redis coming
    /// back, the journal replay, the deletion feed into the mirror, and the
    /// cached active-session count.
    pub async fn run_background(self, shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(redis) = self.inner.redis.clone() else {
            return;
        };
        tokio::spawn(
            self.clone()
                .follow_deletions(redis.clone(), shutdown.clone()),
        );
        let (first_delay, max_delay) = redis.probe_delays();
        let mut delay = first_delay;
        let mut shutdown = shutdown;
        let mut last_refresh = std::time::Instant::now() - Duration::from_secs(60);
        // The probe's last failure: a new reason (refused, timed out, wrong
        // password...) is logged once as a warning, repeats only at debug.
        let mut last_failure = String::new();
        loop {
            let redis_mode = self.inner.redis_mode.load(Ordering::Acquire);
            let pending = self.inner.sled.journal_len();
            if !redis_mode || pending > 0 {
                match redis.ping().await {
                    Ok(()) => {
                        self.inner.redis_reachable.store(true, Ordering::Release);
                        last_failure.clear();
                        delay = first_delay;
                        if let Err(e) = self.reconcile(&redis).await {
                            tracing::warn!(error = %e, "journal replay interrupted; will retry");
                            self.inner.redis_reachable.store(false, Ordering::Release);
                        }
                    }
                    Err(e) => {
                        self.inner.redis_reachable.store(false, Ordering::Release);
                        let reason = e.to_string();
                        if reason != last_failure {
                            tracing::warn!(error = %reason, "redis unreachable; serving from sled");
                            last_failure = reason;
                        } else {
                            tracing::debug!(error = %e, next_probe_ms = delay.as_millis() as u64, "redis still unreachable");
                        }
                        delay = (delay * 2).min(max_delay);
                    }
                }
            } else {
                delay = first_delay;
                if last_refresh.elapsed() >= Duration::from_secs(1) {
                    last_refresh = std::time::Instant::now();
                    // Doubles as the health check of an idle node: a node
                    // that serves nothing still notices Redis going away.
                    if let Err(e) = redis.refresh_active(now_ms()).await {
                        self.redis_failed("refresh", &e);
                    }
                }
            }
            let wait = if self.inner.redis_mode.load(Ordering::Acquire) {
                Duration::from_millis(250)
            } else {
                delay
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Replays the journal into Redis, oldest first, then returns to Redis
    /// mode once it is empty. Requests keep being served (from sled, and
    /// journaled) while it runs.
    async fn reconcile(&self, redis: &RedisStore) -> Result<()> {
        use super::redis::Replayed;
        let sled = &self.inner.sled;
        let started = std::time::Instant::now();
        let mut replayed = 0u64;
        // Sessions restored whole from the mirror, with the journal position
        // the copy already includes: their older entries are skipped.
        let mut restored: std::collections::HashMap<[u8; 16], u64> =
            std::collections::HashMap::new();
        sled.flush_touched()?;
        let was_fallback = !self.inner.redis_mode.load(Ordering::Acquire);
        if was_fallback && sled.journal_len() > 0 {
            tracing::info!(
                pending = sled.journal_len(),
                "redis is back; replaying the journal"
            );
        }
        loop {
            let batch = sled.journal_head(256);
            if batch.is_empty() {
                let _gate = self.inner.switch.write().await;
                if sled.journal_len() > 0 {
                    continue;
                }
                if !self.inner.redis_mode.swap(true, Ordering::AcqRel) {
                    self.inner.reconciliations.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        replayed,
                        took_ms = started.elapsed().as_millis() as u64,
                        "journal drained; back on redis"
                    );
                }
                return Ok(());
            }
            // Entries that do not decode were logged and counted; drop them.
            // Entries already contained in a restored mirror copy are skipped.
            let mut todo: Vec<(u64, super::journal::Op)> = Vec::with_capacity(batch.len());
            for (seq, op) in batch {
                match op {
                    Some(op) if !restored.get(&op.id()).is_some_and(|&upto| seq <= upto) => {
                        todo.push((seq, op))
                    }
                    _ => sled.journal_remove(seq)?,
                }
            }
            let ops: Vec<&super::journal::Op> = todo.iter().map(|(_, op)| op).collect();
            let outcomes = redis.replay_batch(&ops).await?;
            // Every entry Redis applied (or refused for good) leaves the
            // journal, even when one before it failed: re-sending an applied
            // touch or merge would count it twice. A failed entry stays, and
            // this attempt ends once the batch is sorted.
            let mut failed: Option<String> = None;
            for ((seq, op), outcome) in todo.iter().zip(outcomes) {
                let covered = restored.get(&op.id()).is_some_and(|&upto| *seq <= upto);
                match outcome {
                    Replayed::Applied | Replayed::Tombstoned => {}
                    Replayed::Refused(why) => {
                        tracing::warn!(seq, why, "journal entry could not be applied; dropped")
                    }
                    Replayed::Failed(why) => {
                        failed.get_or_insert(why);
                        continue;
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
                sled.journal_remove(*seq)?;
                replayed += 1;
                self.inner.replayed.fetch_add(1, Ordering::Relaxed);
            }
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
        op: &super::journal::Op,
        restored: &mut std::collections::HashMap<[u8; 16], u64>,
    ) -> Result<()> {
        let sled = &self.inner.sled;
        let target = match op {
            super::journal::Op::Rotate { new, .. } => *new,
            other => other.id(),
        };
        let (copy, upto) = sled.with_lock(&target, || {
            (sled.get(&target, now_ms()), sled.journal_last_seq())
        });
        if let Some(copy) = copy {
            redis.restore(&copy).await?;
            restored.insert(target, upto);
        }
        if let super::journal::Op::Rotate { old, .. } = op {
            redis.delete(old).await?;
            restored.insert(*old, upto);
        }
        Ok(())
    }

    /// Keeps the mirror free of sessions deleted or rotated on other nodes.
    async fn follow_deletions(
        self,
        redis: RedisStore,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let sled = self.inner.sled.clone();
        loop {
            let follow = redis.follow_deletions(|id| {
                if let Err(e) = sled.mirror_remove(&id) {
                    tracing::warn!(error = %e, "dropping a deleted session from the mirror failed");
                }
            });
            tokio::select! {
                res = follow => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "deletion feed interrupted; resubscribing");
                    }
                }
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Flushes everything; called on shutdown.
    pub async fn close(&self) -> Result<()> {
        self.inner.sled.close().await
    }
}

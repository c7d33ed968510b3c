//! The store the HTTP layer talks to.
//!
//! With no Redis configured it is the sled store and nothing more. With Redis,
//! it sends every operation to Redis (bounded by the store timeout), mirrors
//! the result into sled, and on the first error or timeout switches to *fallback*:
//! operations go to sled, are acknowledged once durable there, and are journaled.
//! A background probe watches for Redis to come back; the journal is then
//! replayed in order and only when it is empty does the node return to Redis
//! mode. See docs/failure-model.md.
//!
//! In Redis mode the mirror is a copy for outages: creates, patches and
//! touches reach it lazily (flushed every 500 ms, touches batched per
//! session), while deletes and rotations are flushed before the answer, so a
//! revoked session cannot reappear from the mirror after a crash. A mirror
//! write that fails (disk at its reserve, say) is logged and counted, never
//! turned into an error for a write Redis applied.
//!
//! The fault rules, in one place:
//! - a record Redis holds that no node could have written is *absent* for
//!   every operation (404, or a new session), counted and logged;
//! - in fallback, a session this node does not hold and did not see deleted
//!   is [`StoreError::NotHeld`] (503, and no new cookie): it may well live in
//!   Redis, and a failover must not log anyone out;
//! - deletes in fallback are journaled whether or not the mirror holds the
//!   session, and answered "accepted";
//! - every journaled operation carries an id that Redis records atomically
//!   with it, so replay applies it exactly once (see `journal`).

use super::local::journal_ops::Op;
use super::local::Journal;
use super::local::SledStore;
use super::near::NearCache;
use super::redis::RedisStore;
use super::redis::{CreateReply, Flush, Flushed, Replayed};
use super::{Mode, PatchOutcome, StoreError, StoreStatus};
use crate::session::{now_ms, Patch, Session};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Journal entries Redis rejected for good and that were dropped.
    replay_dropped: AtomicU64,
    /// Deletions and rotations of other nodes heard through Redis pub/sub.
    deletions_heard: Arc<AtomicU64>,
    /// Failed tries per journal entry that Redis rejects (not for outages).
    rejections: Mutex<HashMap<u64, u32>>,
    /// Set when a touch found Redis emptied: the background task re-seeds.
    reseed_wanted: AtomicBool,
    /// Sessions are neither created nor slid with a clock before this (ms):
    /// the build time, so a Pi that booted without its clock waits for NTP.
    clock_floor: u64,
    /// Journal entries per pipelined replay round trip.
    replay_batch: usize,
    /// Sessions a user may hold; the oldest beyond it are deleted.
    max_per_user: u64,
    /// Stored sessions above which creates are refused (503).
    max_sessions: u64,
    /// Unready whenever not serving from Redis.
    require_redis: bool,
    /// Longest wait for a mirror flush in Redis mode (the store timeout).
    mirror_flush_wait: Duration,
    /// Why Redis refuses this node (credentials, database), until it stops.
    redis_config_error: Mutex<Option<String>>,
    /// The near cache of sessions served in Redis mode (`None` without
    /// Redis, or with `near_cache_mb = 0`).
    near: Option<Arc<NearCache>>,
    /// How often the near cache's counts are written behind.
    touch_flush: Duration,
    /// Held by a write-behind flush while it runs: a rotation waits for the
    /// session's counts to land before moving the session.
    flush_lock: tokio::sync::Mutex<()>,
    /// Set at shutdown: the near cache stays bypassed.
    draining: AtomicBool,
}

/// How many times a journal entry that Redis rejects (a script error, not an
/// outage) is tried before it is dropped, logged and counted.
const MAX_REJECTIONS: u32 = 5;

/// What Redis said to one operation.
enum Answer<T> {
    /// Redis applied it (or answered it): this is the result.
    Redis(T),
    /// The record Redis holds is corrupt: the session is absent.
    Corrupt,
    /// Not in Redis mode, or Redis failed just now (then `sent` is the id the
    /// call carried: Redis may have applied it, and the journal entry must
    /// reuse it).
    Fallback { sent: Option<u64> },
}

/// The store's bounds, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// No session is created or slid with a clock before this (unix ms).
    pub clock_floor: u64,
    pub replay_batch: usize,
    pub max_sessions_per_user: u64,
    pub max_sessions: u64,
    pub require_redis: bool,
    pub store_timeout: Duration,
    /// The near cache's bound; 0 turns it off.
    pub near_cache_bytes: u64,
    pub touch_flush: Duration,
}

/// What a DELETE did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// Done everywhere at once: how many sessions were deleted (for one
    /// session, 0 means it was not found).
    Now(u64),
    /// Journaled in fallback, applied when Redis returns; `held`: whether
    /// this node held the session (or, for a user, how many it held).
    Accepted { held: u64 },
}

impl Store {
    pub fn new(sled: SledStore, redis: Option<RedisStore>, limits: StoreLimits) -> Store {
        let near = (redis.is_some() && limits.near_cache_bytes > 0)
            .then(|| Arc::new(NearCache::new(limits.near_cache_bytes, *sled.limits())));
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
                replay_dropped: AtomicU64::new(0),
                deletions_heard: Arc::new(AtomicU64::new(0)),
                rejections: Mutex::new(HashMap::new()),
                reseed_wanted: AtomicBool::new(false),
                clock_floor: limits.clock_floor,
                replay_batch: limits.replay_batch,
                max_per_user: limits.max_sessions_per_user,
                max_sessions: limits.max_sessions,
                require_redis: limits.require_redis,
                mirror_flush_wait: limits.store_timeout,
                redis_config_error: Mutex::new(None),
                near,
                touch_flush: limits.touch_flush,
                flush_lock: tokio::sync::Mutex::new(()),
                draining: AtomicBool::new(false),
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

    /// Whether the clock is past the build time (see `clock_floor`).
    pub fn clock_is_sane(&self) -> bool {
        now_ms() >= self.inner.clock_floor
    }

    /// The time for an operation that writes times; refused while the clock
    /// is not sane.
    fn now(&self) -> Result<u64> {
        let now = now_ms();
        if now < self.inner.clock_floor {
            return Err(StoreError::Unavailable(
                "the system clock is behind this build's date; waiting for time sync".into(),
            ));
        }
        Ok(now)
    }

    /// How a fallback write is journaled: not at all without Redis; under
    /// the id the failed Redis call carried when it was sent; else anew.
    fn journal(&self, sent: Option<u64>) -> Journal {
        match (&self.inner.redis, sent) {
            (None, _) => Journal::Off,
            (Some(_), Some(seq)) => Journal::At(seq),
            (Some(_), None) => Journal::Next,
        }
    }

    /// The one "Redis first" path every operation takes: runs `op` on Redis
    /// when in Redis mode; on an outage-like error, records it and switches
    /// to fallback; on a corrupt record, forgets the session (`id`) locally.
    ///
    /// `op` gets the operation's id, drawn here, after the mode was read, so
    /// an id is never 0 nor drawn for a call that is not made.
    async fn on_redis<T, Fut>(
        &self,
        what: &'static str,
        id: Option<&[u8; 16]>,
        op: impl FnOnce(RedisStore, u64) -> Fut,
    ) -> Result<Answer<T>>
    where
        Fut: std::future::Future<Output = Result<T>>,
    {
        let redis = match &self.inner.redis {
            Some(r) if self.inner.redis_mode.load(Ordering::Acquire) => r.clone(),
            _ => return Ok(Answer::Fallback { sent: None }),
        };
        let seq = self.inner.sled.next_seq()?;
        match op(redis, seq).await {
            Ok(v) => Ok(Answer::Redis(v)),
            Err(e @ StoreError::Input(_)) => Err(e),
            Err(e @ StoreError::CorruptRecord(_)) => {
                tracing::error!(operation = what, error = %e, "corrupt session record in redis; treated as absent");
                if let Some(id) = id {
                    self.mirror(what, |m| m.mirror_forget(id).map(|_| ()));
                }
                Ok(Answer::Corrupt)
            }
            Err(e) => {
                self.redis_failed(what, &e);
                Ok(Answer::Fallback { sent: Some(seq) })
            }
        }
    }

    /// Takes the fallback gate: `None` when the node went back to Redis mode
    /// since the route was chosen (the caller starts over on Redis), so no
    /// fallback write lands after the switch back.
    async fn fallback_gate(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        let gate = self.inner.switch.read().await;
        (self.mode() == Mode::Sled || self.inner.redis.is_none()).then_some(gate)
    }

    /// A mirror write in Redis mode: Redis holds the truth, so a failure is
    /// logged, never the request's error.
    fn mirror(&self, what: &str, write: impl FnOnce(&SledStore) -> Result<()>) {
        if let Err(e) = write(&self.inner.sled) {
            tracing::warn!(operation = what, error = %e, "mirror write failed; redis holds the change");
        }
    }

    /// Flushes a mirror change Redis already applied, for at most the store
    /// timeout: a stalled disk must not turn it into an error, nor hold the
    /// answer.
    async fn mirror_durable(&self, what: &str) {
        match tokio::time::timeout(self.inner.mirror_flush_wait, self.inner.sled.durable()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, change = what, "flushing the mirror failed; redis holds the change")
            }
            Err(_) => {
                tracing::warn!(
                    change = what,
                    "the mirror's flush is slow; redis holds the change, answered without it"
                )
            }
        }
    }

    /// In fallback, the answer for a session the local store does not have:
    /// absent if this node saw it deleted (or runs without Redis), else
    /// unknown.
    fn missing<T>(&self, id: &[u8; 16], absent: T) -> Result<T> {
        if self.inner.redis.is_some() && !self.inner.sled.is_deleted(id) {
            Err(StoreError::NotHeld)
        } else {
            Ok(absent)
        }
    }

    /// Records that Redis failed an operation and switches to fallback.
    fn redis_failed(&self, what: &str, err: &StoreError) {
        self.inner.redis_reachable.store(false, Ordering::Release);
        if self.inner.redis_mode.swap(false, Ordering::AcqRel) {
            // The near cache's copies are not served in fallback, and may be
            // stale when Redis returns; its counts not yet written go to the
            // journal (coalesced, before any later entry of their session),
            // its copies of them to the mirror.
            if let Some(near) = &self.inner.near {
                self.near_to_journal(near);
                near.invalidate_all();
            }
            // The mirror must hold the latest touches before it serves.
            if let Err(e) = self.inner.sled.flush_touched() {
                tracing::error!(error = %e, "writing buffered touches to the mirror failed");
            }
            self.inner.failovers.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(operation = what, error = %err, "redis unavailable; switching to the local sled store");
        }
    }

    /// Creates a session; `counted` when the creating request itself uses it
    /// (`GET /api/session`), so its request_count starts at 1.
    pub async fn create(
        &self,
        user_id: String,
        metadata: String,
        counted: bool,
    ) -> Result<Session> {
        let now = self.now()?;
        let stored = self.status_sessions();
        if stored >= self.inner.max_sessions {
            return Err(StoreError::Full {
                stored,
                max: self.inner.max_sessions,
            });
        }
        let mut session = Session::new(user_id, metadata, now, self.inner.sled.limits());
        session.request_count = u64::from(counted);
        loop {
            match self
                .on_redis("create", None, |r, _| {
                    let s = session.clone();
                    async move { r.create(&s).await }
                })
                .await?
            {
                Answer::Redis(()) | Answer::Corrupt => {
                    // Redis holds it; the mirror copy is for outages and is
                    // flushed with the next lazy flush, sparing the SD card
                    // an fsync per create.
                    self.mirror("create", |m| m.mirror_put(&session));
                    return Ok(session);
                }
                Answer::Fallback { .. } => {}
            }
            let Some(_gate) = self.fallback_gate().await else {
                continue;
            };
            // A create replays idempotently: it needs no id of its own.
            let journal = self.journal(None);
            self.inner.sled.create(&session, journal)?;
            self.keep_user_bounded(&session.user_id, now, journal)?;
            self.inner.sled.durable().await?;
            return Ok(session);
        }
    }

    /// The near cache, in Redis mode.
    fn near(&self) -> Option<&NearCache> {
        self.inner
            .near
            .as_deref()
            .filter(|_| self.inner.redis_mode.load(Ordering::Acquire))
    }

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

    /// A change to a session made through this node: its near-cache copy
    /// goes at once (Redis's own invalidation follows, asynchronously).
    fn forget_near(&self, id: &[u8; 16]) {
        if let Some(near) = &self.inner.near {
            near.invalidate(id);
        }
    }

    /// Before a rotation or a PATCH: the session's counts not yet written
    /// land first (waiting for a flush in progress), so they are not written
    /// to an id that is gone, nor carry an operation id lower than a change
    /// Redis already applied (a replay would skip them).
    async fn settle_near(&self, id: &[u8; 16]) {
        let Some(near) = self.inner.near.as_deref() else {
            return;
        };
        near.invalidate(id);
        if !near.has_unwritten(id) {
            return;
        }
        // Held by a flush in progress: once it is ours, that flush landed.
        let _flush = self.inner.flush_lock.lock().await;
        if let Some(p) = near.take_pending_of(id) {
            self.write_behind(near, vec![(*id, p)]).await;
        }
    }

    /// A use counted in the near cache just as the drain began may have
    /// missed the drain's flush: it is written now. (Its count is added
    /// under the same lock the flush takes them under, so either the flush
    /// took it or this sees the flag.)
    async fn settle_if_draining(&self, id: &[u8; 16]) {
        if self.inner.draining.load(Ordering::Acquire) {
            self.settle_near(id).await;
        }
    }

    /// Counts one request and slides the expiry.
    pub async fn touch(&self, id: &[u8; 16]) -> Result<Option<Session>> {
        let now = self.now()?;
        // A draining node writes every use through, so the node that takes
        // the browser over next reads its count at once.
        let draining = self.inner.draining.load(Ordering::Acquire);
        let near = if draining {
            self.settle_near(id).await;
            None
        } else {
            if let Some(s) = self.near().and_then(|near| near.touch(id, now)) {
                self.settle_if_draining(id).await;
                return Ok(Some(s));
            }
            self.inner.near.as_deref()
        };
        let mut may_restore = true;
        loop {
            let sent = match self
                .on_redis("touch", Some(id), |r, seq| async move {
                    match near {
                        Some(near) => r.touch_and_cache(near, id, now).await,
                        None => r.touch(id, now, seq).await,
                    }
                })
                .await?
            {
                Answer::Redis(Some(s)) => {
                    self.mirror("touch", |m| m.mirror_touch(s.clone()));
                    if near.is_some() {
                        self.settle_if_draining(id).await;
                    }
                    return Ok(Some(s));
                }
                Answer::Redis(None) => {
                    if std::mem::take(&mut may_restore) && self.restored_after_loss(id, now).await?
                    {
                        continue;
                    }
                    return Ok(None);
                }
                Answer::Corrupt => return Ok(None),
                Answer::Fallback { sent } => sent,
            };
            let Some(_gate) = self.fallback_gate().await else {
                continue;
            };
            return match self.inner.sled.touch(id, now, self.journal(sent))? {
                Some(s) => Ok(Some(s)),
                None => self.missing(id, None),
            };
        }
    }

    /// Redis does not have a session the request names. Usually it expired
    /// or was deleted (the mirror's copy is dropped: `Ok(false)`); but if the
    /// mirror holds a live copy and Redis lost its data (its epoch changed),
    /// the copy is written back, a re-seed of the whole mirror is asked for,
    /// and `Ok(true)` tells the caller to try again. When Redis cannot say,
    /// the answer is an error (503) and the copy is kept.
    async fn restored_after_loss(&self, id: &[u8; 16], now: u64) -> Result<bool> {
        let sled = &self.inner.sled;
        let held = sled.get(id, now).is_some() && !sled.is_deleted(id);
        let Some(redis) = self.inner.redis.as_ref().filter(|_| held) else {
            self.mirror("miss", |m| m.mirror_forget(id).map(|_| ()));
            return Ok(false);
        };
        let unavailable = |e: StoreError| {
            StoreError::Unavailable(format!("checking whether redis lost the session: {e}"))
        };
        if !self.redis_lost_data(redis).await.map_err(unavailable)? {
            self.mirror("miss", |m| m.mirror_forget(id).map(|_| ()));
            return Ok(false);
        }
        self.inner.reseed_wanted.store(true, Ordering::Release);
        let (copy, _) = sled.snapshot_for_restore(id, now)?;
        if let Some(copy) = copy {
            redis.restore(&copy, 0).await.map_err(unavailable)?;
        }
        Ok(true)
    }

    pub async fn patch(
        &self,
        id: &[u8; 16],
        patch: &Patch,
        if_match: Option<u64>,
    ) -> Result<PatchOutcome> {
        let now = self.now()?;
        let mut may_restore = true;
        // Counts not yet written land first: a PATCH carries a later
        // operation id, and one that lands before them would make Redis
        // skip them if they are ever replayed.
        self.settle_near(id).await;
        loop {
            let answer = self
                .on_redis("patch", Some(id), |r, seq| async move {
                    r.patch(id, patch, if_match, now, seq).await
                })
                .await?;
            // A fill racing the change may have stored the old copy.
            self.forget_near(id);
            let sent = match answer {
                Answer::Redis(PatchOutcome::NotFound) => {
                    if std::mem::take(&mut may_restore) && self.restored_after_loss(id, now).await?
                    {
                        continue;
                    }
                    return Ok(PatchOutcome::NotFound);
                }
                Answer::Redis(mut outcome) => {
                    if let PatchOutcome::Updated(s) = &mut outcome {
                        self.mirror("patch", |m| m.mirror_put(s));
                        // Uses this node counted and has not written yet.
                        if let Some(near) = &self.inner.near {
                            s.request_count += near.pending_count(id);
                        }
                    }
                    return Ok(outcome);
                }
                Answer::Corrupt => return Ok(PatchOutcome::NotFound),
                Answer::Fallback { sent } => sent,
            };
            let Some(_gate) = self.fallback_gate().await else {
                continue;
            };
            let outcome = self
                .inner
                .sled
                .patch(id, patch, if_match, now, self.journal(sent))?;
            return match outcome {
                PatchOutcome::Updated(ref s) => {
                    if patch.user_id.is_some() {
                        self.keep_user_bounded(&s.user_id, now, self.journal(None))?;
                    }
                    self.inner.sled.durable().await?;
                    Ok(outcome)
                }
                PatchOutcome::NotFound => self.missing(id, PatchOutcome::NotFound),
                PatchOutcome::VersionMismatch { .. } => Ok(outcome),
            };
        }
    }

    /// Keeps a user at `max_sessions_per_user` in the local store (Redis
    /// does the same in its scripts).
    fn keep_user_bounded(&self, user: &str, now: u64, journal: Journal) -> Result<()> {
        if user != crate::session::ANONYMOUS {
            self.inner
                .sled
                .evict_oldest(user, self.inner.max_per_user, now, journal)?;
        }
        Ok(())
    }

    /// Deletes a session: at once in Redis mode; in fallback journaled (held
    /// here or not) and applied with a tombstone when Redis returns.
    pub async fn delete(&self, id: &[u8; 16]) -> Result<Deleted> {
        let now = now_ms();
        if let Some(near) = &self.inner.near {
            // Counts of a session about to go are moot.
            near.take_pending_of(id);
            near.invalidate(id);
        }
        loop {
            let answer = self
                .on_redis("delete", Some(id), |r, _| async move { r.delete(id).await })
                .await?;
            self.forget_near(id);
            match answer {
                Answer::Redis(existed) => {
                    self.mirror("delete", |m| m.mirror_deleted(id).map(|_| ()));
                    self.mirror_durable("deletion").await;
                    return Ok(Deleted::Now(u64::from(existed)));
                }
                Answer::Corrupt => return Ok(Deleted::Now(1)),
                Answer::Fallback { .. } => {}
            }
            let Some(_gate) = self.fallback_gate().await else {
                continue;
            };
            let held = self.inner.sled.delete(id, now, self.journal(None))?;
            self.inner.sled.durable().await?;
            return Ok(match self.inner.redis {
                Some(_) => Deleted::Accepted {
                    held: u64::from(held),
                },
                None => Deleted::Now(u64::from(held)),
            });
        }
    }

    /// New id, same data, old id gone.
    pub async fn rotate(&self, id: &[u8; 16]) -> Result<Option<Session>> {
        let now = self.now()?;
        // Chosen once, so that if Redis applied the rotation before timing
        // out, the fallback path and the later replay agree on the new id.
        let new_id = *uuid::Uuid::new_v4().as_bytes();
        let mut may_restore = true;
        self.settle_near(id).await;
        loop {
            let new = &new_id;
            let answer = self
                .on_redis(
                    "rotate",
                    Some(id),
                    |r, _| async move { r.rotate(id, new).await },
                )
                .await?;
            self.forget_near(id);
            match answer {
                Answer::Redis(None) => {
                    if std::mem::take(&mut may_restore) && self.restored_after_loss(id, now).await?
                    {
                        continue;
                    }
                    return Ok(None);
                }
                Answer::Redis(Some(moved)) => {
                    // Uses counted while the rotation was on its way belong
                    // to the new id.
                    if let Some(near) = &self.inner.near {
                        if let Some(p) = near.take_pending_of(id) {
                            near.restore_pending(&moved.id, p);
                        }
                    }
                    self.mirror("rotate", |m| {
                        m.mirror_deleted(id)?;
                        m.mirror_put(&moved)
                    });
                    self.mirror_durable("rotation").await;
                    return Ok(Some(moved));
                }
                Answer::Corrupt => return Ok(None),
                Answer::Fallback { .. } => {}
            }
            let Some(_gate) = self.fallback_gate().await else {
                continue;
            };
            let moved = self
                .inner
                .sled
                .rotate(id, new_id, now, self.journal(None))?;
            return match moved {
                Some(s) => {
                    self.inner.sled.durable().await?;
                    Ok(Some(s))
                }
                None => self.missing(id, None),
            };
        }
    }

    /// One page of a user's live sessions, oldest first, and the offset of
    /// the next page: everyone's in Redis mode, this node's view in fallback.
    pub async fn list_user(
        &self,
        user: &str,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<Session>, Option<u64>)> {
        let now = now_ms();
        if user == crate::session::ANONYMOUS {
            return Ok((Vec::new(), None));
        }
        match self
            .on_redis("list_user", None, |r, _| async move {
                r.list_user(user, now, offset, limit).await
            })
            .await?
        {
            Answer::Redis(page) => Ok(page),
            Answer::Corrupt | Answer::Fallback { .. } => {
                Ok(self.inner.sled.list_user_page(user, now, offset, limit))
            }
        }
    }

    /// Logs a user out everywhere: at once in Redis mode; in fallback the
    /// sessions held here at once and the rest, journaled, when Redis returns.
    pub async fn delete_user(&self, user: &str) -> Result<Deleted> {
        let now = now_ms();
        // Anonymous sessions are nobody's: they are not indexed, and a
        // log-out time for "anonymous" would drop every anonymous session a
        // replay or a re-seed brings back.
        if user == crate::session::ANONYMOUS {
            return Ok(Deleted::Now(0));
        }
        loop {
            match self
                .on_redis("delete_user", None, |r, _| async move {
                    r.delete_user(user, now).await
                })
                .await?
            {
                Answer::Redis(ids) => {
                    ids.iter().for_each(|id| self.forget_near(id));
                    let sled = &self.inner.sled;
                    for id in sled.user_session_ids(user).iter().chain(ids.iter()) {
                        self.mirror("delete_user", |m| m.mirror_deleted(id).map(|_| ()));
                    }
                    self.mirror_durable("logout").await;
                    return Ok(Deleted::Now(ids.len() as u64));
                }
                Answer::Corrupt | Answer::Fallback { .. } => {}
            }
            let Some(_gate) = self.fallback_gate().await else {
                continue;
            };
            let held = self.inner.sled.delete_user(user, now, self.journal(None))?;
            self.inner.sled.durable().await?;
            return Ok(match self.inner.redis {
                Some(_) => Deleted::Accepted { held },
                None => Deleted::Now(held),
            });
        }
    }

    /// The stored-session count `status` reports, without the rest.
    fn status_sessions(&self) -> u64 {
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
            reconciliations: self.inner.reconciliations.load(Ordering::Relaxed),
            replayed_ops: self.inner.replayed.load(Ordering::Relaxed),
            replay_dropped: self.inner.replay_dropped.load(Ordering::Relaxed),
            deletions_heard: self.inner.deletions_heard.load(Ordering::Relaxed),
            corrupt_records: sled.corrupt_records()
                + self
                    .inner
                    .redis
                    .as_ref()
                    .map_or(0, RedisStore::corrupt_records),
            journal_bytes: sled.journal_bytes(),
            touches_unjournaled: sled.touches_unjournaled(),
            degraded: unready.clone().or_else(|| config_error.clone()),
            unready,
            redis_config_error: config_error.is_some(),
            near: self.inner.near.as_ref().map(|n| n.stats()),
        }
    }

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

    /// Background upkeep: the expiry sweeps, the journaling of coalesced
    /// fallback touches and the lazy flush. Returns once `shutdown` fires.
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
            if self.inner.sled.needs_reopen() {
                // A failed flush: sled refuses writes until reopened. Try
                // once a tick; it succeeds once the disk takes writes again.
                let sled = self.inner.sled.clone();
                match tokio::task::spawn_blocking(move || sled.reopen()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "local store not reopened yet"),
                    Err(e) => tracing::error!(error = %e, "reopening the local store panicked"),
                }
                continue;
            }
            if rounds % 2 == 0 {
                let sled = self.inner.sled.clone();
                let removed = tokio::task::spawn_blocking(move || {
                    let now = now_ms();
                    sled.sweep(now, 1_000) + sled.sweep_tombstones(now, 1_000)
                })
                .await
                .unwrap_or(0);
                if removed > 0 {
                    tracing::debug!(removed, "swept expired sessions and deletion records");
                }
            }
            if let Err(e) = self.inner.sled.flush_pending_touches() {
                tracing::warn!(error = %e, "journaling fallback touches failed");
            }
            if let Err(e) = self.inner.sled.flush_lazy().await {
                tracing::warn!(error = %e, "lazy flush failed");
            }
        }
    }

    /// Redis upkeep while the node runs: the probe that notices Redis coming
    /// back, the journal replay, the re-seed of an emptied Redis, the
    /// deletion feed into the mirror, and the cached active-session count.
    /// Returns once `shutdown` fires and everything it started has ended.
    pub async fn run_background(self, shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(redis) = self.inner.redis.clone() else {
            return;
        };
        tokio::join!(
            self.clone()
                .follow_deletions(redis.clone(), shutdown.clone()),
            self.clone().near_link_loop(redis.clone(), shutdown.clone()),
            self.clone().write_behind_loop(shutdown.clone()),
            self.probe_loop(redis, shutdown),
        );
    }

    /// Keeps the near cache's tracking connection up while in Redis mode:
    /// opens it, checks it answers every 250 ms, and drops it (bypassing
    /// the cache) in fallback.
    async fn near_link_loop(
        self,
        redis: RedisStore,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some(near) = self.inner.near.clone() else {
            return;
        };
        let mut last_check = std::time::Instant::now();
        let mut last_failure = String::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.changed() => {
                    redis.close_tracking(&near);
                    return;
                }
            }
            if self.mode() != Mode::Redis || self.inner.draining.load(Ordering::Acquire) {
                if near.is_up() {
                    redis.close_tracking(&near);
                }
                continue;
            }
            if !near.is_up() {
                match redis.open_tracking(&near).await {
                    Ok(()) => {
                        last_failure.clear();
                        tracing::debug!("near cache up");
                    }
                    Err(e) => {
                        let why = e.to_string();
                        if why != last_failure {
                            tracing::warn!(error = %why, "near cache unavailable; touches go to redis");
                            last_failure = why;
                        }
                    }
                }
                last_check = std::time::Instant::now();
            } else if last_check.elapsed() >= Duration::from_millis(250) {
                redis.check_tracking(&near).await;
                last_check = std::time::Instant::now();
            }
        }
    }

    /// Writes the near cache's counts behind every `touch_flush_ms`, and a
    /// last time on shutdown.
    async fn write_behind_loop(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(near) = self.inner.near.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(self.inner.touch_flush);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.changed() => true,
            };
            let _flush = self.inner.flush_lock.lock().await;
            let taken = near.take_pending();
            if !taken.is_empty() {
                self.write_behind(&near, taken).await;
            }
            if last {
                return;
            }
        }
    }

    /// Writes counts to Redis, one touch per session, pipelined in chunks;
    /// what Redis may not have applied is journaled under the id its call
    /// carried (exactly once on replay), and the rest, in fallback, is
    /// journaled as fallback touches. Called with `flush_lock` held.
    async fn write_behind(&self, near: &NearCache, taken: Vec<([u8; 16], super::near::Pending)>) {
        /// Sessions per pipelined round trip: a few milliseconds of Redis.
        const CHUNK: usize = 256;
        let ids: Vec<[u8; 16]> = taken.iter().map(|(id, _)| *id).collect();
        let redis = match &self.inner.redis {
            Some(r) if self.mode() == Mode::Redis => r,
            _ => {
                for (id, p) in taken {
                    self.inner.sled.add_pending_touches(&id, p.count, p.at);
                }
                near.landed(&ids);
                return;
            }
        };
        let mut batch = Vec::with_capacity(taken.len());
        for (id, pending) in taken {
            match self.inner.sled.next_seq() {
                Ok(seq) => batch.push(Flush { id, pending, seq }),
                Err(e) => {
                    tracing::warn!(error = %e, "no operation id for a write-behind count; kept for the next flush");
                    near.restore_pending(&id, pending);
                }
            }
        }
        // The copies the mirror gets, taken now: a failure below empties
        // the cache.
        let mut copies: Vec<Option<Session>> = batch.iter().map(|f| near.copy(&f.id)).collect();
        let mut failed: Option<usize> = None;
        for (n, chunk) in batch.chunks(CHUNK).enumerate() {
            let tracked = near.is_up();
            let mut flushed = redis.flush_touches(chunk, near, false).await;
            if flushed.is_err() && tracked {
                // The cache's connection failed (and is closed now), the
                // main one may not have: the same counts under the same ids
                // once more over it, as a replay, so none counts twice.
                flushed = redis.flush_touches(chunk, near, true).await;
            }
            match flushed {
                Ok(results) => {
                    for (i, (f, result)) in chunk.iter().zip(results).enumerate() {
                        match result {
                            Flushed::Counted => {
                                if let Some(copy) = copies[n * CHUNK + i].take() {
                                    self.mirror("touch", |m| m.mirror_touch(copy));
                                }
                            }
                            Flushed::Gone | Flushed::Corrupt => near.invalidate(&f.id),
                        }
                    }
                }
                Err(e) => {
                    self.redis_failed("touch write-behind", &e);
                    failed = Some(n * CHUNK);
                    break;
                }
            }
        }
        if let Some(from) = failed {
            for (i, f) in batch.iter().enumerate().skip(from) {
                if let Some(copy) = copies[i].take() {
                    self.mirror("touch", |m| m.mirror_touch(copy));
                }
                let Flush { id, pending, seq } = *f;
                if let Err(e) =
                    self.inner
                        .sled
                        .journal_touches_at(&id, pending.count, pending.at, seq)
                {
                    tracing::error!(error = %e, "journaling write-behind counts failed; they are lost");
                }
            }
        }
        near.landed(&ids);
    }

    async fn probe_loop(self, redis: RedisStore, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let (first_delay, max_delay) = redis.probe_delays();
        let mut delay = first_delay;
        let mut last_refresh = std::time::Instant::now() - Duration::from_secs(60);
        // The probe's last failure: a new reason (refused, timed out, wrong
        // password...) is logged once as a warning, repeats only at debug.
        let mut last_failure = String::new();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let redis_mode = self.inner.redis_mode.load(Ordering::Acquire);
            let pending = self.inner.sled.journal_len();
            if !redis_mode || pending > 0 {
                match redis.ping().await {
                    Ok(()) => {
                        self.inner.redis_reachable.store(true, Ordering::Release);
                        self.set_config_error(None);
                        last_failure.clear();
                        delay = first_delay;
                        let synced = match self.reconcile(&redis, &shutdown).await {
                            Ok(()) => self.sync_epoch(&redis, &shutdown).await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = synced {
                            tracing::warn!(error = %e, "journal replay interrupted; will retry");
                            self.inner.redis_reachable.store(false, Ordering::Release);
                        }
                    }
                    Err(StoreError::RedisConfig(why)) => {
                        // Not an outage: it will not pass by itself. Said at
                        // ERROR every time the probe meets it (at most every
                        // `redis_probe_max_ms`), until it is fixed.
                        self.inner.redis_reachable.store(false, Ordering::Release);
                        tracing::error!(error = %why, "redis refuses this node's credentials or database: fix redis_url; serving from sled meanwhile");
                        self.set_config_error(Some(why));
                        delay = (delay * 2).min(max_delay);
                    }
                    Err(e) => {
                        self.inner.redis_reachable.store(false, Ordering::Release);
                        self.set_config_error(None);
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
                let reseed = self.inner.reseed_wanted.load(Ordering::Acquire);
                if reseed || last_refresh.elapsed() >= Duration::from_secs(1) {
                    last_refresh = std::time::Instant::now();
                    // Doubles as the health check of an idle node: a node
                    // that serves nothing still notices Redis going away,
                    // or coming back empty.
                    let checked = match redis.refresh_active(now_ms()).await {
                        Ok(()) => self.sync_epoch(&redis, &shutdown).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = checked {
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

    fn set_config_error(&self, why: Option<String>) {
        *self
            .inner
            .redis_config_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// Whether Redis lost its data since this node last synchronised: its
    /// epoch is not the one this node remembers (a fresh one is set when
    /// Redis holds none).
    async fn redis_lost_data(&self, redis: &RedisStore) -> Result<bool> {
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
    async fn sync_epoch(
        &self,
        redis: &RedisStore,
        shutdown: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        let sled = &self.inner.sled;
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        let current = redis.epoch(&fresh).await?;
        if sled.redis_epoch().as_deref() == Some(current.as_str()) {
            self.inner.reseed_wanted.store(false, Ordering::Release);
            return Ok(());
        }
        let started = std::time::Instant::now();
        let (mut after, mut written) = (None, 0u64);
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let now = now_ms();
            let (live, next) = sled.sessions_page(after, self.inner.replay_batch, now);
            let batch: Vec<Session> = live
                .into_iter()
                .filter(|s| !sled.is_deleted(&s.id))
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
        self.inner.reseed_wanted.store(false, Ordering::Release);
        if written > 0 {
            tracing::warn!(
                restored = written,
                took_ms = started.elapsed().as_millis() as u64,
                "redis had lost sessions this node holds; re-seeded them from the mirror"
            );
        }
        Ok(())
    }

    /// Replays the journal into Redis, oldest first, then returns to Redis
    /// mode once it is empty. Requests keep being served (from sled, and
    /// journaled) while it runs; a shutdown stops it between batches.
    ///
    /// A batch is the journal's head, pipelined; Redis applies it as a chain
    /// that stops at the first entry it cannot apply (see the Redis store),
    /// and the next attempt starts again from there, so nothing lands out of
    /// order. Every entry's id makes a repeated one a no-op.
    async fn reconcile(
        &self,
        redis: &RedisStore,
        shutdown: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
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
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let batch = sled.journal_head(self.inner.replay_batch);
            if batch.is_empty() {
                let _gate = self.inner.switch.write().await;
                sled.flush_pending_touches()?;
                if sled.journal_len() > 0 {
                    if sled.journal_head(1).is_empty() {
                        // The counter is off (no fallback write is in flight
                        // under the gate): trust the tree.
                        sled.recount_journal();
                    }
                    continue;
                }
                if !self.inner.redis_mode.swap(true, Ordering::AcqRel) {
                    // Only a return from a real outage is a reconciliation;
                    // a start with nothing to replay is just a start.
                    if replayed > 0 || self.inner.failovers.load(Ordering::Relaxed) > 0 {
                        self.inner.reconciliations.fetch_add(1, Ordering::Relaxed);
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
                        self.inner.replay_dropped.fetch_add(1, Ordering::Relaxed);
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
                    .rejections
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(seq);
                sled.journal_remove(*seq)?;
                replayed += 1;
                self.inner.replayed.fetch_add(1, Ordering::Relaxed);
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
            match redis.restore(&copy, upto).await? {
                CreateReply::Created => {
                    restored.insert(target, upto);
                }
                // Another node restored its own copy meanwhile: replay this
                // node's entries onto it, from the next attempt on.
                CreateReply::Exists => {
                    return Err(StoreError::Redis(
                        "the session was restored meanwhile; replaying onto it".into(),
                    ))
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

    /// Keeps the mirror free of sessions deleted or rotated on other nodes.
    async fn follow_deletions(
        self,
        redis: RedisStore,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let sled = self.inner.sled.clone();
        let heard = self.inner.deletions_heard.clone();
        loop {
            let follow = redis.follow_deletions(|id| {
                heard.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = sled.deleted_elsewhere(&id) {
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

    /// Shutdown begins: the counts the near cache holds are written now,
    /// and from here every use is written through to Redis while in-flight
    /// requests finish, so a browser that moves to another node sees its
    /// count there at once.
    pub async fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
        // While the copies are still there: the mirror gets them.
        self.flush_near().await;
        if let (Some(near), Some(redis)) = (&self.inner.near, &self.inner.redis) {
            // also voids a connection being opened right now
            redis.close_tracking(near);
        }
    }

    /// Writes every count the near cache holds now, without waiting for
    /// the next tick.
    async fn flush_near(&self) {
        if let Some(near) = &self.inner.near {
            let _flush = self.inner.flush_lock.lock().await;
            let taken = near.take_pending();
            if !taken.is_empty() {
                self.write_behind(near, taken).await;
            }
        }
    }

    /// Flushes everything; called on shutdown, after every background task
    /// has returned and the last request was answered: the near cache's
    /// last counts go to Redis (or the journal), then the disk is flushed.
    pub async fn close(&self) -> Result<()> {
        if self.inner.near.is_some() {
            self.flush_near().await;
            self.inner.sled.flush_pending_touches()?;
        }
        self.inner.sled.close().await
    }
}

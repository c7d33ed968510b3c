//! The Redis-first routing every operation of the [`Store`] takes, and the
//! fault rules it keeps.
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
//! touches reach it lazily (synced every 5 s, touches batched per
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
//! - every operation carries an id that Redis records atomically with it,
//!   and every path (live, written behind, replayed) refuses one already
//!   applied, so an operation applies at most once however late a copy of
//!   it arrives (see `redis::inflight`).
//!
//! This room holds the route itself (`Store::on_redis` and what goes with
//! it: the fallback gate, the mirror writes, the switch to fallback); the
//! operations that take it are in `ops`.

use super::local::{Journal, SledStore};
use super::{Mode, RedisStore, Result, Store, StoreError};
use crate::session::now_ms;
use std::sync::atomic::Ordering;

/// An operation id in flight: settled when dropped, or held in doubt.
struct OpTicket<'a> {
    redis: &'a RedisStore,
    seq: u64,
    doubt: bool,
}

impl Drop for OpTicket<'_> {
    fn drop(&mut self) {
        if self.doubt {
            self.redis.doubt_op(self.seq);
        } else {
            self.redis.settle_op(self.seq);
        }
    }
}

/// What Redis said to one operation.
pub(super) enum Answer<T> {
    /// Redis applied it (or answered it): this is the result.
    Redis(T),
    /// The record Redis holds is corrupt: the session is absent.
    Corrupt,
    /// Not in Redis mode, or Redis failed just now (then `sent` is the id the
    /// call carried: Redis may have applied it, and the journal entry must
    /// reuse it).
    Fallback { sent: Option<u64> },
}

impl Store {
    /// The time for an operation that writes times; refused while the clock
    /// is not sane.
    pub(super) fn now(&self) -> Result<u64> {
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
    pub(super) fn journal(&self, sent: Option<u64>) -> Journal {
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
    pub(super) async fn on_redis<T, Fut>(
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
        // Entered among the ids in flight (see `redis::inflight`): settled
        // on any answer, held in doubt on a failure until the replay; a
        // request dropped mid-call settles it (nothing resends that id).
        let seq = redis.draw_op(|| self.inner.sled.next_seq())?;
        let mut ticket = OpTicket {
            redis: &redis,
            seq,
            doubt: false,
        };
        let result = op(redis.clone(), seq).await;
        ticket.doubt = matches!(
            result,
            Err(ref e) if !matches!(e, StoreError::Input(_) | StoreError::CorruptRecord(_))
        );
        drop(ticket);
        match result {
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
    pub(super) async fn fallback_gate(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        let gate = self.inner.switch.read().await;
        (self.mode() == Mode::Sled || self.inner.redis.is_none()).then_some(gate)
    }

    /// A mirror write in Redis mode: Redis holds the truth, so a failure is
    /// logged, never the request's error.
    pub(super) fn mirror(&self, what: &str, write: impl FnOnce(&SledStore) -> Result<()>) {
        if let Err(e) = write(&self.inner.sled) {
            tracing::warn!(operation = what, error = %e, "mirror write failed; redis holds the change");
        }
    }

    /// Flushes a mirror change Redis already applied, for at most the store
    /// timeout: a stalled disk must not turn it into an error, nor hold the
    /// answer.
    pub(super) async fn mirror_durable(&self, what: &str) {
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
    pub(super) fn missing<T>(&self, id: &[u8; 16], absent: T) -> Result<T> {
        if self.inner.redis.is_some() && !self.inner.sled.is_deleted(id) {
            Err(StoreError::NotHeld)
        } else {
            Ok(absent)
        }
    }

    /// Records that Redis failed an operation and switches to fallback.
    pub(super) fn redis_failed(&self, what: &str, err: &StoreError) {
        self.inner.redis_reachable.store(false, Ordering::Release);
        if self.inner.redis_mode.swap(false, Ordering::AcqRel) {
            // The near cache's copies are not served in fallback, and may be
            // stale when Redis returns; its counts not yet written go to the
            // journal (coalesced, before any later entry of their session),
            // its copies of them to the mirror.
            self.near_failed_over();
            // The mirror must hold the latest touches before it serves.
            if let Err(e) = self.inner.sled.flush_touched() {
                tracing::error!(error = %e, "writing buffered touches to the mirror failed");
            }
            self.inner.failovers.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(operation = what, error = %err, "redis unavailable; switching to the local sled store");
        }
    }
}

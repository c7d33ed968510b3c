//! The operations of the [`Store`], each on the Redis-first route (see
//! `route`): create, touch, patch, delete, rotate, a user's sessions and
//! logging a user out everywhere. What each does with the near cache goes
//! through the near module (`near::serve`), which alone holds it.

use super::local::Journal;
use super::route::Answer;
use super::{Deleted, PatchOutcome, Result, Store, StoreError};
use crate::session::{now_ms, Patch, Session};
use std::sync::atomic::Ordering;

/// How a touch the near cache cannot answer reaches Redis.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Uncached {
    /// Read over the tracking connection and kept (a session used again
    /// soon, see `near::admit`); counted behind.
    Fill,
    /// Read with one plain `HGETALL`, not kept; counted behind.
    ReadThrough,
    /// Counted in Redis before the answer (no near cache, or a draining
    /// node, whose counts the next node must read at once).
    CountNow,
}

impl Store {
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
                    // a sync per create. (Buffering creates with the touches,
                    // written every 5 s, took a create from ~1.2 KB to
                    // 0.7-1 KB written, but the node's RSS up 6-10 MB while
                    // creating 100 000 sessions: its memory bound first.)
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

    /// Counts one request and slides the expiry.
    pub async fn touch(&self, id: &[u8; 16]) -> Result<Option<Session>> {
        let now = self.now()?;
        // A draining node writes every use through, so the node that takes
        // the browser over next reads its count at once.
        let draining = self.inner.draining.load(Ordering::Acquire);
        let way = if draining {
            self.settle_near(id).await;
            Uncached::CountNow
        } else {
            if let Some(s) = self.near_hit(id, now) {
                self.settle_if_draining(id).await;
                return Ok(Some(s));
            }
            match (self.inner.near.is_some(), self.near_admits(id, now)) {
                (false, _) => Uncached::CountNow,
                (true, true) => Uncached::Fill,
                (true, false) => Uncached::ReadThrough,
            }
        };
        let mut may_restore = true;
        loop {
            let sent = match self
                .on_redis("touch", Some(id), |r, seq| async move {
                    match way {
                        Uncached::Fill => self.near_fill(&r, id, now).await,
                        Uncached::ReadThrough => self.near_read_through(&r, id, now).await,
                        Uncached::CountNow => r.touch(id, now, seq).await,
                    }
                })
                .await?
            {
                Answer::Redis(Some(s)) => {
                    self.mirror("touch", |m| m.mirror_touch(s.clone()));
                    if way != Uncached::CountNow {
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
        // A copy still buffered (created or used in the last 5 s) is held;
        // a mirror that cannot be read is an error (503), not a miss.
        sled.land_buffered(id)?;
        let held = sled.get(id, now)?.is_some() && !sled.is_deleted(id);
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
        self.inner
            .replay
            .reseed_wanted
            .store(true, Ordering::Release);
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
                        s.request_count += self.near_unwritten(id);
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
    pub(super) fn keep_user_bounded(&self, user: &str, now: u64, journal: Journal) -> Result<()> {
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
        // Counts of a session about to go are moot.
        self.near_dropped(id);
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
                    self.near_moved(id, &moved.id);
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
                self.inner.sled.list_user_page(user, now, offset, limit)
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
                    // Redis did it; a mirror that cannot be read now is
                    // left to the deletion feed.
                    let held = sled.user_session_ids(user).unwrap_or_default();
                    for id in held.iter().chain(ids.iter()) {
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
}

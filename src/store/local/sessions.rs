//! Session operations on the local disk: what the HTTP layer asks of a
//! session (create, touch, read, PATCH, delete, rotate, list, evict), each
//! one a decision handed to `SledStore::modify` (see `change`), the one
//! place a session changes.

use super::change::Change;
use super::journal_ops::Op;
use super::{stripe, user_prefix, Journal, Result, SledStore, Trees};
use crate::disk::Space;
use crate::session::{Patch, Session};
use crate::store::{PatchOutcome, StoreError};
use std::sync::atomic::Ordering;

impl SledStore {
    /// Stores a new session. Durable after [`durable`](Self::durable).
    pub fn create(&self, session: &Session, journal: Journal) -> Result<()> {
        self.check_space(Space::Write)?;
        self.modify(&session.id, session.created_at, journal, |_| {
            let op = Some(Op::Create(session.clone()));
            Ok((Change::Put(session.clone()), (), op))
        })
    }

    /// Counts one request, slides the expiry and returns the session. The
    /// use is kept in memory and written to the uses' log by the lazy flush
    /// (see `uses`), not into the record: a touch lost to a crash costs one
    /// count, not a session.
    /// With [`Journal::Next`] the count is coalesced in memory and journaled
    /// by [`flush_pending_touches`](Self::flush_pending_touches). With the
    /// disk at its reserve, full or failing, the session is served as it is
    /// stored, uncounted (the count is in `touches_unjournaled`): a full
    /// disk never logs anyone out. Only a read that fails is an error (a
    /// disk fault, 503), never "absent".
    pub fn touch(&self, id: &[u8; 16], now: u64, journal: Journal) -> Result<Option<Session>> {
        let limits = self.inner.limits;
        if let Err(refused) = self.check_space(Space::Write) {
            // A stuck flush: reads may wait on it too; answer at once.
            if self.inner.db.flush_stuck_for().is_some() {
                return Err(refused);
            }
            self.inner
                .touches_unjournaled
                .fetch_add(1, Ordering::Relaxed);
            return self.get(id, now);
        }
        let coalesce = journal == Journal::Next;
        let touched = match self.modify(id, now, journal, |current| match current {
            None => Ok((Change::Keep, None, None)),
            Some(s) => {
                let mut s = s.clone();
                s.touch(now, &limits);
                let op = (!coalesce).then_some(Op::Touch { id: *id, at: now });
                Ok((Change::Use(s.clone()), Some(s), op))
            }
        }) {
            Ok(t) => t,
            // The disk filled between the check and the write (sled met
            // ENOSPC): served as stored, uncounted, as at the reserve.
            Err(StoreError::DiskNoSpace(_) | StoreError::DiskFull { .. }) => {
                self.inner
                    .touches_unjournaled
                    .fetch_add(1, Ordering::Relaxed);
                return self.get(id, now);
            }
            Err(e) => return Err(e),
        };
        if coalesce && touched.is_some() {
            let mut map = self.inner.pending_touches[stripe(id)]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let entry = map.entry(*id).or_insert((0, now));
            entry.0 += 1;
            entry.1 = entry.1.max(now);
        }
        Ok(touched)
    }

    /// Reads without counting (used for mirror restores and tests). A read
    /// that fails is a disk fault, never "absent".
    pub fn get(&self, id: &[u8; 16], now: u64) -> Result<Option<Session>> {
        Ok(self.load(id)?.filter(|s| !s.is_expired(now)))
    }

    pub fn patch(
        &self,
        id: &[u8; 16],
        patch: &Patch,
        if_match: Option<u64>,
        now: u64,
        journal: Journal,
    ) -> Result<PatchOutcome> {
        let limits = self.inner.limits;
        self.check_space(Space::Write)?;
        self.modify(id, now, journal, |current| {
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
            s.apply_patch(patch, now, &limits)?;
            let op = Some(Op::PatchAt {
                id: *id,
                patch: patch.clone(),
                at: now,
            });
            Ok((Change::Put(s.clone()), PatchOutcome::Updated(s), op))
        })
    }

    /// Deletes a session and remembers the deletion. Journaled whether or
    /// not this node holds the session: another node may, and the logout
    /// must reach Redis all the same. Returns whether it was held here.
    pub fn delete(&self, id: &[u8; 16], now: u64, journal: Journal) -> Result<bool> {
        self.check_space(Space::Release)?;
        let op = (journal != Journal::Off).then_some(Op::Delete { id: *id });
        self.modify(id, now, journal, |current| match current {
            None => Ok((Change::Tombstone, false, op)),
            Some(_) => Ok((Change::Remove, true, op)),
        })
    }

    /// Log-out-everywhere in fallback: deletes the user's sessions held here
    /// and journals one entry that deletes, in Redis, every session of the
    /// user created up to `now`. Returns how many were held here.
    pub fn delete_user(&self, user: &str, now: u64, journal: Journal) -> Result<u64> {
        self.check_space(Space::Release)?;
        let mut deleted = 0;
        for s in self.list_user(user, now)? {
            if self.delete(&s.id, now, Journal::Off)? {
                deleted += 1;
            }
        }
        if journal != Journal::Off {
            let op = Op::DeleteUser {
                user: user.to_string(),
                before: now,
            };
            self.journal_append(&op, None)?;
        }
        Ok(deleted)
    }

    /// Moves the session to `new_id` (chosen by the caller so a retry in
    /// another store reuses it) and bumps its version.
    pub fn rotate(
        &self,
        id: &[u8; 16],
        new_id: [u8; 16],
        now: u64,
        journal: Journal,
    ) -> Result<Option<Session>> {
        self.check_space(Space::Write)?;
        self.modify(id, now, journal, |current| match current {
            None => Ok((Change::Keep, None, None)),
            Some(s) => {
                let mut moved = s.clone();
                moved.id = new_id;
                moved.version += 1;
                let op = Some(Op::Rotate {
                    old: *id,
                    new: new_id,
                });
                Ok((Change::Move(moved.clone()), Some(moved), op))
            }
        })
    }

    /// Live sessions of one user (this node's view), oldest first.
    /// Anonymous sessions are not indexed: none are listed.
    pub fn list_user(&self, user: &str, now: u64) -> Result<Vec<Session>> {
        if user == crate::session::ANONYMOUS {
            return Ok(Vec::new());
        }
        let mut list = Vec::new();
        for id in self.user_session_ids(user)? {
            list.extend(self.get(&id, now)?.filter(|s| s.user_id == user));
        }
        // oldest first: by when each became the user's (created or logged
        // in), as Redis orders a user's index
        list.sort_by_key(|s| (s.born(), s.id));
        Ok(list)
    }

    /// One page of [`list_user`](Self::list_user) and the next offset.
    pub fn list_user_page(
        &self,
        user: &str,
        now: u64,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<Session>, Option<u64>)> {
        let all = self.list_user(user, now)?;
        let start = (offset as usize).min(all.len());
        let end = start.saturating_add(limit as usize).min(all.len());
        let next = (end < all.len()).then_some(end as u64);
        Ok((all[start..end].to_vec(), next))
    }

    /// Keeps `user` at `max` sessions: deletes the oldest beyond it (journaled
    /// as `journal` says). Returns how many were deleted.
    pub fn evict_oldest(&self, user: &str, max: u64, now: u64, journal: Journal) -> Result<u64> {
        // Every create asks. `list_user` reads only the sessions the user
        // index names (some stale), so at most `max` entries means at most
        // `max` sessions: nothing to evict, and no session need be read.
        // Reading them all on every create decoded each of the user's
        // sessions and pulled their leaf pages (scattered: ids are random)
        // through sled's cache, for nothing in the usual case.
        if self.user_session_ids(user)?.len() as u64 <= max {
            return Ok(0);
        }
        let list = self.list_user(user, now)?;
        let over = list.len().saturating_sub(max as usize);
        let mut evicted = 0;
        for s in list.iter().take(over) {
            if self.delete(&s.id, now, journal)? {
                evicted += 1;
            }
        }
        Ok(evicted)
    }

    /// Ids filed under a user; may include stale entries, callers re-check.
    pub fn user_session_ids(&self, user: &str) -> Result<Vec<[u8; 16]>> {
        let prefix = user_prefix(user);
        let mut ids = Vec::new();
        for k in self.t()?.by_user().scan_prefix(&prefix).keys() {
            let k = k.map_err(|e| self.failed(e))?;
            ids.extend(
                k.get(prefix.len()..)
                    .and_then(|id| <[u8; 16]>::try_from(id).ok()),
            );
        }
        Ok(ids)
    }
}

//! The one place a session changes on the local disk: under its stripe
//! lock, the stored copy is loaded (a buffered touch from Redis lands
//! first, an expired copy counts as absent), the caller decides, and the
//! decision is applied with the `by_user` and `by_expiry` indexes kept in
//! step and journaled as asked, its coalesced touches first.

use super::journal_ops::{self, Op};
use super::mirror::newest;
use super::{expiry_key, user_key, Journal, Result, SledStore, Trees};
use crate::session::{InputError, Session};
use crate::store::StoreError;
use std::sync::atomic::Ordering;

/// What a modification decided to do with the session it looked at.
pub(super) enum Change {
    Keep,
    Put(Session),
    /// A use: kept in memory and the uses' log, not in the record (see
    /// `uses`).
    Use(Session),
    Remove,
    /// Remove it if held, and record the deletion either way.
    Tombstone,
    /// Remove this id and store the session under its (new) id.
    Move(Session),
}

impl SledStore {
    /// The one place sessions change: lock, load (expired counts as absent and
    /// is removed), decide, apply with index upkeep, journal.
    /// `op` is journaled as `journal` says: its coalesced touches first, so
    /// the order per session holds. Creates, changes and rotations beyond the
    /// journal's budget are refused before anything changes.
    ///
    /// A disk error on the way is remembered by the database (it is dead
    /// until reopened: see [`crate::disk::Database::sled`]).
    pub(super) fn modify<R>(
        &self,
        id: &[u8; 16],
        now: u64,
        journal: Journal,
        decide: impl FnOnce(
            Option<&Session>,
        ) -> std::result::Result<(Change, R, Option<Op>), InputError>,
    ) -> Result<R> {
        self.modify_unnoted(id, now, journal, decide)
            .map_err(|e| self.noted(e))
    }

    fn modify_unnoted<R>(
        &self,
        id: &[u8; 16],
        now: u64,
        journal: Journal,
        decide: impl FnOnce(
            Option<&Session>,
        ) -> std::result::Result<(Change, R, Option<Op>), InputError>,
    ) -> Result<R> {
        let _guard = self.lock(id);
        let mut current = self.load(id)?;
        // A touch Redis answered and the lazy flush has not written yet is
        // the newest copy: it lands first, so whatever runs now (a fallback
        // write just after a failover, racing the flush) sees it.
        if let Some(buffered) = self.take_touched(id) {
            let merged = match &current {
                Some(c) => newest(&buffered, c),
                None => buffered,
            };
            self.put_locked(current.as_ref(), &merged)?;
            current = Some(merged);
        }
        if let Some(s) = &current {
            if now != 0 && s.is_expired(now) {
                self.remove_locked(s)?;
                current = None;
            }
        }
        let (change, reply, op) = decide(current.as_ref())?;
        let op = op.filter(|_| journal != Journal::Off);
        if let Some(op) = &op {
            let size = journal_ops::encode(op).len() as u64;
            if !matches!(op, Op::Delete { .. } | Op::Touch { .. })
                && self.journal_bytes() + size > self.inner.local.max_journal_bytes
            {
                return Err(StoreError::JournalFull(self.inner.local.max_journal_bytes));
            }
            self.journal_pending_touches_locked(id)?;
        }
        match change {
            Change::Keep => {}
            Change::Tombstone => {
                if let Some(old) = &current {
                    self.remove_locked(old)?;
                }
                self.t()?
                    .deleted()
                    .insert(id, &now_or_clock(now).to_be_bytes())?;
            }
            Change::Put(new) => self.put_locked(current.as_ref(), &new)?,
            Change::Use(new) => {
                if !self.note_use(&new) {
                    self.put_locked(current.as_ref(), &new)?;
                }
            }
            Change::Remove => {
                if let Some(old) = &current {
                    self.remove_locked(old)?;
                }
            }
            Change::Move(new) => {
                // The new id is fresh and unknown to anyone else, so it needs
                // no lock; write it before removing the old one so a crash in
                // between leaves both rather than neither.
                self.put_locked(None, &new)?;
                if let Some(old) = &current {
                    self.remove_locked(old)?;
                }
                self.t()?
                    .deleted()
                    .insert(id, &now_or_clock(now).to_be_bytes())?;
            }
        }
        if let Some(op) = op {
            let seq = match journal {
                Journal::At(seq) => Some(seq),
                _ => None,
            };
            if !self.journal_append(&op, seq)? {
                self.inner
                    .touches_unjournaled
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(reply)
    }

    pub(super) fn put_locked(&self, old: Option<&Session>, new: &Session) -> Result<()> {
        let inner = &self.inner;
        let t = self.t()?;
        if new.user_id != crate::session::ANONYMOUS
            && old.map(|o| o.user_id != new.user_id).unwrap_or(true)
        {
            t.by_user().insert(user_key(&new.user_id, &new.id), &[])?;
        }
        if old.map(|o| new.expires_at < o.expires_at).unwrap_or(true) {
            t.by_expiry()
                .insert(expiry_key(new.expires_at, &new.id), &[])?;
        }
        t.sessions().insert(new.id, new.encode())?;
        // The record now holds the use memory held (`old` was read with it).
        self.forget_use(&new.id);
        match old {
            None => {
                inner.active.fetch_add(1, Ordering::Relaxed);
            }
            Some(o) if o.user_id != new.user_id => {
                t.by_user().remove(user_key(&o.user_id, &o.id))?;
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Removes a record and its user index entry. Its expiry entry is left for
    /// the sweep, which drops entries whose record is gone.
    pub(super) fn remove_locked(&self, old: &Session) -> Result<()> {
        let t = self.t()?;
        t.sessions().remove(old.id)?;
        self.forget_use(&old.id);
        t.by_user().remove(user_key(&old.user_id, &old.id))?;
        self.inner.active.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The time to record a deletion at: the request's, or the clock's for
/// mirror maintenance (which passes 0).
fn now_or_clock(now: u64) -> u64 {
    if now == 0 {
        crate::session::now_ms()
    } else {
        now
    }
}

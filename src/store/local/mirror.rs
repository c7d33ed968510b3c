//! Redis mode's mirror: this node's copy of every session it served, kept
//! so a failover finds them on disk. Copies merge newest-wins ([`newest`]);
//! deletions heard from Redis are remembered for the sessions held here.
//!
//! Touches are written coarsely, to spare the SD card: rewriting a whole
//! record for every use cost ~1.4 KB of writes per use. A touch result from
//! Redis is written only when the mirror's copy would otherwise lag it: its
//! data changed (another version), or its expiry is more than `mirror_lag`
//! (`mirror_lag_secs`, at most a tenth of the TTL) behind Redis's, or the
//! copy is gone. What the mirror holds is remembered compactly in memory
//! ([`MirrorWritten`], 8 bytes of id and 8 of state per session) so the
//! check reads no disk. The bounds this gives (docs/failure-model.md):
//! - a session this node served is in the mirror with an expiry no earlier
//!   than what Redis last told this node minus `mirror_lag`;
//! - its count there includes every use this node answered more than
//!   `mirror_lag` plus one mirror flush (5 s) ago: expiry slides with each
//!   use, so a copy is rewritten at least every `mirror_lag` of use.
//!
//! Copies to write are buffered in memory and written by the housekeeping
//! flush every 5 s, at a failover at once (the hot path does no sled write).

use super::change::Change;
use super::{ids_in, stripe, Journal, Result, SledStore, Trees};
use crate::disk::Space;
use crate::session::{now_ms, Session};
use std::sync::atomic::Ordering;

/// Most buffered copies per stripe (4 096 in all, about 1 MB); past it a
/// copy is written through. Small on purpose: at the rates where it fills
/// (thousands of creates a second) the writes share flushes anyway, and a
/// larger buffer cost the node its memory bound (its maps and the heap
/// they fragment: RSS +15 MB while creating 100 000 sessions with 512).
const TOUCHED_PER_STRIPE: usize = 64;

/// What the mirror holds of one session, as far as a touch needs to know:
/// a lower bound on its stored expiry (whole seconds, rounded down) and
/// its version (low 32 bits: a change of data shows as a difference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MirrorWritten {
    expires_s: u32,
    version: u32,
}

impl MirrorWritten {
    fn of(s: &Session) -> MirrorWritten {
        MirrorWritten {
            expires_s: u32::try_from(s.expires_at / 1000).unwrap_or(u32::MAX),
            version: s.version as u32,
        }
    }

    /// Whether a copy holding this would serve `s` within the bounds: same
    /// data, alive now, and an expiry at most `lag_ms` short of `s`'s.
    fn covers(&self, s: &Session, lag_ms: u64, now: u64) -> bool {
        let stored = u64::from(self.expires_s) * 1000;
        self.version == s.version as u32
            && stored > now
            && stored.saturating_add(lag_ms) >= s.expires_at
    }
}

/// The compact key of a session id: ids are random (UUID v4), so 8 of
/// their bytes tell a node's sessions apart (two of a million sessions
/// share them with odds of about 1 in 36 million).
fn compact(id: &[u8; 16]) -> u64 {
    u64::from_le_bytes([id[8], id[9], id[10], id[11], id[12], id[13], id[14], id[15]])
}

impl SledStore {
    /// Stores a session as Redis returned it (newest wins against what the
    /// mirror and the touch buffer hold). Not flushed by itself.
    pub fn mirror_put(&self, session: &Session) -> Result<()> {
        self.check_space(Space::Write)?;
        let merged = self.modify(&session.id, 0, Journal::Off, |current| {
            let merged = match current {
                Some(c) => newest(session, c),
                None => session.clone(),
            };
            Ok((Change::Put(merged.clone()), merged, None))
        })?;
        self.note_written(&merged);
        Ok(())
    }

    /// Takes a touch result from Redis (or a session just created there)
    /// for the mirror: nothing to do when
    /// the mirror's copy is within its bounds of it (see the module doc),
    /// else buffered for the next flush (see `touched`).
    pub fn mirror_touch(&self, session: Session) -> Result<()> {
        let id = session.id;
        let lag = self.inner.mirror_lag_ms.load(Ordering::Relaxed);
        let mut written = self.inner.written[stripe(&id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if written
            .get(&compact(&id))
            .is_some_and(|w| w.covers(&session, lag, now_ms()))
        {
            drop(written);
            self.inner
                .mirror_touches_skipped
                .fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // Noted now: the copy lands at the next flush (or a failover's),
        // and until then the buffer holds it for anything that reads.
        written.insert(compact(&id), MirrorWritten::of(&session));
        drop(written);
        let mut map = self.inner.touched[stripe(&id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(prev) = map.get_mut(&id) {
            *prev = newest(&session, prev);
            return Ok(());
        }
        if map.len() < TOUCHED_PER_STRIPE {
            map.insert(id, session);
            return Ok(());
        }
        drop(map);
        self.land_touch(&id, Some(session))
    }

    /// Writes a session's buffered touch (and `extra`, a touch result the
    /// full buffer could not take) into the mirror, unless the copy on disk
    /// is within its bounds of it already (a session first touched since
    /// this node started, which the mirror held from before). Under the
    /// session's lock, like `modify`, which lands a buffered touch the same
    /// way before any other change.
    fn land_touch(&self, id: &[u8; 16], extra: Option<Session>) -> Result<()> {
        let _guard = self.lock(id);
        let touch = match (self.take_touched(id), extra) {
            (Some(a), Some(b)) => newest(&a, &b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return Ok(()),
        };
        let lag = self.inner.mirror_lag_ms.load(Ordering::Relaxed);
        let current = self.load(id)?;
        let landed = match current {
            Some(c) if MirrorWritten::of(&c).covers(&touch, lag, now_ms()) => c,
            Some(c) => {
                let merged = newest(&touch, &c);
                self.put_locked(Some(&c), &merged)?;
                merged
            }
            None => {
                self.put_locked(None, &touch)?;
                touch
            }
        };
        self.note_written(&landed);
        Ok(())
    }

    /// Whether the mirror holds a live copy of the session within its bounds
    /// (see the module doc), told from memory: a higher count Redis reports
    /// for it then reaches the disk with a later touch result, within the
    /// same lag, and the write-behind need not read the copy to raise it.
    /// Never with a lag of 0 (every count is written at once then).
    pub fn mirror_holds(&self, id: &[u8; 16]) -> bool {
        if self.inner.mirror_lag_ms.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let now_s = now_ms() / 1000;
        self.inner.written[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&compact(id))
            .is_some_and(|w| u64::from(w.expires_s) > now_s)
    }

    /// Writes a session's buffered copy, if any, into the mirror now (before
    /// the mirror is read for it).
    pub fn land_buffered(&self, id: &[u8; 16]) -> Result<()> {
        self.land_touch(id, None)
    }

    /// Remembers what the mirror now holds of a session.
    fn note_written(&self, s: &Session) {
        self.inner.written[stripe(&s.id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(compact(&s.id), MirrorWritten::of(s));
    }

    /// Forgets what the mirror holds of a session (it is gone from it).
    fn forget_written_of(&self, id: &[u8; 16]) {
        self.inner.written[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&compact(id));
    }

    /// Forgets what the mirror holds of every session: the next touch of
    /// each writes its copy (after a failed flush, or copies dropped).
    pub(super) fn forget_written(&self) {
        for shard in &self.inner.written {
            shard.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Touch results from Redis the mirror did not need to write.
    pub fn mirror_touches_skipped(&self) -> u64 {
        self.inner.mirror_touches_skipped.load(Ordering::Relaxed)
    }

    /// Sets how far the mirror's copy of a session may lag Redis's expiry
    /// (`mirror_lag_secs`); the configuration holds it to a tenth of the TTL.
    pub fn set_mirror_lag_ms(&self, lag_ms: u64) {
        self.inner.mirror_lag_ms.store(lag_ms, Ordering::Relaxed);
    }

    /// Writes every buffered touch into the mirror, and prunes one stripe
    /// of the compact record of expired sessions (all of it every 64
    /// flushes).
    pub fn flush_touched(&self) -> Result<()> {
        if self.check_space(Space::Write).is_err() {
            // The buffered copies are dropped, not written: the mirror is a
            // copy for outages, and the reserve is for what was acknowledged.
            for shard in &self.inner.touched {
                shard.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
            self.forget_written();
            return Ok(());
        }
        for shard in &self.inner.touched {
            for id in ids_in(shard) {
                self.land_touch(&id, None)?;
            }
            // A map keeps the room it once needed: given back.
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shrink_to(TOUCHED_PER_STRIPE / 4);
        }
        let cursor = self.inner.prune_cursor.fetch_add(1, Ordering::Relaxed);
        let now_s = now_ms() / 1000;
        self.inner.written[cursor % self.inner.written.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, w| u64::from(w.expires_s) > now_s);
        Ok(())
    }

    /// Removes a buffered touch; called under the session's stripe lock (by
    /// `modify`) so it orders with the mirror write that follows.
    pub(super) fn take_touched(&self, id: &[u8; 16]) -> Option<Session> {
        self.inner.touched[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Drops a session deleted or rotated away through this node, and
    /// remembers the deletion.
    pub fn mirror_deleted(&self, id: &[u8; 16]) -> Result<bool> {
        self.forget_written_of(id);
        self.modify(id, 0, Journal::Off, |current| {
            Ok((Change::Tombstone, current.is_some(), None))
        })
    }

    /// A deletion another node made (reported by Redis): remembered only for
    /// a session this node holds. The others it can neither serve nor
    /// re-seed, and a log-out-everywhere of a large user must not cost every
    /// node a disk write per session.
    pub fn deleted_elsewhere(&self, id: &[u8; 16]) -> Result<bool> {
        self.forget_written_of(id);
        self.modify(id, 0, Journal::Off, |current| {
            // held: in the mirror, or only in the buffer of touches not yet
            // written to it (`modify` has written that already)
            let held = current.is_some();
            Ok((
                if held {
                    Change::Tombstone
                } else {
                    Change::Keep
                },
                held,
                None,
            ))
        })
    }

    /// Drops a session Redis no longer holds (expired, or a corrupt record)
    /// without recording a deletion.
    pub fn mirror_forget(&self, id: &[u8; 16]) -> Result<bool> {
        self.forget_written_of(id);
        self.modify(id, 0, Journal::Off, |current| {
            let held = current.is_some();
            Ok((if held { Change::Remove } else { Change::Keep }, held, None))
        })
    }

    /// The live sessions among the next `batch` keys after `after` (for the
    /// re-seed of an emptied Redis), and the key the next page starts after
    /// (`None` at the end).
    pub fn sessions_page(
        &self,
        after: Option<[u8; 16]>,
        batch: usize,
        now: u64,
    ) -> Result<(Vec<Session>, Option<[u8; 16]>)> {
        let t = self.t()?;
        let iter = match after {
            Some(a) => t.sessions().range((
                std::ops::Bound::Excluded(a.to_vec()),
                std::ops::Bound::Unbounded,
            )),
            None => t.sessions().iter(),
        };
        let mut ids: Vec<[u8; 16]> = Vec::new();
        for k in iter.keys().take(batch) {
            let k = k.map_err(|e| self.failed(e))?;
            if let Ok(id) = <[u8; 16]>::try_from(k.as_ref()) {
                ids.push(id);
            }
        }
        let next = (ids.len() == batch).then(|| ids.last().copied()).flatten();
        let mut live = Vec::with_capacity(ids.len());
        for id in &ids {
            live.extend(self.get(id, now)?);
        }
        Ok((live, next))
    }

    /// The mirror's copy of a session and the journal position it includes,
    /// as one consistent snapshot (under the session's lock, after its
    /// coalesced touches, which the copy already counts, are journaled).
    pub fn snapshot_for_restore(&self, id: &[u8; 16], now: u64) -> Result<(Option<Session>, u64)> {
        let _guard = self.lock(id);
        self.journal_pending_touches_locked(id)?;
        Ok((self.get(id, now)?, self.journal_last_seq()?))
    }
}

/// Merges two copies of one session seen at different times: data from the
/// higher version, counters and times from whichever is further along.
pub(super) fn newest(a: &Session, b: &Session) -> Session {
    let mut out = if b.version > a.version {
        b.clone()
    } else {
        a.clone()
    };
    out.request_count = a.request_count.max(b.request_count);
    out.last_accessed = a.last_accessed.max(b.last_accessed);
    out.expires_at = a.expires_at.max(b.expires_at);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(version: u64, count: u64, accessed: u64, expires: u64, meta: &str) -> Session {
        Session {
            id: [1; 16],
            user_id: "u".into(),
            created_at: 1,
            last_accessed: accessed,
            expires_at: expires,
            request_count: count,
            version,
            metadata: meta.into(),
            login_at: 0,
        }
    }

    /// The mirror's merge rule: data (user, metadata) from the higher version,
    /// counters and times from whichever copy is further along, whichever
    /// order the copies arrive in.
    #[test]
    fn the_mirror_merges_data_by_version_and_counters_by_maximum() {
        let patched = session(3, 5, 100, 1_000, r#"{"new":1}"#);
        let touched = session(2, 9, 200, 2_000, r#"{"old":1}"#);
        for merged in [newest(&patched, &touched), newest(&touched, &patched)] {
            assert_eq!(merged.version, 3);
            assert_eq!(merged.metadata, r#"{"new":1}"#);
            assert_eq!(merged.request_count, 9);
            assert_eq!(merged.last_accessed, 200);
            assert_eq!(merged.expires_at, 2_000);
        }
    }

    fn open(ttl_ms: u64) -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let local = super::super::LocalLimits {
            cache_bytes: 1 << 20,
            max_journal_bytes: 1 << 20,
            min_free_bytes: 0,
            flush_timeout: std::time::Duration::from_secs(5),
        };
        let limits = crate::session::Limits {
            ttl_ms,
            max_lifetime_ms: 10 * ttl_ms,
            max_metadata_bytes: 1024,
        };
        let store = SledStore::open(dir.path(), local, limits).unwrap();
        (dir, store)
    }

    /// The mirror's lag bounds (docs/failure-model.md): a touch whose
    /// expiry the mirror's copy is within `mirror_lag` of writes nothing; one
    /// beyond it, or one carrying changed data, rewrites the copy; after a
    /// restart (nothing remembered) the copy on disk is checked, not
    /// rewritten blindly. At every step the copy's expiry is no earlier than
    /// the latest touch's minus the lag, and its count is the count of a
    /// touch no more than the lag older than the latest.
    #[test]
    fn mirror_touches_are_written_only_past_the_lag_and_the_copy_stays_within_it() {
        let (_dir, store) = open(100_000); // lag: a tenth, 10 s
        let now = now_ms();
        let mut s = session(1, 1, now, now + 100_000, "{}");
        s.created_at = now;
        store.mirror_put(&s).unwrap();
        let check = |latest: &Session, count: u64| {
            store.flush_touched().unwrap();
            let held = store
                .get(&s.id, now)
                .expect("the mirror can be read")
                .expect("the mirror holds it");
            assert!(held.expires_at + 10_000 >= latest.expires_at);
            assert_eq!(held.request_count, count);
        };

        // 9 s of use: within the lag, nothing written
        let mut t = s.clone();
        t.request_count = 50;
        t.last_accessed += 9_000;
        t.expires_at += 9_000;
        store.mirror_touch(t.clone()).unwrap();
        check(&t, 1);
        assert_eq!(store.mirror_touches_skipped(), 1);

        // 10.5 s: beyond it, the copy is rewritten
        t.request_count = 80;
        t.last_accessed = s.last_accessed + 10_500;
        t.expires_at = s.expires_at + 10_500;
        store.mirror_touch(t.clone()).unwrap();
        check(&t, 80);

        // changed data is written at once, whatever the expiry
        t.version = 2;
        t.metadata = r#"{"new":1}"#.into();
        t.request_count = 81;
        store.mirror_touch(t.clone()).unwrap();
        check(&t, 81);
        assert_eq!(
            store.get(&s.id, now).unwrap().unwrap().metadata,
            r#"{"new":1}"#
        );

        // as after a restart: nothing remembered, the disk copy is compared
        store.forget_written();
        let mut u = t.clone();
        u.request_count = 90;
        u.expires_at += 5_000;
        store.mirror_touch(u.clone()).unwrap();
        check(&u, 81);
        // ... and remembered from then on
        store.mirror_touch(u.clone()).unwrap();
        assert_eq!(store.mirror_touches_skipped(), 2);

        // a lag of 0 writes every use
        store.set_mirror_lag_ms(0);
        u.request_count = 91;
        u.expires_at += 1_000;
        store.mirror_touch(u.clone()).unwrap();
        check(&u, 91);
    }

    /// A session this node never wrote to its mirror (created elsewhere)
    /// is written at its first touch; a deleted one is forgotten.
    #[test]
    fn a_first_touch_writes_the_copy_and_a_deletion_forgets_it() {
        let (_dir, store) = open(100_000);
        let now = now_ms();
        let mut s = session(1, 3, now, now + 100_000, "{}");
        s.created_at = now;
        store.mirror_touch(s.clone()).unwrap();
        store.flush_touched().unwrap();
        assert_eq!(store.get(&s.id, now).unwrap().unwrap().request_count, 3);
        assert!(store.mirror_deleted(&s.id).unwrap());
        assert!(store.get(&s.id, now).unwrap().is_none());
        // a later touch result (a race with the deletion) is not skipped
        // on the strength of the copy that is gone
        store.mirror_touch(s.clone()).unwrap();
        assert_eq!(store.mirror_touches_skipped(), 0);
    }
}

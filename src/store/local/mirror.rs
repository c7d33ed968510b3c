//! Redis mode's mirror: this node's copy of every session it served, kept
//! so a failover finds them on disk. Touch results are buffered in memory
//! and written by the housekeeping flush (the hot path does no sled
//! write); copies merge newest-wins ([`newest`]); deletions heard from
//! Redis are remembered for the sessions held here.

use super::change::Change;
use super::{ids_in, stripe, Journal, Result, SledStore, Trees};
use crate::disk::Space;
use crate::session::Session;

/// Most buffered touches per stripe; past it a touch is written through.
const TOUCHED_PER_STRIPE: usize = 512;

impl SledStore {
    /// Stores a session as Redis returned it (newest wins against what the
    /// mirror and the touch buffer hold). Not flushed by itself.
    pub fn mirror_put(&self, session: &Session) -> Result<()> {
        self.check_space(Space::Write)?;
        self.modify(&session.id, 0, Journal::Off, |current| {
            let merged = match current {
                Some(c) => newest(session, c),
                None => session.clone(),
            };
            Ok((Change::Put(merged), (), None))
        })
    }

    /// Buffers a touch result from Redis for the mirror (see `touched`).
    pub fn mirror_touch(&self, session: Session) -> Result<()> {
        let mut map = self.inner.touched[stripe(&session.id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(prev) = map.get_mut(&session.id) {
            *prev = newest(&session, prev);
            return Ok(());
        }
        if map.len() < TOUCHED_PER_STRIPE {
            map.insert(session.id, session);
            return Ok(());
        }
        drop(map);
        self.mirror_put(&session)
    }

    /// Writes every buffered touch into the mirror.
    pub fn flush_touched(&self) -> Result<()> {
        if self.check_space(Space::Write).is_err() {
            // The buffered copies are dropped, not written: the mirror is a
            // copy for outages, and the reserve is for what was acknowledged.
            for shard in &self.inner.touched {
                shard.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
            return Ok(());
        }
        for shard in &self.inner.touched {
            for id in ids_in(shard) {
                // `modify` writes a buffered touch before anything else.
                self.modify(&id, 0, Journal::Off, |_| Ok((Change::Keep, (), None)))?;
            }
        }
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
        self.modify(id, 0, Journal::Off, |current| {
            Ok((Change::Tombstone, current.is_some(), None))
        })
    }

    /// A deletion another node made (reported by Redis): remembered only for
    /// a session this node holds. The others it can neither serve nor
    /// re-seed, and a log-out-everywhere of a large user must not cost every
    /// node a disk write per session.
    pub fn deleted_elsewhere(&self, id: &[u8; 16]) -> Result<bool> {
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
}

//! The fallback journal's tree: operations acknowledged while Redis was
//! away (see [`super::journal_ops`]), appended under the
//! session's lock, read in order by the replay, removed once Redis took
//! them. Its entries and bytes are kept as counters (walking the tree is
//! not cheap), and fallback touches are coalesced in memory per session
//! before they are journaled.

use super::journal_ops::{self, Op};
use super::{ids_in, stripe, Result, SledStore, Trees};
use std::sync::atomic::Ordering;

/// Requests counted on one session since its last journal entry, and the
/// time of the last one.
pub(super) type PendingTouches = (u64, u64);

impl SledStore {
    /// Journals the coalesced fallback touches: one entry per session.
    pub fn flush_pending_touches(&self) -> Result<()> {
        for shard in &self.inner.pending_touches {
            for id in ids_in(shard) {
                let _guard = self.lock(&id);
                self.journal_pending_touches_locked(&id)?;
            }
        }
        Ok(())
    }

    /// Journals the pending touches of one session; its stripe lock is held.
    pub(super) fn journal_pending_touches_locked(&self, id: &[u8; 16]) -> Result<()> {
        let taken = self.inner.pending_touches[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some((count, at)) = taken {
            let op = Op::Touches { id: *id, count, at };
            if !self.journal_append(&op, None)? {
                self.inner
                    .touches_unjournaled
                    .fetch_add(count, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Takes counts the near cache acknowledged in Redis mode and could not
    /// write: they are journaled like fallback touches (coalesced, and before
    /// any later entry of the session). The mirror's copy is not counted
    /// again: the cache's copies reach it through `mirror_touch`.
    pub fn add_pending_touches(&self, id: &[u8; 16], count: u64, at: u64) {
        let mut map = self.inner.pending_touches[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(*id).or_insert((0, at));
        entry.0 += count;
        entry.1 = entry.1.max(at);
    }

    /// Journals a write-behind count that Redis may or may not have applied
    /// under the id its call carried, so a replay applies it exactly once.
    pub fn journal_touches_at(&self, id: &[u8; 16], count: u64, at: u64, seq: u64) -> Result<()> {
        let _guard = self.lock(id);
        let op = Op::Touches { id: *id, count, at };
        if !self.journal_append(&op, Some(seq))? {
            self.inner
                .touches_unjournaled
                .fetch_add(count, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn journal_len(&self) -> u64 {
        self.inner.journal_entries.load(Ordering::Relaxed)
    }

    /// Sets the journal's counters from the tree itself (when they disagree
    /// with it, as a reopen racing a write could leave them).
    pub fn recount_journal(&self) -> Result<()> {
        let (mut entries, mut bytes) = (0u64, 0u64);
        for r in self.t()?.journal().iter() {
            let (_, v) = r.map_err(|e| self.failed(e))?;
            entries += 1;
            bytes += v.len() as u64;
        }
        self.inner.journal_entries.store(entries, Ordering::Relaxed);
        self.inner.journal_bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The oldest `n` journal entries, in order. An entry that does not decode
    /// is counted, logged and skipped (returned as `None` so it can be dropped).
    /// A read error is a disk fault, never an empty journal.
    pub fn journal_head(&self, n: usize) -> Result<Vec<(u64, Option<Op>)>> {
        self.t()?
            .journal()
            .iter()
            .take(n)
            .map(|r| {
                let (k, v) = r.map_err(|e| self.failed(e))?;
                let seq = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
                let op = journal_ops::decode(&v)
                    .map_err(|e| {
                        self.inner.corrupt.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(seq, error = %e, "journal entry does not decode; dropping it");
                    })
                    .ok();
                Ok((seq, op))
            })
            .collect()
    }

    pub fn journal_remove(&self, seq: u64) -> Result<()> {
        if let Some(old) = self.t()?.journal().remove(seq.to_be_bytes())? {
            self.inner.journal_entries.fetch_sub(1, Ordering::Relaxed);
            self.inner
                .journal_bytes
                .fetch_sub(old.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Appends an operation to the journal (under `seq` when given). Within
    /// the byte budget always; beyond it only a delete, which is never
    /// refused: returns whether it was written.
    pub(super) fn journal_append(&self, op: &Op, seq: Option<u64>) -> Result<bool> {
        let bytes = journal_ops::encode(op);
        let over = self.journal_bytes() + bytes.len() as u64 > self.inner.local.max_journal_bytes;
        if over && !matches!(op, Op::Delete { .. } | Op::DeleteUser { .. }) {
            return Ok(false);
        }
        let seq = match seq {
            Some(s) => s,
            None => self.inner.db.next_seq()?,
        };
        let len = bytes.len() as u64;
        if self
            .t()?
            .journal()
            .insert(seq.to_be_bytes(), bytes)?
            .is_none()
        {
            self.inner.journal_entries.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.journal_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(true)
    }

    /// The newest journal sequence number, or 0 when empty.
    pub fn journal_last_seq(&self) -> Result<u64> {
        Ok(self
            .t()?
            .journal()
            .last()
            .map_err(|e| self.failed(e))?
            .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }
}

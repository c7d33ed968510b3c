//! The sweeps: bounded work per call, so housekeeping never stalls a small
//! board. Expired sessions leave through the `by_expiry` index (whose keys
//! are lower bounds, re-filed when found alive); deletion records leave
//! once nothing they name can still be alive.

use super::{expiry_key, SledStore, Trees};

impl SledStore {
    /// Removes up to `budget` expired sessions; returns how many were removed.
    /// Bounded work per call keeps a sweep from stalling a small board.
    pub fn sweep(&self, now: u64, budget: usize) -> usize {
        let mut removed = 0;
        let Ok(t) = self.t() else { return 0 };
        let due: Vec<_> = t
            .by_expiry()
            .range(..now.to_be_bytes().to_vec())
            .keys()
            .take(budget)
            .filter_map(|k| k.ok())
            .collect();
        for key in due {
            let Some(id) = key.get(8..24).and_then(|b| <[u8; 16]>::try_from(b).ok()) else {
                let _ = t.by_expiry().remove(&key);
                continue;
            };
            let _guard = self.lock(&id);
            match self.load(&id) {
                Ok(Some(s)) if s.is_expired(now) && self.remove_locked(&s).is_ok() => removed += 1,
                Ok(Some(s)) if s.is_expired(now) => {}
                Ok(Some(s)) => {
                    // Still alive: re-file at its real expiry.
                    let _ = t.by_expiry().insert(expiry_key(s.expires_at, &id), &[]);
                }
                Ok(None) => {}
                // The disk failed: the next sweep, after a reopen, goes on.
                Err(_) => return removed,
            }
            let _ = t.by_expiry().remove(&key);
        }
        removed
    }

    /// Drops up to `budget` deletion records older than the absolute session
    /// lifetime (nothing they name can still be alive), continuing where the
    /// last call stopped.
    pub fn sweep_tombstones(&self, now: u64, budget: usize) -> usize {
        let mut cursor = self
            .inner
            .tombstone_cursor
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let horizon = now.saturating_sub(self.inner.limits.max_lifetime_ms);
        let Ok(t) = self.t() else { return 0 };
        let batch: Vec<_> = t
            .deleted()
            .range((
                std::ops::Bound::Excluded(cursor.clone()),
                std::ops::Bound::Unbounded,
            ))
            .take(budget)
            .filter_map(|r| r.ok())
            .collect();
        let mut removed = 0;
        for (k, v) in &batch {
            let at = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if at < horizon && t.deleted().remove(k).is_ok() {
                removed += 1;
            }
        }
        *cursor = match batch.last() {
            Some((k, _)) if batch.len() == budget => k.to_vec(),
            _ => Vec::new(),
        };
        removed
    }
}

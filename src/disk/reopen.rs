//! Opening the database again: after a disk fault, and once more on the way
//! out of a clean stop.
//!
//! sled keeps a write error sticky: once a flush failed, it refuses every
//! write until the database is reopened. And sled holds an exclusive lock on
//! its file until every handle of the old database is gone, so both swaps
//! take the open database out of its slot, wait for it to be let go, and
//! open a new one in its place (retrying for the moments sled takes to
//! release its lock).

use super::error::{DiskError, Result};
use super::{Database, Opened};
use std::sync::Arc;

impl Database {
    /// Reopens the database after a write error, once the data directory
    /// takes writes again (a probe file is written and synced first). What
    /// was acknowledged had been flushed before it was acknowledged, so it
    /// is all there; what was not (lazy mirror copies, touches) may be lost.
    /// `counted` runs on the new database before anyone else can write to
    /// it; its failure is returned with the new database in place.
    /// Blocking: run it on the blocking pool. Requests get a disk fault
    /// (503) at once while the swap is under way, and after a failed open
    /// until a later call opens it (the database is left closed, not the
    /// process ended: a disk still full fails sled's open while it writes
    /// its snapshot, and the next try succeeds once space is back).
    pub fn reopen<E: From<DiskError>>(
        &self,
        counted: impl FnOnce(&Opened) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let started = std::time::Instant::now();
        if let Err(e) = self.inner.guard.room_to_open() {
            return Err(DiskError::Fault(format!("the data directory is still full: {e}")).into());
        }
        let probe = self.inner.dir.join(".edgenode-write-probe");
        let probed = std::fs::write(&probe, b"ok")
            .and_then(|_| std::fs::File::open(&probe)?.sync_all())
            .and_then(|_| std::fs::remove_file(&probe));
        if let Err(e) = probed {
            return Err(
                DiskError::Fault(format!("the data directory still refuses writes: {e}")).into(),
            );
        }
        // Requests never wait on this lock (they try it, and get a disk
        // fault while it is held), so no runtime worker hangs behind a
        // reopen.
        let mut slot = self.inner.slot.write().unwrap_or_else(|p| p.into_inner());
        // sled holds an exclusive lock on its file until every handle of the
        // old database is gone; in-flight users drop theirs within moments
        // (nobody takes a new one while the slot is locked).
        if let Some(old) = slot.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            if Arc::strong_count(&old) > 1 {
                // Still in use (a flush stuck on the failing disk, say):
                // back as it was, and another try at the next tick.
                *slot = Some(old);
                return Err(DiskError::Fault(
                    "the local store is still in use; reopening it at the next try".into(),
                )
                .into());
            }
            drop(old);
        }
        let released_ms = started.elapsed().as_millis() as u64;
        match self.open_again() {
            Ok(t) => {
                let opened_ms = started.elapsed().as_millis() as u64;
                // Counting writes (the clean-shutdown count is consumed): a
                // failure is returned with the new trees in place.
                let counted = counted(&t);
                *slot = Some(Arc::new(t));
                drop(slot);
                counted?;
                self.inner.guard.clear();
                tracing::warn!(
                    released_ms,
                    opened_ms,
                    ms = started.elapsed().as_millis() as u64,
                    "the local store was reopened after a disk fault"
                );
                Ok(())
            }
            Err(e) => {
                // The slot stays empty: every use of the store is a disk
                // fault (503, unready) until the next tick tries again. A
                // failed open leaves nothing behind (the patched sled
                // removes an unfinished snapshot), so trying again is safe.
                drop(slot);
                tracing::warn!(error = %e, "cannot reopen the local store yet; trying again at the next tick");
                Err(DiskError::Fault(format!("reopening the local store failed: {e}")).into())
            }
        }
    }

    /// sled writes its snapshot (the page table, where the next open starts
    /// reading its log from) only when it opens a database, after reading
    /// every log segment written since the last one. A node that took many
    /// writes would pay that read at its next start (100 000 sessions made
    /// since the last start: 90 ms of a 106 ms start on a 2-core x86, more on
    /// a Pi's SD card); closing the database and opening it once more on the
    /// way out pays it here, where nobody waits for it. Best effort: if that
    /// fails, the next start reads the log, as it would after a crash.
    /// Blocking: run it on the blocking pool, after the last flush.
    pub fn leave_snapshot(&self) {
        let started = std::time::Instant::now();
        if let Some(e) = self.dead() {
            tracing::warn!(error = %e, "the local store's disk is faulty; no snapshot left at close (the next start reads its whole log)");
            return;
        }
        let mut slot = self.inner.slot.write().unwrap_or_else(|p| p.into_inner());
        let Some(old) = slot.take() else { return };
        let old = match Arc::try_unwrap(old) {
            Ok(trees) => trees,
            Err(shared) => {
                *slot = Some(shared);
                tracing::warn!(
                    "the local store is still in use at close; the next start reads its whole log"
                );
                return;
            }
        };
        drop(old);
        match self.open_again() {
            Ok(t) => {
                *slot = Some(Arc::new(t));
                tracing::debug!(
                    ms = started.elapsed().as_millis() as u64,
                    "local store snapshot written"
                );
            }
            // Nothing uses the store after close; the next start recovers.
            Err(e) => {
                tracing::warn!(error = %e, "no snapshot of the local store left; the next start reads its whole log")
            }
        }
    }

    /// Opens the database again after the old one was dropped: sled lets
    /// go of its file lock moments after the last handle is gone.
    fn open_again(&self) -> Result<Opened> {
        let i = &self.inner;
        let mut tries = 0;
        loop {
            match Opened::open(&i.dir, &i.config, i.names) {
                Ok(t) => return Ok(t),
                Err(e) if tries >= 20 => return Err(e),
                // A full disk: no use waiting for a lock (the next tick
                // tries again).
                Err(e @ DiskError::NoSpace(_)) => return Err(e),
                // A failing disk, or sled's lock not let go yet (an I/O
                // error too): two more tries.
                Err(e @ DiskError::Fault(_)) if tries >= 2 => return Err(e),
                Err(_) => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }
}

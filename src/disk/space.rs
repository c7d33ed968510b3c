//! The free-space reserve: the disk is never allowed to fill.
//!
//! Every write first checks the free space of the data directory (statvfs,
//! cached for a moment) against `min_free_bytes`, and is refused with
//! [`DiskError::Full`] below it; deletes may use half of that reserve, so a
//! logout still lands when nothing else does. A failed flush is remembered
//! as a fault (health says so) until a later flush succeeds.
//!
//! The guard is the disk's, not a domain's: the session store and the shared
//! cache write to one database on one file system, so they share one
//! reserve and one memory of a failed flush.

use super::error::{DiskError, Result};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How much of the disk reserve a write may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// Creates, changes, mirror copies: stop at the reserve.
    Write,
    /// Deletes: may use half of the reserve.
    Release,
}

impl Space {
    /// The free bytes this kind of write must leave, for a reserve of
    /// `min_free` bytes.
    pub fn reserve(self, min_free: u64) -> u64 {
        match self {
            Space::Write => min_free,
            Space::Release => min_free / 2,
        }
    }
}

/// Watches the data directory's free space and remembers failed flushes.
///
/// `statvfs` is cheap but not free, so its answer is kept for
/// [`DiskGuard::FRESH_MS`]; the reserve is checked against that.
pub(super) struct DiskGuard {
    dir: PathBuf,
    /// When the free space was last read, and what it was.
    last: Mutex<Option<(std::time::Instant, u64)>>,
    /// The last flush's failure, until a flush succeeds.
    flush_error: Mutex<Option<String>>,
}

impl DiskGuard {
    const FRESH_MS: u64 = 100;

    pub(super) fn new(dir: PathBuf) -> DiskGuard {
        DiskGuard {
            dir,
            last: Mutex::new(None),
            flush_error: Mutex::new(None),
        }
    }

    /// Available bytes for an unprivileged writer (`f_bavail`); `u64::MAX`
    /// when the file system cannot say.
    fn available(&self) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some((at, free)) if at.elapsed().as_millis() as u64 <= Self::FRESH_MS => free,
            _ => {
                let free = statvfs_available(&self.dir).unwrap_or(u64::MAX);
                *last = Some((std::time::Instant::now(), free));
                free
            }
        }
    }

    pub(super) fn check(&self, reserve: u64) -> Result<()> {
        let free = self.available();
        if free < reserve {
            return Err(DiskError::Full { free, reserve });
        }
        Ok(())
    }

    pub(super) fn flush_failed(&self) -> bool {
        self.flush_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    pub(super) fn flushed(&self, error: Option<String>) {
        *self.flush_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    pub(super) fn fault(&self, reserve: u64) -> Option<String> {
        if let Some(e) = self
            .flush_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Some(e);
        }
        let free = self.available();
        (free < reserve).then(|| {
            format!(
                "disk almost full: {} KiB free, {} KiB kept in reserve; writes refused",
                free / 1024,
                reserve / 1024
            )
        })
    }
}

fn statvfs_available(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we own from a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

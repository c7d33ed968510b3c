//! The free-space reserve (the disk is never allowed to fill) and the
//! memory of a disk fault.
//!
//! Every write first checks the free space of the data directory (statvfs)
//! against `min_free_bytes` plus the largest write sled can make on its own
//! after the check passed ([`DiskGuard::check`]), and is refused with
//! [`DiskError::Full`] below it; deletes may use half of that reserve, so a
//! logout still lands when nothing else does.
//!
//! Why the margin: one insert can make sled rewrite a whole leaf page (up to
//! 17 records: a leaf splits beyond 16) as a blob file, or seal and write a
//! log buffer; so a write that passed the check with a byte to spare could
//! still take the disk that much further. And why statvfs is read afresh
//! near the reserve: it is cheap but not free, so far from the reserve its
//! answer is kept for [`DiskGuard::FRESH_MS`]; within [`DiskGuard::NEAR`]
//! of the reserve a kept answer could be one window of fast writes stale,
//! so every check reads it again.
//!
//! A disk fault (a write sled failed, a read that failed, a flush past its
//! deadline) is remembered until the database is reopened or a flush
//! succeeds: health and readiness say so, and writes are refused at once.
//!
//! The guard is the disk's, not a domain's: the session store and the shared
//! cache write to one database on one file system, so they share one
//! reserve and one memory of a fault.

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

/// A remembered disk fault.
#[derive(Debug, Clone)]
struct Fault {
    reason: String,
    /// The file system was full (ENOSPC): 507 for writes, not 503.
    no_space: bool,
}

/// Watches the data directory's free space and remembers disk faults.
pub(super) struct DiskGuard {
    dir: PathBuf,
    /// The largest write sled may make after a check passed (see the
    /// module doc); added to every non-zero reserve.
    margin: u64,
    /// When the free space was last read, and what it was.
    last: Mutex<Option<(std::time::Instant, u64)>>,
    /// The disk fault seen, until the database is reopened.
    fault: Mutex<Option<Fault>>,
}

impl DiskGuard {
    const FRESH_MS: u64 = 100;
    /// Within this much of the reserve (plus margin), statvfs is read at
    /// every check: 100 ms of writes at SD-card speed is well under it.
    const NEAR: u64 = 64 << 20;

    pub(super) fn new(dir: PathBuf, margin: u64) -> DiskGuard {
        DiskGuard {
            dir,
            margin,
            last: Mutex::new(None),
            fault: Mutex::new(None),
        }
    }

    /// Available bytes for an unprivileged writer (`f_bavail`); `u64::MAX`
    /// when the file system cannot say. Read afresh when the last answer
    /// is old or near `floor`.
    fn available(&self, floor: u64) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some((at, free))
                if at.elapsed().as_millis() as u64 <= Self::FRESH_MS
                    && free >= floor.saturating_add(Self::NEAR) =>
            {
                free
            }
            _ => {
                let free = statvfs_available(&self.dir).unwrap_or(u64::MAX);
                *last = Some((std::time::Instant::now(), free));
                free
            }
        }
    }

    /// The free bytes a write must find: the reserve plus the margin; a
    /// reserve of 0 turns the check off.
    fn floor(&self, reserve: u64) -> u64 {
        if reserve == 0 {
            0
        } else {
            reserve.saturating_add(self.margin)
        }
    }

    pub(super) fn check(&self, reserve: u64) -> Result<()> {
        if let Some(e) = self.faulted() {
            return Err(e);
        }
        let floor = self.floor(reserve);
        if floor == 0 {
            return Ok(());
        }
        let free = self.available(floor);
        if free < floor {
            return Err(DiskError::Full {
                free,
                reserve: floor,
            });
        }
        Ok(())
    }

    /// The remembered fault as the error a write gets at once.
    pub(super) fn faulted(&self) -> Option<DiskError> {
        let f = self
            .fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        Some(if f.no_space {
            DiskError::NoSpace(f.reason)
        } else {
            DiskError::Fault(f.reason)
        })
    }

    pub(super) fn has_fault(&self) -> bool {
        self.fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Remembers a disk error (the first one until cleared: it names the
    /// write that failed, the later ones only repeat sled's sticky error).
    pub(super) fn note(&self, e: &DiskError) {
        let no_space = match e {
            DiskError::NoSpace(_) => true,
            DiskError::Fault(_) => false,
            _ => return,
        };
        let mut f = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(Fault {
                reason: format!("writing to disk failed: {e}"),
                no_space,
            });
        }
    }

    /// Whether the data directory has room for sled to open: an open
    /// writes a snapshot and may seal a log buffer, so on a disk with less
    /// than the margin it fails (after reading the whole log for nothing).
    /// A reopen tried while the disk is still full would take the next
    /// tick's try, the one after the space came back, a whole failed open
    /// later: over a second on a loaded card.
    pub(super) fn room_to_open(&self) -> Result<()> {
        let free = statvfs_available(&self.dir).unwrap_or(u64::MAX);
        if free < self.margin {
            return Err(DiskError::NoSpace(format!(
                "{} KiB free, sled needs {} KiB to open",
                free / 1024,
                self.margin / 1024
            )));
        }
        Ok(())
    }

    /// Forgets the fault: the database was reopened.
    pub(super) fn clear(&self) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Why writes are refused now, if they are.
    pub(super) fn fault(&self, reserve: u64) -> Option<String> {
        if let Some(f) = self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(f.reason);
        }
        let floor = self.floor(reserve);
        if floor == 0 {
            return None;
        }
        let free = self.available(floor);
        (free < floor).then(|| {
            format!(
                "disk almost full: {} KiB free, {} KiB kept in reserve; writes refused",
                free / 1024,
                floor / 1024
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

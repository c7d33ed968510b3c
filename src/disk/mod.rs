//! The node's local disk: one sled database in the data directory, shared
//! by every part of the node that keeps something on disk.
//!
//! The plan of the house: this module is the floor the domains stand on.
//! The session store (`store::local`: sessions, the mirror, the fallback
//! journal) and the shared cache's disk tier (`cache::disk`, its outage
//! journal) each keep their own trees in this one database, and reach the
//! disk only through [`Database`]. One database means no second flusher
//! thread, one page cache and one group commit for everyone.
//!
//! What lives here is what is the same whoever writes:
//! - [`Database`] (this file): opening sled with its configuration, the open
//!   trees, a tree by name, operation ids;
//! - [`space`]: the free-space reserve and the memory of a failed flush;
//! - [`commit`]: group commit ([`Database::durable`]);
//! - [`reopen`]: reopening the database after a disk fault, and the snapshot
//!   left on the way out of a clean stop;
//! - [`error`]: [`DiskError`], which each domain turns into its own error.
//!
//! What the trees hold, and the locks that keep them consistent, are the
//! domains' business (see `store::local` for the session store's trees).

pub mod commit;
pub mod error;
pub mod reopen;
pub mod space;

pub use error::{DiskError, Result};
pub use space::Space;

use commit::GroupCommit;
use sled::{Db, Tree};
use space::DiskGuard;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// How the database is opened and guarded.
#[derive(Debug, Clone, Copy)]
pub struct DiskConfig {
    /// sled's page cache, the bulk of the node's memory.
    pub cache_bytes: u64,
    /// Free space of the data directory's file system kept in reserve.
    pub min_free_bytes: u64,
    /// The largest value written (a session record, a cache entry): sled
    /// may rewrite a page of 17 of them at once, which the reserve must
    /// allow for (see [`space`]).
    pub largest_value_bytes: u64,
    /// The longest wait for a flush (`disk_flush_timeout_ms`): beyond it
    /// the disk is faulty (see [`commit`]).
    pub flush_timeout: std::time::Duration,
}

impl DiskConfig {
    /// The largest write sled can make on its own after a write passed the
    /// reserve check: a leaf page of 17 values rewritten as a blob (a leaf
    /// splits beyond 16), and a log buffer of a segment sealed and written.
    fn largest_write(&self) -> u64 {
        const SEGMENT: u64 = 256 * 1024;
        self.largest_value_bytes
            .saturating_add(256)
            .saturating_mul(17)
            .saturating_add(2 * SEGMENT)
    }
}

/// The node's database. Cheap to clone: every clone is the same database.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Shared>,
}

struct Shared {
    /// The open database. Swapped for a fresh one by [`Database::reopen`]
    /// after a write error, which sled keeps (sticky) until then.
    /// `None` only while [`Database::reopen`] holds the lock for writing.
    slot: RwLock<Option<Arc<Opened>>>,
    dir: PathBuf,
    config: DiskConfig,
    /// The trees opened with the database, in order (see [`Opened::tree`]).
    names: &'static [&'static str],
    guard: DiskGuard,
    commit: GroupCommit,
}

impl Shared {
    /// The open database, or a disk fault (503) while it is being reopened
    /// or after a reopen that failed (tried again at the next tick). Never
    /// waits: a request must not hold a runtime worker behind a reopen.
    fn current(&self) -> Result<Arc<Opened>> {
        let slot = match self.slot.try_read() {
            Ok(s) => s,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(DiskError::Fault("the local store is being reopened".into()))
            }
        };
        slot.as_ref().cloned().ok_or_else(|| {
            DiskError::Fault("the local store is closed until it can be reopened".into())
        })
    }
}

/// One open database and the trees named when it was opened. Hold it only
/// for the work at hand: a handle kept across [`Database::reopen`] would
/// keep the old database, and its file lock, alive.
pub struct Opened {
    db: Db,
    trees: Vec<Tree>,
}

impl Opened {
    fn open(dir: &Path, config: &DiskConfig, names: &[&str]) -> Result<Opened> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(config.cache_bytes)
            .segment_size(256 * 1024)
            // edgenode flushes on its own schedule, on its own bounded pool.
            .flush_every_ms(None)
            .mode(sled::Mode::LowSpace)
            .open()?;
        let trees = names
            .iter()
            .map(|name| db.open_tree(name))
            .collect::<sled::Result<Vec<Tree>>>()?;
        Ok(Opened { db, trees })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The `i`th of the trees named at [`Database::open`].
    pub fn tree(&self, i: usize) -> &Tree {
        &self.trees[i]
    }
}

impl Database {
    /// Opens (or creates) the database in `dir`, with the trees `names`
    /// open in every [`Opened`] it hands out.
    pub fn open(
        dir: &Path,
        config: DiskConfig,
        names: &'static [&'static str],
    ) -> Result<Database> {
        let open = Opened::open(dir, &config, names)?;
        Ok(Database {
            inner: Arc::new(Shared {
                slot: RwLock::new(Some(Arc::new(open))),
                dir: dir.to_path_buf(),
                config,
                names,
                guard: DiskGuard::new(dir.to_path_buf(), config.largest_write()),
                commit: GroupCommit::new(),
            }),
        })
    }

    /// The open database and its named trees, or a disk fault while it
    /// cannot be had (see [`Shared::current`]).
    pub fn current(&self) -> Result<Arc<Opened>> {
        self.inner.current()
    }

    /// A tree by name, for a part of the node that keeps no handle: take it
    /// per use and never keep it (see [`Opened`]).
    pub fn tree(&self, name: &str) -> Result<Tree> {
        self.sled(self.current()?.db.open_tree(name))
    }

    /// A new operation id, unique in this database.
    pub fn next_seq(&self) -> Result<u64> {
        self.sled(self.current()?.db.generate_id())
    }

    /// sled's answer, its error sorted ([`DiskError`]) and a disk error
    /// remembered: any I/O error means the database is dead until it is
    /// reopened (health, readiness and the next writes see it at once).
    pub fn sled<T>(&self, r: sled::Result<T>) -> Result<T> {
        r.map_err(|e| self.noted(e.into()))
    }

    /// Remembers `e` if it is a disk error, and hands it back.
    pub fn noted(&self, e: DiskError) -> DiskError {
        self.inner.guard.note(&e);
        e
    }

    /// Refuses a write at once while the disk is faulty (a failed write,
    /// [`DiskError::NoSpace`] or [`DiskError::Fault`]; a stuck flush), and
    /// ([`DiskError::Full`]) one that would take the disk into its reserve
    /// (half of it for a [`Space::Release`]).
    pub fn check_space(&self, space: Space) -> Result<()> {
        if let Some(e) = self.dead() {
            return Err(e);
        }
        let reserve = space.reserve(self.inner.config.min_free_bytes);
        self.inner.guard.check(reserve)
    }

    /// The error every write gets now if the database cannot take writes
    /// whatever the free space: a stuck flush, a remembered disk fault, or
    /// sled's sticky error (a failed write nobody here saw fail yet).
    pub fn dead(&self) -> Option<DiskError> {
        if let Some(e) = self.stuck_error() {
            return Some(e);
        }
        if let Some(e) = self.inner.guard.faulted() {
            return Some(e);
        }
        let opened = match self.current() {
            Ok(o) => o,
            Err(e) => return Some(e),
        };
        // The patched sled sets its global error on any failed write.
        match opened.db.context.global_error() {
            Ok(()) => None,
            Err(e) => Some(self.noted(e.into())),
        }
    }

    /// Why the database cannot take writes now, if it cannot: a disk fault
    /// (see [`dead`](Self::dead)), or the disk at its reserve.
    pub fn fault(&self) -> Option<String> {
        if let Some(e) = self.dead() {
            return Some(match e {
                DiskError::NoSpace(_) | DiskError::Fault(_) => {
                    self.inner.guard.fault(0).unwrap_or_else(|| e.to_string())
                }
                e => e.to_string(),
            });
        }
        self.inner.guard.fault(self.inner.config.min_free_bytes)
    }

    /// Whether the database must be reopened before it takes writes again:
    /// a write (or read) failed on the disk, or the last reopen did not
    /// open it.
    pub fn needs_reopen(&self) -> bool {
        let _ = self.dead();
        self.inner.guard.has_fault() || self.slot_empty()
    }

    fn slot_empty(&self) -> bool {
        match self.inner.slot.try_read() {
            Ok(s) => s.is_none(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().is_none(),
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    /// Bytes this process has caused to be written to storage
    /// (`write_bytes` of `/proc/self/io`: the disk's wear, whatever wrote
    /// it); `None` where the kernel does not say (no procfs, or no task
    /// I/O accounting).
    pub fn process_written_bytes() -> Option<u64> {
        let io = std::fs::read_to_string("/proc/self/io").ok()?;
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Flushes at once, on the calling thread (tests of data at rest).
    #[doc(hidden)]
    pub fn flush_for_test(&self) -> Result<()> {
        self.sled(self.current()?.db.flush())?;
        Ok(())
    }
}

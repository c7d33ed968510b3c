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
    fn current(&self) -> Arc<Opened> {
        match self.slot.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(t) => t.clone(),
            // Empty only under `reopen`'s write lock, which it never
            // releases empty (it exits instead), and after a `close` whose
            // last reopen failed, when nothing uses the store any more.
            None => unreachable!("the local store is used while reopened or after close"),
        }
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
                guard: DiskGuard::new(dir.to_path_buf()),
                commit: GroupCommit::new(),
            }),
        })
    }

    /// The open database and its named trees.
    pub fn current(&self) -> Arc<Opened> {
        self.inner.current()
    }

    /// A tree by name, for a part of the node that keeps no handle: take it
    /// per use and never keep it (see [`Opened`]).
    pub fn tree(&self, name: &str) -> Result<Tree> {
        Ok(self.current().db.open_tree(name)?)
    }

    /// A new operation id, unique in this database.
    pub fn next_seq(&self) -> Result<u64> {
        Ok(self.current().db.generate_id()?)
    }

    /// Refuses ([`DiskError::Full`]) a write that would take the disk into
    /// its reserve (half of it for a [`Space::Release`]).
    pub fn check_space(&self, space: Space) -> Result<()> {
        let reserve = space.reserve(self.inner.config.min_free_bytes);
        self.inner.guard.check(reserve)
    }

    /// Why the database cannot take writes now, if it cannot: the disk at
    /// its reserve, or a write to it that failed.
    pub fn fault(&self) -> Option<String> {
        self.inner.guard.fault(self.inner.config.min_free_bytes)
    }

    /// Whether a write to disk failed (sled then refuses every write until
    /// the database is reopened).
    pub fn needs_reopen(&self) -> bool {
        self.inner.guard.flush_failed()
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
        self.current().db.flush()?;
        Ok(())
    }
}

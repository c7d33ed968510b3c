//! The node's on-disk tier: cache values in two trees of the node's sled
//! database ([`crate::disk`], shared with the session store: no second
//! flusher thread, one page cache), bounded in bytes, oldest written first
//! out. It uses the disk layer directly, not the session store: its errors
//! are [`DiskError`]s, which the cache turns into its own.
//!
//! - `cache_values`: `namespace/key` → the entry's node-local `seq` (8 bytes,
//!   big-endian) and the entry as [`super::encode`] writes it;
//! - `cache_age`: `seq` (big-endian) → `namespace/key`, the order of
//!   eviction.
//!
//! The tier is read only while the cache's Redis is unreachable. It is
//! written through on every PUT this node takes, without an fsync of its
//! own (a cache value may be lost in a crash; the database's group commits
//! carry it to disk soon enough). It is emptied when the node starts: what
//! it held may have been deleted on another node while this one was down,
//! and nothing here could tell.
//!
//! A disk fault here is never an error answer: a read that fails is a
//! miss, a write that fails leaves the value to the other tiers. It is not
//! hidden either: every failed operation is counted
//! (`edgenode_cache_disk_errors`, health `cache.disk_errors`), logged, and
//! a disk error (full, faulty) is remembered by the shared database as any
//! other: the node is degraded with the reason, unready, and the database
//! reopened once the disk takes writes again, as for a session write.

use super::{decode, encode, Entry};
use crate::disk::{Database, DiskError, Space};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const VALUES: &str = "cache_values";
const AGE: &str = "cache_age";

pub struct Disk {
    db: Database,
    budget: u64,
    bytes: AtomicU64,
    evictions: AtomicU64,
    /// Operations that failed on the disk (see the module doc).
    errors: AtomicU64,
    /// Keeps the two trees and the byte count in step.
    lock: Mutex<()>,
}

type Result<T> = std::result::Result<T, DiskError>;

impl Disk {
    /// The tier, emptied (see the module doc); `budget` 0 turns it off.
    pub fn open(db: Database, budget: u64) -> Result<Disk> {
        for name in [VALUES, AGE] {
            let t = db.tree(name)?;
            for k in t.iter().keys() {
                t.remove(k?)?;
            }
        }
        Ok(Disk {
            db,
            budget,
            bytes: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            lock: Mutex::new(()),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The entry under `key` and the `seq` it was written under; a read
    /// that fails is a miss (counted and remembered: see the module doc).
    pub fn get(&self, key: &str) -> Option<(u64, Entry)> {
        let v = self
            .db
            .tree(VALUES)
            .and_then(|t| self.db.sled(t.get(key.as_bytes())))
            .map_err(|e| self.failed("reading", e))
            .ok()??;
        let seq = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
        Some((seq, decode(bytes::Bytes::copy_from_slice(&v[8..]))?))
    }

    /// Counts and logs an operation that failed. Its sled error was
    /// remembered where it was met ([`Database::sled`]): a disk error makes
    /// the shared database faulty; one of a database being reopened does
    /// not (it was no fault of the disk).
    fn failed(&self, what: &str, e: DiskError) -> DiskError {
        let n = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        // The first, then every 1000th: a lookup per request on a dead disk
        // must not flood the log (the counter has the rest).
        if n == 1 || n % 1000 == 0 {
            tracing::warn!(error = %e, failures = n, "cache: {what} the disk tier failed; served from the other tiers");
        }
        e
    }

    /// Writes `entry` under `key`, then drops the oldest entries until the
    /// tier is within its budget. A value larger than the whole budget, or
    /// a disk at its reserve, leaves the key out (an older value under it
    /// is dropped either way).
    pub fn put(&self, key: &str, entry: &Entry, seq: u64) -> Result<()> {
        self.put_inner(key, entry, seq)
            .map_err(|e| self.failed("writing to", e))
    }

    fn put_inner(&self, key: &str, entry: &Entry, seq: u64) -> Result<()> {
        let mut record = Vec::with_capacity(8 + 27 + entry.content_type.len() + entry.body.len());
        record.extend_from_slice(&seq.to_be_bytes());
        encode(entry, &mut record);
        let size = (key.len() + record.len()) as u64;
        if size > self.budget || self.db.check_space(Space::Write).is_err() {
            return self.remove_inner(key).map(|_| ());
        }
        let (values, age) = (self.db.tree(VALUES)?, self.db.tree(AGE)?);
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = self.db.sled(values.insert(key.as_bytes(), record))? {
            self.forget(&age, key, &old)?;
        }
        self.db
            .sled(age.insert(seq.to_be_bytes(), key.as_bytes().to_vec()))?;
        let mut total = self.bytes.fetch_add(size, Ordering::Relaxed) + size;
        while total > self.budget {
            let Some((s, k)) = self.db.sled(age.iter().next().transpose())? else {
                break;
            };
            self.db.sled(age.remove(&s))?;
            if let Some(v) = self.db.sled(values.get(&k))? {
                if v.get(..8) == Some(&s[..]) {
                    self.db.sled(values.remove(&k))?;
                    total = self.sub((k.len() + v.len()) as u64);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Drops `key` if it is held (a lookup first: a removal of an absent
    /// key still costs sled a write). Whether it was held.
    pub fn remove(&self, key: &str) -> Result<bool> {
        self.remove_inner(key)
            .map_err(|e| self.failed("removing from", e))
    }

    fn remove_inner(&self, key: &str) -> Result<bool> {
        let values = self.db.tree(VALUES)?;
        if self.db.sled(values.get(key.as_bytes()))?.is_none() {
            return Ok(false);
        }
        let age = self.db.tree(AGE)?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match self.db.sled(values.remove(key.as_bytes()))? {
            Some(old) => self.forget(&age, key, &old).map(|_| true),
            None => Ok(false),
        }
    }

    /// Uncounts a record that left `cache_values`, and its age entry.
    fn forget(&self, age: &sled::Tree, key: &str, old: &[u8]) -> Result<()> {
        if let Some(s) = old.get(..8) {
            self.db.sled(age.remove(s))?;
        }
        self.sub((key.len() + old.len()) as u64);
        Ok(())
    }

    fn sub(&self, n: u64) -> u64 {
        let before = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            })
            .unwrap_or(0);
        before.saturating_sub(n)
    }
}

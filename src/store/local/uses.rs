//! The uses of sessions this node counts itself (without Redis, and in a
//! Redis outage): each use's count and time are kept in memory and written
//! to a compact log beside the database, `uses.log`, not into the session's
//! record.
//!
//! Why: a use changes 16 bytes of a session (its count and its time), but
//! sled writes a whole record to its log for any change, and rewrites the
//! record's leaf page every tenth change of that page. On an SD card that
//! was ~220–345 bytes written per use over 10 000 sessions. Here a use
//! costs one 32-byte entry, written in whole 4 KiB pages at the lazy flush
//! (every 5 s without Redis), so no page of the file is written twice in
//! a cycle, and the file's blocks are allocated once (see
//! [`UseLog::open`]).
//!
//! How a use is read back: the entry holds the session's absolute count and
//! last use, so a copy is the record merged with its entry (count and time
//! by maximum, the expiry slid to the last use), in any order, any number
//! of times. That makes the log simple: a page that fails its checksum (a
//! torn write at a power cut) is skipped and counted, never fatal, and an
//! entry whose session is gone is ignored.
//!
//! The log is folded into the records when it passes [`FOLD_LOG_BYTES`] or
//! memory holds [`FOLD_ENTRIES`] sessions' uses: each session's latest use
//! written into its record once, the database flushed, then the log
//! started again from its first page under a new generation. Any change of a session that writes its record (a PATCH, a
//! rotation, a delete) takes the use into the record, or away, at once.
//!
//! What a crash loses: the uses since the last flush that wrote the log
//! (5 s without Redis, 500 ms in an outage), as before. A write of the log
//! that fails is the log's fault alone: uses then write their records, as
//! before the log, until a later flush writes it again. A reopen of the
//! database after a failed sync reads the log again, so uses that had left
//! memory for records the sync lost come back.

use super::{ids_in, stripe, Result, SledStore, LOCK_STRIPES};
use crate::disk::{DiskError, Space};
use crate::session::Session;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// The log's file name in the data directory.
pub(super) const FILE_NAME: &str = "uses.log";
/// The log is written and read in pages of this size, each written once.
const PAGE: usize = 4096;
/// A page's header: magic (4), entry count (u16 LE), 2 spare, CRC-32 (LE)
/// of the count, the generation and the entries, generation (u32 LE).
const HEADER: usize = 16;
/// An entry: session id (16), count (u64 LE), last use in ms (u64 LE).
const ENTRY: usize = 32;
const PER_PAGE: usize = (PAGE - HEADER) / ENTRY;
const MAGIC: &[u8; 4] = b"EDU1";
/// A log this long is folded into the records: 8 MiB is about 260 000 uses
/// at 200 a second (a fold every ~20 min), more at slower rates, and is
/// read in tens of milliseconds at a start after a crash.
const FOLD_LOG_BYTES: u64 = 8 << 20;
/// Sessions whose uses one shard of memory holds at most: 896 keeps each
/// shard's table at 1 024 slots of 41 bytes, ~2.7 MB in all. Beyond it a
/// use writes its record, as it did before the log, until the next fold.
const SHARD_ENTRIES: usize = 896;
/// Sessions whose uses memory holds when a fold is due: most shards full.
const FOLD_ENTRIES: usize = LOCK_STRIPES * SHARD_ENTRIES * 3 / 4;
/// Entries written per `pwrite`: 64 pages (256 KiB), so a flush of many
/// sessions' uses holds little memory.
const CHUNK_ENTRIES: usize = 64 * PER_PAGE;

/// One entry of the log: a session id, its count and its last use (ms).
type Entry = ([u8; 16], u64, u64);

/// A session's latest use this node counted: its absolute count and time.
#[derive(Debug, Clone, Copy)]
pub(super) struct Use {
    count: u64,
    last: u64,
    /// Whether the log holds this state (the next write skips it).
    logged: bool,
}

impl Use {
    /// The session as its record says, with this use taken in.
    fn apply(&self, s: &mut Session, limits: &crate::session::Limits) {
        s.request_count = s.request_count.max(self.count);
        if self.last > s.last_accessed {
            s.last_accessed = self.last;
        }
        s.expires_at = s.expires_at.max(s.expiry_after_touch(self.last, limits));
    }

    fn merge(&mut self, other: Use) {
        self.count = self.count.max(other.count);
        self.last = self.last.max(other.last);
        self.logged &= other.logged;
    }
}

/// The log file and where its next page goes.
pub(super) struct UseLog {
    path: PathBuf,
    file: File,
    end: u64,
    /// The generation of the pages written since the last fold: a fold
    /// starts the log again at its first page under a new generation,
    /// over the pages of the last (see [`UseLog::open`]).
    generation: u32,
    /// Whether `file` writes around the page cache (`O_DIRECT`).
    direct: bool,
}

/// What a start read back from the log.
pub(super) struct Recovered {
    pub log: UseLog,
    pub uses: Vec<Entry>,
    pub bad_pages: u64,
}

impl UseLog {
    /// Opens (or creates) the log and reads the entries of the current
    /// generation: its pages from the first until a page never written
    /// (zeros), a page of another (older) generation, or the end. A page
    /// that fails its checksum on the way is skipped and counted.
    ///
    /// The file is allocated at [`FOLD_LOG_BYTES`] at once and then written
    /// over, cycle after cycle, never truncated: a sync that writes into
    /// blocks already allocated changes no file-system metadata, and
    /// metadata was most of what each sync cost the device (ext4: ~19 KB
    /// written for a 4 KiB page appended, ~12 KB into allocated blocks,
    /// measured with the device's counter).
    pub(super) fn open(dir: &Path) -> io::Result<Recovered> {
        let path = dir.join(FILE_NAME);
        let (file, direct) = open_for_writes(&path)?;
        let read = read_current(&path)?;
        // Not on a file system in memory (no `O_DIRECT`: tmpfs), where
        // blocks allocated are memory taken and metadata costs no card.
        if direct && file.metadata()?.len() < FOLD_LOG_BYTES {
            preallocate(&file, FOLD_LOG_BYTES);
        }
        Ok(Recovered {
            log: UseLog {
                path,
                file,
                end: read.end,
                generation: read.generation.unwrap_or_else(new_generation),
                direct,
            },
            uses: read.uses,
            bad_pages: read.bad_pages,
        })
    }

    /// Writes whole pages holding `entries` at the end (not synced).
    fn write(&mut self, entries: &[Entry]) -> io::Result<()> {
        let pages = entries.len().div_ceil(PER_PAGE) * PAGE;
        // Room to start the pages at a page-aligned address, as `O_DIRECT`
        // wants.
        let mut room = vec![0u8; pages + PAGE];
        let skip = room.as_ptr().align_offset(PAGE).min(PAGE);
        let buf = &mut room[skip..skip + pages];
        for (chunk, page) in entries.chunks(PER_PAGE).zip(buf.chunks_mut(PAGE)) {
            encode_page(self.generation, chunk, page);
        }
        match self.file.write_all_at(buf, self.end) {
            // A file system that takes `O_DIRECT` at open but not for this
            // write: through the page cache from now on.
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct = false;
                self.file = OpenOptions::new().write(true).open(&self.path)?;
                self.file.write_all_at(buf, self.end)?;
            }
            r => r?,
        }
        self.end += pages as u64;
        Ok(())
    }

    /// Starts the log again (after a fold made the records hold every
    /// use): the next page is the first, under a new generation. Writes
    /// nothing: until that page is written a start reads the last
    /// generation's pages again, which the records already hold.
    fn clear(&mut self) {
        let old = self.generation;
        while self.generation == old {
            self.generation = new_generation();
        }
        self.end = 0;
    }
}

/// The current generation's pages of the log at `path`.
struct Read {
    uses: Vec<Entry>,
    bad_pages: u64,
    end: u64,
    generation: Option<u32>,
}

/// Reads the log from its first page while the pages are of the first
/// one's generation, until a page never written (zeros) or the end; a page
/// that fails its checksum is skipped and counted.
fn read_current(path: &Path) -> io::Result<Read> {
    let mut reader = io::BufReader::with_capacity(16 * PAGE, File::open(path)?);
    let mut page = vec![0u8; PAGE];
    let mut read = Read {
        uses: Vec::new(),
        bad_pages: 0,
        end: 0,
        generation: None,
    };
    loop {
        let got = read_page(&mut reader, &mut page)?;
        if got == 0 || page.iter().all(|&b| b == 0) {
            break;
        }
        match decode_page(&page[..got]) {
            Some((g, _)) if read.generation.is_some_and(|current| current != g) => break,
            Some((g, entries)) => {
                read.generation = Some(g);
                read.uses.extend(entries);
            }
            None => read.bad_pages += 1,
        }
        read.end += PAGE as u64;
    }
    Ok(read)
}

/// A generation for a new cycle of the log: random, so that no page of an
/// older cycle (which a torn or zeroed first page could leave after it)
/// can pass for the new one's.
fn new_generation() -> u32 {
    fastrand::u32(..)
}

/// Reads up to one page; the bytes read (fewer than a page only at the end).
fn read_page(reader: &mut impl io::Read, page: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < page.len() {
        match reader.read(&mut page[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    page[got..].fill(0);
    Ok(got)
}

/// Allocates the file's blocks up to `len` (zeros to a reader), where the
/// file system can; where it cannot, the log grows as it is written.
fn preallocate(file: &File, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a file descriptor this `File` owns.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    if rc != 0 {
        tracing::debug!(errno = rc, "{FILE_NAME} not preallocated");
    }
}

/// Opens the log for writing, around the page cache where the file
/// system allows (`O_DIRECT`; tmpfs does not). Why: through the page cache
/// a page appended and synced was charged 1.5 pages of `write_bytes` on
/// average (measured on a 6.x kernel, ext4), and a use's bytes are what the
/// SD card budget counts.
fn open_for_writes(path: &Path) -> io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(false);
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((options.open(path)?, false)),
        Err(e) => Err(e),
    }
}

/// Writes one page (`page` is `PAGE` bytes, zeroed) holding `entries`.
fn encode_page(generation: u32, entries: &[Entry], page: &mut [u8]) {
    page[..4].copy_from_slice(MAGIC);
    page[4..6].copy_from_slice(&(entries.len() as u16).to_le_bytes());
    page[12..16].copy_from_slice(&generation.to_le_bytes());
    for (i, (id, count, last)) in entries.iter().enumerate() {
        let e = &mut page[HEADER + i * ENTRY..HEADER + (i + 1) * ENTRY];
        e[..16].copy_from_slice(id);
        e[16..24].copy_from_slice(&count.to_le_bytes());
        e[24..32].copy_from_slice(&last.to_le_bytes());
    }
    let crc = page_crc(page, entries.len());
    page[8..12].copy_from_slice(&crc.to_le_bytes());
}

fn page_crc(page: &[u8], n: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&page[4..6]);
    h.update(&page[12..16]);
    h.update(&page[HEADER..HEADER + n * ENTRY]);
    h.finalize()
}

/// A page's generation and entries, or `None` when it is not a whole,
/// intact page.
fn decode_page(page: &[u8]) -> Option<(u32, Vec<Entry>)> {
    if page.len() != PAGE || &page[..4] != MAGIC {
        return None;
    }
    let n = u16::from_le_bytes([page[4], page[5]]) as usize;
    if n > PER_PAGE || u32::from_le_bytes(page[8..12].try_into().ok()?) != page_crc(page, n) {
        return None;
    }
    let entries = (0..n)
        .filter_map(|i| {
            let e = &page[HEADER + i * ENTRY..HEADER + (i + 1) * ENTRY];
            Some((
                e[..16].try_into().ok()?,
                u64::from_le_bytes(e[16..24].try_into().ok()?),
                u64::from_le_bytes(e[24..32].try_into().ok()?),
            ))
        })
        .collect();
    Some((u32::from_le_bytes(page[12..16].try_into().ok()?), entries))
}

/// The uses held in memory (one map per lock stripe) and the log.
pub(super) struct Uses {
    shards: Vec<Mutex<HashMap<[u8; 16], Use>>>,
    log: Mutex<UseLog>,
    /// The log's `end`, for readers that must not wait for a write.
    end: AtomicU64,
    /// False after a write of the log failed: uses then write their
    /// records, as before the log, and the next flush tries the log again.
    healthy: AtomicBool,
    syncs: AtomicU64,
}

impl Uses {
    /// Memory's uses as the log left them.
    pub(super) fn new(recovered: Recovered) -> Uses {
        let uses = Uses {
            shards: (0..LOCK_STRIPES)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            end: AtomicU64::new(recovered.log.end),
            healthy: AtomicBool::new(true),
            log: Mutex::new(recovered.log),
            syncs: Default::default(),
        };
        uses.merge_logged(recovered.uses);
        uses
    }

    fn shard(&self, id: &[u8; 16]) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], Use>> {
        self.shards[stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The log, unless a write holds it: a write stuck on a frozen or
    /// dying card must hold no one else (requests read only `end`, a
    /// second flush skips its round).
    fn try_log(&self) -> Option<std::sync::MutexGuard<'_, UseLog>> {
        match self.log.try_lock() {
            Ok(log) => Some(log),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn entries(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Takes uses read from the log into memory, as logged, by maximum.
    fn merge_logged(&self, entries: Vec<Entry>) {
        for (id, count, last) in entries {
            let logged = Use {
                count,
                last,
                logged: true,
            };
            self.merge_in(id, logged);
        }
    }

    /// Takes a use into memory, by maximum with what it holds.
    fn merge_in(&self, id: [u8; 16], new: Use) {
        self.shard(&id)
            .entry(id)
            .and_modify(|u| u.merge(new))
            .or_insert(new);
    }

    /// Marks every use for the next write again (a write failed, or the
    /// log started again).
    fn unlog_all(&self) {
        for shard in &self.shards {
            for u in shard.lock().unwrap_or_else(|p| p.into_inner()).values_mut() {
                u.logged = false;
            }
        }
    }
}

impl SledStore {
    /// A session's record with the use memory holds for it taken in.
    pub(super) fn with_use(&self, mut s: Session) -> Session {
        if let Some(u) = self.inner.uses.shard(&s.id).get(&s.id) {
            u.apply(&mut s, &self.inner.limits);
        }
        s
    }

    /// Keeps a use (the session as the touch left it) for the log; its
    /// stripe lock is held. False when memory holds as many sessions' uses
    /// as it may ([`SHARD_ENTRIES`]): the caller writes the record instead,
    /// until the next fold.
    pub(super) fn note_use(&self, s: &Session) -> bool {
        let new = Use {
            count: s.request_count,
            last: s.last_accessed,
            logged: false,
        };
        if !self.inner.uses.healthy.load(Ordering::Relaxed) {
            return false;
        }
        let mut shard = self.inner.uses.shard(&s.id);
        if let Some(u) = shard.get_mut(&s.id) {
            u.merge(new);
            u.logged = false;
            return true;
        }
        if shard.len() >= SHARD_ENTRIES {
            return false;
        }
        shard.insert(s.id, new);
        true
    }

    /// Drops the use memory holds for a session whose record now holds it
    /// (or which is gone); its stripe lock is held.
    pub(super) fn forget_use(&self, id: &[u8; 16]) {
        self.inner.uses.shard(id).remove(id);
    }

    /// Writes the uses the log does not hold yet, in whole pages, and syncs
    /// them. Blocking: the lazy flush runs it on the blocking pool. At the
    /// disk's reserve nothing is written (the uses wait in memory).
    pub fn write_uses(&self) -> Result<()> {
        let uses = &self.inner.uses;
        let Some(mut log) = uses.try_log() else {
            // The last write has not returned: this round's uses wait for
            // the next.
            return Ok(());
        };
        let mut chunk: Vec<Entry> = Vec::new();
        let mut wrote = false;
        let mut written = Ok(());
        for shard in &uses.shards {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (id, u) in map.iter_mut().filter(|(_, u)| !u.logged) {
                u.logged = true;
                chunk.push((*id, u.count, u.last));
            }
            drop(map);
            while written.is_ok() && chunk.len() >= CHUNK_ENTRIES {
                written = self.write_chunk(&mut log, &chunk[..CHUNK_ENTRIES]);
                chunk.drain(..CHUNK_ENTRIES);
                wrote = true;
            }
            if written.is_err() {
                break;
            }
        }
        if written.is_ok() && !chunk.is_empty() {
            written = self.write_chunk(&mut log, &chunk);
            wrote = true;
        }
        if written.is_ok() && wrote {
            written = log.file.sync_data().map_err(|e| self.log_failed(e));
        }
        uses.end.store(log.end, Ordering::Relaxed);
        drop(log);
        match written {
            Ok(()) => {
                if wrote {
                    uses.syncs.fetch_add(1, Ordering::Relaxed);
                }
                // After a failed write, a round with nothing to write (the
                // uses went to their records) lets the next uses try the
                // log again.
                uses.healthy.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // Every use is written again by the next flush.
                uses.unlog_all();
                match e {
                    super::super::StoreError::DiskFull { .. } => Ok(()),
                    e => Err(e),
                }
            }
        }
    }

    /// Writes (without syncing) one chunk of entries, unless the disk is
    /// at its reserve.
    fn write_chunk(&self, log: &mut UseLog, chunk: &[Entry]) -> Result<()> {
        self.check_space(Space::Write)?;
        log.write(chunk).map_err(|e| self.log_failed(e))
    }

    /// A write of the log that failed: the log's own fault, not the
    /// database's (sled keeps serving). Uses write their records until a
    /// later flush writes the log again; those in memory are folded into
    /// their records at the next round.
    fn log_failed(&self, e: io::Error) -> super::super::StoreError {
        self.inner.uses.healthy.store(false, Ordering::Relaxed);
        let e = if e.raw_os_error() == Some(libc::ENOSPC) {
            DiskError::NoSpace(format!("writing {FILE_NAME} failed: {e}"))
        } else {
            DiskError::Fault(format!("writing {FILE_NAME} failed: {e}"))
        };
        e.into()
    }

    /// Re-reads the log's current generation into memory (after the
    /// database was reopened: record writes it had not synced, a fold's
    /// among them, are gone, and the uses they carried are in the log).
    pub(super) fn reload_uses(&self) -> Result<()> {
        let path = self.inner.uses.try_log().map(|log| log.path.clone());
        let Some(path) = path else {
            // A write still running: the disk is not back yet.
            return Ok(());
        };
        let read = read_current(&path).map_err(|e| {
            super::super::StoreError::DiskFault(format!("reading {FILE_NAME} failed: {e}"))
        })?;
        self.inner.uses.merge_logged(read.uses);
        Ok(())
    }

    /// Whether the log is due a fold into the records.
    pub fn uses_due_fold(&self) -> bool {
        let entries = self.inner.uses.entries();
        self.uses_log_bytes() >= FOLD_LOG_BYTES
            || entries >= FOLD_ENTRIES
            || (entries > 0 && !self.inner.uses.healthy.load(Ordering::Relaxed))
    }

    /// Writes each session's use memory holds into its record, session by
    /// session under its lock (requests wait for one record at a time).
    /// The caller then makes the records durable and empties the log
    /// ([`clear_uses_log`](Self::clear_uses_log)). Blocking. Returns the
    /// records written.
    pub fn fold_uses(&self) -> Result<usize> {
        self.check_space(Space::Write)?;
        let mut folded = 0;
        for shard in &self.inner.uses.shards {
            for id in ids_in(shard) {
                let _guard = self.lock(&id);
                let Some(u) = self.inner.uses.shard(&id).remove(&id) else {
                    continue;
                };
                let written = self.load(&id).and_then(|stored| match stored {
                    Some(stored) => {
                        let mut new = stored.clone();
                        u.apply(&mut new, &self.inner.limits);
                        self.put_locked(Some(&stored), &new).map(|()| 1)
                    }
                    None => Ok(0),
                });
                match written {
                    Ok(n) => folded += n,
                    Err(e) => {
                        // Back in memory (and in the log): a later fold
                        // writes it.
                        self.inner.uses.merge_in(id, u);
                        return Err(self.noted(e));
                    }
                }
            }
        }
        Ok(folded)
    }

    /// Empties the log once the fold's records are durable; uses counted
    /// since the fold are written again by the next flush.
    pub fn clear_uses_log(&self) {
        let uses = &self.inner.uses;
        let Some(mut log) = uses.try_log() else {
            // A write still running (stuck): the log is not started again
            // this time; its entries, already in the records, do no harm.
            return;
        };
        log.clear();
        uses.end.store(0, Ordering::Relaxed);
        drop(log);
        uses.unlog_all();
    }

    /// Syncs of the uses' log.
    pub(super) fn uses_syncs(&self) -> u64 {
        self.inner.uses.syncs.load(Ordering::Relaxed)
    }

    /// Bytes of the uses' log's current generation.
    pub fn uses_log_bytes(&self) -> u64 {
        self.inner.uses.end.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Journal, LocalLimits, Trees};
    use super::*;
    use crate::session::Limits;

    const LIMITS: Limits = Limits {
        ttl_ms: 60_000,
        max_lifetime_ms: 600_000,
        max_metadata_bytes: 1024,
    };

    fn open(dir: &Path) -> SledStore {
        let local = LocalLimits {
            cache_bytes: 1 << 20,
            max_journal_bytes: 1 << 20,
            min_free_bytes: 0,
            flush_timeout: std::time::Duration::from_secs(5),
        };
        SledStore::open(dir, local, LIMITS).unwrap()
    }

    /// A session made at t=1000 and used `uses` times, a second apart.
    fn used(store: &SledStore, uses: u64) -> [u8; 16] {
        let s = Session::new("u".into(), "{}".into(), 1_000, &LIMITS);
        store.create(&s, Journal::Off).unwrap();
        for i in 1..=uses {
            store.touch(&s.id, 1_000 + i * 1_000, Journal::Off).unwrap();
        }
        s.id
    }

    /// The record as sled holds it, without the uses memory holds.
    fn record(store: &SledStore, id: &[u8; 16]) -> Session {
        let bytes = store.t().unwrap().sessions().get(id).unwrap().unwrap();
        Session::decode(&bytes).unwrap()
    }

    #[test]
    fn uses_are_served_from_memory_and_survive_a_restart_through_the_log_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = used(&store, 5);
        let served = store.get(&id, 7_000).unwrap().unwrap();
        assert_eq!((served.request_count, served.last_accessed), (5, 6_000));
        assert_eq!(served.expires_at, 66_000);
        store.write_uses().unwrap();
        store.inner.db.flush_for_test().unwrap();
        // The record was never rewritten: the uses are the log's.
        assert_eq!(record(&store, &id).request_count, 0);
        assert_eq!(store.uses_log_bytes(), PAGE as u64);
        // Nothing new: the next flush writes nothing.
        store.write_uses().unwrap();
        assert_eq!(store.uses_log_bytes(), PAGE as u64);
        drop(store);
        let store = open(dir.path());
        let back = store.get(&id, 7_000).unwrap().unwrap();
        assert_eq!(back, served);
    }

    #[test]
    fn a_fold_writes_each_use_into_its_record_and_empties_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = used(&store, 5);
        store.write_uses().unwrap();
        assert_eq!(store.fold_uses().unwrap(), 1);
        store.inner.db.flush_for_test().unwrap();
        store.clear_uses_log();
        assert_eq!(store.uses_log_bytes(), 0);
        let r = record(&store, &id);
        assert_eq!(
            (r.request_count, r.last_accessed, r.expires_at),
            (5, 6_000, 66_000)
        );
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.get(&id, 7_000).unwrap().unwrap().request_count, 5);
    }

    #[test]
    fn a_change_takes_the_use_into_the_record_and_a_delete_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = used(&store, 3);
        let patch = crate::session::Patch {
            user_id: None,
            metadata: serde_json::from_str(r#"{"a":1}"#).ok(),
        };
        store.patch(&id, &patch, None, 8_000, Journal::Off).unwrap();
        assert_eq!(record(&store, &id).request_count, 3);
        assert!(store.inner.uses.shard(&id).get(&id).is_none());
        store.touch(&id, 9_000, Journal::Off).unwrap();
        assert!(store.delete(&id, 10_000, Journal::Off).unwrap());
        assert!(store.inner.uses.shard(&id).get(&id).is_none());
        assert!(store.get(&id, 10_000).unwrap().is_none());
    }

    #[test]
    fn a_page_that_fails_its_checksum_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = used(&store, 2);
        store.write_uses().unwrap();
        let b = used(&store, 3);
        store.write_uses().unwrap();
        store.inner.db.flush_for_test().unwrap();
        drop(store);
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, FOLD_LOG_BYTES, "allocated at once");
        bytes[HEADER] ^= 0xff;
        // And a page torn after them, as a power cut mid-write leaves.
        bytes[2 * PAGE..2 * PAGE + 100].fill(7);
        std::fs::write(&path, &bytes).unwrap();
        let store = open(dir.path());
        assert_eq!(store.corrupt_records(), 2);
        assert_eq!(store.get(&a, 7_000).unwrap().unwrap().request_count, 0);
        assert_eq!(store.get(&b, 7_000).unwrap().unwrap().request_count, 3);
        // New pages go after the torn one.
        store.touch(&a, 8_000, Journal::Off).unwrap();
        store.write_uses().unwrap();
        assert_eq!(store.uses_log_bytes(), 4 * PAGE as u64);
    }

    /// Memory holds at most `SHARD_ENTRIES` sessions' uses a shard; the
    /// uses of the sessions beyond write their records, as before the log.
    #[test]
    fn beyond_its_bound_memory_takes_no_more_uses_and_the_records_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let ids: Vec<[u8; 16]> = (0..SHARD_ENTRIES as u64 + 4)
            .map(|i| {
                let mut s = Session::new("u".into(), "{}".into(), 1_000, &LIMITS);
                // All in one shard: the first 8 bytes, mod 64, are 0.
                s.id[..8].copy_from_slice(&(i * LOCK_STRIPES as u64).to_le_bytes());
                store.create(&s, Journal::Off).unwrap();
                store.touch(&s.id, 2_000, Journal::Off).unwrap();
                s.id
            })
            .collect();
        assert_eq!(store.inner.uses.entries(), SHARD_ENTRIES);
        let in_records = ids
            .iter()
            .filter(|id| record(&store, id).request_count == 1)
            .count();
        assert_eq!(in_records, 4);
        assert!(ids
            .iter()
            .all(|id| store.get(id, 3_000).unwrap().unwrap().request_count == 1));
    }

    /// A log that cannot be written is the log's fault only: the uses go
    /// into their records until a later flush writes the log again.
    #[test]
    fn when_the_log_cannot_be_written_uses_go_to_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = used(&store, 2);
        // Open for reading only: every write fails (EBADF).
        store.inner.uses.log.lock().unwrap().file = File::open(dir.path().join(FILE_NAME)).unwrap();
        assert!(store.write_uses().is_err());
        assert!(store.fault().is_none(), "the database is not at fault");
        assert!(
            store.uses_due_fold(),
            "what memory holds goes to the records"
        );
        store.touch(&id, 9_000, Journal::Off).unwrap();
        assert_eq!(record(&store, &id).request_count, 3);
        assert_eq!(store.fold_uses().unwrap(), 0, "the record took it already");
        store.write_uses().unwrap();
        store.touch(&id, 10_000, Journal::Off).unwrap();
        assert_eq!(record(&store, &id).request_count, 3, "memory again");
        assert_eq!(store.get(&id, 10_000).unwrap().unwrap().request_count, 4);
    }

    /// Record writes a failed sync lost (a reopen of the database) take the
    /// uses back from the log.
    #[test]
    fn uses_folded_into_records_that_were_lost_come_back_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = used(&store, 4);
        let before = store.t().unwrap().sessions().get(id).unwrap().unwrap();
        store.write_uses().unwrap();
        assert_eq!(store.fold_uses().unwrap(), 1);
        // As if the fold's record write had never reached the disk.
        store.put_raw_for_test(&id, &before).unwrap();
        assert_eq!(store.get(&id, 7_000).unwrap().unwrap().request_count, 0);
        store.reload_uses().unwrap();
        assert_eq!(store.get(&id, 7_000).unwrap().unwrap().request_count, 4);
    }

    /// After a fold the log starts again at its first page: a start reads
    /// the new generation's pages and stops at the first of the old.
    #[test]
    fn after_a_fold_the_log_is_written_over_and_read_only_to_its_new_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let ids: Vec<_> = (0..3)
            .map(|_| {
                let id = used(&store, 2);
                store.write_uses().unwrap();
                id
            })
            .collect();
        assert_eq!(store.uses_log_bytes(), 3 * PAGE as u64);
        assert_eq!(store.fold_uses().unwrap(), 3);
        store.inner.db.flush_for_test().unwrap();
        store.clear_uses_log();
        store.touch(&ids[0], 9_000, Journal::Off).unwrap();
        store.write_uses().unwrap();
        assert_eq!(store.uses_log_bytes(), PAGE as u64);
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.uses_log_bytes(), PAGE as u64);
        assert_eq!(store.inner.uses.entries(), 1);
        let counts: Vec<_> = ids
            .iter()
            .map(|id| store.get(id, 9_500).unwrap().unwrap().request_count)
            .collect();
        assert_eq!(counts, [3, 2, 2]);
        assert_eq!(store.corrupt_records(), 0);
    }

    #[test]
    fn pages_round_trip_and_a_torn_page_is_refused() {
        let entries: Vec<_> = (0..300u64)
            .map(|i| ([i as u8; 16], i * 3, 1_000 + i))
            .collect();
        let mut buf = vec![0u8; 3 * PAGE];
        for (chunk, page) in entries.chunks(PER_PAGE).zip(buf.chunks_mut(PAGE)) {
            encode_page(7, chunk, page);
        }
        let back: Vec<_> = buf
            .chunks(PAGE)
            .flat_map(|p| {
                let (generation, entries) = decode_page(p).unwrap();
                assert_eq!(generation, 7);
                entries
            })
            .collect();
        assert_eq!(back, entries);
        let mut torn = buf[..PAGE].to_vec();
        torn[HEADER + 5] ^= 1;
        assert!(decode_page(&torn).is_none());
        assert!(decode_page(&buf[..PAGE - 1]).is_none());
        assert!(decode_page(&[0u8; PAGE]).is_none());
    }
}

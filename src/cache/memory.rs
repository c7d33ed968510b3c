//! The node's in-memory tier: a map bounded in bytes, least recently used
//! first out.
//!
//! Hand-written rather than a crate: what fits (moka and friends) brings
//! housekeeping threads or a few hundred KB of binary, and the release for
//! the Pi has about a hundred KB to spare. This is a hash map into a slab of
//! slots linked in recency order, cut into a few shards so that concurrent
//! hits on a small board's cores rarely wait on one lock. Each shard holds
//! at most its share of the budget; what a value costs is its key, its
//! content type and body plus a fixed allowance for the bookkeeping, so the
//! bound is on the memory the tier really uses, not on entry counts.
//!
//! Coherence with the other nodes rests on two numbers kept here:
//! - each entry's `seq`, the node-local sequence number taken *before* the
//!   value was read or written, which the caller compares with the purge
//!   floors of [`super::Cache`];
//! - each shard's invalidation count, bumped by every [`Memory::remove`]: a
//!   value read from Redis is only placed if no invalidation reached its
//!   shard since the read began ([`Memory::ticket`]), so a fill that raced a
//!   deletion on another node never brings the old value back.

use super::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Shards of the map. Eight: more than a Pi's cores, and each keeps an
/// eighth of the budget, so a value may be up to an eighth of it.
const SHARDS: usize = 8;

/// What one entry costs besides its key, content type and body: the slot,
/// the hash map's share, the `Arc<Entry>` and the key's allocation.
pub const ENTRY_OVERHEAD: usize = 160;

const NIL: usize = usize::MAX;

pub struct Memory {
    shards: Vec<Mutex<Shard>>,
    shard_budget: usize,
    bytes: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Arc<str>, usize>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Most recently used.
    head: usize,
    /// Least recently used: evicted first.
    tail: usize,
    bytes: usize,
    /// Bumped by every invalidation of a key of this shard.
    invalidations: u64,
}

struct Slot {
    /// `None` while the slot is on the free list.
    key: Option<Arc<str>>,
    entry: Option<Arc<Entry>>,
    seq: u64,
    cost: usize,
    prev: usize,
    next: usize,
}

/// What a key and its value cost in the tier.
pub fn cost(key: &str, e: &Entry) -> usize {
    key.len() + e.content_type.len() + e.body.len() + ENTRY_OVERHEAD
}

impl Memory {
    /// A tier of at most `budget` bytes; 0 turns it off.
    pub fn new(budget: u64) -> Memory {
        Memory {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        head: NIL,
                        tail: NIL,
                        ..Shard::default()
                    })
                })
                .collect(),
            shard_budget: usize::try_from(budget / SHARDS as u64).unwrap_or(usize::MAX),
            bytes: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn budget(&self) -> u64 {
        (self.shard_budget as u64).saturating_mul(SHARDS as u64)
    }

    /// Entries pushed out to make room (not expiries nor invalidations).
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        // FNV-1a: only spreads keys over the shards; the map hashes again.
        let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        self.shards[(h % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The entry under `key` if it is live and `valid(seq)` holds; a stale
    /// or expired one is dropped. A hit becomes the most recently used.
    pub fn get(&self, key: &str, now_ms: u64, valid: impl Fn(u64) -> bool) -> Option<Arc<Entry>> {
        let mut s = self.shard(key);
        let i = *s.map.get(key)?;
        let slot = &s.slots[i];
        match &slot.entry {
            Some(e) if e.expires_at > now_ms && valid(slot.seq) => {
                let e = e.clone();
                s.unlink(i);
                s.push_front(i);
                Some(e)
            }
            _ => {
                let freed = s.remove_at(i);
                self.bytes.fetch_sub(freed as u64, Ordering::Relaxed);
                None
            }
        }
    }

    /// The shard's invalidation count now, for [`insert`](Self::insert).
    pub fn ticket(&self, key: &str) -> u64 {
        self.shard(key).invalidations
    }

    /// Stores `entry` (read or written under the node-local `seq`), unless
    /// an invalidation reached the key's shard since `ticket` was taken.
    /// A value over the shard's share of the budget is not kept (and drops
    /// an older one under the key). Evicts least recently used entries
    /// until the shard is within its share.
    pub fn insert(&self, key: &str, entry: Arc<Entry>, seq: u64, ticket: Option<u64>) {
        if self.shard_budget == 0 {
            return;
        }
        let cost = cost(key, &entry);
        let mut s = self.shard(key);
        if ticket.is_some_and(|t| t != s.invalidations) {
            return;
        }
        let mut freed = 0;
        if let Some(&i) = s.map.get(key) {
            freed += s.remove_at(i);
        }
        if cost <= self.shard_budget {
            while s.bytes + cost > self.shard_budget && s.tail != NIL {
                let t = s.tail;
                freed += s.remove_at(t);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
            let key: Arc<str> = Arc::from(key);
            let slot = Slot {
                key: Some(key.clone()),
                entry: Some(entry),
                seq,
                cost,
                prev: NIL,
                next: NIL,
            };
            let i = match s.free.pop() {
                Some(i) => {
                    s.slots[i] = slot;
                    i
                }
                None => {
                    s.slots.push(slot);
                    s.slots.len() - 1
                }
            };
            s.map.insert(key, i);
            s.push_front(i);
            s.bytes += cost;
            self.bytes.fetch_add(cost as u64, Ordering::Relaxed);
        }
        self.bytes.fetch_sub(freed as u64, Ordering::Relaxed);
    }

    /// Drops `key` and counts an invalidation of its shard (see
    /// [`ticket`](Self::ticket)). Whether it was held.
    pub fn remove(&self, key: &str) -> bool {
        let mut s = self.shard(key);
        s.invalidations = s.invalidations.wrapping_add(1);
        let Some(&i) = s.map.get(key) else {
            return false;
        };
        let freed = s.remove_at(i);
        self.bytes.fetch_sub(freed as u64, Ordering::Relaxed);
        true
    }
}

impl Shard {
    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.slots[i].prev, self.slots[i].next);
        match prev {
            NIL => self.head = next,
            p => self.slots[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n].prev = prev,
        }
    }

    fn push_front(&mut self, i: usize) {
        self.slots[i].prev = NIL;
        self.slots[i].next = self.head;
        match self.head {
            NIL => self.tail = i,
            h => self.slots[h].prev = i,
        }
        self.head = i;
    }

    /// Frees slot `i` and returns the bytes it cost.
    fn remove_at(&mut self, i: usize) -> usize {
        self.unlink(i);
        let slot = &mut self.slots[i];
        slot.entry = None;
        if let Some(key) = slot.key.take() {
            self.map.remove(&key);
        }
        let slot = &mut self.slots[i];
        let cost = std::mem::take(&mut slot.cost);
        self.free.push(i);
        self.bytes -= cost;
        cost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(n: usize) -> Arc<Entry> {
        Arc::new(Entry {
            content_type: "text/plain".into(),
            etag: 1,
            stored_at: 0,
            expires_at: u64::MAX,
            body: Bytes::from(vec![7u8; n]),
        })
    }

    #[test]
    fn stays_within_its_budget_and_evicts_the_least_recently_used() {
        let m = Memory::new(8 * 4096);
        for i in 0..1000 {
            m.insert(&format!("k{i}"), entry(1000), i, None);
            assert!(m.bytes() <= m.budget(), "{} > {}", m.bytes(), m.budget());
        }
        assert!(m.evictions() > 900);
        assert!(m.get("k999", 1, |_| true).is_some());
        assert!(m.get("k0", 1, |_| true).is_none());
    }

    #[test]
    fn a_hit_is_kept_over_colder_entries() {
        let m = Memory::new(8 * 2000);
        // all in one shard or not, "hot" is read between inserts
        m.insert("hot", entry(100), 1, None);
        for i in 0..200 {
            m.insert(&format!("c{i}"), entry(100), 2, None);
            assert!(m.get("hot", 1, |_| true).is_some(), "evicted at {i}");
        }
    }

    #[test]
    fn invalidation_beats_a_racing_fill_and_stale_or_expired_entries_go() {
        let m = Memory::new(1 << 20);
        let t = m.ticket("k");
        m.remove("k");
        m.insert("k", entry(10), 5, Some(t));
        assert!(
            m.get("k", 1, |_| true).is_none(),
            "a fill older than the invalidation"
        );
        m.insert("k", entry(10), 5, Some(m.ticket("k")));
        assert!(m.get("k", 1, |seq| seq > 5).is_none(), "below the floor");
        assert_eq!(m.bytes(), 0);
        m.insert("k", entry(10), 6, None);
        assert!(m.get("k", u64::MAX, |_| true).is_none(), "expired");
        assert_eq!(m.bytes(), 0);
        m.insert("big", entry(1 << 20), 7, None);
        assert!(m.get("big", 1, |_| true).is_none(), "over a shard's share");
        assert_eq!(m.bytes(), 0);
    }
}

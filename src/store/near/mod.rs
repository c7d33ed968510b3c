//! The near cache: the sessions this node serves in Redis mode, held in
//! memory so that a touch (`GET /api/session`) costs no Redis round trip.
//!
//! This module alone reads and writes it, so its rules (when a copy may be
//! served, when a count has landed) are kept in one room: this file holds
//! the copies, the pending counts and the tickets; `serve` what the routing
//! of each operation asks of it; `write_behind` how counts leave it; `push`
//! what the tracking connection hears. The Redis adapter opens that
//! connection and reads over it, and tells the cache through
//! [`crate::store::redis::TrackingSink`]; it never sees the cache itself.
//!
//! Redis keeps it coherent. The node reads sessions into the cache over a
//! connection of its own on which Redis tracks what it read (`CLIENT
//! TRACKING`, see `store::redis::tracking`); any later change of such a key,
//! by any node or tool, and its expiry or eviction, makes Redis push an
//! invalidation on that connection, which lands here
//! (`NearCache::invalidate`). When the connection is down the cache is
//! empty and bypassed (`NearCache::link_down`): nothing is served from it
//! that Redis could not have invalidated.
//!
//! A touch of a cached session counts and slides the copy here and adds one
//! to the session's *pending* count. The store's flusher writes pending counts
//! behind, each session's once per `touch_flush_ms`, 64 sessions to a
//! script call (`NearCache::take_pending`). Pending counts live apart from the copies:
//! an invalidation drops a copy, never a count a request was answered with.
//!
//! A copy read from Redis can race an invalidation of that very key (the
//! read's answer and the invalidation arrive on different paths to the
//! cache). So a fill takes a [`Ticket`] before it asks Redis: a count per slot
//! of ids that every invalidation bumps. The copy is stored only if no
//! invalidation of its slot (and no link change) happened in between.
//!
//! The cache is bounded in bytes (each copy's estimated heap size), split
//! over shards; a full shard evicts copies not used since the last sweep
//! (the clock algorithm) before older ones.

mod admit;
mod push;
mod serve;
mod write_behind;

pub use write_behind::Near;

use crate::session::{Limits, Session};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

const SHARDS: usize = 16;
/// Invalidation slots: a fill is refused when an invalidation of any id
/// sharing its slot happened meanwhile, so more slots mean fewer needless
/// refusals under a storm of invalidations.
const SLOTS: usize = 4096;
/// What a copy costs besides its strings' bytes: its slot in the map (key
/// and entry, at the table's 7/8 load, plus a control byte), its place on
/// the eviction clock and the allocator's header of each of the two strings.
const ENTRY_OVERHEAD: usize = (16 + std::mem::size_of::<Entry>()) * 8 / 7 + 1 + 16 + 2 * 16;

/// Requests counted here and not yet written to Redis, for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub count: u64,
    /// The latest request's time: Redis's `last_accessed` and expiry follow it.
    pub at: u64,
    /// The highest count this node answered with these counts included:
    /// a read of Redis that crosses their flush answers past it (see
    /// `count_read`).
    pub answered: u64,
}

type PendingMap = HashMap<[u8; 16], Pending>;

/// Taken before a fill asks Redis; see the module doc.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    slot: u32,
    generation: u64,
}

struct Entry {
    session: Session,
    size: usize,
    /// Used since the last eviction sweep passed it.
    referenced: bool,
}

#[derive(Default)]
struct Shard {
    map: HashMap<[u8; 16], Entry>,
    bytes: usize,
    /// The clock's face: ids in the order the sweep visits them (filled
    /// ones join at the back). May hold ids no longer cached, and an id
    /// twice after a re-fill; `enqueue` bounds it.
    clock: VecDeque<[u8; 16]>,
}

impl Shard {
    /// A fill joins the clock; an ever-growing face (copies invalidated
    /// and filled again while nothing is evicted) is rebuilt from the map.
    fn enqueue(&mut self, id: [u8; 16]) {
        self.clock.push_back(id);
        if self.clock.len() > 2 * self.map.len() + 64 {
            self.clock = self.map.keys().copied().collect();
        }
    }
}

/// Counters for health and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct NearStats {
    pub hits: u64,
    pub misses: u64,
    pub invalidations: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub entries: u64,
    pub capacity_bytes: u64,
    pub link_up: bool,
    /// Requests counted here and not yet written to Redis.
    pub pending: u64,
    /// Uses of sessions not used again within `near_admit_ms`: counted in
    /// Redis at once, not cached (see `admit`).
    pub unadmitted: u64,
}

pub struct NearCache {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: usize,
    limits: Limits,
    slots: Box<[AtomicU32]>,
    /// Bumped whenever the link goes down or up and on a flush of
    /// everything: fills that began before are not stored.
    generation: AtomicU64,
    /// The tracking connection is up: the cache may serve.
    up: AtomicBool,
    pending: Box<[Mutex<PendingMap>]>,
    /// Sessions whose counts a flush has taken and not yet written, with
    /// the highest count this node answered with them (`Pending::answered`).
    in_flight: Mutex<HashMap<[u8; 16], u64>>,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    evictions: AtomicU64,
}

fn shard_of(id: &[u8; 16]) -> usize {
    // Ids are random (UUID v4 from the OS CSPRNG): any byte spreads them.
    usize::from(id[0]) % SHARDS
}

fn slot_of(id: &[u8; 16]) -> usize {
    usize::from(u16::from_le_bytes([id[1], id[2]])) % SLOTS
}

fn size_of_copy(s: &Session) -> usize {
    // malloc hands out at least 32 bytes, in steps of 16
    let alloc = |n: usize| n.max(24).next_multiple_of(16);
    ENTRY_OVERHEAD + alloc(s.user_id.capacity()) + alloc(s.metadata.capacity())
}

impl NearCache {
    /// A cache of at most `capacity_bytes` of session copies.
    fn new(capacity_bytes: u64, limits: Limits) -> NearCache {
        let capacity = usize::try_from(capacity_bytes).unwrap_or(usize::MAX);
        NearCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_capacity: capacity / SHARDS,
            limits,
            slots: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
            generation: AtomicU64::new(0),
            up: AtomicBool::new(false),
            pending: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            in_flight: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: &[u8; 16]) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard_of(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn pending_shard(
        &self,
        id: &[u8; 16],
    ) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], Pending>> {
        self.pending[shard_of(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Counts a request on a cached session and returns it; `None` when the
    /// session is not cached (or the cache is bypassed): ask Redis.
    fn touch(&self, id: &[u8; 16], now: u64) -> Option<Session> {
        if !self.is_up() {
            return None;
        }
        let mut shard = self.shard(id);
        let entry = shard.map.get_mut(id)?;
        if entry.session.is_expired(now) {
            // Redis drops it at the same time; its answer (404, or a new
            // session) is Redis's to give.
            let size = entry.size;
            shard.map.remove(id);
            shard.bytes -= size;
            return None;
        }
        entry.session.touch(now, &self.limits);
        entry.referenced = true;
        let answer = entry.session.clone();
        drop(shard);
        self.add_pending(id, 1, now, answer.request_count);
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(answer)
    }

    fn add_pending(&self, id: &[u8; 16], count: u64, at: u64, answered: u64) {
        let mut pending = self.pending_shard(id);
        let p = pending.entry(*id).or_insert(Pending {
            count: 0,
            at,
            answered,
        });
        p.count += count;
        p.at = p.at.max(at);
        p.answered = p.answered.max(answered);
    }

    /// Before a read of the session from Redis whose answer will be
    /// counted (`count_read`): the highest count this node answered with
    /// counts not yet written (waiting, or in a flush that has not landed).
    fn answered_unwritten(&self, id: &[u8; 16]) -> u64 {
        let waiting = self.pending_shard(id).get(id).map_or(0, |p| p.answered);
        let flying = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        waiting.max(flying.get(id).copied().unwrap_or(0))
    }

    /// Before a fill asks Redis.
    fn ticket(&self, id: &[u8; 16]) -> Ticket {
        // The generation first: a link change between the two reads then
        // shows as a generation change.
        let generation = self.generation.load(Ordering::Acquire);
        Ticket {
            slot: self.slots[slot_of(id)].load(Ordering::Acquire),
            generation,
        }
    }

    /// Counts a request on a session read from Redis, written behind like a
    /// cached touch, without keeping a copy. Returns the session as the
    /// request should see it: Redis's count plus the counts this node has
    /// not written yet, this request's included.
    ///
    /// `answered`: what `answered_unwritten` said before the read was sent.
    /// A read that crossed the flush carrying this node's counts cannot
    /// tell whether Redis had applied them (the flush and the read travel
    /// apart, and the counts leave the waiting map when the flush takes
    /// them), so the answer is never below one more than that: this node
    /// never gives a browser's visit the number it gave the visit before
    /// (CI saw a node answer 35 twice). Redis's own count stays exact;
    /// only another node's visit in between can make two nodes answer
    /// the same number, which the design allows.
    fn count_read(&self, mut session: Session, answered: u64, now: u64) -> Session {
        let id = session.id;
        let mut pending = self.pending_shard(&id);
        let waiting = pending.get(&id).map_or(0, |p| p.count);
        session.request_count = session.request_count.saturating_add(waiting).max(answered);
        session.touch(now, &self.limits);
        let p = pending.entry(id).or_insert(Pending {
            count: 0,
            at: now,
            answered: 0,
        });
        p.count += 1;
        p.at = p.at.max(now);
        p.answered = p.answered.max(session.request_count);
        session
    }

    /// Counts a request on a session read from Redis (over the tracking
    /// connection, after `ticket`) and stores the copy, unless an
    /// invalidation or a link change came in between. Returns the session as
    /// the request should see it: Redis's count plus the counts this node has
    /// not written yet, this request's included.
    fn fill(&self, session: Session, answered: u64, ticket: Ticket, now: u64) -> Session {
        let session = self.count_read(session, answered, now);
        let id = session.id;
        self.misses.fetch_add(1, Ordering::Relaxed);
        // A flush of its counts is on its way: Redis's answer may or may
        // not include them, so the copy's count could be short. Served,
        // not kept.
        if !self.is_up() || self.shard_capacity == 0 || self.in_flight(&id) {
            return session;
        }
        let size = size_of_copy(&session);
        let mut shard = self.shard(&id);
        // Checked under the shard lock, which `invalidate` also takes after
        // bumping the slot: an invalidation either shows here or removes the
        // copy after it is stored.
        if self.slots[slot_of(&id)].load(Ordering::Acquire) != ticket.slot
            || self.generation.load(Ordering::Acquire) != ticket.generation
        {
            return session;
        }
        if size > self.shard_capacity {
            return session;
        }
        if let Some(old) = shard.map.remove(&id) {
            shard.bytes -= old.size;
        }
        let evicted = evict(&mut shard, self.shard_capacity - size);
        shard.bytes += size;
        shard.map.insert(
            id,
            Entry {
                session: session.clone(),
                size,
                referenced: false,
            },
        );
        shard.enqueue(id);
        drop(shard);
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
        session
    }

    /// Redis (or this node) changed the session: its copy goes, and a fill
    /// in progress is not stored.
    fn invalidate(&self, id: &[u8; 16]) {
        self.slots[slot_of(id)].fetch_add(1, Ordering::AcqRel);
        let mut shard = self.shard(id);
        if let Some(old) = shard.map.remove(id) {
            shard.bytes -= old.size;
            drop(shard);
            self.invalidations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops every copy (Redis flushed its data, or the node cannot tell
    /// what changed).
    fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let n = shard.map.len() as u64;
            shard.map = HashMap::new();
            shard.clock = VecDeque::new();
            shard.bytes = 0;
            drop(shard);
            self.invalidations.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The tracking connection is gone: nothing cached can be trusted and
    /// nothing is served from the cache until [`link_up`](Self::link_up).
    fn link_down(&self) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::debug!("near cache bypassed: its invalidation stream is down");
        }
        self.invalidate_all();
    }

    /// A new tracking connection is up (and empty-handed: the cache was
    /// emptied when the last one went down).
    fn link_up(&self) {
        self.invalidate_all();
        self.up.store(true, Ordering::Release);
    }

    /// The counts waiting to be written, taken (the flusher writes them, or
    /// journals them in an outage). Marks them in flight.
    fn take_pending(&self) -> Vec<([u8; 16], Pending)> {
        let mut out = Vec::new();
        for shard in self.pending.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            if shard.is_empty() {
                continue;
            }
            let from = out.len();
            out.extend(shard.drain());
            // Marked while the shard is still locked: a session is always
            // in one of the two maps until its counts land (a read in
            // between would otherwise see no counts unwritten at all).
            self.mark_in_flight(&out[from..]);
        }
        out
    }

    /// Counts taken to be written: in flight until `landed`, with the
    /// highest count this node answered with them (see `count_read`).
    /// Called with their pending shard locked (locks: shard, then this).
    fn mark_in_flight(&self, taken: &[([u8; 16], Pending)]) {
        let mut flying = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for (id, p) in taken {
            let w = flying.entry(*id).or_insert(0);
            *w = (*w).max(p.answered);
        }
    }

    /// One session's counts waiting to be written (not taken).
    fn pending_count(&self, id: &[u8; 16]) -> u64 {
        self.pending_shard(id).get(id).map_or(0, |p| p.count)
    }

    /// One session's counts waiting to be written, taken (to be dropped or
    /// moved: a delete, a rotation).
    fn take_pending_of(&self, id: &[u8; 16]) -> Option<Pending> {
        self.pending_shard(id).remove(id)
    }

    /// One session's counts waiting to be written, taken to be written now
    /// (`write_behind` lands them): in flight meanwhile, like a flush's.
    fn take_pending_to_write(&self, id: &[u8; 16]) -> Option<Pending> {
        let mut shard = self.pending_shard(id);
        let p = shard.remove(id)?;
        self.mark_in_flight(&[(*id, p)]);
        Some(p)
    }

    /// Counts that could not be written go back (Redis refused the batch
    /// as a whole without applying any of it).
    fn restore_pending(&self, id: &[u8; 16], p: Pending) {
        self.add_pending(id, p.count, p.at, p.answered);
    }

    /// A flush's counts are written (or journaled).
    fn landed(&self, ids: &[[u8; 16]]) {
        let mut flying = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            flying.remove(id);
        }
    }

    /// Whether the session has counts not yet written, waiting or in a
    /// flush that has not answered.
    fn has_unwritten(&self, id: &[u8; 16]) -> bool {
        self.pending_shard(id).contains_key(id) || self.in_flight(id)
    }

    fn in_flight(&self, id: &[u8; 16]) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    /// The cached copy, for the mirror.
    fn copy(&self, id: &[u8; 16]) -> Option<Session> {
        self.shard(id).map.get(id).map(|e| e.session.clone())
    }

    fn stats(&self) -> NearStats {
        let (mut bytes, mut entries) = (0u64, 0u64);
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            bytes += shard.bytes as u64;
            entries += shard.map.len() as u64;
        }
        let pending = self
            .pending
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .map(|p| p.count)
                    .sum::<u64>()
            })
            .sum();
        NearStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes,
            entries,
            capacity_bytes: (self.shard_capacity * SHARDS) as u64,
            link_up: self.is_up(),
            pending,
            unadmitted: 0,
        }
    }
}

/// Frees room in a shard down to `keep` bytes: a CLOCK sweep. The hand
/// goes round the shard's copies in turn (the front of `clock`), gives each
/// copy used since its last pass a second chance (clearing the mark, to the
/// back) and evicts the first ones not used. Going round in turn is what
/// lets every copy's turn come: a sweep that started at the map's first
/// entry each time evicted the copies filled there (the newest, not yet
/// used again) and never reached those further on, so when the sessions in
/// use changed (a spread over 100 000, then over 10 000) yesterday's copies
/// stayed and today's evicted each other (3 of 200 kept in the unit test
/// below). Two turns at most. Returns how many went.
fn evict(shard: &mut Shard, keep: usize) -> u64 {
    let mut evicted = 0;
    let mut budget = 2 * shard.clock.len();
    while shard.bytes > keep && budget > 0 {
        let Some(id) = shard.clock.pop_front() else {
            break;
        };
        budget -= 1;
        // Not cached any more (invalidated, expired): its place goes.
        let Some(e) = shard.map.get_mut(&id) else {
            continue;
        };
        if std::mem::take(&mut e.referenced) {
            shard.clock.push_back(id);
        } else {
            let size = e.size;
            shard.map.remove(&id);
            shard.bytes -= size;
            evicted += 1;
        }
    }
    evicted
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        ttl_ms: 60_000,
        max_lifetime_ms: 600_000,
        max_metadata_bytes: 16384,
    };

    fn session(n: u8) -> Session {
        let mut s = Session::new("u".into(), "{}".into(), 1_000, &LIMITS);
        s.id = [n; 16];
        s
    }

    fn cache() -> NearCache {
        let c = NearCache::new(1 << 20, LIMITS);
        c.link_up();
        c
    }

    /// A cache holding session `n`, filled at 1 000.
    fn filled(n: u8) -> (NearCache, Session) {
        let (c, s) = (cache(), session(n));
        let t = c.ticket(&s.id);
        c.fill(s.clone(), 0, t, 1_000);
        (c, s)
    }

    #[test]
    fn a_cached_touch_counts_and_queues_the_count() {
        let (c, s) = filled(1);
        let a = c.touch(&s.id, 2_000).unwrap();
        let b = c.touch(&s.id, 3_000).unwrap();
        // the fill counted its own request
        assert_eq!((a.request_count, b.request_count), (2, 3));
        assert_eq!(b.last_accessed, 3_000);
        assert_eq!(b.expires_at, 63_000);
        let pending = c.take_pending();
        assert_eq!(
            pending,
            vec![(
                s.id,
                Pending {
                    count: 3,
                    at: 3_000,
                    answered: 3
                }
            )]
        );
        assert!(c.has_unwritten(&s.id), "in flight until landed");
        c.landed(&[s.id]);
        assert!(!c.has_unwritten(&s.id));
    }

    #[test]
    fn an_invalidation_during_a_fill_keeps_the_copy_out() {
        let c = cache();
        let s = session(2);
        let t = c.ticket(&s.id);
        c.invalidate(&s.id);
        c.fill(s.clone(), 0, t, 1_000);
        assert!(c.touch(&s.id, 2_000).is_none());
        // a fresh ticket after it is fine
        let t = c.ticket(&s.id);
        c.fill(s.clone(), 0, t, 1_000);
        assert!(c.touch(&s.id, 2_000).is_some());
        c.invalidate(&s.id);
        assert!(c.touch(&s.id, 2_000).is_none());
    }

    #[test]
    fn nothing_is_served_while_the_link_is_down_nor_filled_across_it() {
        let (c, s) = filled(3);
        c.link_down();
        assert!(c.touch(&s.id, 2_000).is_none());
        let t = c.ticket(&s.id);
        c.link_up();
        c.fill(s.clone(), 0, t, 1_000);
        assert!(
            c.touch(&s.id, 2_000).is_none(),
            "ticket from before the link came up"
        );
    }

    #[test]
    fn a_fill_adds_the_counts_not_yet_written() {
        let (c, s) = filled(4);
        c.touch(&s.id, 2_000);
        c.touch(&s.id, 2_000);
        c.invalidate(&s.id);
        let mut again = s.clone();
        again.request_count = 7; // another node counted meanwhile
        let t = c.ticket(&s.id);
        // 7 in redis, 3 here not yet written, and this request
        assert_eq!(c.fill(again, 0, t, 2_000).request_count, 11);
        assert_eq!(c.touch(&s.id, 2_000).unwrap().request_count, 12);
    }

    /// A session read through (not kept) and used again while the flush
    /// carrying its first count is on its way: whether Redis had applied
    /// that count when it answered the second read or not, the second
    /// visit reads one more than the first, and two counts are written.
    /// (Taken by the periodic flush, or by a settle before a PATCH or a
    /// rotation: in flight either way.)
    #[test]
    fn a_read_that_crosses_the_flush_of_its_counts_answers_one_more() {
        for (applied, by_settle) in [(false, false), (true, false), (false, true), (true, true)] {
            let case = format!("applied: {applied}, taken by a settle: {by_settle}");
            let c = cache();
            let mut s = session(6);
            s.request_count = 5;
            let first = c.count_read(s.clone(), c.answered_unwritten(&s.id), 1_000);
            assert_eq!(first.request_count, 6);
            let taken = match by_settle {
                true => c.take_pending_to_write(&s.id).map_or(0, |p| p.count),
                false => c.take_pending()[0].1.count,
            };
            assert_eq!(taken, 1, "{case}");
            assert!(c.has_unwritten(&s.id), "{case}");
            let before = c.answered_unwritten(&s.id);
            let mut redis = s.clone();
            redis.request_count = if applied { 6 } else { 5 };
            if applied {
                c.landed(&[s.id]);
            }
            let second = c.count_read(redis, before, 2_000);
            assert_eq!(second.request_count, 7, "{case}");
            assert_eq!(c.take_pending()[0].1.count, 1, "{case}");
        }
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let c = NearCache::new(64 * 1024, LIMITS);
        c.link_up();
        for i in 0..10_000u32 {
            let mut s = session(0);
            s.id[..4].copy_from_slice(&i.to_le_bytes());
            let t = c.ticket(&s.id);
            c.fill(s, 0, t, 1_000);
        }
        let st = c.stats();
        assert!(st.bytes <= 64 * 1024, "{st:?}");
        assert!(st.entries > 100, "{st:?}");
        assert!(st.evictions > 0);
    }

    #[test]
    fn an_expired_copy_is_not_served() {
        let (c, s) = filled(5);
        assert!(c.touch(&s.id, s.expires_at).is_none());
    }

    /// A node whose traffic moves to other sessions (a spread over 100 000,
    /// then 10 000 of them) must cache the new ones, not keep the old.
    #[test]
    fn when_the_sessions_in_use_change_the_old_copies_make_room_for_the_new() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut fresh = |_| {
            let mut s = session(0);
            rng.fill(&mut s.id);
            s
        };
        let per_copy = size_of_copy(&session(0));
        let c = NearCache::new((400 * per_copy) as u64, LIMITS);
        c.link_up();
        let use_or_fill = |s: &Session, now: u64| {
            if c.touch(&s.id, now).is_some() {
                return true;
            }
            let t = c.ticket(&s.id);
            c.fill(s.clone(), 0, t, now);
            false
        };
        // Yesterday's sessions, each used once: the cache is full of them.
        for s in (0..2_000).map(&mut fresh).collect::<Vec<_>>() {
            use_or_fill(&s, 1_000);
        }
        // Today's, half the cache's size, each used again and again.
        let today: Vec<Session> = (0..200).map(&mut fresh).collect();
        for round in 0..10 {
            for s in &today {
                use_or_fill(s, 2_000 + round);
            }
        }
        let hits = today.iter().filter(|s| use_or_fill(s, 3_000)).count();
        assert!(hits >= 190, "{hits} of 200 sessions in use were cached");
    }
}

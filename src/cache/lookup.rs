//! `GET`: the nearest tier that can be believed, and fill leases
//! (memcache's): a miss takes the key's lease or waits for another
//! client's fill.

use super::redis::{CacheRedis, Fetched};
use super::{decode, now_ms, Cache, Entry, Lookup, Operation, Tier, MAX_LOCAL_LEASES, RECHECK};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// What [`Cache::find`] found.
enum Found {
    Hit(Arc<Entry>, Tier),
    Miss,
    Granted(String),
    Held,
}

impl Cache {
    /// `GET`: the value, from the nearest tier that can be believed; with
    /// `lease`, a miss takes the fill lease or waits for another's fill.
    pub async fn get(&self, ns: &str, key: &str, lease: bool) -> Lookup {
        let mkey = format!("{ns}/{key}");
        if let Some(e) = self.memory_hit(ns, &mkey) {
            return Lookup::Hit(e, Tier::Memory);
        }
        match self.find(ns, key, &mkey, lease).await {
            Found::Hit(e, t) => Lookup::Hit(e, t),
            Found::Miss => Lookup::Miss { waited: false },
            Found::Granted(token) => {
                self.inner
                    .counters
                    .lease_grants
                    .fetch_add(1, Ordering::Relaxed);
                Lookup::Lease(token)
            }
            Found::Held => self.wait_for_fill(ns, key, &mkey).await,
        }
    }

    /// The memory tier's entry, when the tier can be believed.
    fn memory_hit(&self, ns: &str, mkey: &str) -> Option<Arc<Entry>> {
        if !self.memory_trusted() {
            return None;
        }
        let floor = self.floor(ns);
        let hit = self.inner.memory.get(mkey, now_ms(), |seq| seq > floor);
        self.count(Tier::Memory, hit.is_some());
        hit
    }

    /// Beyond the memory tier: Redis, or while it is unreachable (or
    /// absent) the disk tier and a lease of this node's own. Boxed: two
    /// callers, one state machine in the binary.
    fn find<'a>(
        &'a self,
        ns: &'a str,
        key: &'a str,
        mkey: &'a str,
        lease: bool,
    ) -> Pin<Box<dyn Future<Output = Found> + Send + 'a>> {
        Box::pin(async move {
            let i = &self.inner;
            let now = now_ms();
            if let Some(r) = self.redis_if_up() {
                let ticket = i.memory.ticket(mkey);
                let seq = self.next_seq();
                let token = if lease {
                    format!("r{}", uuid::Uuid::new_v4().simple())
                } else {
                    String::new()
                };
                let mut op = self.op(ns, key, Operation::Fetch);
                op.token = &token;
                op.ttl_ms = i.lease_ttl.as_millis() as u64;
                let found = match r.run(&op, &self.fresh_gen(seq)).await {
                    Ok(v) => match CacheRedis::fetched(v) {
                        Fetched::Value(b) => match decode(Bytes::from(b)) {
                            Some(e) if e.expires_at > now => {
                                let e = Arc::new(e);
                                i.memory.insert(mkey, e.clone(), seq, Some(ticket));
                                self.count(Tier::Redis, true);
                                return Found::Hit(e, Tier::Redis);
                            }
                            _ => Some(Found::Miss),
                        },
                        Fetched::Miss => Some(Found::Miss),
                        Fetched::LeaseGranted => Some(Found::Granted(token)),
                        Fetched::LeaseHeld => Some(Found::Held),
                    },
                    Err(e) => {
                        self.mark_down(&e);
                        None
                    }
                };
                if let Some(found) = found {
                    self.count(Tier::Redis, false);
                    return found;
                }
                // Now an outage: the memory tier is believed again.
                if let Some(e) = self.memory_hit(ns, mkey) {
                    return Found::Hit(e, Tier::Memory);
                }
            }
            // Redis unreachable (or none): what this node holds is all there is.
            if let Some((seq, e)) = i.disk.get(mkey) {
                if e.expires_at > now && seq > self.floor(ns) {
                    let e = Arc::new(e);
                    i.memory.insert(mkey, e.clone(), seq, None);
                    self.count(Tier::Disk, true);
                    return Found::Hit(e, Tier::Disk);
                }
            }
            self.count(Tier::Disk, false);
            if !lease {
                return Found::Miss;
            }
            // A lease of this node only: nobody else can be asked.
            let mut leases = i.local_leases.lock().unwrap_or_else(|p| p.into_inner());
            let t = Instant::now();
            if leases.get(mkey).is_some_and(|(_, until)| *until > t) {
                return Found::Held;
            }
            if leases.len() >= MAX_LOCAL_LEASES {
                leases.retain(|_, (_, until)| *until > t);
                if leases.len() >= MAX_LOCAL_LEASES {
                    return Found::Miss;
                }
            }
            let token = format!("l{}", uuid::Uuid::new_v4().simple());
            leases.insert(mkey.into(), (token.clone(), t + i.lease_ttl));
            Found::Granted(token)
        })
    }

    /// A lease request while another client holds the lease: waits (without
    /// a thread) until a write of the key is heard or made here, re-reading
    /// at least every [`RECHECK`], up to `cache_lease_wait_ms`.
    async fn wait_for_fill(&self, ns: &str, key: &str, mkey: &str) -> Lookup {
        let i = &self.inner;
        if i.waiting.fetch_add(1, Ordering::AcqRel) >= i.max_waiters {
            i.waiting.fetch_sub(1, Ordering::AcqRel);
            return Lookup::Miss { waited: false };
        }
        i.counters.lease_waits.fetch_add(1, Ordering::Relaxed);
        let rx = i
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(mkey.into())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe();
        let mut w = Waiting {
            cache: self,
            key: mkey,
            rx,
        };
        let deadline = Instant::now() + i.lease_wait;
        loop {
            // Seen: a write from here on wakes this waiter.
            w.rx.borrow_and_update();
            if let Some(e) = self.memory_hit(ns, mkey) {
                return Lookup::Hit(e, Tier::Memory);
            }
            if let Found::Hit(e, t) = self.find(ns, key, mkey, false).await {
                return Lookup::Hit(e, t);
            }
            let now = Instant::now();
            if now >= deadline {
                i.counters
                    .lease_wait_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return Lookup::Miss { waited: true };
            }
            let nap = tokio::time::sleep((deadline - now).min(RECHECK));
            tokio::pin!(nap);
            tokio::select! {
                changed = w.rx.changed() => if changed.is_err() { nap.await },
                _ = &mut nap => {}
            }
        }
    }

    /// Wakes this node's lease waiters on `mkey`.
    pub(super) fn wake(&self, mkey: &str) {
        let i = &self.inner;
        if i.waiting.load(Ordering::Acquire) > 0 {
            if let Some(n) = i
                .waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(mkey)
            {
                let _ = n.send(true);
            }
        }
    }
}

/// One lease waiter, counted while it waits; the last one on a key
/// removes the key's wake-up.
struct Waiting<'a> {
    cache: &'a Cache,
    key: &'a str,
    rx: watch::Receiver<bool>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let i = &self.cache.inner;
        let mut w = i.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // this waiter's receiver is the only one left
        if w.get(self.key).is_some_and(|tx| tx.receiver_count() <= 1) {
            w.remove(self.key);
        }
        i.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

//! Redis as the cluster's shared session store.
//!
//! Every request-path operation is one Lua script (a touch: the script and an
//! HGETALL inside one MULTI): one round trip, atomic with respect to every
//! other node, bounded by the store timeout.
//!
//! Keys (all under `key_prefix`):
//! - `s:<id>`: the session, a hash: `u` user, `c` created, `a` last accessed,
//!   `e` expires (unix ms), `n` request count, `v` version, and one field per
//!   metadata key, `m:<key as JSON>` → value as JSON. Merging metadata is then
//!   HSET/HDEL in the script, no JSON handling in Lua (whose cjson would turn
//!   `[]` into `{}`). The key expires at `e` (PEXPIREAT), so Redis drops
//!   idle sessions by itself.
//!   A session that became its user's by a login (a PATCH of `user_id`)
//!   also has `l`, the login time.
//! - `u:<user_id>`: sorted set of that user's session ids, scored by the time
//!   each became the user's (created or logged in); at most
//!   `max_sessions_per_user` (the oldest go), stale ids pruned on read.
//!   Anonymous sessions have none.
//! - `t:<id>`: tombstone of a deleted or rotated-away session, kept for the
//!   absolute lifetime so a replay never resurrects it. A rotation's holds
//!   the new id, so a replayed delete of the old one follows it.
//! - `ut:<user_id>`: the time of the user's last log-out-everywhere, kept for
//!   the absolute lifetime: a replayed or re-seeded session of that user
//!   created no later than it is not brought back.
//! - `epoch`: a random value set when Redis holds none. A node that finds
//!   another value than the one it last saw knows Redis lost its data and
//!   re-seeds it from its mirror.
//! - in each session hash, `o:<origin>` → `<floor> <id>...`: the operation
//!   ids of that node applied to the session, as a floor (all settled ids at
//!   or below it) and the few applied above it (see [`inflight`]). Every
//!   path, live, written behind or replayed, refuses an id it covers, and
//!   the refusals are counted (`duplicates_refused`).
//! - `dups:<origin>`: a hash, `n` → the operations of that node refused as
//!   duplicates, raised by the refusing script itself (most late duplicates
//!   arrive on a connection the node closed: it never reads their answer;
//!   see [`refusals`]). Lapses a lifetime after its last refusal.
//! - `active`: sorted set id → expiry, for a cheap active-session count.
//! - channel `events`: `del:<id>` for every delete and rotation (`del:<id>,<id>…`
//!   for a chunk of a log-out-everywhere), so other nodes
//!   drop the session from their local mirror.
//!
//! The keys a script touches beyond `KEYS` (the user set) are built from the
//! prefix inside the script; that is fine for a single Redis or Sentinel, not
//! for Redis Cluster.
//!
//! This module only talks to Redis: finding it and the one timed call path
//! are the shared link's (`crate::redis_link`); what the near cache does
//! with what the tracking connection hears is `store::near`'s.
//!
//! The module's rooms: [`conn`] (the store's side of the link: its calls,
//! its error classes), [`scripts`] (the Lua and its typed replies),
//! [`ops`] (the request-path operations), [`replay`] (the journal replay),
//! [`record`] (a hash reply into a session), [`tracking`] (the near cache's
//! own connection).

mod conn;
mod inflight;
mod ops;
mod record;
mod refusals;
mod replay;
mod scripts;
mod tracking;

pub use replay::Replayed;
pub(crate) use scripts::CreateReply;
pub use tracking::{Flush, Flushed, LinkEvent, TrackingSink, TRACKING_CLIENT_NAME};

use super::StoreError;
use crate::config::settings::RedisSettings;
use crate::redis_link::{Link, Target};
use crate::session::{format_id, Limits};
use scripts::Scripts;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    link: Link,
    prefix: String,
    timeout: Duration,
    probe_interval: Duration,
    probe_max: Duration,
    limits: Limits,
    /// `max_sessions_per_user`: a user's index keeps this many sessions.
    max_per_user: u64,
    /// `o:<origin>`: this node's field in session hashes (see `journal`).
    origin_field: String,
    origin: u64,
    /// The near cache's connection (see `tracking`).
    tracking: tracking::Tracking,
    active: AtomicU64,
    /// Records found in Redis that no node could have written.
    corrupt: AtomicU64,
    /// Operations a script refused as already applied (a late duplicate).
    duplicates: refusals::Refusals,
    /// `dups:<origin>`: where the scripts count this node's refusals.
    dups_key: String,
    /// This node's ids not yet settled (see [`inflight`]).
    inflight: inflight::InFlight,
    scripts: Scripts,
}

impl RedisStore {
    /// Prepares the store; connecting happens on first use and in the probe,
    /// so a node starts (in fallback) even when Redis is down.
    pub fn new(
        url: &str,
        settings: &RedisSettings,
        limits: Limits,
        origin: u64,
    ) -> std::result::Result<RedisStore, String> {
        // RESP2 whatever the URL says: replies are read as RESP2 arrays.
        let target = Target::open(url, "redis_url", &settings.tls)?;
        Ok(RedisStore {
            inner: Arc::new(Inner {
                link: Link::new(target, settings.timeout),
                prefix: settings.key_prefix.clone(),
                timeout: settings.timeout,
                probe_interval: settings.probe_interval,
                probe_max: settings.probe_max,
                limits,
                origin_field: format!("o:{origin:016x}"),
                origin,
                tracking: tracking::Tracking::new(),
                max_per_user: settings.max_sessions_per_user,
                active: AtomicU64::new(0),
                corrupt: AtomicU64::new(0),
                duplicates: refusals::Refusals::default(),
                dups_key: format!("{}dups:{origin:016x}", settings.key_prefix),
                inflight: inflight::InFlight::default(),
                scripts: Scripts::new(),
            }),
        })
    }

    pub fn probe_delays(&self) -> (Duration, Duration) {
        (self.inner.probe_interval, self.inner.probe_max)
    }

    /// This node's origin id (see `journal`).
    pub fn origin(&self) -> u64 {
        self.inner.origin
    }

    pub fn cached_active(&self) -> u64 {
        self.inner.active.load(Ordering::Relaxed)
    }

    pub fn corrupt_records(&self) -> u64 {
        self.inner.corrupt.load(Ordering::Relaxed)
    }

    /// Operations refused as already applied, on every path, whether this
    /// node read the answer or not (see [`refusals`]).
    pub fn duplicates_refused(&self) -> u64 {
        self.inner.duplicates.total()
    }

    /// A script answered "already applied": counted, and logged once in a
    /// while (each is a command that arrived after its replay, or a replay
    /// after its command).
    fn refused_duplicate(&self, what: &str) {
        let n = self.inner.duplicates.read_one();
        if n.is_power_of_two() {
            tracing::info!(
                operation = what,
                refused = n,
                "redis refused an operation id it had applied already (a late duplicate)"
            );
        }
    }

    /// Draws an operation id (with `next`) for a call about to be sent.
    pub fn draw_op<E>(
        &self,
        next: impl FnMut() -> std::result::Result<u64, E>,
    ) -> std::result::Result<u64, E> {
        self.inner.inflight.draw(next)
    }

    /// The call under `seq` has its answer.
    pub fn settle_op(&self, seq: u64) {
        self.inner.inflight.settle(seq);
    }

    /// The call under `seq` failed: Redis may have applied it, and it is
    /// journaled under the same id.
    pub fn doubt_op(&self, seq: u64) {
        self.inner.inflight.doubt(seq);
    }

    /// The journal is drained: the ids in doubt are settled.
    pub fn clear_doubt(&self) {
        self.inner.inflight.clear_doubt();
    }

    /// A live call's id with the floor it carries (see [`inflight`]).
    fn stamp(&self, seq: u64) -> ops::Stamp {
        ops::Stamp {
            seq,
            floor: self.inner.inflight.floor(None),
        }
    }

    /// The scripts' -2: a record whose counters are not numbers.
    fn unreadable(&self, id: &[u8; 16]) -> StoreError {
        self.bad_record(format!("session {}: fields are not numbers", format_id(id)))
    }

    /// Counts a bad record and names it in the error the caller gets.
    fn bad_record(&self, why: String) -> StoreError {
        self.inner.corrupt.fetch_add(1, Ordering::Relaxed);
        StoreError::CorruptRecord(why)
    }

    fn key(&self, kind: &str, id: &str) -> String {
        let mut k = String::with_capacity(self.inner.prefix.len() + kind.len() + id.len());
        k.push_str(&self.inner.prefix);
        k.push_str(kind);
        k.push_str(id);
        k
    }

    fn channel(&self) -> String {
        self.key("events", "")
    }

    /// Refreshes the cached active-session count (and prunes the index).
    pub async fn refresh_active(&self, now: u64) -> Result<()> {
        let key = self.key("active", "");
        let key = &key;
        // Taken before Redis counts: a create that lands while it does is
        // in Redis's count or not, but certainly in the cached one (its
        // `fetch_add` below), which must then not be set back to a count
        // without it (the ceiling would let one more through).
        let before = self.inner.active.load(Ordering::Relaxed);
        let counted: Result<(u64, u64)> = self
            .call(self.inner.timeout, |mut c| async move {
                redis::pipe()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(key)
                    .arg("-inf")
                    .arg(now)
                    .cmd("ZCARD")
                    .arg(key)
                    .query_async(&mut c)
                    .await
            })
            .await;
        let n = match counted {
            Ok((_, n)) => n,
            // Overwritten by another tool: derived data, so it is dropped and
            // refills as sessions are created and touched.
            Err(StoreError::CorruptRecord(why)) => {
                tracing::warn!(error = %why, "the active-session index was not a sorted set; dropped");
                self.call(self.inner.timeout, |mut c| async move {
                    redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
                })
                .await?;
                0
            }
            Err(e) => return Err(e),
        };
        // Unchanged since: Redis's count replaces it. Changed (creates
        // landed meanwhile): kept as it is, counted again in a second.
        let _ = self
            .inner
            .active
            .compare_exchange(before, n, Ordering::Relaxed, Ordering::Relaxed);
        self.read_refusals().await
    }

    /// Reads what the scripts counted of this node's refused duplicates
    /// (see [`refusals`]). A key another tool overwrote with another type
    /// is dropped (the counter then starts again, which [`refusals`] reads
    /// as such); a value that is not a number is no news.
    async fn read_refusals(&self) -> Result<()> {
        let key = &self.inner.dups_key;
        let held: Option<String> = match self
            .call(self.inner.timeout, |mut c| async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg("n")
                    .query_async(&mut c)
                    .await
            })
            .await
        {
            Ok(v) => v,
            Err(StoreError::CorruptRecord(why)) => {
                tracing::warn!(error = %why, "the refused-duplicates counter was not a hash; dropped");
                return self
                    .call(self.inner.timeout, |mut c| async move {
                        redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
                    })
                    .await;
            }
            Err(e) => return Err(e),
        };
        let Some(now) = held.map_or(Some(0), |v| v.parse::<u64>().ok()) else {
            return Ok(());
        };
        let before = self.inner.duplicates.total();
        self.inner.duplicates.redis_holds(now);
        let after = self.inner.duplicates.total();
        if after > before {
            tracing::info!(
                refused = after - before,
                total = after,
                "redis refused late duplicates of this node's operations whose answers it never read (most arrive on a connection closed during an outage)"
            );
        }
        Ok(())
    }

    /// `dups:<origin>`, which the scripts get as a key.
    fn dups_key(&self) -> &str {
        &self.inner.dups_key
    }

    /// The cluster's Redis epoch: the value of `epoch`, set to `fresh` first
    /// when Redis holds none (it is new, or lost its data).
    pub async fn epoch(&self, fresh: &str) -> Result<String> {
        let key = self.key("epoch", "");
        let key = &key;
        let (_, value): ((), String) = self
            .call(self.inner.timeout, |mut c| async move {
                redis::pipe()
                    .cmd("SET")
                    .arg(key)
                    .arg(fresh)
                    .arg("NX")
                    .ignore()
                    .cmd("GET")
                    .arg(key)
                    .query_async::<(String,)>(&mut c)
                    .await
                    .map(|(v,)| ((), v))
            })
            .await?;
        Ok(value)
    }

    // ---- mirror events -----------------------------------------------------------

    /// Subscribes to deletion events and hands each deleted id to `on_delete`
    /// until the subscription breaks.
    pub async fn follow_deletions(&self, mut on_delete: impl FnMut([u8; 16])) -> Result<()> {
        use futures_util::StreamExt;
        let client = self.client().await?;
        let mut pubsub = tokio::time::timeout(self.inner.timeout, client.get_async_pubsub())
            .await
            .map_err(|_| StoreError::Redis("pubsub connect timed out".into()))?
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        pubsub
            .subscribe(self.channel())
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        let mut stream = pubsub.on_message();
        while let Some(msg) = stream.next().await {
            let payload: String = msg.get_payload().unwrap_or_default();
            // `del:<id>` or, from a log-out-everywhere, `del:<id>,<id>,...`
            if let Some(ids) = payload.strip_prefix("del:") {
                ids.split(',')
                    .filter_map(crate::session::parse_session_id)
                    .for_each(&mut on_delete);
            }
        }
        Err(StoreError::Redis("pubsub connection closed".into()))
    }
}

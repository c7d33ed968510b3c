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
//! - `u:<user_id>`: set of that user's session ids (stale ids pruned on read).
//! - `t:<id>`: tombstone of a deleted or rotated-away session, kept for the
//!   absolute lifetime so a replay never resurrects it.
//! - `ut:<user_id>`: the time of the user's last log-out-everywhere, kept for
//!   the absolute lifetime: a replayed or re-seeded session of that user
//!   created no later than it is not brought back.
//! - `epoch`: a random value set when Redis holds none. A node that finds
//!   another value than the one it last saw knows Redis lost its data and
//!   re-seeds it from its mirror.
//! - in each session hash, `o:<origin>` → the highest operation id of that
//!   node applied to the session (see `journal`): replays skip what it covers.
//! - `active`: sorted set id → expiry, for a cheap active-session count.
//! - channel `events`: `del:<id>` for every delete and rotation, so other nodes
//!   drop the session from their local mirror.
//!
//! The keys a script touches beyond `KEYS` (the user set) are built from the
//! prefix inside the script; that is fine for a single Redis or Sentinel, not
//! for Redis Cluster.

use super::journal::Op;
use super::{PatchOutcome, StoreError};
use crate::config::Config;
use crate::session::{format_id, Limits, Patch, Session};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    prefix: String,
    timeout: Duration,
    pub(super) probe_interval: Duration,
    pub(super) probe_max: Duration,
    limits: Limits,
    /// `o:<origin>`: this node's field in session hashes (see `journal`).
    origin_field: String,
    conn: RwLock<Option<MultiplexedConnection>>,
    active: AtomicU64,
    /// Records found in Redis that no node could have written.
    corrupt: AtomicU64,
    scripts: Scripts,
}

/// How to find the Redis master.
enum Target {
    Direct(Client),
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

struct Scripts {
    create: Script,
    touch: Script,
    patch: Script,
    delete: Script,
    rotate: Script,
    list_user: Script,
    delete_user: Script,
}

/// The outcome of replaying one journal operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Replayed {
    Applied,
    /// Redis has neither the session nor its tombstone: restore it first.
    Missing,
    /// Deleted somewhere: the operation is dropped.
    Tombstoned,
    /// It cannot apply (e.g. the merge would exceed the metadata limit, or
    /// the record in Redis is corrupt): the operation is dropped.
    Refused(String),
    /// Redis refused it for now (out of memory, read-only replica...): it was
    /// not applied and stays in the journal for the next attempt.
    Failed(String),
    /// Redis answered it with an error that says nothing about Redis's own
    /// state (a script error): retried a bounded number of times, then dropped.
    Rejected(String),
}

const CREATE: &str = r#"
-- KEYS: session, tombstone, active, user set, user's log-out time
-- ARGV: replay ('1' = skip if exists or tombstoned), id, max_lifetime_ms, u, c, a, e, n, v, then metadata field/value pairs
-- Returns 1 created, 0 already there (replay), -1 deleted meanwhile (replay)
if ARGV[1] == '1' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  local out = redis.call('GET', index(KEYS[5], 'string'))
  if out and tonumber(ARGV[5]) <= (tonumber(out) or 0) then return -1 end
end
local args = {'u', ARGV[4], 'c', ARGV[5], 'a', ARGV[6], 'e', ARGV[7], 'n', ARGV[8], 'v', ARGV[9]}
for i = 10, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(args))
redis.call('PEXPIREAT', KEYS[1], ARGV[7])
redis.call('ZADD', index(KEYS[3], 'zset'), ARGV[7], ARGV[2])
redis.call('SADD', index(KEYS[4], 'set'), ARGV[2])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
return 1
"#;

const TOUCH: &str = r#"
-- KEYS: session, active, tombstone
-- ARGV: at, ttl_ms, max_lifetime_ms, id, replay, requests to count, origin field, operation id
-- Returns the new request count, 0 when the session is gone, -1 when a
-- replayed touch meets a tombstone, -2 when the record is corrupt, -3 when a
-- replayed touch was already applied. The request path reads the record back
-- with HGETALL in the same MULTI: a Lua HGETALL (turning every field into a
-- Lua string and back) cost Redis more than the rest of the script.
local cur = redis.call('HMGET', KEYS[1], 'c', 'e', 'a', 'n', ARGV[7])
if not cur[1] then
  if ARGV[5] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
  return 0
end
local at, c, e, a = tonumber(ARGV[1]), tonumber(cur[1]), tonumber(cur[2]), tonumber(cur[3])
-- -2: not a record a node wrote (it must count with these; HINCRBY needs an
-- integer string)
if not (c and e and a and cur[4] and string.match(cur[4], '^%d+$')) then return -2 end
local seq, mark = tonumber(ARGV[8]), tonumber(cur[5])
if ARGV[5] == '1' and mark and mark >= seq then return -3 end
if ARGV[5] ~= '1' and e <= at then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', index(KEYS[2], 'zset'), ARGV[4])
  return 0
end
local ne = math.min(at + tonumber(ARGV[2]), c + tonumber(ARGV[3]))
local n = redis.call('HINCRBY', KEYS[1], 'n', tonumber(ARGV[6]))
local set = {}
if at > a then set[1] = 'a'; set[2] = ARGV[1] end
if not mark or seq > mark then set[#set + 1] = ARGV[7]; set[#set + 1] = ARGV[8] end
if #set > 0 then redis.call('HSET', KEYS[1], unpack(set)) end
-- the expiry slides in steps of at least a second: most touches then skip
-- three writes (and the sorted-set update). '%.0f', not '%d': Lua's %d goes
-- through a C long, 32 bits on a 32-bit Redis (a Pi on armv7).
if ne >= e + 1000 then
  redis.call('HSET', KEYS[1], 'e', string.format('%.0f', ne))
  redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', ne))
  redis.call('ZADD', index(KEYS[2], 'zset'), string.format('%.0f', ne), ARGV[4])
end
return n
"#;

const PATCH: &str = r#"
-- KEYS: session, tombstone
-- ARGV: now, if_match ('' = none), new user ('' = none), prefix, id, max_lifetime_ms, max_metadata_bytes, replay,
--       origin field, operation id, then pairs of metadata field, value ('null' deletes)
-- Returns {1, record} applied, {0} gone, {-1} tombstoned (replay), {-2}
-- corrupt, {2, version} If-Match failed, {3, size} too large, {4} a replayed
-- patch that was already applied
local cur = redis.call('HMGET', KEYS[1], 'e', 'v', 'u', ARGV[9])
if not cur[1] then
  if ARGV[8] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return {-1} end
  return {0}
end
if not (string.match(cur[1], '^%d+$') and cur[2] and string.match(cur[2], '^%d+$') and cur[3]) then
  return {-2}
end
local seq, mark = tonumber(ARGV[10]), tonumber(cur[4])
if ARGV[8] == '1' and mark and mark >= seq then return {4} end
if ARGV[8] ~= '1' and tonumber(cur[1]) <= tonumber(ARGV[1]) then return {0} end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= tonumber(cur[2]) then return {2, cur[2]} end
if #ARGV > 10 then
  -- the merged metadata must fit: compute its JSON size before writing
  local meta = {}
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'm:' then meta[all[i]] = all[i + 1] end
  end
  for i = 11, #ARGV, 2 do
    if ARGV[i + 1] == 'null' then meta[ARGV[i]] = nil else meta[ARGV[i]] = ARGV[i + 1] end
  end
  local size, count = 2, 0
  for k, v in pairs(meta) do
    size = size + (#k - 2) + 1 + #v
    count = count + 1
  end
  if count > 1 then size = size + count - 1 end
  if size > tonumber(ARGV[7]) then return {3, tostring(size)} end
  for i = 11, #ARGV, 2 do
    if ARGV[i + 1] == 'null' then
      redis.call('HDEL', KEYS[1], ARGV[i])
    else
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
  end
end
if ARGV[3] ~= '' and ARGV[3] ~= cur[3] then
  redis.call('SREM', index(ARGV[4] .. 'u:' .. cur[3], 'set'), ARGV[5])
  redis.call('SADD', index(ARGV[4] .. 'u:' .. ARGV[3], 'set'), ARGV[5])
  redis.call('PEXPIRE', ARGV[4] .. 'u:' .. ARGV[3], ARGV[6])
  redis.call('HSET', KEYS[1], 'u', ARGV[3])
end
if not mark or seq > mark then redis.call('HSET', KEYS[1], ARGV[9], ARGV[10]) end
redis.call('HINCRBY', KEYS[1], 'v', 1)
return {1, redis.call('HGETALL', KEYS[1])}
"#;

const DELETE: &str = r#"
-- KEYS: session, tombstone, active; ARGV: id, prefix, max_lifetime_ms, channel
-- (a key that is not a hash is not a node's record: it is deleted all the same)
local u = nil
if redis.call('TYPE', KEYS[1]).ok == 'hash' then u = redis.call('HGET', KEYS[1], 'u') end
local existed = redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
redis.call('ZREM', index(KEYS[3], 'zset'), ARGV[1])
if u then redis.call('SREM', index(ARGV[2] .. 'u:' .. u, 'set'), ARGV[1]) end
redis.call('PUBLISH', ARGV[4], 'del:' .. ARGV[1])
return existed
"#;

const ROTATE: &str = r#"
-- KEYS: old session, new session, old tombstone, active, new tombstone
-- ARGV: old id, new id, prefix, max_lifetime_ms, channel, now, replay
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[7] == '1' then
    if redis.call('EXISTS', KEYS[2]) == 1 then return {2} end
    if redis.call('EXISTS', KEYS[3]) == 1 then return {-1} end
  end
  return {0}
end
local cur = redis.call('HMGET', KEYS[1], 'e', 'u', 'v')
if not (cur[1] and string.match(cur[1], '^%d+$') and cur[2] and cur[3] and string.match(cur[3], '^%d+$')) then
  return {-2}
end
if ARGV[7] ~= '1' and tonumber(cur[1]) <= tonumber(ARGV[6]) then return {0} end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('HINCRBY', KEYS[2], 'v', 1)
redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
redis.call('ZREM', index(KEYS[4], 'zset'), ARGV[1])
redis.call('ZADD', KEYS[4], cur[1], ARGV[2])
redis.call('SREM', index(ARGV[3] .. 'u:' .. cur[2], 'set'), ARGV[1])
redis.call('SADD', ARGV[3] .. 'u:' .. cur[2], ARGV[2])
redis.call('PUBLISH', ARGV[5], 'del:' .. ARGV[1])
return {1, redis.call('HGETALL', KEYS[2])}
"#;

const LIST_USER: &str = r#"
-- KEYS: user set; ARGV: now, prefix, user
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', index(KEYS[1], 'set'))) do
  local key = ARGV[2] .. 's:' .. id
  local cur = {}
  if redis.call('TYPE', key).ok == 'hash' then cur = redis.call('HMGET', key, 'e', 'u') end
  local e = tonumber(cur[1])
  if e and e > tonumber(ARGV[1]) and cur[2] == ARGV[3] then
    out[#out + 1] = redis.call('HGETALL', key)
    out[#out + 1] = id
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
"#;

const DELETE_USER: &str = r#"
-- KEYS: user set, active, user's log-out time
-- ARGV: prefix, user, max_lifetime_ms, channel, now, before
-- Deletes the user's sessions created at or before `before` and records the
-- time, so sessions of the user created before it and replayed later (from
-- another node's journal) are not brought back. Returns the ids that were live.
local before = tonumber(ARGV[6])
local last = tonumber(redis.call('GET', index(KEYS[3], 'string')))
if not last or before > last then redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[3]) end
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', index(KEYS[1], 'set'))) do
  local key = ARGV[1] .. 's:' .. id
  local cur = {}
  if redis.call('TYPE', key).ok == 'hash' then cur = redis.call('HMGET', key, 'e', 'u', 'c') end
  if cur[1] and cur[2] == ARGV[2] then
    if (tonumber(cur[3]) or 0) <= before then
      redis.call('DEL', key)
      redis.call('SET', ARGV[1] .. 't:' .. id, '1', 'PX', ARGV[3])
      redis.call('ZREM', index(KEYS[2], 'zset'), id)
      redis.call('SREM', KEYS[1], id)
      redis.call('PUBLISH', ARGV[4], 'del:' .. id)
      local e = tonumber(cur[1])
      if e and e > tonumber(ARGV[5]) then out[#out + 1] = id end
    end
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
"#;

const ALL_SCRIPTS: [&str; 7] = [CREATE, TOUCH, PATCH, DELETE, ROTATE, LIST_USER, DELETE_USER];

/// Put in front of every script. The index keys (a user's set, the active
/// sorted set) are derived data: one that another tool overwrote with a value
/// of another type is dropped and rebuilt from here on, rather than failing
/// every operation that touches it (and a replayed create with it).
const PRELUDE: &str = r#"
local function index(key, kind)
  local t = redis.call('TYPE', key).ok
  if t ~= kind and t ~= 'none' then redis.call('DEL', key) end
  return key
end
"#;

/// Put after every script's body (which [`source`] wraps in `body()`): the
/// replay chain. A replayed entry carries, as its last two keys, this node's
/// replay cursor and `chain:<previous entry's id>:<its own id>`; it runs only
/// if the cursor holds the previous id, and then sets it to its own. A batch
/// is pipelined in one round trip, yet when one entry fails (an error
/// aborts its script before the cursor moves) every later entry of the batch
/// is skipped (-9) instead of landing out of order. Live calls carry no
/// chain.
const EPILOGUE: &str = r#"
local chain = KEYS[#KEYS]
if #KEYS >= 2 and string.sub(chain, 1, 6) == 'chain:' then
  local prev, own = string.match(chain, '^chain:([^:]*):(.*)$')
  local cursor = KEYS[#KEYS - 1]
  if redis.call('GET', cursor) ~= prev then return -9 end
  local r = body()
  redis.call('SET', cursor, own, 'PX', 600000)
  return r
end
return body()
"#;

/// A script's full source: the prelude, its body as a function, then the
/// replay chain that calls it.
fn source(body: &str) -> String {
    let mut s = String::with_capacity(PRELUDE.len() + body.len() + EPILOGUE.len() + 40);
    s.push_str(PRELUDE);
    s.push_str("local function body()\n");
    s.push_str(body);
    s.push_str("\nend\n");
    s.push_str(EPILOGUE);
    s
}

impl RedisStore {
    /// Prepares the store; connecting happens on first use and in the probe,
    /// so a node starts (in fallback) even when Redis is down.
    pub fn new(
        url: &str,
        config: &Config,
        limits: Limits,
        origin: u64,
    ) -> std::result::Result<RedisStore, String> {
        let target = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            Target::Sentinel(tokio::sync::Mutex::new(sentinel_client(rest)?))
        } else {
            let info = redis::IntoConnectionInfo::into_connection_info(url)
                .map_err(|e| format!("redis_url: {e}"))?;
            // RESP2 whatever the URL says: replies are read as RESP2 arrays.
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP2);
            let info = info.set_redis_settings(settings);
            Target::Direct(Client::open(info).map_err(|e| format!("redis_url: {e}"))?)
        };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                target,
                prefix: config.key_prefix.clone(),
                timeout: config.store_timeout,
                probe_interval: config.redis_probe_interval,
                probe_max: config.redis_probe_max,
                limits,
                origin_field: format!("o:{origin:016x}"),
                conn: RwLock::new(None),
                active: AtomicU64::new(0),
                corrupt: AtomicU64::new(0),
                scripts: Scripts {
                    create: Script::new(&source(CREATE)),
                    touch: Script::new(&source(TOUCH)),
                    patch: Script::new(&source(PATCH)),
                    delete: Script::new(&source(DELETE)),
                    rotate: Script::new(&source(ROTATE)),
                    list_user: Script::new(&source(LIST_USER)),
                    delete_user: Script::new(&source(DELETE_USER)),
                },
            }),
        })
    }

    pub fn probe_delays(&self) -> (Duration, Duration) {
        (self.inner.probe_interval, self.inner.probe_max)
    }

    pub fn cached_active(&self) -> u64 {
        self.inner.active.load(Ordering::Relaxed)
    }

    pub fn corrupt_records(&self) -> u64 {
        self.inner.corrupt.load(Ordering::Relaxed)
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

    /// A client for the current master (asks Sentinel when configured).
    async fn client(&self) -> Result<Client> {
        match &self.inner.target {
            Target::Direct(c) => Ok(c.clone()),
            Target::Sentinel(s) => {
                let mut s = s.lock().await;
                s.async_get_client()
                    .await
                    .map_err(|e| StoreError::Redis(format!("sentinel: {e}")))
            }
        }
    }

    /// The shared multiplexed connection, connecting if there is none.
    async fn conn(&self) -> Result<MultiplexedConnection> {
        if let Some(c) = self
            .inner
            .conn
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(c.clone());
        }
        let client = self.client().await?;
        // No response timeout of redis-rs's own: `call` bounds every use,
        // and a second timer per request is measurable on the touch path.
        // Nagle stays on (redis-rs's default): under load it lets the
        // pipelined commands of concurrent requests share one segment, and
        // TCP_NODELAY measured 20% slower (more, smaller writes).
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.inner.timeout))
            .set_response_timeout(None);
        let c = client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        *self.inner.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection after a failure; the next use reconnects.
    fn drop_conn(&self) {
        *self.inner.conn.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Runs `call` on the shared connection within `limit`, the one place
    /// every Redis call goes through. A connection that broke since its last
    /// use (Redis restarted, say) gets one fresh try, so a restart does not
    /// send the node to its mirror. Any failure drops the connection; the
    /// next call reconnects.
    async fn call<T, F, Fut>(&self, limit: Duration, mut call: F) -> Result<T>
    where
        F: FnMut(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let mut retried = false;
            loop {
                let conn = self.conn().await?;
                match call(conn).await {
                    Ok(v) => return Ok(v),
                    Err(e)
                        if !retried
                            && (e.is_connection_dropped() || e.is_io_error())
                            && !e.is_connection_refusal() =>
                    {
                        self.drop_conn();
                        retried = true;
                    }
                    Err(e) if is_bad_record(&e) => return Err(self.bad_record(e.to_string())),
                    Err(e) => return Err(StoreError::Redis(e.to_string())),
                }
            }
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(v)) => Ok(v),
            // Redis answered: the connection is fine.
            Ok(Err(e @ StoreError::CorruptRecord(_))) => Err(e),
            Ok(Err(e)) => {
                self.drop_conn();
                Err(e)
            }
            Err(_) => {
                self.drop_conn();
                Err(StoreError::Redis(format!(
                    "no answer within {} ms",
                    limit.as_millis()
                )))
            }
        }
    }

    /// Runs a script within the store timeout.
    async fn run(&self, inv: redis::ScriptInvocation<'_>) -> Result<Value> {
        let inv = &inv;
        self.call(self.inner.timeout, |mut c| async move {
            inv.invoke_async::<Value>(&mut c).await
        })
        .await
    }

    pub async fn ping(&self) -> Result<()> {
        self.call(self.inner.timeout, |mut c| async move {
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
        .map(|_| ())
    }

    /// Refreshes the cached active-session count (and prunes the index).
    pub async fn refresh_active(&self, now: u64) -> Result<()> {
        let key = self.key("active", "");
        let key = &key;
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
        self.inner.active.store(n, Ordering::Relaxed);
        Ok(())
    }

    // ---- session operations --------------------------------------------------

    pub async fn create(&self, s: &Session) -> Result<()> {
        self.create_inner(s, false).await.map(|_| ())
    }

    async fn create_inner(&self, s: &Session, replay: bool) -> Result<i64> {
        match self.run(self.create_inv(s, replay)).await? {
            Value::Int(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    fn create_inv(&self, s: &Session, replay: bool) -> redis::ScriptInvocation<'_> {
        let id = format_id(&s.id);
        let mut inv = self.inner.scripts.create.prepare_invoke();
        inv.key(self.key("s:", &id))
            .key(self.key("t:", &id))
            .key(self.key("active", ""))
            .key(self.key("u:", &s.user_id))
            .key(self.key("ut:", &s.user_id))
            .arg(if replay { "1" } else { "0" })
            .arg(&id)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(&s.user_id)
            .arg(s.created_at)
            .arg(s.last_accessed)
            .arg(s.expires_at)
            .arg(s.request_count)
            .arg(s.version);
        for (k, v) in metadata_fields(&s.metadata) {
            inv.arg(k).arg(v);
        }
        inv
    }

    /// Counts a request on the session and returns it, in one round trip:
    /// `MULTI; EVALSHA touch; HGETALL; EXEC`, atomic like a single script.
    /// `seq`: the operation id (see `journal`), which the node reuses if it
    /// journals the touch after this call timed out.
    pub async fn touch(&self, id: &[u8; 16], now: u64, seq: u64) -> Result<Option<Session>> {
        let ids = format_id(id);
        let session_key = self.key("s:", &ids);
        let inv = self.touch_inv(&ids, &session_key, now, 1, seq, false);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .invoke_script(&inv)
            .cmd("HGETALL")
            .arg(&session_key);
        let (pipe, inv) = (&pipe, &inv);
        let (count, fields): (i64, Vec<Value>) = self
            .call(self.inner.timeout, |mut c| async move {
                match pipe.query_async(&mut c).await {
                    // A Redis that restarted has no scripts: load, then retry.
                    Err(e)
                        if e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        inv.load_async(&mut c).await?;
                        pipe.query_async(&mut c).await
                    }
                    other => other,
                }
            })
            .await?;
        if count == -2 {
            return Err(self.unreadable(id));
        }
        if count <= 0 {
            return Ok(None);
        }
        self.session_from(id, &fields).map(Some)
    }

    /// `ids`: the formatted id; `session_key`: its `s:` key (the request
    /// path reads it back too, so it is built once).
    fn touch_inv(
        &self,
        ids: &str,
        session_key: &str,
        at: u64,
        count: u64,
        seq: u64,
        replay: bool,
    ) -> redis::ScriptInvocation<'_> {
        let mut inv = self.inner.scripts.touch.prepare_invoke();
        inv.key(session_key)
            .key(self.key("active", ""))
            .key(self.key("t:", ids))
            .arg(at)
            .arg(self.inner.limits.ttl_ms)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(ids)
            .arg(if replay { "1" } else { "0" })
            .arg(count)
            .arg(&self.inner.origin_field)
            .arg(seq);
        inv
    }

    pub async fn patch(
        &self,
        id: &[u8; 16],
        patch: &Patch,
        if_match: Option<u64>,
        now: u64,
        seq: u64,
    ) -> Result<PatchOutcome> {
        let reply = self
            .run(self.patch_inv(id, patch, if_match, now, seq, false))
            .await?;
        let items = as_array(&reply)?;
        match items.first().and_then(as_int) {
            Some(1) => Ok(PatchOutcome::Updated(
                self.session_from(id, as_array(&items[1])?)?,
            )),
            Some(2) => Ok(PatchOutcome::VersionMismatch {
                current: items.get(1).and_then(as_u64).unwrap_or(0),
            }),
            Some(-2) => Err(self.unreadable(id)),
            Some(3) => Err(StoreError::Input(
                crate::session::InputError::MetadataTooLarge {
                    size: items.get(1).and_then(as_u64).unwrap_or(0) as usize,
                    limit: self.inner.limits.max_metadata_bytes,
                },
            )),
            _ => Ok(PatchOutcome::NotFound),
        }
    }

    fn patch_inv(
        &self,
        id: &[u8; 16],
        patch: &Patch,
        if_match: Option<u64>,
        now: u64,
        seq: u64,
        replay: bool,
    ) -> redis::ScriptInvocation<'_> {
        let ids = format_id(id);
        let mut inv = self.inner.scripts.patch.prepare_invoke();
        inv.key(self.key("s:", &ids))
            .key(self.key("t:", &ids))
            .arg(now)
            .arg(if_match.map(|v| v.to_string()).unwrap_or_default())
            .arg(patch.user_id.as_deref().unwrap_or(""))
            .arg(&self.inner.prefix)
            .arg(&ids)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(self.inner.limits.max_metadata_bytes)
            .arg(if replay { "1" } else { "0" })
            .arg(&self.inner.origin_field)
            .arg(seq);
        if let Some(meta) = &patch.metadata {
            for (k, v) in meta {
                inv.arg(field_name(k)).arg(v.to_string());
            }
        }
        inv
    }

    pub async fn delete(&self, id: &[u8; 16]) -> Result<bool> {
        match self.run(self.delete_inv(id)).await? {
            Value::Int(n) => Ok(n > 0),
            other => Err(unexpected(&other)),
        }
    }

    fn delete_inv(&self, id: &[u8; 16]) -> redis::ScriptInvocation<'_> {
        let ids = format_id(id);
        let mut inv = self.inner.scripts.delete.prepare_invoke();
        inv.key(self.key("s:", &ids))
            .key(self.key("t:", &ids))
            .key(self.key("active", ""))
            .arg(&ids)
            .arg(&self.inner.prefix)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(self.channel());
        inv
    }

    pub async fn rotate(&self, id: &[u8; 16], new_id: &[u8; 16]) -> Result<Option<Session>> {
        let reply = self
            .run(self.rotate_inv(id, new_id, crate::session::now_ms(), false))
            .await?;
        let items = as_array(&reply)?;
        match items.first().and_then(as_int) {
            Some(1) => Ok(Some(self.session_from(new_id, as_array(&items[1])?)?)),
            Some(-2) => Err(self.unreadable(id)),
            _ => Ok(None),
        }
    }

    fn rotate_inv(
        &self,
        id: &[u8; 16],
        new_id: &[u8; 16],
        now: u64,
        replay: bool,
    ) -> redis::ScriptInvocation<'_> {
        let (old, new) = (format_id(id), format_id(new_id));
        let mut inv = self.inner.scripts.rotate.prepare_invoke();
        inv.key(self.key("s:", &old))
            .key(self.key("s:", &new))
            .key(self.key("t:", &old))
            .key(self.key("active", ""))
            .key(self.key("t:", &new))
            .arg(&old)
            .arg(&new)
            .arg(&self.inner.prefix)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(self.channel())
            .arg(now)
            .arg(if replay { "1" } else { "0" });
        inv
    }

    pub async fn list_user(&self, user: &str, now: u64) -> Result<Vec<Session>> {
        let mut inv = self.inner.scripts.list_user.prepare_invoke();
        inv.key(self.key("u:", user))
            .arg(now)
            .arg(&self.inner.prefix)
            .arg(user);
        let reply = self.run(inv).await?;
        let items = as_array(&reply)?;
        let mut out = Vec::with_capacity(items.len() / 2);
        for pair in items.chunks(2) {
            let (Some(fields), Some(id)) = (pair.first(), pair.get(1).and_then(as_string)) else {
                continue;
            };
            if let Some(id) = crate::session::parse_session_id(&id) {
                match self.session_from(&id, as_array(fields)?) {
                    Ok(s) => out.push(s),
                    // Listed without it; the rest of the user's sessions stand.
                    Err(e) => tracing::error!(error = %e, "skipped in a user listing"),
                }
            }
        }
        out.sort_by_key(|s| s.created_at);
        Ok(out)
    }

    /// Deletes a user's sessions created up to `before`; returns the ids
    /// that were live.
    pub async fn delete_user(&self, user: &str, before: u64) -> Result<Vec<[u8; 16]>> {
        let reply = self.run(self.delete_user_inv(user, before)).await?;
        Ok(as_array(&reply)?
            .iter()
            .filter_map(as_string)
            .filter_map(|s| crate::session::parse_session_id(&s))
            .collect())
    }

    fn delete_user_inv(&self, user: &str, before: u64) -> redis::ScriptInvocation<'_> {
        let mut inv = self.inner.scripts.delete_user.prepare_invoke();
        inv.key(self.key("u:", user))
            .key(self.key("active", ""))
            .key(self.key("ut:", user))
            .arg(&self.inner.prefix)
            .arg(user)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(self.channel())
            .arg(crate::session::now_ms())
            .arg(before);
        inv
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

    /// Writes mirror copies into Redis, each unless it exists, is
    /// tombstoned or its user logged out everywhere after its creation; one
    /// pipelined round trip. Returns how many were written.
    pub async fn restore_batch(&self, sessions: &[Session]) -> Result<u64> {
        let invocations: Vec<_> = sessions.iter().map(|s| self.create_inv(s, true)).collect();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let pipe = &pipe;
        let load = self.load_scripts_pipe();
        let load = &load;
        let replies: Vec<redis::RedisResult<Value>> = self
            .call(self.inner.timeout * 8, |mut c| async move {
                load.query_async::<()>(&mut c).await?;
                pipe.query_async(&mut c).await
            })
            .await?;
        Ok(replies
            .iter()
            .filter(|r| matches!(r, Ok(Value::Int(1))))
            .count() as u64)
    }

    /// Loads every script (a pipelined EVALSHA does not load a missing one,
    /// and a Redis that restarted empty has none).
    fn load_scripts_pipe(&self) -> redis::Pipeline {
        let mut load = redis::pipe();
        for body in ALL_SCRIPTS {
            load.cmd("SCRIPT").arg("LOAD").arg(source(body)).ignore();
        }
        load
    }

    // ---- replay ----------------------------------------------------------------

    /// Applies journaled operations in order, in one pipelined round trip,
    /// reporting for each whether the session was there, gone for good
    /// (tombstone) or lost (restore it from the mirror). Pipelining is what
    /// lets replay outpace the fallback traffic that keeps arriving meanwhile.
    pub async fn replay_batch(&self, ops: &[(u64, &Op)]) -> Result<Vec<Replayed>> {
        let invocations: Vec<_> = ops
            .iter()
            .map(|&(seq, op)| match op {
                Op::Create(s) => self.create_inv(s, true),
                Op::Touch { id, at } => {
                    let ids = format_id(id);
                    self.touch_inv(&ids, &self.key("s:", &ids), *at, 1, seq, true)
                }
                Op::Touches { id, count, at } => {
                    let ids = format_id(id);
                    self.touch_inv(&ids, &self.key("s:", &ids), *at, *count, seq, true)
                }
                Op::Patch { id, patch } => self.patch_inv(id, patch, None, 0, seq, true),
                Op::Rotate { old, new } => self.rotate_inv(old, new, 0, true),
                Op::Delete { id } => self.delete_inv(id),
                Op::DeleteUser { user, before } => self.delete_user_inv(user, *before),
            })
            .collect();
        let load = self.load_scripts_pipe();
        // The chain (see EPILOGUE): the cursor starts at a fresh token.
        let cursor = self.key("replay:", &self.inner.origin_field);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("SET")
            .arg(&cursor)
            .arg(&token)
            .arg("PX")
            .arg(600_000)
            .ignore();
        let mut prev = token;
        let mut invocations = invocations;
        for (inv, (seq, _)) in invocations.iter_mut().zip(ops) {
            let own = seq.to_string();
            inv.key(&cursor).key(format!("chain:{prev}:{own}"));
            prev = own;
        }
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let (load, pipe) = (&load, &pipe);
        // A batch does more work than one request: allow it a few timeouts.
        let replies: Vec<redis::RedisResult<Value>> = self
            .call(self.inner.timeout * 8, |mut c| async move {
                load.query_async::<()>(&mut c).await?;
                pipe.query_async(&mut c).await
            })
            .await?;
        let mut out = Vec::with_capacity(ops.len());
        for ((_, op), reply) in ops.iter().zip(replies.iter()) {
            let reply = match reply {
                Ok(v) => v,
                // One bad record must not hold the whole journal up.
                Err(e) if is_bad_record(e) => {
                    let _ = self.bad_record(e.to_string());
                    out.push(Replayed::Refused(format!("corrupt record in redis: {e}")));
                    continue;
                }
                // Not applied; the entries after it (none of the same
                // session: see the batching in failover) were applied or
                // failed each on their own, so only this one stays.
                Err(e) if is_transient(e) => {
                    out.push(Replayed::Failed(e.to_string()));
                    continue;
                }
                Err(e) => {
                    out.push(Replayed::Rejected(e.to_string()));
                    continue;
                }
            };
            let code = match reply {
                Value::Int(n) => Some(*n),
                Value::Array(items) => items.first().and_then(as_int).or(Some(1)),
                _ => None,
            };
            let outcome = match (op, code) {
                (_, Some(-9)) => {
                    Replayed::Failed("an earlier entry of the batch was not applied".into())
                }
                (Op::Delete { .. } | Op::DeleteUser { .. }, _) => Replayed::Applied,
                (_, Some(-2)) => {
                    let _ = self.bad_record(format!(
                        "journal entry for session {}",
                        op.id().map(|id| format_id(&id)).unwrap_or_default()
                    ));
                    Replayed::Refused("corrupt record in redis".into())
                }
                // Already applied: by an earlier attempt, or by the live
                // request that carried the same id before it timed out.
                (Op::Touch { .. } | Op::Touches { .. }, Some(-3)) => Replayed::Applied,
                (Op::Patch { .. }, Some(4)) => Replayed::Applied,
                (Op::Create(_), Some(-1)) => Replayed::Tombstoned,
                (Op::Create(_), _) => Replayed::Applied,
                (Op::Touch { .. } | Op::Touches { .. }, Some(n)) if n > 0 => Replayed::Applied,
                (_, Some(1)) | (Op::Rotate { .. }, Some(2)) => Replayed::Applied,
                (Op::Patch { .. }, Some(3)) => {
                    Replayed::Refused("merged metadata would exceed the limit".into())
                }
                (Op::Rotate { new, .. }, Some(-1)) => {
                    // Revoked elsewhere: the rotated id must not live on.
                    match self.delete(new).await {
                        Ok(_) => Replayed::Tombstoned,
                        Err(e) => Replayed::Failed(e.to_string()),
                    }
                }
                (_, Some(-1)) => Replayed::Tombstoned,
                _ => Replayed::Missing,
            };
            out.push(outcome);
        }
        Ok(out)
    }

    /// Writes a mirror copy into Redis unless it exists or is tombstoned.
    pub async fn restore(&self, s: &Session) -> Result<Replayed> {
        match self.create_inner(s, true).await? {
            -1 => Ok(Replayed::Tombstoned),
            _ => Ok(Replayed::Applied),
        }
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
            if let Some(id) = payload
                .strip_prefix("del:")
                .and_then(crate::session::parse_session_id)
            {
                on_delete(id);
            }
        }
        Err(StoreError::Redis("pubsub connection closed".into()))
    }

    /// Builds a session from a HGETALL reply. A record missing one of the
    /// fields every node writes, or with one that is not a number, is a bad
    /// record (counted), never a session with made-up values.
    fn session_from(&self, id: &[u8; 16], fields: &[Value]) -> Result<Session> {
        let mut s = Session {
            id: *id,
            user_id: String::new(),
            created_at: 0,
            last_accessed: 0,
            expires_at: 0,
            request_count: 0,
            version: 0,
            metadata: String::new(),
        };
        let mut meta: Vec<(String, String)> = Vec::new();
        let mut seen = 0u8;
        let mut bad: Option<String> = None;
        for pair in fields.chunks(2) {
            let (Some(k), Some(v)) = (
                pair.first().and_then(as_string),
                pair.get(1).and_then(as_string),
            ) else {
                continue;
            };
            let (slot, bit) = match k.as_str() {
                "u" => {
                    s.user_id = v;
                    seen |= 1;
                    continue;
                }
                "c" => (&mut s.created_at, 2),
                "a" => (&mut s.last_accessed, 4),
                "e" => (&mut s.expires_at, 8),
                "n" => (&mut s.request_count, 16),
                "v" => (&mut s.version, 32),
                _ => {
                    if let Some(key) = k.strip_prefix("m:") {
                        meta.push((key.to_string(), v));
                    }
                    continue;
                }
            };
            match v.parse::<u64>() {
                Ok(n) => {
                    *slot = n;
                    seen |= bit;
                }
                Err(_) => bad = Some(format!("field {k} is not a number")),
            }
        }
        if bad.is_none() && seen != 63 {
            bad = Some("fields missing".into());
        }
        if let Some(why) = bad {
            return Err(self.bad_record(format!("session {}: {why}", format_id(id))));
        }
        meta.sort();
        let mut text = String::with_capacity(
            2 + meta
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>(),
        );
        text.push('{');
        for (i, (k, v)) in meta.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(k);
            text.push(':');
            text.push_str(v);
        }
        text.push('}');
        if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_err() {
            return Err(self.bad_record(format!(
                "session {} has undecodable metadata",
                format_id(id)
            )));
        }
        s.metadata = text;
        Ok(s)
    }
}

/// `redis+sentinel://[:password@]host:port[,host:port…]/master_name[/db]`
fn sentinel_client(rest: &str) -> std::result::Result<redis::sentinel::SentinelClient, String> {
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (Some(auth), rest),
        None => (None, rest),
    };
    let (hosts, path) = rest
        .split_once('/')
        .ok_or("redis+sentinel URL needs /master_name")?;
    let mut path = path.split('/');
    let master = path
        .next()
        .filter(|m| !m.is_empty())
        .ok_or("redis+sentinel URL needs /master_name")?;
    let db: i64 = path
        .next()
        .map(|d| d.parse().map_err(|_| "bad db number"))
        .transpose()?
        .unwrap_or(0);
    let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
    let mut info = redis::RedisConnectionInfo::default().set_db(db);
    if let Some(auth) = auth {
        let password = auth.split_once(':').map(|(_, p)| p).unwrap_or(auth);
        if !password.is_empty() {
            info = info.set_password(password);
        }
    }
    let node =
        redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
    redis::sentinel::SentinelClient::build(
        sentinels,
        master.to_string(),
        Some(node),
        redis::sentinel::SentinelServerType::Master,
    )
    .map_err(|e| format!("redis+sentinel URL: {e}"))
}

/// Whether Redis refused an operation because of the record it found rather
/// than because of its own state: only `WRONGTYPE` (a session key holding
/// something other than a hash) says that for sure. Every other error reply
/// (OOM, READONLY, LOADING, BUSY, MISCONF...) means Redis cannot take the
/// operation now, so the node falls back and a replay keeps the entry; the
/// scripts themselves report fields they cannot count with (-2).
fn is_bad_record(e: &redis::RedisError) -> bool {
    e.clone()
        .into_server_errors()
        .is_some_and(|errs| errs.iter().any(|(_, err)| err.code() == "WRONGTYPE"))
}

/// Whether an error says Redis cannot take writes *now* (memory, a replica,
/// loading, a busy script, the connection), as opposed to refusing this one
/// operation whatever its state.
fn is_transient(e: &redis::RedisError) -> bool {
    const TRANSIENT: [&str; 10] = [
        "OOM",
        "READONLY",
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "TRYAGAIN",
        "NOREPLICAS",
        "MISCONF",
        "CLUSTERDOWN",
        "NOSCRIPT",
    ];
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
        return true;
    }
    let text = e.to_string();
    match e.code() {
        Some(code) => TRANSIENT.contains(&code) || TRANSIENT.iter().any(|t| text.contains(t)),
        None => true,
    }
}

/// The hash field of a metadata key: `m:` + the key as a JSON string.
fn field_name(key: &str) -> String {
    format!("m:{}", serde_json::Value::String(key.to_string()))
}

/// Metadata as hash field/value pairs.
fn metadata_fields(text: &str) -> Vec<(String, String)> {
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| (field_name(k), v.to_string()))
        .collect()
}

fn as_array(v: &Value) -> Result<&[Value]> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(unexpected(other)),
    }
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => as_string(other).and_then(|s| s.parse().ok()),
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn unexpected(v: &Value) -> StoreError {
    StoreError::Redis(format!("unexpected reply from redis: {v:?}"))
}

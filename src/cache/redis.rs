//! The cache's Redis: its own connection (`cache_redis_url`, by default the
//! session Redis), one Lua script for every operation, and the
//! invalidation channel.
//!
//! Keys, all under `key_prefix` and all with a TTL (so a Redis whose
//! `maxmemory-policy` is `volatile-lru` may evict any of them):
//! - `cg:<ns>`: the namespace's generation, a random token. A purge sets a
//!   fresh one: every value of the old generation is out of reach at once
//!   (O(1), no scan) and expires with its own TTL. A write refreshes the
//!   key's TTL to the longest a value may have, so it outlives every value
//!   of its generation; if it is evicted anyway, the next use draws a
//!   fresh generation, which drops the namespace's values (a purge), never
//!   brings purged ones back.
//! - `cv:<ns>:<gen>:<key>`: a value ([`super::encode`]), `PX` its TTL.
//! - `cl:<ns>:<gen>:<key>`: a fill lease, the holder's token, `PX` the
//!   lease's lifetime; dropped by every write and deletion of the key, and
//!   out of reach after a purge, so the holder's late PUT gets 409.
//! - channel `cache-events`: `<op> <origin> <ns>[ <key>]`, published in the
//!   same script as the change (so in Redis's order of changes): `p` a
//!   write, `d` a deletion, `g` a purge. `origin` is the node's random id;
//!   nodes skip their own events.
//!
//! Namespaces and keys never hold `:` (see `super::valid_name`), so the
//! keys cannot collide. The script builds the keys it touches beyond
//! `KEYS[1]` from the prefix: fine for one Redis or Sentinel, not for
//! Redis Cluster (as for sessions).

use super::Operation;
use crate::store::StoreError;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script, Value};
use std::sync::RwLock;
use std::time::Duration;

type Result<T> = std::result::Result<T, StoreError>;
type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Every redis-rs future this module awaits goes through here: polled
/// through a pointer, its code is the one copy the session store's calls
/// use too, instead of being inlined into each caller here (which cost
/// about 100 KB of the aarch64 release, whose budget is 4 MB).
fn boxed<'a, T>(f: impl std::future::Future<Output = T> + Send + 'a) -> Boxed<'a, T> {
    Box::pin(f)
}

/// Every operation, chosen by `ARGV[6]`: `f` fetch (and maybe take a lease),
/// `p` put (checking a lease when given), `d` delete, `g` purge, `n`
/// nothing (the probe).
/// ARGV: 1 value-key prefix `<p>cv:<ns>:`, 2 lease-key prefix, 3 key,
/// 4 a fresh generation, 5 the generation's TTL (ms), 6 op, 7 value,
/// 8 TTL of the value or the lease (ms), 9 lease token or '', 10 channel,
/// 11 event.
/// Replies: fetch `{1, value}` hit, `{0}` miss, `{2}` lease granted, `{3}`
/// lease held by another; put `{1}` or `{0}` (lease not held); delete `{n}`
/// values deleted; purge `{1}`.
const SCRIPT: &str = r"
local op = ARGV[6]
if op == 'n' then return {1} end
if op == 'g' then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
  redis.call('PUBLISH', ARGV[10], ARGV[11])
  return {1}
end
local g = redis.call('GET', KEYS[1])
if not g then
  if op == 'd' then
    redis.call('PUBLISH', ARGV[10], ARGV[11])
    return {0}
  end
  g = ARGV[4]
  redis.call('SET', KEYS[1], g, 'PX', ARGV[5])
end
local vk = ARGV[1] .. g .. ':' .. ARGV[3]
local lk = ARGV[2] .. g .. ':' .. ARGV[3]
if op == 'f' then
  local v = redis.call('GET', vk)
  if v then return {1, v} end
  if ARGV[9] == '' then return {0} end
  if redis.call('SET', lk, ARGV[9], 'NX', 'PX', ARGV[8]) then return {2} end
  return {3}
end
if op == 'p' then
  if ARGV[9] ~= '' and redis.call('GET', lk) ~= ARGV[9] then return {0} end
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('SET', vk, ARGV[7], 'PX', ARGV[8])
  redis.call('DEL', lk)
  redis.call('PUBLISH', ARGV[10], ARGV[11])
  return {1}
end
local n = redis.call('DEL', vk)
redis.call('DEL', lk)
redis.call('PUBLISH', ARGV[10], ARGV[11])
return {n}
";

/// What a fetch found.
pub enum Fetched {
    Value(Vec<u8>),
    Miss,
    LeaseGranted,
    LeaseHeld,
}

enum Target {
    Direct(Client),
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

pub struct CacheRedis {
    target: Target,
    conn: RwLock<Option<MultiplexedConnection>>,
    prefix: String,
    channel: String,
    timeout: Duration,
    script: Script,
    /// TTL of generation keys: the longest a value may live.
    gen_ttl_ms: u64,
}

/// One operation's arguments, as the script takes them.
pub struct Op<'a> {
    pub ns: &'a str,
    pub key: &'a str,
    pub op: Operation,
    pub value: &'a [u8],
    pub ttl_ms: u64,
    pub token: &'a str,
    pub origin: u64,
}

impl CacheRedis {
    /// Prepares the client; nothing connects until first use.
    pub fn new(
        url: &str,
        prefix: &str,
        timeout: Duration,
        gen_ttl_ms: u64,
    ) -> std::result::Result<CacheRedis, String> {
        let target = match url.strip_prefix("redis+sentinel://") {
            Some(rest) => Target::Sentinel(tokio::sync::Mutex::new(sentinel(rest)?)),
            None => {
                let info = redis::IntoConnectionInfo::into_connection_info(url)
                    .map_err(|e| format!("cache_redis_url: {e}"))?;
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(redis::ProtocolVersion::RESP2);
                Target::Direct(
                    Client::open(info.set_redis_settings(settings))
                        .map_err(|e| format!("cache_redis_url: {e}"))?,
                )
            }
        };
        Ok(CacheRedis {
            target,
            conn: RwLock::new(None),
            prefix: prefix.to_string(),
            channel: format!("{prefix}cache-events"),
            timeout,
            script: Script::new(SCRIPT),
            gen_ttl_ms,
        })
    }

    async fn client(&self) -> Result<Client> {
        match &self.target {
            Target::Direct(c) => Ok(c.clone()),
            Target::Sentinel(s) => {
                let mut s = s.lock().await;
                boxed(s.async_get_client())
                    .await
                    .map_err(|e| StoreError::Redis(format!("sentinel: {e}")))
            }
        }
    }

    async fn conn(&self) -> Result<MultiplexedConnection> {
        if let Some(c) = self.conn.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(c.clone());
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(None);
        let client = self.client().await?;
        let c = boxed(client.get_multiplexed_async_connection_with_config(&cfg))
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    /// Runs one operation within the store timeout. Any failure forgets the
    /// connection (the next call reconnects); the caller decides what an
    /// unreachable Redis means for the request.
    pub fn run<'a>(&'a self, op: &'a Op<'a>, fresh_gen: &'a str) -> Boxed<'a, Result<Value>> {
        boxed(self.run_inner(op, fresh_gen))
    }

    async fn run_inner(&self, op: &Op<'_>, fresh_gen: &str) -> Result<Value> {
        let mut inv = self.script.prepare_invoke();
        let ns_part = |kind: &str| format!("{}{kind}:{}:", self.prefix, op.ns);
        let event = event(op.op, op.origin, op.ns, op.op.names_key().then_some(op.key));
        inv.key(format!("{}cg:{}", self.prefix, op.ns))
            .arg(ns_part("cv"))
            .arg(ns_part("cl"))
            .arg(op.key)
            .arg(fresh_gen)
            .arg(self.gen_ttl_ms)
            .arg(&[op.op.byte()][..])
            .arg(op.value)
            .arg(op.ttl_ms.max(1))
            .arg(op.token)
            .arg(&self.channel)
            .arg(event);
        let attempt = async {
            let mut c = self.conn().await?;
            boxed(inv.invoke_async::<Value>(&mut c))
                .await
                .map_err(|e| StoreError::Redis(e.to_string()))
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.drop_conn();
                Err(e)
            }
            Err(_) => {
                self.drop_conn();
                Err(StoreError::Redis(format!(
                    "no answer within {} ms",
                    self.timeout.as_millis()
                )))
            }
        }
    }

    fn drop_conn(&self) {
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A fetch's reply, read.
    pub fn fetched(v: Value) -> Fetched {
        let items = match v {
            Value::Array(items) => items,
            _ => return Fetched::Miss,
        };
        match (items.first(), items.get(1)) {
            (Some(Value::Int(1)), Some(Value::BulkString(_))) => match items.into_iter().nth(1) {
                Some(Value::BulkString(b)) => Fetched::Value(b),
                _ => Fetched::Miss,
            },
            (Some(Value::Int(2)), _) => Fetched::LeaseGranted,
            (Some(Value::Int(3)), _) => Fetched::LeaseHeld,
            _ => Fetched::Miss,
        }
    }

    /// The first number of a put, delete or purge reply.
    pub fn count(v: &Value) -> i64 {
        match v {
            Value::Array(items) => match items.first() {
                Some(Value::Int(n)) => *n,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Whether Redis answers (a script call that does nothing: the one
    /// code path every operation takes).
    pub async fn ping(&self) -> Result<()> {
        let op = Op {
            ns: "",
            key: "",
            op: Operation::Probe,
            value: &[],
            ttl_ms: 0,
            token: "",
            origin: 0,
        };
        self.run(&op, "").await.map(|_| ())
    }

    /// A pub/sub connection subscribed to the invalidation channel.
    pub async fn subscribe(&self) -> Result<redis::aio::PubSub> {
        let connect = async {
            let client = self.client().await?;
            let mut p = boxed(client.get_async_pubsub())
                .await
                .map_err(|e| StoreError::Redis(e.to_string()))?;
            boxed(p.subscribe(&self.channel))
                .await
                .map_err(|e| StoreError::Redis(e.to_string()))?;
            Ok(p)
        };
        tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), connect)
            .await
            .map_err(|_| StoreError::Redis("subscribing timed out".into()))?
    }
}

/// An event on the channel: `<op> <origin hex> <ns>[ <key>]`.
fn event(op: Operation, origin: u64, ns: &str, key: Option<&str>) -> String {
    let mut e = format!("{} {origin:x} {ns}", op.byte() as char);
    if let Some(k) = key {
        e.push(' ');
        e.push_str(k);
    }
    e
}

/// An event read back: (op, origin, namespace, key).
pub fn parse_event(payload: &[u8]) -> Option<(Operation, u64, &str, Option<&str>)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.split(' ');
    let op = match parts.next()?.as_bytes() {
        [b] => Operation::from_byte(*b)?,
        _ => return None,
    };
    let origin = u64::from_str_radix(parts.next()?, 16).ok()?;
    let ns = parts.next()?;
    let key = parts.next();
    match (op, key) {
        (Operation::Put | Operation::Delete, Some(_)) | (Operation::Purge, None) => {
            Some((op, origin, ns, key))
        }
        _ => None,
    }
}

/// `[[user]:password@]host:port[,host:port…]/master_name[/db]`, the same
/// form as the session store's `redis_url`.
fn sentinel(rest: &str) -> std::result::Result<redis::sentinel::SentinelClient, String> {
    let bad = || "cache_redis_url: redis+sentinel://[:password@]host:port[,…]/master[/db]";
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (Some(a), r),
        None => (None, rest),
    };
    let (hosts, path) = rest.split_once('/').ok_or_else(bad)?;
    let mut path = path.split('/');
    let master = path.next().filter(|m| !m.is_empty()).ok_or_else(bad)?;
    let db: i64 = match path.next() {
        Some(d) => d.parse().map_err(|_| bad())?,
        None => 0,
    };
    if hosts.is_empty() || path.next().is_some() {
        return Err(bad().into());
    }
    let mut info = redis::RedisConnectionInfo::default().set_db(db);
    if let Some(p) = auth
        .map(|a| a.split_once(':').map(|(_, p)| p).unwrap_or(a))
        .filter(|p| !p.is_empty())
    {
        info = info.set_password(p);
    }
    redis::sentinel::SentinelClient::build(
        hosts.split(',').map(|h| format!("redis://{h}")).collect(),
        master.to_string(),
        Some(
            redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(info),
        ),
        redis::sentinel::SentinelServerType::Master,
    )
    .map_err(|e| format!("cache_redis_url: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_junk_is_ignored() {
        let e = event(Operation::Put, 0xabc, "ns", Some("k.1"));
        assert_eq!(e, "p abc ns k.1", "the wire format");
        assert_eq!(
            parse_event(e.as_bytes()),
            Some((Operation::Put, 0xabc, "ns", Some("k.1")))
        );
        let g = event(Operation::Purge, 7, "ns", None);
        assert_eq!(g, "g 7 ns");
        assert_eq!(
            parse_event(g.as_bytes()),
            Some((Operation::Purge, 7, "ns", None))
        );
        for junk in ["", "p", "p zz ns k", "g 1 ns k", "x 1 ns k", "d 1 ns"] {
            assert_eq!(parse_event(junk.as_bytes()), None, "{junk}");
        }
        assert!(sentinel("h:1/m/2").is_ok());
        assert!(sentinel("h:1").is_err());
    }
}

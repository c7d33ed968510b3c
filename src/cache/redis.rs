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
use crate::redis_link::{boxed, Boxed, Link, LinkError, Target};
use redis::{Script, Value};
use std::time::Duration;

type Result<T> = std::result::Result<T, LinkError>;

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

/// The cache's Redis: its own link (`crate::redis_link`), so its calls get
/// the same timeout, reconnect and error classes as the session store's.
pub struct CacheRedis {
    link: Link,
    prefix: String,
    channel: String,
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
        tls: &crate::config::RedisTls,
    ) -> std::result::Result<CacheRedis, String> {
        // The link names the URL's form in Sentinel errors; the operator
        // needs to know which setting holds it.
        let target = Target::open(url, "cache_redis_url", tls)
            .map_err(|e| e.replacen("redis+sentinel URL", "cache_redis_url", 1))?;
        Ok(CacheRedis {
            link: Link::new(target, timeout),
            prefix: prefix.to_string(),
            channel: format!("{prefix}cache-events"),
            script: Script::new(SCRIPT),
            gen_ttl_ms,
        })
    }

    /// Runs one operation within the store timeout, on the link (one fresh
    /// try after a broken connection; a failure forgets the connection); the
    /// caller decides what an unreachable Redis means for the request.
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
        let inv = &inv;
        self.link
            .call(self.link.timeout(), |mut c| {
                boxed(async move { inv.invoke_async::<Value>(&mut c).await })
            })
            .await
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
            let client = self.link.client().await?;
            let mut p = boxed(client.get_async_pubsub())
                .await
                .map_err(|e| LinkError::Outage(e.to_string()))?;
            boxed(p.subscribe(&self.channel))
                .await
                .map_err(|e| LinkError::Outage(e.to_string()))?;
            Ok(p)
        };
        tokio::time::timeout(self.link.timeout().max(Duration::from_secs(1)), connect)
            .await
            .map_err(|_| LinkError::Outage("subscribing timed out".into()))?
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
        assert!(CacheRedis::new(
            "redis+sentinel://h:1/m/2",
            "p:",
            Duration::ZERO,
            1,
            &Default::default()
        )
        .is_ok());
        let bad = CacheRedis::new(
            "redis+sentinel://h:1",
            "p:",
            Duration::ZERO,
            1,
            &Default::default(),
        );
        assert!(bad.is_err_and(|e| e.starts_with("cache_redis_url")));
    }
}

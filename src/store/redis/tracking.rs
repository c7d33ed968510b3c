//! The near cache's own connection to Redis (see `store::near`).
//!
//! One RESP3 connection per node with `CLIENT TRACKING ON NOLOOP`: Redis
//! remembers every session key this connection reads and pushes an
//! `invalidate` message on it when such a key changes afterwards, whoever
//! changed it (another node, a script, `redis-cli`), and when it expires or
//! is evicted. RESP3 pushes arrive on the same connection as the replies, in
//! order, and redis-rs hands them to [`on_push`] as they are read, so there is
//! no second subscriber connection whose death could go unnoticed: when this
//! connection dies, the invalidations die with it and the cache is emptied
//! and bypassed until a new one is up.
//!
//! `NOLOOP`: the node's own writes on this connection (the write-behind
//! touches and the touches of cache fills) do not invalidate its own copies;
//! the cache has already counted them. Everything else the node writes goes
//! over the main connection and does invalidate, like any other client's.
//!
//! Redis older than 6 has neither RESP3 nor tracking: the connection fails
//! and the node serves every touch from Redis, as without a near cache.

use super::record::as_array;
use super::scripts::TouchReply;
use super::{RedisStore, Result};
use crate::session::{format_id, parse_session_id, Session};
use crate::store::near::{NearCache, Pending};
use crate::store::StoreError;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, PushInfo, PushKind, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What the name of the tracking connection starts with in `CLIENT LIST`.
pub const TRACKING_CLIENT_NAME: &str = "edgenode-near";

/// The current tracking connection, numbered so that the death of an older
/// one does not take the cache down again.
pub(super) struct Tracking {
    pub(super) conn: std::sync::RwLock<Option<MultiplexedConnection>>,
    pub(super) current: Arc<AtomicU64>,
}

impl Tracking {
    pub(super) fn new() -> Tracking {
        Tracking {
            conn: std::sync::RwLock::new(None),
            current: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// One write-behind count, with the operation id it carries (see `journal`).
#[derive(Debug, Clone, Copy)]
pub struct Flush {
    pub id: [u8; 16],
    pub pending: Pending,
    pub seq: u64,
}

/// What Redis did with one [`Flush`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    Counted,
    /// The session is gone (deleted, expired): nothing to count.
    Gone,
    /// The record is not one a node wrote; counted as corrupt.
    Corrupt,
}

/// Handles what Redis pushes on the tracking connection; runs in the
/// connection's reader, before any reply that came after the push.
fn on_push(near: &NearCache, key_prefix: &str, current: &AtomicU64, number: u64, push: PushInfo) {
    match push.kind {
        PushKind::Invalidate => match push.data.first() {
            Some(Value::Array(keys)) => {
                for key in keys {
                    let key: &[u8] = match key {
                        Value::BulkString(b) => b,
                        Value::SimpleString(s) => s.as_bytes(),
                        _ => continue,
                    };
                    let id = std::str::from_utf8(key)
                        .ok()
                        .and_then(|k| k.strip_prefix(key_prefix))
                        .and_then(parse_session_id);
                    if let Some(id) = id {
                        near.invalidate(&id);
                    }
                }
            }
            // A null: Redis flushed its data (FLUSHALL, FLUSHDB).
            _ => near.invalidate_all(),
        },
        PushKind::Disconnection if current.load(Ordering::Acquire) == number => {
            tracing::info!(
                "the near cache's connection to redis closed; cache bypassed until it is back"
            );
            near.link_down();
        }
        _ => {}
    }
}

impl RedisStore {
    /// Opens the tracking connection and brings the near cache up on it.
    /// Any previous one is dropped first (and the cache with it).
    pub async fn open_tracking(&self, near: &Arc<NearCache>) -> Result<()> {
        self.close_tracking(near);
        let client = self.client().await?;
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(settings))
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        let tracking = &self.inner.tracking;
        let number = tracking.current.fetch_add(1, Ordering::AcqRel) + 1;
        let (cache, prefix, current) = (near.clone(), self.key("s:", ""), tracking.current.clone());
        let handler = move |push: PushInfo| -> std::result::Result<(), std::convert::Infallible> {
            on_push(&cache, &prefix, &current, number, push);
            Ok(())
        };
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.inner.timeout))
            .set_response_timeout(None)
            .set_push_sender(handler);
        let setup = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?;
            let mut pipe = self.load_scripts_pipe();
            pipe.cmd("CLIENT")
                .arg("SETNAME")
                .arg(format!("{TRACKING_CLIENT_NAME}-{:x}", self.origin()))
                .ignore()
                .cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .arg("NOLOOP")
                .ignore();
            pipe.query_async::<()>(&mut conn).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        let conn = tokio::time::timeout(self.inner.timeout * 4, setup)
            .await
            .map_err(|_| StoreError::Redis("near cache connection timed out".into()))?
            .map_err(|e| StoreError::Redis(format!("near cache connection: {e}")))?;
        // Only if nobody closed the link meanwhile (a call on the old
        // connection that failed): its Disconnection would go unheeded.
        let mut slot = tracking.conn.write().unwrap_or_else(|p| p.into_inner());
        if tracking.current.load(Ordering::Acquire) != number {
            return Err(StoreError::Redis(
                "near cache connection closed while it was opened".into(),
            ));
        }
        *slot = Some(conn);
        near.link_up();
        Ok(())
    }

    /// Drops the tracking connection and bypasses the cache.
    pub fn close_tracking(&self, near: &NearCache) {
        let tracking = &self.inner.tracking;
        let mut slot = tracking.conn.write().unwrap_or_else(|p| p.into_inner());
        tracking.current.fetch_add(1, Ordering::AcqRel);
        *slot = None;
        near.link_down();
    }

    fn tracking_conn(&self) -> Option<MultiplexedConnection> {
        self.inner
            .tracking
            .conn
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the tracking connection answers within the store timeout;
    /// when it does not, it is dropped and the cache bypassed (a connection
    /// that silently stopped delivering could also be withholding
    /// invalidations).
    pub async fn check_tracking(&self, near: &NearCache) -> bool {
        let Some(mut conn) = self.tracking_conn() else {
            return false;
        };
        let ping = redis::cmd("PING");
        match tokio::time::timeout(self.inner.timeout, ping.query_async::<String>(&mut conn)).await
        {
            Ok(Ok(_)) => true,
            _ => {
                self.close_tracking(near);
                false
            }
        }
    }

    /// A touch of a session the near cache does not hold: read over the
    /// tracking connection (so Redis tracks the key for this node) and
    /// stored in the cache unless an invalidation raced it. The read writes
    /// nothing, so filling one node's cache does not invalidate another's.
    ///
    /// The request is counted like a cached touch, written behind, and so
    /// is every use while the tracking connection is down (read over the
    /// main connection, not kept): all of this node's counts then reach
    /// Redis through the write-behind, in the order of their operation ids,
    /// and a batch sent again after its connection failed (as a replay,
    /// skipped where Redis applied it) is never overtaken by a newer count.
    pub async fn touch_and_cache(
        &self,
        near: &NearCache,
        id: &[u8; 16],
        now: u64,
    ) -> Result<Option<Session>> {
        let ticket = near.ticket(id);
        let session_key = self.key("s:", &format_id(id));
        let key = &session_key;
        let fields = match self.tracking_conn().filter(|_| near.is_up()) {
            Some(mut conn) => {
                let mut read = redis::cmd("HGETALL");
                read.arg(key);
                let call = read.query_async::<Value>(&mut conn);
                match self.on_tracking(near, "", call).await? {
                    Ok(v) => v,
                    Err(e) if super::conn::is_bad_record(&e) => {
                        return Err(self.bad_record(e.to_string()))
                    }
                    // The cache's own connection broke (killed, reset)
                    // while the main one may be fine: read over that.
                    Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                        self.close_tracking(near);
                        self.read_record(key).await?
                    }
                    Err(e) => {
                        self.close_tracking(near);
                        return Err(StoreError::Redis(format!("near cache connection: {e}")));
                    }
                }
            }
            None => self.read_record(key).await?,
        };
        let fields = flat_fields(fields)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let session = self.session_from(id, &fields)?;
        if session.is_expired(now) {
            // Redis drops it at its expiry time, by its own clock.
            return Ok(None);
        }
        Ok(Some(near.fill(session, ticket, now)))
    }

    /// A call on the cache's own connection, within the store timeout. No
    /// answer closes the connection (the cache is bypassed until a new one
    /// is up) and is an error; what Redis answered is the caller's to judge.
    async fn on_tracking<T>(
        &self,
        near: &NearCache,
        what: &str,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<redis::RedisResult<T>> {
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(answered) => Ok(answered),
            Err(_) => {
                self.close_tracking(near);
                Err(StoreError::Redis(format!(
                    "{what}no answer within {} ms",
                    self.inner.timeout.as_millis()
                )))
            }
        }
    }

    /// A session hash, over the main connection.
    async fn read_record(&self, key: &str) -> Result<Value> {
        self.call(self.inner.timeout, |mut c| async move {
            redis::cmd("HGETALL")
                .arg(key)
                .query_async::<Value>(&mut c)
                .await
        })
        .await
    }

    /// Writes counts behind: one touch per session, all in one pipelined
    /// round trip, over the tracking connection when there is one (so they
    /// do not invalidate this node's own copies), else the main one.
    /// An error means Redis may have applied any part of it.
    ///
    /// One script call per session, not one for the whole batch: on a
    /// tracking connection Redis 7.0 charges a script for every key it names
    /// on every read inside it, so a batch script over n sessions cost
    /// n² (measured: 17 ms for 256 sessions instead of 1 ms untracked).
    /// `replay`: each touch is skipped if Redis already applied its id (a
    /// batch sent again after a failure that may have applied part of it).
    pub async fn flush_touches(
        &self,
        batch: &[Flush],
        near: &NearCache,
        replay: bool,
    ) -> Result<Vec<Flushed>> {
        let keys: Vec<(String, String)> = batch
            .iter()
            .map(|f| {
                let ids = format_id(&f.id);
                let key = self.key("s:", &ids);
                (ids, key)
            })
            .collect();
        let invocations: Vec<_> = batch
            .iter()
            .zip(&keys)
            .map(|(f, (ids, key))| {
                self.touch_inv(ids, key, f.pending.at, f.pending.count, f.seq, replay)
            })
            .collect();
        let mut pipe = redis::pipe();
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let load = self.load_scripts_pipe();
        let (pipe, load) = (&pipe, &load);
        let replies: Vec<Value> = match self.tracking_conn().filter(|_| near.is_up()) {
            Some(mut conn) => {
                let call = query_loading_scripts(pipe, load, &mut conn);
                match self
                    .on_tracking(near, "writing touches behind: ", call)
                    .await?
                {
                    Ok(v) => v,
                    Err(e) => {
                        self.close_tracking(near);
                        return Err(StoreError::Redis(format!("writing touches behind: {e}")));
                    }
                }
            }
            None => {
                self.call(self.inner.timeout, |mut c| async move {
                    query_loading_scripts(pipe, load, &mut c).await
                })
                .await?
            }
        };
        Ok(replies
            .iter()
            .zip(batch)
            .map(|(reply, f)| match TouchReply::decode(reply) {
                Some(TouchReply::Counted(_)) => Flushed::Counted,
                Some(TouchReply::Corrupt) => {
                    let _ = self.unreadable(&f.id);
                    Flushed::Corrupt
                }
                _ => Flushed::Gone,
            })
            .collect())
    }
}

/// Runs a pipeline of script calls, loading every script first when Redis
/// has none (it restarted empty): NOSCRIPT is refused before anything runs,
/// and every call of a write-behind batch names the same script.
async fn query_loading_scripts(
    pipe: &redis::Pipeline,
    load: &redis::Pipeline,
    conn: &mut MultiplexedConnection,
) -> redis::RedisResult<Vec<Value>> {
    match pipe.query_async::<Vec<Value>>(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            load.query_async::<()>(conn).await?;
            pipe.query_async(conn).await
        }
        other => other,
    }
}

/// A HGETALL reply as field/value pairs: a map in RESP3, a flat array in
/// RESP2.
fn flat_fields(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Map(pairs) => Ok(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect()),
        other => as_array(&other).map(<[Value]>::to_vec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Limits;

    #[test]
    fn invalidations_drop_the_named_sessions_and_a_null_drops_all() {
        let limits = Limits {
            ttl_ms: 60_000,
            max_lifetime_ms: 600_000,
            max_metadata_bytes: 1024,
        };
        let near = NearCache::new(1 << 20, limits);
        near.link_up();
        let mut a = Session::new("u".into(), "{}".into(), 1_000, &limits);
        a.id = [1; 16];
        let mut b = a.clone();
        b.id = [2; 16];
        for s in [&a, &b] {
            let t = near.ticket(&s.id);
            near.fill((*s).clone(), t, 1_000);
        }
        let current = AtomicU64::new(1);
        let key = format!("p:s:{}", format_id(&a.id));
        let push = |data| PushInfo {
            kind: PushKind::Invalidate,
            data,
        };
        on_push(
            &near,
            "p:s:",
            &current,
            1,
            push(vec![Value::Array(vec![Value::BulkString(
                key.into_bytes(),
            )])]),
        );
        assert!(near.touch(&a.id, 2_000).is_none());
        assert!(near.touch(&b.id, 2_000).is_some());
        on_push(&near, "p:s:", &current, 1, push(vec![Value::Nil]));
        assert!(near.touch(&b.id, 2_000).is_none());
        // the death of an older connection leaves the current one up
        on_push(
            &near,
            "p:s:",
            &current,
            0,
            PushInfo {
                kind: PushKind::Disconnection,
                data: vec![],
            },
        );
        assert!(near.is_up());
        on_push(
            &near,
            "p:s:",
            &current,
            1,
            PushInfo {
                kind: PushKind::Disconnection,
                data: vec![],
            },
        );
        assert!(!near.is_up());
    }
}

//! The near cache's own connection to Redis (see `store::near`). This room
//! only talks to Redis: it opens the connection, reads sessions and writes
//! counts over it, and tells whoever holds the copies (a [`TrackingSink`],
//! the near cache) what the connection heard, as [`LinkEvent`]s. What the
//! cache does about them is the near cache's business.
//!
//! One RESP3 connection per node with `CLIENT TRACKING ON OPTIN NOLOOP`:
//! Redis remembers the session keys this connection reads right after a
//! `CLIENT CACHING YES` (a fill's read, and the re-read after the
//! write-behind, see [`RedisStore::flush_touches`]) and pushes an
//! `invalidate` message on it when such a key changes afterwards, whoever
//! changed it (another node, a script, `redis-cli`), and when it expires or
//! is evicted. OPTIN, so that the reads inside the write-behind's script
//! track nothing: Redis 7.0 charges a script on a tracking connection, for
//! each read inside it, every key the call names (n² for a batch).
//!
//! RESP3 pushes arrive on the same connection as the replies, in order, and
//! redis-rs hands them to `on_push` as they are read, so there is no second
//! subscriber connection whose death could go unnoticed: when this
//! connection dies, the invalidations die with it and the cache is emptied
//! and bypassed until a new one is up.
//!
//! `NOLOOP`: the node's own writes on this connection (the write-behind of
//! the cached sessions' counts) do not invalidate its own copies;
//! the cache has already counted them. Everything else the node writes goes
//! over the main connection and does invalidate, like any other client's.
//!
//! Redis older than 6 has neither RESP3 nor tracking: the connection fails
//! and the node serves every touch from Redis, as without a near cache.

use super::record::unexpected;
use super::scripts::TouchReply;
use super::{RedisStore, Result};
use crate::redis_link::is_bad_record;
use crate::session::{format_id, id_text, parse_session_id, Session};
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

/// What the tracking connection tells the holder of the copies it tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// A new connection is up: Redis tracks what is read over it from now.
    Opened,
    /// A session read over the connection changed in Redis (whoever changed
    /// it), expired or was evicted.
    Invalidated([u8; 16]),
    /// Redis flushed its data (FLUSHALL, FLUSHDB): everything changed.
    Flushed,
    /// The current connection closed by itself: its invalidations with it.
    Disconnected,
    /// The node closed the connection (a failed call, fallback, a drain).
    Closed,
}

/// The holder of what the tracking connection tracks: the near cache.
pub trait TrackingSink: Send + Sync + 'static {
    /// Whether copies read over the connection are served now.
    fn is_up(&self) -> bool;
    /// One thing the connection heard; runs in its reader for pushes,
    /// before any reply that came after the push.
    fn heard(&self, event: LinkEvent);
}

/// One write-behind count, with the operation id it carries (see `journal`).
#[derive(Debug, Clone, Copy)]
pub struct Flush {
    pub id: [u8; 16],
    /// Requests counted and not yet written.
    pub count: u64,
    /// The latest one's time: `last_accessed` and the expiry follow it.
    pub at: u64,
    pub seq: u64,
}

/// What Redis did with one [`Flush`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Counted: Redis's count after it (0 when a retry found it counted
    /// already and Redis did not say).
    Counted(u64),
    /// The session is gone (deleted, expired): nothing to count.
    Gone,
    /// The record is not one a node wrote; counted as corrupt.
    Corrupt,
}

/// Reads what Redis pushes on the tracking connection into [`LinkEvent`]s;
/// runs in the connection's reader, before any reply that came after the
/// push. Only the current connection's death is told.
fn on_push(
    sink: &dyn TrackingSink,
    key_prefix: &str,
    current: &AtomicU64,
    number: u64,
    push: PushInfo,
) {
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
                        sink.heard(LinkEvent::Invalidated(id));
                    }
                }
            }
            // A null: Redis flushed its data (FLUSHALL, FLUSHDB).
            _ => sink.heard(LinkEvent::Flushed),
        },
        PushKind::Disconnection if current.load(Ordering::Acquire) == number => {
            sink.heard(LinkEvent::Disconnected);
        }
        _ => {}
    }
}

impl RedisStore {
    /// Opens the tracking connection and tells `sink` it is up. Any
    /// previous one is closed first (and `sink` told).
    pub async fn open_tracking(&self, sink: Arc<dyn TrackingSink>) -> Result<()> {
        self.close_tracking(&*sink);
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
        let (held, prefix, current) = (sink.clone(), self.key("s:", ""), tracking.current.clone());
        let handler = move |push: PushInfo| -> std::result::Result<(), std::convert::Infallible> {
            on_push(&*held, &prefix, &current, number, push);
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
                .arg("OPTIN")
                .arg("NOLOOP")
                .ignore()
                // What the fills and the write-behind send on this
                // connection, tried once here: a Redis user without them
                // (an ACL written before they were needed) leaves the near
                // cache off with Redis's NOPERM in the log, rather than
                // failing later.
                .cmd("CLIENT")
                .arg("CACHING")
                .arg("YES")
                .ignore()
                .cmd("MGET")
                .arg(self.key("s:", ""))
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
        sink.heard(LinkEvent::Opened);
        Ok(())
    }

    /// Drops the tracking connection and tells `sink`.
    pub fn close_tracking(&self, sink: &dyn TrackingSink) {
        let tracking = &self.inner.tracking;
        let mut slot = tracking.conn.write().unwrap_or_else(|p| p.into_inner());
        tracking.current.fetch_add(1, Ordering::AcqRel);
        *slot = None;
        sink.heard(LinkEvent::Closed);
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
    /// when it does not, it is closed (a connection that silently stopped
    /// delivering could also be withholding invalidations).
    pub async fn check_tracking(&self, sink: &dyn TrackingSink) -> bool {
        let Some(mut conn) = self.tracking_conn() else {
            return false;
        };
        let ping = redis::cmd("PING");
        match tokio::time::timeout(self.inner.timeout, ping.query_async::<String>(&mut conn)).await
        {
            Ok(Ok(_)) => true,
            _ => {
                self.close_tracking(sink);
                false
            }
        }
    }

    /// A session hash read over the main connection, so Redis tracks
    /// nothing for it. `None`: Redis does not hold the session, or it
    /// expired.
    pub async fn read_untracked(&self, id: &[u8; 16], now: u64) -> Result<Option<Session>> {
        let fields = self.read_record(&self.key("s:", &format_id(id))).await?;
        self.session_read(id, fields, now)
    }

    fn session_read(&self, id: &[u8; 16], fields: Value, now: u64) -> Result<Option<Session>> {
        let fields = flat_fields(fields)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let session = self.session_from(id, &fields)?;
        Ok((!session.is_expired(now)).then_some(session))
    }

    /// A session hash read over the tracking connection while `sink` is up
    /// (so Redis tracks the key for this node), else over the main one.
    /// The read writes nothing, so one node's read does not invalidate
    /// another's copies. `None`: Redis does not hold the session, or it
    /// expired (Redis drops it at its expiry time, by its own clock).
    pub async fn read_tracked(
        &self,
        sink: &dyn TrackingSink,
        id: &[u8; 16],
        now: u64,
    ) -> Result<Option<Session>> {
        let session_key = self.key("s:", &format_id(id));
        let key = &session_key;
        let fields = match self.tracking_conn().filter(|_| sink.is_up()) {
            Some(mut conn) => {
                // One pipeline, so nothing else this connection sends comes
                // between the two (`CACHING YES` tracks the next command).
                let mut read = redis::pipe();
                read.cmd("CLIENT").arg("CACHING").arg("YES").ignore();
                read.cmd("HGETALL").arg(key);
                let call = read.query_async::<(Value,)>(&mut conn);
                match self.on_tracking(sink, "", call).await? {
                    Ok((v,)) => v,
                    Err(e) if is_bad_record(&e) => return Err(self.bad_record(e.to_string())),
                    // The cache's own connection broke (killed, reset)
                    // while the main one may be fine: read over that.
                    Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                        self.close_tracking(sink);
                        self.read_record(key).await?
                    }
                    Err(e) => {
                        self.close_tracking(sink);
                        return Err(StoreError::Redis(format!("near cache connection: {e}")));
                    }
                }
            }
            None => self.read_record(key).await?,
        };
        self.session_read(id, fields, now)
    }

    /// A call on the cache's own connection, within the store timeout. No
    /// answer closes the connection (the cache is bypassed until a new one
    /// is up) and is an error; what Redis answered is the caller's to judge.
    async fn on_tracking<T>(
        &self,
        sink: &dyn TrackingSink,
        what: &str,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<redis::RedisResult<T>> {
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(answered) => Ok(answered),
            Err(_) => {
                self.close_tracking(sink);
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

    /// Writes the counts of sessions this node caches: one `touch_many`
    /// call for the batch, over the tracking connection when there is one
    /// (so they do not invalidate this node's own copies: `NOLOOP`), else
    /// the main one. An error means Redis may have applied any part of it.
    ///
    /// Redis forgets who tracks a key whenever it is written, even the
    /// writer under `NOLOOP`, so the batch reads its keys again after the
    /// script (`CLIENT CACHING YES` and one `MGET`, which answers nil for a
    /// hash and tracks every key it names), all in one `MULTI`: no other
    /// client's write can fall between the count and the re-read unheard.
    /// Each session used to have its own script call with the re-read
    /// inside it; this costs Redis about half as much a session (10.7
    /// against 20.5 µs, medians of 6 batches of 256, lab Redis of 100 000
    /// records).
    /// `replay`: each touch is skipped if Redis already applied its id (a
    /// batch sent again after a failure that may have applied part of it).
    pub async fn flush_touches(
        &self,
        batch: &[Flush],
        sink: &dyn TrackingSink,
        replay: bool,
    ) -> Result<Vec<Flushed>> {
        let cmd = self.touch_many_cmd(batch, replay);
        let Some(mut conn) = self.tracking_conn().filter(|_| sink.is_up()) else {
            return self.flush_on_main(cmd, batch).await;
        };
        let mut pipe = redis::pipe();
        pipe.atomic().add_command(cmd);
        pipe.cmd("CLIENT").arg("CACHING").arg("YES").ignore();
        pipe.cmd("MGET");
        let mut key = String::new();
        for f in batch {
            pipe.arg(self.session_key_in(&mut key, "s:", &f.id));
        }
        pipe.ignore();
        let call = query_loading_scripts(&pipe, || self.load_scripts_pipe(), &mut conn);
        let replies = match self
            .on_tracking(sink, "writing touches behind: ", call)
            .await?
        {
            Ok(v) => v,
            Err(e) => {
                self.close_tracking(sink);
                return Err(StoreError::Redis(format!("writing touches behind: {e}")));
            }
        };
        let flushed = self.flushed_batch(replies.into_iter().next(), batch);
        if flushed.is_err() {
            // An answer this node does not understand on the cache's
            // connection: trust it no further (the caller retries the
            // counts over the main one, as a replay).
            self.close_tracking(sink);
        }
        flushed
    }

    /// Writes the counts of sessions this node does not cache (read
    /// through, not kept): one `touch_many` call over the main connection,
    /// where no key is tracked. An error means Redis may have applied it.
    pub async fn flush_uncached(&self, batch: &[Flush]) -> Result<Vec<Flushed>> {
        let cmd = self.touch_many_cmd(batch, false);
        self.flush_on_main(cmd, batch).await
    }

    /// One `touch_many` call for a batch of counts, as a plain `EVALSHA`
    /// whose keys and arguments are all written into the command's one
    /// buffer: a script invocation kept each in a vector of its own, about
    /// ten allocations for each session of every batch.
    fn touch_many_cmd(&self, batch: &[Flush], replay: bool) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.inner.scripts.touch_many.get_hash())
            .arg(2 + 2 * batch.len())
            .arg(self.key("active", ""))
            .arg(self.dups_key());
        let mut key = String::new();
        for f in batch {
            cmd.arg(self.session_key_in(&mut key, "s:", &f.id));
            cmd.arg(self.session_key_in(&mut key, "t:", &f.id));
        }
        cmd.arg(self.inner.limits.ttl_ms)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(if replay { "1" } else { "0" })
            .arg(&self.inner.origin_field)
            .arg(self.inner.limits.slide_step_ms());
        let mut text = uuid::Uuid::encode_buffer();
        for f in batch {
            let stamp = self.stamp(f.seq);
            cmd.arg(f.at)
                .arg(id_text(&f.id, &mut text))
                .arg(f.count)
                .arg(stamp.seq)
                .arg(stamp.floor);
        }
        cmd
    }

    /// A session's key (`kind` `s:` or `t:`) written into `buf`, which is
    /// reused from one session of a batch to the next.
    fn session_key_in<'b>(&self, buf: &'b mut String, kind: &str, id: &[u8; 16]) -> &'b str {
        buf.clear();
        buf.push_str(&self.inner.prefix);
        buf.push_str(kind);
        buf.push_str(id_text(id, &mut uuid::Uuid::encode_buffer()));
        buf
    }

    /// Runs a `touch_many` call over the main connection (a Redis that
    /// restarted empty gets the scripts loaded, and the call is sent again).
    async fn flush_on_main(&self, cmd: redis::Cmd, batch: &[Flush]) -> Result<Vec<Flushed>> {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let pipe = &pipe;
        let replies = self
            .call(self.inner.timeout, |mut c| async move {
                query_loading_scripts(pipe, || self.load_scripts_pipe(), &mut c).await
            })
            .await?;
        self.flushed_batch(replies.into_iter().next(), batch)
    }

    /// What Redis did with each count of a batch, from `touch_many`'s answer.
    fn flushed_batch(&self, reply: Option<Value>, batch: &[Flush]) -> Result<Vec<Flushed>> {
        match reply {
            Some(Value::Array(replies)) if replies.len() == batch.len() => {
                Ok(self.flushed(&replies, batch))
            }
            other => Err(StoreError::Redis(format!(
                "writing touches behind: unexpected answer {other:?}"
            ))),
        }
    }

    /// What Redis did with each count of a batch, from `touch_one`'s answers.
    fn flushed(&self, replies: &[Value], batch: &[Flush]) -> Vec<Flushed> {
        replies
            .iter()
            .zip(batch)
            .map(|(reply, f)| match TouchReply::decode(reply) {
                Some(TouchReply::Counted(n)) => Flushed::Counted(n),
                // The retry of a batch whose first try did land (or a late
                // copy): counted once, by the first.
                Some(TouchReply::AlreadyApplied) => {
                    self.refused_duplicate("touch written behind");
                    Flushed::Counted(0)
                }
                Some(TouchReply::Corrupt) => {
                    let _ = self.unreadable(&f.id);
                    Flushed::Corrupt
                }
                _ => Flushed::Gone,
            })
            .collect()
    }
}

/// Runs a pipeline of script calls, loading every script first when Redis
/// has none (it restarted empty): NOSCRIPT is refused before anything runs,
/// and every call of a write-behind batch names the same script.
async fn query_loading_scripts(
    pipe: &redis::Pipeline,
    load: impl FnOnce() -> redis::Pipeline,
    conn: &mut MultiplexedConnection,
) -> redis::RedisResult<Vec<Value>> {
    match pipe.query_async::<Vec<Value>>(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            load().query_async::<()>(conn).await?;
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
        Value::Array(items) => Ok(items),
        other => Err(unexpected(&other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what it hears.
    #[derive(Default)]
    struct Heard(Mutex<Vec<LinkEvent>>);

    impl TrackingSink for Heard {
        fn is_up(&self) -> bool {
            true
        }
        fn heard(&self, event: LinkEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    #[test]
    fn pushes_name_the_invalidated_sessions_and_only_the_current_link_dies() {
        let heard = Heard::default();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let current = AtomicU64::new(1);
        let key = |id: &[u8; 16]| Value::BulkString(format!("p:s:{}", format_id(id)).into_bytes());
        let push = |kind, data| PushInfo { kind, data };
        let invalidate = push(
            PushKind::Invalidate,
            vec![Value::Array(vec![
                key(&a),
                Value::BulkString(b"p:x:other".to_vec()),
                key(&b),
            ])],
        );
        on_push(&heard, "p:s:", &current, 1, invalidate);
        on_push(
            &heard,
            "p:s:",
            &current,
            1,
            push(PushKind::Invalidate, vec![Value::Nil]),
        );
        // the death of an older connection is not told
        on_push(
            &heard,
            "p:s:",
            &current,
            0,
            push(PushKind::Disconnection, vec![]),
        );
        on_push(
            &heard,
            "p:s:",
            &current,
            1,
            push(PushKind::Disconnection, vec![]),
        );
        assert_eq!(
            *heard.0.lock().unwrap(),
            [
                LinkEvent::Invalidated(a),
                LinkEvent::Invalidated(b),
                LinkEvent::Flushed,
                LinkEvent::Disconnected,
            ]
        );
    }
}

//! One link to a Redis, shared by everything that talks to one: the session
//! store (`store::redis`) and the shared cache (`cache::redis`).
//!
//! Why one: both need the same things, and two copies drifted apart (the
//! cache's had neither the reconnect after a broken connection nor the
//! configuration-error class). A [`Link`] is the target ([`Target`]: a URL or
//! Sentinel, see [`sentinel`]), its one multiplexed connection, and
//! [`Link::call`], the single path every call takes: the store timeout, one
//! fresh try on a connection that broke since its last use, and the error
//! classes of [`LinkError`]. What a class *means* (fall back, count a corrupt
//! record, mark the cache down) is each user's business; the link only says
//! which one it is.

mod sentinel;
mod tls;

use crate::config::RedisTls;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use std::sync::RwLock;
use std::time::Duration;

/// A boxed future: see [`boxed`].
pub type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Every redis-rs future awaited off the session store's request path goes
/// through here: polled through a pointer, its code is one copy instead of
/// being inlined into each caller (which cost about 100 KB of the aarch64
/// release, whose budget is 4 MB).
pub fn boxed<'a, T>(f: impl std::future::Future<Output = T> + Send + 'a) -> Boxed<'a, T> {
    Box::pin(f)
}

/// What went wrong talking to Redis, by what the caller should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Redis is unreachable, slow or cannot take the call now: an outage,
    /// which passes by itself.
    #[error("{0}")]
    Outage(String),
    /// Redis refuses the node's credentials or database (NOAUTH, WRONGPASS,
    /// NOPERM...), or TLS refuses a certificate: a configuration error,
    /// which does not pass by itself.
    #[error("{0}")]
    Config(String),
    /// Redis answered, but the record the call touched is not one a node
    /// wrote (`WRONGTYPE`); the connection is fine.
    #[error("{0}")]
    BadRecord(String),
}

pub type Result<T> = std::result::Result<T, LinkError>;

/// How to find the Redis master.
pub enum Target {
    Direct(Client),
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

impl Target {
    /// A target from a `redis://`, `rediss://` (TLS), `redis+sentinel://` or
    /// `rediss+sentinel://` (TLS to the sentinels and the master) URL;
    /// `setting` names the configuration key in errors; `tls` gives the
    /// files of the TLS ones. Replies are read as RESP2 whatever the URL
    /// says.
    pub fn open(url: &str, setting: &str, tls: &RedisTls) -> std::result::Result<Target, String> {
        let sentinel = [("redis+sentinel://", false), ("rediss+sentinel://", true)]
            .into_iter()
            .find_map(|(scheme, secure)| url.strip_prefix(scheme).map(|rest| (rest, secure)));
        if let Some((rest, secure)) = sentinel {
            let certs = if secure {
                tls::certificates(tls)?
            } else {
                None
            };
            return Ok(Target::Sentinel(tokio::sync::Mutex::new(sentinel::client(
                rest, secure, certs,
            )?)));
        }
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| format!("{setting}: {e}"))?;
        tls::check_secure(info.addr(), setting)?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP2);
        let info = info.set_redis_settings(settings);
        let certs = match info.addr() {
            redis::ConnectionAddr::TcpTls { .. } => tls::certificates(tls)?,
            _ => None,
        };
        let client = match certs {
            Some(certs) => Client::build_with_tls(info, certs),
            None => Client::open(info),
        };
        Ok(Target::Direct(
            client.map_err(|e| format!("{setting}: {e}"))?,
        ))
    }
}

/// A target, its shared connection and the store timeout.
pub struct Link {
    target: Target,
    conn: RwLock<Option<MultiplexedConnection>>,
    timeout: Duration,
}

impl Link {
    /// Prepares the link; nothing connects until first use, so a node starts
    /// (in fallback) even when Redis is down.
    pub fn new(target: Target, timeout: Duration) -> Link {
        Link {
            target,
            conn: RwLock::new(None),
            timeout,
        }
    }

    /// The store timeout: the bound of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A client for the current master (asks Sentinel when configured).
    pub async fn client(&self) -> Result<Client> {
        match &self.target {
            Target::Direct(c) => Ok(c.clone()),
            Target::Sentinel(s) => {
                let mut s = s.lock().await;
                boxed(s.async_get_client())
                    .await
                    .map_err(|e| LinkError::Outage(format!("sentinel: {e}")))
            }
        }
    }

    /// The shared multiplexed connection, connecting if there is none.
    async fn conn(&self) -> Result<MultiplexedConnection> {
        if let Some(c) = self.conn.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(c.clone());
        }
        let client = self.client().await?;
        // No response timeout of redis-rs's own: `call` bounds every use,
        // and a second timer per request is measurable on the touch path.
        // Nagle stays on (redis-rs's default): under load it lets the
        // pipelined commands of concurrent requests share one segment, and
        // TCP_NODELAY measured 20% slower (more, smaller writes).
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(None);
        let c = boxed(client.get_multiplexed_async_connection_with_config(&cfg))
            .await
            .map_err(|e| classify(&e))?;
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection after a failure; the next use reconnects.
    fn drop_conn(&self) {
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Runs `call` on the shared connection within `limit`, the one place
    /// every call goes through. A connection that broke since its last use
    /// (Redis restarted, say) gets one fresh try, so a restart is not taken
    /// for an outage. Any failure but a bad record drops the connection;
    /// the next call reconnects.
    pub async fn call<T, F, Fut>(&self, limit: Duration, mut call: F) -> Result<T>
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
                    Err(e) if is_bad_record(&e) => return Err(LinkError::BadRecord(e.to_string())),
                    Err(e) => return Err(classify(&e)),
                }
            }
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(v)) => Ok(v),
            // Redis answered: the connection is fine.
            Ok(Err(e @ LinkError::BadRecord(_))) => Err(e),
            Ok(Err(e)) => {
                self.drop_conn();
                Err(e)
            }
            Err(_) => {
                self.drop_conn();
                Err(LinkError::Outage(format!(
                    "no answer within {} ms",
                    limit.as_millis()
                )))
            }
        }
    }
}

/// Whether Redis refused an operation because of the record it found rather
/// than because of its own state: only `WRONGTYPE` (a key holding another
/// type than the one the caller wrote) says that for sure. Every other error
/// reply (OOM, READONLY, LOADING, BUSY, MISCONF...) means Redis cannot take
/// the operation now.
pub fn is_bad_record(e: &redis::RedisError) -> bool {
    e.clone()
        .into_server_errors()
        .is_some_and(|errs| errs.iter().any(|(_, err)| err.code() == "WRONGTYPE"))
}

/// Whether an error says Redis cannot take writes *now* (memory, a replica,
/// loading, a busy script, the connection), as opposed to refusing this one
/// operation whatever its state.
pub fn is_transient(e: &redis::RedisError) -> bool {
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

/// A Redis error by class: one that says the node's credentials, database
/// or TLS certificates are wrong is a configuration error (it will not pass
/// by itself), anything else an outage.
pub fn classify(e: &redis::RedisError) -> LinkError {
    let text = e.to_string();
    let config = e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        || text.contains("invalid password")
        || text.contains("invalid username-password")
        || text.contains("DB index is out of range")
        || tls::is_refusal(&text);
    if config {
        LinkError::Config(text)
    } else {
        LinkError::Outage(text)
    }
}

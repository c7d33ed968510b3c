//! Finding Redis and talking to it: the target (a URL or Sentinel), the one
//! shared multiplexed connection, and [`RedisStore::call`], the single path
//! every Redis call takes (timeout, one reconnect, error classes).

use super::{RedisStore, Result};
use crate::store::StoreError;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Value};
use std::time::Duration;

/// How to find the Redis master.
pub(super) enum Target {
    Direct(Client),
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

impl RedisStore {
    /// A client for the current master (asks Sentinel when configured).
    pub(super) async fn client(&self) -> Result<Client> {
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
            .map_err(|e| redis_error(&e))?;
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
    pub(super) async fn call<T, F, Fut>(&self, limit: Duration, mut call: F) -> Result<T>
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
                    Err(e) => return Err(redis_error(&e)),
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
    pub(super) async fn run(&self, inv: redis::ScriptInvocation<'_>) -> Result<Value> {
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
}

/// The parts of a `redis+sentinel://` URL after the scheme.
#[derive(Debug, PartialEq, Eq)]
struct SentinelUrl<'a> {
    hosts: &'a str,
    master: String,
    db: i64,
    password: Option<&'a str>,
}

impl<'a> SentinelUrl<'a> {
    /// `[[user]:password@]host:port[,host:port…]/master_name[/db]`
    fn parse(rest: &'a str) -> std::result::Result<SentinelUrl<'a>, String> {
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (hosts, path) = rest
            .split_once('/')
            .ok_or("redis+sentinel URL needs /master_name")?;
        if hosts.is_empty() {
            return Err("redis+sentinel URL needs host:port".into());
        }
        let mut path = path.split('/');
        let master = path
            .next()
            .filter(|m| !m.is_empty())
            .ok_or("redis+sentinel URL needs /master_name")?
            .to_string();
        let db: i64 = path
            .next()
            .map(|d| d.parse().map_err(|_| "bad db number"))
            .transpose()?
            .unwrap_or(0);
        let password = auth
            .map(|a| a.split_once(':').map(|(_, p)| p).unwrap_or(a))
            .filter(|p| !p.is_empty());
        Ok(SentinelUrl {
            hosts,
            master,
            db,
            password,
        })
    }
}

/// `redis+sentinel://[:password@]host:port[,host:port…]/master_name[/db]`
pub(super) fn sentinel_client(
    rest: &str,
) -> std::result::Result<redis::sentinel::SentinelClient, String> {
    let SentinelUrl {
        hosts,
        master,
        db,
        password,
    } = SentinelUrl::parse(rest)?;
    let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
    let mut info = redis::RedisConnectionInfo::default().set_db(db);
    if let Some(password) = password {
        info = info.set_password(password);
    }
    let node =
        redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
    redis::sentinel::SentinelClient::build(
        sentinels,
        master,
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
pub(super) fn is_bad_record(e: &redis::RedisError) -> bool {
    e.clone()
        .into_server_errors()
        .is_some_and(|errs| errs.iter().any(|(_, err)| err.code() == "WRONGTYPE"))
}

/// Whether an error says Redis cannot take writes *now* (memory, a replica,
/// loading, a busy script, the connection), as opposed to refusing this one
/// operation whatever its state.
pub(super) fn is_transient(e: &redis::RedisError) -> bool {
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

/// A Redis error as the store sees it: one that says the node's credentials
/// or database are wrong is a configuration error (it will not pass by
/// itself), anything else an outage.
fn redis_error(e: &redis::RedisError) -> StoreError {
    let text = e.to_string();
    let config = e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        || text.contains("invalid password")
        || text.contains("invalid username-password")
        || text.contains("DB index is out of range");
    if config {
        StoreError::RedisConfig(text)
    } else {
        StoreError::Redis(text)
    }
}

#[cfg(test)]
mod tests {
    use super::SentinelUrl;

    #[test]
    fn sentinel_urls_parse_into_hosts_master_db_and_password() {
        assert_eq!(
            SentinelUrl::parse(":s3cret@10.0.0.1:26379,10.0.0.2:26379/mymaster/3"),
            Ok(SentinelUrl {
                hosts: "10.0.0.1:26379,10.0.0.2:26379",
                master: "mymaster".into(),
                db: 3,
                password: Some("s3cret"),
            })
        );
        let bare = SentinelUrl::parse("127.0.0.1:26379/m").unwrap();
        assert_eq!((bare.db, bare.password), (0, None));
        // a password containing '@' is split at the last one
        assert_eq!(
            SentinelUrl::parse("user:p@ss@h:1/m").unwrap().password,
            Some("p@ss")
        );
        for bad in ["h:1", "h:1/", "/m", "h:1/m/x"] {
            assert!(SentinelUrl::parse(bad).is_err(), "{bad}");
        }
    }
}

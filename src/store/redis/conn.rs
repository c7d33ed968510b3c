//! The session store's side of the Redis link (`crate::redis_link`): every
//! call goes through [`RedisStore::call`], which runs it on the link and
//! turns the link's error classes into the store's ([`StoreError`]),
//! counting the bad records it meets.

use super::{RedisStore, Result};
use crate::redis_link::LinkError;
use crate::store::StoreError;
use redis::aio::MultiplexedConnection;
use redis::{Client, Value};
use std::time::Duration;

impl RedisStore {
    /// A client for the current master (asks Sentinel when configured).
    pub(super) async fn client(&self) -> Result<Client> {
        Ok(self.inner.link.client().await?)
    }

    /// Runs `call` on the shared connection within `limit` (see
    /// [`crate::redis_link::Link::call`]); a bad record is counted here.
    pub(super) async fn call<T, F, Fut>(&self, limit: Duration, call: F) -> Result<T>
    where
        F: FnMut(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match self.inner.link.call(limit, call).await {
            Ok(v) => Ok(v),
            Err(LinkError::BadRecord(why)) => Err(self.bad_record(why)),
            Err(e) => Err(e.into()),
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

/// The store's reading of the link's classes: an outage falls back, a
/// configuration error is reported as such, a bad record is absent.
impl From<LinkError> for StoreError {
    fn from(e: LinkError) -> StoreError {
        match e {
            LinkError::Outage(why) => StoreError::Redis(why),
            LinkError::Config(why) => StoreError::RedisConfig(why),
            LinkError::BadRecord(why) => StoreError::CorruptRecord(why),
        }
    }
}

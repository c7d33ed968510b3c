//! `PUT`, `DELETE` and purges: written through to Redis when it answers,
//! kept on this node (and, for deletions and purges, journaled) when not.

use super::redis::CacheRedis;
use super::{encode, etag_of, now_ms, Cache, CacheError, Entry, Operation, Removed, Stored};
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

impl Cache {
    /// `PUT`. `lease`: the token of a fill lease, checked (409 when it is
    /// not the key's live lease).
    pub async fn put(
        &self,
        ns: &str,
        key: &str,
        content_type: &str,
        body: Bytes,
        ttl_secs: u64,
        lease: Option<&str>,
    ) -> Result<(Arc<Entry>, Stored), CacheError> {
        let i = &self.inner;
        let now = now_ms();
        let entry = Arc::new(Entry {
            content_type: content_type.into(),
            etag: etag_of(content_type, &body),
            stored_at: now,
            expires_at: now.saturating_add(ttl_secs.saturating_mul(1000)),
            body,
        });
        let mkey = format!("{ns}/{key}");
        let mut redis_token = "";
        match lease {
            Some(t) if t.starts_with('l') => {
                let mut leases = i.local_leases.lock().unwrap_or_else(|p| p.into_inner());
                let live = leases
                    .get(mkey.as_str())
                    .is_some_and(|(held, until)| held == t && *until > Instant::now());
                if !live {
                    drop(leases);
                    return Err(self.refused("the lease is not this key's: it expired, was superseded, or was never granted"));
                }
                leases.remove(mkey.as_str());
            }
            Some(t) => redis_token = t,
            None => {}
        }
        if let Some(r) = self.redis_if_up() {
            let ticket = i.memory.ticket(&mkey);
            let seq = self.next_seq();
            let mut value = Vec::with_capacity(27 + content_type.len() + entry.body.len());
            encode(&entry, &mut value);
            let mut op = self.op(ns, key, Operation::Put);
            op.value = &value;
            op.ttl_ms = ttl_secs.saturating_mul(1000);
            op.token = redis_token;
            match r.run(&op, &self.fresh_gen(seq)).await {
                Ok(v) if CacheRedis::count(&v) == 1 => {
                    self.keep(&mkey, &entry, seq, Some(ticket));
                    return Ok((entry, Stored::Shared));
                }
                Ok(_) => return Err(self.refused("the lease is not this key's: it expired, was superseded by a write, deletion or purge, or was never granted")),
                Err(e) => self.mark_down(&e),
            }
        }
        if !redis_token.is_empty() {
            return Err(
                self.refused("the lease cannot be checked while the cache's redis is unreachable")
            );
        }
        let seq = self.next_seq();
        self.keep(&mkey, &entry, seq, None);
        let stored = match i.redis {
            Some(_) => Stored::Local,
            None => Stored::Shared,
        };
        Ok((entry, stored))
    }

    fn refused(&self, why: &'static str) -> CacheError {
        self.inner
            .counters
            .lease_refused
            .fetch_add(1, Ordering::Relaxed);
        CacheError::LeaseMismatch(why)
    }

    /// Keeps a value this node wrote in its memory and disk tiers and wakes
    /// its waiters.
    fn keep(&self, mkey: &str, entry: &Arc<Entry>, seq: u64, ticket: Option<u64>) {
        self.inner.memory.insert(mkey, entry.clone(), seq, ticket);
        // A value the disk tier cannot take (disk at its reserve, a fault)
        // is served from memory and Redis all the same.
        let _ = self.inner.disk.put(mkey, entry, seq);
        self.wake(mkey);
    }

    /// Drops a key from this node's tiers.
    pub(super) fn drop_local(&self, mkey: &str) -> bool {
        let in_memory = self.inner.memory.remove(mkey);
        match self.inner.disk.remove(mkey) {
            Ok(on_disk) => in_memory || on_disk,
            Err(e) => {
                // Counted and logged by the tier (see `disk`).
                tracing::debug!(error = %e, "cache: dropping a value from the disk tier failed");
                in_memory
            }
        }
    }

    /// `DELETE` of one key.
    pub async fn delete(&self, ns: &str, key: &str) -> Result<Removed, CacheError> {
        let mkey = format!("{ns}/{key}");
        if let Some(r) = self.redis_if_up() {
            let seq = self.next_seq();
            match r
                .run(&self.op(ns, key, Operation::Delete), &self.fresh_gen(seq))
                .await
            {
                Ok(v) => {
                    self.drop_local(&mkey);
                    return Ok(Removed::Done(CacheRedis::count(&v) > 0));
                }
                Err(e) => self.mark_down(&e),
            }
        }
        if self.inner.redis.is_some() {
            self.journal(Operation::Delete, &mkey).await?;
            self.drop_local(&mkey);
            return Ok(Removed::Journaled);
        }
        Ok(Removed::Done(self.drop_local(&mkey)))
    }

    /// `DELETE` of a namespace: a new generation in Redis, a new floor here.
    pub async fn purge(&self, ns: &str) -> Result<Removed, CacheError> {
        if let Some(r) = self.redis_if_up() {
            let seq = self.next_seq();
            match r
                .run(&self.op(ns, "", Operation::Purge), &self.fresh_gen(seq))
                .await
            {
                Ok(_) => {
                    self.raise_floor(ns);
                    return Ok(Removed::Done(true));
                }
                Err(e) => self.mark_down(&e),
            }
        }
        if self.inner.redis.is_some() {
            self.journal(Operation::Purge, ns).await?;
            self.raise_floor(ns);
            return Ok(Removed::Journaled);
        }
        self.raise_floor(ns);
        Ok(Removed::Done(true))
    }
}

//! The outage journal: deletions and purges made while the cache's Redis
//! is unreachable, kept durably (sled tree `cache_journal`, one record per
//! change: the operation's byte, then `namespace/key` or `namespace`) and
//! replayed into Redis, with their events, before the node uses Redis again.

use super::redis::CacheRedis;
use super::{Cache, CacheError, Operation, JOURNAL, MAX_JOURNAL_ENTRIES};
use crate::disk::{DiskError, Space};
use crate::redis_link::LinkError;
use std::sync::atomic::Ordering;

impl Cache {
    /// Records an invalidation made during an outage, durably, before it is
    /// acknowledged.
    pub(super) async fn journal(&self, op: Operation, what: &str) -> Result<(), CacheError> {
        let i = &self.inner;
        if i.journal_len.load(Ordering::Acquire) >= MAX_JOURNAL_ENTRIES {
            return Err(CacheError::JournalFull(MAX_JOURNAL_ENTRIES));
        }
        i.db.check_space(Space::Release)?;
        let seq = i.db.next_seq()?;
        let mut record = Vec::with_capacity(1 + what.len());
        record.push(op.byte());
        record.extend_from_slice(what.as_bytes());
        i.db.tree(JOURNAL)?
            .insert(seq.to_be_bytes(), record)
            .map_err(DiskError::from)?;
        i.journal_len.fetch_add(1, Ordering::AcqRel);
        i.db.durable().await?;
        Ok(())
    }

    /// Replays the journal into Redis, oldest first, each entry removed
    /// once Redis took it.
    pub(super) async fn replay(&self, r: &CacheRedis) -> Result<(), ReplayError> {
        let i = &self.inner;
        let tree = i.db.tree(JOURNAL)?;
        let mut n = 0u64;
        for item in tree.iter() {
            let (k, v) = item?;
            let text = v.get(1..).and_then(|t| std::str::from_utf8(t).ok());
            let op = v.first().copied().and_then(Operation::from_byte);
            let target = match (op, text) {
                (Some(Operation::Delete), Some(t)) => t
                    .split_once('/')
                    .map(|(ns, key)| (Operation::Delete, ns, key)),
                (Some(Operation::Purge), Some(ns)) => Some((Operation::Purge, ns, "")),
                _ => None,
            };
            if let Some((op, ns, key)) = target {
                let seq = self.next_seq();
                r.run(&self.op(ns, key, op), &self.fresh_gen(seq)).await?;
                n += 1;
            }
            tree.remove(k)?;
            i.journal_len.fetch_sub(1, Ordering::AcqRel);
        }
        if n > 0 {
            i.db.durable().await?;
            i.counters.replayed.fetch_add(n, Ordering::Relaxed);
            tracing::info!(
                replayed = n,
                "cache: deletions and purges made during the outage replayed into redis"
            );
        }
        Ok(())
    }
}

/// Why a replay stopped: Redis went away again, or the journal could not be
/// read or trimmed. Either way the cache stays off Redis and tries again.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReplayError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Disk(#[from] DiskError),
}

impl From<sled::Error> for ReplayError {
    fn from(e: sled::Error) -> ReplayError {
        ReplayError::Disk(e.into())
    }
}

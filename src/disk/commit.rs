//! Group commit: durability without one `fsync` per request.
//!
//! Writers change the database in memory and then call
//! [`Database::durable`]; any number of them share one `fsync` at a time. A
//! writer's data is durable once a flush that *started after* its write has
//! finished, so each waiter takes a ticket and waits for a flush generation
//! covering it. The flush runs as its own task on the blocking pool, so a
//! request that is cancelled mid-wait (client gone) cannot leave the commit
//! wedged.
//!
//! It lives with the database, not with a domain: the session store and the
//! shared cache write to one database, and one flush carries both.

use super::error::{DiskError, Result};
use super::Database;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::watch;

pub(super) struct GroupCommit {
    requested: AtomicU64,
    /// (highest ticket covered by a finished flush, did that flush succeed)
    done: watch::Sender<(u64, bool)>,
    running: AtomicBool,
    pub(super) waiting: AtomicU64,
    /// Flushes that wrote and synced something (sled skips the sync of a
    /// flush with nothing new): what wears an SD card, as a metric.
    syncs: AtomicU64,
}

impl GroupCommit {
    pub(super) fn new() -> GroupCommit {
        GroupCommit {
            requested: AtomicU64::new(0),
            done: watch::channel((0, true)).0,
            running: AtomicBool::new(false),
            waiting: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        }
    }
}

impl Database {
    /// Waits until everything written before this call is on disk.
    pub async fn durable(&self) -> Result<()> {
        let commit = &self.inner.commit;
        let mut rx = commit.done.subscribe();
        let ticket = commit.requested.fetch_add(1, Ordering::SeqCst) + 1;
        commit.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = DecrementOnDrop(&commit.waiting);
        loop {
            let (done, ok) = *rx.borrow_and_update();
            if done >= ticket {
                return if ok {
                    Ok(())
                } else {
                    Err(DiskError::Fault(
                        "flushing the local store to disk failed".into(),
                    ))
                };
            }
            if !commit.running.swap(true, Ordering::SeqCst) {
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    let target = inner.commit.requested.load(Ordering::SeqCst);
                    let db = inner.current().db().clone();
                    let res = tokio::task::spawn_blocking(move || db.flush()).await;
                    let ok = matches!(res, Ok(Ok(_)));
                    match &res {
                        Ok(Ok(written)) => {
                            if *written > 0 {
                                inner.commit.syncs.fetch_add(1, Ordering::Relaxed);
                            }
                            inner.guard.flushed(None)
                        }
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "flushing the local store failed");
                            inner
                                .guard
                                .flushed(Some(format!("writing to disk failed: {e}")));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "flushing the local store failed");
                            inner
                                .guard
                                .flushed(Some(format!("writing to disk failed: {e}")));
                        }
                    }
                    inner.commit.running.store(false, Ordering::SeqCst);
                    inner.commit.done.send_replace((target, ok));
                });
            }
            if rx.changed().await.is_err() {
                return Err(DiskError::Closed("local store closed".into()));
            }
        }
    }

    /// Group-commit flushes (lazy ones included) that wrote and synced
    /// data since the node started.
    pub fn syncs(&self) -> u64 {
        self.inner.commit.syncs.load(Ordering::Relaxed)
    }

    /// Writers waiting for a flush now.
    pub fn commits_waiting(&self) -> u64 {
        self.inner.commit.waiting.load(Ordering::Relaxed)
    }
}

struct DecrementOnDrop<'a>(&'a AtomicU64);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

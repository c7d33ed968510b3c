//! Group commit: durability without one `fsync` per request, and never a
//! wait without a bound.
//!
//! Writers change the database in memory and then call
//! [`Database::durable`]; any number of them share one `fsync` at a time. A
//! writer's data is durable once a flush that *started after* its write has
//! finished, so each waiter takes a ticket and waits for a flush generation
//! covering it. The flush runs as its own task on the blocking pool, so a
//! request that is cancelled mid-wait (client gone) cannot leave the commit
//! wedged, and no runtime worker ever blocks on sled's flush.
//!
//! Every wait has a deadline (`disk_flush_timeout_ms`): a flush still
//! running past it makes the disk *stuck*, a disk fault: every writer gets
//! 503 at once rather than each waiting out its own deadline, the node is
//! unready, and housekeeping reopens the database once the flush returns
//! (or, if it never does, has the process exit for the service manager to
//! restart it: see `store::background`).
//!
//! It lives with the database, not with a domain: the session store and the
//! shared cache write to one database, and one flush carries both.

use super::error::{DiskError, Result};
use super::Database;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub(super) struct GroupCommit {
    requested: AtomicU64,
    /// (highest ticket covered by a finished flush, did that flush succeed)
    done: watch::Sender<(u64, bool)>,
    running: AtomicBool,
    /// When the running flush started, in ms since `epoch` (+1; 0: none).
    started: AtomicU64,
    epoch: Instant,
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
            started: AtomicU64::new(0),
            epoch: Instant::now(),
            waiting: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        }
    }

    /// How long the running flush has been running, if one is.
    pub(super) fn running_for(&self) -> Option<Duration> {
        match self.started.load(Ordering::Acquire) {
            0 => None,
            at => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(at - 1)),
            ),
        }
    }
}

impl Database {
    /// Waits until everything written before this call is on disk, for at
    /// most the flush deadline; a flush that is stuck past it fails the
    /// call at once ([`DiskError::Fault`]).
    pub async fn durable(&self) -> Result<()> {
        if let Some(e) = self.stuck_error() {
            return Err(e);
        }
        let deadline = self.inner.config.flush_timeout;
        match tokio::time::timeout(deadline, self.durable_unbounded()).await {
            Ok(r) => r,
            Err(_) => Err(self.stuck_error().unwrap_or_else(|| {
                DiskError::Fault(format!(
                    "a flush of the local store took over {} ms",
                    deadline.as_millis()
                ))
            })),
        }
    }

    /// The error of a flush stuck past its deadline, if one is.
    pub(super) fn stuck_error(&self) -> Option<DiskError> {
        let deadline = self.inner.config.flush_timeout;
        let running = self.inner.commit.running_for()?;
        (running > deadline).then(|| {
            DiskError::Fault(format!(
                "a flush of the local store has not returned for {} ms (disk_flush_timeout_ms {})",
                running.as_millis(),
                deadline.as_millis()
            ))
        })
    }

    /// How long a flush has been stuck past its deadline, if one is.
    pub fn flush_stuck_for(&self) -> Option<Duration> {
        let deadline = self.inner.config.flush_timeout;
        self.inner
            .commit
            .running_for()
            .and_then(|r| r.checked_sub(deadline))
    }

    async fn durable_unbounded(&self) -> Result<()> {
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
                    Err(self.inner.guard.faulted().unwrap_or_else(|| {
                        DiskError::Fault("flushing the local store to disk failed".into())
                    }))
                };
            }
            if !commit.running.swap(true, Ordering::SeqCst) {
                let inner = self.inner.clone();
                let opened = match self.current() {
                    Ok(o) => o,
                    Err(e) => {
                        commit.running.store(false, Ordering::SeqCst);
                        return Err(e);
                    }
                };
                let since = commit.epoch.elapsed().as_millis() as u64 + 1;
                commit.started.store(since, Ordering::Release);
                tokio::spawn(async move {
                    let target = inner.commit.requested.load(Ordering::SeqCst);
                    // The flush holds the open database (not only sled's
                    // handle) so that a reopen waits for it to return.
                    let res = tokio::task::spawn_blocking(move || opened.db().flush()).await;
                    let ok = matches!(res, Ok(Ok(_)));
                    let failed = match &res {
                        Ok(Ok(written)) => {
                            if *written > 0 {
                                inner.commit.syncs.fetch_add(1, Ordering::Relaxed);
                            }
                            None
                        }
                        Ok(Err(e)) => Some(DiskError::from(e.clone())),
                        Err(e) => Some(DiskError::Fault(format!("the flush panicked: {e}"))),
                    };
                    if let Some(e) = failed {
                        tracing::error!(error = %e, "flushing the local store failed");
                        inner.guard.note(&e);
                        if !e.is_disk() {
                            inner.guard.note(&DiskError::Fault(e.to_string()));
                        }
                    }
                    inner.commit.started.store(0, Ordering::Release);
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

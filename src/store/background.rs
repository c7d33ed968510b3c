//! The [`Store`]'s background loops: the housekeeping of the local store,
//! and, with Redis, the probe (which starts the replay and the re-seed), the
//! near cache's tracking link, the write-behind of its counts, and the
//! deletion feed into the mirror. Each returns once the [`Shutdown`] fires.

use super::{Mode, RedisStore, Store, StoreError};
use crate::session::now_ms;
use crate::shutdown::Shutdown;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long a flush may stay stuck past `disk_flush_timeout_ms` before the
/// process exits for the service manager to restart it: the flush thread
/// holds the database, so nothing short of a restart frees it.
const STUCK_FLUSH_EXIT: Duration = Duration::from_secs(60);

/// Housekeeping rounds (of 500 ms) between two writes of the buffered
/// mirror touches: 5 s, so a node serving with Redis healthy syncs the disk
/// at most once every 5 s for them.
const MIRROR_FLUSH_ROUNDS: u64 = 10;

impl Store {
    /// Background upkeep: the expiry sweeps, the journaling of coalesced
    /// fallback touches and the lazy flush, and the reopen of the database
    /// after a disk fault. Returns once `shutdown` fires, whatever the disk
    /// does: every wait here is raced against it (a flush stuck on a dead
    /// card must not hold the node's stop).
    pub async fn run_housekeeping(self, mut shutdown: Shutdown) {
        let mut rounds: u64 = 0;
        let mut last_reopen_failure = String::new();
        // Every 500 ms; every 50 ms while the disk is faulty, so a node
        // whose space came back is ready again well within a second (a try
        // while the disk is still full costs one statvfs: see
        // `Database::reopen`).
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.recv() => return,
            }
            wait = Duration::from_millis(50);
            rounds += 1;
            if let Some(stuck) = self.inner.sled.flush_stuck_for() {
                // A flush that has not returned: nothing can be reopened
                // while it holds the database. One that never returns (a
                // card that stopped answering) is left to the service
                // manager: the process exits and systemd restarts it
                // (`Restart=` in the unit).
                if stuck >= STUCK_FLUSH_EXIT {
                    tracing::error!(
                        stuck_s = stuck.as_secs(),
                        "a flush of the local store never returned; exiting so that the service manager restarts the node"
                    );
                    std::process::exit(1);
                }
                continue;
            }
            if self.inner.sled.needs_reopen() {
                // A write (or read) failed on the disk: sled refuses writes
                // until reopened. Try once a tick; it succeeds once the disk
                // takes writes again (until then the store answers 503 and
                // is unready).
                let sled = self.inner.sled.clone();
                let reopen = tokio::task::spawn_blocking(move || sled.reopen());
                tokio::select! {
                    res = reopen => match res {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            // Said once per reason, at every change of it.
                            let why = e.to_string();
                            if why != last_reopen_failure {
                                tracing::warn!(error = %why, "local store not reopened yet");
                                last_reopen_failure = why;
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "reopening the local store panicked"),
                    },
                    _ = shutdown.recv() => return,
                }
                continue;
            }
            wait = Duration::from_millis(500);
            if rounds % 2 == 0 {
                let sled = self.inner.sled.clone();
                let sweep = tokio::task::spawn_blocking(move || {
                    let now = now_ms();
                    sled.sweep(now, 1_000) + sled.sweep_tombstones(now, 1_000)
                });
                let removed = tokio::select! {
                    r = sweep => r.unwrap_or(0),
                    _ = shutdown.recv() => return,
                };
                if removed > 0 {
                    tracing::debug!(removed, "swept expired sessions and deletion records");
                }
            }
            if let Err(e) = self.inner.sled.flush_pending_touches() {
                tracing::warn!(error = %e, "journaling fallback touches failed");
            }
            // Mirror touches are written coarsely (every 5 s): each write
            // costs the SD card a sync, and Redis holds the session anyway.
            let touched = rounds % MIRROR_FLUSH_ROUNDS == 0;
            // Only what was never acknowledged as durable waits for the
            // lazy flush: in Redis mode the mirror's copies, without Redis
            // the uses' counts (every create, change and delete was synced
            // before its answer). Each sync rewrites the pages of sled's
            // log it touched (~170 KB a sync measured on 10 000 sessions),
            // so they are synced every 5 s with the mirror's touches, not
            // every 500 ms: a create paced at 20 a second wrote 4.4 KB
            // instead of 18.6. In fallback the coalesced counts journaled
            // for the replay keep the 500 ms bound.
            let fallback = self.inner.redis.is_some() && self.mode() != Mode::Redis;
            let lazy = touched || fallback;
            if lazy {
                tokio::select! {
                    r = self.inner.sled.flush_lazy(touched) => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "lazy flush failed");
                        }
                    }
                    _ = shutdown.recv() => return,
                }
                tokio::select! {
                    r = self.inner.sled.fold_uses_if_due() => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "folding the uses' log failed");
                        }
                    }
                    _ = shutdown.recv() => return,
                }
            }
        }
    }

    /// Redis upkeep while the node runs: the probe that notices Redis coming
    /// back, the journal replay, the re-seed of an emptied Redis, the
    /// deletion feed into the mirror, and the cached active-session count.
    /// Returns once `shutdown` fires and everything it started has ended.
    pub async fn run_background(self, shutdown: Shutdown) {
        let Some(redis) = self.inner.redis.clone() else {
            return;
        };
        tokio::join!(
            self.clone()
                .follow_deletions(redis.clone(), shutdown.clone()),
            self.clone().near_link_loop(redis.clone(), shutdown.clone()),
            self.clone().write_behind_loop(shutdown.clone()),
            self.probe_loop(redis, shutdown),
        );
    }

    /// Keeps the near cache's tracking connection up while in Redis mode:
    /// opens it, checks it answers every 250 ms, and drops it (bypassing
    /// the cache) in fallback.
    async fn near_link_loop(self, redis: RedisStore, mut shutdown: Shutdown) {
        let Some(near) = self.near_sink() else {
            return;
        };
        let mut last_check = std::time::Instant::now();
        let mut last_failure = String::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.recv() => {
                    redis.close_tracking(&*near);
                    return;
                }
            }
            if self.mode() != Mode::Redis || self.inner.draining.load(Ordering::Acquire) {
                if near.is_up() {
                    redis.close_tracking(&*near);
                }
                continue;
            }
            if !near.is_up() {
                match redis.open_tracking(near.clone()).await {
                    Ok(()) => {
                        last_failure.clear();
                        tracing::debug!("near cache up");
                    }
                    Err(e) => {
                        let why = e.to_string();
                        if why != last_failure {
                            tracing::warn!(error = %why, "near cache unavailable; touches go to redis");
                            last_failure = why;
                        }
                    }
                }
                last_check = std::time::Instant::now();
            } else if last_check.elapsed() >= Duration::from_millis(250) {
                redis.check_tracking(&*near).await;
                last_check = std::time::Instant::now();
            }
        }
    }

    /// Writes the near cache's counts behind every `touch_flush_ms`, and a
    /// last time on shutdown.
    async fn write_behind_loop(self, mut shutdown: Shutdown) {
        let Some(every) = self.inner.near.as_ref().map(|n| n.touch_flush()) else {
            return;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.recv() => true,
            };
            self.flush_near().await;
            if last {
                return;
            }
        }
    }

    async fn probe_loop(self, redis: RedisStore, mut shutdown: Shutdown) {
        let (first_delay, max_delay) = redis.probe_delays();
        let mut delay = first_delay;
        let mut last_refresh = std::time::Instant::now() - Duration::from_secs(60);
        // The probe's last failure: a new reason (refused, timed out, wrong
        // password...) is logged once as a warning, repeats only at debug.
        let mut last_failure = String::new();
        loop {
            if shutdown.is_shutdown() {
                return;
            }
            let redis_mode = self.inner.redis_mode.load(Ordering::Acquire);
            let pending = self.inner.sled.journal_len();
            if !redis_mode || pending > 0 {
                match redis.ping().await {
                    Ok(()) => {
                        self.inner.redis_reachable.store(true, Ordering::Release);
                        self.set_config_error(None);
                        last_failure.clear();
                        delay = first_delay;
                        let synced = match self.reconcile(&redis, &shutdown).await {
                            Ok(()) => self.sync_epoch(&redis, &shutdown).await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = synced {
                            tracing::warn!(error = %e, "journal replay interrupted; will retry");
                            self.inner.redis_reachable.store(false, Ordering::Release);
                        }
                    }
                    Err(StoreError::RedisConfig(why)) => {
                        // Not an outage: it will not pass by itself. Said at
                        // ERROR every time the probe meets it (at most every
                        // `redis_probe_max_ms`), until it is fixed.
                        self.inner.redis_reachable.store(false, Ordering::Release);
                        tracing::error!(error = %why, "redis refuses this node's credentials or database: fix redis_url; serving from sled meanwhile");
                        self.set_config_error(Some(why));
                        delay = (delay * 2).min(max_delay);
                    }
                    Err(e) => {
                        self.inner.redis_reachable.store(false, Ordering::Release);
                        self.set_config_error(None);
                        let reason = e.to_string();
                        if reason != last_failure {
                            tracing::warn!(error = %reason, "redis unreachable; serving from sled");
                            last_failure = reason;
                        } else {
                            tracing::debug!(error = %e, next_probe_ms = delay.as_millis() as u64, "redis still unreachable");
                        }
                        delay = (delay * 2).min(max_delay);
                    }
                }
            } else {
                delay = first_delay;
                let reseed = self.inner.replay.reseed_wanted.load(Ordering::Acquire);
                if reseed || last_refresh.elapsed() >= Duration::from_secs(1) {
                    last_refresh = std::time::Instant::now();
                    // Doubles as the health check of an idle node: a node
                    // that serves nothing still notices Redis going away,
                    // or coming back empty.
                    let checked = match redis.refresh_active(now_ms()).await {
                        Ok(()) => self.sync_epoch(&redis, &shutdown).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = checked {
                        self.redis_failed("refresh", &e);
                    }
                }
            }
            let wait = if self.inner.redis_mode.load(Ordering::Acquire) {
                Duration::from_millis(250)
            } else {
                delay
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.recv() => return,
            }
        }
    }

    /// Keeps the mirror free of sessions deleted or rotated on other nodes.
    async fn follow_deletions(self, redis: RedisStore, mut shutdown: Shutdown) {
        let sled = self.inner.sled.clone();
        let heard = self.inner.deletions_heard.clone();
        loop {
            let follow = redis.follow_deletions(|id| {
                heard.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = sled.deleted_elsewhere(&id) {
                    tracing::warn!(error = %e, "dropping a deleted session from the mirror failed");
                }
            });
            tokio::select! {
                res = follow => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "deletion feed interrupted; resubscribing");
                    }
                }
                _ = shutdown.recv() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.recv() => return,
            }
        }
    }
}

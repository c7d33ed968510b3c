//! One node's whole life, as a library function: open the stores, serve,
//! and on `shutdown` drain, stop and join every background task, then close
//! the store. `main.rs` only parses the configuration, sets up logging and
//! the runtime, and passes the signals in as the shutdown future.

use crate::admission::{Admission, RateLimiter};
use crate::config::Config;
use crate::http::App;
use crate::metrics::Metrics;
use crate::session::Limits;
use crate::store::local::{LocalLimits, SledStore};
use crate::store::{redis::RedisStore, Store, StoreLimits};
use crate::{server, systemd};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The earliest wall-clock time (unix ms) the node trusts: this build's
/// commit time. `EDGENODE_TEST_CLOCK_FLOOR_MS` replaces it, so a test can
/// show what a board whose clock is not yet set gets.
fn clock_floor() -> u64 {
    std::env::var("EDGENODE_TEST_CLOCK_FLOOR_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            env!("EDGENODE_CLOCK_FLOOR_SECS")
                .parse::<u64>()
                .unwrap_or(0)
                .saturating_mul(1000)
        })
}

/// Runs the node until `shutdown` completes, then drains and returns. The
/// listener is systemd's under socket activation, else `config.listen`.
pub async fn run(
    config: Config,
    started: Instant,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error>> {
    raise_fd_limit();
    let listener = match systemd::activated_listener()? {
        Some(l) => tokio::net::TcpListener::from_std(l)?,
        None => {
            // Refuse before binding, so an exposed port is never open at all.
            config.check_exposure(config.listen)?;
            tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?
        }
    };
    run_on(config, started, listener, shutdown).await
}

/// Like [`run`], on a listener the caller bound (`config.listen` is not
/// used): a test binds port 0 and learns the port from the listener. A
/// non-loopback listener without an api token is refused, as in `run`; the
/// process's open-files limit is left as the caller set it.
pub async fn run_on(
    config: Config,
    started: Instant,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error>> {
    let addr = listener.local_addr()?;
    // Under socket activation (or a caller's listener) this is not `listen`.
    config.check_exposure(addr)?;

    let limits = Limits {
        ttl_ms: config.session_ttl_secs.saturating_mul(1000),
        max_lifetime_ms: config.session_max_lifetime_secs.saturating_mul(1000),
        max_metadata_bytes: config.max_metadata_bytes,
    };
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create data_dir {}: {e}", config.data_dir.display()))?;
    let local = LocalLimits {
        cache_bytes: config.cache_capacity_bytes,
        max_journal_bytes: config.max_journal_bytes,
        min_free_bytes: config.min_free_bytes,
    };
    let sled = SledStore::open(&config.data_dir, local, limits).map_err(|e| {
        format!(
            "cannot open the local store in {}: {e}",
            config.data_dir.display()
        )
    })?;
    sled.set_mirror_lag_ms(config.mirror_lag_secs.saturating_mul(1000));
    let redis = match &config.redis_url {
        Some(url) => Some(RedisStore::new(url, &config, limits, sled.origin())?),
        None => None,
    };
    let store = Store::new(
        sled,
        redis,
        StoreLimits {
            clock_floor: clock_floor(),
            replay_batch: config.replay_batch,
            max_sessions_per_user: config.max_sessions_per_user,
            max_sessions: config.max_sessions,
            require_redis: config.require_redis,
            store_timeout: config.store_timeout,
            near_cache_bytes: config.near_cache_bytes,
            touch_flush: config.touch_flush,
            near_admit: config.near_admit,
        },
    );
    store.start_on_redis().await;
    let cache = crate::cache::Cache::new(&config, store.sled().database().clone())?;
    return_free_memory();

    let admission = Admission::new(config.workers, config.max_connections, config.max_in_flight);
    let metrics = Metrics::new(
        &config.instance_id,
        store.clone(),
        admission.clone(),
        cache.clone(),
    );
    let app = Arc::new(App {
        limits,
        store: store.clone(),
        cache: cache.clone(),
        admission,
        rate_limiter: RateLimiter::new(config.rate_limit_per_ip, config.rate_limit_burst),
        create_limiter: RateLimiter::new(
            config.create_rate_per_ip,
            config.create_rate_per_ip.saturating_mul(3),
        ),
        warned_proxy_without_token: false.into(),
        metrics,
        started,
        ready: false.into(),
        config,
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Temporary: the store hears a named `Shutdown`, fired with the rest.
    let (store_stop, store_shutdown) = crate::shutdown::channel();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(store.clone().run_housekeeping(store_shutdown.clone()));
    tasks.spawn(store.clone().run_background(store_shutdown));
    // The shared cache's invalidation feed, probe and outage-journal replay.
    tasks.spawn(cache.run(shutdown_rx.clone()));
    tasks.spawn(every(Duration::from_secs(30), shutdown_rx.clone(), || {
        return_free_memory()
    }));
    // systemctl status shows the store mode and the session count.
    {
        let store = store.clone();
        tasks.spawn(every(
            Duration::from_secs(5),
            shutdown_rx.clone(),
            move || {
                let st = store.status();
                systemd::status(&format!(
                    "store {}, {} sessions, {} pending sync{}",
                    st.active.as_str(),
                    st.sessions_active,
                    st.pending_sync,
                    st.degraded
                        .map(|r| format!(", degraded: {r}"))
                        .unwrap_or_default()
                ));
            },
        ));
    }
    if let Some(interval) = systemd::watchdog_interval() {
        tasks.spawn(systemd::run_watchdog(interval, shutdown_rx.clone()));
    }
    let server = tokio::spawn(server::run(app.clone(), listener, shutdown_rx));

    app.ready.store(true, Ordering::Release);
    let mode = store.mode().as_str();
    systemd::ready(&format!(
        "serving on {addr}, store {mode}, {} sessions",
        store.status().sessions_active
    ));
    tracing::info!(
        %addr,
        store = mode,
        redis = app.config.redis_url.is_some(),
        instance_id = %app.config.instance_id,
        workers = app.config.workers,
        ready_ms = started.elapsed().as_millis() as u64,
        "edgenode ready"
    );
    if !store.clock_is_sane() {
        tracing::warn!("the system clock is behind this build's date; not ready until it is set");
    }

    shutdown.await;
    tracing::info!("shutting down: readiness off, draining");
    app.ready.store(false, Ordering::Release);
    // From here every use of a session goes to Redis, so the node that
    // takes a browser over sees every count at once.
    store.begin_drain().await;
    systemd::stopping();
    tokio::time::sleep(app.config.drain_delay).await;
    let _ = shutdown_tx.send(true);
    store_stop.fire();
    let _ = server.await;
    // Every task that writes to the store ends before the store closes; a
    // replay in progress stops between batches.
    while tasks.join_next().await.is_some() {}
    store.close().await?;
    tracing::info!("local store flushed; bye");
    Ok(())
}

/// Runs `f` every `period` until shutdown.
async fn every(period: Duration, mut shutdown: watch::Receiver<bool>, mut f: impl FnMut()) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => f(),
            _ = shutdown.changed() => return,
        }
    }
}

/// Lifts the soft open-files limit to the hard one: each connection is a
/// descriptor, and `max_connections` is the bound that should bite, not EMFILE.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Opening sled replays its log through many short-lived allocations, and
/// bursts of traffic leave freed buffers behind; glibc keeps such pages
/// unless asked. (musl's allocator, the release builds', returns them itself.)
fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

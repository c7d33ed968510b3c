//! One node's whole life, as a library function: open the stores, serve,
//! and on `shutdown` drain, stop and join every background task, then close
//! the store. `main.rs` only parses the configuration, sets up logging and
//! the runtime, and passes the signals in as the shutdown future.

use crate::config::Config;
use crate::http::tokens::Tokens;
use crate::http::App;
use crate::metrics::Metrics;
use crate::shutdown::{self, Shutdown};
use crate::store::{local::SledStore, redis::RedisStore, Store};
use crate::{server, systemd};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

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
///
/// SIGHUP (`systemctl reload`) re-reads `api_token_file`. The handler is
/// installed here, before the node is ready, because SIGHUP's default action
/// would end the process.
pub async fn run(
    config: Config,
    started: Instant,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error>> {
    raise_fd_limit();
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let tokens = load_tokens(&config)?;
    let listener = match systemd::activated_listener()? {
        Some(l) => tokio::net::TcpListener::from_std(l)?,
        None => {
            // Refuse before binding, so an exposed port is never open at all.
            config.check_exposure(config.listen, tokens.count())?;
            tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?
        }
    };
    let span = node_span(&config);
    serve(config, tokens, started, listener, shutdown, Some(hangups))
        .instrument(span)
        .await
}

fn load_tokens(config: &Config) -> Result<Tokens, String> {
    Tokens::load(
        config.api_token.as_deref(),
        config.api_token_file.as_deref(),
    )
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
    let tokens = load_tokens(&config)?;
    let span = node_span(&config);
    serve(config, tokens, started, listener, shutdown, None)
        .instrument(span)
        .await
}

/// The span every line of a node's life runs in, its background tasks' and
/// its requests' included: each carries `instance_id`.
fn node_span(config: &Config) -> tracing::Span {
    tracing::info_span!("node", instance_id = %config.instance_id)
}

/// The node's life on `listener` (run it inside [`node_span`]).
async fn serve(
    config: Config,
    tokens: Tokens,
    started: Instant,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
    hangups: Option<tokio::signal::unix::Signal>,
) -> Result<(), Box<dyn std::error::Error>> {
    let addr = listener.local_addr()?;
    // Under socket activation (or a caller's listener) this is not `listen`.
    config.check_exposure(addr, tokens.count())?;

    let limits = config.session_limits();
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create data_dir {}: {e}", config.data_dir.display()))?;
    let sled = SledStore::open(&config.data_dir, config.local_limits(), limits).map_err(|e| {
        format!(
            "cannot open the local store in {}: {e}",
            config.data_dir.display()
        )
    })?;
    sled.set_mirror_lag_ms(config.mirror_lag_secs.saturating_mul(1000));
    let redis = match &config.redis_url {
        Some(url) => Some(RedisStore::new(
            url,
            &config.redis_settings(),
            limits,
            sled.origin(),
        )?),
        None => None,
    };
    let store = Store::new(sled, redis, config.store_limits(clock_floor()));
    store.start_on_redis().await;
    let cache =
        crate::cache::Cache::new(&config.cache_settings(), store.sled().database().clone())?;
    return_free_memory();

    let admission = config.admission();
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
        rate_limiter: config.rate_limiter(),
        create_limiter: config.create_limiter(),
        tokens,
        access_log: config.access_logger(),
        warned_proxy_without_token: false.into(),
        metrics,
        started,
        ready: false.into(),
        config,
    });

    let (trigger, stop) = shutdown::channel();
    // Every task runs in the node's span (tokio does not pass it on).
    let node = tracing::Span::current();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(
        store
            .clone()
            .run_housekeeping(stop.clone())
            .instrument(node.clone()),
    );
    tasks.spawn(
        store
            .clone()
            .run_background(stop.clone())
            .instrument(node.clone()),
    );
    // The shared cache's invalidation feed, probe and outage-journal replay.
    tasks.spawn(cache.run(stop.clone()).instrument(node.clone()));
    // Every 2 s, not 30: under spread traffic glibc held ~4 MB of freed
    // pages at the peak (32.5 MB, 28.0 after a trim), the margin under the
    // 32 MB bound; a trim this often showed no cost in p99 (lab, docs/performance.md).
    tasks.spawn(every(Duration::from_secs(2), stop.clone(), || {
        return_free_memory()
    }));
    if let Some(hangups) = hangups {
        tasks.spawn(reload_on_hangup(app.clone(), hangups, stop.clone()).instrument(node.clone()));
    }
    // systemctl status shows the store mode and the session count.
    {
        let store = store.clone();
        tasks.spawn(every(Duration::from_secs(5), stop.clone(), move || {
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
        }));
    }
    if let Some(interval) = systemd::watchdog_interval() {
        tasks.spawn(systemd::run_watchdog(interval, stop.clone()).instrument(node.clone()));
    }
    let server = tokio::spawn(server::run(app.clone(), listener, stop).instrument(node));

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
    trigger.fire();
    let _ = server.await;
    // Every task that writes to the store ends before the store closes; a
    // replay in progress stops between batches.
    while tasks.join_next().await.is_some() {}
    store.close().await?;
    tracing::info!("local store flushed; bye");
    Ok(())
}

/// Re-reads the API tokens on each SIGHUP until shutdown. systemd's
/// `ExecReload=` sends it; a failed reload keeps the tokens in force (and
/// is logged by `reload`).
async fn reload_on_hangup(
    app: Arc<App>,
    mut hangups: tokio::signal::unix::Signal,
    mut shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            Some(()) = hangups.recv() => {
                let _ = app.tokens.reload();
            }
            _ = shutdown.recv() => return,
        }
    }
}

/// Runs `f` every `period` until shutdown.
async fn every(period: Duration, mut shutdown: Shutdown, mut f: impl FnMut()) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => f(),
            _ = shutdown.recv() => return,
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

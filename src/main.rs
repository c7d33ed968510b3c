//! The edgenode binary: configuration, logging and the runtime, then the
//! modules of the library wired together. No logic lives here.

use clap::Parser;
use edgenode::config::{Args, Config, LogFormat};
use edgenode::http::App;
use edgenode::metrics::Metrics;
use edgenode::pool::{Admission, RateLimiter};
use edgenode::session::Limits;
use edgenode::store::{redis::RedisStore, sled::SledStore, Store};
use edgenode::{server, systemd};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

// musl's malloc takes one global lock; mimalloc keeps per-thread heaps
// (see Cargo.toml).
#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Makes mimalloc give freed pages back to the OS at once rather than a
/// second later: opening sled on 100k sessions churns through short-lived
/// buffers whose pages otherwise stayed resident (27 -> 20 MB RSS measured).
/// libmimalloc-sys has no constant for the option, so its index is taken from
/// mimalloc 3's `mi_option_e` and checked against the option's default
/// (1000 ms, `src/options.c`) before it is changed; a `MIMALLOC_PURGE_DELAY`
/// set by the operator is left alone.
#[cfg(target_env = "musl")]
fn return_freed_memory_at_once() {
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: reading and setting an option only touches mimalloc's option table.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == 1000 {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    #[cfg(target_env = "musl")]
    return_freed_memory_at_once();
    let config = match Config::resolve(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgenode: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    // Exactly `workers` request threads and a small bounded blocking pool
    // (fsyncs): the thread count does not grow with load.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .max_blocking_threads(config.blocking_threads)
        .thread_name("edgenode")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, started)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, started: Instant) -> Result<(), Box<dyn std::error::Error>> {
    raise_fd_limit();
    // Installed first: a SIGTERM that arrives as soon as we serve (or even
    // before) must drain, not kill.
    let signals = Signals::install()?;
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
    let addr = listener.local_addr()?;
    // Under socket activation the address is systemd's, not `listen`.
    config.check_exposure(addr)?;

    let limits = Limits {
        ttl_ms: config.session_ttl_secs.saturating_mul(1000),
        max_lifetime_ms: config.session_max_lifetime_secs.saturating_mul(1000),
        max_metadata_bytes: config.max_metadata_bytes,
    };
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create data_dir {}: {e}", config.data_dir.display()))?;
    let sled =
        SledStore::open(&config.data_dir, config.cache_capacity_bytes, limits).map_err(|e| {
            format!(
                "cannot open the local store in {}: {e}",
                config.data_dir.display()
            )
        })?;
    let redis = match &config.redis_url {
        Some(url) => Some(RedisStore::new(url, &config, limits)?),
        None => None,
    };
    let store = Store::new(sled, redis);
    return_free_memory();

    let admission = Admission::new(config.workers, config.max_connections, config.max_in_flight);
    let metrics = Metrics::new(&config.instance_id, store.clone(), admission.clone());
    let app = Arc::new(App {
        limits,
        store: store.clone(),
        admission,
        rate_limiter: RateLimiter::new(config.rate_limit_per_ip, config.rate_limit_burst),
        metrics,
        started,
        ready: false.into(),
        config,
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(store.clone().run_housekeeping(shutdown_rx.clone()));
    tokio::spawn(store.clone().run_background(shutdown_rx.clone()));
    tokio::spawn(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
        loop {
            tick.tick().await;
            return_free_memory();
        }
    });
    // systemctl status shows the store mode and the session count.
    {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tick.tick().await;
                let st = store.status();
                systemd::status(&format!(
                    "store {}, {} sessions, {} pending sync",
                    st.active.as_str(),
                    st.sessions_active,
                    st.pending_sync
                ));
            }
        });
    }
    if let Some(every) = systemd::watchdog_interval() {
        tokio::spawn(systemd::run_watchdog(every, shutdown_rx.clone()));
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

    signals.recv().await;
    tracing::info!("shutting down: readiness off, draining");
    app.ready.store(false, Ordering::Release);
    systemd::stopping();
    tokio::time::sleep(app.config.drain_delay).await;
    let _ = shutdown_tx.send(true);
    let _ = server.await;
    store.close().await?;
    tracing::info!("local store flushed; bye");
    Ok(())
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

/// SIGTERM (systemd stop) and SIGINT (Ctrl-C).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Plain lines without colours or timestamps under journald (it adds its
/// own), JSON lines on request.
fn init_logging(config: &Config) {
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(config.log_level)
        .with_target(false);
    match (config.log_format, journald) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Plain, true) => builder.without_time().with_ansi(false).init(),
        (LogFormat::Plain, false) => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

//! The edgenode binary: configuration, logging and the runtime, then the
//! modules of the library wired together. No logic lives here.

use clap::{CommandFactory, FromArgMatches};
use edgenode::config::{Args, Config};
use edgenode::healthcheck;
use std::process::ExitCode;
use std::time::Instant;

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

/// Caps glibc malloc's arenas at one. glibc gives threads their own arenas
/// (up to 8 per core), and memory freed in one is reused only by the
/// threads on it: the workers, the blocking pool's fsync threads and sled's
/// inline IO each kept their own partly empty heaps. Two arenas instead of
/// the default took ~1-2 MB off RSS after creating 100k sessions. One took
/// 1.5-2.4 MB more off during spread traffic in Redis mode (100 000
/// sessions: 29-31 against 30.5-33 MB) at the same req/s and CPU per use,
/// the hot case included (per-thread tcaches serve most small allocations
/// without the arena lock). Sled mode had two while every use rewrote its
/// record in sled on whichever thread ran it (one arena cost 15-20 % of
/// req/s then); since uses go to the uses' log, the blocking pool's folds
/// write the records, and with two arenas a node at 100 000 uniform
/// sessions grew to 35-37 MB against 26-27 MB with one. Called before any
/// thread but main exists. An operator's `MALLOC_ARENA_MAX` or
/// `GLIBC_TUNABLES` is left alone.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cap_malloc_arenas() {
    let set_by_operator = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
    if !set_by_operator {
        // SAFETY: mallopt only changes a malloc parameter; it is called before
        // any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn main() -> ExitCode {
    // `edgenode healthcheck`: probe the running node and exit (containers).
    if healthcheck::requested(std::env::args_os()) {
        return healthcheck::main(std::env::args_os());
    }
    // `edgenode completions <shell>` prints the script; `edgenode man` says
    // where the man page is.
    match edgenode::docs::requested(std::env::args_os()) {
        Some(edgenode::docs::Asked::Completions) => {
            return edgenode::docs::print_completions(std::env::args_os())
        }
        Some(edgenode::docs::Asked::Man) => return edgenode::docs::point_to_man_page(),
        None => {}
    }
    let started = Instant::now();
    #[cfg(target_env = "musl")]
    return_freed_memory_at_once();
    let matches = healthcheck::documented(Args::command()).get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let config = match Config::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgenode: {e}");
            return ExitCode::from(2);
        }
    };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    cap_malloc_arenas();
    edgenode::logging::init(&config);
    // The lines main itself logs name the node too (the node's own span is
    // made in `node::run`).
    let span = tracing::info_span!("node", instance_id = %config.instance_id);
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
            span.in_scope(|| tracing::error!(error = %e, "cannot start the runtime"));
            return ExitCode::FAILURE;
        }
    };
    let run = async {
        // Installed first: a SIGTERM that arrives as soon as we serve (or
        // even before) must drain, not kill.
        let signals = Signals::install()?;
        edgenode::node::run(config, started, signals.recv()).await
    };
    let ran = runtime.block_on(run);
    // Dropping the runtime would wait for every blocking task, and one may
    // be a flush stuck on a disk that stopped answering (it never returns
    // while the card does not): the stop must end within the grace
    // whatever the disk does. Everything acknowledged was flushed before
    // it was acknowledged, so nothing is lost by not waiting. (The kernel
    // reaps a thread blocked in the disk driver only once the I/O returns;
    // the process has exited, and stopped listening, before that.)
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            span.in_scope(|| tracing::error!("{e}"));
            ExitCode::FAILURE
        }
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

//! The in-process tier: a whole node (`edgenode::node::run_on`) on a tokio
//! runtime of its own inside the test process, on a listener bound to
//! 127.0.0.1:0. No child process: start and clean stop take ~10 ms in a debug
//! build, so an API test costs little more than its requests. What
//! needs a process (kill -9, restart, signals, the node's own environment,
//! /proc measurements, the binary's command line) stays with `Node`.
//!
//! The configuration is parsed from arguments as the binary's is, with the
//! test process's environment (as a child would inherit it); per-node
//! environment variables cannot be given, since the environment is shared by
//! every test in the process: pass the flag instead.
//!
//! The node's log goes to a buffer of its own (`log_text`): each runtime
//! thread gets a thread-local subscriber; nothing global is installed.
//! Dropping an `InProcNode` shuts it down as SIGTERM does and waits for
//! `run_on` to return (drained, store flushed and closed); an error from it,
//! or a shutdown that does not finish, fails the test.

use super::{wait_until, Client};
use clap::Parser;
use edgenode::config::{Args, Config};
use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A node running in this process.
pub struct InProcNode {
    pub port: u16,
    pub addr: String,
    pub data_dir: PathBuf,
    log: LogBuffer,
    shutdown: Option<oneshot::Sender<()>>,
    /// Disconnected when the node's thread ends.
    ended: mpsc::Receiver<()>,
    thread: Option<JoinHandle<Result<(), String>>>,
    _owned_dir: Option<tempfile::TempDir>,
}

pub struct InProcBuilder {
    args: Vec<String>,
    data_dir: Option<PathBuf>,
}

impl InProcBuilder {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, it: I) -> Self {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }
    /// The store goes to `d/db`, as with `Node`.
    pub fn data_dir(mut self, d: &Path) -> Self {
        self.data_dir = Some(d.to_path_buf());
        self
    }

    /// Starts the node and waits for `/api/ready`.
    pub fn start(self) -> InProcNode {
        let started = Instant::now();
        let (owned, data_dir) = match self.data_dir {
            Some(d) => (None, d),
            None => {
                let t = super::tempdir();
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        // Bound here, so the port is known before the node runs; connections
        // made before it accepts wait in the backlog.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("local addr").port();
        let addr = format!("127.0.0.1:{port}");
        let mut argv = vec![
            "edgenode".to_string(),
            "--config".into(),
            "/dev/null".into(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.join("db").to_string_lossy().into_owned(),
        ];
        argv.extend(self.args);
        let args = Args::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let config = Config::resolve(args).unwrap_or_else(|e| panic!("{argv:?}: {e}"));

        let log = LogBuffer::default();
        let (tx, rx) = oneshot::channel();
        let (ending, ended) = mpsc::channel();
        let thread = {
            let log = log.clone();
            std::thread::Builder::new()
                .name(format!("inproc-node-{port}"))
                .spawn(move || {
                    let _ending = ending;
                    serve(config, started, listener, rx, log)
                })
                .expect("spawn the node's thread")
        };
        let mut node = InProcNode {
            port,
            addr,
            data_dir,
            log,
            shutdown: Some(tx),
            ended,
            thread: Some(thread),
            _owned_dir: owned,
        };
        let c = node.client();
        let ended = || node.thread.as_ref().map_or(true, |t| t.is_finished());
        let ready = wait_until(Duration::from_secs(10), || {
            ended()
                || c.try_request("GET", "/api/ready", &[], None)
                    .is_ok_and(|a| a.status == 200)
        });
        if ended() {
            let result = node.stop();
            panic!(
                "node stopped before it was ready ({result:?}); log:\n{}",
                node.log_text()
            );
        }
        assert!(
            ready,
            "node did not become ready; log:\n{}",
            node.log_text()
        );
        node
    }
}

/// The node's thread: a runtime shaped as `main.rs` builds it, with the
/// node's log going to `log`.
fn serve(
    config: Config,
    started: Instant,
    listener: std::net::TcpListener,
    shutdown: oneshot::Receiver<()>,
    log: LogBuffer,
) -> Result<(), String> {
    thread_local! {
        static LOG: RefCell<Option<tracing::dispatcher::DefaultGuard>> = const { RefCell::new(None) };
    }
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::fmt()
            .with_writer(move || log.clone())
            .with_max_level(config.log_level)
            .with_target(false)
            .with_ansi(false)
            .finish(),
    );
    let _log = tracing::dispatcher::set_default(&dispatch);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .max_blocking_threads(config.blocking_threads)
        .thread_name("edgenode")
        .enable_all()
        .on_thread_start(move || {
            LOG.with(|g| *g.borrow_mut() = Some(tracing::dispatcher::set_default(&dispatch)))
        })
        .on_thread_stop(|| LOG.with(|g| drop(g.borrow_mut().take())))
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        edgenode::node::run_on(config, started, listener, async {
            // A dropped sender (a panicking test) stops the node too.
            let _ = shutdown.await;
        })
        .await
        .map_err(|e| e.to_string())
    })
}

impl InProcNode {
    pub fn builder() -> InProcBuilder {
        InProcBuilder {
            args: Vec::new(),
            data_dir: None,
        }
    }

    pub fn start() -> InProcNode {
        InProcNode::builder().start()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> Client {
        Client::new(self.url())
    }

    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Starts the shutdown, as SIGTERM does, and returns at once; the drop
    /// waits for it to finish.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts the node down and waits until `run_on` has returned.
    fn stop(&mut self) -> Result<(), String> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.begin_shutdown();
        if let Err(mpsc::RecvTimeoutError::Timeout) =
            self.ended.recv_timeout(Duration::from_secs(20))
        {
            return Err("did not stop within 20 s".into());
        }
        match thread.join() {
            Ok(result) => result,
            Err(_) => Err("the node's thread panicked".into()),
        }
    }
}

impl Drop for InProcNode {
    fn drop(&mut self) {
        let result = self.stop();
        if let Err(e) = result {
            if !std::thread::panicking() {
                panic!(
                    "node did not shut down cleanly: {e}; log:\n{}",
                    self.log_text()
                );
            }
        }
    }
}

/// Where one node's log lines go.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

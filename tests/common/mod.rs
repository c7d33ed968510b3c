//! Test harness: real processes on free loopback ports.
//!
//! `Node` runs the built `edgenode` binary with a temp data dir; `Redis` runs a
//! real `redis-server`. Both are killed when dropped. Readiness is polled
//! (`/api/ready`, `PING`), never slept for. `inproc::InProcNode` runs a node
//! inside the test process instead, for tests that need no process of its own.

#![allow(dead_code)]

pub mod balancer;
pub mod inproc;
pub mod lan;
pub mod prometheus;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_edgenode");

/// The optimised build, for tests that measure memory: a debug build's
/// futures are several times larger and say nothing about the release.
/// `scripts/test.sh` builds it before the tests; one built from other source
/// than the code under test is refused (see [`built_from_same_source`]).
pub fn release_binary() -> PathBuf {
    let release = Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("release/edgenode"))
        .expect("target dir");
    if let Err(why) = built_from_same_source(&release, Path::new(BIN)) {
        panic!("{why}: run `cargo build --release` (scripts/test.sh does)");
    }
    release
}

/// Whether `candidate` was built from the same source as `reference`: both
/// print the fingerprint of their source in `--version` (build.rs), so the
/// answer does not depend on when either was built, only on what from.
pub fn built_from_same_source(candidate: &Path, reference: &Path) -> Result<(), String> {
    fn source_of(bin: &Path) -> Result<String, String> {
        let out = Command::new(bin)
            .arg("--version")
            .output()
            .map_err(|e| format!("{} cannot run: {e}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("source ")
            .nth(1)
            .map(|s| s.trim().trim_end_matches(')').to_string())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                format!(
                    "{} names no source fingerprint in --version: {text:?}",
                    bin.display()
                )
            })
    }
    let (want, got) = (source_of(reference)?, source_of(candidate)?);
    if want == got {
        Ok(())
    } else {
        Err(format!(
            "{} was built from other source ({got}) than the code under test ({want})",
            candidate.display()
        ))
    }
}

/// A free port *below* the kernel's ephemeral range (32768+), so that a
/// restarted node cannot find its port taken by some test's client socket.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id()
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0));
    NEXT.compare_exchange(0, seed % 12_000, Ordering::SeqCst, Ordering::SeqCst)
        .ok();
    loop {
        let port = 20_000 + (NEXT.fetch_add(7, Ordering::SeqCst) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("edgenode-test-")
        .tempdir()
        .expect("temp dir")
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a child we started.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// An HTTP answer: status, headers (lower-case names) and the body as JSON
/// when it parses.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The error code of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// An HTTP answer with its body as bytes (a value of any content type).
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A small blocking HTTP client (ureq) that returns 4xx/5xx as answers.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Client {
    pub fn new(base: impl Into<String>) -> Client {
        Client {
            base: base.into(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build(),
            token: None,
        }
    }

    pub fn with_token(mut self, token: &str) -> Client {
        self.token = Some(token.into());
        self
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Answer {
        self.try_request(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Like `request`, but a transport failure is an `Err` instead of a panic.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Answer, String> {
        let mut headers = headers.to_vec();
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let raw = self.try_request_bytes(method, path, &headers, body.map(str::as_bytes))?;
        let text = String::from_utf8(raw.body).map_err(|e| e.to_string())?;
        Ok(Answer {
            status: raw.status,
            headers: raw.headers,
            text,
        })
    }

    /// A request whose body is bytes, sent as given (its `Content-Type`, if
    /// any, among `headers`), and the answer's body as bytes.
    pub fn try_request_bytes(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<RawAnswer, String> {
        let mut req = self
            .agent
            .request(method, &format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let res = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e.to_string()),
        };
        let status = resp.status();
        let headers = resp
            .headers_names()
            .into_iter()
            .filter_map(|n| {
                resp.header(&n)
                    .map(|v| (n.to_ascii_lowercase(), v.to_string()))
            })
            .collect();
        let mut body = Vec::new();
        resp.into_reader()
            .read_to_end(&mut body)
            .map_err(|e| e.to_string())?;
        Ok(RawAnswer {
            status,
            headers,
            body,
        })
    }

    /// The same client with another timeout per request.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.agent = ureq::AgentBuilder::new().timeout(timeout).build();
        self
    }

    pub fn get(&self, path: &str) -> Answer {
        self.request("GET", path, &[], None)
    }
    pub fn post(&self, path: &str, body: &str) -> Answer {
        self.request("POST", path, &[], Some(body))
    }
    pub fn patch(&self, path: &str, body: &str) -> Answer {
        self.request("PATCH", path, &[], Some(body))
    }
    pub fn delete(&self, path: &str) -> Answer {
        self.request("DELETE", path, &[], None)
    }

    /// Creates a session and returns its JSON.
    pub fn create(&self, body: &str) -> Value {
        let a = self.post("/api/sessions", body);
        assert_eq!(a.status, 201, "create: {}", a.text);
        a.json()
    }
}

/// Sends raw bytes and returns the raw response (for input ureq would refuse
/// to send: non-UTF-8, broken framing).
pub fn raw_http(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(request).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

pub fn raw_status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A running edgenode process.
pub struct Node {
    pub child: Child,
    bin: PathBuf,
    /// What it was started with, so a restart starts the same node.
    envs: Vec<(String, String)>,
    self_pid_envs: Vec<String>,
    pub port: u16,
    pub addr: String,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    _owned_dir: Option<tempfile::TempDir>,
}

pub struct NodeBuilder {
    bin: PathBuf,
    self_pid_envs: Vec<String>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    data_dir: Option<PathBuf>,
    port: Option<u16>,
    ip: Option<String>,
}

impl NodeBuilder {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, it: I) -> Self {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }
    pub fn data_dir(mut self, d: &Path) -> Self {
        self.data_dir = Some(d.to_path_buf());
        self
    }
    /// Listens on this address instead of 127.0.0.1 (a host of a
    /// [`lan::Lan`]); a node beyond loopback needs an api token.
    pub fn listen_ip(mut self, ip: &str) -> Self {
        self.ip = Some(ip.into());
        self
    }

    pub fn port(mut self, p: u16) -> Self {
        self.port = Some(p);
        self
    }
    /// Runs another build of edgenode (see [`release_binary`]).
    pub fn binary(mut self, bin: PathBuf) -> Self {
        self.bin = bin;
        self
    }
    /// Sets `name` to the node's own pid, as systemd does for LISTEN_PID and
    /// WATCHDOG_PID (the node is started through `sh -c 'exec …'`, which
    /// keeps the shell's pid).
    pub fn env_own_pid(mut self, name: &str) -> Self {
        self.self_pid_envs.push(name.into());
        self
    }

    /// Starts the node and waits for `/api/ready`.
    pub fn start(self) -> Node {
        let node = self.spawn();
        assert!(
            node.wait_ready(Duration::from_secs(10)),
            "node did not become ready; log:\n{}",
            node.log_text()
        );
        node
    }

    /// Starts the node without waiting.
    pub fn spawn(self) -> Node {
        let (owned, data_dir) = match self.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempdir();
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let port = self.port.unwrap_or_else(free_port);
        let addr = format!("{}:{port}", self.ip.as_deref().unwrap_or("127.0.0.1"));
        let log = data_dir.with_extension(format!("{port}.log"));
        let mut args = vec![
            "--config".to_string(),
            "/dev/null".into(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.join("db").to_string_lossy().into_owned(),
        ];
        args.extend(self.args);
        let logfile = std::fs::File::create(&log).expect("log file");
        let child = launch(&self.bin, &args, &self.envs, &self.self_pid_envs, logfile);
        Node {
            bin: self.bin.clone(),
            envs: self.envs,
            self_pid_envs: self.self_pid_envs,
            child,
            port,
            addr,
            data_dir,
            args,
            log,
            _owned_dir: owned,
        }
    }
}

/// Starts an edgenode process. `self_pid_envs` are set to the process's own
/// pid, as systemd does for LISTEN_PID and WATCHDOG_PID (through
/// `sh -c 'exec …'`, which keeps the shell's pid).
fn launch(
    bin: &Path,
    args: &[String],
    envs: &[(String, String)],
    self_pid_envs: &[String],
    log: std::fs::File,
) -> Child {
    let mut cmd = if self_pid_envs.is_empty() {
        Command::new(bin)
    } else {
        let assigns: Vec<String> = self_pid_envs.iter().map(|n| format!("{n}=$$")).collect();
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!("export {}; exec \"$0\" \"$@\"", assigns.join(" ")))
            .arg(bin);
        c
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn edgenode")
}

/// Says why a test that cannot run here did not: `scripts/test.sh` counts
/// the line as a skip (written past the test harness's capture).
pub fn skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
}

/// The `session_id` of a session's JSON.
pub fn id_of(v: &Value) -> String {
    v["session_id"].as_str().expect("session_id").to_string()
}

impl Node {
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            bin: PathBuf::from(BIN),
            self_pid_envs: Vec::new(),
            args: Vec::new(),
            envs: Vec::new(),
            data_dir: None,
            port: None,
            ip: None,
        }
    }

    pub fn start() -> Node {
        Node::builder().start()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> Client {
        Client::new(self.url())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let c = Client::new(self.url());
        wait_until(timeout, || {
            c.try_request("GET", "/api/ready", &[], None)
                .map(|a| a.status == 200)
                .unwrap_or(false)
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "node did not exit after SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts a new process with the same arguments, environment and data
    /// dir.
    pub fn restart(&mut self) {
        let logfile = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("log");
        self.child = launch(
            &self.bin,
            &self.args,
            &self.envs,
            &self.self_pid_envs,
            logfile,
        );
        assert!(
            self.wait_ready(Duration::from_secs(10)),
            "node did not come back; log:\n{}",
            self.log_text()
        );
    }

    /// Threads and resident memory (kB) from /proc.
    pub fn threads_and_rss_kb(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("Threads:"), field("VmRSS:"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real redis-server on a free loopback port.
pub struct Redis {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    persistent: bool,
}

impl Redis {
    /// `persistent`: appendonly with fsync always, so a restart keeps data.
    ///
    /// A free port can still be taken between the check and Redis's own
    /// bind; a Redis that exits saying so is started again on another one.
    pub fn start(persistent: bool) -> Redis {
        for _ in 0..4 {
            let mut r = Redis::spawned(free_port(), persistent);
            match r.wait_ready() {
                Ok(()) => return r,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("redis-server did not start on {}:\n{log}", r.port),
            }
        }
        panic!("redis-server found its port taken four times in a row");
    }

    /// On a given port (for a node that was told about it beforehand).
    pub fn start_on(port: u16, persistent: bool) -> Redis {
        let mut r = Redis::spawned(port, persistent);
        r.wait_up();
        r
    }

    fn spawned(port: u16, persistent: bool) -> Redis {
        let dir = tempdir();
        Redis {
            child: Self::spawn(port, dir.path(), persistent),
            port,
            dir,
            persistent,
        }
    }

    fn spawn(port: u16, dir: &Path, persistent: bool) -> Child {
        let mut cmd = Command::new("redis-server");
        cmd.args(redis_server_args(port, dir))
            .args(if persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "no"]
            })
            .stdin(Stdio::null());
        // Its own words, for a test that finds it did not start.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("redis.log"))
            .expect("redis log file");
        let err = log.try_clone().expect("redis log file");
        cmd.stdout(log).stderr(err);
        cmd.spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)")
    }

    fn wait_up(&mut self) {
        if let Err(log) = self.wait_ready() {
            panic!("redis-server did not start on {}:\n{log}", self.port);
        }
    }

    /// Until it answers PING, or its log if it exits or stays silent.
    fn wait_ready(&mut self) -> Result<(), String> {
        let port = self.port;
        let mut exited = false;
        let up = wait_until(Duration::from_secs(20), || {
            exited = matches!(self.child.try_wait(), Ok(Some(_)));
            exited || Redis::ping_port(port)
        });
        if up && !exited {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        Err(format!(
            "{} ({})",
            lines[lines.len().saturating_sub(20)..].join("\n"),
            if exited {
                "exited"
            } else {
                "no answer in 20 s"
            }
        ))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn ping_port(port: u16) -> bool {
        redis_cmd(port, &["PING"])
            .map(|r| r.starts_with("+PONG"))
            .unwrap_or(false)
    }

    /// Runs a command and returns the raw RESP reply.
    pub fn cmd(&self, args: &[&str]) -> String {
        redis_cmd(self.port, args).unwrap_or_default()
    }

    /// A session's request count as Redis holds it, read without counting
    /// a request (as a read through a node would); default key prefix.
    pub fn request_count(&self, id: &str) -> Option<u64> {
        self.cmd(&["HGET", &format!("edgenode:s:{id}"), "n"])
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
    }

    /// Waits until Redis holds `n` requests for the session: uses served
    /// from a node's near cache reach Redis within one flush interval.
    pub fn wait_request_count(&self, id: &str, n: u64) -> bool {
        wait_until(Duration::from_secs(3), || self.request_count(id) == Some(n))
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stop(&self) {
        signal(self.child.id(), libc::SIGSTOP);
    }

    pub fn cont(&self) {
        signal(self.child.id(), libc::SIGCONT);
    }

    /// Starts again on the same port and directory.
    pub fn restart(&mut self) {
        self.child = Self::spawn(self.port, self.dir.path(), self.persistent);
        self.wait_up();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.cont();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every test redis-server gets: a loopback port, no RDB snapshots, a
/// data directory of the test's own.
pub fn redis_server_args(port: u16, dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        &dir,
    ]
    .map(String::from)
    .to_vec()
}

/// A tiny RESP client (inline command encoding) for test assertions.
pub fn redis_cmd(port: u16, args: &[&str]) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1000))).ok();
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
    }
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

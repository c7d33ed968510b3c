//! The operator's cluster: three nodes on one Redis behind nginx or HAProxy,
//! with the shipped configs rendered from `deploy/` (addresses, run
//! directories and a throw-away self-signed certificate substituted, nothing
//! else). Nodes are killed, drained, stopped (SIGSTOP: a node that lost power
//! sends no RST) and restarted, Redis is killed and restarted, and clients
//! must not notice more than the configs promise. Browsers talk HTTPS to the
//! client-facing listener (through `curl`: the tests' ureq has no TLS);
//! application back ends use the internal listener with the bearer token.
//! Every process listens on 127.0.0.1 only.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The nodes' bearer token in the clusters that have one.
const TOKEN: &str = "lb-test-token-4f1c2a9e8b7d6c5e";

#[derive(Clone, Copy, PartialEq)]
enum Balancer {
    Nginx,
    Haproxy,
}

impl Balancer {
    fn name(self) -> &'static str {
        match self {
            Balancer::Nginx => "nginx",
            Balancer::Haproxy => "haproxy",
        }
    }
}

struct Lb {
    child: Child,
    kind: Balancer,
    /// The client-facing listener (TLS).
    https: String,
    /// Plain HTTP: redirects only.
    http: String,
    /// The application back ends' listener (management API, token).
    internal: String,
    status_url: String,
    /// The self-signed certificate the balancer serves; clients trust it.
    cacert: PathBuf,
    /// nginx's access.log, or HAProxy's stdout (its log).
    log: PathBuf,
}

impl Drop for Lb {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master then stops its workers (and they
        // flush the buffered access log). A SIGKILLed master leaves them
        // running, still listening on the test's port.
        signal(self.child.id(), libc::SIGTERM);
        let exited = wait_until(Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Lb {
    /// Back-end client for the internal listener, with the bearer token.
    fn internal_client(&self) -> Client {
        Client::new(self.internal.clone()).with_token(TOKEN)
    }

    /// A new browser on the client-facing HTTPS listener.
    fn browser(&self) -> Browser {
        Browser::new(self.https.clone(), Some(self.cacert.clone()))
    }

    /// One request to the client-facing HTTPS listener.
    fn https_request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        curl(
            &format!("{}{path}", self.https),
            Some(&self.cacert),
            method,
            headers,
            None,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", self.kind.name()))
    }

    /// HAProxy's view of nodeN (1-based): its health state from the stats CSV.
    fn haproxy_server_state(&self, n: usize) -> String {
        let csv = Client::new(format!("{};csv", self.status_url)).get("").text;
        let prefix = format!("edgenode,node{n},");
        csv.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.split(',').nth(17))
            .unwrap_or("")
            .to_string()
    }
}

fn render(template: &str, out: &Path, vars: &[(&str, String)]) {
    let mut cmd = Command::new("sh");
    cmd.arg(Path::new(REPO).join("deploy/render.sh"))
        .arg(Path::new(REPO).join("deploy").join(template))
        .arg(out);
    for (k, v) in vars {
        cmd.arg(format!("{k}={v}"));
    }
    let st = cmd.status().expect("run deploy/render.sh");
    assert!(st.success(), "render {template} failed");
}

/// A throw-away self-signed certificate for 127.0.0.1 in `dir`:
/// (certificate, key, both in one PEM for HAProxy).
fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (cert, key, pem) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("cert+key.pem"),
    );
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=edgenode-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl must be installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let both = std::fs::read_to_string(&cert).unwrap() + &std::fs::read_to_string(&key).unwrap();
    std::fs::write(&pem, both).unwrap();
    (cert, key, pem)
}

fn start_balancer(kind: Balancer, nodes: &[&Node], dir: &Path) -> Lb {
    let port = || format!("127.0.0.1:{}", free_port());
    let (https, http, internal, status) = (port(), port(), port(), port());
    let (cert, key, pem) = self_signed_cert(dir);
    let mut vars = vec![
        ("NODE1", nodes[0].addr.clone()),
        ("NODE2", nodes[1].addr.clone()),
        ("NODE3", nodes[2].addr.clone()),
        ("HTTPS_LISTEN", https.clone()),
        ("HTTP_LISTEN", http.clone()),
        ("INTERNAL_LISTEN", internal.clone()),
        ("RUNDIR", dir.display().to_string()),
    ];
    let (child, status_url, log) = match kind {
        Balancer::Nginx => {
            vars.push(("STATUS_LISTEN", status.clone()));
            vars.push(("LOGDIR", dir.display().to_string()));
            vars.push(("TLS_CERT", cert.display().to_string()));
            vars.push(("TLS_KEY", key.display().to_string()));
            let conf = dir.join("nginx.conf");
            render("nginx.conf", &conf, &vars);
            let prefix = format!("{}/", dir.display());
            let check = Command::new("nginx")
                .args(["-t", "-p", &prefix, "-c"])
                .arg(&conf)
                .output()
                .expect("nginx");
            assert!(
                check.status.success(),
                "nginx -t: {}",
                String::from_utf8_lossy(&check.stderr)
            );
            let child = Command::new("nginx")
                .args(["-p", &prefix, "-c"])
                .arg(&conf)
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nginx");
            (
                child,
                format!("http://{status}/nginx_status"),
                dir.join("access.log"),
            )
        }
        Balancer::Haproxy => {
            vars.push(("STATS_LISTEN", status.clone()));
            vars.push(("TLS_PEM", pem.display().to_string()));
            let conf = dir.join("haproxy.cfg");
            render("haproxy.cfg", &conf, &vars);
            let check = Command::new("haproxy")
                .arg("-c")
                .arg("-f")
                .arg(&conf)
                .output()
                .expect("haproxy");
            assert!(
                check.status.success(),
                "haproxy -c: {}",
                String::from_utf8_lossy(&check.stdout)
            );
            let log = dir.join("haproxy.log");
            let child = Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&conf)
                .stdout(std::fs::File::create(&log).expect("haproxy log"))
                .stderr(Stdio::null())
                .spawn()
                .expect("start haproxy");
            (child, format!("http://{status}/stats"), log)
        }
    };
    let lb = Lb {
        child,
        kind,
        https: format!("https://{https}"),
        http: format!("http://{http}"),
        internal: format!("http://{internal}"),
        status_url,
        cacert: cert,
        log,
    };
    let c = Client::new(lb.internal.clone());
    assert!(
        wait_until(Duration::from_secs(15), || c
            .try_request("GET", "/api/ready", &[], None)
            .map(|a| a.status == 200)
            .unwrap_or(false)),
        "balancer did not come up"
    );
    // HAProxy's checks must have seen every node up before the tests count
    // on where requests go.
    if kind == Balancer::Haproxy {
        for n in 1..=3 {
            assert!(
                wait_until(Duration::from_secs(10), || lb
                    .haproxy_server_state(n)
                    .starts_with("UP")),
                "haproxy: node{n} never UP"
            );
        }
    }
    lb
}

/// One answer as `curl` saw it.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// Lower-case names, in order (Set-Cookie may repeat).
    headers: Vec<(String, String)>,
    body: String,
    took: Duration,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A loopback address that accepts no connection and sends no RST, like a
/// host that lost power: a listener whose accept queue (one slot) is kept
/// full, so the kernel drops every further SYN. Lives as long as the value.
struct Blackhole {
    _listener: std::net::TcpListener,
    _filler: std::net::TcpStream,
}

impl Blackhole {
    fn on(addr: &str) -> Blackhole {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind(addr).expect("bind the dead node's port");
        // SAFETY: listen(2) on a socket we own; a backlog of 0 leaves room
        // for exactly one connection that is never accepted.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let filler = std::net::TcpStream::connect(addr).expect("fill the accept queue");
        Blackhole {
            _listener: listener,
            _filler: filler,
        }
    }
}

/// One request through `curl`, the tests' HTTPS client. Loopback URLs only;
/// `-q` skips any ~/.curlrc, `--noproxy '*'` any proxy in the environment,
/// `--path-as-is` sends `..` and `//` as written.
fn curl(
    url: &str,
    cacert: Option<&Path>,
    method: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<Reply, String> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-q",
        "-sS",
        "-g",
        "--path-as-is",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "-i",
        "-X",
        method,
    ]);
    if let Some(ca) = cacert {
        cmd.arg("--cacert").arg(ca);
    }
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    cmd.arg(url).stdin(Stdio::null());
    let started = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("run curl (scripts/test.sh installs it): {e}"))?;
    let took = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "curl {method} {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("curl {method} {url}: no status line in {raw:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_string(),
        took,
    })
}

fn cluster_node(redis: &Redis, name: &str) -> Node {
    Node::builder()
        .args([
            "--redis-url",
            &redis.url(),
            "--instance-id",
            name,
            "--trusted-proxies",
            "127.0.0.1",
            "--api-token",
            TOKEN,
        ])
        .args([
            "--drain-delay-ms",
            "2500",
            "--redis-probe-interval-ms",
            "100",
            "--redis-probe-max-ms",
            "500",
        ])
        .start()
}

/// The management API of one node, with the cluster's token.
fn mgmt(n: &Node) -> Client {
    n.client().with_token(TOKEN)
}

fn in_redis_mode(n: &Node) -> bool {
    let h = n.client().get("/api/health").json();
    h["store"]["active"] == "redis" && h["store"]["pending_sync"] == 0
}

/// Steady GET traffic through the balancer, kept under its per-client rate
/// limit, recording failures and the slowest answer.
struct Traffic {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    slowest_ms: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Traffic {
    fn start(lb: &Client, ids: &[String]) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (requests, failures, slowest_ms) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let threads = (0..2)
            .map(|t| {
                let (lb, ids) = (lb.clone(), ids.to_vec());
                let (stop, requests, failures, slowest_ms) = (
                    stop.clone(),
                    requests.clone(),
                    failures.clone(),
                    slowest_ms.clone(),
                );
                std::thread::spawn(move || {
                    let mut errors = Vec::new();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let res = lb.try_request(
                            "GET",
                            &format!("/api/sessions/{}", ids[i % ids.len()]),
                            &[],
                            None,
                        );
                        slowest_ms
                            .fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                        requests.fetch_add(1, Ordering::Relaxed);
                        match res {
                            Ok(a) if a.status == 200 => {}
                            Ok(a) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                if errors.len() < 5 {
                                    errors.push(format!("{} {}", a.status, a.text));
                                }
                            }
                            Err(e) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                if errors.len() < 5 {
                                    errors.push(e);
                                }
                            }
                        }
                        i += 2;
                        std::thread::sleep(Duration::from_millis(60));
                    }
                    errors
                })
            })
            .collect();
        Traffic {
            stop,
            requests,
            failures,
            slowest_ms,
            threads,
        }
    }

    /// Stops and returns (requests, failures, slowest ms, error samples).
    fn finish(self) -> (u64, u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.slowest_ms.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// Application back ends through the internal listener: the management API
/// balanced over the nodes, idempotent reads retried, creates never replayed.
fn cluster_story(kind: Balancer) {
    let name = kind.name();
    let mut redis = Redis::start(true);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| cluster_node(&redis, &format!("node{i}")))
        .collect();
    for n in &nodes {
        assert!(wait_until(Duration::from_secs(5), || in_redis_mode(n)));
    }
    let dir = tempdir();
    let lb = start_balancer(kind, &nodes.iter().collect::<Vec<_>>(), dir.path());
    let c = lb.internal_client();
    assert_eq!(
        Client::new(lb.status_url.clone()).get("").status,
        200,
        "status page on loopback"
    );

    // Sessions created through the balancer are served by every node.
    let ids: Vec<String> = (0..12)
        .map(|i| id_of(&c.create(&format!(r#"{{"user_id":"lb{i}"}}"#))))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        seen.insert(
            c.get("/api/health").json()["instance_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert!(
        seen.len() >= 2,
        "{name} spread requests over several nodes: {seen:?}"
    );
    for n in &nodes {
        assert_eq!(
            mgmt(n).get(&format!("/api/sessions/{}", ids[0])).status,
            200,
            "every node serves every session"
        );
    }
    // Request counts stay exact through the balancer.
    let counted = &ids[1];
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (c, path) = (c.clone(), format!("/api/sessions/{counted}"));
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| c.get(&path).status)
                    .filter(|&s| s == 200)
                    .count()
            })
        })
        .collect();
    let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(ok, 40);
    assert_eq!(
        mgmt(&nodes[2])
            .get(&format!("/api/sessions/{counted}"))
            .json()["request_count"],
        41
    );

    // kill -9 one node under steady reads: no GET fails.
    let traffic = Traffic::start(&c, &ids);
    std::thread::sleep(Duration::from_millis(500));
    nodes[0].kill9();
    std::thread::sleep(Duration::from_secs(3));
    let (requests, failures, slowest, errors) = traffic.finish();
    println!("{name}: kill -9 node1 under traffic: {requests} GETs, {failures} failed, slowest {slowest} ms");
    assert_eq!(failures, 0, "{name}: GETs failed after kill -9: {errors:?}");
    nodes[0].restart();

    // SIGTERM another: it drains, nothing fails, it restarts and rejoins.
    let traffic = Traffic::start(&c, &ids);
    std::thread::sleep(Duration::from_millis(500));
    let drain_started = Instant::now();
    let status = nodes[1].terminate();
    let drained_in = drain_started.elapsed();
    assert!(status.success(), "drained node exits 0");
    let rejoin_started = Instant::now();
    nodes[1].restart();
    // one probe request per 100 ms: the balancer's rate limit applies to us too
    let rejoined = wait_until(Duration::from_secs(15), || {
        std::thread::sleep(Duration::from_millis(100));
        c.get("/api/health").json()["instance_id"] == "node2"
    });
    let rejoined_in = rejoin_started.elapsed();
    let (requests, failures, slowest, errors) = traffic.finish();
    println!(
        "{name}: SIGTERM node2 under traffic: {requests} GETs, {failures} failed, slowest {slowest} ms, drained in {drained_in:?}, rejoined in {rejoined_in:?}"
    );
    assert_eq!(
        failures, 0,
        "{name}: requests failed during the drain: {errors:?}"
    );
    assert!(
        rejoined,
        "{name}: node2 never served again after its restart"
    );

    // Redis killed behind the cluster and restarted: the cluster keeps
    // answering, and afterwards all nodes agree on every session.
    let before: Vec<String> = ids.iter().take(6).cloned().collect();
    redis.kill9();
    let mut during = Vec::new();
    let mut outage_failures = 0;
    for i in 0..12 {
        match c.try_request(
            "POST",
            "/api/sessions",
            &[],
            Some(&format!(
                r#"{{"user_id":"outage{i}","metadata":{{"i":{i}}}}}"#
            )),
        ) {
            Ok(a) if a.status == 201 => during.push(id_of(&a.json())),
            _ => outage_failures += 1,
        }
    }
    // pre-outage sessions patched through the balancer, from the mirrors
    for id in &before {
        let a = c.patch(
            &format!("/api/sessions/{id}"),
            r#"{"metadata":{"outage_patch":true}}"#,
        );
        assert!(
            a.status == 200 || a.status == 404,
            "{name}: patch during outage answered {}",
            a.status
        );
    }
    assert_eq!(
        outage_failures, 0,
        "{name}: creates failed during the Redis outage"
    );
    redis.restart();
    for n in &nodes {
        assert!(
            wait_until(Duration::from_secs(15), || in_redis_mode(n)),
            "{name}: node did not reconcile"
        );
    }
    for id in before.iter().chain(during.iter()) {
        let views: Vec<Value> = nodes
            .iter()
            .map(|n| {
                let mut v = mgmt(n).get(&format!("/api/sessions/{id}")).json();
                let o = v.as_object_mut().unwrap();
                for volatile in ["request_count", "last_accessed", "expires_at"] {
                    o.remove(volatile);
                }
                v
            })
            .collect();
        assert!(
            views[0]["session_id"].is_string(),
            "{name}: session {id} lost"
        );
        assert!(
            views.iter().all(|v| *v == views[0]),
            "{name}: nodes disagree on {id}: {views:?}"
        );
    }
    println!("{name}: Redis outage: {} sessions created through the balancer, all nodes agree afterwards", during.len());

    // The access log names the management routes, never a session id.
    let log_path = lb.log.clone();
    drop(lb);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        log.contains("/api/sessions/:id"),
        "{name}: access log has the requests: {}",
        log.lines().take(5).collect::<Vec<_>>().join("\n")
    );
    for id in ids.iter().chain(during.iter()) {
        assert!(
            !log.contains(id.as_str()),
            "{name}: session id {id} in the access log"
        );
    }
    drop(nodes);
}

/// A browser: keeps every cookie it was given (the node's `session_id`, the
/// balancer's `edgenode_route`) and sends all of them back. Speaks HTTPS to
/// the balancer (trusting its test certificate) or plain HTTP to a node.
struct Browser {
    base: String,
    cacert: Option<PathBuf>,
    cookies: BTreeMap<String, String>,
}

/// One answer as a browser sees it: status, JSON body, raw Set-Cookie lines,
/// and how long it took.
struct Page {
    status: u16,
    body: Value,
    set_cookies: Vec<String>,
    took: Duration,
}

impl Browser {
    fn new(base: impl Into<String>, cacert: Option<PathBuf>) -> Browser {
        Browser {
            base: base.into(),
            cacert,
            cookies: BTreeMap::new(),
        }
    }

    fn try_get(&mut self, path: &str) -> Result<Page, String> {
        let jar = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let headers: Vec<(&str, &str)> = if jar.is_empty() {
            vec![]
        } else {
            vec![("Cookie", jar.as_str())]
        };
        let reply = curl(
            &format!("{}{path}", self.base),
            self.cacert.as_deref(),
            "GET",
            &headers,
            None,
        )?;
        let set_cookies: Vec<String> = reply
            .all("set-cookie")
            .into_iter()
            .map(String::from)
            .collect();
        for line in &set_cookies {
            let pair = line.split(';').next().unwrap_or("");
            if let Some((name, value)) = pair.split_once('=') {
                self.cookies
                    .insert(name.trim().to_string(), value.trim().to_string());
            }
        }
        Ok(Page {
            status: reply.status,
            body: reply.json(),
            set_cookies,
            took: reply.took,
        })
    }

    fn get(&mut self, path: &str) -> Page {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {}{path}: {e}", self.base))
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies.get(name).map(String::as_str)
    }

    /// The node named by the routing cookie, as an index into the nodes.
    fn routed_to(&self) -> usize {
        match self.cookie(ROUTE_COOKIE) {
            Some("node1") => 0,
            Some("node2") => 1,
            Some("node3") => 2,
            other => panic!("routing cookie names no node: {other:?}"),
        }
    }

    /// The Set-Cookie line for `name` in a page, if any.
    fn cookie_line<'p>(page: &'p Page, name: &str) -> Option<&'p str> {
        page.set_cookies
            .iter()
            .find(|l| l.starts_with(&format!("{name}=")))
            .map(String::as_str)
    }
}

const ROUTE_COOKIE: &str = "edgenode_route";

fn store_mode(n: &Node) -> String {
    n.client()
        .try_request("GET", "/api/health", &[], None)
        .map(|a| {
            a.json()["store"]["active"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

/// The routing cookie: with Redis down a browser stays on the node that holds
/// its session for as long as that node lives; with Redis up any node serves
/// it, and a draining or dead node hands the browser to another one.
fn route_cookie_story(kind: Balancer) {
    let name = kind.name();
    let started = Instant::now();
    let mut redis = Redis::start(true);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| cluster_node(&redis, &format!("node{i}")))
        .collect();
    for n in &nodes {
        assert!(wait_until(Duration::from_secs(5), || in_redis_mode(n)));
    }
    let dir = tempdir();
    let lb = start_balancer(kind, &nodes.iter().collect::<Vec<_>>(), dir.path());

    // Redis up: a session created through one node is served by every node.
    let mut direct = Browser::new(nodes[0].url(), None);
    let first = direct.get("/api/session");
    assert_eq!(first.status, 200);
    let shared = id_of(&first.body);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            mgmt(n).get(&format!("/api/sessions/{shared}")).json()["session_id"],
            shared.as_str(),
            "{name}: node{} serves a session created on node1",
            i + 1
        );
        direct.base = n.url();
        let page = direct.get("/api/session");
        assert_eq!(page.status, 200);
        assert_eq!(
            id_of(&page.body),
            shared,
            "{name}: node{} serves the browser's session",
            i + 1
        );
    }
    assert!(
        direct.cookie(ROUTE_COOKIE).is_none(),
        "the nodes themselves set no routing cookie"
    );

    // Redis down: every node falls back to its own disk.
    redis.kill9();
    for n in &nodes {
        assert!(
            wait_until(Duration::from_secs(10), || store_mode(n) == "sled"),
            "{name}: node did not fall back to sled"
        );
    }
    let outage_started = Instant::now();
    let mut browser = lb.browser();
    let page = browser.get("/api/session");
    assert_eq!(page.status, 200, "{name}: first visit: {:?}", page.body);
    let id = id_of(&page.body);
    assert_eq!(page.body["request_count"], 1);
    assert_eq!(browser.cookie("session_id"), Some(id.as_str()));
    let route = browser.cookie(ROUTE_COOKIE).map(String::from);
    for count in 2..=21 {
        let page = browser.get("/api/session");
        assert_eq!(
            page.status, 200,
            "{name}: visit {count} during the outage: {:?}",
            page.body
        );
        assert_eq!(
            id_of(&page.body),
            id,
            "{name}: visit {count} during the outage got another session"
        );
        assert_eq!(page.body["request_count"], count, "{name}: visit {count}");
        assert_eq!(
            browser.cookie(ROUTE_COOKIE),
            route.as_deref(),
            "{name}: routing cookie changed during the outage"
        );
    }
    let outage_took = outage_started.elapsed();
    let route = route.unwrap_or_else(|| panic!("{name}: no routing cookie"));
    let route_line = page
        .set_cookies
        .iter()
        .find(|l| l.starts_with(ROUTE_COOKIE))
        .unwrap();
    assert!(
        route_line.to_ascii_lowercase().contains("httponly"),
        "{name}: routing cookie is HttpOnly: {route_line}"
    );
    assert!(
        route_line.to_ascii_lowercase().contains("; secure"),
        "{name}: routing cookie is Secure: {route_line}"
    );
    let home = browser.routed_to();

    // Redis back: the outage session reaches Redis, and then any node serves
    // it. The browser's node drains (SIGTERM): the browser moves to another
    // node without a failed request; that node is killed: it moves again.
    redis.restart();
    for n in &nodes {
        assert!(
            wait_until(Duration::from_secs(15), || in_redis_mode(n)),
            "{name}: node did not reconcile"
        );
    }
    let mut count = 21;
    let mut visit = |browser: &mut Browser, what: &str| {
        count += 1;
        let page = browser.get("/api/session");
        assert_eq!(page.status, 200, "{name}: {what}: {:?}", page.body);
        assert_eq!(id_of(&page.body), id, "{name}: {what}: another session");
        assert_eq!(page.body["request_count"], count, "{name}: {what}");
    };
    let drain_started = Instant::now();
    signal(nodes[home].pid(), libc::SIGTERM);
    // one visit per 50 ms, under the balancer's rate limit
    let moved = wait_until(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(50));
        visit(&mut browser, "visit while its node drains");
        browser.routed_to() != home
    });
    assert!(moved, "{name}: browser still routed to its draining node");
    let drain_moved_in = drain_started.elapsed();
    let second = browser.routed_to();
    nodes[second].kill9();
    visit(&mut browser, "first visit after its node died");
    let third = browser.routed_to();
    assert!(
        third != second && third != home,
        "{name}: routed to node{} after node{} drained and node{} died",
        third + 1,
        home + 1,
        second + 1
    );
    visit(&mut browser, "second visit after its node died");
    assert_eq!(browser.routed_to(), third);

    // A routing cookie that names no node is ignored and replaced.
    let mut stranger = lb.browser();
    stranger.cookies.insert(ROUTE_COOKIE.into(), "node9".into());
    assert_eq!(stranger.get("/api/session").status, 200);
    assert_eq!(stranger.routed_to(), third, "{name}: the only live node");

    println!(
        "{name}: routing cookie: 21 visits on {route} during the Redis outage in {outage_took:?}; after Redis returned, moved off draining node{} in {drain_moved_in:?} ({count} visits in all, none failed), off killed node{} at once; whole story {:?}",
        home + 1,
        second + 1,
        started.elapsed()
    );
    drop(lb);
    drop(nodes);
}

/// `sessions.active` of one node (sled-only nodes: exactly its own sessions).
fn active_sessions(n: &Node) -> u64 {
    n.client().get("/api/health").json()["sessions"]["active"]
        .as_u64()
        .expect("sessions.active")
}

/// What the client-facing listener exposes, and GET /api/session without a
/// session id never created twice. Three sled-only nodes WITHOUT a token on
/// loopback (where a node allows that), so only the balancer stands between
/// a client and the management API; each node holds its own sessions, so
/// every create is counted on the node that made it.
fn public_listener_story(kind: Balancer) {
    let name = kind.name();
    let started = Instant::now();
    let nodes: Vec<Node> = (1..=3)
        .map(|i| {
            Node::builder()
                .args(["--instance-id", &format!("node{i}"), "--cookie-secure"])
                .start()
        })
        .collect();
    let dir = tempdir();
    let lb = start_balancer(kind, &nodes.iter().collect::<Vec<_>>(), dir.path());

    // Alice has a session on every node, and every node lists it to a
    // caller on loopback: the data is there to be taken.
    let alice: Vec<String> = nodes
        .iter()
        .map(|n| id_of(&n.client().create(r#"{"user_id":"alice"}"#)))
        .collect();
    for (n, id) in nodes.iter().zip(&alice) {
        assert!(
            n.client()
                .get("/api/users/alice/sessions")
                .text
                .contains(id.as_str()),
            "control: the node itself lists alice's session"
        );
    }

    // (a) The takeover attempt through the HTTPS listener: every management
    // route, /api/health and /metrics get the balancer's own 404 JSON, in
    // every spelling of the path, and nothing reaches a node.
    let a0 = alice[0].as_str();
    let attempts: Vec<(&str, String)> = vec![
        ("GET", "/api/users/alice/sessions".into()),
        ("GET", "/api/users/alice/sessions?cursor=0".into()),
        ("DELETE", "/api/users/alice/sessions".into()),
        ("GET", format!("/api/sessions/{a0}")),
        ("DELETE", format!("/api/sessions/{a0}")),
        ("POST", format!("/api/sessions/{a0}/rotate")),
        ("POST", "/api/sessions".into()),
        ("GET", "/api/cache/stats".into()),
        ("GET", "/api/health".into()),
        ("GET", "/metrics".into()),
        ("GET", "/api//users/alice/sessions".into()),
        ("GET", "/api/session/../users/alice/sessions".into()),
        ("GET", "/api/session/../../api/users/alice/sessions".into()),
        ("GET", "/api/%75sers/alice/sessions".into()),
        ("GET", "/api/users/alice/sessions/".into()),
        ("GET", "/.edgenode/session-create".into()),
        ("GET", "/".into()),
    ];
    for (method, path) in &attempts {
        let r = lb.https_request(method, path, &[]);
        assert!(
            r.status == 404 || r.status == 403,
            "{name}: {method} {path} through the HTTPS listener answered {}: {}",
            r.status,
            r.body
        );
        assert_eq!(r.code(), "not_found", "{name}: {method} {path}: {}", r.body);
        for id in &alice {
            assert!(
                !r.body.contains(id.as_str()),
                "{name}: {method} {path} leaked {id}"
            );
        }
    }
    // Plain HTTP only redirects, whatever the path.
    for path in ["/api/users/alice/sessions", "/api/session", "/metrics"] {
        let r = curl(&format!("{}{path}", lb.http), None, "GET", &[], None).unwrap();
        assert_eq!(r.status, 301, "{name}: http {path}: {}", r.body);
        let to = r.all("location").first().copied().unwrap_or("");
        assert!(
            to.starts_with("https://") && to.ends_with(path),
            "{name}: http {path} redirects to {to}"
        );
        assert!(
            r.all("set-cookie").is_empty(),
            "{name}: http {path} set a cookie"
        );
    }
    // Nothing was created, deleted or rotated: still one session per node,
    // alice's, untouched.
    for (n, id) in nodes.iter().zip(&alice) {
        assert_eq!(
            active_sessions(n),
            1,
            "{name}: a session appeared or vanished"
        );
        let s = n.client().get(&format!("/api/sessions/{id}"));
        assert_eq!(s.status, 200, "{name}: alice's session {id}: {}", s.text);
    }

    // The browser route works over HTTPS; both cookies are Secure (the
    // node's because it has cookie_secure).
    let mut browser = lb.browser();
    let first = browser.get("/api/session");
    assert_eq!(first.status, 200, "{name}: {:?}", first.body);
    let sid = id_of(&first.body);
    let session_line = Browser::cookie_line(&first, "session_id").expect("session cookie");
    let route_line = Browser::cookie_line(&first, ROUTE_COOKIE).expect("routing cookie");
    for line in [session_line, route_line] {
        assert!(
            line.contains("; Secure") && line.contains("HttpOnly"),
            "{name}: cookie not Secure/HttpOnly: {line}"
        );
    }
    let again = browser.get("/api/session?from=test");
    assert_eq!(
        id_of(&again.body),
        sid,
        "{name}: the cookie finds the session"
    );
    assert_eq!(again.body["request_count"], 2);
    // (each sled-only node knows only its own sessions: the routing cookie
    // takes the header to the node that made it)
    let route = format!("{ROUTE_COOKIE}={}", browser.cookie(ROUTE_COOKIE).unwrap());
    let by_header = lb.https_request(
        "GET",
        "/api/session",
        &[("X-Session-ID", &sid), ("Cookie", &route)],
    );
    assert_eq!(by_header.status, 200);
    assert_eq!(
        id_of(&by_header.json()),
        sid,
        "{name}: X-Session-ID finds it"
    );
    let ready = lb.https_request("GET", "/api/ready", &[]);
    assert_eq!(ready.status, 200, "{name}: readiness is public");

    // (b) The retry rule: a new browser (no session id) whose request reaches
    // a node that then never answers (SIGSTOP: the kernel still accepts the
    // connection and takes the request). Its routing cookie names that node,
    // so the request goes there first. The balancer must give up after
    // about 2 s and NOT replay it on another node. Evidence, all of it
    // deterministic: no live node made a session while the node was
    // stopped, the balancer's own log shows one attempt on the stopped node
    // and nothing else, and at most one session exists afterwards. Whether
    // the stopped node, once it runs again, still reads the request and
    // makes that one session depends on how the balancer closed the
    // connection it gave up on and on when the node notices (measured: 0 or
    // 1 after nginx, 0 after HAProxy), so that count is reported, not
    // required.
    let before: Vec<u64> = nodes.iter().map(active_sessions).collect();
    let victim = 0;
    signal(nodes[victim].pid(), libc::SIGSTOP);
    let stalled = lb.https_request(
        "GET",
        "/api/session",
        &[("Cookie", &format!("{ROUTE_COOKIE}=node{}", victim + 1))],
    );
    let live = |counts: &[u64]| -> Vec<u64> {
        counts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, v)| *v)
            .collect()
    };
    let live_after: Vec<u64> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| active_sessions(n))
        .collect();
    signal(nodes[victim].pid(), libc::SIGCONT);
    assert!(
        stalled.took <= Duration::from_millis(2500),
        "{name}: a create on a stopped node held the client {:?}",
        stalled.took
    );
    assert!(
        stalled.took >= Duration::from_millis(1500),
        "{name}: answered in {:?}: the request did not wait on the stopped node",
        stalled.took
    );
    assert_eq!(
        stalled.status, 504,
        "{name}: a create that got no answer is not replayed: {}",
        stalled.body
    );
    assert_eq!(stalled.code(), "gateway_timeout");
    assert_eq!(
        live_after,
        live(&before),
        "{name}: the create was replayed on a live node"
    );
    assert!(nodes[victim].wait_ready(Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<u64> = nodes.iter().map(active_sessions).collect();
    let created: u64 = after.iter().sum::<u64>() - before.iter().sum::<u64>();
    assert!(
        created <= 1 && live(&after) == live(&before),
        "{name}: one cookieless request made {created} sessions (per node before {before:?}, after {after:?})"
    );

    // No session id in the access log: not from the cookie, the header, the
    // query string, nor the management paths that were tried. And the
    // stalled create appears once, tried on the stopped node only.
    let log_path = lb.log.clone();
    drop(lb);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        log.contains("/api/session"),
        "{name}: access log is written"
    );
    for id in alice.iter().chain([&sid]) {
        assert!(
            !log.contains(id.as_str()),
            "{name}: session id {id} in the access log"
        );
    }
    let stalled_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" 504 ") && l.contains("/api/session"))
        .collect();
    assert_eq!(stalled_lines.len(), 1, "{name}: {stalled_lines:?}");
    let line = stalled_lines[0];
    let one_attempt = match kind {
        // upstream= lists every node tried
        Balancer::Nginx => line.contains(&format!("upstream={} ", nodes[victim].addr)),
        // backend/server, and the retries count (last of ac/fc/bc/sc/rc)
        Balancer::Haproxy => {
            line.contains(&format!("edgenode/node{} ", victim + 1))
                && line
                    .split_whitespace()
                    .any(|f| f.matches('/').count() == 4 && f.ends_with("/0"))
        }
    };
    assert!(
        one_attempt,
        "{name}: the create was tried on the stopped node only, once: {line}"
    );
    println!(
        "{name}: public listener: {} management/other requests refused with 404, http redirects; create on a stopped node answered {} in {:?}, tried once, {created} session made (by the stopped node after it resumed); story {:?}",
        attempts.len(),
        stalled.status,
        stalled.took,
        started.elapsed()
    );
    drop(nodes);
}

/// A node that stops answering mid-request (SIGSTOP: connections are still
/// accepted, nothing comes back, no RST — as when a Pi loses power while a
/// request is in flight): a browser with a session waits about 2 s and gets
/// its session from another node; later requests avoid the node. Then a
/// node whose address goes silent (no SYN-ACK, no RST): about 1 s.
fn dead_node_story(kind: Balancer) {
    let name = kind.name();
    let redis = Redis::start(false);
    let nodes: Vec<Node> = (1..=3)
        .map(|i| cluster_node(&redis, &format!("node{i}")))
        .collect();
    for n in &nodes {
        assert!(wait_until(Duration::from_secs(5), || in_redis_mode(n)));
    }
    let dir = tempdir();
    let lb = start_balancer(kind, &nodes.iter().collect::<Vec<_>>(), dir.path());

    let mut browser = lb.browser();
    let first = browser.get("/api/session");
    assert_eq!(first.status, 200, "{name}: {:?}", first.body);
    let id = id_of(&first.body);
    let home = browser.routed_to();
    // A second browser with a session, routed to the same node.
    let mut other = lb.browser();
    let other_id = id_of(&other.get("/api/session").body);

    signal(nodes[home].pid(), libc::SIGSTOP);
    let stopped_at = Instant::now();
    let page = browser.get("/api/session");
    assert_eq!(
        page.status, 200,
        "{name}: a read with a session is retried on another node: {:?}",
        page.body
    );
    assert_eq!(
        id_of(&page.body),
        id,
        "{name}: same session from another node"
    );
    assert_eq!(page.body["request_count"], 2);
    assert!(
        page.took <= Duration::from_millis(2500),
        "{name}: the stopped node held the client {:?}",
        page.took
    );
    assert_ne!(
        browser.routed_to(),
        home,
        "{name}: routed to a live node now"
    );

    // Later requests avoid it: nginx marked it failed after that one timeout
    // (max_fails=1, shared by the workers); HAProxy once its checks see it
    // DOWN (2 failed checks).
    if kind == Balancer::Haproxy {
        assert!(
            wait_until(Duration::from_secs(6), || lb
                .haproxy_server_state(home + 1)
                .starts_with("DOWN")),
            "{name}: the stopped node never went DOWN"
        );
    }
    let noticed = stopped_at.elapsed();
    let mut slowest = Duration::ZERO;
    for visit in 0..6 {
        // routing cookie still naming the stopped node
        other
            .cookies
            .insert(ROUTE_COOKIE.into(), format!("node{}", home + 1));
        let p = other.get("/api/session");
        assert_eq!(p.status, 200, "{name}: later visit {visit}: {:?}", p.body);
        assert_eq!(id_of(&p.body), other_id);
        slowest = slowest.max(p.took);
        assert!(
            p.took < Duration::from_millis(500),
            "{name}: later visit {visit} took {:?}",
            p.took
        );
    }
    signal(nodes[home].pid(), libc::SIGCONT);
    // The stopped node, running again, answers the read it was holding into
    // a closed connection: that read may be counted twice (the cost of
    // retrying a read, see deploy/README.md).
    let counted = wait_until(Duration::from_secs(3), || {
        mgmt(&nodes[0]).get(&format!("/api/sessions/{id}")).json()["request_count"] == 3
    });

    // Power cut: another node dies and its address stops answering SYNs
    // (kill -9, then a listener on its port whose one-slot accept queue is
    // kept full: the kernel drops every new SYN, no RST). A connection to it
    // is given up after 1 s and, since nothing was sent, retried elsewhere —
    // except by nginx for a create without a session id (it files the
    // connect timeout under "timeout", which that location does not retry):
    // 504 after 1 s there.
    let cut = (home + 1) % 3;
    let mut nodes = nodes;
    nodes[cut].kill9();
    let _dead_address = Blackhole::on(&nodes[cut].addr);
    let mut newcomer = lb.browser();
    newcomer
        .cookies
        .insert(ROUTE_COOKIE.into(), format!("node{}", cut + 1));
    let create = newcomer.get("/api/session");
    assert!(
        create.took <= Duration::from_millis(1500),
        "{name}: a create to a node whose address went silent took {:?}",
        create.took
    );
    match kind {
        Balancer::Haproxy => assert_eq!(create.status, 200, "{name}: {:?}", create.body),
        Balancer::Nginx => assert!(
            create.status == 200 || create.status == 504,
            "{name}: {:?}",
            create.body
        ),
    }
    let mut cut_browser = lb.browser();
    let cut_id = id_of(&cut_browser.get("/api/session").body);
    cut_browser
        .cookies
        .insert(ROUTE_COOKIE.into(), format!("node{}", cut + 1));
    let read = cut_browser.get("/api/session");
    assert_eq!(read.status, 200, "{name}: {:?}", read.body);
    assert_eq!(id_of(&read.body), cut_id);
    assert!(
        read.took <= Duration::from_millis(1500),
        "{name}: a read routed to a silent address took {:?}",
        read.took
    );
    println!(
        "{name}: node{} stopped: the next visit got its session in {:?}; balancer avoided the node after {noticed:?}, 6 later visits slowest {slowest:?}; held read counted again after SIGCONT: {counted}; node{} silent (no SYN-ACK): a create answered {} in {:?}, a read 200 in {:?}",
        home + 1,
        page.took,
        cut + 1,
        create.status,
        create.took,
        read.took
    );
    drop(lb);
    drop(nodes);
}

#[test]
fn nginx_public_listener_refuses_management_and_never_replays_a_create() {
    public_listener_story(Balancer::Nginx);
}

#[test]
fn haproxy_public_listener_refuses_management_and_never_replays_a_create() {
    public_listener_story(Balancer::Haproxy);
}

#[test]
fn nginx_stopped_node_costs_a_browser_at_most_2_5_s() {
    dead_node_story(Balancer::Nginx);
}

#[test]
fn haproxy_stopped_node_costs_a_browser_at_most_2_5_s() {
    dead_node_story(Balancer::Haproxy);
}

#[test]
fn nginx_route_cookie_keeps_a_browser_on_its_node_during_a_redis_outage() {
    route_cookie_story(Balancer::Nginx);
}

#[test]
fn haproxy_route_cookie_keeps_a_browser_on_its_node_during_a_redis_outage() {
    route_cookie_story(Balancer::Haproxy);
}

#[test]
fn nginx_cluster_survives_node_loss_drains_and_a_redis_outage() {
    cluster_story(Balancer::Nginx);
}

#[test]
fn haproxy_cluster_survives_node_loss_drains_and_a_redis_outage() {
    cluster_story(Balancer::Haproxy);
}

#[test]
fn install_script_installs_and_uninstalls_into_a_root() {
    let root = tempdir();
    let pkg = tempdir();
    let p = pkg.path();
    std::fs::copy(BIN, p.join("edgenode")).unwrap();
    std::fs::create_dir_all(p.join("systemd")).unwrap();
    for f in ["edgenode.service", "edgenode.socket"] {
        std::fs::copy(
            Path::new(REPO).join("systemd").join(f),
            p.join("systemd").join(f),
        )
        .unwrap();
    }
    std::fs::copy(
        Path::new(REPO).join("deploy/edgenode.toml.example"),
        p.join("edgenode.toml.example"),
    )
    .unwrap();
    std::fs::copy(
        Path::new(REPO).join("deploy/install.sh"),
        p.join("install.sh"),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("sh")
            .arg(p.join("install.sh"))
            .args(args)
            .arg("--root")
            .arg(root.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install.sh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let r = |rel: &str| -> PathBuf { root.path().join(rel) };
    run(&[]);
    assert!(r("usr/local/bin/edgenode").exists());
    assert!(r("etc/systemd/system/edgenode.service").exists());
    assert!(r("etc/edgenode/edgenode.toml").exists());
    // idempotent, and an operator's config is never overwritten
    std::fs::write(
        r("etc/edgenode/edgenode.toml"),
        "listen = \"127.0.0.1:9999\"\n",
    )
    .unwrap();
    run(&[]);
    assert_eq!(
        std::fs::read_to_string(r("etc/edgenode/edgenode.toml")).unwrap(),
        "listen = \"127.0.0.1:9999\"\n"
    );
    run(&["--uninstall"]);
    assert!(!r("usr/local/bin/edgenode").exists());
    assert!(!r("etc/systemd/system/edgenode.service").exists());
    assert!(
        r("etc/edgenode/edgenode.toml").exists(),
        "uninstall keeps the config"
    );
}

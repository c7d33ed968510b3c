//! TLS to Redis on real processes: a redis-server (and a redis-sentinel)
//! listening with TLS only on the port the node is given, certificates made
//! by `openssl` for the test. The node speaks `rediss://` with a client
//! certificate (Redis's default `tls-auth-clients yes`), its near cache's
//! tracking connection and the shared cache included; it fails over to disk
//! and back when that Redis is killed; a certificate from another CA is a
//! configuration error that health names. Through a TLS sentinel it finds
//! the master, and follows a failover to the replica under traffic.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A CA and the certificates it signed, in PEM files.
struct Pki {
    ca: PathBuf,
    /// Another CA: the node given this one must refuse Redis.
    other_ca: PathBuf,
    /// Redis's certificate (for 127.0.0.1 and localhost), also used by
    /// Sentinel and as the client certificate Sentinel shows the master.
    server: (PathBuf, PathBuf),
    /// The node's client certificate.
    client: (PathBuf, PathBuf),
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let p = |n: &str| dir.join(n).display().to_string();
        let ca = |name: &str| {
            openssl(&[
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
                &format!("/CN={name}"),
                "-keyout",
                &p(&format!("{name}.key")),
                "-out",
                &p(&format!("{name}.pem")),
            ]);
        };
        ca("test-ca");
        ca("other-ca");
        let leaf = |name: &str| {
            let ext = p(&format!("{name}.ext"));
            std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
            openssl(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &p(&format!("{name}.key")),
                "-out",
                &p(&format!("{name}.csr")),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &p(&format!("{name}.csr")),
                "-CA",
                &p("test-ca.pem"),
                "-CAkey",
                &p("test-ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &p(&format!("{name}.pem")),
            ]);
            (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
            )
        };
        Pki {
            ca: dir.join("test-ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            server: leaf("redis"),
            client: leaf("node"),
        }
    }

    /// The TLS arguments of a redis-server or redis-sentinel.
    fn server_args(&self) -> Vec<String> {
        [
            "--tls-cert-file",
            &self.server.0.display().to_string(),
            "--tls-key-file",
            &self.server.1.display().to_string(),
            "--tls-ca-cert-file",
            &self.ca.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// The node's TLS settings, trusting `ca`.
    fn node_args(&self, ca: &Path) -> Vec<String> {
        [
            "--redis-ca-file",
            &ca.display().to_string(),
            "--redis-cert-file",
            &self.client.0.display().to_string(),
            "--redis-key-file",
            &self.client.1.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    }
}

/// A redis-server with TLS on `tls_port` and, for the test's own
/// assertions only, plain text on `port` (the node is never told it).
struct TlsRedis {
    child: Child,
    port: u16,
    tls_port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl TlsRedis {
    fn start(pki: &Pki) -> TlsRedis {
        TlsRedis::start_with(pki, &[])
    }

    /// With more arguments after the TLS ones (a replica's `--replicaof`).
    fn start_with(pki: &Pki, extra: &[&str]) -> TlsRedis {
        let dir = tempdir();
        let (port, tls_port) = (free_port(), free_port());
        let mut args = redis_server_args(port, dir.path());
        args.extend(["--tls-port".to_string(), tls_port.to_string()]);
        args.extend(pki.server_args());
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut r = TlsRedis {
            child: spawn_redis(&args),
            port,
            tls_port,
            dir,
            args,
        };
        r.wait_up();
        r
    }

    fn wait_up(&mut self) {
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(10), || Redis::ping_port(port)),
            "redis-server did not start"
        );
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls_port)
    }

    fn cmd(&self, args: &[&str]) -> String {
        redis_cmd(self.port, args).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.child = spawn_redis(&self.args);
        self.wait_up();
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        self.kill9();
        let _ = &self.dir;
    }
}

fn spawn_redis(args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/test.sh installs it)")
}

/// A redis-sentinel monitoring `mymaster` over TLS: TLS on `tls_port` (the
/// node's), plain text on `port` (the test's assertions). Killed on drop.
struct TlsSentinel {
    child: Child,
    port: u16,
    tls_port: u16,
    dir: PathBuf,
}

impl TlsSentinel {
    /// Started and polled until it names the master on `master_tls_port`;
    /// `extra` is more configuration (`sentinel down-after-milliseconds …`).
    fn start(pki: &Pki, dir: &Path, master_tls_port: u16, extra: &str) -> TlsSentinel {
        let (port, tls_port) = (free_port(), free_port());
        let conf = dir.join("sentinel.conf");
        let (cert, key) = (&pki.server.0, &pki.server.1);
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ntls-port {tls_port}\ntls-cert-file {c}\n\
                 tls-key-file {k}\ntls-ca-cert-file {ca}\ntls-replication yes\ndir {d}\n\
                 logfile {d}/sentinel.log\nsentinel monitor mymaster 127.0.0.1 {master_tls_port} 1\n\
                 {extra}",
                c = cert.display(),
                k = key.display(),
                ca = pki.ca.display(),
                d = dir.display(),
            ),
        )
        .unwrap();
        let child = Command::new("redis-sentinel")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .or_else(|_| {
                Command::new("redis-server")
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
            })
            .expect("redis-sentinel");
        let sentinel = TlsSentinel {
            child,
            port,
            tls_port,
            dir: dir.to_path_buf(),
        };
        assert!(
            wait_until(Duration::from_secs(10), || sentinel
                .master()
                .contains(&master_tls_port.to_string())),
            "sentinel never knew the master: {}",
            sentinel.log()
        );
        sentinel
    }

    /// The node's URL: the sentinel over TLS, the master named.
    fn url(&self) -> String {
        format!("rediss+sentinel://127.0.0.1:{}/mymaster", self.tls_port)
    }

    /// `SENTINEL get-master-addr-by-name mymaster`, the raw reply.
    fn master(&self) -> String {
        redis_cmd(
            self.port,
            &["SENTINEL", "get-master-addr-by-name", "mymaster"],
        )
        .unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for TlsSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(url: &str, tls: Vec<String>) -> Node {
    Node::builder()
        // A connection's TLS handshake counts against the store timeout;
        // this debug build's ring is unoptimised and the box is shared, so
        // allow a second (measured failing at 250 ms under a parallel build).
        .args(["--redis-url", url, "--store-timeout-ms", "1000"])
        .args([
            "--redis-probe-interval-ms",
            "100",
            "--redis-probe-max-ms",
            "500",
        ])
        .args(tls)
        .start()
}

fn health(c: &Client) -> Value {
    c.get("/api/health").json()
}

/// On Redis with nothing to replay, its near cache up, its shared cache
/// subscribed.
/// Waits (10 s at most) for the node to serve from Redis; else fails with
/// `what`, its health and its log.
fn wait_on_redis(n: &Node, what: &str) {
    let c = n.client();
    assert!(
        wait_until(Duration::from_secs(10), || on_redis(&c)),
        "{what}: {}\n{}",
        health(&c),
        n.log_text()
    );
}

fn on_redis(c: &Client) -> bool {
    let h = health(c);
    h["store"]["active"] == "redis"
        && h["store"]["pending_sync"] == 0
        && h["store"]["near_cache"]["up"] == true
        && h["cache"]["redis_reachable"] == true
        && h["cache"]["subscribed"] == true
}

#[test]
fn sessions_near_cache_and_shared_cache_go_over_tls_and_fail_over_and_back() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let mut redis = TlsRedis::start(&pki);
    let n = node(&redis.url(), pki.node_args(&pki.ca));
    let c = n.client();
    wait_on_redis(&n, "node never came up on Redis over TLS");

    // A session in Redis, served twice from the near cache after its fill.
    let id = id_of(&c.create(r#"{"user_id":"tls","metadata":{"a":1}}"#));
    assert!(redis
        .cmd(&["EXISTS", &format!("edgenode:s:{id}")])
        .starts_with(":1"));
    let hits = health(&c)["store"]["near_cache"]["hits"]
        .as_u64()
        .unwrap_or(0);
    for _ in 0..3 {
        assert_eq!(c.get(&format!("/api/sessions/{id}")).status, 200);
    }
    assert!(
        health(&c)["store"]["near_cache"]["hits"]
            .as_u64()
            .unwrap_or(0)
            > hits,
        "reads came from the near cache: {}",
        health(&c)
    );
    // The shared cache's Redis tier, over the same TLS link.
    let put = c.request(
        "PUT",
        "/api/cache/tls/k",
        &[("Content-Type", "text/plain")],
        Some("v"),
    );
    assert!(put.status / 100 == 2, "{} {}", put.status, put.text);
    assert!(
        redis.cmd(&["KEYS", "edgenode:c*"]).contains("tls"),
        "cache value stored in Redis: {}",
        redis.cmd(&["KEYS", "*"])
    );

    // Redis dies: the node serves from its disk; back: the journal replays.
    redis.kill9();
    let during = id_of(&c.create(r#"{"metadata":{"when":"during"}}"#));
    assert_eq!(c.get(&format!("/api/sessions/{id}")).status, 200);
    assert_ne!(health(&c)["store"]["active"], "redis");
    redis.restart();
    assert!(
        wait_until(Duration::from_secs(15), || on_redis(&c)),
        "node did not return to Redis over TLS: {}",
        health(&c)
    );
    assert!(
        redis
            .cmd(&["EXISTS", &format!("edgenode:s:{during}")])
            .starts_with(":1"),
        "the session made during the outage was replayed into Redis"
    );
    assert_eq!(c.get(&format!("/api/sessions/{during}")).status, 200);
    assert_eq!(health(&c)["store"]["redis_config_error"], false);
}

#[test]
fn a_redis_certificate_from_another_ca_is_a_configuration_error_named_in_health() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let redis = TlsRedis::start(&pki);
    let n = node(&redis.url(), pki.node_args(&pki.other_ca));
    let c = n.client();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let h = health(&c);
            h["store"]["redis_config_error"] == true
                && h["status"] == "degraded"
                && h["degraded_reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("certificate")
        }),
        "health names the refused certificate: {}\n{}",
        health(&c),
        n.log_text()
    );
    // The node serves, from its disk; nothing reached that Redis.
    let id = id_of(&c.create("{}"));
    assert_eq!(c.get(&format!("/api/sessions/{id}")).status, 200);
    assert_ne!(health(&c)["store"]["active"], "redis");
    assert!(
        redis.cmd(&["DBSIZE"]).starts_with(":0"),
        "{}",
        redis.cmd(&["DBSIZE"])
    );
}

#[test]
fn an_insecure_url_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgenode"))
        .args([
            "--config",
            "/dev/null",
            "--redis-url",
            "rediss://127.0.0.1:1/#insecure",
        ])
        .output()
        .expect("run edgenode");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("#insecure is not supported"), "{err}");
}

#[test]
fn a_tls_sentinel_hands_out_a_tls_master() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let redis = TlsRedis::start(&pki);
    let sentinel = TlsSentinel::start(&pki, dir.path(), redis.tls_port, "");
    let n = node(&sentinel.url(), pki.node_args(&pki.ca));
    let c = n.client();
    wait_on_redis(&n, "node never came up through the TLS sentinel");
    let id = id_of(&c.create("{}"));
    assert!(redis
        .cmd(&["EXISTS", &format!("edgenode:s:{id}")])
        .starts_with(":1"));
}

/// Seconds from `from` to `to`, negative when `to` is earlier.
fn secs_from(from: Instant, to: Instant) -> f64 {
    if to >= from {
        to.duration_since(from).as_secs_f64()
    } else {
        -from.duration_since(to).as_secs_f64()
    }
}

/// What one request of the failover's traffic got: its status, or the
/// transport error; when it was sent.
struct Sent {
    at: Instant,
    what: Result<u16, String>,
}

/// Sentinel failover with every link on TLS and the test's CA: a master, a
/// replica replicating from it over TLS (`tls-replication`, so it announces
/// its TLS port), and a sentinel speaking TLS to both and to the node. The
/// master is killed while a client creates and reads sessions; Sentinel
/// promotes the replica and the node follows it.
///
/// Asserted: the session made before is read back afterwards and is on the
/// new master; writes after the switch succeed and land on the new master;
/// every session the traffic was told was created (201) is readable and on
/// the new master once the node is back on Redis (`store.active` "redis",
/// nothing pending); every request was answered (no transport error); the
/// only 5xx allowed is 503, and only between the kill and the moment the
/// node was seen back on Redis (none is expected: the node serves from its
/// disk meanwhile, and the count is printed).
#[test]
fn a_sentinel_failover_over_tls_is_followed_under_traffic() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let mut master = TlsRedis::start(&pki);
    let master_tls = master.tls_port.to_string();
    let replica = TlsRedis::start_with(
        &pki,
        &[
            "--replicaof",
            "127.0.0.1",
            &master_tls,
            "--tls-replication",
            "yes",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || replica
            .cmd(&["INFO", "replication"])
            .contains("master_link_status:up")),
        "the replica never synced over TLS: {}",
        replica.cmd(&["INFO", "replication"])
    );
    let sentinel = TlsSentinel::start(
        &pki,
        dir.path(),
        master.tls_port,
        "sentinel down-after-milliseconds mymaster 500\nsentinel failover-timeout mymaster 3000\n",
    );
    // The replica must be known, by its TLS port, before the master dies.
    let replica_tls = replica.tls_port.to_string();
    assert!(
        wait_until(Duration::from_secs(15), || sentinel
            .log()
            .lines()
            .any(|l| l.contains("+slave") && l.contains(&replica_tls))),
        "sentinel never saw the replica on its TLS port: {}",
        sentinel.log()
    );

    let n = node(&sentinel.url(), pki.node_args(&pki.ca));
    let c = n.client();
    wait_on_redis(&n, "node never came up through the TLS sentinel");
    let before = id_of(&c.create(r#"{"metadata":{"when":"before"}}"#));
    assert!(
        master.cmd(&["WAIT", "1", "2000"]).starts_with(":1"),
        "the session was replicated before the master dies"
    );

    // The traffic: create a session, read it back, again, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (c, stop, sent) = (c.clone(), stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let mut log: Vec<Sent> = Vec::new();
            let mut created: Vec<String> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                let made = c.try_request(
                    "POST",
                    "/api/sessions",
                    &[],
                    Some(r#"{"metadata":{"when":"traffic"}}"#),
                );
                let id = match &made {
                    Ok(a) if a.status == 201 => Some(id_of(&a.json())),
                    _ => None,
                };
                log.push(Sent {
                    at,
                    what: made.map(|a| a.status),
                });
                if let Some(id) = id {
                    let at = Instant::now();
                    let read = c.try_request("GET", &format!("/api/sessions/{id}"), &[], None);
                    log.push(Sent {
                        at,
                        what: read.map(|a| a.status),
                    });
                    created.push(id);
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            (log, created)
        })
    };
    let traffic_until = |n: u64| {
        assert!(
            wait_until(Duration::from_secs(10), || sent.load(Ordering::Relaxed)
                >= n),
            "the traffic stalled at {} requests",
            sent.load(Ordering::Relaxed)
        );
    };
    traffic_until(20);

    // The master dies under the traffic; Sentinel promotes the replica.
    master.kill9();
    let killed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || sentinel
            .master()
            .contains(&replica_tls)),
        "sentinel did not promote the replica: {}",
        sentinel.log()
    );
    assert!(
        wait_until(Duration::from_secs(20), || on_redis(&c)),
        "the node did not follow the new TLS master: {}\n{}",
        health(&c),
        n.log_text()
    );
    let back = Instant::now();
    // More traffic on the new master before it stops.
    traffic_until(sent.load(Ordering::Relaxed) + 20);
    stop.store(true, Ordering::Relaxed);
    let (log, created) = traffic.join().expect("traffic thread");

    let errors: Vec<&String> = log.iter().filter_map(|s| s.what.as_ref().err()).collect();
    assert!(errors.is_empty(), "requests unanswered: {errors:?}");
    let unavailable = log.iter().filter(|s| s.what == Ok(503)).count();
    println!(
        "failover over TLS: {} requests, {unavailable} answered 503, the node back on Redis {:.1} s after the kill",
        log.len(),
        secs_from(killed, back)
    );
    // A request sent just before the kill may be answered after it.
    let switch_began = log
        .iter()
        .map(|s| s.at)
        .filter(|&t| t < killed)
        .max()
        .unwrap_or(killed);
    for s in &log {
        match s.what {
            Ok(200 | 201) => {}
            Ok(503) => assert!(
                s.at >= switch_began && s.at <= back,
                "a 503 outside the switch: sent {:+.3} s from the kill, the node back at {:.3} s",
                secs_from(killed, s.at),
                secs_from(killed, back)
            ),
            ref other => panic!("the traffic got {other:?}"),
        }
    }

    // After the switch: the session from before, a new write, and every
    // session the traffic made, all on the new master.
    let after = id_of(&c.create(r#"{"metadata":{"when":"after"}}"#));
    for (id, when) in [(&before, "before"), (&after, "after")] {
        assert_eq!(
            c.get(&format!("/api/sessions/{id}")).json()["metadata"]["when"],
            when
        );
        let stored = replica.cmd(&["HGET", &format!("edgenode:s:{id}"), "m:\"when\""]);
        assert!(
            stored.contains(when),
            "the session {when} the failover is on the new master: {stored}"
        );
    }
    assert!(!created.is_empty());
    for id in &created {
        assert_eq!(c.get(&format!("/api/sessions/{id}")).status, 200, "{id}");
        assert!(
            replica
                .cmd(&["EXISTS", &format!("edgenode:s:{id}")])
                .starts_with(":1"),
            "session {id} made by the traffic is on the new master"
        );
    }
    let h = health(&c);
    assert_eq!(h["store"]["active"], "redis", "{h}");
    assert!(h["store"]["failovers"].as_u64().unwrap_or(0) >= 1, "{h}");
}

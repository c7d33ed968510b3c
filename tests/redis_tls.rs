//! TLS to Redis on real processes: a redis-server (and a redis-sentinel)
//! listening with TLS only on the port the node is given, certificates made
//! by `openssl` for the test. The node speaks `rediss://` with a client
//! certificate (Redis's default `tls-auth-clients yes`), its near cache's
//! tracking connection and the shared cache included; it fails over to disk
//! and back when that Redis is killed; a certificate from another CA is a
//! configuration error that health names.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
        let dir = tempdir();
        let (port, tls_port) = (free_port(), free_port());
        let mut args = redis_server_args(port, dir.path());
        args.extend(["--tls-port".to_string(), tls_port.to_string()]);
        args.extend(pki.server_args());
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
    assert!(
        wait_until(Duration::from_secs(10), || on_redis(&c)),
        "node never came up on Redis over TLS: {}\n{}",
        health(&c),
        n.log_text()
    );

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
    let (s, s_tls) = (free_port(), free_port());
    let conf = dir.path().join("sentinel.conf");
    let (cert, key) = (&pki.server.0, &pki.server.1);
    std::fs::write(
        &conf,
        format!(
            "port {s}\nbind 127.0.0.1\ntls-port {s_tls}\ntls-cert-file {c}\ntls-key-file {k}\n\
             tls-ca-cert-file {ca}\ntls-replication yes\ndir {d}\nlogfile {d}/sentinel.log\n\
             sentinel monitor mymaster 127.0.0.1 {m} 1\n",
            c = cert.display(),
            k = key.display(),
            ca = pki.ca.display(),
            d = dir.path().display(),
            m = redis.tls_port,
        ),
    )
    .unwrap();
    let mut sentinel = Command::new("redis-sentinel")
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
    let up = wait_until(Duration::from_secs(10), || {
        redis_cmd(s, &["SENTINEL", "get-master-addr-by-name", "mymaster"])
            .unwrap_or_default()
            .contains(&redis.tls_port.to_string())
    });
    let log = std::fs::read_to_string(dir.path().join("sentinel.log")).unwrap_or_default();
    assert!(up, "sentinel never knew the master: {log}");

    let url = format!("rediss+sentinel://127.0.0.1:{s_tls}/mymaster");
    let n = node(&url, pki.node_args(&pki.ca));
    let c = n.client();
    let ok = wait_until(Duration::from_secs(10), || on_redis(&c));
    let h = health(&c);
    let id = ok.then(|| id_of(&c.create("{}")));
    let _ = sentinel.kill();
    let _ = sentinel.wait();
    assert!(
        ok,
        "node never came up through the TLS sentinel: {h}\n{}",
        n.log_text()
    );
    let id = id.unwrap_or_default();
    assert!(redis
        .cmd(&["EXISTS", &format!("edgenode:s:{id}")])
        .starts_with(":1"));
}

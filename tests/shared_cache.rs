//! The shared cache (`/api/cache`) on real processes: a real redis-server
//! and three real edgenode nodes on loopback ports. Values round-trip byte
//! for byte, expire, answer conditional GETs; deletions and purges reach
//! every node's memory tier within 50 ms; leases hold off a stampede; a
//! Redis outage keeps values served and its deletions are honoured
//! everywhere afterwards; the memory tier keeps its byte bound; hostile
//! input changes nothing.

mod common;

use common::*;
use serde_json::Value;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

/// An answer with its body as bytes.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn code(&self) -> String {
        serde_json::from_slice::<Value>(&self.body).unwrap_or(Value::Null)["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// A fresh connection to `base` for one request (the node answers some
/// hostile ones before reading the body, and closes the connection).
fn call(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Got {
    send(&client(base), method, path, headers, body)
}

fn client(base: &str) -> Client {
    Client::new(base).with_timeout(Duration::from_secs(20))
}

/// `Client::try_request_bytes`, a transport failure a panic.
fn send(
    client: &Client,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Got {
    let raw = client
        .try_request_bytes(method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    Got {
        status: raw.status,
        headers: raw.headers,
        body: raw.body,
    }
}

/// One node's client.
#[derive(Clone)]
struct C {
    base: String,
    client: Client,
}

impl C {
    fn of(n: &Node) -> C {
        C {
            base: n.url(),
            client: client(&n.url()),
        }
    }
    fn get(&self, path: &str) -> Got {
        send(&self.client, "GET", path, &[], None)
    }
    fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Got {
        send(&self.client, "GET", path, headers, None)
    }
    fn put(&self, path: &str, content_type: &str, body: &[u8]) -> Got {
        self.put_with(path, &[("Content-Type", content_type)], body)
    }
    fn put_with(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Got {
        send(&self.client, "PUT", path, headers, Some(body))
    }
    fn delete(&self, path: &str) -> Got {
        send(&self.client, "DELETE", path, &[], None)
    }
    fn health(&self) -> Value {
        serde_json::from_slice(&self.get("/api/health").body).unwrap_or(Value::Null)
    }
    /// A sample of `/metrics`, by its name and labels as printed.
    fn metric(&self, series: &str) -> f64 {
        let text = String::from_utf8(self.get("/metrics").body).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    }
}

fn node_on(redis: &Redis, extra: &[&str]) -> Node {
    Node::builder()
        .args(["--redis-url", &redis.url()])
        .args([
            "--redis-probe-interval-ms",
            "100",
            "--redis-probe-max-ms",
            "400",
        ])
        .args(extra.iter().copied())
        .start()
}

/// Waits until every node hears the cache's invalidations and has nothing
/// left to replay.
fn wait_subscribed(cs: &[C]) {
    for c in cs {
        assert!(
            wait_until(Duration::from_secs(10), || {
                let h = c.health();
                h["cache"]["subscribed"] == true
                    && h["cache"]["redis_reachable"] == true
                    && h["cache"]["pending_invalidations"] == 0
            }),
            "node {} never subscribed: {}",
            c.base,
            c.health()
        );
    }
}

fn cluster(extra: &[&str]) -> (Redis, Vec<Node>, Vec<C>) {
    let redis = Redis::start(false);
    let nodes: Vec<Node> = (0..3).map(|_| node_on(&redis, extra)).collect();
    let cs: Vec<C> = nodes.iter().map(C::of).collect();
    wait_subscribed(&cs);
    (redis, nodes, cs)
}

/// The propagation test measures latency: it runs alone (the other tests
/// of this file take this lock shared), so that 100 lease threads and a
/// fill of the memory tier on the same two cores are not what it measures.
static EXCLUSIVE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner())
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99).div_ceil(100) - 1]
}

#[test]
fn values_round_trip_byte_for_byte_expire_and_answer_conditional_gets() {
    let _shared = shared();
    let (redis, _nodes, cs) = cluster(&[]);
    let binary: Vec<u8> = (0..=255u8).chain([0, 0, 0, 255, 0]).collect();
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("html", "text/html; charset=utf-8", "<p>héllo ✓</p>".into()),
        (
            "json",
            "application/json",
            br#"{"a":[1,2,{"b":null}]}"#.to_vec(),
        ),
        ("png", "image/png", binary.clone()),
        ("raw", "application/octet-stream", vec![0u8; 4096]),
        ("empty", "text/plain", Vec::new()),
        (
            "vendor",
            "application/vnd.example+json; version=2; q=\"x y\"",
            b"\r\n\t ".to_vec(),
        ),
    ];
    for (i, (key, ct, body)) in cases.iter().enumerate() {
        let path = format!("/api/cache/pages/{key}");
        let put = cs[i % 3].put(&path, ct, body);
        assert_eq!(put.status, 204, "PUT {key}: {:?}", put);
        let etag = put.header("etag").expect("etag").to_string();
        for c in &cs {
            let got = c.get(&path);
            assert_eq!(got.status, 200, "{key} on {}", c.base);
            assert_eq!(got.body, *body, "{key} on {}", c.base);
            assert_eq!(got.header("content-type"), Some(*ct), "{key}");
            assert_eq!(got.header("etag"), Some(etag.as_str()), "{key}");
            let age: u64 = got.header("age").expect("age").parse().unwrap();
            assert!(age <= 2, "{key}: Age {age}");
        }
    }
    // No Content-Type: stored as octet-stream.
    let got = call(
        &cs[0].base,
        "PUT",
        "/api/cache/pages/untyped",
        &[],
        Some(b"x"),
    );
    assert_eq!(got.status, 204);
    assert_eq!(
        cs[1].get("/api/cache/pages/untyped").header("content-type"),
        Some("application/octet-stream")
    );

    // ETag and If-None-Match, on every node.
    let path = "/api/cache/pages/png";
    let etag = cs[0].get(path).header("etag").unwrap().to_string();
    for c in &cs {
        let nm = c.get_with(path, &[("If-None-Match", &etag)]);
        assert_eq!(nm.status, 304, "{}", c.base);
        assert!(nm.body.is_empty());
        assert_eq!(nm.header("etag"), Some(etag.as_str()));
        let weak = format!("\"other\", W/{etag}");
        assert_eq!(c.get_with(path, &[("If-None-Match", &weak)]).status, 304);
        assert_eq!(c.get_with(path, &[("If-None-Match", "*")]).status, 304);
        let other = c.get_with(path, &[("If-None-Match", "\"0000000000000000\"")]);
        assert_eq!((other.status, other.body.len()), (200, binary.len()));
    }
    // A new value, a new tag; the same value, the same tag.
    let changed = cs[1].put(path, "image/png", b"other");
    assert_ne!(changed.header("etag"), Some(etag.as_str()));
    assert!(
        wait_until(Duration::from_secs(2), || cs[2]
            .get_with(path, &[("If-None-Match", &etag)])
            .status
            == 200),
        "node 3 dropped the old value when node 2 wrote"
    );
    let again = cs[2].put(path, "image/png", &binary);
    assert_eq!(again.header("etag"), Some(etag.as_str()));

    // TTL: from ?ttl=, from Cache-Control max-age, and the default.
    let t0 = Instant::now();
    assert_eq!(
        cs[0]
            .put("/api/cache/ttl/q?ttl=1", "text/plain", b"q")
            .status,
        204
    );
    let cc = cs[0].put_with(
        "/api/cache/ttl/cc",
        &[
            ("Content-Type", "text/plain"),
            ("Cache-Control", "public, max-age=1"),
        ],
        b"cc",
    );
    assert_eq!(cc.status, 204);
    assert_eq!(
        cs[0]
            .put("/api/cache/ttl/default", "text/plain", b"d")
            .status,
        204
    );
    for c in &cs {
        assert_eq!(c.get("/api/cache/ttl/q").status, 200);
        assert_eq!(c.get("/api/cache/ttl/cc").status, 200);
    }
    for c in &cs {
        assert!(
            wait_until(Duration::from_secs(5), || c.get("/api/cache/ttl/q").status
                == 404
                && c.get("/api/cache/ttl/cc").status == 404),
            "values with a 1 s TTL still served by {}",
            c.base
        );
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "expired too early"
    );
    assert_eq!(cs[1].get("/api/cache/ttl/default").status, 200);

    // Every cache key in Redis carries a TTL, the default one ~300 s.
    let keys = redis.cmd(&["KEYS", "edgenode:c*"]);
    let names: Vec<&str> = keys
        .lines()
        .filter(|l| l.starts_with("edgenode:"))
        .collect();
    assert!(names.len() >= 8, "{keys}");
    for k in &names {
        let ttl = redis.cmd(&["PTTL", k]);
        let ms: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
        assert!(ms > 0, "{k} has no TTL: {ttl}");
    }
    let d = redis
        .cmd(&["KEYS", "edgenode:cv:ttl:*:default"])
        .lines()
        .find(|l| l.starts_with("edgenode:"))
        .map(String::from)
        .expect("default key");
    let ms: i64 = redis
        .cmd(&["PTTL", &d])
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!((290_000..=300_000).contains(&ms), "{ms}");
}

/// Reads `path` on `c` until it is served from the node's memory tier (a
/// read racing the write's own event is not kept there).
fn in_memory(c: &C, path: &str) {
    assert!(
        wait_until(Duration::from_secs(2), || c.get(path).header("x-cache")
            == Some("memory")),
        "{path} never reached the memory tier of {}",
        c.base
    );
}

#[test]
fn delete_and_purge_reach_every_node_within_50_ms() {
    let _alone = EXCLUSIVE.write().unwrap_or_else(|p| p.into_inner());
    let (_redis, _nodes, cs) = cluster(&[]);
    let (mut deletes, mut purges) = (Vec::new(), Vec::new());
    for trial in 0..100 {
        let writer = &cs[trial % 3];
        let others: Vec<&C> = cs.iter().filter(|c| c.base != writer.base).collect();
        let path = format!("/api/cache/prop/k{trial}");
        assert_eq!(writer.put(&path, "text/plain", b"v").status, 204);
        for c in &others {
            assert_eq!(c.get(&path).status, 200);
            in_memory(c, &path);
        }
        let t = Instant::now();
        assert_eq!(writer.delete(&path).status, 204);
        for c in &others {
            while c.get(&path).status != 404 {
                assert!(t.elapsed() < Duration::from_secs(5), "deletion never seen");
            }
            deletes.push(t.elapsed());
        }

        let ns = format!("purge{trial}");
        for k in ["a", "b"] {
            let p = format!("/api/cache/{ns}/{k}");
            assert_eq!(writer.put(&p, "text/plain", k.as_bytes()).status, 204);
            for c in &others {
                in_memory(c, &p);
            }
        }
        let t = Instant::now();
        assert_eq!(writer.delete(&format!("/api/cache/{ns}")).status, 204);
        for c in &others {
            while c.get(&format!("/api/cache/{ns}/a")).status != 404 {
                assert!(t.elapsed() < Duration::from_secs(5), "purge never seen");
            }
            purges.push(t.elapsed());
            assert_eq!(c.get(&format!("/api/cache/{ns}/b")).status, 404);
        }
        // the namespace takes new values at once
        let p = format!("/api/cache/{ns}/a");
        assert_eq!(writer.put(&p, "text/plain", b"new").status, 204);
        assert_eq!(others[0].get(&p).body, b"new");
    }
    let (d, p) = (p99(deletes), p99(purges));
    println!("propagation p99: delete {d:?}, purge {p:?}");
    assert!(d <= Duration::from_millis(50), "delete p99 {d:?}");
    assert!(p <= Duration::from_millis(50), "purge p99 {p:?}");
}

#[test]
fn a_hundred_lease_requests_grant_one_lease_and_all_get_the_value() {
    let _shared = shared();
    let (_redis, _nodes, cs) = cluster(&["--cache-lease-wait-ms", "15000"]);
    let path = "/api/cache/render/expensive";
    let barrier = Arc::new(Barrier::new(100));
    let (tx, rx) = mpsc::channel();
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let c = C::of_base(&cs[i % 3].base);
            let (barrier, tx) = (barrier.clone(), tx.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let got = c.get(&format!("{path}?lease=1"));
                tx.send((i, got)).unwrap();
            })
        })
        .collect();
    // The one answer that comes before the value exists: the lease.
    let (holder, first) = rx.recv_timeout(Duration::from_secs(10)).expect("an answer");
    assert_eq!(first.status, 404, "{first:?}");
    let token = first.header("x-cache-lease").expect("a lease").to_string();
    assert!(String::from_utf8_lossy(&first.body).contains("lease granted"));
    // Everyone else is waiting, on all three nodes.
    assert!(wait_until(Duration::from_secs(10), || {
        cs.iter()
            .map(|c| c.metric("edgenode_cache_lease_waiting"))
            .sum::<f64>()
            == 99.0
    }));
    // The leaseholder fills it through another node.
    let fill = cs[(holder + 1) % 3].put_with(
        path,
        &[("Content-Type", "text/html"), ("X-Cache-Lease", &token)],
        b"<h1>rendered once</h1>",
    );
    assert_eq!(fill.status, 204, "{fill:?}");
    let t = Instant::now();
    for _ in 0..99 {
        let (i, got) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a waiter's answer");
        assert_eq!(got.status, 200, "request {i}: {got:?}");
        assert_eq!(got.body, b"<h1>rendered once</h1>");
        assert!(got.header("x-cache-lease").is_none());
    }
    println!("99 waiters answered {:?} after the fill", t.elapsed());
    for th in threads {
        th.join().unwrap();
    }
    assert_eq!(cs[holder % 3].get(path).status, 200);
    let grants: f64 = cs
        .iter()
        .map(|c| c.metric("edgenode_cache_lease_grants_total"))
        .sum();
    let waits: f64 = cs
        .iter()
        .map(|c| c.metric("edgenode_cache_lease_waits_total"))
        .sum();
    assert_eq!((grants, waits), (1.0, 99.0));
    // Once the value is there, a lease request is a plain hit.
    assert_eq!(cs[0].get(&format!("{path}?lease=1")).status, 200);
}

impl C {
    fn of_base(base: &str) -> C {
        C {
            base: base.to_string(),
            client: client(base),
        }
    }
}

#[test]
fn a_put_with_a_stale_or_foreign_lease_gets_409_and_changes_nothing() {
    let _shared = shared();
    let redis = Redis::start(false);
    let nodes: Vec<Node> = (0..2)
        .map(|_| {
            node_on(
                &redis,
                &[
                    "--cache-lease-ttl-ms",
                    "300",
                    "--cache-lease-wait-ms",
                    "100",
                ],
            )
        })
        .collect();
    let cs: Vec<C> = nodes.iter().map(C::of).collect();
    wait_subscribed(&cs);
    let lease = |c: &C, path: &str| -> String {
        let g = c.get(&format!("{path}?lease=1"));
        assert_eq!(g.status, 404, "{g:?}");
        g.header("x-cache-lease").expect("lease").to_string()
    };
    let put = |c: &C, path: &str, token: &str, body: &[u8]| {
        c.put_with(
            path,
            &[("Content-Type", "text/plain"), ("X-Cache-Lease", token)],
            body,
        )
    };

    // A foreign token: 409, nothing stored.
    let p = "/api/cache/l/foreign";
    let mine = lease(&cs[0], p);
    let foreign = format!("r{}", "0123456789abcdef".repeat(2));
    let r = put(&cs[1], p, &foreign, b"forged");
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "lease_mismatch"),
        "{r:?}"
    );
    assert_eq!(cs[0].get(p).status, 404);
    // someone else asking meanwhile neither gets a lease nor the value
    let other = cs[1].get(&format!("{p}?lease=1"));
    assert_eq!(other.status, 404);
    assert!(other.header("x-cache-lease").is_none());
    assert_eq!(put(&cs[1], p, &mine, b"filled").status, 204);
    assert_eq!(cs[0].get(p).body, b"filled");
    // a lease is good for one fill
    assert_eq!(put(&cs[0], p, &mine, b"again").status, 409);
    assert_eq!(cs[1].get(p).body, b"filled");

    // Superseded by a newer write: the slow filler does not overwrite it.
    let p = "/api/cache/l/slow";
    let slow = lease(&cs[0], p);
    assert_eq!(cs[1].put(p, "text/plain", b"newer").status, 204);
    assert_eq!(put(&cs[0], p, &slow, b"older").status, 409);
    assert_eq!(cs[0].get(p).body, b"newer");
    assert_eq!(cs[1].get(p).body, b"newer");

    // Superseded by a deletion and by a purge.
    let p = "/api/cache/l/deleted";
    let t = lease(&cs[0], p);
    cs[1].delete(p);
    assert_eq!(put(&cs[0], p, &t, b"x").status, 409);
    let t = lease(&cs[0], p);
    assert_eq!(cs[1].delete("/api/cache/l").status, 204);
    assert_eq!(put(&cs[0], p, &t, b"x").status, 409);
    assert_eq!(cs[1].get(p).status, 404);

    // Expired: once another client can take a new lease, the old one is void.
    let p = "/api/cache/l/expired";
    let old = lease(&cs[0], p);
    let mut new = None;
    assert!(wait_until(Duration::from_secs(5), || {
        let g = cs[1].get(&format!("{p}?lease=1"));
        new = g.header("x-cache-lease").map(String::from);
        new.is_some()
    }));
    assert_eq!(put(&cs[0], p, &old, b"late").status, 409);
    assert_eq!(cs[1].get(p).status, 404);
    assert_eq!(put(&cs[1], p, &new.unwrap(), b"fresh").status, 204);
    assert_eq!(cs[0].get(p).body, b"fresh");
    let refused: f64 = cs
        .iter()
        .map(|c| c.metric("edgenode_cache_lease_refused_total"))
        .sum();
    assert_eq!(refused, 6.0);
}

#[test]
fn with_redis_killed_values_are_still_served_and_outage_deletes_are_honoured_after() {
    let _shared = shared();
    let mut redis = Redis::start(true);
    let nodes: Vec<Node> = vec![
        node_on(&redis, &[]),
        node_on(&redis, &[]),
        // no memory tier: what it serves in the outage comes from its disk
        node_on(&redis, &["--cache-memory-mb", "0"]),
    ];
    let cs: Vec<C> = nodes.iter().map(C::of).collect();
    wait_subscribed(&cs);
    for k in ["a", "b"] {
        assert_eq!(
            cs[0]
                .put(&format!("/api/cache/o/{k}"), "text/plain", k.as_bytes())
                .status,
            204
        );
    }
    assert_eq!(
        cs[2]
            .put("/api/cache/o/ondisk", "text/plain", b"disk")
            .status,
        204
    );
    assert_eq!(cs[2].put("/api/cache/p/x", "text/plain", b"x").status, 204);
    for c in &cs[..2] {
        for k in ["a", "b", "ondisk"] {
            assert_eq!(c.get(&format!("/api/cache/o/{k}")).status, 200);
        }
        assert_eq!(c.get("/api/cache/p/x").status, 200);
    }

    redis.kill9();
    for c in &cs {
        assert!(
            wait_until(Duration::from_secs(10), || c.health()["cache"]
                ["redis_reachable"]
                == false),
            "{} did not notice",
            c.base
        );
    }
    // Still served: from memory on nodes 1 and 2, from disk on node 3.
    for c in &cs[..2] {
        for k in ["a", "b", "ondisk"] {
            let g = c.get(&format!("/api/cache/o/{k}"));
            assert_eq!(
                (g.status, g.header("x-cache")),
                (200, Some("memory")),
                "{k}"
            );
        }
    }
    let g = cs[2].get("/api/cache/o/ondisk");
    assert_eq!(
        (g.status, g.header("x-cache"), &g.body[..]),
        (200, Some("disk"), &b"disk"[..])
    );

    // A deletion and a purge during the outage: journaled, done here at once.
    let d = cs[0].delete("/api/cache/o/a");
    assert_eq!(
        (d.status, d.body.as_slice()),
        (202, &br#"{"pending_sync":true}"#[..])
    );
    assert_eq!(cs[0].get("/api/cache/o/a").status, 404);
    assert_eq!(cs[1].delete("/api/cache/p").status, 202);
    assert_eq!(cs[1].get("/api/cache/p/x").status, 404);
    assert_eq!(cs[0].health()["cache"]["pending_invalidations"], 1);
    // A write during the outage stays on its node.
    let w = cs[1].put("/api/cache/o/local", "text/plain", b"local");
    assert_eq!(w.status, 202, "{w:?}");
    assert_eq!(cs[1].get("/api/cache/o/local").body, b"local");
    assert_eq!(cs[0].get("/api/cache/o/local").status, 404);
    // A lease in the outage is this node's own.
    let l = cs[0].get("/api/cache/o/leased?lease=1");
    let token = l
        .header("x-cache-lease")
        .expect("a local lease")
        .to_string();
    assert!(token.starts_with('l'));
    let filled = cs[0].put_with(
        "/api/cache/o/leased",
        &[("Content-Type", "text/plain"), ("X-Cache-Lease", &token)],
        b"f",
    );
    assert_eq!(filled.status, 202);

    // Redis returns with its data (the deleted values still in it).
    redis.restart();
    assert!(redis
        .cmd(&["KEYS", "edgenode:cv:o:*:a"])
        .contains("edgenode:cv:o:"));
    wait_subscribed(&cs);
    assert!(cs[0].metric("edgenode_cache_replayed_total") >= 1.0);
    for c in &cs {
        assert_eq!(
            c.get("/api/cache/o/a").status,
            404,
            "deleted value served by {}",
            c.base
        );
        assert_eq!(
            c.get("/api/cache/p/x").status,
            404,
            "purged value served by {}",
            c.base
        );
        assert_eq!(c.get("/api/cache/o/b").body, b"b");
        assert_eq!(
            c.get("/api/cache/o/local").status,
            404,
            "outage write reached {}",
            c.base
        );
    }
    assert!(redis.cmd(&["KEYS", "edgenode:cv:o:*:a"]).trim() == "*0");
    // and the cache works as before
    assert_eq!(
        cs[2].put("/api/cache/o/a", "text/plain", b"again").status,
        204
    );
    assert_eq!(cs[0].get("/api/cache/o/a").body, b"again");
}

#[test]
fn the_memory_tier_stays_within_its_bytes_while_ten_times_that_is_written() {
    let _shared = shared();
    let redis = Redis::start(false);
    let node = node_on(&redis, &["--cache-memory-mb", "1", "--cache-disk-mb", "2"]);
    let c = C::of(&node);
    wait_subscribed(std::slice::from_ref(&c));
    let limit = c.metric("edgenode_cache_bytes_limit{tier=\"memory\"}");
    assert_eq!(limit, 1024.0 * 1024.0);
    let value = vec![b'v'; 16 * 1024];
    let total = 10 * 1024 * 1024 / value.len();
    let mut max_memory: f64 = 0.0;
    let mut max_disk: f64 = 0.0;
    for i in 0..total {
        assert_eq!(
            c.put(&format!("/api/cache/fill/k{i}"), "text/plain", &value)
                .status,
            204
        );
        if i % 32 == 31 {
            max_memory = max_memory.max(c.metric("edgenode_cache_bytes{tier=\"memory\"}"));
            max_disk = max_disk.max(c.metric("edgenode_cache_bytes{tier=\"disk\"}"));
        }
    }
    println!("memory tier peaked at {max_memory} of {limit} bytes; disk at {max_disk}");
    assert!(max_memory <= limit, "{max_memory} > {limit}");
    assert!(
        max_memory >= limit * 0.7,
        "the tier was barely used: {max_memory}"
    );
    assert!(max_disk <= 2.0 * 1024.0 * 1024.0, "{max_disk}");
    assert!(c.metric("edgenode_cache_evictions_total{tier=\"memory\"}") >= (total - 64) as f64);
    assert!(c.metric("edgenode_cache_evictions_total{tier=\"disk\"}") > 0.0);
    // the newest values are in memory; the oldest only in Redis
    let last = c.get(&format!("/api/cache/fill/k{}", total - 1));
    assert_eq!(last.header("x-cache"), Some("memory"));
    let first = c.get("/api/cache/fill/k0");
    assert_eq!(
        (first.status, first.header("x-cache")),
        (200, Some("redis"))
    );
}

/// method, path, headers, body, expected status and error code
type Hostile = (
    &'static str,
    String,
    Vec<(&'static str, String)>,
    Option<Vec<u8>>,
    u16,
    &'static str,
);

#[test]
fn hostile_keys_namespaces_bodies_and_headers_get_a_4xx_json_error_and_change_nothing() {
    let _shared = shared();
    let redis = Redis::start(false);
    let node = node_on(&redis, &["--max-cache-value-bytes", "1024"]);
    let c = C::of(&node);
    wait_subscribed(std::slice::from_ref(&c));
    let long_ns = "n".repeat(65);
    let long_key = "k".repeat(251);
    let mut bad: Vec<Hostile> = Vec::new();
    let put = |path: String, code: &'static str| {
        (
            "PUT",
            path,
            vec![("Content-Type", "text/plain".to_string())],
            Some(b"x".to_vec()),
            400u16,
            code,
        )
    };
    for ns in [
        "a:b",
        long_ns.as_str(),
        "a%00b",
        "%C3%A9",
        "",
        "a*",
        "a%2Fb",
    ] {
        bad.push(put(format!("/api/cache/{ns}/k"), "invalid_namespace"));
    }
    for key in ["k:1", long_key.as_str(), "k%2Fx", "k%20", "", "k;rm", "k'1"] {
        bad.push(put(format!("/api/cache/ns/{key}"), "invalid_cache_key"));
    }
    for q in [
        "ttl=0",
        "ttl=-1",
        "ttl=abc",
        "ttl=2592001",
        "ttl=99999999999999999999",
        "ttl=",
    ] {
        bad.push(put(format!("/api/cache/ns/k?{q}"), "invalid_ttl"));
    }
    bad.push(put("/api/cache/ns/k?tll=5".into(), "invalid_query"));
    bad.push((
        "GET",
        "/api/cache/ns/k?lease=yes".into(),
        vec![],
        None,
        400,
        "invalid_lease",
    ));
    bad.push((
        "GET",
        "/api/cache/ns/k?x=1".into(),
        vec![],
        None,
        400,
        "invalid_query",
    ));
    bad.push((
        "DELETE",
        "/api/cache/ns?all=1".into(),
        vec![],
        None,
        400,
        "invalid_query",
    ));
    for cc in [
        "max-age=abc",
        "max-age=0",
        "max-age=-5",
        "max-age=99999999999",
    ] {
        bad.push((
            "PUT",
            "/api/cache/ns/k".into(),
            vec![
                ("Content-Type", "text/plain".into()),
                ("Cache-Control", cc.into()),
            ],
            Some(b"x".to_vec()),
            400,
            "invalid_ttl",
        ));
    }
    bad.push((
        "PUT",
        "/api/cache/ns/k".into(),
        vec![("Content-Type", "t".repeat(300))],
        Some(b"x".to_vec()),
        400,
        "invalid_content_type",
    ));
    for lease in [
        "nope",
        "r123",
        &format!("x{}", "a".repeat(32)),
        &format!("r{}", "g".repeat(32)),
    ] {
        bad.push((
            "PUT",
            "/api/cache/ns/k".into(),
            vec![
                ("Content-Type", "text/plain".into()),
                ("X-Cache-Lease", lease.into()),
            ],
            Some(b"x".to_vec()),
            400,
            "invalid_lease",
        ));
    }
    bad.push((
        "PUT",
        "/api/cache/ns/k".into(),
        vec![("Content-Type", "text/plain".into())],
        Some(vec![0u8; 1025]),
        413,
        "body_too_large",
    ));
    bad.push((
        "POST",
        "/api/cache/ns/k".into(),
        vec![],
        Some(b"x".to_vec()),
        405,
        "method_not_allowed",
    ));
    bad.push((
        "PUT",
        "/api/cache/ns".into(),
        vec![],
        Some(b"x".to_vec()),
        405,
        "method_not_allowed",
    ));
    bad.push((
        "GET",
        "/api/cache/ns/k/extra".into(),
        vec![],
        None,
        404,
        "not_found",
    ));
    for (method, path, headers, body, status, code) in &bad {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // A fresh connection each: the node answers these before reading
        // the body, and closes the connection rather than read it.
        let got = call(&c.base, method, path, &h, body.as_deref());
        assert_eq!(
            (got.status, got.code().as_str()),
            (*status, *code),
            "{method} {path} {headers:?}: {}",
            String::from_utf8_lossy(&got.body)
        );
        assert_eq!(
            got.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
    }
    // What ureq will not send: raw bytes in the head.
    let raw: Vec<Vec<u8>> = vec![
        b"PUT /api/cache/ns/k HTTP/1.1\r\nHost: x\r\nContent-Type: t\xc3\xa9xt\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx".to_vec(),
        b"PUT /api/cache/ns/k HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Type: text/html\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx".to_vec(),
        b"PUT /api/cache/ns/k HTTP/1.1\r\nHost: x\r\nContent-Type: \r\nContent-Length: 1\r\nConnection: close\r\n\r\nx".to_vec(),
        b"PUT /api/cache/ns/k HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nCache-Control: max-age=\xff\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx".to_vec(),
        b"PUT /api/cache/ns/k HTTP/1.1\r\nHost: x\r\nX-Cache-Lease: r\xc3\xa9\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx".to_vec(),
        b"GET /api/cache/n\xc3\xa9/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
    ];
    for r in &raw {
        let resp = raw_http(&node.addr, r);
        let status = raw_status(&resp);
        assert!(
            (400..500).contains(&status),
            "{}: {resp}",
            String::from_utf8_lossy(r)
        );
        if status != 400 || resp.contains("application/json") {
            continue;
        }
        // hyper itself refuses some heads before the node sees them (no body)
        assert!(!resp.contains("500"), "{resp}");
    }
    // Dot segments, which the client library would resolve away.
    for (path, code) in [
        ("/api/cache/../k", "invalid_namespace"),
        ("/api/cache/./k", "invalid_namespace"),
        ("/api/cache/%2e%2e/k", "invalid_namespace"),
        ("/api/cache/ns/..", "invalid_cache_key"),
        ("/api/cache/ns/.", "invalid_cache_key"),
    ] {
        let req = format!(
            "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
        );
        let resp = raw_http(&node.addr, req.as_bytes());
        assert_eq!(raw_status(&resp), 400, "{path}: {resp}");
        assert!(
            resp.contains(&format!("\"code\":\"{code}\"")),
            "{path}: {resp}"
        );
    }
    // A chunked body over the limit: 413 too.
    let chunked = format!(
        "PUT /api/cache/ns/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        2000,
        "y".repeat(2000)
    );
    let resp = raw_http(&node.addr, chunked.as_bytes());
    assert_eq!(raw_status(&resp), 413, "{resp}");

    // Nothing changed: no value under any of those names, none in Redis.
    assert_eq!(c.get("/api/cache/ns/k").status, 404);
    let values = redis.cmd(&["KEYS", "edgenode:cv:*"]);
    assert_eq!(values.trim(), "*0", "{values}");
    assert_eq!(c.metric("edgenode_cache_bytes{tier=\"memory\"}"), 0.0);

    // The management token rule of the session API applies.
    let guarded = node_on(&redis, &["--api-token", "s3cret"]);
    let g = C::of(&guarded);
    let r = g.put("/api/cache/ns/k", "text/plain", b"x");
    assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
    assert_eq!(g.delete("/api/cache/ns").status, 401);
    let ok = g.put_with(
        "/api/cache/ns/k",
        &[
            ("Content-Type", "text/plain"),
            ("Authorization", "Bearer s3cret"),
        ],
        b"x",
    );
    assert_eq!(ok.status, 204);
    let proxied = c.get_with("/api/cache/ns/k", &[("X-Forwarded-For", "203.0.113.7")]);
    assert_eq!(
        (proxied.status, proxied.code().as_str()),
        (403, "forbidden")
    );
}

//! Redis restarted empty: the re-seed from the nodes' mirrors brings back
//! the newest data any node acknowledged and counts at least as high as any
//! node answered (see docs/failure-model.md, "Re-seed").
//!
//! Three nodes, a few hundred sessions created across them, each used on
//! several nodes, half of them PATCHed on a node other than the creator;
//! then a real redis-server is killed with SIGKILL and started again on the
//! same port with no RDB and no AOF. Every session is then checked in Redis
//! and read on every node.
//!
//! The nodes run with `mirror_lag_secs` 0: a mirror copy then lags what its
//! node answered by nothing but the 5 s write of buffered copies, which a
//! re-seed flushes first, so every count must come back at least as high as
//! any node answered. With a lag L (the default: a tenth of the session TTL)
//! a count may come back lower by the uses of the last L; that bound is the
//! mirror's own, proven in `sd_card.rs`.
//!
//! `EDGENODE_RESEED_RUNS` (default 1) repeats it; `EDGENODE_RESEED_SESSIONS`
//! (default 240) sets the sessions per run.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const USES: usize = 5;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn node_on(redis: &Redis, name: &str) -> Node {
    Node::builder()
        .args(["--redis-url", &redis.url(), "--instance-id", name])
        .args(["--touch-flush-ms", "100", "--store-timeout-ms", "250"])
        .args(["--mirror-lag-secs", "0"])
        .args([
            "--redis-probe-interval-ms",
            "100",
            "--redis-probe-max-ms",
            "400",
        ])
        .start()
}

fn health(c: &Client) -> Value {
    c.get("/api/health").json()
}

fn settled(c: &Client) -> bool {
    let h = health(c);
    h["store"]["active"] == "redis"
        && h["store"]["pending_sync"] == 0
        && h["store"]["near_cache"]["pending_touches"]
            .as_u64()
            .unwrap_or(0)
            == 0
}

/// What the nodes acknowledged of one session.
struct Acked {
    id: String,
    version: u64,
    metadata: Value,
    /// The highest count any node answered.
    count: u64,
}

/// A session's fields as Redis holds them (HGETALL, read without counting).
fn in_redis(redis: &Redis, id: &str) -> Option<(u64, u64, Value)> {
    let reply = redis.cmd(&["HGETALL", &format!("edgenode:s:{id}")]);
    let lines: Vec<&str> = reply
        .lines()
        .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
        .collect();
    let (mut v, mut n, mut meta) = (None, None, serde_json::Map::new());
    for pair in lines.chunks(2) {
        let [k, val] = pair else { continue };
        match *k {
            "v" => v = val.parse().ok(),
            "n" => n = val.parse().ok(),
            k if k.starts_with("m:") => {
                let key: String = serde_json::from_str(&k[2..]).ok()?;
                meta.insert(key, serde_json::from_str(val).ok()?);
            }
            _ => {}
        }
    }
    Some((v?, n?, Value::Object(meta)))
}

fn one_run(run: usize, sessions: usize) {
    let mut redis = Redis::start(false);
    let nodes: Vec<Node> = (0..3)
        .map(|i| node_on(&redis, &format!("reseed{i}")))
        .collect();
    let cs: Vec<Client> = nodes.iter().map(Node::client).collect();
    for c in &cs {
        assert!(wait_until(Duration::from_secs(10), || settled(c)));
    }

    let mut acked = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let creator = i % 3;
        let s = cs[creator].create(&format!(r#"{{"metadata":{{"i":{i}}}}}"#));
        let id = id_of(&s);
        let path = format!("/api/sessions/{id}");
        let mut a = Acked {
            id,
            version: s["version"].as_u64().unwrap_or(1),
            metadata: s["metadata"].clone(),
            count: 0,
        };
        for k in 0..USES {
            // Uses answered by different nodes (their near caches).
            let r = cs[(creator + k) % 3].get(&path);
            assert_eq!(r.status, 200, "use {k} of {}: {}", a.id, r.text);
            a.count = a.count.max(r.json()["request_count"].as_u64().unwrap_or(0));
            if k == 2 && i % 2 == 0 {
                // Patched on another node than the creator.
                let p = cs[(creator + 1) % 3].patch(
                    &path,
                    &format!(r#"{{"metadata":{{"patched":{i},"i":null}}}}"#),
                );
                assert_eq!(p.status, 200, "{}", p.text);
                a.version = p.json()["version"].as_u64().unwrap_or(0);
                a.metadata = p.json()["metadata"].clone();
                assert_eq!(a.metadata, json!({ "patched": i }));
            }
        }
        acked.push(a);
    }
    // Every count written behind (each node's pending count empty).
    for c in &cs {
        assert!(
            wait_until(Duration::from_secs(10), || settled(c)),
            "{}",
            health(c)
        );
    }

    redis.kill9();
    // A request on each node meets the dead Redis: the node fails over (and
    // writes what its mirror buffers).
    for c in &cs {
        let _ = c.get("/api/health");
        let _ = c.create(r#"{"metadata":{"during":"outage"}}"#);
    }
    redis.restart();
    // It came back with nothing: what it loaded at its start, not DBSIZE,
    // which a node's probe may already have written to by now.
    let persistence = redis.cmd(&["INFO", "persistence"]);
    assert!(
        persistence.contains("rdb_last_load_keys_loaded:0"),
        "restarted empty: {persistence}"
    );
    for c in &cs {
        assert!(
            wait_until(Duration::from_secs(20), || settled(c)),
            "node did not settle after the restart: {}",
            health(c)
        );
    }

    // Each node re-seeds its own mirror; the record converges on the newest
    // version and the highest count (compare-and-set in Redis).
    let converged = |a: &Acked| {
        in_redis(&redis, &a.id)
            .is_some_and(|(v, n, m)| v >= a.version && n >= a.count && m == a.metadata)
    };
    wait_until(Duration::from_secs(20), || acked.iter().all(converged));
    let mut lost_patch = Vec::new();
    let mut low_count = Vec::new();
    let mut missing = Vec::new();
    for a in &acked {
        match in_redis(&redis, &a.id) {
            None => missing.push(a.id.clone()),
            Some((v, n, m)) => {
                if v < a.version || m != a.metadata {
                    lost_patch.push(format!(
                        "{} v{v} {m} (acked v{} {})",
                        a.id, a.version, a.metadata
                    ));
                }
                if n < a.count {
                    low_count.push(format!("{} n={n} < answered {}", a.id, a.count));
                }
            }
        }
    }
    let sample = |v: &Vec<String>| v.iter().take(5).cloned().collect::<Vec<_>>();
    assert!(
        missing.is_empty() && lost_patch.is_empty() && low_count.is_empty(),
        "run {run}: {} missing, {} lost a patch (e.g. {:?}), {} counts below the highest answered (e.g. {:?})",
        missing.len(),
        lost_patch.len(),
        sample(&lost_patch),
        low_count.len(),
        sample(&low_count)
    );
    // Every node serves the newest data.
    for a in &acked {
        for (n, c) in cs.iter().enumerate() {
            let r = c.get(&format!("/api/sessions/{}", a.id));
            assert_eq!(r.status, 200, "run {run}: node {n}, {}: {}", a.id, r.text);
            let s = r.json();
            assert_eq!(s["metadata"], a.metadata, "run {run}: node {n}, {}", a.id);
            assert!(s["version"].as_u64().unwrap_or(0) >= a.version);
            assert!(s["request_count"].as_u64().unwrap_or(0) > a.count);
        }
    }
    drop(nodes);
}

#[test]
fn redis_restarted_empty_is_reseeded_with_the_newest_data_and_counts() {
    let runs = env_or("EDGENODE_RESEED_RUNS", 1);
    let sessions = env_or("EDGENODE_RESEED_SESSIONS", 240);
    for run in 0..runs {
        one_run(run, sessions);
    }
}

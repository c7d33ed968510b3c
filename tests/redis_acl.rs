//! The least-privilege Redis ACL of docs/operations.md on a real
//! redis-server: nodes under that user do everything (sessions, near cache,
//! shared cache, failover and replay) and the user can do nothing else; and
//! the Redis password changed with the ACL user's two passwords, nodes
//! restarted one at a time, with zero failed requests.

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The ACL of docs/operations.md ("A least-privilege Redis user"), word for
/// word after `ACL SETUSER edgenode`, less the password.
const ACL: &str = "on resetkeys ~edgenode:* resetchannels &edgenode:* -@all \
    +ping +hello +auth +client|setname +client|tracking +client|caching \
    +evalsha +eval +script|load +multi +exec +subscribe +unsubscribe +publish \
    +get +set +del +hgetall +mget +zcard +zremrangebyscore \
    +exists +hdel +hget +hincrby +hmget +hset +pexpire +pexpireat +rename \
    +scard +smembers +type +zadd +zrange +zrangebyscore +zrem +zscore";

fn setuser(redis: &Redis, extra: &[&str]) {
    let mut args = vec!["ACL", "SETUSER", "edgenode"];
    args.extend(ACL.split_whitespace());
    args.extend(extra);
    let out = redis.cmd(&args);
    assert_eq!(out, "+OK\r\n", "{args:?}");
}

fn url(redis: &Redis, password: &str) -> String {
    format!("redis://edgenode:{password}@127.0.0.1:{}/", redis.port)
}

fn node(url: &str, name: &str) -> Node {
    Node::builder()
        .args(["--redis-url", url, "--instance-id", name])
        .args(["--store-timeout-ms", "250"])
        .args([
            "--redis-probe-interval-ms",
            "100",
            "--redis-probe-max-ms",
            "500",
        ])
        .start()
}

fn health(c: &Client) -> Value {
    c.get("/api/health").json()
}

fn on_redis(c: &Client) -> bool {
    let h = health(c);
    h["store"]["active"] == "redis"
        && h["store"]["pending_sync"] == 0
        && h["store"]["near_cache"]["up"] == true
        && h["cache"]["subscribed"] == true
        && h["cache"]["redis_reachable"] == true
}

fn wait_on_redis(c: &Client) {
    assert!(
        wait_until(Duration::from_secs(10), || on_redis(c)),
        "node not fully on Redis: {}",
        health(c)
    );
}

/// redis-cli as the edgenode user.
fn as_user(redis: &Redis, password: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string()])
        .args([
            "--user",
            "edgenode",
            "--pass",
            password,
            "--no-auth-warning",
        ])
        .args(args)
        .output()
        .expect("redis-cli (installed with redis-server)");
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// What the ACL refused, as Redis logged it: each entry's reason, object
/// and user.
fn denials(redis: &Redis) -> Vec<String> {
    let log = redis.cmd(&["ACL", "LOG"]);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with(['*', '$', ':']))
        .collect();
    let field = |entry: &[&str], name: &str| {
        entry
            .iter()
            .position(|l| *l == name)
            .and_then(|i| entry.get(i + 1))
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    lines
        .split(|l| *l == "count")
        .skip(1)
        .map(|e| {
            format!(
                "{} {} by {}",
                field(e, "reason"),
                field(e, "object"),
                field(e, "username")
            )
        })
        .collect()
}

#[test]
fn nodes_under_the_least_privilege_user_do_everything_and_nothing_else() {
    let mut redis = Redis::start(false);
    setuser(&redis, &[">pw"]);
    let u = url(&redis, "pw");
    let (a, b) = (node(&u, "a"), node(&u, "b"));
    let (ca, cb) = (a.client(), b.client());
    wait_on_redis(&ca);
    wait_on_redis(&cb);

    // Every session operation, across the two nodes.
    let s = ca.create(r#"{"user_id":"ann","metadata":{"k":1}}"#);
    let id = id_of(&s);
    let path = format!("/api/sessions/{id}");
    for _ in 0..3 {
        assert_eq!(cb.get(&path).status, 200);
    }
    assert!(
        health(&cb)["store"]["near_cache"]["hits"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
    let p = ca.patch(&path, r#"{"metadata":{"k":2}}"#);
    assert_eq!(p.json()["metadata"], json!({"k":2}), "{}", p.text);
    // Seen on the other node once the invalidation lands (its near cache
    // may serve the old copy for that long: docs/failure-model.md).
    assert!(wait_until(Duration::from_secs(2), || cb.get(&path).json()
        ["metadata"]
        == json!({"k":2})));
    let rotated = ca.post(&format!("{path}/rotate"), "");
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let new_id = id_of(&rotated.json());
    assert_eq!(cb.get(&path).status, 404);
    let other = id_of(&cb.create(r#"{"user_id":"ann"}"#));
    let list = ca.get("/api/users/ann/sessions");
    assert_eq!(
        list.json()["sessions"].as_array().map(Vec::len),
        Some(2),
        "{}",
        list.text
    );
    assert_eq!(ca.delete(&format!("/api/sessions/{other}")).status, 204);
    let out = cb.delete("/api/users/ann/sessions");
    assert_eq!(out.json()["deleted"], 1, "{}", out.text);
    assert_eq!(ca.get(&format!("/api/sessions/{new_id}")).status, 404);

    // The shared cache, written on one node, read on the other.
    let put = ca.request(
        "PUT",
        "/api/cache/ns/k",
        &[("Content-Type", "text/plain")],
        Some("v"),
    );
    assert_eq!(put.status, 204, "{}", put.text);
    assert_eq!(cb.get("/api/cache/ns/k").text, "v");
    assert_eq!(ca.delete("/api/cache/ns").status, 204);

    // Failover and replay under the same user.
    redis.kill9();
    let during = id_of(&ca.create(r#"{"user_id":"bo"}"#));
    redis.restart();
    // A restarted Redis has no user until it is set again (an operator's
    // would read it from its aclfile): the nodes' tries meanwhile are
    // refused, which is not what this test is about.
    setuser(&redis, &[">pw"]);
    redis.cmd(&["ACL", "LOG", "RESET"]);
    wait_on_redis(&ca);
    wait_on_redis(&cb);
    assert_eq!(cb.get(&format!("/api/sessions/{during}")).status, 200);

    for c in [&ca, &cb] {
        let h = health(c);
        assert_eq!(h["status"], "ok", "{h}");
        assert_eq!(h["store"]["redis_config_error"], false, "{h}");
    }
    let log = denials(&redis);
    assert!(log.is_empty(), "the ACL refused the node: {log:?}");

    // And the user can do nothing else.
    for refused in [
        vec!["FLUSHALL"],
        vec!["CONFIG", "GET", "maxmemory"],
        vec!["KEYS", "*"],
        vec!["GET", "other:key"],
        vec!["ACL", "LIST"],
    ] {
        let out = as_user(&redis, "pw", &refused);
        assert!(out.contains("NOPERM"), "{refused:?}: {out}");
    }
    assert!(as_user(&redis, "pw", &["PING"]).contains("PONG"));
}

#[test]
fn the_redis_password_changes_node_by_node_with_zero_failed_requests() {
    let redis = Redis::start(false);
    setuser(&redis, &[">old"]);
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| node(&url(&redis, "old"), n))
        .collect();
    for n in &nodes {
        wait_on_redis(&n.client());
    }
    // The balancer: the nodes in service, which the client loop uses.
    let in_service: Arc<Mutex<Vec<Client>>> =
        Arc::new(Mutex::new(nodes.iter().map(Node::client).collect()));
    let (stop, rounds, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(Mutex::new(Vec::<String>::new())),
    );
    let clients = {
        let (in_service, stop, rounds, ok, failed) = (
            in_service.clone(),
            stop.clone(),
            rounds.clone(),
            ok.clone(),
            failed.clone(),
        );
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let cs = in_service.lock().unwrap().clone();
                rounds.fetch_add(1, Ordering::Relaxed);
                let (c1, c2) = (&cs[i % cs.len()], &cs[(i + 1) % cs.len()]);
                i += 1;
                let created = c1.try_request("POST", "/api/sessions", &[], Some("{}"));
                let id = match created {
                    Ok(a) if a.status == 201 => id_of(&a.json()),
                    other => {
                        failed.lock().unwrap().push(format!("create: {other:?}"));
                        continue;
                    }
                };
                match c2.try_request("GET", &format!("/api/sessions/{id}"), &[], None) {
                    Ok(a) if a.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failed.lock().unwrap().push(format!("read: {other:?}")),
                }
            }
        })
    };

    // 1. The new password beside the old one.
    assert_eq!(
        redis.cmd(&["ACL", "SETUSER", "edgenode", ">new"]),
        "+OK\r\n"
    );
    // 2. Node by node: out of the balancer, stopped, restarted with the new
    //    URL, back in once ready.
    for n in &mut nodes {
        let addr = n.url();
        in_service.lock().unwrap().retain(|c| c.base != addr);
        // As a balancer's drain: no request on its way to the node when
        // it stops (the loop's round that still had it is over).
        let r = rounds.load(Ordering::Relaxed);
        assert!(wait_until(Duration::from_secs(5), || rounds
            .load(Ordering::Relaxed)
            > r + 1));
        assert!(n.terminate().success());
        let at = n.args.iter().position(|a| a == "--redis-url").unwrap() + 1;
        n.args[at] = url(&redis, "new");
        n.restart();
        wait_on_redis(&n.client());
        in_service.lock().unwrap().push(n.client());
    }
    // 3. The old password removed.
    assert_eq!(
        redis.cmd(&["ACL", "SETUSER", "edgenode", "<old"]),
        "+OK\r\n"
    );
    let before = ok.load(Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(10), || ok
        .load(Ordering::Relaxed)
        > before + 20));
    stop.store(true, Ordering::Relaxed);
    clients.join().unwrap();

    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > 50,
        "{}",
        ok.load(Ordering::Relaxed)
    );
    for n in &nodes {
        let h = health(&n.client());
        assert_eq!(h["store"]["active"], "redis", "{h}");
        assert_eq!(h["status"], "ok", "{h}");
    }
    // A node left on the old password: a configuration error, named.
    let stale = Node::builder()
        .args(["--redis-url", &url(&redis, "old")])
        .args([
            "--redis-probe-interval-ms",
            "100",
            "--redis-probe-max-ms",
            "500",
        ])
        .start();
    let c = stale.client();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let h = health(&c);
            h["status"] == "degraded"
                && h["store"]["redis_config_error"] == true
                && h["degraded_reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("authentication failed"))
        }),
        "{}",
        health(&c)
    );
    eprintln!(
        "password change: {} create+read pairs, 0 failed",
        ok.load(Ordering::Relaxed)
    );
}

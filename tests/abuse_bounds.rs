//! Security and abuse bounds, as someone hostile (or careless) meets them:
//! the management API reached through a proxy, a flood of new visitors, a
//! user with a hundred thousand sessions, records with impossible times, a
//! wrong Redis password, oversized headers. Real redis-server and edgenode
//! processes.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Held by every test here: several measure time or memory (Redis's slow
/// log counts the time Redis waited for a core), so none runs beside another
/// on a 2-core machine.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn measuring() -> std::sync::MutexGuard<'static, ()> {
    MEASURING.lock().unwrap_or_else(|p| p.into_inner())
}

fn health(c: &Client) -> Value {
    c.get("/api/health").json()
}

fn in_redis_mode(c: &Client) -> bool {
    let h = health(c);
    h["store"]["active"] == "redis" && h["store"]["pending_sync"] == 0
}

#[test]
fn without_a_token_the_management_api_is_refused_to_anything_that_came_through_a_proxy() {
    let _alone = measuring();
    let node = Node::start();
    let c = node.client();
    let id = id_of(&c.create(r#"{"user_id":"alice"}"#));
    // An application back end on the node's own network: served.
    assert_eq!(c.get("/api/users/alice/sessions").status, 200);
    // The same request forwarded by a balancer: refused, whatever the header.
    for (h, v) in [
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("x-real-ip", "203.0.113.9"),
    ] {
        for path in [
            "/api/users/alice/sessions".to_string(),
            format!("/api/sessions/{id}"),
            "/metrics".to_string(),
        ] {
            let a = c.request("GET", &path, &[(h, v)], None);
            assert_eq!(a.status, 403, "{path} with {h}: {}", a.text);
            assert_eq!(a.code(), "forbidden");
            assert!(!a.text.contains(&id));
        }
    }
    // The browser route stays open through a proxy.
    let b = c.request(
        "GET",
        "/api/session",
        &[("x-forwarded-for", "203.0.113.9")],
        None,
    );
    assert_eq!(b.status, 200);
    assert!(node.log_text().contains("refusing management requests"));
    assert_eq!(
        node.log_text()
            .matches("refusing management requests")
            .count(),
        1,
        "said once"
    );

    // A peer that is a trusted proxy is a proxy even without the header.
    let behind = Node::builder()
        .args(["--trusted-proxies", "127.0.0.1"])
        .start();
    assert_eq!(behind.client().get("/api/users/alice/sessions").status, 403);

    // With a token, management works through a proxy for whoever holds it.
    let guarded = Node::builder().args(["--api-token", "t0ken"]).start();
    let g = guarded.client();
    let fwd = [("x-forwarded-for", "203.0.113.9")];
    assert_eq!(
        g.request("GET", "/api/users/alice/sessions", &fwd, None)
            .status,
        401
    );
    let with = g.clone().with_token("t0ken");
    assert_eq!(
        with.request("GET", "/api/users/alice/sessions", &fwd, None)
            .status,
        200
    );
}

#[test]
fn a_flood_of_new_visitors_from_many_addresses_stays_within_the_bounds() {
    let _alone = measuring();
    let redis = Redis::start(false);
    let node = Node::builder()
        .args([
            "--redis-url",
            &redis.url(),
            "--trusted-proxies",
            "127.0.0.1",
        ])
        .args(["--max-sessions", "400", "--create-rate-per-ip", "2"])
        .args(["--api-token", "t"])
        .start();
    let c = node.client();
    assert!(wait_until(Duration::from_secs(5), || in_redis_mode(&c)));

    // One address asking for new sessions as fast as it can: its burst (3x
    // the rate), then 429 with Retry-After.
    let (mut created, mut limited) = (0, 0);
    for _ in 0..40 {
        let a = c.request(
            "GET",
            "/api/session",
            &[("x-forwarded-for", "198.51.100.7")],
            None,
        );
        match a.status {
            200 => created += 1,
            429 => {
                limited += 1;
                assert_eq!(a.code(), "too_many_new_sessions");
                assert!(a.header("retry-after").is_some());
                assert!(a.header("set-cookie").is_none());
            }
            s => panic!("{s}: {}", a.text),
        }
    }
    assert!(created <= 8, "{created} sessions from one address");
    assert!(limited >= 30);
    // An IPv6 client is one client per /64.
    let mut v6 = 0;
    for i in 0..20 {
        let ip = format!("2001:db8:7:7::{i:x}");
        if c.request("GET", "/api/session", &[("x-forwarded-for", &ip)], None)
            .status
            == 200
        {
            v6 += 1;
        }
    }
    assert!(v6 <= 8, "{v6} sessions from one /64");

    // Many addresses: the global ceiling holds, with 503 + Retry-After.
    let mut ceiling = 0;
    for i in 0..600u32 {
        let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
        let a = c.request("GET", "/api/session", &[("x-forwarded-for", &ip)], None);
        if a.status == 503 {
            assert_eq!(a.code(), "too_many_sessions", "{}", a.text);
            assert!(a.header("retry-after").is_some());
            assert!(a.header("set-cookie").is_none());
            ceiling += 1;
        } else {
            assert_eq!(a.status, 200, "{}", a.text);
        }
    }
    assert!(ceiling >= 200, "only {ceiling} refused at the ceiling");
    let stored: u64 = redis
        .cmd(&["ZCARD", "edgenode:active"])
        .trim_start_matches(':')
        .trim()
        .parse()
        .unwrap();
    assert!(stored <= 400, "{stored} sessions stored, ceiling 400");
    // Anonymous sessions are not indexed per user: no ever-growing set.
    assert_eq!(redis.cmd(&["EXISTS", "edgenode:u:anonymous"]), ":0\r\n");
    let listed = c
        .clone()
        .with_token("t")
        .get("/api/users/anonymous/sessions")
        .json();
    assert_eq!(
        listed["sessions"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
}

/// Writes `n` sessions of `user` straight into Redis, as a data set left from
/// a release without per-user bounds would hold them.
fn seed_user(redis: &Redis, user: &str, n: u32) {
    use std::io::Write;
    let far = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 86_400_000)
        .to_string();
    let mut cmds = Vec::new();
    let resp = |args: &[&str], out: &mut Vec<u8>| {
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n{}\r\n", a.len(), a).as_bytes());
        }
    };
    for i in 0..n {
        let id = format!("00000000-0000-4000-8000-{i:012x}");
        let key = format!("edgenode:s:{id}");
        let created = (1_000 + i).to_string();
        resp(
            &[
                "HSET", &key, "u", user, "c", &created, "a", &created, "e", &far, "n", "0", "v",
                "1",
            ],
            &mut cmds,
        );
        resp(
            &["ZADD", &format!("edgenode:u:{user}"), &created, &id],
            &mut cmds,
        );
    }
    let mut child = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--pipe"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-cli");
    child.stdin.take().unwrap().write_all(&cmds).unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_user_with_100000_sessions_never_blocks_redis() {
    let _alone = measuring();
    let redis = Redis::start(false);
    let args = ["--redis-url", &redis.url(), "--max-sessions", "1000000"];
    let a = Node::builder().args(args).start();
    let b = Node::builder().args(args).start();
    let (ca, cb) = (a.client(), b.client());
    assert!(wait_until(Duration::from_secs(5), || in_redis_mode(&ca)
        && in_redis_mode(&cb)));
    seed_user(&redis, "mallory", 100_000);
    let other = id_of(&cb.create(r#"{"user_id":"bob"}"#));
    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "slowlog-log-slower-than", "10000"]),
        "+OK\r\n"
    );
    assert_eq!(redis.cmd(&["SLOWLOG", "RESET"]), "+OK\r\n");

    // Listing: one page, and the cursor to the next.
    let page = ca.get("/api/users/mallory/sessions?limit=100").json();
    assert_eq!(
        page["sessions"].as_array().map(Vec::len),
        Some(100),
        "{page}"
    );
    assert_eq!(page["next_cursor"], "100");
    let next = ca
        .get("/api/users/mallory/sessions?limit=100&cursor=100")
        .json();
    assert_eq!(
        next["sessions"][0]["session_id"],
        "00000000-0000-4000-8000-000000000064"
    );
    assert_eq!(ca.get("/api/users/mallory/sessions?limit=101").status, 400);
    assert_eq!(ca.get("/api/users/mallory/sessions?cursor=x").status, 400);

    // Log-out-everywhere while node B serves another user.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (cb, stop, other) = (cb.clone(), stop.clone(), other.clone());
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                assert_eq!(cb.get(&format!("/api/sessions/{other}")).status, 200);
                worst = worst.max(t.elapsed());
                // A steady trickle, not a second load on a 2-core box.
                std::thread::sleep(Duration::from_millis(5));
            }
            worst
        })
    };
    let t = Instant::now();
    let out = ca.delete("/api/users/mallory/sessions");
    let took = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst = watcher.join().unwrap();
    assert_eq!(out.status, 200, "{}", out.text);
    assert_eq!(out.json()["deleted"], 100_000);
    assert_eq!(redis.cmd(&["EXISTS", "edgenode:u:mallory"]), ":0\r\n");
    let slow = redis.cmd(&["SLOWLOG", "LEN"]);
    assert_eq!(
        slow,
        ":0\r\n",
        "a command held redis 10 ms or more: {}",
        redis.cmd(&["SLOWLOG", "GET", "5"])
    );
    assert!(
        worst < Duration::from_millis(250),
        "node B waited {worst:?}"
    );
    for c in [&ca, &cb] {
        assert_eq!(health(c)["store"]["failovers"], 0, "{}", health(c));
    }
    println!("100 000 sessions logged out in {took:?}; node B's worst read {worst:?}");
}

#[test]
fn a_user_keeps_at_most_max_sessions_per_user_the_oldest_go() {
    let _alone = measuring();
    let redis = Redis::start(false);
    let node = Node::builder()
        .args(["--redis-url", &redis.url(), "--max-sessions-per-user", "3"])
        .start();
    let c = node.client();
    assert!(wait_until(Duration::from_secs(5), || in_redis_mode(&c)));
    // Creation times are milliseconds: a pause makes "oldest" unambiguous.
    let ids: Vec<String> = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(2));
            id_of(&c.create(r#"{"user_id":"carol"}"#))
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let want = if i < 2 { 404 } else { 200 };
        assert_eq!(
            c.get(&format!("/api/sessions/{id}")).status,
            want,
            "session {i}"
        );
    }
    let listed = c.get("/api/users/carol/sessions").json();
    assert_eq!(listed["sessions"].as_array().map(Vec::len), Some(3));
    // A login (user change) counts too.
    let anon = id_of(&c.create("{}"));
    let p = c.patch(&format!("/api/sessions/{anon}"), r#"{"user_id":"carol"}"#);
    assert_eq!(p.status, 200);
    assert_eq!(c.get(&format!("/api/sessions/{}", ids[2])).status, 404);
    assert_eq!(c.get(&format!("/api/sessions/{anon}")).status, 200);
}

#[test]
fn records_with_impossible_times_are_absent_and_counted_never_a_reset_connection() {
    let _alone = measuring();
    let redis = Redis::start(false);
    let node = Node::builder().args(["--redis-url", &redis.url()]).start();
    let c = node.client();
    assert!(wait_until(Duration::from_secs(5), || in_redis_mode(&c)));
    let id = "00000000-0000-4000-8000-00000000beef";
    let key = format!("edgenode:s:{id}");
    for e in ["253402300800000", "18446744073709551615"] {
        redis.cmd(&[
            "HSET", &key, "u", "x", "c", "1", "a", "1", "e", e, "n", "0", "v", "1",
        ]);
        let a = c.get(&format!("/api/sessions/{id}"));
        assert_eq!(a.status, 404, "{}", a.text);
        let b = c.request(
            "GET",
            "/api/session",
            &[("cookie", &format!("session_id={id}"))],
            None,
        );
        assert_eq!(b.status, 200, "replaced by a new session");
        assert_ne!(id_of(&b.json()), id);
    }
    assert!(health(&c)["store"]["corrupt_records"].as_u64().unwrap() >= 2);

    // The same on the node's own disk.
    let dir = tempdir();
    let bad_id = [0x42u8; 16];
    {
        let local = edgenode::store::local::LocalLimits {
            cache_bytes: 1 << 20,
            max_journal_bytes: 1 << 20,
            min_free_bytes: 0,
            flush_timeout: std::time::Duration::from_secs(5),
        };
        let limits = edgenode::session::Limits {
            ttl_ms: 60_000,
            max_lifetime_ms: 60_000,
            max_metadata_bytes: 1024,
        };
        let store =
            edgenode::store::local::SledStore::open(&dir.path().join("db"), local, limits).unwrap();
        let mut s = edgenode::session::Session::new("x".into(), "{}".into(), 1, &limits);
        s.id = bad_id;
        s.expires_at = u64::MAX;
        store.put_raw_for_test(&bad_id, &s.encode()).unwrap();
    }
    let local = Node::builder().data_dir(dir.path()).start();
    let lc = local.client();
    let path = format!("/api/sessions/{}", edgenode::session::format_id(&bad_id));
    assert_eq!(lc.get(&path).status, 404);
    assert_eq!(health(&lc)["store"]["corrupt_records"], 1);
}

#[test]
fn a_wrong_redis_password_is_a_configuration_error_not_an_outage() {
    let _alone = measuring();
    let redis = Redis::start(false);
    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "requirepass", "right"]),
        "+OK\r\n"
    );
    let url = format!("redis://:wrong@127.0.0.1:{}/", redis.port);
    let node = Node::builder().args(["--redis-url", &url]).start();
    let c = node.client();
    assert!(
        wait_until(Duration::from_secs(5), || health(&c)["store"]
            ["redis_config_error"]
            == true),
        "{}",
        health(&c)
    );
    let h = health(&c);
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(
        h["degraded_reason"]
            .as_str()
            .unwrap()
            .contains("redis refuses"),
        "{h}"
    );
    assert_eq!(
        c.get("/api/ready").status,
        200,
        "serves from sled meanwhile"
    );
    assert!(c
        .get("/metrics")
        .text
        .contains("edgenode_redis_config_error 1"));
    assert!(node.log_text().contains("ERROR"));
    assert!(node
        .log_text()
        .contains("redis refuses this node's credentials"));
    assert!(
        !node.log_text().contains("wrong@"),
        "the password is not logged"
    );

    // With require_redis the node is not ready instead.
    let strict = Node::builder()
        .args(["--redis-url", &url, "--require-redis"])
        .spawn();
    let s = strict.client();
    assert!(wait_until(Duration::from_secs(5), || s
        .try_request("GET", "/api/ready", &[], None)
        .is_ok_and(
            |a| a.status == 503 && a.text.contains("redis refuses")
        )));

    // Fixed: both come back by themselves.
    let fixed = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--no-auth-warning",
            "-a",
            "right",
        ])
        .args(["CONFIG", "SET", "requirepass", "wrong"])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&fixed.stdout).trim(), "OK");
    assert!(wait_until(Duration::from_secs(5), || in_redis_mode(&c)));
    assert_eq!(health(&c)["status"], "ok");
    assert!(wait_until(Duration::from_secs(5), || s
        .get("/api/ready")
        .status
        == 200));
}

#[test]
fn oversized_headers_get_431_and_a_thousand_stalled_header_senders_stay_within_memory() {
    let _alone = measuring();
    use std::io::Write;
    let node = Node::builder()
        .binary(release_binary())
        .args(["--max-connections", "1100"])
        .start();
    let huge = format!(
        "GET /api/session HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let answer = raw_http(&node.addr, huge.as_bytes());
    assert_eq!(raw_status(&answer), 431, "{answer}");

    raise_own_fd_limit(4096);
    // Each connection sends 15 KiB of headers and never finishes them.
    let pad = format!(
        "GET /api/session HTTP/1.1\r\nHost: x\r\nX-Pad: {}",
        "a".repeat(15 * 1024)
    );
    let mut conns = Vec::new();
    for _ in 0..1000 {
        let mut s = std::net::TcpStream::connect(&node.addr).expect("connect");
        s.write_all(pad.as_bytes()).expect("write");
        conns.push(s);
    }
    assert!(wait_until(Duration::from_secs(5), || {
        health(&node.client())["pool"]["connections"]
            .as_u64()
            .unwrap_or(0)
            >= 1000
    }));
    let (_, rss_kb) = node.threads_and_rss_kb();
    println!("1000 stalled 15 KiB headers: RSS {rss_kb} kB");
    assert!(rss_kb < 32 * 1024, "RSS {rss_kb} kB");
    drop(conns);
}

/// Lifts this test process's own open-files limit (the stock soft limit is
/// 1024): the client side of a thousand connections needs them too.
fn raise_own_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn the_session_cookie_carries_max_age_unless_set_to_zero() {
    let _alone = measuring();
    let node = Node::builder().args(["--session-ttl-secs", "3600"]).start();
    let a = node.client().get("/api/session");
    let cookie = a.header("set-cookie").unwrap().to_string();
    assert!(cookie.contains("Max-Age=3600"), "{cookie}");
    let session_only = Node::builder().args(["--cookie-max-age-secs", "0"]).start();
    let b = session_only.client().get("/api/session");
    assert!(!b.header("set-cookie").unwrap().contains("Max-Age"));
}

//! The near cache, as a cluster operator meets it: three nodes on one Redis
//! serve sessions from memory, and still every change made anywhere (on
//! another node, or with `redis-cli` by hand) is seen everywhere within
//! 50 ms; counts stay exact; a node killed with SIGKILL loses at most one
//! flush interval of counts and nothing else; a node whose invalidation
//! stream is cut serves nothing from its cache until it is back. Real
//! redis-server and edgenode processes on 127.0.0.1.

mod common;

use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

const FLUSH_MS: u64 = 100;

/// These tests time things in milliseconds on a 2-core machine: they run
/// one at a time, so one's traffic is not another's latency.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn cluster(redis: &Redis) -> (Vec<Node>, Vec<Client>) {
    cluster_flushing_every(redis, FLUSH_MS)
}

fn cluster_flushing_every(redis: &Redis, flush_ms: u64) -> (Vec<Node>, Vec<Client>) {
    let nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            Node::builder()
                .args(["--redis-url", &redis.url(), "--instance-id", name])
                .args(["--touch-flush-ms", &flush_ms.to_string()])
                .start()
        })
        .collect();
    let clients: Vec<Client> = nodes.iter().map(Node::client).collect();
    for c in &clients {
        assert!(
            wait_until(Duration::from_secs(5), || near_up(c)),
            "near cache did not come up: {}",
            c.get("/api/health").text
        );
    }
    (nodes, clients)
}

/// One node on `redis` (with `args` besides its URL), its near cache up.
fn node_on(redis: &Redis, args: &[&str]) -> (Node, Client) {
    let node = Node::builder()
        .args(["--redis-url", &redis.url()])
        .args(args.iter().copied())
        .start();
    let c = node.client();
    assert!(wait_until(Duration::from_secs(5), || near_up(&c)));
    (node, c)
}

fn near(c: &Client) -> Value {
    c.get("/api/health").json()["store"]["near_cache"].clone()
}

fn near_up(c: &Client) -> bool {
    near(c)["up"] == true
}

fn read(c: &Client, id: &str) -> Answer {
    c.get(&format!("/api/sessions/{id}"))
}

/// Reads the session on `c` twice, so that it is cached there (the first
/// read fills the cache), and checks the second came from the cache. (A
/// write-behind of another node's counts invalidates the copy like any
/// change: the clusters that need copies on all nodes flush rarely.)
fn warm(c: &Client, id: &str) {
    // A few tries: a copy is not kept while a flush of its counts is on its
    // way, nor when a write lands between the two reads.
    for _ in 0..5 {
        let hits = near(c)["hits"].as_u64().unwrap_or(0);
        assert_eq!(read(c, id).status, 200);
        assert_eq!(read(c, id).status, 200);
        if near(c)["hits"].as_u64().unwrap_or(0) > hits {
            return;
        }
    }
    panic!("the session never came from the near cache: {}", near(c));
}

/// Polls `c` until `seen` holds for the session's answer; the time it took.
fn time_to_see(c: &Client, id: &str, seen: impl Fn(&Answer) -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        let a = read(c, id);
        if seen(&a) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "change never seen on {}: {} {}",
            c.base,
            a.status,
            a.text
        );
    }
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (installed with redis-server by scripts/test.sh)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// How often Redis ran `cmd`, from an `INFO commandstats` answer (0 when
/// it never did).
fn calls_of(stats: &str, cmd: &str) -> u64 {
    stats
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_change_made_anywhere_reaches_every_nodes_cache_within_50_ms() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    // Counts written behind rarely: each write invalidates the other nodes'
    // copies, and every trial wants the copies in place when it changes.
    let (_nodes, cs) = cluster_flushing_every(&redis, 5_000);
    const TRIALS: usize = 200;
    let kinds = ["patch", "rotate", "delete", "logout"];
    let mut report = Vec::new();
    for kind in kinds {
        let mut times = Vec::with_capacity(TRIALS * 2);
        for trial in 0..TRIALS {
            let user = format!("u{trial}");
            let s = cs[0].create(&format!(r#"{{"user_id":"{user}"}}"#));
            let id = id_of(&s);
            warm(&cs[1], &id);
            warm(&cs[2], &id);
            let done = match kind {
                "patch" => cs[0].patch(
                    &format!("/api/sessions/{id}"),
                    &format!(r#"{{"metadata":{{"trial":{trial}}}}}"#),
                ),
                "rotate" => cs[0].post(&format!("/api/sessions/{id}/rotate"), ""),
                "delete" => cs[0].delete(&format!("/api/sessions/{id}")),
                _ => cs[0].delete(&format!("/api/users/{user}/sessions")),
            };
            assert!(done.status < 300, "{kind}: {} {}", done.status, done.text);
            for c in &cs[1..] {
                times.push(time_to_see(c, &id, |a| match kind {
                    "patch" => a.json()["metadata"]["trial"] == trial,
                    _ => a.status == 404,
                }));
            }
        }
        let worst = *times.iter().max().unwrap();
        let p = p99(times);
        report.push(format!("{kind}: p99 {p:?}, worst {worst:?}"));
        assert!(p < Duration::from_millis(50), "{}", report.join("; "));
    }
    // A change nobody made through edgenode: redis-cli on the hash itself.
    let mut times = Vec::new();
    for trial in 0..20 {
        let id = id_of(&cs[0].create("{}"));
        for c in &cs {
            warm(c, &id);
        }
        let out = redis_cli(
            &redis,
            &[
                "HSET",
                &format!("edgenode:s:{id}"),
                "m:\"by_hand\"",
                &trial.to_string(),
            ],
        );
        assert_eq!(out, "1", "redis-cli HSET");
        for c in &cs {
            times.push(time_to_see(c, &id, |a| {
                a.json()["metadata"]["by_hand"] == trial
            }));
        }
    }
    // Seen on every node (`time_to_see` bounds it); timed like the rest.
    times.sort();
    let median = times[times.len() / 2];
    report.push(format!(
        "redis-cli: median {median:?}, worst {:?}",
        times.last().unwrap()
    ));
    assert!(median < Duration::from_millis(50), "{}", report.join("; "));
    eprintln!(
        "propagation over {TRIALS} trials each: {}",
        report.join("; ")
    );
}

#[test]
fn a_copy_whose_counts_were_written_behind_still_hears_of_changes() {
    // Redis forgets who tracks a key when the key is written, the writer
    // included: the write-behind must leave the key tracked again, or the
    // node would keep serving a copy nobody tells it is stale.
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    let (_nodes, cs) = cluster(&redis);
    let c = &cs[1];
    let id = id_of(&cs[0].create("{}"));
    let key = format!("edgenode:s:{id}");
    warm(c, &id);
    for _ in 0..3 {
        assert_eq!(read(c, &id).status, 200);
    }
    let answered = read(c, &id).json()["request_count"].as_u64().unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || {
            redis_cli(&redis, &["HGET", &key, "n"]) == answered.to_string()
        }),
        "the counts were never written behind: {}",
        redis_cli(&redis, &["HGET", &key, "n"])
    );
    // The copy stayed (the node's own write does not invalidate it) ...
    let hits = near(c)["hits"].as_u64().unwrap_or(0);
    assert_eq!(read(c, &id).status, 200);
    assert!(
        near(c)["hits"].as_u64().unwrap_or(0) > hits,
        "served from the copy after its counts were written: {}",
        near(c)
    );
    // ... and a change made afterwards, by hand, reaches it.
    assert_eq!(redis_cli(&redis, &["HSET", &key, "m:\"after\"", "1"]), "1");
    time_to_see(c, &id, |a| a.json()["metadata"]["after"] == 1);
}

#[test]
fn with_its_invalidation_connection_killed_no_node_serves_from_its_cache_until_it_is_back() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    // Rare write-behind, so the three copies stay in place (see warm).
    let (_nodes, cs) = cluster_flushing_every(&redis, 5_000);
    let id = id_of(&cs[0].create(r#"{"metadata":{"v":0}}"#));
    for round in 1..=3 {
        for c in &cs {
            warm(c, &id);
        }
        // Every node's tracking connection, by the name it gives itself.
        let list = redis_cli(&redis, &["CLIENT", "LIST"]);
        let ids: Vec<&str> = list
            .lines()
            .filter(|l| l.contains("name=edgenode-near-"))
            .filter_map(|l| l.split_whitespace().next()?.strip_prefix("id="))
            .collect();
        assert_eq!(ids.len(), 3, "one tracking connection per node: {list}");
        for cid in &ids {
            assert_eq!(redis_cli(&redis, &["CLIENT", "KILL", "ID", cid]), "1");
        }
        // Changed by hand while no node hears invalidations: each node must
        // answer from Redis, not from its copy.
        redis_cli(
            &redis,
            &[
                "HSET",
                &format!("edgenode:s:{id}"),
                "m:\"v\"",
                &round.to_string(),
            ],
        );
        for c in &cs {
            let a = read(c, &id);
            assert_eq!(a.status, 200);
            assert_eq!(
                a.json()["metadata"]["v"],
                round,
                "stale copy served: {}",
                a.text
            );
        }
        // Each node comes back on a new connection, and serves from its cache
        // again, coherently.
        for c in &cs {
            assert!(
                wait_until(Duration::from_secs(5), || near_up(c)),
                "near cache not back: {}",
                near(c)
            );
            warm(c, &id);
        }
        let list = redis_cli(&redis, &["CLIENT", "LIST"]);
        assert_eq!(list.matches("name=edgenode-near-").count(), 3, "{list}");
    }
    redis_cli(
        &redis,
        &["HSET", &format!("edgenode:s:{id}"), "m:\"v\"", "99"],
    );
    for c in &cs {
        time_to_see(c, &id, |a| a.json()["metadata"]["v"] == 99);
    }
}

#[test]
fn three_hundred_touches_over_three_nodes_read_301_within_one_flush_interval() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    let (_nodes, cs) = cluster(&redis);
    let first = cs[0].get("/api/session");
    let id = id_of(&first.json());
    assert_eq!(first.json()["request_count"], 1);
    // 300 browser requests, 100 per node, from three clients at once.
    let highest: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = cs
            .iter()
            .map(|c| {
                let id = id.clone();
                scope.spawn(move || {
                    let mut highest = 0;
                    for _ in 0..100 {
                        let a = c.request("GET", "/api/session", &[("X-Session-ID", &id)], None);
                        assert_eq!(a.status, 200, "{}", a.text);
                        assert_eq!(a.json()["session_id"], id.as_str());
                        highest = highest.max(a.json()["request_count"].as_u64().unwrap());
                    }
                    highest
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let last = Instant::now();
    let hits: u64 = cs.iter().map(|c| near(c)["hits"].as_u64().unwrap()).sum();
    assert!(
        hits >= 250,
        "most touches came from the near caches: {hits}"
    );
    // Redis itself, not through a node (a read through one counts too).
    let count = || redis.cmd(&["HGET", &format!("edgenode:s:{id}"), "n"]);
    let landed = wait_until(Duration::from_secs(2), || count().contains("\r\n301\r\n"));
    let took = last.elapsed();
    assert!(landed, "redis holds {} after 300 touches", count());
    // One flush interval, plus the flush's own round trip and scheduling.
    assert!(
        took <= Duration::from_millis(FLUSH_MS + 60),
        "301 only after {took:?}"
    );
    assert!(highest.iter().all(|&h| h <= 301), "{highest:?}");
    // A read now counts itself too, on any node.
    assert_eq!(read(&cs[1], &id).json()["request_count"], 302);
    eprintln!("301 in redis {took:?} after the last touch; highest per node {highest:?}; {hits} cache hits");
}

#[test]
fn a_node_killed_with_sigkill_loses_at_most_one_flush_interval_of_counts_and_nothing_else() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    let (mut nodes, cs) = cluster(&redis);
    let created = cs[0].get("/api/session");
    let id = id_of(&created.json());
    let c = cs[0].clone();
    // Touches in a loop, each acknowledged one timed; a PATCH every 50.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (acks, patches) = std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let mut acks: Vec<Instant> = Vec::new();
            let mut patches: Vec<u32> = Vec::new();
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                if i % 50 == 0 {
                    let body = format!(r#"{{"metadata":{{"p{i}":true}}}}"#);
                    if let Ok(a) =
                        c.try_request("PATCH", &format!("/api/sessions/{id}"), &[], Some(&body))
                    {
                        if a.status == 200 {
                            patches.push(i);
                        }
                    }
                    continue;
                }
                match c.try_request("GET", "/api/session", &[("X-Session-ID", &id)], None) {
                    Ok(a) if a.status == 200 => acks.push(Instant::now()),
                    _ => break,
                }
            }
            (acks, patches)
        });
        std::thread::sleep(Duration::from_millis(1500));
        nodes[0].kill9();
        let killed = Instant::now();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (acks, patches) = worker.join().unwrap();
        (
            acks.into_iter()
                .map(|t| killed.saturating_duration_since(t))
                .collect::<Vec<_>>(),
            patches,
        )
    });
    // Redis now, read without counting.
    let n: u64 = redis
        .cmd(&["HGET", &format!("edgenode:s:{id}"), "n"])
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("the session is still in redis");
    let acknowledged = acks.len() as u64 + 1;
    let lost = acknowledged.saturating_sub(n);
    // What was acknowledged in the last flush interval (and the slack of
    // a flush in progress) is all that may be missing.
    let window = Duration::from_millis(FLUSH_MS * 2);
    let recent = acks.iter().filter(|&&ago| ago <= window).count() as u64;
    eprintln!(
        "{} touches acknowledged, redis counts {n}: {lost} lost, {recent} acknowledged in the last {window:?}",
        acknowledged
    );
    assert!(acknowledged > 200, "too little traffic to mean anything");
    assert!(
        lost <= recent,
        "lost {lost}, more than the last interval's {recent}"
    );
    assert!(n <= acknowledged + 1, "counted more than was sent");
    // Every acknowledged PATCH is there, on every surviving node.
    assert!(!patches.is_empty());
    for c in &cs[1..] {
        let s = read(c, &id).json();
        for i in &patches {
            assert_eq!(s["metadata"][format!("p{i}")], true, "PATCH {i} lost: {s}");
        }
    }
}

#[test]
fn a_draining_node_writes_its_counts_at_once_so_the_next_node_sees_them() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    // Counts written behind only every 10 s: without the drain's own
    // flush and write-through, Redis would lag behind every answer below.
    let node = Node::builder()
        .args(["--redis-url", &redis.url(), "--instance-id", "draining"])
        .args(["--touch-flush-ms", "10000", "--drain-delay-ms", "3000"])
        .start();
    let c = node.client();
    assert!(wait_until(Duration::from_secs(5), || near_up(&c)));
    let id = id_of(&c.get("/api/session").json());
    let in_redis = || redis.request_count(&id).expect("the session is in redis");
    let touch = || -> u64 {
        let a = c.request("GET", "/api/session", &[("X-Session-ID", &id)], None);
        assert_eq!(a.status, 200, "{}", a.text);
        a.json()["request_count"].as_u64().expect("a count")
    };
    for _ in 0..20 {
        touch();
    }
    assert!(near(&c)["hits"].as_u64().unwrap_or(0) > 0, "{}", near(&c));
    assert!(in_redis() < 21, "counts were written behind, not through");
    signal(node.pid(), libc::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(2), || c.get("/api/ready").status == 503),
        "the node did not start draining"
    );
    // Every use while draining is in Redis by the time it is answered,
    // with the counts cached before the drain under it.
    for _ in 0..10 {
        let n = touch();
        assert_eq!(in_redis(), n, "a draining node's count lags in redis");
    }
    assert_eq!(in_redis(), 31);
}

#[test]
fn a_redis_user_not_allowed_client_tracking_leaves_the_cache_off_and_the_node_serving() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    // An ACL user that may do everything but HELLO and CLIENT: no RESP3, no
    // tracking. (Redis 5 and older have neither at all.)
    assert_eq!(
        redis.cmd(&[
            "ACL", "SETUSER", "plain", "on", ">pw", "~*", "&*", "+@all", "-hello", "-client"
        ]),
        "+OK\r\n"
    );
    let url = format!("redis://plain:pw@127.0.0.1:{}/", redis.port);
    let node = Node::builder().args(["--redis-url", &url]).start();
    let c = node.client();
    assert!(wait_until(Duration::from_secs(5), || c
        .get("/api/health")
        .json()["store"]["active"]
        == "redis"));
    let id = id_of(&c.create("{}"));
    for n in 1..=5 {
        assert_eq!(read(&c, &id).json()["request_count"], n);
    }
    // Every use was read from Redis (nothing was cached), and counted in it
    // through the write-behind.
    assert!(
        redis.wait_request_count(&id, 5),
        "{:?}",
        redis.request_count(&id)
    );
    let nc = near(&c);
    assert_eq!(nc["up"], false, "{nc}");
    assert_eq!(nc["hits"], 0, "{nc}");
    assert!(
        wait_until(Duration::from_secs(5), || node
            .log_text()
            .contains("near cache unavailable")),
        "the reason is logged: {}",
        node.log_text()
    );
}

#[test]
fn a_silent_redis_takes_the_cache_out_of_service_within_a_ping_and_a_store_timeout() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    let (_node, c) = node_on(&redis, &["--store-timeout-ms", "250"]);
    let id = id_of(&c.create("{}"));
    warm(&c, &id);
    // SIGSTOP: the connection stays open and nothing comes back, as when a
    // cable is pulled. No request is made meanwhile: the ping alone notices.
    redis.stop();
    let t0 = Instant::now();
    let noticed = wait_until(Duration::from_secs(3), || !near_up(&c));
    let took = t0.elapsed();
    redis.cont();
    assert!(noticed, "the near cache stayed up with redis silent");
    assert!(
        took <= Duration::from_millis(250 + 250 + 150),
        "noticed after {took:?}"
    );
    // Back, with a new connection; the session is still right.
    assert!(wait_until(Duration::from_secs(5), || near_up(&c)));
    assert_eq!(read(&c, &id).status, 200);
    eprintln!("a silent redis took the near cache out of service in {took:?}");
}

#[test]
fn killing_the_cache_connection_under_traffic_neither_fails_the_node_over_nor_miscounts() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    // A write-behind every millisecond: one is nearly always in flight on
    // the connection when it is killed.
    let (_node, c) = node_on(&redis, &["--touch-flush-ms", "1"]);
    let id = id_of(&c.get("/api/session").json());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (acked, kills) = std::thread::scope(|scope| {
        let users: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let a = c.request("GET", "/api/session", &[("X-Session-ID", &id)], None);
                        assert_eq!(a.status, 200, "{}", a.text);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        // Kill the node's cache connection again and again (it reconnects
        // within ~100 ms each time), with uses, fills and flushes in flight.
        let mut kills = 0;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            let list = redis_cli(&redis, &["CLIENT", "LIST"]);
            for cid in list
                .lines()
                .filter(|l| l.contains("name=edgenode-near-"))
                .filter_map(|l| l.split_whitespace().next()?.strip_prefix("id="))
            {
                if redis_cli(&redis, &["CLIENT", "KILL", "ID", cid]) == "1" {
                    kills += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let acked: u64 = users.into_iter().map(|u| u.join().unwrap()).sum();
        (acked, kills)
    });
    assert!(kills >= 5, "only {kills} kills");
    let h = c.get("/api/health").json();
    assert_eq!(h["store"]["failovers"], 0, "the node fell back: {h}");
    // Every acknowledged use, and the creating one, exactly once.
    assert!(
        redis.wait_request_count(&id, acked + 1),
        "redis holds {:?}, {} acknowledged",
        redis.request_count(&id),
        acked + 1
    );
    eprintln!(
        "{kills} kills of the cache connection under {acked} uses: counts exact, no failover"
    );
}

/// The shape of a LAN of browsers: many sessions, each used now and then.
/// Such a use is one plain read of the record, never cached, and its count
/// reaches Redis with the other counts of its flush in one batch call:
/// every count lands exactly, no node holds a copy, and Redis ran far fewer
/// scripts than there were uses.
#[test]
fn sessions_used_now_and_then_are_read_through_and_counted_in_batches() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    let (_nodes, cs) = cluster(&redis);
    let ids: Vec<String> = (0..150)
        .map(|i| id_of(&cs[i % 3].create(&format!(r#"{{"user_id":"browser-{i}"}}"#))))
        .collect();
    redis_cli(&redis, &["CONFIG", "RESETSTAT"]);
    // Each session used once on each node, at most once per node within
    // the admission window: none is taken into a near cache.
    for c in &cs {
        for id in &ids {
            let a = c.request("GET", "/api/session", &[("X-Session-ID", id)], None);
            assert_eq!(a.status, 200, "{}", a.text);
            assert_eq!(a.json()["session_id"], id.as_str());
            let n = a.json()["request_count"].as_u64().unwrap_or(0);
            assert!((1..=3).contains(&n), "{n}");
        }
    }
    // (The admission table hashes ids into 65 536 slots: two of 150
    // sessions sharing one, the second may be taken in; by design.)
    for c in &cs {
        let n = near(c);
        assert!(
            n["entries"].as_u64().unwrap_or(99) <= 3,
            "sessions used once were cached: {n}"
        );
        assert!(n["unadmitted"].as_u64().unwrap_or(0) >= 145, "{n}");
    }
    // Every count lands: three uses each, in Redis itself.
    let counted = |id: &str| redis_cli(&redis, &["HGET", &format!("edgenode:s:{id}"), "n"]);
    assert!(
        wait_until(Duration::from_secs(2), || ids
            .iter()
            .all(|id| counted(id) == "3")),
        "counts in redis: {:?}",
        ids.iter().map(|id| counted(id)).collect::<Vec<_>>()
    );
    // 450 uses: one read each, no transaction on the request path, and the
    // counts in a few batch calls (a flush carries every count of its
    // 100 ms). The only transactions are the write-behind of the odd
    // session taken in (its counts and the re-read that keeps it tracked),
    // one at most for each use that was not read through.
    let taken_in: u64 = cs
        .iter()
        .map(|c| 150u64.saturating_sub(near(c)["unadmitted"].as_u64().unwrap_or(0)))
        .sum();
    let stats = redis_cli(&redis, &["INFO", "commandstats"]);
    let calls = |cmd: &str| calls_of(&stats, cmd);
    assert_eq!(calls("hgetall"), 450, "{stats}");
    assert!(calls("exec") <= taken_in, "{taken_in} taken in: {stats}");
    assert!(calls("evalsha") < 150, "a script per use or so: {stats}");
    assert_eq!(calls("hincrby"), 450, "{stats}");
    // A read through any node now counts itself on top of the three.
    assert_eq!(read(&cs[1], &ids[0]).json()["request_count"], 4);
}

/// Redis's copy of the sliding expiry moves in steps of a thousandth of the
/// TTL (at least a second): a use within a step of the last slide leaves
/// the record's expiry and the key's TTL alone, a use past it slides both.
#[test]
fn the_expiry_in_redis_slides_in_steps_not_on_every_use() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    // 20 s of idle TTL: a step of one second.
    let node = Node::builder()
        .args(["--redis-url", &redis.url(), "--session-ttl-secs", "20"])
        .start();
    let c = node.client();
    let id = id_of(&c.create("{}"));
    let key = format!("edgenode:s:{id}");
    let expiry = || -> u64 { redis_cli(&redis, &["HGET", &key, "e"]).parse().unwrap_or(0) };
    let created = expiry();
    assert!(created > 0);
    assert_eq!(read(&c, &id).status, 200);
    assert!(
        wait_until(Duration::from_secs(2), || redis_cli(
            &redis,
            &["HGET", &key, "n"]
        ) == "1"),
        "the use was not counted"
    );
    assert_eq!(
        expiry(),
        created,
        "a use within the step rewrote the expiry"
    );
    // Time passing is what is under test here, not a readiness wait.
    std::thread::sleep(Duration::from_millis(1_200));
    assert_eq!(read(&c, &id).status, 200);
    assert!(
        wait_until(Duration::from_secs(2), || expiry() >= created + 1_000),
        "the expiry did not slide past a step: {} -> {}",
        created,
        expiry()
    );
    let pttl: u64 = redis_cli(&redis, &["PTTL", &key]).parse().unwrap_or(0);
    assert!(pttl > 19_000, "the key's TTL did not slide: {pttl}");
}

/// The active index (the sorted set behind `sessions.active`) holds each
/// session's expiry rounded up to a thousandth of the absolute lifetime:
/// never below the record's expiry, so a live session is never pruned from
/// the count, and a slide that stays within that step costs no update of
/// an index of every live session.
#[test]
fn the_active_index_follows_the_expiry_in_coarser_steps_and_never_below_it() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    // A step of 1 s for the record's expiry, 100 s for the index's score.
    let node = Node::builder()
        .args([
            "--redis-url",
            &redis.url(),
            "--session-ttl-secs",
            "20",
            "--session-max-lifetime-secs",
            "100000",
        ])
        .start();
    let c = node.client();
    let id = id_of(&c.create("{}"));
    let key = format!("edgenode:s:{id}");
    let expiry = || -> u64 { redis_cli(&redis, &["HGET", &key, "e"]).parse().unwrap_or(0) };
    let score = || -> u64 {
        redis_cli(&redis, &["ZSCORE", "edgenode:active", &id])
            .parse()
            .unwrap_or(0)
    };
    let rounded = |e: u64| e.div_ceil(100_000) * 100_000;
    let created = expiry();
    assert!(created > 0);
    assert_eq!(score(), rounded(created), "at create, expiry {created}");

    redis_cli(&redis, &["CONFIG", "RESETSTAT"]);
    // Time passing is what is under test here, not a readiness wait.
    std::thread::sleep(Duration::from_millis(1_200));
    assert_eq!(read(&c, &id).status, 200);
    assert!(
        wait_until(Duration::from_secs(2), || expiry() >= created + 1_000),
        "the expiry did not slide past a step"
    );
    let slid = expiry();
    assert_eq!(score(), rounded(slid), "after the slide, expiry {slid}");
    assert!(score() >= slid);
    let stats = redis_cli(&redis, &["INFO", "commandstats"]);
    let zadds = calls_of(&stats, "zadd");
    let moved = u64::from(rounded(slid) != rounded(created));
    assert_eq!(
        zadds, moved,
        "index updates for a slide of {created} -> {slid}: {stats}"
    );
    assert_eq!(
        c.get("/api/health").json()["sessions"]["active"],
        1,
        "the live session is counted"
    );
}

/// A Redis refusing writes (here: out of memory under `noeviction`) refuses
/// the batch call that writes the counts of sessions used now and then.
/// Those counts are not dropped as if the records were bad: the node fails
/// over, journals them under their ids, and replays them once Redis takes
/// writes again; each lands exactly once.
#[test]
fn counts_written_behind_that_redis_refuses_are_journaled_and_land_once() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    let (_node, c) = node_on(&redis, &[]);
    let ids: Vec<String> = (0..20)
        .map(|i| id_of(&c.create(&format!(r#"{{"user_id":"refused-{i}"}}"#))))
        .collect();
    redis_cli(&redis, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis_cli(&redis, &["CONFIG", "SET", "maxmemory", "1"]);
    // Reads still work: each use is read through and answered.
    for id in &ids {
        let a = c.request("GET", "/api/session", &[("X-Session-ID", id)], None);
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.json()["request_count"], 1);
    }
    let mode = |c: &Client| c.get("/api/health").json()["store"]["active"].clone();
    assert!(
        wait_until(Duration::from_secs(3), || mode(&c) == "sled"),
        "a refused write-behind did not fail the node over: {}",
        c.get("/api/health").text
    );
    let h = c.get("/api/health").json();
    assert_eq!(h["store"]["corrupt_records"], 0, "{h}");
    redis_cli(&redis, &["CONFIG", "SET", "maxmemory", "0"]);
    assert!(
        wait_until(Duration::from_secs(15), || mode(&c) == "redis"),
        "{}",
        c.get("/api/health").text
    );
    let counted = |id: &str| redis_cli(&redis, &["HGET", &format!("edgenode:s:{id}"), "n"]);
    assert!(
        wait_until(Duration::from_secs(2), || ids
            .iter()
            .all(|id| counted(id) == "1")),
        "counts in redis after the replay: {:?}",
        ids.iter().map(|id| counted(id)).collect::<Vec<_>>()
    );
}

/// A browser's visits, one after another on one node, each read one more
/// than the last, while the node writes its counts behind as fast as it
/// can (`--touch-flush-ms 1`). A session's second use takes it into the
/// near cache by a read of Redis; that read can cross the flush carrying
/// the first use's count, and its answer must count that use whether or
/// not Redis had applied it yet (CI once saw a node answer 35 twice).
#[test]
fn visits_one_after_another_each_count_one_more_while_counts_are_written_behind() {
    let _one = one_at_a_time();
    let redis = Redis::start(false);
    let (_node, c) = node_on(&redis, &["--touch-flush-ms", "1"]);
    let ids: Vec<String> = (0..300)
        .map(|i| id_of(&c.create(&format!(r#"{{"user_id":"browser-{i}"}}"#))))
        .collect();
    let mut repeated = Vec::new();
    for id in &ids {
        let mut last = 0;
        for visit in 1..=3u64 {
            let a = c.request("GET", "/api/session", &[("X-Session-ID", id)], None);
            assert_eq!(a.status, 200, "{}", a.text);
            let n = a.json()["request_count"].as_u64().unwrap_or(0);
            if n != last + 1 {
                repeated.push(format!("{id}: visit {visit} read {n} after {last}"));
            }
            last = n;
        }
    }
    assert!(
        repeated.is_empty(),
        "{} of 300 browsers: {repeated:?}",
        repeated.len()
    );
    // And Redis holds every use.
    let counted = |id: &str| redis_cli(&redis, &["HGET", &format!("edgenode:s:{id}"), "n"]);
    assert!(
        wait_until(Duration::from_secs(2), || ids
            .iter()
            .all(|id| counted(id) == "3")),
        "counts in redis: {:?}",
        ids.iter()
            .map(|id| counted(id))
            .filter(|n| n != "3")
            .collect::<Vec<_>>()
    );
}

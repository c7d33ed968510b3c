//! The fault rules, each as an operator meets it: a logout made during an
//! outage on a node that never saw the session, a cookie from another node
//! during a failover, a Redis that comes back empty, a disk that fills up, a
//! node killed in the middle of a replay, a Redis slower than the store
//! timeout, a board whose clock is not yet set, and a data directory written
//! by the previous release. Real redis-server and edgenode processes; the end
//! state is checked on every node.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

fn node_on(redis: &Redis, name: &str) -> Node {
    node_with(redis, name, &[])
}

fn node_with(redis: &Redis, name: &str, extra: &[&str]) -> Node {
    Node::builder()
        .args(["--redis-url", &redis.url(), "--instance-id", name])
        .args(["--store-timeout-ms", "250"])
        .args([
            "--redis-probe-interval-ms",
            "50",
            "--redis-probe-max-ms",
            "200",
        ])
        .args(extra.iter().copied())
        .start()
}

fn health(c: &Client) -> Value {
    c.get("/api/health").json()
}

fn wait_mode(c: &Client, mode: &str, within: Duration) {
    assert!(
        wait_until(within, || {
            let h = health(c);
            h["store"]["active"] == mode && (mode == "sled" || h["store"]["pending_sync"] == 0)
        }),
        "node did not reach {mode} mode: {}",
        health(c)
    );
}

/// Sends requests that use Redis until the node notices it is gone.
fn push_into_fallback(c: &Client) {
    assert!(
        wait_until(Duration::from_secs(5), || {
            let _ = c.try_request(
                "GET",
                "/api/sessions/00000000-0000-4000-8000-000000000000",
                &[],
                None,
            );
            health(c)["store"]["active"] == "sled"
        }),
        "node did not fail over: {}",
        health(c)
    );
}

#[test]
fn a_logout_during_an_outage_is_never_lost_and_a_failover_logs_nobody_out() {
    let mut redis = Redis::start(true);
    let nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| node_on(&redis, n)).collect();
    let cs: Vec<Client> = nodes.iter().map(Node::client).collect();
    for c in &cs {
        wait_mode(c, "redis", Duration::from_secs(5));
    }
    // Dave logs in on B twice (two devices) and once on C; Erin on B.
    let dave_b = id_of(&cs[1].create(r#"{"user_id":"dave"}"#));
    let dave_b2 = id_of(&cs[1].create(r#"{"user_id":"dave"}"#));
    let dave_c = id_of(&cs[2].create(r#"{"user_id":"dave"}"#));
    let erin_b = id_of(&cs[1].create(r#"{"user_id":"erin"}"#));
    let browser = cs[1].get("/api/session");
    let browser_id = id_of(&browser.json());

    redis.kill9();
    for c in &cs {
        push_into_fallback(c);
    }

    // A never saw any of these sessions.
    let one = cs[0].delete(&format!("/api/sessions/{erin_b}"));
    assert_eq!(one.status, 202, "{}", one.text);
    assert_eq!(one.json()["deleted"], 0);
    assert_eq!(one.json()["pending_sync"], true);
    let all = cs[0].delete("/api/users/dave/sessions");
    assert_eq!(all.status, 202, "{}", all.text);
    assert_eq!(all.json()["deleted"], 0);

    // A browser whose cookie B issued lands on A: not logged out.
    let cookie = format!("session_id={browser_id}");
    let a = cs[0].request("GET", "/api/session", &[("cookie", &cookie)], None);
    assert_eq!(a.status, 503, "{}", a.text);
    assert_eq!(a.code(), "store_unavailable");
    assert!(a.header("retry-after").is_some());
    assert!(a.header("set-cookie").is_none(), "the cookie is kept");
    let by_id = cs[0].get(&format!("/api/sessions/{browser_id}"));
    assert_eq!(by_id.status, 503);
    assert_eq!(by_id.code(), "store_unavailable");
    // ... while B, which holds it, serves it.
    let b = cs[1].request("GET", "/api/session", &[("cookie", &cookie)], None);
    assert_eq!(b.status, 200);
    assert_eq!(id_of(&b.json()), browser_id);
    // A session A deleted itself is known gone: 404, and a browser gets a
    // new session.
    let deleted_here = cs[0].get(&format!("/api/sessions/{erin_b}"));
    assert_eq!(deleted_here.status, 404);

    redis.restart();
    for c in &cs {
        wait_mode(c, "redis", Duration::from_secs(10));
    }
    for (i, c) in cs.iter().enumerate() {
        for id in [&dave_b, &dave_b2, &dave_c, &erin_b] {
            assert_eq!(
                c.get(&format!("/api/sessions/{id}")).status,
                404,
                "node {i} serves {id}, logged out during the outage"
            );
        }
        let listed = c.get("/api/users/dave/sessions").json();
        assert_eq!(listed["sessions"].as_array().map(Vec::len), Some(0));
        // The browser's session survived the whole story.
        assert_eq!(
            c.get(&format!("/api/sessions/{browser_id}")).status,
            200,
            "node {i} lost the browser's session"
        );
    }
    // A new login of dave after the outage is not caught by the old logout.
    let again = id_of(&cs[0].create(r#"{"user_id":"dave"}"#));
    assert_eq!(cs[2].get(&format!("/api/sessions/{again}")).status, 200);
}

#[test]
fn redis_restarted_empty_is_reseeded_from_every_nodes_mirror() {
    let mut redis = Redis::start(false);
    let nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| node_on(&redis, n)).collect();
    let cs: Vec<Client> = nodes.iter().map(Node::client).collect();
    for c in &cs {
        wait_mode(c, "redis", Duration::from_secs(5));
    }
    let mut ids: Vec<(String, String)> = Vec::new();
    for (i, c) in cs.iter().enumerate() {
        for k in 0..10 {
            let user = format!("u{i}-{k}");
            let s = c.create(&format!(r#"{{"user_id":"{user}","metadata":{{"k":{k}}}}}"#));
            ids.push((id_of(&s), user));
        }
    }
    // Deleted before the loss, on another node than the one that created it.
    let gone = id_of(&cs[0].create(r#"{"user_id":"gone"}"#));
    assert_eq!(cs[1].delete(&format!("/api/sessions/{gone}")).status, 204);
    // The deletion has reached the creating node's mirror (pub/sub).
    assert!(wait_until(Duration::from_secs(3), || {
        health(&cs[0])["store"]["deletions_heard"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    }));

    redis.kill9();
    // No persistence: it comes back empty (the nodes may write their first
    // keys at once, so its size is not checked here).
    redis.restart();

    let started = Instant::now();
    for (i, c) in cs.iter().enumerate() {
        for (id, user) in &ids {
            let path = format!("/api/sessions/{id}");
            assert!(
                wait_until(Duration::from_secs(10), || {
                    let a = c.get(&path);
                    a.status == 200 && a.json()["user_id"] == user.as_str()
                }),
                "node {i}: {id} not back after redis lost it: {}",
                c.get(&path).text
            );
        }
        assert_eq!(
            c.get(&format!("/api/sessions/{gone}")).status,
            404,
            "a session deleted before the loss came back"
        );
    }
    println!(
        "31 sessions back on 3 nodes within {} ms",
        started.elapsed().as_millis()
    );
    let logs: String = nodes.iter().map(Node::log_text).collect();
    assert!(logs.contains("re-seeded them from the mirror"), "{logs}");
}

/// Mounts a tmpfs of `mb` MiB on `dir`; `None` (with the reason printed)
/// where this machine does not allow it.
fn tmpfs(dir: &std::path::Path, mb: u64) -> Option<TmpfsMount> {
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
        .arg(dir)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(TmpfsMount(dir.to_path_buf())),
        Ok(o) => {
            println!(
                "SKIPPED: cannot mount a tmpfs here ({}); the disk-full test needs root",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            println!("SKIPPED: cannot run mount ({e})");
            None
        }
    }
}

struct TmpfsMount(std::path::PathBuf);

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills `path` until `free_kb` KiB are left on its file system.
fn ballast(path: &std::path::Path, fs_dir: &std::path::Path, leave_kb: u64) {
    let out = std::process::Command::new("df")
        .args(["-k", "--output=avail"])
        .arg(fs_dir)
        .output()
        .expect("df");
    let avail: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df avail");
    let size = avail.saturating_sub(leave_kb) * 1024;
    std::fs::write(path, vec![0x5a; size as usize]).expect("ballast");
}

/// Creates sessions of ~1 KB until the node refuses one, each answered
/// within the 2 s request timeout; returns the acknowledged ids and the
/// refusal.
fn fill_until_refused(c: &Client, user: &str) -> (Vec<String>, Answer) {
    let meta = "x".repeat(900);
    let mut acked = Vec::new();
    for i in 0..20_000 {
        let t = Instant::now();
        let body = format!(r#"{{"user_id":"{user}{i}","metadata":{{"pad":"{meta}"}}}}"#);
        let a = c
            .try_request("POST", "/api/sessions", &[], Some(&body))
            .unwrap_or_else(|e| panic!("a write got no answer after {:?}: {e}", t.elapsed()));
        assert!(
            t.elapsed() < Duration::from_millis(2_500),
            "a write hung for {:?}",
            t.elapsed()
        );
        if a.status != 201 {
            return (acked, a);
        }
        acked.push(id_of(&a.json()));
    }
    panic!("the disk never filled");
}

/// An 8 MiB tmpfs holding a node's data directory and a ballast file that
/// leaves only a little space free.
struct SmallDisk {
    // Unmounted before the directory it is mounted on is removed.
    _mount: TmpfsMount,
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (with the reason printed) where no tmpfs can be mounted.
    fn new(leave_kb: u64) -> Option<SmallDisk> {
        let dir = tempdir();
        let mount = tmpfs(dir.path(), 8)?;
        let disk = SmallDisk { _mount: mount, dir };
        std::fs::create_dir_all(disk.data()).unwrap();
        disk.fill(leave_kb);
        Some(disk)
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("node")
    }

    fn ballast(&self) -> std::path::PathBuf {
        self.dir.path().join("ballast")
    }

    /// (Re)writes the ballast so that `leave_kb` KiB stay free.
    fn fill(&self, leave_kb: u64) {
        ballast(&self.ballast(), self.dir.path(), leave_kb);
    }
}

#[test]
fn a_full_disk_refuses_writes_in_time_loses_nothing_and_recovers_by_itself() {
    let Some(disk) = SmallDisk::new(3 * 1024) else {
        return;
    };
    let (data, ballast_file) = (disk.data(), disk.ballast());
    let mut node = Node::builder()
        .data_dir(&data)
        .args(["--min-free-mb", "1", "--request-timeout-ms", "2000"])
        .start();
    let c = node.client();

    // Write until the node refuses; every acknowledged create is recorded.
    let (mut acked, refused) = fill_until_refused(&c, "u");
    assert_eq!(refused.status, 507, "{}", refused.text);

    assert_eq!(refused.code(), "insufficient_storage");
    assert!(refused.header("retry-after").is_some());
    assert!(
        acked.len() > 100,
        "only {} writes before refusing",
        acked.len()
    );
    // No request hangs; the balancer is told to stop; health says why.
    for _ in 0..5 {
        let t = Instant::now();
        let a = c.post("/api/sessions", "{}");
        assert_eq!(a.status, 507);
        assert!(t.elapsed() < Duration::from_millis(2_500));
        let t = Instant::now();
        assert_eq!(c.get(&format!("/api/sessions/{}", acked[0])).status, 200);
        assert!(t.elapsed() < Duration::from_millis(2_500));
    }
    let ready = c.get("/api/ready");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.code(), "degraded");
    let h = health(&c);
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(
        h["degraded_reason"].as_str().unwrap_or("").contains("disk"),
        "{h}"
    );
    // A logout still lands (deletes may use half the reserve).
    let logout = acked.pop().unwrap();
    assert_eq!(c.delete(&format!("/api/sessions/{logout}")).status, 204);

    // The fault clears: the node recovers without a restart.
    std::fs::remove_file(&ballast_file).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || c.get("/api/ready").status == 200),
        "not ready after space came back: {}",
        health(&c)
    );
    assert_eq!(health(&c)["status"], "ok");
    let after = c.post("/api/sessions", r#"{"user_id":"after"}"#);
    assert_eq!(after.status, 201);
    acked.push(id_of(&after.json()));

    // Every acknowledged write survives a clean restart...
    assert!(node.terminate().success(), "{}", node.log_text());
    node.restart();
    let c = node.client();
    for id in &acked {
        assert_eq!(
            c.get(&format!("/api/sessions/{id}")).status,
            200,
            "{id} lost"
        );
    }
    assert_eq!(c.get(&format!("/api/sessions/{logout}")).status, 404);

    // ... and a second full disk ended by kill -9.
    disk.fill(3 * 1024);
    let (more, refused) = fill_until_refused(&c, "v");
    assert_eq!(refused.status, 507, "{}", refused.text);
    assert!(!more.is_empty());
    acked.extend(more);
    node.kill9();
    std::fs::remove_file(&ballast_file).unwrap();
    node.restart();
    let c = node.client();
    for id in &acked {
        assert_eq!(
            c.get(&format!("/api/sessions/{id}")).status,
            200,
            "{id} lost after kill -9"
        );
    }
    println!(
        "{} acknowledged creates across two disk-full episodes, all readable",
        acked.len()
    );
}

#[test]
fn a_disk_filled_by_someone_else_is_a_fault_the_node_reopens_its_store_after() {
    // No reserve: the disk fills under sled itself (another program filled
    // it faster than the node could look), and sled refuses every write
    // from then on until the database is reopened.
    let Some(disk) = SmallDisk::new(2 * 1024) else {
        return;
    };
    let (data, ballast_file) = (disk.data(), disk.ballast());
    let mut node = Node::builder()
        .data_dir(&data)
        .args(["--min-free-mb", "0", "--request-timeout-ms", "2000"])
        .start();
    let c = node.client();
    let (mut acked, failed) = fill_until_refused(&c, "u");
    assert!(
        [503, 507].contains(&failed.status),
        "{} {}",
        failed.status,
        failed.text
    );
    assert!(failed.header("retry-after").is_some());
    assert!(wait_until(Duration::from_secs(3), || {
        c.get("/api/ready").status == 503 && health(&c)["status"] == "degraded"
    }));
    println!("degraded: {}", health(&c)["degraded_reason"]);

    std::fs::remove_file(&ballast_file).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || c.get("/api/ready").status
            == 200),
        "not ready after space came back: {}\n{}",
        health(&c),
        node.log_text()
    );
    assert!(node.log_text().contains("reopened after a disk fault"));
    let after = c.post("/api/sessions", r#"{"user_id":"after"}"#);
    assert_eq!(after.status, 201, "{}", after.text);
    acked.push(id_of(&after.json()));
    for id in &acked {
        assert_eq!(
            c.get(&format!("/api/sessions/{id}")).status,
            200,
            "{id} lost"
        );
    }
    assert!(node.terminate().success(), "{}", node.log_text());
    node.restart();
    let c = node.client();
    for id in &acked {
        assert_eq!(
            c.get(&format!("/api/sessions/{id}")).status,
            200,
            "{id} lost after restart"
        );
    }
}

#[test]
fn the_journal_coalesces_touches_and_keeps_logouts_at_its_budget() {
    let mut redis = Redis::start(true);
    let node = node_on(&redis, "n1");
    let c = node.client();
    wait_mode(&c, "redis", Duration::from_secs(5));
    let hot = id_of(&c.create("{}"));
    let hot_path = format!("/api/sessions/{hot}");
    redis.kill9();
    push_into_fallback(&c);

    let started = Instant::now();
    let mut touches = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        assert_eq!(c.get(&hot_path).status, 200);
        touches += 1;
    }
    assert!(wait_until(Duration::from_secs(2), || {
        health(&c)["store"]["pending_sync"].as_u64().unwrap_or(0) >= 1
    }));
    let h = health(&c);
    let entries = h["store"]["pending_sync"].as_u64().unwrap();
    // one entry per session per half second, not one per request
    assert!(
        entries <= 8,
        "{touches} touches made {entries} journal entries: {h}"
    );
    assert!(h["store"]["journal_bytes"].as_u64().unwrap() < 1_000, "{h}");

    redis.restart();
    wait_mode(&c, "redis", Duration::from_secs(10));
    let s = c.get(&hot_path).json();
    assert_eq!(s["request_count"], touches + 1, "every touch counted once");
    drop(node);

    // A journal budget of 0: during an outage, new sessions and changes are
    // refused (507 journal_full), logouts still accepted and applied later.
    let node = node_with(&redis, "n2", &["--max-journal-mb", "0"]);
    let c = node.client();
    wait_mode(&c, "redis", Duration::from_secs(5));
    let kept = id_of(&c.create(r#"{"user_id":"kay"}"#));
    let out = id_of(&c.create(r#"{"user_id":"kay"}"#));
    redis.kill9();
    push_into_fallback(&c);
    let refused = c.post("/api/sessions", r#"{"user_id":"new"}"#);
    assert_eq!(refused.status, 507, "{}", refused.text);
    assert_eq!(refused.code(), "journal_full");
    let p = c.patch(&format!("/api/sessions/{kept}"), r#"{"metadata":{"a":1}}"#);
    assert_eq!(p.status, 507);
    assert_eq!(c.get(&format!("/api/sessions/{kept}")).status, 200);
    assert_eq!(c.delete(&format!("/api/sessions/{out}")).status, 202);
    redis.restart();
    wait_mode(&c, "redis", Duration::from_secs(10));
    assert_eq!(c.get(&format!("/api/sessions/{out}")).status, 404);
    let k = c.get(&format!("/api/sessions/{kept}")).json();
    assert_eq!(k["version"], 1, "the refused patch changed nothing: {k}");
    assert!(health(&c)["store"]["touches_unjournaled"].as_u64().unwrap() >= 1);
}

/// What was acknowledged for one session.
#[derive(Default, Clone)]
struct Expected {
    count: u64,
    version: u64,
    last: i64,
}

#[test]
fn replay_killed_at_random_points_applies_everything_exactly_once_and_in_order() {
    let mut redis = Redis::start(true);
    // Small batches: a replay spans many round trips and flushes.
    let mut node = node_with(&redis, "n1", &["--replay-batch", "16"]);
    let c = node.client();
    wait_mode(&c, "redis", Duration::from_secs(5));
    // Three sessions are patched in order; three hundred more are each read
    // once per round, so every replay spans several batches.
    let patched: Vec<String> = (0..3).map(|_| id_of(&c.create("{}"))).collect();
    let read: Vec<String> = (0..300).map(|_| id_of(&c.create("{}"))).collect();
    let mut want: Vec<Expected> = vec![
        Expected {
            count: 0,
            version: 1,
            last: -1
        };
        3
    ];
    let mut reads = 0u64;
    let mut rng = 0x2545_f491_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut mid_replay = 0;
    for round in 0..20 {
        let c = node.client();
        redis.kill9();
        push_into_fallback(&c);
        for id in &read {
            assert_eq!(c.get(&format!("/api/sessions/{id}")).status, 200);
        }
        reads += 1;
        // Interleaved reads and patches: each patch's flush makes what came
        // before it durable too.
        for i in 0..8 {
            for (k, id) in patched.iter().enumerate() {
                let path = format!("/api/sessions/{id}");
                assert_eq!(c.get(&path).status, 200);
                want[k].count += 1;
                let v = round * 100 + i;
                let p = c.patch(&path, &format!(r#"{{"metadata":{{"last":{v}}}}}"#));
                assert_eq!(p.status, 200, "{}", p.text);
                want[k].version += 1;
                want[k].last = v;
            }
        }
        // The coalesced reads reach the journal within half a second (a
        // touch counted in memory and not yet journaled is what kill -9 may
        // lose): 300 entries for the read sessions, and for the patched ones
        // 24 patches each preceded by its read. One more patch then flushes
        // them all.
        let full = 300 + 24 + 24;
        assert!(wait_until(Duration::from_secs(3), || health(&c)["store"]
            ["pending_sync"]
            .as_u64()
            .unwrap_or(0)
            >= full));
        let path = format!("/api/sessions/{}", patched[0]);
        let v = round * 100 + 99;
        assert_eq!(
            c.patch(&path, &format!(r#"{{"metadata":{{"last":{v}}}}}"#))
                .status,
            200
        );
        want[0].version += 1;
        want[0].last = v;

        redis.restart();
        if round % 2 == 0 {
            // Somewhere before, in or after the replay.
            std::thread::sleep(Duration::from_millis(next() % 60));
        } else {
            // Once the first batches have left the journal.
            assert!(wait_until(Duration::from_secs(10), || {
                health(&c)["store"]["pending_sync"].as_u64().unwrap_or(0) < full
            }));
        }
        let pending = health(&c)["store"]["pending_sync"].as_u64().unwrap_or(0);
        if pending > 0 && pending < full {
            mid_replay += 1;
        }
        if (round / 2) % 2 == 0 {
            node.kill9();
        } else {
            assert!(node.terminate().success(), "{}", node.log_text());
        }
        node.restart();
        wait_mode(&node.client(), "redis", Duration::from_secs(10));
    }
    println!("{mid_replay} of 20 kills landed in the middle of a replay");
    assert!(mid_replay >= 5, "{mid_replay}");
    let c = node.client();
    for (k, id) in patched.iter().enumerate() {
        let s = c.get(&format!("/api/sessions/{id}")).json();
        assert_eq!(s["request_count"], want[k].count + 1, "session {k}: {s}");
        assert_eq!(s["version"], want[k].version, "session {k}: {s}");
        assert_eq!(
            s["metadata"]["last"], want[k].last,
            "patch order, session {k}: {s}"
        );
    }
    for id in &read {
        let s = c.get(&format!("/api/sessions/{id}")).json();
        assert_eq!(s["request_count"], reads + 1, "{s}");
    }
}

#[test]
fn a_redis_slower_than_the_store_timeout_for_five_seconds_counts_exactly() {
    let redis = Redis::start(true);
    let node = node_on(&redis, "n1");
    let c = node.client();
    wait_mode(&c, "redis", Duration::from_secs(5));
    let ids: Vec<String> = (0..3).map(|_| id_of(&c.create("{}"))).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = ids
        .iter()
        .cloned()
        .map(|id| {
            let c = c.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut count, mut patches, mut last) = (0u64, 0u64, -1i64);
                let mut i = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let path = format!("/api/sessions/{id}");
                    if let Ok(a) = c.try_request("GET", &path, &[], None) {
                        if a.status == 200 {
                            count += 1;
                        }
                    }
                    i += 1;
                    let body = format!(r#"{{"metadata":{{"last":{i}}}}}"#);
                    if let Ok(a) = c.try_request("PATCH", &path, &[], Some(&body)) {
                        if a.status == 200 {
                            patches += 1;
                            last = i;
                        }
                    }
                }
                (id, count, patches, last)
            })
        })
        .collect();
    // Five seconds of a Redis that answers late: stalled 400 ms, then let
    // go for 100 ms, over and over.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        redis.stop();
        std::thread::sleep(Duration::from_millis(400));
        redis.cont();
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    wait_mode(&c, "redis", Duration::from_secs(15));
    for (id, count, patches, last) in results {
        let s = c.get(&format!("/api/sessions/{id}")).json();
        assert_eq!(s["request_count"], count + 1, "{id}: {s}");
        assert_eq!(s["version"], patches + 1, "{id}: {s}");
        assert_eq!(s["metadata"]["last"], last, "{id}: {s}");
    }
    assert!(health(&c)["store"]["failovers"].as_u64().unwrap() >= 1);
}

#[test]
fn a_board_whose_clock_is_not_set_is_not_ready_and_writes_no_session() {
    let far = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 86_400_000)
        .to_string();
    let node = Node::builder()
        .env("EDGENODE_TEST_CLOCK_FLOOR_MS", &far)
        .spawn();
    let c = node.client();
    // Up and answering, but not ready, for this reason only.
    assert!(
        wait_until(Duration::from_secs(5), || c
            .try_request("GET", "/api/ready", &[], None)
            .is_ok_and(|a| a.code() == "degraded")),
        "{}",
        node.log_text()
    );
    assert_eq!(c.get("/api/ready").status, 503);
    let h = health(&c);
    assert!(
        h["degraded_reason"]
            .as_str()
            .unwrap_or("")
            .contains("clock"),
        "{h}"
    );
    let a = c.get("/api/session");
    assert_eq!(a.status, 503);
    assert!(a.header("set-cookie").is_none());
    assert_eq!(c.post("/api/sessions", "{}").status, 503);
    assert_eq!(h["sessions"]["active"], 0);
}

#[test]
fn a_data_directory_of_release_0_1_0_opens_and_its_journal_replays_once() {
    let dir = tempdir();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data-0.1.0.tar.gz"
    );
    let st = std::process::Command::new("tar")
        .args(["-xzf", fixture, "-C"])
        .arg(dir.path())
        .status()
        .expect("tar");
    assert!(st.success());
    // The harness keeps its database in DIR/db.
    std::fs::rename(dir.path().join("data"), dir.path().join("db")).unwrap();
    let redis = Redis::start(true); // a new, empty Redis
    let mut node = Node::builder()
        .data_dir(dir.path())
        .args(["--redis-url", &redis.url(), "--instance-id", "fixture"])
        .args([
            "--redis-probe-interval-ms",
            "50",
            "--session-ttl-secs",
            "3153600000",
            "--session-max-lifetime-secs",
            "3153600000",
        ])
        .start();
    let c = node.client();
    wait_mode(&c, "redis", Duration::from_secs(10));
    const ALICE: &str = "de9be543-9f94-475a-8579-25bae06d5059";
    const BOB: &str = "fbbc3dd6-888c-40a1-bca7-988b80222c41";
    const CAROL: &str = "5872eb18-a0c4-4522-9c9e-3c9fab1fa797";
    const DAVE: &str = "d23e0d5e-4290-44d3-b667-47b5201691e7";
    let check = |c: &Client, reads: u64| {
        let a = c.get(&format!("/api/sessions/{ALICE}")).json();
        assert_eq!(a["user_id"], "alice", "{a}");
        assert_eq!(a["request_count"], 3 + reads, "{a}");
        assert_eq!(a["version"], 2, "{a}");
        assert_eq!(a["metadata"]["lang"], "fr");
        assert_eq!(a["metadata"]["theme"], "dark");
        let cl = c.get(&format!("/api/sessions/{CAROL}")).json();
        assert_eq!(cl["request_count"], 2 + reads, "{cl}");
        assert_eq!(cl["version"], 2, "{cl}");
        assert_eq!(cl["metadata"]["k"], 2);
        assert_eq!(cl["metadata"]["x"], "y");
        let d = c.get(&format!("/api/sessions/{DAVE}")).json();
        assert_eq!(d["request_count"], 2 + reads, "{d}");
        assert_eq!(d["version"], 1, "{d}");
        assert_eq!(c.get(&format!("/api/sessions/{BOB}")).status, 404);
    };
    check(&c, 1);
    // Replayed once: a restart replays nothing again.
    assert!(node.terminate().success());
    node.restart();
    wait_mode(&node.client(), "redis", Duration::from_secs(10));
    check(&node.client(), 2);
}

#[test]
fn a_journal_entry_redis_keeps_rejecting_is_dropped_after_bounded_tries() {
    let mut redis = Redis::start(true);
    let node = node_on(&redis, "n1");
    let c = node.client();
    wait_mode(&c, "redis", Duration::from_secs(5));
    let poisoned = id_of(&c.create("{}"));
    let fine = id_of(&c.create("{}"));
    redis.kill9();
    push_into_fallback(&c);
    for _ in 0..3 {
        assert_eq!(c.get(&format!("/api/sessions/{poisoned}")).status, 200);
    }
    // The touches are journaled (coalesced) before the patch that follows.
    assert!(wait_until(Duration::from_secs(2), || health(&c)["store"]
        ["pending_sync"]
        .as_u64()
        .unwrap_or(0)
        >= 1));
    let p = c.patch(&format!("/api/sessions/{fine}"), r#"{"metadata":{"a":1}}"#);
    assert_eq!(p.status, 200);

    // Redis returns holding a counter no script can add to (another tool
    // wrote it): every replay of the touches fails with a script error.
    signal(node.pid(), libc::SIGSTOP);
    redis.restart();
    let key = format!("edgenode:s:{poisoned}");
    assert_eq!(
        redis.cmd(&["HSET", &key, "n", "99999999999999999999"]),
        ":0\r\n"
    );
    signal(node.pid(), libc::SIGCONT);

    wait_mode(&c, "redis", Duration::from_secs(15));
    let h = health(&c);
    assert_eq!(h["store"]["replay_dropped"], 1, "{h}");
    assert!(c
        .get("/metrics")
        .text
        .contains("edgenode_replay_dropped_total 1"));
    assert!(node.log_text().contains("keeps rejecting a journal entry"));
    // What came after it in the journal was applied all the same.
    let f = c.get(&format!("/api/sessions/{fine}")).json();
    assert_eq!(f["metadata"]["a"], 1, "{f}");
    assert_eq!(f["version"], 2, "{f}");
}

// ---- found by an independent review; each was a bug before its fix ----------

#[test]
fn a_patch_right_after_redis_lost_its_data_restores_the_session_instead_of_losing_it() {
    let redis = Redis::start(false);
    let node = node_on(&redis, "n1");
    let c = node.client();
    wait_mode(&c, "redis", Duration::from_secs(5));
    let patched = id_of(&c.create(r#"{"user_id":"p"}"#));
    let rotated = id_of(&c.create(r#"{"user_id":"r"}"#));
    let control = id_of(&c.create(r#"{"user_id":"q"}"#));
    // The node has met this Redis (its epoch is set).
    assert!(wait_until(Duration::from_secs(5), || redis
        .cmd(&["EXISTS", "edgenode:epoch"])
        == ":1\r\n"));
    assert!(redis.cmd(&["FLUSHALL"]).starts_with("+OK"));
    let p = c.patch(
        &format!("/api/sessions/{patched}"),
        r#"{"metadata":{"x":1}}"#,
    );
    assert_eq!(p.status, 200, "{}", p.text);
    assert_eq!(p.json()["metadata"]["x"], 1);
    let r = c.post(&format!("/api/sessions/{rotated}/rotate"), "");
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(wait_until(Duration::from_secs(5), || c
        .get(&format!("/api/sessions/{control}"))
        .status
        == 200));
    assert_eq!(c.get(&format!("/api/sessions/{patched}")).status, 200);
}

#[test]
fn sessions_restored_from_the_mirror_are_not_changed_twice_when_the_replay_repeats() {
    let mut redis = Redis::start(false);
    let mut node = node_with(&redis, "n1", &["--replay-batch", "4"]);
    let c = node.client();
    wait_mode(&c, "redis", Duration::from_secs(5));
    let ids: Vec<String> = (0..30).map(|_| id_of(&c.create("{}"))).collect();
    redis.kill9();
    push_into_fallback(&c);
    for round in 0..10 {
        for id in &ids {
            let p = c.patch(
                &format!("/api/sessions/{id}"),
                &format!(r#"{{"metadata":{{"r":{round}}}}}"#),
            );
            assert_eq!(p.status, 200);
        }
    }
    let want: Vec<u64> = ids
        .iter()
        .map(|id| {
            c.get(&format!("/api/sessions/{id}")).json()["version"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let full = health(&c)["store"]["pending_sync"].as_u64().unwrap();
    redis.restart(); // empty: every session is restored from the mirror
    assert!(wait_until(Duration::from_secs(10), || {
        let p = health(&c)["store"]["pending_sync"].as_u64().unwrap_or(0);
        p < full - 20
    }));
    // Stopped in the middle: the next start replays what is left again.
    assert!(node.terminate().success());
    node.restart();
    let c = node.client();
    wait_mode(&c, "redis", Duration::from_secs(10));
    for (id, want) in ids.iter().zip(&want) {
        let got = c.get(&format!("/api/sessions/{id}")).json();
        assert_eq!(got["version"].as_u64(), Some(*want), "{id}: {got}");
    }
}

#[test]
fn a_restored_session_is_not_changed_twice_when_another_entry_stops_the_replay() {
    let mut redis = Redis::start(false);
    let node = node_with(&redis, "n1", &["--replay-batch", "4"]);
    let c = node.client();
    wait_mode(&c, "redis", Duration::from_secs(5));
    let s = id_of(&c.create("{}"));
    let p = id_of(&c.create("{}"));
    redis.kill9();
    push_into_fallback(&c);
    let sp = format!("/api/sessions/{s}");
    assert_eq!(c.patch(&sp, r#"{"metadata":{"i":0}}"#).status, 200);
    assert_eq!(
        c.patch(&format!("/api/sessions/{p}"), r#"{"metadata":{"p":1}}"#)
            .status,
        200
    );
    for i in 1..10 {
        assert_eq!(
            c.patch(&sp, &format!(r#"{{"metadata":{{"i":{i}}}}}"#))
                .status,
            200
        );
    }
    let want = c.get(&sp).json()["version"].as_u64().unwrap();
    signal(node.pid(), libc::SIGSTOP);
    redis.restart(); // empty
                     // A record for p that no script can count with: its entries are
                     // rejected until dropped, stopping each replay attempt after S's restore.
    let far = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 3_600_000)
        .to_string();
    redis.cmd(&[
        "HSET",
        &format!("edgenode:s:{p}"),
        "u",
        "x",
        "c",
        "1",
        "a",
        "1",
        "e",
        &far,
        "n",
        "0",
        "v",
        "99999999999999999999",
    ]);
    signal(node.pid(), libc::SIGCONT);
    wait_mode(&c, "redis", Duration::from_secs(20));
    let got = c.get(&sp).json();
    assert_eq!(got["version"].as_u64(), Some(want), "{got}");
}

#[test]
fn a_login_made_after_a_log_out_everywhere_survives_whichever_node_replays_first() {
    let redis = Redis::start(true);
    let a = node_on(&redis, "a");
    let b = node_on(&redis, "b");
    let (ca, cb) = (a.client(), b.client());
    wait_mode(&ca, "redis", Duration::from_secs(5));
    wait_mode(&cb, "redis", Duration::from_secs(5));
    let s = id_of(&cb.create("{}"));
    let old = id_of(&cb.create(r#"{"user_id":"dave"}"#));
    redis.stop();
    push_into_fallback(&ca);
    push_into_fallback(&cb);
    let out = ca.delete("/api/users/dave/sessions");
    assert_eq!(out.status, 202, "{}", out.text);
    // Times are milliseconds: the login is a later one.
    std::thread::sleep(Duration::from_millis(20));
    let login = cb.patch(&format!("/api/sessions/{s}"), r#"{"user_id":"dave"}"#);
    assert_eq!(login.status, 200, "{}", login.text);
    // B replays first, then A's logout.
    signal(a.pid(), libc::SIGSTOP);
    redis.cont();
    wait_mode(&cb, "redis", Duration::from_secs(10));
    signal(a.pid(), libc::SIGCONT);
    wait_mode(&ca, "redis", Duration::from_secs(10));
    for c in [&ca, &cb] {
        assert_eq!(
            c.get(&format!("/api/sessions/{s}")).status,
            200,
            "the later login"
        );
        assert_eq!(
            c.get(&format!("/api/sessions/{old}")).status,
            404,
            "logged out"
        );
    }
}

#[test]
fn a_session_revoked_during_an_outage_stays_revoked_though_another_node_rotated_it() {
    let redis = Redis::start(true);
    let a = node_on(&redis, "a");
    let b = node_on(&redis, "b");
    let (ca, cb) = (a.client(), b.client());
    wait_mode(&ca, "redis", Duration::from_secs(5));
    wait_mode(&cb, "redis", Duration::from_secs(5));
    let s = id_of(&cb.create(r#"{"user_id":"zed"}"#));
    redis.stop();
    push_into_fallback(&ca);
    push_into_fallback(&cb);
    assert_eq!(ca.delete(&format!("/api/sessions/{s}")).status, 202);
    let r = cb.post(&format!("/api/sessions/{s}/rotate"), "");
    assert_eq!(r.status, 200, "{}", r.text);
    let new = id_of(&r.json());
    // The rotating node replays first.
    signal(a.pid(), libc::SIGSTOP);
    redis.cont();
    wait_mode(&cb, "redis", Duration::from_secs(10));
    signal(a.pid(), libc::SIGCONT);
    wait_mode(&ca, "redis", Duration::from_secs(10));
    for c in [&ca, &cb] {
        assert_eq!(c.get(&format!("/api/sessions/{new}")).status, 404);
        assert_eq!(c.get(&format!("/api/sessions/{s}")).status, 404);
    }
}

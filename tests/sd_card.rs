//! The SD card: what a node in Redis mode writes to its disk while Redis is
//! healthy (little: its mirror is written coarsely), and what that mirror
//! still promises in an outage (every session the node served, with an
//! expiry and a count within `mirror_lag_secs` of what the node last
//! answered). Real redis-server and edgenode processes; the data directory
//! on a real disk (`/var/tmp`), where the kernel counts written bytes.

mod common;

use common::*;
use edgenode::session::Limits;
use edgenode::store::local::{LocalLimits, SledStore};
use serde_json::Value;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the node answered for a session: when (unix ms), the expiry, the
/// count.
type Answered = (u64, u64, u64);

fn metric(c: &Client, series: &str) -> f64 {
    let text = c.get("/metrics").text;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

fn ms_of(v: &Value, field: &str) -> u64 {
    let text = v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {v}"));
    let at = humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{field} {text}: {e}"));
    at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A directory on a real disk (tmpfs counts no written bytes), for the
/// nodes' data directories (`<name>/db`) and their logs (beside them).
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("edgenode-sd-")
        .tempdir_in("/var/tmp")
        .expect("temp dir under /var/tmp")
}

fn node_on(redis: &Redis, dir: &std::path::Path, extra: &[&str]) -> Node {
    let node = Node::builder()
        .args(["--redis-url", &redis.url()])
        .args(["--store-timeout-ms", "250"])
        .args(extra.iter().copied())
        .data_dir(dir)
        .start();
    let c = node.client();
    assert!(
        wait_until(Duration::from_secs(10), || c.get("/api/health").json()
            ["store"]["active"]
            == "redis"),
        "the node did not reach redis mode"
    );
    node
}

/// With Redis healthy, uses of many sessions write at most 10 bytes each to
/// the node's disk, and the disk is synced at most once every 5 s.
#[test]
fn uses_in_redis_mode_barely_write_to_the_disk() {
    let sessions: usize = std::env::var("SD_CARD_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let redis = Redis::start(false);
    let dir = disk_dir();
    let node = node_on(&redis, &dir.path().join("n"), &[]);
    let c = node.client();
    let ids: Vec<String> = (0..sessions).map(|_| id_of(&c.create("{}"))).collect();
    let written = || metric(&c, "edgenode_disk_written_bytes_total");
    let syncs = || metric(&c, "edgenode_disk_fsyncs_total");
    // The creates' mirror copies reach the disk within 5 s.
    let settled = wait_until(Duration::from_secs(20), || {
        let before = written();
        std::thread::sleep(Duration::from_millis(5_500));
        written() == before
    });
    assert!(settled, "the node kept writing after the creates");
    if written() == 0.0 {
        skip("write_bytes reads 0 here (no task I/O accounting?): wear not measurable");
        return;
    }

    let (b0, s0, t0) = (written(), syncs(), Instant::now());
    // Paced uses (20 ms apart), each session used about twice.
    let uses = 2 * sessions;
    for i in 0..uses {
        let id = &ids[(i * 7919) % ids.len()];
        assert_eq!(c.get(&format!("/api/sessions/{id}")).status, 200);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (b1, s1) = (written(), syncs());
    let secs = t0.elapsed().as_secs_f64();
    let per_use = (b1 - b0) / uses as f64;
    eprintln!(
        "{uses} uses in {secs:.1} s: {} bytes written ({per_use:.1} per use), {} syncs",
        b1 - b0,
        s1 - s0
    );
    assert!(per_use <= 10.0, "{per_use:.1} bytes written per use");
    assert!(
        s1 - s0 <= (secs / 5.0).ceil() + 1.0,
        "{} syncs in {secs:.1} s",
        s1 - s0
    );
}

/// A session a node served (created there, or elsewhere and only used
/// there) is in that node's mirror once Redis is gone, with an expiry no
/// earlier than the last one the node answered minus `mirror_lag_secs`,
/// and a count no lower than the node answered `mirror_lag_secs` (plus one
/// write-behind interval) before its last answer.
#[test]
fn the_mirror_holds_what_the_node_served_within_the_lag_through_an_outage() {
    const LAG_MS: u64 = 1_000;
    let mut redis = Redis::start(false);
    let dir = disk_dir();
    let (dir1, dir2) = (dir.path().join("n1"), dir.path().join("n2"));
    let ttl = ["--session-ttl-secs", "100"];
    let mut n1 = node_on(
        &redis,
        &dir1,
        &[&ttl[..], &["--mirror-lag-secs", "1"]].concat(),
    );
    let n2 = node_on(&redis, &dir2, &ttl);
    let (c1, c2) = (n1.client(), n2.client());
    let mine = id_of(&c1.create("{}"));
    let theirs = id_of(&c2.create(r#"{"metadata":{"made":"elsewhere"}}"#));
    let spare = id_of(&c1.create("{}"));

    // Uses over ~3.5 s: the copies are rewritten past the 1 s lag, not at
    // every use. (time of the answer, expiry, count) per session.
    let mut answers: Vec<(String, Vec<Answered>)> =
        vec![(mine.clone(), Vec::new()), (theirs.clone(), Vec::new())];
    for _ in 0..35 {
        for (id, seen) in answers.iter_mut() {
            let a = c1.get(&format!("/api/sessions/{id}"));
            assert_eq!(a.status, 200);
            let v = a.json();
            seen.push((
                now_ms(),
                ms_of(&v, "expires_at"),
                v["request_count"].as_u64().unwrap(),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The outage: the node notices at its next request (a third session's),
    // and then stops; its mirror is read as it left it.
    redis.kill9();
    assert!(wait_until(Duration::from_secs(10), || {
        c1.try_request("GET", &format!("/api/sessions/{spare}"), &[], None)
            .map(|a| a.status == 200)
            .unwrap_or(false)
            && c1.get("/api/health").json()["store"]["active"] == "sled"
    }));
    assert!(n1.terminate().success());
    let store = SledStore::open(
        &dir1.join("db"),
        LocalLimits {
            cache_bytes: 1 << 20,
            max_journal_bytes: 1 << 20,
            min_free_bytes: 0,
            flush_timeout: std::time::Duration::from_secs(5),
        },
        Limits {
            ttl_ms: 100_000,
            max_lifetime_ms: 7 * 86_400_000,
            max_metadata_bytes: 16_384,
        },
    )
    .expect("the node's data directory opens");
    for (id, seen) in &answers {
        let raw = uuid::Uuid::parse_str(id).unwrap();
        let held = store
            .get(raw.as_bytes(), now_ms())
            .expect("the mirror can be read")
            .unwrap_or_else(|| panic!("session {id} is not in the mirror"));
        let &(last_at, last_expiry, _) = seen.last().unwrap();
        assert!(
            held.expires_at + LAG_MS >= last_expiry,
            "{id}: mirror expiry {} more than the lag before the last answered {last_expiry}",
            held.expires_at
        );
        // 200 ms of slack: the write-behind interval (100 ms) and a round trip
        let floor = seen
            .iter()
            .filter(|(at, _, _)| *at + LAG_MS + 200 <= last_at)
            .map(|&(_, _, n)| n)
            .max()
            .unwrap_or(0);
        assert!(
            held.request_count >= floor,
            "{id}: mirror count {} below {floor}, answered more than the lag earlier",
            held.request_count
        );
    }
}

/// Without Redis, a use is not written into its session's record: its count
/// and time go to `uses.log` in whole pages at the lazy flush (every 5 s).
/// Once a flush has written them, a `kill -9` loses none of them: the next
/// start reads them back, and every session answers the count it answered
/// last, plus the use that reads it.
#[test]
fn uses_without_redis_are_logged_compactly_and_survive_kill_9() {
    let dir = disk_dir();
    let mut node = Node::builder().data_dir(&dir.path().join("n")).start();
    let c = node.client();
    let ids: Vec<String> = (0..200).map(|_| id_of(&c.create("{}"))).collect();
    let mut answered = Vec::new();
    for id in &ids {
        let mut last = 0;
        for _ in 0..3 {
            let r = c.get(&format!("/api/sessions/{id}"));
            assert_eq!(r.status, 200);
            last = r.json()["request_count"].as_u64().unwrap();
        }
        answered.push(last);
    }
    assert!(answered.iter().all(|&n| n == 3), "{answered:?}");
    // A flush that starts after the last use writes them all; the marker's
    // use makes sure one comes.
    let log = || metric(&c, "edgenode_disk_uses_log_bytes");
    let before = log();
    let marker = id_of(&c.create("{}"));
    assert_eq!(c.get(&format!("/api/sessions/{marker}")).status, 200);
    assert!(
        wait_until(Duration::from_secs(15), || log() > before),
        "uses.log was not written"
    );
    // 201 sessions' uses in whole 4 KiB pages of 127 entries: 2 pages for
    // them (and any earlier flush's), never a page per use.
    assert!(log() <= 4.0 * 4096.0, "uses.log holds {} bytes", log());

    node.kill9();
    node.restart();
    let c = node.client();
    for (id, n) in ids.iter().zip(&answered) {
        let r = c.get(&format!("/api/sessions/{id}"));
        assert_eq!(r.status, 200, "{id}");
        assert_eq!(r.json()["request_count"].as_u64(), Some(n + 1), "{id}");
    }
}

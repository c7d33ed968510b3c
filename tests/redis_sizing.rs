//! How much Redis memory a session takes, measured on a real redis-server:
//! `INFO memory` `used_memory` before and after a node creates N sessions
//! with typical metadata (N = 10 000; `EDGENODE_SIZING_SESSIONS` raises it).
//! docs/operations.md ("Sizing Redis") quotes the figure and its bound.

mod common;

use common::*;
use std::time::Duration;

/// The bound docs/operations.md gives: bytes of Redis memory per session
/// (its hash, its user index entry, the expiry index), typical metadata.
const MAX_BYTES_PER_SESSION: u64 = 800;

fn used_memory(redis: &Redis) -> u64 {
    redis
        .cmd(&["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory")
}

#[test]
fn a_session_with_typical_metadata_takes_under_800_bytes_of_redis() {
    let n: usize = std::env::var("EDGENODE_SIZING_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let redis = Redis::start(false);
    let node = Node::builder()
        .args(["--redis-url", &redis.url(), "--max-sessions", "2000000"])
        .start();
    let c = node.client();
    assert!(wait_until(Duration::from_secs(5), || c
        .get("/api/health")
        .json()["store"]["active"]
        == "redis"));
    // One session first, so that the indexes and scripts exist before the
    // measurement starts.
    c.create(r#"{"user_id":"warmup"}"#);
    let before = used_memory(&redis);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in (t..n).step_by(4) {
                    c.create(&format!(
                        r#"{{"user_id":"user-{i:06}","metadata":{{"role":"member","locale":"en-GB","cart_items":{}}}}}"#,
                        i % 7
                    ));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let after = used_memory(&redis);
    let per = (after - before) / n as u64;
    eprintln!(
        "redis sizing: {n} sessions took {} bytes of used_memory: {per} bytes per session",
        after - before
    );
    assert!(
        per <= MAX_BYTES_PER_SESSION,
        "{per} bytes per session, above the documented {MAX_BYTES_PER_SESSION}"
    );
}

//! Backup and restore as docs/operations.md ("Backup and restore") says:
//! a node's data directory copied after a clean stop and started from the
//! copy in a new place; a Redis RDB snapshot (`SAVE`) loaded by a new
//! redis-server. Each restored copy serves the same sessions.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success());
}

/// Creates `n` sessions on `c`: their ids and metadata.
fn sessions(c: &Client, n: usize) -> Vec<(String, Value)> {
    (0..n)
        .map(|i| {
            let meta = json!({"i": i, "tag": format!("t{i}")});
            let s =
                c.create(&json!({"user_id": format!("u{}", i % 3), "metadata": meta}).to_string());
            (id_of(&s), meta)
        })
        .collect()
}

fn all_served(c: &Client, saved: &[(String, Value)]) {
    for (id, meta) in saved {
        let a = c.get(&format!("/api/sessions/{id}"));
        assert_eq!(a.status, 200, "{id}: {}", a.text);
        assert_eq!(a.json()["metadata"], *meta);
    }
}

#[test]
fn a_data_directory_copied_after_a_clean_stop_serves_the_same_sessions() {
    let mut node = Node::start();
    let saved = sessions(&node.client(), 50);
    assert!(node.terminate().success(), "a clean stop");
    let backup = tempdir();
    let copy = backup.path().join("restored");
    std::fs::create_dir(&copy).unwrap();
    copy_dir(&node.data_dir.join("db"), &copy.join("db"));
    drop(node); // the original directory goes with it

    let restored = Node::builder().data_dir(&copy).start();
    all_served(&restored.client(), &saved);
    assert_eq!(
        restored.client().get("/api/users/u1/sessions").json()["sessions"]
            .as_array()
            .map(Vec::len),
        Some(17)
    );
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_redis_rdb_snapshot_restored_into_a_new_redis_serves_the_same_sessions() {
    let redis = Redis::start(false);
    let node = Node::builder().args(["--redis-url", &redis.url()]).start();
    let c = node.client();
    assert!(wait_until(Duration::from_secs(5), || c
        .get("/api/health")
        .json()["store"]["active"]
        == "redis"));
    let saved = sessions(&c, 50);
    assert_eq!(redis.cmd(&["SAVE"]), "+OK\r\n");
    drop(node);

    // The snapshot, copied into a new Redis's directory.
    let dir = tempdir();
    std::fs::copy(
        redis.dir.path().join("dump.rdb"),
        dir.path().join("dump.rdb"),
    )
    .unwrap();
    drop(redis);
    let port = free_port();
    let _new_redis = Proc(
        Command::new("redis-server")
            .args(redis_server_args(port, dir.path()))
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    assert!(wait_until(Duration::from_secs(10), || Redis::ping_port(
        port
    )));

    // A new node with an empty data directory serves them from that Redis.
    let fresh = Node::builder()
        .args(["--redis-url", &format!("redis://127.0.0.1:{port}/")])
        .start();
    let c = fresh.client();
    assert!(wait_until(Duration::from_secs(5), || c
        .get("/api/health")
        .json()["store"]["active"]
        == "redis"));
    all_served(&c, &saved);
}

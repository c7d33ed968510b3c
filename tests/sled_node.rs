//! The embedded node as a process: what needs one of its own (restart,
//! kill -9, signals, the command line, the environment). The session API
//! itself is tested in process, in `api_inproc.rs`.

mod common;

use common::*;
use serde_json::json;

/// The token in `EDGENODE_API_TOKEN`, as a unit's `Environment=` gives it
/// (`api_inproc.rs` passes `--api-token`: the test process's environment is
/// shared).
#[test]
fn api_token_is_taken_from_the_environment() {
    let node = Node::builder().env("EDGENODE_API_TOKEN", "s3cret").start();
    let a = node.client().post("/api/sessions", "{}");
    assert_eq!((a.status, a.code().as_str()), (401, "unauthorized"));
    let authed = node.client().with_token("s3cret");
    assert_eq!(authed.post("/api/sessions", "{}").status, 201);
}

#[test]
fn refuses_to_listen_beyond_loopback_without_a_token() {
    let out = std::process::Command::new(BIN)
        .args([
            "--config",
            "/dev/null",
            "--listen",
            "0.0.0.0:1",
            "--data-dir",
        ])
        .arg(tempdir().path())
        .output()
        .expect("run edgenode");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without api_token") && err.contains("--allow-unauthenticated"),
        "{err}"
    );
}

#[test]
fn sessions_survive_a_clean_restart() {
    let mut node = Node::start();
    let c = node.client();
    let s = c.create(r#"{"user_id":"carol","metadata":{"k":"v"}}"#);
    let id = id_of(&s);
    c.patch(&format!("/api/sessions/{id}"), r#"{"metadata":{"k2":2}}"#);
    assert!(node.terminate().success(), "SIGTERM exits 0");
    node.restart();
    let r = node.client().get(&format!("/api/sessions/{id}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["metadata"], json!({"k":"v","k2":2}));
    assert_eq!(r.json()["user_id"], "carol");
    assert_eq!(
        node.client().get("/api/users/carol/sessions").json()["sessions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// The log position sled's newest snapshot covers (`snap.<lsn in hex>`).
fn newest_snapshot(db: &std::path::Path) -> u64 {
    std::fs::read_dir(db)
        .expect("the data directory")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            u64::from_str_radix(name.strip_prefix("snap.")?, 16).ok()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_clean_stop_leaves_a_snapshot_so_the_next_start_does_not_read_the_whole_log() {
    let mut node = Node::start();
    let db = node.data_dir.join("db");
    // sled writes a snapshot when it opens: this start's.
    let at_start = newest_snapshot(&db);
    let c = node.client();
    for i in 0..300 {
        c.create(&format!(r#"{{"user_id":"u{i}"}}"#));
    }
    assert!(node.terminate().success(), "SIGTERM exits 0");
    let at_stop = newest_snapshot(&db);
    assert!(
        at_stop > at_start,
        "the stop left no snapshot past this start's ({at_start:x} → {at_stop:x})"
    );
    node.restart();
    assert_eq!(
        node.client().get("/api/health").json()["sessions"]["active"],
        300
    );
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let mut node = Node::start();
    let c = node.client();
    let mut kept = Vec::new();
    let mut deleted = Vec::new();
    let mut rotated = Vec::new();
    for i in 0..40 {
        let id = id_of(&c.create(&format!(r#"{{"user_id":"u{i}","metadata":{{"i":{i}}}}}"#)));
        match i % 4 {
            0 => {
                assert_eq!(c.delete(&format!("/api/sessions/{id}")).status, 204);
                deleted.push(id);
            }
            1 => {
                assert_eq!(
                    c.patch(
                        &format!("/api/sessions/{id}"),
                        r#"{"metadata":{"patched":true}}"#
                    )
                    .status,
                    200
                );
                kept.push((id, true));
            }
            2 => {
                let new = id_of(&c.post(&format!("/api/sessions/{id}/rotate"), "").json());
                rotated.push((id, new));
            }
            _ => kept.push((id, false)),
        }
    }
    // No clean shutdown: whatever was acknowledged must already be on disk.
    node.kill9();
    node.restart();
    let c = node.client();
    for (id, patched) in &kept {
        let r = c.get(&format!("/api/sessions/{id}"));
        assert_eq!(r.status, 200, "acknowledged create lost: {id}");
        assert_eq!(
            r.json()["metadata"]["patched"].as_bool().unwrap_or(false),
            *patched,
            "{id}"
        );
    }
    for id in &deleted {
        assert_eq!(
            c.get(&format!("/api/sessions/{id}")).status,
            404,
            "acknowledged delete undone: {id}"
        );
    }
    for (old, new) in &rotated {
        assert_eq!(
            c.get(&format!("/api/sessions/{old}")).status,
            404,
            "rotated-away id came back"
        );
        assert_eq!(
            c.get(&format!("/api/sessions/{new}")).status,
            200,
            "rotated session lost"
        );
    }
}

#[test]
fn help_never_prints_a_secret_from_the_environment() {
    let out = std::process::Command::new(BIN)
        .arg("--help")
        .env("EDGENODE_REDIS_URL", "redis://:hunter2@10.0.0.9:6379/0")
        .env("EDGENODE_API_TOKEN", "s3cret-token")
        .output()
        .expect("run --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("--redis-url"));
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.contains("s3cret-token"), "{text}");
}

/// The README's two commands in either order, with any time between them:
/// the tests take a release binary built from the code under test however
/// long ago it was built, and refuse one built from other code, whatever its
/// file time says.
#[test]
fn the_release_binary_is_judged_by_its_source_not_its_age() {
    let dir = tempdir();
    // A current build, made to look a day old.
    let old_copy = dir.path().join("edgenode-built-yesterday");
    std::fs::copy(release_binary(), &old_copy).expect("copy the release binary");
    let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
    std::fs::File::options()
        .write(true)
        .open(&old_copy)
        .and_then(|f| f.set_modified(day_ago))
        .expect("age the copy");
    assert_eq!(
        built_from_same_source(&old_copy, std::path::Path::new(BIN)),
        Ok(())
    );

    // A binary of other source, brand new: what a release build left from
    // an earlier checkout says.
    let stale = dir.path().join("edgenode-other-source");
    std::fs::write(
        &stale,
        "#!/bin/sh\necho 'edgenode 0.1.0 (x86_64-unknown-linux-gnu, commit 000000000000, source 00000000deadbeef)'\n",
    )
    .expect("write the stand-in");
    std::fs::set_permissions(&stale, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("make it executable");
    let refused = built_from_same_source(&stale, std::path::Path::new(BIN))
        .expect_err("a binary of other source must be refused");
    assert!(refused.contains("other source"), "{refused}");
}

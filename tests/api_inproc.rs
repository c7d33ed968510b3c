//! The session API of a node with no Redis anywhere, in process
//! (`common::inproc`): every endpoint, bad input, expiry, the token, health;
//! and the shutdown's grace for a connection accepted just before it.
//! What needs a node process of its own (restart, kill -9, signals, the
//! command line, the environment) is in `sled_node.rs`.

mod common;

use common::inproc::InProcNode;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::Duration;

#[test]
fn every_session_endpoint_behaves_as_documented() {
    let node = InProcNode::start();
    let c = node.client();

    // create: defaults and given fields
    let anon = c.create("{}");
    assert_eq!(anon["user_id"], "anonymous");
    assert_eq!(anon["version"], 1);
    assert_eq!(anon["request_count"], 0);
    assert_eq!(anon["metadata"], json!({}));
    for f in ["created_at", "last_accessed", "expires_at"] {
        let t = anon[f].as_str().unwrap();
        assert!(
            t.ends_with('Z') && t.len() == 24 && t.contains('.'),
            "{f} = {t}"
        );
    }
    let s = c.create(r#"{"user_id":"alice","metadata":{"cart":[1,2],"theme":"dark"}}"#);
    let id = id_of(&s);
    assert_eq!(uuid_version(&id), 4);

    // read counts and returns the counted record
    for n in 1..=3 {
        let r = c.get(&format!("/api/sessions/{id}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["request_count"], n);
        assert_eq!(
            r.json()["version"],
            1,
            "a touch does not change the version"
        );
    }

    // PATCH merges, null deletes, bumps the version; reads do not count as PATCH
    let p = c.patch(
        &format!("/api/sessions/{id}"),
        r#"{"metadata":{"theme":null,"lang":"fr"}}"#,
    );
    assert_eq!(p.status, 200, "{}", p.text);
    assert_eq!(p.json()["metadata"], json!({"cart":[1,2],"lang":"fr"}));
    assert_eq!(p.json()["version"], 2);
    assert_eq!(p.json()["request_count"], 3);

    // conditional PATCH: stale version → 412, right version → 200
    let stale = c.request(
        "PATCH",
        &format!("/api/sessions/{id}"),
        &[("If-Match", "1")],
        Some(r#"{"metadata":{"x":1}}"#),
    );
    assert_eq!(
        (stale.status, stale.code().as_str()),
        (412, "version_mismatch")
    );
    let ok = c.request(
        "PATCH",
        &format!("/api/sessions/{id}"),
        &[("If-Match", "2")],
        Some(r#"{"user_id":"bob"}"#),
    );
    assert_eq!(ok.status, 200);
    assert_eq!(
        (ok.json()["user_id"].as_str(), ok.json()["version"].as_u64()),
        (Some("bob"), Some(3))
    );
    assert_eq!(
        ok.json()["metadata"],
        json!({"cart":[1,2],"lang":"fr"}),
        "a failed PATCH changed nothing"
    );

    // per-user listing follows the user change
    assert_eq!(
        c.get("/api/users/alice/sessions").json()["sessions"],
        json!([])
    );
    let bobs = c.get("/api/users/bob/sessions").json();
    assert_eq!(bobs["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(bobs["sessions"][0]["session_id"], id.as_str());

    // rotate: new id, same data, version +1, old id gone
    let r = c.post(&format!("/api/sessions/{id}/rotate"), "");
    assert_eq!(r.status, 200, "{}", r.text);
    let new_id = id_of(&r.json());
    assert_ne!(new_id, id);
    assert_eq!(r.json()["metadata"], json!({"cart":[1,2],"lang":"fr"}));
    assert_eq!(r.json()["version"], 4);
    assert_eq!(c.get(&format!("/api/sessions/{id}")).status, 404);
    assert_eq!(
        c.post(&format!("/api/sessions/{id}/rotate"), "").status,
        404
    );
    assert_eq!(c.get(&format!("/api/sessions/{new_id}")).status, 200);

    // log a user out everywhere
    c.create(r#"{"user_id":"bob"}"#);
    let gone = c.delete("/api/users/bob/sessions");
    assert_eq!(
        (gone.status, gone.json()["deleted"].as_u64()),
        (200, Some(2))
    );
    assert_eq!(c.get(&format!("/api/sessions/{new_id}")).status, 404);
    assert_eq!(
        c.get("/api/users/bob/sessions").json()["sessions"],
        json!([])
    );

    // delete: 204 then 404
    let aid = id_of(&anon);
    assert_eq!(c.delete(&format!("/api/sessions/{aid}")).status, 204);
    let again = c.delete(&format!("/api/sessions/{aid}"));
    assert_eq!((again.status, again.code().as_str()), (404, "not_found"));

    // unknown route and wrong method: JSON errors
    let nf = c.get("/api/nope");
    assert_eq!((nf.status, nf.code().as_str()), (404, "not_found"));
    let na = c.request("PUT", &format!("/api/sessions/{aid}"), &[], Some("{}"));
    assert_eq!((na.status, na.code().as_str()), (405, "method_not_allowed"));
}

fn uuid_version(id: &str) -> u32 {
    id.chars().nth(14).and_then(|c| c.to_digit(16)).unwrap_or(0)
}

#[test]
fn browser_session_is_found_by_cookie_or_header_and_replaced_when_unusable() {
    let node = InProcNode::builder().arg("--cookie-secure").start();
    let c = node.client();

    let first = c.get("/api/session");
    assert_eq!(first.status, 200);
    let id = id_of(&first.json());
    assert_eq!(
        first.json()["request_count"],
        1,
        "the creating request counts"
    );
    let cookie = first.header("set-cookie").expect("Set-Cookie");
    assert_eq!(
        cookie,
        format!("session_id={id}; HttpOnly; SameSite=Lax; Path=/; Max-Age=86400; Secure")
    );
    assert_eq!(first.header("x-session-id"), Some(id.as_str()));

    let by_cookie = c.request(
        "GET",
        "/api/session",
        &[("Cookie", &format!("theme=dark; session_id={id}"))],
        None,
    );
    assert_eq!(
        (
            id_of(&by_cookie.json()),
            by_cookie.json()["request_count"].as_u64()
        ),
        (id.clone(), Some(2))
    );
    let by_header = c.request("GET", "/api/session", &[("X-Session-ID", &id)], None);
    assert_eq!(
        (
            id_of(&by_header.json()),
            by_header.json()["request_count"].as_u64()
        ),
        (id.clone(), Some(3))
    );

    // malformed and unknown ids get a fresh session, not an error
    for bad in [
        "session_id=not-a-uuid",
        "session_id=00000000-0000-4000-8000-000000000000",
        "session_id=",
    ] {
        let a = c.request("GET", "/api/session", &[("Cookie", bad)], None);
        assert_eq!(a.status, 200, "{bad}");
        assert_ne!(id_of(&a.json()), id);
        assert_eq!(a.json()["request_count"], 1);
    }
    // the original is untouched by those
    assert_eq!(
        c.get(&format!("/api/sessions/{id}")).json()["request_count"],
        4
    );
}

#[test]
fn health_and_readiness_report_the_documented_fields() {
    let node = InProcNode::builder()
        .args(["--instance-id", "pi-7", "--workers", "2"])
        .start();
    let c = node.client();
    c.create("{}");
    let h = c.get("/api/health");
    assert_eq!(h.status, 200);
    let h = h.json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["instance_id"], "pi-7");
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert!(h["uptime_seconds"].is_u64());
    assert_eq!(h["store"]["active"], "sled");
    assert_eq!(h["store"]["redis_reachable"], false);
    assert_eq!(h["store"]["pending_sync"], 0);
    assert!(wait_until(Duration::from_secs(5), || c
        .get("/api/health")
        .json()["sessions"]["active"]
        == 1));
    assert_eq!(h["pool"]["workers"], 2);
    for f in ["in_flight", "queued", "completed", "rejected"] {
        assert!(h["pool"][f].is_u64(), "pool.{f}");
    }
    assert_eq!(c.get("/api/ready").status, 200);
}

#[test]
fn bearer_token_guards_the_management_api_and_metrics() {
    let node = InProcNode::builder()
        .args(["--api-token", "s3cret"])
        .start();
    let anon = node.client();
    let authed = node.client().with_token("s3cret");
    let wrong = node.client().with_token("s3cres");

    for (method, path) in [
        ("POST", "/api/sessions"),
        ("GET", "/api/users/u/sessions"),
        ("GET", "/metrics"),
    ] {
        for client in [&anon, &wrong] {
            let a = client.request(
                method,
                path,
                &[],
                if method == "POST" { Some("{}") } else { None },
            );
            assert_eq!(
                (a.status, a.code().as_str()),
                (401, "unauthorized"),
                "{method} {path}"
            );
        }
    }
    assert_eq!(authed.post("/api/sessions", "{}").status, 201);
    assert_eq!(authed.get("/metrics").status, 200);
    // browser-facing and operational endpoints stay open
    assert_eq!(anon.get("/api/session").status, 200);
    assert_eq!(anon.get("/api/health").status, 200);
    assert_eq!(anon.get("/api/ready").status, 200);
}

#[test]
fn sessions_expire_by_idle_ttl_and_by_absolute_lifetime() {
    let node = InProcNode::builder()
        .args([
            "--session-ttl-secs",
            "1",
            "--session-max-lifetime-secs",
            "3",
        ])
        .start();
    let c = node.client();

    // idle expiry, watched through the user listing (reading the session
    // itself would touch it and keep it alive)
    let idle = id_of(&c.create(r#"{"user_id":"idler"}"#));
    let started = std::time::Instant::now();
    assert!(wait_until(Duration::from_secs(4), || c
        .get("/api/users/idler/sessions")
        .json()["sessions"]
        == json!([])));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "expired before its TTL"
    );
    assert_eq!(c.get(&format!("/api/sessions/{idle}")).status, 404);

    // sliding: touched every 400 ms it outlives the 1 s TTL, but not the 3 s cap
    let busy = c.create("{}");
    let busy_id = id_of(&busy);
    let created = std::time::Instant::now();
    let mut alive_past_ttl = false;
    loop {
        let r = c.get(&format!("/api/sessions/{busy_id}"));
        let age = created.elapsed();
        if r.status == 404 {
            assert!(
                age >= Duration::from_millis(2_900),
                "expired too early, at {age:?}"
            );
            break;
        }
        if age > Duration::from_millis(1_500) {
            alive_past_ttl = true;
        }
        assert!(
            age < Duration::from_secs(5),
            "outlived its absolute lifetime"
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(alive_past_ttl, "touches did not slide the expiry");

    // the background sweep removes expired records from disk
    assert!(
        wait_until(Duration::from_secs(5), || c.get("/api/health").json()
            ["sessions"]["active"]
            == 0),
        "sweep did not remove expired sessions: {}",
        c.get("/api/health").text
    );
}

#[test]
fn concurrent_touches_of_one_session_are_counted_exactly() {
    let node = InProcNode::start();
    let c = node.client();
    let id = id_of(&c.create("{}"));
    let handles: Vec<_> = (0..100)
        .map(|_| {
            let c = c.clone();
            let path = format!("/api/sessions/{id}");
            std::thread::spawn(move || c.get(&path).status)
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    let after = c.get(&format!("/api/sessions/{id}")).json();
    assert_eq!(
        after["request_count"], 101,
        "100 concurrent touches + this read"
    );
}

#[test]
fn hostile_input_gets_a_4xx_and_changes_nothing() {
    let node = InProcNode::start();
    let c = node.client();
    let s = c.create(r#"{"user_id":"dave","metadata":{"keep":"me"}}"#);
    let id = id_of(&s);
    let path = format!("/api/sessions/{id}");
    let snapshot = || {
        let mut v = c.get(&path).json();
        v.as_object_mut().unwrap().remove("request_count");
        v.as_object_mut().unwrap().remove("last_accessed");
        v.as_object_mut().unwrap().remove("expires_at");
        v
    };
    let before = snapshot();
    let users_before = c.get("/api/users/dave/sessions").json()["sessions"]
        .as_array()
        .unwrap()
        .len();

    let many_keys = {
        let m: serde_json::Map<String, Value> =
            (0..10_000).map(|i| (format!("k{i}"), json!(i))).collect();
        json!({ "metadata": m }).to_string()
    };
    let one_mb = format!(r#"{{"metadata":{{"blob":"{}"}}}}"#, "x".repeat(1 << 20));
    let cases: Vec<(&str, String, u16)> = vec![
        ("truncated JSON", r#"{"metadata":{"a":"#.into(), 400),
        ("not an object", "[1,2,3]".into(), 400),
        (
            "unknown field",
            r#"{"metadata":{},"admin":true}"#.into(),
            400,
        ),
        (
            "metadata of wrong type",
            r#"{"metadata":"string"}"#.into(),
            400,
        ),
        ("user_id of wrong type", r#"{"user_id":42}"#.into(), 400),
        (
            "user_id with bad characters",
            r#"{"user_id":"../../etc/passwd"}"#.into(),
            400,
        ),
        (
            "user_id too long",
            format!(r#"{{"user_id":"{}"}}"#, "u".repeat(200)),
            400,
        ),
        ("10 000 metadata keys", many_keys, 413),
        ("1 MB body", one_mb, 413),
        (
            "deep nesting",
            format!(
                r#"{{"metadata":{{"a":{}1{}}}}}"#,
                "[".repeat(10_000),
                "]".repeat(10_000)
            ),
            400,
        ),
    ];
    for (what, body, want) in &cases {
        let a = c
            .try_request("PATCH", &path, &[], Some(body))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(a.status, *want, "PATCH {what}: {}", a.text);
        assert!(
            !a.code().is_empty(),
            "{what}: error body is the JSON shape: {}",
            a.text
        );
        let a = c
            .try_request("POST", "/api/sessions", &[], Some(body))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(a.status, *want, "POST {what}: {}", a.text);
    }

    // non-UTF-8 bytes, sent raw
    let mut req = format!("PATCH {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\nConnection: close\r\n\r\n").into_bytes();
    req.extend_from_slice(b"{\"metadata\":{\"a\":\"\xff\xfe\"}}"[..20].as_ref());
    assert_eq!(raw_status(&raw_http(&node.addr, &req)), 400);

    // bad ids never reach the store
    for bad in [
        "not-a-uuid",
        "00000000000000000000000000000000",
        "%2e%2e%2f%2e%2e",
        "'%20OR%201=1",
        &"a".repeat(5000),
    ] {
        let a = c.get(&format!("/api/sessions/{bad}"));
        assert!(a.status == 400 || a.status == 404, "{bad}: {}", a.status);
        assert!(!a.code().is_empty());
    }
    let traversal = raw_http(
        &node.addr,
        b"GET /api/sessions/../../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(matches!(raw_status(&traversal), 400 | 404), "{traversal}");
    let bad_if_match = c.request("PATCH", &path, &[("If-Match", "yesterday")], Some("{}"));
    assert_eq!(
        (bad_if_match.status, bad_if_match.code().as_str()),
        (400, "invalid_if_match")
    );

    assert_eq!(snapshot(), before, "hostile requests changed the session");
    assert_eq!(
        c.get("/api/users/dave/sessions").json()["sessions"]
            .as_array()
            .unwrap()
            .len(),
        users_before
    );
    assert_eq!(c.get("/api/health").status, 200, "node still healthy");
}

#[test]
fn a_corrupt_record_on_disk_is_logged_and_counted_not_fatal() {
    let dir = tempdir();
    let limits = edgenode::session::Limits {
        ttl_ms: 60_000,
        max_lifetime_ms: 60_000,
        max_metadata_bytes: 1024,
    };
    let bad_id = [0x42u8; 16];
    {
        let local = edgenode::store::local::LocalLimits {
            cache_bytes: 1 << 20,
            max_journal_bytes: 1 << 20,
            min_free_bytes: 0,
            flush_timeout: std::time::Duration::from_secs(5),
        };
        let store =
            edgenode::store::local::SledStore::open(&dir.path().join("db"), local, limits).unwrap();
        store
            .put_raw_for_test(&bad_id, b"\xff\xff\xff\xff not postcard")
            .unwrap();
    }
    let node = InProcNode::builder().data_dir(dir.path()).start();
    let c = node.client();
    let id = edgenode::session::format_id(&bad_id);
    let a = c.get(&format!("/api/sessions/{id}"));
    assert_eq!((a.status, a.code().as_str()), (404, "not_found"));
    let h = c.get("/api/health").json();
    assert!(h["store"]["corrupt_records"].as_u64().unwrap() >= 1, "{h}");
    assert!(
        node.log_text().contains("corrupt session record"),
        "logged: {}",
        node.log_text()
    );
    assert_eq!(
        c.post("/api/sessions", "{}").status,
        201,
        "node keeps serving"
    );
}

/// Under socket activation a client may connect just before a restart's
/// SIGTERM and send its request just after: the connection was accepted, so
/// it gets a moment (`FIRST_REQUEST_GRACE`, 100 ms) to start its request,
/// which is then answered.
#[test]
fn a_connection_accepted_just_before_shutdown_is_still_answered() {
    let mut node = InProcNode::start();
    let open_connections = || {
        let text = raw_http(
            &node.addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        text.lines()
            .find_map(|l| l.strip_prefix("edgenode_open_connections "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    // Only the asking connection open, then one more: ours, accepted.
    assert!(wait_until(Duration::from_secs(5), || open_connections() == Some(1)));
    let mut s = std::net::TcpStream::connect(&node.addr).expect("connect");
    assert!(wait_until(Duration::from_secs(5), || open_connections() == Some(2)));

    node.begin_shutdown();
    assert!(wait_until(Duration::from_secs(5), || node
        .log_text()
        .contains("shutting down")));
    s.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert_eq!(raw_status(&out), 200, "{out:?}");
}

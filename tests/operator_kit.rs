//! The operator's kit, with real processes: API tokens rotated through
//! `api_token_file` and SIGHUP while a client keeps calling, logs that name
//! the node on every line and follow a request by its `X-Request-ID`, an
//! access log that never writes a session id, `edgenode completions`.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An endpoint behind the token that changes nothing.
const GUARDED: &str = "/api/users/nobody/sessions";

/// Calls [`GUARDED`] with `token` in a loop until stopped; counts the
/// answers that were not 200 and the calls made.
struct Caller {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Caller {
    fn start(url: String, token: &str) -> Caller {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = Client::new(url).with_token(token);
        let (s, n, f) = (stop.clone(), calls.clone(), failures.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let outcome = match c.try_request("GET", GUARDED, &[], None) {
                    Ok(a) if a.status == 200 => None,
                    Ok(a) => Some(format!("{} {}", a.status, a.text)),
                    Err(e) => Some(e),
                };
                n.fetch_add(1, Ordering::Relaxed);
                if let Some(why) = outcome {
                    f.lock().unwrap().push(why);
                }
            }
        });
        Caller {
            stop,
            calls,
            failures,
            thread: Some(thread),
        }
    }

    /// Stops the loop; returns (calls, failures).
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("caller thread");
        }
        let f = self.failures.lock().unwrap().clone();
        (self.calls.load(Ordering::Relaxed), f)
    }
}

fn status_with(node: &Node, token: &str) -> u16 {
    node.client().with_token(token).get(GUARDED).status
}

/// SIGHUP and wait until the node's log says it acted on it (`needle`
/// appears once more than before).
fn hangup(node: &Node, needle: &str) {
    let before = node.log_text().matches(needle).count();
    signal(node.pid(), libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || node
            .log_text()
            .matches(needle)
            .count()
            > before),
        "no {needle:?} after SIGHUP; log:\n{}",
        node.log_text()
    );
}

#[test]
fn api_tokens_rotate_through_the_token_file_and_sighup_without_a_failed_request() {
    let dir = tempdir();
    let file = dir.path().join("tokens");
    let (old, new) = ("old-9f2c7d1e5a", "new-4b8e0c3f6d");
    std::fs::write(&file, format!("# rotation test\n{old}\n")).unwrap();
    let mut node = Node::builder()
        .arg("--api-token-file")
        .arg(file.to_string_lossy())
        .start();
    assert_eq!(status_with(&node, old), 200);
    assert_eq!(status_with(&node, new), 401);
    assert_eq!(node.client().get(GUARDED).status, 401, "no token");

    // [old] -> [old, new], with a client using the old token throughout.
    let caller = Caller::start(node.url(), old);
    std::fs::write(&file, format!("{old}\n# the next one\n{new}\n")).unwrap();
    hangup(&node, "api tokens reloaded");
    assert_eq!(status_with(&node, new), 200);
    assert_eq!(status_with(&node, old), 200);
    let (calls, failures) = caller.finish();
    assert!(
        calls > 0 && failures.is_empty(),
        "{calls} calls: {failures:?}"
    );

    // [old, new] -> [new], the back ends already on the new token.
    let caller = Caller::start(node.url(), new);
    std::fs::write(&file, format!("{new}\n")).unwrap();
    hangup(&node, "api tokens reloaded");
    assert_eq!(status_with(&node, old), 401);
    assert_eq!(status_with(&node, new), 200);

    // A broken file, then a missing one: the last good list stays.
    std::fs::write(&file, "new token with spaces\n").unwrap();
    hangup(&node, "api token reload failed");
    assert_eq!(status_with(&node, new), 200);
    std::fs::write(&file, "# every token commented out\n").unwrap();
    hangup(&node, "api token reload failed");
    assert_eq!(status_with(&node, new), 200);
    assert_eq!(node.client().get(GUARDED).status, 401, "never opened");
    std::fs::remove_file(&file).unwrap();
    hangup(&node, "api token reload failed");
    assert_eq!(status_with(&node, new), 200);
    assert_eq!(status_with(&node, old), 401);
    let (calls, failures) = caller.finish();
    assert!(
        calls > 0 && failures.is_empty(),
        "{calls} calls: {failures:?}"
    );

    let log = node.log_text();
    assert!(log.contains("ERROR"), "{log}");
    for secret in [old, new] {
        assert!(!log.contains(secret), "a token reached the log:\n{log}");
    }
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "SIGHUP never kills"
    );
}

#[test]
fn a_token_file_counts_for_listening_beyond_loopback_and_an_empty_one_is_refused() {
    let dir = tempdir();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# none yet\n").unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(BIN)
            .args(["--config", "/dev/null", "--listen"])
            .arg(format!("0.0.0.0:{}", free_port()))
            .arg("--data-dir")
            .arg(dir.path().join("db"))
            .arg("--api-token-file")
            .arg(&file)
            .args(extra)
            .env("EDGENODE_API_TOKEN", "")
            .output()
            .expect("run edgenode")
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("holds no token"),
        "{err}"
    );
    // With a token in the file the node listens on 0.0.0.0.
    std::fs::write(&file, "lan-7c1d9e\n").unwrap();
    let node = Node::builder()
        .listen_ip("0.0.0.0")
        .arg("--api-token-file")
        .arg(file.to_string_lossy())
        .start();
    assert_eq!(status_with(&node, "lan-7c1d9e"), 200);
    // Secrets never in --help: the token's value, given in the environment.
    let help = std::process::Command::new(BIN)
        .arg("--help")
        .env("EDGENODE_API_TOKEN", "help-secret-31a")
        .output()
        .expect("edgenode --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--api-token-file") && !help.contains("help-secret-31a"));
}

/// The lines a node wrote, without empty ones.
fn lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn every_line_names_the_node_and_request_ids_are_echoed_logged_or_replaced() {
    let mut node = Node::builder()
        .args(["--instance-id", "kit-node-7", "--access-log", "full"])
        .start();
    let c = node.client();
    // A balancer's id: echoed and on the request's lines.
    let good = "lb-7f3a.9_Z-1";
    let a = c.request("GET", "/api/health", &[("X-Request-ID", good)], None);
    assert_eq!(a.header("x-request-id"), Some(good));
    let a = c.request("GET", "/api/nothing-here", &[("X-Request-ID", good)], None);
    assert_eq!(a.status, 404);
    // Hostile ids: replaced by one the node makes.
    let long = "a".repeat(65);
    let mut seen = Vec::new();
    for bad in [
        long.as_str(),
        "bad id",
        "x;y=z",
        "<script>",
        "a%0d%0aSet-Cookie:x",
    ] {
        let a = c.request("GET", "/api/health", &[("X-Request-ID", bad)], None);
        let id = a.header("x-request-id").expect("an id").to_string();
        assert_ne!(id, bad);
        assert!(
            id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        seen.push(id);
    }
    // Header tricks ureq would not send: two ids, a folded line, a bare CR.
    for raw in [
        "X-Request-ID: one\r\nX-Request-ID: two\r\n",
        "X-Request-ID: ok\r\n evil-continuation\r\n",
        "X-Request-ID: ab\rSet-Cookie: x\r\n",
    ] {
        let req = format!("GET /api/health HTTP/1.1\r\nHost: x\r\n{raw}Connection: close\r\n\r\n");
        let out = raw_http(&node.addr, req.as_bytes());
        let status = raw_status(&out);
        if status == 200 {
            let id = out
                .lines()
                .find_map(|l| l.strip_prefix("x-request-id: "))
                .expect("an id");
            assert!(
                id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                "{out}"
            );
            seen.push(id.to_string());
        } else {
            assert_eq!(status, 400, "hyper refuses a malformed head: {out}");
        }
    }
    // No id given: one is made, and each differs.
    let made = c.get("/api/health");
    seen.push(made.header("x-request-id").expect("an id").to_string());
    seen.sort();
    seen.dedup();
    assert!(seen.len() >= 7, "{seen:?}");

    assert!(node.terminate().success());
    let log = node.log_text();
    let all = lines(&log);
    assert!(all.len() > 10, "{log}");
    for l in &all {
        assert!(
            l.contains("instance_id=kit-node-7"),
            "a line without the node:\n{l}"
        );
    }
    let about_good: Vec<_> = all.iter().filter(|l| l.contains(good)).collect();
    assert!(
        about_good.iter().any(|l| l.contains("status=404"))
            && about_good.iter().any(|l| l.contains("route=/api/health")),
        "{log}"
    );
    for id in &seen {
        assert!(
            log.contains(&format!("request_id={id}")),
            "{id} not logged:\n{log}"
        );
    }
    for bad in [
        "bad id",
        "x;y=z",
        "<script>",
        "Set-Cookie",
        "evil",
        long.as_str(),
    ] {
        assert!(!log.contains(bad), "{bad:?} reached the log");
    }
}

#[test]
fn the_full_access_log_never_writes_a_session_id_in_either_format() {
    for format in ["plain", "json"] {
        let node = Node::builder()
            .args(["--instance-id", "kit-node-a", "--access-log", "full"])
            .args(["--log-format", format])
            .start();
        let c = node.client();
        let mut ids = Vec::new();
        for user in ["ann", "bob"] {
            let s = c.create(&format!(r#"{{"user_id":"{user}"}}"#));
            let id = id_of(&s);
            assert_eq!(c.get(&format!("/api/sessions/{id}")).status, 200);
            c.patch(&format!("/api/sessions/{id}"), r#"{"metadata":{"a":1}}"#);
            let cookie = format!("session_id={id}");
            let a = c.request("GET", "/api/session", &[("Cookie", &cookie)], None);
            assert_eq!(a.status, 200, "{}", a.text);
            let a = c.request("GET", "/api/session", &[("X-Session-ID", &id)], None);
            assert_eq!(a.status, 200, "{}", a.text);
            let r = c.post(&format!("/api/sessions/{id}/rotate"), "{}");
            ids.push(id);
            if let Some(n) = r.json()["session_id"].as_str() {
                ids.push(n.to_string());
                c.delete(&format!("/api/sessions/{n}"));
            }
        }
        // A browser session made by GET /api/session (its id in Set-Cookie).
        let a = c.get("/api/session");
        let set = a.header("set-cookie").expect("a new browser session");
        let fresh = set
            .trim_start_matches("session_id=")
            .split(';')
            .next()
            .unwrap()
            .to_string();
        ids.push(fresh);
        // An unknown id in the path: a 404 is logged, the id is not.
        let ghost = "0b7d5f4e-3c2a-4b1d-9e8f-7a6b5c4d3e2f";
        assert_eq!(c.get(&format!("/api/sessions/{ghost}")).status, 404);
        ids.push(ghost.into());

        let log = node.log_text();
        let access: Vec<_> = lines(&log)
            .into_iter()
            .filter(|l| l.contains("access"))
            .collect();
        assert!(access.len() >= 12, "{format}: {log}");
        assert!(log.contains("/api/sessions/:id"), "{log}");
        for id in &ids {
            assert_eq!(id.len(), 36, "{id}");
            assert!(
                !log.contains(id.as_str()),
                "{format}: session id {id} logged:\n{log}"
            );
        }
        for l in lines(&log) {
            assert!(l.contains("kit-node-a"), "{format}: {l}");
            if format == "json" {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                assert!(v.is_object());
            }
        }
    }
}

#[test]
fn a_sampled_access_log_writes_about_one_request_in_n() {
    let node = Node::builder()
        .args(["--access-log", "sampled", "--access-log-sample", "10"])
        .start();
    let c = node.client();
    for _ in 0..200 {
        c.get("/api/health");
    }
    let n = lines(&node.log_text())
        .into_iter()
        .filter(|l| l.contains("access") && l.contains("route=/api/health"))
        .count();
    // 200 health requests plus the readiness polls, one in ten of them all.
    assert!((18..=30).contains(&n), "{n} access lines");
}

#[test]
fn completions_are_printed_for_each_shell_and_the_man_page_is_pointed_to() {
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .output()
            .expect("run edgenode")
    };
    // The operator's line: `edgenode completions bash > /usr/share/...`.
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        let script = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // from the one declaration of the flags
        assert!(
            script.contains("redis-url") && script.contains("near-admit-ms"),
            "{shell}: {script}"
        );
    }
    let dir = tempdir();
    let file = dir.path().join("edgenode.bash");
    std::fs::write(&file, run(&["completions", "bash"]).stdout).expect("write");
    let parsed = std::process::Command::new("bash")
        .arg("-n")
        .arg(&file)
        .status()
        .expect("bash");
    assert!(parsed.success(), "the bash script does not parse");
    // No shell, or one without completions: told what to type, nothing on
    // stdout (a redirect never gets a message instead of a script).
    for args in [&["completions"][..], &["completions", "tcsh"]] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(err.contains("edgenode completions bash >"), "{err}");
    }
    let out = run(&["man"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains("release tarball") && err.contains("edgenode-docs"),
        "{err}"
    );
}

#[test]
fn a_node_listens_and_answers_on_ipv6_loopback() {
    let node = Node::builder().listen_ip("[::1]").start();
    assert!(node.addr.starts_with("[::1]:"));
    let a = node.client().get("/api/health");
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(node.client().post("/api/sessions", "{}").status, 201);
}

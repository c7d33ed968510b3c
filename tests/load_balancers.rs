//! The operator's cluster: three nodes on one Redis behind nginx or HAProxy,
//! with the shipped configs rendered from `deploy/` (addresses and run
//! directories substituted, nothing else). Nodes are killed, drained and
//! restarted, Redis is killed and restarted, and clients must not notice.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

#[derive(Clone, Copy, PartialEq)]
enum Balancer {
    Nginx,
    Haproxy,
}

struct Lb {
    child: Child,
    url: String,
    status_url: String,
}

impl Drop for Lb {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master then stops its workers. A SIGKILLed
        // master leaves them running, still listening on the test's port.
        signal(self.child.id(), libc::SIGTERM);
        let exited = wait_until(Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn render(template: &str, out: &Path, vars: &[(&str, String)]) {
    let mut cmd = Command::new("sh");
    cmd.arg(Path::new(REPO).join("deploy/render.sh"))
        .arg(Path::new(REPO).join("deploy").join(template))
        .arg(out);
    for (k, v) in vars {
        cmd.arg(format!("{k}={v}"));
    }
    let st = cmd.status().expect("run deploy/render.sh");
    assert!(st.success(), "render {template} failed");
}

fn start_balancer(kind: Balancer, nodes: &[&Node], dir: &Path) -> Lb {
    let listen = format!("127.0.0.1:{}", free_port());
    let status = format!("127.0.0.1:{}", free_port());
    let mut vars = vec![
        ("NODE1", nodes[0].addr.clone()),
        ("NODE2", nodes[1].addr.clone()),
        ("NODE3", nodes[2].addr.clone()),
        ("LISTEN", listen.clone()),
        ("RUNDIR", dir.display().to_string()),
    ];
    let (child, status_url) = match kind {
        Balancer::Nginx => {
            vars.push(("STATUS_LISTEN", status.clone()));
            vars.push(("LOGDIR", dir.display().to_string()));
            let conf = dir.join("nginx.conf");
            render("nginx.conf", &conf, &vars);
            let prefix = format!("{}/", dir.display());
            let check = Command::new("nginx")
                .args(["-t", "-p", &prefix, "-c"])
                .arg(&conf)
                .output()
                .expect("nginx");
            assert!(
                check.status.success(),
                "nginx -t: {}",
                String::from_utf8_lossy(&check.stderr)
            );
            let child = Command::new("nginx")
                .args(["-p", &prefix, "-c"])
                .arg(&conf)
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nginx");
            (child, format!("http://{status}/nginx_status"))
        }
        Balancer::Haproxy => {
            vars.push(("STATS_LISTEN", status.clone()));
            let conf = dir.join("haproxy.cfg");
            render("haproxy.cfg", &conf, &vars);
            let check = Command::new("haproxy")
                .arg("-c")
                .arg("-f")
                .arg(&conf)
                .output()
                .expect("haproxy");
            assert!(
                check.status.success(),
                "haproxy -c: {}",
                String::from_utf8_lossy(&check.stdout)
            );
            let child = Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start haproxy");
            (child, format!("http://{status}/stats"))
        }
    };
    let lb = Lb {
        child,
        url: format!("http://{listen}"),
        status_url,
    };
    let c = Client::new(lb.url.clone());
    assert!(
        wait_until(Duration::from_secs(15), || c
            .try_request("GET", "/api/ready", &[], None)
            .map(|a| a.status == 200)
            .unwrap_or(false)),
        "balancer did not come up"
    );
    lb
}

fn cluster_node(redis: &Redis, name: &str) -> Node {
    Node::builder()
        .args([
            "--redis-url",
            &redis.url(),
            "--instance-id",
            name,
            "--trusted-proxies",
            "127.0.0.1",
        ])
        .args([
            "--drain-delay-ms",
            "2500",
            "--redis-probe-interval-ms",
            "100",
            "--redis-probe-max-ms",
            "500",
        ])
        .start()
}

fn in_redis_mode(n: &Node) -> bool {
    let h = n.client().get("/api/health").json();
    h["store"]["active"] == "redis" && h["store"]["pending_sync"] == 0
}

/// Steady GET traffic through the balancer, kept under its per-client rate
/// limit, recording failures and the slowest answer.
struct Traffic {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    slowest_ms: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Traffic {
    fn start(lb: &Client, ids: &[String]) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (requests, failures, slowest_ms) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let threads = (0..2)
            .map(|t| {
                let (lb, ids) = (lb.clone(), ids.to_vec());
                let (stop, requests, failures, slowest_ms) = (
                    stop.clone(),
                    requests.clone(),
                    failures.clone(),
                    slowest_ms.clone(),
                );
                std::thread::spawn(move || {
                    let mut errors = Vec::new();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let res = lb.try_request(
                            "GET",
                            &format!("/api/sessions/{}", ids[i % ids.len()]),
                            &[],
                            None,
                        );
                        slowest_ms
                            .fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                        requests.fetch_add(1, Ordering::Relaxed);
                        match res {
                            Ok(a) if a.status == 200 => {}
                            Ok(a) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                if errors.len() < 5 {
                                    errors.push(format!("{} {}", a.status, a.text));
                                }
                            }
                            Err(e) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                if errors.len() < 5 {
                                    errors.push(e);
                                }
                            }
                        }
                        i += 2;
                        std::thread::sleep(Duration::from_millis(60));
                    }
                    errors
                })
            })
            .collect();
        Traffic {
            stop,
            requests,
            failures,
            slowest_ms,
            threads,
        }
    }

    /// Stops and returns (requests, failures, slowest ms, error samples).
    fn finish(self) -> (u64, u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.slowest_ms.load(Ordering::Relaxed),
            errors,
        )
    }
}

fn id_of(v: &Value) -> String {
    v["session_id"].as_str().unwrap().to_string()
}

fn cluster_story(kind: Balancer) {
    let name = if kind == Balancer::Nginx {
        "nginx"
    } else {
        "haproxy"
    };
    let mut redis = Redis::start(true);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| cluster_node(&redis, &format!("node{i}")))
        .collect();
    for n in &nodes {
        assert!(wait_until(Duration::from_secs(5), || in_redis_mode(n)));
    }
    let dir = tempdir();
    let lb = start_balancer(kind, &nodes.iter().collect::<Vec<_>>(), dir.path());
    let c = Client::new(lb.url.clone());
    assert_eq!(
        Client::new(lb.status_url.clone()).get("").status,
        200,
        "status page on loopback"
    );

    // Sessions created through the balancer are served by every node.
    let ids: Vec<String> = (0..12)
        .map(|i| id_of(&c.create(&format!(r#"{{"user_id":"lb{i}"}}"#))))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        seen.insert(
            c.get("/api/health").json()["instance_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert!(
        seen.len() >= 2,
        "{name} spread requests over several nodes: {seen:?}"
    );
    for n in &nodes {
        assert_eq!(
            n.client().get(&format!("/api/sessions/{}", ids[0])).status,
            200,
            "every node serves every session"
        );
    }
    // Request counts stay exact through the balancer.
    let counted = &ids[1];
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (c, path) = (c.clone(), format!("/api/sessions/{counted}"));
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| c.get(&path).status)
                    .filter(|&s| s == 200)
                    .count()
            })
        })
        .collect();
    let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(ok, 40);
    assert_eq!(
        nodes[2]
            .client()
            .get(&format!("/api/sessions/{counted}"))
            .json()["request_count"],
        41
    );

    // kill -9 one node under steady reads: no GET fails.
    let traffic = Traffic::start(&c, &ids);
    std::thread::sleep(Duration::from_millis(500));
    nodes[0].kill9();
    std::thread::sleep(Duration::from_secs(3));
    let (requests, failures, slowest, errors) = traffic.finish();
    println!("{name}: kill -9 node1 under traffic: {requests} GETs, {failures} failed, slowest {slowest} ms");
    assert_eq!(failures, 0, "{name}: GETs failed after kill -9: {errors:?}");
    nodes[0].restart();

    // SIGTERM another: it drains, nothing fails, it restarts and rejoins.
    let traffic = Traffic::start(&c, &ids);
    std::thread::sleep(Duration::from_millis(500));
    let drain_started = Instant::now();
    let status = nodes[1].terminate();
    let drained_in = drain_started.elapsed();
    assert!(status.success(), "drained node exits 0");
    let rejoin_started = Instant::now();
    nodes[1].restart();
    // one probe request per 100 ms: the balancer's rate limit applies to us too
    let rejoined = wait_until(Duration::from_secs(15), || {
        std::thread::sleep(Duration::from_millis(100));
        c.get("/api/health").json()["instance_id"] == "node2"
    });
    let rejoined_in = rejoin_started.elapsed();
    let (requests, failures, slowest, errors) = traffic.finish();
    println!(
        "{name}: SIGTERM node2 under traffic: {requests} GETs, {failures} failed, slowest {slowest} ms, drained in {drained_in:?}, rejoined in {rejoined_in:?}"
    );
    assert_eq!(
        failures, 0,
        "{name}: requests failed during the drain: {errors:?}"
    );
    assert!(
        rejoined,
        "{name}: node2 never served again after its restart"
    );

    // Redis killed behind the cluster and restarted: the cluster keeps
    // answering, and afterwards all nodes agree on every session.
    let before: Vec<String> = ids.iter().take(6).cloned().collect();
    redis.kill9();
    let mut during = Vec::new();
    let mut outage_failures = 0;
    for i in 0..12 {
        match c.try_request(
            "POST",
            "/api/sessions",
            &[],
            Some(&format!(
                r#"{{"user_id":"outage{i}","metadata":{{"i":{i}}}}}"#
            )),
        ) {
            Ok(a) if a.status == 201 => during.push(id_of(&a.json())),
            _ => outage_failures += 1,
        }
    }
    // pre-outage sessions patched through the balancer, from the mirrors
    for id in &before {
        let a = c.patch(
            &format!("/api/sessions/{id}"),
            r#"{"metadata":{"outage_patch":true}}"#,
        );
        assert!(
            a.status == 200 || a.status == 404,
            "{name}: patch during outage answered {}",
            a.status
        );
    }
    assert_eq!(
        outage_failures, 0,
        "{name}: creates failed during the Redis outage"
    );
    redis.restart();
    for n in &nodes {
        assert!(
            wait_until(Duration::from_secs(15), || in_redis_mode(n)),
            "{name}: node did not reconcile"
        );
    }
    for id in before.iter().chain(during.iter()) {
        let views: Vec<Value> = nodes
            .iter()
            .map(|n| {
                let mut v = n.client().get(&format!("/api/sessions/{id}")).json();
                let o = v.as_object_mut().unwrap();
                for volatile in ["request_count", "last_accessed", "expires_at"] {
                    o.remove(volatile);
                }
                v
            })
            .collect();
        assert!(
            views[0]["session_id"].is_string(),
            "{name}: session {id} lost"
        );
        assert!(
            views.iter().all(|v| *v == views[0]),
            "{name}: nodes disagree on {id}: {views:?}"
        );
    }
    println!("{name}: Redis outage: {} sessions created through the balancer, all nodes agree afterwards", during.len());
    drop(lb);
    drop(nodes);
}

/// A browser: keeps every cookie it was given (the node's `session_id`, the
/// balancer's `edgenode_route`) and sends all of them back.
struct Browser {
    base: String,
    agent: ureq::Agent,
    cookies: BTreeMap<String, String>,
}

/// One answer as a browser sees it: status, JSON body, raw Set-Cookie lines.
struct Page {
    status: u16,
    body: Value,
    set_cookies: Vec<String>,
}

impl Browser {
    fn new(base: impl Into<String>) -> Browser {
        Browser {
            base: base.into(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build(),
            cookies: BTreeMap::new(),
        }
    }

    fn get(&mut self, path: &str) -> Page {
        let mut req = self.agent.get(&format!("{}{}", self.base, path));
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req = req.set("Cookie", &jar.join("; "));
        }
        let resp = match req.call() {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET {}{path}: {e}", self.base),
        };
        let status = resp.status();
        let set_cookies: Vec<String> = resp
            .all("set-cookie")
            .into_iter()
            .map(String::from)
            .collect();
        for line in &set_cookies {
            let pair = line.split(';').next().unwrap_or("");
            if let Some((name, value)) = pair.split_once('=') {
                self.cookies
                    .insert(name.trim().to_string(), value.trim().to_string());
            }
        }
        let text = resp.into_string().unwrap_or_default();
        Page {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            set_cookies,
        }
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies.get(name).map(String::as_str)
    }

    /// The node named by the routing cookie, as an index into the nodes.
    fn routed_to(&self) -> usize {
        match self.cookie(ROUTE_COOKIE) {
            Some("node1") => 0,
            Some("node2") => 1,
            Some("node3") => 2,
            other => panic!("routing cookie names no node: {other:?}"),
        }
    }
}

const ROUTE_COOKIE: &str = "edgenode_route";

fn store_mode(n: &Node) -> String {
    n.client()
        .try_request("GET", "/api/health", &[], None)
        .map(|a| {
            a.json()["store"]["active"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

/// The routing cookie: with Redis down a browser stays on the node that holds
/// its session for as long as that node lives; with Redis up any node serves
/// it, and a draining or dead node hands the browser to another one.
fn route_cookie_story(kind: Balancer) {
    let name = if kind == Balancer::Nginx {
        "nginx"
    } else {
        "haproxy"
    };
    let started = Instant::now();
    let mut redis = Redis::start(true);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| cluster_node(&redis, &format!("node{i}")))
        .collect();
    for n in &nodes {
        assert!(wait_until(Duration::from_secs(5), || in_redis_mode(n)));
    }
    let dir = tempdir();
    let lb = start_balancer(kind, &nodes.iter().collect::<Vec<_>>(), dir.path());

    // Redis up: a session created through one node is served by every node.
    let mut direct = Browser::new(nodes[0].url());
    let first = direct.get("/api/session");
    assert_eq!(first.status, 200);
    let shared = id_of(&first.body);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            n.client().get(&format!("/api/sessions/{shared}")).json()["session_id"],
            shared.as_str(),
            "{name}: node{} serves a session created on node1",
            i + 1
        );
        direct.base = n.url();
        let page = direct.get("/api/session");
        assert_eq!(page.status, 200);
        assert_eq!(
            id_of(&page.body),
            shared,
            "{name}: node{} serves the browser's session",
            i + 1
        );
    }
    assert!(
        direct.cookie(ROUTE_COOKIE).is_none(),
        "the nodes themselves set no routing cookie"
    );

    // Redis down: every node falls back to its own disk.
    redis.kill9();
    for n in &nodes {
        assert!(
            wait_until(Duration::from_secs(10), || store_mode(n) == "sled"),
            "{name}: node did not fall back to sled"
        );
    }
    let outage_started = Instant::now();
    let mut browser = Browser::new(lb.url.clone());
    let page = browser.get("/api/session");
    assert_eq!(page.status, 200, "{name}: first visit: {:?}", page.body);
    let id = id_of(&page.body);
    assert_eq!(page.body["request_count"], 1);
    assert_eq!(browser.cookie("session_id"), Some(id.as_str()));
    let route = browser.cookie(ROUTE_COOKIE).map(String::from);
    for count in 2..=21 {
        let page = browser.get("/api/session");
        assert_eq!(
            page.status, 200,
            "{name}: visit {count} during the outage: {:?}",
            page.body
        );
        assert_eq!(
            id_of(&page.body),
            id,
            "{name}: visit {count} during the outage got another session"
        );
        assert_eq!(page.body["request_count"], count, "{name}: visit {count}");
        assert_eq!(
            browser.cookie(ROUTE_COOKIE),
            route.as_deref(),
            "{name}: routing cookie changed during the outage"
        );
    }
    let outage_took = outage_started.elapsed();
    let route = route.unwrap_or_else(|| panic!("{name}: no routing cookie"));
    let route_line = page
        .set_cookies
        .iter()
        .find(|l| l.starts_with(ROUTE_COOKIE))
        .unwrap();
    assert!(
        route_line.to_ascii_lowercase().contains("httponly"),
        "{name}: routing cookie is HttpOnly: {route_line}"
    );
    let home = browser.routed_to();

    // Redis back: the outage session reaches Redis, and then any node serves
    // it. The browser's node drains (SIGTERM): the browser moves to another
    // node without a failed request; that node is killed: it moves again.
    redis.restart();
    for n in &nodes {
        assert!(
            wait_until(Duration::from_secs(15), || in_redis_mode(n)),
            "{name}: node did not reconcile"
        );
    }
    let mut count = 21;
    let mut visit = |browser: &mut Browser, what: &str| {
        count += 1;
        let page = browser.get("/api/session");
        assert_eq!(page.status, 200, "{name}: {what}: {:?}", page.body);
        assert_eq!(id_of(&page.body), id, "{name}: {what}: another session");
        assert_eq!(page.body["request_count"], count, "{name}: {what}");
    };
    let drain_started = Instant::now();
    signal(nodes[home].pid(), libc::SIGTERM);
    // one visit per 50 ms, under the balancer's rate limit
    let moved = wait_until(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(50));
        visit(&mut browser, "visit while its node drains");
        browser.routed_to() != home
    });
    assert!(moved, "{name}: browser still routed to its draining node");
    let drain_moved_in = drain_started.elapsed();
    let second = browser.routed_to();
    nodes[second].kill9();
    visit(&mut browser, "first visit after its node died");
    let third = browser.routed_to();
    assert!(
        third != second && third != home,
        "{name}: routed to node{} after node{} drained and node{} died",
        third + 1,
        home + 1,
        second + 1
    );
    visit(&mut browser, "second visit after its node died");
    assert_eq!(browser.routed_to(), third);

    // A routing cookie that names no node is ignored and replaced.
    let mut stranger = Browser::new(lb.url.clone());
    stranger.cookies.insert(ROUTE_COOKIE.into(), "node9".into());
    assert_eq!(stranger.get("/api/session").status, 200);
    assert_eq!(stranger.routed_to(), third, "{name}: the only live node");

    println!(
        "{name}: routing cookie: 21 visits on {route} during the Redis outage in {outage_took:?}; after Redis returned, moved off draining node{} in {drain_moved_in:?} ({count} visits in all, none failed), off killed node{} at once; whole story {:?}",
        home + 1,
        second + 1,
        started.elapsed()
    );
    drop(lb);
    drop(nodes);
}

#[test]
fn nginx_route_cookie_keeps_a_browser_on_its_node_during_a_redis_outage() {
    route_cookie_story(Balancer::Nginx);
}

#[test]
fn haproxy_route_cookie_keeps_a_browser_on_its_node_during_a_redis_outage() {
    route_cookie_story(Balancer::Haproxy);
}

#[test]
fn nginx_cluster_survives_node_loss_drains_and_a_redis_outage() {
    cluster_story(Balancer::Nginx);
}

#[test]
fn haproxy_cluster_survives_node_loss_drains_and_a_redis_outage() {
    cluster_story(Balancer::Haproxy);
}

#[test]
fn install_script_installs_and_uninstalls_into_a_root() {
    let root = tempdir();
    let pkg = tempdir();
    let p = pkg.path();
    std::fs::copy(BIN, p.join("edgenode")).unwrap();
    std::fs::create_dir_all(p.join("systemd")).unwrap();
    for f in ["edgenode.service", "edgenode.socket"] {
        std::fs::copy(
            Path::new(REPO).join("systemd").join(f),
            p.join("systemd").join(f),
        )
        .unwrap();
    }
    std::fs::copy(
        Path::new(REPO).join("deploy/edgenode.toml.example"),
        p.join("edgenode.toml.example"),
    )
    .unwrap();
    std::fs::copy(
        Path::new(REPO).join("deploy/install.sh"),
        p.join("install.sh"),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("sh")
            .arg(p.join("install.sh"))
            .args(args)
            .arg("--root")
            .arg(root.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install.sh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let r = |rel: &str| -> PathBuf { root.path().join(rel) };
    run(&[]);
    assert!(r("usr/local/bin/edgenode").exists());
    assert!(r("etc/systemd/system/edgenode.service").exists());
    assert!(r("etc/edgenode/edgenode.toml").exists());
    // idempotent, and an operator's config is never overwritten
    std::fs::write(
        r("etc/edgenode/edgenode.toml"),
        "listen = \"127.0.0.1:9999\"\n",
    )
    .unwrap();
    run(&[]);
    assert_eq!(
        std::fs::read_to_string(r("etc/edgenode/edgenode.toml")).unwrap(),
        "listen = \"127.0.0.1:9999\"\n"
    );
    run(&["--uninstall"]);
    assert!(!r("usr/local/bin/edgenode").exists());
    assert!(!r("etc/systemd/system/edgenode.service").exists());
    assert!(
        r("etc/edgenode/edgenode.toml").exists(),
        "uninstall keeps the config"
    );
}

//! The operator's cluster: three nodes on one Redis behind nginx or HAProxy,
//! with the shipped configs rendered from `deploy/` (addresses and run
//! directories substituted, nothing else). Nodes are killed, drained and
//! restarted, Redis is killed and restarted, and clients must not notice.

mod common;

use common::*;
use serde_json::Value;
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
        let _ = self.child.kill();
        let _ = self.child.wait();
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

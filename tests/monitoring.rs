//! The operator's monitoring kit in `deploy/`: the alerting rules pass
//! `promtool`'s check and their unit tests, and the Grafana dashboard's
//! every query, taken from the dashboard JSON itself, returns data from a
//! real Prometheus scraping three real nodes through a Redis outage and a
//! node killed with SIGKILL, while the shipped rules go pending for those
//! faults.

mod common;

use common::prometheus::{Prometheus, PROMTOOL};
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const TOKEN: &str = "monitoring-test-token-7d3e9a1c";
const RULES: &str = "deploy/prometheus/edgenode-rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/edgenode-rules.test.yml";
const SCRAPE_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const DASHBOARD: &str = "deploy/grafana/edgenode-dashboard.json";
/// What Grafana makes of `$__rate_interval` with a 1 s scrape interval:
/// max($__interval + scrape interval, 4 x scrape interval).
const RATE_INTERVAL: &str = "4s";

fn repo(p: &str) -> String {
    Path::new(REPO).join(p).display().to_string()
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new(PROMTOOL)
        .args(args)
        .current_dir(REPO)
        .output()
        .expect("promtool must be installed (scripts/test.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The shipped example scrape config, made to scrape `targets` every second
/// with the token from `token_file` and to load `rules`: each edit must
/// find what it replaces, so the test breaks if the example changes shape.
fn scrape_config(targets: &[String], token_file: &Path, rules: &str) -> String {
    let shipped = std::fs::read_to_string(repo(SCRAPE_CONFIG)).expect("read prometheus.yml");
    let quoted: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    let edits = [
        ("scrape_interval: 15s", "scrape_interval: 1s".to_string()),
        (
            "evaluation_interval: 15s",
            "evaluation_interval: 1s".to_string(),
        ),
        (
            "/etc/prometheus/edgenode.token",
            token_file.display().to_string(),
        ),
        ("/etc/prometheus/edgenode-rules.yml", rules.to_string()),
        (
            "[\"10.0.0.11:8080\", \"10.0.0.12:8080\", \"10.0.0.13:8080\"]",
            format!("[{}]", quoted.join(", ")),
        ),
    ];
    let mut conf = shipped;
    for (from, to) in edits {
        assert!(conf.contains(from), "{SCRAPE_CONFIG} no longer has {from}");
        conf = conf.replace(from, &to);
    }
    conf
}

#[test]
fn alerting_rules_pass_promtool_check_and_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", RULES]);
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(&["test", "rules", RULE_TESTS]);
    assert!(ok, "promtool test rules:\n{out}");
    // The example scrape config is valid as shipped, once its files exist.
    let dir = tempdir();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).expect("token file");
    let conf = dir.path().join("prometheus.yml");
    let targets = ["127.0.0.1:1".to_string()];
    std::fs::write(&conf, scrape_config(&targets, &token, &repo(RULES))).expect("write config");
    let (ok, out) = promtool(&["check", "config", &conf.display().to_string()]);
    assert!(ok, "promtool check config:\n{out}");
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One dashboard query: its panel, its expression with Grafana's variables
/// replaced, and whether the panel draws one line per node (its legend
/// names the instance).
struct PanelQuery {
    panel: String,
    expr: String,
    per_node: bool,
}

fn dashboard_queries(instances: &[String]) -> Vec<PanelQuery> {
    let text = std::fs::read_to_string(repo(DASHBOARD)).expect("read dashboard");
    let dash: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let instance_re = instances.join("|");
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dash["panels"].as_array().expect("panels").iter().collect();
    // Collapsed rows keep their panels inside the row.
    let nested: Vec<&Value> = panels
        .iter()
        .filter_map(|p| p["panels"].as_array())
        .flatten()
        .collect();
    panels.extend(nested);
    for p in panels {
        let Some(targets) = p["targets"].as_array() else {
            continue;
        };
        for t in targets {
            let expr = t["expr"].as_str().expect("target expr");
            assert!(
                !expr.contains("vector(") && !expr.contains("absent("),
                "padding in {expr}"
            );
            let expr = expr
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$instance", &instance_re);
            assert!(!expr.contains('$'), "unsubstituted variable in {expr}");
            out.push(PanelQuery {
                panel: p["title"].as_str().unwrap_or("?").to_string(),
                expr,
                per_node: t["legendFormat"]
                    .as_str()
                    .is_some_and(|l| l.contains("{{instance}}")),
            });
        }
    }
    out
}

/// Puts load on one node until `stop`: creates (201 until max_sessions,
/// then 503 too_many_sessions), uses of its sessions, unknown ids (404),
/// malformed ids (4xx), and shared cache writes and reads.
fn load(node: Client, stop: Arc<AtomicBool>) {
    let mut ids: Vec<String> = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        if let Ok(a) = node.try_request("POST", "/api/sessions", &[], Some("{}")) {
            if let Some(id) = a.json()["session_id"].as_str() {
                if ids.len() < 20 {
                    ids.push(id.to_string());
                }
            }
        }
        for k in 0..3 {
            if let Some(id) = ids.get((i as usize + k) % ids.len().max(1)) {
                let _ = node.try_request("GET", &format!("/api/sessions/{id}"), &[], None);
            }
        }
        let _ = node.try_request("GET", "/api/sessions/AAAAAAAAAAAAAAAAAAAAAA", &[], None);
        let _ = node.try_request("GET", "/api/sessions/not-an-id!", &[], None);
        let key = format!("/api/cache/monitoring/k{}", i % 8);
        let _ = node.try_request_bytes("PUT", &key, &[("Content-Type", "text/plain")], Some(b"v"));
        let _ = node.try_request("GET", &key, &[], None);
        // Pacing, not readiness: about 150 requests/s per node.
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn instances_of(series: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = series
        .iter()
        .filter_map(|s| s["metric"]["instance"].as_str().map(String::from))
        .collect();
    v.sort();
    v
}

#[test]
fn dashboard_queries_return_data_from_a_real_prometheus_through_faults() {
    let mut redis = Redis::start(false);
    let bin = release_binary();
    let mut nodes: Vec<Node> = (1..=3)
        .map(|n| {
            Node::builder()
                .binary(bin.clone())
                .args(["--redis-url", &redis.url(), "--api-token", TOKEN])
                .args(["--instance-id", &format!("node{n}")])
                .args(["--redis-probe-interval-ms", "100"])
                .args(["--redis-probe-max-ms", "500"])
                // Low, so that creates are refused (503) on every node and
                // the 5xx panels have something to draw.
                .args(["--max-sessions", "120"])
                .start()
        })
        .collect();
    let targets: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let mut instances = targets.clone();
    instances.sort();
    let killed = nodes[2].addr.clone();

    let prom = Prometheus::start(|dir| {
        let token = dir.join("edgenode.token");
        std::fs::write(&token, format!("{TOKEN}\n")).expect("token file");
        // The shipped rules file, unchanged: its `for:` durations do not
        // matter here, a rule goes pending at its first true evaluation.
        scrape_config(&targets, &token, &repo(RULES))
    });

    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = nodes
        .iter()
        .map(|n| {
            let c = n
                .client()
                .with_token(TOKEN)
                .with_timeout(Duration::from_millis(1500));
            let stop = stop.clone();
            std::thread::spawn(move || load(c, stop))
        })
        .collect();
    let stop_load = |loaders: Vec<std::thread::JoinHandle<()>>| {
        stop.store(true, Ordering::Relaxed);
        for l in loaders {
            let _ = l.join();
        }
    };

    // Every node scraped (with the token), and each has answered 4xx and
    // 5xx, before anything else is looked at.
    let all_in = wait_until(Duration::from_secs(30), || {
        prom.count(r#"up{job="edgenode"} == 1"#) == 3
            && prom.count(
                r#"sum by (instance) (edgenode_http_requests_total{job="edgenode", status="503"})"#,
            ) == 3
            && prom.count(
                r#"sum by (instance) (edgenode_http_requests_total{job="edgenode", status=~"4.."})"#,
            ) == 3
    });
    assert!(
        all_in,
        "scrapes never showed three nodes with 4xx and 503 answers; up: {:?}; prometheus log:\n{}",
        prom.query(r#"up{job="edgenode"}"#, None),
        prom.log_text()
    );

    // The rules loaded and evaluate without error.
    let groups = prom.rule_groups().expect("rules API");
    let rules: Vec<&Value> = groups
        .iter()
        .filter(|g| g["name"] == "edgenode")
        .filter_map(|g| g["rules"].as_array())
        .flatten()
        .collect();
    assert!(rules.len() >= 10, "rules not loaded: {groups:?}");
    assert!(
        wait_until(Duration::from_secs(10), || prom
            .rule_groups()
            .unwrap_or_default()
            .iter()
            .filter_map(|g| g["rules"].as_array())
            .flatten()
            .all(|r| r["health"] == "ok")),
        "a rule does not evaluate: {:?}",
        prom.rule_groups()
    );

    // Redis stops: every node fails over to its disk, and the failed-over
    // alert goes pending for each.
    redis.kill9();
    let failed_over = wait_until(Duration::from_secs(20), || {
        prom.count(r#"edgenode_store_mode{job="edgenode", mode="sled"} == 1"#) == 3
            && prom.alerting_instances("EdgenodeFailedOverToDisk") == instances
    });
    assert!(
        failed_over,
        "no failover alert for every node; alerts: {:?}",
        prom.alerts()
    );
    let t_outage = now();

    // Redis is back (empty): the nodes replay their journals and return.
    redis.restart();
    let back = wait_until(Duration::from_secs(20), || {
        prom.count(r#"edgenode_store_mode{job="edgenode", mode="redis"} == 1"#) == 3
            && prom.count(r#"edgenode_reconciliations_total{job="edgenode"} >= 1"#) == 3
            && prom.count(r#"sum by (instance) (rate(edgenode_http_requests_total{job="edgenode", status="503"}[4s])) > 0"#) == 3
    });
    assert!(
        back,
        "nodes did not reconcile; store modes: {:?}",
        prom.query("edgenode_store_mode == 1", None)
    );
    assert!(
        wait_until(Duration::from_secs(10), || prom
            .alerting_instances("EdgenodeFailedOverToDisk")
            .is_empty()),
        "failover alert still active after the reconciliation"
    );
    let t_before_kill = now();

    // One node is killed: the node-down alert goes pending for it. Wait
    // until range queries over the last RATE_INTERVAL no longer reach its
    // samples from before the kill.
    nodes[2].kill9();
    let down = wait_until(Duration::from_secs(20), || {
        prom.count(&format!(r#"up{{instance="{killed}"}} == 0"#)) == 1
            && prom.alerting_instances("EdgenodeDown") == vec![killed.clone()]
            && prom.count(&format!(
                r#"rate(edgenode_pool_completed_total{{job="edgenode"}}[{RATE_INTERVAL}])"#
            )) == 2
    });
    assert!(
        down,
        "no node-down alert for {killed}; alerts: {:?}",
        prom.alerts()
    );

    // Every panel query from the dashboard JSON.
    let queries = dashboard_queries(&instances);
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    let mut failures = Vec::new();
    for q in &queries {
        // Before the kill, over data of three live nodes.
        match prom.query(&q.expr, Some(t_before_kill)) {
            Ok(s) if s.is_empty() => failures.push(format!("{}: no data: {}", q.panel, q.expr)),
            Ok(s) if q.per_node && instances_of(&s) != instances => failures.push(format!(
                "{}: before the kill, series of {:?}, not one per node: {}",
                q.panel,
                instances_of(&s),
                q.expr
            )),
            Ok(_) => {}
            Err(e) => failures.push(format!("{}: {e}", q.panel)),
        }
        // Now: the killed node's series are stale (its last scrape failed),
        // so instant selectors and rates over RATE_INTERVAL no longer have
        // it; only `up`, which Prometheus writes itself, still has a series
        // for it (0).
        match prom.query(&q.expr, None) {
            Ok(s) if s.is_empty() => {
                failures.push(format!("{}: no data after the kill: {}", q.panel, q.expr))
            }
            Ok(s) if q.per_node => {
                let got = instances_of(&s);
                let expected: Vec<String> = if q.expr.starts_with("up{") {
                    instances.clone()
                } else {
                    instances
                        .iter()
                        .filter(|i| **i != killed)
                        .cloned()
                        .collect()
                };
                if got != expected {
                    failures.push(format!(
                        "{}: after the kill, series of {got:?}, expected {expected:?}: {}",
                        q.panel, q.expr
                    ));
                }
                if q.expr.starts_with("up{") {
                    let killed_up = s
                        .iter()
                        .find(|x| x["metric"]["instance"] == killed.as_str())
                        .and_then(|x| x["value"][1].as_str())
                        .unwrap_or("");
                    if killed_up != "0" {
                        failures.push(format!("up of the killed node is {killed_up:?}"));
                    }
                }
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("{}: {e}", q.panel)),
        }
    }
    // The fault panels show the faults: during the outage every node was
    // in sled mode; since then each surviving node counts a failover and a
    // reconciliation.
    let sled = queries
        .iter()
        .find(|q| q.expr.contains(r#"mode="sled""#))
        .expect("a sled-mode panel");
    let during = prom.query(&sled.expr, Some(t_outage)).unwrap_or_default();
    let ones = during.iter().filter(|s| s["value"][1] == "1").count();
    if ones != 3 {
        failures.push(format!(
            "during the outage the sled panel showed {during:?}"
        ));
    }
    for counter in [
        "edgenode_redis_failovers_total",
        "edgenode_reconciliations_total",
    ] {
        let q = queries
            .iter()
            .find(|q| q.expr.starts_with(counter))
            .unwrap_or_else(|| panic!("no panel query of {counter}"));
        let s = prom.query(&q.expr, None).unwrap_or_default();
        if s.len() != 2 || s.iter().any(|x| x["value"][1] == "0") {
            failures.push(format!("{counter} after the faults: {s:?}"));
        }
    }

    // The rules name only metrics the nodes export.
    let names = prom.metric_names().expect("metric names");
    let rules_text = std::fs::read_to_string(repo(RULES)).expect("rules");
    for word in rules_text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("edgenode_") && !names.iter().any(|n| n == word) {
            failures.push(format!("the rules use {word}, which no node exports"));
        }
    }

    stop_load(loaders);
    println!(
        "{} dashboard queries checked before and after the kill; outage at {t_outage:.0}, kill after {t_before_kill:.0}",
        queries.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} dashboard checks failed:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
}

//! The shipped balancers' logs cannot fill an SD card: one client flooding
//! the browsers' listener for 60 s, far over its rate limit, makes each
//! balancer's log files grow by at most 10 MB (they used to take 151 MB of
//! error.log in 10 s: every 429 was logged at warn).

mod common;

use common::balancer::{Balancer, Kind};
use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "balancer-logs-test-token-5b2e";
const FLOOD: Duration = Duration::from_secs(60);
const THREADS: usize = 4;
/// URLs per curl run: curl keeps one TLS connection alive across them.
const BATCH: usize = 200;
const LIMIT_BYTES: u64 = 10 * 1024 * 1024;

fn node() -> Node {
    Node::builder()
        .args(["--trusted-proxies", "127.0.0.1", "--api-token", TOKEN])
        .start()
}

/// One curl run: `BATCH` keep-alive GETs of the browser route with a
/// session id; returns (answers, 429s).
fn curl_batch(lb: &Balancer, sid: &str) -> (u64, u64) {
    let url = format!("{}/api/session", lb.https);
    let mut cmd = Command::new("curl");
    cmd.arg("-s")
        .arg("--cacert")
        .arg(&lb.cacert)
        .args(["--max-time", "20", "-H", &format!("X-Session-ID: {sid}")])
        .args(["-w", "%{http_code}\\n"]);
    for _ in 0..BATCH {
        cmd.args(["-o", "/dev/null", &url]);
    }
    let Ok(out) = cmd.output() else {
        return (0, 0);
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let codes: Vec<&str> = text.lines().filter(|l| *l != "000").collect();
    let limited = codes.iter().filter(|c| **c == "429").count() as u64;
    (codes.len() as u64, limited)
}

fn flood_story(kind: Kind) {
    let nodes = [node(), node(), node()];
    let sid = id_of(&nodes[0].client().with_token(TOKEN).create("{}"));
    let dir = tempdir();
    let lb = Arc::new(Balancer::start(
        kind,
        [&nodes[0].addr, &nodes[1].addr, &nodes[2].addr],
        dir.path(),
    ));
    let name = kind.name();
    let before = lb.log_bytes();

    let (answers, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (lb, sid) = (lb.clone(), sid.clone());
            let (answers, limited) = (answers.clone(), limited.clone());
            std::thread::spawn(move || {
                while started.elapsed() < FLOOD {
                    let (a, l) = curl_batch(&lb, &sid);
                    answers.fetch_add(a, Ordering::Relaxed);
                    limited.fetch_add(l, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("flood thread");
    }
    let took = started.elapsed();
    let Ok(mut lb) = Arc::try_unwrap(lb) else {
        panic!("flood threads still hold the balancer");
    };
    // Stopped, so that nginx's buffered access log is written out.
    lb.stop();
    let grew = lb.log_bytes().saturating_sub(before);
    let (answers, limited) = (
        answers.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
    );
    let per_s = grew as f64 / took.as_secs_f64();
    println!(
        "{name}: {answers} requests in {took:.1?} ({:.0}/s), {limited} answered 429; logs grew {grew} bytes ({per_s:.0} bytes/s, {:.1} MB per hour)",
        answers as f64 / took.as_secs_f64(),
        per_s * 3600.0 / 1e6
    );
    // The flood really was over the limit (about 50/s per client): most
    // answers were 429s, and many of them.
    assert!(
        limited > 5_000 && limited * 10 > answers * 8,
        "{name}: the flood was not over the limit: {limited} of {answers} answers were 429"
    );
    assert!(
        grew <= LIMIT_BYTES,
        "{name}: logs grew {grew} bytes in {took:?} of flood (limit {LIMIT_BYTES})"
    );
    // The logs still say something: the sampled 429s.
    assert!(grew > 0, "{name}: nothing logged at all during the flood");
}

#[test]
fn nginx_logs_stay_small_under_a_one_client_flood() {
    flood_story(Kind::Nginx);
}

#[test]
fn haproxy_logs_stay_small_under_a_one_client_flood() {
    flood_story(Kind::Haproxy);
}

//! A node on a 1 GB Pi: bounded under a flood, rid of slow clients, and a good
//! systemd citizen (notify, watchdog, socket activation, graceful drain).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

const WORKERS: u64 = 2;
const BLOCKING: u64 = 2;

/// Descriptors the flood test holds at once: one per connection, plus this
/// process's own (stdio, the node's pipes, /proc reads) with room to spare.
const FLOOD_FDS: libc::rlim_t = 2000 + 64;

/// The hard RLIMIT_NOFILE when it allows `need` open descriptors, or why not.
fn fd_hard_limit(need: libc::rlim_t) -> Result<libc::rlim_t, String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        ));
    }
    if lim.rlim_max < need {
        return Err(format!(
            "the hard open-files limit is {}, below the {need} descriptors the test \
             client holds; raise it (ulimit -Hn, or LimitNOFILE= for a service)",
            lim.rlim_max
        ));
    }
    Ok(lim.rlim_max)
}

/// Lifts this process's soft RLIMIT_NOFILE to `hard`: the test client holds
/// every connection open, over the stock soft limit of 1 024.
fn raise_own_fd_limit(hard: libc::rlim_t) {
    let lim = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit with a valid pointer to a local struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(
        rc,
        0,
        "setrlimit(RLIMIT_NOFILE, {hard}): {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn two_thousand_connections_get_a_fast_503_and_the_node_stays_small() {
    let hard = match fd_hard_limit(FLOOD_FDS) {
        Ok(hard) => hard,
        Err(why) => {
            // Straight to stderr: the harness captures println!, and this must show.
            let _ = writeln!(
                std::io::stderr(),
                "\nSKIPPED two_thousand_connections_get_a_fast_503_and_the_node_stays_small: {why}"
            );
            return;
        }
    };
    let node = Node::builder()
        .binary(release_binary())
        .args([
            "--workers",
            &WORKERS.to_string(),
            "--blocking-threads",
            &BLOCKING.to_string(),
        ])
        .args(["--max-connections", "500", "--max-in-flight", "64"])
        .start();
    let c = node.client();
    let id = c.create("{}")["session_id"].as_str().unwrap().to_string();

    // The node started under the inherited limit and lifts its own; the
    // client's 2 000 sockets are this process's.
    raise_own_fd_limit(hard);
    // 2 000 connections at once, each asking for the session.
    let request = format!("GET /api/sessions/{id} HTTP/1.1\r\nHost: pi\r\n\r\n");
    let mut conns = Vec::new();
    let mut max_threads = 0;
    let mut max_rss = 0;
    for i in 0..2000 {
        let mut s = TcpStream::connect(&node.addr).expect("connect");
        let _ = s.write_all(request.as_bytes());
        conns.push(s);
        if i % 200 == 0 {
            let (t, r) = node.threads_and_rss_kb();
            max_threads = max_threads.max(t);
            max_rss = max_rss.max(r);
        }
    }
    let (mut ok, mut refused, mut refused_with_retry_after) = (0, 0, 0);
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        if head.starts_with("HTTP/1.1 200") {
            ok += 1;
        } else if head.starts_with("HTTP/1.1 503") {
            refused += 1;
            if head.to_ascii_lowercase().contains("retry-after: 1") {
                refused_with_retry_after += 1;
            }
        }
    }
    let (t, r) = node.threads_and_rss_kb();
    max_threads = max_threads.max(t);
    max_rss = max_rss.max(r);
    println!("2000 connections: {ok} served, {refused} refused; max threads {max_threads}, max RSS {max_rss} kB");
    assert_eq!(ok + refused, 2000, "every connection got an answer");
    assert!(ok >= 400, "the first connections were served ({ok})");
    assert!(
        refused >= 1000,
        "connections over the bound were refused ({refused})"
    );
    assert_eq!(
        refused_with_retry_after, refused,
        "every 503 carries Retry-After"
    );
    assert!(
        max_threads <= WORKERS + BLOCKING + 2,
        "threads grew to {max_threads}"
    );
    assert!(max_rss < 32 * 1024, "RSS grew to {max_rss} kB");
    drop(conns);

    // Afterwards the node answers normally, and counted the refusals.
    let h = c.get("/api/health").json();
    assert_eq!(h["status"], "ok");
    assert!(h["pool"]["rejected"].as_u64().unwrap() >= refused as u64);
    assert_eq!(c.get(&format!("/api/sessions/{id}")).status, 200);
}

#[test]
fn requests_beyond_max_in_flight_are_refused_at_once() {
    let node = Node::builder()
        .args(["--max-in-flight", "8", "--request-timeout-ms", "5000"])
        .start();
    // Eight requests stay in flight: their bodies never finish arriving.
    let stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(&node.addr).unwrap();
            s.write_all(b"POST /api/sessions HTTP/1.1\r\nHost: pi\r\nContent-Length: 100\r\n\r\n{")
                .unwrap();
            s
        })
        .collect();
    let c = node.client();
    assert!(wait_until(Duration::from_secs(5), || c
        .get("/api/health")
        .json()["pool"]["in_flight"]
        == 8));
    let t = Instant::now();
    let a = c.post("/api/sessions", "{}");
    let took = t.elapsed();
    assert_eq!((a.status, a.code().as_str()), (503, "overloaded"));
    assert_eq!(a.header("retry-after"), Some("1"));
    assert!(took < Duration::from_millis(200), "refusal took {took:?}");
    // health and readiness still answer while saturated
    assert_eq!(c.get("/api/ready").status, 200);
    drop(stalled);
    assert!(wait_until(Duration::from_secs(5), || c
        .post("/api/sessions", "{}")
        .status
        == 201));
}

#[test]
fn a_client_over_its_rate_limit_gets_429_and_others_are_unaffected() {
    // Behind a balancer on 127.0.0.1 that names the client in X-Forwarded-For.
    let node = Node::builder()
        .args(["--rate-limit-per-ip", "1", "--rate-limit-burst", "5"])
        .args(["--trusted-proxies", "127.0.0.1", "--api-token", "t"])
        .start();
    let c = node.client();
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    // A browser's session, used by its id (the browser-facing route).
    let id = c
        .request("GET", "/api/session", &from("203.0.113.1"), None)
        .json()["session_id"]
        .as_str()
        .expect("session")
        .to_string();
    let path = "/api/session";
    let with = |ip: &'static str| [("X-Forwarded-For", ip), ("X-Session-ID", id.as_str())];

    let answers: Vec<Answer> = (0..12)
        .map(|_| c.request("GET", path, &with("203.0.113.7"), None))
        .collect();
    let served = answers.iter().filter(|a| a.status == 200).count();
    // The burst of 5, plus at most one token refilled while asking.
    assert!((5..=6).contains(&served), "served {served} of 12");
    let limited: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(served + limited.len(), 12);
    for a in &limited {
        assert_eq!(a.code(), "rate_limited", "{}", a.text);
        let retry: u64 = a
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After in seconds");
        assert!((1..=2).contains(&retry), "Retry-After {retry}");
    }

    // Another client has its own allowance; health and readiness are never
    // limited (balancers poll them).
    assert_eq!(
        c.request("GET", path, &with("203.0.113.8"), None).status,
        200
    );
    for _ in 0..10 {
        assert_eq!(
            c.request("GET", "/api/health", &from("203.0.113.7"), None)
                .status,
            200
        );
        assert_eq!(
            c.request("GET", "/api/ready", &from("203.0.113.7"), None)
                .status,
            200
        );
    }
    // The limited client is served again once a token has refilled.
    assert!(wait_until(Duration::from_secs(3), || {
        c.request("GET", path, &with("203.0.113.7"), None).status == 200
    }));
    // Metrics from a trusted proxy's address need the token.
    let metrics = c.clone().with_token("t").get("/metrics").text;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("status=\"429\"") && !l.starts_with('#')),
        "429s are counted in the request metrics"
    );
}

#[test]
fn slow_clients_are_cut_off() {
    let node = Node::builder()
        .args([
            "--header-timeout-ms",
            "1500",
            "--request-timeout-ms",
            "1500",
        ])
        .start();

    // slowloris: headers at one byte per 300 ms never complete in time
    let mut s = TcpStream::connect(&node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let started = Instant::now();
    let headers = b"GET /api/health HTTP/1.1\r\nHost: pi\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed_at = None;
    for &b in headers.iter() {
        if s.write_all(&[b]).is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => {
                closed_at = Some(started.elapsed());
                break;
            }
            Ok(_) => panic!("the slow client got an answer instead of being cut off"),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed_at = Some(started.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let closed_at = closed_at.expect("connection was never closed");
    assert!(
        closed_at >= Duration::from_millis(1_400) && closed_at < Duration::from_secs(4),
        "closed after {closed_at:?}"
    );

    // a body that stalls gets 408 within the request timeout
    let mut s = TcpStream::connect(&node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /api/sessions HTTP/1.1\r\nHost: pi\r\nContent-Length: 50\r\n\r\n{\"user_id\"",
    )
    .unwrap();
    let t = Instant::now();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(matches!(raw_status(&out), 408 | 503), "{out}");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(node.client().get("/api/health").status, 200);
}

/// Collects sd_notify datagrams sent to a socket the test owns.
fn notifications(
    sock: &UnixDatagram,
    until: impl Fn(&[String]) -> bool,
    within: Duration,
) -> Vec<String> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while Instant::now() < deadline && !until(&got) {
        let mut buf = [0u8; 4096];
        if let Ok(n) = sock.recv(&mut buf) {
            got.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_string),
            );
        }
    }
    got
}

#[test]
fn systemd_hears_ready_status_watchdog_and_stopping() {
    let dir = tempdir();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut node = Node::builder()
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .env("WATCHDOG_USEC", "300000")
        .env_own_pid("WATCHDOG_PID")
        .start();

    let got = notifications(
        &sock,
        |g| g.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3,
        Duration::from_secs(5),
    );
    assert!(got.iter().any(|l| l == "READY=1"), "{got:?}");
    assert!(
        got.iter()
            .any(|l| l.starts_with("STATUS=") && l.contains("store sled")),
        "{got:?}"
    );
    let pings = got.iter().filter(|l| *l == "WATCHDOG=1").count();
    assert!(pings >= 3, "watchdog pings every WATCHDOG_USEC/2: {got:?}");

    let status = node.terminate();
    let got = notifications(
        &sock,
        |g| g.iter().any(|l| l == "STOPPING=1"),
        Duration::from_secs(2),
    );
    assert!(got.iter().any(|l| l == "STOPPING=1"), "{got:?}");
    assert!(status.success());
}

/// Starts edgenode with `listener` passed as fd 3, the way systemd does:
/// LISTEN_FDS=1 and LISTEN_PID set to the process's own pid (via `exec` from
/// a shell, which keeps the pid).
fn start_socket_activated(
    listener: &TcpListener,
    data_dir: &std::path::Path,
    unused_port: u16,
) -> std::process::Child {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
        .arg(BIN)
        .args([
            "--config",
            "/dev/null",
            "--listen",
            &format!("127.0.0.1:{unused_port}"),
            "--data-dir",
        ])
        .arg(data_dir)
        .stderr(std::fs::File::create(data_dir.with_extension("activated.log")).unwrap());
    // SAFETY: dup2 and fcntl are async-signal-safe; this runs in the child
    // between fork and exec. dup2 onto another number clears close-on-exec;
    // when the listener already is fd 3 it must be cleared by hand.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawn socket-activated edgenode")
}

#[test]
fn socket_activation_serves_the_passed_socket_and_a_restart_drops_no_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let unused = free_port();
    let dir = tempdir();
    let c = Client::new(format!("http://{addr}"));

    let mut first = start_socket_activated(&listener, dir.path(), unused);
    assert!(
        wait_until(Duration::from_secs(10), || c
            .try_request("GET", "/api/ready", &[], None)
            .map(|a| a.status == 200)
            .unwrap_or(false)),
        "not ready: {}",
        std::fs::read_to_string(dir.path().with_extension("activated.log")).unwrap_or_default()
    );
    let id = c.create("{}")["session_id"].as_str().unwrap().to_string();
    assert!(
        TcpStream::connect(("127.0.0.1", unused)).is_err(),
        "--listen was ignored under activation"
    );

    // "systemctl restart": stop the node; the socket stays open, so a client
    // connecting meanwhile waits in the backlog and is served by the next one.
    signal(first.id(), libc::SIGTERM);
    assert!(first.wait().unwrap().success());
    let mut waiting = TcpStream::connect(&addr).expect("the socket still accepts connections");
    waiting
        .write_all(
            format!("GET /api/sessions/{id} HTTP/1.1\r\nHost: pi\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    let mut second = start_socket_activated(&listener, dir.path(), unused);
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = String::new();
    let _ = waiting.read_to_string(&mut out);
    assert_eq!(raw_status(&out), 200, "{out}");
    assert!(out.contains("\"request_count\":1"), "{out}");
    signal(second.id(), libc::SIGTERM);
    assert!(second.wait().unwrap().success());
}

#[test]
fn sigterm_turns_readiness_off_finishes_in_flight_requests_and_exits_zero() {
    let mut node = Node::builder().args(["--drain-delay-ms", "1500"]).start();
    let c = node.client();

    // Requests in flight at SIGTERM: bodies that arrive over ~1 s.
    let slow: Vec<_> = (0..6)
        .map(|i| {
            let addr = node.addr.clone();
            std::thread::spawn(move || {
                let body = format!(r#"{{"user_id":"drain{i}"}}"#);
                let mut s = TcpStream::connect(&addr).unwrap();
                write!(s, "POST /api/sessions HTTP/1.1\r\nHost: pi\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
                for chunk in body.as_bytes().chunks(4) {
                    s.write_all(chunk).unwrap();
                    std::thread::sleep(Duration::from_millis(150));
                }
                let mut out = String::new();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let _ = s.read_to_string(&mut out);
                raw_status(&out)
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(5), || c
        .get("/api/health")
        .json()["pool"]["in_flight"]
        .as_u64()
        >= Some(6)));

    let sent = Instant::now();
    signal(node.pid(), libc::SIGTERM);
    assert!(
        wait_until(Duration::from_millis(500), || c.get("/api/ready").status
            == 503),
        "readiness did not turn 503 at once"
    );
    assert_eq!(
        c.get("/api/health").status,
        200,
        "health still answers while draining"
    );
    for h in slow {
        assert_eq!(
            h.join().unwrap(),
            201,
            "an in-flight request failed during the drain"
        );
    }
    let status = node.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        sent.elapsed() >= Duration::from_millis(1_400),
        "the drain delay was honoured"
    );
    // what was acknowledged during the drain is on disk
    node.restart();
    assert_eq!(
        node.client().get("/api/users/drain0/sessions").json()["sessions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn metrics_parse_as_prometheus_text_with_the_documented_families() {
    let node = Node::builder()
        .args(["--api-token", "t0k", "--instance-id", "pi-3"])
        .start();
    let c = node.client().with_token("t0k");
    let id = c.create("{}")["session_id"].as_str().unwrap().to_string();
    c.get(&format!("/api/sessions/{id}"));
    c.get("/api/sessions/00000000-0000-4000-8000-000000000000");
    let text = c.get("/metrics").text;

    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    let names: std::collections::BTreeSet<&str> =
        scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for want in [
        "edgenode_http_requests_total",
        "edgenode_http_request_duration_seconds",
        "edgenode_sessions_active",
        "edgenode_store_mode",
        "edgenode_redis_reachable",
        "edgenode_redis_failovers_total",
        "edgenode_reconciliations_total",
        "edgenode_pending_sync",
        "edgenode_pool_workers",
        "edgenode_pool_in_flight",
        "edgenode_disk_flush_waiters",
        "edgenode_rejected_requests_total",
        "edgenode_build_info",
    ] {
        assert!(names.contains(want), "missing {want}; have {names:?}");
    }
    let by_route = |route: &str, status: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "edgenode_http_requests_total"
                    && s.labels.get("route") == Some(route)
                    && s.labels.get("status") == Some(status)
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => -1.0,
            })
    };
    let requests: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "edgenode_http_requests_total")
        .collect();
    assert_eq!(
        by_route("/api/sessions/:id", "200"),
        Some(1.0),
        "route templates, not raw paths: {requests:?}"
    );
    assert_eq!(by_route("/api/sessions/:id", "404"), Some(1.0));
    assert!(!text.contains(&id), "a raw session id leaked into a label");
    let latency = scrape
        .samples
        .iter()
        .find(|s| s.metric == "edgenode_http_request_duration_seconds")
        .unwrap();
    assert!(
        matches!(&latency.value, prometheus_parse::Value::Histogram(b) if !b.is_empty()),
        "latency is a histogram"
    );
    let info = scrape
        .samples
        .iter()
        .find(|s| s.metric == "edgenode_build_info")
        .unwrap();
    assert_eq!(info.labels.get("instance_id"), Some("pi-3"));
    let sled_mode = scrape
        .samples
        .iter()
        .find(|s| s.metric == "edgenode_store_mode" && s.labels.get("mode") == Some("sled"))
        .unwrap();
    assert!(matches!(sled_mode.value, prometheus_parse::Value::Gauge(v) if v == 1.0));
}

#[test]
fn journald_gets_plain_lines_and_json_is_available() {
    let mut node = Node::builder().env("JOURNAL_STREAM", "8:1234").start();
    node.terminate();
    let log = node.log_text();
    assert!(
        // The level first (no timestamp), then the node's span.
        log.lines()
            .any(|l| l.trim_start().starts_with("INFO node{instance_id=")
                && l.contains("}: edgenode ready")),
        "no timestamp: {log}"
    );
    assert!(!log.contains('\u{1b}'), "no ANSI colours under journald");

    let mut node = Node::builder().args(["--log-format", "json"]).start();
    node.terminate();
    for line in node.log_text().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(v["level"].is_string());
    }
}

#[test]
fn a_service_manager_that_stops_reading_notifications_never_stalls_the_node() {
    let dir = tempdir();
    let path = dir.path().join("notify.sock");
    // Bound and never read: its queue fills within a few hundred pings.
    let _sock = UnixDatagram::bind(&path).unwrap();
    let node = Node::builder()
        .args(["--workers", "1"])
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .env("WATCHDOG_USEC", "2000")
        .env_own_pid("WATCHDOG_PID")
        .start();
    let c = node.client();
    // A ping every millisecond: the queue (net.unix.max_dgram_qlen, 512 by
    // default) is full well within the first second; the single worker must
    // keep serving for the next two.
    let until = Instant::now() + Duration::from_secs(3);
    let mut served = 0;
    while Instant::now() < until {
        let t = Instant::now();
        let a = c
            .try_request("GET", "/api/health", &[], None)
            .expect("the node answers");
        assert_eq!(a.status, 200);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        served += 1;
    }
    assert!(served > 100, "{served}");
    assert!(
        node.log_text().contains("not reading notifications"),
        "{}",
        node.log_text()
    );
}

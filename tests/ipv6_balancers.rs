//! IPv6 node addresses in the shipped balancer templates: three nodes on
//! `[::1]`, nginx and HAProxy rendered with `[::1]:port` nodes by
//! `deploy/render.sh`, requests routed to them, and the nodes believing the
//! balancer's `X-Forwarded-For` because `trusted_proxies` names `::1`.

mod common;

use common::balancer::{Balancer, Kind};
use common::*;
use std::process::Command;

const TOKEN: &str = "ipv6-balancer-token-8d1f";

fn node() -> Node {
    Node::builder()
        .listen_ip("[::1]")
        .args(["--trusted-proxies", "::1", "--api-token", TOKEN])
        .args(["--access-log", "full"])
        .start()
}

fn story(kind: Kind) {
    let nodes = [node(), node(), node()];
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    assert!(addrs.iter().all(|a| a.starts_with("[::1]:")), "{addrs:?}");
    let dir = tempdir();
    let lb = Balancer::start(kind, [&addrs[0], &addrs[1], &addrs[2]], dir.path());
    let name = kind.name();

    // Back ends' listener: every node answers, each request carries the
    // balancer's request id back.
    let c = Client::new(lb.internal.clone()).with_token(TOKEN);
    let mut ids = Vec::new();
    for i in 0..9 {
        let a = c.post("/api/sessions", &format!(r#"{{"user_id":"v6-{i}"}}"#));
        assert_eq!(a.status, 201, "{name}: {}", a.text);
        ids.push(a.header("x-request-id").expect("request id").to_string());
    }
    // Browsers' listener (HTTPS): a new browser session through the balancer.
    let out = Command::new("curl")
        .args([
            "-q",
            "-s",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(&lb.cacert)
        .arg(format!("{}/api/session", lb.https))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{name} https");

    let logs: Vec<String> = nodes.iter().map(Node::log_text).collect();
    let served = logs
        .iter()
        .filter(|l| l.contains("route=/api/sessions status=201"))
        .count();
    assert!(served >= 2, "{name}: the creates went to {served} node(s)");
    for id in &ids {
        let line = logs
            .iter()
            .flat_map(|l| l.lines())
            .find(|l| l.contains(&format!("request_id={id}")) && l.contains("access"))
            .unwrap_or_else(|| panic!("{name}: {id} in no node's log:\n{}", logs.join("\n")));
        // The peer is ::1 (the balancer); the client is the balancer's
        // X-Forwarded-For, believed because ::1 is a trusted proxy.
        assert!(line.contains("client=127.0.0.1"), "{name}: {line}");
    }
}

#[test]
fn nginx_routes_to_ipv6_nodes_that_trust_it_on_loopback() {
    story(Kind::Nginx);
}

#[test]
fn haproxy_routes_to_ipv6_nodes_that_trust_it_on_loopback() {
    story(Kind::Haproxy);
}

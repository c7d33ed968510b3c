//! Hosts of a LAN for fault tests: network namespaces this test process
//! creates and removes itself, joined by a bridge, with addresses of their
//! own (10.77.0.0/24) that exist nowhere else. Redis (and a balancer) live
//! in the hub; each node gets a host of its own, with its own iptables, so
//! one of them can be cut off (packets silently dropped, no RST, no FIN)
//! while the others are not.

use super::{Node, Redis};
use std::os::fd::AsRawFd;
use std::process::Command;

/// The hub's address on the bridge (Redis's, a balancer's); host `i` is
/// [`Lan::host_addr`]`(i)`.
pub const HUB: &str = "10.77.0.1";

/// A network namespace this test made; deleted (with its links) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Result<Netns, String> {
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> …`
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command run inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(cmd);
        run("ip", &all)
    }

    /// Runs `f` on this thread with the thread inside the namespace: the
    /// sockets `f` opens, and the processes it starts, live there. (A
    /// network namespace is per thread; the thread's own is restored after.)
    pub fn within<T>(&self, f: impl FnOnce() -> T) -> T {
        let open = |p: &str| std::fs::File::open(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        let home = open("/proc/thread-self/ns/net");
        let there = open(&format!("/run/netns/{}", self.name));
        // SAFETY: setns on descriptors of namespace files this thread opened.
        let entered = unsafe { libc::setns(there.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns into {}", self.name);
        struct Back(std::fs::File);
        impl Drop for Back {
            fn drop(&mut self) {
                // SAFETY: as above; back to the namespace the thread had.
                if unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    // A test thread left in a test's namespace would talk
                    // to the wrong hosts from here on.
                    eprintln!("cannot leave a test's network namespace");
                    std::process::abort();
                }
            }
        }
        let _back = Back(home);
        f()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Namespaces left by a test process that was killed before it could
/// remove them (`en-…-<pid>-<n>`, whose pid is gone), with whatever still
/// runs in them.
fn remove_leftovers() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for name in dir.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
        let Some(pid) = name
            .strip_prefix("en-")
            .and_then(|rest| rest.rsplit('-').nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<i32>() {
                    // SAFETY: kill(2) on a pid; no memory involved.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        let _ = run("ip", &["netns", "del", &name]);
    }
}

fn made_ns(r: Result<Netns, String>) -> Netns {
    r.unwrap_or_else(|e| panic!("making the LAN: {e}"))
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Redis's host and `n` node hosts on one bridge.
pub struct Lan {
    pub hosts: Vec<Netns>,
    /// Dropped last: the bridge goes with it.
    pub hub: Netns,
}

impl Lan {
    /// `Err`: this machine cannot make network namespaces (no root, or
    /// inside a container that forbids it); the caller skips, saying why.
    /// Anything failing after the first one is made is a failed test.
    pub fn new(n: usize) -> Result<Lan, String> {
        // Unique per LAN: tests of one binary run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        remove_leftovers();
        let hub = Netns::create(format!("en-hub-{tag}"))?;
        let made = |r: Result<(), String>| r.unwrap_or_else(|e| panic!("making the LAN: {e}"));
        made(hub.ip(&["link", "add", "br0", "type", "bridge"]));
        made(hub.ip(&["addr", "add", &format!("{HUB}/24"), "dev", "br0"]));
        made(hub.ip(&["link", "set", "br0", "up"]));
        let mut hosts = Vec::new();
        for i in 0..n {
            let host = made_ns(Netns::create(format!("en-n{i}-{tag}")));
            let port = format!("port{i}");
            made(hub.ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &host.name,
            ]));
            made(hub.ip(&["link", "set", &port, "master", "br0", "up"]));
            made(host.ip(&[
                "addr",
                "add",
                &format!("{}/24", Lan::host_addr(i)),
                "dev",
                "eth0",
            ]));
            made(host.ip(&["link", "set", "eth0", "up"]));
            hosts.push(host);
        }
        Ok(Lan { hosts, hub })
    }

    /// Host `i`'s address on the bridge.
    pub fn host_addr(i: usize) -> String {
        format!("10.77.0.{}", 11 + i)
    }

    /// A redis-server in the hub, on its loopback (for the test's own
    /// commands) and on the bridge (for the nodes). The namespace is the
    /// test's own, so it takes their connections without a password. Its
    /// helpers (`cmd`, `request_count`) reach it only from inside
    /// `hub.within(…)`: elsewhere 127.0.0.1 is another machine's loopback.
    pub fn redis(&self) -> Redis {
        self.hub.within(|| {
            let r = Redis::start(false);
            for set in [
                ["bind", &format!("127.0.0.1 {HUB}")],
                ["protected-mode", "no"],
            ] {
                let ok = r.cmd(&["CONFIG", "SET", set[0], set[1]]);
                assert!(ok.starts_with("+OK"), "CONFIG SET {}: {ok}", set[0]);
            }
            r
        })
    }

    /// The URL of [`redis`](Self::redis)'s server, as the nodes reach it.
    /// A node on each host, on `redis`, named `node0`, `node1`, ... in
    /// the order of [`Lan::hosts`].
    pub fn start_nodes(&self, redis: &Redis) -> Vec<Node> {
        let url = Lan::redis_url(redis);
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                ns.within(|| {
                    Node::builder()
                        .args(["--redis-url", &url, "--instance-id", &format!("node{i}")])
                        .start()
                })
            })
            .collect()
    }

    pub fn redis_url(redis: &Redis) -> String {
        format!("redis://{HUB}:{}/", redis.port)
    }

    /// Host `i` loses power, as the network sees it: every packet in and out
    /// of it dropped from now on, silently (no RST for what it had open).
    pub fn unplug(&self, i: usize) {
        for chain in ["OUTPUT", "INPUT"] {
            self.hosts[i]
                .exec(&["iptables", "-I", chain, "-j", "DROP"])
                .expect("iptables in the node's namespace");
        }
    }

    /// Every packet between host `i` and Redis dropped, both ways, silently.
    pub fn cut_from_redis(&self, i: usize) {
        for rule in [["OUTPUT", "-d"], ["INPUT", "-s"]] {
            self.hosts[i]
                .exec(&["iptables", "-I", rule[0], rule[1], HUB, "-j", "DROP"])
                .expect("iptables in the node's namespace");
        }
    }

    pub fn heal(&self, i: usize) {
        for chain in ["OUTPUT", "INPUT"] {
            self.hosts[i]
                .exec(&["iptables", "-F", chain])
                .expect("iptables -F");
        }
    }
}

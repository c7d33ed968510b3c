//! A real network partition, as a Pi cluster meets one when a switch port
//! or a cable goes bad: one node is cut off from Redis (every packet between
//! them silently dropped, no RST, no FIN) while the other nodes still reach
//! it. Each node is a host of its own: its own network namespace, joined to
//! Redis's by a bridge, with its own iptables; the namespaces, the bridge
//! and the addresses in them (10.77.0.0/24) are created by this test and
//! removed when it ends. Real redis-server and edgenode processes.
//!
//! What the operator is promised: the cut node fails over on its own, within
//! a store timeout of noticing, and stops trusting its near cache (no
//! invalidation can reach it); the others stay on Redis; changes and logouts
//! made elsewhere during the cut win; the cut node's own work (uses, a new
//! login) reaches Redis exactly once when the cable is back; and nothing
//! deleted during the cut comes back.

mod common;

use common::lan::{Lan, Netns};
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// A node on its own host, and how to talk to it (from inside that host).
struct Host<'a> {
    ns: &'a Netns,
    node: Node,
}

impl Host<'_> {
    fn get(&self, path: &str) -> Answer {
        self.ns.within(|| self.node.client().get(path))
    }

    fn touch(&self, id: &str) -> Answer {
        self.ns.within(|| {
            self.node
                .client()
                .request("GET", "/api/session", &[("X-Session-ID", id)], None)
        })
    }

    /// A browser's first visit: a new session.
    fn new_session(&self) -> String {
        let a = self.get("/api/session");
        assert_eq!(a.status, 200, "{}", a.text);
        id_of(&a.json())
    }

    fn health(&self) -> Value {
        self.get("/api/health").json()
    }

    fn mode(&self) -> String {
        self.health()["store"]["active"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn near_up(&self) -> bool {
        self.health()["store"]["near_cache"]["up"] == true
    }
}

#[test]
fn a_node_cut_from_redis_by_a_silent_partition_fails_over_alone_and_rejoins_without_losing_or_resurrecting_anything(
) {
    let lan = match Lan::new(3) {
        Ok(lan) => lan,
        Err(reason) => {
            skip(&format!(
                "a partition between network namespaces: cannot make them here: {reason}"
            ));
            return;
        }
    };
    let redis = lan.redis();
    let in_redis = |args: &[&str]| lan.hub.within(|| redis.cmd(args));
    let count_in_redis = |id: &str| lan.hub.within(|| redis.request_count(id));
    let hosts: Vec<Host> = lan
        .hosts
        .iter()
        .zip(lan.start_nodes(&redis))
        .map(|(ns, node)| Host { ns, node })
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        assert!(
            wait_until(Duration::from_secs(5), || h.near_up()),
            "node{i}: near cache did not come up: {}",
            h.health()
        );
    }
    let (cut, peer) = (&hosts[0], &hosts[1]);

    // Two sessions in use on the node about to be cut: one that lives on,
    // one that will be logged out elsewhere during the cut. Their uses
    // reach Redis (and the node's mirror) before the cable goes.
    let kept = cut.new_session();
    let doomed = cut.new_session();
    for _ in 0..5 {
        assert_eq!(cut.touch(&kept).status, 200);
        assert_eq!(cut.touch(&doomed).status, 200);
    }
    for id in [&kept, &doomed] {
        assert!(
            lan.hub.within(|| redis.wait_request_count(id, 6)),
            "uses before the cut reached redis: {:?}",
            count_in_redis(id)
        );
    }

    // The cable goes.
    lan.cut_from_redis(0);
    let cut_at = Instant::now();
    // The cut node stops trusting its near cache within a ping and a store
    // timeout: no invalidation can reach it now.
    assert!(
        wait_until(Duration::from_secs(2), || !cut.near_up()),
        "the cut node still trusts its near cache"
    );
    let near_off_in = cut_at.elapsed();
    // Uses on the cut node go on, answered from its own disk, each within
    // a store timeout and a bit.
    let mut slowest = Duration::ZERO;
    let mut counted_on_cut = 0;
    for _ in 0..10 {
        let t0 = Instant::now();
        let a = cut.touch(&kept);
        slowest = slowest.max(t0.elapsed());
        assert_eq!(a.status, 200, "a use on the cut node: {}", a.text);
        assert_eq!(id_of(&a.json()), kept);
        counted_on_cut += 1;
    }
    assert!(
        slowest < Duration::from_millis(1500),
        "a use on the cut node waited {slowest:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || cut.mode() == "sled"),
        "the cut node did not fail over: {}",
        cut.health()
    );
    let failed_over_in = cut_at.elapsed();
    // A login on the cut node, during the cut.
    let login = cut.ns.within(|| {
        cut.node
            .client()
            .create(r#"{"user_id":"carol","metadata":{"via":"the cut node"}}"#)
    });
    let login = id_of(&login);
    // The doomed session is used on the cut node (it cannot know yet)...
    assert_eq!(cut.touch(&doomed).status, 200);

    // ...while the rest of the cluster, still on Redis, changes one session
    // and logs the other out.
    for (i, h) in hosts.iter().enumerate().skip(1) {
        assert_eq!(h.mode(), "redis", "node{i} lost redis with the cut node");
    }
    let patched = peer.ns.within(|| {
        peer.node.client().patch(
            &format!("/api/sessions/{kept}"),
            r#"{"metadata":{"changed_during_the_cut":true}}"#,
        )
    });
    assert_eq!(patched.status, 200, "{}", patched.text);
    let deleted = peer.ns.within(|| {
        peer.node
            .client()
            .delete(&format!("/api/sessions/{doomed}"))
    });
    assert!(
        [200, 204].contains(&deleted.status),
        "logout elsewhere: {} {}",
        deleted.status,
        deleted.text
    );

    // The cable is back: the cut node replays what it did, and rejoins.
    lan.heal(0);
    let healed_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || {
            let h = cut.health();
            h["store"]["active"] == "redis" && h["store"]["pending_sync"] == 0
        }),
        "the cut node did not rejoin: {}",
        cut.health()
    );
    let rejoined_in = healed_at.elapsed();
    assert!(
        wait_until(Duration::from_secs(5), || cut.near_up()),
        "near cache back after the cut"
    );

    // Redis, first (a read through a node counts a use): the cut node's uses
    // are there exactly once, the logout stands, the login arrived.
    let expected = 6 + counted_on_cut;
    assert!(
        lan.hub.within(|| redis.wait_request_count(&kept, expected)),
        "{counted_on_cut} uses on the cut node: redis holds {:?}, wants {expected}",
        count_in_redis(&kept)
    );
    let gone = in_redis(&["EXISTS", &format!("edgenode:s:{doomed}")]);
    assert_eq!(
        gone.trim(),
        ":0",
        "a session logged out during the cut is back"
    );
    let arrived = in_redis(&["EXISTS", &format!("edgenode:s:{login}")]);
    assert_eq!(arrived.trim(), ":1", "the login made during the cut");

    // And every node agrees.
    for (i, h) in hosts.iter().enumerate() {
        let s = h.get(&format!("/api/sessions/{kept}"));
        assert_eq!(s.status, 200, "node{i}: {}", s.text);
        assert_eq!(
            s.json()["metadata"]["changed_during_the_cut"],
            true,
            "node{i} serves the session without the change made during the cut"
        );
        let d = h.get(&format!("/api/sessions/{doomed}"));
        assert_eq!(
            d.status, 404,
            "node{i}: logged out during the cut: {}",
            d.text
        );
        let l = h.get(&format!("/api/sessions/{login}"));
        assert_eq!(
            l.status, 200,
            "node{i}: the login made during the cut: {}",
            l.text
        );
        assert_eq!(l.json()["user_id"], "carol");
        assert_eq!(h.mode(), "redis", "node{i}");
    }
    // Exactly once: the 3 reads above count, and no late replay adds more.
    assert!(lan
        .hub
        .within(|| redis.wait_request_count(&kept, expected + 3)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count_in_redis(&kept), Some(expected + 3));
    eprintln!(
        "partition: near cache off {near_off_in:?} and failed over {failed_over_in:?} after the cut; slowest use during it {slowest:?}; rejoined {rejoined_in:?} after the cable came back"
    );
}

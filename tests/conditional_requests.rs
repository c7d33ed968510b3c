//! Entity tags: a session's version is its ETag, and `If-Match` makes a
//! PATCH conditional on it, with HTTP's rules for strong and weak tags.

mod common;

use common::*;

#[test]
fn a_session_carries_its_version_as_etag_and_if_match_follows_http() {
    let node = Node::start();
    let c = node.client();
    let created = c.post("/api/sessions", r#"{"user_id":"erin"}"#);
    assert_eq!(created.header("etag"), Some("\"1\""));
    let id = id_of(&created.json());
    let path = format!("/api/sessions/{id}");
    let read = c.get(&path);
    assert_eq!(
        read.header("etag"),
        Some("\"1\""),
        "a read does not change it"
    );
    let browser = c.request("GET", "/api/session", &[("x-session-id", &id)], None);
    assert_eq!(browser.header("etag"), Some("\"1\""));

    let patch = |tag: &str, body: &str| c.request("PATCH", &path, &[("If-Match", tag)], Some(body));
    // A weak tag never matches If-Match (strong comparison): 412, not 400.
    let weak = patch("W/\"1\"", r#"{"metadata":{"a":1}}"#);
    assert_eq!(
        (weak.status, weak.code().as_str()),
        (412, "version_mismatch")
    );
    // The quoted tag as the ETag gave it, and a bare number, both match.
    let quoted = patch("\"1\"", r#"{"metadata":{"a":1}}"#);
    assert_eq!(quoted.status, 200, "{}", quoted.text);
    assert_eq!(quoted.header("etag"), Some("\"2\""));
    assert_eq!(patch("2", r#"{"metadata":{"b":2}}"#).status, 200);
    // `*`: any current version.
    assert_eq!(patch("*", r#"{"metadata":{"c":3}}"#).status, 200);
    // Stale: 412; garbage or a list: 400; nothing changed by either.
    assert_eq!(patch("\"1\"", r#"{"metadata":{"x":1}}"#).status, 412);
    assert_eq!(patch("yesterday", r#"{"metadata":{"x":1}}"#).status, 400);
    assert_eq!(patch("\"3\", \"4\"", r#"{"metadata":{"x":1}}"#).status, 400);
    let now = c.get(&path).json();
    assert_eq!(now["version"], 4);
    assert!(now["metadata"].get("x").is_none(), "{now}");
}

//! The relay protocol v1 (`docs/protocol.md`, "Client messages", "Relay
//! messages", "Errors" and "Authentication") through real tungstenite clients:
//! authentication (dev and JWT with HS256, RS256 and ES256), the order of the
//! message checks, documents (join, leave, presence), operations and their
//! acks, cursors, snapshots and sync, rate limits ("Limits", driven by a
//! manual clock), and the metrics that count them.

mod common;
use common::*;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use docrelay::auth::PALETTE;
use docrelay::clock::ManualClock;
use docrelay::config::AuthMode;
use docrelay::{Config, RelayOptions};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tungstenite::Message;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The configuration of these tests: short close timeouts.
fn test_config() -> Config {
    let mut c = config();
    c.limits.close_timeout_ms = 300;
    c.limits.shutdown_grace_ms = 300;
    c
}

/// A relay on an ephemeral port with [`test_config`].
fn test_relay() -> Relay {
    test_relay_with(|_| {})
}

/// A relay with [`test_config`], after `f` adjusted it.
fn test_relay_with(f: impl FnOnce(&mut Config)) -> Relay {
    let mut c = test_config();
    f(&mut c);
    relay(c)
}

fn doc_path(doc: &str) -> String {
    format!("/ws/documents/{doc}")
}

fn send(ws: &mut Client, json: &str) {
    ws.send(Message::text(json)).expect("send");
}

/// The next data message (Ping/Pong skipped): whether it came in a Binary
/// frame, and its text.
fn recv_raw(ws: &mut Client) -> (bool, String) {
    loop {
        match ws.read().expect("a message from the relay") {
            Message::Text(t) => return (false, t.to_string()),
            Message::Binary(b) => return (true, String::from_utf8(b.to_vec()).expect("a broadcast is UTF-8")),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a data message, got {other:?}"),
        }
    }
}

/// The next data message: whether it came in a Binary frame, and its JSON.
fn recv(ws: &mut Client) -> (bool, Value) {
    let (binary, text) = recv_raw(ws);
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("relay sent non-JSON ({e}): {text}"));
    (binary, value)
}

/// The next message, which must be a direct reply (a Text frame).
/// `joined_document` and `sync_response` carry the document's epoch (16 hex
/// digits); it is checked and taken out here, so the tests of this file
/// compare the rest exactly (tests/storage.rs tests epochs).
fn reply(ws: &mut Client) -> Value {
    let (binary, mut v) = recv(ws);
    assert!(!binary, "a direct reply came in a Binary frame: {v}");
    if matches!(v["type"].as_str(), Some("joined_document" | "sync_response")) {
        let epoch = v.as_object_mut().unwrap().remove("epoch");
        let epoch = epoch.as_ref().and_then(Value::as_str).unwrap_or_else(|| panic!("no epoch in {v}"));
        assert!(epoch.len() == 16 && epoch.bytes().all(|b| b.is_ascii_hexdigit()), "{epoch}");
    }
    v
}

/// Sends a message and returns the direct reply to it.
fn ask(ws: &mut Client, json: &str) -> Value {
    send(ws, json);
    reply(ws)
}

/// The next message, which must be a broadcast (a Binary frame), as text.
fn broadcast_raw(ws: &mut Client) -> String {
    let (binary, text) = recv_raw(ws);
    assert!(binary, "a broadcast came in a Text frame: {text}");
    text
}

/// The next message, which must be a broadcast (a Binary frame).
fn broadcast(ws: &mut Client) -> Value {
    let text = broadcast_raw(ws);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("relay sent non-JSON ({e}): {text}"))
}

/// Sends `json` and asserts the reply is `{"type":"error","code":code,...}`.
fn assert_error(ws: &mut Client, json: &str, code: &str) {
    let v = ask(ws, json);
    assert_eq!(v["type"], "error", "{json} -> {v}");
    assert_eq!(v["code"], code, "{json} -> {v}");
    assert!(v["message"].is_string(), "{json} -> {v}");
}

/// Nothing arrives within `ms`.
fn assert_quiet(ws: &mut Client, ms: u64) {
    set_timeout(ws, Duration::from_millis(ms));
    let r = ws.read();
    set_timeout(ws, Duration::from_secs(10));
    match r {
        Err(tungstenite::Error::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("expected nothing from the relay, got {other:?}"),
    }
}

fn auth_message(token: &str) -> String {
    json!({"type": "authenticate", "token": token}).to_string()
}

/// Authenticates and returns the successful `auth_result`.
fn authenticate(ws: &mut Client, token: &str) -> Value {
    let v = ask(ws, &auth_message(token));
    assert_eq!(v["type"], "auth_result", "{v}");
    assert_eq!(v["success"], true, "{v}");
    v
}

/// Sends `authenticate` and asserts the failure reply with `code`, then the
/// relay's Close with `close`.
fn assert_auth_rejected(ws: &mut Client, token: &str, code: &str, close: u16) {
    let v = ask(ws, &auth_message(token));
    assert_eq!(v["type"], "auth_result", "{v}");
    assert_eq!(v["success"], false, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v.get("user_id").is_none(), "{v}");
    assert_eq!(expect_close(ws).0, close, "after {v}");
}

/// A connected, authenticated client and its `auth_result`.
fn authed(addr: SocketAddr, path: &str, token: &str) -> (Client, Value) {
    let mut ws = connect(addr, path);
    let a = authenticate(&mut ws, token);
    (ws, a)
}

fn join(ws: &mut Client) -> Value {
    let v = ask(ws, r#"{"type":"join_document"}"#);
    assert_eq!(v["type"], "joined_document", "{v}");
    v
}

/// A client authenticated as `token` and joined to `doc`; its connection id.
fn joined(addr: SocketAddr, doc: &str, token: &str) -> (Client, u64) {
    let (mut ws, a) = authed(addr, &doc_path(doc), token);
    join(&mut ws);
    (ws, a["connection_id"].as_u64().expect("connection_id is a number"))
}

/// Two clients joined to `doc` (A first, then B; A has consumed B's
/// `user_joined`), with their connection ids.
fn pair(addr: SocketAddr, doc: &str) -> (Client, u64, Client, u64) {
    let (mut a, a_id) = joined(addr, doc, "alice");
    let (b, b_id) = joined(addr, doc, "bob");
    let uj = broadcast(&mut a);
    assert_eq!((uj["type"].as_str(), uj["connection_id"].as_u64()), (Some("user_joined"), Some(b_id)), "{uj}");
    (a, a_id, b, b_id)
}

/// Sends an operation with a raw payload; returns the ack's seq.
fn op(ws: &mut Client, payload: &str) -> u64 {
    let v = ask(ws, &format!(r#"{{"type":"operation","payload":{payload}}}"#));
    assert_eq!(v["type"], "ack", "{v}");
    v["seq"].as_u64().unwrap_or_else(|| panic!("ack without a numeric seq: {v}"))
}

/// Sends an operation and returns its ack's seq; broadcasts that arrive
/// before the ack are appended to `seen`.
fn op_collecting(ws: &mut Client, payload: &str, seen: &mut Vec<Value>) -> u64 {
    send(ws, &format!(r#"{{"type":"operation","payload":{payload}}}"#));
    loop {
        match recv(ws) {
            (true, v) => seen.push(v),
            (false, v) => {
                assert_eq!(v["type"], "ack", "{v}");
                return v["seq"].as_u64().unwrap_or_else(|| panic!("ack without a numeric seq: {v}"));
            }
        }
    }
}

fn cursor(ws: &mut Client, payload: &str) {
    send(ws, &format!(r#"{{"type":"cursor","payload":{payload}}}"#));
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn hs256(secret: &str, claims: &Value) -> String {
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn jwt_relay(secret: &str) -> Relay {
    test_relay_with(|c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt_secret = secret.into();
    })
}

// ---------------------------------------------------------------------------
// Authentication: `dev` mode
// ---------------------------------------------------------------------------

#[test]
fn dev_auth_result_carries_identity_unique_session_and_palette_colour() {
    let relay = test_relay();
    let addr = relay.local_addr();

    let mut clients = Vec::new();
    let mut session_ids = HashSet::new();
    let mut connection_ids = HashSet::new();
    let mut colour_of_ada = None;
    for (doc, token) in [("auth-1", "ada"), ("auth-1", "ada"), ("auth-2", "ada"), ("auth-2", "bob"), ("x", "bob")] {
        let (ws, a) = authed(addr, &doc_path(doc), token);
        assert_eq!(a["user_id"], token, "{a}");
        assert_eq!(a["user_name"], token, "{a}");
        let session_id = a["session_id"].as_str().unwrap_or_else(|| panic!("session_id is a string: {a}"));
        assert!(!session_id.is_empty(), "{a}");
        assert!(session_ids.insert(session_id.to_string()), "session_id {session_id} repeated: {a}");
        let connection_id = a["connection_id"].as_u64().unwrap_or_else(|| panic!("connection_id is a number: {a}"));
        assert!(connection_ids.insert(connection_id), "connection_id {connection_id} repeated: {a}");
        let colour = a["color"].as_str().unwrap_or_else(|| panic!("color is a string: {a}")).to_string();
        assert!(PALETTE.contains(&colour.as_str()), "{colour} is not a palette colour: {a}");
        if token == "ada" {
            // Stable: the same user gets the same colour on every connection.
            assert_eq!(colour_of_ada.get_or_insert_with(|| colour.clone()), &colour);
        }
        assert_eq!(
            a.as_object().unwrap().keys().map(String::as_str).collect::<HashSet<&str>>(),
            HashSet::from(["type", "success", "user_id", "user_name", "session_id", "connection_id", "color"]),
            "{a}"
        );
        clients.push(ws);
    }
    // The sessions are usable.
    for ws in &mut clients {
        assert_pong(ws);
    }
}

/// `session_id` is "unique": two relays in one process (an application that
/// restarts an embedded relay) must not hand out the same ids.
#[test]
fn session_ids_are_unique_across_relays_in_one_process() {
    let first = test_relay();
    let second = test_relay();
    let (_a, a) = authed(first.local_addr(), "/ws/documents/s", "ada");
    let (_b, b) = authed(second.local_addr(), "/ws/documents/s", "ada");
    assert_ne!(a["session_id"], b["session_id"], "{a} {b}");
}

#[test]
fn color_query_parameter_is_normalised_and_invalid_ones_fall_back_to_the_palette() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let (_plain, plain) = authed(addr, "/ws/documents/col", "ada");
    let palette_colour = plain["color"].as_str().unwrap().to_string();
    assert!(PALETTE.contains(&palette_colour.as_str()), "{plain}");

    for (query, expected) in [
        ("color=%23AABBCC", "#aabbcc"),
        ("color=AABBCC", "#aabbcc"),
        ("color=0a1B2c", "#0a1b2c"),
        ("token=x&color=%23123456", "#123456"),
        ("color=zzzzzz", palette_colour.as_str()),
        ("color=%23ABC", palette_colour.as_str()),
        ("color=", palette_colour.as_str()),
    ] {
        let (mut ws, a) = authed(addr, &format!("/ws/documents/col?{query}"), "ada");
        assert_eq!(a["color"], expected, "?{query}: {a}");
        // The colour is the one the others see.
        let j = join(&mut ws);
        let me = j["participants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["connection_id"] == a["connection_id"])
            .unwrap_or_else(|| panic!("joiner not in participants: {j}"))
            .clone();
        assert_eq!(me["color"], expected, "?{query}: {j}");
        assert_eq!(ask(&mut ws, r#"{"type":"leave_document"}"#)["type"], "left_document");
    }
}

#[test]
fn dev_empty_token_fails_with_auth_failed_and_4001() {
    let relay = test_relay();
    let addr = relay.local_addr();
    assert_eq!(metric(addr, "docrelay_auth_failures_total"), 0);

    let mut ws = connect(addr, "/ws/documents/empty");
    assert_auth_rejected(&mut ws, "", "AUTH_FAILED", 4001);
    eventually("auth failure counted", || metric(addr, "docrelay_auth_failures_total") == 1);

    let mut again = connect(addr, "/ws/documents/empty");
    assert_pong(&mut again);
    assert_auth_rejected(&mut again, "", "AUTH_FAILED", 4001);
    eventually("second auth failure counted", || metric(addr, "docrelay_auth_failures_total") == 2);

    // A successful authenticate is not a failure.
    let (_ok, _) = authed(addr, "/ws/documents/empty", "ada");
    assert_eq!(metric(addr, "docrelay_auth_failures_total"), 2);
}

#[test]
fn no_authenticate_within_the_auth_timeout_closes_4008() {
    let relay = test_relay_with(|c| c.limits.auth_timeout_ms = 300);
    let addr = relay.local_addr();

    let mut silent = connect(addr, "/ws/documents/t");
    let mut pinging = connect(addr, "/ws/documents/t");
    let mut in_time = connect(addr, "/ws/documents/t");
    authenticate(&mut in_time, "ada");
    let started = Instant::now();

    assert_eq!(expect_close(&mut silent).0, 4008);

    // Pings are answered, but they do not count as authenticating.
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        assert!(Instant::now() < deadline, "a pinging, unauthenticated client was never closed");
        send(&mut pinging, r#"{"type":"ping"}"#);
        match pinging.read().expect("a message") {
            Message::Text(t) => assert_eq!(t.as_str(), r#"{"type":"pong"}"#),
            Message::Close(Some(f)) => break u16::from(f.code),
            other => panic!("unexpected {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(30));
    };
    assert_eq!(code, 4008);

    // Well past the timeout, the authenticated client is still served.
    while started.elapsed() < Duration::from_millis(900) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_pong(&mut in_time);
    assert_eq!(join(&mut in_time)["seq"], 0);
}

// ---------------------------------------------------------------------------
// Authentication: `jwt` mode
// ---------------------------------------------------------------------------

#[test]
fn jwt_hs256_sub_is_the_user_and_name_defaults_to_sub() {
    let relay = jwt_relay("s3cret");
    let addr = relay.local_addr();
    let exp = now_secs() + 600;

    let token = hs256("s3cret", &json!({"sub": "u1", "name": "Ada Lovelace", "exp": exp}));
    let (mut a, auth) = authed(addr, "/ws/documents/j1", &token);
    assert_eq!((auth["user_id"].as_str(), auth["user_name"].as_str()), (Some("u1"), Some("Ada Lovelace")), "{auth}");
    assert!(PALETTE.contains(&auth["color"].as_str().unwrap()), "{auth}");
    assert!(auth["session_id"].is_string() && auth["connection_id"].is_u64(), "{auth}");

    let no_name = hs256("s3cret", &json!({"sub": "u2", "exp": exp}));
    let (mut b, auth) = authed(addr, "/ws/documents/j1", &no_name);
    assert_eq!((auth["user_id"].as_str(), auth["user_name"].as_str()), (Some("u2"), Some("u2")), "{auth}");

    // The identity is the one the others see.
    join(&mut a);
    let j = join(&mut b);
    let names: HashSet<(&str, &str)> = j["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["user_id"].as_str().unwrap(), p["user_name"].as_str().unwrap()))
        .collect();
    assert_eq!(names, HashSet::from([("u1", "Ada Lovelace"), ("u2", "u2")]));
    let uj = broadcast(&mut a);
    assert_eq!((uj["user_id"].as_str(), uj["user_name"].as_str()), (Some("u2"), Some("u2")), "{uj}");
}

#[test]
fn jwt_bad_tokens_fail_with_auth_failed_and_4001() {
    let relay = jwt_relay("s3cret");
    let addr = relay.local_addr();
    let now = now_secs();
    let bad = [
        ("no exp", hs256("s3cret", &json!({"sub": "u1"}))),
        ("expired", hs256("s3cret", &json!({"sub": "u1", "exp": now - 3600}))),
        ("wrong secret", hs256("other", &json!({"sub": "u1", "exp": now + 600}))),
        ("no sub", hs256("s3cret", &json!({"name": "x", "exp": now + 600}))),
        ("garbage", "not-a-jwt".to_string()),
        ("dev token", "ada".to_string()),
        ("empty", String::new()),
        ("alg none", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo0MTAyNDQ0ODAwfQ.".to_string()),
    ];
    for (n, (what, token)) in bad.iter().enumerate() {
        let mut ws = connect(addr, "/ws/documents/j2");
        let v = ask(&mut ws, &auth_message(token));
        assert_eq!(
            (v["success"].as_bool(), v["error"]["code"].as_str()),
            (Some(false), Some("AUTH_FAILED")),
            "{what}: {v}"
        );
        assert_eq!(expect_close(&mut ws).0, 4001, "{what}");
        eventually("auth failure counted", || metric(addr, "docrelay_auth_failures_total") == n as u64 + 1);
    }
    // The relay still accepts a good token afterwards.
    let good = hs256("s3cret", &json!({"sub": "u1", "exp": now + 600}));
    let (mut ws, _) = authed(addr, "/ws/documents/j2", &good);
    assert_pong(&mut ws);
}

#[test]
fn jwt_docs_claim_allows_exact_ids_and_prefixes_and_forbids_others_with_4003() {
    let relay = jwt_relay("k");
    let addr = relay.local_addr();
    let exp = now_secs() + 600;
    let limited = hs256("k", &json!({"sub": "u", "exp": exp, "docs": ["team-*", "d7"]}));

    for doc in ["team-42", "team-", "d7"] {
        let (mut ws, a) = authed(addr, &doc_path(doc), &limited);
        assert_eq!(a["user_id"], "u", "{doc}: {a}");
        assert_eq!(join(&mut ws)["document_id"], doc);
    }
    for doc in ["d8", "d77", "team", "xteam-42"] {
        let mut ws = connect(addr, &doc_path(doc));
        assert_auth_rejected(&mut ws, &limited, "FORBIDDEN", 4003);
    }
    // An empty list opens nothing; no claim opens everything.
    let none = hs256("k", &json!({"sub": "u", "exp": exp, "docs": []}));
    assert_auth_rejected(&mut connect(addr, "/ws/documents/d7"), &none, "FORBIDDEN", 4003);
    let all = hs256("k", &json!({"sub": "u", "exp": exp}));
    authed(addr, "/ws/documents/anything", &all);
    let star = hs256("k", &json!({"sub": "u", "exp": exp, "docs": ["*"]}));
    authed(addr, "/ws/documents/anything", &star);
    eventually("forbidden counted as auth failures", || metric(addr, "docrelay_auth_failures_total") == 5);
}

/// RS256 or ES256 with `auth.jwt_public_key_file`, keys made by `openssl`.
fn jwt_public_key(name: &str, genpkey: &[&str], alg: Algorithm, signing_key: fn(&[u8]) -> EncodingKey) {
    let dir = TempDir::new(name);
    let (private, public_file) = key_pair(dir.path(), "relay", genpkey);
    let (other_private, _) = key_pair(dir.path(), "other", genpkey);
    let relay = test_relay_with(|c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt_public_key_file = public_file.clone();
    });
    let addr = relay.local_addr();
    let exp = now_secs() + 600;
    let sign = |pem: &[u8], claims: &Value| encode(&Header::new(alg), claims, &signing_key(pem)).unwrap();

    let good = sign(&private, &json!({"sub": "u9", "name": "Nine", "exp": exp, "docs": ["pk-*"]}));
    let (mut ws, a) = authed(addr, "/ws/documents/pk-1", &good);
    assert_eq!((a["user_id"].as_str(), a["user_name"].as_str()), (Some("u9"), Some("Nine")), "{a}");
    assert_eq!(join(&mut ws)["seq"], 0);
    assert_auth_rejected(&mut connect(addr, "/ws/documents/other"), &good, "FORBIDDEN", 4003);

    let expired = sign(&private, &json!({"sub": "u9", "exp": exp - 1200}));
    assert_auth_rejected(&mut connect(addr, "/ws/documents/pk-1"), &expired, "AUTH_FAILED", 4001);
    let no_exp = sign(&private, &json!({"sub": "u9"}));
    assert_auth_rejected(&mut connect(addr, "/ws/documents/pk-1"), &no_exp, "AUTH_FAILED", 4001);
    let other_key = sign(&other_private, &json!({"sub": "u9", "exp": exp}));
    assert_auth_rejected(&mut connect(addr, "/ws/documents/pk-1"), &other_key, "AUTH_FAILED", 4001);
    // Algorithm confusion: an HS256 token keyed with the public key's PEM.
    let public_pem = std::fs::read_to_string(&public_file).unwrap();
    let confused = hs256(&public_pem, &json!({"sub": "u9", "exp": exp}));
    assert_auth_rejected(&mut connect(addr, "/ws/documents/pk-1"), &confused, "AUTH_FAILED", 4001);
    assert_pong(&mut ws);
}

#[test]
fn jwt_rs256_with_public_key_file() {
    jwt_public_key("rs256", RSA, Algorithm::RS256, |pem| EncodingKey::from_rsa_pem(pem).expect("RSA private key"));
}

#[test]
fn jwt_es256_with_public_key_file() {
    jwt_public_key("es256", EC_P256, Algorithm::ES256, |pem| EncodingKey::from_ec_pem(pem).expect("EC private key"));
}

// ---------------------------------------------------------------------------
// Client messages: states and the order of the checks
// ---------------------------------------------------------------------------

#[test]
fn before_authentication_only_ping_and_authenticate_are_allowed() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let mut ws = connect(addr, "/ws/documents/pre");
    assert_pong(&mut ws);
    for m in [
        r#"{"type":"join_document"}"#,
        r#"{"type":"join_document","since":0}"#,
        r#"{"type":"leave_document"}"#,
        r#"{"type":"operation","payload":{"x":1},"client_op_id":"c1"}"#,
        r#"{"type":"cursor","payload":{"x":1}}"#,
        r#"{"type":"sync_request","since":0}"#,
        r#"{"type":"snapshot","seq":0,"state":{}}"#,
    ] {
        assert_error(&mut ws, m, "AUTH_REQUIRED");
    }
    assert_pong(&mut ws);
    let a = authenticate(&mut ws, "ada");
    // A second authenticate is refused, whatever its token, and the session stays.
    assert_error(&mut ws, &auth_message("bob"), "ALREADY_AUTHENTICATED");
    assert_error(&mut ws, &auth_message(""), "ALREADY_AUTHENTICATED");
    assert_error(&mut ws, r#"{"type":"authenticate"}"#, "ALREADY_AUTHENTICATED");
    assert_pong(&mut ws);
    let j = join(&mut ws);
    assert_eq!(j["participants"][0]["user_id"], "ada", "the first identity stays: {j}");
    assert_eq!(j["participants"][0]["connection_id"], a["connection_id"]);
}

#[test]
fn check_order_before_authentication() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let mut ws = connect(addr, "/ws/documents/order");
    for (m, code) in [
        ("not json", "BAD_MESSAGE"),
        ("", "BAD_MESSAGE"),
        ("[1,2]", "BAD_MESSAGE"),
        (r#""ping""#, "BAD_MESSAGE"),
        (r#"{"type":5}"#, "BAD_MESSAGE"),
        (r#"{"type":null}"#, "BAD_MESSAGE"),
        (r#"{"kind":"ping"}"#, "BAD_MESSAGE"),
        (r#"{"type":"ping""#, "BAD_MESSAGE"),
        (r#"{"type":"nope","payload":"#, "BAD_MESSAGE"),
        // Type before state.
        (r#"{"type":"nope"}"#, "UNKNOWN_TYPE"),
        (r#"{"type":"Ping"}"#, "UNKNOWN_TYPE"),
        // State before fields.
        (r#"{"type":"operation"}"#, "AUTH_REQUIRED"),
        (r#"{"type":"sync_request","since":"x"}"#, "AUTH_REQUIRED"),
        (r#"{"type":"snapshot"}"#, "AUTH_REQUIRED"),
        // Fields of authenticate.
        (r#"{"type":"authenticate"}"#, "BAD_MESSAGE"),
        (r#"{"type":"authenticate","token":7}"#, "BAD_MESSAGE"),
    ] {
        assert_error(&mut ws, m, code);
    }
    // A Binary frame is taken the same way; not UTF-8 is BAD_MESSAGE.
    ws.send(Message::binary(b"\xff\xfe{}".to_vec())).unwrap();
    let v = reply(&mut ws);
    assert_eq!(v["code"], "BAD_MESSAGE", "{v}");
    ws.send(Message::binary(br#"{"type":"ping"}"#.to_vec())).unwrap();
    assert_eq!(reply(&mut ws), json!({"type": "pong"}));
    // None of that ended the session or authenticated it.
    assert_pong(&mut ws);
    assert_error(&mut ws, r#"{"type":"join_document"}"#, "AUTH_REQUIRED");
    authenticate(&mut ws, "ada");
}

#[test]
fn check_order_after_authentication_and_join() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let (mut ws, _) = authed(addr, "/ws/documents/fields", "ada");
    for (m, code) in [
        (r#"{"type":"nope"}"#, "UNKNOWN_TYPE"),
        ("{", "BAD_MESSAGE"),
        // State before fields.
        (r#"{"type":"operation"}"#, "NOT_JOINED"),
        (r#"{"type":"cursor"}"#, "NOT_JOINED"),
        (r#"{"type":"sync_request","since":"x"}"#, "NOT_JOINED"),
        (r#"{"type":"snapshot","seq":99}"#, "NOT_JOINED"),
        // A join with a bad `since` is refused and does not join.
        (r#"{"type":"join_document","since":"x"}"#, "BAD_MESSAGE"),
        (r#"{"type":"join_document","since":-1}"#, "BAD_MESSAGE"),
        (r#"{"type":"join_document","since":1.5}"#, "BAD_MESSAGE"),
        (r#"{"type":"leave_document"}"#, "NOT_JOINED"),
    ] {
        assert_error(&mut ws, m, code);
    }
    assert_eq!(join(&mut ws)["seq"], 0);
    for (m, code) in [
        (r#"{"type":"join_document","since":"x"}"#, "ALREADY_JOINED"),
        (r#"{"type":"authenticate"}"#, "ALREADY_AUTHENTICATED"),
        (r#"{"type":"operation"}"#, "BAD_MESSAGE"),
        (r#"{"type":"operation","client_op_id":"c1"}"#, "BAD_MESSAGE"),
        (r#"{"type":"operation","payload":{},"client_op_id":{}}"#, "BAD_MESSAGE"),
        (r#"{"type":"operation","payload":{},"client_op_id":{"id":1}}"#, "BAD_MESSAGE"),
        (r#"{"type":"operation","payload":{},"client_op_id":[1]}"#, "BAD_MESSAGE"),
        (r#"{"type":"operation","payload":{},"client_op_id":true}"#, "BAD_MESSAGE"),
        (r#"{"type":"cursor"}"#, "BAD_MESSAGE"),
        (r#"{"type":"sync_request"}"#, "BAD_MESSAGE"),
        (r#"{"type":"sync_request","since":"0"}"#, "BAD_MESSAGE"),
        (r#"{"type":"sync_request","since":-1}"#, "BAD_MESSAGE"),
        (r#"{"type":"sync_request","since":1.5}"#, "BAD_MESSAGE"),
        (r#"{"type":"snapshot","seq":0}"#, "BAD_MESSAGE"),
        (r#"{"type":"snapshot","state":{}}"#, "BAD_MESSAGE"),
        (r#"{"type":"snapshot","seq":"0","state":{}}"#, "BAD_MESSAGE"),
        // A missing field is reported before the seq is compared.
        (r#"{"type":"snapshot","seq":5}"#, "BAD_MESSAGE"),
        (r#"{"type":"snapshot","seq":1,"state":{}}"#, "BAD_SNAPSHOT"),
    ] {
        assert_error(&mut ws, m, code);
    }
    assert_pong(&mut ws);
    // None of the refused operations took a seq.
    assert_eq!(op(&mut ws, "{}"), 1);
}

#[test]
fn document_messages_before_join_are_not_joined() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let (mut ws, _) = authed(addr, "/ws/documents/nj", "ada");
    for m in [
        r#"{"type":"operation","payload":{"x":1}}"#,
        r#"{"type":"operation","payload":{"x":1},"client_op_id":7}"#,
        r#"{"type":"cursor","payload":{"x":1}}"#,
        r#"{"type":"sync_request","since":0}"#,
        r#"{"type":"snapshot","seq":0,"state":{}}"#,
        r#"{"type":"leave_document"}"#,
    ] {
        assert_error(&mut ws, m, "NOT_JOINED");
    }
    assert_pong(&mut ws);
    // Nothing was sequenced.
    assert_eq!(join(&mut ws)["seq"], 0);
}

// ---------------------------------------------------------------------------
// Documents and presence
// ---------------------------------------------------------------------------

#[test]
fn join_lists_participants_and_tells_the_others() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let (mut a, a_auth) = authed(addr, "/ws/documents/room?color=%23AA0011", "alice");
    let ja = join(&mut a);
    assert_eq!(ja["document_id"], "room");
    assert_eq!(ja["seq"], 0, "a new document: {ja}");
    let me =
        json!({"connection_id": a_auth["connection_id"], "user_id": "alice", "user_name": "alice", "color": "#aa0011"});
    assert_eq!(ja["participants"], json!([me]), "{ja}");
    assert_error(&mut a, r#"{"type":"join_document"}"#, "ALREADY_JOINED");
    assert_eq!(op(&mut a, r#"{"n":1}"#), 1);
    assert_eq!(op(&mut a, r#"{"n":2}"#), 2);

    let (mut b, b_auth) = authed(addr, "/ws/documents/room", "bob");
    let jb = join(&mut b);
    assert_eq!(jb["seq"], 2, "the current seq: {jb}");
    let mut participants = jb["participants"].as_array().unwrap().clone();
    participants.sort_by_key(|p| p["connection_id"].as_u64());
    let b_me = json!({"connection_id": b_auth["connection_id"], "user_id": "bob", "user_name": "bob", "color": b_auth["color"]});
    assert_eq!(participants, vec![me.clone(), b_me.clone()], "{jb}");

    // A is told, in a Binary frame, with B's details.
    let uj = broadcast(&mut a);
    let mut expected = b_me.clone();
    expected["type"] = json!("user_joined");
    assert_eq!(uj, expected);

    // B does not get its own user_joined: the next thing it sees is A's cursor.
    cursor(&mut a, r#"{"marker":1}"#);
    let c = broadcast(&mut b);
    assert_eq!((c["type"].as_str(), c["payload"].clone()), (Some("cursor"), json!({"marker": 1})), "{c}");
    assert_error(&mut b, r#"{"type":"join_document","since":0}"#, "ALREADY_JOINED");

    // A session on another document hears nothing of this one.
    let (mut other, _) = joined(addr, "room2", "carol");
    assert_quiet(&mut other, 100);
}

#[test]
fn leave_document_stops_broadcasts_and_tells_the_others() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let (mut a, a_id, mut b, _) = pair(addr, "lv");

    let left = ask(&mut a, r#"{"type":"leave_document"}"#);
    assert_eq!(left, json!({"type": "left_document", "document_id": "lv"}));
    let ul = broadcast(&mut b);
    assert_eq!(ul, json!({"type": "user_left", "connection_id": a_id, "user_id": "alice"}));

    // Left: document messages are refused, and B's operations do not reach A.
    assert_error(&mut a, r#"{"type":"leave_document"}"#, "NOT_JOINED");
    assert_error(&mut a, r#"{"type":"operation","payload":1}"#, "NOT_JOINED");
    assert_eq!(op(&mut b, r#"{"while":"away"}"#), 1);
    cursor(&mut b, r#"{"while":"away"}"#);
    assert_pong(&mut a);
    assert_quiet(&mut a, 150);

    // Rejoining starts from now: the current seq, then only new broadcasts.
    let j = join(&mut a);
    assert_eq!(j["seq"], 1, "{j}");
    assert_eq!(j["participants"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(broadcast(&mut b)["type"], "user_joined");
    assert_eq!(op(&mut b, r#"{"back":true}"#), 2);
    let o = broadcast(&mut a);
    assert_eq!((o["seq"].as_u64(), o["payload"].clone()), (Some(2), json!({"back": true})), "{o}");
}

#[test]
fn a_joined_session_that_ends_is_announced_as_user_left() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let (mut watcher, _) = joined(addr, "gone", "watcher");

    // A clean close handshake.
    let (mut polite, polite_id) = joined(addr, "gone", "polite");
    assert_eq!(broadcast(&mut watcher)["connection_id"], polite_id);
    polite.close(None).unwrap();
    while polite.read().is_ok() {}
    assert_eq!(broadcast(&mut watcher), json!({"type": "user_left", "connection_id": polite_id, "user_id": "polite"}));

    // An abrupt end: TCP reset, no Close frame.
    let (rude, rude_id) = joined(addr, "gone", "rude");
    assert_eq!(broadcast(&mut watcher)["connection_id"], rude_id);
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = rude.get_ref() {
        socket2::SockRef::from(s).set_linger(Some(Duration::ZERO)).unwrap();
    }
    drop(rude);
    assert_eq!(broadcast(&mut watcher), json!({"type": "user_left", "connection_id": rude_id, "user_id": "rude"}));

    // A plain FIN without a Close frame.
    let (fin, fin_id) = joined(addr, "gone", "fin");
    assert_eq!(broadcast(&mut watcher)["connection_id"], fin_id);
    drop(fin);
    assert_eq!(broadcast(&mut watcher), json!({"type": "user_left", "connection_id": fin_id, "user_id": "fin"}));

    // A session that never joined leaves no trace; nor does one that left.
    let (not_joined, _) = authed(addr, "/ws/documents/gone", "lurker");
    drop(not_joined);
    let (mut left, left_id) = joined(addr, "gone", "left");
    assert_eq!(broadcast(&mut watcher)["connection_id"], left_id);
    assert_eq!(ask(&mut left, r#"{"type":"leave_document"}"#)["type"], "left_document");
    assert_eq!(broadcast(&mut watcher)["type"], "user_left");
    drop(left);
    eventually("only the watcher is still connected", || metric(addr, "docrelay_active_connections") == 1);
    let (_marker, marker_id) = joined(addr, "gone", "marker");
    assert_eq!(broadcast(&mut watcher)["connection_id"], marker_id, "nothing before the marker's user_joined");
    let j = join_count(addr, "gone");
    assert_eq!(j, 2, "watcher and marker remain");
}

/// How many participants a fresh joiner of `doc` sees, itself excluded.
fn join_count(addr: SocketAddr, doc: &str) -> usize {
    let (mut ws, _) = authed(addr, &doc_path(doc), "counter");
    join(&mut ws)["participants"].as_array().unwrap().len() - 1
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

#[test]
fn ack_echoes_client_op_id_exactly_and_only_when_given() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let (mut ws, _) = joined(addr, "acks", "ada");

    send(&mut ws, r#"{"type":"operation","payload":{},"client_op_id":"c-9"}"#);
    let (binary, raw) = recv_raw(&mut ws);
    assert!(!binary);
    assert_eq!(serde_json::from_str::<Value>(&raw).unwrap(), json!({"type": "ack", "seq": 1, "client_op_id": "c-9"}));

    let v = ask(&mut ws, r#"{"type":"operation","payload":{},"client_op_id":42}"#);
    assert_eq!(v, json!({"type": "ack", "seq": 2, "client_op_id": 42}));
    assert!(v["client_op_id"].is_u64(), "a number stays a number: {v}");

    let v = ask(&mut ws, r#"{"type":"operation","payload":{}}"#);
    assert_eq!(v, json!({"type": "ack", "seq": 3}));
    assert!(v.get("client_op_id").is_none(), "{v}");

    for id in [r#""""#, r#""é \"q\" \u00e9""#, "-7", "0", "1.25", "18446744073709551615"] {
        send(&mut ws, &format!(r#"{{"type":"operation","payload":{{}},"client_op_id":{id}}}"#));
        let (binary, raw) = recv_raw(&mut ws);
        assert!(!binary, "{raw}");
        let v: Value = serde_json::from_str(&raw).unwrap();
        let sent: Value = serde_json::from_str(id).unwrap();
        assert_eq!(v["type"], "ack", "{raw}");
        assert_eq!(v["client_op_id"], sent, "{raw}");
    }
    assert_eq!(op(&mut ws, "{}"), 10);
}

#[test]
fn seq_grows_by_one_per_document_independently() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let (mut a, _) = joined(addr, "seq-a", "ada");
    let (mut b, _) = joined(addr, "seq-b", "ada");
    let (mut a2, _) = joined(addr, "seq-a", "bob");
    assert_eq!(broadcast(&mut a)["type"], "user_joined");
    let (mut seen_a, mut seen_a2, mut seen_b) = (Vec::new(), Vec::new(), Vec::new());
    assert_eq!(op_collecting(&mut a, "1", &mut seen_a), 1);
    assert_eq!(op_collecting(&mut a, "2", &mut seen_a), 2);
    assert_eq!(op_collecting(&mut b, "1", &mut seen_b), 1);
    assert_eq!(op_collecting(&mut a2, "3", &mut seen_a2), 3);
    assert_eq!(op_collecting(&mut a, "4", &mut seen_a), 4);
    assert_eq!(op_collecting(&mut b, "2", &mut seen_b), 2);
    assert_eq!(op_collecting(&mut b, "3", &mut seen_b), 3);
    // Each sees the others' operations of its document, in seq order.
    while seen_a2.len() < 3 {
        seen_a2.push(broadcast(&mut a2));
    }
    while seen_a.is_empty() {
        seen_a.push(broadcast(&mut a));
    }
    let seqs = |v: &[Value]| v.iter().map(|o| (o["seq"].as_u64().unwrap(), o["payload"].clone())).collect::<Vec<_>>();
    assert_eq!(seqs(&seen_a2), vec![(1, json!(1)), (2, json!(2)), (4, json!(4))]);
    assert_eq!(seqs(&seen_a), vec![(3, json!(3))]);
    assert!(seen_b.is_empty(), "{seen_b:?}");
    assert_pong(&mut b);
    assert_pong(&mut a);
}

#[test]
fn operation_broadcast_carries_the_raw_payload_and_skips_the_sender() {
    let relay = test_relay();
    let addr = relay.local_addr();
    // A user id that needs escaping in JSON.
    let tricky = "a\"d\\a é";
    let (mut a, a_auth) = authed(addr, "/ws/documents/raw", tricky);
    join(&mut a);
    let a_id = a_auth["connection_id"].as_u64().unwrap();
    let (mut b, b_id) = joined(addr, "raw", "bob");
    assert_eq!(broadcast(&mut a)["type"], "user_joined");
    let (mut c, _) = joined(addr, "raw", "carol");
    assert_eq!(broadcast(&mut a)["type"], "user_joined");
    assert_eq!(broadcast(&mut b)["type"], "user_joined");

    let payload = r#"{"b" : 1.50, "a":[1, 2 ,3], "u":"\u00e9"}"#;
    let ack = ask(&mut a, &format!(r#"{{"type":"operation","payload":{payload},"client_op_id":"x"}}"#));
    assert_eq!(ack, json!({"type": "ack", "seq": 1, "client_op_id": "x"}));

    for ws in [&mut b, &mut c] {
        let raw = broadcast_raw(ws);
        assert!(raw.contains(&format!(r#""payload":{payload}"#)), "payload not relayed byte for byte: {raw}");
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(
            v,
            json!({"type": "operation", "seq": 1, "connection_id": a_id, "user_id": tricky,
                   "payload": {"b": 1.50, "a": [1, 2, 3], "u": "é"}})
        );
    }

    // A does not get its own operation back: the next thing it sees is B's.
    let payload_b = "[ true,null ,\"x\" ]";
    assert_eq!(op(&mut b, payload_b), 2);
    let raw = broadcast_raw(&mut a);
    assert!(raw.contains(payload_b), "{raw}");
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        (v["seq"].as_u64(), v["connection_id"].as_u64(), v["user_id"].as_str()),
        (Some(2), Some(b_id), Some("bob"))
    );
    assert_eq!(broadcast(&mut c)["seq"], 2);
    assert_pong(&mut a);
    assert_pong(&mut b);
}

#[test]
fn operation_payload_may_be_any_json_value() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let (mut a, _, mut b, _) = pair(addr, "any");
    for (n, payload) in ["\"text\"", "-3.5e2", "[]", "{}", "true", "false", "null"].iter().enumerate() {
        let v = ask(&mut a, &format!(r#"{{"type":"operation","payload":{payload}}}"#));
        assert_eq!(v, json!({"type": "ack", "seq": n + 1}), "payload {payload}");
        let raw = broadcast_raw(&mut b);
        assert!(raw.ends_with(&format!(r#""payload":{payload}}}"#)), "{raw}");
    }
}

// ---------------------------------------------------------------------------
// Cursors
// ---------------------------------------------------------------------------

#[test]
fn cursor_is_broadcast_raw_on_presence_to_the_others_only() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let (mut a, a_auth) = authed(addr, "/ws/documents/cur?color=ABCDEF", "alice");
    join(&mut a);
    let (mut b, b_auth) = authed(addr, "/ws/documents/cur", "bob");
    join(&mut b);
    assert_eq!(broadcast(&mut a)["type"], "user_joined");

    let payload = r#"{"pos" : [3, 4.0], "sel":null}"#;
    cursor(&mut a, payload);
    let raw = broadcast_raw(&mut b);
    assert!(raw.contains(&format!(r#""payload":{payload}"#)), "cursor payload not relayed byte for byte: {raw}");
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        v,
        json!({"type": "cursor", "connection_id": a_auth["connection_id"], "user_id": "alice",
               "color": "#abcdef", "payload": {"pos": [3, 4.0], "sel": null}})
    );

    // No reply to the sender, and not its own cursor: next is B's cursor.
    cursor(&mut b, "7");
    let v = broadcast(&mut a);
    assert_eq!(
        v,
        json!({"type": "cursor", "connection_id": b_auth["connection_id"], "user_id": "bob",
               "color": b_auth["color"], "payload": 7})
    );
    assert_pong(&mut a);
    assert_pong(&mut b);
    // A cursor is not an operation.
    assert_eq!(op(&mut a, "{}"), 1);
}

// ---------------------------------------------------------------------------
// Snapshots and sync
// ---------------------------------------------------------------------------

fn sync(ws: &mut Client, since: u64) -> Value {
    ask(ws, &format!(r#"{{"type":"sync_request","since":{since}}}"#))
}

/// Sends operations `from..=to` from `a` (payload `{"n":seq}`) and returns
/// the broadcasts `b` received for them.
fn ops_seen(a: &mut Client, b: &mut Client, from: u64, to: u64) -> Vec<Value> {
    (from..=to)
        .map(|n| {
            assert_eq!(op(a, &format!(r#"{{"n": {n}}}"#)), n);
            let v = broadcast(b);
            assert_eq!(v["seq"], n, "{v}");
            v
        })
        .collect()
}

#[test]
fn snapshot_is_acked_checked_against_seq_and_only_a_newer_one_replaces() {
    let relay = test_relay_with(|c| c.documents.history_ops = 3);
    let addr = relay.local_addr();
    let (mut a, _, mut b, _) = pair(addr, "snap");
    assert_error(&mut a, r#"{"type":"snapshot","seq":1,"state":{}}"#, "BAD_SNAPSHOT");
    assert_eq!(ask(&mut a, r#"{"type":"snapshot","seq":0,"state":{"empty":true}}"#), json!({"type": "ack", "seq": 0}));
    ops_seen(&mut a, &mut b, 1, 3);

    assert_error(&mut a, r#"{"type":"snapshot","seq":4,"state":{"v":4}}"#, "BAD_SNAPSHOT");
    assert_eq!(ask(&mut a, r#"{"type":"snapshot","seq":2,"state":{"v" : 2}}"#), json!({"type": "ack", "seq": 2}));
    // A snapshot is not an operation and is not broadcast.
    assert_eq!(op(&mut b, "{}"), 4);
    assert_eq!(broadcast(&mut a)["seq"], 4);
    // An older snapshot: acknowledged, ignored.
    assert_eq!(ask(&mut b, r#"{"type":"snapshot","seq":1,"state":{"v":1}}"#), json!({"type": "ack", "seq": 1}));

    // History holds 2..=4; since 0 needs the snapshot at 2.
    let raw = {
        send(&mut a, r#"{"type":"sync_request","since":0}"#);
        let (binary, raw) = recv_raw(&mut a);
        assert!(!binary, "sync_response is a direct reply: {raw}");
        raw
    };
    assert!(raw.contains(r#""state":{"v" : 2}"#), "snapshot state not relayed byte for byte: {raw}");
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["type"], "sync_response", "{v}");
    assert_eq!(v["seq"], 4, "{v}");
    assert_eq!(v["snapshot"], json!({"seq": 2, "state": {"v": 2}}), "{v}");
    let seqs: Vec<u64> = v["ops"].as_array().unwrap().iter().map(|o| o["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![3, 4], "{v}");

    // A snapshot at the current seq replaces it.
    assert_eq!(ask(&mut a, r#"{"type":"snapshot","seq":4,"state":"four"}"#), json!({"type": "ack", "seq": 4}));
    let v = sync(&mut b, 0);
    assert_eq!((v["snapshot"].clone(), v["ops"].clone()), (json!({"seq": 4, "state": "four"}), json!([])), "{v}");
}

#[test]
fn sync_response_from_history_from_snapshot_or_history_unavailable() {
    let relay = test_relay_with(|c| c.documents.history_ops = 5);
    let addr = relay.local_addr();
    let (mut a, _, mut b, _) = pair(addr, "sync");

    // An empty document.
    assert_eq!(sync(&mut a, 0), json!({"type": "sync_response", "seq": 0, "snapshot": null, "more": false, "ops": []}));
    assert_error(&mut a, r#"{"type":"sync_request","since":1}"#, "HISTORY_UNAVAILABLE");

    let seen = ops_seen(&mut a, &mut b, 1, 3);
    // History covers since: no snapshot, the operations after since, each
    // the operation broadcast itself.
    assert_eq!(
        sync(&mut b, 0),
        json!({"type": "sync_response", "seq": 3, "snapshot": null, "more": false, "ops": seen})
    );
    assert_eq!(
        sync(&mut b, 1),
        json!({"type": "sync_response", "seq": 3, "snapshot": null, "more": false, "ops": seen[1..]})
    );
    assert_eq!(sync(&mut b, 3), json!({"type": "sync_response", "seq": 3, "snapshot": null, "more": false, "ops": []}));
    assert_error(&mut b, r#"{"type":"sync_request","since":4}"#, "HISTORY_UNAVAILABLE");
    assert_error(&mut b, r#"{"type":"sync_request","since":18446744073709551615}"#, "HISTORY_UNAVAILABLE");

    let mut seen = [seen, ops_seen(&mut a, &mut b, 4, 8)].concat();
    // History holds 4..=8: since 3 is still covered, since 2 is not.
    assert_eq!(
        sync(&mut a, 3),
        json!({"type": "sync_response", "seq": 8, "snapshot": null, "more": false, "ops": seen[3..]})
    );
    assert_error(&mut a, r#"{"type":"sync_request","since":2}"#, "HISTORY_UNAVAILABLE");
    assert_error(&mut a, r#"{"type":"sync_request","since":0}"#, "HISTORY_UNAVAILABLE");

    // A snapshot too old for the history does not help.
    assert_eq!(ask(&mut a, r#"{"type":"snapshot","seq":2,"state":{"at":2}}"#)["seq"], 2);
    assert_error(&mut a, r#"{"type":"sync_request","since":0}"#, "HISTORY_UNAVAILABLE");
    // One the history continues: the snapshot and the operations after it.
    assert_eq!(ask(&mut a, r#"{"type":"snapshot","seq":5,"state":{"at":5}}"#)["seq"], 5);
    let from_snapshot = json!({"type": "sync_response", "seq": 8, "snapshot": {"seq": 5, "state": {"at": 5}}, "more": false, "ops": seen[5..]});
    assert_eq!(sync(&mut b, 0), from_snapshot);
    assert_eq!(sync(&mut b, 2), from_snapshot);
    assert_eq!(
        sync(&mut b, 4),
        json!({"type": "sync_response", "seq": 8, "snapshot": null, "more": false, "ops": seen[4..]})
    );

    // The snapshot stays usable as the history moves on, until it no longer joins.
    seen.extend(ops_seen(&mut a, &mut b, 9, 10)); // history 6..=10
    let v = sync(&mut b, 0);
    assert_eq!((v["snapshot"]["seq"].as_u64(), v["ops"].clone()), (Some(5), json!(seen[5..])), "{v}");
    ops_seen(&mut a, &mut b, 11, 11); // history 7..=11: the snapshot at 5 misses 6
    assert_error(&mut b, r#"{"type":"sync_request","since":0}"#, "HISTORY_UNAVAILABLE");
}

#[test]
fn join_with_since_is_followed_by_a_sync_response() {
    let relay = test_relay_with(|c| c.documents.history_ops = 5);
    let addr = relay.local_addr();
    let (mut a, _, mut b, _) = pair(addr, "js");
    let seen = ops_seen(&mut a, &mut b, 1, 8);

    let (mut c, _) = authed(addr, "/ws/documents/js", "carol");
    let j = ask(&mut c, r#"{"type":"join_document","since":6}"#);
    assert_eq!((j["type"].as_str(), j["seq"].as_u64()), (Some("joined_document"), Some(8)), "{j}");
    assert_eq!(
        reply(&mut c),
        json!({"type": "sync_response", "seq": 8, "snapshot": null, "more": false, "ops": seen[6..]})
    );
    // Then live operations, without a gap or a repeat.
    assert_eq!(broadcast(&mut a)["type"], "user_joined");
    assert_eq!(op(&mut a, "9"), 9);
    assert_eq!(broadcast(&mut c)["seq"], 9);

    let (mut d, _) = authed(addr, "/ws/documents/js", "dave");
    let j = ask(&mut d, r#"{"type":"join_document","since":0}"#);
    assert_eq!(j["type"], "joined_document", "{j}");
    let v = reply(&mut d);
    assert_eq!(v["code"], "HISTORY_UNAVAILABLE", "{v}");
    // The join stands.
    assert_error(&mut d, r#"{"type":"join_document"}"#, "ALREADY_JOINED");

    let (mut e, _) = authed(addr, "/ws/documents/js", "eve");
    assert_eq!(ask(&mut e, r#"{"type":"join_document","since":9}"#)["seq"], 9);
    assert_eq!(reply(&mut e), json!({"type": "sync_response", "seq": 9, "snapshot": null, "more": false, "ops": []}));
}

// ---------------------------------------------------------------------------
// Rate limits (the order of the checks, step 5; "Limits")
// ---------------------------------------------------------------------------

/// `limits.rate_limit_grace_ms` of the rate-limit tests: shorter than the
/// one-second window, so that a client outstays it within one window.
const RATE_GRACE_MS: u64 = 400;

/// A relay with these per-second limits (0: none) whose rate limits read the
/// returned clock, which moves only when the test advances it.
fn rate_relay(ops: u32, cursors: u32) -> (Relay, Arc<ManualClock>) {
    let clock = ManualClock::new();
    let mut c = test_config();
    c.limits.max_ops_per_sec = ops;
    c.limits.max_cursor_per_sec = cursors;
    c.limits.rate_limit_grace_ms = RATE_GRACE_MS;
    let relay = relay_with(c, RelayOptions { clock: Some(clock.clone()), ..RelayOptions::default() });
    (relay, clock)
}

#[test]
fn operations_over_the_rate_limit_are_dropped_with_rate_limited() {
    let (relay, clock) = rate_relay(5, 0);
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let (mut a, _, mut b, _) = pair(addr, "rl");

    // Six at once: five sequenced, the sixth dropped.
    for n in 1..=6 {
        send(&mut a, &format!(r#"{{"type":"operation","payload":{n},"client_op_id":{n}}}"#));
    }
    for n in 1..=5 {
        assert_eq!(reply(&mut a), json!({"type": "ack", "seq": n, "client_op_id": n}));
    }
    let v = reply(&mut a);
    assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("RATE_LIMITED")), "{v}");
    // Field errors come before the rate check.
    assert_error(&mut a, r#"{"type":"operation"}"#, "BAD_MESSAGE");
    eventually("the drop is counted", || metric_sum(addr, "docrelay_rate_limited_total", cores) >= 1);
    assert_eq!(metric_sum(addr, "docrelay_operations_total", cores), 5);

    // The dropped operation took no seq and reached no one. (The next window.)
    clock.advance(Duration::from_millis(1100));
    assert_eq!(op(&mut a, "7"), 6);
    let seqs: Vec<(u64, Value)> =
        (0..6).map(|_| broadcast(&mut b)).map(|v| (v["seq"].as_u64().unwrap(), v["payload"].clone())).collect();
    assert_eq!(seqs, (1..=5).map(|n| (n, json!(n))).chain([(6, json!(7))]).collect::<Vec<_>>());
    // A brief excess within the grace does not end the session; other
    // messages are not limited.
    assert_pong(&mut a);
    cursor(&mut a, "1");
    assert_eq!(broadcast(&mut b)["type"], "cursor");
}

/// The next direct reply to `ws` as JSON, or (`Err`) the code of the relay's Close.
fn reply_or_close(ws: &mut Client) -> Result<Value, u16> {
    loop {
        match ws.read().expect("a reply or a Close from the relay") {
            Message::Text(t) => {
                return Ok(serde_json::from_str(t.as_str()).unwrap_or_else(|e| panic!("not JSON ({e}): {t}")))
            }
            Message::Close(f) => return Err(f.map_or(1005, |f| u16::from(f.code))),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a direct reply or a Close, got {other:?}"),
        }
    }
}

/// A client that stays over its rate: `limit + 1` copies of `message` at
/// once (the last one dropped with `RATE_LIMITED`), then one more each time
/// the relay's clock moves on by a quarter of the grace, within the same
/// one-second window. Each of those is dropped with `RATE_LIMITED` until the
/// client has been over its limit for the grace; then the relay closes.
/// Returns the close code and how many `RATE_LIMITED` errors came before it.
/// The Close is not answered (tungstenite would do that on its next call),
/// so the session stays CLOSING on the relay.
fn stay_over_the_limit_until_closed(ws: &mut Client, message: &str, limit: u32, clock: &ManualClock) -> (u16, usize) {
    let grace = Duration::from_millis(RATE_GRACE_MS);
    assert!(grace < Duration::from_secs(1), "the grace must run out within one window");
    let step = grace / 4;
    for _ in 0..=limit {
        send(ws, message);
    }
    let (mut over_for, mut limited) = (Duration::ZERO, 0);
    loop {
        match reply_or_close(ws) {
            // The acks of the messages within the limit.
            Ok(v) if v["type"] == "ack" => continue,
            Ok(v) if v["type"] == "error" && v["code"] == "RATE_LIMITED" => limited += 1,
            Ok(v) => panic!("unexpected reply {v}"),
            Err(code) => {
                assert!(over_for >= grace, "closed {over_for:?} over the limit, within the grace of {grace:?}");
                return (code, limited);
            }
        }
        assert!(over_for <= grace, "still open {over_for:?} over the limit, after {limited} RATE_LIMITED errors");
        clock.advance(step);
        over_for += step;
        send(ws, message);
    }
}

#[test]
fn operations_over_the_limit_beyond_the_grace_close_1008() {
    let (relay, clock) = rate_relay(5, 0);
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let (mut a, a_id, mut b, _) = pair(addr, "rl-close");
    let (code, limited) = stay_over_the_limit_until_closed(&mut a, r#"{"type":"operation","payload":{}}"#, 5, &clock);
    assert_eq!(code, 1008);
    assert!(limited >= 1, "no RATE_LIMITED before the close");
    eventually("drops are counted", || metric_sum(addr, "docrelay_rate_limited_total", cores) >= limited as u64);
    // The other session is unaffected: it gets the accepted operations, in
    // order, and A's departure.
    let accepted = metric_sum(addr, "docrelay_operations_total", cores);
    assert!(accepted >= 5, "{accepted}");
    let (mut ops, mut left) = (Vec::new(), false);
    while ops.len() < accepted as usize || !left {
        let v = broadcast(&mut b);
        match v["type"].as_str() {
            Some("operation") => ops.push(v["seq"].as_u64().unwrap()),
            Some("user_left") if v["connection_id"] == a_id => left = true,
            _ => panic!("unexpected {v}"),
        }
    }
    assert_eq!(ops, (1..=accepted).collect::<Vec<_>>());
    assert_pong(&mut b);
}

/// `docs/protocol.md`, "Session lifecycle" and "Ordering, lag and recovery":
/// a session the relay is closing waits at most the close timeout for its
/// peer, and never holds up the other sessions of its document. Here A is
/// closed for its rate (1008) and does not answer the Close; B's operation
/// must still be acknowledged, and the relay then shuts down as usual.
#[test]
fn a_session_closing_on_the_rate_limit_does_not_stall_its_document() {
    let (relay, clock) = rate_relay(5, 0);
    let addr = relay.local_addr();
    let (mut a, _, mut b, _) = pair(addr, "stall");
    let (code, _) = stay_over_the_limit_until_closed(&mut a, r#"{"type":"operation","payload":{}}"#, 5, &clock);
    assert_eq!(code, 1008);
    let accepted = metric_sum(addr, "docrelay_operations_total", relay.cpus().len());
    set_timeout(&b, Duration::from_secs(5));
    let mut seen = Vec::new();
    assert_eq!(op_collecting(&mut b, r#"{"from":"b"}"#, &mut seen), accepted + 1, "B's operation");
    assert_pong(&mut b);
    drop(a);
}

#[test]
fn cursors_over_the_rate_limit_are_dropped_with_rate_limited() {
    let (relay, clock) = rate_relay(0, 5);
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let (mut a, _, mut b, _) = pair(addr, "rlc");

    for n in 1..=6 {
        cursor(&mut a, &n.to_string());
    }
    // Only the sixth is answered, with the error.
    let v = reply(&mut a);
    assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("RATE_LIMITED")), "{v}");
    eventually("the drop is counted", || metric_sum(addr, "docrelay_rate_limited_total", cores) == 1);
    // The next window.
    clock.advance(Duration::from_millis(1100));
    cursor(&mut a, "7");
    assert_pong(&mut a);
    let seen: Vec<Value> = (0..6).map(|_| broadcast(&mut b)["payload"].clone()).collect();
    assert_eq!(seen, vec![json!(1), json!(2), json!(3), json!(4), json!(5), json!(7)]);
    // Operations are not limited by the cursor limit.
    for n in 1..=8 {
        assert_eq!(op(&mut a, "{}"), n);
    }
}

#[test]
fn cursors_over_the_limit_beyond_the_grace_close_1008() {
    let (relay, clock) = rate_relay(0, 5);
    let addr = relay.local_addr();
    let (mut a, a_id, mut b, _) = pair(addr, "rlc-close");
    let (code, limited) = stay_over_the_limit_until_closed(&mut a, r#"{"type":"cursor","payload":{}}"#, 5, &clock);
    assert_eq!(code, 1008);
    assert!(limited >= 1, "no RATE_LIMITED before the close");
    // The other session got the cursors within the limit, then A's departure.
    let mut cursors = 0;
    loop {
        let v = broadcast(&mut b);
        match v["type"].as_str() {
            Some("cursor") => cursors += 1,
            Some("user_left") if v["connection_id"] == a_id => break,
            _ => panic!("unexpected {v}"),
        }
    }
    assert!(cursors >= 5, "{cursors} cursors delivered");
    assert_pong(&mut b);
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

#[test]
fn documents_gauge_and_operations_counter() {
    let relay = test_relay();
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let doc = "metrics-doc";
    let owner = docrelay::owner_core(doc, cores);
    let documents = |core: usize| metric(addr, &format!("docrelay_documents{{core=\"{core}\"}}"));

    let (mut a, _) = authed(addr, &doc_path(doc), "ada");
    assert_eq!((0..cores).map(documents).sum::<u64>(), 0, "authenticating loads no document");
    join(&mut a);
    eventually("the document is loaded on its owner core", || documents(owner) == 1);
    for core in (0..cores).filter(|&c| c != owner) {
        assert_eq!(documents(core), 0, "core {core}");
    }
    let (mut b, _) = joined(addr, doc, "bob");
    assert_eq!(documents(owner), 1, "one document however many sessions");

    let (mut other, _) = joined(addr, "metrics-other", "carol");
    let mut seen = Vec::new();
    for _ in 0..3 {
        op_collecting(&mut a, "{}", &mut seen);
    }
    for _ in 0..2 {
        op_collecting(&mut b, "{}", &mut seen);
    }
    for _ in 0..2 {
        op(&mut other, "{}");
    }
    assert_error(&mut other, r#"{"type":"operation"}"#, "BAD_MESSAGE");
    eventually("operations counted", || metric_sum(addr, "docrelay_operations_total", cores) == 7);
    assert_eq!((0..cores).map(documents).sum::<u64>(), 2, "two documents loaded");
}

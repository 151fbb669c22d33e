//! The HTTP side of the relay's one port (`docs/protocol.md`, "Endpoints"):
//! the 101 upgrade, every error status, `/healthz` and `/metrics` (GET and
//! HEAD), head limits and the handshake timeout, through raw sockets and a
//! real client.

mod common;
use common::*;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A parsed HTTP response, and whether the relay closed the connection after it.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    /// The relay ended the connection (end of stream or reset) after answering.
    closed: bool,
    raw: String,
}

impl Response {
    /// The first header with this name (case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Parses a whole response; panics if it is not one, or if its body is not
/// as long as its `Content-Length` says.
fn parse_response(raw: &[u8], closed: bool) -> Response {
    let response = parse_response_head(raw, closed);
    if let Some(len) = response.header("content-length") {
        assert_eq!(len.parse::<usize>().unwrap(), response.body.len(), "Content-Length vs body in {:?}", response.raw);
    }
    response
}

/// Parses a response: its head, and as its body whatever followed the head.
fn parse_response_head(raw: &[u8], closed: bool) -> Response {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no complete response head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap();
    assert!(version == "HTTP/1.1", "status line {status_line:?}");
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status {status_line:?}"));
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap_or_else(|| panic!("bad header line {l:?} in {text:?}"));
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Response { status, headers, body: body.to_string(), closed, raw: text.clone() }
}

/// Sends `request` on a fresh connection and reads until the relay ends the
/// connection (or 5 s pass, which leaves `closed` false).
fn exchange(addr: SocketAddr, request: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The relay may answer (and stop reading) before a large request is sent.
    let _ = s.write_all(request);
    let (out, closed) = read_until_closed(&mut s);
    parse_response(&out, closed)
}

/// Sends a `HEAD` request for `path` on a fresh connection and reads until the
/// relay ends the connection: the response's head, and as its body anything
/// the relay wrote after the head (which must be nothing).
fn exchange_head(addr: SocketAddr, path: &str) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).unwrap();
    let (out, closed) = read_until_closed(&mut s);
    parse_response_head(&out, closed)
}

/// Reads everything until end of stream; `true` if the peer ended the
/// connection (FIN or RST), `false` on the read timeout.
fn read_until_closed(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
                return (out, true)
            }
            Err(_) => return (out, false),
        }
    }
}

/// An upgrade head with the given key line(s) and version, for tweaking.
fn upgrade_with(path: &str, http: &str, key: Option<&str>, version: &str) -> String {
    let key = key.map(|k| format!("Sec-WebSocket-Key: {k}\r\n")).unwrap_or_default();
    format!(
        "GET {path} {http}\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}\
         Sec-WebSocket-Version: {version}\r\n\r\n"
    )
}

fn assert_status(r: &Response, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.raw);
    assert!(r.closed, "{what}: the relay kept the connection open after {status}");
}

/// Reads a response head (until the blank line) from a socket that stays open.
fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).expect("response head");
        assert!(n > 0, "closed before the head was complete: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
            return (head, buf[end + 4..].to_vec());
        }
    }
}

// ---------------------------------------------------------------------------
// 101

/// A valid upgrade gets 101 with `Sec-WebSocket-Accept` derived from the
/// client's (random) key, and the socket then speaks WebSocket.
#[test]
fn upgrade_answers_101_with_the_accept_key() {
    let relay = relay(config());
    let addr = relay.local_addr();
    // Header spellings real clients use (Firefox sends `keep-alive, Upgrade`).
    let variants = [
        ("Upgrade: websocket", "Connection: Upgrade"),
        ("upgrade: WebSocket", "connection: keep-alive, Upgrade"),
        ("UPGRADE: websocket", "Connection: upgrade"),
    ];
    for (i, (upgrade, connection)) in variants.iter().enumerate() {
        let key = tungstenite::handshake::client::generate_key();
        let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "GET /ws/documents/upgrade-{i}?color=%23aabbcc HTTP/1.1\r\nHost: test\r\n{upgrade}\r\n{connection}\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        let (head, mut pending) = read_head(&mut s);
        let r = parse_response(head.as_bytes(), false);
        assert_eq!(r.status, 101, "{head}");
        assert!(head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{head}");
        assert!(r.header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")), "{head}");
        assert!(r.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")), "{head}");
        assert_eq!(r.header("sec-websocket-accept"), Some(expected.as_str()), "key {key}: {head}");
        // The connection is now a WebSocket session.
        s.write_all(&client_frame(true, 0x1, br#"{"type":"ping"}"#)).unwrap();
        let (op, payload) = read_frame(&mut s, &mut pending).expect("a frame after the 101");
        assert_eq!((op, payload.as_slice()), (0x1, br#"{"type":"pong"}"#.as_slice()));
    }
    // What a browser sends: extensions and subprotocols the relay does not
    // speak must not be accepted in the 101 (the browser would then expect
    // compressed frames or a subprotocol).
    let key = tungstenite::handshake::client::generate_key();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "GET /ws/documents/browser HTTP/1.1\r\nHost: localhost\r\nUser-Agent: Mozilla/5.0\r\n\
         Origin: http://localhost\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
         Sec-WebSocket-Protocol: chat, superchat\r\nConnection: keep-alive, Upgrade\r\n\
         Pragma: no-cache\r\nCache-Control: no-cache\r\nUpgrade: websocket\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let (head, _) = read_head(&mut s);
    let r = parse_response(head.as_bytes(), false);
    assert_eq!(r.status, 101, "{head}");
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    assert_eq!(r.header("sec-websocket-accept"), Some(expected.as_str()), "{head}");
    assert_eq!(r.header("sec-websocket-extensions"), None, "{head}");
    assert_eq!(r.header("sec-websocket-protocol"), None, "{head}");
    // A real client checks the accept key itself.
    let mut ws = connect(addr, "/ws/documents/real-client");
    assert_pong(&mut ws);
}

// ---------------------------------------------------------------------------
// 426

#[test]
fn document_path_without_upgrade_is_426() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let requests = [
        "GET /ws/documents/d1 HTTP/1.1\r\nHost: test\r\n\r\n".to_string(),
        // Upgrade header, but no `Connection: Upgrade`.
        "GET /ws/documents/d1 HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nSec-WebSocket-Key: \
         dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .to_string(),
        // An upgrade to another protocol.
        "GET /ws/documents/d1 HTTP/1.1\r\nHost: test\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n".to_string(),
    ];
    for req in &requests {
        let r = exchange(addr, req.as_bytes());
        assert_status(&r, 426, req);
        assert_eq!(r.header("sec-websocket-version"), Some("13"), "{}", r.raw);
    }
}

#[test]
fn other_websocket_versions_get_426() {
    let relay = relay(config());
    let addr = relay.local_addr();
    for version in ["12", "8", "14", "0", "thirteen"] {
        let req = upgrade_with("/ws/documents/d1", "HTTP/1.1", Some("dGhlIHNhbXBsZSBub25jZQ=="), version);
        let r = exchange(addr, req.as_bytes());
        assert_status(&r, 426, &format!("version {version}"));
        assert_eq!(r.header("sec-websocket-version"), Some("13"), "{}", r.raw);
    }
    // No version header at all.
    let req = "GET /ws/documents/d1 HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let r = exchange(addr, req.as_bytes());
    assert_status(&r, 426, "no version");
    assert_eq!(r.header("sec-websocket-version"), Some("13"), "{}", r.raw);
}

// ---------------------------------------------------------------------------
// 400

#[test]
fn malformed_heads_get_400_and_close() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let garbage: [&[u8]; 6] = [
        b"\x00\x01\x02\x03garbage\xff\xfe\r\n\r\n",
        b"hello there\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nthis header has no colon\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /a\x01b HTTP/1.1\r\nHost: t\r\n\r\n",
    ];
    for req in garbage {
        let r = exchange(addr, req);
        assert_status(&r, 400, &format!("{:?}", String::from_utf8_lossy(req)));
    }
    assert!(metric(addr, "docrelay_rejected_total{reason=\"bad_request\"}") >= garbage.len() as u64);
}

#[test]
fn bad_document_ids_get_400() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let too_long = format!("/ws/documents/{}", "a".repeat(129));
    let paths = [
        "/ws/documents/",
        "/ws/documents/a%20b",
        "/ws/documents/caf%C3%A9",
        "/ws/documents/%61",
        "/ws/documents/a/b",
        "/ws/documents/a+b",
        "/ws/documents/a@b",
        "/ws/documents/a!b",
        "/ws/documents/a,b",
        too_long.as_str(),
    ];
    for path in paths {
        let req = upgrade_with(path, "HTTP/1.1", Some("dGhlIHNhbXBsZSBub25jZQ=="), "13");
        assert_status(&exchange(addr, req.as_bytes()), 400, path);
    }
    // A space in the id makes the request line itself malformed: 400 as well.
    let req = upgrade_with("/ws/documents/a b", "HTTP/1.1", Some("dGhlIHNhbXBsZSBub25jZQ=="), "13");
    assert_status(&exchange(addr, req.as_bytes()), 400, "space in the id");
}

#[test]
fn bad_or_missing_websocket_key_gets_400() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let keys = [
        None,
        Some(""),
        Some("short"),
        Some("d#hlIHNhbXBsZSBub25jZQ=="),
        Some("dGhlIHNhbXBsZSBub25jZQ"),
        Some("dGhlIHNhbXBsZSBub25jZQ=x"),
        Some("dGhlIHNhbXBsZSBub25jZQ==dGhl"),
        Some("AAAAAAAAAAAAAAAAAAAA"),
    ];
    for key in keys {
        let req = upgrade_with("/ws/documents/d1", "HTTP/1.1", key, "13");
        assert_status(&exchange(addr, req.as_bytes()), 400, &format!("key {key:?}"));
    }
}

#[test]
fn http_1_0_upgrade_gets_400() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let req = upgrade_with("/ws/documents/d1", "HTTP/1.0", Some("dGhlIHNhbXBsZSBub25jZQ=="), "13");
    assert_status(&exchange(addr, req.as_bytes()), 400, "HTTP/1.0 upgrade");
    // An HTTP/1.1 upgrade without the Host header HTTP/1.1 requires.
    let req = "GET /ws/documents/d1 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_status(&exchange(addr, req.as_bytes()), 400, "upgrade without Host");
}

/// A missing or repeated `Host` makes an HTTP/1.1 head invalid (RFC 9112
/// section 3.2: "A server MUST respond with a 400"), on every route.
#[test]
fn http_1_1_head_without_a_single_host_gets_400() {
    let relay = relay(config());
    let addr = relay.local_addr();
    for path in ["/healthz", "/metrics", "/nope"] {
        let missing = format!("GET {path} HTTP/1.1\r\n\r\n");
        assert_status(&exchange(addr, missing.as_bytes()), 400, &missing);
        let twice = format!("GET {path} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
        assert_status(&exchange(addr, twice.as_bytes()), 400, &twice);
    }
    // HTTP/1.0 has no Host requirement.
    assert_eq!(exchange(addr, b"GET /healthz HTTP/1.0\r\n\r\n").status, 200);
}

// ---------------------------------------------------------------------------
// 404, 405

#[test]
fn unknown_paths_get_404() {
    let relay = relay(config());
    let addr = relay.local_addr();
    for path in ["/", "/nope", "/ws/documents", "/ws/document/d1", "/healthz/x", "/metricsx", "/ws/echo", "/HEALTHZ"] {
        let r = exchange(addr, format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        assert_status(&r, 404, path);
        // Also with upgrade headers: the path decides first.
        let req = upgrade_with(path, "HTTP/1.1", Some("dGhlIHNhbXBsZSBub25jZQ=="), "13");
        assert_status(&exchange(addr, req.as_bytes()), 404, path);
    }
}

#[test]
fn other_methods_on_known_paths_get_405_with_allow_get() {
    let relay = relay(config());
    let addr = relay.local_addr();
    for path in ["/healthz", "/metrics", "/ws/documents/x"] {
        for method in ["POST", "PUT", "DELETE"] {
            let req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
            let r = exchange(addr, req.as_bytes());
            assert_status(&r, 405, &req);
            let allow = if path.starts_with("/ws/") { "GET" } else { "GET, HEAD" };
            assert_eq!(r.header("allow"), Some(allow), "{}", r.raw);
        }
    }
}

/// `HEAD` is allowed on `/healthz` and `/metrics` only: on a document URL it
/// is 405 with `Allow: GET`, with or without upgrade headers.
#[test]
fn head_on_a_document_url_gets_405_with_allow_get() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let plain = "HEAD /ws/documents/x HTTP/1.1\r\nHost: t\r\n\r\n".to_string();
    let upgrade = upgrade_with("/ws/documents/x", "HTTP/1.1", Some("dGhlIHNhbXBsZSBub25jZQ=="), "13")
        .replacen("GET ", "HEAD ", 1);
    for req in [plain, upgrade] {
        let r = exchange(addr, req.as_bytes());
        assert_status(&r, 405, &req);
        assert_eq!(r.header("allow"), Some("GET"), "{}", r.raw);
    }
}

// ---------------------------------------------------------------------------
// 431

/// A `/healthz` request head of exactly `len` bytes.
fn healthz_head_of_len(len: usize) -> String {
    let base = "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: \r\n\r\n".len();
    assert!(len > base);
    format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n", "p".repeat(len - base))
}

#[test]
fn head_over_the_default_limit_gets_431_and_close() {
    let relay = relay(config());
    let addr = relay.local_addr();
    // Complete heads over 8 KiB.
    for len in [8193, 9000, 20_000] {
        let r = exchange(addr, healthz_head_of_len(len).as_bytes());
        assert_status(&r, 431, &format!("{len} bytes"));
    }
    // A head that keeps going without ever ending.
    let endless = format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: {}", "p".repeat(16 * 1024));
    assert_status(&exchange(addr, endless.as_bytes()), 431, "unterminated head");
    // The limit itself is allowed.
    let r = exchange(addr, healthz_head_of_len(8192).as_bytes());
    assert_status(&r, 200, "head of exactly 8192 bytes");
    assert!(metric(addr, "docrelay_rejected_total{reason=\"head_too_large\"}") >= 4);
}

#[test]
fn head_over_a_configured_limit_gets_431_and_close() {
    let mut c = config();
    c.limits.max_head_bytes = 512;
    let relay = relay(c);
    let addr = relay.local_addr();
    let r = exchange(addr, healthz_head_of_len(512).as_bytes());
    assert_status(&r, 200, "head of exactly the limit");
    assert_eq!(r.body, "ok");
    for len in [513, 600, 2000] {
        assert_status(&exchange(addr, healthz_head_of_len(len).as_bytes()), 431, &format!("{len} bytes"));
    }
    // An upgrade whose head is over the limit is refused the same way.
    let big = upgrade_with(
        &format!("/ws/documents/d?x={}", "q".repeat(600)),
        "HTTP/1.1",
        Some("dGhlIHNhbXBsZSBub25jZQ=="),
        "13",
    );
    assert_status(&exchange(addr, big.as_bytes()), 431, "big upgrade");
    let endless = format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: {}", "p".repeat(600));
    assert_status(&exchange(addr, endless.as_bytes()), 431, "unterminated head");
    assert_eq!(metric(addr, "docrelay_rejected_total{reason=\"head_too_large\"}"), 5);
}

/// 431 is for a head over the byte limit; a small head with many header
/// lines (proxies add them) is still served.
#[test]
fn many_small_headers_under_the_byte_limit_are_served() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let headers: String = (0..80).map(|i| format!("X-Forwarded-{i}: v\r\n")).collect();
    let req = format!("GET /healthz HTTP/1.1\r\nHost: t\r\n{headers}\r\n");
    assert!(req.len() < 2048, "well under the 8 KiB limit");
    let r = exchange(addr, req.as_bytes());
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{} header lines, {} bytes: {}", 81, req.len(), r.raw);
}

// ---------------------------------------------------------------------------
// Handshake timeout

/// Waits for the relay to end a stalled connection; returns what it wrote
/// and how long it took. Panics if the connection is still open after 5 s.
fn await_silent_close(s: &mut TcpStream, started: Instant, what: &str) -> Duration {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (out, closed) = read_until_closed(s);
    let elapsed = started.elapsed();
    assert!(closed, "{what}: still open after {elapsed:?}");
    assert!(out.is_empty(), "{what}: the relay wrote {:?} before closing", String::from_utf8_lossy(&out));
    elapsed
}

#[test]
fn stalled_handshakes_are_closed_with_nothing_written() {
    let mut c = config();
    c.limits.handshake_timeout_ms = 300;
    let relay = relay(c);
    let addr = relay.local_addr();
    let timeout_sample = "docrelay_rejected_total{reason=\"handshake_timeout\"}";
    assert_eq!(metric(addr, timeout_sample), 0);

    let silent = std::thread::spawn(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        await_silent_close(&mut s, started, "client that sends nothing")
    });
    let partial = std::thread::spawn(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /ws/documents/d1 HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n").unwrap();
        await_silent_close(&mut s, started, "client with a partial head")
    });
    // A slow client that keeps sending one byte at a time is cut off too:
    // the timeout covers the whole head, not the gap between reads.
    let trickle = std::thread::spawn(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").unwrap();
        let mut writer = s.try_clone().unwrap();
        let feeder = std::thread::spawn(move || {
            while started.elapsed() < Duration::from_secs(5) {
                if writer.write_all(b"a").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        let elapsed = await_silent_close(&mut s, started, "client trickling its head");
        feeder.join().unwrap();
        elapsed
    });
    for t in [silent, partial, trickle] {
        let elapsed = t.join().unwrap();
        // Not before the configured timeout (the client's clock starts first).
        assert!(elapsed >= Duration::from_millis(250), "closed after {elapsed:?}, before the 300 ms timeout");
    }
    eventually("three handshake timeouts counted", || metric(addr, timeout_sample) == 3);
}

// ---------------------------------------------------------------------------
// /healthz and /metrics

#[test]
fn healthz_answers_ok() {
    let relay = relay(config());
    let addr = relay.local_addr();
    for req in ["GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", "GET /healthz HTTP/1.0\r\n\r\n"] {
        let r = exchange(addr, req.as_bytes());
        assert_eq!(r.status, 200, "{}", r.raw);
        assert_eq!(r.body, "ok", "{}", r.raw);
    }
    // A query string does not change the route.
    let r = exchange(addr, b"GET /healthz?probe=1 HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{}", r.raw);
}

/// `HEAD /healthz`: the status and headers of `GET /healthz`, among them its
/// `Content-Length` (2, for `ok`), and no body.
#[test]
fn healthz_answers_head_without_a_body() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let get = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((get.status, get.body.as_str()), (200, "ok"), "{}", get.raw);
    let head = exchange_head(addr, "/healthz");
    assert_eq!(head.status, 200, "{}", head.raw);
    assert!(head.closed, "the relay kept the connection open after HEAD: {}", head.raw);
    assert_eq!(head.header("content-length"), Some("2"), "{}", head.raw);
    assert_eq!(head.body, "", "HEAD has no body: {:?}", head.raw);
    assert_eq!(head.headers, get.headers, "HEAD has the headers of GET");
    // A query string does not change the route.
    let head = exchange_head(addr, "/healthz?probe=1");
    assert_eq!((head.status, head.header("content-length"), head.body.as_str()), (200, Some("2"), ""), "{}", head.raw);
}

/// `HEAD /metrics`: the status and headers of `GET /metrics`, with the
/// `Content-Length` of the exposition text GET would send, and no body.
#[test]
fn metrics_answers_head_without_a_body() {
    let relay = relay(config());
    let addr = relay.local_addr();
    // The relay counts HTTP requests, so the text of a GET just before and
    // one just after bound the text the HEAD request was measured on.
    let before = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    let head = exchange_head(addr, "/metrics");
    let after = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((before.status, after.status), (200, 200), "{}\n{}", before.raw, after.raw);
    assert_eq!(head.status, 200, "{}", head.raw);
    assert!(head.closed, "the relay kept the connection open after HEAD: {}", head.raw);
    assert_eq!(head.body, "", "HEAD has no body: {:?}", head.raw);
    let len: usize = head
        .header("content-length")
        .unwrap_or_else(|| panic!("no Content-Length: {}", head.raw))
        .parse()
        .unwrap_or_else(|e| panic!("Content-Length ({e}): {}", head.raw));
    assert!(
        (before.body.len()..=after.body.len()).contains(&len),
        "Content-Length {len}, GET bodies of {} and {} bytes",
        before.body.len(),
        after.body.len()
    );
    // Every other header is the one GET sends.
    let others = |r: &Response| -> Vec<(String, String)> {
        r.headers.iter().filter(|(n, _)| !n.eq_ignore_ascii_case("content-length")).cloned().collect()
    };
    assert_eq!(others(&head), others(&before), "HEAD has the headers of GET");
}

/// One sample line of the exposition format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if v.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) => v.parse().ok(),
        _ => None,
    }
}

/// Parses one sample line: `name{a="x",b="y"} value [timestamp]`.
fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line:?}"));
    let name = &line[..name_end];
    assert!(valid_metric_name(name), "bad metric name {name:?}: {line:?}");
    let mut rest = &line[name_end..];
    let mut labels: Vec<(String, String)> = Vec::new();
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = r.find('=').unwrap_or_else(|| panic!("label without '=': {line:?}"));
            let label = &r[..eq];
            assert!(valid_label_name(label), "bad label name {label:?}: {line:?}");
            assert!(labels.iter().all(|(n, _)| n != label), "repeated label {label:?}: {line:?}");
            r = r[eq + 1..].strip_prefix('"').unwrap_or_else(|| panic!("label value not quoted: {line:?}"));
            let mut value = String::new();
            let mut chars = r.char_indices();
            let close = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        other => panic!("bad escape {other:?}: {line:?}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value: {line:?}"),
                }
            };
            labels.push((label.to_string(), value));
            r = &r[close + 1..];
            if let Some(after) = r.strip_prefix(',') {
                r = after;
            } else {
                assert!(r.starts_with('}'), "expected ',' or '}}' after a label: {line:?}");
            }
        }
    }
    assert!(rest.starts_with(' '), "no space before the value: {line:?}");
    let mut fields = rest.split_whitespace();
    let value = fields.next().and_then(parse_value).unwrap_or_else(|| panic!("bad value: {line:?}"));
    if let Some(ts) = fields.next() {
        assert!(ts.parse::<i64>().is_ok(), "bad timestamp: {line:?}");
    }
    assert!(fields.next().is_none(), "trailing fields: {line:?}");
    Sample { name: name.to_string(), labels, value }
}

/// Checks a body against the text exposition format 0.0.4 and returns the
/// samples with their family names.
fn parse_exposition(body: &str) -> Vec<(String, Sample)> {
    assert!(body.ends_with('\n'), "the last line must end with a newline");
    let mut help: HashSet<String> = HashSet::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut with_samples: HashSet<String> = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut seen: HashSet<String> = HashSet::new();
    let mut samples = Vec::new();
    for line in body.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), _) => {
                    assert!(valid_metric_name(name), "bad name in {line:?}");
                    assert!(help.insert(name.to_string()), "second HELP for {name}");
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(valid_metric_name(name), "bad name in {line:?}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind.trim()),
                        "bad type in {line:?}"
                    );
                    assert!(!with_samples.contains(name), "TYPE for {name} after its samples");
                    assert!(
                        types.insert(name.to_string(), kind.trim().to_string()).is_none(),
                        "second TYPE for {name}"
                    );
                }
                _ => {} // a plain comment
            }
            continue;
        }
        let sample = parse_sample(line);
        // The family: the name itself, or a histogram/summary's base name.
        let family = if types.contains_key(&sample.name) {
            sample.name.clone()
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| sample.name.strip_suffix(s))
                .find(|base| matches!(types.get(*base).map(String::as_str), Some("histogram" | "summary")))
                .map(str::to_string)
                .unwrap_or_else(|| panic!("sample without a TYPE line before it: {line:?}"))
        };
        assert!(help.contains(&family), "sample without a HELP line before it: {line:?}");
        if current.as_deref() != Some(family.as_str()) {
            if let Some(prev) = current.take() {
                finished.insert(prev);
            }
            assert!(!finished.contains(&family), "samples of {family} are not grouped together: {line:?}");
            current = Some(family.clone());
        }
        if types[&family] == "counter" {
            assert!(sample.value >= 0.0, "negative counter: {line:?}");
        }
        let mut labels = sample.labels.clone();
        labels.sort();
        assert!(seen.insert(format!("{}{labels:?}", sample.name)), "duplicate sample: {line:?}");
        with_samples.insert(family.clone());
        samples.push((family, sample));
    }
    samples
}

/// The format checker itself rejects what it must (so that the test above
/// can fail).
#[test]
fn exposition_checker_rejects_invalid_text() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{core=\"0\"} 1\n";
    assert_eq!(parse_exposition(good).len(), 1);
    let bad = [
        "a_total 1\n",                                // no HELP/TYPE
        "# TYPE a gauge\na 1\n",                      // no HELP
        "# HELP a A.\n# TYPE a gauge\na one\n",       // value
        "# HELP 1a A.\n# TYPE 1a gauge\n1a 1\n",      // name
        "# HELP a A.\n# TYPE a gauge\na{core=0} 1\n", // unquoted label
        "# HELP a A.\n# TYPE a gauge\na 1",           // no final newline
        "# HELP a A.\n# TYPE a gauge\na 1\na 2\n",    // duplicate
        "# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\na{x=\"1\"} 1\nb 1\na{x=\"2\"} 1\n", // not grouped
    ];
    for text in bad {
        let caught = std::panic::catch_unwind(|| parse_exposition(text));
        assert!(caught.is_err(), "accepted invalid exposition text {text:?}");
    }
}

#[test]
fn metrics_is_valid_prometheus_text_with_every_core() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    // Some traffic, so that the counters are not all zero.
    let mut ws = connect(addr, "/ws/documents/metrics-doc");
    assert_pong(&mut ws);
    let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.raw);
    let content_type = r.header("content-type").expect("a Content-Type");
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "Content-Type: {content_type}");
    let samples = parse_exposition(&r.body);
    let families: BTreeSet<&str> = samples.iter().map(|(f, _)| f.as_str()).collect();
    for required in [
        "docrelay_active_connections",
        "docrelay_peak_concurrent_connections",
        "docrelay_connections_total",
        "docrelay_sessions",
    ] {
        assert!(families.contains(required), "no {required} in:\n{}", r.body);
    }
    // Per-core families have one sample for every core, and only those.
    let want: BTreeSet<String> = (0..cores).map(|c| c.to_string()).collect();
    let mut per_core = 0;
    for family in &families {
        let of_family: Vec<&Sample> = samples.iter().filter(|(f, _)| f == family).map(|(_, s)| s).collect();
        let core_labels: Vec<&str> = of_family
            .iter()
            .filter_map(|s| s.labels.iter().find(|(n, _)| n == "core").map(|(_, v)| v.as_str()))
            .collect();
        if core_labels.is_empty() {
            continue;
        }
        per_core += 1;
        assert_eq!(core_labels.len(), of_family.len(), "{family}: some samples have no core label");
        let got: BTreeSet<String> = core_labels.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "{family}: core labels");
        assert_eq!(core_labels.len(), cores, "{family}: one sample per core");
    }
    assert!(per_core >= 1, "no per-core family in:\n{}", r.body);
    // The session is counted on its owner core.
    let owner = docrelay::owner_core("metrics-doc", cores);
    let sessions = samples
        .iter()
        .find(|(_, s)| s.name == "docrelay_sessions" && s.labels == [("core".to_string(), owner.to_string())])
        .map(|(_, s)| s.value);
    assert_eq!(sessions, Some(1.0), "docrelay_sessions on core {owner}:\n{}", r.body);
    // /metrics over HTTP/1.0 works too.
    let r = exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.raw);
    parse_exposition(&r.body);
}

#[test]
fn connection_counters_follow_sessions() {
    let relay = relay(config());
    let addr = relay.local_addr();
    assert_eq!(metric(addr, "docrelay_active_connections"), 0);
    let mut clients: Vec<Client> = (0..3).map(|i| connect(addr, &format!("/ws/documents/count-{i}"))).collect();
    for ws in &mut clients {
        // Once a session answers, it is registered on its core.
        assert_pong(ws);
    }
    assert_eq!(metric(addr, "docrelay_active_connections"), 3);
    assert_eq!(metric(addr, "docrelay_peak_concurrent_connections"), 3);
    assert_eq!(metric(addr, "docrelay_connections_total"), 3);
    for mut ws in clients {
        ws.close(None).unwrap();
        // Until the relay's Close answer ends the session.
        while ws.read().is_ok() {}
    }
    eventually("active connections back to 0", || metric(addr, "docrelay_active_connections") == 0);
    assert_eq!(metric(addr, "docrelay_peak_concurrent_connections"), 3, "peak must stay");
    assert_eq!(metric(addr, "docrelay_connections_total"), 3);
    assert_eq!(metric_sum(addr, "docrelay_sessions", relay.cpus().len()), 0);
    // A new connection raises total, not peak.
    let mut ws = connect(addr, "/ws/documents/count-again");
    assert_pong(&mut ws);
    assert_eq!(metric(addr, "docrelay_active_connections"), 1);
    assert_eq!(metric(addr, "docrelay_peak_concurrent_connections"), 3);
    assert_eq!(metric(addr, "docrelay_connections_total"), 4);
}

// ---------------------------------------------------------------------------
// Document ids

#[test]
fn every_document_id_character_is_accepted() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let charset = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~:-";
    let max: String = charset.chars().cycle().take(128).collect();
    let ids = ["a.B_~:-9", charset, max.as_str(), "x", "-", "~", "..", ":", "_"];
    let mut open = Vec::new();
    for id in ids {
        let mut ws = connect(addr, &format!("/ws/documents/{id}"));
        assert_pong(&mut ws);
        open.push(ws);
    }
    // Each session lives on the owner core of its id, taken as is.
    let cores = relay.cpus().len();
    let mut expected = vec![0u64; cores];
    for id in ids {
        expected[docrelay::owner_core(id, cores)] += 1;
    }
    for (core, want) in expected.iter().enumerate() {
        assert_eq!(core_metric(addr, "docrelay_sessions", core), *want, "core {core}");
    }
    // One byte more than the maximum is refused.
    let req = upgrade_with(&format!("/ws/documents/{max}a"), "HTTP/1.1", Some("dGhlIHNhbXBsZSBub25jZQ=="), "13");
    assert_status(&exchange(addr, req.as_bytes()), 400, "129-byte id");
}

// ---------------------------------------------------------------------------
// Isolation

/// Malformed, oversized, stalled and refused requests on other sockets do
/// not disturb sessions that are open meanwhile, on any core.
#[test]
fn bad_input_never_affects_other_sessions() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let mut sessions: Vec<Client> = (0..4).map(|i| connect(addr, &format!("/ws/documents/steady-{i}"))).collect();
    for ws in &mut sessions {
        assert_pong(ws);
    }
    // Stalled partial heads stay open (default 5 s handshake timeout) while
    // the sessions keep working.
    let stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /ws/documents/steady-0 HTTP/1.1\r\nHost: t\r\nUpgr").unwrap();
            s
        })
        .collect();
    let bad: Vec<Vec<u8>> = vec![
        b"\x00\xff\x13\x37garbage\r\n\r\n".to_vec(),
        b"GET /nope HTTP/1.1\r\n\r\n".to_vec(),
        b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_vec(),
        healthz_head_of_len(20_000).into_bytes(),
        upgrade_with("/ws/documents/a%20b", "HTTP/1.1", Some("dGhlIHNhbXBsZSBub25jZQ=="), "13").into_bytes(),
        upgrade_with("/ws/documents/steady-1", "HTTP/1.1", Some("bad"), "13").into_bytes(),
        upgrade_with("/ws/documents/steady-2", "HTTP/1.1", Some("dGhlIHNhbXBsZSBub25jZQ=="), "12").into_bytes(),
        upgrade_with("/ws/documents/steady-3", "HTTP/1.0", Some("dGhlIHNhbXBsZSBub25jZQ=="), "13").into_bytes(),
    ];
    for round in 0..3 {
        let workers: Vec<_> = bad
            .iter()
            .cloned()
            .map(|req| {
                std::thread::spawn(move || {
                    let r = exchange(addr, &req);
                    assert!(r.status >= 400 && r.closed, "{}", r.raw);
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        // Connections that go away mid-head.
        for _ in 0..4 {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /ws/documents/steady-0 HTTP/1.1\r\nHo").unwrap();
        }
        for (i, ws) in sessions.iter_mut().enumerate() {
            assert_pong_for(ws, &format!("session {i}, round {round}"));
        }
    }
    assert_eq!(metric(addr, "docrelay_active_connections"), 4);
    drop(stalled);
    for ws in &mut sessions {
        assert_pong(ws);
    }
}

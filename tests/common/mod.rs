//! Shared helpers for the end-to-end tests: a relay on an ephemeral port,
//! WebSocket clients (tungstenite), raw sockets, and /metrics scraping.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use docrelay::{Config, RelayHandle, RelayOptions};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

pub type Client = WebSocket<MaybeTlsStream<TcpStream>>;

/// A test configuration: port 0, every CPU (2 on CI), short timeouts where a
/// test does not set its own.
pub fn config() -> Config {
    Config { listen: "127.0.0.1:0".parse().unwrap(), ..Config::default() }
}

/// Starts a relay; it stops when the handle is dropped.
pub fn start(config: Config) -> RelayHandle {
    docrelay::start(config, RelayOptions::default()).expect("relay starts")
}

pub fn start_with(config: Config, options: RelayOptions) -> RelayHandle {
    docrelay::start(config, options).expect("relay starts")
}

/// Opens a WebSocket session on `/ws/documents/{doc}` (with an optional query).
pub fn connect(addr: SocketAddr, path_and_query: &str) -> Client {
    let url = format!("ws://{addr}{path_and_query}");
    let (ws, resp) = tungstenite::connect(url).expect("websocket connects");
    assert_eq!(resp.status(), 101);
    set_timeout(&ws, Duration::from_secs(10));
    ws
}

pub fn set_timeout(ws: &Client, t: Duration) {
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(t)).unwrap();
    }
}

/// Reads the next data message (Ping/Pong frames are skipped), as text.
pub fn next_text(ws: &mut Client) -> String {
    loop {
        match ws.read().expect("a message") {
            Message::Text(t) => return t.to_string(),
            Message::Binary(b) => return String::from_utf8(b.to_vec()).expect("utf-8"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a data message, got {other:?}"),
        }
    }
}

/// Sends a JSON text message and returns the parsed reply.
pub fn request(ws: &mut Client, json: &str) -> serde_json::Value {
    ws.send(Message::text(json)).expect("send");
    serde_json::from_str(&next_text(ws)).expect("reply is JSON")
}

/// Reads until the relay's Close frame and returns its code and reason.
pub fn expect_close(ws: &mut Client) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return (f.code.into(), f.reason.to_string()),
            Ok(Message::Close(None)) => return (1005, String::new()),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a Close frame: {e}"),
        }
    }
}

/// A raw HTTP request; returns the whole response until the relay closes.
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A valid upgrade request head for `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A masked client frame (raw sockets send these to test malformed input).
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    docrelay::ws::encode_client_frame(&mut out, fin, opcode, [0x37, 0xfa, 0x21, 0x3d], payload);
    out
}

/// A raw socket that has completed the upgrade; returns it and any bytes
/// that followed the 101 head.
pub fn raw_upgrade(addr: SocketAddr, path: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(upgrade_request(path).as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before the 101");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
            return (s, buf[end + 4..].to_vec());
        }
    }
}

/// Reads one server frame (unmasked) from a raw socket: (opcode, payload).
pub fn read_frame(s: &mut TcpStream, pending: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    loop {
        if pending.len() >= 2 {
            let op = pending[0] & 0x0f;
            let (len, hl) = match pending[1] & 0x7f {
                126 if pending.len() >= 4 => (u16::from_be_bytes([pending[2], pending[3]]) as usize, 4),
                127 if pending.len() >= 10 => (u64::from_be_bytes(pending[2..10].try_into().unwrap()) as usize, 10),
                126 | 127 => (usize::MAX, 0),
                n => (n as usize, 2),
            };
            if len != usize::MAX && pending.len() >= hl + len {
                let payload = pending[hl..hl + len].to_vec();
                pending.drain(..hl + len);
                return Some((op, payload));
            }
        }
        let mut chunk = [0u8; 65536];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads frames until a Close and returns its code (None if the connection
/// ended without one).
pub fn raw_expect_close(s: &mut TcpStream, pending: &mut Vec<u8>) -> Option<u16> {
    while let Some((op, payload)) = read_frame(s, pending) {
        if op == 0x8 {
            return Some(if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 });
        }
    }
    None
}

/// Scrapes /metrics and returns the value of one sample line, e.g.
/// `docrelay_sessions{core="0"}` or `docrelay_active_connections`.
pub fn metric(addr: SocketAddr, sample: &str) -> u64 {
    let body = raw_http(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    body.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

/// Polls `f` until it returns true (up to 10 s): for state that settles
/// asynchronously on the relay's cores (counters after a close).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for: {what}");
}

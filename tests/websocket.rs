//! WebSocket framing, control frames, the close handshake, limits and timeouts,
//! end to end (`docs/protocol.md`, "Session lifecycle", "Frames", "Client
//! messages" and "Close codes"; RFC 6455).
//!
//! Well-formed traffic goes through a real tungstenite client; malformed input
//! through raw sockets, where the opcode and payload of every relay frame are
//! checked byte for byte.

mod common;
use common::*;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use docrelay::Config;
use serde_json::Value;
use tungstenite::Message;

const CONT: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

const PING_JSON: &[u8] = br#"{"type":"ping"}"#;

/// A raw WebSocket connection that completed the upgrade.
struct Raw {
    s: TcpStream,
    pending: Vec<u8>,
}

impl Raw {
    fn open(addr: SocketAddr, doc: &str) -> Raw {
        let (s, pending) = raw_upgrade(addr, &format!("/ws/documents/{doc}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Raw { s, pending }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write to the relay");
    }

    /// Sends one complete masked frame.
    fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send(&client_frame(fin, opcode, payload));
    }

    /// The next relay frame; panics if the connection ends (or stays silent) first.
    fn frame(&mut self, what: &str) -> (u8, Vec<u8>) {
        read_frame(&mut self.s, &mut self.pending).unwrap_or_else(|| panic!("{what}: no frame from the relay"))
    }

    /// The next frame must be a Text frame holding JSON.
    fn json(&mut self, what: &str) -> Value {
        let (op, payload) = self.frame(what);
        assert_eq!(
            op,
            TEXT,
            "{what}: direct replies are Text frames (payload {:?})",
            String::from_utf8_lossy(&payload)
        );
        serde_json::from_slice(&payload).unwrap_or_else(|e| panic!("{what}: reply is not JSON ({e}): {payload:?}"))
    }

    /// The next frame must be the Text reply `{"type":"pong"}`.
    fn expect_pong(&mut self, what: &str) {
        let (op, payload) = self.frame(what);
        assert_eq!(
            (op, String::from_utf8_lossy(&payload).into_owned()),
            (TEXT, "{\"type\":\"pong\"}".to_string()),
            "{what}"
        );
    }

    /// Sends `{"type":"ping"}` and expects the pong: the session still works.
    fn assert_alive(&mut self, what: &str) {
        self.send_frame(true, TEXT, PING_JSON);
        self.expect_pong(what);
    }

    /// The next frame must be a Close; returns its code (1005 for an empty
    /// payload) and reason.
    fn next_close(&mut self, what: &str) -> (u16, String) {
        let (op, payload) = self.frame(what);
        assert_eq!(
            op,
            CLOSE,
            "{what}: expected a Close frame, got opcode {op:#x} {:?}",
            String::from_utf8_lossy(&payload)
        );
        close_payload(what, &payload)
    }

    /// After the relay's Close: no further frame, and the TCP connection ends
    /// (end of stream, not a reset) within the read timeout.
    fn expect_eof(&mut self, what: &str) {
        assert!(self.pending.is_empty(), "{what}: bytes after the Close frame: {:?}", self.pending);
        let mut buf = [0u8; 1024];
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{what}: data after the Close frame: {:?}", &buf[..n]),
            Err(e) => panic!("{what}: expected end of stream after the Close frame, got {e}"),
        }
    }
}

/// Code and reason of a Close payload, checking the payload's shape.
fn close_payload(what: &str, payload: &[u8]) -> (u16, String) {
    match payload.len() {
        0 => (1005, String::new()),
        1 => panic!("{what}: relay sent a 1-byte Close payload"),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let reason = std::str::from_utf8(&payload[2..])
                .unwrap_or_else(|_| panic!("{what}: Close reason is not UTF-8: {payload:?}"));
            (code, reason.to_string())
        }
    }
}

fn close_frame_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// `{"type":"ping","pad":"xxx..."}` of exactly `len` bytes.
fn padded_ping(len: usize) -> Vec<u8> {
    let head = br#"{"type":"ping","pad":""#;
    let mut v = head.to_vec();
    v.resize(len - 2, b'x');
    v.extend_from_slice(b"\"}");
    assert_eq!(v.len(), len);
    v
}

/// Checks `{"type":"error","code":code,"message":"..."}`.
fn assert_error(what: &str, reply: &Value, code: &str) {
    assert_eq!(reply["type"], "error", "{what}: {reply}");
    assert_eq!(reply["code"], code, "{what}: {reply}");
    assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: error without a message: {reply}");
}

/// A config whose relay gives up on an unanswered Close quickly.
fn quick_close_config() -> Config {
    let mut c = config();
    c.limits.close_timeout_ms = 300;
    c
}

/// Sends `wire` on a fresh raw session and expects the relay to fail the
/// connection with `code`, then end the TCP connection.
fn assert_fails_with(addr: SocketAddr, doc: &str, what: &str, wire: &[u8], code: u16) {
    let mut raw = Raw::open(addr, doc);
    raw.send(wire);
    let (got, _) = raw.next_close(what);
    assert_eq!(got, code, "{what}: close code");
    raw.expect_eof(what);
}

// ---------------------------------------------------------------- 1. ping

#[test]
fn ping_message_gets_pong_as_text_frame() {
    let relay = relay(config());
    let addr = relay.local_addr();

    let mut ws = connect(addr, "/ws/documents/ping-ws");
    assert_eq!(request(&mut ws, r#"{"type":"ping"}"#), serde_json::json!({"type": "pong"}));
    // The reply to a Binary frame holding UTF-8 JSON is the same (and still Text).
    ws.send(Message::binary(PING_JSON.to_vec())).unwrap();
    match ws.read().unwrap() {
        Message::Text(t) => assert_eq!(t.as_str(), r#"{"type":"pong"}"#),
        other => panic!("expected a Text pong, got {other:?}"),
    }

    let mut raw = Raw::open(addr, "ping-raw");
    raw.send_frame(true, TEXT, PING_JSON);
    raw.expect_pong("ping in a Text frame");
    raw.send_frame(true, BINARY, PING_JSON);
    raw.expect_pong("ping in a Binary frame");
    // Whitespace around the object is still JSON.
    raw.send_frame(true, TEXT, b" \n{ \"type\" : \"ping\" }\t");
    raw.expect_pong("ping with whitespace");
}

// ---------------------------------------------------------------- 2. errors

#[test]
fn malformed_messages_get_error_replies_and_the_session_stays_open() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let mut raw = Raw::open(addr, "errors");
    let cases: &[(&str, u8, &[u8], &str)] = &[
        ("not JSON", TEXT, b"hello", "BAD_MESSAGE"),
        ("truncated JSON", TEXT, br#"{"type":"ping""#, "BAD_MESSAGE"),
        ("JSON followed by garbage", TEXT, br#"{"type":"ping"} x"#, "BAD_MESSAGE"),
        ("empty message", TEXT, b"", "BAD_MESSAGE"),
        ("JSON array", TEXT, br#"["ping"]"#, "BAD_MESSAGE"),
        ("JSON array of an object", TEXT, br#"[{"type":"ping"}]"#, "BAD_MESSAGE"),
        ("JSON string", TEXT, br#""ping""#, "BAD_MESSAGE"),
        ("JSON number", TEXT, b"42", "BAD_MESSAGE"),
        ("JSON null", TEXT, b"null", "BAD_MESSAGE"),
        ("object without type", TEXT, br#"{"typo":"ping"}"#, "BAD_MESSAGE"),
        ("empty object", TEXT, b"{}", "BAD_MESSAGE"),
        ("numeric type", TEXT, br#"{"type":1}"#, "BAD_MESSAGE"),
        ("null type", TEXT, br#"{"type":null}"#, "BAD_MESSAGE"),
        ("array type", TEXT, br#"{"type":["ping"]}"#, "BAD_MESSAGE"),
        ("object type", TEXT, br#"{"type":{"ping":true}}"#, "BAD_MESSAGE"),
        ("Binary frame, invalid UTF-8", BINARY, b"\xff\xfe{\"type\":\"ping\"}", "BAD_MESSAGE"),
        ("Binary frame, truncated code point", BINARY, b"{\"type\":\"ping\",\"x\":\"\xe2\x82\"}", "BAD_MESSAGE"),
        ("Binary frame, not JSON", BINARY, b"\x00\x01\x02", "BAD_MESSAGE"),
        ("unknown type", TEXT, br#"{"type":"dance"}"#, "UNKNOWN_TYPE"),
        ("type is case-sensitive", TEXT, br#"{"type":"PING"}"#, "UNKNOWN_TYPE"),
        ("empty type", TEXT, br#"{"type":""}"#, "UNKNOWN_TYPE"),
        ("unknown type in a Binary frame", BINARY, br#"{"type":"dance"}"#, "UNKNOWN_TYPE"),
    ];
    for (what, opcode, payload, code) in cases {
        raw.send_frame(true, *opcode, payload);
        let reply = raw.json(what);
        assert_error(what, &reply, code);
        raw.assert_alive(&format!("after {what}"));
    }

    // The same through tungstenite.
    let mut ws = connect(addr, "/ws/documents/errors");
    assert_error("ws: not JSON", &request(&mut ws, "not json"), "BAD_MESSAGE");
    ws.send(Message::binary(b"\xc3\x28".to_vec())).unwrap();
    let reply: Value = serde_json::from_str(&next_text(&mut ws)).unwrap();
    assert_error("ws: Binary invalid UTF-8", &reply, "BAD_MESSAGE");
    assert_error("ws: unknown type", &request(&mut ws, r#"{"type":"dance"}"#), "UNKNOWN_TYPE");
    assert_pong(&mut ws);
}

// ---------------------------------------------------------------- 3. ping/pong frames

#[test]
fn websocket_ping_gets_pong_with_the_same_payload() {
    let relay = relay(config());
    let mut raw = Raw::open(relay.local_addr(), "wsping");
    let payloads: Vec<Vec<u8>> = vec![b"hello".to_vec(), Vec::new(), vec![0xff, 0x00, 0x80], vec![b'z'; 125]];
    for p in &payloads {
        raw.send_frame(true, PING, p);
        let (op, got) = raw.frame("pong");
        assert_eq!(op, PONG, "Ping of {} bytes: opcode", p.len());
        assert_eq!(&got, p, "Ping of {} bytes: payload", p.len());
    }
    // Many Pings in one write: each answered, in order.
    let wire: Vec<u8> = (0..100u32).flat_map(|i| client_frame(true, PING, &i.to_be_bytes())).collect();
    raw.send(&wire);
    for i in 0..100u32 {
        let (op, got) = raw.frame("pipelined pong");
        assert_eq!((op, got), (PONG, i.to_be_bytes().to_vec()), "pong {i}");
    }
    raw.assert_alive("after pings");
}

#[test]
fn unsolicited_pong_is_ignored() {
    let relay = relay(config());
    let mut raw = Raw::open(relay.local_addr(), "unsolicited");
    raw.send_frame(true, PONG, b"x");
    raw.send_frame(true, PONG, b"");
    // The very next frame is the reply to this ping: nothing answered the Pongs.
    raw.assert_alive("after unsolicited Pongs");
}

// ---------------------------------------------------------------- 4. fragmentation

#[test]
fn fragmented_message_with_interleaved_ping() {
    let relay = relay(config());
    let mut raw = Raw::open(relay.local_addr(), "fragments");
    raw.send_frame(false, TEXT, br#"{"type""#);
    raw.send_frame(true, PING, b"mid-message");
    // The Ping is answered while the message is still incomplete.
    let (op, payload) = raw.frame("pong between fragments");
    assert_eq!((op, payload.as_slice()), (PONG, &b"mid-message"[..]));
    raw.send_frame(false, CONT, br#":"pi"#);
    raw.send_frame(true, PING, b"again");
    raw.send_frame(true, CONT, br#"ng"}"#);
    let (op, payload) = raw.frame("second pong");
    assert_eq!((op, payload.as_slice()), (PONG, &b"again"[..]));
    raw.expect_pong("the reassembled message");

    // The same frames written one byte at a time.
    let wire = [
        client_frame(false, TEXT, br#"{"type""#),
        client_frame(true, PING, b"slow"),
        client_frame(false, CONT, br#":"pi"#),
        client_frame(true, CONT, br#"ng"}"#),
    ]
    .concat();
    for b in &wire {
        raw.send(std::slice::from_ref(b));
    }
    let (op, payload) = raw.frame("pong, byte by byte");
    assert_eq!((op, payload.as_slice()), (PONG, &b"slow"[..]));
    raw.expect_pong("message written byte by byte");

    // Fragmented Binary message too.
    raw.send(&[client_frame(false, BINARY, br#"{"ty"#), client_frame(true, CONT, br#"pe":"ping"}"#)].concat());
    raw.expect_pong("fragmented Binary message");

    // Fragments with empty payloads are fine.
    raw.send(
        &[
            client_frame(false, TEXT, b""),
            client_frame(false, CONT, PING_JSON),
            client_frame(false, CONT, b""),
            client_frame(true, CONT, b""),
        ]
        .concat(),
    );
    raw.expect_pong("fragments with empty payloads");
}

#[test]
fn code_point_split_across_fragments_is_accepted() {
    let relay = relay(config());
    let mut raw = Raw::open(relay.local_addr(), "utf8-split");
    let msg = "{\"type\":\"ping\",\"x\":\"h\u{e9}\u{20ac}\u{1f600}\"}".as_bytes().to_vec();
    let e = msg.iter().position(|&b| b == 0xc3).unwrap(); // é: 2 bytes
    let euro = msg.iter().position(|&b| b == 0xe2).unwrap(); // €: 3 bytes
    let emoji = msg.iter().position(|&b| b == 0xf0).unwrap(); // 😀: 4 bytes
                                                              // Every cut lands inside a code point; the middle fragments hold only
                                                              // parts of code points.
    let cuts = [0, e + 1, euro + 2, emoji + 1, emoji + 3, msg.len()];
    let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &msg[w[0]..w[1]]).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let opcode = if i == 0 { TEXT } else { CONT };
        raw.send_frame(i + 1 == pieces.len(), opcode, piece);
    }
    raw.expect_pong("code points split across fragments");

    // The same, one byte per fragment, each written separately.
    for (i, b) in msg.iter().enumerate() {
        let opcode = if i == 0 { TEXT } else { CONT };
        raw.send_frame(i + 1 == msg.len(), opcode, std::slice::from_ref(b));
    }
    raw.expect_pong("one byte per fragment");
}

// ---------------------------------------------------------------- 5. close handshake

#[test]
fn client_close_is_echoed_then_tcp_ends() {
    let relay = relay(config());
    let addr = relay.local_addr();

    let mut raw = Raw::open(addr, "close");
    raw.assert_alive("before close");
    raw.send_frame(true, CLOSE, &close_frame_payload(1000, b"bye"));
    assert_eq!(raw.next_close("echo of Close(1000)").0, 1000);
    raw.expect_eof("after Close(1000)");

    // No payload: the echo has no payload either.
    let mut raw = Raw::open(addr, "close");
    raw.send_frame(true, CLOSE, b"");
    let (op, payload) = raw.frame("echo of an empty Close");
    assert_eq!(op, CLOSE);
    assert!(payload.is_empty(), "echo of an empty Close has a payload: {payload:?}");
    raw.expect_eof("after an empty Close");

    // Other valid codes are echoed with their code.
    for code in [1001u16, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
        let mut raw = Raw::open(addr, "close");
        raw.send_frame(true, CLOSE, &close_frame_payload(code, "r\u{e9}ason".as_bytes()));
        assert_eq!(raw.next_close(&format!("echo of Close({code})")).0, code);
        raw.expect_eof(&format!("after Close({code})"));
    }

    // A reply queued before the client's Close still goes out, before the echo.
    let mut raw = Raw::open(addr, "close");
    raw.send(
        &[client_frame(true, TEXT, PING_JSON), client_frame(true, CLOSE, &close_frame_payload(1000, b""))].concat(),
    );
    raw.expect_pong("ping followed by Close");
    assert_eq!(raw.next_close("ping followed by Close").0, 1000);
    raw.expect_eof("ping followed by Close");

    // A Close between the fragments of a message (control frames may
    // interleave) is a normal close.
    let mut raw = Raw::open(addr, "close");
    raw.send(
        &[client_frame(false, TEXT, b"{"), client_frame(true, CLOSE, &close_frame_payload(1000, b"mid"))].concat(),
    );
    assert_eq!(raw.next_close("Close inside a fragmented message").0, 1000);
    raw.expect_eof("Close inside a fragmented message");

    // The longest Close payload (125 bytes) is fine.
    let mut raw = Raw::open(addr, "close");
    raw.send_frame(true, CLOSE, &close_frame_payload(4000, &[b'r'; 123]));
    assert_eq!(raw.next_close("125-byte Close").0, 4000);
    raw.expect_eof("125-byte Close");

    // Nothing is answered after the client's Close, even when data follows it
    // in the same write.
    let mut raw = Raw::open(addr, "close");
    raw.send(
        &[client_frame(true, CLOSE, &close_frame_payload(1000, b"")), client_frame(true, TEXT, PING_JSON)].concat(),
    );
    assert_eq!(raw.next_close("Close followed by a ping").0, 1000);
    raw.expect_eof("Close followed by a ping");
}

#[test]
fn tungstenite_client_close_completes() {
    let relay = relay(config());
    let mut ws = connect(relay.local_addr(), "/ws/documents/ws-close");
    assert_pong(&mut ws);
    ws.close(None).unwrap();
    loop {
        match ws.read() {
            Ok(Message::Close(_)) | Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
            Ok(other) => panic!("data after close: {other:?}"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("expected ConnectionClosed, got {e}"),
        }
    }

    // With a code and reason.
    let mut ws = connect(relay.local_addr(), "/ws/documents/ws-close");
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "done".into(),
    }))
    .unwrap();
    let mut echoed = None;
    loop {
        match ws.read() {
            Ok(Message::Close(f)) => echoed = f.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("expected ConnectionClosed, got {e}"),
        }
    }
    assert_eq!(echoed, Some(1000));
}

// ---------------------------------------------------------------- 6. 1007

#[test]
fn invalid_utf8_fails_the_connection_with_1007() {
    let relay = relay(quick_close_config());
    let addr = relay.local_addr();
    let mut healthy = connect(addr, "/ws/documents/utf8");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("Text frame with 0xff", client_frame(true, TEXT, b"{\"type\":\"\xff\"}")),
        ("Text frame, overlong encoding", client_frame(true, TEXT, b"{\"type\":\"\xc0\xaf\"}")),
        ("Text frame, surrogate", client_frame(true, TEXT, b"{\"type\":\"\xed\xa0\x80\"}")),
        ("Text frame, above U+10FFFF", client_frame(true, TEXT, b"{\"type\":\"\xf4\x90\x80\x80\"}")),
        ("Text frame ending inside a code point", client_frame(true, TEXT, b"{\"type\":\"\xe2\x82")),
        (
            "fragmented Text, invalid byte in the last fragment",
            [client_frame(false, TEXT, br#"{"type":""#), client_frame(true, CONT, b"\xff\"}")].concat(),
        ),
        (
            "fragmented Text ending inside a code point",
            [client_frame(false, TEXT, br#"{"type":""#), client_frame(true, CONT, b"\xf0\x9f\x98")].concat(),
        ),
        ("Close reason with 0xff", client_frame(true, CLOSE, &close_frame_payload(1000, b"by\xffe"))),
        ("Close reason ending inside a code point", client_frame(true, CLOSE, &close_frame_payload(1000, b"\xe2\x82"))),
    ];
    for (what, wire) in &cases {
        assert_fails_with(addr, "utf8", what, wire, 1007);
        assert_pong_for(&mut healthy, &format!("healthy client after {what}"));
    }
}

#[test]
fn invalid_utf8_in_a_first_fragment_fails_fast() {
    let relay = relay(quick_close_config());
    let addr = relay.local_addr();
    // Only the non-final fragments are sent: the Close must come without the
    // final fragment ever arriving.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid byte in the first fragment", client_frame(false, TEXT, b"{\xff")),
        (
            "invalid byte in a middle fragment",
            [client_frame(false, TEXT, br#"{"type""#), client_frame(false, CONT, b":\"\xc0\xaf")].concat(),
        ),
        (
            "cut code point continued by an invalid byte",
            [client_frame(false, TEXT, b"{\"a\":\"\xe2"), client_frame(false, CONT, b"\x28\"")].concat(),
        ),
    ];
    for (what, wire) in &cases {
        assert_fails_with(addr, "utf8-fast", what, wire, 1007);
    }
}

// ---------------------------------------------------------------- 7. 1002

#[test]
fn protocol_errors_fail_the_connection_with_1002() {
    let relay = relay(quick_close_config());
    let addr = relay.local_addr();
    // Healthy clients on the same document (same core) and another one.
    let mut same = connect(addr, "/ws/documents/proto");
    let mut other = connect(addr, "/ws/documents/proto-other");

    let unmasked = {
        let mut f = vec![0x81, PING_JSON.len() as u8];
        f.extend_from_slice(PING_JSON);
        f
    };
    let with_bits = |bits: u8| {
        let mut f = client_frame(true, TEXT, PING_JSON);
        f[0] |= bits;
        f
    };
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("unmasked Text frame".into(), unmasked),
        ("unmasked Ping".into(), vec![0x89, 0x00]),
        ("RSV1 set".into(), with_bits(0x40)),
        ("RSV2 set".into(), with_bits(0x20)),
        ("RSV3 set".into(), with_bits(0x10)),
        ("RSV1 on a Ping".into(), {
            let mut f = client_frame(true, PING, b"");
            f[0] |= 0x40;
            f
        }),
        ("reserved opcode 0x3".into(), client_frame(true, 0x3, b"")),
        ("reserved opcode 0x7".into(), client_frame(true, 0x7, b"abc")),
        ("reserved opcode 0xB".into(), client_frame(true, 0xB, b"")),
        ("reserved opcode 0xF".into(), client_frame(true, 0xF, b"abc")),
        (
            "reserved opcode 0x3 inside a fragmented message".into(),
            [client_frame(false, TEXT, b"{"), client_frame(true, 0x3, b"")].concat(),
        ),
        ("continuation without a message".into(), client_frame(true, CONT, PING_JSON)),
        ("non-final continuation without a message".into(), client_frame(false, CONT, PING_JSON)),
        (
            "continuation after a complete message".into(),
            [client_frame(true, TEXT, PING_JSON), client_frame(true, CONT, b"x")].concat(),
        ),
        (
            "new Text frame inside a fragmented message".into(),
            [client_frame(false, TEXT, br#"{"type":"#), client_frame(true, TEXT, PING_JSON)].concat(),
        ),
        (
            "new Binary frame inside a fragmented message".into(),
            [client_frame(false, TEXT, br#"{"type":"#), client_frame(true, BINARY, PING_JSON)].concat(),
        ),
        ("fragmented Ping".into(), client_frame(false, PING, b"x")),
        ("fragmented Close".into(), client_frame(false, CLOSE, &close_frame_payload(1000, b""))),
        ("Ping with 126 bytes".into(), client_frame(true, PING, &[b'a'; 126])),
        ("Pong with 126 bytes".into(), client_frame(true, PONG, &[b'a'; 126])),
        ("Close with 126 bytes".into(), client_frame(true, CLOSE, &close_frame_payload(1000, &[b'a'; 124]))),
        ("Close with a 1-byte payload".into(), client_frame(true, CLOSE, &[0x03])),
    ];
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        cases.push((format!("Close with code {code}"), client_frame(true, CLOSE, &close_frame_payload(code, b""))));
    }
    for (what, wire) in &cases {
        let mut raw = Raw::open(addr, "proto");
        raw.send(wire);
        // A complete message before the error is still answered.
        if what.starts_with("continuation after") {
            raw.expect_pong(what);
        }
        let (code, _) = raw.next_close(what);
        assert_eq!(code, 1002, "{what}: close code");
        raw.expect_eof(what);
        // 9: nobody else is affected.
        assert_pong_for(&mut same, &format!("same document after {what}"));
        assert_pong_for(&mut other, &format!("other document after {what}"));
    }
}

/// A protocol error in bytes that arrived together with the upgrade request.
#[test]
fn protocol_error_pipelined_behind_the_upgrade() {
    let relay = relay(quick_close_config());
    let addr = relay.local_addr();
    for i in 0..4 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut wire = upgrade_request(&format!("/ws/documents/pipelined-error-{i}")).into_bytes();
        wire.extend(client_frame(true, TEXT, PING_JSON));
        wire.extend(client_frame(true, 0x3, b""));
        s.write_all(&wire).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).unwrap(), 1, "closed before the 101");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        let mut raw = Raw { s, pending: Vec::new() };
        raw.expect_pong("ping before the bad frame");
        assert_eq!(raw.next_close("reserved opcode behind the upgrade").0, 1002);
        raw.expect_eof("reserved opcode behind the upgrade");
    }
    eventually("the failed sessions are gone", || metric(addr, "docrelay_active_connections") == 0);
    eventually("no session left on any core", || metric_sum(addr, "docrelay_sessions", relay.cpus().len()) == 0);
}

// ---------------------------------------------------------------- 8. 1009

#[test]
fn message_size_limit() {
    let mut c = quick_close_config();
    c.limits.max_message_bytes = 1024;
    let relay = relay(c);
    let addr = relay.local_addr();
    let mut healthy = connect(addr, "/ws/documents/limit");

    // Exactly at the limit: accepted, as one frame or fragmented, Text or Binary.
    let exact = padded_ping(1024);
    let mut raw = Raw::open(addr, "limit");
    raw.send_frame(true, TEXT, &exact);
    raw.expect_pong("1024-byte Text message");
    raw.send_frame(true, BINARY, &exact);
    raw.expect_pong("1024-byte Binary message");
    raw.send(
        &[
            client_frame(false, TEXT, &exact[..300]),
            client_frame(false, CONT, &exact[300..1000]),
            client_frame(true, CONT, &exact[1000..]),
        ]
        .concat(),
    );
    raw.expect_pong("1024-byte message in 3 fragments");
    // Control frames in the middle do not count towards the message size.
    raw.send(
        &[
            client_frame(false, TEXT, &exact[..600]),
            client_frame(true, PING, &[b'p'; 125]),
            client_frame(true, CONT, &exact[600..]),
        ]
        .concat(),
    );
    assert_eq!(raw.frame("pong").0, PONG);
    raw.expect_pong("1024-byte message around a Ping");

    // Only the header of a 2000-byte frame: the Close comes before any payload.
    let mut header = vec![0x81, 0x80 | 126];
    header.extend_from_slice(&2000u16.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    assert_fails_with(addr, "limit", "header announcing 2000 bytes", &header, 1009);
    // A 64-bit length far beyond anything the relay could buffer.
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    assert_fails_with(addr, "limit", "header announcing 1 TiB", &header, 1009);

    // One byte over, complete.
    assert_fails_with(addr, "limit", "1025-byte Text frame", &client_frame(true, TEXT, &padded_ping(1025)), 1009);
    let over = padded_ping(1025);
    assert_fails_with(
        addr,
        "limit",
        "1025-byte message in 2 fragments",
        &[client_frame(false, TEXT, &over[..600]), client_frame(true, CONT, &over[600..])].concat(),
        1009,
    );
    // The continuation's header alone is enough to know the total is too big.
    let mut wire = client_frame(false, TEXT, &over[..600]);
    wire.extend_from_slice(&[0x80, 0x80 | 126]);
    wire.extend_from_slice(&600u16.to_be_bytes());
    wire.extend_from_slice(&[1, 2, 3, 4]);
    assert_fails_with(addr, "limit", "continuation header exceeding the limit", &wire, 1009);
    // Many small fragments adding up to more than the limit.
    let mut wire = client_frame(false, TEXT, b"{");
    for _ in 0..20 {
        wire.extend(client_frame(false, CONT, &[b' '; 60]));
    }
    assert_fails_with(addr, "limit", "many fragments exceeding the limit", &wire, 1009);

    assert_pong_for(&mut healthy, "healthy client after the 1009s");
    raw.assert_alive("the at-limit session after the others");
    // Every failed session ended; the two healthy ones remain.
    eventually("only the healthy sessions remain", || metric(addr, "docrelay_active_connections") == 2);
}

// ---------------------------------------------------------------- 9, 12. after a relay Close

/// A client that never answers the relay's Close and never closes its socket
/// is dropped after the close timeout.
#[test]
fn unanswered_relay_close_is_dropped_after_the_close_timeout() {
    let relay = relay(quick_close_config());
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let mut healthy = connect(addr, "/ws/documents/silent");
    let mut raw = Raw::open(addr, "silent");
    raw.send_frame(true, 0x3, b"");
    assert_eq!(raw.next_close("reserved opcode").0, 1002);
    // The relay half-closes at once (the client sees end of stream) ...
    raw.expect_eof("after the relay's Close");
    // ... and gives up on the handshake after close_timeout_ms, although this
    // client keeps its socket open and says nothing.
    eventually("the silent session is gone", || metric(addr, "docrelay_active_connections") == 1);
    eventually("the silent session is unregistered from its core", || {
        metric_sum(addr, "docrelay_sessions", cores) == 1
    });
    assert_pong(&mut healthy);
    drop(raw);
}

/// The relay waits for the client's reply to its Close; the reply is accepted
/// (no reset) and the connection then ends.
#[test]
fn relay_close_waits_for_the_clients_close() {
    let mut c = config();
    c.limits.close_timeout_ms = 30_000;
    let relay = relay(c);
    let addr = relay.local_addr();
    let mut raw = Raw::open(addr, "reply");
    raw.send_frame(true, PING, &[0; 126]);
    assert_eq!(raw.next_close("Ping too long").0, 1002);
    // Still waiting for the client's reply: the connection is not gone.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(metric(addr, "docrelay_active_connections"), 1, "relay dropped the connection before the reply");
    raw.send_frame(true, CLOSE, &close_frame_payload(1002, b""));
    raw.s.shutdown(Shutdown::Write).unwrap();
    raw.expect_eof("after the client's reply Close");
    eventually("the session ends after the client's reply", || metric(addr, "docrelay_active_connections") == 0);
}

/// RFC 6455 7.1.1: once an endpoint has sent and received a Close it MUST
/// close the TCP connection. After the client answers the relay's Close
/// (without closing its own socket), the session must end without waiting
/// for the close timeout.
#[test]
fn session_ends_once_the_client_answers_the_relays_close() {
    let mut c = config();
    c.limits.close_timeout_ms = 30_000;
    let relay = relay(c);
    let addr = relay.local_addr();
    let mut raw = Raw::open(addr, "reply-open");
    raw.send_frame(true, 0xB, b"");
    assert_eq!(raw.next_close("reserved opcode").0, 1002);
    raw.send_frame(true, CLOSE, &close_frame_payload(1002, b""));
    raw.expect_eof("after the client's reply Close");
    // The client keeps its socket open; the handshake is complete anyway.
    eventually("the session ends once both Close frames were exchanged", || {
        metric(addr, "docrelay_active_connections") == 0
    });
}

/// The same exchange when the relay closed for another reason (idle): the
/// client's reply Close ends the session.
#[test]
fn idle_close_reply_ends_the_session() {
    let mut c = config();
    c.limits.idle_timeout_ms = 300;
    c.limits.ping_interval_ms = 10_000;
    c.limits.close_timeout_ms = 30_000;
    let relay = relay(c);
    let addr = relay.local_addr();
    let mut raw = Raw::open(addr, "idle-reply");
    let (code, reason) = raw.next_close("idle close");
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    raw.send_frame(true, CLOSE, &close_frame_payload(1001, b""));
    raw.expect_eof("after the client's reply");
    eventually("the session ends after the client's reply", || metric(addr, "docrelay_active_connections") == 0);
}

// ---------------------------------------------------------------- 10. idle

#[test]
fn silent_client_is_pinged_then_closed_1001() {
    let mut c = quick_close_config();
    c.limits.idle_timeout_ms = 400;
    c.limits.ping_interval_ms = 150;
    let relay = relay(c);
    let addr = relay.local_addr();
    let started = Instant::now();
    let mut raw = Raw::open(addr, "idle");
    let (op, payload) = raw.frame("relay ping");
    assert_eq!(op, PING, "first frame to a silent client is a Ping, got {op:#x} {payload:?}");
    let (code, reason) = loop {
        let (op, payload) = raw.frame("relay close");
        match op {
            PING => continue,
            CLOSE => break close_payload("idle close", &payload),
            _ => panic!("unexpected frame {op:#x} {payload:?}"),
        }
    };
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    // Not before the idle timeout (a functional bound, not a speed check).
    assert!(started.elapsed() >= Duration::from_millis(400), "closed after {:?}", started.elapsed());
    raw.expect_eof("after the idle close");
    eventually("the idle session is gone", || metric(addr, "docrelay_active_connections") == 0);
}

#[test]
fn active_clients_are_not_closed_for_idleness() {
    let mut c = quick_close_config();
    // Margins for a loaded 2-CPU machine: a client must stall for over 450 ms
    // to be closed; the test runs for more than twice the idle timeout.
    c.limits.idle_timeout_ms = 600;
    c.limits.ping_interval_ms = 150;
    let relay = relay(c);
    let addr = relay.local_addr();

    // A client that keeps sending messages.
    let mut talker = connect(addr, "/ws/documents/busy");
    // A client that only answers the relay's Pings (tungstenite replies with a
    // Pong whenever it reads).
    let mut listener = connect(addr, "/ws/documents/busy");
    set_timeout(&listener, Duration::from_millis(20));

    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut pings_seen = 0;
    while Instant::now() < deadline {
        assert_pong_for(&mut talker, "talker was closed");
        loop {
            match listener.read() {
                Ok(Message::Ping(_)) => pings_seen += 1,
                Ok(other) => panic!("listener got {other:?}"),
                Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break
                }
                Err(e) => panic!("listener failed: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(pings_seen > 0, "the relay never pinged the silent-but-responsive client");
    set_timeout(&listener, Duration::from_secs(10));
    assert_pong(&mut listener);
    assert_eq!(metric(addr, "docrelay_active_connections"), 2);
}

// ---------------------------------------------------------------- 11. volume

#[test]
fn large_message_round_trip() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let big = padded_ping(500 * 1024);

    let mut ws = connect(addr, "/ws/documents/large");
    let reply = request(&mut ws, std::str::from_utf8(&big).unwrap());
    assert_eq!(reply["type"], "pong");

    // Raw: five fragments with a Ping between two of them, written in small
    // pieces so that frames straddle reads.
    let mut raw = Raw::open(addr, "large");
    let chunk = big.len() / 5;
    let mut wire = Vec::new();
    for i in 0..5 {
        let end = if i == 4 { big.len() } else { (i + 1) * chunk };
        wire.extend(client_frame(i == 4, if i == 0 { TEXT } else { CONT }, &big[i * chunk..end]));
        if i == 2 {
            wire.extend(client_frame(true, PING, b"big"));
        }
    }
    for piece in wire.chunks(7001) {
        raw.send(piece);
    }
    let (op, payload) = raw.frame("pong during the big message");
    assert_eq!((op, payload.as_slice()), (PONG, &b"big"[..]));
    raw.expect_pong("500 KiB in 5 fragments");
    // And as one frame in one write.
    raw.send_frame(true, TEXT, &big);
    raw.expect_pong("500 KiB in one frame");
    raw.assert_alive("after the big messages");
}

#[test]
fn pipelined_messages_are_answered_in_order() {
    let relay = relay(config());
    let mut raw = Raw::open(relay.local_addr(), "pipeline");
    let n = 1000;
    let is_unknown = |i: usize| i % 7 == 3;
    let mut wire = Vec::new();
    for i in 0..n {
        if is_unknown(i) {
            wire.extend(client_frame(true, TEXT, format!(r#"{{"type":"nope{i}"}}"#).as_bytes()));
        } else {
            wire.extend(client_frame(true, TEXT, PING_JSON));
        }
    }
    raw.send(&wire);
    let mut pongs = 0;
    for i in 0..n {
        let reply = raw.json(&format!("reply {i}"));
        if is_unknown(i) {
            assert_error(&format!("reply {i}"), &reply, "UNKNOWN_TYPE");
        } else {
            assert_eq!(reply, serde_json::json!({"type": "pong"}), "reply {i}");
            pongs += 1;
        }
    }
    assert_eq!(pongs, (0..n).filter(|&i| !is_unknown(i)).count());
    // Nothing extra was queued: the next reply is the one to this marker.
    raw.send_frame(true, TEXT, br#"{"type":"marker"}"#);
    assert_error("marker", &raw.json("marker"), "UNKNOWN_TYPE");

    // 1000 pings in one write, counted.
    let wire: Vec<u8> = (0..n).flat_map(|_| client_frame(true, TEXT, PING_JSON)).collect();
    raw.send(&wire);
    for i in 0..n {
        raw.expect_pong(&format!("pong {i}"));
    }
    raw.send_frame(true, TEXT, br#"{"type":"marker"}"#);
    assert_error("marker after 1000 pings", &raw.json("marker"), "UNKNOWN_TYPE");
}

// ---------------------------------------------------------------- 13. bookkeeping

#[test]
fn sessions_are_unregistered_when_clients_leave() {
    let relay = relay(quick_close_config());
    let addr = relay.local_addr();
    let cores = relay.cpus().len();

    let mut clients: Vec<Client> = (0..6).map(|i| connect(addr, &format!("/ws/documents/bookkeeping-{i}"))).collect();
    for ws in &mut clients {
        assert_pong(ws);
    }
    let mut raws: Vec<Raw> = (0..4).map(|i| Raw::open(addr, &format!("bookkeeping-raw-{i}"))).collect();
    for r in &mut raws {
        r.assert_alive("raw client");
    }
    assert_eq!(metric(addr, "docrelay_active_connections"), 10);
    assert_eq!(metric_sum(addr, "docrelay_sessions", cores), 10);

    // Ways to leave: close handshake, TCP close without a Close frame, a
    // protocol error, a message too big... each must end the session.
    for mut ws in clients.drain(..3) {
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
    }
    drop(clients); // the other three just drop their sockets
    raws[0].send_frame(true, 0x3, b"");
    assert_eq!(raws[0].next_close("bad opcode").0, 1002);
    raws[1].send_frame(true, TEXT, b"\xff");
    assert_eq!(raws[1].next_close("bad UTF-8").0, 1007);
    raws[2].send_frame(true, CLOSE, &close_frame_payload(1000, b""));
    assert_eq!(raws[2].next_close("close").0, 1000);
    for r in &mut raws[..3] {
        r.expect_eof("bookkeeping");
    }
    raws[3].s.shutdown(Shutdown::Both).unwrap();

    eventually("connections_active back to 0", || metric(addr, "docrelay_active_connections") == 0);
    eventually("sessions on every core back to 0", || metric_sum(addr, "docrelay_sessions", cores) == 0);
    assert_eq!(metric(addr, "docrelay_connections_total"), 10);
    drop(raws);
}

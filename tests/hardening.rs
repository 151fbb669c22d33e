//! What a hostile or careless client can make the relay hold, and what it
//! answers (docs/protocol.md, sections 5 and 10):
//!
//! - a long history is answered in `sync_response` pages of at most
//!   `limits.max_sync_bytes`, one per request, so clients that ask for all of
//!   it and never read cannot make the relay build it once per requester;
//! - a client that reads a large page steadily is not cut off by the
//!   keepalive Ping queued behind it;
//! - `since` ahead of the document says so.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_docrelay");

fn doc_path(doc: &str) -> String {
    format!("/ws/documents/{doc}")
}

/// A client authenticated as `user` and joined to `doc`.
fn joined(addr: SocketAddr, doc: &str, user: &str) -> Client {
    let mut ws = connect(addr, &doc_path(doc));
    let a = request(&mut ws, &format!(r#"{{"type":"authenticate","token":"{user}"}}"#));
    assert_eq!(a["success"], true, "{a}");
    let j = request(&mut ws, r#"{"type":"join_document"}"#);
    assert_eq!(j["type"], "joined_document", "{j}");
    ws
}

/// Sends operations `first..=last` (their seqs) of about `size` bytes each
/// and waits for their acks (skipping presence broadcasts).
fn fill_history(ws: &mut Client, first: u64, last: u64, size: usize) {
    let pad = "p".repeat(size);
    for i in first..=last {
        ws.send(Message::text(format!(r#"{{"type":"operation","payload":{{"i":{i},"pad":"{pad}"}}}}"#))).unwrap();
        let ack = loop {
            let v: Value = serde_json::from_str(&next_text(ws)).unwrap();
            if v["type"] != "user_joined" && v["type"] != "user_left" {
                break v;
            }
        };
        assert_eq!((ack["type"].as_str(), ack["seq"].as_u64()), (Some("ack"), Some(i)), "{ack}");
    }
}

/// Pages through `sync_request`s from `since`, asserting the page rules;
/// returns the seqs received and the number of pages.
fn sync_all(ws: &mut Client, mut since: u64, doc_seq: u64, max_bytes: usize) -> (Vec<u64>, usize) {
    let mut seqs = Vec::new();
    let mut pages = 0;
    loop {
        let m = request(ws, &format!(r#"{{"type":"sync_request","since":{since}}}"#));
        assert_eq!(m["type"], "sync_response", "{}", m.to_string().chars().take(300).collect::<String>());
        assert_eq!(m["seq"], doc_seq, "`seq` is the document's seq on every page");
        let ops = m["ops"].as_array().expect("ops");
        assert!(!ops.is_empty() || since == doc_seq, "a page holds at least one operation");
        let bytes: usize = ops.iter().map(|o| o.to_string().len()).sum();
        assert!(ops.len() <= 1 || bytes <= max_bytes, "a page of {} operations and {bytes} bytes", ops.len());
        seqs.extend(ops.iter().map(|o| o["seq"].as_u64().unwrap()));
        pages += 1;
        if !m["more"].as_bool().expect("`more` is always there") {
            return (seqs, pages);
        }
        since = *seqs.last().unwrap();
    }
}

#[test]
fn a_long_history_comes_in_pages_that_the_client_asks_for() {
    const PAGE: usize = 64 * 1024;
    let mut c = config();
    c.limits.max_sync_bytes = PAGE;
    let relay = relay(c);
    let addr = relay.local_addr();
    let mut writer = joined(addr, "paged", "w");
    // 40 operations of ~10 KB: about 6 pages of 64 KiB.
    fill_history(&mut writer, 1, 40, 10_000);

    // join_document with since: the first page only, then nothing until asked.
    let mut reader = connect(addr, &doc_path("paged"));
    request(&mut reader, r#"{"type":"authenticate","token":"r"}"#);
    let j = request(&mut reader, r#"{"type":"join_document","since":0}"#);
    assert_eq!(j["type"], "joined_document");
    let first: Value = serde_json::from_str(&next_text(&mut reader)).unwrap();
    assert_eq!((first["type"].as_str(), first["more"].as_bool()), (Some("sync_response"), Some(true)));
    let got: Vec<u64> = first["ops"].as_array().unwrap().iter().map(|o| o["seq"].as_u64().unwrap()).collect();
    assert!(!got.is_empty() && got.len() < 40, "a first page of {} operations", got.len());
    assert_eq!(got, (1..=got.len() as u64).collect::<Vec<_>>());
    assert_pong(&mut reader); // nothing else was queued: the rest waits for the client

    let (rest, pages) = sync_all(&mut reader, *got.last().unwrap(), 40, PAGE);
    assert_eq!(rest, (got.len() as u64 + 1..=40).collect::<Vec<_>>(), "the pages join up, in order, once each");
    assert!(pages >= 4, "{pages} pages for ~400 KB in 64 KiB pages");

    // One operation larger than a page still comes, alone.
    fill_history(&mut writer, 41, 41, 100_000);
    let live: Value = serde_json::from_str(&next_text(&mut reader)).unwrap();
    assert_eq!((live["type"].as_str(), live["seq"].as_u64()), (Some("operation"), Some(41)));
    let (big, _) = sync_all(&mut reader, 40, 41, PAGE);
    assert_eq!(big, vec![41]);
    // A page with nothing after `since`.
    let (none, pages) = sync_all(&mut reader, 41, 41, PAGE);
    assert_eq!((none.len(), pages), (0, 1));
}

#[test]
fn a_snapshot_comes_in_the_first_page_and_does_not_count() {
    const PAGE: usize = 16 * 1024;
    let mut c = config();
    c.limits.max_sync_bytes = PAGE;
    c.documents.history_ops = 10;
    let relay = relay(c);
    let addr = relay.local_addr();
    let mut writer = joined(addr, "snap-paged", "w");
    fill_history(&mut writer, 1, 5, 100);
    let state = format!(r#"{{"text":"{}"}}"#, "s".repeat(40_000));
    let ack = request(&mut writer, &format!(r#"{{"type":"snapshot","seq":5,"state":{state}}}"#));
    assert_eq!(ack["type"], "ack", "{ack}");
    // 10 more: the history (10) no longer covers since = 0, the snapshot does.
    fill_history(&mut writer, 6, 15, 4_000);
    let mut reader = joined(addr, "snap-paged", "r");
    let m = request(&mut reader, r#"{"type":"sync_request","since":0}"#);
    assert_eq!(m["snapshot"]["seq"], 5, "{}", m.to_string().chars().take(300).collect::<String>());
    assert_eq!(m["snapshot"]["state"].to_string().len(), state.len(), "the whole state, beyond the page size");
    let ops = m["ops"].as_array().unwrap();
    assert!(!ops.is_empty() && ops.len() < 10, "the snapshot does not count: {} operations", ops.len());
    assert_eq!(ops[0]["seq"], 6);
    assert_eq!(m["more"], true);
    let last = ops.last().unwrap()["seq"].as_u64().unwrap();
    let (rest, _) = sync_all(&mut reader, last, 15, PAGE);
    assert_eq!(rest, (last + 1..=15).collect::<Vec<_>>());
}

#[test]
fn since_ahead_of_the_document_says_so() {
    let relay = relay(config());
    let mut ws = joined(relay.local_addr(), "ahead", "a");
    fill_history(&mut ws, 1, 2, 10);
    let e = request(&mut ws, r#"{"type":"sync_request","since":7}"#);
    assert_eq!(e["code"], "HISTORY_UNAVAILABLE", "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("ahead") && message.contains('2'), "{message}");
    let e = request(&mut ws, r#"{"type":"sync_request","since":0}"#);
    assert_eq!(e["type"], "sync_response", "{e}");
}

/// Finding: a steady reader of a large reply was closed in the middle of it
/// (the keepalive Ping behind it counted as overflow).
#[test]
fn a_steady_reader_of_a_large_page_is_pinged_and_not_cut() {
    let mut c = config();
    c.limits.max_send_buffer_bytes = 16 * 1024;
    // A page larger than the socket buffers can take at once (loopback's
    // grow to 4 MB), so that most of it stays queued in the relay.
    c.limits.max_sync_bytes = 12 << 20;
    c.limits.ping_interval_ms = 20;
    c.limits.idle_timeout_ms = 60_000;
    let relay = relay(c);
    let addr = relay.local_addr();
    let mut writer = joined(addr, "steady", "w");
    fill_history(&mut writer, 1, 10, 1_000_000); // one page of ~10 MB

    let (mut s, mut pending) = raw_upgrade(addr, &doc_path("steady"));
    s.write_all(&client_frame(true, 0x1, br#"{"type":"authenticate","token":"slow"}"#)).unwrap();
    s.write_all(&client_frame(true, 0x1, br#"{"type":"join_document","since":0}"#)).unwrap();
    // Read 64 KiB every 2 ms: ~0.3 s or more for the page, many ping intervals.
    let mut wire = std::mem::take(&mut pending);
    let mut chunk = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut frames = Vec::new();
    while Instant::now() < deadline {
        let n = s.read(&mut chunk).expect("the relay keeps the connection");
        assert!(n > 0, "the relay closed the connection; frames so far: {frames:?}");
        wire.extend_from_slice(&chunk[..n]);
        frames.extend(split_frames(&mut wire));
        if frames.iter().any(|(op, p): &(u8, Vec<u8>)| *op == 0x1 && p.starts_with(br#"{"type":"sync_response""#)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let ops: Vec<u8> = frames.iter().map(|f| f.0).collect();
    assert!(!ops.contains(&0x8), "no Close: {ops:?}");
    assert!(ops.contains(&0x9), "keepalive Pings came while the page was read: {ops:?}");
    let page = frames.iter().find(|(op, p)| *op == 0x1 && p.starts_with(br#"{"type":"sync_response""#)).unwrap();
    let v: Value = serde_json::from_slice(&page.1).unwrap();
    assert_eq!(v["ops"].as_array().unwrap().len(), 10);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw_assert_pong_skipping_pings(&mut s, &mut wire);
}

/// Complete unmasked frames at the front of `wire`, removed from it.
fn split_frames(wire: &mut Vec<u8>) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        if wire.len() < 2 {
            return out;
        }
        let (len, hl) = match wire[1] & 0x7f {
            126 if wire.len() >= 4 => (u16::from_be_bytes([wire[2], wire[3]]) as usize, 4),
            127 if wire.len() >= 10 => (u64::from_be_bytes(wire[2..10].try_into().unwrap()) as usize, 10),
            126 | 127 => return out,
            n => (n as usize, 2),
        };
        if wire.len() < hl + len {
            return out;
        }
        out.push((wire[0] & 0x0f, wire[hl..hl + len].to_vec()));
        wire.drain(..hl + len);
    }
}

/// Sends a `ping` message and reads until its `pong`, skipping Ping frames.
fn raw_assert_pong_skipping_pings(s: &mut TcpStream, pending: &mut Vec<u8>) {
    s.write_all(&client_frame(true, 0x1, br#"{"type":"ping"}"#)).unwrap();
    loop {
        let (op, payload) = read_frame(s, pending).expect("a pong");
        if op == 0x9 {
            continue;
        }
        assert_eq!((op, String::from_utf8_lossy(&payload).as_ref()), (0x1, r#"{"type":"pong"}"#));
        return;
    }
}

/// The relay's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// Finding: ten connections that joined with `since: 0` and never read took
/// the relay from 301 MB to 3.2 GB (one whole-history frame each). Now each
/// gets one page and nothing more until it asks.
#[test]
fn clients_that_ask_for_a_long_history_and_never_read_cost_one_page_each() {
    let dir = TempDir::new("hardening-sync");
    let config = dir.file("docrelay.toml", "[documents]\nhistory_ops = 100\n");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config", &config, "--listen", "127.0.0.1:0", "--cores", "0"]);
    let (mut child, addr, log) = spawn_listening(cmd, Duration::from_secs(30));
    let mut writer = joined(addr, "big", "w");
    // 60 operations of ~500 KB: a 30 MB history.
    fill_history(&mut writer, 1, 60, 500_000);
    let before = rss_bytes(child.id());

    let mut idle = Vec::new();
    for i in 0..10 {
        let mut ws = connect(addr, &doc_path("big"));
        ws.send(Message::text(format!(r#"{{"type":"authenticate","token":"idle{i}"}}"#))).unwrap();
        ws.send(Message::text(r#"{"type":"join_document","since":0}"#)).unwrap();
        ws.flush().unwrap();
        idle.push(ws); // never read
    }
    // Every one of them is joined (the writer hears ten user_joined).
    let mut joined_seen = 0;
    while joined_seen < 10 {
        let v: Value = serde_json::from_str(&next_text(&mut writer)).unwrap();
        if v["type"] == "user_joined" {
            joined_seen += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_bytes(child.id());
    let grown = after.saturating_sub(before);
    // One page (<= 1 MiB, plus one operation) each, and the buffers around it;
    // the whole history each would be 300 MB.
    assert!(grown < 40 << 20, "RSS grew by {} MB ({before} -> {after})", grown >> 20);
    drop(idle);
    drop(writer);
    let _ = child.kill();
    let _ = child.wait();
    let log = log.lock().unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

/// Finding: a 500,000-deep array was stored and relayed to every peer.
#[test]
fn values_nested_deeper_than_max_json_depth_are_refused_and_the_session_stays() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let mut a = joined(addr, "deep", "a");
    let mut b = joined(addr, "deep", "b");
    let _ = next_text(&mut a); // b's user_joined
    let nest = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
    for (what, msg) in [
        ("payload", format!(r#"{{"type":"operation","payload":{}}}"#, nest(500_000))),
        ("payload", format!(r#"{{"type":"operation","payload":{{"doc":{}}}}}"#, nest(64))),
        ("payload", format!(r#"{{"type":"cursor","payload":{}}}"#, nest(65))),
        ("state", format!(r#"{{"type":"snapshot","seq":0,"state":{}}}"#, nest(100))),
    ] {
        let e = request(&mut a, &msg);
        assert_eq!(e["code"], "BAD_MESSAGE", "{}", e.to_string().chars().take(200).collect::<String>());
        assert_eq!(e["message"], format!("field `{what}` is nested deeper than 64 levels"));
    }
    // Exactly the limit passes; brackets inside strings do not count.
    let ack = request(&mut a, &format!(r#"{{"type":"operation","payload":{}}}"#, nest(64)));
    assert_eq!((ack["type"].as_str(), ack["seq"].as_u64()), (Some("ack"), Some(1)), "{ack}");
    let text = "[".repeat(1000);
    let ack = request(&mut a, &format!(r#"{{"type":"operation","payload":{{"t":"{text}"}}}}"#));
    assert_eq!(ack["seq"], 2, "{ack}");
    // The peer got only the accepted ones.
    for seq in [1, 2] {
        let v: Value = serde_json::from_str(&next_text(&mut b)).unwrap();
        assert_eq!((v["type"].as_str(), v["seq"].as_u64()), (Some("operation"), Some(seq)));
    }
    assert_pong(&mut a);
    assert_pong(&mut b);
}

/// A client authenticated as `user` that sends `join_document` and returns
/// the reply.
fn try_join(addr: SocketAddr, doc: &str, user: &str) -> (Client, Value) {
    let mut ws = connect(addr, &doc_path(doc));
    let a = request(&mut ws, &format!(r#"{{"type":"authenticate","token":"{user}"}}"#));
    assert_eq!(a["success"], true, "{a}");
    let j = request(&mut ws, r#"{"type":"join_document"}"#);
    (ws, j)
}

fn ids(list: &Value) -> Vec<u64> {
    list.as_array().expect("a participant list").iter().map(|p| p["connection_id"].as_u64().unwrap()).collect()
}

#[test]
fn participants_are_listed_in_pages_and_a_full_document_refuses_joins() {
    let mut c = config();
    c.documents.max_participants_listed = 3;
    c.documents.max_sessions = 8;
    let relay = relay(c);
    let addr = relay.local_addr();
    let mut sessions = Vec::new();
    let mut last = Value::Null;
    for i in 0..8 {
        let (ws, j) = try_join(addr, "crowd", &format!("u{i}"));
        assert_eq!(j["type"], "joined_document", "{j}");
        assert_eq!(j["participant_count"], i + 1);
        assert_eq!(ids(&j["participants"]).len(), (i + 1).min(3) as usize, "{j}");
        last = j;
        sessions.push(ws);
    }
    // joined_document lists the first three by connection_id.
    let first = ids(&last["participants"]);
    assert!(first.windows(2).all(|w| w[0] < w[1]), "{first:?}");

    // The 9th join: DOCUMENT_FULL; the session stays open and unjoined.
    let (mut ninth, e) = try_join(addr, "crowd", "u8");
    assert_eq!(e["code"], "DOCUMENT_FULL", "{e}");
    assert!(e["message"].as_str().unwrap().contains('8'), "{e}");
    let e = request(&mut ninth, r#"{"type":"operation","payload":1}"#);
    assert_eq!(e["code"], "NOT_JOINED", "{e}");
    assert_pong(&mut ninth);

    // list_participants pages through all eight, once each, in order.
    let me = &mut sessions[7];
    let mut all = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let ask = match after {
            None => r#"{"type":"list_participants"}"#.to_string(),
            Some(a) => format!(r#"{{"type":"list_participants","after":{a}}}"#),
        };
        let mut page = request(me, &ask);
        while page["type"] == "user_joined" {
            page = serde_json::from_str(&next_text(me)).unwrap();
        }
        assert_eq!(page["type"], "participants", "{page}");
        assert_eq!(page["participant_count"], 8);
        let got = ids(&page["participants"]);
        assert!(!got.is_empty() && got.len() <= 3, "{page}");
        all.extend(got);
        match page["next_after"].as_u64() {
            Some(a) => after = Some(a),
            None => {
                assert!(page["next_after"].is_null(), "{page}");
                break;
            }
        }
    }
    assert_eq!(all.len(), 8);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    assert_eq!(&all[..3], &first[..]);
    let e = request(me, r#"{"type":"list_participants","after":"x"}"#);
    assert_eq!(e["code"], "BAD_MESSAGE", "{e}");

    // One leaves: the refused session may join now.
    drop(sessions.remove(0));
    let mut joined_now = None;
    for _ in 0..100 {
        let j = request(&mut ninth, r#"{"type":"join_document"}"#);
        if j["type"] == "joined_document" {
            joined_now = Some(j);
            break;
        }
        assert_eq!(j["code"], "DOCUMENT_FULL", "{j}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(joined_now.expect("joined once a session left")["participant_count"], 8);
}

/// Finding: N sessions that join one document and do not read cost O(N²)
/// (every `joined_document` listed every participant: 8,000 sessions took
/// 2.15 GB). Now each lists at most `documents.max_participants_listed`.
#[test]
fn a_crowded_document_costs_linear_memory() {
    const N: usize = 2500;
    let dir = TempDir::new("hardening-crowd");
    let config = dir.file("docrelay.toml", "[limits]\nmax_connections = 5000\n");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config", &config, "--listen", "127.0.0.1:0", "--cores", "0"]);
    let (mut child, addr, log) = spawn_listening(cmd, Duration::from_secs(30));
    let before = rss_bytes(child.id());
    let mut crowd = Vec::with_capacity(N);
    for i in 0..N {
        // A small receive buffer, so that what the relay queues for these
        // clients stays in the relay rather than in the kernel's buffers.
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&addr.into()).unwrap();
        let mut s: TcpStream = socket.into();
        s.write_all(upgrade_request(&doc_path("crowd")).as_bytes()).unwrap();
        s.write_all(&client_frame(true, 0x1, format!(r#"{{"type":"authenticate","token":"u{i}"}}"#).as_bytes()))
            .unwrap();
        s.write_all(&client_frame(true, 0x1, br#"{"type":"join_document"}"#)).unwrap();
        crowd.push(s); // never read
    }
    // Everyone is joined: a newcomer sees the count.
    let mut probe = None;
    for _ in 0..500 {
        let (ws, j) = try_join(addr, "crowd", "probe");
        if j["participant_count"].as_u64() == Some(N as u64 + 1) {
            probe = Some((ws, j));
            break;
        }
        drop(ws);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_probe, j) = probe.expect("all sessions joined");
    assert_eq!(ids(&j["participants"]).len(), 100);
    let grown = rss_bytes(child.id()).saturating_sub(before);
    // Listing everyone would hold N²/2 participants (~290 MB here) in replies.
    let per_session = grown / N as u64;
    assert!(per_session < 40_000, "{per_session} bytes per session ({} MB in all)", grown >> 20);
    drop(crowd);
    let _ = child.kill();
    let _ = child.wait();
    assert!(!log.lock().unwrap().contains("panicked"));
}

/// An `error` that answers an operation carries its `client_op_id`, so that a
/// client can reject the right pending send.
#[test]
fn errors_that_answer_an_operation_carry_its_client_op_id() {
    let mut c = config();
    c.limits.max_ops_per_sec = 1;
    let relay = relay(c);
    let addr = relay.local_addr();
    // Not joined yet: NOT_JOINED with the id.
    let mut ws = connect(addr, &doc_path("op-ids"));
    request(&mut ws, r#"{"type":"authenticate","token":"a"}"#);
    let e = request(&mut ws, r#"{"type":"operation","payload":1,"client_op_id":"before-join"}"#);
    assert_eq!((e["code"].as_str(), e["client_op_id"].as_str()), (Some("NOT_JOINED"), Some("before-join")), "{e}");
    request(&mut ws, r#"{"type":"join_document"}"#);
    // BAD_MESSAGE for a field of the operation: the id, byte for byte (a number stays one).
    let e = request(&mut ws, r#"{"type":"operation","client_op_id":7.50}"#);
    assert_eq!(e["code"], "BAD_MESSAGE", "{e}");
    assert!(e.to_string().contains(r#""client_op_id":7.5"#), "{e}");
    // RATE_LIMITED: the first passes, the second in the same second is dropped.
    let ack = request(&mut ws, r#"{"type":"operation","payload":1,"client_op_id":"first"}"#);
    assert_eq!((ack["type"].as_str(), ack["client_op_id"].as_str()), (Some("ack"), Some("first")), "{ack}");
    let e = request(&mut ws, r#"{"type":"operation","payload":2,"client_op_id":"second"}"#);
    assert_eq!((e["code"].as_str(), e["client_op_id"].as_str()), (Some("RATE_LIMITED"), Some("second")), "{e}");
    // Without an id, or with an invalid one, no id.
    let e = request(&mut ws, r#"{"type":"operation","payload":3}"#);
    assert_eq!(e["code"], "RATE_LIMITED");
    assert!(e.get("client_op_id").is_none(), "{e}");
    let e = request(&mut ws, r#"{"type":"operation","payload":3,"client_op_id":true}"#);
    assert_eq!(e["code"], "BAD_MESSAGE");
    assert!(e.get("client_op_id").is_none(), "{e}");
    // Other messages' errors carry none.
    let e = request(&mut ws, r#"{"type":"sync_request"}"#);
    assert!(e["code"] == "BAD_MESSAGE" && e.get("client_op_id").is_none(), "{e}");
}

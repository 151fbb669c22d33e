//! Yjs rooms on `/yjs/{document}` (`docs/yjs.md`), through raw WebSocket
//! frames and a `yrs` document on the client side: the y-websocket protocol
//! as the relay speaks it, authentication while VALIDATING, malformed input.
//! (`clients/js/browser/yjs.test.js` runs the real `y-websocket` provider.)

mod common;
use common::*;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use docrelay::config::AuthMode;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use tungstenite::Message as Ws;
use yrs::sync::protocol::MessageReader;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

/// The y-protocol messages of the next binary frame (pings skipped).
fn messages(ws: &mut Client) -> Vec<Message> {
    loop {
        match ws.read().expect("a frame") {
            Ws::Binary(b) => {
                let mut d = DecoderV1::from(&b[..]);
                return MessageReader::new(&mut d).map(|m| m.expect("a y-protocol message")).collect();
            }
            Ws::Ping(_) | Ws::Pong(_) => continue,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

fn send(ws: &mut Client, m: &Message) {
    ws.send(Ws::binary(m.encode_v1())).unwrap();
}

/// A client with its own `yrs` document: connects, gets the relay's step 1,
/// answers it with what the relay lacks and asks for what it lacks.
struct Peer {
    ws: Client,
    doc: Doc,
}

impl Peer {
    fn join(addr: std::net::SocketAddr, room: &str, token: &str) -> Peer {
        let mut ws = connect(addr, &format!("/yjs/{room}?token={token}"));
        let doc = Doc::new();
        let first = messages(&mut ws);
        let Some(Message::Sync(SyncMessage::SyncStep1(relay_sv))) = first.first() else {
            panic!("the relay starts with sync step 1: {first:?}")
        };
        let mine = doc.transact().encode_state_as_update_v1(relay_sv);
        send(&mut ws, &Message::Sync(SyncMessage::SyncStep2(mine)));
        send(&mut ws, &Message::Sync(SyncMessage::SyncStep1(doc.transact().state_vector())));
        let mut p = Peer { ws, doc };
        p.until(|m| matches!(m, Message::Sync(SyncMessage::SyncStep2(_))));
        p
    }

    /// Applies incoming messages until one for which `done` holds.
    fn until(&mut self, done: impl Fn(&Message) -> bool) -> Message {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "timed out");
            for m in messages(&mut self.ws) {
                if let Message::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u)) = &m {
                    self.doc.transact_mut().apply_update(Update::decode_v1(u).unwrap()).unwrap();
                }
                if done(&m) {
                    return m;
                }
            }
        }
    }

    fn insert(&mut self, at: u32, s: &str) {
        let before = self.doc.transact().state_vector();
        let text = self.doc.get_or_insert_text("t");
        text.insert(&mut self.doc.transact_mut(), at, s);
        let update = self.doc.transact().encode_state_as_update_v1(&before);
        send(&mut self.ws, &Message::Sync(SyncMessage::Update(update)));
    }

    fn text(&self) -> String {
        let text = self.doc.get_or_insert_text("t");
        text.get_string(&self.doc.transact())
    }
}

#[test]
fn clients_sync_through_the_relay_and_a_late_one_gets_the_state_as_a_diff() {
    let relay = relay(config());
    let mut a = Peer::join(relay.local_addr(), "r1", "ada");
    let mut b = Peer::join(relay.local_addr(), "r1", "bob");
    a.insert(0, "hello");
    b.until(|m| matches!(m, Message::Sync(SyncMessage::Update(_))));
    assert_eq!(b.text(), "hello");
    b.insert(5, " world");
    a.until(|m| matches!(m, Message::Sync(SyncMessage::Update(_))));
    assert_eq!(a.text(), "hello world");
    // A late client: the relay's answer to its (empty) state vector is the
    // whole document; to a full one, nothing new.
    let mut c = Peer::join(relay.local_addr(), "r1", "cy");
    assert_eq!(c.text(), "hello world");
    send(&mut c.ws, &Message::Sync(SyncMessage::SyncStep1(c.doc.transact().state_vector())));
    let Message::Sync(SyncMessage::SyncStep2(diff)) =
        c.until(|m| matches!(m, Message::Sync(SyncMessage::SyncStep2(_))))
    else {
        unreachable!()
    };
    let empty = Doc::new().transact().encode_state_as_update_v1(&StateVector::default());
    assert_eq!(diff, empty, "a client that has everything is sent an empty diff");
    // Rooms are separate.
    let other = Peer::join(relay.local_addr(), "r2", "dee");
    assert_eq!(other.text(), "");
}

#[test]
fn malformed_input_is_refused_and_the_room_goes_on() {
    let relay = relay(config());
    let mut a = Peer::join(relay.local_addr(), "bad", "ada");
    let mut m = Peer::join(relay.local_addr(), "bad", "mallory");
    // An update that is not one: refused with the auth message (permission
    // denied and why), and never passed on.
    m.ws.send(Ws::binary(vec![0, 2, 4, 0xff, 0xfe, 0xfd, 0xfc])).unwrap();
    let denied = m.until(|m| matches!(m, Message::Auth(_)));
    assert!(matches!(&denied, Message::Auth(Some(why)) if why.contains("update")), "{denied:?}");
    // A frame that is not a y-protocol message at all.
    m.ws.send(Ws::binary(vec![0, 9])).unwrap();
    m.until(|m| matches!(m, Message::Auth(Some(_))));
    m.insert(0, "ok");
    a.until(|m| matches!(m, Message::Sync(SyncMessage::Update(_))));
    assert_eq!(a.text(), "ok", "only the valid update reached a");
    // A Text frame: the protocol is binary; closed with 1003.
    m.ws.send(Ws::text("{}")).unwrap();
    assert_eq!(expect_close(&mut m.ws).0, 1003);
    a.insert(2, "!");
    let mut late = Peer::join(relay.local_addr(), "bad", "late");
    assert_eq!(late.text(), "ok!");
    late.ws.close(None).unwrap();
}

#[test]
fn the_token_is_checked_while_validating() {
    // dev mode: no token, or an empty one, is 4001.
    let relay_dev = relay(config());
    for path in ["/yjs/r", "/yjs/r?token="] {
        let mut ws = connect(relay_dev.local_addr(), path);
        assert_eq!(expect_close(&mut ws).0, 4001, "{path}");
    }
    // jwt mode: a token for other documents is 4003; a bad one 4001; a good
    // one joins.
    let mut c = config();
    c.auth.mode = AuthMode::Jwt;
    c.auth.jwt_secret = SECRET.into();
    let relay_jwt = relay(c);
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    let token = |docs: serde_json::Value| {
        encode(
            &Header::default(),
            &json!({"sub": "ada", "exp": exp, "docs": docs}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let mut ws = connect(relay_jwt.local_addr(), &format!("/yjs/r?token={}", token(json!(["other"]))));
    assert_eq!(expect_close(&mut ws).0, 4003);
    let mut ws = connect(relay_jwt.local_addr(), "/yjs/r?token=not.a.jwt");
    assert_eq!(expect_close(&mut ws).0, 4001);
    let ok = Peer::join(relay_jwt.local_addr(), "r", &token(json!(["r"])));
    assert_eq!(ok.text(), "");
}

#[test]
fn a_read_only_token_receives_but_cannot_change_the_document() {
    let mut c = config();
    c.auth.mode = AuthMode::Jwt;
    c.auth.jwt_secret = SECRET.into();
    let relay = relay(c);
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    let token = |sub: &str, mode: Option<&str>| {
        let mut claims = json!({"sub": sub, "exp": exp});
        if let Some(m) = mode {
            claims["mode"] = json!(m);
        }
        encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    };
    let mut writer = Peer::join(relay.local_addr(), "ro", &token("ada", None));
    writer.insert(0, "by ada");
    let mut reader = Peer::join(relay.local_addr(), "ro", &token("rita", Some("read")));
    assert_eq!(reader.text(), "by ada", "a read-only client receives the document");
    // Its change is dropped with a reason, and reaches nobody.
    reader.insert(0, "rita was here: ");
    let denied = reader.until(|m| matches!(m, Message::Auth(_)));
    assert!(matches!(&denied, Message::Auth(Some(why)) if why.contains("read-only")), "{denied:?}");
    writer.insert(6, "!");
    reader.until(|m| matches!(m, Message::Sync(SyncMessage::Update(_))));
    let late = Peer::join(relay.local_addr(), "ro", &token("bob", None));
    assert_eq!(late.text(), "by ada!", "the read-only change is nowhere");
}

#[test]
fn a_room_grows_only_to_max_room_bytes() {
    let mut c = config();
    c.documents.max_room_bytes = 4096;
    let relay = relay(c);
    let mut a = Peer::join(relay.local_addr(), "big", "ada");
    let mut b = Peer::join(relay.local_addr(), "big", "bob");
    a.insert(0, &"x".repeat(1000));
    b.until(|m| matches!(m, Message::Sync(SyncMessage::Update(_))));
    // 5000 more characters would pass 4096 bytes: refused, and said why.
    a.insert(0, &"y".repeat(5000));
    let refused = a.until(|m| matches!(m, Message::Auth(_)));
    assert!(matches!(&refused, Message::Auth(Some(why)) if why.contains("too large")), "{refused:?}");
    // A small one still fits; the large one reached nobody.
    b.insert(0, "z");
    a.until(|m| matches!(m, Message::Sync(SyncMessage::Update(_))));
    let late = Peer::join(relay.local_addr(), "big", "cy");
    assert_eq!(late.text(), format!("z{}", "x".repeat(1000)));
}

// ---------------------------------------------------------------------------
// Persistence: the relay as a process, on a storage directory, killed and
// started again.

/// A `docrelay serve` child process; killed when dropped.
struct Proc {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Proc {
    fn serve(config: &str, cores: &str) -> Proc {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_docrelay"));
        cmd.args(["serve", "--config", config, "--listen", "127.0.0.1:0", "--cores", cores]);
        cmd.env("RUST_LOG", "info,docrelay::session=debug");
        let (child, addr, log) = spawn_listening(cmd, Duration::from_secs(30));
        Proc { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// kill -9; it must have been running until then.
    fn kill(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "the relay had died already:\n{}", self.log());
        assert!(!self.log().contains("panicked"), "the relay panicked:\n{}", self.log());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn durable(tmp: &TempDir, documents: &str) -> (String, std::path::PathBuf) {
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\ncores = [0]\n\n[documents]\n{documents}\n\n[storage]\ndir = \"{}\"\nsegment_bytes = 65536\n",
        data.display()
    );
    (tmp.file("relay.toml", &text), data)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

impl Peer {
    /// Applies incoming messages until `n` updates have arrived.
    fn updates(&mut self, n: usize) {
        for _ in 0..n {
            self.until(|m| matches!(m, Message::Sync(SyncMessage::Update(_))));
        }
    }
}

#[test]
fn a_room_survives_kill_9_merged_into_one_state_and_on_another_core_count() {
    let tmp = TempDir::new("yjs-durable");
    let (config, data) = durable(&tmp, "yjs_compact_after = 10");
    let mut relay = Proc::serve(&config, "0");
    let mut a = Peer::join(relay.addr, "novel", "ada");
    let mut b = Peer::join(relay.addr, "novel", "bob");
    // 500 updates, each its own record (its own 4 KiB write): 2 MB of log
    // unless the room's updates are merged and their segments reclaimed.
    let line = "x".repeat(99);
    for i in 0..500 {
        a.insert(i * 100, &format!("{line}\n"));
    }
    // An update is passed on once stored: b has them all, so the log has.
    b.updates(500);
    assert_eq!(b.text(), a.text());
    assert_eq!(b.text().len(), 50_000);
    // Compaction runs while the core writes (docs/storage.md, section 8). On
    // a busy disk one group commit can take hundreds of the updates, and the
    // segment that holds it is the one being written, reclaimed only after
    // the next writes: after 2 s, one more character every 100 ms.
    let mut nudges = 0;
    let reclaimed = (0..300).any(|i| {
        std::thread::sleep(Duration::from_millis(100));
        if i >= 20 && dir_bytes(&data) >= 400_000 {
            a.insert(0, ".");
            nudges += 1;
        }
        dir_bytes(&data) < 400_000
    });
    assert!(reclaimed, "the log holds {} bytes: the room's updates were not merged and reclaimed", dir_bytes(&data));
    assert!(relay.log().contains("yjs: room state merged"), "{}", relay.log());

    relay.kill();
    let mut relay = Proc::serve(&config, "0");
    let mut c = Peer::join(relay.addr, "novel", "cy");
    assert_eq!(c.text(), a.text(), "a new client after kill -9 gets the whole document");
    assert!(relay.log().contains("yjs: room loaded"), "{}", relay.log());
    // The room goes on where it was: its updates are stored after the
    // others, and survive another kill -9, on two cores this time (the room
    // moves to the core its key hashes to).
    c.insert(0, "title\n");
    let mut d = Peer::join(relay.addr, "novel", "dee");
    if d.text() != c.text() {
        d.updates(1);
    }
    assert_eq!(d.text(), c.text());
    relay.kill();
    let relay = Proc::serve(&config, "0,1");
    let e = Peer::join(relay.addr, "novel", "eve");
    assert!(e.text().starts_with("title\n") && e.text().len() == 50_006 + nudges, "{:?}", &e.text()[..20]);
    // And the same id on /ws/documents/ is another document.
    let mut ws = connect(relay.addr, "/ws/documents/novel");
    let authed = request(&mut ws, r#"{"type":"authenticate","token":"t"}"#);
    assert_eq!(authed["type"], "auth_result", "{authed}");
    let joined = request(&mut ws, r#"{"type":"join_document"}"#);
    assert_eq!((&joined["type"], &joined["seq"]), (&json!("joined_document"), &json!(0)), "{joined}");
}

#[test]
fn an_idle_room_is_freed_and_loaded_again_from_the_log() {
    let tmp = TempDir::new("yjs-idle");
    let (config, _) = durable(&tmp, "idle_unload_ms = 100");
    let relay = Proc::serve(&config, "0");
    let mut a = Peer::join(relay.addr, "notes", "ada");
    a.insert(0, "kept");
    let mut b = Peer::join(relay.addr, "notes", "bob");
    if b.text().is_empty() {
        b.updates(1);
    }
    assert_eq!(b.text(), "kept");
    drop(a);
    drop(b);
    let freed = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        relay.log().contains("yjs: idle room freed")
    });
    assert!(freed, "the idle room was not freed:\n{}", relay.log());
    let c = Peer::join(relay.addr, "notes", "cy");
    assert_eq!(c.text(), "kept");
    assert!(relay.log().contains("yjs: room loaded"), "{}", relay.log());
}

// ---------------------------------------------------------------------------
// Cluster mode: relays on one real Redis serve one room.

/// A node on `redis_url`, pinned to one of this process's CPUs (round
/// robin, so that two nodes do not share one), merging a room's state every
/// 10 updates.
fn node(tmp: &TempDir, name: &str, nth: usize, redis_url: &str) -> Proc {
    let cpus = docrelay::Cores::All.resolve().expect("the CPU affinity of the test process");
    let cpu = cpus[nth % cpus.len()].to_string();
    let text = format!(
        "listen = \"127.0.0.1:0\"\n\n[cluster]\nredis_url = \"{redis_url}\"\nnode_id = \"{name}\"\n\n\
         [documents]\nyjs_compact_after = 10\n"
    );
    Proc::serve(&tmp.file(&format!("{name}.toml"), &text), &cpu)
}

fn awareness(ws: &mut Client, client: u64, json: &str, clock: u32) {
    use yrs::sync::awareness::AwarenessUpdateEntry;
    let clients = [(client, AwarenessUpdateEntry { clock, json: json.into() })].into_iter().collect();
    send(ws, &Message::Awareness(yrs::sync::AwarenessUpdate { clients }));
}

#[test]
fn relays_on_one_redis_serve_one_room() {
    let redis = common::redis::Redis::start();
    let tmp = TempDir::new("yjs-cluster");
    let (mut node_a, mut node_b) = (node(&tmp, "a", 0, &redis.url()), node(&tmp, "b", 1, &redis.url()));
    let mut a = Peer::join(node_a.addr, "shared", "ada");
    let mut b = Peer::join(node_b.addr, "shared", "bob");
    // Concurrent edits on two nodes converge.
    for _ in 0..30 {
        a.insert(0, "a");
        b.insert(0, "b");
    }
    a.updates(30);
    b.updates(30);
    assert_eq!(a.text(), b.text(), "converged");
    assert_eq!(a.text().matches('a').count(), 30);
    assert_eq!(a.text().len(), 60);
    // Awareness crosses nodes, and its removal when the connection ends.
    awareness(&mut a.ws, 4242, r#"{"user":{"name":"Ada"}}"#, 1);
    let seen = b.until(|m| matches!(m, Message::Awareness(u) if u.clients.contains_key(&4242)));
    let Message::Awareness(u) = seen else { unreachable!() };
    assert!(u.clients[&4242].json.contains("Ada"));
    // A late client on either node gets the document and Ada's cursor.
    let late = connect(node_b.addr, "/yjs/shared?token=cy");
    let mut c = Peer { ws: late, doc: Doc::new() };
    send(&mut c.ws, &Message::Sync(SyncMessage::SyncStep1(c.doc.transact().state_vector())));
    c.until(|m| matches!(m, Message::Awareness(u) if u.clients.contains_key(&4242)));
    c.until(|m| matches!(m, Message::Sync(SyncMessage::SyncStep2(_))));
    assert_eq!(c.text(), a.text());
    drop(a);
    let gone =
        b.until(|m| matches!(m, Message::Awareness(u) if u.clients.get(&4242).is_some_and(|e| &*e.json == "null")));
    assert!(matches!(gone, Message::Awareness(_)));
    // Merged states are stored in Redis, and the stream is trimmed behind them.
    let key = "docrelay:{yjs/shared}";
    let merged: u64 =
        redis.command(&["HGET", &format!("{key}:snap"), "seq"]).text().unwrap_or_default().parse().unwrap_or(0);
    assert!(merged >= 50, "merged state at seq {merged}");
    let xlen: u64 = redis.command(&["XLEN", &format!("{key}:ops")]).text().unwrap().parse().unwrap();
    assert!(xlen <= 60 - merged, "{xlen} updates in the stream behind a merged state at {merged}");
    // Both nodes killed: a new one loads the room from Redis.
    b.insert(0, "!");
    c.updates(1);
    node_a.kill();
    node_b.kill();
    let node_c = node(&tmp, "c", 0, &redis.url());
    let d = Peer::join(node_c.addr, "shared", "dee");
    assert_eq!(d.text(), b.text(), "a node started later has the whole room");
    assert!(d.text().starts_with('!') && d.text().len() == 61);
    // And the same id on /ws/documents/ is another document there.
    assert_eq!(redis.command(&["EXISTS", "docrelay:{shared}:meta"]).text().as_deref(), Some("0"));
    // Redis loses everything: the node gives the new history its state,
    // and closes its clients (1001) so that they reconnect and sync again.
    let mut d = d;
    redis.command(&["FLUSHALL"]);
    set_timeout(&d.ws, Duration::from_secs(15));
    let (code, reason) = loop {
        match d.ws.read() {
            Ok(Ws::Close(Some(f))) => break (u16::from(f.code), f.reason.to_string()),
            Ok(_) => continue,
            Err(e) => panic!("no close after FLUSHALL: {e}"),
        }
    };
    assert_eq!(code, 1001, "{reason}");
    let e = Peer::join(node_c.addr, "shared", "eve");
    assert_eq!(e.text(), b.text(), "the room's state went into its new history");
    assert!(node_c.log().contains("history in Redis started again"), "{}", node_c.log());
}

// ---------------------------------------------------------------------------
// A client that falls behind the ring

#[test]
fn a_client_that_falls_behind_is_resynced_with_a_diff_not_the_whole_document() {
    let mut c = config();
    c.documents.ring_capacity = 8;
    let relay = relay(c);
    let addr = relay.local_addr();
    let mut w = Peer::join(addr, "lag", "writer");
    // A large start, which the slow client gets when it joins.
    w.insert(0, &"b".repeat(300_000));
    let mut slow = {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&addr.into()).unwrap();
        let stream: std::net::TcpStream = sock.into();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let url = format!("ws://{addr}/yjs/lag?token=slow");
        let (ws, _) = tungstenite::client(url, tungstenite::stream::MaybeTlsStream::Plain(stream)).unwrap();
        let mut p = Peer { ws, doc: Doc::new() };
        send(&mut p.ws, &Message::Sync(SyncMessage::SyncStep1(p.doc.transact().state_vector())));
        p.until(|m| matches!(m, Message::Sync(SyncMessage::SyncStep2(u)) if u.len() > 300_000));
        p
    };
    assert_eq!(slow.text().len(), 300_000);
    // The slow client stops reading while more than its socket buffers, the
    // relay's and the ring can hold is written.
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<usize>().ok())
        .unwrap_or(4 << 20);
    let n = (wmem_max + (2 << 20)) / 4096 + 16;
    let chunk = "x".repeat(4095) + "\n";
    for _ in 0..n {
        w.insert(0, &chunk);
    }
    let total = w.text().len();
    // The slow client reads again: a resync (sync step 2) instead of the
    // updates it missed, without the 300 KB it had.
    let mut resyncs = Vec::new();
    while slow.text().len() < total {
        if let Message::Sync(SyncMessage::SyncStep2(u)) = slow.until(|m| matches!(m, Message::Sync(_))) {
            resyncs.push(u.len());
        }
    }
    assert!(!resyncs.is_empty(), "the slow client was never resynced: the test did not make it fall behind");
    assert!(resyncs.iter().all(|&len| len < total - 250_000), "resyncs of {resyncs:?} bytes, the document is {total}");
    assert_eq!(slow.text(), w.text());
    assert!(metric_sum(addr, "docrelay_lagged_total", 1) >= 1);
}

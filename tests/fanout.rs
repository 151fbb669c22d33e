//! Fan-out end to end (`docs/protocol.md`, "Ordering, lag and recovery",
//! "Relay messages" and "Documents and cores"): one order for every receiver
//! under concurrent senders, lag and recovery of a slow reader, overtaken
//! presence, the delivery gate, documents on different cores, idle unload,
//! the fan-out metrics, and many documents at once.

mod common;
use common::*;

use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use docrelay::Config;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::Message;

/// One message from the relay.
#[derive(Debug)]
struct Msg {
    /// A Binary frame (broadcast) rather than a Text frame (direct reply).
    binary: bool,
    v: Value,
    /// The `payload` field exactly as it was on the wire.
    raw_payload: Option<String>,
}

#[derive(Deserialize)]
struct RawFields<'a> {
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

impl Msg {
    fn kind(&self) -> &str {
        self.v["type"].as_str().unwrap_or_else(|| panic!("no string type in {}", self.v))
    }

    fn u64(&self, field: &str) -> u64 {
        self.v[field].as_u64().unwrap_or_else(|| panic!("no u64 `{field}` in {}", self.v))
    }

    fn seq(&self) -> u64 {
        self.u64("seq")
    }

    /// An operation broadcast as (seq, connection_id, user_id, raw payload).
    fn op(&self) -> Op {
        assert_eq!(self.kind(), "operation", "{}", self.v);
        assert!(self.binary, "broadcasts are Binary frames: {}", self.v);
        Op {
            seq: self.seq(),
            connection_id: self.u64("connection_id"),
            user_id: self.v["user_id"].as_str().expect("user_id").to_string(),
            payload: self.raw_payload.clone().expect("operation has a payload"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Op {
    seq: u64,
    connection_id: u64,
    user_id: String,
    payload: String,
}

/// Reads the next data message; Ping/Pong frames are skipped, a Close fails.
fn recv(ws: &mut Client, who: &str) -> Msg {
    loop {
        let (binary, text) = match ws.read() {
            Ok(Message::Text(t)) => (false, t.to_string()),
            Ok(Message::Binary(b)) => (true, String::from_utf8(b.to_vec()).expect("broadcast is UTF-8")),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(f)) => panic!("{who}: the relay closed the session: {f:?}"),
            Ok(other) => panic!("{who}: unexpected {other:?}"),
            Err(e) => panic!("{who}: read failed: {e}"),
        };
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{who}: not JSON ({e}): {text}"));
        let raw: RawFields<'_> = serde_json::from_str(&text).unwrap();
        return Msg { binary, v, raw_payload: raw.payload.map(|p| p.get().to_string()) };
    }
}

/// Sends a text message and returns the next message.
fn call(ws: &mut Client, json: &str, who: &str) -> Msg {
    ws.send(Message::text(json)).unwrap_or_else(|e| panic!("{who}: send failed: {e}"));
    recv(ws, who)
}

/// Sends `ping` and reads until its `pong`, returning what came before it.
fn until_pong(ws: &mut Client, who: &str) -> Vec<Msg> {
    ws.send(Message::text(r#"{"type":"ping"}"#)).unwrap();
    let mut before = Vec::new();
    loop {
        let m = recv(ws, who);
        if m.kind() == "pong" {
            assert!(!m.binary, "{who}: pong is a direct reply (Text)");
            return before;
        }
        before.push(m);
    }
}

/// Asserts that nothing is on its way to `ws`: its ping is answered with
/// nothing (presence included) before the pong.
fn assert_nothing_pending(ws: &mut Client, who: &str) {
    let before = until_pong(ws, who);
    assert!(before.is_empty(), "{who}: expected nothing before the pong, got {:?}", kinds(&before));
}

/// Asserts that nothing but presence (joins and leaves of the others, whose
/// place among the operations is not fixed) is on its way to `ws`.
fn assert_only_presence_pending(ws: &mut Client, who: &str) {
    let before = until_pong(ws, who);
    assert!(
        before.iter().all(|m| m.binary && matches!(m.kind(), "user_joined" | "user_left")),
        "{who}: expected only presence before the pong, got {:?}",
        kinds(&before)
    );
}

fn kinds(msgs: &[Msg]) -> Vec<String> {
    msgs.iter().map(|m| m.v.to_string().chars().take(120).collect()).collect()
}

/// Authenticates `ws` as `token`; returns its connection id.
fn authenticate(ws: &mut Client, token: &str) -> u64 {
    let m = call(ws, &format!(r#"{{"type":"authenticate","token":"{token}"}}"#), token);
    assert_eq!((m.kind(), m.v["success"].as_bool()), ("auth_result", Some(true)), "{token}: {}", m.v);
    assert!(!m.binary);
    m.u64("connection_id")
}

/// Joins the connection's document; returns the `joined_document` reply.
fn join(ws: &mut Client, who: &str) -> Value {
    let m = call(ws, r#"{"type":"join_document"}"#, who);
    assert_eq!(m.kind(), "joined_document", "{who}: {}", m.v);
    assert!(!m.binary);
    m.v
}

fn doc_path(doc: &str) -> String {
    format!("/ws/documents/{doc}")
}

/// A client that authenticated but did not join.
fn authed(addr: SocketAddr, doc: &str, token: &str) -> (Client, u64) {
    let mut ws = connect(addr, &doc_path(doc));
    let id = authenticate(&mut ws, token);
    (ws, id)
}

/// A client that authenticated and joined `doc`.
fn session(addr: SocketAddr, doc: &str, token: &str) -> (Client, u64) {
    let (mut ws, id) = authed(addr, doc, token);
    join(&mut ws, token);
    (ws, id)
}

/// A joined client whose socket has a small receive buffer, so that a relay
/// writing to it while it does not read fills the kernel buffers soon.
fn slow_session(addr: SocketAddr, doc: &str, token: &str) -> (Client, u64) {
    session_with_rcvbuf(addr, doc, token, 4096)
}

/// A joined client whose socket receive buffer is `rcvbuf` bytes (the kernel
/// doubles it and stops tuning it).
fn session_with_rcvbuf(addr: SocketAddr, doc: &str, token: &str, rcvbuf: usize) -> (Client, u64) {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(rcvbuf).unwrap();
    sock.connect(&addr.into()).unwrap();
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let url = format!("ws://{addr}{}", doc_path(doc));
    let (mut ws, resp) =
        tungstenite::client(url, MaybeTlsStream::Plain(stream)).unwrap_or_else(|e| panic!("handshake: {e}"));
    assert_eq!(resp.status(), 101);
    let id = authenticate(&mut ws, token);
    join(&mut ws, token);
    (ws, id)
}

/// Reads `n` `user_joined` broadcasts (the joins of later clients).
fn expect_user_joined(ws: &mut Client, n: usize, who: &str) -> Vec<u64> {
    (0..n)
        .map(|_| {
            let m = recv(ws, who);
            assert_eq!(m.kind(), "user_joined", "{who}: {}", m.v);
            assert!(m.binary);
            m.u64("connection_id")
        })
        .collect()
}

/// An operation message whose payload has odd spacing (relayed byte for byte).
fn op_message(payload: &str, client_op_id: &str) -> String {
    format!(r#"{{"type":"operation","payload":{payload},"client_op_id":"{client_op_id}"}}"#)
}

/// Payload of the `n`th padded operation.
fn padded(n: u64, pad: &str) -> String {
    format!(r#"{{ "n" : {n}, "pad":"{pad}"}}"#)
}

/// Sends `count` padded operations in pipelined batches of `batch`, reading
/// the acks of each batch before the next; returns the acked seqs in arrival
/// order. Only presence may arrive besides the acks. `between` runs after
/// every batch.
fn send_padded_ops(ws: &mut Client, count: u64, batch: u64, pad: &str, mut between: impl FnMut(u64)) -> Vec<u64> {
    let mut acks = Vec::with_capacity(count as usize);
    let mut sent = 0;
    while sent < count {
        for _ in 0..batch.min(count - sent) {
            ws.write(Message::text(op_message(&padded(sent, pad), &format!("p{sent}")))).unwrap();
            sent += 1;
        }
        ws.flush().unwrap();
        while (acks.len() as u64) < sent {
            let m = recv(ws, "sender");
            match m.kind() {
                "ack" => {
                    assert!(!m.binary, "ack is a direct reply: {}", m.v);
                    let n = acks.len();
                    assert_eq!(m.v["client_op_id"], format!("p{n}"), "acks come in the order sent");
                    acks.push(m.seq());
                }
                "user_joined" | "user_left" => {}
                _ => panic!("sender: unexpected {}", m.v),
            }
        }
        between(sent);
    }
    acks
}

/// The `n` in a padded payload.
fn payload_n(payload: &str) -> u64 {
    let v: Value = serde_json::from_str(payload).unwrap();
    v["n"].as_u64().unwrap_or_else(|| panic!("no n in {payload}"))
}

/// Reads `count` operations on a reader that must keep up: no `lagged`.
/// Returns the client too, so that it stays joined.
fn spawn_keeping_up(mut ws: Client, count: u64, who: &'static str) -> thread::JoinHandle<(Client, Vec<Op>)> {
    thread::spawn(move || {
        let mut ops = Vec::with_capacity(count as usize);
        while (ops.len() as u64) < count {
            let m = recv(&mut ws, who);
            match m.kind() {
                "operation" => ops.push(m.op()),
                "user_joined" | "user_left" | "cursor" => assert!(m.binary, "{who}: {}", m.v),
                _ => panic!("{who}: unexpected {}", m.v),
            }
        }
        assert_only_presence_pending(&mut ws, who);
        (ws, ops)
    })
}

fn seqs(ops: &[Op]) -> Vec<u64> {
    ops.iter().map(|o| o.seq).collect()
}

/// What a writer of the ordering test saw: its acks (seq, client_op_id) and
/// the other writer's operations.
type WriterView = (Client, Vec<(u64, String)>, Vec<Op>);

/// Two senders sending concurrently (some pipelined), four receivers: one
/// gap-free order, identical for every receiver; each sender gets the other's
/// operations in that order and its own acks in increasing seq.
#[test]
fn concurrent_senders_produce_one_order_for_everyone() {
    const PER_SENDER: u64 = 300;
    const TOTAL: u64 = 2 * PER_SENDER;
    let relay = relay(config());
    let addr = relay.local_addr();
    let doc = "fanout-order";

    let receivers: Vec<Client> = (0..4).map(|i| session(addr, doc, &format!("reader{i}")).0).collect();
    let senders: Vec<(Client, u64)> = (0..2).map(|i| session(addr, doc, &format!("writer{i}"))).collect();
    let sender_ids: Vec<u64> = senders.iter().map(|s| s.1).collect();

    let readers: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            thread::spawn(move || {
                let who = format!("reader{i}");
                let mut ops = Vec::new();
                while (ops.len() as u64) < TOTAL {
                    let m = recv(&mut ws, &who);
                    match m.kind() {
                        "operation" => ops.push(m.op()),
                        "user_joined" => assert!(m.binary),
                        _ => panic!("{who}: unexpected {}", m.v),
                    }
                }
                // Exactly once: nothing else is on its way.
                assert_only_presence_pending(&mut ws, &who);
                (ws, ops)
            })
        })
        .collect();

    let start_line = Arc::new(Barrier::new(2));
    let writers: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, (mut ws, _))| {
            let start_line = start_line.clone();
            thread::spawn(move || {
                let who = format!("writer{i}");
                start_line.wait();
                let mut acks: Vec<(u64, String)> = Vec::new();
                let mut others: Vec<Op> = Vec::new();
                let handle = |m: Msg, acks: &mut Vec<(u64, String)>, others: &mut Vec<Op>| match m.kind() {
                    "ack" => {
                        assert!(!m.binary, "{who}: ack is a direct reply");
                        acks.push((m.seq(), m.v["client_op_id"].as_str().expect("client_op_id").to_string()));
                    }
                    "operation" => others.push(m.op()),
                    "user_joined" => {}
                    _ => panic!("{who}: unexpected {}", m.v),
                };
                // Bursts of various sizes sent without waiting for their acks.
                let bursts = [1u64, 17, 2, 40, 5, 64, 3, 1, 25];
                let mut sent = 0;
                for k in 0.. {
                    if sent == PER_SENDER {
                        break;
                    }
                    let burst = bursts[k % bursts.len()].min(PER_SENDER - sent);
                    for _ in 0..burst {
                        let payload = format!(r#"{{ "w":{i}, "n" : {sent} }}"#);
                        ws.write(Message::text(op_message(&payload, &format!("w{i}-{sent}")))).unwrap();
                        sent += 1;
                    }
                    ws.flush().unwrap();
                    while (acks.len() as u64) < sent {
                        handle(recv(&mut ws, &who), &mut acks, &mut others);
                    }
                }
                while (others.len() as u64) < PER_SENDER {
                    handle(recv(&mut ws, &who), &mut acks, &mut others);
                }
                assert_eq!(acks.len() as u64, PER_SENDER, "{who}: one ack per operation");
                assert_only_presence_pending(&mut ws, &who);
                (ws, acks, others)
            })
        })
        .collect();

    // The clients come back from their threads: none leaves while others read.
    let sent: Vec<WriterView> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    let seen: Vec<(Client, Vec<Op>)> = readers.into_iter().map(|t| t.join().unwrap()).collect();
    let seen: Vec<&Vec<Op>> = seen.iter().map(|r| &r.1).collect();

    let reference = &seen[0];
    assert_eq!(seqs(reference), (1..=TOTAL).collect::<Vec<_>>(), "seq 1..={TOTAL}, in order, no gap");
    for (i, ops) in seen.iter().enumerate().skip(1) {
        assert_eq!(seqs(ops), seqs(reference), "reader{i} sees the same seqs");
        assert!(ops == reference, "reader{i} sees the same (seq, connection, payload) sequence as reader0");
    }
    for (i, (_, acks, others)) in sent.iter().enumerate() {
        let ack_seqs: Vec<u64> = acks.iter().map(|a| a.0).collect();
        assert!(ack_seqs.windows(2).all(|w| w[0] < w[1]), "writer{i}: acks in increasing seq: {ack_seqs:?}");
        for (n, (seq, client_op_id)) in acks.iter().enumerate() {
            assert_eq!(client_op_id, &format!("w{i}-{n}"), "writer{i}: acks in the order sent");
            let op = &reference[*seq as usize - 1];
            assert_eq!(op.connection_id, sender_ids[i], "seq {seq} was acked to writer{i}");
            assert_eq!(op.user_id, format!("writer{i}"));
            assert_eq!(op.payload, format!(r#"{{ "w":{i}, "n" : {n} }}"#), "payload relayed byte for byte");
        }
        let expected: Vec<Op> = reference.iter().filter(|o| o.connection_id != sender_ids[i]).cloned().collect();
        assert_eq!(expected.len() as u64, PER_SENDER);
        assert!(others == &expected, "writer{i} receives exactly the other writer's operations, in seq order");
    }
}

/// A document with a small ring, a slow reader that has stopped reading, a
/// reader that keeps up, and a sender.
struct LagSetup {
    relay: Relay,
    slow: Client,
    fast: Client,
    sender: Client,
    sender_id: u64,
}

const LAG_RING: usize = 16;
/// Operations the sender has in flight at most: half the ring, so that a
/// reader with room in its socket buffers is never overtaken.
const LAG_BATCH: u64 = 8;
/// Padding of the operations (and cursor updates) that make a reader fall behind.
const LAG_PAD: usize = 2048;

/// How many padded messages overflow everything that can hold a stalled
/// reader's data outside the ring: the relay's socket send buffer (at most
/// the maximum of `tcp_wmem`), the reader's small receive buffer and the
/// relay's 64 KiB refill, with 1 MiB to spare.
fn lag_volume() -> u64 {
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok())
        .unwrap_or(4 << 20);
    ((wmem_max + (1 << 20)) / LAG_PAD as u64).max(1000)
}

/// The fast reader's socket buffer holds every operation of a lag test, so
/// the relay never waits to write to it, however busy the test machine is.
const FAST_RCVBUF: usize = 4 << 20;

fn lag_setup(doc: &str, adjust: impl FnOnce(&mut Config)) -> LagSetup {
    let mut c = config();
    c.documents.ring_capacity = LAG_RING;
    c.documents.history_ops = 100_000;
    adjust(&mut c);
    let relay = relay(c);
    let addr = relay.local_addr();
    let (mut slow, _) = slow_session(addr, doc, "slow");
    let (fast, _) = session_with_rcvbuf(addr, doc, "fast", FAST_RCVBUF);
    let (sender, sender_id) = session(addr, doc, "sender");
    // The slow reader takes the presence of the two later joiners, then stops.
    expect_user_joined(&mut slow, 2, "slow");
    LagSetup { relay, slow, fast, sender, sender_id }
}

/// What a reader that resumed after a stall saw, up to operation `last`.
#[derive(Debug, Default)]
struct Resumed {
    before: Vec<Op>,
    lagged: Vec<(u64, u64)>,
    /// Messages between the `lagged` notice and the next operation.
    between: usize,
    after: Vec<Op>,
    pongs: usize,
}

fn read_through_lag(ws: &mut Client, last: u64, pongs: usize, who: &str) -> Resumed {
    let mut r = Resumed::default();
    let mut just_lagged = false;
    while r.after.last().or(r.before.last()).is_none_or(|o| o.seq < last) || r.pongs < pongs {
        let m = recv(ws, who);
        match m.kind() {
            "operation" => {
                let op = m.op();
                if r.lagged.is_empty() {
                    r.before.push(op);
                } else {
                    r.after.push(op);
                }
                just_lagged = false;
            }
            "lagged" => {
                assert!(!m.binary, "{who}: lagged is a direct reply (Text): {}", m.v);
                r.lagged.push((m.u64("missed_from"), m.u64("missed_to")));
                just_lagged = true;
            }
            "pong" => {
                r.pongs += 1;
                if just_lagged {
                    r.between += 1;
                }
            }
            _ => panic!("{who}: unexpected {}", m.v),
        }
    }
    r
}

/// Checks the shape `ops 1..a, lagged {a+1, b}, ops b+1..=last` (one lag).
fn assert_one_announced_gap(r: &Resumed, last: u64, who: &str) -> (u64, u64) {
    assert_eq!(
        r.lagged.len(),
        1,
        "{who}: exactly one lagged notice (got {:?}; {} ops before, {} after)",
        r.lagged,
        r.before.len(),
        r.after.len()
    );
    let (from, to) = r.lagged[0];
    let before = seqs(&r.before);
    assert_eq!(before, (1..=before.len() as u64).collect::<Vec<_>>(), "{who}: in order, no gap before the lag");
    assert_eq!(from, before.len() as u64 + 1, "{who}: missed_from is the first operation not delivered");
    assert!(to >= from, "{who}: a non-empty missed range: {from}..={to}");
    assert_eq!(r.between, 0, "{who}: the lagged notice is immediately followed by the next operation");
    assert_eq!(seqs(&r.after), (to + 1..=last).collect::<Vec<_>>(), "{who}: seq missed_to + 1 onwards, no gap");
    assert!(
        r.after.len() <= LAG_RING,
        "{who}: after the lag only what the ring holds is delivered ({} ops)",
        r.after.len()
    );
    (from, to)
}

/// A reader that stops reading falls behind the ring: the sender and a fast
/// reader are not held back; when the slow reader resumes it sees its ops in
/// order, one `lagged` with the missed range, the rest in order; `sync_request`
/// recovers the missed range from the history.
#[test]
fn slow_reader_is_lagged_and_recovers_with_sync() {
    let n = lag_volume();
    let pad = "x".repeat(LAG_PAD);
    let LagSetup { relay, mut slow, fast, mut sender, sender_id } = lag_setup("fanout-lag", |_| {});
    let addr = relay.local_addr();
    let cores = relay.cpus().len();

    let fast = spawn_keeping_up(fast, n, "fast");
    // All acks arrive while the slow reader reads nothing.
    let acks = send_padded_ops(&mut sender, n, LAG_BATCH, &pad, |_| {});
    assert_eq!(acks, (1..=n).collect::<Vec<_>>(), "the sender is acked every operation, in order");
    let (_fast, fast_ops) = fast.join().expect("the fast reader keeps up without lagged");
    assert_eq!(seqs(&fast_ops), (1..=n).collect::<Vec<_>>(), "the fast reader gets every operation in order");

    let r = read_through_lag(&mut slow, n, 0, "slow");
    let (from, to) = assert_one_announced_gap(&r, n, "slow");
    for op in r.before.iter().chain(&r.after) {
        assert_eq!(payload_n(&op.payload), op.seq - 1);
        assert_eq!(op.connection_id, sender_id);
    }
    assert!(metric_sum(addr, "docrelay_lagged_total", cores) >= 1);

    // The missed operations (several MB) come in pages of at most
    // `limits.max_sync_bytes`, each asked for with the last seq of the one before.
    let mut ops: Vec<Value> = Vec::new();
    let mut since = from - 1;
    let mut pages = 0;
    loop {
        let m = call(&mut slow, &format!(r#"{{"type":"sync_request","since":{since}}}"#), "slow");
        assert_eq!(m.kind(), "sync_response", "{}", m.v.to_string().chars().take(200).collect::<String>());
        assert!(!m.binary);
        assert_eq!(m.seq(), n);
        assert!(m.v["snapshot"].is_null(), "the history covers `since`: no snapshot");
        let page = m.v["ops"].as_array().expect("ops");
        assert!(!page.is_empty(), "a page holds at least one operation");
        let bytes: usize = page.iter().map(|o| o.to_string().len()).sum();
        assert!(page.len() == 1 || bytes <= (1 << 20) + 4096, "a page of {bytes} bytes");
        since = page.last().unwrap()["seq"].as_u64().unwrap();
        ops.extend(page.iter().cloned());
        pages += 1;
        if !m.v["more"].as_bool().expect("`more` is always there") {
            break;
        }
    }
    assert!(pages > 1, "{} bytes of operations must take more than one page", ops.len() * LAG_PAD);
    let synced: Vec<u64> = ops.iter().map(|o| o["seq"].as_u64().unwrap()).collect();
    assert_eq!(synced, (from..=n).collect::<Vec<_>>(), "sync covers missed_from..=last ({from}..={to} missed)");
    for o in ops {
        assert_eq!(o["type"], "operation");
        assert_eq!(o["connection_id"], sender_id);
        assert_eq!(o["payload"]["n"].as_u64().unwrap(), o["seq"].as_u64().unwrap() - 1);
    }
    assert_nothing_pending(&mut slow, "slow");
}

/// The relay does not keep a stalled client's backlog: several MB of
/// operations (more than twice `max_send_buffer_bytes`) pass while it does not
/// read and sends pings; it is not closed, the others are unaffected, and its
/// delivery resumes with a lagged notice.
#[test]
fn stalled_reader_is_not_closed_and_not_buffered_for() {
    const SEND_BUFFER: usize = 1 << 20;
    let n = lag_volume();
    assert!(n as usize * LAG_PAD > 2 * SEND_BUFFER, "the backlog must exceed what the send buffer may hold");
    let pad = "y".repeat(LAG_PAD);
    let LagSetup { relay, mut slow, fast, mut sender, .. } = lag_setup("fanout-stall", |c| {
        c.limits.max_send_buffer_bytes = SEND_BUFFER;
    });
    let addr = relay.local_addr();
    let cores = relay.cpus().len();

    let fast = spawn_keeping_up(fast, n, "fast");
    let mut pings = 0;
    let acks = send_padded_ops(&mut sender, n, LAG_BATCH, &pad, |sent| {
        // The stalled client keeps talking (it only stopped reading).
        if sent % 800 == 0 {
            slow.send(Message::text(r#"{"type":"ping"}"#)).unwrap();
            pings += 1;
        }
    });
    assert_eq!(acks.len() as u64, n);
    let (_fast, fast_ops) = fast.join().expect("the fast reader is unaffected");
    assert_eq!(seqs(&fast_ops), (1..=n).collect::<Vec<_>>());
    // Still there, on the relay's side too.
    assert_eq!(metric_sum(addr, "docrelay_sessions", cores), 3);
    assert_eq!(metric(addr, "docrelay_active_connections"), 3);

    let r = read_through_lag(&mut slow, n, pings, "slow");
    assert_one_announced_gap(&r, n, "slow");
    assert!(
        (r.before.len() + r.after.len()) as u64 <= n - LAG_RING as u64,
        "the relay skipped operations rather than keeping them all"
    );
    assert_eq!(r.pongs, pings, "every ping sent while stalled is answered");
    assert_nothing_pending(&mut slow, "slow");
    assert_eq!(metric_sum(addr, "docrelay_sessions", cores), 3);
}

/// Presence overtaken by its ring is dropped silently: the stalled reader
/// gets cursor updates in the order sent, some missing, and no `lagged`.
#[test]
fn overtaken_presence_is_dropped_silently() {
    let total = lag_volume();
    let mut c = config();
    c.documents.presence_ring_capacity = 4;
    let relay = relay(c);
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let doc = "fanout-presence";
    let (mut slow, _) = slow_session(addr, doc, "watcher");
    let (mut mover, mover_id) = session(addr, doc, "mover");
    expect_user_joined(&mut slow, 1, "watcher");

    let pad = "z".repeat(LAG_PAD);
    for n in 0..total {
        let payload = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
        mover.write(Message::text(format!(r#"{{"type":"cursor","payload":{payload}}}"#))).unwrap();
        if n % 50 == 49 {
            mover.flush().unwrap();
        }
    }
    // The pong comes after every cursor update was handled.
    assert_nothing_pending(&mut mover, "mover");

    let mut got = Vec::new();
    while got.last() != Some(&(total - 1)) {
        let m = recv(&mut slow, "watcher");
        assert_eq!(m.kind(), "cursor", "only cursor updates, no lagged: {}", m.v);
        assert!(m.binary);
        assert_eq!(m.u64("connection_id"), mover_id);
        assert_eq!(m.v["user_id"], "mover");
        let payload = m.raw_payload.as_deref().expect("payload");
        let n = payload_n(payload);
        assert_eq!(payload, format!(r#"{{"n":{n},"pad":"{pad}"}}"#));
        got.push(n);
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "cursor updates in the order sent");
    assert!((got.len() as u64) < total, "some overtaken updates were dropped ({} of {total} delivered)", got.len());
    assert_nothing_pending(&mut slow, "watcher");
    assert_eq!(metric_sum(addr, "docrelay_lagged_total", cores), 0, "no lagged notice for presence");
}

/// The gate: a session that authenticated but did not join gets no
/// broadcasts; one that left gets none after `left_document`; one that joins
/// again starts at the document's head.
#[test]
fn only_joined_sessions_receive_broadcasts() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let doc = "fanout-gate";
    let (mut lurker, _) = authed(addr, doc, "lurker");
    let (mut writer, writer_id) = session(addr, doc, "writer");
    let (mut leaver, _) = session(addr, doc, "leaver");

    let send = |ws: &mut Client, n: u64| {
        let mut m = call(ws, &op_message(&format!(r#"{{"n":{n}}}"#), &format!("g{n}")), "writer");
        while m.kind() == "user_joined" || m.kind() == "user_left" {
            m = recv(ws, "writer");
        }
        assert_eq!(m.kind(), "ack", "{}", m.v);
        assert_eq!(m.seq(), n);
    };
    for n in 1..=5 {
        send(&mut writer, n);
    }
    for n in 1..=5 {
        let op = recv(&mut leaver, "leaver").op();
        assert_eq!((op.seq, op.connection_id), (n, writer_id));
    }
    let m = call(&mut leaver, r#"{"type":"leave_document"}"#, "leaver");
    assert_eq!((m.kind(), m.binary), ("left_document", false), "{}", m.v);
    for n in 6..=10 {
        send(&mut writer, n);
    }
    assert_nothing_pending(&mut lurker, "lurker (authenticated, not joined)");
    assert_nothing_pending(&mut leaver, "leaver (left)");

    // Joining again starts at the head: seq 11 is the next one it sees.
    let joined = join(&mut leaver, "leaver");
    assert_eq!(joined["seq"], 10);
    send(&mut writer, 11);
    let op = recv(&mut leaver, "leaver").op();
    assert_eq!((op.seq, op.payload.as_str()), (11, r#"{"n":11}"#));
    assert_nothing_pending(&mut leaver, "leaver (joined again)");
    assert_nothing_pending(&mut lurker, "lurker (authenticated, not joined)");
}

/// Two document ids whose owner cores differ (when there are two cores).
fn documents_on_two_cores(cores: usize) -> (String, String) {
    let first = "doc-0".to_string();
    let owner = docrelay::owner_core(&first, cores);
    let second =
        (1..).map(|i| format!("doc-{i}")).find(|d| cores == 1 || docrelay::owner_core(d, cores) != owner).unwrap();
    (first, second)
}

/// Documents on different cores are isolated: each has its own seq from 1
/// and its own subscribers; the per-core gauges show one document and two
/// sessions on each owner core.
#[test]
fn documents_on_different_cores_are_isolated() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let (doc_a, doc_b) = documents_on_two_cores(cores);
    let (core_a, core_b) = (docrelay::owner_core(&doc_a, cores), docrelay::owner_core(&doc_b, cores));

    let (mut a1, a1_id) = session(addr, &doc_a, "a1");
    let (mut a2, _) = session(addr, &doc_a, "a2");
    let (mut b1, b1_id) = session(addr, &doc_b, "b1");
    let (mut b2, _) = session(addr, &doc_b, "b2");
    expect_user_joined(&mut a1, 1, "a1");
    expect_user_joined(&mut b1, 1, "b1");

    // Interleaved: 5 on A, 3 on B.
    for n in 0..5u64 {
        for (ws, doc, who) in [(&mut a1, &doc_a, "a1"), (&mut b1, &doc_b, "b1")] {
            if who == "b1" && n >= 3 {
                continue;
            }
            let m = call(ws, &op_message(&format!(r#"{{"doc":"{doc}","n":{n}}}"#), "x"), who);
            assert_eq!((m.kind(), m.seq()), ("ack", n + 1), "{who}: seqs per document start at 1: {}", m.v);
        }
    }
    for (ws, doc, count, origin, who) in [(&mut a2, &doc_a, 5, a1_id, "a2"), (&mut b2, &doc_b, 3, b1_id, "b2")] {
        for n in 0..count {
            let op = recv(ws, who).op();
            assert_eq!(op.seq, n + 1, "{who}");
            assert_eq!(op.connection_id, origin, "{who}");
            assert_eq!(op.payload, format!(r#"{{"doc":"{doc}","n":{n}}}"#), "{who}: only its document's ops");
        }
        assert_nothing_pending(ws, who);
    }

    if cores >= 2 {
        assert_ne!(core_a, core_b);
        for core in [core_a, core_b] {
            assert_eq!(core_metric(addr, "docrelay_documents", core), 1, "one document on core {core}");
            assert_eq!(core_metric(addr, "docrelay_sessions", core), 2, "two sessions on core {core}");
        }
        for core in (0..cores).filter(|c| *c != core_a && *c != core_b) {
            assert_eq!(core_metric(addr, "docrelay_documents", core), 0, "core {core}");
            assert_eq!(core_metric(addr, "docrelay_sessions", core), 0, "core {core}");
        }
    } else {
        assert_eq!(core_metric(addr, "docrelay_documents", 0), 2);
        assert_eq!(core_metric(addr, "docrelay_sessions", 0), 4);
    }
}

/// A document with a session stays loaded (its seq survives); once its last
/// session is gone it is unloaded after `idle_unload_ms`, and a later join
/// starts a fresh document at seq 0.
#[test]
fn documents_unload_when_idle_and_not_before() {
    let mut c = config();
    c.documents.idle_unload_ms = 300;
    let relay = relay(c);
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let doc = "fanout-unload";
    let owner = docrelay::owner_core(doc, cores);
    let documents = || core_metric(addr, "docrelay_documents", owner);

    let (mut a, _) = authed(addr, doc, "a");
    assert_eq!(documents(), 0, "not loaded before the first join");
    assert_eq!(join(&mut a, "a")["seq"], 0);
    assert_eq!(documents(), 1);
    for n in 1..=3u64 {
        let m = call(&mut a, &op_message(&format!("{n}"), "u"), "a");
        assert_eq!((m.kind(), m.seq()), ("ack", n));
    }
    // Well past idle_unload_ms while `a` is joined.
    thread::sleep(Duration::from_millis(700));
    assert_eq!(documents(), 1, "a document with a session is not unloaded");
    let (mut b, _) = authed(addr, doc, "b");
    assert_eq!(join(&mut b, "b")["seq"], 3, "the document kept its seq");
    let m = call(&mut b, r#"{"type":"sync_request","since":0}"#, "b");
    assert_eq!(m.kind(), "sync_response");
    assert_eq!(m.v["ops"].as_array().map(Vec::len), Some(3), "and its history");

    // `a` leaves (still connected), `b` disconnects.
    let m = until_pong(&mut a, "a");
    assert_eq!(m.iter().map(Msg::kind).collect::<Vec<_>>(), ["user_joined"]);
    let m = call(&mut a, r#"{"type":"leave_document"}"#, "a");
    assert_eq!(m.kind(), "left_document");
    b.close(None).unwrap();
    while b.read().is_ok() {}
    eventually("the idle document is unloaded", || documents() == 0);
    eventually("b's connection is gone", || metric(addr, "docrelay_active_connections") == 1);

    // A fresh document: seq 0, empty history.
    assert_eq!(join(&mut a, "a")["seq"], 0, "a new join after the unload starts at seq 0");
    assert_eq!(documents(), 1);
    let m = call(&mut a, r#"{"type":"sync_request","since":0}"#, "a");
    assert_eq!((m.kind(), m.v["ops"].as_array().map(Vec::len)), ("sync_response", Some(0)), "{}", m.v);
    let m = call(&mut a, &op_message("1", "u"), "a");
    assert_eq!((m.kind(), m.seq()), ("ack", 1));

    a.close(None).unwrap();
    while a.read().is_ok() {}
    eventually("no connection is left", || metric(addr, "docrelay_active_connections") == 0);
    eventually("no session is left", || metric_sum(addr, "docrelay_sessions", cores) == 0);
    eventually("no document is left", || metric_sum(addr, "docrelay_documents", cores) == 0);
}

/// `docrelay_broadcasts_total` counts each operation once and
/// `docrelay_deliveries_total` once per receiver (not the sender).
#[test]
fn broadcast_and_delivery_metrics_follow_the_fanout() {
    const N: u64 = 50;
    let relay = relay(config());
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let doc = "fanout-metrics";
    let mut receivers: Vec<Client> = (0..3).map(|i| session(addr, doc, &format!("r{i}")).0).collect();
    let (mut sender, _) = session(addr, doc, "s");
    // Let the presence settle: r0 sees r1, r2, s join; r1 sees r2, s; r2 sees s.
    for (i, ws) in receivers.iter_mut().enumerate() {
        expect_user_joined(ws, 3 - i, "receiver");
    }
    let broadcasts = metric_sum(addr, "docrelay_broadcasts_total", cores);
    let deliveries = metric_sum(addr, "docrelay_deliveries_total", cores);
    let operations = metric_sum(addr, "docrelay_operations_total", cores);
    assert!(broadcasts >= 4 && deliveries >= 6, "the joins were counted: {broadcasts} / {deliveries}");

    let acks = send_padded_ops(&mut sender, N, 100, "m", |_| {});
    assert_eq!(acks, (1..=N).collect::<Vec<_>>());
    for (i, ws) in receivers.iter_mut().enumerate() {
        for seq in 1..=N {
            assert_eq!(recv(ws, &format!("r{i}")).op().seq, seq);
        }
    }
    let d_broadcasts = metric_sum(addr, "docrelay_broadcasts_total", cores) - broadcasts;
    let d_deliveries = metric_sum(addr, "docrelay_deliveries_total", cores) - deliveries;
    let d_operations = metric_sum(addr, "docrelay_operations_total", cores) - operations;
    assert!(d_broadcasts >= N, "broadcasts grew by {d_broadcasts}, fewer than the {N} operations");
    assert!(d_deliveries >= 3 * N, "deliveries grew by {d_deliveries}, fewer than 3 x {N}");
    // Nothing else happened: the counts are exact (the sender's own
    // operations are not delivered to it, so not counted).
    assert_eq!(d_broadcasts, N);
    assert_eq!(d_deliveries, 3 * N);
    assert_eq!(d_operations, N);
}

/// Twenty documents with three clients each, all sending at once: every
/// client sees exactly the other two clients' operations of its own document,
/// and each document's seqs are 1..=60 without a gap.
#[test]
fn many_documents_at_once_stay_separate_and_gap_free() {
    const DOCS: usize = 20;
    const PER_DOC: usize = 3;
    const OPS: u64 = 20;
    const DOC_TOTAL: u64 = PER_DOC as u64 * OPS;
    let relay = relay(config());
    let addr = relay.local_addr();
    let all_joined = Arc::new(Barrier::new(DOCS * PER_DOC));
    let all_read = Arc::new(Barrier::new(DOCS * PER_DOC));

    let clients: Vec<_> = (0..DOCS)
        .flat_map(|d| (0..PER_DOC).map(move |k| (d, k)))
        .map(|(d, k)| {
            let (all_joined, all_read) = (all_joined.clone(), all_read.clone());
            thread::spawn(move || {
                let who = format!("m{d}-{k}");
                let (mut ws, id) = session(addr, &format!("many-{d}"), &who);
                all_joined.wait();
                for n in 0..OPS {
                    let payload = format!(r#"{{"d":{d},"k":{k},"n":{n}}}"#);
                    ws.write(Message::text(op_message(&payload, &format!("{n}")))).unwrap();
                }
                ws.flush().unwrap();
                let (mut acks, mut ops) = (Vec::new(), Vec::new());
                while (acks.len() as u64) < OPS || (ops.len() as u64) < DOC_TOTAL - OPS {
                    let m = recv(&mut ws, &who);
                    match m.kind() {
                        "ack" => acks.push(m.seq()),
                        "operation" => ops.push(m.op()),
                        "user_joined" => {}
                        _ => panic!("{who}: unexpected {}", m.v),
                    }
                }
                assert_only_presence_pending(&mut ws, &who);
                // Stay connected until every client is done reading.
                all_read.wait();
                (d, k, id, acks, ops)
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|t| t.join().unwrap()).collect();

    for d in 0..DOCS {
        let members: Vec<_> = results.iter().filter(|r| r.0 == d).collect();
        assert_eq!(members.len(), PER_DOC);
        let mut all_acked: Vec<u64> = members.iter().flat_map(|r| r.3.iter().copied()).collect();
        all_acked.sort_unstable();
        assert_eq!(all_acked, (1..=DOC_TOTAL).collect::<Vec<_>>(), "many-{d}: seqs 1..={DOC_TOTAL}, each once");
        for r in &members {
            let (k, acks, ops) = (r.1, &r.3, &r.4);
            assert!(acks.windows(2).all(|w| w[0] < w[1]), "m{d}-{k}: acks in increasing seq");
            let own: HashSet<u64> = acks.iter().copied().collect();
            let expected: Vec<u64> = (1..=DOC_TOTAL).filter(|s| !own.contains(s)).collect();
            assert_eq!(seqs(ops), expected, "m{d}-{k}: every other client's operation, in seq order");
            for op in ops {
                let p: Value = serde_json::from_str(&op.payload).unwrap();
                assert_eq!(p["d"], d, "m{d}-{k}: an operation of another document: {}", op.payload);
                assert_ne!(p["k"], k, "m{d}-{k}: its own operation was delivered to it");
                let origin = members.iter().find(|r| r.1 as u64 == p["k"].as_u64().unwrap()).unwrap();
                assert_eq!(op.connection_id, origin.2, "m{d}-{k}: connection_id of the sender");
            }
        }
    }
}

/// A raw client (no automatic Close reply) that authenticated and joined.
fn raw_joined(addr: SocketAddr, doc: &str, token: &str) -> (TcpStream, Vec<u8>) {
    let (mut s, mut pending) = raw_upgrade(addr, &doc_path(doc));
    for (msg, reply) in [
        (format!(r#"{{"type":"authenticate","token":"{token}"}}"#), "auth_result"),
        (r#"{"type":"join_document"}"#.to_string(), "joined_document"),
    ] {
        s.write_all(&client_frame(true, 0x1, msg.as_bytes())).unwrap();
        let (op, payload) = read_frame(&mut s, &mut pending).expect("a reply");
        let v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!((op, v["type"].as_str()), (0x1, Some(reply)), "{v}");
    }
    (s, pending)
}

/// A joined session the relay is closing (its Close sent, the peer's reply
/// awaited) must not stall its core when a broadcast reaches its document:
/// the other sessions of the document go on being served.
#[test]
fn closing_subscriber_does_not_stall_its_core() {
    let mut c = config();
    c.limits.idle_timeout_ms = 300;
    c.limits.close_timeout_ms = 5000;
    let relay = relay(c);
    let addr = relay.local_addr();
    let doc = "fanout-closing";
    let (mut quiet, mut pending) = raw_joined(addr, doc, "quiet");
    let (mut busy, _) = session(addr, doc, "busy");
    set_timeout(&busy, Duration::from_secs(5));

    // `quiet` sends nothing and is closed for idleness; `busy` stays active.
    quiet.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let close = loop {
        assert!(std::time::Instant::now() < deadline, "quiet was never closed for idleness");
        assert_nothing_pending(&mut busy, "busy");
        match read_frame(&mut quiet, &mut pending) {
            Some((0x8, payload)) => break payload,
            _ => thread::sleep(Duration::from_millis(50)),
        }
    };
    assert_eq!(&close[..2], &1001u16.to_be_bytes(), "idle timeout closes with 1001");

    // `quiet` does not answer the Close; meanwhile its document moves on.
    let m = call(&mut busy, &op_message("1", "after-close"), "busy");
    assert_eq!((m.kind(), m.seq()), ("ack", 1), "the relay still serves the document: {}", m.v);
    assert_nothing_pending(&mut busy, "busy");
    drop(quiet);
}

/// Shutdown completes while sessions are joined to a document, one of them
/// never answering the relay's Close.
#[test]
fn shutdown_completes_with_joined_sessions() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let doc = "fanout-shutdown";
    let (quiet, _pending) = raw_joined(addr, doc, "quiet");
    let (mut polite, _) = session(addr, doc, "polite");
    quiet.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let handle = relay.into_handle();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        handle.shutdown();
        handle.join();
        let _ = tx.send(());
    });
    // `polite` answers the relay's Close (tungstenite replies while reading).
    assert_eq!(expect_close(&mut polite).0, 1001);
    let _ = polite.flush();
    rx.recv_timeout(Duration::from_secs(10)).expect("the relay's join returns");
    drop(quiet);
}

/// A lagged reader recovers as `docs/protocol.md`, "Ordering, lag and
/// recovery", says, with `sync_request` sent as soon as it sees `lagged`,
/// while operations keep flowing and its socket is still behind: it gets its
/// `sync_response` (the missed range onwards) and is not closed.
#[test]
fn lagged_reader_recovers_while_operations_keep_flowing() {
    let (n1, n2) = (lag_volume(), lag_volume());
    let pad = "w".repeat(LAG_PAD);
    let LagSetup { relay, mut slow, fast, mut sender, .. } = lag_setup("fanout-recover", |_| {});
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let fast = spawn_keeping_up(fast, n1 + n2, "fast");
    send_padded_ops(&mut sender, n1, LAG_BATCH, &pad, |_| {});

    // Resume until the lagged notice, then stop reading again.
    let (from, to) = loop {
        let m = recv(&mut slow, "slow");
        match m.kind() {
            "operation" => {}
            "lagged" => break (m.u64("missed_from"), m.u64("missed_to")),
            _ => panic!("slow: unexpected {}", m.v),
        }
    };
    assert!(to >= from);
    // The document moves on while the slow reader's socket fills up again.
    let acks = send_padded_ops(&mut sender, n2, LAG_BATCH, &pad, |_| {});
    assert_eq!(acks.last(), Some(&(n1 + n2)));
    slow.send(Message::text(format!(r#"{{"type":"sync_request","since":{}}}"#, from - 1))).unwrap();

    let mut sync = None;
    let mut last_op = to;
    let mut synced: Vec<u64> = Vec::new();
    while last_op < n1 + n2 || sync.is_none() {
        let m = recv(&mut slow, "slow (recovering)");
        match m.kind() {
            "operation" => {
                assert!(m.seq() > last_op, "in order");
                last_op = m.seq();
            }
            "lagged" => last_op = m.u64("missed_to"),
            "sync_response" => {
                synced.extend(m.v["ops"].as_array().expect("ops").iter().map(|o| o["seq"].as_u64().unwrap()));
                assert!(m.v["snapshot"].is_null());
                if m.v["more"].as_bool().expect("`more`") {
                    // Pull the next page from the last seq of this one.
                    let last = *synced.last().expect("a page holds at least one operation");
                    slow.send(Message::text(format!(r#"{{"type":"sync_request","since":{last}}}"#))).unwrap();
                } else {
                    assert_eq!(synced, (from..=m.seq()).collect::<Vec<_>>(), "sync covers missed_from onwards");
                    sync = Some(m.seq());
                }
            }
            _ => panic!("slow: unexpected {}", m.v),
        }
    }
    assert!(sync.unwrap() >= n1);
    let (_fast, fast_ops) = fast.join().unwrap();
    assert_eq!(seqs(&fast_ops), (1..=n1 + n2).collect::<Vec<_>>());
    assert_eq!(metric_sum(addr, "docrelay_sessions", cores), 3);
}

/// A reader that keeps up is never lagged: here its socket buffers can hold
/// every operation, and its thread reads all the time, while one sender
/// pipelines a burst of operations (each read of the relay holds far fewer
/// operations than the default ring of 1024).
#[test]
fn pipelined_burst_does_not_lag_a_reader_that_keeps_up() {
    const TOTAL: u64 = 5000;
    let relay = relay(config());
    let doc = "fanout-burst";
    let (fast, _) = session_with_rcvbuf(relay.local_addr(), doc, "fast", FAST_RCVBUF);
    let (mut sender, _) = session(relay.local_addr(), doc, "sender");
    let fast = thread::spawn(move || {
        let mut fast = fast;
        let mut ops = Vec::new();
        while ops.last().is_none_or(|o: &Op| o.seq < TOTAL) {
            let m = recv(&mut fast, "fast");
            match m.kind() {
                "operation" => ops.push(m.op()),
                "lagged" => panic!("fast: lagged while keeping up: {}", m.v),
                "user_joined" => {}
                _ => panic!("fast: unexpected {}", m.v),
            }
        }
        (fast, ops)
    });
    // About 150 bytes an operation, 750 KB in all, written at once.
    let pad = "p".repeat(100);
    for n in 0..TOTAL {
        sender.write(Message::text(op_message(&padded(n, &pad), &format!("{n}")))).unwrap();
    }
    sender.flush().unwrap();
    for seq in 1..=TOTAL {
        let m = recv(&mut sender, "sender");
        assert_eq!((m.kind(), m.seq()), ("ack", seq));
    }
    let (_fast, ops) = fast.join().expect("the fast reader is not lagged");
    assert_eq!(seqs(&ops), (1..=TOTAL).collect::<Vec<_>>());
}

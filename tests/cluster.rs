//! Cluster mode on Redis (`[cluster]`, docs/cluster.md): several `docrelay
//! serve` processes (nodes) on one real `redis-server` serve the same
//! documents, and a client may connect to any of them.
//!
//! The contract under test:
//!
//! - Every operation is sequenced in Redis: the `ack` seqs of a document are
//!   unique and gap-free across nodes, and every joined session on every node
//!   receives every other session's operations once each, in strictly
//!   increasing seq; the sender gets its `ack` instead of its own operation.
//! - `connection_id`s are unique across nodes (`auth_result`, participants,
//!   operations, `user_joined`, `user_left`).
//! - Presence crosses nodes: `user_joined`, `user_left` and `cursor` reach
//!   the joined sessions of every node; `joined_document` lists (and counts)
//!   the participants of all nodes.
//! - A node killed with SIGKILL: its sessions' `user_left` reach the other
//!   nodes within `cluster.node_timeout_ms` (heartbeats that expire).
//! - History and snapshots live in Redis: `join_document` with `since`,
//!   `sync_request` and a `snapshot` stored through one node are served by
//!   every node, also one that loads the document later.
//! - While Redis is unreachable, an `operation` is refused with
//!   `UNAVAILABLE` (with its `client_op_id`), sessions stay open and
//!   `/healthz` answers 503; once Redis is back, operations are acked again
//!   without a restart of the relay, and every acked operation is delivered
//!   exactly once, in order, on every node (a refused one never).
//! - Nodes restarted on the same Redis keep every document's `seq` and epoch.
//! - Redis that lost its data (`FLUSHALL`) starts a new epoch: joined
//!   sessions get `EPOCH_CHANGED` with it and the new history starts at seq 1.
//! - `storage.dir` together with `cluster.redis_url` is refused at start.
//!
//! Participants are compared as sets: their order across nodes is not
//! asserted.
//!
//! Each test has its own Redis (tests/common/redis.rs) and nodes on
//! ephemeral ports, so that the tests run in parallel; every wait is bounded.
//! Run them with `cargo test --test cluster`; they need `redis-server`.

mod common;
use common::redis::{Redis, Resp};
use common::*;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_docrelay");

/// Generous bound for a node to start or exit: not a speed test.
const PATIENCE: Duration = Duration::from_secs(20);

/// How long a test waits for one reply or broadcast that must come.
const WAIT: Duration = Duration::from_secs(8);

/// `cluster.node_timeout_ms` of every node here (the least allowed is 1000).
const NODE_TIMEOUT_MS: u64 = 2000;

/// How much later than `node_timeout_ms` a dead node's `user_left` may come
/// (the last heartbeat's age, expiry checks, a loaded 2-CPU machine).
const NODE_TIMEOUT_SLACK_MS: u64 = 1500;

// ---------------------------------------------------------------------------
// Nodes

/// The CPUs this process may run on; node `i` is pinned to the `i`-th of
/// them (round robin), so that two nodes of a test do not share one CPU.
fn cpus() -> Vec<usize> {
    docrelay::Cores::All.resolve().expect("the CPU affinity of the test process")
}

/// The configuration text of one node on `redis`: one core, `node_id` (or
/// the default when `None`), `node_timeout_ms` = [`NODE_TIMEOUT_MS`], the
/// extra `[cluster]` lines `cluster_extra`, then `extra` (other sections,
/// e.g. `"[documents]\nhistory_ops = 10\n"`).
fn node_config(redis_url: &str, nth: usize, node_id: Option<&str>, cluster_extra: &str, extra: &str) -> String {
    let cpus = cpus();
    let cpu = cpus[nth % cpus.len()];
    let id = node_id.map(|id| format!("node_id = \"{id}\"\n")).unwrap_or_default();
    format!(
        "listen = \"127.0.0.1:0\"\ncores = [{cpu}]\n\n[cluster]\nredis_url = \"{redis_url}\"\n{id}\
         node_timeout_ms = {NODE_TIMEOUT_MS}\n{cluster_extra}\n{extra}\n"
    )
}

/// A running `docrelay serve` node, listening. Killed when dropped (a
/// failing test never leaves one behind). Its stderr is collected on a
/// thread, so the pipe never fills.
struct Node {
    name: String,
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _dir: TempDir,
}

impl Node {
    /// Starts a node on the configuration text `config` and waits until it
    /// listens.
    fn start_with(name: &str, config: &str) -> Node {
        let dir = TempDir::new(&format!("cluster-{name}"));
        let file = dir.file("relay.toml", config);
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config", &file, "--listen", "127.0.0.1:0"]);
        let (child, addr, log) = spawn_listening(cmd, PATIENCE);
        Node { name: name.to_string(), child, addr, log, _dir: dir }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// A session on `/ws/documents/{doc}` of this node, authenticated as
    /// `user` (dev mode: the token is the user name).
    fn session(&self, doc: &str, user: &str) -> Session {
        Session::open(self, doc, user)
    }

    /// Waits (bounded) for the process to exit.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "node {} still running; stderr:\n{}", self.name, self.log());
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// kill -9 (no goodbye in Redis), after checking that the node was still
    /// running (it did not die of anything else before).
    fn kill(&mut self) {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "node {} had died already; stderr:\n{}",
            self.name,
            self.log()
        );
        self.child.kill().unwrap();
        self.wait();
    }

    /// SIGTERM, then the node must exit 0.
    fn stop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        let status = self.wait();
        assert_eq!(status.code(), Some(0), "node {}: exit status {status}; stderr:\n{}", self.name, self.log());
    }

    /// `GET /healthz`: the status code and the body.
    fn healthz(&self) -> (u16, String) {
        let response = raw_http(self.addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
        let status = response.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| {
            panic!("node {}: GET /healthz: not an HTTP response: {response:?}", self.name);
        });
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    /// Polls `/healthz` until it answers `want` (bounded by `within`);
    /// returns the body of that answer.
    #[track_caller]
    fn healthz_becomes(&self, want: u16, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self.healthz();
            if status == want {
                return body;
            }
            if Instant::now() >= deadline {
                panic!(
                    "node {}: GET /healthz still answers {status} ({body:?}) after {within:?}, expected {want}; \
                     stderr:\n{}",
                    self.name,
                    tail(&self.log(), 40)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts `n` nodes on `redis`, named `a`, `b`, `c`, … (also their
/// `node_id`s), concurrently (a node's start takes a moment).
fn start_nodes(redis: &Redis, n: usize, cluster_extra: &str, extra: &str) -> Vec<Node> {
    let url = redis.url();
    thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let name = ((b'a' + i as u8) as char).to_string();
                let config = node_config(&url, i, Some(&name), cluster_extra, extra);
                s.spawn(move || Node::start_with(&name, &config))
            })
            .collect();
        handles.into_iter().map(join).collect()
    })
}

/// Joins a thread, passing its panic on (with its own message).
fn join<T>(h: thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|payload| std::panic::resume_unwind(payload))
}

// ---------------------------------------------------------------------------
// Sessions

/// One message from the relay: whether it came in a Binary frame (a
/// broadcast), its text and its JSON.
#[derive(Debug, Clone)]
struct Msg {
    binary: bool,
    text: String,
    v: Value,
}

impl Msg {
    fn ty(&self) -> &str {
        self.v["type"].as_str().unwrap_or("")
    }

    fn is_op(&self) -> bool {
        self.binary && self.ty() == "operation"
    }

    /// A direct reply (Text frame) that answers the operation `id`: its
    /// `ack` or an `error` carrying its `client_op_id`.
    fn answers(&self, id: &str) -> bool {
        !self.binary && self.v["client_op_id"] == id
    }
}

/// A tungstenite session with an inbox: messages read while looking for
/// another one are kept, in arrival order, for later `take`s.
struct Session {
    ws: common::Client,
    name: String,
    log: Arc<Mutex<String>>,
    inbox: VecDeque<Msg>,
    auth: Value,
}

impl Session {
    /// Connects to `/ws/documents/{doc}` on `node` and authenticates as
    /// `user`.
    fn open(node: &Node, doc: &str, user: &str) -> Session {
        let ws = connect(node.addr(), &format!("/ws/documents/{doc}"));
        let mut s = Session {
            ws,
            name: format!("{user}@{}", node.name),
            log: node.log.clone(),
            inbox: VecDeque::new(),
            auth: Value::Null,
        };
        let v = s.call(&format!(r#"{{"type":"authenticate","token":"{user}"}}"#));
        if v["type"] != "auth_result" || v["success"] != true || v["connection_id"].as_u64().is_none() {
            s.fail(format!("authenticate: {v}"));
        }
        s.auth = v;
        s
    }

    fn conn_id(&self) -> u64 {
        self.auth["connection_id"].as_u64().unwrap()
    }

    fn user(&self) -> &str {
        self.auth["user_id"].as_str().unwrap()
    }

    fn color(&self) -> &str {
        self.auth["color"].as_str().unwrap()
    }

    /// This session as it appears in `participants`.
    fn participant(&self) -> Value {
        json!({
            "connection_id": self.conn_id(),
            "user_id": self.user(),
            "user_name": self.auth["user_name"],
            "color": self.color(),
        })
    }

    #[track_caller]
    fn fail(&self, what: String) -> ! {
        let inbox: Vec<&str> = self.inbox.iter().map(|m| m.text.as_str()).collect();
        panic!(
            "{}: {what}\n  unread messages: {inbox:?}\n  its node's stderr (last lines):\n{}",
            self.name,
            tail(&self.log.lock().unwrap(), 40)
        )
    }

    #[track_caller]
    fn send(&mut self, text: &str) {
        if let Err(e) = self.ws.send(Message::text(text)) {
            self.fail(format!("sending {text}: {e}"));
        }
    }

    /// Reads the next message from the socket (not the inbox), until
    /// `deadline`; `None` when nothing came in time.
    #[track_caller]
    fn read_one(&mut self, deadline: Instant) -> Option<Msg> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            set_timeout(&self.ws, left.max(Duration::from_millis(1)));
            let (binary, text) = match self.ws.read() {
                Ok(Message::Text(t)) => (false, t.to_string()),
                Ok(Message::Binary(b)) => match String::from_utf8(b.to_vec()) {
                    Ok(t) => (true, t),
                    Err(e) => self.fail(format!("a Binary frame that is not UTF-8: {e}")),
                },
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Ok(Message::Close(f)) => self.fail(format!("the relay closed the session: {f:?}")),
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(e) => self.fail(format!("reading: {e}")),
            };
            let v = serde_json::from_str(&text).unwrap_or_else(|e| self.fail(format!("not JSON ({e}): {text}")));
            return Some(Msg { binary, text, v });
        }
    }

    /// The next message, from the inbox first, else from the socket.
    #[track_caller]
    fn next_msg(&mut self, deadline: Instant) -> Option<Msg> {
        self.inbox.pop_front().or_else(|| self.read_one(deadline))
    }

    /// The first message (inbox first, in arrival order) for which `pred`
    /// holds, waiting up to `within`; the others stay in the inbox.
    #[track_caller]
    fn try_take(&mut self, within: Duration, pred: impl Fn(&Msg) -> bool) -> Option<Msg> {
        if let Some(i) = self.inbox.iter().position(&pred) {
            return self.inbox.remove(i);
        }
        let deadline = Instant::now() + within;
        while let Some(m) = self.read_one(deadline) {
            if pred(&m) {
                return Some(m);
            }
            self.inbox.push_back(m);
        }
        None
    }

    /// [`Session::try_take`] that must find one: fails naming `what`.
    #[track_caller]
    fn take(&mut self, what: &str, within: Duration, pred: impl Fn(&Msg) -> bool) -> Msg {
        match self.try_take(within, pred) {
            Some(m) => m,
            None => self.fail(format!("no {what} within {within:?}")),
        }
    }

    /// The next direct reply (Text frame).
    #[track_caller]
    fn reply(&mut self) -> Value {
        self.take("reply (Text frame)", WAIT, |m| !m.binary).v
    }

    #[track_caller]
    fn call(&mut self, text: &str) -> Value {
        self.send(text);
        self.reply()
    }

    /// `join_document`: the `joined_document`.
    #[track_caller]
    fn join(&mut self) -> Value {
        let v = self.call(r#"{"type":"join_document"}"#);
        if v["type"] != "joined_document" {
            self.fail(format!("join_document: {v}"));
        }
        v
    }

    /// `join_document` with `since`: the `joined_document` and the reply
    /// after it (a `sync_response` or an error).
    #[track_caller]
    fn join_since(&mut self, since: u64) -> (Value, Msg) {
        let v = self.call(&format!(r#"{{"type":"join_document","since":{since}}}"#));
        if v["type"] != "joined_document" {
            self.fail(format!("join_document since {since}: {v}"));
        }
        let next = self.take("reply after joined_document", WAIT, |m| !m.binary);
        (v, next)
    }

    /// `sync_request` since `since`: the reply.
    #[track_caller]
    fn sync(&mut self, since: u64) -> Msg {
        self.send(&format!(r#"{{"type":"sync_request","since":{since}}}"#));
        self.take("reply to sync_request", WAIT, |m| !m.binary)
    }

    /// `ping` answered by `pong` (broadcasts that come first are kept).
    #[track_caller]
    fn ping(&mut self) {
        self.send(r#"{"type":"ping"}"#);
        self.take("pong", WAIT, |m| !m.binary && m.ty() == "pong");
    }

    /// Sends an operation with `client_op_id` `id` and the JSON `payload`.
    #[track_caller]
    fn send_op(&mut self, id: &str, payload: &Value) {
        self.send(&json!({"type": "operation", "client_op_id": id, "payload": payload}).to_string());
    }

    /// The reply to the operation `id` (an `ack` or an `error`), within
    /// `within`.
    #[track_caller]
    fn op_reply(&mut self, id: &str, within: Duration) -> Value {
        self.take(&format!("reply to operation {id}"), within, |m| m.answers(id)).v
    }

    /// Sends an operation, which must be acked; returns its seq.
    #[track_caller]
    fn ack(&mut self, id: &str, payload: &Value) -> u64 {
        self.send_op(id, payload);
        let v = self.op_reply(id, WAIT);
        match (v["type"].as_str(), v["seq"].as_u64()) {
            (Some("ack"), Some(seq)) => seq,
            _ => self.fail(format!("operation {id} was not acked: {v}")),
        }
    }

    /// The next `n` operation broadcasts, in arrival order (bounded by
    /// `within` in all). A `lagged` notice fails the test.
    #[track_caller]
    fn ops(&mut self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(m) = self.try_take(left, |m| m.is_op() || m.ty() == "lagged") else {
                self.fail(format!("{} of {n} operations within {within:?}; got seqs {:?}", out.len(), seqs(&out)));
            };
            if m.ty() == "lagged" {
                self.fail(format!("lagged after seqs {:?}: {}", seqs(&out), m.text));
            }
            out.push(m.v);
        }
        out
    }

    /// No operation broadcast arrives within `quiet` (nor is one waiting in
    /// the inbox): nothing was delivered twice or beyond what was acked.
    #[track_caller]
    fn no_more_ops(&mut self, quiet: Duration) {
        if let Some(m) = self.try_take(quiet, |m| m.is_op() || m.ty() == "lagged") {
            self.fail(format!("an operation beyond the expected ones: {}", m.text));
        }
    }

    /// The next broadcast of type `ty` for which `pred` holds.
    #[track_caller]
    fn broadcast(&mut self, ty: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.take(&format!("{ty} broadcast"), within, |m| m.binary && m.ty() == ty && pred(&m.v)).v
    }

    /// An `EPOCH_CHANGED` error (Text frame).
    #[track_caller]
    fn epoch_changed(&mut self, within: Duration) -> Value {
        self.take("EPOCH_CHANGED error", within, |m| !m.binary && m.ty() == "error" && m.v["code"] == "EPOCH_CHANGED").v
    }
}

/// The seqs of operation messages.
fn seqs(ops: &[Value]) -> Vec<u64> {
    ops.iter().map(|o| o["seq"].as_u64().unwrap_or(0)).collect()
}

/// The participants of a `joined_document` as a set of their JSON texts
/// (their order is not asserted: see the module doc).
fn participant_set(joined: &Value) -> BTreeSet<String> {
    joined["participants"].as_array().expect("participants").iter().map(|p| p.to_string()).collect()
}

fn set_of(sessions: &[&Session]) -> BTreeSet<String> {
    sessions.iter().map(|s| s.participant().to_string()).collect()
}

/// A well-formed epoch: 16 lowercase hexadecimal digits.
fn is_epoch(v: &Value) -> bool {
    v.as_str().is_some_and(|e| e.len() == 16 && e.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Two writers and two readers of `d`, one of each on node `a` and on node
/// `b` (`{w}a`, `{w}b`, `ra`, `rb`), joined; returns once the readers see
/// each other, so presence has crossed the nodes and the document is live
/// on both.
fn writers_and_readers(a: &Node, b: &Node, d: &str, w: &str) -> (Session, Session, Session, Session) {
    let mut wa = a.session(d, &format!("{w}a"));
    let mut wb = b.session(d, &format!("{w}b"));
    let mut ra = a.session(d, "ra");
    let mut rb = b.session(d, "rb");
    for s in [&mut wa, &mut wb, &mut ra, &mut rb] {
        s.join();
    }
    ra.broadcast("user_joined", WAIT, |v| v["user_id"] == "rb");
    (wa, wb, ra, rb)
}

/// A fresh document id per test (the tests have separate Redis servers
/// anyway; this keeps their logs apart).
fn doc(name: &str) -> String {
    format!("cl-{name}")
}

// ---------------------------------------------------------------------------
// The Redis helper itself

#[test]
fn redis_helper_starts_stops_and_keeps_its_data_across_restarts() {
    let mut redis = Redis::start();
    let port = redis.port();
    assert!(redis.ping(), "PONG after start");
    assert_eq!(redis.command(&["SET", "k", "v1"]), Resp::Simple("OK".into()));
    assert_eq!(redis.command(&["RPUSH", "list", "a", "b"]), Resp::Integer(2));
    assert_eq!(
        redis.command(&["LRANGE", "list", "0", "-1"]),
        Resp::Array(Some(vec![Resp::Bulk(Some(b"a".to_vec())), Resp::Bulk(Some(b"b".to_vec()))]))
    );
    assert_eq!(redis.command(&["GET", "missing"]), Resp::Bulk(None));
    assert!(matches!(redis.command(&["NOSUCHCOMMAND"]), Resp::Error(_)));
    let config = |key: &str| match redis.command(&["CONFIG", "GET", key]) {
        Resp::Array(Some(items)) if items.len() == 2 => items[1].text().unwrap_or_default(),
        other => panic!("CONFIG GET {key}: {other:?}"),
    };
    assert_eq!(
        (config("appendonly"), config("appendfsync"), config("save")),
        ("yes".into(), "always".into(), "".into())
    );

    redis.stop();
    assert!(!redis.ping(), "no PONG once stopped");
    redis.start_again();
    assert_eq!(redis.port(), port, "the same port again");
    assert_eq!(redis.command(&["GET", "k"]).text().as_deref(), Some("v1"), "SET survives a SIGTERM restart");

    // appendfsync always: an acknowledged write survives a SIGKILL too.
    assert_eq!(redis.command(&["SET", "k", "v2"]), Resp::Simple("OK".into()));
    redis.kill();
    assert!(!redis.running());
    redis.start_again();
    assert_eq!(redis.command(&["GET", "k"]).text().as_deref(), Some("v2"), "SET survives a SIGKILL restart");

    assert_eq!(redis.command(&["FLUSHALL"]), Resp::Simple("OK".into()));
    assert_eq!(redis.command(&["GET", "k"]), Resp::Bulk(None), "FLUSHALL empties it");
    assert!(redis.dir().join("appendonlydir").is_dir(), "append-only files in its directory");
}

// ---------------------------------------------------------------------------
// Start-up

/// Runs `docrelay serve` on `config`, which must fail at start; returns
/// its stderr.
fn start_failure(config: &str) -> String {
    let dir = TempDir::new("cluster-refused");
    let file = dir.file("relay.toml", config);
    let mut child = Command::new(BIN)
        .args(["serve", "--config", &file, "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docrelay starts");
    let (log, _lines) = collect_stderr(&mut child);
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("docrelay did not exit at start (expected a refusal); stderr:\n{}", log.lock().unwrap());
        }
        thread::sleep(Duration::from_millis(20));
    };
    // Let the reader thread take the last lines.
    thread::sleep(Duration::from_millis(100));
    let stderr = log.lock().unwrap().clone();
    assert!(status.code().is_some_and(|c| c != 0), "expected a failing exit, got {status}; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "docrelay panicked:\n{stderr}");
    stderr
}

#[test]
fn storage_dir_with_redis_url_is_refused_at_start() {
    let tmp = TempDir::new("cluster-storage");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Nothing listens on the Redis port: the configuration is refused before
    // the relay would connect.
    let url = "redis://127.0.0.1:1/";
    let config = format!(
        "listen = \"127.0.0.1:0\"\ncores = [{}]\n[storage]\ndir = \"{}\"\n[cluster]\nredis_url = \"{url}\"\n",
        cpus()[0],
        data.display()
    );
    let stderr = start_failure(&config);
    assert!(
        stderr.contains("storage.dir") && stderr.contains("redis_url"),
        "the message names both keys (storage.dir and cluster.redis_url):\n{stderr}"
    );
    assert!(!stderr.contains("listening on"), "it never listened:\n{stderr}");

    // node_timeout_ms below its minimum (1000) is refused too, naming the key.
    let stderr = start_failure(
        &node_config(url, 0, Some("x"), "", "").replace("node_timeout_ms = 2000", "node_timeout_ms = 999"),
    );
    assert!(stderr.contains("node_timeout_ms"), "the message names cluster.node_timeout_ms:\n{stderr}");
}

// ---------------------------------------------------------------------------
// One order across nodes

/// What a sender on one node saw: its acks (seq, client_op_id) in arrival
/// order and the other sessions' operations it received.
struct Sent {
    acks: Vec<(u64, String)>,
    received: Vec<Value>,
}

/// Sends `n` operations with ids `{prefix}-{k}` and payloads
/// `{"from":prefix,"k":k}`, at most `window` unanswered at a time, while
/// reading the other sessions' operations, until it has every ack and
/// `expect_received` operations.
fn send_many(s: &mut Session, prefix: &str, n: usize, window: usize, expect_received: usize) -> Sent {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = Sent { acks: Vec::new(), received: Vec::new() };
    let mut next = 0;
    while sent.acks.len() < n || sent.received.len() < expect_received {
        while next < n && next - sent.acks.len() < window {
            s.send_op(&format!("{prefix}-{next}"), &json!({"from": prefix, "k": next}));
            next += 1;
        }
        let Some(m) = s.next_msg(deadline) else {
            s.fail(format!(
                "{} of {n} acks and {} of {expect_received} operations in 30 s",
                sent.acks.len(),
                sent.received.len()
            ));
        };
        match (m.binary, m.ty()) {
            (false, "ack") => {
                let id = m.v["client_op_id"].as_str().unwrap_or_default().to_string();
                let seq = m.v["seq"].as_u64().unwrap_or_else(|| s.fail(format!("an ack without seq: {}", m.text)));
                sent.acks.push((seq, id));
            }
            (true, "operation") => sent.received.push(m.v),
            (false, "error" | "lagged") => s.fail(format!("while sending: {}", m.text)),
            _ => {}
        }
    }
    sent
}

#[test]
fn concurrent_senders_on_two_nodes_produce_one_order_everywhere() {
    let redis = Redis::start();
    let nodes = start_nodes(&redis, 2, "", "");
    let (a, b) = (&nodes[0], &nodes[1]);
    let d = doc("order");
    // Everyone sees everyone before the operations start.
    let (mut sa, mut sb, mut ra, mut rb) = writers_and_readers(a, b, &d, "s");
    let (a_conn, b_conn) = (sa.conn_id(), sb.conn_id());

    const N: usize = 150;
    let go = AtomicBool::new(false);
    let (a_sent, b_sent, a_seen, b_seen) = thread::scope(|s| {
        let go = &go;
        let wait_go = move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !go.load(Ordering::Acquire) && Instant::now() < deadline {
                thread::yield_now();
            }
        };
        let ha = s.spawn(move || {
            wait_go();
            let sent = send_many(&mut sa, "a", N, 8, N);
            sa.no_more_ops(Duration::from_millis(300));
            sent
        });
        let hb = s.spawn(move || {
            wait_go();
            let sent = send_many(&mut sb, "b", N, 8, N);
            sb.no_more_ops(Duration::from_millis(300));
            sent
        });
        // Receivers read while the operations flow, and check at the end
        // that nothing more comes (no duplicates).
        let hra = s.spawn(move || {
            let ops = ra.ops(2 * N, Duration::from_secs(30));
            ra.no_more_ops(Duration::from_millis(300));
            ops
        });
        let hrb = s.spawn(move || {
            let ops = rb.ops(2 * N, Duration::from_secs(30));
            rb.no_more_ops(Duration::from_millis(300));
            ops
        });
        go.store(true, Ordering::Release);
        (join(ha), join(hb), join(hra), join(hrb))
    });

    // Acks: unique and gap-free across the nodes, increasing on each sender.
    let a_seqs: Vec<u64> = a_sent.acks.iter().map(|a| a.0).collect();
    let b_seqs: Vec<u64> = b_sent.acks.iter().map(|a| a.0).collect();
    assert!(a_seqs.windows(2).all(|w| w[0] < w[1]), "acks of the sender on node a in increasing seq: {a_seqs:?}");
    assert!(b_seqs.windows(2).all(|w| w[0] < w[1]), "acks of the sender on node b in increasing seq: {b_seqs:?}");
    let mut all: Vec<u64> = a_seqs.iter().chain(&b_seqs).copied().collect();
    all.sort();
    assert_eq!(all, (1..=2 * N as u64).collect::<Vec<_>>(), "the acks of both nodes are 1..={} once each", 2 * N);

    // Who sent which seq, with which payload.
    let mut expected: HashMap<u64, (u64, &str, Value)> = HashMap::new();
    for (sent, conn, user, prefix) in [(&a_sent, a_conn, "sa", "a"), (&b_sent, b_conn, "sb", "b")] {
        for (seq, id) in &sent.acks {
            let k: usize = id.strip_prefix(&format!("{prefix}-")).and_then(|k| k.parse().ok()).expect("our id");
            expected.insert(*seq, (conn, user, json!({"from": prefix, "k": k})));
        }
    }

    // Both receivers: every operation once, in strictly increasing seq, the
    // same sequence on both nodes, each as it was sent.
    assert_eq!(seqs(&a_seen), (1..=2 * N as u64).collect::<Vec<_>>(), "the receiver on node a: 1..={}", 2 * N);
    assert_eq!(a_seen, b_seen, "the receivers on node a and node b saw the same operations in the same order");
    for op in &a_seen {
        let seq = op["seq"].as_u64().unwrap();
        let (conn, user, payload) = &expected[&seq];
        assert_eq!(
            op,
            &json!({"type": "operation", "seq": seq, "connection_id": conn, "user_id": user, "payload": payload}),
            "operation {seq} as sent"
        );
    }
    // Each sender received exactly the other one's operations, in order,
    // and never its own.
    let others = |conn: u64| a_seen.iter().filter(|o| o["connection_id"] != conn).cloned().collect::<Vec<_>>();
    assert_eq!(a_sent.received, others(a_conn), "the sender on node a: node b's operations, in order, not its own");
    assert_eq!(b_sent.received, others(b_conn), "the sender on node b: node a's operations, in order, not its own");

    // New sessions on either node see the document's seq.
    let mut ra = a.session(&d, "ra2");
    let j = ra.join();
    assert_eq!(j["seq"], 2 * N as u64, "a new session on node a sees seq {}: {j}", 2 * N);
    let mut rb = b.session(&d, "rb2");
    let j = rb.join();
    assert_eq!(j["seq"], 2 * N as u64, "a new session on node b sees seq {}: {j}", 2 * N);
}

// ---------------------------------------------------------------------------
// Connection ids

#[test]
fn connection_ids_are_unique_across_nodes() {
    let redis = Redis::start();
    // The default node_id (host name and pid) on every node.
    let url = redis.url();
    let nodes: Vec<Node> = thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let config = node_config(&url, i, None, "", "");
                s.spawn(move || Node::start_with(&format!("n{i}"), &config))
            })
            .collect();
        hs.into_iter().map(join).collect()
    });
    let d = doc("ids");
    let mut sessions: Vec<Session> = Vec::new();
    for i in 0..12 {
        sessions.push(nodes[i % 3].session(&d, &format!("u{i}")));
    }
    let conns: Vec<u64> = sessions.iter().map(Session::conn_id).collect();
    let unique: HashSet<u64> = conns.iter().copied().collect();
    assert_eq!(unique.len(), conns.len(), "auth_result connection_ids of 12 sessions on 3 nodes: {conns:?}");
    let session_ids: HashSet<String> = sessions.iter().map(|s| s.auth["session_id"].to_string()).collect();
    assert_eq!(session_ids.len(), 12, "session_ids are unique too");

    // Join all but the last; the first sees each of the others join, with
    // its connection_id.
    for s in sessions.iter_mut().take(11) {
        s.join();
    }
    let (first, rest) = sessions.split_first_mut().unwrap();
    for other in rest.iter().take(10) {
        let conn = other.conn_id();
        let v = first.broadcast("user_joined", WAIT, |v| v["connection_id"] == conn);
        assert_eq!(v["user_id"], other.user(), "user_joined of {}: {v}", other.name);
    }
    let last = rest.last_mut().unwrap();
    let j = last.join();
    assert_eq!(j["participant_count"], 12, "12 participants on 3 nodes: {j}");
    let listed: Vec<u64> =
        j["participants"].as_array().unwrap().iter().map(|p| p["connection_id"].as_u64().unwrap()).collect();
    assert_eq!(listed.iter().copied().collect::<HashSet<_>>(), unique, "participants carry the auth_result ids: {j}");
    assert_eq!(listed.len(), 12, "each participant once: {j}");
    let conn = last.conn_id();
    first.broadcast("user_joined", WAIT, |v| v["connection_id"] == conn);

    // Operations carry the sender's connection_id.
    let mut by_seq: HashMap<u64, u64> = HashMap::new();
    for s in rest.iter_mut() {
        let seq = s.ack(&format!("op-{}", s.conn_id()), &json!(s.conn_id()));
        by_seq.insert(seq, s.conn_id());
    }
    for op in first.ops(11, WAIT) {
        let seq = op["seq"].as_u64().unwrap();
        assert_eq!(op["connection_id"], by_seq[&seq], "operation {seq} names its sender: {op}");
    }

    // user_left carries the leaver's id.
    let leaver = sessions.pop().unwrap();
    let conn = leaver.conn_id();
    drop(leaver);
    let v = sessions[0].broadcast("user_left", WAIT, |v| v["connection_id"] == conn);
    assert_eq!(v["user_id"], "u11", "{v}");
}

// ---------------------------------------------------------------------------
// Presence

#[test]
fn presence_crosses_nodes() {
    let redis = Redis::start();
    let nodes = start_nodes(&redis, 2, "", "");
    let (a, b) = (&nodes[0], &nodes[1]);
    let d = doc("presence");
    let mut ada = a.session(&d, "ada");
    let j = ada.join();
    assert_eq!(participant_set(&j), set_of(&[&ada]), "{j}");
    assert_eq!(j["participant_count"], 1, "{j}");

    let mut bob = b.session(&d, "bob");
    let j = bob.join();
    assert_eq!(participant_set(&j), set_of(&[&ada, &bob]), "node b lists node a's participant too: {j}");
    assert_eq!(j["participant_count"], 2, "{j}");
    let v = ada.broadcast("user_joined", WAIT, |_| true);
    assert_eq!(
        v,
        json!({"type": "user_joined", "connection_id": bob.conn_id(), "user_id": "bob", "user_name": "bob", "color": bob.color()}),
        "ada (node a) is told of bob (node b)"
    );

    let mut cy = a.session(&d, "cy");
    let j = cy.join();
    assert_eq!(participant_set(&j), set_of(&[&ada, &bob, &cy]), "{j}");
    assert_eq!(j["participant_count"], 3, "{j}");
    let v = bob.broadcast("user_joined", WAIT, |_| true);
    assert_eq!(v["connection_id"], cy.conn_id(), "bob (node b) is told of cy (node a): {v}");
    ada.broadcast("user_joined", WAIT, |v| v["connection_id"] == cy.conn_id());

    // Cursors, both ways.
    bob.send(r#"{"type":"cursor","payload":{"at":4}}"#);
    for s in [&mut ada, &mut cy] {
        let v = s.broadcast("cursor", WAIT, |_| true);
        assert_eq!(
            v,
            json!({"type": "cursor", "connection_id": bob.conn_id(), "user_id": "bob", "color": bob.color(), "payload": {"at": 4}}),
            "{} gets bob's cursor from node b",
            s.name
        );
    }
    ada.send(r#"{"type":"cursor","payload":[1,2]}"#);
    let v = bob.broadcast("cursor", WAIT, |_| true);
    assert_eq!(
        v,
        json!({"type": "cursor", "connection_id": ada.conn_id(), "user_id": "ada", "color": ada.color(), "payload": [1, 2]}),
        "bob gets ada's cursor from node a"
    );
    cy.broadcast("cursor", WAIT, |v| v["connection_id"] == ada.conn_id());
    // The sender does not get its own cursor back.
    ada.ping();
    let ada_conn = ada.conn_id();
    let own = ada.try_take(Duration::from_millis(300), |m| m.ty() == "cursor" && m.v["connection_id"] == ada_conn);
    assert!(own.is_none(), "ada got her own cursor back: {own:?}");

    // leave_document on node b: user_left on node a.
    let v = bob.call(r#"{"type":"leave_document"}"#);
    assert_eq!(v, json!({"type": "left_document", "document_id": d}), "bob leaves");
    for s in [&mut ada, &mut cy] {
        let v = s.broadcast("user_left", WAIT, |_| true);
        assert_eq!(v, json!({"type": "user_left", "connection_id": bob.conn_id(), "user_id": "bob"}), "{}", s.name);
    }
    let j = bob.join();
    assert_eq!(participant_set(&j), set_of(&[&ada, &bob, &cy]), "joined again: {j}");

    // A connection that ends (no leave_document) on node a: user_left on node b.
    let cy_conn = cy.conn_id();
    drop(cy);
    let v = bob.broadcast("user_left", WAIT, |v| v["connection_id"] == cy_conn);
    assert_eq!(
        v,
        json!({"type": "user_left", "connection_id": cy_conn, "user_id": "cy"}),
        "bob is told cy's connection ended"
    );
    let mut dan = b.session(&d, "dan");
    let j = dan.join();
    assert_eq!(participant_set(&j), set_of(&[&ada, &bob, &dan]), "cy is gone from the list: {j}");
    assert_eq!(j["participant_count"], 3, "{j}");
}

// ---------------------------------------------------------------------------
// A node that dies

#[test]
fn a_killed_nodes_sessions_leave_within_the_node_timeout() {
    let redis = Redis::start();
    let mut nodes = start_nodes(&redis, 2, "", "");
    let d = doc("sigkill");
    let mut ada = nodes[0].session(&d, "ada");
    let mut ann = nodes[0].session(&d, "ann");
    ada.join();
    ann.join();
    let mut bob = nodes[1].session(&d, "bob");
    let j = bob.join();
    assert_eq!(participant_set(&j), set_of(&[&ada, &ann, &bob]), "{j}");
    let gone: HashSet<u64> = [ada.conn_id(), ann.conn_id()].into();
    // An operation through node a, so that it is an active part of the
    // document, not just present.
    let seq = ada.ack("before", &json!("before"));
    assert_eq!(bob.ops(1, WAIT)[0]["seq"], seq, "bob (node b) gets ada's operation (node a)");

    let killed_at = Instant::now();
    nodes[0].kill();
    let bound = Duration::from_millis(NODE_TIMEOUT_MS + NODE_TIMEOUT_SLACK_MS);
    let mut left = HashSet::new();
    let mut last = Duration::ZERO;
    while left.len() < gone.len() {
        let v = bob.broadcast("user_left", bound + Duration::from_secs(5), |_| true);
        let conn = v["connection_id"].as_u64().unwrap();
        assert!(gone.contains(&conn), "user_left of a session of the killed node: {v}");
        left.insert(conn);
        last = killed_at.elapsed();
    }
    eprintln!(
        "user_left of the killed node's sessions after {} ms (node_timeout_ms {NODE_TIMEOUT_MS}, allowed {} ms)",
        last.as_millis(),
        bound.as_millis()
    );
    assert!(
        last <= bound,
        "user_left came {} ms after the SIGKILL, more than node_timeout_ms {NODE_TIMEOUT_MS} + {NODE_TIMEOUT_SLACK_MS} ms",
        last.as_millis()
    );

    // The dead node's sessions are gone from the participants, and the
    // document goes on through node b.
    let mut cy = nodes[1].session(&d, "cy");
    let j = cy.join();
    assert_eq!(participant_set(&j), set_of(&[&bob, &cy]), "only node b's sessions are left: {j}");
    assert_eq!(j["participant_count"], 2, "{j}");
    assert_eq!(j["seq"], seq, "{j}");
    assert_eq!(bob.ack("after", &json!("after")), seq + 1, "bob's operation after the kill");
    assert_eq!(cy.ops(1, WAIT)[0]["payload"], "after", "cy gets bob's operation");
}

// ---------------------------------------------------------------------------
// History and snapshots

/// A payload with spacing of its own, to check it comes back byte for byte.
fn hist_payload(i: u64) -> String {
    format!(r#"{{"n": {i},  "s":"op {i}"}}"#)
}

#[test]
fn history_and_snapshots_are_served_by_every_node() {
    let redis = Redis::start();
    // history_ops = 10: the stream keeps the last 10 operations.
    let nodes = start_nodes(&redis, 3, "", "[documents]\nhistory_ops = 10\n");
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let d = doc("history");
    let mut w = a.session(&d, "writer");
    let jw = w.join();
    let epoch = jw["epoch"].clone();
    assert!(is_epoch(&epoch), "{jw}");
    // A reader on node b, joined from the start (the document is loaded there).
    let mut rb = b.session(&d, "rb");
    let jb = rb.join();
    assert_eq!(jb["epoch"], epoch, "node b has node a's epoch: {jb}");

    for i in 1..=30 {
        w.send(&format!(r#"{{"type":"operation","client_op_id":"h{i}","payload":{}}}"#, hist_payload(i)));
        let v = w.op_reply(&format!("h{i}"), WAIT);
        assert_eq!(v, json!({"type": "ack", "seq": i, "client_op_id": format!("h{i}")}), "operation {i} on node a");
    }
    let live = rb.ops(30, WAIT);
    assert_eq!(seqs(&live), (1..=30).collect::<Vec<_>>(), "node b delivers node a's 30 operations live");
    let state = r#"{"text": "after 25",  "n": 25.50}"#;
    let v = w.call(&format!(r#"{{"type":"snapshot","seq":25,"state":{state}}}"#));
    assert_eq!(v, json!({"type": "ack", "seq": 25}), "the snapshot is acked by node a");

    // The expected operations, from what node b delivered live.
    let w_conn = w.conn_id();
    let op_text = |seq: u64| {
        format!(
            r#"{{"type":"operation","seq":{seq},"connection_id":{w_conn},"user_id":"writer","payload":{}}}"#,
            hist_payload(seq)
        )
    };
    for op in &live {
        let seq = op["seq"].as_u64().unwrap();
        assert_eq!(op, &serde_json::from_str::<Value>(&op_text(seq)).unwrap(), "live operation {seq}");
    }

    // Checks a sync_response text: seq 30, the epoch, `snapshot` as
    // expected, and exactly the operations `first..=30`, byte for byte.
    let check = |who: &str, m: &Msg, snapshot: bool, first: u64| {
        let ops = first..=30;
        assert_eq!(m.ty(), "sync_response", "{who}: {}", m.text);
        assert_eq!(
            (m.v["seq"].as_u64(), &m.v["epoch"], &m.v["more"]),
            (Some(30), &epoch, &json!(false)),
            "{who}: {}",
            m.text
        );
        if snapshot {
            assert_eq!(m.v["snapshot"]["seq"], 25, "{who}: the snapshot stored through node a: {}", m.text);
            assert!(m.text.contains(&format!(r#""state":{state}"#)), "{who}: the state byte for byte: {}", m.text);
        } else {
            assert_eq!(m.v["snapshot"], Value::Null, "{who}: history alone answers: {}", m.text);
        }
        let got: Vec<u64> = seqs(m.v["ops"].as_array().unwrap());
        assert_eq!(got, ops.clone().collect::<Vec<_>>(), "{who}: ops: {}", m.text);
        for seq in ops {
            assert!(m.text.contains(&op_text(seq)), "{who}: operation {seq} byte for byte: {}", m.text);
        }
    };

    // Node c loads the document only now: from Redis.
    let mut rc = c.session(&d, "rc");
    let (jc, m) = rc.join_since(0);
    assert_eq!((&jc["seq"], &jc["epoch"]), (&json!(30), &epoch), "node c: {jc}");
    check("node c, join since 0", &m, true, 26);
    check("node c, sync since 15", &rc.sync(15), true, 26);
    check("node c, sync since 22", &rc.sync(22), false, 23);
    check("node c, sync since 30", &rc.sync(30), false, 31);
    let m = rc.sync(31);
    assert_eq!((m.ty(), &m.v["code"]), ("error", &json!("HISTORY_UNAVAILABLE")), "since ahead: {}", m.text);

    // Node b had the document loaded all along: it serves the snapshot
    // stored through node a as well.
    check("node b, sync since 0", &rb.sync(0), true, 26);
    check("node b, sync since 20", &rb.sync(20), false, 21);
    let mut rb2 = b.session(&d, "rb2");
    let (_, m) = rb2.join_since(3);
    check("node b, join since 3", &m, true, 26);

    // And the document goes on from any node.
    assert_eq!(rc.ack("c31", &json!("from c")), 31, "an operation through node c continues at 31");
    assert_eq!(w.ops(1, WAIT)[0]["payload"], "from c", "node a delivers node c's operation");
    assert_eq!(rb.ops(1, WAIT)[0]["seq"], 31, "node b delivers node c's operation");
}

// ---------------------------------------------------------------------------
// Redis unreachable

/// Retries an operation (ids `{prefix}-{k}`, payload = the id) until it is
/// acked, within `within`; every refusal must be `UNAVAILABLE` carrying its
/// `client_op_id`. Returns the acked (seq, id) and the refused ids.
fn ack_when_back(s: &mut Session, prefix: &str, within: Duration) -> ((u64, String), Vec<String>) {
    let deadline = Instant::now() + within;
    let mut refused = Vec::new();
    for k in 0.. {
        let id = format!("{prefix}-{k}");
        s.send_op(&id, &json!(id));
        let v = s.op_reply(&id, WAIT);
        match v["type"].as_str() {
            Some("ack") => return ((v["seq"].as_u64().unwrap(), id), refused),
            Some("error") if v["code"] == "UNAVAILABLE" => refused.push(id),
            _ => s.fail(format!("operation {id}: expected an ack or UNAVAILABLE, got {v}")),
        }
        if Instant::now() >= deadline {
            s.fail(format!("no operation acked within {within:?} after Redis came back ({} refused)", refused.len()));
        }
        thread::sleep(Duration::from_millis(200));
    }
    unreachable!()
}

#[test]
fn while_redis_is_down_operations_are_unavailable_and_acked_again_once_it_is_back() {
    let mut redis = Redis::start();
    let nodes = start_nodes(&redis, 2, "", "");
    let (a, b) = (&nodes[0], &nodes[1]);
    let d = doc("redis-down");
    let (mut wa, mut wb, mut ra, mut rb) = writers_and_readers(a, b, &d, "w");
    let mut acked: Vec<(u64, String)> = Vec::new();
    for k in 0..3 {
        for (s, p) in [(&mut wa, "a"), (&mut wb, "b")] {
            let id = format!("{p}-up-{k}");
            acked.push((s.ack(&id, &json!(id)), id));
        }
    }
    assert_eq!(acked.iter().map(|a| a.0).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>(), "acks before the stop");
    assert_eq!(a.healthz().0, 200, "node a is healthy while Redis is up");

    redis.stop();
    let mut refused: Vec<String> = Vec::new();
    for (s, p) in [(&mut wa, "a"), (&mut wb, "b")] {
        let id = format!("{p}-down");
        s.send_op(&id, &json!(id));
        let v = s.op_reply(&id, WAIT);
        assert_eq!((&v["type"], &v["code"]), (&json!("error"), &json!("UNAVAILABLE")), "{}: {v}", s.name);
        refused.push(id);
    }
    // The sessions stay open.
    for s in [&mut wa, &mut wb, &mut ra, &mut rb] {
        s.ping();
    }
    for n in [a, b] {
        let body = n.healthz_becomes(503, Duration::from_secs(5));
        eprintln!("node {}: /healthz while Redis is down: 503 {body:?}", n.name);
        assert!(body.to_lowercase().contains("redis"), "node {}: the 503 body says why (Redis): {body:?}", n.name);
        assert_eq!(metric(n.addr(), "docrelay_cluster_redis_up"), 0, "node {}", n.name);
        assert!(metric(n.addr(), "docrelay_cluster_unavailable_total") >= 1, "node {}", n.name);
    }
    // What a node holds is still served: the history, from either node.
    for r in [&mut ra, &mut rb] {
        let sync = r.sync(0);
        let got: Vec<u64> =
            sync.v["ops"].as_array().map_or(Vec::new(), |o| o.iter().filter_map(|o| o["seq"].as_u64()).collect());
        assert_eq!(got, (1..=6).collect::<Vec<_>>(), "{}: sync_request while Redis is down: {}", r.name, sync.text);
    }

    redis.start_again();
    let (first, r) = ack_when_back(&mut wa, "a-back", Duration::from_secs(15));
    refused.extend(r);
    assert_eq!(first.0, 7, "refused operations took no seq: the first acked after Redis is back is 7");
    acked.push(first);
    let (first, r) = ack_when_back(&mut wb, "b-back", Duration::from_secs(15));
    refused.extend(r);
    assert_eq!(first.0, 8, "node b's first acked operation after Redis is back");
    acked.push(first);
    for k in 0..3 {
        for (s, p) in [(&mut wa, "a"), (&mut wb, "b")] {
            let id = format!("{p}-again-{k}");
            acked.push((s.ack(&id, &json!(id)), id));
        }
    }
    assert_eq!(acked.iter().map(|a| a.0).collect::<Vec<_>>(), (1..=14).collect::<Vec<_>>(), "{acked:?}");
    for n in [a, b] {
        n.healthz_becomes(200, Duration::from_secs(5));
    }

    // Every acked operation exactly once, in order, on both nodes; refused
    // ones never.
    let ids: Vec<Value> = acked.iter().map(|(_, id)| json!(id)).collect();
    for r in [&mut ra, &mut rb] {
        let ops = r.ops(14, Duration::from_secs(10));
        assert_eq!(seqs(&ops), (1..=14).collect::<Vec<_>>(), "{}", r.name);
        let payloads: Vec<Value> = ops.iter().map(|o| o["payload"].clone()).collect();
        assert_eq!(payloads, ids, "{}: the acked operations, in seq order", r.name);
        r.no_more_ops(Duration::from_millis(500));
    }
    let of =
        |p: &str| -> Vec<Value> { ids.iter().filter(|id| !id.as_str().unwrap().starts_with(p)).cloned().collect() };
    let got_a: Vec<Value> = wa.ops(7, WAIT).iter().map(|o| o["payload"].clone()).collect();
    assert_eq!(got_a, of("a-"), "wa: wb's acked operations");
    let got_b: Vec<Value> = wb.ops(7, WAIT).iter().map(|o| o["payload"].clone()).collect();
    assert_eq!(got_b, of("b-"), "wb: wa's acked operations");
    wa.no_more_ops(Duration::from_millis(200));
    wb.no_more_ops(Duration::from_millis(200));
    assert!(!refused.is_empty(), "some operations were refused while Redis was down");
}

/// A writer thread's record: acked (seq, id) in order and refused ids.
#[derive(Default)]
struct Written {
    acked: Vec<(u64, String)>,
    refused: Vec<String>,
}

/// Writes operations one at a time (payload = the id `{prefix}-{k}`) until
/// `stop`; counts acks in `acks` and refusals (`UNAVAILABLE` only) in
/// `refusals`, pausing 50 ms after each refusal.
fn write_until(
    s: &mut Session,
    prefix: &str,
    stop: &AtomicBool,
    acks: &AtomicUsize,
    refusals: &AtomicUsize,
) -> Written {
    let mut w = Written::default();
    let mut k = 0;
    while !stop.load(Ordering::Acquire) {
        let id = format!("{prefix}-{k}");
        k += 1;
        s.send_op(&id, &json!(id));
        // An operation sent just as Redis went away may take a while to be
        // answered either way.
        let v = s.op_reply(&id, Duration::from_secs(15));
        match v["type"].as_str() {
            Some("ack") => {
                w.acked.push((v["seq"].as_u64().unwrap(), id));
                acks.fetch_add(1, Ordering::AcqRel);
                thread::sleep(Duration::from_millis(5));
            }
            Some("error") if v["code"] == "UNAVAILABLE" => {
                w.refused.push(id);
                refusals.fetch_add(1, Ordering::AcqRel);
                thread::sleep(Duration::from_millis(50));
            }
            _ => s.fail(format!("operation {id}: expected an ack or UNAVAILABLE, got {v}")),
        }
    }
    w
}

/// Polls until `f` holds (bounded by `within`), failing with `what`.
#[track_caller]
fn wait_until(what: &str, within: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out ({within:?}) waiting for: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn redis_restarted_while_operations_stream_loses_and_repeats_nothing() {
    let mut redis = Redis::start();
    let nodes = start_nodes(&redis, 2, "", "");
    let (a, b) = (&nodes[0], &nodes[1]);
    let d = doc("redis-restart");
    let (mut wa, mut wb, mut ra, mut rb) = writers_and_readers(a, b, &d, "w");

    let stop = AtomicBool::new(false);
    let counts: [(AtomicUsize, AtomicUsize); 2] = Default::default();
    let (from_a, from_b) = thread::scope(|s| {
        let (stop, counts) = (&stop, &counts);
        let ha = s.spawn(move || write_until(&mut wa, "a", stop, &counts[0].0, &counts[0].1));
        let hb = s.spawn(move || write_until(&mut wb, "b", stop, &counts[1].0, &counts[1].1));
        let acks = |i: usize| counts[i].0.load(Ordering::Acquire);
        let refusals = |i: usize| counts[i].1.load(Ordering::Acquire);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until("10 acks on each node", Duration::from_secs(10), || acks(0) >= 10 && acks(1) >= 10);
            redis.stop();
            // A writer whose operation was on its way as Redis went away
            // waits for its answer until Redis is back (the outcome is not
            // known before: it may have been sequenced); the others are
            // refused at once.
            a.healthz_becomes(503, Duration::from_secs(5));
            b.healthz_becomes(503, Duration::from_secs(5));
            thread::sleep(Duration::from_millis(500));
            eprintln!("refused while Redis is down, so far: {} on node a, {} on node b", refusals(0), refusals(1));
            let before = (acks(0), acks(1));
            redis.start_again();
            wait_until("10 more acks on each node after Redis came back", Duration::from_secs(15), || {
                acks(0) >= before.0 + 10 && acks(1) >= before.1 + 10
            });
        }));
        stop.store(true, Ordering::Release);
        let written = (join(ha), join(hb));
        if let Err(payload) = result {
            std::panic::resume_unwind(payload);
        }
        written
    });

    // The acks of both nodes: 1..=K, each once.
    let mut by_seq: HashMap<u64, String> = HashMap::new();
    for (seq, id) in from_a.acked.iter().chain(&from_b.acked) {
        assert!(by_seq.insert(*seq, id.clone()).is_none(), "seq {seq} acked twice");
    }
    let k = by_seq.len() as u64;
    let mut all: Vec<u64> = by_seq.keys().copied().collect();
    all.sort();
    assert_eq!(all, (1..=k).collect::<Vec<_>>(), "acks gap-free across the nodes (refused operations take no seq)");
    eprintln!(
        "{k} operations acked; refused while Redis was away: {} on node a, {} on node b",
        from_a.refused.len(),
        from_b.refused.len()
    );
    let refused: HashSet<&String> = from_a.refused.iter().chain(&from_b.refused).collect();

    // Both receivers: exactly the acked operations, in order, once each.
    for r in [&mut ra, &mut rb] {
        let ops = r.ops(k as usize, Duration::from_secs(15));
        for (i, op) in ops.iter().enumerate() {
            let seq = op["seq"].as_u64().unwrap();
            let id = op["payload"].as_str().unwrap_or_default();
            assert!(
                !refused.contains(&id.to_string()),
                "{}: operation {id} was refused with UNAVAILABLE, yet delivered as seq {seq}",
                r.name
            );
            assert_eq!(seq, i as u64 + 1, "{}: seqs in order without gaps: {:?}", r.name, seqs(&ops));
            assert_eq!(id, by_seq[&seq], "{}: seq {seq} is the operation acked with it", r.name);
        }
        r.no_more_ops(Duration::from_millis(500));
    }
}

// ---------------------------------------------------------------------------
// Restarts and lost data

#[test]
fn all_nodes_restarted_keep_seq_epoch_and_history() {
    let redis = Redis::start();
    let mut nodes = start_nodes(&redis, 2, "", "");
    let d = doc("restart");
    let mut ada = nodes[0].session(&d, "ada");
    let mut bob = nodes[1].session(&d, "bob");
    let j = ada.join();
    let epoch = j["epoch"].clone();
    assert!(is_epoch(&epoch), "{j}");
    assert_eq!(bob.join()["epoch"], epoch, "one epoch on both nodes");
    for i in 1..=6u64 {
        let s = if i % 2 == 1 { &mut ada } else { &mut bob };
        assert_eq!(s.ack(&format!("r{i}"), &json!({"i": i})), i, "operation {i} before the restart");
    }
    let old_ops = bob.ops(3, WAIT);
    let ada_conn = ada.conn_id();
    drop(ada);
    drop(bob);
    for n in &mut nodes {
        n.stop();
    }
    drop(nodes);

    let nodes = start_nodes(&redis, 2, "", "");
    let mut cy = nodes[0].session(&d, "cy");
    let j = cy.join();
    assert_eq!((&j["seq"], &j["epoch"]), (&json!(6), &epoch), "after the restart of every node: {j}");
    assert_eq!(participant_set(&j), set_of(&[&cy]), "no participant of the stopped nodes is left: {j}");
    let mut dan = nodes[1].session(&d, "dan");
    let (j, m) = dan.join_since(0);
    assert_eq!((&j["seq"], &j["epoch"]), (&json!(6), &epoch), "{j}");
    assert_eq!(m.ty(), "sync_response", "{}", m.text);
    assert_eq!((&m.v["epoch"], &m.v["snapshot"]), (&epoch, &Value::Null), "{}", m.text);
    let ops = m.v["ops"].as_array().unwrap();
    assert_eq!(seqs(ops), (1..=6).collect::<Vec<_>>(), "{}", m.text);
    for op in ops {
        let i = op["seq"].as_u64().unwrap();
        assert_eq!(op["payload"], json!({"i": i}), "{op}");
    }
    // ada's operations, as bob had them live before the restart.
    let from_ada: Vec<&Value> = ops.iter().filter(|o| o["connection_id"] == ada_conn).collect();
    assert_eq!(from_ada, old_ops.iter().collect::<Vec<_>>(), "history as delivered before the restart");
    assert_eq!(dan.ack("r7", &json!({"i": 7})), 7, "seq goes on");
    assert_eq!(cy.ops(1, WAIT)[0]["seq"], 7, "cy (node a) gets dan's operation (node b) after the restart");
}

#[test]
fn flushall_starts_a_new_epoch_at_seq_1() {
    let redis = Redis::start();
    let nodes = start_nodes(&redis, 2, "", "");
    let d = doc("flushall");
    let mut ada = nodes[0].session(&d, "ada");
    let mut bob = nodes[1].session(&d, "bob");
    let old = ada.join()["epoch"].clone();
    assert_eq!(bob.join()["epoch"], old, "one epoch on both nodes");
    for i in 1..=5u64 {
        let s = if i % 2 == 1 { &mut ada } else { &mut bob };
        assert_eq!(s.ack(&format!("old{i}"), &json!(i)), i, "operation {i} before FLUSHALL");
    }
    bob.ops(3, WAIT);
    ada.ops(2, WAIT);

    assert_eq!(redis.command(&["FLUSHALL"]), Resp::Simple("OK".into()), "FLUSHALL");
    // The next operation (or the nodes' periodic check) finds the history
    // gone: a new epoch, told to every joined session.
    ada.send_op("new1", &json!("new1"));
    let ea = ada.epoch_changed(WAIT);
    let new = ea["epoch"].clone();
    assert!(is_epoch(&new) && new != old, "EPOCH_CHANGED names a new epoch (old {old}): {ea}");
    let eb = bob.epoch_changed(WAIT);
    assert_eq!(eb["epoch"], new, "bob (node b) is told the same new epoch: {eb}");

    // The operation that ran into the loss: acked in the new history (as its
    // seq 1), or refused (its error may be the EPOCH_CHANGED itself, with its
    // client_op_id); either way the new history starts at 1.
    let v = if ea["client_op_id"] == "new1" { ea.clone() } else { ada.op_reply("new1", WAIT) };
    assert!(
        v["type"] == "ack" || (v["type"] == "error" && (v["code"] == "EPOCH_CHANGED" || v["code"] == "UNAVAILABLE")),
        "the operation new1: an ack, or EPOCH_CHANGED or UNAVAILABLE: {v}"
    );
    let mut expect_next = 1;
    if v["type"] == "ack" {
        assert_eq!(v["seq"], 1, "the first operation of the new history is seq 1: {v}");
        let op = bob.ops(1, WAIT).remove(0);
        assert_eq!((&op["seq"], &op["payload"]), (&json!(1), &json!("new1")), "{op}");
        expect_next = 2;
    }
    let s2 = bob.ack("new2", &json!("new2"));
    assert_eq!(s2, expect_next, "bob's operation continues the new history");
    let s3 = ada.ack("new3", &json!("new3"));
    assert_eq!(s3, expect_next + 1, "ada's operation after bob's in the new history");
    let op = ada.ops(1, WAIT).remove(0);
    assert_eq!((&op["seq"], &op["payload"]), (&json!(s2), &json!("new2")), "ada: {op}");
    let op = bob.ops(1, WAIT).remove(0);
    assert_eq!((&op["seq"], &op["payload"]), (&json!(s3), &json!("new3")), "bob: {op}");

    // The old epoch is refused, the new one answered, from either node.
    bob.send(&format!(r#"{{"type":"sync_request","since":5,"epoch":{old}}}"#));
    let e = bob.epoch_changed(WAIT);
    assert_eq!(e["epoch"], new, "a sync_request with the old epoch: EPOCH_CHANGED with the new one: {e}");
    for n in &nodes {
        let mut c = n.session(&d, "late");
        let j = c.join();
        assert_eq!((&j["seq"], &j["epoch"]), (&json!(s3), &new), "node {}: {j}", n.name);
        c.send(&format!(r#"{{"type":"sync_request","since":0,"epoch":{new}}}"#));
        let m = c.take("sync_response", WAIT, |m| !m.binary);
        assert_eq!(m.ty(), "sync_response", "node {}: {}", n.name, m.text);
        assert_eq!(
            seqs(m.v["ops"].as_array().unwrap()),
            (1..=s3).collect::<Vec<_>>(),
            "only the new history: {}",
            m.text
        );
    }
}

// ---------------------------------------------------------------------------
// Lost notifications

/// Stops node `b` (SIGSTOP), cuts every subscription in Redis, has node `a`'s
/// writer sequence `n` operations that `b` therefore never hears of, and lets
/// `b` go on (SIGCONT): `b` finds its subscription gone, reconnects and must
/// take the operations from the document's stream. Returns `b`'s receiver.
fn miss_notifications(redis: &Redis, nodes: &[Node], d: &str, n: usize) -> Session {
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut wa = a.session(d, "wa");
    let mut rb = b.session(d, "rb");
    wa.join();
    rb.join();
    wa.broadcast("user_joined", WAIT, |v| v["user_id"] == "rb");
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &b.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig} node b");
    };
    signal("-STOP");
    let cut = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    eprintln!("subscriptions cut: {cut:?}");
    for i in 0..n {
        wa.ack(&format!("m{i}"), &json!(i));
    }
    // Well within the node timeout: b is not taken for dead meanwhile.
    signal("-CONT");
    rb
}

#[test]
fn a_node_that_missed_notifications_takes_them_from_the_stream() {
    let redis = Redis::start();
    let nodes = start_nodes(&redis, 2, "", "");
    let mut rb = miss_notifications(&redis, &nodes, &doc("missed"), 30);
    let ops = rb.ops(30, PATIENCE);
    assert_eq!(seqs(&ops), (1..=30).collect::<Vec<_>>(), "every operation once, in order");
    for (i, op) in ops.iter().enumerate() {
        assert_eq!(op["payload"], json!(i));
    }
    rb.no_more_ops(Duration::from_millis(300));
    let filled = metric(nodes[1].addr(), "docrelay_cluster_gap_fills_total");
    assert!(filled >= 30, "node b took the operations from the stream ({filled})");
    assert_eq!(metric(nodes[1].addr(), "docrelay_cluster_gap_lost_total"), 0);
}

#[test]
fn what_the_stream_no_longer_holds_becomes_lagged() {
    let redis = Redis::start();
    // The stream keeps 5 operations; the missed 30 are mostly gone.
    let nodes = start_nodes(&redis, 2, "stream_max_ops = 5", "");
    let mut rb = miss_notifications(&redis, &nodes, &doc("trimmed"), 30);
    let lagged = rb.take("lagged", PATIENCE, |m| m.ty() == "lagged");
    assert_eq!(
        (lagged.v["missed_from"].as_u64(), lagged.v["missed_to"].as_u64()),
        (Some(1), Some(25)),
        "{}",
        lagged.text
    );
    let ops = rb.ops(5, PATIENCE);
    assert_eq!(seqs(&ops), (26..=30).collect::<Vec<_>>(), "then the operations the stream held, in order");
    rb.no_more_ops(Duration::from_millis(300));
    assert_eq!(metric(nodes[1].addr(), "docrelay_cluster_gap_lost_total"), 25);
}

// ---------------------------------------------------------------------------
// A Redis Cluster

#[test]
fn a_redis_cluster_of_three_primaries_serves_documents_in_every_slot() {
    let rc = common::redis::RedisCluster::start(3);
    let nodes: Vec<Node> = (0..2)
        .map(|i| {
            let name = ((b'a' + i as u8) as char).to_string();
            Node::start_with(&name, &node_config(&rc.url(), i, Some(&name), "redis_cluster = true", ""))
        })
        .collect();
    let docs: Vec<String> = (0..6).map(|i| doc(&format!("slot{i}"))).collect();
    for d in &docs {
        let mut ada = nodes[0].session(d, "ada");
        let mut bob = nodes[1].session(d, "bob");
        ada.join();
        let joined = bob.join();
        assert_eq!(joined["participant_count"], 2, "{joined}");
        ada.broadcast("user_joined", WAIT, |v| v["user_id"] == "bob");
        for k in 1..=5u64 {
            assert_eq!(ada.ack(&format!("a{k}"), &json!(k)), k, "{d}");
        }
        assert_eq!(seqs(&bob.ops(5, WAIT)), (1..=5).collect::<Vec<_>>(), "{d}");
        assert_eq!(bob.ack("b6", &json!(6)), 6, "{d}");
        assert_eq!(seqs(&ada.ops(1, WAIT)), vec![6], "{d}");
        bob.send(&json!({"type": "cursor", "payload": {"at": 1}}).to_string());
        ada.broadcast("cursor", WAIT, |v| v["user_id"] == "bob");
        // History from Redis on the other node.
        let mut cy = nodes[1].session(d, "cy");
        let (_, sync) = cy.join_since(0);
        let got: Vec<u64> = sync.v["ops"].as_array().unwrap().iter().map(|o| o["seq"].as_u64().unwrap()).collect();
        assert_eq!(got, (1..=6).collect::<Vec<_>>(), "{d}: {}", sync.text);
    }
    // The documents live on more than one primary.
    let holding = rc
        .servers
        .iter()
        .filter(|r| matches!(r.command(&["DBSIZE"]), common::redis::Resp::Integer(n) if n > 0))
        .count();
    assert!(holding >= 2, "the documents' keys are on {holding} of the 3 primaries");
}

//! Durable storage (`[storage]`): the relay binary run as a child process on a
//! storage directory, killed, damaged and restarted.
//!
//! The contract under test:
//!
//! - With `storage.dir` set, each core appends accepted operations and
//!   snapshots to its own segmented log, `{dir}/{core:03}-{n:010}.log`, with a
//!   fresh segment for each start. An `ack` is sent only once its record is
//!   durable.
//! - At start, every document's `seq`, epoch, retained history and latest
//!   snapshot are rebuilt; `seq` never goes back. A torn or corrupt record is
//!   a WARN naming the segment file and `offset=`, not fatal; the records
//!   before it are kept, and the scanner resynchronises after it.
//! - Changing the core count between restarts loses nothing.
//! - `joined_document` and `sync_response` carry the document's `epoch`, kept
//!   across restarts with storage and new after a memory-only restart; a
//!   `join_document` or `sync_request` naming another epoch gets
//!   `EPOCH_CHANGED` instead of the `sync_response`.
//! - Compaction deletes segments whose records are all superseded.
//! - An idle document is unloaded and loaded again from disk, answering
//!   `sync_request` exactly as before.
//! - When a write fails (EFBIG here, under a file size limit), operations are
//!   refused with `UNAVAILABLE` and never acked; reads go on; writes are
//!   retried and operations accepted again once they succeed.

mod common;
use common::*;

use std::collections::HashSet;
use std::io::{Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_docrelay");

/// Generous bound for the relay to start, exit, or settle: not a speed test.
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The relay process

/// A running `docrelay serve`, started and listening. Killed when dropped (a
/// failing test never leaves one behind). Its stderr is collected on a
/// thread, so the pipe never fills.
struct Proc {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Proc {
    /// `docrelay serve --config CONFIG --listen 127.0.0.1:0 --cores CORES`.
    fn command(config: &str, cores: &str) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config", config, "--listen", "127.0.0.1:0", "--cores", cores]);
        cmd
    }

    /// Starts the relay on `config` and waits until it listens.
    fn serve(config: &str, cores: &str) -> Proc {
        Proc::start(Proc::command(config, cores))
    }

    /// Runs `cmd` and waits for its `listening on ADDR` line.
    fn start(cmd: Command) -> Proc {
        let (child, addr, log) = spawn_listening(cmd, PATIENCE);
        Proc { child, addr, log }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    fn stderr(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The WARN lines of its log so far.
    fn warnings(&self) -> Vec<String> {
        self.stderr().lines().filter(|l| l.contains(" WARN ")).map(str::to_string).collect()
    }

    /// A session on `/ws/documents/{doc}`, authenticated as `user`.
    fn client(&self, doc: &str, user: &str) -> Client {
        Client::open(self.addr, doc, user, self.log.clone())
    }

    /// Waits for the process to exit (it must within [`PATIENCE`]).
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "docrelay still running; stderr:\n{}", self.stderr());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, and checks the relay was still running (it did not die of
    /// anything else before, such as SIGXFSZ or a panic).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let status = self.wait();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{status}: the relay had died already; stderr:\n{}",
            self.stderr()
        );
    }

    /// SIGTERM, then waits for a clean exit (status 0).
    fn term_and_wait(&mut self) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        let status = self.wait();
        assert_eq!(status.code(), Some(0), "exit status {status}; stderr:\n{}", self.stderr());
    }

    /// The relay has not panicked so far.
    #[track_caller]
    fn assert_no_panic(&self) {
        let stderr = self.stderr();
        assert!(!stderr.contains("panicked"), "docrelay panicked:\n{stderr}");
    }

    /// Waits for a WARN line that names `segment`'s file name and an `offset=`.
    #[track_caller]
    fn assert_warned_about(&self, segment: &Path) {
        let name = segment.file_name().unwrap().to_str().unwrap().to_string();
        let found = poll(PATIENCE, || self.warnings().iter().any(|l| l.contains(&name) && l.contains("offset=")));
        assert!(found, "no WARN line naming {name} with `offset=`; stderr:\n{}", self.stderr());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Polls `f` every 20 ms until it holds or `timeout` has passed; returns
/// whether it held.
fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Configuration

/// Writes `relay.toml` in `tmp` with storage in `{tmp}/data` (created), the
/// extra `[storage]` lines `storage` and the `[documents]` lines `documents`.
/// Returns the config file's path and the data directory.
fn durable_config(tmp: &TempDir, storage: &str, documents: &str) -> (String, PathBuf) {
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\ncores = [0]\n\n[documents]\n{documents}\n\n[storage]\ndir = \"{}\"\n{storage}\n",
        data.display()
    );
    (tmp.file("relay.toml", &text), data)
}

/// Writes a memory-only `relay.toml` (no `storage.dir`) in `tmp`.
fn memory_config(tmp: &TempDir, documents: &str) -> String {
    tmp.file("relay.toml", &format!("listen = \"127.0.0.1:0\"\ncores = [0]\n\n[documents]\n{documents}\n"))
}

// ---------------------------------------------------------------------------
// Clients

/// A tungstenite session with the reading helpers of these tests. Replies
/// come in Text frames; broadcasts (Binary) are skipped where a reply is
/// expected.
struct Client {
    ws: common::Client,
    name: String,
    log: Arc<Mutex<String>>,
}

impl Client {
    fn open(addr: SocketAddr, doc: &str, user: &str, log: Arc<Mutex<String>>) -> Client {
        let ws = connect(addr, &format!("/ws/documents/{doc}"));
        set_timeout(&ws, PATIENCE);
        let mut c = Client { ws, name: format!("{user}@{doc}"), log };
        let v = c.call(&format!(r#"{{"type":"authenticate","token":"{user}"}}"#));
        assert_eq!((v["type"].as_str(), v["success"].as_bool()), (Some("auth_result"), Some(true)), "{}: {v}", c.name);
        c
    }

    #[track_caller]
    fn fail(&self, what: String) -> ! {
        panic!("{}: {what}; relay stderr:\n{}", self.name, self.log.lock().unwrap())
    }

    #[track_caller]
    fn send(&mut self, text: &str) {
        if let Err(e) = self.ws.send(Message::text(text)) {
            self.fail(format!("sending {text}: {e}"));
        }
    }

    /// The next direct reply (Text frame), as text.
    #[track_caller]
    fn reply_text(&mut self) -> String {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return t.to_string(),
                Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => self.fail(format!("expected a reply, got {other:?}")),
                Err(e) => self.fail(format!("no reply: {e}")),
            }
        }
    }

    #[track_caller]
    fn reply(&mut self) -> Value {
        let text = self.reply_text();
        serde_json::from_str(&text).unwrap_or_else(|e| self.fail(format!("reply is not JSON ({e}): {text}")))
    }

    #[track_caller]
    fn call(&mut self, text: &str) -> Value {
        self.send(text);
        self.reply()
    }

    /// `join_document` without `since`: the `joined_document`.
    #[track_caller]
    fn join(&mut self) -> Value {
        let v = self.call(r#"{"type":"join_document"}"#);
        assert_eq!(v["type"], "joined_document", "{}: {v}", self.name);
        v
    }

    /// `join_document` with `since`: the `joined_document`, and the raw text
    /// of the reply that follows it.
    #[track_caller]
    fn join_since(&mut self, since: u64) -> (Value, String) {
        let v = self.call(&format!(r#"{{"type":"join_document","since":{since}}}"#));
        assert_eq!(v["type"], "joined_document", "{}: {v}", self.name);
        (v, self.reply_text())
    }

    /// The raw text of the reply to `sync_request` since `since`.
    #[track_caller]
    fn sync_text(&mut self, since: u64) -> String {
        self.send(&format!(r#"{{"type":"sync_request","since":{since}}}"#));
        self.reply_text()
    }

    #[track_caller]
    fn sync(&mut self, since: u64) -> SyncResponse {
        parse_sync(&self.sync_text(since))
    }

    /// Sends one operation and returns the reply (an ack, or an error).
    #[track_caller]
    fn op(&mut self, payload: &str, id: &str) -> Value {
        self.call(&op_msg(payload, id))
    }

    /// Sends one operation, asserts it is acked with its id, returns its seq.
    #[track_caller]
    fn ack(&mut self, payload: &str, id: &str) -> u64 {
        let v = self.op(payload, id);
        assert_eq!((v["type"].as_str(), v["client_op_id"].as_str()), (Some("ack"), Some(id)), "{}: {v}", self.name);
        v["seq"].as_u64().unwrap_or_else(|| self.fail(format!("ack without a seq: {v}")))
    }

    /// Stores a snapshot and checks its ack.
    #[track_caller]
    fn snapshot(&mut self, seq: u64, state: &str) {
        let v = self.call(&format!(r#"{{"type":"snapshot","seq":{seq},"state":{state}}}"#));
        assert_eq!(v, json!({"type": "ack", "seq": seq}), "{}: snapshot at {seq}", self.name);
    }

    /// Sends `msgs` with at most `window` of them unanswered; returns the
    /// replies, in order.
    #[track_caller]
    fn pipeline(&mut self, msgs: &[String], window: usize) -> Vec<Value> {
        let mut replies = Vec::with_capacity(msgs.len());
        let mut sent = 0;
        while replies.len() < msgs.len() {
            while sent < msgs.len() && sent - replies.len() < window {
                self.send(&msgs[sent]);
                sent += 1;
            }
            replies.push(self.reply());
        }
        replies
    }

    /// Writes `payloads` as operations `first_seq`, `first_seq + 1`, …
    /// (pipelined), with `client_op_id`s `op-{seq}`, and checks every ack.
    #[track_caller]
    fn write_ops(&mut self, first_seq: u64, payloads: &[String]) {
        let msgs: Vec<String> =
            payloads.iter().enumerate().map(|(k, p)| op_msg(p, &format!("op-{}", first_seq + k as u64))).collect();
        for (k, reply) in self.pipeline(&msgs, 32).into_iter().enumerate() {
            let seq = first_seq + k as u64;
            assert_eq!(reply, json!({"type": "ack", "seq": seq, "client_op_id": format!("op-{seq}")}), "{}", self.name);
        }
    }

    /// `ping`: the next reply must be the `pong` (nothing else is queued).
    #[track_caller]
    fn pong(&mut self) {
        let v = self.call(r#"{"type":"ping"}"#);
        assert_eq!(v, json!({"type": "pong"}), "{}: expected the pong next", self.name);
    }

    /// Closes the session with 1000 and waits until the relay ends it.
    fn close(mut self) {
        let _ = self.ws.close(None);
        while self.ws.read().is_ok() {}
    }
}

/// An `operation` message with a string `client_op_id` (`id` is plain ASCII).
fn op_msg(payload: &str, id: &str) -> String {
    format!(r#"{{"type":"operation","payload":{payload},"client_op_id":"{id}"}}"#)
}

/// A `sync_response`; payloads and the snapshot state as their raw JSON text.
#[derive(Debug, Deserialize)]
struct SyncResponse {
    seq: u64,
    epoch: Option<String>,
    snapshot: Option<Snapshot>,
    ops: Vec<OpFrame>,
}

#[derive(Debug, Deserialize)]
struct Snapshot {
    seq: u64,
    state: Box<RawValue>,
}

/// One element of `ops`: the `operation` broadcast.
#[derive(Debug, Deserialize)]
struct OpFrame {
    #[serde(rename = "type")]
    kind: String,
    seq: u64,
    user_id: String,
    payload: Box<RawValue>,
}

#[track_caller]
fn parse_sync(text: &str) -> SyncResponse {
    parse_sync_for(text, "")
}

/// [`parse_sync`], naming the moment in a failure.
#[track_caller]
fn parse_sync_for(text: &str, what: &str) -> SyncResponse {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
    assert_eq!(v["type"], "sync_response", "{what}: expected a sync_response: {text}");
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not a sync_response ({e}): {text}"))
}

/// Asserts that `ops` are exactly the operations `first..=last`, in order,
/// each sent by `writer` with the payload `payload_of(seq)`, byte for byte.
#[track_caller]
fn assert_ops(ops: &[OpFrame], first: u64, last: u64, payload_of: impl Fn(u64) -> String, what: &str) {
    let seqs: Vec<u64> = ops.iter().map(|o| o.seq).collect();
    let want: Vec<u64> = (first..=last).collect();
    if seqs != want {
        panic!(
            "{what}: ops {:?} (first and last of {}), expected {first}..={last}",
            (seqs.first(), seqs.last()),
            seqs.len()
        );
    }
    for op in ops {
        assert_eq!(op.kind, "operation", "{what}: seq {}", op.seq);
        assert_eq!(op.user_id, "writer", "{what}: seq {}", op.seq);
        assert_eq!(op.payload.get(), payload_of(op.seq), "{what}: the payload of seq {} byte for byte", op.seq);
    }
}

/// The `epoch` of a `joined_document` (or any reply carrying one): a string.
#[track_caller]
fn epoch_of(v: &Value) -> String {
    match v["epoch"].as_str() {
        Some(e) if !e.is_empty() => e.to_string(),
        _ => panic!("no string epoch in {v}"),
    }
}

// ---------------------------------------------------------------------------
// Payloads

/// Distinct payloads that only survive byte for byte if nothing re-encodes
/// them: nesting, unicode and escapes, whitespace inside the value (tabs,
/// newlines, CRLF), numbers as written.
fn fidelity_payload(i: usize) -> String {
    match i % 6 {
        0 => format!(r#"{{"n":{i},"nested":{{"a":[1, 2 ,{{"b":null}}],"s":"é😀"}}}}"#),
        1 => format!(r#"{{ "n" : {i} , "q" : "say \"hi\" \\ and \/ slash" }}"#),
        2 => format!("[{i},\t1.50e3 ,\n-0.0, 1E-7, 123456789012345678901234567890, \"\\u00e9\\ud83d\\ude00\"]"),
        3 => format!(r#""op {i}: a string with \t, \n, \"quotes\" and é😀""#),
        4 => format!(
            "{{\r\n  \"n\": {i},\r\n  \"deep\": {{\"l1\": {{\"l2\": {{\"l3\": [true, false, null, {{}}, []]}}}}}}\r\n}}"
        ),
        _ => format!("{{\"n\":{i},\"empty\":\"\",\"num\":-12.5E+2,\"keys\":{{\"é\":\"😀\",\"a b\":\" \"}}}}"),
    }
}

/// A small payload for operation `seq` of `doc`.
fn plain_payload(doc: &str, seq: u64) -> String {
    format!(r#"{{"doc":"{doc}","seq":{seq},"text":"é😀 \"q\"","x":1.50e3}}"#)
}

/// A payload of exactly `len` bytes for `tag` (plain ASCII).
fn sized_payload(tag: &str, len: usize) -> String {
    let head = format!(r#"{{"tag":"{tag}","pad":""#);
    let pad = len.checked_sub(head.len() + 2).expect("room for the padding");
    let p = format!("{head}{}\"}}", "x".repeat(pad));
    assert_eq!(p.len(), len);
    p
}

// ---------------------------------------------------------------------------
// Segment files

/// The segment files of `dir`: (core, n, path), sorted. Every `.log` file in
/// it must be named `{core:03}-{n:010}.log`.
fn segments(dir: &Path) -> Vec<(u32, u64, PathBuf)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".log") else { continue };
        let parsed = stem.split_once('-').and_then(|(core, n)| {
            let digits = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_digit());
            (digits(core, 3) && digits(n, 10)).then(|| (core.parse().unwrap(), n.parse().unwrap()))
        });
        let (core, n) = parsed.unwrap_or_else(|| panic!("a .log file not named {{core:03}}-{{n:010}}.log: {name}"));
        out.push((core, n, path));
    }
    out.sort();
    out
}

/// The newest segment of `core` with records (the highest `n` whose header
/// was written: a segment prepared ahead of need is empty or all zeros).
fn newest_segment(dir: &Path, core: u32) -> PathBuf {
    let segs = segments(dir);
    let written = |p: &Path| std::fs::read(p).unwrap().first().is_some_and(|&b| b != 0);
    let newest = segs.iter().filter(|s| s.0 == core && written(&s.2)).max_by_key(|s| s.1);
    newest.unwrap_or_else(|| panic!("no segment of core {core} in {segs:?}")).2.clone()
}

/// The bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { dir_bytes(&entry.path()) } else { meta.len() };
    }
    total
}

/// `name size` of every file in `dir`, for failure messages.
fn listing(dir: &Path) -> String {
    let mut lines: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            format!("{} {}", e.file_name().to_string_lossy(), e.metadata().map(|m| m.len()).unwrap_or(0))
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// Whether this process may run on each of `cpus`.
fn cpus_available(cpus: &[usize]) -> bool {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < cpus.len() {
        return false;
    }
    // SAFETY: cpu_set_t is plain data; sched_getaffinity(2) writes at most
    // size_of::<cpu_set_t>() bytes into the set we own, for this thread (0).
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return false;
        }
        set
    };
    // SAFETY: CPU_ISSET only reads the set, for ids below CPU_SETSIZE.
    cpus.iter().all(|&c| c < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(c, &set) })
}

// ---------------------------------------------------------------------------
// 1. kill -9 during a stream of acked operations

/// Every acked operation survives a SIGKILL in the middle of a pipelined
/// stream, in seq order and byte for byte; seq does not go back, and the
/// next operation continues it.
fn kill_9_keeps_every_acked_operation(fsync: &str) {
    const TOTAL: usize = 20_000;
    const WINDOW: usize = 50;
    const KILL_AT: usize = 300;
    let tmp = TempDir::new(&format!("kill9-{fsync}"));
    let (config, data) = durable_config(&tmp, &format!("fsync = \"{fsync}\""), "history_ops = 100000");
    let doc = "kill-nine";
    let payloads: Vec<String> = (0..TOTAL).map(fidelity_payload).collect();
    for p in &payloads[..6] {
        serde_json::from_str::<Value>(p).unwrap_or_else(|e| panic!("test payload is not JSON ({e}): {p}"));
    }
    let id = |i: usize| format!("op-{i}");

    let mut proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "writer");
    assert_eq!(c.join()["seq"], 0, "a new document");

    // The killer: SIGKILL as soon as the sender has seen KILL_AT acks, while
    // the sender goes on sending.
    let pid = proc.pid();
    let (kill_now, kill_signal) = channel::<()>();
    let killer = thread::spawn(move || {
        if kill_signal.recv().is_ok() {
            // SAFETY: kill(2) on the pid of the relay child, which the test
            // thread does not reap before it has joined this thread.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut acked = 0usize; // acks are seq 1..=acked, for ops 0..acked
    let mut sent = 0usize;
    'stream: loop {
        while sent < TOTAL && sent - acked < WINDOW {
            if c.ws.send(Message::text(op_msg(&payloads[sent], &id(sent)))).is_err() {
                break 'stream;
            }
            sent += 1;
        }
        if acked == TOTAL {
            break;
        }
        let text = match c.ws.read() {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(other) => panic!("expected an ack, got {other:?}"),
            Err(_) => break, // the relay is gone
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v, json!({"type": "ack", "seq": acked + 1, "client_op_id": id(acked)}), "acks in order from seq 1");
        acked += 1;
        if acked == KILL_AT {
            let _ = kill_now.send(());
        }
    }
    drop(kill_now);
    killer.join().unwrap();
    let status = proc.wait();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}; stderr:\n{}", proc.stderr());
    assert!((KILL_AT..TOTAL).contains(&acked), "the kill came in the middle of the stream: {acked} of {TOTAL} acked");
    drop(c);

    let proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "reader");
    let (joined, text) = c.join_since(0);
    let seq = joined["seq"].as_u64().unwrap();
    assert!(seq >= acked as u64, "seq went back: {seq} after {acked} acks");
    assert!(seq <= sent as u64, "seq {seq} but only {sent} operations were ever sent");
    let sync = parse_sync(&text);
    assert_eq!(sync.seq, seq);
    assert!(sync.snapshot.is_none(), "the history holds everything: no snapshot");
    // One sender on a new document: seq k is the k-th operation sent.
    assert_ops(&sync.ops, 1, seq, |s| payloads[s as usize - 1].clone(), &format!("fsync {fsync}, after kill -9"));
    assert_eq!(c.ack(r#"{"after":"restart"}"#, "after-restart"), seq + 1, "the next seq continues");

    // Each core's log, a fresh segment for each start.
    let core0: Vec<u64> = segments(&data).iter().filter(|s| s.0 == 0).map(|s| s.1).collect();
    assert!(core0.len() >= 2, "one segment per start at least, got {core0:?}:\n{}", listing(&data));
    assert!(segments(&data).iter().all(|s| s.0 == 0), "one core, one log:\n{}", listing(&data));
    proc.assert_no_panic();
}

#[test]
fn kill_9_keeps_every_acked_operation_fsync_batch() {
    kill_9_keeps_every_acked_operation("batch");
}

#[test]
fn kill_9_keeps_every_acked_operation_fsync_always() {
    kill_9_keeps_every_acked_operation("always");
}

// ---------------------------------------------------------------------------
// 2. A torn tail, garbage after the last record

/// Writes operations 1..=n of `doc` one at a time (each acked), then
/// kill -9s the relay.
/// `fsync = "never"`: acknowledged at once, written within `batch_ms`. Once
/// the write happened (the last payload is in the segment), a kill -9 loses
/// nothing, and the next start resumes after it.
#[test]
fn fsync_never_keeps_what_was_written_before_a_kill_9() {
    const N: u64 = 200;
    let tmp = TempDir::new("never");
    let (config, data) = durable_config(&tmp, "fsync = \"never\"\nbatch_ms = 5", "");
    let doc = "never";
    let mut proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "writer");
    assert_eq!(c.join()["seq"], 0);
    c.write_ops(1, &(1..=N).map(|s| plain_payload(doc, s)).collect::<Vec<_>>());
    let last = plain_payload(doc, N);
    // Acknowledged before written: the segment may not even exist yet.
    let written = poll(PATIENCE, || {
        segments(&data).iter().any(|(_, _, path)| {
            let bytes = std::fs::read(path).unwrap_or_default();
            bytes.windows(last.len()).any(|w| w == last.as_bytes())
        })
    });
    assert!(written, "the last operation never reached the segment:\n{}", listing(&data));
    proc.kill();
    drop(c);
    let proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "reader");
    assert_eq!(c.join()["seq"], N);
    assert_ops(&c.sync(0).ops, 1, N, |s| plain_payload(doc, s), "after kill -9");
    assert_eq!(c.ack(&plain_payload(doc, N + 1), "next"), N + 1);
    proc.assert_no_panic();
}

/// A relative `storage.dir` is the working directory's (it failed every
/// write with EBADF), and a log level set in RUST_LOG still leaves out
/// glommio's complaint about the write-only segments.
#[test]
fn a_relative_storage_dir_works_and_logs_no_error() {
    let tmp = TempDir::new("relative");
    let config = tmp.file("relay.toml", "listen = \"127.0.0.1:0\"\ncores = [0]\n\n[storage]\ndir = \"data\"\n");
    let start = || {
        let mut cmd = Proc::command(&config, "0");
        cmd.current_dir(tmp.path()).env("RUST_LOG", "info");
        Proc::start(cmd)
    };
    let doc = "relative";
    let mut proc = start();
    let mut c = proc.client(doc, "writer");
    assert_eq!(c.join()["seq"], 0);
    for seq in 1..=5 {
        assert_eq!(c.ack(&plain_payload(doc, seq), &format!("op-{seq}")), seq);
    }
    proc.kill();
    drop(c);
    assert!(!segments(&tmp.path().join("data")).is_empty(), "no segment under the working directory's data/");
    let mut proc = start();
    let mut c = proc.client(doc, "reader");
    assert_eq!(c.join()["seq"], 5);
    assert_ops(&c.sync(0).ops, 1, 5, |s| plain_payload(doc, s), "after kill -9");
    proc.term_and_wait();
    let stderr = proc.stderr();
    assert!(!stderr.contains(" ERROR "), "{stderr}");
}

fn write_then_kill(config: &str, doc: &str, n: u64) {
    let mut proc = Proc::serve(config, "0");
    let mut c = proc.client(doc, "writer");
    assert_eq!(c.join()["seq"], 0);
    for seq in 1..=n {
        assert_eq!(c.ack(&plain_payload(doc, seq), &format!("op-{seq}")), seq);
    }
    proc.kill();
}

#[test]
fn a_torn_last_record_is_dropped_with_a_warning() {
    const N: u64 = 20;
    let tmp = TempDir::new("torn");
    let (config, data) = durable_config(&tmp, "fsync = \"batch\"", "");
    let doc = "torn";
    write_then_kill(&config, doc, N);

    // Cut the last record (operation N) short: 3 bytes before its end. A
    // write may be padded with zeros (to a block), so the record ends at the
    // last non-zero byte of the file (its data is JSON, ending in `}`).
    let segment = newest_segment(&data, 0);
    let bytes = std::fs::read(&segment).unwrap();
    let end = bytes.iter().rposition(|&b| b != 0).expect("a segment with records") as u64 + 1;
    assert_eq!(bytes[end as usize - 1], b'}', "the file ends with the last operation's JSON");
    std::fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(end - 3).unwrap();

    let proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "reader");
    let (_, text) = c.join_since(0);
    let sync = parse_sync(&text);
    assert!(sync.snapshot.is_none(), "{text}");
    assert_ops(&sync.ops, 1, N - 1, |s| plain_payload(doc, s), "after a torn tail");
    assert_eq!(sync.seq, N - 1, "the ops run up to the document's seq");
    proc.assert_warned_about(&segment);
    assert_eq!(c.ack(&plain_payload(doc, N), "after"), N, "the next operation continues the history");
    proc.assert_no_panic();
}

#[test]
fn garbage_after_the_last_record_is_ignored_with_a_warning() {
    const N: u64 = 20;
    let tmp = TempDir::new("garbage");
    let (config, data) = durable_config(&tmp, "fsync = \"batch\"", "");
    let doc = "garbage";
    write_then_kill(&config, doc, N);

    // 100 bytes that are no record (never all zero).
    let mut state: u32 = 0x9e37_79b9;
    let garbage: Vec<u8> = (0..100)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8 | 0x01
        })
        .collect();
    let segment = newest_segment(&data, 0);
    std::fs::OpenOptions::new().append(true).open(&segment).unwrap().write_all(&garbage).unwrap();

    let proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "reader");
    let (joined, text) = c.join_since(0);
    assert_eq!(joined["seq"], N, "every record before the garbage is kept");
    let sync = parse_sync(&text);
    assert!(sync.snapshot.is_none(), "{text}");
    assert_ops(&sync.ops, 1, N, |s| plain_payload(doc, s), "after garbage at the tail");
    proc.assert_warned_about(&segment);
    assert_eq!(c.ack(&plain_payload(doc, N + 1), "after"), N + 1);
    proc.assert_no_panic();
}

// ---------------------------------------------------------------------------
// 3. A flipped byte in the middle of a segment

#[test]
fn a_corrupt_record_in_the_middle_is_skipped_and_seq_never_goes_back() {
    const N: u64 = 200;
    let tmp = TempDir::new("flip");
    let (config, data) = durable_config(&tmp, "fsync = \"batch\"", "");
    let doc = "flip";
    let payload = |seq: u64| sized_payload(&format!("flip-{seq}"), 120);

    let mut proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "writer");
    assert_eq!(c.join()["seq"], 0);
    c.write_ops(1, &(1..=N).map(payload).collect::<Vec<_>>());
    proc.kill();
    drop(c);

    let segment = newest_segment(&data, 0);
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(&segment).unwrap();
    let len = file.metadata().unwrap().len();
    assert!(len > 8 * 1024, "several KB of segment: {len} bytes");
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(len / 2)).unwrap();
    std::io::Read::read_exact(&mut file, &mut byte).unwrap();
    file.seek(SeekFrom::Start(len / 2)).unwrap();
    file.write_all(&[byte[0] ^ 0xff]).unwrap();
    drop(file);

    let proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "reader");
    let joined = c.join();
    let seq = joined["seq"].as_u64().unwrap();
    assert!(seq >= N, "seq went back after a corrupt record: {seq} < {N}");
    proc.assert_warned_about(&segment);
    // The scanner resynchronised: the records well after the damage are there.
    let sync = c.sync(N - 10);
    assert!(sync.snapshot.is_none());
    assert_ops(&sync.ops, N - 9, N, payload, "the records after the damage");
    // Whatever the relay still returns from before is intact.
    let text = c.sync_text(0);
    let v: Value = serde_json::from_str(&text).unwrap();
    if v["type"] == "sync_response" {
        let sync = parse_sync(&text);
        for op in &sync.ops {
            assert_eq!(op.payload.get(), payload(op.seq), "seq {} byte for byte", op.seq);
        }
        assert!(sync.ops.windows(2).all(|w| w[0].seq < w[1].seq), "ops in seq order");
    } else {
        assert_eq!(v["code"], "HISTORY_UNAVAILABLE", "{text}");
    }
    let mut w = proc.client(doc, "writer");
    assert_eq!(w.join()["seq"], seq);
    assert_eq!(w.ack(&payload(seq + 1), "after"), seq + 1, "the next seq continues");
    proc.assert_no_panic();
}

// ---------------------------------------------------------------------------
// 4. A change of the core count

/// Checks `doc` on a relay: joined at `by_seq.len()` with `epoch`, and its
/// whole history (payload of seq k = `by_seq[k - 1]`). Returns the session.
fn check_document(proc: &Proc, doc: &str, by_seq: &[String], epoch: &str, what: &str) -> Client {
    let mut c = proc.client(doc, "reader");
    let (joined, text) = c.join_since(0);
    let n = by_seq.len() as u64;
    assert_eq!(joined["seq"], n, "{what}: {doc}");
    assert_eq!(epoch_of(&joined), epoch, "{what}: {doc} keeps its epoch");
    let sync = parse_sync_for(&text, &format!("{what}: {doc}, since 0"));
    assert_eq!((sync.seq, sync.epoch.as_deref()), (n, Some(epoch)), "{what}: {doc}");
    assert!(sync.snapshot.is_none(), "{what}: {doc}");
    assert_ops(&sync.ops, 1, n, |s| by_seq[s as usize - 1].clone(), &format!("{what}: {doc}"));
    c
}

#[test]
fn changing_the_core_count_loses_nothing() {
    if !cpus_available(&[0, 1]) {
        eprintln!("skipped: CPUs 0 and 1 are not both available");
        return;
    }
    let tmp = TempDir::new("cores");
    let (config, data) = durable_config(&tmp, "fsync = \"batch\"", "");
    let docs: Vec<String> = (0..20).map(|i| format!("cores-{i}")).collect();
    let owners: HashSet<usize> = docs.iter().map(|d| docrelay::owner_core(d, 2)).collect();
    assert_eq!(owners.len(), 2, "the documents live on both cores");
    let mut history: Vec<Vec<String>> = vec![Vec::new(); docs.len()];
    let mut epochs: Vec<String> = Vec::new();

    // Two cores.
    let mut proc = Proc::serve(&config, "0,1");
    for (d, doc) in docs.iter().enumerate() {
        let mut c = proc.client(doc, "writer");
        let joined = c.join();
        assert_eq!(joined["seq"], 0);
        epochs.push(epoch_of(&joined));
        let payloads: Vec<String> = (1..=10).map(|s| plain_payload(doc, s)).collect();
        c.write_ops(1, &payloads);
        history[d].extend(payloads);
        c.close();
    }
    proc.term_and_wait();
    let cores_logged: HashSet<u32> = segments(&data).iter().map(|s| s.0).collect();
    assert_eq!(cores_logged, HashSet::from([0, 1]), "each core its own log:\n{}", listing(&data));

    // One core: everything is there; add to every document.
    let mut proc = Proc::serve(&config, "0");
    for (d, doc) in docs.iter().enumerate() {
        check_document(&proc, doc, &history[d], &epochs[d], "2 cores -> 1").close();
        let mut c = proc.client(doc, "writer");
        c.join();
        let payloads: Vec<String> = (11..=13).map(|s| plain_payload(doc, s)).collect();
        c.write_ops(11, &payloads);
        history[d].extend(payloads);
        c.close();
    }
    proc.term_and_wait();

    // Two cores again.
    let proc = Proc::serve(&config, "0,1");
    for (d, doc) in docs.iter().enumerate() {
        let mut c = check_document(&proc, doc, &history[d], &epochs[d], "1 core -> 2");
        c.pong();
    }
    let mut c = proc.client(&docs[0], "writer");
    c.join();
    assert_eq!(c.ack(&plain_payload(&docs[0], 14), "after"), 14);
    proc.assert_no_panic();
}

// ---------------------------------------------------------------------------
// 5. Epochs

#[test]
fn the_epoch_is_kept_across_restarts_with_storage() {
    let tmp = TempDir::new("epoch-durable");
    let (config, _) = durable_config(&tmp, "fsync = \"batch\"", "");
    let doc = "epoch-durable";

    let mut proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "writer");
    let epoch = epoch_of(&c.join());
    assert_eq!(c.ack(&plain_payload(doc, 1), "op-1"), 1);
    assert_eq!(c.sync(0).epoch.as_deref(), Some(epoch.as_str()), "sync_response carries the epoch");
    c.close();
    proc.term_and_wait();

    // After a clean restart: the same epoch, and it is the current one.
    let mut proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "reader");
    c.send(&format!(r#"{{"type":"join_document","since":0,"epoch":"{epoch}"}}"#));
    let joined = c.reply();
    assert_eq!((joined["type"].as_str(), joined["seq"].as_u64()), (Some("joined_document"), Some(1)), "{joined}");
    assert_eq!(epoch_of(&joined), epoch, "the same epoch after a restart with storage");
    let sync = parse_sync(&c.reply_text());
    assert_eq!(sync.epoch.as_deref(), Some(epoch.as_str()));
    assert_ops(&sync.ops, 1, 1, |s| plain_payload(doc, s), "after a restart");
    let v = c.call(r#"{"type":"sync_request","since":0,"epoch":"an-epoch-of-another-life"}"#);
    assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("EPOCH_CHANGED")), "{v}");
    assert_eq!(v["epoch"], epoch.as_str(), "{v}");
    c.pong();
    drop(c);
    proc.kill();

    // After kill -9 as well.
    let proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "reader");
    assert_eq!(epoch_of(&c.join()), epoch, "the same epoch after kill -9");
    proc.assert_no_panic();
}

#[test]
fn a_memory_only_restart_changes_the_epoch() {
    let tmp = TempDir::new("epoch-memory");
    let config = memory_config(&tmp, "");
    let doc = "epoch-memory";

    let mut proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "writer");
    let before = epoch_of(&c.join());
    assert_eq!(c.ack(&plain_payload(doc, 1), "op-1"), 1);
    assert_eq!(c.sync(0).epoch.as_deref(), Some(before.as_str()));
    c.close();
    proc.term_and_wait();

    let proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "writer");
    let joined = c.join();
    assert_eq!(joined["seq"], 0, "memory only: the history is gone");
    let after = epoch_of(&joined);
    assert_ne!(after, before, "a memory-only restart gives a new epoch");

    // A client that comes back with the old epoch is told.
    let mut back = proc.client(doc, "writer");
    back.send(&format!(r#"{{"type":"join_document","since":0,"epoch":"{before}"}}"#));
    let joined = back.reply();
    assert_eq!(joined["type"], "joined_document", "{joined}");
    assert_eq!(epoch_of(&joined), after);
    let v = back.reply();
    assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("EPOCH_CHANGED")), "{v}");
    assert_eq!(v["epoch"], after.as_str(), "the error carries the current epoch: {v}");
    back.pong();
    assert_eq!(back.ack(&plain_payload(doc, 1), "op-1"), 1);
    proc.assert_no_panic();
}

#[test]
fn a_wrong_epoch_is_epoch_changed_and_the_session_stays_usable() {
    let tmp = TempDir::new("epoch-errors");
    let config = memory_config(&tmp, "");
    let doc = "epoch-errors";
    let proc = Proc::serve(&config, "0");

    let mut a = proc.client(doc, "writer");
    let epoch = epoch_of(&a.join());
    a.write_ops(1, &(1..=3).map(|s| plain_payload(doc, s)).collect::<Vec<_>>());

    // join_document with since and another epoch: joined_document, then the
    // error in place of the sync_response; the session is joined.
    let mut b = proc.client(doc, "writer");
    let joined = b.call(r#"{"type":"join_document","since":1,"epoch":"not-the-epoch"}"#);
    assert_eq!((joined["type"].as_str(), joined["seq"].as_u64()), (Some("joined_document"), Some(3)), "{joined}");
    assert_eq!(epoch_of(&joined), epoch);
    let v = b.reply();
    assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("EPOCH_CHANGED")), "{v}");
    assert!(v["message"].is_string(), "{v}");
    assert_eq!(v["epoch"], epoch.as_str(), "the error carries the current epoch: {v}");
    b.pong();
    assert_eq!(b.ack(&plain_payload(doc, 4), "op-4"), 4, "still joined: an operation is acked");
    let v = b.call(r#"{"type":"join_document"}"#);
    assert_eq!(v["code"], "ALREADY_JOINED", "the join stands: {v}");

    // sync_request with another epoch.
    let v = b.call(r#"{"type":"sync_request","since":0,"epoch":"not-the-epoch"}"#);
    assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("EPOCH_CHANGED")), "{v}");
    assert_eq!(v["epoch"], epoch.as_str(), "{v}");
    b.pong();

    // With the right epoch, or none: the sync_response.
    b.send(&format!(r#"{{"type":"sync_request","since":2,"epoch":"{epoch}"}}"#));
    let with_epoch = b.reply_text();
    let sync = parse_sync(&with_epoch);
    assert_eq!((sync.seq, sync.epoch.as_deref()), (4, Some(epoch.as_str())));
    assert_ops(&sync.ops, 3, 4, |s| plain_payload(doc, s), "with the right epoch");
    assert_eq!(b.sync_text(2), with_epoch, "no epoch: the same answer");

    // An epoch that is not a string.
    let v = b.call(r#"{"type":"sync_request","since":0,"epoch":5}"#);
    assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("BAD_MESSAGE")), "{v}");
    b.pong();
    let mut c = proc.client(doc, "writer");
    let v = c.call(r#"{"type":"join_document","since":0,"epoch":5}"#);
    assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("BAD_MESSAGE")), "{v}");
    c.pong();
    assert_eq!(c.join()["seq"], 4, "the refused join had no effect");

    // join_document with since and the right epoch: the sync_response.
    let mut d = proc.client(doc, "writer");
    d.send(&format!(r#"{{"type":"join_document","since":1,"epoch":"{epoch}"}}"#));
    assert_eq!(d.reply()["type"], "joined_document");
    let sync = parse_sync(&d.reply_text());
    assert_eq!(sync.epoch.as_deref(), Some(epoch.as_str()));
    assert_ops(&sync.ops, 2, 4, |s| plain_payload(doc, s), "join with the right epoch");
    proc.assert_no_panic();
}

// ---------------------------------------------------------------------------
// 6. Compaction

#[test]
fn compaction_keeps_disk_use_proportional_to_the_history_window() {
    const SEGMENT: u64 = 65_536;
    const WINDOW: u64 = 50;
    const PAYLOAD: usize = 600;
    const SNAPSHOT_EVERY: u64 = 100;
    /// A write may be padded up to a block of this size: an operation may
    /// take that much disk on its own.
    const BLOCK: u64 = 4096;
    const OPS: u64 = 60 * WINDOW + 20; // the last snapshot at 3000, 20 ops after it
    const LAST_SNAPSHOT: u64 = OPS - 20;
    let tmp = TempDir::new("compaction");
    let (config, data) = durable_config(
        &tmp,
        &format!("fsync = \"batch\"\nsegment_bytes = {SEGMENT}"),
        &format!("history_ops = {WINDOW}"),
    );
    let doc = "compaction";
    let payload = |seq: u64| sized_payload(&format!("op-{seq}"), PAYLOAD);
    let state = |seq: u64| sized_payload(&format!("state-{seq}"), PAYLOAD);

    let mut proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "writer");
    assert_eq!(c.join()["seq"], 0);
    let mut seq = 0;
    while seq < OPS {
        let upto = (seq + SNAPSHOT_EVERY).min(OPS);
        c.write_ops(seq + 1, &(seq + 1..=upto).map(payload).collect::<Vec<_>>());
        seq = upto;
        if seq % SNAPSHOT_EVERY == 0 {
            c.snapshot(seq, &state(seq));
        }
    }
    let written = OPS * PAYLOAD as u64 + (OPS / SNAPSHOT_EVERY) * PAYLOAD as u64;
    // The window's operations and the latest snapshot (here inside the
    // window), each with its record overhead and possibly a block of its
    // own; plus the segments that hold them only in part: the current one
    // and the sealed ones at either end of the window, and one of slack.
    let bound = 4 * SEGMENT + WINDOW * (PAYLOAD as u64 + BLOCK + 256);
    assert!(written > 2 * bound, "the test writes far more than the bound ({written} vs {bound})");
    // The log holds at least what sync still needs: the window's operations
    // and the latest snapshot.
    let live = (WINDOW + 1) * PAYLOAD as u64;
    assert!(
        dir_bytes(&data) >= live,
        "{} bytes on disk, less than the live records:\n{}",
        dir_bytes(&data),
        listing(&data)
    );
    let compacted = poll(PATIENCE, || dir_bytes(&data) < bound);
    assert!(
        compacted,
        "{} bytes on disk after writing {written}, bound {bound}:\n{}",
        dir_bytes(&data),
        listing(&data)
    );

    let check = |c: &mut Client, what: &str| {
        let sync = c.sync(0);
        assert_eq!(sync.seq, OPS, "{what}");
        let snap = sync.snapshot.as_ref().unwrap_or_else(|| panic!("{what}: since 0 needs the snapshot"));
        assert_eq!((snap.seq, snap.state.get()), (LAST_SNAPSHOT, state(LAST_SNAPSHOT).as_str()), "{what}: the latest");
        assert_ops(&sync.ops, LAST_SNAPSHOT + 1, OPS, payload, what);
        let sync = c.sync(OPS - 40);
        assert!(sync.snapshot.is_none(), "{what}");
        assert_ops(&sync.ops, OPS - 39, OPS, payload, what);
    };
    check(&mut c, "after compaction");
    proc.kill();
    drop(c);

    // The compacted log still holds everything sync needs.
    let proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "reader");
    assert_eq!(c.join()["seq"], OPS);
    check(&mut c, "after compaction and a restart");
    proc.assert_no_panic();
}

/// Documents that stop changing do not pin old segments: their few live
/// records are copied forward, and the segments they were in are deleted.
#[test]
fn documents_that_stop_changing_do_not_pin_old_segments() {
    const SEGMENT: u64 = 65_536;
    const PAYLOAD: usize = 600;
    const QUIET: u64 = 20;
    let tmp = TempDir::new("copy-forward");
    let (config, data) =
        durable_config(&tmp, &format!("fsync = \"batch\"\nsegment_bytes = {SEGMENT}"), "history_ops = 5");
    let payload = |tag: &str, seq: u64| sized_payload(&format!("{tag}-{seq}"), PAYLOAD);
    let mut proc = Proc::serve(&config, "0");
    let mut busy = proc.client("busy", "writer");
    busy.join();
    let mut seq = 0;
    // Each quiet document gets two operations, then a segment's worth of
    // the busy one's: every quiet document lands in a segment of its own.
    for q in 0..QUIET {
        let doc = format!("quiet-{q}");
        let mut c = proc.client(&doc, "writer");
        c.join();
        c.write_ops(1, &[payload(&doc, 1), payload(&doc, 2)]);
        c.close();
        busy.write_ops(seq + 1, &(seq + 1..=seq + 110).map(|s| payload("busy", s)).collect::<Vec<_>>());
        seq += 110;
    }
    let written = (QUIET * 2 + seq) * PAYLOAD as u64;
    let pinned = QUIET * SEGMENT;
    assert!(written > pinned, "{written}");
    // Without compaction the quiet documents would pin about `pinned` bytes.
    let bound = 8 * SEGMENT;
    let compacted = poll(PATIENCE, || dir_bytes(&data) < bound);
    assert!(compacted, "{} bytes on disk, bound {bound}:\n{}", dir_bytes(&data), listing(&data));
    drop(busy);
    proc.kill();

    // Every quiet document's history survived the copying.
    let proc = Proc::serve(&config, "0");
    for q in 0..QUIET {
        let doc = format!("quiet-{q}");
        let mut c = proc.client(&doc, "reader");
        assert_eq!(c.join()["seq"], 2, "{doc}");
        let sync = c.sync(0);
        assert_ops(&sync.ops, 1, 2, |s| payload(&doc, s), &doc);
    }
    let mut c = proc.client("busy", "reader");
    assert_eq!(c.join()["seq"], seq);
    proc.assert_no_panic();
}

/// With `storage.preallocate` (the default) each segment after the first is
/// made ahead of need full of zeros, so the log's writes land in blocks already allocated;
/// recovery deletes a prepared segment never written, and gives back the
/// zeros after the last write of the others; a clean stop deletes the
/// unused one. Without it, segments grow as they are written.
#[test]
fn segments_are_made_ahead_full_of_zeros_and_the_zeros_are_given_back() {
    const SEGMENT: u64 = 65_536;
    const BLOCK: u64 = 4096;
    let zeros = |b: &[u8]| b.iter().all(|&x| x == 0);
    let unwritten = |path: &Path| zeros(&std::fs::read(path).unwrap());
    // Where a segment's last write ends (writes are whole blocks).
    let written_end = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        bytes.iter().rposition(|&b| b != 0).map_or(0, |i| (i as u64 + 1).div_ceil(BLOCK) * BLOCK)
    };
    for preallocate in [true, false] {
        let what = format!("preallocate = {preallocate}");
        let tmp = TempDir::new(&format!("prealloc-{preallocate}"));
        let (config, data) = durable_config(&tmp, &format!("fsync = \"batch\"\nsegment_bytes = {SEGMENT}\n{what}"), "");
        let doc = "prealloc";
        let payload = |seq: u64| sized_payload(&format!("p-{seq}"), 1000);
        let made_len = if preallocate { SEGMENT } else { 0 };
        // A segment made ahead of `len` bytes, not yet written, numbered
        // after `after`.
        let made_ahead = |after: u64, len: u64| {
            segments(&data)
                .into_iter()
                .find(|s| s.1 > after && std::fs::metadata(&s.2).unwrap().len() == len && unwritten(&s.2))
        };

        let mut proc = Proc::serve(&config, "0");
        // The first one, made at start, is empty: an idle core zeroes nothing.
        assert!(poll(PATIENCE, || made_ahead(0, 0).is_some()), "{what}: none made at start:\n{}", listing(&data));
        let mut c = proc.client(doc, "writer");
        assert_eq!(c.join()["seq"], 0);
        // Operations acked one by one (one write each) until one segment
        // made ahead is past its half, and the next one is made. (A roll
        // that finds the next segment still being made makes one itself:
        // that one grows as it is written, and the search goes on.)
        let mut seq = 0;
        let (first, end, next) = loop {
            seq += 1;
            assert!(seq <= 300, "{what}: no segment made ahead was written past its half:\n{}", listing(&data));
            assert_eq!(c.ack(&payload(seq), &format!("op-{seq}")), seq);
            let (_, n, path) = segments(&data).into_iter().rfind(|s| !unwritten(&s.2)).expect("a written segment");
            let (len, end) = (std::fs::metadata(&path).unwrap().len(), written_end(&path));
            if !preallocate {
                assert_eq!(len, end, "{what}: the segment grows by its writes");
            }
            if len != made_len.max(end) || end <= SEGMENT / 2 {
                continue;
            }
            if let Some(next) = made_ahead(n, made_len) {
                break (path, end, next.2);
            }
        };
        proc.kill();
        drop(c);

        let mut proc = Proc::serve(&config, "0");
        let mut c = proc.client(doc, "reader");
        let (joined, text) = c.join_since(0);
        assert_eq!(joined["seq"], seq, "{what}");
        assert_ops(&parse_sync(&text).ops, 1, seq, payload, &what);
        assert_eq!(
            std::fs::metadata(&first).unwrap().len(),
            end,
            "{what}: the zeros after the last write are given back:\n{}",
            listing(&data)
        );
        assert!(!next.exists(), "{what}: the segment made ahead and never written is deleted:\n{}", listing(&data));
        let names = listing(&data);
        assert!(!names.contains("damaged"), "{what}: nothing is set aside:\n{names}");
        let warned: Vec<String> = proc.warnings().into_iter().filter(|l| l.contains("segment")).collect();
        assert!(warned.is_empty(), "{what}: recovery found nothing wrong: {warned:?}");
        assert_eq!(c.ack(&payload(seq + 1), "after"), seq + 1, "{what}");
        drop(c);
        proc.term_and_wait();
        // A clean stop leaves no segment made ahead behind.
        let left: Vec<PathBuf> = segments(&data).into_iter().map(|s| s.2).filter(|p| unwritten(p)).collect();
        assert!(left.is_empty(), "{what}: unwritten segments left after a clean stop: {left:?}\n{}", listing(&data));
        proc.assert_no_panic();
    }
}

// ---------------------------------------------------------------------------
// 7. Idle unload and reload

#[test]
fn an_idle_document_is_reloaded_from_disk_and_answers_as_before() {
    let tmp = TempDir::new("idle");
    let (config, _) = durable_config(&tmp, "fsync = \"batch\"", "history_ops = 15\nidle_unload_ms = 300");
    let doc = "idle-reload";
    const STATE: &str = r#"{"doc" : "é😀", "n":20 ,"x":1.50e3}"#;

    let mut proc = Proc::serve(&config, "0");
    let addr = proc.addr();
    let documents = || core_metric(addr, "docrelay_documents", 0);
    let mut w = proc.client(doc, "writer");
    let epoch = epoch_of(&w.join());
    w.write_ops(1, &(1..=20).map(|s| plain_payload(doc, s)).collect::<Vec<_>>());
    w.snapshot(20, STATE);
    w.write_ops(21, &(21..=30).map(|s| plain_payload(doc, s)).collect::<Vec<_>>());
    assert_eq!(documents(), 1, "the document is loaded");

    // since 0 needs the snapshot (the history holds 16..=30); since 25 not.
    let full = w.sync_text(0);
    let part = w.sync_text(25);
    let sync = parse_sync(&full);
    let snap = sync.snapshot.as_ref().expect("since 0 is answered from the snapshot");
    assert_eq!((snap.seq, snap.state.get()), (20, STATE));
    assert_ops(&sync.ops, 21, 30, |s| plain_payload(doc, s), "since 0");
    let sync = parse_sync(&part);
    assert!(sync.snapshot.is_none());
    assert_ops(&sync.ops, 26, 30, |s| plain_payload(doc, s), "since 25");
    w.close();

    assert!(poll(PATIENCE, || documents() == 0), "the idle document was not unloaded");

    // Loaded again from disk: the same answers, byte for byte.
    let mut r = proc.client(doc, "reader");
    let (joined, text) = r.join_since(0);
    assert_eq!(joined["seq"], 30);
    assert_eq!(epoch_of(&joined), epoch);
    assert_eq!(documents(), 1);
    assert_eq!(text, full, "since 0 after the reload");
    assert_eq!(r.sync_text(25), part, "since 25 after the reload");
    let mut w = proc.client(doc, "writer");
    w.join();
    assert_eq!(w.ack(&plain_payload(doc, 31), "op-31"), 31, "seq continues after the reload");
    let full = r.sync_text(0);
    let part = r.sync_text(25);
    assert_ops(&parse_sync(&part).ops, 26, 31, |s| plain_payload(doc, s), "since 25, with op 31");
    w.close();
    r.close();
    proc.term_and_wait();

    // And after a restart.
    let proc = Proc::serve(&config, "0");
    let mut r = proc.client(doc, "reader");
    let (joined, text) = r.join_since(0);
    assert_eq!((joined["seq"].as_u64(), epoch_of(&joined)), (Some(31), epoch));
    assert_eq!(text, full, "since 0 after a restart");
    assert_eq!(r.sync_text(25), part, "since 25 after a restart");
    let mut w = proc.client(doc, "writer");
    w.join();
    assert_eq!(w.ack(&plain_payload(doc, 32), "op-32"), 32);
    proc.assert_no_panic();
}

// ---------------------------------------------------------------------------
// 8. A full disk

/// The `UNAVAILABLE` refusal of the operation `id`.
#[track_caller]
fn assert_unavailable(v: &Value, id: &str) {
    assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("UNAVAILABLE")), "{v}");
    assert!(v["message"].is_string(), "{v}");
    assert_eq!(v["client_op_id"], id, "the refusal names the operation: {v}");
}

#[test]
fn a_full_disk_refuses_operations_keeps_serving_reads_and_recovers() {
    const LIMIT: libc::rlim_t = 256 * 1024;
    const PAYLOAD: usize = 1000;
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes one rlimit struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut old) }, 0);
    if old.rlim_max != libc::RLIM_INFINITY && old.rlim_max < 16 * LIMIT {
        eprintln!("skipped: the file size hard limit here ({}) leaves no room to raise the limit", old.rlim_max);
        return;
    }
    let hard = old.rlim_max;
    let tmp = TempDir::new("disk-full");
    let (config, _) = durable_config(&tmp, &format!("fsync = \"batch\"\nsegment_bytes = {}", 1 << 20), "");
    let doc = "disk-full";
    let payload = |id: &str| sized_payload(id, PAYLOAD);

    let mut cmd = Proc::command(&config, "0");
    let limited = libc::rlimit { rlim_cur: LIMIT, rlim_max: hard };
    let set_limit = move || -> std::io::Result<()> {
        // SAFETY: setrlimit(2) reads one rlimit struct owned by this closure;
        // it is async-signal-safe, so it may run between fork and exec.
        if unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limited) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and only calls
    // setrlimit(2), which is async-signal-safe; it allocates nothing and
    // takes no lock.
    unsafe { cmd.pre_exec(set_limit) };
    let mut proc = Proc::start(cmd);

    let mut a = proc.client(doc, "writer");
    assert_eq!(a.join()["seq"], 0);
    let mut acked: Vec<String> = Vec::new(); // payload of seq k at k - 1
    let mut refused: Vec<String> = Vec::new();
    let mut n = 0;
    loop {
        assert!(n < 4 * LIMIT as usize / PAYLOAD, "no UNAVAILABLE after {n} operations of {PAYLOAD} bytes");
        let id = format!("df-{n}");
        n += 1;
        let v = a.op(&payload(&id), &id);
        if v["type"] == "ack" {
            assert_eq!(v, json!({"type": "ack", "seq": acked.len() + 1, "client_op_id": id}));
            acked.push(payload(&id));
        } else {
            assert_unavailable(&v, &id);
            refused.push(payload(&id));
            break;
        }
    }
    assert!(acked.len() > 10, "the limit was reached after a while, not at once ({} acked)", acked.len());
    // No ack follows the refusal: the pong comes next.
    a.pong();

    // Reads go on.
    let last = acked.len() as u64;
    let mut b = proc.client(doc, "reader");
    assert_eq!(b.join()["seq"], last, "a second client joins");
    let sync = b.sync(last - 3);
    assert_ops(&sync.ops, last - 2, last, |s| acked[s as usize - 1].clone(), "sync while the disk is full");
    b.pong();
    a.pong();

    // Room again: operations are accepted once the relay's retry succeeds.
    let room = libc::rlimit { rlim_cur: hard, rlim_max: hard };
    // SAFETY: prlimit(2) on the pid of our running child; it reads one
    // rlimit struct we own and writes nothing (old_limit is null).
    let rc = unsafe { libc::prlimit(proc.pid(), libc::RLIMIT_FSIZE, &room, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let id = format!("df-{n}");
        n += 1;
        let v = a.op(&payload(&id), &id);
        if v["type"] == "ack" {
            assert_eq!(v, json!({"type": "ack", "seq": acked.len() + 1, "client_op_id": id}));
            acked.push(payload(&id));
            break;
        }
        assert_unavailable(&v, &id);
        refused.push(payload(&id));
        assert!(Instant::now() < deadline, "operations still refused long after the disk had room again");
        thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..5 {
        let id = format!("df-{n}");
        n += 1;
        assert_eq!(a.ack(&payload(&id), &id), acked.len() as u64 + 1, "accepted again");
        acked.push(payload(&id));
    }
    proc.kill(); // also checks the relay survived the limit (SIGXFSZ ignored)
    drop((a, b));

    // Every acked operation is there, and no refused one.
    let proc = Proc::serve(&config, "0");
    let mut c = proc.client(doc, "reader");
    let (joined, text) = c.join_since(0);
    assert_eq!(joined["seq"], acked.len() as u64, "exactly the acked operations were stored");
    let sync = parse_sync_for(&text, "since 0 after the disk was full, and a restart");
    assert_ops(&sync.ops, 1, acked.len() as u64, |s| acked[s as usize - 1].clone(), "after the disk was full");
    for op in &sync.ops {
        assert!(!refused.iter().any(|r| r == op.payload.get()), "refused operation stored as seq {}", op.seq);
    }
    proc.assert_no_panic();
}

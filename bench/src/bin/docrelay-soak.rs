//! `docrelay-soak`: a long soak test of a running relay (`scripts/soak.sh`).
//!
//! Thousands of simulated editors (`--clients`, one connection at a time each)
//! spread over `--docs` documents, each re-rolling its behaviour from phase to
//! phase:
//!
//! - *steady*: reads everything, sends operations at its document's rate;
//! - *slow reader*: pauses after every message it reads until it falls
//!   behind and gets `lagged`, then reads at full speed and recovers with
//!   `sync_request` from the last `seq` it applied, paging through `more`;
//! - *staller*: stops reading for seconds (still sending), then resumes and
//!   recovers the same way;
//! - *vanisher*: drops its TCP connection without a Close, comes back with a
//!   new one and `join_document` with `since` (its last applied `seq`) and
//!   `epoch`, and must get a gap-free continuation;
//! - *churner*: connects, authenticates, joins, leaves, reconnects,
//!   repeatedly.
//!
//! Most documents are *cold* (a few operations per second in all, small
//! payloads); a share of them (`--hot-share`) are *hot* (tens of operations
//! per second, payloads up to `--hot-payload` bytes), so that a stall of a few
//! seconds overflows the relay's ring (`documents.ring_capacity`, which the
//! script sets small) plus what the sockets hold. Every connection has a small
//! receive buffer (`--rcvbuf`) and advertises a small MSS (`--mss`): on
//! loopback the relay's send buffer autotunes to about 20 segments, which at
//! the loopback MSS of 64 KiB would be megabytes per stalled client.
//!
//! What is checked while it runs (check 1): on every connection the
//! broadcast `seq`s rise strictly; every `seq` skipped between two broadcasts
//! is either inside a `lagged` range announced at that point or one of this
//! connection's own operations (verified against its `ack`s, or at the end
//! against the history); every `lagged` is recovered by a `sync_request` whose
//! pages are contiguous from `since`+1 up to the document's `seq`; a rejoin
//! with `since` is answered by contiguous pages up to at least the
//! `joined_document` `seq`; acks come in order; every payload seen for a `seq`
//! (broadcast, sync page, own ack) is the same bytes (payloads carry a unique
//! id, actor.connection.counter). At the end (check 2) a fresh client per
//! document joins with `since: 0`, pages through the whole history and checks
//! that every acknowledged operation is there with its payload. Check 3
//! samples the relay's `VmRSS` (`--relay-pid`). The script adds check 4 (log,
//! health, exit code).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "docrelay-soak",
    about = "Soak test for docrelay: thousands of clients with mixed behaviours, then checks"
)]
struct Args {
    /// Relay address.
    #[arg(long, default_value = "127.0.0.1:9001")]
    addr: SocketAddr,
    /// Simulated clients (each one connection at a time).
    #[arg(long, default_value_t = 2000)]
    clients: usize,
    /// Documents (client i edits document i % docs).
    #[arg(long, default_value_t = 200)]
    docs: usize,
    /// Minutes of mixed behaviours, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Seconds of steady load once every client has joined, before the start RSS sample.
    #[arg(long, default_value_t = 10.0)]
    warmup: f64,
    /// Share of documents that are hot (every 1/share-th document).
    #[arg(long, default_value_t = 0.1)]
    hot_share: f64,
    /// Operations per second of each sending client on a hot document.
    #[arg(long, default_value_t = 4.0)]
    hot_rate: f64,
    /// Operations per second of each sending client on a cold document.
    #[arg(long, default_value_t = 0.2)]
    cold_rate: f64,
    /// Largest padding of a payload on a hot document (bytes; uniform from 100).
    #[arg(long, default_value_t = 1500)]
    hot_payload: usize,
    /// Largest padding of a payload on a cold document (bytes; uniform from 20).
    #[arg(long, default_value_t = 200)]
    cold_payload: usize,
    /// SO_RCVBUF of every client socket (0: the kernel's default).
    #[arg(long, default_value_t = 4096)]
    rcvbuf: usize,
    /// TCP_MAXSEG of every client socket, advertised to the relay (0: leave it).
    #[arg(long, default_value_t = 1024)]
    mss: u32,
    /// Connection attempts (connect + authenticate + join) in flight at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Worker threads (0: one per CPU this process may run on).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The relay's process id, for its VmRSS.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// Seconds between RSS samples and progress lines.
    #[arg(long, default_value_t = 10.0)]
    sample_secs: f64,
    /// The relay's `documents.idle_unload_ms` (how long to expect the unload to take).
    #[arg(long, default_value_t = 2000)]
    idle_unload_ms: u64,
    /// RSS bound: end <= start + this many MiB + --rss-bytes-per-op x operations stored.
    #[arg(long, default_value_t = 64)]
    rss_slack_mib: u64,
    /// RSS bound: bytes allowed per stored operation (the storage index stays
    /// in memory after the unload, docs/storage.md section 10: about 24 bytes a
    /// live record, twice that for the hash table's growth).
    #[arg(long, default_value_t = 48)]
    rss_bytes_per_op: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Prefix of document ids.
    #[arg(long, default_value = "soak")]
    doc_prefix: String,
    /// Seed of the behaviour dice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Self-test of the checks: ignore every N-th broadcast operation received
    /// (as if the relay had not sent it); check 1 must then fail.
    #[arg(long, default_value_t = 0)]
    inject_drop: u64,
}

fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit on this process with a struct we own.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// setsockopt(2) with a plain-data value; failures are ignored (the options
/// only tune the client).
///
/// # Safety
/// `fd` must be a socket this process owns.
unsafe fn set_option<T>(fd: libc::c_int, level: libc::c_int, name: libc::c_int, value: &T) {
    // SAFETY: `value` is a live reference to `size_of::<T>()` readable bytes;
    // the kernel only reads them.
    unsafe {
        libc::setsockopt(fd, level, name, value as *const T as *const libc::c_void, std::mem::size_of::<T>() as u32)
    };
}

fn fnv(bytes: &[u8]) -> u64 {
    // Never 0: 0 marks an unknown slot in the truth table.
    docrelay::placement::fnv1a_64(bytes).max(1)
}

/// xorshift64*: the behaviour dice, one per client, reproducible from --seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        Duration::from_secs_f64(lo + (hi - lo) * self.unit())
    }
}

// ---------------------------------------------------------------------------
// Shared state: counters, the per-document truth table, violations.

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    reconnects: AtomicU64,
    ops_sent: AtomicU64,
    ops_acked: AtomicU64,
    ops_unavailable: AtomicU64,
    ops_unacked_at_drop: AtomicU64,
    delivered: AtomicU64,
    presence: AtomicU64,
    lagged: AtomicU64,
    recovered: AtomicU64,
    unrecovered_at_drop: AtomicU64,
    sync_requests: AtomicU64,
    sync_pages: AtomicU64,
    sync_ops: AtomicU64,
    rejoins_since: AtomicU64,
    continuations_ok: AtomicU64,
    vanishes: AtomicU64,
    churn_cycles: AtomicU64,
    leaves: AtomicU64,
    unexpected_closes: AtomicU64,
    holes_deferred: AtomicU64,
    injected: AtomicU64,
}

/// What the soak knows of a document's history: for every `seq`, the hash of
/// the payload bytes first seen for it (0: not seen) and whether it was acked.
#[derive(Default)]
struct Truth {
    hash: Vec<u64>,
    acked: Vec<bool>,
}

impl Truth {
    fn slot(&mut self, seq: u64) -> usize {
        let i = seq as usize;
        if self.hash.len() <= i {
            self.hash.resize(i + 1024, 0);
            self.acked.resize(i + 1024, false);
        }
        i
    }
}

/// A `seq` a connection never received and that must be one of its own
/// operations (its ack never came): checked against the history at the end.
struct Hole {
    doc: usize,
    seq: u64,
    tag: u64,
    actor: u32,
}

const BEHAVIOURS: [&str; 5] = ["steady", "slow_reader", "staller", "vanisher", "churner"];

struct Shared {
    args: Args,
    docs: Vec<String>,
    hot: Vec<bool>,
    truth: Vec<Mutex<Truth>>,
    c: Counters,
    kinds: Mutex<BTreeMap<&'static str, u64>>,
    samples: Mutex<Vec<String>>,
    actor_violations: Vec<AtomicU32>,
    holes: Mutex<Vec<Hole>>,
    /// (behaviours start, behaviours end), set once every client has joined
    /// and the warm-up is over.
    schedule: OnceLock<(Instant, Instant)>,
    ready: AtomicUsize,
    finished: AtomicUsize,
    open: AtomicI64,
    phases: [AtomicU64; 5],
    connect_gate: Semaphore,
    pad: String,
}

impl Shared {
    fn violation(&self, actor: u32, kind: &'static str, detail: String) {
        *self.kinds.lock().unwrap().entry(kind).or_default() += 1;
        if let Some(v) = self.actor_violations.get(actor as usize) {
            v.fetch_add(1, Relaxed);
        }
        let mut s = self.samples.lock().unwrap();
        if s.len() < 50 {
            let line = format!("client {actor} (doc {}): {kind}: {detail}", actor as usize % self.docs.len());
            if s.len() < 10 {
                eprintln!("[soak] VIOLATION {line}");
            }
            s.push(line);
        }
    }

    /// Records what was seen for `seq`; false if other bytes were seen before.
    fn observe(&self, doc: usize, seq: u64, hash: u64, acked: bool) -> Result<(), u64> {
        let mut t = self.truth[doc].lock().unwrap();
        let i = t.slot(seq);
        if acked {
            t.acked[i] = true;
        }
        match t.hash[i] {
            0 => {
                t.hash[i] = hash;
                Ok(())
            }
            h if h == hash => Ok(()),
            h => Err(h),
        }
    }
}

fn tag_of(actor: u32, conn: u32) -> u64 {
    (u64::from(actor) << 32) | u64::from(conn)
}

/// The connection tag in a soak payload `{"u":"A.C.N","p":"…"}`.
fn payload_tag(payload: &[u8]) -> Option<u64> {
    let rest = payload.strip_prefix(br#"{"u":""#)?;
    let mut parts = [0u64; 3];
    let mut i = 0;
    let mut k = 0;
    let mut any = false;
    while i < rest.len() {
        match rest[i] {
            b @ b'0'..=b'9' => {
                parts[k] = parts[k] * 10 + u64::from(b - b'0');
                any = true;
            }
            b'.' if k < 2 && any => {
                k += 1;
                any = false;
            }
            b'"' if k == 2 && any => return Some(tag_of(parts[0] as u32, parts[1] as u32)),
            _ => return None,
        }
        i += 1;
    }
    None
}

// ---------------------------------------------------------------------------
// Messages from the relay.

#[derive(Deserialize)]
struct In<'a> {
    #[serde(rename = "type", borrow)]
    ty: &'a str,
    seq: Option<u64>,
    epoch: Option<String>,
    more: Option<bool>,
    missed_from: Option<u64>,
    missed_to: Option<u64>,
    client_op_id: Option<u64>,
    code: Option<String>,
    message: Option<String>,
    success: Option<bool>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    ops: Option<Vec<OpIn<'a>>>,
    #[serde(borrow)]
    snapshot: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct OpIn<'a> {
    seq: u64,
    #[serde(borrow)]
    payload: &'a RawValue,
}

#[derive(Debug)]
enum Disc {
    Eof,
    Closed(String),
    Error(String),
    Timeout(&'static str),
}

impl std::fmt::Display for Disc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Disc::Eof => write!(f, "connection ended without a Close"),
            Disc::Closed(why) => write!(f, "closed by the relay: {why}"),
            Disc::Error(e) => write!(f, "WebSocket error: {e}"),
            Disc::Timeout(what) => write!(f, "timed out waiting for {what}"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SyncKind {
    Lag,
    Rejoin,
}

/// A `sync_request` in progress (one page at a time).
struct SyncState {
    kind: SyncKind,
    /// The `since` of the first page.
    origin: u64,
    /// The next `seq` a page must hold.
    next: u64,
}

// ---------------------------------------------------------------------------
// A client (actor) and its current connection (session).

struct Actor {
    id: u32,
    doc: usize,
    hot: bool,
    rng: Rng,
    conns: u32,
    epoch: Option<String>,
    /// Every `seq` up to `have` is known (received, synced or own and acked).
    have: u64,
    ahead: BTreeSet<u64>,
    ops: u64,
    next_send: Instant,
}

impl Actor {
    fn learn(&mut self, seq: u64) {
        if seq <= self.have {
            return;
        }
        if seq == self.have + 1 {
            self.have = seq;
            while self.ahead.remove(&(self.have + 1)) {
                self.have += 1;
            }
        } else {
            self.ahead.insert(seq);
        }
    }

    /// A plain join at `seq`: what came before it is not this client's to know.
    fn restart_at(&mut self, seq: u64) {
        if seq > self.have {
            self.have = seq;
            self.ahead = self.ahead.split_off(&(seq + 1));
            while self.ahead.remove(&(self.have + 1)) {
                self.have += 1;
            }
        }
    }

    fn rate(&self, sh: &Shared) -> f64 {
        if self.hot {
            sh.args.hot_rate
        } else {
            sh.args.cold_rate
        }
    }

    fn schedule_send(&mut self, sh: &Shared) {
        let rate = self.rate(sh);
        let gap = if rate > 0.0 { -(1.0 - self.rng.unit()).ln() / rate } else { 3600.0 };
        self.next_send = Instant::now() + Duration::from_secs_f64(gap.min(3600.0));
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    Full,
    Slow(Duration),
    Stall,
}

struct Session {
    ws: Ws,
    conn: u32,
    tag: u64,
    authed: bool,
    joined: bool,
    left: bool,
    join_seq: u64,
    last_bcast: u64,
    /// `lagged` notices since the last broadcast operation.
    lags: Vec<(u64, u64)>,
    /// Announced gaps not recovered yet.
    pending: Vec<(u64, u64)>,
    sync: Option<SyncState>,
    unacked: VecDeque<(u64, u64)>,
    last_ack: u64,
    /// Own acked `seq`s above `last_bcast`.
    acked_own: BTreeSet<u64>,
    /// Skipped `seq`s not explained yet (own operations whose ack is still to come).
    open_holes: Vec<u64>,
    recovered: u64,
    msgs: u64,
}

async fn connect_ws(sh: &Shared, doc: &str) -> Result<Ws, String> {
    let a = &sh.args;
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if a.rcvbuf > 0 {
        let _ = sock.set_recv_buffer_size(a.rcvbuf as u32);
    }
    if a.mss > 0 {
        let mss = a.mss as libc::c_int;
        // SAFETY: the socket is ours and not connected yet.
        unsafe { set_option(sock.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_MAXSEG, &mss) };
    }
    let stream = timeout(Duration::from_secs(10), sock.connect(a.addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let url = format!("ws://{}/ws/documents/{doc}", a.addr);
    let (ws, _) = timeout(Duration::from_secs(10), tokio_tungstenite::client_async_with_config(url, stream, Some(cfg)))
        .await
        .map_err(|_| "upgrade timed out".to_string())?
        .map_err(|e| format!("upgrade: {e}"))?;
    Ok(ws)
}

impl Session {
    async fn send_text(&mut self, text: String) -> Result<(), Disc> {
        self.ws.send(Message::text(text)).await.map_err(|e| Disc::Error(e.to_string()))
    }

    fn tx(&self) -> bool {
        self.joined && !self.left
    }

    async fn on_ws(
        &mut self,
        a: &mut Actor,
        sh: &Shared,
        m: Option<Result<Message, impl std::fmt::Display>>,
    ) -> Result<(), Disc> {
        match m {
            None => Err(Disc::Eof),
            Some(Err(e)) => Err(Disc::Error(e.to_string())),
            Some(Ok(Message::Close(f))) => {
                Err(Disc::Closed(f.map_or("no code".into(), |f| format!("{} {}", f.code, f.reason))))
            }
            Some(Ok(Message::Text(t))) => self.on_message(a, sh, t.as_bytes()).await,
            Some(Ok(Message::Binary(b))) => self.on_message(a, sh, &b).await,
            Some(Ok(_)) => Ok(()),
        }
    }

    async fn read_one(&mut self, a: &mut Actor, sh: &Shared, limit: Duration, what: &'static str) -> Result<(), Disc> {
        match timeout(limit, self.ws.next()).await {
            Ok(m) => self.on_ws(a, sh, m).await,
            Err(_) => Err(Disc::Timeout(what)),
        }
    }

    async fn on_message(&mut self, a: &mut Actor, sh: &Shared, bytes: &[u8]) -> Result<(), Disc> {
        self.msgs += 1;
        let v: In<'_> = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => {
                let text = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned();
                sh.violation(a.id, "unparsable_message", format!("{e}: {text}"));
                return Ok(());
            }
        };
        match v.ty {
            "operation"
                if sh.args.inject_drop > 0 && {
                    let n = sh.c.injected.fetch_add(1, Relaxed) + 1;
                    n.is_multiple_of(sh.args.inject_drop)
                } => {}
            "operation" => self.on_operation(a, sh, &v),
            "ack" => self.on_ack(a, sh, &v),
            "lagged" => self.on_lagged(a, sh, &v).await?,
            "sync_response" => self.on_sync(a, sh, &v).await?,
            "joined_document" => self.on_joined(a, sh, &v),
            "left_document" => {
                self.left = true;
                self.joined = false;
            }
            "auth_result" => {
                if v.success == Some(true) {
                    self.authed = true;
                } else {
                    sh.violation(a.id, "auth_failed", String::from_utf8_lossy(bytes).into_owned());
                }
            }
            "error" => self.on_error(a, sh, &v),
            "user_joined" | "user_left" | "cursor" | "participants" | "pong" => {
                sh.c.presence.fetch_add(1, Relaxed);
            }
            other => sh.violation(a.id, "unknown_message", other.to_string()),
        }
        Ok(())
    }

    fn on_joined(&mut self, a: &mut Actor, sh: &Shared, v: &In<'_>) {
        let (Some(seq), Some(epoch)) = (v.seq, v.epoch.as_ref()) else {
            sh.violation(a.id, "bad_joined_document", "no seq or epoch".into());
            return;
        };
        if let Some(old) = &a.epoch {
            if old != epoch {
                sh.violation(a.id, "epoch_changed", format!("had {old}, joined {epoch} (storage is on)"));
            }
        }
        a.epoch = Some(epoch.clone());
        self.joined = true;
        self.left = false;
        self.join_seq = seq;
        self.last_bcast = seq;
        self.lags.clear();
        self.acked_own.clear();
        if !matches!(self.sync, Some(SyncState { kind: SyncKind::Rejoin, .. })) {
            a.restart_at(seq);
        }
    }

    /// Seqs `lo..=hi` were skipped on this connection: they must be its own.
    fn gap(&mut self, a: &Actor, sh: &Shared, lo: u64, hi: u64) {
        if hi < lo {
            return;
        }
        if hi - lo > 100_000 {
            sh.violation(a.id, "unannounced_gap", format!("{lo}..={hi} skipped without lagged"));
            return;
        }
        for x in lo..=hi {
            if !self.acked_own.remove(&x) {
                self.open_holes.push(x);
            }
        }
    }

    fn on_operation(&mut self, a: &mut Actor, sh: &Shared, v: &In<'_>) {
        let (Some(seq), Some(payload)) = (v.seq, v.payload) else {
            sh.violation(a.id, "bad_operation", "no seq or payload".into());
            return;
        };
        let bytes = payload.get().as_bytes();
        let tag = payload_tag(bytes);
        if !self.tx() {
            sh.violation(a.id, "broadcast_while_not_joined", format!("seq {seq}"));
        }
        if tag.is_none() {
            sh.violation(a.id, "foreign_payload", payload.get().chars().take(80).collect());
        } else if tag == Some(self.tag) {
            sh.violation(a.id, "own_operation_echoed", format!("seq {seq}"));
        }
        if seq <= self.last_bcast {
            sh.violation(a.id, "out_of_order", format!("seq {seq} after {}", self.last_bcast));
        } else {
            let mut lo = self.last_bcast + 1;
            let lags = std::mem::take(&mut self.lags);
            let mut ok = true;
            for (from, to) in lags {
                if from < lo || to < from || to >= seq {
                    sh.violation(
                        a.id,
                        "lagged_range_wrong",
                        format!("lagged {from}..={to} between broadcasts {} and {seq}", lo - 1),
                    );
                    ok = false;
                    break;
                }
                self.gap(a, sh, lo, from - 1);
                lo = to + 1;
            }
            if ok {
                self.gap(a, sh, lo, seq - 1);
            }
            self.last_bcast = seq;
            self.acked_own = self.acked_own.split_off(&(seq + 1));
        }
        if let Err(prev) = sh.observe(a.doc, seq, fnv(bytes), false) {
            sh.violation(a.id, "payload_mismatch", format!("broadcast seq {seq}: hash {:x} vs {prev:x}", fnv(bytes)));
        }
        a.learn(seq);
        sh.c.delivered.fetch_add(1, Relaxed);
    }

    fn on_ack(&mut self, a: &mut Actor, sh: &Shared, v: &In<'_>) {
        let Some(seq) = v.seq else {
            sh.violation(a.id, "bad_ack", "no seq".into());
            return;
        };
        let Some((id, hash)) = self.unacked.pop_front() else {
            sh.violation(a.id, "ack_without_operation", format!("seq {seq}"));
            return;
        };
        if v.client_op_id != Some(id) {
            sh.violation(a.id, "ack_out_of_order", format!("ack of {:?}, oldest unacked {id}", v.client_op_id));
        }
        if seq <= self.last_ack {
            sh.violation(a.id, "ack_seq_not_increasing", format!("{seq} after {}", self.last_ack));
        }
        self.last_ack = seq;
        if let Err(prev) = sh.observe(a.doc, seq, hash, true) {
            sh.violation(a.id, "payload_mismatch", format!("acked seq {seq}: sent hash {hash:x}, seen {prev:x}"));
        }
        a.learn(seq);
        if let Some(i) = self.open_holes.iter().position(|&x| x == seq) {
            self.open_holes.swap_remove(i);
        } else if seq > self.last_bcast {
            self.acked_own.insert(seq);
        }
        sh.c.ops_acked.fetch_add(1, Relaxed);
    }

    async fn on_lagged(&mut self, a: &mut Actor, sh: &Shared, v: &In<'_>) -> Result<(), Disc> {
        let (Some(from), Some(to)) = (v.missed_from, v.missed_to) else {
            sh.violation(a.id, "bad_lagged", "no missed_from or missed_to".into());
            return Ok(());
        };
        sh.c.lagged.fetch_add(1, Relaxed);
        self.lags.push((from, to));
        self.pending.push((from, to));
        if self.sync.is_none() {
            self.start_sync(a, sh, SyncKind::Lag).await?;
        }
        Ok(())
    }

    async fn start_sync(&mut self, a: &mut Actor, sh: &Shared, kind: SyncKind) -> Result<(), Disc> {
        let since = a.have;
        self.sync = Some(SyncState { kind, origin: since, next: since + 1 });
        sh.c.sync_requests.fetch_add(1, Relaxed);
        let epoch = a.epoch.clone().unwrap_or_default();
        self.send_text(format!(r#"{{"type":"sync_request","since":{since},"epoch":"{epoch}"}}"#)).await
    }

    async fn on_sync(&mut self, a: &mut Actor, sh: &Shared, v: &In<'_>) -> Result<(), Disc> {
        let Some(sync) = self.sync.as_mut() else {
            sh.violation(a.id, "unexpected_sync_response", String::new());
            return Ok(());
        };
        sh.c.sync_pages.fetch_add(1, Relaxed);
        if v.epoch != a.epoch {
            sh.violation(a.id, "sync_epoch", format!("{:?} vs {:?}", v.epoch, a.epoch));
        }
        if v.snapshot.is_some() {
            sh.violation(a.id, "sync_snapshot", "a snapshot although none was stored".into());
        }
        let ops = v.ops.as_deref().unwrap_or(&[]);
        for op in ops {
            if op.seq != sync.next {
                sh.violation(a.id, "sync_not_contiguous", format!("page holds {} where {} was due", op.seq, sync.next));
            }
            sync.next = op.seq + 1;
            let bytes = op.payload.get().as_bytes();
            if payload_tag(bytes).is_none() {
                sh.violation(a.id, "foreign_payload", op.payload.get().chars().take(80).collect());
            }
            if let Err(prev) = sh.observe(a.doc, op.seq, fnv(bytes), false) {
                sh.violation(
                    a.id,
                    "payload_mismatch",
                    format!("synced seq {}: hash {:x} vs {prev:x}", op.seq, fnv(bytes)),
                );
            }
            a.learn(op.seq);
        }
        sh.c.sync_ops.fetch_add(ops.len() as u64, Relaxed);
        if v.more == Some(true) {
            if ops.is_empty() {
                sh.violation(a.id, "sync_empty_page_with_more", String::new());
                self.sync = None;
                return Ok(());
            }
            let since = sync.next - 1;
            sh.c.sync_requests.fetch_add(1, Relaxed);
            let epoch = a.epoch.clone().unwrap_or_default();
            return self.send_text(format!(r#"{{"type":"sync_request","since":{since},"epoch":"{epoch}"}}"#)).await;
        }
        let end = sync.next - 1;
        let (kind, origin) = (sync.kind, sync.origin);
        self.sync = None;
        if v.more.is_none() {
            sh.violation(a.id, "sync_without_more", String::new());
        }
        if Some(end) != v.seq {
            sh.violation(a.id, "sync_short", format!("last page ends at {end}, the document's seq is {:?}", v.seq));
        }
        if kind == SyncKind::Rejoin {
            if end >= self.join_seq {
                sh.c.continuations_ok.fetch_add(1, Relaxed);
            } else {
                sh.violation(
                    a.id,
                    "continuation_short",
                    format!("rejoin since {origin}: pages end at {end} < joined seq {}", self.join_seq),
                );
            }
        }
        let before = self.pending.len();
        self.pending.retain(|&(_, to)| to > end);
        let done = (before - self.pending.len()) as u64;
        self.recovered += done;
        sh.c.recovered.fetch_add(done, Relaxed);
        if !self.pending.is_empty() {
            self.start_sync(a, sh, SyncKind::Lag).await?;
        }
        Ok(())
    }

    fn on_error(&mut self, a: &mut Actor, sh: &Shared, v: &In<'_>) {
        let code = v.code.as_deref().unwrap_or("?");
        if code == "UNAVAILABLE" {
            if let Some(id) = v.client_op_id {
                if let Some(i) = self.unacked.iter().position(|&(x, _)| x == id) {
                    self.unacked.remove(i);
                }
                sh.c.ops_unavailable.fetch_add(1, Relaxed);
                return;
            }
        }
        if matches!(code, "HISTORY_UNAVAILABLE" | "EPOCH_CHANGED") && self.sync.is_some() {
            self.sync = None;
            self.pending.clear();
        }
        let kind = match code {
            "HISTORY_UNAVAILABLE" => "error_history_unavailable",
            "EPOCH_CHANGED" => "error_epoch_changed",
            "UNAVAILABLE" => "error_unavailable",
            _ => "error_other",
        };
        sh.violation(a.id, kind, format!("{code}: {}", v.message.as_deref().unwrap_or("")));
    }

    async fn send_op(&mut self, a: &mut Actor, sh: &Shared) -> Result<(), Disc> {
        a.ops += 1;
        let n = a.ops;
        let pad = if a.hot {
            a.rng.range(100, sh.args.hot_payload.max(100) as u64)
        } else {
            a.rng.range(20, sh.args.cold_payload.max(20) as u64)
        } as usize;
        let payload = format!(r#"{{"u":"{}.{}.{n}","p":"{}"}}"#, a.id, self.conn, &sh.pad[..pad.min(sh.pad.len())]);
        self.unacked.push_back((n, fnv(payload.as_bytes())));
        sh.c.ops_sent.fetch_add(1, Relaxed);
        self.send_text(format!(r#"{{"type":"operation","client_op_id":{n},"payload":{payload}}}"#)).await
    }

    /// Reads (in `mode`) and sends (at the document's rate, if `send`) until `until`.
    async fn run(&mut self, a: &mut Actor, sh: &Shared, until: Instant, mode: Read, send: bool) -> Result<(), Disc> {
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            if send && self.tx() && now >= a.next_send {
                self.send_op(a, sh).await?;
                a.schedule_send(sh);
                continue;
            }
            let wake = if send { a.next_send.min(until) } else { until };
            // A client that is told it lagged reads at full speed until it has recovered.
            let mode = if mode != Read::Stall && (!self.pending.is_empty() || self.sync.is_some()) {
                Read::Full
            } else {
                mode
            };
            match mode {
                Read::Stall => sleep_until(wake).await,
                Read::Full | Read::Slow(_) => {
                    tokio::select! {
                        m = self.ws.next() => {
                            self.on_ws(a, sh, m).await?;
                            if let Read::Slow(pause) = mode {
                                sleep_until((Instant::now() + pause).min(until)).await;
                            }
                        }
                        _ = sleep_until(wake) => {}
                    }
                }
            }
        }
    }

    /// Sends `leave_document` and reads up to `left_document`.
    async fn leave(&mut self, a: &mut Actor, sh: &Shared) -> Result<(), Disc> {
        self.send_text(r#"{"type":"leave_document"}"#.into()).await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.left {
            let left = deadline.saturating_duration_since(Instant::now());
            self.read_one(a, sh, left, "left_document").await?;
        }
        sh.c.leaves.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Sends a Close and waits (briefly) for the relay's echo.
    async fn close(mut self, a: &mut Actor, sh: &Shared) {
        let _ = self.ws.close(None).await;
        let deadline = Instant::now() + Duration::from_secs(3);
        while let Ok(Some(Ok(m))) = timeout(deadline.saturating_duration_since(Instant::now()), self.ws.next()).await {
            if let Message::Text(t) = &m {
                let _ = self.on_message(a, sh, t.as_bytes()).await;
            } else if let Message::Binary(b) = &m {
                let _ = self.on_message(a, sh, b).await;
            }
        }
        self.retire(a, sh, false);
    }

    /// The end of this connection: what is left to check goes to the end-of-run checks.
    fn retire(&mut self, a: &mut Actor, sh: &Shared, dropped: bool) {
        sh.open.fetch_sub(1, Relaxed);
        let mut lo = self.last_bcast + 1;
        for (from, to) in std::mem::take(&mut self.lags) {
            if from < lo || to < from {
                sh.violation(a.id, "lagged_range_wrong", format!("lagged {from}..={to} after broadcast {}", lo - 1));
                break;
            }
            lo = to + 1;
        }
        let holes = std::mem::take(&mut self.open_holes);
        if !holes.is_empty() {
            sh.c.holes_deferred.fetch_add(holes.len() as u64, Relaxed);
            let mut all = sh.holes.lock().unwrap();
            all.extend(holes.into_iter().map(|seq| Hole { doc: a.doc, seq, tag: self.tag, actor: a.id }));
        }
        if dropped {
            sh.c.ops_unacked_at_drop.fetch_add(self.unacked.len() as u64, Relaxed);
            sh.c.unrecovered_at_drop.fetch_add(self.pending.len() as u64, Relaxed);
        } else if !self.pending.is_empty() {
            sh.violation(a.id, "lagged_not_recovered", format!("{:?} at the end of the connection", self.pending));
        }
    }
}

/// Connects, authenticates and joins (with `since` = the last applied seq
/// and the epoch, if `resume`), retrying a few times.
async fn connect_join(a: &mut Actor, sh: &Shared, resume: bool) -> Option<Session> {
    for attempt in 0..5u32 {
        if attempt > 0 {
            sleep(Duration::from_millis(200 << attempt)).await;
        }
        let permit = sh.connect_gate.acquire().await.ok()?;
        let ws = match connect_ws(sh, &sh.docs[a.doc]).await {
            Ok(ws) => ws,
            Err(e) => {
                sh.c.connect_failures.fetch_add(1, Relaxed);
                if attempt == 4 {
                    sh.violation(a.id, "connect_failed", e);
                }
                continue;
            }
        };
        a.conns += 1;
        if sh.c.connects.fetch_add(1, Relaxed) >= sh.args.clients as u64 {
            sh.c.reconnects.fetch_add(1, Relaxed);
        }
        sh.open.fetch_add(1, Relaxed);
        let mut s = Session {
            ws,
            conn: a.conns,
            tag: tag_of(a.id, a.conns),
            authed: false,
            joined: false,
            left: false,
            join_seq: 0,
            last_bcast: 0,
            lags: Vec::new(),
            pending: Vec::new(),
            sync: None,
            unacked: VecDeque::new(),
            last_ack: 0,
            acked_own: BTreeSet::new(),
            open_holes: Vec::new(),
            recovered: 0,
            msgs: 0,
        };
        let result = async {
            s.send_text(format!(r#"{{"type":"authenticate","token":"c{}"}}"#, a.id)).await?;
            while !s.authed {
                s.read_one(a, sh, Duration::from_secs(15), "auth_result").await?;
            }
            join(&mut s, a, sh, resume && a.epoch.is_some()).await
        }
        .await;
        drop(permit);
        match result {
            Ok(()) => return Some(s),
            Err(e) => {
                sh.c.connect_failures.fetch_add(1, Relaxed);
                if attempt == 4 {
                    sh.violation(a.id, "join_failed", e.to_string());
                }
                s.retire(a, sh, true);
            }
        }
    }
    None
}

async fn join(s: &mut Session, a: &mut Actor, sh: &Shared, resume: bool) -> Result<(), Disc> {
    if resume {
        let (since, epoch) = (a.have, a.epoch.clone().unwrap_or_default());
        s.sync = Some(SyncState { kind: SyncKind::Rejoin, origin: since, next: since + 1 });
        sh.c.rejoins_since.fetch_add(1, Relaxed);
        s.send_text(format!(r#"{{"type":"join_document","since":{since},"epoch":"{epoch}"}}"#)).await?;
    } else {
        s.sync = None;
        s.send_text(r#"{"type":"join_document"}"#.into()).await?;
    }
    while !s.joined {
        s.read_one(a, sh, Duration::from_secs(15), "joined_document").await?;
    }
    a.schedule_send(sh);
    Ok(())
}

/// Makes sure there is a connection (a lost one resumes with `since`).
async fn ensure(conn: &mut Option<Session>, a: &mut Actor, sh: &Shared) {
    if conn.is_none() {
        *conn = connect_join(a, sh, true).await;
        if conn.is_none() {
            sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Runs a session until `until`; a connection the relay ended is a violation.
async fn run(conn: &mut Option<Session>, a: &mut Actor, sh: &Shared, until: Instant, mode: Read, send: bool) {
    let Some(s) = conn.as_mut() else { return };
    if let Err(e) = s.run(a, sh, until, mode, send).await {
        sh.c.unexpected_closes.fetch_add(1, Relaxed);
        sh.violation(a.id, "connection_lost", e.to_string());
        s.retire(a, sh, true);
        *conn = None;
    }
}

async fn actor_main(sh: Arc<Shared>, id: u32) {
    let doc = id as usize % sh.docs.len();
    let mut a = Actor {
        id,
        doc,
        hot: sh.hot[doc],
        rng: Rng::new(sh.args.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(id))),
        conns: 0,
        epoch: None,
        have: 0,
        ahead: BTreeSet::new(),
        ops: 0,
        next_send: Instant::now(),
    };
    let mut conn = connect_join(&mut a, &sh, false).await;
    sh.ready.fetch_add(1, Relaxed);
    let until = loop {
        if let Some(&(_, until)) = sh.schedule.get() {
            break until;
        }
        ensure(&mut conn, &mut a, &sh).await;
        run(&mut conn, &mut a, &sh, Instant::now() + Duration::from_millis(500), Read::Full, true).await;
    };
    while Instant::now() < until {
        ensure(&mut conn, &mut a, &sh).await;
        let roll = a.rng.unit();
        let b = match roll {
            x if x < 0.40 => 0,
            x if x < 0.55 => 1,
            x if x < 0.70 => 2,
            x if x < 0.85 => 3,
            _ => 4,
        };
        sh.phases[b].fetch_add(1, Relaxed);
        let now = Instant::now();
        let cap = |d: Duration| (now + d).min(until);
        match b {
            0 => {
                let d = a.rng.secs(10.0, 40.0);
                run(&mut conn, &mut a, &sh, cap(d), Read::Full, true).await;
            }
            1 => {
                // Slow reader: pauses after every message until it lagged and
                // recovered (or 60 s), then reads normally for a few seconds.
                let pause = Duration::from_millis(a.rng.range(100, 300));
                let end = cap(Duration::from_secs(60));
                let start = conn.as_ref().map_or(0, |s| s.recovered);
                while Instant::now() < end && conn.as_ref().is_some_and(|s| s.recovered == start) {
                    run(
                        &mut conn,
                        &mut a,
                        &sh,
                        (Instant::now() + Duration::from_secs(1)).min(end),
                        Read::Slow(pause),
                        true,
                    )
                    .await;
                }
                let d = a.rng.secs(3.0, 6.0);
                run(&mut conn, &mut a, &sh, cap(d + Duration::from_secs(60)).min(Instant::now() + d), Read::Full, true)
                    .await;
            }
            2 => {
                // Staller: reads, stops reading for seconds, resumes.
                let d = a.rng.secs(2.0, 5.0);
                run(&mut conn, &mut a, &sh, cap(d), Read::Full, true).await;
                let stall = a.rng.secs(5.0, 20.0);
                run(&mut conn, &mut a, &sh, (Instant::now() + stall).min(until), Read::Stall, true).await;
                let d = a.rng.secs(5.0, 10.0);
                run(&mut conn, &mut a, &sh, (Instant::now() + d).min(until), Read::Full, true).await;
            }
            3 => {
                // Vanisher: reads and sends, drops the connection (no Close),
                // comes back later with since + epoch.
                let d = a.rng.secs(5.0, 30.0);
                run(&mut conn, &mut a, &sh, cap(d), Read::Full, true).await;
                if Instant::now() >= until {
                    continue;
                }
                if let Some(mut s) = conn.take() {
                    if a.rng.unit() < 0.5 {
                        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                        // SAFETY: the session's socket is ours; linger 0 makes the drop a reset.
                        unsafe { set_option(s.ws.get_ref().as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &linger) };
                    }
                    s.retire(&mut a, &sh, true);
                    drop(s);
                    sh.c.vanishes.fetch_add(1, Relaxed);
                }
                let gone = a.rng.secs(1.0, 10.0);
                sleep_until((Instant::now() + gone).min(until)).await;
                if Instant::now() >= until {
                    continue;
                }
                conn = connect_join(&mut a, &sh, true).await;
                let d = a.rng.secs(3.0, 8.0);
                run(&mut conn, &mut a, &sh, (Instant::now() + d).min(until), Read::Full, true).await;
            }
            _ => {
                // Churner: join, leave, reconnect, again and again.
                let cycles = a.rng.range(2, 6);
                for _ in 0..cycles {
                    if Instant::now() >= until {
                        break;
                    }
                    let Some(mut s) = conn.take() else {
                        conn = connect_join(&mut a, &sh, false).await;
                        continue;
                    };
                    if a.rng.unit() < 0.5 {
                        let _ = s.send_op(&mut a, &sh).await;
                    }
                    let d = a.rng.secs(0.5, 3.0);
                    let _ = s.run(&mut a, &sh, (Instant::now() + d).min(until), Read::Full, false).await;
                    match s.leave(&mut a, &sh).await {
                        Err(e) => {
                            sh.c.unexpected_closes.fetch_add(1, Relaxed);
                            sh.violation(a.id, "connection_lost", format!("while leaving: {e}"));
                            s.retire(&mut a, &sh, true);
                        }
                        Ok(()) if a.rng.unit() < 0.3 => {
                            // Leave and join again on the same connection.
                            sh.c.churn_cycles.fetch_add(1, Relaxed);
                            if let Err(e) = join(&mut s, &mut a, &sh, false).await {
                                sh.violation(a.id, "join_failed", e.to_string());
                                s.retire(&mut a, &sh, true);
                            } else {
                                conn = Some(s);
                            }
                            continue;
                        }
                        Ok(()) => s.close(&mut a, &sh).await,
                    }
                    sh.c.churn_cycles.fetch_add(1, Relaxed);
                    sleep(a.rng.secs(0.1, 1.0)).await;
                    conn = connect_join(&mut a, &sh, false).await;
                }
            }
        }
    }
    finish(conn, &mut a, &sh).await;
    sh.finished.fetch_add(1, Relaxed);
}

/// The end: no more sending; wait for the acks, read until quiet with every
/// lag recovered, leave and close.
async fn finish(conn: Option<Session>, a: &mut Actor, sh: &Shared) {
    let Some(mut s) = conn else { return };
    let end = Instant::now() + Duration::from_secs(60);
    let mut quiet_since = Instant::now();
    let mut seen = s.msgs;
    loop {
        let now = Instant::now();
        if now >= end {
            if !s.unacked.is_empty() {
                sh.violation(a.id, "acks_missing", format!("{} operations never acknowledged", s.unacked.len()));
            }
            break;
        }
        if let Err(e) = s.run(a, sh, now + Duration::from_millis(500), Read::Full, false).await {
            sh.c.unexpected_closes.fetch_add(1, Relaxed);
            sh.violation(a.id, "connection_lost", format!("at the end: {e}"));
            s.retire(a, sh, true);
            return;
        }
        if s.msgs != seen {
            seen = s.msgs;
            quiet_since = Instant::now();
        }
        if s.unacked.is_empty()
            && s.pending.is_empty()
            && s.sync.is_none()
            && quiet_since.elapsed() >= Duration::from_secs(3)
        {
            break;
        }
    }
    if let Err(e) = s.leave(a, sh).await {
        sh.violation(a.id, "connection_lost", format!("while leaving at the end: {e}"));
        s.retire(a, sh, true);
        return;
    }
    s.close(a, sh).await;
}

// ---------------------------------------------------------------------------
// The relay from outside: /metrics, /healthz, VmRSS.

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = timeout(Duration::from_secs(5), TcpStream::connect(addr)).await.ok()?.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    Some((status, body))
}

/// Per-core samples of a metric family (label `core`), in order.
fn metric(body: &str, family: &str) -> Vec<f64> {
    body.lines()
        .filter(|l| l.starts_with(family) && matches!(l.as_bytes().get(family.len()), Some(b'{') | Some(b' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

async fn metric_sums(addr: SocketAddr, families: &[&str]) -> Option<Vec<f64>> {
    let (status, body) = http_get(addr, "/metrics").await?;
    (status == 200).then(|| families.iter().map(|f| metric(&body, f).iter().sum()).collect())
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------
// The end-of-run history check (check 2).

#[derive(Default)]
struct DocCheck {
    seq: u64,
    pages: u64,
    acked: u64,
    missing_acked: u64,
    mismatched: u64,
    stored_unacked: u64,
    problems: Vec<String>,
}

/// A fresh client joins with `since: 0`, pages through the whole history and
/// compares it with what the soak saw; returns the check and the connection
/// tag of every `seq`.
async fn verify_doc(sh: &Shared, doc: usize) -> (DocCheck, Vec<u64>) {
    let mut r = DocCheck::default();
    let mut tags = vec![0u64];
    let outcome: Result<(), String> = async {
        let mut ws = connect_ws(sh, &sh.docs[doc]).await?;
        let text = |s: String| Message::text(s);
        ws.send(text(r#"{"type":"authenticate","token":"verifier"}"#.into())).await.map_err(|e| e.to_string())?;
        ws.send(text(r#"{"type":"join_document","since":0}"#.into())).await.map_err(|e| e.to_string())?;
        let mut hashes = vec![0u64];
        let mut next = 1u64;
        loop {
            let m = timeout(Duration::from_secs(30), ws.next())
                .await
                .map_err(|_| "timed out".to_string())?
                .ok_or("connection ended")?
                .map_err(|e| e.to_string())?;
            let Message::Text(t) = m else { continue };
            let v: In<'_> = serde_json::from_str(&t).map_err(|e| e.to_string())?;
            match v.ty {
                "auth_result" | "joined_document" => {}
                "sync_response" => {
                    r.pages += 1;
                    for op in v.ops.as_deref().unwrap_or(&[]) {
                        if op.seq != next {
                            return Err(format!("history page holds seq {} where {next} was due", op.seq));
                        }
                        next += 1;
                        let bytes = op.payload.get().as_bytes();
                        hashes.push(fnv(bytes));
                        tags.push(payload_tag(bytes).unwrap_or(0));
                    }
                    r.seq = v.seq.unwrap_or(0);
                    if v.more != Some(true) {
                        break;
                    }
                    ws.send(text(format!(r#"{{"type":"sync_request","since":{}}}"#, next - 1)))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                "error" => return Err(format!("{:?}: {:?}", v.code, v.message)),
                _ => {}
            }
        }
        if next - 1 != r.seq {
            r.problems.push(format!("history ends at {} but the document's seq is {}", next - 1, r.seq));
        }
        {
            let t = sh.truth[doc].lock().unwrap();
            for seq in 1..t.hash.len() {
                let (h, acked) = (t.hash[seq], t.acked[seq]);
                if acked {
                    r.acked += 1;
                }
                if h == 0 {
                    continue;
                }
                match hashes.get(seq) {
                    None if acked => r.missing_acked += 1,
                    None => r.mismatched += 1,
                    Some(&got) if got != h => r.mismatched += 1,
                    Some(_) => {}
                }
            }
            r.stored_unacked = (1..hashes.len()).filter(|&s| !t.acked.get(s).copied().unwrap_or(false)).count() as u64;
        }
        let _ = ws.close(None).await;
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        r.problems.push(e);
    }
    (r, tags)
}

// ---------------------------------------------------------------------------

fn main() {
    let args = Args::parse();
    raise_nofile_limit();
    let threads =
        if args.threads > 0 { args.threads } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build().expect("runtime");
    let code = rt.block_on(soak(args, threads));
    std::process::exit(code);
}

fn progress(sh: &Shared, t0: Instant, rss: Option<u64>) -> String {
    let c = &sh.c;
    let v: u64 = sh.kinds.lock().unwrap().values().sum();
    format!(
        "t={:>4.0}s open={} sent={} acked={} delivered={} lagged={} recovered={} reconnects={} violations={v} rss={}",
        t0.elapsed().as_secs_f64(),
        sh.open.load(Relaxed),
        c.ops_sent.load(Relaxed),
        c.ops_acked.load(Relaxed),
        c.delivered.load(Relaxed),
        c.lagged.load(Relaxed),
        c.recovered.load(Relaxed),
        c.reconnects.load(Relaxed),
        rss.map_or("-".into(), |k| format!("{} MiB", k / 1024))
    )
}

async fn soak(args: Args, threads: usize) -> i32 {
    let t0 = Instant::now();
    let docs: Vec<String> = (0..args.docs).map(|d| format!("{}-{d}", args.doc_prefix)).collect();
    let every = (1.0 / args.hot_share.clamp(1e-6, 1.0)).round().max(1.0) as usize;
    let hot: Vec<bool> = (0..args.docs).map(|d| args.hot_share > 0.0 && d % every == 0).collect();
    let hot_docs = hot.iter().filter(|&&h| h).count();
    let sh = Arc::new(Shared {
        truth: (0..args.docs).map(|_| Mutex::new(Truth::default())).collect(),
        actor_violations: (0..args.clients).map(|_| AtomicU32::new(0)).collect(),
        connect_gate: Semaphore::new(args.concurrency.max(1)),
        pad: "x".repeat(args.hot_payload.max(args.cold_payload).max(100)),
        docs,
        hot,
        c: Counters::default(),
        kinds: Mutex::new(BTreeMap::new()),
        samples: Mutex::new(Vec::new()),
        holes: Mutex::new(Vec::new()),
        schedule: OnceLock::new(),
        ready: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        open: AtomicI64::new(0),
        phases: Default::default(),
        args: args.clone(),
    });
    eprintln!(
        "[soak] {} clients over {} documents ({hot_docs} hot: {} ops/s per client, payloads to {} B; cold: {} ops/s, to {} B), {} min, {threads} threads",
        args.clients, args.docs, args.hot_rate, args.hot_payload, args.cold_rate, args.cold_payload, args.minutes
    );
    let mut handles = Vec::with_capacity(args.clients);
    for id in 0..args.clients {
        handles.push(tokio::spawn(actor_main(sh.clone(), id as u32)));
    }
    let ramp_deadline = Instant::now() + Duration::from_secs(300);
    while sh.ready.load(Relaxed) < args.clients && Instant::now() < ramp_deadline {
        sleep(Duration::from_millis(200)).await;
    }
    let ramp_secs = t0.elapsed().as_secs_f64();
    eprintln!("[soak] {} clients joined in {ramp_secs:.1} s ({} open)", sh.ready.load(Relaxed), sh.open.load(Relaxed));
    sleep(Duration::from_secs_f64(args.warmup)).await;
    let per_core_docs = match http_get(args.addr, "/metrics").await {
        Some((200, body)) => metric(&body, "docrelay_documents"),
        _ => Vec::new(),
    };
    let per_core_sessions = match http_get(args.addr, "/metrics").await {
        Some((200, body)) => metric(&body, "docrelay_sessions"),
        _ => Vec::new(),
    };
    let rss_start = rss_kib(args.relay_pid);
    let open_at_start = sh.open.load(Relaxed);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(args.minutes * 60.0);
    let _ = sh.schedule.set((start, until));
    let c0 = (sh.c.ops_sent.load(Relaxed), sh.c.ops_acked.load(Relaxed), sh.c.delivered.load(Relaxed));
    eprintln!(
        "[soak] warm-up over: relay RSS {} KiB, documents per core {per_core_docs:?}, sessions per core {per_core_sessions:?}; behaviours for {} min",
        rss_start.map_or("-".into(), |k| k.to_string()),
        args.minutes
    );
    let mut samples: Vec<(f64, u64)> = Vec::new();
    if let Some(k) = rss_start {
        samples.push((0.0, k));
    }
    let period = Duration::from_secs_f64(args.sample_secs.max(1.0));
    let mut next = start + period;
    while Instant::now() < until {
        sleep_until(next.min(until)).await;
        next += period;
        let rss = rss_kib(args.relay_pid);
        if let Some(k) = rss {
            samples.push((start.elapsed().as_secs_f64(), k));
        }
        eprintln!("[soak] {}", progress(&sh, start, rss));
    }
    let run_secs = start.elapsed().as_secs_f64();
    eprintln!("[soak] behaviours over; clients stop sending, drain, leave and close");
    let finish_deadline = Instant::now() + Duration::from_secs(180);
    while sh.finished.load(Relaxed) < args.clients && Instant::now() < finish_deadline {
        sleep(Duration::from_millis(500)).await;
    }
    let unfinished = args.clients - sh.finished.load(Relaxed);
    if unfinished > 0 {
        eprintln!("[soak] {unfinished} clients did not finish in time");
        for h in &handles {
            h.abort();
        }
    }
    eprintln!("[soak] {}", progress(&sh, start, rss_kib(args.relay_pid)));
    // Every client has left: wait for the relay to drop the sessions and unload the documents.
    let unload_deadline = Instant::now() + Duration::from_millis(args.idle_unload_ms * 5) + Duration::from_secs(60);
    let mut left = vec![f64::NAN, f64::NAN];
    while Instant::now() < unload_deadline {
        if let Some(v) = metric_sums(args.addr, &["docrelay_sessions", "docrelay_documents"]).await {
            left = v;
            if left[0] == 0.0 && left[1] == 0.0 {
                break;
            }
        }
        sleep(Duration::from_millis(500)).await;
    }
    let unloaded = left[0] == 0.0 && left[1] == 0.0;
    // One more sample period for the allocator to settle.
    sleep(Duration::from_secs(2)).await;
    let rss_end = rss_kib(args.relay_pid);
    if let Some(k) = rss_end {
        samples.push((start.elapsed().as_secs_f64(), k));
    }
    eprintln!(
        "[soak] sessions {} and documents {} left on the relay; RSS {} KiB; checking the history of every document",
        left[0],
        left[1],
        rss_end.map_or("-".into(), |k| k.to_string())
    );

    // Check 2: the history of every document, 8 at a time.
    let verify_start = Instant::now();
    let mut results: Vec<Option<(DocCheck, Vec<u64>)>> = (0..args.docs).map(|_| None).collect();
    let gate = Arc::new(Semaphore::new(8));
    let mut tasks = Vec::new();
    for d in 0..args.docs {
        let (sh, gate) = (sh.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await;
            verify_doc(&sh, d).await
        }));
    }
    for (d, t) in tasks.into_iter().enumerate() {
        results[d] = t.await.ok();
    }
    let verify_secs = verify_start.elapsed().as_secs_f64();
    // The history check loaded every document again (from storage); once they
    // are unloaded again, a second RSS reading tells memory the allocator kept
    // for reuse (it stays about the same) from memory that leaks (it grows by
    // the same amount again).
    let unload_deadline = Instant::now() + Duration::from_millis(args.idle_unload_ms * 5) + Duration::from_secs(60);
    while Instant::now() < unload_deadline {
        if let Some(v) = metric_sums(args.addr, &["docrelay_sessions", "docrelay_documents"]).await {
            if v[0] == 0.0 && v[1] == 0.0 {
                break;
            }
        }
        sleep(Duration::from_millis(500)).await;
    }
    sleep(Duration::from_secs(2)).await;
    let rss_after_reload = rss_kib(args.relay_pid);
    let mut hist_ops = 0u64;
    let mut acked_checked = 0u64;
    let mut missing = 0u64;
    let mut mismatched = 0u64;
    let mut stored_unacked = 0u64;
    let mut doc_problems = Vec::new();
    let mut pages = 0u64;
    for (d, r) in results.iter().enumerate() {
        match r {
            Some((r, _)) => {
                hist_ops += r.seq;
                acked_checked += r.acked;
                missing += r.missing_acked;
                mismatched += r.mismatched;
                stored_unacked += r.stored_unacked;
                pages += r.pages;
                for p in &r.problems {
                    doc_problems.push(format!("{}: {p}", sh.docs[d]));
                }
            }
            None => doc_problems.push(format!("{}: the check did not run", sh.docs[d])),
        }
    }
    // The skipped seqs that had no ack: they must be the connection's own operations.
    let holes = std::mem::take(&mut *sh.holes.lock().unwrap());
    let mut holes_bad = 0u64;
    for h in &holes {
        let tag = results[h.doc].as_ref().and_then(|(_, tags)| tags.get(h.seq as usize).copied());
        if tag != Some(h.tag) {
            holes_bad += 1;
            sh.violation(
                h.actor,
                "unannounced_gap",
                format!(
                    "seq {} never reached connection {} and is not its own (history: {})",
                    h.seq,
                    h.tag & 0xffff_ffff,
                    tag.map_or("absent".into(), |t| format!("client {} connection {}", t >> 32, t & 0xffff_ffff))
                ),
            );
        }
    }

    // Checks.
    let c = &sh.c;
    let kinds = sh.kinds.lock().unwrap().clone();
    let total_violations: u64 = kinds.values().sum();
    let clients_with = sh.actor_violations.iter().filter(|v| v.load(Relaxed) > 0).count();
    let check1 = total_violations == 0 && unfinished == 0;
    let check2 =
        missing == 0 && mismatched == 0 && doc_problems.is_empty() && acked_checked == c.ops_acked.load(Relaxed);
    let rss_max = samples.iter().map(|s| s.1).max();
    let bound_kib = rss_start.map(|s| s + args.rss_slack_mib * 1024 + hist_ops * args.rss_bytes_per_op / 1024);
    let check3 = match (rss_end, bound_kib) {
        (Some(e), Some(b)) => e <= b && unloaded,
        _ => false,
    };
    let lines = [
        format!(
            "check 1 (per-client order, gaps, lag recovery): {} - {total_violations} violations on {clients_with} of {} clients; {} lagged notices, {} recovered by sync ({} sync pages), {} rejoins with since ({} continuations complete), {} unfinished clients",
            pf(check1),
            args.clients,
            c.lagged.load(Relaxed),
            c.recovered.load(Relaxed),
            c.sync_pages.load(Relaxed),
            c.rejoins_since.load(Relaxed),
            c.continuations_ok.load(Relaxed),
            unfinished
        ),
        format!(
            "check 2 (every acked operation in the history): {} - {acked_checked} acked checked of {} acks, {missing} missing, {mismatched} with other bytes, {} documents with problems; history {hist_ops} ops in {pages} pages ({stored_unacked} stored without an ack seen), {} skipped seqs of own unacked operations checked ({holes_bad} not own)",
            pf(check2),
            c.ops_acked.load(Relaxed),
            doc_problems.len(),
            holes.len()
        ),
        format!(
            "check 3 (relay RSS): {} - start {} MiB, max {} MiB, end {} MiB after every client left and {} (bound: start + {} MiB + {} B x {hist_ops} stored ops = {} MiB); {} MiB after the history check loaded and unloaded every document again",
            pf(check3),
            mib(rss_start),
            mib(rss_max),
            mib(rss_end),
            if unloaded { "every document was unloaded".to_string() } else { format!("NOT unloaded (sessions {}, documents {})", left[0], left[1]) },
            args.rss_slack_mib,
            args.rss_bytes_per_op,
            mib(bound_kib),
            mib(rss_after_reload),
        ),
    ];
    println!("[soak] ---- client summary ----");
    println!(
        "[soak] {} clients, {} documents ({hot_docs} hot), {:.1} min of behaviours; ops sent {} acked {} (unavailable {}, unacked at a drop {}), delivered {}",
        args.clients,
        args.docs,
        run_secs / 60.0,
        c.ops_sent.load(Relaxed),
        c.ops_acked.load(Relaxed),
        c.ops_unavailable.load(Relaxed),
        c.ops_unacked_at_drop.load(Relaxed),
        c.delivered.load(Relaxed)
    );
    println!(
        "[soak] phases {}; reconnects {} (vanishes {}, churn cycles {}), connect failures {}, connections lost {}",
        BEHAVIOURS
            .iter()
            .zip(&sh.phases)
            .map(|(n, v)| format!("{n}={}", v.load(Relaxed)))
            .collect::<Vec<_>>()
            .join(" "),
        c.reconnects.load(Relaxed),
        c.vanishes.load(Relaxed),
        c.churn_cycles.load(Relaxed),
        c.connect_failures.load(Relaxed),
        c.unexpected_closes.load(Relaxed)
    );
    for l in &lines {
        println!("[soak] {l}");
    }
    for (k, v) in &kinds {
        println!("[soak]   violation {k}: {v}");
    }
    for s in sh.samples.lock().unwrap().iter().take(20) {
        println!("[soak]   e.g. {s}");
    }
    for p in doc_problems.iter().take(20) {
        println!("[soak]   history: {p}");
    }

    if let Some(path) = &args.json {
        let per_client: BTreeMap<String, u32> = sh
            .actor_violations
            .iter()
            .enumerate()
            .filter(|(_, v)| v.load(Relaxed) > 0)
            .take(200)
            .map(|(i, v)| (i.to_string(), v.load(Relaxed)))
            .collect();
        let (s0, a0, d0) = c0;
        let j = json!({
            "clients": args.clients,
            "documents": args.docs,
            "hot_documents": hot_docs,
            "minutes": args.minutes,
            "behaviour_secs": run_secs,
            "ramp_secs": ramp_secs,
            "verify_secs": verify_secs,
            "open_at_start": open_at_start,
            "documents_per_core_at_start": per_core_docs,
            "sessions_per_core_at_start": per_core_sessions,
            "client_threads": threads,
            "params": {
                "hot_rate": args.hot_rate, "cold_rate": args.cold_rate, "hot_payload": args.hot_payload,
                "cold_payload": args.cold_payload, "rcvbuf": args.rcvbuf, "mss": args.mss, "seed": args.seed,
            },
            "ops": {
                "sent": c.ops_sent.load(Relaxed),
                "acked": c.ops_acked.load(Relaxed),
                "sent_during_behaviours": c.ops_sent.load(Relaxed) - s0,
                "acked_during_behaviours": c.ops_acked.load(Relaxed) - a0,
                "unavailable": c.ops_unavailable.load(Relaxed),
                "unacked_at_drop": c.ops_unacked_at_drop.load(Relaxed),
                "delivered": c.delivered.load(Relaxed),
                "delivered_during_behaviours": c.delivered.load(Relaxed) - d0,
                "presence_messages": c.presence.load(Relaxed),
                "in_history": hist_ops,
                "stored_without_ack_seen": stored_unacked,
            },
            "lag": {
                "lagged_notices": c.lagged.load(Relaxed),
                "recoveries": c.recovered.load(Relaxed),
                "unrecovered_at_drop": c.unrecovered_at_drop.load(Relaxed),
                "sync_requests": c.sync_requests.load(Relaxed),
                "sync_pages": c.sync_pages.load(Relaxed),
                "sync_ops": c.sync_ops.load(Relaxed),
            },
            "connections": {
                "connects": c.connects.load(Relaxed),
                "reconnects": c.reconnects.load(Relaxed),
                "vanishes": c.vanishes.load(Relaxed),
                "rejoins_with_since": c.rejoins_since.load(Relaxed),
                "continuations_complete": c.continuations_ok.load(Relaxed),
                "churn_cycles": c.churn_cycles.load(Relaxed),
                "leaves": c.leaves.load(Relaxed),
                "connect_failures": c.connect_failures.load(Relaxed),
                "lost": c.unexpected_closes.load(Relaxed),
            },
            "phases": BEHAVIOURS.iter().zip(&sh.phases).map(|(n, v)| (n.to_string(), json!(v.load(Relaxed)))).collect::<serde_json::Map<_, _>>(),
            "rss_kib": {
                "start": rss_start, "max": rss_max, "end": rss_end, "bound": bound_kib, "after_reload_and_unload": rss_after_reload,
                "samples": samples.iter().map(|(t, k)| json!([(t * 10.0).round() / 10.0, k])).collect::<Vec<Value>>(),
            },
            "unloaded": unloaded,
            "checks": {
                "order_gaps_recovery": { "pass": check1, "violations": total_violations, "clients_with_violations": clients_with, "by_kind": kinds, "per_client": per_client, "unfinished_clients": unfinished },
                "acked_in_history": { "pass": check2, "acked_checked": acked_checked, "missing": missing, "mismatched": mismatched, "documents_with_problems": doc_problems, "own_holes_checked": holes.len(), "own_holes_not_own": holes_bad },
                "rss": { "pass": check3, "start_kib": rss_start, "end_kib": rss_end, "bound_kib": bound_kib, "rule": format!("end <= start + {} MiB + {} B x stored operations, after every document was unloaded", args.rss_slack_mib, args.rss_bytes_per_op) },
            },
            "violation_samples": sh.samples.lock().unwrap().clone(),
        });
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&j).unwrap_or_default()) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
    if check1 && check2 && check3 {
        0
    } else {
        1
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn pf(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

#[cfg(test)]
mod tests {
    use super::{payload_tag, tag_of, Actor, Rng};
    use std::collections::BTreeSet;

    #[test]
    fn reads_the_tag_of_a_soak_payload() {
        assert_eq!(payload_tag(br#"{"u":"12.3.45","p":"xx"}"#), Some(tag_of(12, 3)));
        assert_eq!(payload_tag(br#"{"u":"12.3","p":"xx"}"#), None);
        assert_eq!(payload_tag(br#"{"x":1}"#), None);
    }

    #[test]
    fn have_is_the_contiguous_prefix() {
        let mut a = Actor {
            id: 0,
            doc: 0,
            hot: false,
            rng: Rng::new(1),
            conns: 0,
            epoch: None,
            have: 0,
            ahead: BTreeSet::new(),
            ops: 0,
            next_send: tokio::time::Instant::now(),
        };
        a.learn(2);
        a.learn(3);
        assert_eq!(a.have, 0);
        a.learn(1);
        assert_eq!(a.have, 3);
        a.learn(7);
        a.restart_at(5);
        assert_eq!(a.have, 5);
        a.learn(6);
        assert_eq!(a.have, 7);
    }
}

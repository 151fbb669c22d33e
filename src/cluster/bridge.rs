//! The bridge thread: the one place that talks to Redis. It runs redis-rs
//! on a current-thread tokio runtime of its own, so no glommio core ever
//! blocks on Redis, and serves every core through bounded flume channels.
//!
//! Four tasks share its state (one thread: `Rc<RefCell<..>>`, no lock):
//! - requests: drains what the cores sent into one pipeline per batch (a
//!   natural group commit: one round trip for all operations waiting), in
//!   order, so the operations of one session keep their order in Redis;
//! - pub/sub: one subscription per followed document; operations go to the
//!   owner core in `seq` order, and anything out of order (a lost message, a
//!   full core channel, a reconnect) marks the document *behind*;
//! - filler: brings a document that is behind up to date from its stream
//!   (`XRANGE`), reports what the stream no longer holds as a gap, notices a
//!   new epoch;
//! - ticker: heartbeats, health (`/healthz`, metrics), the periodic check
//!   that catches a lost last notification, and the removal of the sessions
//!   of dead nodes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use redis::{Cmd, Value};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{keys, scripts, ClusterCore, Event, JoinReply, Loaded, Presence, Refusal, Request};
use crate::config::Config;
use crate::protocol::encode::OPERATION_PREFIX;
use crate::protocol::Participant;
use crate::registry::ConnectionManager as Registry;
use crate::store::index::is_merged;
use crate::store::Epoch;
use crate::ws::OutFrame;

/// Events waiting for a core. A notification that finds this full is not
/// kept: the document is marked behind and filled from its stream.
const EVENT_QUEUE: usize = 16384;
/// Requests taken into one pipeline at most.
const MAX_BATCH: usize = 512;
/// Stream entries read per `XRANGE` when filling a gap.
const FILL_BATCH: usize = 512;
/// How long a Redis command may take before the node counts Redis as gone.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a batch whose replies were lost is sent again before its
/// requests are answered UNAVAILABLE, their outcome unknown (the message
/// says so). Meanwhile new requests are refused at once while Redis is away.
const RETRY_FOR: Duration = Duration::from_secs(5);

/// The connection commands go on: one Redis (redis-rs's `ConnectionManager`,
/// which reconnects by itself), or a Redis Cluster (its cluster client, which
/// routes each command to the primary of its slot).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The running bridge: what the cores need to reach it.
pub struct Bridge {
    /// This node's name in Redis.
    pub node: String,
    /// The number Redis gave this node (its connection ids start at
    /// `number << 32`).
    pub number: u64,
    requests: Option<flume::Sender<Request>>,
    events: Vec<Option<flume::Receiver<Event>>>,
    thread: Option<JoinHandle<()>>,
}

impl Bridge {
    /// Core `index`'s side of the bridge (once per core).
    pub fn core(&mut self, index: usize) -> ClusterCore {
        let requests = self.requests.clone().expect("the bridge is running");
        let events = self.events[index].take().expect("one ClusterCore per core");
        ClusterCore::new(index, requests, events)
    }

    /// Ends the bridge once the cores have dropped their sides: it removes
    /// this node from Redis and exits (bounded).
    pub fn stop(mut self) {
        self.requests = None;
        self.events.clear();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                warn!("the cluster bridge did not stop within 5 s; leaving it");
            }
        }
    }
}

/// What the bridge needs to know of the configuration.
#[derive(Debug, Clone)]
struct Settings {
    url: String,
    /// `url` is a seed node of a Redis Cluster.
    redis_cluster: bool,
    node: String,
    node_timeout: Duration,
    stream_max_ops: usize,
    history_ops: usize,
    /// The stream length of a Yjs room, and the updates a load reads: a
    /// room is loaded from its merged state and every update after it, and
    /// a merged state is stored every `documents.yjs_compact_after` updates.
    yjs_stream: usize,
}

/// Connects to Redis, takes this node's number and starts the bridge
/// thread. An error (Redis unreachable at start) fails the relay's start.
pub fn start(config: &Config, cores: usize, registry: Arc<Registry>) -> Result<Bridge, String> {
    let c = &config.cluster;
    let settings = Settings {
        url: c.redis_url.clone(),
        redis_cluster: c.redis_cluster,
        node: c.node_name(),
        node_timeout: Duration::from_millis(c.node_timeout_ms),
        stream_max_ops: c.stream_max_ops.unwrap_or(config.documents.history_ops),
        history_ops: config.documents.history_ops,
        yjs_stream: c
            .stream_max_ops
            .unwrap_or(config.documents.history_ops)
            .max(config.documents.yjs_compact_after.saturating_mul(4).try_into().unwrap_or(usize::MAX)),
    };
    let (requests, requests_rx) = flume::bounded(c.queue.saturating_mul(cores).max(1));
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..cores).map(|_| flume::bounded(EVENT_QUEUE)).unzip();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let node = settings.node.clone();
    registry.cluster.enabled.store(true, Relaxed);
    let thread = std::thread::Builder::new()
        .name("docrelay-cluster".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot start the cluster bridge's runtime: {e}")));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run(settings, requests_rx, senders, registry, ready_tx));
        })
        .map_err(|e| format!("cannot start the cluster bridge thread: {e}"))?;
    let number = match ready_rx.recv_timeout(Duration::from_secs(15)) {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err("the cluster bridge did not connect to Redis within 15 s".into()),
    };
    info!(node = %node, number, "cluster node registered in Redis");
    Ok(Bridge {
        node,
        number,
        requests: Some(requests),
        events: receivers.into_iter().map(Some).collect(),
        thread: Some(thread),
    })
}

/// A followed document, as the bridge tracks it.
#[derive(Debug)]
struct Doc {
    core: usize,
    /// `None` while it loads.
    epoch: Option<Epoch>,
    /// The last seq handed to the core.
    last: u64,
    /// Notifications may have been missed: the filler reads the stream.
    behind: bool,
    /// The highest seq seen in a notification not handed on.
    max_seen: u64,
    /// Presence notifications were missed: the filler re-reads the members.
    members_stale: bool,
}

struct Inner {
    s: Settings,
    /// The number Redis gave this node.
    number: u64,
    client: redis::Client,
    conn: Conn,
    registry: Arc<Registry>,
    events: Vec<flume::Sender<Event>>,
    docs: RefCell<HashMap<Box<str>, Doc>>,
    sink: RefCell<Option<PubSubSink>>,
    /// A subscription stream connected but not yet read by the pub/sub task.
    stream_slot: RefCell<Option<redis::aio::PubSubStream>>,
    fill: Notify,
    /// Since when Redis has answered (None: it does not).
    healthy_since: RefCell<Option<Instant>>,
}

async fn run(
    s: Settings,
    requests: flume::Receiver<Request>,
    events: Vec<flume::Sender<Event>>,
    registry: Arc<Registry>,
    ready: std::sync::mpsc::Sender<Result<u64, String>>,
) {
    let setup = async {
        let client = redis::Client::open(s.url.as_str()).map_err(|e| format!("cluster.redis_url: {e}"))?;
        let connect = async {
            if s.redis_cluster {
                let cluster = redis::cluster::ClusterClient::builder(vec![s.url.as_str()])
                    .connection_timeout(REDIS_TIMEOUT)
                    .response_timeout(REDIS_TIMEOUT)
                    .build()
                    .map_err(|e| e.to_string())?;
                cluster.get_async_connection().await.map(Conn::Cluster).map_err(|e| e.to_string())
            } else {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(REDIS_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(client.clone(), config)
                    .await
                    .map(Conn::Single)
                    .map_err(|e| e.to_string())
            }
        };
        let mut conn = tokio::time::timeout(REDIS_TIMEOUT * 2, connect)
            .await
            .map_err(|_| "timed out".to_string())
            .and_then(|r| r)
            .map_err(|e| format!("cannot connect to Redis at {}: {e}", s.url))?;
        let number: u64 = redis::cmd("INCR")
            .arg(keys::NODE_NUMBERS)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("Redis at {}: {e}", s.url))?;
        if number >= 1 << 21 {
            return Err("Redis has handed out 2^21 node numbers: reset docrelay:node-numbers".to_string());
        }
        eval(scripts::HEARTBEAT, &[keys::NODES], &[s.node.as_bytes()])
            .query_async::<Value>(&mut conn)
            .await
            .map_err(|e| format!("Redis at {}: {e}", s.url))?;
        Ok((client, conn, number))
    };
    let (client, conn, number) = match setup.await {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let b = Rc::new(Inner {
        s,
        number,
        client,
        conn,
        registry,
        events,
        docs: RefCell::new(HashMap::new()),
        sink: RefCell::new(None),
        stream_slot: RefCell::new(None),
        fill: Notify::new(),
        healthy_since: RefCell::new(Some(Instant::now())),
    });
    // The subscription connection exists before any core asks to load.
    b.clone().connect_pubsub_once().await;
    let _ = ready.send(Ok(number));
    let tasks = [
        tokio::task::spawn_local(b.clone().pubsub_loop()),
        tokio::task::spawn_local(b.clone().filler()),
        tokio::task::spawn_local(b.clone().ticker()),
    ];
    b.clone().serve(requests).await;
    for t in &tasks {
        t.abort();
    }
    // Goodbye: whatever sessions of this node are still listed leave (their
    // cores' Leave requests may not all have made it), and the node is taken
    // out, so nobody waits for its heartbeat.
    let mut conn = b.conn.clone();
    let me = b.s.node.clone();
    let _ = tokio::time::timeout(REDIS_TIMEOUT, async {
        b.reap_node(&mut conn, &me).await?;
        Ok::<(), String>(())
    })
    .await;
    debug!("cluster bridge stopped");
}

/// An operation's JSON in a buffer with a frame header's headroom
/// (`OutFrame::payload_buffer`): the core makes it a frame in place.
fn framed(json: &[u8]) -> Vec<u8> {
    let mut buf = OutFrame::payload_buffer(json.len());
    buf.extend_from_slice(json);
    buf
}

/// An `EVAL` of `script` with `keys` and `args`.
fn eval(script: &str, keys: &[&str], args: &[&[u8]]) -> Cmd {
    let mut c = redis::cmd("EVAL");
    c.arg(script).arg(keys.len());
    for k in keys {
        c.arg(*k);
    }
    for a in args {
        c.arg(*a);
    }
    c
}

/// The scripts a batch runs by digest, in the order of [`Batch`].
const BATCH_SCRIPTS: [&str; 4] = [scripts::APPEND, scripts::SNAPSHOT, scripts::JOIN, scripts::LEAVE];

/// Which of [`BATCH_SCRIPTS`].
#[derive(Clone, Copy)]
enum Batch {
    Append = 0,
    Snapshot = 1,
    Join = 2,
    Leave = 3,
}

/// An `EVALSHA` of a batch script (its digest computed once).
fn evalsha(script: Batch, keys: &[&str], args: &[&[u8]]) -> Cmd {
    static DIGESTS: std::sync::OnceLock<[String; 4]> = std::sync::OnceLock::new();
    let digests = DIGESTS.get_or_init(|| BATCH_SCRIPTS.map(|s| redis::Script::new(s).get_hash().to_string()));
    let mut c = redis::cmd("EVALSHA");
    c.arg(&digests[script as usize]).arg(keys.len());
    for k in keys {
        c.arg(*k);
    }
    for a in args {
        c.arg(*a);
    }
    c
}

/// One command of a batch: the script it runs by digest (loaded at the head
/// of its pipeline), the command, and what to do with its reply.
type Item = (Option<Batch>, Cmd, Answer);

/// What to do with the reply to one command of a pipeline.
enum Answer {
    None,
    Append { core: usize, session: u64, client_op_id: Option<Box<str>>, document: Box<str> },
    Snapshot { core: usize, session: u64, seq: u64, document: Box<str> },
    Join { document: Box<str>, participant: Participant, reply: JoinReply },
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn parse_epoch(text: &str) -> Option<Epoch> {
    if text.len() != 16 {
        return None;
    }
    u64::from_str_radix(text, 16).ok().map(Epoch)
}

/// The `{int, text}` reply of a script.
fn pair(v: &Value) -> Option<(i64, String)> {
    match v {
        Value::Array(a) if a.len() == 2 => Some((int(&a[0])?, text(&a[1]).unwrap_or_default())),
        _ => None,
    }
}

/// Stream entries `[id, [field, value, ...]]` as `(seq, origin, frame)`,
/// each frame's JSON in a buffer with headroom ([`framed`]).
fn entries(v: Value) -> Vec<(u64, u64, Vec<u8>)> {
    let Value::Array(items) = v else { return Vec::new() };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else { continue };
        if pair.len() != 2 {
            continue;
        }
        let fields = pair.pop().unwrap_or(Value::Nil);
        let Some(id) = text(&pair[0]) else { continue };
        let Some(seq) = id.split('-').next().and_then(|s| s.parse::<u64>().ok()) else { continue };
        let Value::Array(fields) = fields else { continue };
        let (mut frame, mut origin) = (None, 0);
        for kv in fields.chunks(2) {
            if let [k, v] = kv {
                match text(k).as_deref() {
                    Some("f") => {
                        if let Value::BulkString(b) = v {
                            frame = Some(framed(b));
                        }
                    }
                    Some("o") => origin = int(v).unwrap_or(0) as u64,
                    _ => {}
                }
            }
        }
        if let Some(f) = frame {
            out.push((seq, origin, f));
        }
    }
    out
}

/// `HGETALL members` as participants, without those of `except`.
fn members(v: Value, except: &str) -> Vec<Participant> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(a) => {
            let mut it = a.into_iter();
            let mut out = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            out
        }
        Value::Map(m) => m,
        _ => Vec::new(),
    };
    let mut out: Vec<Participant> = pairs
        .into_iter()
        .filter_map(|(_, v)| {
            let v = text(&v)?;
            let (node, json) = v.split_once(' ')?;
            if node == except {
                return None;
            }
            serde_json::from_str(json).ok()
        })
        .collect();
    out.sort_by_key(|p| p.connection_id);
    out
}

impl Inner {
    fn failed(&self, why: &str) {
        self.registry.cluster.redis_errors.fetch_add(1, Relaxed);
        *self.healthy_since.borrow_mut() = None;
        if self.registry.cluster.set_degraded(Some(format!("Redis unreachable: {why}"))) {
            warn!(error = why, "Redis is unreachable: operations get UNAVAILABLE until it is back");
        }
    }

    fn ok(&self) {
        if self.healthy_since.borrow().is_none() {
            *self.healthy_since.borrow_mut() = Some(Instant::now());
        }
        if self.registry.cluster.set_degraded(None) {
            info!("Redis is reachable again: catching up on every followed document");
            self.resync_all();
        }
    }

    fn healthy(&self) -> bool {
        self.healthy_since.borrow().is_some()
    }

    /// After an outage: every followed document may have missed operations
    /// and presence; the filler checks them all.
    fn resync_all(&self) {
        for d in self.docs.borrow_mut().values_mut() {
            if d.epoch.is_some() {
                d.behind = true;
                d.members_stale = true;
            }
        }
        self.fill.notify_one();
    }

    // ---- requests ----

    async fn serve(self: Rc<Self>, requests: flume::Receiver<Request>) {
        let mut conn = self.conn.clone();
        let mut tokens = 0u64;
        let mut retrying: Option<tokio::task::JoinHandle<()>> = None;
        while let Ok(first) = requests.recv_async().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match requests.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            // Loads and unfollows are not commands of the pipeline; each
            // append gets a token that finds it again after a lost reply.
            let sent: Vec<(Request, String)> = batch
                .into_iter()
                .filter_map(|r| match r {
                    Request::Load { document, core } => {
                        tokio::task::spawn_local(self.clone().load(document, core));
                        None
                    }
                    Request::Unfollow { document } => {
                        self.unfollow(&document);
                        None
                    }
                    r => {
                        tokens += 1;
                        Some((r, format!("{:x}.{tokens:x}", self.number)))
                    }
                })
                .collect();
            if sent.is_empty() {
                continue;
            }
            // A batch whose replies were lost goes first once Redis is back;
            // while it is not, what comes meanwhile is refused at once (it
            // was never sent, so it can not overtake the lost batch).
            if let Some(r) = retrying.as_mut() {
                if r.is_finished() || self.healthy() {
                    let _ = r.await;
                    retrying = None;
                }
            }
            if retrying.is_some() || !self.healthy() {
                // Redis did not answer the last heartbeat: refuse at once
                // rather than queue behind a timeout; the ticker notices
                // when it is back.
                let answers = self.build(&sent, false).into_iter().flat_map(|(_, a)| a).collect();
                self.answer_all(answers, "Redis is unreachable").await;
                continue;
            }
            if let Err((e, refused)) = self.send_batch(&mut conn, &sent, false).await {
                if refused {
                    // Redis refused the connection: nothing was sent.
                    self.failed(&e);
                    let answers = self.build(&sent, false).into_iter().flat_map(|(_, a)| a).collect();
                    self.answer_all(answers, &e).await;
                    continue;
                }
                // The connection failed with the batch on its way: Redis may
                // have run some of it. It is sent again once Redis answers
                // (appends find themselves by their token, the rest is
                // idempotent), so what Redis sequenced is acked, nothing
                // twice; only after RETRY_FOR is the outcome given up on.
                self.failed(&e);
                retrying = Some(tokio::task::spawn_local(self.clone().retry(sent)));
            }
        }
    }

    /// Sends a batch and answers its requests; `Err`: no reply came (the
    /// requests are not answered), and whether the connection was refused
    /// (then nothing was sent).
    async fn send_batch(&self, conn: &mut Conn, sent: &[(Request, String)], retry: bool) -> Result<(), (String, bool)> {
        let groups = self.build(sent, retry);
        // The pipelines of a Redis Cluster's slots go out together.
        let mut results = Vec::with_capacity(groups.len());
        if groups.len() == 1 {
            let (pipe, answers) = groups.into_iter().next().expect("one");
            results.push((pipe.query_async::<Vec<Value>>(conn).await, answers));
        } else {
            let handles: Vec<_> = groups
                .into_iter()
                .map(|(pipe, answers)| {
                    let mut conn = conn.clone();
                    tokio::task::spawn_local(async move { (pipe.query_async::<Vec<Value>>(&mut conn).await, answers) })
                })
                .collect();
            for h in handles {
                match h.await {
                    Ok(r) => results.push(r),
                    Err(e) => return Err((format!("a pipeline task ended: {e}"), false)),
                }
            }
        }
        for (r, _) in &results {
            match r {
                // Sent again, a request that Redis refused now (still
                // loading its data after a restart, say) may have run the
                // first time: the whole batch goes again.
                Ok(values) if retry && values.iter().any(|v| matches!(v, Value::ServerError(_))) => {
                    let first = values.iter().find_map(|v| match v {
                        Value::ServerError(e) => Some(e.to_string()),
                        _ => None,
                    });
                    return Err((first.unwrap_or_default(), false));
                }
                Ok(_) => {}
                // Any group without a reply: the batch goes again as a whole
                // (what did run is found by its token or is idempotent), or,
                // refused by every connection, is refused.
                Err(e) => {
                    let refused =
                        results.iter().all(|(r, _)| r.as_ref().err().is_some_and(|e| e.is_connection_refusal()));
                    return Err((e.to_string(), refused));
                }
            }
        }
        self.ok();
        for (r, answers) in results {
            let values = r.unwrap_or_default();
            for (a, v) in answers.into_iter().zip(values) {
                self.answer(a, Ok(v)).await;
            }
        }
        Ok(())
    }

    /// Sends a batch whose replies were lost again until Redis answers it.
    async fn retry(self: Rc<Self>, sent: Vec<(Request, String)>) {
        let since = Instant::now();
        let mut conn = self.conn.clone();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if since.elapsed() >= RETRY_FOR {
                let answers = self.build(&sent, true).into_iter().flat_map(|(_, a)| a).collect();
                let why = "Redis went away while the request was sent, and did not come back in time; it may have been applied";
                self.answer_all(answers, why).await;
                return;
            }
            if !self.healthy() {
                continue;
            }
            match self.send_batch(&mut conn, &sent, true).await {
                Ok(()) => return,
                Err((e, _)) => self.failed(&e),
            }
        }
    }

    fn unfollow(&self, document: &str) {
        self.docs.borrow_mut().remove(document);
        if let Some(mut sink) = self.sink.borrow().clone() {
            let channel = keys::channel(document);
            tokio::task::spawn_local(async move {
                let _ = tokio::time::timeout(REDIS_TIMEOUT, sink.unsubscribe(channel)).await;
            });
        }
    }

    /// The pipeline of a batch, and what to do with each reply. `retry`: the
    /// batch was sent before and its replies were lost (cursors are not
    /// sent again).
    ///
    /// The scripts go by digest (`EVALSHA`: Redis neither receives nor
    /// hashes their text per call, a tenth of its time otherwise), after a
    /// `SCRIPT LOAD` of each at the head of the pipeline: one connection
    /// runs a pipeline in order, so they are loaded, also right after Redis
    /// restarted with an empty script cache.
    fn build(&self, sent: &[(Request, String)], retry: bool) -> Vec<(redis::Pipeline, Vec<Answer>)> {
        // One pipeline, or in a Redis Cluster one per slot: per document
        // (its keys share a hash tag), and one for this node's own set. The
        // order within each is the order of the batch.
        let mut groups: Vec<(Option<Box<str>>, Vec<Item>)> = Vec::new();
        let cluster = self.s.redis_cluster;
        let mut push = |key: Option<&str>, script: Option<Batch>, cmd: Cmd, answer: Answer| {
            let key = if cluster { key } else { None };
            let at = match groups.iter().position(|(k, _)| k.as_deref() == key) {
                Some(at) => at,
                None => {
                    groups.push((key.map(Into::into), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[at].1.push((script, cmd, answer));
        };
        const NODE: Option<&str> = Some("");
        // The epoch a document starts with if Redis lost it: one per batch
        // (the first append of such a document creates it; the others then
        // find an epoch that is not theirs).
        let new = Epoch::random().to_string();
        for (r, token) in sent {
            match r {
                Request::Load { .. } | Request::Unfollow { .. } => {}
                Request::Append { document, epoch, origin, suffix, core, session, client_op_id } => {
                    let (meta, ops, snap, ch) =
                        (keys::meta(document), keys::ops(document), keys::snapshot(document), keys::channel(document));
                    // A Yjs room's frame is the update message alone (no seq in it).
                    let (prefix, maxlen) = match is_merged(document) {
                        true => (&b""[..], self.s.yjs_stream),
                        false => (OPERATION_PREFIX.as_bytes(), self.s.stream_max_ops),
                    };
                    let (epoch, origin, maxlen) = (epoch.to_string(), origin.to_string(), maxlen.to_string());
                    let cmd = evalsha(
                        Batch::Append,
                        &[&meta, &ops, &snap, &ch],
                        &[
                            epoch.as_bytes(),
                            origin.as_bytes(),
                            prefix,
                            suffix,
                            maxlen.as_bytes(),
                            new.as_bytes(),
                            token.as_bytes(),
                            if retry { b"1" } else { b"0" },
                        ],
                    );
                    let answer = Answer::Append {
                        core: *core,
                        session: *session,
                        client_op_id: client_op_id.clone(),
                        document: document.clone(),
                    };
                    push(Some(document), Some(Batch::Append), cmd, answer);
                }
                Request::Snapshot { document, epoch, seq, state, core, session } => {
                    let (meta, snap, ch, ops) =
                        (keys::meta(document), keys::snapshot(document), keys::channel(document), keys::ops(document));
                    let (epoch, seq_text) = (epoch.to_string(), seq.to_string());
                    let merged: &[u8] = if is_merged(document) { b"1" } else { b"0" };
                    let cmd = evalsha(
                        Batch::Snapshot,
                        &[&meta, &snap, &ch, &ops],
                        &[epoch.as_bytes(), seq_text.as_bytes(), state.as_bytes(), merged],
                    );
                    let answer =
                        Answer::Snapshot { core: *core, session: *session, seq: *seq, document: document.clone() };
                    push(Some(document), Some(Batch::Snapshot), cmd, answer);
                }
                Request::Join { document, participant, announce, reply } => {
                    let json = serde_json::to_string(participant).unwrap_or_default();
                    let conn = participant.connection_id.to_string();
                    let cmd = evalsha(
                        Batch::Join,
                        &[&keys::members(document), &keys::channel(document)],
                        &[
                            conn.as_bytes(),
                            self.s.node.as_bytes(),
                            json.as_bytes(),
                            if *announce { b"1" } else { b"0" },
                        ],
                    );
                    let answer = match reply {
                        Some(reply) => Answer::Join {
                            document: document.clone(),
                            participant: participant.clone(),
                            reply: reply.clone(),
                        },
                        None => Answer::None,
                    };
                    push(Some(document), Some(Batch::Join), cmd, answer);
                    let mut sadd = redis::cmd("SADD");
                    sadd.arg(keys::node_sessions(&self.s.node)).arg(format!("{conn} {document}"));
                    push(NODE, None, sadd, Answer::None);
                }
                Request::Leave { document, connection_id } => {
                    let conn = connection_id.to_string();
                    let cmd = evalsha(
                        Batch::Leave,
                        &[&keys::members(document), &keys::channel(document)],
                        &[conn.as_bytes(), self.s.node.as_bytes()],
                    );
                    push(Some(document), Some(Batch::Leave), cmd, Answer::None);
                    let mut srem = redis::cmd("SREM");
                    srem.arg(keys::node_sessions(&self.s.node)).arg(format!("{conn} {document}"));
                    push(NODE, None, srem, Answer::None);
                }
                Request::Cursor { document, connection_id, frame } => {
                    if retry {
                        continue;
                    }
                    let mut message = format!("c {} {connection_id} ", self.s.node).into_bytes();
                    message.extend_from_slice(frame);
                    let mut publish = redis::cmd("PUBLISH");
                    publish.arg(keys::channel(document)).arg(message);
                    push(Some(document), None, publish, Answer::None);
                }
            }
        }
        groups
            .into_iter()
            .map(|(_, items)| {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                let mut answers = Vec::with_capacity(items.len() + 4);
                let mut used = [false; 4];
                for (script, _, _) in &items {
                    if let Some(b) = script {
                        used[*b as usize] = true;
                    }
                }
                for (i, src) in BATCH_SCRIPTS.into_iter().enumerate() {
                    if used[i] {
                        pipe.cmd("SCRIPT").arg("LOAD").arg(src);
                        answers.push(Answer::None);
                    }
                }
                for (_, cmd, answer) in items {
                    pipe.add_command(cmd);
                    answers.push(answer);
                }
                (pipe, answers)
            })
            .collect()
    }

    async fn answer_all(&self, answers: Vec<Answer>, why: &str) {
        for a in answers {
            self.answer(a, Err(why.to_string())).await;
        }
    }

    async fn answer(&self, a: Answer, v: Result<Value, String>) {
        let (v, failure) = match v {
            Ok(Value::ServerError(e)) => (Value::Nil, Some(format!("Redis: {e}"))),
            Ok(v) => (v, None),
            Err(why) => (Value::Nil, Some(why)),
        };
        match a {
            Answer::None => {}
            Answer::Append { core, session, client_op_id, document } => {
                let result = match (failure, pair(&v)) {
                    (Some(why), _) => Err(Refusal::Unavailable(why)),
                    (None, Some((seq, _))) if seq > 0 => Ok(seq as u64),
                    (None, Some((_, epoch))) => Err(self.epoch_moved(&document, &epoch)),
                    (None, None) => Err(Refusal::Unavailable(format!("unexpected reply from Redis: {v:?}"))),
                };
                if result.is_err() {
                    self.registry.cluster.unavailable.fetch_add(1, Relaxed);
                }
                let _ = self.events[core].send_async(Event::Appended { session, client_op_id, result }).await;
            }
            Answer::Join { document, participant, reply } => {
                let result = match failure {
                    Some(why) => Err(why),
                    None => Ok(members(v, &self.s.node)),
                };
                let core = reply.core;
                let _ = self.events[core].send_async(Event::Joined { document, participant, reply, result }).await;
            }
            Answer::Snapshot { core, session, seq, document } => {
                let result = match (failure, pair(&v)) {
                    (Some(why), _) => Err(Refusal::Unavailable(why)),
                    (None, Some((1, _))) => Ok(()),
                    (None, Some((-1, _))) => Err(Refusal::Ahead { seq }),
                    (None, Some((_, epoch))) => Err(self.epoch_moved(&document, &epoch)),
                    (None, None) => Err(Refusal::Unavailable(format!("unexpected reply from Redis: {v:?}"))),
                };
                let _ = self.events[core].send_async(Event::SnapshotStored { session, seq, result }).await;
            }
        }
    }

    /// A script found the document's epoch in Redis (`epoch`) is not the one
    /// the node follows: the filler finds out which it is and resets the
    /// document. Returns the refusal for the request.
    fn epoch_moved(&self, document: &str, epoch: &str) -> Refusal {
        if let Some(d) = self.docs.borrow_mut().get_mut(document) {
            d.behind = true;
        }
        self.fill.notify_one();
        parse_epoch(epoch).map_or_else(|| Refusal::Unavailable("Redis lost the document".into()), Refusal::Epoch)
    }

    // ---- loading ----

    async fn load(self: Rc<Self>, document: Box<str>, core: usize) {
        self.docs.borrow_mut().insert(
            document.clone(),
            Doc { core, epoch: None, last: 0, behind: false, max_seen: 0, members_stale: false },
        );
        let result = self.read_document(&document).await;
        let loaded = result.as_ref().ok().map(|l| (l.epoch, l.seq));
        if let Err(e) = &result {
            self.docs.borrow_mut().remove(&document);
            self.failed(e);
        }
        let event = Event::Loaded { document: document.clone(), result };
        if self.events[core].send_async(event).await.is_err() {
            return;
        }
        // Only now may operations of the document go to the core: after
        // the Loaded event.
        if let Some((epoch, seq)) = loaded {
            if let Some(d) = self.docs.borrow_mut().get_mut(&document) {
                d.epoch = Some(epoch);
                d.last = seq;
                if d.max_seen > seq {
                    d.behind = true;
                    self.fill.notify_one();
                }
            }
        }
    }

    async fn read_document(&self, document: &str) -> Result<Loaded, String> {
        // Subscribed before the head is read: nothing published after the
        // head can be missed.
        let mut sink = self.sink.borrow().clone().ok_or("no subscription connection to Redis")?;
        tokio::time::timeout(REDIS_TIMEOUT, sink.subscribe(keys::channel(document)))
            .await
            .map_err(|_| "subscribing timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let mut pipe = redis::pipe();
        let new = Epoch::random().to_string();
        let (meta, ops, snap) = (keys::meta(document), keys::ops(document), keys::snapshot(document));
        pipe.add_command(eval(scripts::LOAD, &[&meta, &ops, &snap], &[new.as_bytes()]));
        let limit = if is_merged(document) { self.s.yjs_stream } else { self.s.history_ops }.max(1);
        pipe.cmd("XREVRANGE").arg(&ops).arg("+").arg("-").arg("COUNT").arg(limit);
        pipe.cmd("HMGET").arg(&snap).arg("seq").arg("state");
        pipe.cmd("HGETALL").arg(keys::members(document));
        let mut conn = self.conn.clone();
        let (head, tail, snapshot, members_v): (Value, Value, Vec<Option<String>>, Value) =
            pipe.query_async(&mut conn).await.map_err(|e| e.to_string())?;
        let (epoch, seq) = match &head {
            Value::Array(a) if a.len() == 2 => (text(&a[0]).and_then(|t| parse_epoch(&t)), int(&a[1])),
            _ => (None, None),
        };
        let (Some(epoch), Some(seq)) = (epoch, seq) else {
            return Err(format!("unexpected reply from Redis: {head:?}"));
        };
        let seq = seq.max(0) as u64;
        // The tail, newest first: keep the run that ends at `seq` (later
        // ones were appended after the head was read and will arrive as
        // notifications).
        let mut ops = Vec::new();
        let mut want = seq;
        for (s, _, frame) in entries(tail) {
            if s > want {
                continue;
            }
            if s != want || want == 0 || ops.len() >= limit {
                break;
            }
            ops.push(frame);
            want -= 1;
        }
        ops.reverse();
        let snapshot = match (snapshot.first().cloned().flatten(), snapshot.get(1).cloned().flatten()) {
            (Some(s), Some(state)) => s.parse::<u64>().ok().map(|s| (s, state.into_boxed_str())),
            _ => None,
        };
        Ok(Loaded { epoch, seq, ops, snapshot, members: members(members_v, &self.s.node) })
    }

    // ---- notifications ----

    /// Opens the subscription connection and subscribes every followed
    /// document; leaves the stream in `stream_slot` (nothing on failure).
    async fn connect_pubsub_once(self: Rc<Self>) {
        let ps = match tokio::time::timeout(REDIS_TIMEOUT, self.client.get_async_pubsub()).await {
            Ok(Ok(ps)) => ps,
            Ok(Err(e)) => return self.failed(&e.to_string()),
            Err(_) => return self.failed("connecting timed out"),
        };
        let (mut sink, stream) = ps.split();
        let channels: Vec<String> = self.docs.borrow().keys().map(|d| keys::channel(d)).collect();
        if !channels.is_empty() {
            match tokio::time::timeout(REDIS_TIMEOUT, sink.subscribe(channels)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return self.failed(&e.to_string()),
                Err(_) => return self.failed("subscribing timed out"),
            }
        }
        *self.sink.borrow_mut() = Some(sink);
        *self.stream_slot.borrow_mut() = Some(stream);
    }

    async fn pubsub_loop(self: Rc<Self>) {
        let mut delay = Duration::from_millis(50);
        loop {
            let stream = self.stream_slot.borrow_mut().take();
            let stream = match stream {
                Some(s) => Some(s),
                None => {
                    self.clone().connect_pubsub_once().await;
                    let s = self.stream_slot.borrow_mut().take();
                    if s.is_some() {
                        // Reconnected: whatever was published meanwhile
                        // is in the streams.
                        self.resync_all();
                    }
                    s
                }
            };
            match stream {
                Some(mut stream) => {
                    delay = Duration::from_millis(50);
                    while let Some(msg) = stream.next().await {
                        self.on_message(&msg);
                    }
                    // Closed (Redis went away, or cut this subscriber: a
                    // full output buffer, CLIENT KILL). Connecting again
                    // tells whether Redis is there; what was published
                    // meanwhile is taken from the streams.
                    *self.sink.borrow_mut() = None;
                    info!("the subscription connection to Redis closed: connecting again");
                }
                None => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// One notification of a followed document: `KIND` and its fields,
    /// separated by spaces, the last one the rest of the message (a frame or
    /// JSON, which may hold spaces).
    fn on_message(&self, msg: &redis::Msg) {
        let Some(document) = keys::document_of_channel(msg.get_channel_name()) else { return };
        let payload = msg.get_payload_bytes();
        let kind = payload.first().copied().unwrap_or_default();
        // `o EPOCH SEQ ORIGIN FRAME`; the others have three fields after the
        // kind: `j|l|c NODE CONN REST`, `s EPOCH SEQ STATE`.
        let n = if kind == b'o' { 5 } else { 4 };
        let mut parts: [&[u8]; 5] = [&[]; 5];
        let mut found = 0;
        for (i, part) in payload.splitn(n, |&b| b == b' ').enumerate() {
            parts[i] = part;
            found = i + 1;
        }
        if found != n || parts[0].len() != 1 {
            return;
        }
        let field = |i: usize| std::str::from_utf8(parts[i]).ok();
        let number = |i: usize| field(i).and_then(|s| s.parse::<u64>().ok());
        let mut docs = self.docs.borrow_mut();
        let Some(doc) = docs.get_mut(document) else { return };
        match kind {
            b'o' => {
                let (Some(epoch), Some(seq), Some(origin)) = (field(1).and_then(parse_epoch), number(2), number(3))
                else {
                    return;
                };
                let Some(ours) = doc.epoch else {
                    doc.max_seen = doc.max_seen.max(seq);
                    return;
                };
                if epoch != ours {
                    doc.behind = true;
                    self.fill.notify_one();
                    return;
                }
                if doc.behind {
                    doc.max_seen = doc.max_seen.max(seq);
                    return;
                }
                if seq <= doc.last {
                    return; // had it already (from the stream)
                }
                if seq == doc.last + 1 {
                    let event = Event::Op { document: document.into(), epoch, seq, origin, frame: framed(parts[4]) };
                    match self.events[doc.core].try_send(event) {
                        Ok(()) => {
                            doc.last = seq;
                            return;
                        }
                        Err(flume::TrySendError::Disconnected(_)) => return,
                        Err(flume::TrySendError::Full(_)) => {}
                    }
                }
                // A gap (a lost notification) or no room at the core: the
                // stream has it.
                doc.behind = true;
                doc.max_seen = doc.max_seen.max(seq);
                self.fill.notify_one();
            }
            b'j' | b'l' | b'c' => {
                let (Some(node), Some(origin)) = (field(1), number(2)) else { return };
                if node == self.s.node || doc.epoch.is_none() {
                    return;
                }
                let change = match kind {
                    b'c' => Presence::Cursor(parts[3].into()),
                    _ => match serde_json::from_slice::<Participant>(parts[3]) {
                        Ok(p) if kind == b'j' => Presence::Joined(p),
                        Ok(p) => Presence::Left(p),
                        Err(_) => return,
                    },
                };
                let cursor = matches!(change, Presence::Cursor(_));
                let event = Event::Presence { document: document.into(), origin, change };
                if let Err(flume::TrySendError::Full(_)) = self.events[doc.core].try_send(event) {
                    // A cursor is not kept (the next one follows); a join or
                    // a leave is found again in the members list.
                    if !cursor {
                        doc.members_stale = true;
                        self.fill.notify_one();
                    }
                }
            }
            b's' => {
                let (Some(epoch), Some(seq), Some(state)) = (field(1).and_then(parse_epoch), number(2), field(3))
                else {
                    return;
                };
                if doc.epoch == Some(epoch) {
                    let event = Event::Snapshot { document: document.into(), epoch, seq, state: state.into() };
                    // Full: the snapshot stays in Redis for nodes that load
                    // the document; this node serves its older one.
                    let _ = self.events[doc.core].try_send(event);
                }
            }
            _ => {}
        }
    }

    // ---- filling gaps ----

    async fn filler(self: Rc<Self>) {
        loop {
            self.fill.notified().await;
            while self.healthy() {
                let next = self
                    .docs
                    .borrow()
                    .iter()
                    .find(|(_, d)| d.epoch.is_some() && (d.behind || d.members_stale))
                    .map(|(k, _)| k.clone());
                let Some(document) = next else { break };
                if let Err(e) = self.fill_one(&document).await {
                    self.failed(&e);
                }
            }
        }
    }

    /// Brings one document up to date from Redis: a batch of its stream
    /// (or its new epoch), and its members when they are stale.
    async fn fill_one(&self, document: &str) -> Result<(), String> {
        let Some((core, epoch, last, behind, stale)) =
            self.docs.borrow().get(document).and_then(|d| Some((d.core, d.epoch?, d.last, d.behind, d.members_stale)))
        else {
            return Ok(());
        };
        let mut conn = self.conn.clone();
        if stale {
            if let Some(d) = self.docs.borrow_mut().get_mut(document) {
                d.members_stale = false;
            }
            let v: Value = redis::cmd("HGETALL")
                .arg(keys::members(document))
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            let event = Event::Members { document: document.into(), members: members(v, &self.s.node) };
            let _ = self.events[core].send_async(event).await;
        }
        if !behind {
            return Ok(());
        }
        let new = Epoch::random().to_string();
        let (meta, ops, snap) = (keys::meta(document), keys::ops(document), keys::snapshot(document));
        let mut pipe = redis::pipe();
        // LOAD gives the head, and starts a new epoch if Redis lost it.
        pipe.add_command(eval(scripts::LOAD, &[&meta, &ops, &snap], &[new.as_bytes()]));
        pipe.cmd("XRANGE").arg(&ops).arg(format!("{}-0", last + 1)).arg("+").arg("COUNT").arg(FILL_BATCH);
        let (head, tail): (Value, Value) = pipe.query_async(&mut conn).await.map_err(|e| e.to_string())?;
        self.ok();
        let (redis_epoch, head_seq) = match &head {
            Value::Array(a) if a.len() == 2 => {
                (text(&a[0]).and_then(|t| parse_epoch(&t)), int(&a[1]).unwrap_or(0).max(0) as u64)
            }
            _ => return Err(format!("unexpected reply from Redis: {head:?}")),
        };
        let Some(mut redis_epoch) = redis_epoch else { return Err(format!("unexpected reply from Redis: {head:?}")) };
        if redis_epoch == epoch && head_seq < last {
            // Redis lost operations this node delivered: a new epoch.
            warn!(
                document,
                seq = head_seq,
                delivered = last,
                "Redis holds fewer operations than were delivered: new epoch"
            );
            let (new, last_text) = (Epoch::random().to_string(), last.to_string());
            let now: String = eval(
                scripts::REGRESSED,
                &[&meta],
                &[epoch.to_string().as_bytes(), last_text.as_bytes(), new.as_bytes()],
            )
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
            redis_epoch = parse_epoch(&now).unwrap_or(redis_epoch);
        }
        if redis_epoch != epoch {
            // A new history: the core starts the document again at 0, and
            // its operations follow from the stream.
            info!(document, old = %epoch, new = %redis_epoch, "the document has a new epoch in Redis");
            if self.events[core]
                .send_async(Event::Reset { document: document.into(), epoch: redis_epoch })
                .await
                .is_err()
            {
                return Ok(());
            }
            if let Some(d) = self.docs.borrow_mut().get_mut(document) {
                if d.epoch == Some(epoch) {
                    d.epoch = Some(redis_epoch);
                    d.last = 0;
                    d.max_seen = 0;
                    d.behind = true;
                    d.members_stale = true;
                }
            }
            return Ok(());
        }
        let tail = entries(tail);
        let full = tail.len() == FILL_BATCH;
        let mut next = last + 1;
        let mut events = Vec::new();
        for (seq, origin, frame) in tail {
            if seq < next || seq > head_seq {
                continue;
            }
            if seq > next {
                events.push(Event::Gap { document: document.into(), epoch, to: seq - 1 });
                self.registry.cluster.gap_lost.fetch_add(seq - next, Relaxed);
            }
            self.registry.cluster.gap_fills.fetch_add(1, Relaxed);
            events.push(Event::Op { document: document.into(), epoch, seq, origin, frame });
            next = seq + 1;
        }
        if !full && next <= head_seq {
            // The stream ends before the head: trimmed away (a stream of
            // length 0 keeps nothing).
            events.push(Event::Gap { document: document.into(), epoch, to: head_seq });
            self.registry.cluster.gap_lost.fetch_add(head_seq + 1 - next, Relaxed);
            next = head_seq + 1;
        }
        for e in events {
            if self.events[core].send_async(e).await.is_err() {
                return Ok(());
            }
        }
        if let Some(d) = self.docs.borrow_mut().get_mut(document) {
            if d.epoch == Some(epoch) && d.last == last {
                d.last = next - 1;
                // Done unless more is known to exist (a notification seen
                // meanwhile, or a full batch).
                if !full && d.max_seen <= d.last {
                    d.behind = false;
                }
            }
        }
        Ok(())
    }

    // ---- heartbeats, health, dead nodes ----

    async fn ticker(self: Rc<Self>) {
        let timeout = self.s.node_timeout;
        let period = (timeout / 5).clamp(Duration::from_millis(100), Duration::from_secs(1));
        // A node is dead when its heartbeat is older than half the timeout:
        // with the period above, its sessions leave within about 0.7 of it.
        let dead_after = timeout / 2;
        let mut conn = self.conn.clone();
        loop {
            tokio::time::sleep(period).await;
            let beat = eval(scripts::HEARTBEAT, &[keys::NODES], &[self.s.node.as_bytes()]);
            match beat.query_async::<Value>(&mut conn).await {
                Ok(_) => self.ok(),
                Err(e) => {
                    self.failed(&e.to_string());
                    continue;
                }
            }
            // The check that catches a lost last notification.
            if let Err(e) = self.check_heads(&mut conn).await {
                self.failed(&e);
                continue;
            }
            // Reap only after this node has been up long enough for the
            // others to have beaten again after an outage of Redis.
            let settled = self.healthy_since.borrow().is_some_and(|t| t.elapsed() >= dead_after);
            if settled {
                if let Err(e) = self.reap(&mut conn, dead_after).await {
                    self.failed(&e);
                }
            }
        }
    }

    async fn check_heads(&self, conn: &mut Conn) -> Result<(), String> {
        let followed: Vec<(Box<str>, Epoch, u64)> = self
            .docs
            .borrow()
            .iter()
            .filter(|(_, d)| !d.behind)
            .filter_map(|(k, d)| Some((k.clone(), d.epoch?, d.last)))
            .collect();
        if followed.is_empty() {
            return Ok(());
        }
        let cmds = followed
            .iter()
            .map(|(d, _, _)| {
                let mut c = redis::cmd("HMGET");
                c.arg(keys::meta(d)).arg("epoch").arg("seq");
                c
            })
            .collect();
        let heads: Vec<(Option<String>, Option<u64>)> = self
            .query_each(conn, cmds)
            .await?
            .into_iter()
            .map(|v| redis::from_redis_value(v).unwrap_or((None, None)))
            .collect();
        let mut moved = false;
        let mut docs = self.docs.borrow_mut();
        for ((document, epoch, last), (e, seq)) in followed.into_iter().zip(heads) {
            let Some(d) = docs.get_mut(&document) else { continue };
            let same = e.as_deref().and_then(parse_epoch) == Some(epoch);
            // Ahead: a notification was missed; behind: Redis lost some.
            if !same || seq.unwrap_or(0) != last && d.last == last {
                d.behind = true;
                moved = true;
            }
        }
        if moved {
            self.fill.notify_one();
        }
        Ok(())
    }

    async fn reap(&self, conn: &mut Conn, dead_after: Duration) -> Result<(), String> {
        let ms = dead_after.as_millis().to_string();
        let dead: Vec<String> = eval(scripts::DEAD_NODES, &[keys::NODES], &[ms.as_bytes()])
            .query_async(conn)
            .await
            .map_err(|e| e.to_string())?;
        for node in dead.into_iter().filter(|n| *n != self.s.node) {
            let n = self.reap_node(conn, &node).await?;
            info!(node = %node, sessions = n, "a cluster node stopped beating: its sessions left");
        }
        Ok(())
    }

    /// Unlists every session of `node` (publishing their `user_left`) and
    /// takes the node out; returns how many sessions it had.
    async fn reap_node(&self, conn: &mut Conn, node: &str) -> Result<usize, String> {
        let sessions: Vec<String> =
            redis::cmd("SMEMBERS").arg(keys::node_sessions(node)).query_async(conn).await.map_err(|e| e.to_string())?;
        let mut cmds: Vec<Cmd> = sessions
            .iter()
            .filter_map(|s| s.split_once(' '))
            .map(|(conn_id, document)| {
                eval(
                    scripts::LEAVE,
                    &[&keys::members(document), &keys::channel(document)],
                    &[conn_id.as_bytes(), node.as_bytes()],
                )
            })
            .collect();
        let mut del = redis::cmd("DEL");
        del.arg(keys::node_sessions(node));
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(keys::NODES).arg(node);
        cmds.extend([del, zrem]);
        self.query_each(conn, cmds).await?;
        Ok(sessions.len())
    }

    /// Runs commands that may touch different slots: one pipeline on one
    /// Redis; each on its own (together) in a Redis Cluster. A command's own
    /// error is its value (`Value::ServerError`).
    async fn query_each(&self, conn: &mut Conn, cmds: Vec<Cmd>) -> Result<Vec<Value>, String> {
        if !self.s.redis_cluster {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for c in cmds {
                pipe.add_command(c);
            }
            return pipe.query_async(conn).await.map_err(|e| e.to_string());
        }
        let handles: Vec<_> = cmds
            .into_iter()
            .map(|c| {
                let mut conn = conn.clone();
                tokio::task::spawn_local(async move { c.query_async::<Value>(&mut conn).await })
            })
            .collect();
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(h.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }
}

//! `docrelay-load`: a load generator that speaks the relay protocol.
//!
//! It opens many connections (authenticate in dev mode, join) across D
//! documents with S subscribers and P senders each, sends operations at a fixed
//! total rate (open loop) or with a window of unacknowledged operations per
//! sender, counts every delivered broadcast, checks seq order and gaps per
//! subscriber, and records end-to-end latency (the send time travels inside
//! the payload) in an HDR histogram.
//!
//! It must cost less CPU per delivery than the relay it measures, so it runs
//! on one glommio executor (one thread, pinned with `--cpu`), reads with 64 KiB
//! reads into one shared buffer, finds the few fields it needs by position
//! instead of parsing JSON, and sends unmasked-equivalent frames (an all-zero
//! mask key, so masking costs nothing).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::sleep;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// D documents × (S subscribers + P senders), operations at --rate or --window.
    Run,
    /// Connect, authenticate and join --connections clients as fast as possible.
    Storm,
    /// Hold --connections joined idle clients and report the relay's memory per connection.
    Idle,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "docrelay-load", about = "Load generator for docrelay (and the baseline)")]
struct Args {
    /// Relay address.
    #[arg(long, default_value = "127.0.0.1:9001")]
    addr: SocketAddr,
    #[arg(long, value_enum, default_value = "run")]
    mode: Mode,
    /// Documents.
    #[arg(long, default_value_t = 1)]
    docs: usize,
    /// Subscribers per document (they only read).
    #[arg(long, default_value_t = 100)]
    subs: usize,
    /// Senders per document (they also read each other's operations).
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Operation payload size in bytes (the JSON `payload` value).
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Total operations per second over all senders (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Unacknowledged operations per sender (closed loop) instead of --rate.
    #[arg(long)]
    window: Option<usize>,
    /// Seconds of measurement (per step with --find-max).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Raise --rate step by step until delivery < --min-delivery or p99 > --max-p99-ms.
    #[arg(long)]
    find_max: bool,
    #[arg(long, default_value_t = 1.25)]
    step: f64,
    #[arg(long, default_value_t = 0.99)]
    min_delivery: f64,
    #[arg(long, default_value_t = 50.0)]
    max_p99_ms: f64,
    /// Highest rate --find-max tries.
    #[arg(long, default_value_t = 100_000_000.0)]
    max_rate: f64,
    /// Clients for --mode storm / idle.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Connection attempts in flight at once (storm, idle and set-up).
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Microseconds the generator polls before it sleeps (0: sleep at once).
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    /// Pin the load generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// The relay's process id, for its CPU% and memory from /proc.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// The CPUs the server is pinned to, for their busy share from /proc/stat.
    #[arg(long, value_delimiter = ',')]
    relay_cpus: Vec<usize>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Label for the results (e.g. the scenario name).
    #[arg(long, default_value = "run")]
    label: String,
    /// Prefix of document ids (several generators can share a relay).
    #[arg(long, default_value = "load")]
    doc_prefix: String,
}

fn main() {
    let args = Args::parse();
    raise_nofile_limit();
    let spin_us = args.spin_us;
    let placement = match args.cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    let handle = LocalExecutorBuilder::new(placement)
        .name("docrelay-load")
        .io_memory(64 * 1024)
        // Reap socket readiness at least this often while busy (see the relay's
        // runtime::PREEMPT_TIMER): otherwise latency is measured in queue time.
        .preempt_timer(docrelay::runtime::PREEMPT_TIMER)
        .spin_before_park(Duration::from_micros(spin_us))
        .spawn(move || async move {
            match args.mode {
                Mode::Run => run_mode(args).await,
                Mode::Storm => storm_mode(args).await,
                Mode::Idle => idle_mode(args).await,
            }
        })
        .expect("start the executor (is `ulimit -l` at least 512 KiB?)");
    if let Err(e) = handle.join() {
        eprintln!("docrelay-load: {e}");
        std::process::exit(1);
    }
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

// ---------------------------------------------------------------------------
// Measurements shared by every client of the executor (one thread: Cell/RefCell).

#[derive(Default)]
struct Stats {
    deliveries: Cell<u64>,
    ops_sent: Cell<u64>,
    acks: Cell<u64>,
    lagged: Cell<u64>,
    gaps: Cell<u64>,
    out_of_order: Cell<u64>,
    errors: Cell<u64>,
    closed: Cell<u64>,
}

struct Shared {
    args: Args,
    base: Instant,
    stats: Stats,
    latency: RefCell<Histogram<u64>>,
    /// Only deliveries of operations sent at or after this time (ns since
    /// `base`) are recorded, so warm-up traffic does not count.
    record_from: Cell<u64>,
    record_until: Cell<u64>,
    /// Operations sent inside the window.
    window_ops: Cell<u64>,
    /// Read buffer shared by every connection (only borrowed inside a poll).
    scratch: RefCell<Vec<u8>>,
    /// Senders: operations per second each, 0 = paused.
    rate_per_sender: Cell<f64>,
    sending: Cell<bool>,
    ready: Cell<usize>,
    failed: Cell<usize>,
    /// The payload after the timestamp: `,"p":"xxx…"}`.
    pad: Vec<u8>,
    sender_wakers: RefCell<Vec<Waker>>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
    fn wake_senders(&self) {
        for w in self.sender_wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

// ---------------------------------------------------------------------------
// WebSocket client plumbing.

/// A client frame with an all-zero mask key (valid RFC 6455; XOR is a no-op).
fn client_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x81);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
}

async fn connect(addr: SocketAddr, doc: &str) -> std::io::Result<(TcpStream, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| std::io::Error::other(e.to_string()))?;
    stream.set_nodelay(true).map_err(|e| std::io::Error::other(e.to_string()))?;
    let req = format!(
        "GET /ws/documents/{doc} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed during the upgrade"));
        }
        filled += n;
        if let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                return Err(std::io::Error::other(String::from_utf8_lossy(&buf[..end]).into_owned()));
            }
            return Ok((stream, buf[end + 4..filled].to_vec()));
        }
        if filled == buf.len() {
            return Err(std::io::Error::other("upgrade response too long"));
        }
    }
}

/// A server frame (unmasked): opcode and payload range in the buffer.
fn next_frame(buf: &[u8]) -> Option<(u8, std::ops::Range<usize>)> {
    if buf.len() < 2 {
        return None;
    }
    let op = buf[0] & 0x0f;
    let (len, head) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (buf.len() >= head + len).then_some((op, head..head + len))
}

/// The unsigned number right after `key` (e.g. `"seq":`) in `json`.
fn number_after(json: &[u8], key: &[u8]) -> Option<u64> {
    let at = json.windows(key.len()).position(|w| w == key)? + key.len();
    let mut v: u64 = 0;
    let mut any = false;
    for &b in &json[at..] {
        if !b.is_ascii_digit() {
            break;
        }
        v = v * 10 + u64::from(b - b'0');
        any = true;
    }
    any.then_some(v)
}

/// Writes all of `buf` to a stream shared by a client's reader and sender,
/// borrowing it only inside each poll (never across an await).
async fn write_shared(stream: &RefCell<TcpStream>, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n =
            poll_fn(|cx| futures_lite::AsyncWrite::poll_write(Pin::new(&mut *stream.borrow_mut()), cx, buf)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// What a client is waiting for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Await {
    AuthResult,
    Joined,
    Streaming,
}

/// One client's reading state.
struct Reader {
    pending: Vec<u8>,
    awaiting: Await,
    /// The next seq this client expects (subscribers; 0 = not known yet).
    next_seq: u64,
    lag_announced: bool,
    is_sender: bool,
    outstanding: Rc<Cell<usize>>,
}

impl Reader {
    /// Handles every complete frame in `data`; returns false when the relay closed.
    fn handle(&mut self, shared: &Shared, data: &[u8], pongs: &mut Vec<u8>) -> bool {
        let mut buf: &[u8] = if self.pending.is_empty() { data } else { &[] };
        let owned;
        if !self.pending.is_empty() {
            self.pending.extend_from_slice(data);
            owned = std::mem::take(&mut self.pending);
            buf = &owned;
        }
        let mut pos = 0;
        let mut open = true;
        while let Some((op, range)) = next_frame(&buf[pos..]) {
            let payload = &buf[pos + range.start..pos + range.end];
            pos += range.end;
            match op {
                0x2 => self.broadcast(shared, payload),
                0x1 => self.reply(shared, payload),
                0x9 => {
                    // Answer the relay's keep-alive Ping (masked Pong, zero key).
                    pongs.push(0x8a);
                    pongs.push(0x80 | payload.len().min(125) as u8);
                    pongs.extend_from_slice(&[0, 0, 0, 0]);
                    pongs.extend_from_slice(&payload[..payload.len().min(125)]);
                }
                0x8 => {
                    open = false;
                    break;
                }
                _ => {}
            }
        }
        if open && pos < buf.len() {
            self.pending = buf[pos..].to_vec();
        }
        open
    }

    fn broadcast(&mut self, shared: &Shared, json: &[u8]) {
        // The relay puts "type" first; other servers may order keys differently.
        let is_op =
            json.starts_with(br#"{"type":"operation""#) || json.windows(18).any(|w| w == br#""type":"operation""#);
        if !is_op {
            return; // presence
        }
        let Some(seq) = number_after(json, br#""seq":"#) else { return };
        let stats = &shared.stats;
        if self.next_seq != 0 {
            if seq < self.next_seq {
                stats.out_of_order.set(stats.out_of_order.get() + 1);
            } else if seq > self.next_seq && !self.is_sender && !self.lag_announced {
                stats.gaps.set(stats.gaps.get() + 1);
            }
        }
        self.lag_announced = false;
        self.next_seq = seq + 1;
        // Only operations sent inside the measurement window count, so the
        // delivery ratio compares like with like.
        if let Some(t) = number_after(json, br#"{"t":"#) {
            if t >= shared.record_from.get() && t < shared.record_until.get() {
                stats.deliveries.set(stats.deliveries.get() + 1);
                let micros = shared.now_ns().saturating_sub(t) / 1000;
                let _ = shared.latency.borrow_mut().record(micros.max(1));
            }
        }
    }

    fn reply(&mut self, shared: &Shared, json: &[u8]) {
        let stats = &shared.stats;
        if json.starts_with(br#"{"type":"ack""#)
            || json.starts_with(br#"{"client_op_id""#)
            || json.starts_with(br#"{"seq""#)
        {
            stats.acks.set(stats.acks.get() + 1);
            self.outstanding.set(self.outstanding.get().saturating_sub(1));
            shared.wake_senders();
            return;
        }
        let kind = |t: &[u8]| json.windows(t.len()).any(|w| w == t);
        if kind(br#""lagged""#) {
            stats.lagged.set(stats.lagged.get() + 1);
            self.lag_announced = true;
        } else if self.awaiting == Await::AuthResult && kind(br#""auth_result""#) {
            self.awaiting = Await::Joined;
        } else if self.awaiting == Await::Joined && kind(br#""joined_document""#) {
            self.awaiting = Await::Streaming;
            shared.ready.set(shared.ready.get() + 1);
        } else if kind(br#""error""#) {
            stats.errors.set(stats.errors.get() + 1);
        }
    }
}

/// One client: connect, authenticate, join, then read (and, for a sender,
/// send) until the connection ends.
async fn client(shared: Rc<Shared>, id: usize, doc: String, is_sender: bool) {
    let (stream, leftover) = match connect(shared.args.addr, &doc).await {
        Ok(s) => s,
        Err(e) => {
            if shared.failed.get() < 3 {
                eprintln!("connect failed: {e}");
            }
            shared.failed.set(shared.failed.get() + 1);
            return;
        }
    };
    let stream = Rc::new(RefCell::new(stream));
    let mut hello = Vec::new();
    client_frame(&mut hello, format!(r#"{{"type":"authenticate","token":"u{id}"}}"#).as_bytes());
    client_frame(&mut hello, br#"{"type":"join_document"}"#);
    if write_shared(&stream, &hello).await.is_err() {
        shared.failed.set(shared.failed.get() + 1);
        return;
    }
    let outstanding = Rc::new(Cell::new(0usize));
    let mut reader = Reader {
        pending: Vec::new(),
        awaiting: Await::AuthResult,
        next_seq: 0,
        lag_announced: false,
        is_sender,
        outstanding: outstanding.clone(),
    };
    let mut pongs = Vec::new();
    reader.handle(&shared, &leftover, &mut pongs);
    if is_sender {
        glommio::spawn_local(sender(shared.clone(), stream.clone(), outstanding)).detach();
    }
    loop {
        let open = poll_fn(|cx| {
            let mut scratch = shared.scratch.borrow_mut();
            match Pin::new(&mut *stream.borrow_mut()).poll_read(cx, &mut scratch[..]) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(false),
                Poll::Ready(Ok(n)) => Poll::Ready(reader.handle(&shared, &scratch[..n], &mut pongs)),
            }
        })
        .await;
        if !pongs.is_empty() {
            let _ = write_shared(&stream, &pongs).await;
            pongs.clear();
        }
        if !open {
            shared.stats.closed.set(shared.stats.closed.get() + 1);
            return;
        }
    }
}

/// A sender: open loop at the shared per-sender rate (operations due since
/// the last wake-up go out in one write), or a window of unacked operations.
async fn sender(shared: Rc<Shared>, stream: Rc<RefCell<TcpStream>>, outstanding: Rc<Cell<usize>>) {
    let mut out = Vec::new();
    let mut payload = Vec::with_capacity(shared.args.payload + 64);
    let mut due_from = Instant::now();
    let mut sent_since = 0u64;
    let mut last_rate = 0.0;
    loop {
        if !shared.sending.get() {
            poll_fn(|cx| {
                if shared.sending.get() {
                    Poll::Ready(())
                } else {
                    shared.sender_wakers.borrow_mut().push(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            due_from = Instant::now();
            sent_since = 0;
        }
        let count = match shared.args.window {
            Some(w) => {
                let free = w.saturating_sub(outstanding.get());
                if free == 0 {
                    poll_fn(|cx| {
                        if outstanding.get() < w || !shared.sending.get() {
                            Poll::Ready(())
                        } else {
                            shared.sender_wakers.borrow_mut().push(cx.waker().clone());
                            Poll::Pending
                        }
                    })
                    .await;
                    continue;
                }
                free
            }
            None => {
                let rate = shared.rate_per_sender.get();
                if rate != last_rate {
                    last_rate = rate;
                    due_from = Instant::now();
                    sent_since = 0;
                }
                let due = (due_from.elapsed().as_secs_f64() * rate) as u64;
                if due <= sent_since {
                    let wait = ((sent_since + 1) as f64 / rate - due_from.elapsed().as_secs_f64()).max(0.0);
                    sleep(Duration::from_secs_f64(wait.clamp(0.0005, 0.25))).await;
                    continue;
                }
                let n = (due - sent_since).min(1024);
                sent_since += n;
                n as usize
            }
        };
        out.clear();
        for _ in 0..count {
            payload.clear();
            let t = shared.now_ns();
            if t >= shared.record_from.get() && t < shared.record_until.get() {
                shared.window_ops.set(shared.window_ops.get() + 1);
            }
            let _ = write!(payload, r#"{{"type":"operation","payload":{{"t":{t}"#);
            payload.extend_from_slice(&shared.pad);
            client_frame(&mut out, &payload);
        }
        outstanding.set(outstanding.get() + count);
        shared.stats.ops_sent.set(shared.stats.ops_sent.get() + count as u64);
        if write_shared(&stream, &out).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// /proc readings.

fn proc_cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf reads a constant.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// Busy time of some CPUs over a window (everything but idle and iowait;
/// glommio's io_uring wait shows as iowait), in percent of one CPU each.
struct BusyMeter {
    cpus: Vec<usize>,
    start: Vec<(u64, u64)>,
}

fn cpu_times(cpu: usize) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with(&format!("cpu{cpu} ")))?;
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4)?;
    Some((total, idle))
}

impl BusyMeter {
    fn start(cpus: &[usize]) -> Option<BusyMeter> {
        if cpus.is_empty() {
            return None;
        }
        let start = cpus.iter().map(|&c| cpu_times(c)).collect::<Option<Vec<_>>>()?;
        Some(BusyMeter { cpus: cpus.to_vec(), start })
    }
    /// Average busy percent over the CPUs.
    fn percent(&self) -> Option<f64> {
        let mut sum = 0.0;
        for (c, (t0, i0)) in self.cpus.iter().zip(&self.start) {
            let (t1, i1) = cpu_times(*c)?;
            let dt = (t1 - t0).max(1) as f64;
            sum += 100.0 * (dt - (i1 - i0) as f64) / dt;
        }
        Some(sum / self.cpus.len() as f64)
    }
}

/// CPU use of a process over a window, in percent of one CPU.
struct CpuMeter {
    pid: String,
    ticks: u64,
    at: Instant,
}

impl CpuMeter {
    fn start(pid: &str) -> Option<CpuMeter> {
        Some(CpuMeter { pid: pid.to_string(), ticks: proc_cpu_ticks(pid)?, at: Instant::now() })
    }
    fn percent(&self) -> Option<f64> {
        let dt = proc_cpu_ticks(&self.pid)? - self.ticks;
        Some(dt as f64 / clk_tck() / self.at.elapsed().as_secs_f64() * 100.0)
    }
}

// ---------------------------------------------------------------------------
// Modes.

fn make_shared(args: Args) -> Rc<Shared> {
    let pad_len = args.payload.saturating_sub(30);
    let mut pad = Vec::with_capacity(pad_len + 12);
    pad.extend_from_slice(br#","p":""#);
    pad.resize(pad.len() + pad_len, b'x');
    pad.extend_from_slice(br#""}}"#);
    Rc::new(Shared {
        args,
        base: Instant::now(),
        stats: Stats::default(),
        latency: RefCell::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")),
        record_from: Cell::new(u64::MAX),
        record_until: Cell::new(u64::MAX),
        window_ops: Cell::new(0),
        scratch: RefCell::new(vec![0; 64 * 1024]),
        rate_per_sender: Cell::new(0.0),
        sending: Cell::new(false),
        ready: Cell::new(0),
        failed: Cell::new(0),
        pad,
        sender_wakers: RefCell::new(Vec::new()),
    })
}

/// Opens every client of the run, `concurrency` connection attempts at a time.
async fn open_clients(shared: &Rc<Shared>, plan: Vec<(String, bool)>) -> (usize, f64) {
    let total = plan.len();
    let start = Instant::now();
    let inflight = Rc::new(Cell::new(0usize));
    for (i, (doc, is_sender)) in plan.into_iter().enumerate() {
        while inflight.get() >= shared.args.concurrency {
            // Connections in flight are those neither ready nor failed yet.
            inflight.set(i - shared.ready.get() - shared.failed.get());
            if inflight.get() >= shared.args.concurrency {
                sleep(Duration::from_micros(200)).await;
            }
        }
        inflight.set(inflight.get() + 1);
        glommio::spawn_local(client(shared.clone(), i, doc, is_sender)).detach();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while shared.ready.get() + shared.failed.get() < total && Instant::now() < deadline {
        sleep(Duration::from_millis(2)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    (shared.ready.get(), secs)
}

fn plan(args: &Args) -> Vec<(String, bool)> {
    let mut plan = Vec::new();
    for d in 0..args.docs {
        let doc = format!("{}-{d}", args.doc_prefix);
        for _ in 0..args.subs {
            plan.push((doc.clone(), false));
        }
        for _ in 0..args.senders {
            plan.push((doc.clone(), true));
        }
    }
    plan
}

/// One measured step of a run: results in a JSON object.
#[derive(Debug, Default, Clone)]
struct Step {
    rate: f64,
    ops: u64,
    acks: u64,
    deliveries: u64,
    expected: u64,
    delivery_ratio: f64,
    deliveries_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    lagged: u64,
    gaps: u64,
    out_of_order: u64,
    relay_cpu: Option<f64>,
    load_cpu: Option<f64>,
    /// Busy share of the server's CPUs from /proc/stat (softirq included).
    relay_busy: Option<f64>,
    load_busy: Option<f64>,
    secs: f64,
}

impl Step {
    fn json(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.1}"));
        format!(
            r#"{{"rate":{:.0},"ops":{},"acks":{},"deliveries":{},"expected":{},"delivery_ratio":{:.4},"deliveries_per_sec":{:.0},"p50_us":{},"p99_us":{},"p999_us":{},"max_us":{},"lagged":{},"gaps":{},"out_of_order":{},"relay_cpu_pct":{},"load_cpu_pct":{},"relay_cpus_busy_pct":{},"load_cpu_busy_pct":{},"secs":{:.2}}}"#,
            self.rate,
            self.ops,
            self.acks,
            self.deliveries,
            self.expected,
            self.delivery_ratio,
            self.deliveries_per_sec,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.lagged,
            self.gaps,
            self.out_of_order,
            opt(self.relay_cpu),
            opt(self.load_cpu),
            opt(self.relay_busy),
            opt(self.load_busy),
            self.secs
        )
    }

    fn row(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}%"));
        format!(
            "{:>10.0} {:>12.0} {:>8.2}% {:>9} {:>9} {:>9} {:>9} {:>7} {:>5} {:>7} {:>7} {:>7} {:>7}",
            self.rate,
            self.deliveries_per_sec,
            self.delivery_ratio * 100.0,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.lagged,
            self.gaps,
            opt(self.relay_cpu),
            opt(self.relay_busy),
            opt(self.load_cpu),
            opt(self.load_busy)
        )
    }
}

const HEADER: &str =
    "      rate deliveries/s delivered   p50(us)   p99(us) p99.9(us)   max(us)  lagged  gaps   relay    load";

/// Runs load at `rate` (or the window) for warm-up + duration, stops, waits
/// for stragglers, and measures.
async fn measure(shared: &Rc<Shared>, rate: f64, per_op_fanout: u64) -> Step {
    let args = &shared.args;
    let senders = (args.docs * args.senders).max(1);
    shared.rate_per_sender.set(rate / senders as f64);
    shared.sending.set(true);
    shared.wake_senders();
    sleep(Duration::from_secs_f64(args.warmup)).await;
    // Measurement window.
    let s = &shared.stats;
    let (ops0, acks0, del0, lag0, gap0, ooo0) =
        (s.ops_sent.get(), s.acks.get(), s.deliveries.get(), s.lagged.get(), s.gaps.get(), s.out_of_order.get());
    shared.latency.borrow_mut().reset();
    shared.window_ops.set(0);
    shared.record_until.set(u64::MAX);
    shared.record_from.set(shared.now_ns());
    let relay = args.relay_pid.and_then(|p| CpuMeter::start(&p.to_string()));
    let me = CpuMeter::start("self");
    let relay_busy = BusyMeter::start(&args.relay_cpus);
    let load_busy = args.cpu.and_then(|c| BusyMeter::start(&[c]));
    let start = Instant::now();
    sleep(Duration::from_secs_f64(args.duration)).await;
    shared.record_until.set(shared.now_ns());
    let secs = start.elapsed().as_secs_f64();
    let relay_cpu = relay.and_then(|m| m.percent());
    let load_cpu = me.and_then(|m| m.percent());
    let relay_busy = relay_busy.and_then(|m| m.percent());
    let load_busy = load_busy.and_then(|m| m.percent());
    let _ = s.ops_sent.get() - ops0;
    let ops = shared.window_ops.get();
    shared.sending.set(false);
    shared.wake_senders();
    // Stragglers: deliveries of operations sent in the window.
    let expected = ops * per_op_fanout;
    let settle = Instant::now();
    let mut last = s.deliveries.get();
    while settle.elapsed() < Duration::from_secs(3) {
        sleep(Duration::from_millis(100)).await;
        let now = s.deliveries.get();
        if now == last && now - del0 >= expected {
            break;
        }
        if now == last && settle.elapsed() > Duration::from_millis(500) {
            break;
        }
        last = now;
    }
    let deliveries = s.deliveries.get() - del0;
    let h = shared.latency.borrow();
    Step {
        rate,
        ops,
        acks: s.acks.get() - acks0,
        deliveries,
        expected,
        delivery_ratio: if expected == 0 { 1.0 } else { deliveries as f64 / expected as f64 },
        deliveries_per_sec: deliveries.min(expected.max(deliveries)) as f64 / secs,
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        lagged: s.lagged.get() - lag0,
        gaps: s.gaps.get() - gap0,
        out_of_order: s.out_of_order.get() - ooo0,
        relay_cpu,
        load_cpu,
        relay_busy,
        load_busy,
        secs,
    }
}

async fn run_mode(args: Args) {
    let shared = make_shared(args.clone());
    let plan = plan(&args);
    let clients = plan.len();
    let per_doc = args.subs + args.senders;
    let fanout = per_doc.saturating_sub(1) as u64;
    let (ready, secs) = open_clients(&shared, plan).await;
    let conn_rate = ready as f64 / secs;
    eprintln!(
        "{}: {ready}/{clients} clients joined in {secs:.2} s ({conn_rate:.0}/s); {} documents × ({} subscribers + {} senders), payload {} B",
        args.label, args.docs, args.subs, args.senders, args.payload
    );
    if ready < clients {
        eprintln!("warning: {} clients failed to join", clients - ready);
    }
    println!("{HEADER}");
    let mut steps = Vec::new();
    let mut best: Option<Step> = None;
    if args.find_max {
        let mut rate = args.rate.unwrap_or(1000.0);
        loop {
            let step = measure(&shared, rate, fanout).await;
            println!("{}", step.row());
            let held = step.delivery_ratio >= args.min_delivery && (step.p99_us as f64) <= args.max_p99_ms * 1000.0;
            steps.push(step.clone());
            if !held {
                break;
            }
            best = Some(step);
            rate *= args.step;
            if rate > args.max_rate {
                break;
            }
            // Let queues drain between steps.
            sleep(Duration::from_millis(300)).await;
        }
    } else {
        let rate = args.rate.unwrap_or(if args.window.is_some() { 0.0 } else { 1000.0 });
        let step = measure(&shared, rate, fanout).await;
        println!("{}", step.row());
        steps.push(step.clone());
        best = Some(step);
    }
    match &best {
        Some(b) if args.find_max => println!(
            "{}: max sustained rate {:.0} ops/s = {:.0} deliveries/s, p99 {} us (delivery >= {:.0}%, p99 <= {} ms)",
            args.label,
            b.rate,
            b.deliveries_per_sec,
            b.p99_us,
            args.min_delivery * 100.0,
            args.max_p99_ms
        ),
        None => println!(
            "{}: no rate held (delivery >= {:.0}%, p99 <= {} ms)",
            args.label,
            args.min_delivery * 100.0,
            args.max_p99_ms
        ),
        _ => {}
    }
    if let Some(path) = &args.json {
        let steps_json: Vec<String> = steps.iter().map(Step::json).collect();
        let best_json = best.as_ref().map_or("null".to_string(), Step::json);
        let json = format!(
            r#"{{"label":"{}","mode":"run","docs":{},"subs":{},"senders":{},"payload":{},"clients":{},"joined":{},"connections_per_sec":{:.0},"find_max":{},"best":{},"steps":[{}]}}"#,
            args.label,
            args.docs,
            args.subs,
            args.senders,
            args.payload,
            clients,
            ready,
            conn_rate,
            args.find_max,
            best_json,
            steps_json.join(",")
        );
        write_json(path, &json);
    }
    std::process::exit(0);
}

fn write_json(path: &std::path::Path, json: &str) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(path, json) {
        eprintln!("cannot write {}: {e}", path.display());
    }
}

/// Connects `--connections` clients (authenticate + join) as fast as possible.
async fn storm_mode(args: Args) {
    let shared = make_shared(args.clone());
    let per_doc = 5;
    let plan: Vec<(String, bool)> =
        (0..args.connections).map(|i| (format!("{}-{}", args.doc_prefix, i / per_doc), false)).collect();
    let relay = args.relay_pid.and_then(|p| CpuMeter::start(&p.to_string()));
    let (ready, secs) = open_clients(&shared, plan).await;
    let relay_cpu = relay.and_then(|m| m.percent());
    let rate = ready as f64 / secs;
    println!(
        "{}: {ready}/{} sessions connected, authenticated and joined in {secs:.3} s = {rate:.0} sessions/s (relay CPU {})",
        args.label,
        args.connections,
        relay_cpu.map_or("-".into(), |c| format!("{c:.0}%"))
    );
    if let Some(path) = &args.json {
        let json = format!(
            r#"{{"label":"{}","mode":"storm","connections":{},"joined":{ready},"secs":{secs:.3},"sessions_per_sec":{rate:.0},"relay_cpu_pct":{}}}"#,
            args.label,
            args.connections,
            relay_cpu.map_or("null".into(), |c| format!("{c:.1}"))
        );
        write_json(path, &json);
    }
    std::process::exit(if ready == args.connections { 0 } else { 1 });
}

/// Holds `--connections` joined idle clients and reports the relay's RSS
/// growth per connection.
async fn idle_mode(args: Args) {
    let Some(pid) = args.relay_pid else {
        eprintln!("--mode idle needs --relay-pid");
        std::process::exit(2);
    };
    let shared = make_shared(args.clone());
    let before = proc_rss_kib(pid).unwrap_or(0);
    let per_doc = 5;
    let plan: Vec<(String, bool)> =
        (0..args.connections).map(|i| (format!("{}-{}", args.doc_prefix, i / per_doc), false)).collect();
    let (ready, secs) = open_clients(&shared, plan).await;
    sleep(Duration::from_secs(1)).await;
    let after = proc_rss_kib(pid).unwrap_or(0);
    let per_conn = (after.saturating_sub(before)) as f64 * 1024.0 / ready.max(1) as f64;
    println!(
        "{}: {ready} idle joined clients; relay RSS {before} KiB -> {after} KiB = {per_conn:.0} bytes per connection (joined in {secs:.2} s)",
        args.label
    );
    if let Some(path) = &args.json {
        let json = format!(
            r#"{{"label":"{}","mode":"idle","connections":{ready},"rss_before_kib":{before},"rss_after_kib":{after},"bytes_per_connection":{per_conn:.0}}}"#,
            args.label
        );
        write_json(path, &json);
    }
    std::process::exit(0);
}

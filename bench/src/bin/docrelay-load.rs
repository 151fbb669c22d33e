//! `docrelay-load`: a load generator that speaks the relay protocol.
//!
//! It opens many connections (authenticate in dev mode, join) across D
//! documents with S subscribers and P senders each, sends operations at a fixed
//! total rate (open loop) or with a window of unacknowledged operations per
//! sender, counts every delivered broadcast, checks seq order and gaps per
//! subscriber, and records end-to-end latency (the send time travels inside
//! the payload) in an HDR histogram, and in a second one the ack latency: from
//! sending an operation to its `ack` on the sender's own connection (acks come
//! back in order per connection, so each sender keeps a FIFO of send times).
//!
//! It must cost less CPU per delivery than the relay it measures, so it is one
//! thread (pinned with `--cpu`) running a level-triggered epoll loop over
//! non-blocking sockets: one `recv` of up to 64 KiB per readiness event into
//! one shared buffer, the few fields it needs found by position instead of by
//! parsing JSON, and client frames with an all-zero mask key (masking is then
//! free). epoll rather than io_uring poll on purpose: on loopback the server's
//! send runs the receiver's wake-up in the server's own context, and an
//! io_uring poll completion queues task work and kicks the generator's CPU for
//! every delivery, a cost the server would be charged for; a socket becoming
//! ready on a busy epoll loop only joins its ready list.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
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
    /// Relay address, or several (a cluster's nodes): the clients are spread
    /// over them in turn.
    #[arg(long, default_value = "127.0.0.1:9001", value_delimiter = ',')]
    addr: Vec<SocketAddr>,
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
    /// Raise --rate step by step until delivery < --min-delivery or p99 >
    /// --max-p99-ms (or, with --max-ack-p99-ms, ack p99 over it).
    #[arg(long)]
    find_max: bool,
    #[arg(long, default_value_t = 1.25)]
    step: f64,
    /// After --find-max finds a rate that fails, bisect (geometrically) this
    /// many times between it and the last rate that held, so the reported
    /// maximum is not quantised to whole steps.
    #[arg(long, default_value_t = 0)]
    refine: u32,
    #[arg(long, default_value_t = 0.99)]
    min_delivery: f64,
    #[arg(long, default_value_t = 50.0)]
    max_p99_ms: f64,
    /// With --find-max, a step also holds only if the ack p99 is at most this
    /// many milliseconds and at least --min-delivery of its operations were
    /// acknowledged (default: acks are not a criterion).
    #[arg(long)]
    max_ack_p99_ms: Option<f64>,
    /// With --find-max, a step that fails is measured again this many times
    /// (after the queues drained) and holds if any try holds: one hiccup of a
    /// shared machine (a p99 over a strict bound) does not end the search.
    #[arg(long, default_value_t = 0)]
    confirm: u32,
    /// Highest rate --find-max tries.
    #[arg(long, default_value_t = 100_000_000.0)]
    max_rate: f64,
    /// Clients for --mode storm / idle.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Connection attempts in flight at once (storm, idle and set-up).
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Pin the load generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// The relay's process id, for its CPU% and memory from /proc (several:
    /// the nodes of a cluster, their CPU summed).
    #[arg(long, value_delimiter = ',')]
    relay_pid: Vec<u32>,
    /// A Redis server's process id, for its CPU% (cluster runs).
    #[arg(long)]
    redis_pid: Option<u32>,
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
    if let Some(cpu) = args.cpu {
        pin_to(cpu);
    }
    match args.mode {
        Mode::Run => run_mode(args),
        Mode::Storm => storm_mode(args),
        Mode::Idle => idle_mode(args),
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

/// `seq` and the send time `t` of an operation broadcast; `None` for
/// anything else (presence). The relay's layout, `{"type":"operation",
/// "seq":N,...,"payload":{"t":T,...}}`, is read at fixed places (the payload is
/// the first nested object); other key orders fall back to searching.
fn operation_fields(json: &[u8]) -> Option<(u64, Option<u64>)> {
    const PREFIX: &[u8] = br#"{"type":"operation","seq":"#;
    const T: &[u8] = br#"{"t":"#;
    if json.starts_with(PREFIX) {
        let seq = digits(&json[PREFIX.len()..])?;
        let sent_at = json[1..]
            .iter()
            .position(|&b| b == b'{')
            .map(|i| &json[1 + i..])
            .filter(|rest| rest.starts_with(T))
            .and_then(|rest| digits(&rest[T.len()..]))
            .or_else(|| number_after(json, T));
        return Some((seq, sent_at));
    }
    if !json.windows(18).any(|w| w == br#""type":"operation""#) {
        return None;
    }
    Some((number_after(json, br#""seq":"#)?, number_after(json, T)))
}

/// The unsigned number at the start of `s`.
fn digits(s: &[u8]) -> Option<u64> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    (n > 0).then(|| s[..n].iter().fold(0u64, |v, &b| v * 10 + u64::from(b - b'0')))
}

/// The unsigned number right after `key` (e.g. `"seq":`) in `json`.
fn number_after(json: &[u8], key: &[u8]) -> Option<u64> {
    let at = json.windows(key.len()).position(|w| w == key)? + key.len();
    digits(&json[at..])
}

// ---------------------------------------------------------------------------
// The event loop: level-triggered epoll over non-blocking sockets.

/// The wire bytes after the timestamp of every operation's payload.
fn make_pad(payload: usize) -> Vec<u8> {
    let pad_len = payload.saturating_sub(30);
    let mut pad = Vec::with_capacity(pad_len + 12);
    pad.extend_from_slice(br#","p":""#);
    pad.resize(pad.len() + pad_len, b'x');
    pad.extend_from_slice(br#""}}"#);
    pad
}

/// A Text frame with an all-zero mask key (valid RFC 6455; XOR is a no-op).
fn client_frame(out: &mut Vec<u8>, payload: &[u8]) {
    docrelay::ws::encode_client_frame(out, true, 0x1, [0; 4], payload);
}

#[derive(Default)]
struct Stats {
    deliveries: u64,
    ops_sent: u64,
    acks: u64,
    lagged: u64,
    gaps: u64,
    out_of_order: u64,
    errors: u64,
    closed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Upgrading,
    AwaitAuth,
    AwaitJoin,
    Streaming,
    Dead,
}

/// One client connection.
struct Client {
    fd: RawFd,
    state: State,
    is_sender: bool,
    doc: usize,
    /// Bytes of an incomplete frame (or of the HTTP head) carried between reads.
    pending: Vec<u8>,
    /// Bytes waiting for the socket to take them.
    out: Vec<u8>,
    out_at: usize,
    want_write: bool,
    next_seq: u64,
    lag_announced: bool,
    outstanding: usize,
    /// Open loop: operations sent since `rate_epoch`.
    sent: u64,
    /// Send times (ns since `base`) of this sender's operations not yet
    /// acknowledged, oldest first: acks come back in order per connection.
    unacked: VecDeque<u64>,
}

/// Everything the measurement needs, on one thread.
struct Engine {
    args: Args,
    epfd: RawFd,
    clients: Vec<Client>,
    senders: Vec<usize>,
    docs: Vec<String>,
    base: Instant,
    stats: Stats,
    latency: Histogram<u64>,
    /// Send to `ack`, for operations sent inside the measurement window.
    ack_latency: Histogram<u64>,
    record_from: u64,
    record_until: u64,
    window_ops: u64,
    /// Acks of operations sent inside the measurement window.
    window_acks: u64,
    scratch: Vec<u8>,
    /// When the bytes being handled were read (ns since `base`): one clock
    /// read per `recv`, not per delivery.
    read_at: u64,
    pad: Vec<u8>,
    payload: Vec<u8>,
    sending: bool,
    rate_per_sender: f64,
    rate_epoch: Instant,
    /// Open-loop schedule: (next due time in ns since base, sender index).
    schedule: BinaryHeap<Reverse<(u64, usize)>>,
    ready: usize,
    failed: usize,
    connecting: usize,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Engine {
    fn new(args: Args) -> Engine {
        // SAFETY: epoll_create1 returns a new fd we own (closed at exit).
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epfd >= 0, "epoll_create1: {}", std::io::Error::last_os_error());
        let pad = make_pad(args.payload);
        Engine {
            epfd,
            clients: Vec::new(),
            senders: Vec::new(),
            docs: Vec::new(),
            base: Instant::now(),
            stats: Stats::default(),
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            ack_latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            record_from: u64::MAX,
            record_until: u64::MAX,
            window_ops: 0,
            window_acks: 0,
            scratch: vec![0; 64 * 1024],
            read_at: 0,
            payload: Vec::with_capacity(args.payload + 64),
            pad,
            sending: false,
            rate_per_sender: 0.0,
            rate_epoch: Instant::now(),
            schedule: BinaryHeap::new(),
            ready: 0,
            failed: 0,
            connecting: 0,
            args,
        }
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn ctl(&self, op: i32, idx: usize, events: u32) {
        let mut ev = libc::epoll_event { events, u64: idx as u64 };
        // SAFETY: epoll_ctl on our epoll fd and a socket fd we own.
        unsafe { libc::epoll_ctl(self.epfd, op, self.clients[idx].fd, &mut ev) };
    }

    /// Starts a non-blocking connect for a new client.
    fn open(&mut self, doc: usize, is_sender: bool) {
        let addr = self.args.addr[self.clients.len() % self.args.addr.len()];
        // SAFETY: plain socket setup on a fresh fd we own; sockaddr_in is
        // plain data filled field by field.
        let fd = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                self.failed += 1;
                return;
            }
            set_option(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &(1 as libc::c_int));
            // Linger 0: closing (or exiting) resets the connection instead of
            // leaving it in TIME_WAIT. Back-to-back scenario runs of
            // 10,000-20,000 connections otherwise leave tens of thousands of
            // TIME_WAIT sockets (58,163 seen after one bench) holding the
            // 28,000 ephemeral ports that later runs connect from.
            set_option(fd, libc::SOL_SOCKET, libc::SO_LINGER, &libc::linger { l_onoff: 1, l_linger: 0 });
            let SocketAddr::V4(v4) = addr else { panic!("IPv4 addresses only") };
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as u16;
            sa.sin_port = v4.port().to_be();
            sa.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            let rc = libc::connect(
                fd,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            if rc < 0 && errno() != libc::EINPROGRESS {
                libc::close(fd);
                self.failed += 1;
                return;
            }
            fd
        };
        let idx = self.clients.len();
        self.clients.push(Client {
            fd,
            state: State::Connecting,
            is_sender,
            doc,
            pending: Vec::new(),
            out: Vec::new(),
            out_at: 0,
            want_write: true,
            next_seq: 0,
            lag_announced: false,
            outstanding: 0,
            sent: 0,
            unacked: VecDeque::new(),
        });
        if is_sender {
            self.senders.push(idx);
        }
        self.connecting += 1;
        self.ctl(libc::EPOLL_CTL_ADD, idx, (libc::EPOLLIN | libc::EPOLLOUT) as u32);
    }

    fn kill(&mut self, idx: usize) {
        let c = &mut self.clients[idx];
        if c.state == State::Dead {
            return;
        }
        if c.state != State::Streaming {
            self.failed += 1;
            self.connecting = self.connecting.saturating_sub(1);
        } else {
            self.stats.closed += 1;
        }
        c.state = State::Dead;
        // SAFETY: closing a socket fd this client owns; it is not used again.
        unsafe { libc::close(c.fd) };
    }

    /// Queues bytes and writes as much as the socket takes now.
    fn send(&mut self, idx: usize, bytes: Option<&[u8]>) {
        let c = &mut self.clients[idx];
        if c.state == State::Dead {
            return;
        }
        if let Some(b) = bytes {
            c.out.extend_from_slice(b);
        }
        while c.out_at < c.out.len() {
            let rest = &c.out[c.out_at..];
            // SAFETY: send(2) reads `rest`, a live slice; the socket is non-blocking.
            let n = unsafe {
                libc::send(
                    c.fd,
                    rest.as_ptr() as *const libc::c_void,
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                c.out_at += n as usize;
                continue;
            }
            if n < 0 && errno() == libc::EAGAIN {
                break;
            }
            self.kill(idx);
            return;
        }
        let drained = c.out_at == c.out.len();
        if drained {
            c.out.clear();
            c.out_at = 0;
        }
        if drained == c.want_write {
            c.want_write = !drained;
            let ev = if drained { libc::EPOLLIN } else { libc::EPOLLIN | libc::EPOLLOUT };
            self.ctl(libc::EPOLL_CTL_MOD, idx, ev as u32);
        }
    }

    fn on_connected(&mut self, idx: usize) {
        let fd = self.clients[idx].fd;
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as u32;
        // SAFETY: getsockopt writes one int we own.
        unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, &mut err as *mut _ as *mut libc::c_void, &mut len)
        };
        if err != 0 {
            self.kill(idx);
            return;
        }
        let doc = &self.docs[self.clients[idx].doc];
        let addr = self.args.addr[0];
        let req = format!(
            "GET /ws/documents/{doc} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        self.clients[idx].state = State::Upgrading;
        self.send(idx, Some(req.as_bytes()));
    }

    fn on_readable(&mut self, idx: usize) {
        let fd = self.clients[idx].fd;
        let mut scratch = std::mem::take(&mut self.scratch);
        // SAFETY: recv(2) into our buffer; non-blocking socket.
        let n = unsafe { libc::recv(fd, scratch.as_mut_ptr() as *mut libc::c_void, scratch.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            self.read_at = self.now_ns();
            self.handle_bytes(idx, &scratch[..n as usize]);
        } else if n == 0 || errno() != libc::EAGAIN {
            self.kill(idx);
        }
        self.scratch = scratch;
    }

    fn handle_bytes(&mut self, idx: usize, data: &[u8]) {
        let mut pending = std::mem::take(&mut self.clients[idx].pending);
        let buf: &[u8] = if pending.is_empty() {
            data
        } else {
            pending.extend_from_slice(data);
            &pending
        };
        let mut pos = 0;
        if self.clients[idx].state == State::Upgrading {
            match buf.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(end) if buf.starts_with(b"HTTP/1.1 101") => {
                    // Like a browser, speak only after the 101 (tungstenite's
                    // server handshake refuses bytes sent behind the request).
                    self.clients[idx].state = State::AwaitAuth;
                    pos = end + 4;
                    let mut hello = Vec::with_capacity(64);
                    client_frame(&mut hello, format!(r#"{{"type":"authenticate","token":"u{idx}"}}"#).as_bytes());
                    client_frame(&mut hello, br#"{"type":"join_document"}"#);
                    self.send(idx, Some(&hello));
                }
                Some(_) => {
                    if self.failed < 3 {
                        eprintln!("upgrade refused: {}", String::from_utf8_lossy(&buf[..buf.len().min(200)]));
                    }
                    self.kill(idx);
                    return;
                }
                None => {
                    self.clients[idx].pending = buf.to_vec();
                    return;
                }
            }
        }
        let mut pongs = Vec::new();
        while let Some((op, range)) = next_frame(&buf[pos..]) {
            let payload = &buf[pos + range.start..pos + range.end];
            pos += range.end;
            match op {
                0x2 => self.broadcast(idx, payload),
                0x1 => self.reply(idx, payload),
                0x9 => {
                    pongs.push(0x8a);
                    pongs.push(0x80 | payload.len().min(125) as u8);
                    pongs.extend_from_slice(&[0, 0, 0, 0]);
                    pongs.extend_from_slice(&payload[..payload.len().min(125)]);
                }
                0x8 => {
                    self.kill(idx);
                    return;
                }
                _ => {}
            }
        }
        let rest = buf[pos..].to_vec();
        self.clients[idx].pending = rest;
        if !pongs.is_empty() {
            self.send(idx, Some(&pongs));
        }
    }

    fn broadcast(&mut self, idx: usize, json: &[u8]) {
        let Some((seq, sent_at)) = operation_fields(json) else { return }; // presence
        let c = &mut self.clients[idx];
        if c.next_seq != 0 {
            if seq < c.next_seq {
                self.stats.out_of_order += 1;
            } else if seq > c.next_seq && !c.is_sender && !c.lag_announced {
                self.stats.gaps += 1;
            }
        }
        c.lag_announced = false;
        c.next_seq = seq + 1;
        // Only operations sent inside the measurement window count, so the
        // delivery ratio compares like with like.
        if let Some(t) = sent_at {
            if t >= self.record_from && t < self.record_until {
                self.stats.deliveries += 1;
                let micros = self.read_at.saturating_sub(t) / 1000;
                let _ = self.latency.record(micros.max(1));
            }
        }
    }

    fn reply(&mut self, idx: usize, json: &[u8]) {
        if json.starts_with(br#"{"type":"ack""#)
            || json.starts_with(br#"{"client_op_id""#)
            || json.starts_with(br#"{"seq""#)
        {
            self.stats.acks += 1;
            let c = &mut self.clients[idx];
            c.outstanding = c.outstanding.saturating_sub(1);
            if let Some(t) = c.unacked.pop_front() {
                if t >= self.record_from && t < self.record_until {
                    self.window_acks += 1;
                    let micros = self.read_at.saturating_sub(t) / 1000;
                    let _ = self.ack_latency.record(micros.max(1));
                }
            }
            if self.sending && self.args.window.is_some() {
                self.send_ops(idx);
            }
            return;
        }
        let kind = |t: &[u8]| json.windows(t.len()).any(|w| w == t);
        let state = self.clients[idx].state;
        if kind(br#""lagged""#) {
            self.stats.lagged += 1;
            self.clients[idx].lag_announced = true;
        } else if state == State::AwaitAuth && kind(br#""auth_result""#) {
            self.clients[idx].state = State::AwaitJoin;
        } else if state == State::AwaitJoin && kind(br#""joined_document""#) {
            self.clients[idx].state = State::Streaming;
            self.ready += 1;
            self.connecting -= 1;
        } else if kind(br#""error""#) {
            self.stats.errors += 1;
            // A streaming sender sends only operations: an error answers one
            // of them in place of its ack, which is then never coming.
            if state == State::Streaming {
                self.clients[idx].unacked.pop_front();
            }
        }
    }

    /// Sends what is due: the window's free slots, or the open loop's
    /// operations due since the rate epoch (all in one write).
    fn send_ops(&mut self, idx: usize) {
        if !self.sending || self.clients[idx].state != State::Streaming {
            return;
        }
        let count = match self.args.window {
            Some(w) => w.saturating_sub(self.clients[idx].outstanding),
            None => {
                // The first operation is due at the sender's first turn (its
                // offset in the first period), not one period after it.
                let due = (self.rate_epoch.elapsed().as_secs_f64() * self.rate_per_sender) as u64 + 1;
                let c = &mut self.clients[idx];
                let n = due.saturating_sub(c.sent).min(4096);
                c.sent += n;
                n as usize
            }
        };
        if count == 0 {
            return;
        }
        let mut out = Vec::with_capacity(count * (self.args.payload + 80));
        for _ in 0..count {
            let t = self.now_ns();
            if t >= self.record_from && t < self.record_until {
                self.window_ops += 1;
            }
            self.clients[idx].unacked.push_back(t);
            self.payload.clear();
            let _ = write!(self.payload, r#"{{"type":"operation","payload":{{"t":{t}"#);
            self.payload.extend_from_slice(&self.pad);
            client_frame(&mut out, &self.payload);
        }
        self.stats.ops_sent += count as u64;
        self.clients[idx].outstanding += count;
        self.send(idx, Some(&out));
    }

    /// Starts (or changes) the load: every sender at `rate / senders` ops/s.
    fn start_sending(&mut self, rate: f64) {
        self.sending = true;
        self.rate_per_sender = rate / self.senders.len().max(1) as f64;
        self.rate_epoch = Instant::now();
        self.schedule.clear();
        let now = self.now_ns();
        let senders = self.senders.clone();
        for (i, idx) in senders.into_iter().enumerate() {
            self.clients[idx].sent = 0;
            if self.args.window.is_some() {
                self.send_ops(idx);
            } else {
                // Spread the senders' first operations over one period.
                let period = (1e9 / self.rate_per_sender.max(1e-9)) as u64;
                // Over the whole period, however long: capping the offsets
                // sent every sender past the cap at once (a burst of 4,375
                // operations at 625 ops/s over 5,000 senders).
                let offset = period.saturating_mul(i as u64) / self.senders.len().max(1) as u64;
                self.schedule.push(Reverse((now + offset, idx)));
            }
        }
    }

    fn stop_sending(&mut self) {
        self.sending = false;
        self.schedule.clear();
    }

    /// Runs the open-loop schedule: senders whose time has come send what
    /// is due and are scheduled again one period (at least 200 us) later.
    fn run_schedule(&mut self) -> Option<u64> {
        if !self.sending || self.args.window.is_some() {
            return None;
        }
        let period = ((1e9 / self.rate_per_sender.max(1e-9)) as u64).max(200_000);
        let now = self.now_ns();
        while let Some(&Reverse((due, idx))) = self.schedule.peek() {
            if due > now {
                return Some(due - now);
            }
            self.schedule.pop();
            self.send_ops(idx);
            self.schedule.push(Reverse((now + period, idx)));
        }
        None
    }

    /// The event loop, until `deadline` (or until `done` says so).
    fn poll_until(&mut self, deadline: Instant, mut done: impl FnMut(&Engine) -> bool) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        while Instant::now() < deadline && !done(self) {
            let next_send = self.run_schedule();
            let until_deadline = deadline.saturating_duration_since(Instant::now());
            let wait = next_send.map(Duration::from_nanos).unwrap_or(until_deadline).min(until_deadline);
            let timeout_ms = if wait.is_zero() { 0 } else { (wait.as_micros().div_ceil(1000)).min(100) as i32 };
            // SAFETY: epoll_wait fills up to events.len() entries of our buffer.
            let n = unsafe { libc::epoll_wait(self.epfd, events.as_mut_ptr(), events.len() as i32, timeout_ms) };
            for ev in events.iter().take(n.max(0) as usize) {
                let idx = ev.u64 as usize;
                let flags = ev.events;
                if self.clients[idx].state == State::Dead {
                    continue;
                }
                if self.clients[idx].state == State::Connecting {
                    if flags & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                        self.on_connected(idx);
                    }
                    continue;
                }
                if flags & libc::EPOLLOUT as u32 != 0 {
                    self.send(idx, None);
                }
                if flags & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                    self.on_readable(idx);
                }
            }
        }
    }

    /// Opens every client of `plan`, `concurrency` connections in flight at a
    /// time; returns how many joined and how long it took.
    fn open_clients(&mut self, plan: Vec<(usize, bool)>) -> (usize, f64) {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(120);
        let total = plan.len();
        let mut plan = plan.into_iter();
        let mut left = total;
        while Instant::now() < deadline && self.ready + self.failed < total {
            while self.connecting < self.args.concurrency && left > 0 {
                let Some((doc, is_sender)) = plan.next() else { break };
                left -= 1;
                self.open(doc, is_sender);
            }
            let target = self.ready + self.failed + 1;
            self.poll_until(Instant::now() + Duration::from_millis(50), |e| {
                e.ready + e.failed >= target && e.connecting < e.args.concurrency
            });
        }
        (self.ready, start.elapsed().as_secs_f64())
    }
}

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
    pids: Vec<String>,
    ticks: u64,
    at: Instant,
}

impl CpuMeter {
    fn start(pid: &str) -> Option<CpuMeter> {
        CpuMeter::start_all(&[pid.to_string()])
    }
    /// The CPU of several processes together; None when there are none.
    fn start_all(pids: &[String]) -> Option<CpuMeter> {
        if pids.is_empty() {
            return None;
        }
        let ticks = pids.iter().map(|p| proc_cpu_ticks(p)).sum::<Option<u64>>()?;
        Some(CpuMeter { pids: pids.to_vec(), ticks, at: Instant::now() })
    }
    fn of(pids: &[u32]) -> Option<CpuMeter> {
        CpuMeter::start_all(&pids.iter().map(|p| p.to_string()).collect::<Vec<_>>())
    }
    fn percent(&self) -> Option<f64> {
        let now = self.pids.iter().map(|p| proc_cpu_ticks(p)).sum::<Option<u64>>()?;
        Some((now - self.ticks) as f64 / clk_tck() / self.at.elapsed().as_secs_f64() * 100.0)
    }
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
    /// Operations sent in the window that were acknowledged, per second.
    ops_per_sec: f64,
    /// Acknowledged share of the operations sent in the window.
    ack_ratio: f64,
    ack_p50_us: u64,
    ack_p99_us: u64,
    ack_p999_us: u64,
    ack_max_us: u64,
    lagged: u64,
    gaps: u64,
    out_of_order: u64,
    relay_cpu: Option<f64>,
    /// The Redis server's CPU (`--redis-pid`).
    redis_cpu: Option<f64>,
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
            r#"{{"rate":{:.0},"ops":{},"acks":{},"deliveries":{},"expected":{},"delivery_ratio":{:.4},"deliveries_per_sec":{:.0},"p50_us":{},"p99_us":{},"p999_us":{},"max_us":{},"ops_per_sec":{:.0},"ack_ratio":{:.4},"ack_p50_us":{},"ack_p99_us":{},"ack_p999_us":{},"ack_max_us":{},"lagged":{},"gaps":{},"out_of_order":{},"relay_cpu_pct":{},"redis_cpu_pct":{},"load_cpu_pct":{},"relay_cpus_busy_pct":{},"load_cpu_busy_pct":{},"secs":{:.2}}}"#,
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
            self.ops_per_sec,
            self.ack_ratio,
            self.ack_p50_us,
            self.ack_p99_us,
            self.ack_p999_us,
            self.ack_max_us,
            self.lagged,
            self.gaps,
            self.out_of_order,
            opt(self.relay_cpu),
            opt(self.redis_cpu),
            opt(self.load_cpu),
            opt(self.relay_busy),
            opt(self.load_busy),
            self.secs
        )
    }

    fn row(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}%"));
        format!(
            "{:>10.0} {:>12.0} {:>8.2}% {:>9} {:>9} {:>9} {:>9} {:>7} {:>5} {:>7} {:>7} {:>7} {:>7} {:>10.0} {:>11} {:>11} {:>12}",
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
            opt(self.load_busy),
            self.ops_per_sec,
            self.ack_p50_us,
            self.ack_p99_us,
            self.ack_p999_us
        )
    }
}

const HEADER: &str =
    "      rate deliveries/s delivered   p50(us)   p99(us) p99.9(us)   max(us)  lagged  gaps   relay    load";
/// Width of a row up to the ack columns, which the header's are padded to.
const HEADER_WIDTH: usize = 119;

/// The table's header: the delivery columns, then the ack columns.
fn header() -> String {
    format!("{HEADER:<HEADER_WIDTH$} {:>10} {:>11} {:>11} {:>12}", "ops/s", "ack50(us)", "ack99(us)", "ack99.9(us)")
}

fn write_json(path: &std::path::Path, json: &str) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(path, json) {
        eprintln!("cannot write {}: {e}", path.display());
    }
}

// ---------------------------------------------------------------------------
// Modes.

fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
}

/// Runs load at `rate` (or the window) for warm-up + duration, stops, waits
/// for stragglers, and measures.
/// Polls until no delivery has arrived for `quiet` (at most `limit`): the
/// relay's and the sockets' queues are empty again after an overloaded step.
fn drain(e: &mut Engine, quiet: Duration, limit: Duration) {
    let end = Instant::now() + limit;
    loop {
        let before = e.stats.deliveries;
        e.poll_until((Instant::now() + quiet).min(end), |_| false);
        if e.stats.deliveries == before || Instant::now() >= end {
            return;
        }
    }
}

fn measure(e: &mut Engine, rate: f64, per_op_fanout: u64) -> Step {
    let (warmup, duration) = (e.args.warmup, e.args.duration);
    e.record_from = u64::MAX;
    e.record_until = u64::MAX;
    e.start_sending(rate);
    e.poll_until(Instant::now() + Duration::from_secs_f64(warmup), |_| false);
    let (acks0, del0, lag0, gap0, ooo0) =
        (e.stats.acks, e.stats.deliveries, e.stats.lagged, e.stats.gaps, e.stats.out_of_order);
    e.latency.reset();
    e.ack_latency.reset();
    e.window_ops = 0;
    e.window_acks = 0;
    e.record_from = e.now_ns();
    let relay = CpuMeter::of(&e.args.relay_pid);
    let redis = e.args.redis_pid.and_then(|p| CpuMeter::of(&[p]));
    let me = CpuMeter::start("self");
    let relay_busy = BusyMeter::start(&e.args.relay_cpus);
    let load_busy = e.args.cpu.and_then(|c| BusyMeter::start(&[c]));
    let start = Instant::now();
    e.poll_until(start + Duration::from_secs_f64(duration), |_| false);
    e.record_until = e.now_ns();
    let secs = start.elapsed().as_secs_f64();
    let relay_cpu = relay.and_then(|m| m.percent());
    let redis_cpu = redis.and_then(|m| m.percent());
    let load_cpu = me.and_then(|m| m.percent());
    let relay_busy = relay_busy.and_then(|m| m.percent());
    let load_busy = load_busy.and_then(|m| m.percent());
    e.stop_sending();
    let ops = e.window_ops;
    let expected = ops * per_op_fanout;
    // Stragglers: deliveries and acks of operations sent in the window.
    let settled = |e: &Engine| e.stats.deliveries - del0 >= expected && e.window_acks >= ops;
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle {
        let before = (e.stats.deliveries, e.window_acks);
        e.poll_until(Instant::now() + Duration::from_millis(300), settled);
        if settled(e) || (e.stats.deliveries, e.window_acks) == before {
            break;
        }
    }
    let deliveries = e.stats.deliveries - del0;
    let h = &e.latency;
    let a = &e.ack_latency;
    Step {
        rate,
        ops,
        acks: e.stats.acks - acks0,
        deliveries,
        expected,
        delivery_ratio: if expected == 0 { 1.0 } else { deliveries as f64 / expected as f64 },
        deliveries_per_sec: deliveries as f64 / secs,
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        ops_per_sec: e.window_acks as f64 / secs,
        ack_ratio: if ops == 0 { 1.0 } else { e.window_acks as f64 / ops as f64 },
        ack_p50_us: a.value_at_quantile(0.5),
        ack_p99_us: a.value_at_quantile(0.99),
        ack_p999_us: a.value_at_quantile(0.999),
        ack_max_us: a.max(),
        lagged: e.stats.lagged - lag0,
        gaps: e.stats.gaps - gap0,
        out_of_order: e.stats.out_of_order - ooo0,
        relay_cpu,
        redis_cpu,
        load_cpu,
        relay_busy,
        load_busy,
        secs,
    }
}

fn run_mode(args: Args) {
    let mut e = Engine::new(args.clone());
    e.docs = (0..args.docs).map(|d| format!("{}-{d}", args.doc_prefix)).collect();
    let mut plan = Vec::new();
    for d in 0..args.docs {
        plan.extend(std::iter::repeat_n((d, false), args.subs));
        plan.extend(std::iter::repeat_n((d, true), args.senders));
    }
    let clients = plan.len();
    let fanout = (args.subs + args.senders).saturating_sub(1) as u64;
    let (ready, secs) = e.open_clients(plan);
    let conn_rate = ready as f64 / secs;
    eprintln!(
        "{}: {ready}/{clients} clients joined in {secs:.2} s ({conn_rate:.0}/s); {} documents × ({} subscribers + {} senders), payload {} B",
        args.label, args.docs, args.subs, args.senders, args.payload
    );
    if ready < clients {
        eprintln!("warning: {} clients failed to join", clients - ready);
    }
    println!("{}", header());
    let mut steps = Vec::new();
    let mut best: Option<Step> = None;
    if args.find_max {
        let held = |step: &Step| {
            step.delivery_ratio >= args.min_delivery
                && (step.p99_us as f64) <= args.max_p99_ms * 1000.0
                && args
                    .max_ack_p99_ms
                    .is_none_or(|ms| step.ack_ratio >= args.min_delivery && (step.ack_p99_us as f64) <= ms * 1000.0)
        };
        // Measures a rate, again up to --confirm times while it fails.
        let try_rate = |e: &mut _, rate: f64, steps: &mut Vec<Step>| {
            let mut tries = 0;
            loop {
                let step = measure(e, rate, fanout);
                println!("{}", step.row());
                steps.push(step.clone());
                if held(&step) || tries == args.confirm {
                    return step;
                }
                tries += 1;
                drain(e, Duration::from_millis(500), Duration::from_secs(10));
            }
        };
        let mut rate = args.rate.unwrap_or(1000.0);
        let mut failed_at = None;
        loop {
            let step = try_rate(&mut e, rate, &mut steps);
            if !held(&step) {
                failed_at = Some(rate);
                break;
            }
            best = Some(step);
            rate *= args.step;
            if rate > args.max_rate {
                break;
            }
            // Let queues drain between steps.
            e.poll_until(Instant::now() + Duration::from_millis(300), |_| false);
        }
        if let (Some(mut high), Some(mut low)) = (failed_at, best.as_ref().map(|b| b.rate)) {
            for _ in 0..args.refine {
                // The failed step may have left a backlog; the next one must
                // not inherit its latency.
                drain(&mut e, Duration::from_millis(500), Duration::from_secs(10));
                let mid = (low * high).sqrt();
                let step = try_rate(&mut e, mid, &mut steps);
                if held(&step) {
                    low = mid;
                    best = Some(step);
                } else {
                    high = mid;
                }
            }
        }
    } else {
        let rate = args.rate.unwrap_or(1000.0);
        let step = measure(&mut e, rate, fanout);
        println!("{}", step.row());
        steps.push(step.clone());
        best = Some(step);
    }
    let criteria = format!(
        "delivery >= {:.0}%, p99 <= {} ms{}",
        args.min_delivery * 100.0,
        args.max_p99_ms,
        args.max_ack_p99_ms.map_or(String::new(), |ms| format!(", ack p99 <= {ms} ms"))
    );
    match &best {
        Some(b) if args.find_max => {
            println!(
                "{}: max sustained rate {:.0} ops/s = {:.0} deliveries/s, p99 {} us ({criteria})",
                args.label, b.rate, b.deliveries_per_sec, b.p99_us
            );
            println!(
                "{}: acks at that rate: {:.0} ops/s acknowledged ({:.2}%), ack p50 {} us, p99 {} us, p99.9 {} us",
                args.label,
                b.ops_per_sec,
                b.ack_ratio * 100.0,
                b.ack_p50_us,
                b.ack_p99_us,
                b.ack_p999_us
            );
        }
        None => println!("{}: no rate held ({criteria})", args.label),
        _ => {}
    }
    if let Some(path) = &args.json {
        let steps_json: Vec<String> = steps.iter().map(Step::json).collect();
        let best_json = best.as_ref().map_or("null".to_string(), Step::json);
        let json = format!(
            r#"{{"label":"{}","mode":"run","docs":{},"subs":{},"senders":{},"payload":{},"clients":{},"joined":{},"connections_per_sec":{:.0},"find_max":{},"max_ack_p99_ms":{},"best":{},"steps":[{}]}}"#,
            args.label,
            args.docs,
            args.subs,
            args.senders,
            args.payload,
            clients,
            ready,
            conn_rate,
            args.find_max,
            args.max_ack_p99_ms.map_or("null".to_string(), |ms| ms.to_string()),
            best_json,
            steps_json.join(",")
        );
        write_json(path, &json);
    }
}

/// `--connections` reading clients, five per document (storm and idle).
fn reader_plan(e: &mut Engine) -> Vec<(usize, bool)> {
    let (n, per_doc) = (e.args.connections, 5);
    e.docs = (0..n.div_ceil(per_doc)).map(|d| format!("{}-{d}", e.args.doc_prefix)).collect();
    (0..n).map(|i| (i / per_doc, false)).collect()
}

/// Connects `--connections` clients (authenticate + join) as fast as possible.
fn storm_mode(args: Args) {
    let mut e = Engine::new(args.clone());
    let plan = reader_plan(&mut e);
    let relay = CpuMeter::of(&args.relay_pid);
    let relay_busy = BusyMeter::start(&args.relay_cpus);
    let (ready, secs) = e.open_clients(plan);
    let relay_cpu = relay.and_then(|m| m.percent());
    let relay_busy = relay_busy.and_then(|m| m.percent());
    let rate = ready as f64 / secs;
    let pct = |v: Option<f64>| v.map_or("-".into(), |c| format!("{c:.0}%"));
    println!(
        "{}: {ready}/{} sessions connected, authenticated and joined in {secs:.3} s = {rate:.0} sessions/s (server process CPU {}, server CPUs busy {})",
        args.label,
        args.connections,
        pct(relay_cpu),
        pct(relay_busy)
    );
    if let Some(path) = &args.json {
        let num = |v: Option<f64>| v.map_or("null".into(), |c| format!("{c:.1}"));
        let json = format!(
            r#"{{"label":"{}","mode":"storm","connections":{},"joined":{ready},"secs":{secs:.3},"sessions_per_sec":{rate:.0},"relay_cpu_pct":{},"relay_cpus_busy_pct":{}}}"#,
            args.label,
            args.connections,
            num(relay_cpu),
            num(relay_busy)
        );
        write_json(path, &json);
    }
    if ready < args.connections {
        std::process::exit(1);
    }
}

/// Holds `--connections` joined idle clients and reports the relay's RSS
/// growth per connection.
fn idle_mode(args: Args) {
    let Some(&pid) = args.relay_pid.first() else {
        eprintln!("--mode idle needs --relay-pid");
        std::process::exit(2);
    };
    let mut e = Engine::new(args.clone());
    let before = proc_rss_kib(pid).unwrap_or(0);
    let plan = reader_plan(&mut e);
    let (ready, secs) = e.open_clients(plan);
    e.poll_until(Instant::now() + Duration::from_secs(1), |_| false);
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

#[cfg(test)]
mod tests {
    use super::{header, operation_fields, Step};

    #[test]
    fn the_headers_columns_line_up_with_a_rows() {
        let row = Step { rate: 1000.0, ops_per_sec: 1000.0, ..Step::default() }.row();
        assert_eq!(header().len(), row.len());
        assert!(header().ends_with("ack99.9(us)"));
    }

    #[test]
    fn reads_the_relays_layout_and_other_key_orders() {
        let relay =
            br#"{"type":"operation","seq":42,"connection_id":7,"user_id":"u\"{x","payload":{"t":123456,"pad":"{"}}"#;
        // A `{` inside a string before the payload is not the payload: the
        // search fallback still finds `t`.
        assert_eq!(operation_fields(relay), Some((42, Some(123456))));
        let plain = br#"{"type":"operation","seq":9,"connection_id":1,"user_id":"u","payload":{"t":77}}"#;
        assert_eq!(operation_fields(plain), Some((9, Some(77))));
        let reordered = br#"{"seq":5,"payload":{"t":88},"type":"operation"}"#;
        assert_eq!(operation_fields(reordered), Some((5, Some(88))));
        let no_time = br#"{"type":"operation","seq":3,"payload":{"x":1}}"#;
        assert_eq!(operation_fields(no_time), Some((3, None)));
        assert_eq!(operation_fields(br#"{"type":"user_joined","connection_id":2}"#), None);
        assert_eq!(operation_fields(br#"{"type":"operation","seq":}"#), None);
    }
}

//! Hardening of the relay's front door (`docs/protocol.md`, "Endpoints",
//! "Frames" and "Close codes"): requests a proxy and the relay could frame
//! differently, a 64-bit frame length with its top bit set, clients that
//! arrive when the relay has no file descriptor left, and `/metrics` on a
//! separate address (`metrics.listen`).
//!
//! Malformed input goes through raw sockets; the open-file limit through the
//! real binary started with a low `RLIMIT_NOFILE`.

mod common;
use common::*;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_docrelay");

/// Generous bound for an answer or a start: this is not a speed test.
const PATIENCE: Duration = Duration::from_secs(20);

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// What the relay answered to one raw request.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
    /// The relay ended the connection after its answer.
    closed: bool,
}

/// Sends `request` on a new connection and reads until the relay closes it
/// (or [`PATIENCE`] passes: then `closed` is false). A reset after the
/// answer counts as closed: a relay that answers 503 before it reads the
/// request resets a request that arrives after its close.
fn exchange(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = s.write_all(request);
    let mut raw = Vec::new();
    let closed = match s.read_to_end(&mut raw) {
        Ok(_) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
    };
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head in {text:?}"));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Answer { status, head: head.to_string(), body: body.to_string(), closed }
}

/// An upgrade request to `/ws/documents/{doc}` with `extra` header lines
/// added after the usual ones.
fn upgrade_plus(doc: &str, extra: &str) -> String {
    format!(
        "GET /ws/documents/{doc} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

// ---------------------------------------------------------------------------
// HTTP strictness

/// Each of these could be read one way by a proxy in front and another way by
/// the relay (or smuggle a body in as WebSocket frames): 400, a short
/// explanation, and the connection closed; never a 101.
#[test]
fn ambiguous_requests_get_400_and_are_closed() {
    let relay = relay(config());
    let addr = relay.local_addr();
    // A masked Text frame `{"type":"ping"}`, sent as the "body".
    let frame = client_frame(true, 0x1, br#"{"type":"ping"}"#);
    let frame_len = frame.len();
    let cases: Vec<(&str, String)> = vec![
        ("two keys", upgrade_plus("d1", "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n")),
        ("the same key twice", upgrade_plus("d1", &format!("Sec-WebSocket-Key: {KEY}\r\n"))),
        ("two versions", upgrade_plus("d1", "Sec-WebSocket-Version: 8\r\n")),
        ("Upgrade: h2c beside Upgrade: websocket", upgrade_plus("d1", "Upgrade: h2c\r\n")),
        ("two Hosts", upgrade_plus("d1", "Host: other\r\n")),
        ("a body by Content-Length", upgrade_plus("d1", &format!("Content-Length: {frame_len}\r\n"))),
        (
            "conflicting Content-Lengths",
            upgrade_plus("d1", &format!("Content-Length: 0\r\nContent-Length: {frame_len}\r\n")),
        ),
        ("a chunked body", upgrade_plus("d1", "Transfer-Encoding: chunked\r\n")),
        (
            "Transfer-Encoding and Content-Length",
            upgrade_plus("d1", "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n"),
        ),
        ("/healthz with a body", "GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\n".into()),
        (
            "/metrics with Transfer-Encoding",
            "GET /metrics HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
        ),
        ("HEAD /healthz with two Hosts over HTTP/1.0", "HEAD /healthz HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n".into()),
    ];
    for (what, head) in &cases {
        let mut request = head.clone().into_bytes();
        request.extend_from_slice(&frame);
        let a = exchange(addr, &request);
        assert_eq!(a.status, 400, "{what}: {a:?}");
        assert!(a.closed, "{what}: the connection stays open after the 400: {a:?}");
        assert!(!a.body.is_empty() && a.body.len() < 200, "{what}: a short explanation: {a:?}");
        assert!(a.head.contains("\r\nConnection: close"), "{what}: {a:?}");
    }
    assert_eq!(metric(addr, "docrelay_active_connections"), 0, "none of them was upgraded");
    // Good requests are unchanged: a body of length 0 is no body, and
    // Connection may be split over two lines.
    let mut ws = {
        let (mut s, mut pending) = raw_upgrade(addr, "/ws/documents/d1");
        raw_assert_pong(&mut s, &mut pending);
        s
    };
    for extra in ["Content-Length: 0\r\n", ""] {
        let head = upgrade_plus("d2", extra)
            .replace("Connection: Upgrade\r\n", "Connection: keep-alive\r\nConnection: Upgrade\r\n");
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 101 "), "{extra:?}: {}", String::from_utf8_lossy(&buf[..n]));
    }
    let a = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!((a.status, a.body.as_str()), (200, "ok"), "{a:?}");
    // The session opened meanwhile still works.
    let mut pending = Vec::new();
    raw_assert_pong(&mut ws, &mut pending);
}

// ---------------------------------------------------------------------------
// The 64-bit frame length

/// RFC 6455 5.2: the most significant bit of a 64-bit payload length must be
/// 0. A header with it set is a protocol error (1002), not a message that is
/// too big (1009); other sessions go on.
#[test]
fn a_64_bit_length_with_its_top_bit_set_closes_with_1002() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let mut other = connect(addr, "/ws/documents/bystander");
    for len in [1u64 << 63, u64::MAX] {
        let (mut s, mut pending) = raw_upgrade(addr, "/ws/documents/msb");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        raw_assert_pong(&mut s, &mut pending);
        // FIN + Binary, masked, length 127: the 8-byte length, then the mask.
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        s.write_all(&header).unwrap();
        let (op, payload) = read_frame(&mut s, &mut pending).expect("a Close frame");
        assert_eq!(op, 0x8, "{len:#x}: expected a Close, got {op:#x} {payload:?}");
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
        assert_eq!((code, reason.as_str()), (1002, "frame length with the most significant bit set"), "{len:#x}");
        // The relay's side ends after the Close (the client need not answer).
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    assert_pong(&mut other);
}

// ---------------------------------------------------------------------------
// A relay process

/// A `docrelay serve` process, killed when dropped; its stderr is collected on
/// a thread.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        cmd.env_remove("RUST_LOG").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("docrelay starts");
        let (log, lines) = collect_stderr(&mut child);
        Proc { child, lines, log }
    }

    fn stderr(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the next log line that contains `marker` followed by an
    /// address, and returns the address.
    fn address_after(&self, marker: &str) -> SocketAddr {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(rest) = line.split(marker).nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        return addr.parse().unwrap_or_else(|_| panic!("no address in {line:?}"));
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no `{marker}` line; stderr:\n{}", self.stderr()),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("docrelay ended without a `{marker}` line; stderr:\n{}", self.stderr())
                }
            }
        }
    }

    /// Kills the process and returns its whole log, checking it did not panic.
    fn finish(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader thread sees the end of the pipe and collects the rest.
        while self.lines.recv_timeout(Duration::from_secs(5)).is_ok() {}
        let log = self.stderr();
        assert!(!log.contains("panicked"), "docrelay panicked:\n{log}");
        log
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The open-file limit

/// How a client that completed its request at the open-file limit was
/// answered; anything else (silence, a bare reset or end after the 101) fails.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// `503 Service Unavailable` with `Retry-After: 1`, then the end.
    Unavailable,
    /// `101`, then a Close frame with this code.
    Closed(u16),
    /// `101` and a working session (a descriptor was free after all).
    Served,
}

/// Sends an upgrade request on `s` and classifies the answer; panics on a
/// hang or on a connection that ends after the 101 without a Close.
fn probe(mut s: TcpStream, doc: &str) -> Outcome {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    // The relay may answer 503 and close before the request arrives: the
    // write may then fail, the answer is still there to read.
    let _ = s.write_all(upgrade_request(&format!("/ws/documents/{doc}")).as_bytes());
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) => panic!("{doc}: the connection ended without an answer (got {:?})", String::from_utf8_lossy(&buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{doc}: no answer within {PATIENCE:?} (got {:?})", String::from_utf8_lossy(&buf))
            }
            Err(e) => panic!("{doc}: {e} before an answer (got {:?})", String::from_utf8_lossy(&buf)),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    if head.starts_with("HTTP/1.1 503 Service Unavailable\r\n") {
        assert!(head.contains("\r\nRetry-After: 1\r\n") && head.contains("\r\nConnection: close\r\n"), "{head}");
        // Then the end (a reset is fine: the request may have come after the close).
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        return Outcome::Unavailable;
    }
    assert!(head.starts_with("HTTP/1.1 101 "), "{doc}: unexpected answer {head:?}");
    let mut pending = buf[end..].to_vec();
    let _ = s.write_all(&client_frame(true, 0x1, br#"{"type":"ping"}"#));
    match read_frame(&mut s, &mut pending) {
        Some((0x8, payload)) => {
            assert!(payload.len() >= 2, "{doc}: a Close without a code");
            Outcome::Closed(u16::from_be_bytes([payload[0], payload[1]]))
        }
        Some((0x1, payload)) if payload == br#"{"type":"pong"}"# => Outcome::Served,
        Some(other) => panic!("{doc}: unexpected frame after the 101: {other:?}"),
        None => panic!("{doc}: the connection ended (or went silent) after the 101 without a Close frame"),
    }
}

/// A relay started with few file descriptors (`ulimit -n` 320, so
/// `limits.max_connections` is derived as 64) is flooded with idle TCP
/// connections until it has no descriptor left. Every client that arrives
/// then gets an answer at once: 503, or after a 101 a Close frame with a
/// code; none hangs in the backlog. The log reports it a few times, not
/// for every accept; the refusals are counted; once the flood leaves, the
/// relay serves `/healthz`, its old session and new ones again.
#[test]
fn at_the_open_file_limit_clients_get_503_or_a_close_never_a_hang() {
    const FILES: libc::rlim_t = 320;
    const FLOOD: usize = 384;
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes one rlimit struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
    if old.rlim_cur < 2048 {
        eprintln!("skipped: this test opens about {} sockets itself; ulimit -n is {}", FLOOD + 100, old.rlim_cur);
        return;
    }
    let dir = TempDir::new("fd-limit");
    // A long handshake timeout: the idle connections keep their descriptors.
    let config = dir.file("relay.toml", "listen = \"127.0.0.1:0\"\n[limits]\nhandshake_timeout_ms = 120000\n");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config", &config]);
    let limited = libc::rlimit { rlim_cur: FILES, rlim_max: FILES };
    let set_limit = move || -> std::io::Result<()> {
        // SAFETY: setrlimit(2) reads one rlimit struct owned by this closure;
        // it is async-signal-safe, so it may run between fork and exec.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limited) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and only calls
    // setrlimit(2), which is async-signal-safe; it allocates nothing and
    // takes no lock.
    unsafe { cmd.pre_exec(set_limit) };
    let proc = Proc::spawn(cmd);
    let addr = proc.address_after("listening on ");
    assert!(proc.stderr().contains("max_connections=64"), "derived from the limit:\n{}", proc.stderr());

    let mut session = connect(addr, "/ws/documents/before-the-flood");
    let auth = request(&mut session, r#"{"type":"authenticate","token":"ada"}"#);
    assert_eq!(auth["success"], true, "{auth}");
    assert_eq!(request(&mut session, r#"{"type":"join_document"}"#)["type"], "joined_document");
    let started = Instant::now();

    // The flood: idle connections that send nothing. The relay can hold at
    // most FILES of them, so at least FLOOD - FILES are answered 503.
    let flood: Vec<TcpStream> = (0..FLOOD).map(|_| TcpStream::connect(addr).expect("connect")).collect();
    for s in &flood {
        s.set_nonblocking(true).unwrap();
    }
    let mut answered = vec![Vec::new(); FLOOD];
    let mut ended = vec![false; FLOOD];
    let scan = |answered: &mut Vec<Vec<u8>>, ended: &mut Vec<bool>| {
        for (i, mut s) in flood.iter().enumerate() {
            let mut chunk = [0u8; 1024];
            while !ended[i] {
                match s.read(&mut chunk) {
                    Ok(0) => ended[i] = true,
                    Ok(n) => answered[i].extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("flood connection {i}: {e} (after {:?})", String::from_utf8_lossy(&answered[i])),
                }
            }
        }
        ended.iter().filter(|e| **e).count()
    };
    let deadline = Instant::now() + PATIENCE;
    while scan(&mut answered, &mut ended) < FLOOD - FILES as usize {
        assert!(Instant::now() < deadline, "idle connections beyond the limit were not answered: the backlog hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
    // An answer whose end had not arrived yet at the last look: wait for it.
    for (i, mut s) in flood.iter().enumerate() {
        if !answered[i].is_empty() && !ended[i] {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            ended[i] = s.read_to_end(&mut answered[i]).is_ok();
        }
    }
    let refused = ended.iter().filter(|e| **e).count();
    for (i, bytes) in answered.iter().enumerate() {
        let text = String::from_utf8_lossy(bytes);
        assert_eq!(ended[i], !bytes.is_empty(), "flood connection {i}: {text:?}");
        if ended[i] {
            assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "flood connection {i}: {text:?}");
        }
    }

    // Clients that arrive now, with a whole request: each one is answered.
    let mut outcomes = Vec::new();
    for i in 0..12 {
        let outcome = probe(TcpStream::connect(addr).unwrap(), &format!("probe-{i}"));
        if let Outcome::Closed(code) = outcome {
            assert_eq!(code, 4029, "probe-{i}: only `relay full` closes after the 101");
        }
        outcomes.push(outcome);
    }
    assert!(outcomes.contains(&Outcome::Unavailable), "no probe was answered 503: {outcomes:?}");
    let health = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(health.closed && (health.status == 503 || health.status == 200), "{health:?}");

    // The flood leaves: the relay serves again, its old session included.
    drop(flood);
    eventually("/healthz answers 200 again", || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out.starts_with(b"HTTP/1.1 200 ")
    });
    eprintln!(
        "{refused} of {FLOOD} idle connections answered 503; probes: {outcomes:?}; flood, probes and recovery took {:?}",
        started.elapsed()
    );
    assert_pong(&mut session);
    for doc in ["after-0", "after-1", "after-2", "after-3"] {
        let mut ws = connect(addr, &format!("/ws/documents/{doc}"));
        assert_pong(&mut ws);
    }
    let fd_refusals = metric(addr, "docrelay_connections_refused_total{reason=\"fd_limit\"}");
    let unavailable = outcomes.iter().filter(|o| **o == Outcome::Unavailable).count();
    assert!(
        fd_refusals >= (refused + unavailable) as u64,
        "{fd_refusals} counted, {refused} idle connections and {unavailable} probes answered 503"
    );
    drop(session);

    let log = proc.finish();
    let accept_warnings = log.lines().filter(|l| l.contains("accept failed")).count();
    let handoff_warnings = log.lines().filter(|l| l.contains("cannot hand off")).count();
    assert!(accept_warnings >= 1, "the refusals are reported:\n{log}");
    assert!(accept_warnings <= 6 && handoff_warnings <= 6, "the accept failures flood the log:\n{log}");
}

// ---------------------------------------------------------------------------
// metrics.listen

/// With `metrics.listen`, `/metrics` (GET and HEAD) and `/healthz` are served
/// there; the main address answers `/metrics` with 404 and serves the rest as
/// before; the WebSocket routes are 404 on the metrics address.
#[test]
fn metrics_on_their_own_address() {
    let mut c = config();
    c.metrics.listen = "127.0.0.1:0".into();
    // Not the common guard: it reads /metrics on the main address.
    let relay = docrelay::start(c, Default::default()).expect("relay starts");
    let (main, metrics) = (relay.local_addr(), relay.metrics_addr().expect("a metrics address"));
    assert_ne!(main.port(), metrics.port());
    let mut ws = connect(main, "/ws/documents/m1");
    assert_pong(&mut ws);

    let get = exchange(metrics, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(get.status, 200, "{get:?}");
    assert!(get.head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{get:?}");
    assert!(get.body.contains("\ndocrelay_active_connections 1\n"), "{}", get.body);
    assert!(get.body.contains("docrelay_connections_refused_total{reason=\"fd_limit\"} 0\n"), "{}", get.body);
    let head = exchange(metrics, b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((head.status, head.body.as_str()), (200, ""), "{head:?}");
    let health = exchange(metrics, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((health.status, health.body.as_str()), (200, "ok"), "{health:?}");
    let upgrade = exchange(metrics, upgrade_request("/ws/documents/m1").as_bytes());
    assert_eq!(upgrade.status, 404, "{upgrade:?}");

    let not_here = exchange(main, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(not_here.status, 404, "{not_here:?}");
    let not_here = exchange(main, b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(not_here.status, 404, "{not_here:?}");
    let health = exchange(main, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((health.status, health.body.as_str()), (200, "ok"), "{health:?}");
    assert_pong(&mut ws);
    drop(ws);
    relay.shutdown();
    relay.join();
}

/// The binary reports the metrics address in its log, after the main
/// `listening on` line; a metrics address in use is a clear start error.
#[test]
fn metrics_listen_is_logged_and_an_address_in_use_fails_the_start() {
    let dir = TempDir::new("metrics-listen");
    let config = dir.file("relay.toml", "listen = \"127.0.0.1:0\"\ncores = [0]\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config", &config]);
    let proc = Proc::spawn(cmd);
    let main = proc.address_after("listening on ");
    let metrics = proc.address_after("metrics listening on ");
    assert_ne!(main, metrics);
    let get = exchange(metrics, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(get.status == 200 && get.body.contains("docrelay_active_connections 0\n"), "{get:?}");
    assert_eq!(exchange(main, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").status, 404);
    let log = proc.finish();
    let main_line = log.lines().position(|l| l.contains("listening on") && !l.contains("metrics listening on"));
    let metrics_line = log.lines().position(|l| l.contains("metrics listening on"));
    assert!(main_line < metrics_line, "the main line comes first:\n{log}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = common::config();
    c.metrics.listen = taken.local_addr().unwrap().to_string();
    let err = docrelay::start(c, Default::default()).err().expect("the start fails");
    let text = err.to_string();
    assert!(text.contains("metrics.listen") && text.contains(&taken.local_addr().unwrap().to_string()), "{text}");
    assert!(matches!(err, docrelay::StartError::MetricsListen { .. }), "{err:?}");
}

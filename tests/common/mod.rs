//! Shared helpers for the end-to-end tests: a relay on an ephemeral port
//! behind a guard that checks every session ended, WebSocket clients
//! (tungstenite), raw sockets, /metrics scraping and temporary directories.
#![allow(dead_code)]

pub mod redis;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use docrelay::{Config, RelayHandle, RelayOptions};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

pub type Client = WebSocket<MaybeTlsStream<TcpStream>>;

/// A test configuration: port 0, every CPU (2 on CI), short timeouts where a
/// test does not set its own.
pub fn config() -> Config {
    Config { listen: "127.0.0.1:0".parse().unwrap(), ..Config::default() }
}

// ---------------------------------------------------------------------------
// The relay

/// The relay of one test; derefs to its [`RelayHandle`].
///
/// Dropping it checks that the relay has seen every connection of the test go
/// (the test's clients, declared after the relay, are dropped before it): it
/// waits, bounded, until `docrelay_active_connections` and the
/// `docrelay_sessions` of every core are 0, and fails the test if they are
/// not. Then it shuts the relay down normally. While the test is already
/// failing it only shuts the relay down (which is bounded by
/// `limits.shutdown_grace_ms`).
pub struct Relay(Option<RelayHandle>);

impl Relay {
    /// The handle itself, for a test that shuts the relay down on its own
    /// (while its sessions are still open); the guard checks nothing then.
    pub fn into_handle(mut self) -> RelayHandle {
        self.0.take().expect("relay running")
    }
}

impl std::ops::Deref for Relay {
    type Target = RelayHandle;
    fn deref(&self) -> &RelayHandle {
        self.0.as_ref().expect("relay running")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let Some(handle) = self.0.take() else { return };
        if !std::thread::panicking() {
            let (addr, cores) = (handle.local_addr(), handle.cpus().len());
            // A panic here drops `handle` on the way out: the relay still
            // shuts down.
            eventually("every connection and session of the test ended before the relay's shutdown", || {
                metric(addr, "docrelay_active_connections") == 0 && metric_sum(addr, "docrelay_sessions", cores) == 0
            });
        }
        drop(handle);
    }
}

/// Starts a relay with the default options.
pub fn relay(config: Config) -> Relay {
    relay_with(config, RelayOptions::default())
}

/// Starts a relay with `options` (a validator, a manual clock).
pub fn relay_with(config: Config, options: RelayOptions) -> Relay {
    Relay(Some(docrelay::start(config, options).expect("relay starts")))
}

// ---------------------------------------------------------------------------
// WebSocket clients

/// Opens a WebSocket session on `/ws/documents/{doc}` (with an optional query).
pub fn connect(addr: SocketAddr, path_and_query: &str) -> Client {
    let url = format!("ws://{addr}{path_and_query}");
    // The handshake too is bounded: a relay that never answers the upgrade
    // fails the test instead of hanging it.
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("tcp connects");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let (ws, resp) = tungstenite::client(url, MaybeTlsStream::Plain(stream)).expect("websocket connects");
    assert_eq!(resp.status(), 101);
    set_timeout(&ws, Duration::from_secs(10));
    ws
}

pub fn set_timeout(ws: &Client, t: Duration) {
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(t)).unwrap();
    }
}

/// Reads the next data message (Ping/Pong frames are skipped), as text.
pub fn next_text(ws: &mut Client) -> String {
    loop {
        match ws.read().expect("a message") {
            Message::Text(t) => return t.to_string(),
            Message::Binary(b) => return String::from_utf8(b.to_vec()).expect("utf-8"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a data message, got {other:?}"),
        }
    }
}

/// Sends a JSON text message and returns the parsed reply.
pub fn request(ws: &mut Client, json: &str) -> serde_json::Value {
    ws.send(Message::text(json)).expect("send");
    serde_json::from_str(&next_text(ws)).expect("reply is JSON")
}

/// Sends `{"type":"ping"}` and asserts that the very next data message is
/// the relay's `{"type":"pong"}` in a Text frame: the session is open and
/// has nothing else queued for the client.
#[track_caller]
pub fn assert_pong(ws: &mut Client) {
    assert_pong_for(ws, "");
}

/// [`assert_pong`], naming the client (or the moment) in a failure.
#[track_caller]
pub fn assert_pong_for(ws: &mut Client, what: &str) {
    ws.send(Message::text(r#"{"type":"ping"}"#)).unwrap_or_else(|e| panic!("{what}: sending ping: {e}"));
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value =
                    serde_json::from_str(t.as_str()).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {t}"));
                assert_eq!(v, serde_json::json!({"type": "pong"}), "{what}: expected the pong first");
                return;
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(other) => panic!("{what}: expected the pong (a Text frame), got {other:?}"),
            Err(e) => panic!("{what}: no pong: {e}"),
        }
    }
}

/// Reads until the relay's Close frame and returns its code and reason.
pub fn expect_close(ws: &mut Client) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return (f.code.into(), f.reason.to_string()),
            Ok(Message::Close(None)) => return (1005, String::new()),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a Close frame: {e}"),
        }
    }
}

/// After the relay's Close (answered by tungstenite), the relay ends the
/// connection and nothing else arrives.
pub fn assert_ends_after_close(ws: &mut Client) {
    match ws.read() {
        Err(tungstenite::Error::ConnectionClosed) => {}
        Ok(m) => panic!("nothing may follow the Close, got {m:?}"),
        Err(e) => panic!("unexpected error after the Close: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Raw sockets

/// A raw HTTP request; returns the whole response until the relay closes.
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A valid upgrade request head for `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A masked client frame (raw sockets send these to test malformed input).
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    docrelay::ws::encode_client_frame(&mut out, fin, opcode, [0x37, 0xfa, 0x21, 0x3d], payload);
    out
}

/// A raw socket that has completed the upgrade; returns it and any bytes
/// that followed the 101 head.
pub fn raw_upgrade(addr: SocketAddr, path: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(upgrade_request(path).as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before the 101");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
            return (s, buf[end + 4..].to_vec());
        }
    }
}

/// Reads one server frame (unmasked) from a raw socket: (opcode, payload).
pub fn read_frame(s: &mut TcpStream, pending: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    loop {
        if pending.len() >= 2 {
            let op = pending[0] & 0x0f;
            let (len, hl) = match pending[1] & 0x7f {
                126 if pending.len() >= 4 => (u16::from_be_bytes([pending[2], pending[3]]) as usize, 4),
                127 if pending.len() >= 10 => (u64::from_be_bytes(pending[2..10].try_into().unwrap()) as usize, 10),
                126 | 127 => (usize::MAX, 0),
                n => (n as usize, 2),
            };
            if len != usize::MAX && pending.len() >= hl + len {
                let payload = pending[hl..hl + len].to_vec();
                pending.drain(..hl + len);
                return Some((op, payload));
            }
        }
        let mut chunk = [0u8; 65536];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

/// [`assert_pong`] on a raw socket: sends `{"type":"ping"}` in a Text frame
/// and asserts that the next frame is the Text `{"type":"pong"}`.
#[track_caller]
pub fn raw_assert_pong(s: &mut TcpStream, pending: &mut Vec<u8>) {
    s.write_all(&client_frame(true, 0x1, br#"{"type":"ping"}"#)).unwrap();
    let (op, payload) = read_frame(s, pending).expect("a pong");
    assert_eq!((op, String::from_utf8_lossy(&payload).as_ref()), (0x1, r#"{"type":"pong"}"#));
}

/// Reads frames until a Close and returns its code (None if the connection
/// ended without one).
pub fn raw_expect_close(s: &mut TcpStream, pending: &mut Vec<u8>) -> Option<u16> {
    while let Some((op, payload)) = read_frame(s, pending) {
        if op == 0x8 {
            return Some(if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 });
        }
    }
    None
}

// ---------------------------------------------------------------------------
// /metrics

/// The whole `GET /metrics` response (head and exposition text).
pub fn scrape_metrics(addr: SocketAddr) -> String {
    let response = raw_http(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 200"), "GET /metrics:\n{response}");
    response
}

/// The value of one sample line of /metrics, e.g.
/// `docrelay_sessions{core="0"}` or `docrelay_active_connections`.
pub fn metric(addr: SocketAddr, sample: &str) -> u64 {
    let body = scrape_metrics(addr);
    body.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

/// One core's sample of a per-core family, e.g. `docrelay_documents` on core 1.
pub fn core_metric(addr: SocketAddr, family: &str, core: usize) -> u64 {
    metric(addr, &format!("{family}{{core=\"{core}\"}}"))
}

/// A per-core family summed over the relay's `cores` cores.
pub fn metric_sum(addr: SocketAddr, family: &str, cores: usize) -> u64 {
    (0..cores).map(|c| core_metric(addr, family, c)).sum()
}

/// The core labels /metrics reports (those of `docrelay_sessions`), sorted,
/// e.g. `["0", "1"]`.
pub fn metric_cores(addr: SocketAddr) -> Vec<String> {
    let body = scrape_metrics(addr);
    let mut cores: Vec<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("docrelay_sessions{core=\""))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect();
    cores.sort();
    cores
}

/// Polls `f` until it returns true (up to 10 s): for state that settles
/// asynchronously on the relay's cores (counters after a close).
#[track_caller]
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for: {what}");
}

// ---------------------------------------------------------------------------
// Files

/// A temporary directory of one test, removed (with its files) when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory whose name contains `name`.
    pub fn new(name: &str) -> TempDir {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let nth = MADE.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("docrelay-test-{name}-{}-{nth}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to the file `name` in the directory; returns its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a relay command (the `docrelay` binary as a child process), collects
/// its stderr on a thread (the pipe never fills), and waits up to `patience`
/// for its `listening on ADDR` line. Panics with the log if it never comes.
/// `RUST_LOG` is the relay's default unless `cmd` sets it.
pub fn spawn_listening(mut cmd: Command, patience: Duration) -> (Child, SocketAddr, Arc<Mutex<String>>) {
    if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
        cmd.env_remove("RUST_LOG");
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("docrelay starts");
    let (log, lines) = collect_stderr(&mut child);
    let deadline = Instant::now() + patience;
    let addr = loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    break addr.parse().unwrap_or_else(|_| panic!("no address in {line:?}"));
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no `listening on` line; stderr:\n{}", log.lock().unwrap());
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait();
                panic!("docrelay ended ({status:?}) without a `listening on` line; stderr:\n{}", log.lock().unwrap());
            }
        }
    };
    (child, addr, log)
}

/// Reads a child's stderr on a thread, so that the pipe never fills: all of
/// it lands in the returned text, and each line on the channel as it comes.
pub fn collect_stderr(child: &mut Child) -> (Arc<Mutex<String>>, Receiver<String>) {
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, lines) = channel();
    let pipe = child.stderr.take().expect("stderr is piped");
    let sink = log.clone();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
            let _ = tx.send(line);
        }
    });
    (log, lines)
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().unwrap_or_else(|e| {
        panic!("the `openssl` command is needed to generate the RS256/ES256 test keys; install OpenSSL ({e})")
    });
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Generates a key pair with the `openssl` command: returns the private key
/// (PKCS#8 PEM) and the path of the public key (SPKI PEM).
pub fn key_pair(dir: &Path, name: &str, genpkey: &[&str]) -> (Vec<u8>, String) {
    let private = dir.join(format!("{name}.key.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let private_s = private.to_str().unwrap();
    let mut args = vec!["genpkey"];
    args.extend_from_slice(genpkey);
    args.extend_from_slice(&["-out", private_s]);
    openssl(&args);
    openssl(&["pkey", "-in", private_s, "-pubout", "-out", public.to_str().unwrap()]);
    (std::fs::read(&private).unwrap(), public.to_str().unwrap().to_string())
}

pub const RSA: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
pub const EC_P256: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];

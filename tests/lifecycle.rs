//! The session lifecycle (`docs/protocol.md`, "Session lifecycle"):
//! registration at the upgrade, statistics on the way out, and shutdown
//! (the close codes of "Close codes", the bounds of "Limits", and
//! `docs/architecture.md`, "Shutdown").

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use docrelay::validate::{
    ConnectionValidator, PublishError, ValidationRequest, ValidationResult, ValidationResultPublisher,
};
use docrelay::{Config, RelayOptions};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

/// A validator that hands every verdict to the test (the test plays the
/// validator's worker thread and decides when to publish).
struct Gate(Mutex<mpsc::Sender<(String, ValidationResult, ValidationResultPublisher)>>);

impl ConnectionValidator for Gate {
    fn validate(
        &self,
        request: &ValidationRequest<'_>,
        result: ValidationResult,
        publisher: &ValidationResultPublisher,
    ) {
        let doc = request.document_id.to_string();
        let _ = self.0.lock().unwrap().send((doc, result, publisher.clone()));
    }
}

type Held = mpsc::Receiver<(String, ValidationResult, ValidationResultPublisher)>;

fn start_gated(config: Config) -> (Relay, Held) {
    let (tx, rx) = mpsc::channel();
    let relay =
        relay_with(config, RelayOptions { validator: Some(Arc::new(Gate(Mutex::new(tx)))), ..RelayOptions::default() });
    (relay, rx)
}

fn accept(mut result: ValidationResult, publisher: &ValidationResultPublisher) {
    result.validation_success();
    let mut result = result;
    loop {
        match publisher.publish(result) {
            Ok(()) => return,
            Err(PublishError::Full(r)) => {
                result = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(PublishError::Closed) => panic!("publisher closed on a running relay"),
        }
    }
}

/// A raw client that is CONNECTED (its ping was answered).
fn raw_session(addr: SocketAddr, path: &str) -> (TcpStream, Vec<u8>) {
    let (mut s, mut pending) = raw_upgrade(addr, path);
    raw_assert_pong(&mut s, &mut pending);
    (s, pending)
}

/// Two documents per core, chosen by the placement rule, so every core has
/// sessions.
fn documents_on_every_core(cores: usize) -> Vec<String> {
    let mut per_core = vec![0; cores];
    let mut docs = Vec::new();
    for i in 0.. {
        let doc = format!("doc-{i}");
        let owner = docrelay::owner_core(&doc, cores);
        if per_core[owner] < 2 {
            per_core[owner] += 1;
            docs.push(doc);
        }
        if per_core.iter().all(|&n| n == 2) {
            return docs;
        }
    }
    unreachable!()
}

/// Shuts the relay down (its sessions still open) and joins it on another
/// thread; the receiver says when `join` returned.
fn shutdown_in_background(relay: Relay) -> mpsc::Receiver<()> {
    let relay = relay.into_handle();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        relay.shutdown();
        relay.join();
        let _ = tx.send(());
    });
    rx
}

fn assert_joins(done: &mpsc::Receiver<()>) {
    // Generous: only a hang fails this.
    done.recv_timeout(Duration::from_secs(10)).expect("the relay's join returns");
}

/// A connection is registered (and counted in the peak) right after its
/// upgrade, while VALIDATING, before it is a session.
#[test]
fn connection_is_registered_while_validating() {
    let (relay, held) = start_gated(config());
    let addr = relay.local_addr();
    let cores = relay.cpus().len();

    let mut ws = connect(addr, "/ws/documents/reg");
    let (doc, result, publisher) = held.recv_timeout(Duration::from_secs(10)).expect("the validator runs");
    assert_eq!(doc, "reg");
    // The validator is called after the registration.
    assert_eq!(metric(addr, "docrelay_active_connections"), 1);
    assert!(metric(addr, "docrelay_peak_concurrent_connections") >= 1);
    assert_eq!(metric(addr, "docrelay_connections_total"), 1);
    assert_eq!(metric_sum(addr, "docrelay_sessions", cores), 0, "not CONNECTED before the verdict");

    accept(result, &publisher);
    assert_pong(&mut ws);
    assert_eq!(metric_sum(addr, "docrelay_sessions", cores), 1);
    assert_eq!(metric(addr, "docrelay_active_connections"), 1);
    assert_eq!(metric(addr, "docrelay_peak_concurrent_connections"), 1);
}

/// Statistics go back down whichever way a session ends: the client's
/// Close, a plain TCP close, a TCP reset.
#[test]
fn counts_drop_back_after_close_and_abrupt_drop() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let cores = relay.cpus().len();

    let mut clients: Vec<Client> = (0..4).map(|i| connect(addr, &format!("/ws/documents/count-{i}"))).collect();
    for ws in &mut clients {
        assert_pong(ws);
    }
    let (fin, _) = raw_session(addr, "/ws/documents/count-fin");
    let (rst, _) = raw_session(addr, "/ws/documents/count-rst");
    assert_eq!(metric(addr, "docrelay_active_connections"), 6);
    assert_eq!(metric_sum(addr, "docrelay_sessions", cores), 6);

    // Three close properly: the relay echoes the Close and lets go.
    let keep = clients.pop().unwrap();
    for mut ws in clients {
        ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).unwrap();
        loop {
            match ws.read() {
                // The relay echoes our code.
                Ok(Message::Close(f)) => assert_eq!(f.as_ref().map(|f| u16::from(f.code)), Some(1000), "{f:?}"),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(tungstenite::Error::ConnectionClosed) => break,
                Err(e) => panic!("close handshake failed: {e}"),
            }
        }
    }
    // Two disappear without a Close: one with a FIN, one with a reset.
    drop(fin);
    set_linger_zero(&rst);
    drop(rst);

    eventually("only one connection is left", || metric(addr, "docrelay_active_connections") == 1);
    eventually("only one session is left", || metric_sum(addr, "docrelay_sessions", cores) == 1);
    assert_eq!(metric(addr, "docrelay_connections_total"), 6);
    assert_eq!(metric(addr, "docrelay_peak_concurrent_connections"), 6);
    let mut keep = keep;
    assert_pong(&mut keep);
}

/// Shutdown sends Close 1001 to every session on every core, and `join`
/// returns once they are gone.
#[test]
fn shutdown_closes_every_session_with_1001() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let docs = documents_on_every_core(cores);
    let mut clients = Vec::new();
    for doc in &docs {
        for _ in 0..2 {
            let mut ws = connect(addr, &format!("/ws/documents/{doc}"));
            assert_pong(&mut ws);
            clients.push(ws);
        }
    }
    for core in 0..cores {
        assert_eq!(core_metric(addr, "docrelay_sessions", core), 4, "core {core}");
    }

    let done = shutdown_in_background(relay);
    for ws in &mut clients {
        let (code, reason) = expect_close(ws);
        assert_eq!(code, 1001, "{reason}");
        assert!(reason.contains("shutting down"), "{reason}");
        // Our Close goes back; then the relay ends the connection.
        assert_ends_after_close(ws);
    }
    assert_joins(&done);
}

/// A client that never answers the relay's Close does not hold shutdown up
/// beyond the close timeout / shutdown grace.
#[test]
fn shutdown_does_not_wait_forever_for_a_silent_client() {
    let mut c = config();
    c.limits.close_timeout_ms = 200;
    c.limits.shutdown_grace_ms = 1000;
    let relay = relay(c);
    let addr = relay.local_addr();
    let (mut silent, mut pending) = raw_session(addr, "/ws/documents/silent");
    let mut polite = connect(addr, "/ws/documents/polite");
    assert_pong(&mut polite);

    let done = shutdown_in_background(relay);
    assert_eq!(expect_close(&mut polite).0, 1001);
    assert_joins(&done);
    // The silent client got the Close too, then the end of the connection.
    assert_eq!(raw_expect_close(&mut silent, &mut pending), Some(1001));
    assert_eq!(read_frame(&mut silent, &mut pending), None);
}

/// A client that sends a flood of Pings and never reads: the relay's writer
/// is stuck on a full socket and it stops reading the client. Shutdown still
/// ends (the Close cannot even be written; the close timeout fails the
/// connection).
#[test]
fn shutdown_does_not_wait_for_a_client_that_does_not_read() {
    let mut c = config();
    c.limits.close_timeout_ms = 200;
    c.limits.shutdown_grace_ms = 500;
    // Small, but at least one read's worth of Pongs (64 KiB), so that the
    // flood cannot overflow it (see the 1008 test).
    c.limits.max_send_buffer_bytes = 64 * 1024;
    let relay = relay(c);
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let (mut stuck, _) = raw_session(addr, "/ws/documents/stuck");
    set_small_buffers(&stuck);
    flood_with_pings_until_blocked(&mut stuck, addr, cores);
    let done = shutdown_in_background(relay);
    assert_joins(&done);
}

/// A client that stops reading (its replies back up past
/// `max_send_buffer_bytes`, so the relay stops reading it too) and goes
/// quiet is closed for idleness, failed after the close timeout, and then
/// DISCONNECTED: unregistered and no longer counted.
#[test]
fn client_that_stopped_reading_is_disconnected_and_unregistered() {
    let mut c = config();
    // Longer than the flood's "stopped" check; no keep-alive Pings meanwhile.
    c.limits.idle_timeout_ms = 1500;
    c.limits.ping_interval_ms = 60_000;
    c.limits.close_timeout_ms = 200;
    c.limits.max_send_buffer_bytes = 64 * 1024;
    let relay = relay(c);
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let (mut stuck, _) = raw_session(addr, "/ws/documents/stuck");
    set_small_buffers(&stuck);
    flood_with_pings_until_blocked(&mut stuck, addr, cores);
    eventually("the stuck client is unregistered", || metric(addr, "docrelay_active_connections") == 0);
    assert_eq!(metric_sum(addr, "docrelay_sessions", cores), 0);
}

/// The same stuck client, gone with a TCP reset instead: the relay's pending
/// write fails, and the session ends at once (no timeout involved).
#[test]
fn client_that_stopped_reading_then_reset_is_unregistered() {
    let mut c = config();
    c.limits.max_send_buffer_bytes = 64 * 1024;
    let relay = relay(c);
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let (mut stuck, _) = raw_session(addr, "/ws/documents/stuck");
    set_small_buffers(&stuck);
    flood_with_pings_until_blocked(&mut stuck, addr, cores);
    set_linger_zero(&stuck);
    drop(stuck);
    eventually("the reset client is unregistered", || metric(addr, "docrelay_active_connections") == 0);
    assert_eq!(metric_sum(addr, "docrelay_sessions", cores), 0);
    let mut other = connect(addr, "/ws/documents/stuck");
    assert_pong(&mut other);
}

/// When a client's queued replies outgrow twice `limits.max_send_buffer_bytes`
/// the relay closes it with 1008 (CLOSING), and keeps serving everyone else.
#[test]
fn send_buffer_overflow_closes_with_1008_and_the_relay_survives() {
    let mut c = config();
    c.limits.close_timeout_ms = 200;
    // The smallest allowed: one read of pipelined Pings queues more than
    // twice this in Pongs.
    c.limits.max_send_buffer_bytes = 1024;
    let relay = relay(c);
    let addr = relay.local_addr();
    let (mut flooder, _) = raw_session(addr, "/ws/documents/flood");
    let mut burst = Vec::new();
    for _ in 0..64 {
        burst.extend(client_frame(true, 0x9, &[7u8; 125]));
    }
    // 64 Pings in one write: about 8 KiB of Pongs from one read.
    flooder.write_all(&burst).unwrap();
    eventually("the flooder is gone", || metric(addr, "docrelay_active_connections") == 0);
    let mut other = connect(addr, "/ws/documents/other");
    assert_pong(&mut other);
    // The flooder's stream ends with the 1008 Close after the Pongs that fit.
    let mut pending = Vec::new();
    assert_eq!(raw_expect_close(&mut flooder, &mut pending), Some(1008));
}

/// Connections that have not become sessions yet (head still arriving,
/// verdict still pending) do not hold shutdown up.
#[test]
fn shutdown_does_not_wait_for_handshakes_in_progress() {
    let (relay, held, _partial, _validating) = relay_with_handshakes_in_progress();
    let done = shutdown_in_background(relay);
    assert_joins(&done);
    drop(held);
}

/// ... and once the relay has stopped they are closed, not left open: the
/// peer sees the end of the connection (a Close 1001 first is welcome).
#[test]
fn shutdown_closes_connections_still_in_handshake() {
    let (relay, _held, mut partial, mut validating) = relay_with_handshakes_in_progress();
    let done = shutdown_in_background(relay);
    assert_joins(&done);

    partial.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    match partial.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection still sending its head was left open after join: {other:?}"),
    }
    set_timeout(&validating, Duration::from_secs(5));
    match validating.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1001, "{f:?}"),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
            panic!("the connection waiting for its verdict was left open after join")
        }
        Err(_) => {} // ended without a Close frame
    }
}

/// After the relay has stopped, a validator's worker that publishes a verdict
/// learns that the connection is gone (`PublishError::Closed`), as the API
/// documents, instead of its verdict vanishing into a queue nobody reads.
#[test]
fn publisher_reports_closed_after_shutdown() {
    let (relay, held, _partial, _validating) = relay_with_handshakes_in_progress();
    let (_, mut result, publisher) = held.recv_timeout(Duration::from_secs(10)).expect("verdict held");
    let done = shutdown_in_background(relay);
    assert_joins(&done);
    result.validation_success();
    assert!(matches!(publisher.publish(result), Err(PublishError::Closed)), "publish after join did not say Closed");
}

/// A relay (long handshake and validation timeouts) with one connection that
/// has sent half its request head and one upgraded connection whose verdict
/// the test holds (still in `held`).
fn relay_with_handshakes_in_progress() -> (Relay, Held, TcpStream, Client) {
    let mut c = config();
    c.limits.handshake_timeout_ms = 60_000;
    c.limits.validation_timeout_ms = 60_000;
    c.limits.close_timeout_ms = 200;
    c.limits.shutdown_grace_ms = 1000;
    let (relay, held) = start_gated(c);
    let addr = relay.local_addr();
    let mut partial = TcpStream::connect(addr).unwrap();
    partial.write_all(b"GET /ws/documents/partial HTTP/1.1\r\nHost: t\r\n").unwrap();
    let validating = connect(addr, "/ws/documents/validating");
    let (doc, result, publisher) = held.recv_timeout(Duration::from_secs(10)).expect("the validator runs");
    assert_eq!(doc, "validating");
    // (The half head registers nothing; only the upgraded one counts.)
    assert_eq!(metric(addr, "docrelay_active_connections"), 1);
    // Hand the held verdict back through the channel for tests that want it.
    let (tx, rx) = mpsc::channel();
    tx.send((doc, result, publisher)).unwrap();
    drop(held);
    (relay, rx, partial, validating)
}

/// Makes `drop` send a TCP reset instead of a FIN.
fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket we own, with a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// Small kernel buffers, so that a client that does not read fills them fast.
fn set_small_buffers(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        let size: libc::c_int = 4096;
        // SAFETY: setsockopt on a socket we own, with a correctly sized option value.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
}

/// Writes Ping frames (without reading anything) until the relay has stopped
/// taking them: its Pongs fill the socket towards us, its writer waits, its
/// queue passes `max_send_buffer_bytes` and it stops reading us. "Stopped" =
/// our writes have been refused for a while and meanwhile the relay queued
/// no new Pong (so it is not merely slow).
fn flood_with_pings_until_blocked(s: &mut TcpStream, addr: SocketAddr, cores: usize) {
    let pongs_queued = || metric_sum(addr, "docrelay_messages_out_total", cores);
    let mut wire = Vec::new();
    for _ in 0..512 {
        wire.extend(client_frame(true, 0x9, &[7u8; 125]));
    }
    s.set_nonblocking(true).unwrap();
    let mut offset = 0;
    let mut blocked: Option<(std::time::Instant, u64)> = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(std::time::Instant::now() < deadline, "the relay never stopped reading the flood");
        match s.write(&wire[offset..]) {
            Ok(n) => {
                // Keep whole frames on the wire: continue where the write stopped.
                offset = (offset + n) % wire.len();
                blocked = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => match blocked {
                None => blocked = Some((std::time::Instant::now(), pongs_queued())),
                Some((since, before)) if since.elapsed() > Duration::from_millis(200) => {
                    if pongs_queued() == before {
                        break;
                    }
                    blocked = None;
                }
                Some(_) => std::thread::sleep(Duration::from_millis(5)),
            },
            Err(e) => panic!("write failed: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
}

//! VALIDATING (`docs/protocol.md`, "Session lifecycle" and "Close codes"):
//! the built-in validators, an application's `ConnectionValidator`, its
//! publisher and its timeout.

mod common;
use common::*;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use docrelay::validate::{
    ConnectionValidator, PublishError, ValidationRequest, ValidationResult, ValidationResultPublisher,
};
use docrelay::{Config, RelayOptions};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::Message;

/// A validator made of a closure.
struct FnValidator<F>(F);

impl<F> ConnectionValidator for FnValidator<F>
where
    F: Fn(&ValidationRequest<'_>, ValidationResult, &ValidationResultPublisher) + Send + Sync + 'static,
{
    fn validate(
        &self,
        request: &ValidationRequest<'_>,
        result: ValidationResult,
        publisher: &ValidationResultPublisher,
    ) {
        (self.0)(request, result, publisher)
    }
}

fn start_validated<F>(config: Config, f: F) -> Relay
where
    F: Fn(&ValidationRequest<'_>, ValidationResult, &ValidationResultPublisher) + Send + Sync + 'static,
{
    relay_with(config, RelayOptions { validator: Some(Arc::new(FnValidator(f))), ..RelayOptions::default() })
}

/// The documented retry loop: publish, and while the queue is full, wait a
/// little and try again. Returns how many times the queue was full.
fn publish_retrying(publisher: &ValidationResultPublisher, mut result: ValidationResult) -> Result<usize, ()> {
    let mut full = 0;
    loop {
        match publisher.publish(result) {
            Ok(()) => return Ok(full),
            Err(PublishError::Full(r)) => {
                full += 1;
                result = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(PublishError::Closed) => return Err(()),
        }
    }
}

/// Opens a session with extra request headers. Returns the client (the 101
/// is asserted).
fn connect_with_headers(addr: SocketAddr, path_and_query: &str, headers: &[(&'static str, &'static str)]) -> Client {
    let mut request = format!("ws://{addr}{path_and_query}").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, HeaderValue::from_static(value));
    }
    let (ws, resp) = tungstenite::connect(request).expect("websocket connects");
    assert_eq!(resp.status(), 101);
    set_timeout(&ws, Duration::from_secs(10));
    ws
}

/// Sends a ping and asserts that the very next thing from the relay is its
/// Close with this code and reason (no pong before it). Then the client
/// completes the close handshake.
fn assert_rejected(ws: &mut Client, code: u16, reason: &str) {
    // The relay is not reading yet (or discards): the ping must never be answered.
    ws.send(Message::text(r#"{"type":"ping"}"#)).expect("send");
    match ws.read() {
        Ok(Message::Close(Some(f))) => {
            assert_eq!((u16::from(f.code), f.reason.as_str()), (code, reason));
        }
        other => panic!("expected Close {code} {reason:?} first, got {other:?}"),
    }
    // tungstenite answers the Close; then the relay ends the connection.
    assert_ends_after_close(ws);
}

/// Ends a client with a proper close handshake.
fn close_client(mut ws: Client) {
    ws.close(None).expect("close");
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close handshake failed: {e}"),
        }
    }
}

/// Whether anything arrived on a client's socket, without blocking.
fn has_input(ws: &Client) -> bool {
    let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() else { unreachable!() };
    s.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let r = s.peek(&mut byte);
    s.set_nonblocking(false).unwrap();
    match r {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("peek failed: {e}"),
    }
}

/// A single relay core (so that every connection is on the same core): the
/// first CPU this process may run on.
fn one_core() -> docrelay::Cores {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills the set we own.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set), 0);
        set
    };
    // SAFETY: CPU_ISSET only reads the set, for ids below CPU_SETSIZE.
    let cpu = (0..libc::CPU_SETSIZE as usize).find(|&c| unsafe { libc::CPU_ISSET(c, &set) }).expect("a CPU");
    docrelay::Cores::List(vec![cpu])
}

fn short_config() -> Config {
    let mut c = config();
    c.limits.close_timeout_ms = 300;
    c
}

#[test]
fn allowed_origins_reject_other_browser_origins_with_4010() {
    let mut c = config();
    c.validation.allowed_origins = vec!["https://good.example".into()];
    let relay = relay(c);
    let addr = relay.local_addr();

    let mut good = connect_with_headers(addr, "/ws/documents/o1", &[("origin", "https://good.example")]);
    assert_pong(&mut good);

    let mut evil = connect_with_headers(addr, "/ws/documents/o1", &[("origin", "https://evil.example")]);
    assert_rejected(&mut evil, 4010, "origin not allowed");

    // Not from a browser: no Origin, passes.
    let mut native = connect(addr, "/ws/documents/o1");
    assert_pong(&mut native);
    assert!(metric(addr, "docrelay_rejected_total{reason=\"validation\"}") >= 1);
}

#[test]
fn max_connections_per_ip_rejects_with_4029_and_frees_on_close() {
    let mut c = short_config();
    c.validation.max_connections_per_ip = 2;
    let relay = relay(c);
    let addr = relay.local_addr();

    let mut a = connect(addr, "/ws/documents/ip1");
    assert_pong(&mut a);
    let mut b = connect(addr, "/ws/documents/ip2");
    assert_pong(&mut b);
    let mut third = connect(addr, "/ws/documents/ip3");
    assert_rejected(&mut third, 4029, "too many connections");
    drop(third);

    close_client(a);
    eventually("the closed and the rejected connection are gone", || metric(addr, "docrelay_active_connections") == 1);
    let mut again = connect(addr, "/ws/documents/ip3");
    assert_pong(&mut again);
    assert_pong(&mut b);
}

/// A connection counted against its IP and then refused by the application
/// validator (or timed out) gives its slot back.
#[test]
fn per_ip_slot_is_released_after_application_rejection_or_timeout() {
    let mut c = short_config();
    c.validation.max_connections_per_ip = 1;
    c.limits.validation_timeout_ms = 200;
    let relay = start_validated(c, |req, mut result, publisher| match req.query_param("token") {
        Some("never") => {} // the verdict never comes
        Some("bad") => {
            result.validation_failure(4007, "bad token");
            publisher.publish(result).unwrap();
        }
        _ => {
            result.validation_success();
            publisher.publish(result).unwrap();
        }
    });
    let addr = relay.local_addr();

    let mut bad = connect(addr, "/ws/documents/slot?token=bad");
    assert_rejected(&mut bad, 4007, "bad token");
    drop(bad);
    eventually("the rejected connection is gone", || metric(addr, "docrelay_active_connections") == 0);

    let mut never = connect(addr, "/ws/documents/slot?token=never");
    assert_eq!(expect_close(&mut never), (1011, "validation timed out".to_string()));
    drop(never);
    eventually("the timed-out connection is gone", || metric(addr, "docrelay_active_connections") == 0);

    let mut good = connect(addr, "/ws/documents/slot?token=good");
    assert_pong(&mut good);
    let mut over = connect(addr, "/ws/documents/slot?token=good");
    assert_rejected(&mut over, 4029, "too many connections");
}

#[test]
fn max_connections_rejects_with_4029_relay_full() {
    let mut c = short_config();
    c.limits.max_connections = Some(2);
    let relay = relay(c);
    let addr = relay.local_addr();

    let mut a = connect(addr, "/ws/documents/full1");
    assert_pong(&mut a);
    let mut b = connect(addr, "/ws/documents/full2");
    assert_pong(&mut b);
    let mut third = connect(addr, "/ws/documents/full3");
    assert_rejected(&mut third, 4029, "relay full");
    drop(third);

    close_client(a);
    eventually("one slot is free again", || metric(addr, "docrelay_active_connections") == 1);
    let mut again = connect(addr, "/ws/documents/full3");
    assert_pong(&mut again);
    assert_pong(&mut b);
}

#[test]
fn custom_validator_chooses_the_close_code_and_reason() {
    let relay = start_validated(short_config(), |req, mut result, publisher| {
        match req.query_param("token") {
            Some("bad") => result.validation_failure(4007, "bad token"),
            Some("weird") => result.validation_failure(1000, "not a validator code"),
            Some("high") => result.validation_failure(5000, "above the range"),
            // 200 bytes of two-byte characters: more than a Close frame holds.
            Some("long") => result.validation_failure(4321, "é".repeat(100)),
            // Published without a decision: counts as a failure.
            Some("undecided") => {}
            _ => result.validation_success(),
        }
        publisher.publish(result).expect("an empty queue takes the verdict");
    });
    let addr = relay.local_addr();

    let mut bad = connect(addr, "/ws/documents/v1?token=bad");
    assert_rejected(&mut bad, 4007, "bad token");

    let mut good = connect(addr, "/ws/documents/v1?token=good");
    assert_pong(&mut good);

    // Codes outside 4000..=4999 become 4000; the reason stays.
    let mut weird = connect(addr, "/ws/documents/v1?token=weird");
    assert_rejected(&mut weird, 4000, "not a validator code");
    let mut high = connect(addr, "/ws/documents/v1?token=high");
    assert_rejected(&mut high, 4000, "above the range");

    // The reason is cut to fit the Close frame (at most 123 bytes), on a
    // character boundary.
    let mut long = connect(addr, "/ws/documents/v1?token=long");
    assert_rejected(&mut long, 4321, &"é".repeat(61));

    let mut undecided = connect(addr, "/ws/documents/v1?token=undecided");
    assert_eq!(expect_close(&mut undecided).0, 4000);
    assert_eq!(metric(addr, "docrelay_rejected_total{reason=\"validation\"}"), 5);
}

/// The application's validator runs after the built-in ones: a connection
/// they refuse never reaches it.
#[test]
fn builtin_rejection_skips_the_application_validator() {
    let mut c = short_config();
    c.validation.allowed_origins = vec!["https://good.example".into()];
    let calls = Arc::new(AtomicUsize::new(0));
    let relay = start_validated(c, {
        let calls = calls.clone();
        move |_req, mut result, publisher| {
            calls.fetch_add(1, Ordering::SeqCst);
            result.validation_success();
            publisher.publish(result).unwrap();
        }
    });
    let addr = relay.local_addr();
    let mut evil = connect_with_headers(addr, "/ws/documents/b1", &[("origin", "https://evil.example")]);
    assert_rejected(&mut evil, 4010, "origin not allowed");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let mut good = connect_with_headers(addr, "/ws/documents/b1", &[("origin", "https://good.example")]);
    assert_pong(&mut good);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A validator that only publishes later (from another thread) holds up its
/// own connection and nothing else on the same core.
#[test]
fn slow_validator_does_not_delay_other_connections_on_its_core() {
    let mut c = short_config();
    c.cores = one_core();
    let (held_tx, held_rx) = mpsc::channel::<(ValidationResult, ValidationResultPublisher)>();
    let held_tx = Mutex::new(held_tx);
    let relay = start_validated(c, move |req, mut result, publisher| {
        if req.query_param("token") == Some("slow") {
            // Off the event loop: the test plays the worker and decides later.
            held_tx.lock().unwrap().send((result, publisher.clone())).unwrap();
        } else {
            result.validation_success();
            publisher.publish(result).unwrap();
        }
    });
    let addr = relay.local_addr();

    // connect() returns after the 101; validation runs after the upgrade.
    let mut slow = connect(addr, "/ws/documents/same?token=slow");
    let (mut slow_result, slow_publisher) =
        held_rx.recv_timeout(Duration::from_secs(10)).expect("the validator saw the slow connection");
    // Sent while VALIDATING: must be answered once CONNECTED, not lost.
    slow.send(Message::text(r#"{"type":"ping"}"#)).unwrap();

    let mut fast = connect(addr, "/ws/documents/same?token=fast");
    assert_pong(&mut fast);
    // The slow one is still VALIDATING: nothing for it, not a session yet.
    assert!(!has_input(&slow), "the slow connection got something before its verdict");
    assert_eq!(metric(addr, "docrelay_sessions{core=\"0\"}"), 1);
    assert_eq!(metric(addr, "docrelay_active_connections"), 2);

    slow_result.validation_success();
    let worker = std::thread::spawn(move || publish_retrying(&slow_publisher, slow_result));
    assert_eq!(worker.join().unwrap(), Ok(0));
    let reply: serde_json::Value = serde_json::from_str(&next_text(&mut slow)).unwrap();
    assert_eq!(reply["type"], "pong", "{reply}");
    assert_eq!(metric(addr, "docrelay_sessions{core=\"0\"}"), 2);
    assert_pong(&mut fast);
}

#[test]
fn validator_that_never_answers_times_out_with_1011_and_late_verdict_is_discarded() {
    let mut c = short_config();
    c.limits.validation_timeout_ms = 200;
    let (late_tx, late_rx) = mpsc::channel::<Result<usize, ()>>();
    let late_tx = Mutex::new(late_tx);
    let relay = start_validated(c, move |req, mut result, publisher| {
        if req.query_param("token") == Some("never") {
            // A verdict that comes long after the timeout (and would reject).
            let publisher = publisher.clone();
            let tx = late_tx.lock().unwrap().clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(400));
                result.validation_failure(4999, "too late");
                let _ = tx.send(publish_retrying(&publisher, result));
            });
        } else {
            result.validation_success();
            publisher.publish(result).unwrap();
        }
    });
    let addr = relay.local_addr();
    let cores = relay.cpus().len();

    let mut never = connect(addr, "/ws/documents/t1?token=never");
    assert_eq!(expect_close(&mut never), (1011, "validation timed out".to_string()));
    drop(never);
    assert_eq!(metric(addr, "docrelay_rejected_total{reason=\"validation_timeout\"}"), 1);
    assert_eq!(metric(addr, "docrelay_rejected_total{reason=\"validation\"}"), 0);

    // The late verdict is taken by the (live) core and dropped.
    assert_eq!(late_rx.recv_timeout(Duration::from_secs(10)).expect("late verdict published"), Ok(0));
    eventually("the timed-out connection is gone", || metric(addr, "docrelay_active_connections") == 0);

    // The relay keeps working, and the stale verdict touches nobody.
    let mut ok = connect(addr, "/ws/documents/t1?token=ok");
    assert_pong(&mut ok);
    assert_eq!(metric_sum(addr, "docrelay_sessions", cores), 1);
    assert_eq!(metric(addr, "docrelay_rejected_total{reason=\"validation\"}"), 0);
    assert_eq!(metric(addr, "docrelay_rejected_total{reason=\"validation_timeout\"}"), 1);
}

/// `validation_queue = 1`: a second verdict published before the core
/// collected the first is refused with `Full` (deterministic: the publishing
/// happens inside `validate`, i.e. on the core's event loop, which therefore
/// cannot collect in between), and the retry loop delivers it.
#[test]
fn full_verdict_queue_refuses_and_retry_delivers() {
    let mut c = short_config();
    c.cores = one_core();
    c.limits.validation_queue = 1;
    let stash: Arc<Mutex<Option<ValidationResult>>> = Arc::new(Mutex::new(None));
    // What each publish inside `validate` answered (checked by the test, not
    // asserted on the core's thread).
    let outcomes: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let (worker_tx, worker_rx) = mpsc::channel::<Result<usize, ()>>();
    let worker_tx = Mutex::new(worker_tx);
    let relay = start_validated(c, {
        let (stash, outcomes) = (stash.clone(), outcomes.clone());
        move |req, mut result, publisher| {
            if req.query_param("token") == Some("first") {
                // Held until the second connection's validation.
                *stash.lock().unwrap() = Some(result);
                return;
            }
            let name = |r: &Result<(), PublishError>| match r {
                Ok(()) => "ok",
                Err(PublishError::Full(_)) => "full",
                Err(PublishError::Closed) => "closed",
            };
            if let Some(mut first) = stash.lock().unwrap().take() {
                first.validation_success();
                outcomes.lock().unwrap().push(name(&publisher.publish(first)));
            }
            result.validation_success();
            let second = publisher.publish(result);
            outcomes.lock().unwrap().push(name(&second));
            if let Err(PublishError::Full(result)) = second {
                // The documented pattern: a worker retries after a short wait.
                let publisher = publisher.clone();
                let tx = worker_tx.lock().unwrap().clone();
                std::thread::spawn(move || {
                    let _ = tx.send(publish_retrying(&publisher, result));
                });
            }
        }
    });
    let addr = relay.local_addr();

    let mut first = connect(addr, "/ws/documents/q?token=first");
    eventually("the first verdict is stashed", || stash.lock().unwrap().is_some());
    let mut second = connect(addr, "/ws/documents/q?token=second");
    // The first verdict went in during the second validation.
    assert_pong(&mut first);
    assert_eq!(*outcomes.lock().unwrap(), ["ok", "full"], "a queue of 1 holds exactly one uncollected verdict");
    assert!(worker_rx.recv_timeout(Duration::from_secs(10)).expect("the retry ended").is_ok());
    assert_pong(&mut second);
}

/// Many verdicts published at once from worker threads into queues of 1:
/// whatever the interleaving, the retry loop gets every one delivered.
#[test]
fn concurrent_publishers_with_a_tiny_queue_all_get_through() {
    const N: usize = 24;
    let mut c = short_config();
    c.limits.validation_queue = 1;
    let barrier = Arc::new(std::sync::Barrier::new(N));
    let fulls = Arc::new(AtomicUsize::new(0));
    let relay = start_validated(c, {
        let (barrier, fulls) = (barrier.clone(), fulls.clone());
        move |_req, mut result, publisher| {
            let (barrier, fulls, publisher) = (barrier.clone(), fulls.clone(), publisher.clone());
            std::thread::spawn(move || {
                // Every worker publishes at the same moment.
                barrier.wait();
                result.validation_success();
                let full = publish_retrying(&publisher, result).expect("relay running");
                fulls.fetch_add(full, Ordering::SeqCst);
            });
        }
    });
    let addr = relay.local_addr();
    let mut clients: Vec<Client> = (0..N).map(|i| connect(addr, &format!("/ws/documents/many-{}", i % 5))).collect();
    for ws in &mut clients {
        assert_pong(ws);
    }
    // Not asserted (timing): how often the queue was full.
    eprintln!("publish answered Full {} times", fulls.load(Ordering::SeqCst));
}

#[derive(Debug, Clone)]
struct Seen {
    key: Option<Vec<u8>>,
    custom: Option<Vec<u8>>,
    header_names: Vec<String>,
    path: String,
    query: Option<String>,
    token: Option<String>,
    document_id: String,
    peer_ip: IpAddr,
}

#[test]
fn validator_sees_headers_path_query_and_peer() {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let relay = start_validated(short_config(), {
        let seen = seen.clone();
        move |req, mut result, publisher| {
            seen.lock().unwrap().push(Seen {
                key: req.header("sec-websocket-key").map(<[u8]>::to_vec),
                custom: req.header("X-TEST-HEADER").map(<[u8]>::to_vec),
                header_names: req.headers().map(|(n, _)| n.to_ascii_lowercase()).collect(),
                path: req.path.to_string(),
                query: req.query.map(str::to_string),
                token: req.query_param("token").map(str::to_string),
                document_id: req.document_id.to_string(),
                peer_ip: req.peer.ip(),
            });
            result.validation_success();
            publisher.publish(result).unwrap();
        }
    });
    let addr = relay.local_addr();

    let mut request =
        format!("ws://{addr}/ws/documents/doc-7.a~b:c?color=%23ff0000&token=a%2Fb").into_client_request().unwrap();
    request.headers_mut().insert("x-test-header", HeaderValue::from_static("hello"));
    let key = request.headers().get("sec-websocket-key").expect("tungstenite sets a key").as_bytes().to_vec();
    let (mut ws, _) = tungstenite::connect(request).unwrap();
    set_timeout(&ws, Duration::from_secs(10));
    assert_pong(&mut ws);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "the validator runs once per connection");
    let s = &seen[0];
    assert_eq!(s.key.as_deref(), Some(&key[..]));
    assert_eq!(s.custom.as_deref(), Some(&b"hello"[..]), "header lookup is case-insensitive");
    for name in ["host", "upgrade", "connection", "sec-websocket-version", "x-test-header"] {
        assert!(s.header_names.iter().any(|n| n == name), "{name} missing from {:?}", s.header_names);
    }
    assert_eq!(s.path, "/ws/documents/doc-7.a~b:c");
    assert_eq!(s.document_id, "doc-7.a~b:c");
    assert_eq!(s.query.as_deref(), Some("color=%23ff0000&token=a%2Fb"));
    assert_eq!(s.token.as_deref(), Some("a%2Fb"), "query parameters are not percent-decoded");
    assert_eq!(s.peer_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
}

#[test]
fn rejections_are_counted_and_rejected_connections_unregister() {
    let relay = start_validated(short_config(), |req, mut result, publisher| {
        if req.query_param("token") == Some("bad") {
            result.validation_failure(4007, "bad token");
        } else {
            result.validation_success();
        }
        publisher.publish(result).unwrap();
    });
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let before = metric(addr, "docrelay_rejected_total{reason=\"validation\"}");
    assert_eq!(before, 0);

    for i in 0..3 {
        let mut ws = connect(addr, &format!("/ws/documents/r{i}?token=bad"));
        assert_eq!(expect_close(&mut ws), (4007, "bad token".to_string()));
    }
    // A client that does not answer the Close: the relay still lets go
    // (after its close timeout).
    let (mut raw, mut pending) = raw_upgrade(addr, "/ws/documents/r9?token=bad");
    assert_eq!(raw_expect_close(&mut raw, &mut pending), Some(4007));

    assert_eq!(metric(addr, "docrelay_rejected_total{reason=\"validation\"}"), 4);
    assert_eq!(metric(addr, "docrelay_connections_total"), 4);
    assert_eq!(metric_sum(addr, "docrelay_sessions", cores), 0, "a rejected connection never becomes a session");
    eventually("rejected connections are unregistered", || metric(addr, "docrelay_active_connections") == 0);
    drop(raw);

    let mut ok = connect(addr, "/ws/documents/r0?token=good");
    assert_pong(&mut ok);
    assert_eq!(metric(addr, "docrelay_rejected_total{reason=\"validation\"}"), 4);
    assert_eq!(metric(addr, "docrelay_active_connections"), 1);
}

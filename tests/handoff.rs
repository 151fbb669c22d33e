//! Hand-off to the owner core (`docs/architecture.md`, "The one idea";
//! `docs/protocol.md`, "Documents and cores").
//!
//! A hand-off needs two cores: on a host with one CPU every test says it is
//! skipped, and passes.

mod common;
use common::*;

use std::io::Write;

/// A relay on every CPU, or `None` (after saying why `test` is skipped) when
/// there are fewer than two, so that no connection could move.
fn relay_on_two_cores_or_more(test: &str) -> Option<Relay> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("skipped {test}: this host has {cpus} CPU; a hand-off needs at least 2 cores");
        return None;
    }
    let relay = relay(config());
    if relay.cpus().len() < 2 {
        eprintln!(
            "skipped {test}: the relay runs on {} core ({:?}); a hand-off needs at least 2",
            relay.cpus().len(),
            relay.cpus()
        );
        return None;
    }
    Some(relay)
}

/// Every session of one document ends up on the document's owner core, even
/// though the kernel spreads the connections over every core's listener.
#[test]
fn all_sessions_of_a_document_live_on_its_owner_core() {
    let Some(relay) = relay_on_two_cores_or_more("all_sessions_of_a_document_live_on_its_owner_core") else {
        return;
    };
    let addr = relay.local_addr();
    let cores = relay.cpus().len();
    let docs = ["alpha", "beta", "gamma", "delta"];
    let mut clients = Vec::new();
    for doc in docs {
        for _ in 0..8 {
            let mut ws = connect(addr, &format!("/ws/documents/{doc}"));
            assert_pong(&mut ws);
            clients.push(ws);
        }
    }
    // Expected sessions per core from the placement rule alone.
    let mut expected = vec![0u64; cores];
    for doc in docs {
        expected[docrelay::owner_core(doc, cores)] += 8;
    }
    for (core, want) in expected.iter().enumerate() {
        assert_eq!(core_metric(addr, "docrelay_sessions", core), *want, "core {core}");
    }
    // 32 connections spread by the kernel: some were accepted on a core that
    // does not own their document and were handed off (all 32 landing on
    // their owner has probability 2^-32).
    assert!(metric_sum(addr, "docrelay_handoffs_total", cores) > 0, "no connection was handed off");
    drop(clients);
}

/// A frame sent in the same packet as the upgrade request is not lost, even
/// when the connection moves to another core.
#[test]
fn frame_pipelined_behind_the_upgrade_is_not_lost() {
    let Some(relay) = relay_on_two_cores_or_more("frame_pipelined_behind_the_upgrade_is_not_lost") else {
        return;
    };
    let addr = relay.local_addr();
    // Different documents, so that both the local and the hand-off path run.
    for i in 0..16 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut wire = upgrade_request(&format!("/ws/documents/pipelined-{i}")).into_bytes();
        wire.extend(client_frame(true, 0x1, br#"{"type":"ping"}"#));
        s.write_all(&wire).unwrap();
        let mut pending = Vec::new();
        // Skip the 101 head, then the first frame must be the pong.
        let mut chunk = [0u8; 4096];
        loop {
            let n = std::io::Read::read(&mut s, &mut chunk).unwrap();
            assert!(n > 0);
            pending.extend_from_slice(&chunk[..n]);
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                pending.drain(..end + 4);
                break;
            }
        }
        let (op, payload) = read_frame(&mut s, &mut pending).expect("a frame");
        assert_eq!(op, 0x1, "direct replies are Text");
        assert_eq!(payload, br#"{"type":"pong"}"#);
    }
    let handoffs = metric_sum(addr, "docrelay_handoffs_total", relay.cpus().len());
    assert!(handoffs > 0, "no connection took the hand-off path");
}

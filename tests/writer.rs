//! The writer coalesces: frames queued while the socket was busy (or queued in
//! one burst) leave in as few system calls as possible, not one per frame.

mod common;
use common::*;

use std::io::Write;

#[test]
fn pipelined_requests_are_answered_in_order_with_coalesced_writes() {
    let relay = relay(config());
    let addr = relay.local_addr();
    let (mut s, mut pending) = raw_upgrade(addr, "/ws/documents/coalesce");
    let syscalls_before = metric_sum(addr, "docrelay_write_syscalls_total", relay.cpus().len());
    // 1000 messages in one write: the relay reads them in a few reads and
    // queues 1000 replies; the writer must not make 1000 system calls.
    let mut burst = Vec::new();
    for i in 0..1000 {
        burst.extend(client_frame(true, 0x1, format!(r#"{{"type":"ping","n":{i}}}"#).as_bytes()));
    }
    s.write_all(&burst).unwrap();
    for i in 0..1000 {
        let (op, payload) = read_frame(&mut s, &mut pending).unwrap_or_else(|| panic!("reply {i} missing"));
        assert_eq!((op, payload.as_slice()), (0x1, br#"{"type":"pong"}"#.as_slice()), "reply {i}");
    }
    let syscalls_after = metric_sum(addr, "docrelay_write_syscalls_total", relay.cpus().len());
    let used = syscalls_after - syscalls_before;
    eprintln!("1000 replies in {used} write system calls");
    // The metrics requests themselves write one response each (not counted:
    // they are plain HTTP), so `used` is the session's writes alone.
    assert!(used < 100, "1000 replies took {used} write system calls");
}

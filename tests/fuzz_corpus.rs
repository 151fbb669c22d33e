//! The committed seed corpus of the fuzz targets (`fuzz/corpus/<target>/`,
//! docs/fuzzing.md): small valid inputs, made here from the relay's own
//! encoders so that they follow the formats as the code has them.
//!
//! `cargo test --test fuzz_corpus -- --ignored` writes them again; the plain
//! test fails when the committed files are not what this file makes (a format
//! changed and the seeds were not regenerated).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use docrelay::store::record::{self, Kind};
use docrelay::ws::encode_client_frame;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

const KEY_HEADERS: &str = "Host: relay.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_client_frame(&mut out, fin, opcode, MASK, payload);
    out
}

fn http_head() -> Vec<(&'static str, Vec<u8>)> {
    let upgrade = |target: &str, extra: &str| format!("GET {target} HTTP/1.1\r\n{KEY_HEADERS}{extra}\r\n").into_bytes();
    let mut pipelined = upgrade("/ws/documents/doc-1", "");
    pipelined.extend(frame(true, 0x1, br#"{"type":"authenticate","token":"alice"}"#));
    let many = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n", "X-A: b\r\n".repeat(70));
    vec![
        (
            "upgrade_document",
            upgrade(
                "/ws/documents/doc-1?color=%23FF00aa&token=abc",
                "Origin: http://localhost\r\nUser-Agent: seed\r\n",
            ),
        ),
        ("upgrade_pipelined_frame", pipelined),
        ("upgrade_echo", upgrade("/echo", "")),
        (
            "upgrade_bad_key",
            String::from_utf8(upgrade("/ws/documents/d", "")).unwrap().replace("dGhl", "d#hl").into_bytes(),
        ),
        (
            "upgrade_version_12",
            format!("GET /ws/documents/d HTTP/1.1\r\n{}\r\n", KEY_HEADERS.replace("13", "12")).into_bytes(),
        ),
        ("healthz_get", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("metrics_head_query", b"HEAD /metrics?probe=1 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("healthz_http10", b"GET /healthz HTTP/1.0\r\n\r\n".to_vec()),
        ("healthz_bare_lf", b"GET /healthz HTTP/1.1\nHost: x\n\n".to_vec()),
        ("post_metrics", b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec()),
        ("many_headers", many.into_bytes()),
        ("incomplete", b"GET /ws/documents/doc-1 HTTP/1.1\r\nHost: loc".to_vec()),
    ]
}

/// `[limit, stop, n, deltas.., wire..]`, as `fuzz_targets/ws_frames.rs` reads it.
fn ws(limit: u8, stop: u8, deltas: &[u8], wire: &[u8]) -> Vec<u8> {
    let mut out = vec![limit, stop, deltas.len() as u8];
    out.extend_from_slice(deltas);
    out.extend_from_slice(wire);
    out
}

fn ws_frames() -> Vec<(&'static str, Vec<u8>)> {
    // LIMITS index 5 is 1000 bytes, 4 is 126, 7 is 65536.
    let text = frame(true, 0x1, br#"{"type":"ping"}"#);
    let mut fragmented = frame(false, 0x1, b"hel");
    fragmented.extend(frame(true, 0x9, b"p"));
    fragmented.extend(frame(true, 0x0, "lo \u{e9}".as_bytes()));
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    let mut pings = frame(true, 0x9, b"are you there");
    pings.extend(frame(true, 0xA, b""));
    pings.extend(frame(true, 0x8, &close));
    // A 10-byte payload with the 8-byte length form (not minimal, accepted).
    let mut long_form = vec![0x82, 0x80 | 127];
    long_form.extend_from_slice(&10u64.to_be_bytes());
    long_form.extend_from_slice(&MASK);
    long_form.extend((0..10u8).enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    let mut two = text.clone();
    two.extend(frame(true, 0x2, br#"{"type":"cursor","payload":{"at":3}}"#));
    let mut bad_utf8 = frame(false, 0x1, "\u{e9}".as_bytes());
    bad_utf8.extend(frame(true, 0x0, &[0xff]));
    vec![
        ("text", ws(5, 0, &[], &text)),
        ("text_in_pieces", ws(5, 0, &[1, 1, 4, 9], &text)),
        ("fragmented_with_ping", ws(5, 0, &[2, 5, 7, 3], &fragmented)),
        ("binary_126_at_limit", ws(4, 0, &[3, 100], &frame(true, 0x2, &[b'x'; 126]))),
        ("binary_len16", ws(7, 0, &[4, 200], &frame(true, 0x2, &[b'y'; 300]))),
        ("binary_len64_form", ws(5, 0, &[11], &long_form)),
        ("ping_pong_close", ws(5, 0, &[6, 20], &pings)),
        ("stop_after_first", ws(5, 1, &[3, 30], &two)),
        ("unmasked", ws(5, 0, &[], b"\x81\x05hello")),
        ("bad_utf8_fragment", ws(5, 0, &[4], &bad_utf8)),
        ("too_big", ws(2, 0, &[], &frame(true, 0x1, &[b'z'; 17]))),
    ]
}

fn client_message() -> Vec<(&'static str, Vec<u8>)> {
    let m: &[(&'static str, &str)] = &[
        ("authenticate", r#"{"type":"authenticate","token":"alice"}"#),
        ("join_document", r#"{"type":"join_document"}"#),
        ("join_document_since_epoch", r#"{"type":"join_document","since":0,"epoch":"00000000000000ab"}"#),
        ("leave_document", r#"{"type":"leave_document"}"#),
        (
            "operation_string_id",
            r#"{"type":"operation","payload":{"ops":[{"insert":"hi","at":0}]},"client_op_id":"c-1"}"#,
        ),
        (
            "operation_number_id",
            r#" {"client_op_id": 1.25, "payload" : [1, 2.5e3, null, true, "\u00e9"], "type":"operation"}"#,
        ),
        ("operation_null_payload", r#"{"type":"operation","payload":null}"#),
        ("cursor", r#"{"type":"cursor","payload":{"anchor":3,"head":5}}"#),
        ("sync_request", r#"{"type":"sync_request","since":12}"#),
        ("sync_request_epoch", r#"{"type":"sync_request","since":18446744073709551615,"epoch":"00000000000000ab"}"#),
        ("snapshot", r#"{"type":"snapshot","seq":10,"state":{"text":"hello \u00e9"}}"#),
        ("ping", r#"{"type":"ping"}"#),
        ("unknown_type", r#"{"type":"dance"}"#),
        ("not_an_object", r#"["ping"]"#),
        ("duplicate_field", r#"{"type":"ping","type":"ping"}"#),
        ("bad_since", r#"{"type":"sync_request","since":-1}"#),
        ("bad_client_op_id", r#"{"type":"operation","payload":1,"client_op_id":null}"#),
    ];
    m.iter().map(|(n, s)| (*n, s.as_bytes().to_vec())).collect()
}

fn op(seq: u64) -> Vec<u8> {
    format!(r#"{{"type":"operation","seq":{seq},"connection_id":1,"user_id":"alice","payload":{{"i":{seq}}}}}"#)
        .into_bytes()
}

fn records(seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for seq in seqs {
        record::encode(&mut out, Kind::Op, 0xab, seq, "doc-1", &op(seq));
    }
    out
}

fn store_record() -> Vec<(&'static str, Vec<u8>)> {
    // Mode 0: the rest is a segment's records behind a good header.
    let mut two_ops = vec![0];
    two_ops.extend(records(1..=2));
    let mut snapshot = vec![2];
    record::encode(&mut snapshot, Kind::Snapshot, 0xab, 2, "doc-1", br#"{"text":"hello"}"#);
    two_ops.extend_from_slice(&snapshot[1..]);
    let mut torn = vec![0];
    torn.extend(records(1..=2));
    torn.truncate(torn.len() - 5);
    let mut padded = vec![0];
    padded.extend(records(1..=1));
    padded.extend_from_slice(&[0; 40]);
    // Mode 1: `[1, n, len_1 (u16 LE) .., bytes]`, each write block-padded.
    let writes = |mode: u8, ws: &[Vec<u8>]| {
        let mut out = vec![mode, ws.len() as u8];
        for w in ws {
            out.extend_from_slice(&(w.len() as u16).to_le_bytes());
        }
        for w in ws {
            out.extend_from_slice(w);
        }
        out
    };
    let two_writes = writes(1, &[records(1..=2), records(3..=3)]);
    let mut damaged_first = [records(1..=2), records(3..=4)];
    damaged_first[0][30] ^= 0x40;
    let damaged = writes(3, &damaged_first);
    let mut whole_segment = record::header(7, 0).to_vec();
    whole_segment.extend(records(1..=1));
    vec![
        ("records_and_snapshot", two_ops),
        ("snapshot", snapshot),
        ("torn_tail", torn),
        ("padding", padded),
        ("two_writes", two_writes),
        ("damaged_first_write", damaged),
        ("header_and_record", whole_segment),
    ]
}

fn corpus() -> BTreeMap<&'static str, Vec<(&'static str, Vec<u8>)>> {
    BTreeMap::from([
        ("http_head", http_head()),
        ("ws_frames", ws_frames()),
        ("client_message", client_message()),
        ("store_record", store_record()),
    ])
}

fn dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

#[test]
#[ignore = "writes fuzz/corpus; run with --ignored after a format change"]
fn write_fuzz_seed_corpus() {
    for (target, seeds) in corpus() {
        let dir = dir(target);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

#[test]
fn the_committed_seed_corpus_is_what_this_file_makes() {
    let mut total = 0;
    for (target, seeds) in corpus() {
        let mut on_disk: Vec<String> = std::fs::read_dir(dir(target))
            .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        on_disk.sort();
        let mut names: Vec<String> = seeds.iter().map(|(n, _)| n.to_string()).collect();
        names.sort();
        assert_eq!(on_disk, names, "fuzz/corpus/{target}: run `cargo test --test fuzz_corpus -- --ignored`");
        for (name, bytes) in seeds {
            let committed = std::fs::read(dir(target).join(name)).unwrap();
            assert!(
                committed == bytes,
                "fuzz/corpus/{target}/{name} is stale: run `cargo test --test fuzz_corpus -- --ignored`"
            );
            total += committed.len();
        }
    }
    assert!(total < 200 * 1024, "the seed corpus is {total} bytes");
}

//! Property tests of the WebSocket frame reader (`docrelay::ws::FrameReader`):
//! for arbitrary sequences of client frames (Text and Binary messages, whole
//! or fragmented with Ping and Pong between the fragments, a Close at the
//! end; masked, with payload sizes at the length encodings' boundaries 125,
//! 126, 65535 and 65536), the events are those the frames stand for, whether
//! the wire bytes are fed whole, cut at any one byte boundary, cut at every
//! frame header's edges, cut at arbitrary points, or fed byte by byte.

use docrelay::ws::{encode_client_frame, Event, Flow, FrameReader, WsError};
use proptest::prelude::*;

/// `limits.max_message_bytes`' default.
const MAX_MESSAGE: usize = 1 << 20;

/// A Close frame's payload: `None` for an empty one, else code and reason.
type ClosePayload = Option<(u16, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Owned {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(ClosePayload),
}

/// Deterministic filler: payloads are described by (length, seed), so that a
/// 64 KiB payload costs proptest one number, not 65536 value trees.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Valid UTF-8 of exactly `len` bytes, with code points of every width.
fn text(len: usize, seed: u64) -> String {
    let mut s = String::with_capacity(len);
    let picks = bytes(len, seed);
    let mut i = 0;
    while s.len() < len {
        let room = len - s.len();
        let c = match picks[i] % 8 {
            0 if room >= 2 => 'é',
            1 if room >= 3 => '€',
            2 if room >= 4 => '😀',
            _ => (b'a' + picks[i] % 26) as char,
        };
        s.push(c);
        i += 1;
    }
    s
}

/// Fragment and control payload lengths, around the encodings' edges.
fn data_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0usize..8,
        4 => 8usize..300,
        2 => prop::sample::select(vec![124usize, 125, 126, 127, 128]),
        1 => prop::sample::select(vec![65534usize, 65535, 65536, 65537]),
    ]
}

fn control_len() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0usize..8, 1 => 8usize..125, 1 => prop::sample::select(vec![124usize, 125])]
}

fn mask() -> impl Strategy<Value = [u8; 4]> {
    prop_oneof![1 => Just([0u8; 4]), 4 => any::<[u8; 4]>()]
}

#[derive(Debug, Clone)]
struct Control {
    ping: bool,
    len: usize,
    seed: u64,
    mask: [u8; 4],
}

fn control() -> impl Strategy<Value = Control> {
    (any::<bool>(), control_len(), any::<u64>(), mask()).prop_map(|(ping, len, seed, mask)| Control {
        ping,
        len,
        seed,
        mask,
    })
}

#[derive(Debug, Clone)]
enum Message {
    /// A Text or Binary message in fragments (one: unfragmented), each with
    /// its mask, and the control frames sent after each fragment but the last.
    Data {
        text: bool,
        fragments: Vec<(usize, [u8; 4])>,
        seed: u64,
        between: Vec<Vec<Control>>,
    },
    Control(Control),
}

fn message() -> impl Strategy<Value = Message> {
    let data = (
        any::<bool>(),
        prop::collection::vec((data_len(), mask()), 1..4),
        any::<u64>(),
        prop::collection::vec(prop::collection::vec(control(), 0..3), 3),
    )
        .prop_map(|(text, fragments, seed, between)| Message::Data { text, fragments, seed, between });
    prop_oneof![3 => data, 1 => control().prop_map(Message::Control)]
}

#[derive(Debug, Clone)]
struct Stream {
    messages: Vec<Message>,
    /// A Close at the end, with its mask.
    close: Option<(ClosePayload, [u8; 4])>,
}

fn stream() -> impl Strategy<Value = Stream> {
    let code = prop::sample::select(vec![1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4000, 4999]);
    let reason =
        prop::collection::vec(prop::sample::select(vec!['a', 'z', 'é', '€', ' ']), 0..20).prop_map(String::from_iter);
    let payload = prop::option::of((code, reason));
    (prop::collection::vec(message(), 0..6), prop::option::of((payload, mask())))
        .prop_map(|(messages, close)| Stream { messages, close })
}

/// Appends one frame and notes where it starts and its header's length.
fn put(wire: &mut Vec<u8>, frames: &mut Vec<(usize, usize)>, fin: bool, opcode: u8, mask: [u8; 4], payload: &[u8]) {
    let start = wire.len();
    encode_client_frame(wire, fin, opcode, mask, payload);
    frames.push((start, wire.len() - start - payload.len()));
}

/// The wire bytes, the events they stand for, and where each frame starts
/// with its header length.
fn encode(s: &Stream) -> (Vec<u8>, Vec<Owned>, Vec<(usize, usize)>) {
    let (mut wire, mut events, mut frames) = (Vec::new(), Vec::new(), Vec::new());
    let control = |wire: &mut Vec<u8>, frames: &mut Vec<(usize, usize)>, events: &mut Vec<Owned>, c: &Control| {
        let payload = bytes(c.len, c.seed);
        put(wire, frames, true, if c.ping { 0x9 } else { 0xA }, c.mask, &payload);
        events.push(if c.ping { Owned::Ping(payload) } else { Owned::Pong(payload) });
    };
    for m in &s.messages {
        match m {
            Message::Control(c) => control(&mut wire, &mut frames, &mut events, c),
            Message::Data { text: is_text, fragments, seed, between } => {
                let total: usize = fragments.iter().map(|f| f.0).sum();
                let whole = if *is_text { text(total, *seed).into_bytes() } else { bytes(total, *seed) };
                let mut at = 0;
                for (i, &(len, mask)) in fragments.iter().enumerate() {
                    let last = i + 1 == fragments.len();
                    let opcode = match (i, is_text) {
                        (0, true) => 0x1,
                        (0, false) => 0x2,
                        _ => 0x0,
                    };
                    put(&mut wire, &mut frames, last, opcode, mask, &whole[at..at + len]);
                    at += len;
                    if !last {
                        for c in &between[i] {
                            control(&mut wire, &mut frames, &mut events, c);
                        }
                    }
                }
                events.push(if *is_text {
                    Owned::Text(String::from_utf8(whole).expect("made as UTF-8"))
                } else {
                    Owned::Binary(whole)
                });
            }
        }
    }
    if let Some((payload, mask)) = &s.close {
        let bytes = match payload {
            None => Vec::new(),
            Some((code, reason)) => {
                let mut b = code.to_be_bytes().to_vec();
                b.extend_from_slice(reason.as_bytes());
                b
            }
        };
        put(&mut wire, &mut frames, true, 0x8, *mask, &bytes);
        events.push(Owned::Close(payload.clone()));
        // After the Close nothing more is read: these bytes must not matter.
        encode_client_frame(&mut wire, true, 0x1, [1, 2, 3, 4], b"after the close");
        wire.extend_from_slice(b"\xff\xff garbage");
    }
    (wire, events, frames)
}

/// Feeds `wire` cut at `cuts` (sorted positions) and returns the events and
/// whether the reader stopped (after a Close).
fn feed(wire: &[u8], cuts: &[usize]) -> Result<(Vec<Owned>, bool), WsError> {
    let mut reader = FrameReader::new(MAX_MESSAGE);
    let mut events = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&wire.len())) {
        let mut piece = wire[from..cut.max(from)].to_vec();
        from = cut.max(from);
        let flow = reader.feed(&mut piece, |e| {
            events.push(match e {
                Event::Text(t) => Owned::Text(t.to_owned()),
                Event::Binary(b) => Owned::Binary(b.to_vec()),
                Event::Ping(p) => Owned::Ping(p.to_vec()),
                Event::Pong(p) => Owned::Pong(p.to_vec()),
                Event::Close(c) => Owned::Close(c.map(|(code, why)| (code, why.to_owned()))),
            });
            Flow::Continue
        })?;
        if flow == Flow::Stop {
            return Ok((events, true));
        }
    }
    Ok((events, false))
}

/// Compares events without printing 64 KiB payloads in a failure.
fn same(got: &Result<(Vec<Owned>, bool), WsError>, want: &(Vec<Owned>, bool), how: &str) -> Result<(), TestCaseError> {
    let brief = |e: &[Owned]| {
        e.iter()
            .map(|e| match e {
                Owned::Text(t) => format!("text({})", t.len()),
                Owned::Binary(b) => format!("binary({})", b.len()),
                Owned::Ping(p) => format!("ping({})", p.len()),
                Owned::Pong(p) => format!("pong({})", p.len()),
                Owned::Close(c) => format!("close({c:?})"),
            })
            .collect::<Vec<_>>()
    };
    match got {
        Ok(got) if got == want => Ok(()),
        Ok((events, stopped)) => Err(TestCaseError::fail(format!(
            "{how}: got {:?} (stopped {stopped}), want {:?} (stopped {})",
            brief(events),
            brief(&want.0),
            want.1
        ))),
        Err(e) => Err(TestCaseError::fail(format!("{how}: {e}"))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn events_are_the_same_however_the_bytes_are_cut(
        s in stream(),
        random_cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
    ) {
        let (wire, events, frames) = encode(&s);
        let want = (events, s.close.is_some());
        same(&feed(&wire, &[]), &want, "whole")?;

        let mut cuts: Vec<usize> = random_cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        cuts.sort_unstable();
        same(&feed(&wire, &cuts), &want, &format!("cut at {cuts:?}"))?;

        // Around every frame's first byte, its length bytes and its mask.
        let mut edges: Vec<usize> = frames
            .iter()
            .flat_map(|&(start, header)| [start, start + 1, start + 2, start + 3, start + header - 1, start + header, start + header + 1])
            .filter(|&c| c <= wire.len())
            .collect();
        edges.sort_unstable();
        edges.dedup();
        same(&feed(&wire, &edges), &want, "cut at every header's edges")?;

        if wire.len() <= 2048 {
            for cut in 0..=wire.len() {
                same(&feed(&wire, &[cut]), &want, &format!("cut at {cut}"))?;
            }
            let every: Vec<usize> = (1..wire.len()).collect();
            same(&feed(&wire, &every), &want, "byte by byte")?;
        }
    }
}

/// The sizes at the boundaries, each on its own, whole and cut in the
/// header and one byte before the end (so the strategy's weights cannot
/// leave one out).
#[test]
fn every_length_encoding_boundary_reads_back() {
    for len in [0usize, 1, 125, 126, 127, 65535, 65536, 65537] {
        for opcode in [0x1u8, 0x2] {
            let payload = if opcode == 0x1 { text(len, 7).into_bytes() } else { bytes(len, 7) };
            let mut wire = Vec::new();
            encode_client_frame(&mut wire, true, opcode, [9, 8, 7, 6], &payload);
            let want =
                if opcode == 0x1 { Owned::Text(String::from_utf8(payload).unwrap()) } else { Owned::Binary(payload) };
            for cuts in [vec![], vec![1], vec![2, 3], vec![wire.len() - 1], vec![1, 4, wire.len() - 1]] {
                let got = feed(&wire, &cuts).unwrap();
                assert!(got == (vec![want.clone()], false), "length {len}, opcode {opcode}, cut at {cuts:?}");
            }
        }
    }
}

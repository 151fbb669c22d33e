//! The WebSocket frame reader (`docrelay::ws::FrameReader`) on arbitrary
//! client bytes, fed whole and fed in arbitrary pieces.
//!
//! Input: `[limit, stop, n, d_1 .. d_n, wire ..]`. `limit` picks the reader's
//! `max_message`; `stop` (if 1 to 63) makes the session answer `Flow::Stop`
//! at that event; the `n % 16` deltas `d_i` cut `wire` into pieces at the
//! running sums (a delta of 0 is an empty read).
//!
//! Checks, beyond "never panics": the events, and how the reading ended
//! (still open, stopped, or failed with which close code and reason), are the
//! same whole and in pieces; every message respects `max_message`, every
//! control payload 125 bytes; nothing is delivered after a Close or a Stop.
#![no_main]

use docrelay::ws::{Event, Flow, FrameReader, WsError};
use libfuzzer_sys::fuzz_target;

/// `max_message` choices around the length encodings' boundaries.
const LIMITS: [usize; 8] = [0, 1, 16, 125, 126, 1000, 65535, 65536];

#[derive(Debug, PartialEq, Eq)]
enum Owned {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Open,
    Stopped,
    Failed(WsError),
}

fn read(max: usize, stop: usize, pieces: &[&[u8]]) -> (Vec<Owned>, End) {
    let mut reader = FrameReader::new(max);
    let mut events = Vec::new();
    for piece in pieces {
        let mut buf = piece.to_vec();
        let flow = reader.feed(&mut buf, |e| {
            assert!(!matches!(events.last(), Some(Owned::Close(_))), "an event after Close");
            events.push(match e {
                Event::Text(t) => {
                    assert!(t.len() <= max);
                    Owned::Text(t.to_owned())
                }
                Event::Binary(b) => {
                    assert!(b.len() <= max);
                    Owned::Binary(b.to_vec())
                }
                Event::Ping(p) => {
                    assert!(p.len() <= 125);
                    Owned::Ping(p.to_vec())
                }
                Event::Pong(p) => {
                    assert!(p.len() <= 125);
                    Owned::Pong(p.to_vec())
                }
                Event::Close(c) => Owned::Close(c.map(|(code, why)| (code, why.to_owned()))),
            });
            if events.len() == stop {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        match flow {
            Ok(Flow::Continue) => {
                assert!(events.len() < stop, "the session said Stop, the reader went on");
            }
            Ok(Flow::Stop) => return (events, End::Stopped),
            Err(e) => return (events, End::Failed(e)),
        }
    }
    (events, End::Open)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let max = LIMITS[data[0] as usize % LIMITS.len()];
    let stop = match data[1] as usize {
        0 | 64.. => usize::MAX,
        s => s,
    };
    let n = data[2] as usize % 16;
    let Some(deltas) = data.get(3..3 + n) else { return };
    let wire = &data[3 + n..];

    let whole = read(max, stop, &[wire]);

    let mut pieces = Vec::new();
    let mut at = 0;
    for &d in deltas {
        let end = (at + d as usize).min(wire.len());
        pieces.push(&wire[at..end]);
        at = end;
    }
    pieces.push(&wire[at..]);
    let split = read(max, stop, &pieces);
    assert_eq!(whole, split, "whole and in pieces {:?}", pieces.iter().map(|p| p.len()).collect::<Vec<_>>());

    // One byte at a time: the worst case for the partial-frame path.
    if wire.len() <= 512 {
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(whole, read(max, stop, &bytes), "whole and byte by byte");
    }
});

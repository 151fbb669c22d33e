//! Micro-benchmarks of the per-message work on the hot path: parsing masked
//! client frames, encoding server frames, and parsing a client message with
//! its raw payload.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use docrelay::ws::{Flow, FrameReader, Kind, OutFrame};

fn masked_frames(count: usize, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(0x81);
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    }
    out
}

fn frame_parse(c: &mut Criterion) {
    let payload = format!(r#"{{"type":"operation","payload":"{}"}}"#, "x".repeat(990));
    let wire = masked_frames(64, payload.as_bytes());
    let mut g = c.benchmark_group("frame_parse");
    g.throughput(Throughput::Elements(64));
    g.bench_function("64 x 1 KiB text frames", |b| {
        let mut reader = FrameReader::new(1 << 20);
        let mut buf = wire.clone();
        b.iter(|| {
            buf.copy_from_slice(&wire);
            let mut n = 0;
            reader
                .feed(&mut buf, |_| {
                    n += 1;
                    Flow::Continue
                })
                .unwrap();
            black_box(n)
        })
    });
    // The same frames arriving in 4000-byte reads, so that about every
    // fourth frame is split across two reads.
    g.bench_function("64 x 1 KiB text frames, 4000-byte reads", |b| {
        let mut reader = FrameReader::new(1 << 20);
        let mut buf = wire.clone();
        b.iter(|| {
            buf.copy_from_slice(&wire);
            let mut n = 0;
            for chunk in buf.chunks_mut(4000) {
                reader
                    .feed(chunk, |_| {
                        n += 1;
                        Flow::Continue
                    })
                    .unwrap();
            }
            black_box(n)
        })
    });
    g.finish();
}

fn frame_encode(c: &mut Criterion) {
    let payload = vec![b'x'; 1024];
    c.bench_function("frame_encode 1 KiB binary", |b| b.iter(|| black_box(OutFrame::new(Kind::Binary, &payload))));
}

fn message_parse(c: &mut Criterion) {
    let msg =
        format!(r#"{{"type":"operation","client_op_id":"c-1","payload":{{"ops":[{}]}}}}"#, "1,".repeat(300) + "1");
    c.bench_function("message_parse operation ~1 KiB", |b| {
        b.iter(|| black_box(docrelay::protocol::parse(msg.as_bytes()).unwrap().1.payload.unwrap().get().len()))
    });
}

fn message_parse_text(c: &mut Criterion) {
    let msg =
        format!(r#"{{"type":"operation","client_op_id":"c-1","payload":{{"ops":[{}]}}}}"#, "1,".repeat(300) + "1");
    // A Text frame's message: UTF-8 was checked by the frame reader, so the
    // parser does not check it again.
    c.bench_function("message_parse_text operation ~1 KiB", |b| {
        b.iter(|| black_box(docrelay::protocol::parse_text(&msg).unwrap().1.payload.unwrap().get().len()))
    });
}

criterion_group!(benches, frame_parse, frame_encode, message_parse, message_parse_text);
criterion_main!(benches);

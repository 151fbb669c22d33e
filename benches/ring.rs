//! Fan-out on one core without sockets: publishing an operation into a
//! document ring and every subscriber's cursor reading it (what a writer's
//! refill does), for 100 and 1000 subscribers.

use std::rc::Rc;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use docrelay::document::{Capacity, DocumentHub, Read, Subscriber};
use docrelay::protocol::Participant;
use docrelay::ws::{Kind, OutFrame};

struct Quiet;
impl Subscriber for Quiet {
    fn notify(&self) {}
}

fn ring_publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_publish_and_read");
    for subs in [100usize, 1000] {
        g.throughput(Throughput::Elements(subs as u64));
        g.bench_with_input(BenchmarkId::from_parameter(subs), &subs, |b, &subs| {
            let hub = DocumentHub::new("bench", Capacity { ring: 1024, presence: 256, history: 10_000 });
            for i in 0..subs {
                let p = Participant {
                    connection_id: i as u64,
                    user_id: String::new(),
                    user_name: String::new(),
                    color: String::new(),
                };
                hub.subscribe(p, Rc::new(Quiet));
            }
            let mut cursors = vec![1u64; subs];
            let payload = vec![b'x'; 1024];
            b.iter(|| {
                let seq = hub.seq() + 1;
                hub.publish_op(seq, u64::MAX, Rc::new(OutFrame::new(Kind::Binary, &payload)));
                let mut delivered = 0;
                for cur in cursors.iter_mut() {
                    if let (Read::Entry(_), Some(e)) = hub.ops.read(cur) {
                        delivered += e.frame.bytes().len();
                    }
                }
                black_box(delivered)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, ring_publish);
criterion_main!(benches);

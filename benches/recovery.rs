//! Recovery time at start (`docs/storage.md`, "Recovery"): a log of
//! 1,000,000 operations over 10,000 documents, written in the relay's own
//! format (64 MiB segments, one block-padded write per 50 records, as group
//! commits leave them), then recovered as the relay does at start.
//!
//!     cargo bench --bench recovery [-- OPS DOCUMENTS PAYLOAD_BYTES]
//!
//! Prints the log's size, then the recovery time of three runs: the first
//! after dropping nothing (page cache warm from writing), as a restart
//! finds it right after a crash.

use std::io::Write;
use std::time::Instant;

use docrelay::store::record::{self, Kind};
use docrelay::store::recover::{recover, segment_name};

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let ops = args.first().copied().unwrap_or(1_000_000);
    let docs = args.get(1).copied().unwrap_or(10_000);
    let payload = args.get(2).copied().unwrap_or(100) as usize;
    let segment_bytes: u64 = 64 << 20;
    let dir = std::env::temp_dir().join(format!("docrelay-recovery-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // Write the log.
    let started = Instant::now();
    let mut n = 1;
    let mut seg = record::header(n, 0).to_vec();
    let mut seqs = vec![0u64; docs as usize];
    let mut total = 0u64;
    let body = "x".repeat(payload.saturating_sub(60));
    for i in 0..ops {
        let d = (i.wrapping_mul(2_654_435_761) % docs) as usize;
        seqs[d] += 1;
        let doc = format!("doc-{d}");
        let data = format!(
            r#"{{"type":"operation","seq":{},"connection_id":{},"user_id":"u{}","payload":{{"t":"{body}"}}}}"#,
            seqs[d],
            i % 5000,
            i % 97
        );
        record::encode(&mut seg, Kind::Op, 0x5eed + d as u64, seqs[d], &doc, data.as_bytes());
        if i % 50 == 49 {
            seg.resize(record::align_up(seg.len() as u64) as usize, 0);
            if seg.len() as u64 >= segment_bytes {
                total += seg.len() as u64;
                write_segment(&dir, n, &seg);
                n += 1;
                seg = record::header(n, 0).to_vec();
            }
        }
    }
    seg.resize(record::align_up(seg.len() as u64) as usize, 0);
    total += seg.len() as u64;
    write_segment(&dir, n, &seg);
    println!(
        "log: {ops} operations over {docs} documents, {} segments, {:.1} MiB, written in {:.2} s",
        n,
        total as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );

    for run in 1..=3 {
        let started = Instant::now();
        let r = recover(&dir, 1, 10_000, segment_bytes).expect("recovery");
        let elapsed = started.elapsed();
        let seq_sum: u64 = r.cores[0].docs.values().map(|d| d.seq).sum();
        assert_eq!(seq_sum, ops, "every operation recovered");
        assert_eq!(r.cores[0].docs.len() as u64, docs);
        println!(
            "recovery run {run}: {:.0} ms ({} records, {} documents, {:.0} MB/s)",
            elapsed.as_secs_f64() * 1000.0,
            r.report.records,
            r.report.documents,
            total as f64 / elapsed.as_secs_f64() / 1e6
        );
        drop(r);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn write_segment(dir: &std::path::Path, n: u64, bytes: &[u8]) {
    let mut f = std::fs::File::create(dir.join(segment_name(0, n))).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_data().unwrap();
}

//! Latency of one 4 KiB write + sync through glommio, on the file system of
//! the current directory, in six ways: DMA appending (`dma`; `-dsync`: the
//! file opened with `O_DSYNC` instead of an `fdatasync` after each write),
//! DMA into a file made with `fallocate`, DMA into a file written full of
//! zeros and synced beforehand (`dma-zeroed`, `dma-zeroed-dsync`: how the
//! log writes with `storage.preallocate`), and buffered:
//!
//!     cargo run --release --example dma_latency [-- WRITES [churn]]
//!
//! `churn` adds a thread that writes, syncs and deletes 64 MiB files
//! meanwhile: on the 2-CPU VM of README "Performance" that took every
//! variant's p99 from about 0.5 ms to 27–30 ms, prepared files included.
use glommio::io::{BufferedFile, DmaFile, OpenOptions};
use glommio::{LocalExecutorBuilder, Placement};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3000);
    // With a second argument `churn`: meanwhile, another thread writes and
    // deletes 64 MiB files (as compaction deletes dead segments).
    if std::env::args().nth(2).as_deref() == Some("churn") {
        std::thread::spawn(|| loop {
            let path = "docrelay-latency-churn.tmp";
            let mut f = std::fs::File::create(path).unwrap();
            let chunk = vec![1u8; 1 << 20];
            for _ in 0..64 {
                std::io::Write::write_all(&mut f, &chunk).unwrap();
            }
            f.sync_all().unwrap();
            drop(f);
            std::fs::remove_file(path).unwrap();
        });
    }
    LocalExecutorBuilder::new(Placement::Fixed(0))
        .io_memory(64 << 10)
        .spawn(move || async move {
            for kind in ["dma", "dma-dsync", "dma-fallocate", "dma-zeroed", "dma-zeroed-dsync", "buffered"] {
                let path = format!("docrelay-latency-{kind}.tmp");
                let _ = std::fs::remove_file(&path);
                let mut ts = Vec::with_capacity(n);
                if kind == "buffered" {
                    let f = BufferedFile::create(&path).await.unwrap();
                    for i in 0..n {
                        let t = Instant::now();
                        f.write_at(vec![b'x'; 4096], (i * 4096) as u64).await.unwrap();
                        f.fdatasync().await.unwrap();
                        ts.push(t.elapsed());
                    }
                } else {
                    let dsync = kind.ends_with("-dsync");
                    let mut o = OpenOptions::new();
                    o.write(true).create_new(true);
                    if dsync {
                        o.custom_flags(libc::O_DSYNC);
                    }
                    let f: DmaFile = o.dma_open(&path).await.unwrap();
                    if kind == "dma-fallocate" {
                        f.pre_allocate(64 << 20, false).await.unwrap();
                    }
                    if kind.starts_with("dma-zeroed") {
                        // Every block written once and synced: later writes
                        // overwrite allocated, initialised blocks.
                        for at in (0..(n * 4096) as u64).step_by(1 << 20) {
                            let mut b = f.alloc_dma_buffer(1 << 20);
                            b.as_bytes_mut().fill(0);
                            f.write_at(b, at).await.unwrap();
                        }
                        f.fdatasync().await.unwrap();
                    }
                    for i in 0..n {
                        let mut b = f.alloc_dma_buffer(4096);
                        b.as_bytes_mut().fill(b'x');
                        let t = Instant::now();
                        f.write_at(b, (i * 4096) as u64).await.unwrap();
                        if !dsync {
                            f.fdatasync().await.unwrap();
                        }
                        ts.push(t.elapsed());
                    }
                }
                ts.sort();
                let q = |p: f64| ts[((n as f64 * p) as usize).min(n - 1)].as_secs_f64() * 1e3;
                println!("{kind:14} p50 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} ms", q(0.5), q(0.99), q(0.999), q(1.0));
                let _ = std::fs::remove_file(&path);
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

//! Recovery at start (`docs/storage.md`, "Recovery"): scans every segment
//! under `storage.dir`, rebuilds each document's seq, epoch, live operations
//! and latest snapshot, cuts torn or corrupt tails, moves documents whose
//! owner core changed (a new `cores` setting) into their new owner's log,
//! and deletes segments left without live records.
//!
//! It runs once, on the starting thread, before any core serves: plain
//! blocking file I/O is right here. The cores then own their part of the
//! index and write only through glommio.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::index::{Index, Loc};
use super::record::{self, Scanned, BLOCK, HEADER_BYTES};
use super::Epoch;
use crate::placement::owner_core;

/// A segment's file name: writer core and segment number.
pub fn segment_name(core: usize, n: u64) -> String {
    format!("{core:03}-{n:010}.log")
}

fn parse_name(name: &str) -> Option<(usize, u64)> {
    let stem = name.strip_suffix(".log")?;
    let (core, n) = stem.split_once('-')?;
    if core.len() != 3 || n.len() != 10 {
        return None;
    }
    Some((core.parse().ok()?, n.parse().ok()?))
}

/// What recovery found and did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub segments: usize,
    pub bytes: u64,
    pub records: u64,
    pub documents: usize,
    pub damaged: usize,
    pub moved_documents: usize,
    pub deleted_segments: usize,
    pub elapsed: Duration,
}

/// The recovered log: one index per core, and the next segment number.
#[derive(Debug)]
pub struct Recovered {
    pub cores: Vec<Index>,
    pub next_segment: u64,
    pub report: Report,
    /// Held for the relay's life: a second relay on the same directory is
    /// refused instead of corrupting it.
    pub lock: File,
}

/// Why recovery could not run at all. Damage inside segments is not an
/// error: it is logged and cut.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("storage.dir {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
    #[error("storage.dir {0} is in use by another docrelay process (its LOCK file is held)")]
    Locked(PathBuf),
}

/// Recovers the log under `dir` for `cores` cores keeping `window`
/// operations per document; segments grow to about `segment_bytes`.
pub fn recover(dir: &Path, cores: usize, window: usize, segment_bytes: u64) -> Result<Recovered, RecoverError> {
    let io = |source| RecoverError::Io { dir: dir.to_path_buf(), source };
    let started = Instant::now();
    std::fs::create_dir_all(dir).map_err(io)?;
    let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("LOCK")).map_err(io)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(RecoverError::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    let mut files: Vec<(u64, usize, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        if let Some((core, n)) = name.to_str().and_then(parse_name) {
            files.push((n, core, entry.path()));
        }
    }
    files.sort();
    let mut report = Report { segments: files.len(), ..Report::default() };
    let mut index = Index::new(window);
    let mut found = Found::new(window);
    let mut paths: HashMap<u64, PathBuf> = HashMap::new();
    for (n, core, path) in &files {
        let bytes = std::fs::read(path).map_err(io)?;
        report.bytes += bytes.len() as u64;
        paths.insert(*n, path.clone());
        index.segments.entry(*n).or_default().core = *core;
        match record::check_header(&bytes) {
            Ok(named) if named == *n => {}
            // A segment created but never written (a crash right after the
            // roll, or a segment prepared ahead of need, empty or full of
            // zeros) has no header yet: nothing of it was stored, and it is
            // deleted below as a segment without live records.
            Err(_) if bytes.iter().all(|&b| b == 0) => continue,
            other => {
                // Not ours to interpret: set aside, never deleted.
                let why = match other {
                    Ok(_) => "the segment header names another segment",
                    Err(why) => why,
                };
                let aside = path.with_extension("log.damaged");
                warn!(segment = %path.display(), offset = 0, why, moved_to = %aside.display(), "unreadable segment; set aside");
                std::fs::rename(path, &aside).map_err(io)?;
                index.segments.remove(n);
                report.damaged += 1;
                continue;
            }
        }
        let mut valid_end = bytes.len() as u64;
        // The end of the last intact record.
        let mut data_end = HEADER_BYTES;
        for item in record::Scanner::new(&bytes) {
            match item {
                Scanned::Record { at, len, record } => {
                    data_end = at + len as u64;
                    report.records += 1;
                    index.segments.get_mut(n).expect("listed").records += 1;
                    let loc = Loc { segment: *n, offset: at, len: len as u32 };
                    found.add(record.document, record.kind, Epoch(record.epoch), record.seq, loc);
                }
                Scanned::Damage { at, why, resumed } => {
                    report.damaged += 1;
                    match resumed {
                        Some(r) => warn!(
                            segment = %path.display(),
                            offset = at,
                            resumed_at = r,
                            why,
                            "damaged log record: skipped to the next intact write"
                        ),
                        None => {
                            warn!(segment = %path.display(), offset = at, why, "damaged log tail: cutting the segment here");
                            valid_end = at;
                        }
                    }
                }
            }
        }
        // What follows the last intact write is zeros (a segment prepared
        // ahead of need) or cut as damage: either way it is given back, as
        // the log never writes to a segment again after a restart.
        valid_end = valid_end.min(record::align_up(data_end));
        if valid_end < bytes.len() as u64 {
            let f = OpenOptions::new().write(true).open(path).map_err(io)?;
            f.set_len(valid_end).and_then(|()| f.sync_data()).map_err(io)?;
        }
    }
    found.finish(&mut index);
    let mut next_segment = files.last().map_or(1, |(n, _, _)| n + 1);
    report.documents = index.docs.len();

    // Documents whose owner core changed: copy their live records into a
    // segment of the new owner (the copies supersede the originals).
    let mut moving: Vec<(usize, Box<str>)> = Vec::new();
    for (doc, d) in &index.docs {
        let owner = owner_core(doc, cores);
        if d.locs().any(|l| index.segments.get(&l.segment).is_none_or(|s| s.core != owner)) {
            moving.push((owner, doc.clone()));
        }
    }
    moving.sort();
    report.moved_documents = moving.len();
    let mut i = 0;
    while i < moving.len() {
        let owner = moving[i].0;
        let mut out = SegmentWriter::create(dir, owner, next_segment).map_err(io)?;
        index.segments.insert(next_segment, Default::default());
        index.segments.get_mut(&next_segment).expect("added").core = owner;
        while i < moving.len() && moving[i].0 == owner && out.len < segment_bytes {
            let doc = moving[i].1.clone();
            let locs: Vec<Loc> = index.docs[&doc].locs().collect();
            for l in locs {
                let src = File::open(&paths[&l.segment]).map_err(io)?;
                let mut buf = vec![0; l.len as usize];
                src.read_exact_at(&mut buf, l.offset).map_err(io)?;
                let (r, _) = record::decode(&buf).map_err(|_| {
                    io(std::io::Error::new(std::io::ErrorKind::InvalidData, "a record changed while being moved"))
                })?;
                let at = out.push(&buf);
                index.segments.get_mut(&next_segment).expect("added").records += 1;
                let loc = Loc { segment: next_segment, offset: at, len: l.len };
                index.add(&doc, r.kind, Epoch(r.epoch), r.seq, loc);
            }
            i += 1;
        }
        paths.insert(next_segment, out.path.clone());
        out.finish().map_err(io)?;
        next_segment += 1;
    }

    // The moved documents' new segments are in the directory for good
    // before the originals can go.
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    // Compaction of what recovery made dead.
    for n in index.dead_segments(None) {
        std::fs::remove_file(&paths[&n]).map_err(io)?;
        index.segments.remove(&n);
        report.deleted_segments += 1;
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;

    // One index per core.
    let mut per_core: Vec<Index> = (0..cores).map(|_| Index::new(window)).collect();
    for (n, s) in std::mem::take(&mut index.segments) {
        per_core[s.core.min(cores - 1)].segments.insert(n, s);
    }
    for (doc, d) in index.docs.drain() {
        per_core[owner_core(&doc, cores)].docs.insert(doc, d);
    }
    report.elapsed = started.elapsed();
    info!(
        dir = %dir.display(),
        segments = report.segments,
        bytes = report.bytes,
        records = report.records,
        documents = report.documents,
        damaged = report.damaged,
        moved_documents = report.moved_documents,
        deleted_segments = report.deleted_segments,
        ms = report.elapsed.as_millis() as u64,
        "storage recovered"
    );
    Ok(Recovered { cores: per_core, next_segment, report, lock })
}

/// The records found for each document, in any order: a document's records
/// are not in seq order on disk once some were copied (compaction copies a
/// segment's live records behind newer ones; a change of cores copies
/// documents into new segments). The latest copy of a record wins.
struct Found {
    window: usize,
    docs: HashMap<Box<str>, FoundDoc>,
}

#[derive(Default)]
struct FoundDoc {
    ops: std::collections::BTreeMap<u64, (Epoch, Loc)>,
    snapshot: Option<(u64, Epoch, Loc)>,
}

impl Found {
    fn new(window: usize) -> Found {
        Found { window: window.max(1), docs: HashMap::new() }
    }

    fn add(&mut self, document: &str, kind: record::Kind, epoch: Epoch, seq: u64, loc: Loc) {
        let d = match self.docs.get_mut(document) {
            Some(d) => d,
            None => self.docs.entry(document.into()).or_default(),
        };
        match kind {
            record::Kind::Op => {
                d.ops.insert(seq, (epoch, loc));
                // Only the last `window` seqs can be kept: bound the memory
                // a long log takes while it is read.
                if d.ops.len() > 2 * self.window + 64 {
                    let max = *d.ops.keys().next_back().expect("not empty");
                    d.ops = d.ops.split_off(&(max + 1).saturating_sub(self.window as u64));
                }
            }
            record::Kind::Snapshot => {
                if d.snapshot.is_none_or(|(s, _, _)| seq >= s) {
                    d.snapshot = Some((seq, epoch, loc));
                }
            }
        }
    }

    /// Adds each document's live records to `index`: the contiguous run of
    /// operations ending at its highest seq (at most `window`), and its
    /// latest snapshot.
    fn finish(self, index: &mut Index) {
        for (doc, d) in self.docs {
            let mut run: Vec<(u64, Epoch, Loc)> = Vec::new();
            for (&seq, &(epoch, loc)) in d.ops.iter().rev() {
                if run.len() == self.window || run.last().is_some_and(|(s, _, _)| *s != seq + 1) {
                    break;
                }
                run.push((seq, epoch, loc));
            }
            for (seq, epoch, loc) in run.into_iter().rev() {
                index.add(&doc, record::Kind::Op, epoch, seq, loc);
            }
            if let Some((seq, epoch, loc)) = d.snapshot {
                index.add(&doc, record::Kind::Snapshot, epoch, seq, loc);
            }
        }
    }
}

/// Writes one segment with blocking I/O (recovery only): header, records,
/// zero padding to the block, then `fdatasync`.
struct SegmentWriter {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    len: u64,
}

impl SegmentWriter {
    fn create(dir: &Path, core: usize, n: u64) -> std::io::Result<SegmentWriter> {
        let path = dir.join(segment_name(core, n));
        let file = OpenOptions::new().create_new(true).write(true).open(&path)?;
        let buf = record::header(n, core as u32).to_vec();
        Ok(SegmentWriter { file, path, len: buf.len() as u64, buf })
    }

    /// Appends a whole record; returns its offset.
    fn push(&mut self, rec: &[u8]) -> u64 {
        let at = self.len;
        self.buf.extend_from_slice(rec);
        self.len += rec.len() as u64;
        at
    }

    fn finish(mut self) -> std::io::Result<()> {
        let padded = record::align_up(self.buf.len() as u64).max(BLOCK) as usize;
        self.buf.resize(padded, 0);
        debug_assert!(self.buf.len() as u64 >= HEADER_BYTES);
        self.file.write_all(&self.buf)?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_found_out_of_order_rebuild_the_history() {
        let loc = |segment, offset| Loc { segment, offset, len: 1 };
        let mut found = Found::new(100);
        // Newer records first, then copies of older ones behind them.
        for (seq, off) in [(5, 0), (6, 1), (1, 2), (2, 3), (3, 4), (4, 5)] {
            found.add("d", record::Kind::Op, Epoch(1), seq, loc(2, off));
        }
        found.add("d", record::Kind::Op, Epoch(1), 3, loc(3, 0));
        let mut index = Index::new(100);
        found.finish(&mut index);
        let d = &index.docs["d"];
        assert_eq!((d.seq, d.oldest()), (6, 1));
        assert_eq!(d.ops[2], loc(3, 0), "the later copy wins");
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_name(2, 17), "002-0000000017.log");
        assert_eq!(parse_name("002-0000000017.log"), Some((2, 17)));
        assert_eq!(parse_name("LOCK"), None);
        assert_eq!(parse_name("2-17.log"), None);
    }
}

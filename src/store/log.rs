//! The local log: one core's segmented write-ahead log, written with
//! glommio's io_uring DMA file API (`docs/storage.md`).
//!
//! Appends go into an in-memory batch; one flusher task per core writes the
//! batch as one block-aligned write to the current segment and, unless
//! `fsync = "never"`, that write is synchronous (`O_DSYNC`): it completes
//! once the batch is on stable storage, one sync for all of it (group
//! commit). With
//! `"batch"` writes start at most once every `storage.batch_ms`, so what
//! arrives in between shares one write; with `"always"` the flusher writes
//! at once, and what arrives during a write shares the next one. A record is stored when its write (and sync)
//! completed; with `"never"` it counts as stored when appended.
//!
//! With `storage.preallocate`, the next segment is made ahead of need full
//! of zeros and synced, so that the log's writes overwrite blocks the file
//! system has already allocated and initialised: their sync flushes only
//! the data, without a journal commit for the file's new size and extents
//! (measured with `examples/dma_latency`: write + sync p50 0.19 ms against
//! 0.34 ms for appending).
//!
//! When a write fails (disk full, I/O error), every record not yet stored is
//! dropped and reported failed, the segment is cut back to its stored
//! length and abandoned, and appends are refused for [`RETRY_AFTER`]; the
//! next write after that opens a new segment. Nothing is reported stored
//! that was not written.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use glommio::io::{BufferedFile, Directory, DmaFile};
use tracing::{debug, error, info, warn};

use super::index::{Index, Loc};
use super::record::{self, Kind, BLOCK, HEADER_BYTES};
use super::recover::segment_name;
use super::{Epoch, Head, HistoryStore, LocalFuture, StoreError, StoredSnapshot, Ticket};
use crate::config::{Config, Fsync};

/// How long appends are refused after a failed write before trying again.
pub const RETRY_AFTER: Duration = Duration::from_millis(250);

/// A batch this large is written without waiting for `batch_ms`.
const FLUSH_NOW_BYTES: usize = 1 << 20;

/// Records queued and not yet written are bounded: beyond this, appends are
/// refused (`UNAVAILABLE`) until the disk catches up.
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// Compaction copies at most this much per write (section "Liveness and
/// compaction" of `docs/storage.md`).
const COPY_BYTES_PER_WRITE: u64 = 256 << 10;

/// A prepared segment is zeroed this much per write, with [`ZERO_PAUSE`]
/// between the writes (at most about 100 MB/s): each sync of the log then
/// flushes at most one such chunk of zeros besides its own records.
const ZERO_CHUNK: u64 = 256 << 10;
const ZERO_PAUSE: Duration = Duration::from_millis(2);

/// Reads of neighbouring records closer than this are merged into one.
const READ_MERGE_GAP: u64 = 64 << 10;

/// Dead segments are cut down by this much at a time before they are
/// unlinked, with [`DELETE_PAUSE`] between the cuts (at most 500 MB/s).
const DELETE_STEP: u64 = 1 << 20;
const DELETE_PAUSE: Duration = Duration::from_millis(2);

/// Deletes a file without stalling the log's syncs: unlinking a 64 MiB
/// segment at once frees all its extents in one journal transaction, and
/// every `fdatasync` on the same file system waited for it (15 to 22 ms
/// measured on ext4, against 0.3 ms usually). Cut down 1 MiB at a time,
/// no sync waited more than 4 ms.
async fn delete_gently(path: &std::path::Path) -> std::io::Result<()> {
    let file = glommio::io::OpenOptions::new().write(true).dma_open(path).await.map_err(std::io::Error::from)?;
    let mut size = file.file_size().await.map_err(std::io::Error::from)?;
    while size > 0 {
        size = size.saturating_sub(DELETE_STEP);
        file.truncate(size).await.map_err(std::io::Error::from)?;
        glommio::timer::sleep(DELETE_PAUSE).await;
    }
    file.close().await.map_err(std::io::Error::from)?;
    glommio::io::remove(path).await.map_err(std::io::Error::from)
}

/// A live record as compaction finds it: document, kind, seq, place.
type LiveRecord = (Box<str>, Kind, u64, Loc);

#[derive(Default)]
struct Batch {
    /// Encoded records, back to back: everything the index needs of them
    /// once they are stored is in their bytes.
    bytes: Vec<u8>,
    records: usize,
    /// Ticket of the last record in the batch.
    last: Ticket,
    /// When its first record was appended (traced as the batch's wait).
    first_at: Option<Instant>,
}

/// The segment being written.
struct Segment {
    n: u64,
    file: Rc<DmaFile>,
    /// Bytes written (always a multiple of the block).
    len: u64,
}

/// One core's log.
pub struct LogStore {
    core: usize,
    dir: PathBuf,
    fsync: Fsync,
    batch_wait: Duration,
    segment_bytes: u64,
    /// Whether segments are made full of zeros ahead of use.
    preallocate: bool,
    /// Segment numbers are unique across cores: they order segments for
    /// recovery.
    next_segment: Arc<AtomicU64>,
    index: RefCell<Index>,
    head: RefCell<Option<Segment>>,
    /// Files open for reading, by segment. Reads go through the page cache
    /// (io_uring buffered reads): a document loads a few scattered records,
    /// which O_DIRECT would round out to whole blocks each.
    readers: RefCell<HashMap<u64, Rc<BufferedFile>>>,
    batch: RefCell<Batch>,
    /// The emptied buffer of the last batch written, for the next one.
    spare: RefCell<Vec<u8>>,
    appended: Cell<Ticket>,
    stored: Cell<Ticket>,
    /// Tickets up to this one failed (they are above `stored`).
    failed: Cell<Ticket>,
    /// After a failed write: refuse appends until then, with this reason.
    refusing: RefCell<Option<(Instant, String)>>,
    flusher: Cell<Option<Waker>>,
    waiters: RefCell<Vec<Waker>>,
    closing: Cell<bool>,
    /// The next segment, made ahead of need, and whether it is being made.
    prepared: RefCell<Option<(u64, Rc<DmaFile>)>>,
    preparing: Cell<bool>,
    /// The last attempt failed (a full disk, most likely): the next one
    /// waits for the next roll.
    prepare_failed: Cell<bool>,
    /// The number set aside for a segment a roll creates itself while the
    /// next one is being made.
    reserved: Cell<Option<u64>>,
    /// The task making it, awaited before the flusher ends (a task left
    /// pending when the executor exits is leaked, with its file).
    preparer: RefCell<Option<glommio::task::JoinHandle<()>>>,
    /// Dead segments whose files are still to delete, and the task deleting
    /// them (awaited like the preparer).
    to_delete: RefCell<std::collections::VecDeque<u64>>,
    deleter: RefCell<Option<glommio::task::JoinHandle<()>>>,
    /// The live records of the segment being copied forward, still to copy.
    copy_queue: RefCell<std::collections::VecDeque<LiveRecord>>,
    /// Segments compaction could not read (left as they are).
    unreadable: RefCell<std::collections::HashSet<u64>>,
}

impl LogStore {
    /// A core's log over the index recovery built for it.
    pub fn new(core: usize, config: &Config, index: Index, next_segment: Arc<AtomicU64>) -> LogStore {
        let s = &config.storage;
        LogStore {
            core,
            dir: PathBuf::from(&s.dir),
            fsync: s.fsync,
            batch_wait: Config::ms(s.batch_ms),
            segment_bytes: s.segment_bytes,
            preallocate: s.preallocate,
            next_segment,
            index: RefCell::new(index),
            head: RefCell::new(None),
            readers: RefCell::new(HashMap::new()),
            batch: RefCell::new(Batch::default()),
            spare: RefCell::new(Vec::new()),
            appended: Cell::new(0),
            stored: Cell::new(0),
            failed: Cell::new(0),
            refusing: RefCell::new(None),
            flusher: Cell::new(None),
            waiters: RefCell::new(Vec::new()),
            closing: Cell::new(false),
            copy_queue: RefCell::new(Default::default()),
            prepared: RefCell::new(None),
            preparing: Cell::new(false),
            prepare_failed: Cell::new(false),
            reserved: Cell::new(None),
            preparer: RefCell::new(None),
            to_delete: RefCell::default(),
            deleter: RefCell::new(None),
            unreadable: RefCell::new(Default::default()),
        }
    }

    fn wake_waiters(&self) {
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// The flusher: writes batches until [`LogStore::close`] and the last
    /// batch is written.
    pub async fn run(self: Rc<Self>) {
        self.prepare_next();
        let mut last_start = None;
        loop {
            let more = poll_fn(|cx| {
                if self.batch.borrow().records > 0 {
                    Poll::Ready(true)
                } else if self.closing.get() {
                    Poll::Ready(false)
                } else {
                    self.flusher.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            if !more {
                let preparer = self.preparer.borrow_mut().take();
                if let Some(task) = preparer {
                    task.await;
                }
                // A prepared segment never written is not left behind
                // (recovery would delete it too).
                let unused = self.prepared.borrow_mut().take();
                if let Some((n, file)) = unused {
                    self.discard_prepared(n, file).await;
                }
                self.start_deleter();
                let deleter = self.deleter.borrow_mut().take();
                if let Some(task) = deleter {
                    task.await;
                }
                return;
            }
            // With "batch", writes start at most once every `batch_ms`: a
            // record waits for the next such start, never longer than
            // `batch_ms` (every record of this batch arrived after the last
            // start). The period counts from the last start, not from the
            // oldest record: that record may have been read only after the
            // core finished delivering the previous batch, and counting from
            // it would add that delivery time to every record's wait. After
            // a quiet spell the first record is written at once.
            let due = last_start.map(|t: Instant| t + self.batch_wait);
            let wait =
                self.fsync != Fsync::Always && !self.closing.get() && self.batch.borrow().bytes.len() < FLUSH_NOW_BYTES;
            if let (true, Some(due)) = (wait, due) {
                let left = due.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    glommio::timer::sleep(left).await;
                }
            }
            // The next batch fills the buffer of the last one written: a
            // steady load does not grow a new buffer for every batch.
            let fresh = Batch { bytes: std::mem::take(&mut *self.spare.borrow_mut()), ..Batch::default() };
            let batch = std::mem::replace(&mut *self.batch.borrow_mut(), fresh);
            let t0 = Instant::now();
            last_start = Some(t0);
            let waited = batch.first_at.map(|t| t0 - t);
            let r = self.write(&batch).await;
            tracing::trace!(
                records = batch.records,
                bytes = batch.bytes.len(),
                waited_us = waited.map(|w| w.as_micros() as u64),
                write_us = t0.elapsed().as_micros() as u64,
                "group commit"
            );
            match r {
                Ok((segment, base)) => {
                    self.stored_batch(batch, segment, base).await;
                    self.prepare_next();
                }
                Err(e) => self.failed_batch(batch.last, e).await,
            }
            self.start_deleter();
        }
    }

    /// Stops the flusher once everything queued is written.
    pub fn close(&self) {
        self.closing.set(true);
        self.wake_flusher();
    }

    /// Writes a batch; returns the segment and the offset of its first record.
    async fn write(&self, batch: &Batch) -> std::io::Result<(u64, u64)> {
        let roll = match &*self.head.borrow() {
            None => true,
            Some(h) => h.len > BLOCK && h.len + batch.bytes.len() as u64 > self.segment_bytes,
        };
        if roll {
            self.roll().await?;
        }
        let (file, pos, n) = {
            let head = self.head.borrow();
            let h = head.as_ref().expect("rolled");
            (h.file.clone(), h.len, h.n)
        };
        let header = if pos == 0 { HEADER_BYTES as usize } else { 0 };
        let total = header + batch.bytes.len();
        let size = record::align_up(total as u64) as usize;
        let mut buf = file.alloc_dma_buffer(size);
        {
            let out = buf.as_bytes_mut();
            if header > 0 {
                out[..header].copy_from_slice(&record::header(n, self.core as u32));
            }
            out[header..total].copy_from_slice(&batch.bytes);
            out[total..].fill(0);
        }
        let written = file.write_at(buf, pos).await.map_err(std::io::Error::from)?;
        if written != size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write: {written} of {size} bytes (is the disk full?)"),
            ));
        }
        if let Some(h) = self.head.borrow_mut().as_mut() {
            h.len = pos + size as u64;
        }
        Ok((n, pos + header as u64))
    }

    /// Starts a new segment (the directory entry is synced before anything
    /// in it counts as stored).
    async fn roll(&self) -> std::io::Result<()> {
        let prepared = self.prepared.borrow_mut().take();
        let head = self.head.borrow().as_ref().map(|h| h.n);
        let (n, file) = match prepared {
            // Numbers only grow: the one set aside below it is skipped.
            Some((n, file)) if head.is_none_or(|h| n > h) => {
                self.reserved.set(None);
                (n, file)
            }
            other => {
                // One made ahead with a number below the current segment's
                // (two rolls came while it was being made) would come after
                // it in the log but before it in number, and recovery
                // orders segments by number.
                if let Some((n, file)) = other {
                    self.discard_prepared(n, file).await;
                }
                let n = self.reserved.take().unwrap_or_else(|| self.next_segment.fetch_add(1, Ordering::Relaxed));
                self.create_segment(n, false).await?
            }
        };
        self.index.borrow_mut().segments.entry(n).or_default().core = self.core;
        self.prepare_failed.set(false);
        let old = self.head.borrow_mut().replace(Segment { n, file, len: 0 });
        debug!(core = self.core, segment = n, "log segment started");
        if let Some(old) = old {
            debug!(core = self.core, segment = old.n, bytes = old.len, "log segment sealed");
            self.delete_dead_segments();
        }
        Ok(())
    }

    /// Creates segment `n` (`zeroed`: full of zeros up to `segment_bytes`,
    /// synced) and syncs its directory entry. Returns the file open for the
    /// log's writes.
    async fn create_segment(&self, n: u64, zeroed: bool) -> std::io::Result<(u64, Rc<DmaFile>)> {
        let path = self.dir.join(segment_name(self.core, n));
        let started = Instant::now();
        let made = async {
            // Zeros are written without O_DSYNC, and synced once.
            let dsync = self.fsync != Fsync::Never;
            let mut file = Self::open_segment(&path, true, dsync && !zeroed).await?;
            if zeroed {
                self.zero(&file).await?;
                file.close().await.map_err(std::io::Error::from)?;
                file = Self::open_segment(&path, false, dsync).await?;
            }
            // Syncing the directory commits the file system's journal: tens
            // of milliseconds here, which is why segments are made ahead of
            // need.
            let dir = Directory::open(&self.dir).await.map_err(std::io::Error::from)?;
            dir.sync().await.map_err(std::io::Error::from)?;
            let _ = dir.close().await;
            Ok(file)
        };
        match made.await {
            Ok(file) => {
                let ms = started.elapsed().as_millis() as u64;
                debug!(core = self.core, segment = n, zeroed, ms, "log segment made");
                Ok((n, Rc::new(file)))
            }
            Err(e) => {
                // Nothing was written to it: a half-zeroed file would only
                // take space (a full disk is the likely cause).
                self.remove_unwritten(n).await;
                Err(e)
            }
        }
    }

    /// Opens a segment for writing: created (it must not exist) or
    /// existing, synchronous (`O_DSYNC`: a write completes once it is on
    /// stable storage) or not.
    async fn open_segment(path: &std::path::Path, create: bool, dsync: bool) -> std::io::Result<DmaFile> {
        // Write-only on purpose: glommio probes a device for io_uring
        // polling (IOPOLL) with a read on the first file opened on it, and a
        // write-only file fails that probe, which keeps the log's writes on
        // the main ring. On the poll ring a completion is only seen when the
        // executor next polls it, which on an idle core took tens of
        // milliseconds (ack p50 60 ms at 1,000 ops/s over 5,000 sessions).
        let mut options = glommio::io::OpenOptions::new();
        options.write(true).create_new(create);
        if dsync {
            options.custom_flags(libc::O_DSYNC);
        }
        let file = options.dma_open(path).await.map_err(std::io::Error::from)?;
        if file.alignment() > BLOCK {
            return Err(std::io::Error::other(format!(
                "{}: the device needs {}-byte aligned writes; the log writes {BLOCK}-byte blocks",
                path.display(),
                file.alignment()
            )));
        }
        Ok(file)
    }

    /// Fills a new segment with zeros up to `segment_bytes` and syncs it,
    /// [`ZERO_CHUNK`] at a time. Gives up when the log closes.
    async fn zero(&self, file: &DmaFile) -> std::io::Result<()> {
        let len = record::align_up(self.segment_bytes);
        let mut at = 0;
        while at < len {
            if self.closing.get() {
                return Err(std::io::Error::other("the log is closing"));
            }
            let n = ZERO_CHUNK.min(len - at);
            let mut buf = file.alloc_dma_buffer(n as usize);
            buf.as_bytes_mut().fill(0);
            let written = file.write_at(buf, at).await.map_err(std::io::Error::from)?;
            if written != n as usize {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("short write: {written} of {n} bytes (is the disk full?)"),
                ));
            }
            at += n;
            glommio::timer::sleep(ZERO_PAUSE).await;
        }
        file.fdatasync().await.map_err(std::io::Error::from)
    }

    /// Makes the next segment in the background once the current one is half
    /// full (or none exists: then without zeros), so that a roll never waits
    /// for file creation and the directory sync. A failure here is only logged: the roll then
    /// creates the segment itself, and reports the error if it fails again.
    fn prepare_next(self: &Rc<Self>) {
        let half_full = self.head.borrow().as_ref().is_none_or(|h| h.len >= self.segment_bytes / 2);
        let busy = self.preparing.get() || self.prepared.borrow().is_some() || self.prepare_failed.get();
        if !half_full || busy || self.closing.get() {
            return;
        }
        self.preparing.set(true);
        let me = self.clone();
        // Two numbers: the segment made ahead takes the second, and a roll
        // that comes while it is still being made creates its own segment
        // with the first, so segments are numbered in the order they are
        // started (recovery's order) and the work is not lost.
        let first = self.next_segment.fetch_add(2, Ordering::Relaxed);
        self.reserved.set(Some(first));
        let task = glommio::spawn_local(async move {
            // The first segment, made at start, is an empty file: a core
            // that never writes zeroes nothing, and a relay with many cores
            // does not write a segment's size per core at every start.
            let zeroed = me.preallocate && me.head.borrow().is_some();
            match me.create_segment(first + 1, zeroed).await {
                Ok(p) => *me.prepared.borrow_mut() = Some(p),
                Err(e) if me.closing.get() => debug!(core = me.core, error = %e, "next log segment not made: closing"),
                Err(e) => {
                    // Tried again after the next roll, not after every write.
                    me.prepare_failed.set(true);
                    warn!(core = me.core, error = %e, "could not prepare the next log segment")
                }
            }
            me.preparing.set(false);
        })
        .detach();
        *self.preparer.borrow_mut() = Some(task);
    }

    /// Deletes a segment made ahead and never written.
    async fn discard_prepared(&self, n: u64, file: Rc<DmaFile>) {
        let _ = file.close_rc().await;
        self.remove_unwritten(n).await;
    }

    /// Deletes the file of segment `n`, which holds no record (recovery
    /// deletes it otherwise).
    async fn remove_unwritten(&self, n: u64) {
        let path = self.dir.join(segment_name(self.core, n));
        if let Err(e) = glommio::io::remove(&path).await.map_err(std::io::Error::from) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(core = self.core, segment = %path.display(), error = %e, "could not delete an unwritten segment");
            }
        }
    }

    async fn stored_batch(&self, mut batch: Batch, segment: u64, base: u64) {
        {
            let mut index = self.index.borrow_mut();
            if let Some(info) = index.segments.get_mut(&segment) {
                info.records += batch.records as u64;
            }
            let mut at = 0;
            while at < batch.bytes.len() {
                let (r, len) = record::decode_own(&batch.bytes[at..]);
                let loc = Loc { segment, offset: base + at as u64, len: len as u32 };
                index.add(r.document, r.kind, Epoch(r.epoch), r.seq, loc);
                at += len;
            }
        }
        self.stored.set(batch.last);
        // Kept unless a burst made it large: idle cores hold little.
        if batch.bytes.capacity() <= 2 * FLUSH_NOW_BYTES {
            batch.bytes.clear();
            *self.spare.borrow_mut() = batch.bytes;
        }
        self.wake_waiters();
        self.delete_dead_segments();
        self.copy_forward().await;
    }

    /// Compaction of a sealed segment mostly dead: its live records (a few
    /// documents that have not changed for a while) are copied into the
    /// segment being written, so the whole old segment can be deleted once
    /// the copies are stored. A segment qualifies when fewer than half of
    /// the records written to it are live (counted in records, not bytes:
    /// padding would make every segment of small writes look mostly dead).
    /// One segment at a time, at most [`COPY_BYTES_PER_WRITE`] of it per
    /// write, so copying never holds up the records behind it for long: it
    /// costs at most as much as the writing that made the segment mostly
    /// dead, spread over the writes that follow.
    async fn copy_forward(&self) {
        if self.closing.get() || self.refusal().is_some() {
            return;
        }
        if self.copy_queue.borrow().is_empty() && !self.pick_compaction().await {
            return;
        }
        let mut locs: Vec<Loc> = Vec::new();
        let mut bytes = 0u64;
        {
            let index = self.index.borrow();
            let mut queue = self.copy_queue.borrow_mut();
            while bytes < COPY_BYTES_PER_WRITE {
                let Some((doc, kind, seq, loc)) = queue.pop_front() else { break };
                // Still live where it was found (not replaced or dead since)?
                let live = index.docs.get(&doc).is_some_and(|d| match kind {
                    Kind::Op => seq >= d.oldest() && seq <= d.seq && d.ops[(seq - d.oldest()) as usize] == loc,
                    Kind::Snapshot => d.snapshot == Some((seq, loc)),
                });
                if live {
                    bytes += loc.len as u64;
                    locs.push(loc);
                }
            }
        }
        if locs.is_empty() {
            return;
        }
        let segment = locs[0].segment;
        let records = match self.read_raw(&locs).await {
            Ok(r) => r,
            Err(e) => {
                warn!(core = self.core, segment, error = %e, "compaction could not read a segment; leaving it");
                self.unreadable.borrow_mut().insert(segment);
                self.copy_queue.borrow_mut().clear();
                return;
            }
        };
        let mut batch = self.batch.borrow_mut();
        for raw in &records {
            // Checked by `read_raw`: copied as they are, checksum included.
            batch.bytes.extend_from_slice(raw);
            self.queue(&mut batch);
        }
        drop(batch);
        self.wake_flusher();
    }

    /// Counts the record just added to the batch's bytes; returns its ticket.
    fn queue(&self, batch: &mut Batch) -> Ticket {
        batch.records += 1;
        let t = self.appended.get() + 1;
        self.appended.set(t);
        batch.last = t;
        t
    }

    fn wake_flusher(&self) {
        if let Some(w) = self.flusher.take() {
            w.wake();
        }
    }

    /// Chooses the next segment to copy forward and queues its live records;
    /// false when none qualifies.
    async fn pick_compaction(&self) -> bool {
        let head = self.head.borrow().as_ref().map(|h| h.n);
        let candidate = self
            .index
            .borrow()
            .segments
            .iter()
            .find(|(n, s)| {
                Some(**n) != head
                    && s.core == self.core
                    && s.live * 2 < s.records
                    && !self.unreadable.borrow().contains(n)
            })
            .map(|(n, _)| *n);
        let Some(n) = candidate else { return false };
        let live = self.live_in(n).await;
        debug!(core = self.core, segment = n, records = live.len(), "compaction: copying live records forward");
        *self.copy_queue.borrow_mut() = live.into();
        true
    }
    async fn failed_batch(&self, last: Ticket, e: std::io::Error) {
        // Everything queued behind the failed batch fails with it: its
        // records follow the failed ones in their documents.
        let queued = std::mem::take(&mut *self.batch.borrow_mut());
        let failed = queued.last.max(last);
        self.failed.set(failed);
        self.copy_queue.borrow_mut().clear();
        let reason = e.to_string();
        error!(core = self.core, error = %reason, failed_records = failed - self.stored.get(), "log write failed; refusing operations for now");
        *self.refusing.borrow_mut() = Some((Instant::now() + RETRY_AFTER, reason));
        self.wake_waiters();
        // Cut the segment back to what was stored, and leave it: the next
        // write starts a new one.
        let head = self.head.borrow_mut().take();
        if let Some(h) = head {
            let cut = async {
                h.file.truncate(h.len).await?;
                h.file.fdatasync().await
            };
            if let Err(e) = cut.await {
                warn!(core = self.core, segment = h.n, error = %e, "could not cut the segment back after a failed write");
            }
            self.delete_dead_segments();
        }
    }

    /// Retires segments without live records, except the one being written:
    /// they leave the index at once and their files are queued for the
    /// deleter task. Unlinking a large file takes the file system tens of
    /// milliseconds, which the flusher must not wait for; a file left behind
    /// by a crash is dead at the next start and deleted by recovery.
    fn delete_dead_segments(&self) {
        let keep = self.head.borrow().as_ref().map(|h| h.n);
        let dead = self.index.borrow().dead_segments(keep);
        for n in dead {
            self.index.borrow_mut().segments.remove(&n);
            self.readers.borrow_mut().remove(&n);
            self.to_delete.borrow_mut().push_back(n);
        }
    }

    /// Starts the deleter task if files are queued and none is running.
    fn start_deleter(self: &Rc<Self>) {
        if self.to_delete.borrow().is_empty() || self.deleter.borrow().is_some() {
            return;
        }
        let me = self.clone();
        let task = glommio::spawn_local(async move {
            loop {
                let next = me.to_delete.borrow_mut().pop_front();
                let Some(n) = next else { break };
                let path = me.dir.join(segment_name(me.core, n));
                match delete_gently(&path).await {
                    Ok(()) => debug!(core = me.core, segment = n, "log segment deleted (no live records)"),
                    Err(e) => {
                        warn!(core = me.core, segment = %path.display(), error = %e, "could not delete a dead segment")
                    }
                }
            }
            *me.deleter.borrow_mut() = None;
        })
        .detach();
        // Set before the task first runs (spawning does not run it), so its
        // clearing at the end comes after.
        *self.deleter.borrow_mut() = Some(task);
    }

    /// The live records of segment `n`, by offset. Walks the core's index in
    /// slices, letting other tasks run between them: a large index must not
    /// stall the core.
    async fn live_in(&self, n: u64) -> Vec<LiveRecord> {
        let docs: Vec<Box<str>> = self.index.borrow().docs.keys().cloned().collect();
        let mut out = Vec::new();
        for chunk in docs.chunks(1024) {
            {
                let index = self.index.borrow();
                for doc in chunk {
                    let Some(d) = index.docs.get(doc) else { continue };
                    let oldest = d.oldest();
                    for (i, l) in d.ops.iter().enumerate() {
                        if l.segment == n {
                            out.push((doc.clone(), Kind::Op, oldest + i as u64, *l));
                        }
                    }
                    if let Some((seq, l)) = d.snapshot.filter(|(_, l)| l.segment == n) {
                        out.push((doc.clone(), Kind::Snapshot, seq, l));
                    }
                }
            }
            glommio::yield_if_needed().await;
        }
        out.sort_by_key(|e| e.3.offset);
        out
    }

    async fn reader(&self, segment: u64) -> Result<Rc<BufferedFile>, StoreError> {
        if let Some(f) = self.readers.borrow().get(&segment) {
            return Ok(f.clone());
        }
        let core = self.index.borrow().segments.get(&segment).map_or(self.core, |s| s.core);
        let path = self.dir.join(segment_name(core, segment));
        let file =
            Rc::new(BufferedFile::open(&path).await.map_err(|e| StoreError::Read(format!("{}: {e}", path.display())))?);
        self.readers.borrow_mut().insert(segment, file.clone());
        Ok(file)
    }

    /// Reads whole records (checked) and returns each one's data.
    async fn read_records(&self, locs: &[Loc]) -> Result<Vec<Box<[u8]>>, StoreError> {
        let raw = self.read_raw(locs).await?;
        Ok(raw
            .iter()
            .map(|bytes| record::decode(bytes).map(|(r, _)| r.data.into()).expect("checked by read_raw"))
            .collect())
    }

    /// Reads whole records, each checked.
    async fn read_raw(&self, locs: &[Loc]) -> Result<Vec<Box<[u8]>>, StoreError> {
        let mut out = Vec::with_capacity(locs.len());
        let mut i = 0;
        while i < locs.len() {
            // Merge neighbours in one segment into one read.
            let first = locs[i];
            let mut end = first.offset + first.len as u64;
            let mut j = i + 1;
            while j < locs.len()
                && locs[j].segment == first.segment
                && locs[j].offset >= first.offset
                && locs[j].offset <= end + READ_MERGE_GAP
                && locs[j].offset + (locs[j].len as u64) - first.offset <= 8 << 20
            {
                end = end.max(locs[j].offset + locs[j].len as u64);
                j += 1;
            }
            let file = self.reader(first.segment).await?;
            let span = file
                .read_at(first.offset, (end - first.offset) as usize)
                .await
                .map_err(|e| StoreError::Read(format!("segment {}: {e}", first.segment)))?;
            for l in &locs[i..j] {
                let at = (l.offset - first.offset) as usize;
                let bytes = span.get(at..at + l.len as usize).ok_or_else(|| {
                    StoreError::Read(format!("segment {} is shorter than its index ({})", l.segment, l.offset))
                })?;
                record::decode(bytes).map_err(|d| {
                    StoreError::Read(format!("segment {} offset {}: damaged record ({d:?})", l.segment, l.offset))
                })?;
                out.push(bytes.into());
            }
            i = j;
        }
        Ok(out)
    }

    fn refusal(&self) -> Option<StoreError> {
        let mut r = self.refusing.borrow_mut();
        match &*r {
            Some((until, why)) if Instant::now() < *until => Some(StoreError::Unavailable(why.clone())),
            Some(_) => {
                info!(core = self.core, "retrying log writes");
                *r = None;
                None
            }
            None => None,
        }
    }
}

impl HistoryStore for LogStore {
    fn head(&self, document: &str) -> Option<Head> {
        self.index.borrow().docs.get(document).map(|d| Head { epoch: d.epoch, seq: d.seq, oldest: d.oldest() })
    }

    fn append(&self, document: &str, epoch: Epoch, kind: Kind, seq: u64, data: &[u8]) -> Result<Ticket, StoreError> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        let mut batch = self.batch.borrow_mut();
        if batch.bytes.len() >= MAX_QUEUED_BYTES {
            return Err(StoreError::Unavailable("the disk is not keeping up (too many records queued)".into()));
        }
        if batch.bytes.is_empty() {
            batch.first_at = Some(Instant::now());
        }
        record::encode(&mut batch.bytes, kind, epoch.0, seq, document, data);
        let t = self.queue(&mut batch);
        drop(batch);
        self.wake_flusher();
        Ok(t)
    }

    fn stored(&self) -> Ticket {
        match self.fsync {
            Fsync::Never => self.appended.get(),
            _ => self.stored.get(),
        }
    }

    fn failed(&self) -> Ticket {
        self.failed.get()
    }

    fn written(&self) -> Ticket {
        self.stored.get()
    }

    fn wait(&self, ticket: Ticket) -> LocalFuture<'_, Result<(), StoreError>> {
        Box::pin(poll_fn(move |cx| {
            if self.stored() >= ticket {
                Poll::Ready(Ok(()))
            } else if self.failed.get() >= ticket {
                let why = self.refusing.borrow().as_ref().map_or_else(|| "write failed".into(), |(_, w)| w.clone());
                Poll::Ready(Err(StoreError::Unavailable(why)))
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        }))
    }

    fn read_range<'a>(
        &'a self,
        document: &'a str,
        from: u64,
        to: u64,
    ) -> LocalFuture<'a, Result<Vec<Box<[u8]>>, StoreError>> {
        Box::pin(async move {
            let locs: Vec<Loc> = {
                let index = self.index.borrow();
                let Some(d) = index.docs.get(document) else { return Ok(Vec::new()) };
                let from = from.max(d.oldest());
                let to = to.min(d.seq);
                if from > to {
                    return Ok(Vec::new());
                }
                let skip = (from - d.oldest()) as usize;
                d.ops.iter().skip(skip).take((to - from + 1) as usize).copied().collect()
            };
            self.read_records(&locs).await
        })
    }

    fn latest_snapshot<'a>(&'a self, document: &'a str) -> LocalFuture<'a, Result<Option<StoredSnapshot>, StoreError>> {
        Box::pin(async move {
            let snap = self.index.borrow().docs.get(document).and_then(|d| d.snapshot);
            let Some((seq, loc)) = snap else { return Ok(None) };
            let mut data = self.read_records(&[loc]).await?;
            Ok(data.pop().map(|state| StoredSnapshot { seq, state }))
        })
    }
}

//! The SQLite backend of the store: one writer thread owns the write connection and commits
//! many writes per transaction (WAL, `synchronous=FULL`; acks fire only after the commit),
//! while reads run on their own connection beside it. Design notes: [`SqliteStore`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use citywatch_edge::wire::Metric;
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::{Error, Result, StoreStats, Write};
use crate::store::StorageConfig;

mod reads;
mod retention;
mod schema;
#[cfg(test)]
mod tests;
mod writer;

use schema::{load_keys, migrate};
use writer::Writer;

/// The database file inside the data directory.
pub const DB_FILE: &str = "citywatch.db";
/// The schema this code writes; older databases are migrated, newer ones refused.
pub const SCHEMA_VERSION: i64 = 2;

const MINUTE_MS: i64 = 60_000;

/// The readings queued ahead of the writer are bounded to this many transactions' worth
/// (`batch_max_rows` each): enough to keep the writer busy while the decode stage prepares the
/// next batch, and a fixed memory cost (4 × 10 000 readings ≈ 1.6 MB by default).
const BACKLOG_BATCHES: usize = 4;

/// Page cache of the read connection (the API's queries), KiB: fixed, whatever the fleet.
const READ_CACHE_KIB: u32 = 8192;

/// `PRAGMA synchronous` of the write connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// WAL synced at checkpoints only: a power cut can lose the last commits. Benchmarks only.
    Normal,
    /// WAL synced at every commit: a fired ack means the data survives a power cut.
    Full,
}

/// Everything [`SqliteStore::open_with`] needs; `From<&StorageConfig>` fills in the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreOptions {
    /// Data directory, created if missing; the database is `DB_FILE` in it.
    pub dir: PathBuf,
    pub raw_retention: Duration,
    pub rollup_retention: Duration,
    /// Most rows in one take off the queue, sorted and inserted in one go (a
    /// `Write::Readings(v)` counts `v.len()`, an ack 0, others 1).
    pub batch_max_rows: usize,
    /// Most rows in one transaction: while further takes are already waiting, the writer adds
    /// them to the open transaction up to this many rows (group commit).
    pub commit_max_rows: usize,
    /// Writes buffered ahead of the writer thread.
    pub queue_capacity: usize,
    pub quarantine_max_rows: usize,
    /// Always `Full` from a configuration; `Normal` exists to measure what `Full` costs.
    pub synchronous: Synchronous,
    /// Least time between two retention passes (default 5 minutes).
    pub retention_every: Duration,
    /// Page cache of the write connection, MiB (`[storage] cache_mib`, default 32). Each batch dirties about one page
    /// per series it touches, so the cache should hold the hot leaf pages of every live series.
    pub cache_mib: u32,
    /// WAL pages written before the writer checkpoints (default 10 000, ~40 MB). Larger values
    /// let pages rewritten by many batches be copied back to the database once.
    pub wal_autocheckpoint_pages: u32,
}

impl From<&StorageConfig> for StoreOptions {
    fn from(c: &StorageConfig) -> Self {
        StoreOptions {
            dir: c.path.clone(),
            raw_retention: c.raw_retention.0,
            rollup_retention: c.rollup_retention.0,
            batch_max_rows: c.batch_max_rows.max(1),
            commit_max_rows: c.commit_max_rows.max(c.batch_max_rows).max(1),
            queue_capacity: c.queue_capacity.max(1),
            quarantine_max_rows: c.quarantine_max_rows,
            synchronous: Synchronous::Full,
            retention_every: Duration::from_secs(300),
            cache_mib: c.cache_mib.max(1),
            wal_autocheckpoint_pages: 10_000,
        }
    }
}

/// Counters shared by the writer (which updates them) and [`SqliteStore::stats`].
#[derive(Debug, Default)]
struct Shared {
    readings_written: AtomicU64,
    readings_time_taken: AtomicU64,
    events_written: AtomicU64,
    quarantined: AtomicU64,
    batches: AtomicU64,
    last_batch_us: AtomicU64,
    max_batch_us: AtomicU64,
    last_batch_rows: AtomicU64,
    /// Time the writer spent writing groups (from the first take to the acks), and the part of
    /// it inside COMMIT (the WAL's write and fsync, and any checkpoint it triggers), µs: how
    /// busy the writer is, and how much of that is waiting for the disk.
    busy_us: AtomicU64,
    commit_us: AtomicU64,
    write_errors: AtomicU64,
    /// Set while a batch keeps failing for want of disk (full, read-only, I/O error) and is
    /// being retried; ingestion is paused behind it.
    refusing: std::sync::atomic::AtomicBool,
}

/// Readings queued ahead of the writer thread, bounded.
///
/// The channel counts writes, and one `Write::Readings` is a whole decode batch (up to ~10k
/// readings), so a channel of writes alone would let a writer that falls behind (a loaded
/// machine, a slow disk) hold ~50 MB of readings in memory. This bound, in readings, makes the
/// decode stage wait instead (and so the source and the broker, which keeps unacknowledged
/// messages): the store's memory stays fixed however far behind it is. A write of more readings
/// than the bound is let through when nothing is queued, so no batch is too big to ever go.
#[derive(Debug)]
pub(super) struct Backlog {
    queued: AtomicUsize,
    max: usize,
    room: tokio::sync::Notify,
}

impl Backlog {
    fn new(max: usize) -> Self {
        Backlog { queued: AtomicUsize::new(0), max: max.max(1), room: tokio::sync::Notify::new() }
    }

    fn fits(&self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let q = self.queued.load(Ordering::Acquire);
        q == 0 || q.saturating_add(n) <= self.max
    }

    /// Waits until `n` more readings fit. One sender of readings (the decode stage) is the
    /// design; two racing senders can overshoot the bound by one write, never more.
    async fn room_for(&self, n: usize) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.fits(n) {
                return;
            }
            notified.await;
        }
    }

    fn add(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// `n` readings left the queue (or never entered it): wakes the senders waiting for room.
    fn remove(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.room.notify_waiters();
        }
    }

    /// The writer took a write off the queue.
    pub(super) fn taken(&self, w: &Write) {
        self.remove(w.reading_count());
    }

    pub(super) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Sends writes to the writer thread. Cheap to clone; when the last clone is dropped the writer
/// drains what is queued, commits it and stops. Waits while the queue is full, in writes
/// (`[storage] queue_capacity`) or in readings ([`Backlog`]).
#[derive(Debug, Clone)]
pub struct StoreWriter {
    tx: mpsc::Sender<Write>,
    backlog: Arc<Backlog>,
}

/// Room for one write in the store's queue, held (see [`StoreWriter::reserve`]).
#[derive(Debug)]
pub struct WritePermit<'a> {
    permit: mpsc::Permit<'a, Write>,
    backlog: &'a Backlog,
}

impl WritePermit<'_> {
    /// Queues `w`, which should be the write the permit was reserved for (its readings were
    /// the ones waited for; more are let through and counted).
    pub fn send(self, w: Write) {
        self.backlog.add(w.reading_count());
        self.permit.send(w);
    }
}

impl StoreWriter {
    /// Queues a write, waiting while the queue is full. `Error::WriterGone` if the writer stopped.
    pub async fn send(&self, w: Write) -> Result<()> {
        self.reserve(w.reading_count()).await?.send(w);
        Ok(())
    }

    /// Waits for room for a write of `readings` readings ([`Write::reading_count`]), then for
    /// one slot, and holds it (cancel-safe: dropping the wait or the permit queues nothing).
    /// `Error::WriterGone` if the writer stopped.
    pub async fn reserve(&self, readings: usize) -> Result<WritePermit<'_>> {
        self.backlog.room_for(readings).await;
        let permit = self.tx.reserve().await.map_err(|_| Error::WriterGone)?;
        Ok(WritePermit { permit, backlog: &self.backlog })
    }

    /// Queues a write without waiting; gives it back when the queue is full or the writer gone.
    // The write comes back by value so the caller can retry it; boxing it would allocate on
    // exactly the path that runs when the store is already behind.
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, w: Write) -> Result<(), TrySendError<Write>> {
        let n = w.reading_count();
        if !self.backlog.fits(n) {
            return Err(TrySendError::Full(w));
        }
        // Counted before the send: the writer may take the write (and subtract) at once.
        self.backlog.add(n);
        self.tx.try_send(w).inspect_err(|_| self.backlog.remove(n))
    }

    /// [`StoreWriter::send`] for synchronous code (tests, tools); panics inside an async
    /// runtime (tokio's rule). Waits for room in readings by polling every millisecond.
    pub fn blocking_send(&self, w: Write) -> Result<()> {
        let n = w.reading_count();
        while !self.backlog.fits(n) {
            if self.tx.is_closed() {
                return Err(Error::WriterGone);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.backlog.add(n);
        self.tx.blocking_send(w).map_err(|_| {
            self.backlog.remove(n);
            Error::WriterGone
        })
    }

    /// The queue's size, as configured.
    pub fn capacity(&self) -> usize {
        self.tx.max_capacity()
    }

    /// Writes waiting in the queue now.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Whether the writer thread has stopped (nothing sent will be written).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The store: the read side, the stats, and the handle of the writer thread.
///
/// Reads share one connection behind a mutex (WAL lets them run beside the writer); each read
/// is a single short statement, so contention stays low at the API's request rates.
///
/// # Schema (version 2)
///
/// - `device_keys(id INTEGER PRIMARY KEY, name TEXT UNIQUE)`: devices are referenced by a small
///   integer everywhere else; the writer caches the map in memory.
/// - `readings(device, ts, historical, <one nullable REAL column per metric, named by its wire
///   name>)`, `WITHOUT ROWID`, primary key `(device, ts)`: one row per telemetry message (v1 had
///   one per reading, keyed `(device, metric, ts)`; migrated at open). A reading whose
///   (device, metric, ts) is already stored (a replay) is ignored: the first value written wins
///   and the rollups count it once; a message adding other metrics to a stored (device, ts)
///   fills their columns.
/// - `rollup_1m(device, metric, minute, min, max, sum, count, last, last_ts)`, `minute` being the
///   minute's start in ms, `metric` the index in [`Metric::ALL`] (append-only: a test pins
///   it); maintained by the writer from the readings it actually inserted.
/// - `events` (primary key `(device, ts, seq)`, replays ignored), `quarantine` (autoincrement
///   id, newest = largest id), `devices` (the registry's records, upserted), `schema_version`.
///
/// # Retention
///
/// The writer runs a retention pass at startup and then after a batch once
/// [`StoreOptions::retention_every`] has passed since the last one (an idle store has nothing new
/// to expire). A pass walks the devices and deletes, per `(device, metric)`, raw readings older
/// than `raw_retention` and rollups (and events) older than `rollup_retention`, in steps of at
/// most ~10 ms / 20 000 rows, each its own transaction, run only while the queue is empty, so
/// batches never wait long behind it. Quarantine is trimmed to `quarantine_max_rows` by every
/// batch that adds to it.
///
/// # Throughput
///
/// `cargo test --release -p citywatch-gateway store::sqlite::tests::writer_throughput -- --ignored --nocapture`
/// writes 1 000 000 readings in batches of 10 000 with the default options. On the development
/// VM (2 cores, ext4 on virtio, a build beside it) with schema 2 and group commit the writer
/// alone did:
/// - `live`, 1000 devices × 3 metrics round-robin (every batch touches every device):
///   ~550–710k readings/s with `FULL`;
/// - `replay`, a batch holding ~3 devices' consecutive points: ~450–610k readings/s with `FULL`.
///
/// (Schema 1, one row per reading and a transaction per 10k rows, did ~90–130k readings/s
/// `live`.) A transaction writes every page it dirties to the WAL; clustering by `(device, ts)`
/// puts each device's newest rows on one leaf page (plus its rollup pages), so group commit
/// ([`StoreOptions::commit_max_rows`]) and the row per message both cut the pages per reading.
#[derive(Debug)]
pub struct SqliteStore {
    db_path: PathBuf,
    reader: Mutex<Connection>,
    shared: Arc<Shared>,
    /// Weak, so the store itself does not keep the writer alive.
    tx: mpsc::WeakSender<Write>,
    backlog: Arc<Backlog>,
    queue_capacity: usize,
    raw_retention_ms: i64,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store described by `config` and starts its writer thread.
    pub fn open(config: &StorageConfig) -> Result<(SqliteStore, StoreWriter)> {
        Self::open_with(StoreOptions::from(config))
    }

    /// [`SqliteStore::open`] with every option explicit.
    pub fn open_with(opts: StoreOptions) -> Result<(SqliteStore, StoreWriter)> {
        std::fs::create_dir_all(&opts.dir)
            .map_err(|source| Error::DataDir { path: opts.dir.display().to_string(), source })?;
        let db_path = opts.dir.join(DB_FILE);

        let conn = Connection::open(&db_path)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Invalid(format!("{}: cannot switch to WAL (journal_mode={mode})", db_path.display())));
        }
        let sync = match opts.synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.execute_batch(&format!(
            "PRAGMA synchronous={sync};
             PRAGMA busy_timeout=5000;
             PRAGMA cache_size=-{cache_kib};
             PRAGMA wal_autocheckpoint={ckpt};
             PRAGMA temp_store=MEMORY;
             PRAGMA journal_size_limit=67108864;",
            cache_kib = u64::from(opts.cache_mib.max(1)) * 1024,
            ckpt = opts.wal_autocheckpoint_pages,
        ))?;
        migrate(&conn)?;
        let keys = load_keys(&conn)?;

        let reader = Connection::open(&db_path)?;
        reader.execute_batch(&format!("PRAGMA busy_timeout=5000; PRAGMA cache_size=-{READ_CACHE_KIB}; PRAGMA query_only=1;"))?;

        let capacity = opts.queue_capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let backlog = Arc::new(Backlog::new(opts.batch_max_rows.saturating_mul(BACKLOG_BATCHES)));
        let shared = Arc::new(Shared::default());
        let raw_retention_ms = duration_ms(opts.raw_retention);
        let writer = Writer {
            conn,
            rx,
            backlog: backlog.clone(),
            shared: shared.clone(),
            keys,
            logged: HashSet::new(),
            cells: Default::default(),
            retention: None,
            next_retention: Instant::now(),
            opts,
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| Error::Invalid(format!("cannot start the store writer thread: {e}")))?;

        let store = SqliteStore {
            db_path,
            reader: Mutex::new(reader),
            shared,
            tx: tx.downgrade(),
            backlog: backlog.clone(),
            queue_capacity: capacity,
            raw_retention_ms,
            writer: Mutex::new(Some(handle)),
        };
        Ok((store, StoreWriter { tx, backlog }))
    }

    /// The database file.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// Waits until the writer thread has stopped: it stops once every [`StoreWriter`] is dropped
    /// and everything queued is committed (and acked). Blocks the calling thread (use
    /// `spawn_blocking` from async code). A second call returns at once.
    pub fn join(&self) -> Result<()> {
        let handle = lock(&self.writer).take();
        match handle {
            Some(h) => h.join().map_err(|_| Error::WriterGone),
            None => Ok(()),
        }
    }

    /// [`SqliteStore::join`], then closes the read connection.
    pub fn close(self) -> Result<()> {
        self.join()
    }

    /// The counters of the writer, and the queue's depth now.
    pub fn stats(&self) -> StoreStats {
        let s = &self.shared;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let depth = self.tx.upgrade().map(|tx| tx.max_capacity() - tx.capacity()).unwrap_or(0);
        StoreStats {
            readings_written: get(&s.readings_written),
            readings_time_taken: get(&s.readings_time_taken),
            events_written: get(&s.events_written),
            quarantined: get(&s.quarantined),
            batches: get(&s.batches),
            last_batch_us: get(&s.last_batch_us),
            max_batch_us: get(&s.max_batch_us),
            last_batch_rows: get(&s.last_batch_rows),
            busy_us: get(&s.busy_us),
            commit_us: get(&s.commit_us),
            queue_depth: depth as u64,
            queue_readings: self.backlog.queued() as u64,
            queue_max_readings: self.backlog.max as u64,
            queue_capacity: self.queue_capacity as u64,
            write_errors: get(&s.write_errors),
            refusing: s.refusing.load(Ordering::Relaxed),
        }
    }
}

/// Locks a mutex, recovering from poisoning: the guarded values (a connection, a join handle)
/// stay consistent even if a holder panicked, since SQLite rolls back unfinished statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The index of `m` in [`Metric::ALL`], which is how readings store it.
fn metric_index(m: Metric) -> i64 {
    // `Metric` is a fieldless enum whose `ALL` lists its variants in declaration order (the
    // `wire_names!` macro), so the discriminant is the index; the test `metric_indexes_are_pinned`
    // guards both this and the stored order.
    m as i64
}

fn metric_at(i: i64) -> Option<Metric> {
    usize::try_from(i).ok().and_then(|i| Metric::ALL.get(i)).copied()
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn device_id(conn: &Connection, name: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT id FROM device_keys WHERE name = ?1")?.query_row([name], |r| r.get(0)).optional()
}

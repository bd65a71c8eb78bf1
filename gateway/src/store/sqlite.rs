//! The SQLite backend of the store: one writer thread owns the write connection and commits
//! many writes per transaction (WAL, `synchronous=FULL`; acks fire only after the commit),
//! while reads run on their own connection beside it. Design notes: [`SqliteStore`].

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use citywatch_edge::wire::{DeviceKind, EventKind, Metric};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use super::{
    DeviceRecord, Error, EventRecord, Point, QuarantineEntry, Reading, ReadingQuery, Result, StoreStats, Write,
};
use crate::store::StorageConfig;
use crate::ingest::{now_ms, Ack};

#[cfg(test)]
mod tests;

/// The database file inside the data directory.
pub const DB_FILE: &str = "citywatch.db";
/// The schema this code writes; older databases are migrated, newer ones refused.
pub const SCHEMA_VERSION: i64 = 1;

const MINUTE_MS: i64 = 60_000;
/// Rows one retention statement deletes at most.
const RETENTION_CHUNK: usize = 2_000;
/// A retention step stops after this many rows or this long, whichever comes first.
const RETENTION_STEP_ROWS: usize = 20_000;
const RETENTION_STEP_TIME: Duration = Duration::from_millis(10);

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
    /// Most rows in one transaction (a `Write::Readings(v)` counts `v.len()`, an ack 0, others 1).
    pub batch_max_rows: usize,
    /// Writes buffered ahead of the writer thread.
    pub queue_capacity: usize,
    pub quarantine_max_rows: usize,
    /// Always `Full` from a configuration; `Normal` exists to measure what `Full` costs.
    pub synchronous: Synchronous,
    /// Least time between two retention passes (default 5 minutes).
    pub retention_every: Duration,
    /// Page cache of the write connection, MiB (default 64). Each batch dirties about one page
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
            queue_capacity: c.queue_capacity.max(1),
            quarantine_max_rows: c.quarantine_max_rows,
            synchronous: Synchronous::Full,
            retention_every: Duration::from_secs(300),
            cache_mib: 64,
            wal_autocheckpoint_pages: 10_000,
        }
    }
}

/// Counters shared by the writer (which updates them) and [`SqliteStore::stats`].
#[derive(Debug, Default)]
struct Shared {
    readings_written: AtomicU64,
    events_written: AtomicU64,
    quarantined: AtomicU64,
    batches: AtomicU64,
    last_batch_us: AtomicU64,
    max_batch_us: AtomicU64,
    last_batch_rows: AtomicU64,
    write_errors: AtomicU64,
    /// Set while a batch keeps failing for want of disk (full, read-only, I/O error) and is
    /// being retried; ingestion is paused behind it.
    refusing: std::sync::atomic::AtomicBool,
}

/// Sends writes to the writer thread. Cheap to clone; when the last clone is dropped the writer
/// drains what is queued, commits it and stops.
#[derive(Debug, Clone)]
pub struct StoreWriter {
    tx: mpsc::Sender<Write>,
}

impl StoreWriter {
    /// Queues a write, waiting while the queue is full. `Error::WriterGone` if the writer stopped.
    pub async fn send(&self, w: Write) -> Result<()> {
        self.tx.send(w).await.map_err(|_| Error::WriterGone)
    }

    /// Queues a write without waiting; gives it back when the queue is full or the writer gone.
    // The write comes back by value so the caller can retry it; boxing it would allocate on
    // exactly the path that runs when the store is already behind.
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, w: Write) -> Result<(), TrySendError<Write>> {
        self.tx.try_send(w)
    }

    /// [`StoreWriter::send`] for synchronous code; panics inside an async runtime (tokio's rule).
    pub fn blocking_send(&self, w: Write) -> Result<()> {
        self.tx.blocking_send(w).map_err(|_| Error::WriterGone)
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
/// # Schema (version 1)
///
/// - `device_keys(id INTEGER PRIMARY KEY, name TEXT UNIQUE)`: devices are referenced by a small
///   integer everywhere else; the writer caches the map in memory.
/// - `readings(device, metric, ts, value, historical)`, `WITHOUT ROWID`, primary key
///   `(device, metric, ts)`. `metric` is the index in [`Metric::ALL`], which is therefore
///   append-only (a test pins it). A reading whose key is already stored (a replay) is ignored:
///   the first value written wins and the rollups count it once.
/// - `rollup_1m(device, metric, minute, min, max, sum, count, last, last_ts)`, `minute` being the
///   minute's start in ms; maintained by the writer from the readings it actually inserted.
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
/// VM (2 cores, ext4 on virtio) the writer alone did:
/// - `live`, 1000 devices × 3 metrics round-robin (every batch touches all 3000 series):
///   ~90–130k rows/s with `FULL`, ~110–150k with `NORMAL`; batches take up to ~230 ms.
/// - `replay`, a batch holding ~3 devices' consecutive points: ~580–760k rows/s with `FULL`,
///   ~620k–1.1M with `NORMAL`; batches ≤ ~55 ms.
///
/// The `live` ceiling is write amplification, not CPU: a transaction writes every page it
/// dirties to the WAL, and clustering by `(device, metric, ts)` puts each series' newest rows on
/// its own leaf page (plus one rollup page), so a 10 000-row batch over 3000 series writes
/// ~6000 pages (~24 MB). Bigger batches or fewer series per batch raise the rate.
#[derive(Debug)]
pub struct SqliteStore {
    db_path: PathBuf,
    reader: Mutex<Connection>,
    shared: Arc<Shared>,
    /// Weak, so the store itself does not keep the writer alive.
    tx: mpsc::WeakSender<Write>,
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
        reader.execute_batch("PRAGMA busy_timeout=5000; PRAGMA cache_size=-8192; PRAGMA query_only=1;")?;

        let capacity = opts.queue_capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Arc::new(Shared::default());
        let raw_retention_ms = duration_ms(opts.raw_retention);
        let writer = Writer {
            conn,
            rx,
            shared: shared.clone(),
            keys,
            logged: HashSet::new(),
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
            queue_capacity: capacity,
            raw_retention_ms,
            writer: Mutex::new(Some(handle)),
        };
        Ok((store, StoreWriter { tx }))
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
            events_written: get(&s.events_written),
            quarantined: get(&s.quarantined),
            batches: get(&s.batches),
            last_batch_us: get(&s.last_batch_us),
            max_batch_us: get(&s.max_batch_us),
            last_batch_rows: get(&s.last_batch_rows),
            queue_depth: depth as u64,
            queue_capacity: self.queue_capacity as u64,
            write_errors: get(&s.write_errors),
            refusing: s.refusing.load(Ordering::Relaxed),
        }
    }

    /// Readings of one device and metric in `[from_ms, to_ms)`, oldest first, at most `limit`.
    ///
    /// - `step_ms: None`: the raw readings.
    /// - `step_ms: Some(step)`: one point per non-empty step `floor((ts - from_ms) / step)`,
    ///   stamped with the step's start, with min/max/avg/last/count of its readings.
    /// - When `step` is a whole number of minutes, or is at least a minute and `from_ms` lies
    ///   before the raw retention horizon, the answer comes from the one-minute rollups instead:
    ///   `from_ms` is then floored and `to_ms` rounded up to whole minutes, and steps start at the
    ///   floored `from_ms`. For minute-aligned `from_ms`/`to_ms` and whole-minute steps this is
    ///   exactly the raw answer (up to float summation order in `avg`), only cheaper.
    pub fn readings(&self, q: &ReadingQuery) -> Result<Vec<Point>> {
        if let Some(step) = q.step_ms {
            if step <= 0 {
                return Err(Error::Invalid(format!("step_ms must be positive, not {step}")));
            }
        }
        if q.from_ms >= q.to_ms || q.limit == 0 {
            return Ok(Vec::new());
        }
        let conn = lock(&self.reader);
        let Some(device) = device_id(&conn, &q.device)? else { return Ok(Vec::new()) };
        let metric = metric_index(q.metric);
        let limit = sql_limit(q.limit);
        let Some(step) = q.step_ms else {
            let mut stmt = conn.prepare_cached(
                "SELECT ts, value FROM readings WHERE device = ?1 AND metric = ?2 AND ts >= ?3 AND ts < ?4
                 ORDER BY ts LIMIT ?5",
            )?;
            let rows = stmt.query_map(params![device, metric, q.from_ms, q.to_ms, limit], |r| {
                let v: f64 = r.get(1)?;
                Ok(Point { ts_ms: r.get(0)?, min: v, max: v, avg: v, last: v, count: 1 })
            })?;
            return Ok(rows.collect::<rusqlite::Result<_>>()?);
        };
        let horizon = now_ms().saturating_sub(self.raw_retention_ms);
        let use_rollups = step >= MINUTE_MS && (step % MINUTE_MS == 0 || q.from_ms < horizon);
        let (from, to, sql) = if use_rollups {
            (
                q.from_ms.div_euclid(MINUTE_MS) * MINUTE_MS,
                q.to_ms.saturating_add(MINUTE_MS - 1).div_euclid(MINUTE_MS) * MINUTE_MS,
                "SELECT b, mn, mx, sm / cnt, cnt,
                   (SELECT r.last FROM rollup_1m r WHERE r.device = ?1 AND r.metric = ?2
                      AND r.minute >= ?3 + b * ?5 AND r.minute < ?3 + (b + 1) * ?5 AND r.last_ts = lts LIMIT 1)
                 FROM (SELECT (minute - ?3) / ?5 AS b, min(min) AS mn, max(max) AS mx, sum(sum) AS sm,
                              sum(count) AS cnt, max(last_ts) AS lts
                       FROM rollup_1m WHERE device = ?1 AND metric = ?2 AND minute >= ?3 AND minute < ?4
                       GROUP BY b)
                 ORDER BY b LIMIT ?6",
            )
        } else {
            (
                q.from_ms,
                q.to_ms,
                "SELECT b, mn, mx, av, cnt,
                   (SELECT r.value FROM readings r WHERE r.device = ?1 AND r.metric = ?2 AND r.ts = lts)
                 FROM (SELECT (ts - ?3) / ?5 AS b, min(value) AS mn, max(value) AS mx, avg(value) AS av,
                              count(*) AS cnt, max(ts) AS lts
                       FROM readings WHERE device = ?1 AND metric = ?2 AND ts >= ?3 AND ts < ?4
                       GROUP BY b)
                 ORDER BY b LIMIT ?6",
            )
        };
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params![device, metric, from, to, step, limit], |r| {
            let b: i64 = r.get(0)?;
            let count: i64 = r.get(4)?;
            Ok(Point {
                ts_ms: from + b * step,
                min: r.get(1)?,
                max: r.get(2)?,
                avg: r.get(3)?,
                last: r.get(5)?,
                count: count.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Quarantined messages, newest first, at most `limit`, older than `before_id` if given.
    pub fn quarantine(&self, limit: usize, before_id: Option<i64>) -> Result<Vec<QuarantineEntry>> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(
            "SELECT id, received_ms, topic, reason, payload FROM quarantine WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![before_id.unwrap_or(i64::MAX), sql_limit(limit)], |r| {
            Ok(QuarantineEntry {
                id: r.get(0)?,
                received_ms: r.get(1)?,
                topic: r.get(2)?,
                reason: r.get(3)?,
                payload: bytes::Bytes::from(r.get::<_, Vec<u8>>(4)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many quarantined messages are kept, per reason, ordered by reason.
    pub fn quarantine_counts(&self) -> Result<Vec<(String, u64)>> {
        let conn = lock(&self.reader);
        let mut stmt =
            conn.prepare_cached("SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY reason")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every device record, ordered by id (to rebuild the registry at startup). A row whose kind
    /// this build does not know is skipped with a warning rather than failing the startup.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(
            "SELECT id, site, kind, fw, interval_s, location, install_date, first_seen_ms, last_seen_ms, state_json
             FROM devices ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            let kind: String = r.get(2)?;
            let Some(kind) = DeviceKind::parse(&kind) else {
                tracing::warn!(device = %id, kind = %kind, "stored device has an unknown kind; skipped");
                continue;
            };
            out.push(DeviceRecord {
                id,
                site: r.get(1)?,
                kind,
                fw: r.get(3)?,
                interval_s: r.get::<_, i64>(4)?.clamp(0, u32::MAX as i64) as u32,
                location: r.get(5)?,
                install_date: r.get(6)?,
                first_seen_ms: r.get(7)?,
                last_seen_ms: r.get(8)?,
                state_json: r.get(9)?,
            });
        }
        Ok(out)
    }

    /// Events of one device in `[from_ms, to_ms)`, oldest first, at most `limit`. Rows of an
    /// event kind or metric this build does not know are skipped.
    pub fn events(&self, device: &str, from_ms: i64, to_ms: i64, limit: usize) -> Result<Vec<EventRecord>> {
        let conn = lock(&self.reader);
        let Some(id) = device_id(&conn, device)? else { return Ok(Vec::new()) };
        let mut stmt = conn.prepare_cached(
            "SELECT ts, seq, kind, metric, value, cmd_id FROM events
             WHERE device = ?1 AND ts >= ?2 AND ts < ?3 ORDER BY ts, seq LIMIT ?4",
        )?;
        let mut rows = stmt.query(params![id, from_ms, to_ms, sql_limit(limit)])?;
        let name: Arc<str> = Arc::from(device);
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let kind: String = r.get(2)?;
            let Some(event) = EventKind::parse(&kind) else {
                tracing::warn!(device, kind = %kind, "stored event has an unknown kind; skipped");
                continue;
            };
            let metric = match r.get::<_, Option<i64>>(3)? {
                None => None,
                Some(i) => match metric_at(i) {
                    Some(m) => Some(m),
                    None => {
                        tracing::warn!(device, metric = i, "stored event has an unknown metric; skipped");
                        continue;
                    }
                },
            };
            out.push(EventRecord {
                device: name.clone(),
                ts_ms: r.get(0)?,
                seq: r.get::<_, i64>(1)?.clamp(0, u32::MAX as i64) as u32,
                event,
                metric,
                value: r.get(4)?,
                cmd_id: r.get(5)?,
            });
        }
        Ok(out)
    }

    /// Raw readings stored for one device and metric.
    pub fn reading_count(&self, device: &str, metric: Metric) -> Result<u64> {
        let conn = lock(&self.reader);
        let Some(id) = device_id(&conn, device)? else { return Ok(0) };
        let mut stmt = conn.prepare_cached("SELECT count(*) FROM readings WHERE device = ?1 AND metric = ?2")?;
        let n: i64 = stmt.query_row(params![id, metric_index(metric)], |r| r.get(0))?;
        Ok(n.max(0) as u64)
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

const SCHEMA_V1: &str = "
CREATE TABLE device_keys(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE readings(
    device INTEGER NOT NULL, metric INTEGER NOT NULL, ts INTEGER NOT NULL,
    value REAL NOT NULL, historical INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(device, metric, ts)) WITHOUT ROWID;
CREATE TABLE rollup_1m(
    device INTEGER NOT NULL, metric INTEGER NOT NULL, minute INTEGER NOT NULL,
    min REAL NOT NULL, max REAL NOT NULL, sum REAL NOT NULL, count INTEGER NOT NULL,
    last REAL NOT NULL, last_ts INTEGER NOT NULL,
    PRIMARY KEY(device, metric, minute)) WITHOUT ROWID;
CREATE TABLE events(
    device INTEGER NOT NULL, ts INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
    metric INTEGER, value REAL, cmd_id TEXT,
    PRIMARY KEY(device, ts, seq)) WITHOUT ROWID;
CREATE TABLE quarantine(
    id INTEGER PRIMARY KEY AUTOINCREMENT, received_ms INTEGER NOT NULL, topic TEXT NOT NULL,
    reason TEXT NOT NULL, payload BLOB NOT NULL);
CREATE INDEX quarantine_reason ON quarantine(reason);
CREATE TABLE devices(
    id TEXT PRIMARY KEY, site TEXT NOT NULL, kind TEXT NOT NULL, fw TEXT, interval_s INTEGER NOT NULL,
    location TEXT, install_date TEXT, first_seen_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
    state_json TEXT NOT NULL);
";

/// Creates the schema of a new database, or checks (and one day migrates) an existing one.
fn migrate(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version(version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL);",
    )?;
    let version: i64 = conn.query_row("SELECT coalesce(max(version), 0) FROM schema_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(Error::Invalid(format!(
            "the database has schema version {version}, newer than this gateway's {SCHEMA_VERSION}"
        )));
    }
    if version < 1 {
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA_V1}"))?;
        let done = conn
            .execute("INSERT INTO schema_version(version, applied_ms) VALUES (1, ?1)", [now_ms()])
            .and_then(|_| conn.execute_batch("COMMIT"));
        if let Err(e) = done {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
    }
    // Future migrations: `if version < 2 { ... }`, each in its own transaction.
    Ok(())
}

fn load_keys(conn: &Connection) -> rusqlite::Result<HashMap<Arc<str>, i64>> {
    let mut stmt = conn.prepare("SELECT id, name FROM device_keys")?;
    let rows = stmt.query_map([], |r| Ok((Arc::<str>::from(r.get::<_, String>(1)?), r.get::<_, i64>(0)?)))?;
    rows.collect()
}

// ---------------------------------------------------------------------------------------------
// The writer thread.

struct Writer {
    conn: Connection,
    rx: mpsc::Receiver<Write>,
    opts: StoreOptions,
    shared: Arc<Shared>,
    /// device name → id, every row of `device_keys`.
    keys: HashMap<Arc<str>, i64>,
    /// Error kinds already logged.
    logged: HashSet<String>,
    retention: Option<RetentionPass>,
    next_retention: Instant,
}

/// What one committed batch did.
#[derive(Default)]
struct BatchCounts {
    readings: u64,
    events: u64,
    quarantined: u64,
    rows: u64,
}

/// One reading, keyed for the insert order.
struct Row {
    device: i64,
    metric: i64,
    ts: i64,
    value: f64,
    historical: bool,
}

/// A rollup cell being accumulated from one batch.
struct Agg {
    device: i64,
    metric: i64,
    minute: i64,
    min: f64,
    max: f64,
    sum: f64,
    count: i64,
    last: f64,
    last_ts: i64,
}

impl Writer {
    fn run(mut self) {
        self.retention = self.start_retention();
        let max_msgs = self.opts.batch_max_rows.saturating_mul(4).max(64);
        loop {
            let first = if self.retention.is_some() {
                match self.rx.try_recv() {
                    Ok(w) => w,
                    Err(TryRecvError::Empty) => {
                        self.retention_step();
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match self.rx.blocking_recv() {
                    Some(w) => w,
                    None => break,
                }
            };
            let mut rows = rows_of(&first);
            let mut batch = vec![first];
            while rows < self.opts.batch_max_rows && batch.len() < max_msgs {
                match self.rx.try_recv() {
                    Ok(w) => {
                        rows += rows_of(&w);
                        batch.push(w);
                    }
                    Err(_) => break,
                }
            }
            self.write_batch(batch);
            if self.retention.is_none() && Instant::now() >= self.next_retention {
                self.retention = self.start_retention();
            }
        }
        tracing::debug!("store writer: every sender is gone and the queue is drained; stopping");
    }

    fn write_batch(&mut self, batch: Vec<Write>) {
        let started = Instant::now();
        // Acks are set aside first: they fire after the commit, or are dropped after a failure
        // has been counted, so whoever sees an ack (or its absence) sees the stats that go with it.
        let mut acks = Vec::new();
        let mut writes = Vec::with_capacity(batch.len());
        for w in batch {
            match w {
                Write::Ack(a) => acks.push(a),
                other => writes.push(other),
            }
        }
        // A batch that fails for want of disk is retried until it commits, holding its acks:
        // the queue fills, the decode stage and the source wait, and the broker keeps every
        // unacknowledged QoS 1 message. Ingestion pauses; nothing is lost or half-written.
        // Other errors (a bug, a constraint) drop the batch as before. On shutdown (every
        // sender gone) the retries stop and the unacked messages are redelivered after restart.
        let mut wait = STORAGE_RETRY_INITIAL;
        let mut attempts = 0u64;
        let result = loop {
            let mut new_keys = Vec::new();
            let mut counts = BatchCounts::default();
            match apply_batch(&mut self.conn, &mut self.keys, &self.opts, &writes, &mut new_keys, &mut counts) {
                Ok(()) => break Ok(counts),
                Err(e) => {
                    // The transaction rolled back: ids handed out in it no longer exist.
                    for k in new_keys {
                        self.keys.remove(&k);
                    }
                    self.error("batch", &e);
                    attempts += 1;
                    if !is_storage_unavailable(&e) || self.rx.is_closed() {
                        break Err(());
                    }
                    if !self.shared.refusing.swap(true, Ordering::Relaxed) {
                        tracing::error!(error = %e, dir = %self.opts.dir.display(), "the store cannot write: ingestion paused, retrying; unacknowledged QoS 1 messages stay with the broker");
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(STORAGE_RETRY_MAX);
                }
            }
        };
        if self.shared.refusing.swap(false, Ordering::Relaxed) && result.is_ok() {
            tracing::warn!(attempts, "the store writes again; ingestion resumes");
        }
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        match result {
            Ok(counts) => {
                let s = &self.shared;
                s.readings_written.fetch_add(counts.readings, Ordering::Relaxed);
                s.events_written.fetch_add(counts.events, Ordering::Relaxed);
                s.quarantined.fetch_add(counts.quarantined, Ordering::Relaxed);
                s.batches.fetch_add(1, Ordering::Relaxed);
                s.last_batch_us.store(us, Ordering::Relaxed);
                s.max_batch_us.fetch_max(us, Ordering::Relaxed);
                s.last_batch_rows.store(counts.rows, Ordering::Relaxed);
                for ack in acks {
                    fire(ack);
                }
            }
            Err(()) => {
                // `acks` drop here unfired: the broker redelivers those messages.
            }
        }
    }

    /// Counts an error and logs the first of each kind.
    fn error(&mut self, what: &str, e: &rusqlite::Error) {
        self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        let kind = format!("{what}: {}", error_kind(e));
        if self.logged.insert(kind) {
            tracing::error!(error = %e, "store {what} failed (further errors of this kind are only counted)");
        }
    }

    /// A pass to run while the queue is idle; its devices and cutoffs are taken at its first
    /// step, so it covers the devices of every batch written before that step.
    fn start_retention(&mut self) -> Option<RetentionPass> {
        Some(RetentionPass {
            devices: Vec::new(),
            device: 0,
            stage: 0,
            raw_cutoff: 0,
            rollup_cutoff: 0,
            deleted: 0,
            started: None,
        })
    }

    /// Runs one bounded step of the current retention pass in its own transaction.
    fn retention_step(&mut self) {
        let Some(mut pass) = self.retention.take() else { return };
        if pass.started.is_none() {
            let now = now_ms();
            pass.devices = self.keys.values().copied().collect();
            pass.devices.sort_unstable();
            pass.raw_cutoff = now.saturating_sub(duration_ms(self.opts.raw_retention));
            pass.rollup_cutoff = now.saturating_sub(duration_ms(self.opts.rollup_retention));
            pass.started = Some(Instant::now());
        }
        match retention_step(&mut self.conn, &mut pass, self.opts.quarantine_max_rows) {
            Ok(true) => {
                let elapsed = pass.started.map(|t| t.elapsed()).unwrap_or_default();
                tracing::debug!(deleted = pass.deleted, ?elapsed, "retention pass done");
                self.next_retention = Instant::now() + self.opts.retention_every;
            }
            Ok(false) => self.retention = Some(pass),
            Err(e) => {
                self.error("retention", &e);
                self.next_retention = Instant::now() + self.opts.retention_every;
            }
        }
    }
}

/// Rows a write counts for `batch_max_rows`.
fn rows_of(w: &Write) -> usize {
    match w {
        Write::Readings(v) => v.len(),
        Write::Ack(_) => 0,
        _ => 1,
    }
}

/// Fires an ack; a panicking ack closure is logged, not allowed to kill the writer.
fn fire(ack: Ack) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ack.done())).is_err() {
        tracing::error!("an ack callback panicked");
    }
}

/// A short, stable name for an error, to log each kind once.
fn error_kind(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => format!("{:?}", f.code),
        other => {
            let d = format!("{other:?}");
            d.split(['(', ' ', '{']).next().unwrap_or_default().to_owned()
        }
    }
}

/// First and longest wait between attempts at a batch the disk refuses.
const STORAGE_RETRY_INITIAL: std::time::Duration = std::time::Duration::from_millis(250);
const STORAGE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Errors of the disk rather than of the batch: retrying the same batch later can succeed.
fn is_storage_unavailable(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, C::DiskFull | C::SystemIoFailure | C::ReadOnly | C::CannotOpen | C::DatabaseBusy | C::DatabaseLocked | C::PermissionDenied | C::OutOfMemory)
    )
}

/// Writes one batch in one transaction. On error nothing is committed.
fn apply_batch(
    conn: &mut Connection,
    keys: &mut HashMap<Arc<str>, i64>,
    opts: &StoreOptions,
    batch: &[Write],
    new_keys: &mut Vec<Arc<str>>,
    counts: &mut BatchCounts,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut rows: Vec<Row> = Vec::new();
    let mut quarantined = false;
    for w in batch {
        match w {
            Write::Readings(readings) => {
                rows.reserve(readings.len());
                for &Reading { ref device, metric, ts_ms, value, historical } in readings {
                    if !value.is_finite() {
                        tracing::debug!(%device, %metric, value, "non-finite reading dropped");
                        continue;
                    }
                    let device = key(&tx, keys, new_keys, device)?;
                    rows.push(Row { device, metric: metric_index(metric), ts: ts_ms, value, historical });
                }
            }
            Write::Event(e) => {
                counts.rows += 1;
                let device = key(&tx, keys, new_keys, &e.device)?;
                let mut stmt = tx.prepare_cached(
                    "INSERT OR IGNORE INTO events(device, ts, seq, kind, metric, value, cmd_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                counts.events += stmt.execute(params![
                    device,
                    e.ts_ms,
                    e.seq,
                    e.event.as_str(),
                    e.metric.map(metric_index),
                    e.value,
                    e.cmd_id
                ])? as u64;
            }
            Write::Quarantine(q) => {
                counts.rows += 1;
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO quarantine(received_ms, topic, reason, payload) VALUES (?1, ?2, ?3, ?4)",
                )?;
                stmt.execute(params![q.received_ms, q.topic, q.reason, &q.payload[..]])?;
                counts.quarantined += 1;
                quarantined = true;
            }
            Write::Device(d) => {
                counts.rows += 1;
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO devices(id, site, kind, fw, interval_s, location, install_date,
                                         first_seen_ms, last_seen_ms, state_json)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT(id) DO UPDATE SET site = excluded.site, kind = excluded.kind, fw = excluded.fw,
                       interval_s = excluded.interval_s, location = excluded.location,
                       install_date = excluded.install_date, first_seen_ms = excluded.first_seen_ms,
                       last_seen_ms = excluded.last_seen_ms, state_json = excluded.state_json",
                )?;
                stmt.execute(params![
                    d.id,
                    d.site,
                    d.kind.as_str(),
                    d.fw,
                    d.interval_s,
                    d.location,
                    d.install_date,
                    d.first_seen_ms,
                    d.last_seen_ms,
                    d.state_json
                ])?;
            }
            // Set aside by the caller.
            Write::Ack(_) => {}
        }
    }
    counts.rows += rows.len() as u64;
    counts.readings = insert_readings(&tx, &mut rows)?;
    if quarantined {
        trim_quarantine(&tx, opts.quarantine_max_rows)?;
    }
    tx.commit()
}

/// The id of a device name, adding it to `device_keys` (and `new_keys`) when new.
fn key(
    tx: &rusqlite::Transaction<'_>,
    keys: &mut HashMap<Arc<str>, i64>,
    new_keys: &mut Vec<Arc<str>>,
    name: &Arc<str>,
) -> rusqlite::Result<i64> {
    if let Some(id) = keys.get(name) {
        return Ok(*id);
    }
    let id: i64 = tx
        .prepare_cached(
            "INSERT INTO device_keys(name) VALUES (?1)
             ON CONFLICT(name) DO UPDATE SET name = excluded.name RETURNING id",
        )?
        .query_row([&**name], |r| r.get(0))?;
    keys.insert(name.clone(), id);
    new_keys.push(name.clone());
    Ok(id)
}

/// Inserts the readings in key order (B-tree locality) and upserts the rollups of those actually
/// inserted (a replayed key is ignored, so it is not counted twice). Returns the rows inserted.
fn insert_readings(tx: &rusqlite::Transaction<'_>, rows: &mut [Row]) -> rusqlite::Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    // Stable: among equal keys the first sent is inserted and the others ignored.
    rows.sort_by_key(|r| (r.device, r.metric, r.ts));
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO readings(device, metric, ts, value, historical) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut upsert = tx.prepare_cached(
        "INSERT INTO rollup_1m(device, metric, minute, min, max, sum, count, last, last_ts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT(device, metric, minute) DO UPDATE SET
           min = min(min, excluded.min), max = max(max, excluded.max),
           sum = sum + excluded.sum, count = count + excluded.count,
           last = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last ELSE last END,
           last_ts = max(last_ts, excluded.last_ts)",
    )?;
    let mut flush = |a: &Agg| {
        upsert
            .execute(params![a.device, a.metric, a.minute, a.min, a.max, a.sum, a.count, a.last, a.last_ts])
            .map(|_| ())
    };
    let mut inserted = 0u64;
    let mut cur: Option<Agg> = None;
    for r in rows.iter() {
        if insert.execute(params![r.device, r.metric, r.ts, r.value, r.historical])? == 0 {
            continue;
        }
        inserted += 1;
        let minute = r.ts.div_euclid(MINUTE_MS) * MINUTE_MS;
        match &mut cur {
            // Rows are sorted by (device, metric, ts): a cell's rows are adjacent, ts ascending.
            Some(a) if a.device == r.device && a.metric == r.metric && a.minute == minute => {
                a.min = a.min.min(r.value);
                a.max = a.max.max(r.value);
                a.sum += r.value;
                a.count += 1;
                a.last = r.value;
                a.last_ts = r.ts;
            }
            _ => {
                if let Some(a) = cur.take() {
                    flush(&a)?;
                }
                cur = Some(Agg {
                    device: r.device,
                    metric: r.metric,
                    minute,
                    min: r.value,
                    max: r.value,
                    sum: r.value,
                    count: 1,
                    last: r.value,
                    last_ts: r.ts,
                });
            }
        }
    }
    if let Some(a) = cur {
        flush(&a)?;
    }
    Ok(inserted)
}

fn trim_quarantine(conn: &Connection, max_rows: usize) -> rusqlite::Result<usize> {
    conn.prepare_cached("DELETE FROM quarantine WHERE id <= (SELECT max(id) FROM quarantine) - ?1")?
        .execute([sql_limit(max_rows)])
}

/// Where a retention pass is: device `devices[device]`, stage `0..M` = raw readings of metric
/// `stage`, `M..2M` = rollups of metric `stage - M`, `2M` = events (M = `Metric::ALL.len()`).
struct RetentionPass {
    devices: Vec<i64>,
    device: usize,
    stage: usize,
    raw_cutoff: i64,
    rollup_cutoff: i64,
    deleted: u64,
    /// `None` until the first step.
    started: Option<Instant>,
}

/// One bounded step; `Ok(true)` when the pass is complete.
fn retention_step(conn: &mut Connection, pass: &mut RetentionPass, quarantine_max_rows: usize) -> rusqlite::Result<bool> {
    let m = Metric::ALL.len();
    let started = Instant::now();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut step_rows = 0usize;
    let done = loop {
        let Some(&device) = pass.devices.get(pass.device) else {
            step_rows += trim_quarantine(&tx, quarantine_max_rows)?;
            break true;
        };
        let chunk = sql_limit(RETENTION_CHUNK);
        let n = if pass.stage < m {
            tx.prepare_cached(
                "DELETE FROM readings WHERE device = ?1 AND metric = ?2 AND ts < coalesce(
                   (SELECT ts FROM readings WHERE device = ?1 AND metric = ?2 AND ts < ?3
                    ORDER BY ts LIMIT 1 OFFSET ?4), ?3)",
            )?
            .execute(params![device, pass.stage as i64, pass.raw_cutoff, chunk])?
        } else if pass.stage < 2 * m {
            tx.prepare_cached(
                "DELETE FROM rollup_1m WHERE device = ?1 AND metric = ?2 AND minute < coalesce(
                   (SELECT minute FROM rollup_1m WHERE device = ?1 AND metric = ?2 AND minute < ?3
                    ORDER BY minute LIMIT 1 OFFSET ?4), ?3)",
            )?
            .execute(params![device, (pass.stage - m) as i64, pass.rollup_cutoff, chunk])?
        } else {
            tx.prepare_cached(
                "DELETE FROM events WHERE device = ?1 AND ts < coalesce(
                   (SELECT ts FROM events WHERE device = ?1 AND ts < ?2 ORDER BY ts LIMIT 1 OFFSET ?3), ?2)",
            )?
            .execute(params![device, pass.rollup_cutoff, chunk])?
        };
        step_rows += n;
        // A full chunk may have left more behind: stay on this stage. (Events sharing one ts
        // could delete fewer than a chunk; moving on then only postpones them to the next pass.)
        if n < RETENTION_CHUNK {
            pass.stage += 1;
            if pass.stage > 2 * m {
                pass.stage = 0;
                pass.device += 1;
            }
        }
        if step_rows >= RETENTION_STEP_ROWS || started.elapsed() >= RETENTION_STEP_TIME {
            break false;
        }
    };
    tx.commit()?;
    pass.deleted += step_rows as u64;
    Ok(done)
}

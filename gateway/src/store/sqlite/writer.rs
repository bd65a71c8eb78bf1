//! The writer thread of the embedded store: owns the write connection, takes writes from the
//! bounded queue, commits many per transaction and fires acks after the commit. Retention
//! steps run between batches ([`super::retention`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use backon::BackoffBuilder as _;
use rusqlite::{params, Connection};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use citywatch_edge::wire::Metric;

use super::retention::{trim_quarantine, RetentionPass};
use super::schema::METRIC_COLUMNS;
use super::{metric_index, Shared, StoreOptions, MINUTE_MS};
use crate::ingest::Ack;
use crate::store::{Reading, Write};

// ---------------------------------------------------------------------------------------------
// The writer thread.

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) rx: mpsc::Receiver<Write>,
    /// Readings queued ahead of this thread: released as each write is taken.
    pub(super) backlog: Arc<super::Backlog>,
    pub(super) opts: StoreOptions,
    pub(super) shared: Arc<Shared>,
    /// device name → id, every row of `device_keys`.
    pub(super) keys: HashMap<Arc<str>, i64>,
    /// Error kinds already logged.
    pub(super) logged: HashSet<String>,
    /// The rollup cells of the group being written.
    pub(super) cells: RollupCells,
    pub(super) retention: Option<RetentionPass>,
    pub(super) next_retention: Instant,
}

/// What one committed batch did.
#[derive(Default)]
struct BatchCounts {
    readings: u64,
    /// Readings not stored because their device already had one of that metric at that time
    /// (another message of the same `ts`, or one stored before).
    time_taken: u64,
    events: u64,
    quarantined: u64,
    rows: u64,
}

/// The metrics a row has a column for ([`Metric::ALL`], append-only).
const METRICS: usize = Metric::ALL.len();

/// One `readings` row: a device's readings at one time (one telemetry message), keyed for the
/// insert order. `values[i]` is the reading of `Metric::ALL[i]`, NaN where there is none (a
/// stored reading is always finite).
struct Row {
    device: i64,
    ts: i64,
    historical: bool,
    values: [f64; METRICS],
}

impl Row {
    fn new(device: i64, ts: i64, historical: bool) -> Row {
        Row { device, ts, historical, values: [f64::NAN; METRICS] }
    }

    /// Takes a reading unless the row already has one for that metric (the first one wins, as
    /// for a stored key).
    fn set(&mut self, metric: usize, value: f64) {
        if self.values[metric].is_nan() {
            self.values[metric] = value;
        }
    }

    /// Folds in a later row of the same (device, ts): its readings of metrics this one lacks.
    fn absorb(&mut self, later: &Row) {
        for (mine, theirs) in self.values.iter_mut().zip(&later.values) {
            if mine.is_nan() {
                *mine = *theirs;
            }
        }
    }
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
    pub(super) fn run(mut self) {
        self.retention = self.start_retention();
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
            self.backlog.taken(&first);
            let mut take = vec![first];
            take_waiting(&mut self.rx, &self.backlog, self.opts.batch_max_rows, &mut take);
            self.write_group(take);
            if self.retention.is_none() && Instant::now() >= self.next_retention {
                self.retention = self.start_retention();
            }
        }
        tracing::debug!("store writer: every sender is gone and the queue is drained; stopping");
    }

    /// Commits one group: the first take, then every further take already waiting, in one
    /// transaction of at most `commit_max_rows` rows (group commit). When the writer keeps up
    /// the queue is empty after the first take and the group is that take alone; when it falls
    /// behind, the group grows, and each series' newest B-tree page is written to the WAL once
    /// per group instead of once per take — the store's write amplification, which (not the
    /// CPU) limited ingest. The group's writes are held until the commit so that a group the disk
    /// refuses can be retried whole.
    fn write_group(&mut self, first: Vec<Write>) {
        let started = Instant::now();
        // Acks are set aside first: they fire after the commit, or are dropped after a failure
        // has been counted, so whoever sees an ack (or its absence) sees the stats that go with it.
        let mut acks = Vec::new();
        let mut writes = Vec::new();
        set_aside_acks(first, &mut acks, &mut writes);
        let mut new_keys = Vec::new();
        let mut counts = BatchCounts::default();
        let grown = self.grow_group(&mut acks, &mut writes, &mut new_keys, &mut counts);
        let result = match grown {
            Ok(()) => Ok(counts),
            Err(e) => {
                if self.failed(new_keys, &e) {
                    self.retry_until_committed(&writes, &e)
                } else {
                    Err(())
                }
            }
        };
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        match result {
            Ok(counts) => {
                let s = &self.shared;
                s.readings_written.fetch_add(counts.readings, Ordering::Relaxed);
                s.readings_time_taken.fetch_add(counts.time_taken, Ordering::Relaxed);
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
        self.shared.busy_us.fetch_add(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The first attempt at a group: one transaction, the writes given, then further takes while
    /// writes are waiting and the group is under `commit_max_rows`; then the commit.
    fn grow_group(
        &mut self,
        acks: &mut Vec<Ack>,
        writes: &mut Vec<Write>,
        new_keys: &mut Vec<Arc<str>>,
        counts: &mut BatchCounts,
    ) -> rusqlite::Result<()> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let cells = &mut self.cells;
        cells.clear();
        apply_writes(&tx, &mut self.keys, writes, new_keys, counts, cells)?;
        let mut rows: usize = writes.iter().map(rows_of).sum();
        while rows < self.opts.commit_max_rows {
            let mut take = Vec::new();
            let take_rows = take_waiting(&mut self.rx, &self.backlog, self.opts.batch_max_rows, &mut take);
            if take.is_empty() {
                break;
            }
            let from = writes.len();
            set_aside_acks(take, acks, writes);
            apply_writes(&tx, &mut self.keys, &writes[from..], new_keys, counts, cells)?;
            rows += take_rows;
        }
        finish_group(tx, cells, counts, self.opts.quarantine_max_rows, &self.shared.commit_us)
    }

    /// A group the disk refused (full, read-only, gone): retried whole, holding its acks, until
    /// it commits. The queue fills, the decode stage and the source wait, and the broker keeps
    /// every unacknowledged QoS 1 message: ingestion pauses; nothing is lost or half-written.
    /// On shutdown (every sender gone) the retries stop and the unacked messages are redelivered
    /// after restart.
    fn retry_until_committed(&mut self, writes: &[Write], first_error: &rusqlite::Error) -> Result<BatchCounts, ()> {
        let mut backoff = backon::ExponentialBuilder::new()
            .with_min_delay(STORAGE_RETRY_INITIAL)
            .with_max_delay(STORAGE_RETRY_MAX)
            .without_max_times()
            .build();
        if !self.shared.refusing.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %first_error, dir = %self.opts.dir.display(), "the store cannot write: ingestion paused, retrying; unacknowledged QoS 1 messages stay with the broker");
        }
        let mut attempts = 1u64;
        loop {
            // Unlimited attempts: the iterator never ends.
            std::thread::sleep(backoff.next().unwrap_or(STORAGE_RETRY_MAX));
            let mut new_keys = Vec::new();
            let mut counts = BatchCounts::default();
            self.cells.clear();
            match apply_batch(&mut self.conn, &mut self.keys, &self.opts, writes, &mut new_keys, &mut counts, &mut self.cells, &self.shared.commit_us) {
                Ok(()) => {
                    self.shared.refusing.store(false, Ordering::Relaxed);
                    tracing::warn!(attempts, "the store writes again; ingestion resumes");
                    return Ok(counts);
                }
                Err(e) => {
                    attempts += 1;
                    if !self.failed(new_keys, &e) {
                        self.shared.refusing.store(false, Ordering::Relaxed);
                        return Err(());
                    }
                }
            }
        }
    }

    /// A group's transaction failed and rolled back: the device ids handed out in it no longer
    /// exist, the error is counted. Answers whether to try the group again (the disk refused it
    /// and senders remain) rather than drop it.
    fn failed(&mut self, new_keys: Vec<Arc<str>>, e: &rusqlite::Error) -> bool {
        for k in new_keys {
            self.keys.remove(&k);
        }
        self.error("batch", e);
        is_storage_unavailable(e) && !self.rx.is_closed()
    }

    /// Counts an error and logs the first of each kind.
    pub(super) fn error(&mut self, what: &str, e: &rusqlite::Error) {
        self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        let kind = format!("{what}: {}", error_kind(e));
        if self.logged.insert(kind) {
            tracing::error!(error = %e, "store {what} failed (further errors of this kind are only counted)");
        }
    }
}

/// Adds to `take` the writes already waiting, up to `batch_max_rows` rows in all (one take:
/// what is sorted and inserted in one go); returns the take's rows. Never waits.
fn take_waiting(rx: &mut mpsc::Receiver<Write>, backlog: &super::Backlog, batch_max_rows: usize, take: &mut Vec<Write>) -> usize {
    let max_msgs = batch_max_rows.saturating_mul(4).max(64);
    let mut rows: usize = take.iter().map(rows_of).sum();
    while rows < batch_max_rows && take.len() < max_msgs {
        match rx.try_recv() {
            Ok(w) => {
                backlog.taken(&w);
                rows += rows_of(&w);
                take.push(w);
            }
            Err(_) => break,
        }
    }
    rows
}

/// Moves a take's writes to `writes`, its acks to `acks`.
fn set_aside_acks(take: Vec<Write>, acks: &mut Vec<Ack>, writes: &mut Vec<Write>) {
    for w in take {
        match w {
            Write::Ack(a) => acks.push(a),
            other => writes.push(other),
        }
    }
}

/// Rows a write counts for `batch_max_rows` and `commit_max_rows`.
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

/// Writes a group in one transaction. On error nothing is committed.
fn apply_batch(
    conn: &mut Connection,
    keys: &mut HashMap<Arc<str>, i64>,
    opts: &StoreOptions,
    batch: &[Write],
    new_keys: &mut Vec<Arc<str>>,
    counts: &mut BatchCounts,
    cells: &mut RollupCells,
    commit_us: &AtomicU64,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    apply_writes(&tx, keys, batch, new_keys, counts, cells)?;
    finish_group(tx, cells, counts, opts.quarantine_max_rows, commit_us)
}

/// The end of a group's transaction: its rollup cells upserted, the quarantine trimmed when it
/// grew, the commit.
fn finish_group(
    tx: rusqlite::Transaction<'_>,
    cells: &mut RollupCells,
    counts: &BatchCounts,
    quarantine_max_rows: usize,
    commit_us: &AtomicU64,
) -> rusqlite::Result<()> {
    cells.flush(&tx)?;
    if counts.quarantined > 0 {
        trim_quarantine(&tx, quarantine_max_rows)?;
    }
    let started = Instant::now();
    let committed = tx.commit();
    commit_us.fetch_add(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    committed
}

/// Writes one take inside an open transaction: readings sorted by key (B-tree locality),
/// their rollups gathered in `cells`, events, quarantined messages, device records.
fn apply_writes(
    tx: &rusqlite::Transaction<'_>,
    keys: &mut HashMap<Arc<str>, i64>,
    batch: &[Write],
    new_keys: &mut Vec<Arc<str>>,
    counts: &mut BatchCounts,
    cells: &mut RollupCells,
) -> rusqlite::Result<()> {
    let mut rows: Vec<Row> = Vec::new();
    let mut last: Option<(&Arc<str>, i64)> = None;
    // Finite readings handed to `rows`: each ends stored or kept out by its time.
    let mut offered = 0u64;
    for w in batch {
        match w {
            Write::Readings(readings) => {
                for &Reading { ref device, metric, ts_ms, value, historical } in readings {
                    if !value.is_finite() {
                        tracing::debug!(%device, %metric, value, "non-finite reading dropped");
                        continue;
                    }
                    counts.rows += 1;
                    // A message's readings are adjacent: its device's id is looked up once, and
                    // they become one row.
                    let device = match last {
                        Some((name, id)) if Arc::ptr_eq(name, device) || **name == **device => id,
                        _ => {
                            let id = key(tx, keys, new_keys, device)?;
                            last = Some((device, id));
                            id
                        }
                    };
                    let metric = metric_index(metric) as usize;
                    offered += 1;
                    match rows.last_mut() {
                        Some(r) if r.device == device && r.ts == ts_ms => r.set(metric, value),
                        _ => {
                            let mut row = Row::new(device, ts_ms, historical);
                            row.set(metric, value);
                            rows.push(row);
                        }
                    }
                }
            }
            Write::Event(e) => {
                counts.rows += 1;
                let device = key(tx, keys, new_keys, &e.device)?;
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
    let stored = insert_readings(tx, &mut rows, cells)?;
    counts.readings += stored;
    // Every finite reading offered is stored or kept out by one already at its time (in its
    // row, in another row of the same time, or in the table).
    counts.time_taken += offered.saturating_sub(stored);
    Ok(())
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

/// Inserts the rows in key order (B-tree locality) and adds the readings actually stored to
/// the group's rollup cells. A row whose (device, ts) is already stored (a replay, or another
/// message of the same time) fills only the metrics still empty there: a stored reading is never
/// replaced, so it is never counted twice. Returns the readings stored.
fn insert_readings(tx: &rusqlite::Transaction<'_>, rows: &mut Vec<Row>, cells: &mut RollupCells) -> rusqlite::Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    // Stable: among rows of one key the first sent wins per metric.
    rows.sort_by_key(|r| (r.device, r.ts));
    rows.dedup_by(|later, kept| {
        let same = later.device == kept.device && later.ts == kept.ts;
        if same {
            kept.absorb(later);
        }
        same
    });
    let mut insert = tx.prepare_cached(&INSERT_SQL)?;
    let mut stored = 0u64;
    // The open rollup cell of each metric for the current (device, minute): rows come sorted by
    // (device, ts), so a cell's readings are adjacent per metric.
    let mut open: [Option<Agg>; METRICS] = std::array::from_fn(|_| None);
    let mut open_at: Option<(i64, i64)> = None;
    for r in rows.iter() {
        insert.raw_bind_parameter(1, r.device)?;
        insert.raw_bind_parameter(2, r.ts)?;
        insert.raw_bind_parameter(3, r.historical)?;
        for (i, v) in r.values.iter().enumerate() {
            insert.raw_bind_parameter(4 + i, reading_param(*v))?;
        }
        let values = if insert.raw_execute()? == 1 { r.values } else { fill_stored_row(tx, r)? };
        let minute = r.ts.div_euclid(MINUTE_MS) * MINUTE_MS;
        if open_at != Some((r.device, minute)) {
            for a in open.iter_mut().filter_map(Option::take) {
                cells.add(tx, a)?;
            }
            open_at = Some((r.device, minute));
        }
        for (i, v) in values.iter().enumerate() {
            if v.is_nan() {
                continue;
            }
            stored += 1;
            match &mut open[i] {
                Some(a) => a.add(*v, r.ts),
                slot => *slot = Some(Agg::new(r.device, i as i64, minute, *v, r.ts)),
            }
        }
    }
    for a in open.iter_mut().filter_map(Option::take) {
        cells.add(tx, a)?;
    }
    Ok(stored)
}

/// A row's value as bound: NULL where the message had no reading of that metric.
fn reading_param(v: f64) -> Option<f64> {
    (!v.is_nan()).then_some(v)
}

/// `INSERT OR IGNORE INTO readings(device, ts, historical, <every metric column>) VALUES (?1, …)`.
static INSERT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let params: String = (0..METRICS).map(|i| format!(", ?{}", 4 + i)).collect();
    format!("INSERT OR IGNORE INTO readings(device, ts, historical, {}) VALUES (?1, ?2, ?3{params})", METRIC_COLUMNS.join(", "))
});

/// The stored values of one (device, ts) row: `?1` device, `?2` ts.
static SELECT_ROW_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {} FROM readings WHERE device = ?1 AND ts = ?2", METRIC_COLUMNS.join(", ")));

/// Fills the empty columns of one (device, ts) row: `?1` device, `?2` ts, `?3…` the values.
static FILL_ROW_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let sets: Vec<String> = METRIC_COLUMNS.iter().enumerate().map(|(i, c)| format!("{c} = coalesce({c}, ?{})", 3 + i)).collect();
    format!("UPDATE readings SET {} WHERE device = ?1 AND ts = ?2", sets.join(", "))
});

/// A row whose (device, ts) is already stored: its metrics still empty there are filled from
/// `row`; returns the readings that were (NaN elsewhere). Rare: replays and repeated times.
fn fill_stored_row(tx: &rusqlite::Transaction<'_>, row: &Row) -> rusqlite::Result<[f64; METRICS]> {
    let stored: [Option<f64>; METRICS] = tx
        .prepare_cached(&SELECT_ROW_SQL)?
        .query_row(params![row.device, row.ts], |r| {
            let mut out = [None; METRICS];
            for (i, slot) in out.iter_mut().enumerate() {
                *slot = r.get(i)?;
            }
            Ok(out)
        })?;
    let mut added = [f64::NAN; METRICS];
    for (i, (have, new)) in stored.iter().zip(&row.values).enumerate() {
        if have.is_none() && !new.is_nan() {
            added[i] = *new;
        }
    }
    if added.iter().any(|v| !v.is_nan()) {
        let mut update = tx.prepare_cached(&FILL_ROW_SQL)?;
        update.raw_bind_parameter(1, row.device)?;
        update.raw_bind_parameter(2, row.ts)?;
        for (i, v) in added.iter().enumerate() {
            update.raw_bind_parameter(3 + i, reading_param(*v))?;
        }
        update.raw_execute()?;
    }
    Ok(added)
}

impl Agg {
    fn new(device: i64, metric: i64, minute: i64, value: f64, ts: i64) -> Agg {
        Agg { device, metric, minute, min: value, max: value, sum: value, count: 1, last: value, last_ts: ts }
    }

    fn add(&mut self, value: f64, ts: i64) {
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum += value;
        self.count += 1;
        if ts >= self.last_ts {
            self.last = value;
            self.last_ts = ts;
        }
    }

    /// Folds another part of the same cell in (`last` is the later of the two).
    fn merge(&mut self, o: &Agg) {
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.sum += o.sum;
        self.count += o.count;
        if o.last_ts >= self.last_ts {
            self.last = o.last;
            self.last_ts = o.last_ts;
        }
    }
}

/// Most rollup cells a group gathers before it upserts them early: with the index, ~100 bytes a
/// cell, ~1 MB kept for the writer's life.
const ROLLUP_CELLS_MAX: usize = 8_192;

/// The rollup cells of one group, keyed by (device, metric, minute): each cell is upserted once
/// per group (at the commit) instead of once per take. A group touching more cells than
/// [`ROLLUP_CELLS_MAX`] (a fleet of thousands of devices) upserts them as it goes. One value
/// lives as long as the writer, so its memory is allocated once.
#[derive(Default)]
pub(super) struct RollupCells {
    cells: Vec<Agg>,
    /// (device, metric, minute) → index in `cells`.
    index: HashMap<(i64, i64, i64), u32>,
}

impl RollupCells {
    /// Forgets every cell (a group starts, or its transaction rolled back).
    fn clear(&mut self) {
        self.cells.clear();
        self.index.clear();
    }

    fn add(&mut self, tx: &rusqlite::Transaction<'_>, a: Agg) -> rusqlite::Result<()> {
        match self.index.entry((a.device, a.metric, a.minute)) {
            std::collections::hash_map::Entry::Occupied(e) => self.cells[*e.get() as usize].merge(&a),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(self.cells.len() as u32);
                self.cells.push(a);
            }
        }
        if self.cells.len() >= ROLLUP_CELLS_MAX {
            self.flush(tx)?;
        }
        Ok(())
    }

    /// Upserts every cell gathered, in key order (B-tree locality), and forgets them.
    fn flush(&mut self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        if self.cells.is_empty() {
            return Ok(());
        }
        self.index.clear();
        self.cells.sort_unstable_by_key(|a| (a.device, a.metric, a.minute));
        let mut upsert = tx.prepare_cached(
            "INSERT INTO rollup_1m(device, metric, minute, min, max, sum, count, last, last_ts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT(device, metric, minute) DO UPDATE SET
               min = min(min, excluded.min), max = max(max, excluded.max),
               sum = sum + excluded.sum, count = count + excluded.count,
               last = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last ELSE last END,
               last_ts = max(last_ts, excluded.last_ts)",
        )?;
        for a in self.cells.drain(..) {
            upsert.execute(params![a.device, a.metric, a.minute, a.min, a.max, a.sum, a.count, a.last, a.last_ts])?;
        }
        Ok(())
    }
}

//! The writer thread of the embedded store: owns the write connection, takes writes from the
//! bounded queue, commits many per transaction and fires acks after the commit. Retention
//! steps run between batches ([`super::retention`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use backon::BackoffBuilder as _;
use rusqlite::{params, Connection};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use super::retention::{trim_quarantine, RetentionPass};
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
    pub(super) retention: Option<RetentionPass>,
    pub(super) next_retention: Instant,
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
    pub(super) fn run(mut self) {
        self.retention = self.start_retention();
        let max_msgs = self.opts.batch_max_rows.saturating_mul(4).max(64);
        loop {
            let first = if self.retention.is_some() {
                match self.rx.try_recv() {
                    Ok(w) => self.took(w),
                    Err(TryRecvError::Empty) => {
                        self.retention_step();
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match self.rx.blocking_recv() {
                    Some(w) => self.took(w),
                    None => break,
                }
            };
            let mut rows = rows_of(&first);
            let mut batch = vec![first];
            while rows < self.opts.batch_max_rows && batch.len() < max_msgs {
                match self.rx.try_recv() {
                    Ok(w) => {
                        let w = self.took(w);
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

    /// A write taken off the queue: its readings no longer count against the backlog.
    fn took(&self, w: Write) -> Write {
        self.backlog.taken(&w);
        w
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
        let mut backoff = backon::ExponentialBuilder::new()
            .with_min_delay(STORAGE_RETRY_INITIAL)
            .with_max_delay(STORAGE_RETRY_MAX)
            .without_max_times()
            .build();
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
                    // Unlimited attempts: the iterator never ends.
                    std::thread::sleep(backoff.next().unwrap_or(STORAGE_RETRY_MAX));
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
    pub(super) fn error(&mut self, what: &str, e: &rusqlite::Error) {
        self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        let kind = format!("{what}: {}", error_kind(e));
        if self.logged.insert(kind) {
            tracing::error!(error = %e, "store {what} failed (further errors of this kind are only counted)");
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

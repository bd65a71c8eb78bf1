//! The embedded time-series store: readings, device events, the device registry's records and
//! the quarantine of rejected input.
//!
//! Writes go through a [`StoreWriter`] (a bounded channel into one writer thread that batches
//! many rows per transaction); reads go through [`SqliteStore`]. Acks ride along with writes and
//! fire after the commit that made their message durable. The InfluxDB sink ([`influx`])
//! is a second consumer, not a replacement.

pub mod config;
pub mod influx;
pub mod sqlite;

use std::sync::Arc;

use bytes::Bytes;
use citywatch_edge::wire::{EventKind, Metric};

use crate::ingest::Ack;

pub use sqlite::{SqliteStore, StoreOptions};
pub use sqlite::{StoreWriter, WritePermit};
pub use config::StorageConfig;

/// One metric value of one device at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device: Arc<str>,
    pub metric: Metric,
    /// Device time (or receive time when the device sent none), ms since epoch.
    pub ts_ms: i64,
    pub value: f64,
    /// Arrived later than the live horizon (a replay from a device buffer).
    pub historical: bool,
}

/// A device event as received.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub device: Arc<str>,
    pub ts_ms: i64,
    pub seq: u32,
    pub event: EventKind,
    pub metric: Option<Metric>,
    pub value: Option<f64>,
    /// Command id, on `cmd_ack`.
    pub cmd_id: Option<String>,
}

/// Rejected input kept for inspection, raw bytes included.
#[derive(Debug, Clone, PartialEq)]
pub struct QuarantineEntry {
    /// Assigned by the store; 0 before insertion.
    pub id: i64,
    pub received_ms: i64,
    pub topic: String,
    pub reason: String,
    pub payload: Bytes,
}

/// The registry's persistent form of a device; defined beside the device model it is derived
/// from, so the registry does not depend on the store.
pub use crate::registry::DeviceRecord;


/// One unit of work for the writer thread.
#[derive(Debug)]
pub enum Write {
    Readings(Vec<Reading>),
    Event(EventRecord),
    Quarantine(QuarantineEntry),
    Device(DeviceRecord),
    /// Fire after everything sent before it is committed.
    Ack(Ack),
}

impl Write {
    /// Readings it carries: what it counts against the store queue's bound in readings.
    pub fn reading_count(&self) -> usize {
        match self {
            Write::Readings(v) => v.len(),
            _ => 0,
        }
    }
}

/// How to aggregate readings into steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Min,
    Max,
    Avg,
    Last,
}

/// A readings query: `[from_ms, to_ms)`, optionally in steps of `step_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingQuery {
    pub device: String,
    pub metric: Metric,
    pub from_ms: i64,
    pub to_ms: i64,
    /// `None`: raw points. `Some(step)`: one point per step with min/max/avg/last/count.
    pub step_ms: Option<i64>,
    /// Most points returned (raw) — the oldest first.
    pub limit: usize,
}

/// One point of a query answer. Raw points have min = max = avg = last = the value, count 1.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Point {
    /// Start of the step (raw: the reading's time), ms since epoch.
    pub ts_ms: i64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub last: f64,
    pub count: u64,
}

/// Counters the store exposes for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StoreStats {
    pub readings_written: u64,
    /// Readings not stored because their device already had a reading of that metric at that
    /// time: a second message with the same `ts` (the first one's value is kept), or a message
    /// stored before coming again where its `seq` could not tell (after a restart).
    pub readings_time_taken: u64,
    pub events_written: u64,
    pub quarantined: u64,
    pub batches: u64,
    /// Duration of the last commit and the slowest since start, microseconds.
    pub last_batch_us: u64,
    pub max_batch_us: u64,
    /// Rows in the last batch.
    pub last_batch_rows: u64,
    /// Writer time spent on groups since start, and the part inside COMMIT (WAL write, fsync,
    /// checkpoints), microseconds.
    pub busy_us: u64,
    pub commit_us: u64,
    /// Messages waiting in the writer's channel.
    pub queue_depth: u64,
    pub queue_capacity: u64,
    /// Readings waiting in the writer's channel, and the most it takes before senders wait.
    pub queue_readings: u64,
    pub queue_max_readings: u64,
    /// Write errors (each logged once); the writer keeps going.
    pub write_errors: u64,
    /// The disk refuses writes (full, read-only): the current batch is being retried and
    /// ingestion waits behind it.
    pub refusing: bool,
}

/// The SQLite store's gauges for `/metrics`, read from [`SqliteStore::stats`] at every scrape.
#[derive(Debug)]
pub struct StoreMetrics(pub Arc<SqliteStore>);

impl prometheus_client::collector::Collector for StoreMetrics {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use crate::metrics::gauge;
        let st = self.0.stats();
        let e = &mut encoder;
        gauge(e, "citywatch_store_queue_depth", "Writes waiting for the store writer.", st.queue_depth)?;
        gauge(e, "citywatch_store_queue_capacity", "Capacity of the store queue.", st.queue_capacity)?;
        gauge(e, "citywatch_store_queue_readings", "Readings waiting for the store writer.", st.queue_readings)?;
        gauge(e, "citywatch_store_queue_max_readings", "Readings the store queue holds before the decode stage waits.", st.queue_max_readings)?;
        gauge(e, "citywatch_store_last_batch_seconds", "Duration of the last store transaction.", st.last_batch_us as f64 / 1e6)?;
        gauge(e, "citywatch_store_max_batch_seconds", "Slowest store transaction since start.", st.max_batch_us as f64 / 1e6)?;
        gauge(e, "citywatch_store_last_batch_rows", "Rows in the last store transaction.", st.last_batch_rows)?;
        gauge(e, "citywatch_store_batches", "Store transactions committed.", st.batches)?;
        crate::metrics::counter(e, "citywatch_store_busy_seconds", "Time the store writer spent writing (from taking writes to firing their acks).", st.busy_us as f64 / 1e6)?;
        crate::metrics::counter(e, "citywatch_store_commit_seconds", "Part of the store writer's busy time inside COMMIT: the WAL's write and fsync, and checkpoints.", st.commit_us as f64 / 1e6)?;
        gauge(e, "citywatch_store_readings_written", "Readings committed to the store.", st.readings_written)?;
        crate::metrics::counter(e, "citywatch_store_readings_time_taken", "Readings not stored because their device already had one of that metric at that time (the first is kept).", st.readings_time_taken)?;
        gauge(e, "citywatch_store_write_errors", "Store write errors.", st.write_errors)?;
        gauge(e, "citywatch_store_refusing", "1 while the disk refuses writes and ingestion is paused.", u64::from(st.refusing))
    }
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("the store writer has stopped")]
    WriterGone,
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

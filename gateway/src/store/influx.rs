//! The long-term store: every reading, as InfluxDB line protocol, to any InfluxDB v2 write API
//! (InfluxDB 2 and 3, VictoriaMetrics and other compatible servers) for Grafana.
//!
//! A second consumer beside the embedded store, never in the way of ingestion: the decode stage
//! hands it copies of its readings without waiting. Lines are batched by size and time, sent one
//! request at a time (so they arrive in order), gzipped, with token auth. While the server is
//! down, batches wait in a bounded memory buffer, then in a spool table in SQLite
//! (`influx-spool.sqlite` beside the embedded store, so it never takes the store writer's lock);
//! when the server returns they drain oldest first, and anything the buffer could not keep is
//! counted by reason in `/metrics`.
//!
//! Here: the configuration, the metrics and the tap the producers hold. The line-protocol
//! encoding is in [`encode`], the disk spool in `spool`, the sending task in [`sink`]. The sink
//! knows devices and incidents only as plain data: [`DeviceTagSource`] and [`IncidentLine`].

mod encode;
mod history;
mod sink;
mod spool;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use encode::{
    encode_incident, encode_readings, encode_readings_cached, reading_prefix, DeviceTags, IncidentLine, PrefixCache,
    INCIDENT_MEASUREMENT, READING_MEASUREMENT,
};
pub use history::History;
pub use sink::{DeviceTagSource, InfluxSink};

use crate::units::Duration;
use crate::store::Reading;


/// `[storage.influx]`: present means enabled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InfluxConfig {
    /// Base URL of the server; `/api/v2/write` is appended.
    pub url: String,
    pub org: String,
    pub bucket: String,
    /// API token, sent as `Authorization: Token …`. None: no auth header.
    pub token: Option<String>,
    /// Most lines in one write request.
    pub batch_max_lines: usize,
    /// A partial batch is sent after this long.
    pub flush_interval: Duration,
    /// Gzip request bodies (`Content-Encoding: gzip`).
    pub gzip: bool,
    /// Timeout of one write request.
    pub timeout: Duration,
    /// Lines kept in memory while the server is down; further batches go to the spool.
    pub buffer_max_lines: usize,
    /// Lines kept in the spool table; beyond, the oldest batches are dropped (counted).
    pub spool_max_lines: u64,
    /// Reading batches waiting for the sink (each is one decode batch); when full, copies for
    /// the long-term store are dropped (counted) rather than slowing ingestion.
    pub queue_capacity: usize,
    /// First retry delay after a failed write; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Cluster mode: base URL of a VictoriaMetrics holding what this sink writes (usually the
    /// same as `url`), read through its export API (`/api/v1/export`) to answer a device's
    /// readings with the history the partition's owner does not have (a new owner's store
    /// starts at its takeover). None: readings come from the owner's store alone. Not used in
    /// single-node mode (the embedded store has every reading).
    pub history_url: Option<String>,
}

impl Default for InfluxConfig {
    fn default() -> Self {
        InfluxConfig {
            url: "http://127.0.0.1:8086".into(),
            org: "city".into(),
            bucket: "citywatch".into(),
            token: None,
            batch_max_lines: 5000,
            flush_interval: Duration::secs(1),
            gzip: true,
            timeout: Duration::secs(10),
            buffer_max_lines: 100_000,
            spool_max_lines: 50_000_000,
            queue_capacity: 1024,
            retry_min: Duration(StdDuration::from_millis(500)),
            retry_max: Duration::secs(30),
            history_url: None,
        }
    }
}

impl InfluxConfig {
    /// Checks what serde cannot; the error names the key under `storage.influx`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(("storage.influx.url", "must start with http:// or https://".into()));
        }
        if self.bucket.is_empty() {
            return Err(("storage.influx.bucket", "must not be empty".into()));
        }
        if self.batch_max_lines == 0 {
            return Err(("storage.influx.batch_max_lines", "must be at least 1".into()));
        }
        if self.buffer_max_lines < self.batch_max_lines {
            return Err(("storage.influx.buffer_max_lines", "must hold at least one batch (batch_max_lines)".into()));
        }
        if self.queue_capacity == 0 {
            return Err(("storage.influx.queue_capacity", "must be at least 1".into()));
        }
        if self.retry_min.0.is_zero() || self.retry_max.0 < self.retry_min.0 {
            return Err(("storage.influx.retry_max", "retry_min must be > 0 and retry_max ≥ retry_min".into()));
        }
        if let Some(url) = &self.history_url {
            if reqwest::Url::parse(url).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
                return Err(("storage.influx.history_url", format!("{url:?} is not an http:// or https:// URL")));
            }
        }
        Ok(())
    }

    /// The write endpoint with its query string.
    pub fn write_url(&self) -> String {
        format!(
            "{}/api/v2/write?org={}&bucket={}&precision=ms",
            self.url.trim_end_matches('/'),
            query_escape(&self.org),
            query_escape(&self.bucket)
        )
    }
}

fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Errors opening the sink.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("influx spool: {0}")]
    Spool(#[from] rusqlite::Error),
    #[error("influx spool directory {path}: {source}")]
    SpoolDir { path: String, source: std::io::Error },
    #[error("influx HTTP client: {0}")]
    Client(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why lines were dropped; each is a `reason` label of `citywatch_influx_dropped_lines_total`.
pub const DROP_REASONS: [&str; 4] = ["queue_full", "spool_full", "rejected_by_server", "spool_error"];

/// A `reason` label.
type ReasonLabel = Vec<(&'static str, &'static str)>;

/// The sink's metrics, registered in the gateway's Prometheus registry by [`InfluxStats::register`].
#[derive(Debug)]
pub struct InfluxStats {
    pub lines_written: Counter,
    pub requests: Counter,
    pub failed_requests: Counter,
    pub bytes_sent: Counter,
    pub buffered_lines: Gauge,
    pub spooled_lines: Gauge,
    /// By reason, every one of [`DROP_REASONS`] present from the start (at 0).
    dropped: Family<ReasonLabel, Counter>,
    /// 1 while the last write succeeded.
    pub up: Gauge,
}

impl Default for InfluxStats {
    fn default() -> Self {
        let dropped = Family::<ReasonLabel, Counter>::default();
        for reason in DROP_REASONS {
            let _ = dropped.get_or_create(&vec![("reason", reason)]);
        }
        InfluxStats {
            lines_written: Counter::default(),
            requests: Counter::default(),
            failed_requests: Counter::default(),
            bytes_sent: Counter::default(),
            buffered_lines: Gauge::default(),
            spooled_lines: Gauge::default(),
            dropped,
            up: Gauge::default(),
        }
    }
}

impl InfluxStats {
    fn drop_lines(&self, reason: &'static str, lines: u64) {
        self.dropped.get_or_create(&vec![("reason", reason)]).inc_by(lines);
    }

    /// Lines dropped for `reason`.
    pub fn dropped(&self, reason: &str) -> u64 {
        DROP_REASONS.iter().find(|r| **r == reason).map_or(0, |r| self.dropped.get_or_create(&vec![("reason", *r)]).get())
    }

    /// Adds the sink's series to `registry` (names without `_total`: the crate adds it to counters).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("citywatch_influx_lines_written", "Lines the InfluxDB server accepted", self.lines_written.clone());
        registry.register("citywatch_influx_requests", "Write requests that succeeded", self.requests.clone());
        registry.register("citywatch_influx_failed_requests", "Write requests that failed (retried)", self.failed_requests.clone());
        registry.register("citywatch_influx_bytes_sent", "Request body bytes sent (after gzip)", self.bytes_sent.clone());
        registry.register("citywatch_influx_buffered_lines", "Lines waiting in memory", self.buffered_lines.clone());
        registry.register("citywatch_influx_spooled_lines", "Lines waiting in the spool table", self.spooled_lines.clone());
        registry.register("citywatch_influx_up", "1 when the last write succeeded", self.up.clone());
        registry.register("citywatch_influx_dropped_lines", "Lines never delivered to InfluxDB, by reason", self.dropped.clone());
    }
}

/// What the sink is fed: copies of the decode stage's readings, or incident changes.
#[derive(Debug)]
pub enum SinkInput {
    Readings(Vec<Reading>),
    Incident(IncidentLine),
}

/// The decode stage's side of the sink: never waits.
#[derive(Debug, Clone)]
pub struct InfluxTap {
    tx: mpsc::Sender<SinkInput>,
    stats: Arc<InfluxStats>,
}

impl InfluxTap {
    /// Hands over a copy of `readings`; when the sink is behind, counts them as dropped.
    pub fn readings(&self, readings: &[Reading]) {
        if readings.is_empty() {
            return;
        }
        if self.tx.try_send(SinkInput::Readings(readings.to_vec())).is_err() {
            self.stats.drop_lines("queue_full", readings.len() as u64);
        }
    }

    /// Hands over `readings`, waiting while the sink is behind (for producers that may wait,
    /// like the benchmark; the decode stage uses [`InfluxTap::readings`]). False once the sink
    /// has stopped.
    pub async fn readings_wait(&self, readings: Vec<Reading>) -> bool {
        self.tx.send(SinkInput::Readings(readings)).await.is_ok()
    }

    /// Hands over an incident change (its revision's time) for the `incident` measurement.
    /// False when the sink is behind or stopped: the caller, the `influx` push channel, retries
    /// from the durable outbox, so nothing is dropped here.
    pub fn try_incident(&self, incident: IncidentLine) -> bool {
        self.tx.try_send(SinkInput::Incident(incident)).is_ok()
    }
}

#[cfg(test)]
mod tests;

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

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use bytes::Bytes;
use citywatch_edge::wire::Metric;
use influxdb_line_protocol::builder::LineProtocolBuilder;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::units::Duration;
use crate::registry::Registry;
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

/// The sink's counters, shared with `/metrics`.
#[derive(Debug, Default)]
pub struct InfluxStats {
    pub lines_written: AtomicU64,
    pub requests: AtomicU64,
    pub failed_requests: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub buffered_lines: AtomicU64,
    pub spooled_lines: AtomicU64,
    /// By [`DROP_REASONS`] index.
    pub dropped: [AtomicU64; 4],
    /// 1 while the last write succeeded.
    pub up: AtomicU64,
}

impl InfluxStats {
    fn drop_lines(&self, reason: &str, lines: u64) {
        if let Some(i) = DROP_REASONS.iter().position(|r| *r == reason) {
            self.dropped[i].fetch_add(lines, Ordering::Relaxed);
        }
    }

    /// Lines dropped for `reason`.
    pub fn dropped(&self, reason: &str) -> u64 {
        DROP_REASONS.iter().position(|r| *r == reason).map_or(0, |i| self.dropped[i].load(Ordering::Relaxed))
    }
}

impl crate::metrics::MetricsSection for InfluxStats {
    fn render(&self, out: &mut String) {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, kind, help, v) in [
            ("citywatch_influx_lines_written_total", "counter", "Lines the InfluxDB server accepted.", r(&self.lines_written)),
            ("citywatch_influx_requests_total", "counter", "Write requests that succeeded.", r(&self.requests)),
            ("citywatch_influx_failed_requests_total", "counter", "Write requests that failed (retried).", r(&self.failed_requests)),
            ("citywatch_influx_bytes_sent_total", "counter", "Request body bytes sent (after gzip).", r(&self.bytes_sent)),
            ("citywatch_influx_buffered_lines", "gauge", "Lines waiting in memory.", r(&self.buffered_lines)),
            ("citywatch_influx_spooled_lines", "gauge", "Lines waiting in the spool table.", r(&self.spooled_lines)),
            ("citywatch_influx_up", "gauge", "1 when the last write succeeded.", r(&self.up)),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        let _ = writeln!(out, "# HELP citywatch_influx_dropped_lines_total Lines never delivered to InfluxDB, by reason.\n# TYPE citywatch_influx_dropped_lines_total counter");
        for (i, reason) in DROP_REASONS.iter().enumerate() {
            let _ = writeln!(out, "citywatch_influx_dropped_lines_total{{reason=\"{reason}\"}} {}", r(&self.dropped[i]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Line protocol.

/// Measurement of readings: tags `site`, `device`, `kind`; one float field per metric.
pub const READING_MEASUREMENT: &str = "reading";
/// Measurement of incident changes: tags `site`, `device`, `rule`, `severity`, `state`.
pub const INCIDENT_MEASUREMENT: &str = "incident";

/// Tags of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTags {
    pub site: String,
    pub kind: &'static str,
}

/// Appends readings as lines to `buf`; consecutive readings of one device at one time share a
/// line (one field per metric). Returns the number of lines written.
pub fn encode_readings(readings: &[Reading], tags: &mut impl FnMut(&str) -> Option<DeviceTags>, buf: &mut Vec<u8>) -> usize {
    encode_readings_cached(readings, tags, &mut PrefixCache::default(), buf)
}

/// Each device's line prefix (measurement and escaped tags), built once by the line-protocol
/// builder and reused: escaping character by character is most of the cost of a line.
#[derive(Debug, Default)]
pub struct PrefixCache(HashMap<Arc<str>, Vec<u8>>);

/// The line prefix of a device, `reading,site=…,device=…,kind=…`, escaped by the builder.
pub fn reading_prefix(device: &str, tags: Option<&DeviceTags>) -> Vec<u8> {
    let mut b = LineProtocolBuilder::new().measurement(READING_MEASUREMENT);
    if let Some(t) = tags {
        b = b.tag("site", &t.site);
    }
    b = b.tag("device", device);
    if let Some(t) = tags {
        b = b.tag("kind", t.kind);
    }
    // The builder only hands back whole lines: end one with a known field and cut it off.
    const PROBE: &str = " _=0i\n";
    let mut line = b.field("_", 0i64).close_line().build();
    line.truncate(line.len() - PROBE.len());
    line
}

/// [`encode_readings`] with prefixes cached across calls (devices with known tags only: an
/// unknown device may be registered any moment).
pub fn encode_readings_cached(readings: &[Reading], tags: &mut impl FnMut(&str) -> Option<DeviceTags>, cache: &mut PrefixCache, buf: &mut Vec<u8>) -> usize {
    use std::io::Write as _;
    let mut lines = 0;
    let mut i = 0;
    while i < readings.len() {
        let first = &readings[i];
        let mut end = i + 1;
        while end < readings.len() && readings[end].device == first.device && readings[end].ts_ms == first.ts_ms {
            end += 1;
        }
        match cache.0.get(&first.device) {
            Some(prefix) => buf.extend_from_slice(prefix),
            None => {
                let t = tags(&first.device);
                let prefix = reading_prefix(&first.device, t.as_ref());
                buf.extend_from_slice(&prefix);
                if t.is_some() {
                    cache.0.insert(Arc::clone(&first.device), prefix);
                }
            }
        }
        for (k, r) in readings[i..end].iter().enumerate() {
            buf.push(if k == 0 { b' ' } else { b',' });
            // Metric names are [a-z_]: nothing to escape in a field key. Values are finite
            // (the decode stage rejects others) and print as the builder prints an f64.
            let _ = write!(buf, "{}={}", metric_field(r.metric), r.value);
        }
        let _ = writeln!(buf, " {}", first.ts_ms);
        lines += 1;
        i = end;
    }
    lines
}

fn metric_field(m: Metric) -> &'static str {
    m.as_str()
}

/// Appends one incident change as a line: tags site/device/rule/severity/state, fields
/// `revision` (integer), `value` and `threshold` (floats, when known), `summary` (string).
pub fn encode_incident(i: &crate::model::Incident, ts_ms: i64, buf: &mut Vec<u8>) {
    let b = LineProtocolBuilder::new_with(std::mem::take(buf))
        .measurement(INCIDENT_MEASUREMENT)
        .tag("site", &i.site)
        .tag("device", &i.device)
        .tag("rule", &i.rule)
        .tag("severity", i.severity.as_str())
        .tag("state", i.state.as_str());
    let mut f = b.field("revision", i.revision as i64);
    if let Some(v) = i.value.filter(|v| v.is_finite()) {
        f = f.field("value", v);
    }
    if let Some(t) = i.threshold.filter(|v| v.is_finite()) {
        f = f.field("threshold", t);
    }
    // The builder escapes quotes and backslashes; line protocol has no escape for a newline.
    let summary = i.summary.replace(['\n', '\r'], " ");
    *buf = f.field("summary", summary.as_str()).timestamp(ts_ms).close_line().build();
}

// ---------------------------------------------------------------------------------------------
// The spool.

/// Batches waiting on disk, oldest first (by id). Every spooled batch is newer than every batch
/// in memory, except at shutdown, when memory is saved *before* the spool's head.
#[derive(Debug)]
struct Spool {
    db: rusqlite::Connection,
    lines: u64,
}

impl Spool {
    fn open(dir: &Path) -> Result<Spool> {
        std::fs::create_dir_all(dir).map_err(|source| Error::SpoolDir { path: dir.display().to_string(), source })?;
        let db = rusqlite::Connection::open(dir.join("influx-spool.sqlite"))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch("CREATE TABLE IF NOT EXISTS influx_spool (id INTEGER PRIMARY KEY, lines INTEGER NOT NULL, gzip INTEGER NOT NULL, body BLOB NOT NULL)")?;
        let lines: i64 = db.query_row("SELECT COALESCE(SUM(lines), 0) FROM influx_spool", [], |r| r.get(0))?;
        Ok(Spool { db, lines: lines as u64 })
    }

    fn is_empty(&self) -> bool {
        self.lines == 0
    }

    fn append(&mut self, b: &Batch) -> rusqlite::Result<()> {
        self.db.execute("INSERT INTO influx_spool (lines, gzip, body) VALUES (?1, ?2, ?3)", rusqlite::params![b.lines as i64, b.gzip, &b.body[..]])?;
        self.lines += b.lines as u64;
        Ok(())
    }

    /// Saves batches ahead of everything spooled (they are older), keeping their order.
    fn prepend(&mut self, batches: impl DoubleEndedIterator<Item = Batch>) -> rusqlite::Result<()> {
        let tx = self.db.transaction()?;
        let mut id: i64 = tx.query_row("SELECT COALESCE(MIN(id), 1) FROM influx_spool", [], |r| r.get(0))?;
        let mut lines = 0;
        for b in batches.rev() {
            id -= 1;
            tx.execute("INSERT INTO influx_spool (id, lines, gzip, body) VALUES (?1, ?2, ?3, ?4)", rusqlite::params![id, b.lines as i64, b.gzip, &b.body[..]])?;
            lines += b.lines as u64;
        }
        tx.commit()?;
        self.lines += lines;
        Ok(())
    }

    fn head(&self) -> rusqlite::Result<Option<Batch>> {
        use rusqlite::OptionalExtension;
        self.db
            .query_row("SELECT id, lines, gzip, body FROM influx_spool ORDER BY id LIMIT 1", [], |r| {
                Ok(Batch { spool_id: Some(r.get(0)?), lines: r.get::<_, i64>(1)? as usize, gzip: r.get(2)?, body: Bytes::from(r.get::<_, Vec<u8>>(3)?) })
            })
            .optional()
    }

    fn remove(&mut self, id: i64, lines: usize) -> rusqlite::Result<()> {
        // A row trimmed while it was in flight is already gone and already subtracted.
        if self.db.execute("DELETE FROM influx_spool WHERE id = ?1", [id])? > 0 {
            self.lines = self.lines.saturating_sub(lines as u64);
        }
        Ok(())
    }

    /// Drops the oldest batches until at most `max` lines remain; returns the lines dropped.
    fn trim(&mut self, max: u64) -> rusqlite::Result<u64> {
        let mut dropped = 0;
        while self.lines > max {
            let Some(head) = self.head()? else { break };
            // Invariant: head() returned a spooled batch, so it has an id.
            let id = head.spool_id.unwrap_or_default();
            self.remove(id, head.lines)?;
            dropped += head.lines as u64;
        }
        Ok(dropped)
    }
}

// ---------------------------------------------------------------------------------------------
// The sink.

/// One request body: `lines` lines, gzipped or not.
#[derive(Debug, Clone)]
struct Batch {
    body: Bytes,
    lines: usize,
    gzip: bool,
    /// Where it lives while waiting: the spool row, or memory.
    spool_id: Option<i64>,
}

/// What the sink is fed: copies of the decode stage's readings, or incident changes.
#[derive(Debug)]
pub enum SinkInput {
    Readings(Vec<Reading>),
    Incident(Arc<crate::model::Incident>, i64),
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
    pub fn try_incident(&self, incident: Arc<crate::model::Incident>, ts_ms: i64) -> bool {
        self.tx.try_send(SinkInput::Incident(incident, ts_ms)).is_ok()
    }
}

/// The running sink's state; [`InfluxSink::run`] is its task.
#[derive(Debug)]
pub struct InfluxSink {
    config: InfluxConfig,
    client: reqwest::Client,
    write_url: String,
    registry: Option<Arc<Registry>>,
    tags: HashMap<Arc<str>, DeviceTags>,
    prefixes: PrefixCache,
    memory: VecDeque<Batch>,
    memory_lines: usize,
    spool: Spool,
    stats: Arc<InfluxStats>,
    current: Vec<u8>,
    current_lines: usize,
}

/// A write request on its way.
type WriteRequest = std::pin::Pin<Box<dyn std::future::Future<Output = Sent> + Send>>;

enum Sent {
    Ok,
    /// The server refused the data itself (bad lines, too large): retrying cannot help.
    Rejected(String),
    /// Down, overloaded, or misconfigured: keep the batch and retry.
    Retry(String),
}

impl InfluxSink {
    /// Opens the spool under `data_dir`; returns the sink and the tap the decode stage feeds.
    pub fn open(config: InfluxConfig, data_dir: &Path, registry: Option<Arc<Registry>>) -> Result<(InfluxSink, InfluxTap, mpsc::Receiver<SinkInput>)> {
        let spool = Spool::open(data_dir)?;
        // The push channels' client: rustls with ring, the system trust store for https://.
        let url = reqwest::Url::parse(&config.url).map_err(|e| Error::Client(format!("storage.influx.url: {e}")))?;
        let client = crate::http_client::build(&url, config.timeout.0, None).map_err(|e| Error::Client(e.to_string()))?;
        let stats = Arc::new(InfluxStats::default());
        stats.spooled_lines.store(spool.lines, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let write_url = config.write_url();
        let sink = InfluxSink {
            config,
            client,
            write_url,
            registry,
            tags: HashMap::new(),
            prefixes: PrefixCache::default(),
            memory: VecDeque::new(),
            memory_lines: 0,
            spool,
            stats: Arc::clone(&stats),
            current: Vec::new(),
            current_lines: 0,
        };
        Ok((sink, InfluxTap { tx, stats }, rx))
    }

    pub fn stats(&self) -> Arc<InfluxStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `input` closes (every tap dropped: the decode stage has drained), waits for
    /// the request in flight, then saves what is still unsent to the spool, so the next start
    /// sends it. No new request starts once the input has closed: stopping never waits for a
    /// server that is down.
    pub async fn run(mut self, mut input: mpsc::Receiver<SinkInput>) {
        let mut flush = tokio::time::interval(self.config.flush_interval.0);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inflight: Option<(Batch, WriteRequest)> = None;
        let mut retry_delay = self.config.retry_min.0;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut open = true;
        loop {
            if open && inflight.is_none() && retry_at.is_none() {
                if let Some(batch) = self.next_batch() {
                    let fut = self.send(batch.clone());
                    inflight = Some((batch, Box::pin(fut)));
                }
            }
            if !open && inflight.is_none() {
                break;
            }
            tokio::select! {
                biased;
                sent = async { match inflight.as_mut() { Some((_, f)) => f.await, None => std::future::pending().await } }, if inflight.is_some() => {
                    // Invariant: this branch runs only when `inflight` is Some.
                    let Some((batch, _)) = inflight.take() else { continue };
                    match sent {
                        Sent::Ok => {
                            retry_delay = self.config.retry_min.0;
                            self.stats.up.store(1, Ordering::Relaxed);
                            self.stats.lines_written.fetch_add(batch.lines as u64, Ordering::Relaxed);
                            self.stats.requests.fetch_add(1, Ordering::Relaxed);
                            self.stats.bytes_sent.fetch_add(batch.body.len() as u64, Ordering::Relaxed);
                            self.done(&batch);
                        }
                        Sent::Rejected(why) => {
                            tracing::warn!(lines = batch.lines, error = %why, "InfluxDB rejected a batch; dropped (counted as rejected_by_server)");
                            self.stats.drop_lines("rejected_by_server", batch.lines as u64);
                            self.done(&batch);
                        }
                        Sent::Retry(why) => {
                            // Logged once per outage, not once per attempt.
                            if self.stats.up.swap(0, Ordering::Relaxed) == 1 || self.stats.failed_requests.load(Ordering::Relaxed) == 0 {
                                tracing::warn!(error = %why, buffered = self.memory_lines, spooled = self.spool.lines, "InfluxDB write failed; buffering and retrying with backoff");
                            }
                            self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                            retry_at = Some(tokio::time::Instant::now() + retry_delay);
                            retry_delay = (retry_delay * 2).min(self.config.retry_max.0);
                        }
                    }
                }
                _ = async { match retry_at { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } }, if retry_at.is_some() => {
                    retry_at = None;
                }
                message = input.recv(), if open => {
                    match message {
                        Some(m) => self.accept(m),
                        None => open = false,
                    }
                }
                _ = flush.tick(), if open => self.seal(),
            }
        }
        // Memory goes to the spool's head, ahead of what is already spooled (it is older).
        self.seal();
        let memory: Vec<Batch> = self.memory.drain(..).collect();
        let lines: usize = memory.iter().map(|b| b.lines).sum();
        self.memory_lines = 0;
        if !memory.is_empty() {
            match self.spool.prepend(memory.into_iter()) {
                Ok(()) => tracing::info!(lines, "unsent InfluxDB lines saved to the spool for the next start"),
                Err(e) => {
                    tracing::error!(error = %e, lines, "could not save unsent InfluxDB lines");
                    self.stats.drop_lines("spool_error", lines as u64);
                }
            }
        }
        self.publish_depths();
    }

    fn accept(&mut self, m: SinkInput) {
        match m {
            SinkInput::Readings(readings) => {
                // Split so no batch grows far beyond batch_max_lines.
                for chunk in readings.chunks(self.config.batch_max_lines) {
                    let (tags, registry) = (&mut self.tags, &self.registry);
                    let mut lookup = |device: &str| device_tags(tags, registry.as_deref(), device);
                    self.current_lines += encode_readings_cached(chunk, &mut lookup, &mut self.prefixes, &mut self.current);
                    if self.current_lines >= self.config.batch_max_lines {
                        self.seal();
                    }
                }
            }
            SinkInput::Incident(incident, ts_ms) => {
                encode_incident(&incident, ts_ms, &mut self.current);
                self.current_lines += 1;
                if self.current_lines >= self.config.batch_max_lines {
                    self.seal();
                }
            }
        }
    }

    /// Closes the current batch and queues it: memory while it has room and nothing is
    /// spooled (order), else the spool.
    fn seal(&mut self) {
        if self.current_lines == 0 {
            return;
        }
        let raw = std::mem::take(&mut self.current);
        let lines = std::mem::take(&mut self.current_lines);
        let (body, gzip) = if self.config.gzip { (gzip(&raw), true) } else { (Bytes::from(raw), false) };
        let batch = Batch { body, lines, gzip, spool_id: None };
        if self.spool.is_empty() && self.memory_lines + lines <= self.config.buffer_max_lines {
            self.memory_lines += lines;
            self.memory.push_back(batch);
        } else {
            if let Err(e) = self.spool.append(&batch) {
                tracing::error!(error = %e, lines, "InfluxDB spool write failed; batch dropped");
                self.stats.drop_lines("spool_error", lines as u64);
            }
            match self.spool.trim(self.config.spool_max_lines) {
                Ok(0) => {}
                Ok(n) => self.stats.drop_lines("spool_full", n),
                Err(e) => tracing::error!(error = %e, "InfluxDB spool trim failed"),
            }
        }
        self.publish_depths();
    }

    /// The oldest waiting batch: memory first (always older than the spool), then the spool.
    fn next_batch(&mut self) -> Option<Batch> {
        if let Some(b) = self.memory.front() {
            return Some(b.clone());
        }
        match self.spool.head() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "InfluxDB spool read failed");
                None
            }
        }
    }

    /// Removes a batch that was delivered (or refused for good).
    fn done(&mut self, batch: &Batch) {
        match batch.spool_id {
            Some(id) => {
                if let Err(e) = self.spool.remove(id, batch.lines) {
                    tracing::error!(error = %e, "InfluxDB spool delete failed; the batch may be sent twice");
                }
            }
            None => {
                if self.memory.pop_front().is_some() {
                    self.memory_lines -= batch.lines;
                }
            }
        }
        self.publish_depths();
    }

    fn publish_depths(&self) {
        self.stats.buffered_lines.store((self.memory_lines + self.current_lines) as u64, Ordering::Relaxed);
        self.stats.spooled_lines.store(self.spool.lines, Ordering::Relaxed);
    }

    fn send(&self, batch: Batch) -> impl std::future::Future<Output = Sent> + Send + 'static {
        let mut request = self.client.post(&self.write_url).header("Content-Type", "text/plain; charset=utf-8");
        if batch.gzip {
            request = request.header("Content-Encoding", "gzip");
        }
        if let Some(token) = &self.config.token {
            request = request.header("Authorization", format!("Token {token}"));
        }
        let request = request.body(batch.body);
        async move {
            match request.send().await {
                Ok(r) if r.status().is_success() => Sent::Ok,
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    let why = format!("HTTP {status}: {}", body.chars().take(300).collect::<String>());
                    // 400 (bad line), 413 (too large), 422 (unprocessable) will never succeed;
                    // 401/403/404 are configuration the operator can fix, so keep the data.
                    if matches!(status.as_u16(), 400 | 413 | 422) {
                        Sent::Rejected(why)
                    } else {
                        Sent::Retry(why)
                    }
                }
                Err(e) => Sent::Retry(error_chain(&e)),
            }
        }
    }
}

/// A device's tags from the registry, cached. Unknown devices are not cached: the registry may
/// learn them any moment (a reading can overtake its device's first record).
fn device_tags(cache: &mut HashMap<Arc<str>, DeviceTags>, registry: Option<&Registry>, device: &str) -> Option<DeviceTags> {
    if let Some(t) = cache.get(device) {
        return Some(t.clone());
    }
    let t = registry?.get(device).map(|d| DeviceTags { site: d.site, kind: d.kind.as_str() })?;
    cache.insert(device.into(), t.clone());
    Some(t)
}

/// An error with its causes ("error sending request: … : Connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn gzip(raw: &[u8]) -> Bytes {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(raw.len() / 4), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(raw);
    Bytes::from(enc.finish().unwrap_or_default())
}

#[cfg(test)]
mod tests;

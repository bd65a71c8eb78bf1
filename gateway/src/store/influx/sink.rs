//! The sink task: batches lines, sends one request at a time, retries with backoff, and moves
//! what cannot be sent to memory and then the spool.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use backon::BackoffBuilder as _;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::encode::{encode_incident, encode_readings_cached, DeviceTags, PrefixCache};
use super::spool::{Batch, Spool};
use super::{Error, InfluxConfig, InfluxStats, InfluxTap, Result, SinkInput};
use crate::registry::Registry;

/// Where the sink learns a device's tags (site, kind). The registry is one; benchmarks and
/// tests can bring their own.
pub trait DeviceTagSource: Send + Sync + std::fmt::Debug {
    fn device_tags(&self, device: &str) -> Option<DeviceTags>;
}

impl DeviceTagSource for Registry {
    fn device_tags(&self, device: &str) -> Option<DeviceTags> {
        self.get(device).map(|d| DeviceTags { site: d.site.to_string(), kind: d.kind.as_str() })
    }
}

/// The running sink's state; [`InfluxSink::run`] is its task.
#[derive(Debug)]
pub struct InfluxSink {
    config: InfluxConfig,
    client: reqwest::Client,
    write_url: String,
    devices: Option<Arc<dyn DeviceTagSource>>,
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
    /// `devices` gives each device's tags (the registry in the gateway).
    pub fn open(config: InfluxConfig, data_dir: &Path, devices: Option<Arc<dyn DeviceTagSource>>) -> Result<(InfluxSink, InfluxTap, mpsc::Receiver<SinkInput>)> {
        let spool = Spool::open(data_dir)?;
        // The push channels' client: rustls with ring, the system trust store for https://.
        let url = reqwest::Url::parse(&config.url).map_err(|e| Error::Client(format!("storage.influx.url: {e}")))?;
        let client = crate::http_client::build(&url, config.timeout.0, None).map_err(|e| Error::Client(e.to_string()))?;
        let stats = Arc::new(InfluxStats::default());
        stats.spooled_lines.set(gauge(spool.lines));
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let write_url = config.write_url();
        let sink = InfluxSink {
            config,
            client,
            write_url,
            devices,
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
        let mut retry_delays = self.backoff();
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
                            retry_delays = self.backoff();
                            self.stats.up.set(1);
                            self.stats.lines_written.inc_by(batch.lines as u64);
                            self.stats.requests.inc();
                            self.stats.bytes_sent.inc_by(batch.body.len() as u64);
                            self.done(&batch);
                        }
                        Sent::Rejected(why) => {
                            tracing::warn!(lines = batch.lines, error = %why, "InfluxDB rejected a batch; dropped (counted as rejected_by_server)");
                            self.stats.drop_lines("rejected_by_server", batch.lines as u64);
                            self.done(&batch);
                        }
                        Sent::Retry(why) => {
                            // Logged once per outage, not once per attempt.
                            if self.stats.up.set(0) == 1 || self.stats.failed_requests.get() == 0 {
                                tracing::warn!(error = %why, buffered = self.memory_lines, spooled = self.spool.lines, "InfluxDB write failed; buffering and retrying with backoff");
                            }
                            self.stats.failed_requests.inc();
                            // Unlimited attempts: the iterator never ends.
                            let delay = retry_delays.next().unwrap_or(self.config.retry_max.0);
                            retry_at = Some(tokio::time::Instant::now() + delay);
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
                    let (tags, devices) = (&mut self.tags, &self.devices);
                    let mut lookup = |device: &str| device_tags(tags, devices.as_deref(), device);
                    self.current_lines += encode_readings_cached(chunk, &mut lookup, &mut self.prefixes, &mut self.current);
                    if self.current_lines >= self.config.batch_max_lines {
                        self.seal();
                    }
                }
            }
            SinkInput::Incident(incident) => {
                encode_incident(&incident, &mut self.current);
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

    /// Delays between attempts after failed writes: `retry_min`, doubling up to `retry_max`.
    fn backoff(&self) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::new()
            .with_min_delay(self.config.retry_min.0)
            .with_max_delay(self.config.retry_max.0)
            .without_max_times()
            .build()
    }

    fn publish_depths(&self) {
        self.stats.buffered_lines.set(gauge((self.memory_lines + self.current_lines) as u64));
        self.stats.spooled_lines.set(gauge(self.spool.lines));
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
fn device_tags(cache: &mut HashMap<Arc<str>, DeviceTags>, devices: Option<&dyn DeviceTagSource>, device: &str) -> Option<DeviceTags> {
    if let Some(t) = cache.get(device) {
        return Some(t.clone());
    }
    let t = devices?.device_tags(device)?;
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

/// A line count as a gauge value.
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn gzip(raw: &[u8]) -> Bytes {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(raw.len() / 4), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(raw);
    Bytes::from(enc.finish().unwrap_or_default())
}

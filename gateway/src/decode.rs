//! The decode stage: raw MQTT messages in, validated readings, events and device updates out.
//!
//! Applies the wire contract, the site check (a known device under another site is
//! quarantined), metric-for-kind checks and `seq` de-duplication, keeps the registry current,
//! and quarantines everything it rejects with its raw bytes and a reason. Rejections never stop
//! ingestion. Acks of the whole batch go to the store after the batch's writes, so they fire
//! only once those are committed. Rules and incidents are later stages, not this one.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use citywatch_edge::wire::{Channel, DeviceKind, LinkState, Metric, Topic, Uplink};
use tokio::sync::mpsc;

use crate::config::IngestConfig;
use crate::ingest::{now_ms, Ack, Inbound};
use crate::metrics::{self, Metrics};
use crate::registry::{infer_kind, Device, Registry, SeqCheck};
use crate::store::{EventRecord, QuarantineEntry, Reading, StoreWriter, Write};

/// Messages taken from the source channel per batch.
pub const MAX_BATCH_MESSAGES: usize = 2048;
/// A device's record is persisted at least this often while it talks.
pub const PERSIST_EVERY_MS: i64 = 60_000;
/// Topics the gateway itself publishes under the same root; they are not device input.
pub const OWN_TOPIC_PREFIX: &str = "citywatch/v1/ops/";

/// The writes produced by one batch of messages, in the order they must be applied.
#[derive(Debug, Default)]
pub struct Batch {
    pub readings: Vec<Reading>,
    pub writes: Vec<Write>,
    pub acks: Vec<Ack>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.readings.is_empty() && self.writes.is_empty() && self.acks.is_empty()
    }
}

/// The stage's state.
#[derive(Debug)]
pub struct DecodeStage {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    config: IngestConfig,
    persisted_at: HashMap<Arc<str>, i64>,
    logged_at: HashMap<String, i64>,
}

impl DecodeStage {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>, config: IngestConfig) -> Self {
        DecodeStage { registry, metrics, config, persisted_at: HashMap::new(), logged_at: HashMap::new() }
    }

    /// Runs until the source side closes, then returns (dropping its store writer lets the
    /// store drain and stop).
    pub async fn run(mut self, mut input: mpsc::Receiver<Inbound>, store: StoreWriter) {
        while let Some(first) = input.recv().await {
            let mut batch = Batch::default();
            let now = now_ms();
            self.handle(first, now, &mut batch);
            for _ in 1..MAX_BATCH_MESSAGES {
                match input.try_recv() {
                    Ok(message) => self.handle(message, now, &mut batch),
                    Err(_) => break,
                }
            }
            if send_batch(&store, batch).await.is_err() {
                tracing::error!("the store writer stopped; ingestion stops");
                return;
            }
        }
    }

    /// Decodes one message into `batch`. Synchronous and I/O-free.
    pub fn handle(&mut self, message: Inbound, now: i64, batch: &mut Batch) {
        let Inbound { topic, payload, received_ms, ack } = message;
        if let Some(ack) = ack {
            batch.acks.push(ack);
        }
        if topic.starts_with(OWN_TOPIC_PREFIX) {
            return;
        }
        let parsed = Topic::parse(&topic);
        self.metrics.count_received(parsed.ok().map(|t| t.channel), payload.len());
        let result = parsed.and_then(|t| {
            if t.channel == Channel::Cmd {
                return Ok(None); // the gateway's own commands to devices
            }
            Uplink::decode(t.channel, &payload).map(|u| Some((t, u)))
        });
        let outcome = match result {
            Ok(None) => Ok(()),
            Ok(Some((t, uplink))) => self.accept(t.site, t.device, uplink, received_ms, now, batch),
            Err(e) => Err(e.reason()),
        };
        if let Err(reason) = outcome {
            self.reject(reason, topic, payload, received_ms, now, batch);
        }
    }

    fn accept(&mut self, site: &str, device: &str, uplink: Uplink, received_ms: i64, now: i64, batch: &mut Batch) -> Result<(), &'static str> {
        // The kind to register an unknown device with.
        let kind = match &uplink {
            Uplink::Status(s) => s.kind,
            Uplink::Telemetry(t) => infer_kind(t.values.iter().map(|(m, _)| m)),
            Uplink::Event(e) => e.metric.and_then(|m| infer_kind([m])),
        };
        match (self.registry.site_matches(device, site), kind) {
            (Some(false), _) => return Err(metrics::SITE_MISMATCH),
            (None, None) => return Err(metrics::UNKNOWN_DEVICE),
            _ => {}
        }
        let horizon = self.config.live_horizon.as_ms();
        let make = || Device::new(device, site, kind.unwrap_or(DeviceKind::GasDetector), received_ms);
        let outcome = self.registry.upsert(device, make, |key, d| {
            d.last_seen_ms = d.last_seen_ms.max(received_ms);
            match &uplink {
                Uplink::Status(s) => {
                    d.link = s.state;
                    if let Some(k) = s.kind {
                        d.kind = k;
                    }
                    if let Some(fw) = &s.fw {
                        d.fw = Some(fw.as_str().to_owned());
                    }
                    if let Some(i) = s.interval_s {
                        d.interval_s = i.max(1);
                    }
                    Ok(Accepted::Status)
                }
                Uplink::Telemetry(t) => {
                    if t.values.iter().any(|(m, _)| !d.kind.has_metric(m)) {
                        return Err(metrics::METRIC_NOT_FOR_KIND);
                    }
                    let SeqCheck::Fresh { gap } = d.check_seq(t.seq) else {
                        return Ok(Accepted::Duplicate);
                    };
                    let ts = t.ts.map_or(received_ms, |ts| ts as i64);
                    let historical = received_ms - ts > horizon;
                    // A telemetry message is proof of life, even after an `offline` will.
                    if !historical {
                        d.link = LinkState::Online;
                    }
                    let pairs = t
                        .values
                        .iter()
                        .chain(t.battery_v.map(|v| (Metric::BatteryV, v)))
                        .chain(t.rssi_dbm.map(|v| (Metric::RssiDbm, v)));
                    let mut n = 0;
                    for (metric, value) in pairs {
                        d.observe(metric, value, ts);
                        n += 1;
                        batch.readings.push(Reading { device: Arc::clone(key), metric, ts_ms: ts, value, historical });
                    }
                    Ok(Accepted::Telemetry { count: n, historical, gap })
                }
                Uplink::Event(e) => {
                    let SeqCheck::Fresh { gap } = d.check_seq(e.seq) else {
                        return Ok(Accepted::Duplicate);
                    };
                    d.on_event(e.event);
                    Ok(Accepted::Event(gap, EventRecord {
                        device: Arc::clone(key),
                        ts_ms: e.ts.map_or(received_ms, |ts| ts as i64),
                        seq: e.seq,
                        event: e.event,
                        metric: e.metric,
                        value: e.value,
                        cmd_id: e.id.as_ref().map(|i| i.as_str().to_owned()),
                    }))
                }
            }
        });
        let Some((key, outcome)) = outcome else { return Ok(()) };
        match outcome? {
            Accepted::Status => {
                self.metrics.statuses.fetch_add(1, Ordering::Relaxed);
                self.persist(&key, now, true, batch);
            }
            Accepted::Telemetry { count, historical, gap } => {
                self.metrics.seq_gaps.fetch_add(u64::from(gap), Ordering::Relaxed);
                self.metrics.readings.fetch_add(count as u64, Ordering::Relaxed);
                if historical {
                    self.metrics.historical.fetch_add(count as u64, Ordering::Relaxed);
                }
                self.persist(&key, now, false, batch);
            }
            Accepted::Event(gap, record) => {
                self.metrics.seq_gaps.fetch_add(u64::from(gap), Ordering::Relaxed);
                self.metrics.events.fetch_add(1, Ordering::Relaxed);
                batch.writes.push(Write::Event(record));
                self.persist(&key, now, false, batch);
            }
            Accepted::Duplicate => {
                self.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Persists the device record when asked to, or when it was last persisted long ago.
    fn persist(&mut self, key: &Arc<str>, now: i64, force: bool, batch: &mut Batch) {
        let due = self.persisted_at.get(key).is_none_or(|at| now - at >= PERSIST_EVERY_MS);
        if !(force || due) {
            return;
        }
        if let Some(device) = self.registry.get(key) {
            self.persisted_at.insert(Arc::clone(key), now);
            batch.writes.push(Write::Device(device.to_record()));
        }
    }

    fn reject(&mut self, reason: &'static str, topic: String, payload: bytes::Bytes, received_ms: i64, now: i64, batch: &mut Batch) {
        self.metrics.count_rejected(reason);
        let last = self.logged_at.get(reason).copied();
        if last.is_none_or(|at| now - at >= self.config.log_every.as_ms()) {
            self.logged_at.insert(reason.to_owned(), now);
            tracing::warn!(%reason, %topic, total = self.metrics.rejected().get(reason).copied().unwrap_or(0), "rejected input quarantined (logged at most once per period per reason)");
        }
        batch.writes.push(Write::Quarantine(QuarantineEntry { id: 0, received_ms, topic, reason: reason.to_owned(), payload }));
    }
}

enum Accepted {
    Status,
    Telemetry { count: usize, historical: bool, gap: u32 },
    Event(u32, EventRecord),
    Duplicate,
}

/// Sends a batch to the store: readings, then other writes, then the acks.
pub async fn send_batch(store: &StoreWriter, batch: Batch) -> crate::store::Result<()> {
    if !batch.readings.is_empty() {
        store.send(Write::Readings(batch.readings)).await?;
    }
    for w in batch.writes {
        store.send(w).await?;
    }
    if !batch.acks.is_empty() {
        // One write for the whole batch's acks: they fire together after its commit.
        let acks = batch.acks;
        store.send(Write::Ack(Ack::new(move || acks.into_iter().for_each(Ack::done)))).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;

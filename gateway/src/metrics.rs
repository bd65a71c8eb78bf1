//! The gateway's Prometheus exposition: one `prometheus_client` [`Registry`] for all of
//! `/metrics`, the counters every stage bumps, and helpers for values read at scrape time.
//!
//! Components register their own metrics (or a [`Collector`] that reads their state at scrape
//! time) into the one registry when `gateway.rs` wires them; the HTTP handler encodes it once
//! with [`encode`] (OpenMetrics text). Not a place for component state: this is a leaf that
//! knows no stage, and it writes no exposition text by hand — `prometheus_client` does.
//! Hot-path counters stay plain atomics (one relaxed add per message), read by [`Metrics`]'s
//! collector. Every drop anywhere in the gateway has a counter with its reason.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use citywatch_edge::wire::{Channel, DecodeError};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The whole registry in the OpenMetrics text format (ends with `# EOF`).
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// `collector`'s series alone in a registry of their own, as `/metrics` shows them (tests).
#[cfg(test)]
pub fn encode_collector(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    encode(&registry).unwrap_or_else(|e| format!("encoding failed: {e}"))
}

/// Gateway-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages received by channel (valid or not).
    pub received: [AtomicU64; 4],
    pub received_bytes: AtomicU64,
    pub readings: AtomicU64,
    pub events: AtomicU64,
    pub statuses: AtomicU64,
    /// Duplicates dropped (same or older `seq`).
    pub duplicates: AtomicU64,
    /// Messages missing between consecutive `seq`s, all devices.
    pub seq_gaps: AtomicU64,
    /// Readings older than the live horizon when they arrived.
    pub historical: AtomicU64,
    /// Telemetry and events whose `ts` was far off the receive time (stored at receive time).
    pub clock_skew: AtomicU64,
    /// Rejected messages by reason (wire reasons plus the gateway's own).
    rejected: Mutex<BTreeMap<String, u64>>,
}

/// Reasons the gateway adds to the wire contract's.
pub const SITE_MISMATCH: &str = "site_mismatch";
pub const METRIC_NOT_FOR_KIND: &str = "metric_not_for_kind";
pub const UNKNOWN_DEVICE: &str = "unknown_device";

fn channel_index(c: Channel) -> usize {
    match c {
        Channel::Status => 0,
        Channel::Telemetry => 1,
        Channel::Event => 2,
        Channel::Cmd => 3,
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics::default();
        if let Ok(mut r) = m.rejected.lock() {
            for reason in DecodeError::ALL.iter().map(|e| e.reason()).chain([SITE_MISMATCH, METRIC_NOT_FOR_KIND, UNKNOWN_DEVICE]) {
                r.insert(reason.to_owned(), 0);
            }
        }
        m
    }

    pub fn count_received(&self, channel: Option<Channel>, bytes: usize) {
        if let Some(c) = channel {
            self.received[channel_index(c)].fetch_add(1, Ordering::Relaxed);
        }
        self.received_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_rejected(&self, reason: &str) {
        if let Ok(mut r) = self.rejected.lock() {
            *r.entry(reason.to_owned()).or_default() += 1;
        }
    }

    /// Rejections by reason.
    pub fn rejected(&self) -> BTreeMap<String, u64> {
        self.rejected.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected().values().sum()
    }

    /// Adds these counters to `registry`, read at every scrape.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(Arc::clone(self)));
    }
}

/// Names without `_total`: counters get it when encoded.
impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let e = &mut encoder;
        counter(e, "citywatch_readings", "Readings accepted into the store.", get(&self.readings))?;
        counter(e, "citywatch_events", "Device events accepted.", get(&self.events))?;
        counter(e, "citywatch_statuses", "Status messages accepted.", get(&self.statuses))?;
        counter(e, "citywatch_duplicates", "Messages dropped as duplicates of an earlier seq.", get(&self.duplicates))?;
        counter(e, "citywatch_seq_gaps", "Messages missing between consecutive seqs.", get(&self.seq_gaps))?;
        counter(e, "citywatch_historical_readings", "Readings older than the live horizon on arrival.", get(&self.historical))?;
        counter(e, "citywatch_clock_skew", "Messages whose device ts was far off the receive time; stored at receive time.", get(&self.clock_skew))?;
        counter(e, "citywatch_received_bytes", "Payload bytes received.", get(&self.received_bytes))?;
        let received = Channel::ALL.iter().map(|c| ([("channel", c.as_str())], get(&self.received[channel_index(*c)])));
        counter_family(e, "citywatch_messages_received", "Messages received by channel.", received)?;
        let rejected = self.rejected().into_iter().map(|(reason, n)| ([("reason", reason)], n));
        counter_family(e, "citywatch_messages_rejected", "Messages rejected and quarantined, by reason.", rejected)
    }
}

/// Seconds since the gateway started, read at every scrape.
#[derive(Debug)]
pub struct Uptime(pub std::time::Instant);

impl Collector for Uptime {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        gauge(&mut encoder, "citywatch_uptime_seconds", "Seconds since start.", self.0.elapsed().as_secs_f64())
    }
}

// Helpers for collectors: one family each, encoded through `prometheus_client`.

/// A counter without labels; `name` without `_total` (the encoder adds it).
pub fn counter<N: prometheus_client::encoding::EncodeCounterValue>(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: N) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A gauge without labels.
pub fn gauge<N: EncodeGaugeValue>(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: N) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A counter with one series per label set; `name` without `_total`.
pub fn counter_family<L: EncodeLabelSet>(encoder: &mut DescriptorEncoder, name: &str, help: &str, series: impl IntoIterator<Item = (L, u64)>) -> fmt::Result {
    family(encoder, name, help, MetricType::Counter, series.into_iter().map(|(l, v)| (l, ConstCounter::new(v))))
}

/// A gauge with one series per label set.
pub fn gauge_family<L: EncodeLabelSet, N: EncodeGaugeValue>(encoder: &mut DescriptorEncoder, name: &str, help: &str, series: impl IntoIterator<Item = (L, N)>) -> fmt::Result {
    family(encoder, name, help, MetricType::Gauge, series.into_iter().map(|(l, v)| (l, ConstGauge::new(v))))
}

fn family<L: EncodeLabelSet, M: EncodeMetric>(encoder: &mut DescriptorEncoder, name: &str, help: &str, kind: MetricType, series: impl Iterator<Item = (L, M)>) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in series {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Bucket upper bounds in seconds, 0.25 ms … 5 s: the incident path lives in the low
/// milliseconds.
pub const LATENCY_BUCKETS_S: [f64; 12] = [0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// A latency histogram with [`LATENCY_BUCKETS_S`]; observe seconds.
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_S)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component's scrape-time gauge, as the store's collector reports its queue.
    #[derive(Debug)]
    struct QueueDepth(u64);

    impl Collector for QueueDepth {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            gauge(&mut encoder, "citywatch_store_queue_depth", "Writes waiting.", self.0)
        }
    }

    #[test]
    fn renders_counters_with_reasons() {
        let m = Arc::new(Metrics::new());
        m.count_rejected("not_json");
        m.count_rejected("not_json");
        m.count_received(Some(Channel::Telemetry), 10);
        let mut registry = Registry::default();
        m.register(&mut registry);
        registry.register_collector(Box::new(QueueDepth(3)));
        let text = encode(&registry).expect("encode");
        assert!(text.contains("citywatch_messages_rejected_total{reason=\"not_json\"} 2"), "{text}");
        assert!(text.contains("citywatch_messages_rejected_total{reason=\"oversize\"} 0"), "{text}");
        assert!(text.contains("citywatch_messages_received_total{channel=\"telemetry\"} 1"), "{text}");
        assert!(text.contains("citywatch_received_bytes_total 10\n"), "{text}");
        assert!(text.contains("# TYPE citywatch_messages_rejected counter\n"), "{text}");
        assert!(text.contains("citywatch_store_queue_depth 3\n"), "{text}");
        assert!(text.contains("# TYPE citywatch_store_queue_depth gauge\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(m.rejected_total(), 2);
    }

    #[test]
    fn buckets_are_cumulative() {
        let h = latency_histogram();
        for us in [100, 700, 700, 3_000, 9_000_000] {
            h.observe(f64::from(us) / 1e6);
        }
        let mut registry = Registry::default();
        registry.register("x_seconds", "help", h);
        let text = encode(&registry).expect("encode");
        assert!(text.contains("x_seconds_bucket{le=\"0.00025\"} 1\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"0.001\"} 3\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"5.0\"} 4\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 5\n"), "{text}");
        assert!(text.contains("x_seconds_count 5\n"), "{text}");
        assert!(text.contains("# TYPE x_seconds histogram\n"), "{text}");
    }
}

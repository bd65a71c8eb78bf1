//! Counters every stage bumps and `/metrics` renders in the Prometheus text format.
//!
//! Plain atomics: cheap enough for the hot path, no registry crate needed for a fixed set.
//! Every drop anywhere in the gateway has a counter here with its reason.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use citywatch_edge::wire::{Channel, DecodeError};

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
    /// Components that render their own series (the InfluxDB sink, the Modbus poller, the
    /// maintenance service).
    sections: Mutex<Vec<std::sync::Arc<dyn MetricsSection>>>,
}

/// A component's own block of `/metrics`, appended after the gateway's counters.
pub trait MetricsSection: Send + Sync + std::fmt::Debug {
    fn render(&self, out: &mut String);
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

    /// Adds a component's block to every render.
    pub fn add_section(&self, section: std::sync::Arc<dyn MetricsSection>) {
        if let Ok(mut s) = self.sections.lock() {
            s.push(section);
        }
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected().values().sum()
    }

    /// The Prometheus text exposition, with `extra` gauges appended (name, help, value).
    pub fn render(&self, extra: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        counter("citywatch_readings_total", "Readings accepted into the store.", self.readings.load(Ordering::Relaxed));
        counter("citywatch_events_total", "Device events accepted.", self.events.load(Ordering::Relaxed));
        counter("citywatch_statuses_total", "Status messages accepted.", self.statuses.load(Ordering::Relaxed));
        counter("citywatch_duplicates_total", "Messages dropped as duplicates of an earlier seq.", self.duplicates.load(Ordering::Relaxed));
        counter("citywatch_seq_gaps_total", "Messages missing between consecutive seqs.", self.seq_gaps.load(Ordering::Relaxed));
        counter("citywatch_historical_readings_total", "Readings older than the live horizon on arrival.", self.historical.load(Ordering::Relaxed));
        counter("citywatch_clock_skew_total", "Messages whose device ts was far off the receive time; stored at receive time.", self.clock_skew.load(Ordering::Relaxed));
        counter("citywatch_received_bytes_total", "Payload bytes received.", self.received_bytes.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP citywatch_messages_received_total Messages received by channel.\n# TYPE citywatch_messages_received_total counter");
        for c in Channel::ALL {
            let _ = writeln!(out, "citywatch_messages_received_total{{channel=\"{c}\"}} {}", self.received[channel_index(*c)].load(Ordering::Relaxed));
        }
        let _ = writeln!(out, "# HELP citywatch_messages_rejected_total Messages rejected and quarantined, by reason.\n# TYPE citywatch_messages_rejected_total counter");
        for (reason, n) in self.rejected() {
            let _ = writeln!(out, "citywatch_messages_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        for (name, help, value) in extra {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        if let Ok(sections) = self.sections.lock() {
            sections.iter().for_each(|s| s.render(&mut out));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_reasons() {
        let m = Metrics::new();
        m.count_rejected("not_json");
        m.count_rejected("not_json");
        m.count_received(Some(Channel::Telemetry), 10);
        let text = m.render(&[("citywatch_store_queue_depth", "Writes waiting.", 3.0)]);
        assert!(text.contains("citywatch_messages_rejected_total{reason=\"not_json\"} 2"), "{text}");
        assert!(text.contains("citywatch_messages_rejected_total{reason=\"oversize\"} 0"), "{text}");
        assert!(text.contains("citywatch_messages_received_total{channel=\"telemetry\"} 1"), "{text}");
        assert!(text.contains("citywatch_store_queue_depth 3"), "{text}");
        assert_eq!(m.rejected_total(), 2);
    }
}

/// A latency histogram in the Prometheus sense (cumulative buckets, sum, count), lock-free.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in microseconds.
    bounds_us: &'static [u64],
    buckets: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// 0.25 ms … 5 s: the incident path lives in the low milliseconds.
pub const LATENCY_BOUNDS_US: &[u64] = &[250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000];

impl Histogram {
    pub fn new(bounds_us: &'static [u64]) -> Self {
        Histogram { bounds_us, buckets: bounds_us.iter().map(|_| AtomicU64::new(0)).collect(), sum_us: AtomicU64::new(0), count: AtomicU64::new(0) }
    }

    pub fn observe_us(&self, us: u64) {
        if let Some(i) = self.bounds_us.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Renders `name` in seconds with its HELP and TYPE lines.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in self.bounds_us.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *b as f64 / 1e6);
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[cfg(test)]
mod histogram_tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let h = Histogram::new(LATENCY_BOUNDS_US);
        for us in [100, 700, 700, 3_000, 9_000_000] {
            h.observe_us(us);
        }
        let mut text = String::new();
        h.render("x_seconds", "help", &mut text);
        assert!(text.contains("x_seconds_bucket{le=\"0.00025\"} 1\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"0.001\"} 3\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"5\"} 4\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 5\n"), "{text}");
        assert!(text.contains("x_seconds_count 5\n"), "{text}");
    }
}

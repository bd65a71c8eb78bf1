//! What sources hand to the pipeline: one MQTT message as it arrived, with the means to
//! acknowledge it once it is durable.
//!
//! Sources know MQTT, not the contract; the pipeline decodes. An [`Ack`] travels with the
//! message into the store writer and fires only after the transaction holding it commits, so
//! a QoS 1 message is never acknowledged to the broker before it is on disk. Also `[ingest]`,
//! the decode stage's and the registry's limits, the two lanes from the sources to the decode
//! stage (alerts before bulk telemetry) and their fill for `/metrics`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::units::Duration;

/// One received publish.
#[derive(Debug)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    /// Receive time, ms since the Unix epoch (used when the payload has no `ts`).
    pub received_ms: i64,
    /// Present when the broker waits for our acknowledgement (external mode, QoS ≥ 1).
    pub ack: Option<Ack>,
    /// Where the message comes from: [`Origin::Live`] from every source; the other two only
    /// from a partition's new owner in cluster mode.
    pub origin: Origin,
}

/// Whether a message arrives now or is read back by a partition's new owner (cluster mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// It arrived: stored, counted, quarantined if bad, evaluated, acknowledged.
    Live,
    /// A device's last status read back from the cluster's ingest stream: it registers the
    /// device as a restart would and is no proof of life.
    Restored,
    /// A message the previous owner already took in, read back from the ingest stream to
    /// rebuild the rule windows: evaluated at its own time, and nothing else (not stored,
    /// counted, quarantined nor acknowledged). Its signals reach the incident manager as
    /// replayed (see `decode::SignalSink::replayed`).
    Replayed,
}

/// Acknowledges one message to its broker. Dropping it without [`Ack::done`] leaves the
/// message unacknowledged, so the broker redelivers it after a reconnect.
pub struct Ack(Box<dyn FnOnce() + Send + 'static>);

impl Ack {
    pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Ack(Box::new(f))
    }

    /// The message is durable: tell the broker.
    pub fn done(self) {
        (self.0)()
    }

    /// One ack for many: fires them all.
    pub fn all(acks: Vec<Ack>) -> Ack {
        Ack::new(move || acks.into_iter().for_each(Ack::done))
    }

    /// Splits into two parts that must both be done (e.g. the readings committed by the store
    /// and the incident changes committed by the incident manager) before this one fires. If
    /// either part is dropped undone, this one never fires and the broker redelivers.
    pub fn split(self) -> (Ack, Ack) {
        let shared = std::sync::Arc::new(std::sync::Mutex::new((Some(self), 2u8)));
        let part = |shared: std::sync::Arc<std::sync::Mutex<(Option<Ack>, u8)>>| {
            Ack::new(move || {
                let ready = {
                    let mut guard = shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    guard.1 -= 1;
                    if guard.1 == 0 { guard.0.take() } else { None }
                };
                if let Some(ack) = ready {
                    ack.done();
                }
            })
        };
        (part(std::sync::Arc::clone(&shared)), part(shared))
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ack")
    }
}

/// Which way a message goes from a source to the decode stage. A gas alarm must not wait
/// behind bulk telemetry: device events and command acknowledgements take the alert lane,
/// which the decode stage always serves first; telemetry, statuses (births by the thousand at a
/// restart) and anything unrecognised take the bulk lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Alerts,
    Bulk,
}

impl Lane {
    /// The lane of a message on `topic` (`…/{channel}`; only the last level is looked at).
    pub fn of(topic: &str) -> Lane {
        match topic.rsplit_once('/').map(|(_, channel)| channel) {
            Some("event" | "cmd_ack") => Lane::Alerts,
            _ => Lane::Bulk,
        }
    }
}

/// The sending side of the two lanes into the decode stage. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Lanes {
    pub alerts: mpsc::Sender<Inbound>,
    pub bulk: mpsc::Sender<Inbound>,
}

impl Lanes {
    /// Both lanes, `capacity` messages for bulk and an alert lane of an eighth of that (at
    /// least 256): alerts are rare, and a full alert lane pushes back like the bulk one.
    pub fn channel(capacity: usize) -> (Lanes, LaneReceivers) {
        let (bulk, bulk_rx) = mpsc::channel(capacity.max(1));
        let (alerts, alerts_rx) = mpsc::channel((capacity / 8).max(256));
        (Lanes { alerts, bulk }, LaneReceivers { alerts: alerts_rx, bulk: bulk_rx })
    }

    /// The sender for a message on `topic`.
    pub fn for_topic(&self, topic: &str) -> &mpsc::Sender<Inbound> {
        match Lane::of(topic) {
            Lane::Alerts => &self.alerts,
            Lane::Bulk => &self.bulk,
        }
    }

    /// (messages waiting, capacity) over both lanes, for `/metrics`.
    pub fn fill(&self) -> (usize, usize) {
        let one = |tx: &mpsc::Sender<Inbound>| (tx.max_capacity() - tx.capacity(), tx.max_capacity());
        let ((a, ac), (b, bc)) = (one(&self.alerts), one(&self.bulk));
        (a + b, ac + bc)
    }
}

/// One channel for both lanes (sources' unit tests, and callers without priority): the order
/// of arrival is kept.
impl From<mpsc::Sender<Inbound>> for Lanes {
    fn from(tx: mpsc::Sender<Inbound>) -> Lanes {
        Lanes { alerts: tx.clone(), bulk: tx }
    }
}

/// The receiving side of the two lanes: the decode stage's input.
#[derive(Debug)]
pub struct LaneReceivers {
    pub alerts: mpsc::Receiver<Inbound>,
    pub bulk: mpsc::Receiver<Inbound>,
}

/// How full the channel between the sources and the decode stage is, for `/metrics`: a probe
/// returning (depth, capacity), read at every scrape.
pub struct QueueMetrics(pub std::sync::Arc<dyn Fn() -> (usize, usize) + Send + Sync>);

impl std::fmt::Debug for QueueMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("QueueMetrics").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for QueueMetrics {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let (depth, capacity) = (self.0)();
        crate::metrics::gauge(&mut encoder, "citywatch_ingest_queue_depth", "Messages waiting between the MQTT source and the decode stage.", depth as u64)?;
        crate::metrics::gauge(&mut encoder, "citywatch_ingest_queue_capacity", "Capacity of the ingest queue.", capacity as u64)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `[ingest]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Readings older than this when they arrive are stored as historical (a replay).
    pub live_horizon: Duration,
    /// Health: `stale` after this many intervals of silence.
    pub stale_after_intervals: u32,
    /// Health: `offline` after max(offline_after_intervals × interval, offline_min).
    pub offline_after_intervals: u32,
    pub offline_min: Duration,
    /// Health: `stuck` when an analog metric has not changed for this long.
    pub stuck_after: Duration,
    /// Health: `low_battery` under this voltage.
    pub battery_floor_v: f64,
    /// Rejections of one reason are logged at most once per this period.
    pub log_every: Duration,
    /// A device `ts` more than this ahead of the receive time is a wrong clock, not a reading
    /// from the future: the message is stored at its receive time and flagged `clock_skew`.
    pub clock_skew_ahead: Duration,
    /// A device `ts` more than this behind the receive time is a reset clock, not a replay:
    /// stored at its receive time (and so evaluated live) and flagged `clock_skew`.
    pub clock_skew_behind: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            live_horizon: Duration::secs(300),
            stale_after_intervals: 3,
            offline_after_intervals: 3,
            offline_min: Duration::secs(90),
            stuck_after: Duration::secs(86_400),
            battery_floor_v: 2.7,
            log_every: Duration::secs(10),
            clock_skew_ahead: Duration::secs(120),
            clock_skew_behind: Duration::secs(30 * 86_400),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_command_acks_take_the_alert_lane_the_rest_the_bulk_lane() {
        assert_eq!(Lane::of("citywatch/v1/xuhui/gas-1/event"), Lane::Alerts);
        assert_eq!(Lane::of("citywatch/v1/xuhui/gas-1/cmd_ack"), Lane::Alerts);
        assert_eq!(Lane::of("citywatch/v1/xuhui/gas-1/telemetry"), Lane::Bulk);
        assert_eq!(Lane::of("citywatch/v1/xuhui/gas-1/status"), Lane::Bulk);
        assert_eq!(Lane::of("nonsense"), Lane::Bulk);
        let (lanes, mut rx) = Lanes::channel(64);
        let inbound = |topic: &str| Inbound { topic: topic.into(), payload: Bytes::new(), received_ms: 0, ack: None, origin: Origin::Live };
        lanes.for_topic("a/b/event").try_send(inbound("a/b/event")).expect("room");
        lanes.for_topic("a/b/telemetry").try_send(inbound("a/b/telemetry")).expect("room");
        assert_eq!(rx.alerts.try_recv().expect("alert").topic, "a/b/event");
        assert_eq!(rx.bulk.try_recv().expect("bulk").topic, "a/b/telemetry");
        assert_eq!(lanes.fill(), (0, 256 + 64));
    }
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_split_ack_fires_once_after_both_parts_and_never_if_one_is_dropped() {
        let fired = Arc::new(AtomicUsize::new(0));
        let counter = |f: &Arc<AtomicUsize>| {
            let f = Arc::clone(f);
            Ack::new(move || {
                f.fetch_add(1, Ordering::SeqCst);
            })
        };
        let (a, b) = counter(&fired).split();
        b.done();
        assert_eq!(fired.load(Ordering::SeqCst), 0);
        a.done();
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        let (a, b) = counter(&fired).split();
        a.done();
        drop(b);
        assert_eq!(fired.load(Ordering::SeqCst), 1, "a dropped part leaves the message unacknowledged");
        Ack::all(vec![counter(&fired), counter(&fired)]).done();
        assert_eq!(fired.load(Ordering::SeqCst), 3);
    }
}

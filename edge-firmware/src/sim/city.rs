//! City mode of the load generator: up to millions of quiet devices over a few connections.
//!
//! A full simulated device (firmware core with its 512-message store-and-forward ring) weighs
//! about 100 KiB, so a city of them does not fit in memory. In the load generator a device on
//! its normal round only needs its `seq`: the readings of a quiet device are sensor noise, its
//! local alarm never trips and its ring stays empty because the shared connection paces it.
//! So each connection keeps one `u32` per device (4 bytes a device) and one [`Physics`] per
//! device kind for the noise, and encodes the same wire messages the firmware core would: a
//! retained `online` birth per device once (a reconnect resumes them; a million QoS 1 births
//! take the broker a while, so they go out in slices beside the telemetry),
//! telemetry round-robin over the devices born so far at the connection's share of the rate,
//! with each device's own `seq`,
//! and an `offline` goodbye at a deliberate stop, for as long as [`GOODBYE_BUDGET`] allows.
//! No task per device: one task per connection.
//!
//! Used for `--rate` with the `normal` scenario; the other scenarios keep full devices.
//! Commands addressed to a city device are counted, not executed (a quiet device has no alarm
//! state to change).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use tokio::sync::{mpsc, watch};

use super::fleet::{device_id, kind_of, wall_ms, FleetConfig, FleetStats};
use super::link::{Link, LinkConfig, LinkEvent};
use super::physics::{Physics, Role};
use crate::wire::{Channel, DeviceKind, Metric, Status, Telemetry, Topic, Uplink, MAX_PAYLOAD_LEN};

/// Births or telemetry handed to the client per 1 ms tick, so link events still get a turn.
pub const SLICE: usize = 256;
/// How long a deliberate stop may spend saying goodbye (a million goodbyes take longer; the
/// rest are counted as `goodbyes_skipped`, the gateway sees those devices go silent instead).
pub const GOODBYE_BUDGET: Duration = Duration::from_secs(5);
/// QoS 1 publishes (births, goodbyes) rumqttc keeps in flight before waiting for PUBACKs.
pub const INFLIGHT: u16 = 1000;

/// One connection and the devices `index`, `index + n`, `index + 2n`, … behind it.
pub(super) struct CityConnection {
    config: FleetConfig,
    index: usize,
    stride: usize,
    /// The next `seq` of each device of this connection: the whole per-device state.
    seqs: Vec<u32>,
    /// Sensor noise, one generator per kind.
    physics: Vec<Physics>,
    rate: f64,
    stats: Arc<FleetStats>,
    started: Instant,
}

impl CityConnection {
    pub(super) fn new(config: &FleetConfig, index: usize, stride: usize, stats: Arc<FleetStats>, started: Instant) -> Self {
        let count = config.devices.saturating_sub(index).div_ceil(stride);
        let seed = config.seed.wrapping_add(index as u64);
        let physics = DeviceKind::ALL.iter().map(|kind| Physics::new(*kind, Role::Normal, seed)).collect();
        let rate = config.rate.unwrap_or(1.0) / stride as f64;
        CityConnection { config: config.clone(), index, stride, seqs: vec![0; count], physics, rate, stats, started }
    }

    fn global(&self, local: usize) -> usize {
        self.index + local * self.stride
    }

    fn link_config(&self) -> LinkConfig {
        LinkConfig {
            host: self.config.host.clone(),
            port: self.config.port,
            client_id: format!("edge-sim-{}-city-{}-{}", self.config.site, self.index, std::process::id()),
            credentials: self.config.credentials.clone(),
            will: None,
            keep_alive: Duration::from_secs(30),
            request_capacity: 4096,
            inflight: INFLIGHT,
        }
    }

    /// `citywatch/v1/{site}/{device}/{channel}` of the device at `local`.
    fn topic(&self, local: usize, channel: Channel) -> String {
        let global = self.global(local);
        let id = device_id(&self.config.site, kind_of(global), global);
        // Invariant: ids were validated by `FleetConfig::validate` (site, longest device id).
        Topic { site: &self.config.site, device: &id, channel }.to_topic_string().as_str().to_owned()
    }

    fn status(&self, local: usize, online: bool) -> (String, Vec<u8>) {
        let birth = Status::online(kind_of(self.global(local)), env!("CARGO_PKG_VERSION"), self.config.interval_s);
        let status = if online { birth } else { birth.offline_of() };
        let mut buf = [0u8; 128];
        // A status is well under 128 bytes.
        let len = status.encode(&mut buf).unwrap_or(0);
        (self.topic(local, Channel::Status), buf[..len].to_vec())
    }

    fn telemetry(&mut self, local: usize, now_ms: u64, t_s: f64) -> (String, Vec<u8>) {
        let kind = kind_of(self.global(local));
        let slot = DeviceKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        let sample = self.physics[slot].sample(t_s);
        let mut values = sample.values;
        if kind == DeviceKind::GasDetector {
            // As the firmware core: the valve position goes with every gas reading (open).
            let _ = values.set(Metric::ValveClosed, 0.0);
        }
        let seq = self.seqs[local];
        self.seqs[local] = seq.wrapping_add(1);
        let message = Uplink::Telemetry(Telemetry { seq, ts: Some(now_ms), values, battery_v: sample.battery_v, rssi_dbm: sample.rssi_dbm });
        let mut buf = [0u8; MAX_PAYLOAD_LEN];
        // At most 8 values of ~40 bytes: always fits.
        let len = message.encode(&mut buf).unwrap_or(0);
        (self.topic(local, Channel::Telemetry), buf[..len].to_vec())
    }

    pub(super) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let link_config = self.link_config();
        let filter = format!("citywatch/v1/{}/+/cmd", self.config.site);
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let link = Link::start(&link_config, events_tx);
        let telemetry_qos = if self.config.telemetry_qos1 { QoS::AtLeastOnce } else { QoS::AtMostOnce };
        let mut ticker = tokio::time::interval(Duration::from_millis(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Births still to send on the current link; `None` until the first CONNACK.
        let mut births_next: Option<usize> = None;
        // The pacing clock starts at the first CONNACK.
        let mut paced_since: Option<Instant> = None;
        let mut paced_sent: u64 = 0;
        let mut next_device = 0usize;
        let mut ever_up = false;
        let len = self.seqs.len();

        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                event = events.recv() => {
                    let Some(event) = event else { break };
                    match event {
                        LinkEvent::Up => {
                            if ever_up {
                                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                            }
                            ever_up = true;
                            link.subscribe(&filter).await;
                            // Births resume where they stopped: the broker keeps the retained
                            // ones, and there is no will to undo (restarting from 0 on every
                            // reconnect never finishes a million births on a flaky link).
                            births_next.get_or_insert(0);
                        }
                        LinkEvent::Down(reason) => tracing::debug!(connection = self.index, %reason, "link down"),
                        LinkEvent::Message { topic, .. } => {
                            let mine = Topic::parse(&topic).ok().and_then(|t| parse_index(t.device)).is_some_and(|g| g % self.stride == self.index);
                            if mine {
                                self.stats.commands.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                _ = ticker.tick() => {
                    if !link.is_connected() {
                        continue;
                    }
                    let Some(next) = births_next else { continue };
                    if next < len {
                        let end = (next + SLICE).min(len);
                        for local in next..end {
                            let (topic, payload) = self.status(local, true);
                            self.count(link.client().publish(topic, QoS::AtLeastOnce, true, payload).await.is_ok(), Channel::Status);
                        }
                        births_next = Some(end);
                        if end == len {
                            self.stats.births_done_ms.fetch_max(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
                        }
                    }
                    // Telemetry round-robin over the devices born so far, from the first CONNACK.
                    let born = births_next.unwrap_or(0).max(1);
                    let since = *paced_since.get_or_insert_with(Instant::now);
                    let due = (since.elapsed().as_secs_f64() * self.rate) as u64;
                    let slice = due.saturating_sub(paced_sent).min(SLICE as u64);
                    let now_ms = wall_ms();
                    let t_s = self.started.elapsed().as_secs_f64();
                    for _ in 0..slice {
                        if next_device >= born {
                            next_device = 0;
                        }
                        let local = next_device;
                        next_device += 1;
                        let (topic, payload) = self.telemetry(local, now_ms, t_s);
                        self.count(link.client().publish(topic, telemetry_qos, false, payload).await.is_ok(), Channel::Telemetry);
                    }
                    paced_sent += slice;
                }
            }
        }
        // Deliberate stop: goodbyes for the devices that were born, within the budget.
        let born = if link.is_connected() { births_next.unwrap_or(0) } else { 0 };
        let deadline = Instant::now() + GOODBYE_BUDGET;
        let mut said = 0;
        while said < born && Instant::now() < deadline {
            let (topic, payload) = self.status(said, false);
            let sent = tokio::time::timeout_at(deadline.into(), link.client().publish(topic, QoS::AtLeastOnce, true, payload)).await;
            match sent {
                Ok(result) => self.count(result.is_ok(), Channel::Status),
                Err(_) => break,
            }
            said += 1;
        }
        self.stats.goodbyes_skipped.fetch_add((born - said) as u64, Ordering::Relaxed);
        link.close(Duration::from_secs(2)).await;
    }

    fn count(&self, sent: bool, channel: Channel) {
        let counter = match channel {
            Channel::Telemetry => &self.stats.telemetry,
            _ => &self.stats.statuses,
        };
        if sent {
            counter.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The fleet index in a `{site}-{kind}-{index}` device id.
fn parse_index(device: &str) -> Option<usize> {
    device.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::fleet::Scenario;

    fn config(devices: usize) -> FleetConfig {
        FleetConfig {
            host: "127.0.0.1".into(),
            port: 1,
            credentials: None,
            site: "city".into(),
            devices,
            scenario: Scenario::Normal,
            rate: Some(1000.0),
            connections: 4,
            interval_s: 10,
            telemetry_qos1: false,
            offline_after: Duration::ZERO,
            offline_for: Duration::ZERO,
            seed: 1,
        }
    }

    #[test]
    fn connections_share_the_fleet_without_overlap_and_a_device_costs_four_bytes() {
        let cfg = config(1_000_003);
        let stats = Arc::new(FleetStats::default());
        let conns: Vec<_> = (0..4).map(|i| CityConnection::new(&cfg, i, 4, Arc::clone(&stats), Instant::now())).collect();
        assert_eq!(conns.iter().map(|c| c.seqs.len()).sum::<usize>(), 1_000_003);
        assert_eq!(conns[3].global(conns[3].seqs.len() - 1), 999_999);
        assert_eq!(std::mem::size_of_val(&conns[0].seqs[0]), 4);
    }

    #[test]
    fn a_full_simulated_device_is_what_a_city_cannot_afford() {
        // The reason for this module: a firmware core with its ring is ~100 KiB.
        let full = std::mem::size_of::<crate::device::Device<{ crate::sim::fleet::RING_CAPACITY }>>();
        assert!(full > 50_000, "{full} bytes");
    }

    #[test]
    fn city_devices_speak_the_contract_with_their_own_seq() {
        let cfg = config(10);
        let mut c = CityConnection::new(&cfg, 1, 4, Arc::new(FleetStats::default()), Instant::now());
        let (topic, payload) = c.status(2, true);
        assert_eq!(topic, "citywatch/v1/city/city-gas-00009/status");
        let t = Topic::parse(&topic).expect("topic");
        assert!(matches!(Uplink::decode(t.channel, &payload), Ok(Uplink::Status(_))));
        for expected in 0..3 {
            let (topic, payload) = c.telemetry(0, 1_700_000_000_000, 1.0);
            let t = Topic::parse(&topic).expect("topic");
            assert_eq!(t.device, "city-smoke-00001");
            let Ok(Uplink::Telemetry(m)) = Uplink::decode(t.channel, &payload) else { panic!("telemetry") };
            assert_eq!(m.seq, expected);
        }
        let (topic, payload) = c.telemetry(2, 1_700_000_000_000, 1.0);
        let t = Topic::parse(&topic).expect("topic");
        let Ok(Uplink::Telemetry(m)) = Uplink::decode(t.channel, &payload) else { panic!("telemetry") };
        assert_eq!((t.device, m.seq), ("city-gas-00009", 0));
        assert_eq!(m.values.get(Metric::ValveClosed), Some(0.0));
        assert_eq!(parse_index("city-siren-00005"), Some(5));
    }
}

//! The simulated fleet: devices of all three kinds running the firmware core over simulated
//! physics, each scenario's behaviour, and the load generator's pacing.
//!
//! Without a rate every device is its own MQTT client with its own Last Will, retained
//! `status`, `seq` and store-and-forward ring, reporting on its interval. With a rate the
//! devices share a few connections and telemetry goes out at that pace, round-robin over the
//! devices: the load generator of the benchmarks. Counters are shared so the binary can
//! report progress and a final summary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{LastWill, QoS};
use tokio::sync::{mpsc, watch};

use super::bad::BadPayloads;
use super::city::CityConnection;
use super::link::{Link, LinkConfig, LinkEvent};
use super::physics::{CrewAction, Physics, Role};
use crate::alarm::AlarmConfig;
use crate::device::{Device, DeviceConfig, DeviceStats, Outgoing, Qos, Transport};
use crate::wire::{Channel, DeviceKind, Topic, MAX_ID_LEN};

/// Messages a simulated device can hold while its link is down.
pub const RING_CAPACITY: usize = 512;
/// How often devices sample in interval mode.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(200);

/// The behaviours of SPEC §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Normal,
    GasLeak,
    Fire,
    BracketCorrosion,
    Offline,
    Flapping,
    BadPayloads,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::Normal,
        Scenario::GasLeak,
        Scenario::Fire,
        Scenario::BracketCorrosion,
        Scenario::Offline,
        Scenario::Flapping,
        Scenario::BadPayloads,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Normal => "normal",
            Scenario::GasLeak => "gas-leak",
            Scenario::Fire => "fire",
            Scenario::BracketCorrosion => "bracket-corrosion",
            Scenario::Offline => "offline",
            Scenario::Flapping => "flapping",
            Scenario::BadPayloads => "bad-payloads",
        }
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scenario::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = Scenario::ALL.iter().map(|x| x.as_str()).collect();
            format!("unknown scenario {s:?}; one of: {}", names.join(", "))
        })
    }
}

/// Everything the fleet needs to run.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
    pub site: String,
    pub devices: usize,
    pub scenario: Scenario,
    /// Telemetry messages per second for the whole fleet; `None`: each device on its interval.
    pub rate: Option<f64>,
    /// Connections the load generator spreads devices over (rate mode only).
    pub connections: usize,
    pub interval_s: u32,
    pub telemetry_qos1: bool,
    /// Offline scenario: when the links drop and for how long.
    pub offline_after: Duration,
    pub offline_for: Duration,
    /// Seed for sensor noise, so runs can be repeated.
    pub seed: u64,
}

impl FleetConfig {
    /// The load generator with quiet devices runs in city mode (4 bytes a device, see
    /// [`super::city`]); every other combination runs full firmware cores.
    pub fn is_city(&self) -> bool {
        self.rate.is_some() && self.scenario == Scenario::Normal
    }

    /// Checks what a user can get wrong; the message names the option.
    pub fn validate(&self) -> Result<(), String> {
        if self.devices == 0 {
            return Err("--devices must be at least 1".into());
        }
        if !crate::wire::is_valid_id(&self.site) {
            return Err(format!("--site {:?} must match [A-Za-z0-9_-]{{1,64}}", self.site));
        }
        let longest = device_id(&self.site, DeviceKind::SirenMount, self.devices - 1);
        if longest.len() > MAX_ID_LEN {
            return Err(format!("--site is too long: device ids like {longest:?} exceed {MAX_ID_LEN} characters"));
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err("--rate must be a positive number of messages per second".into());
            }
        }
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.interval_s == 0 {
            return Err("--interval must be at least 1 second".into());
        }
        if self.scenario == Scenario::Fire && self.devices < 5 {
            return Err("the fire scenario needs two smoke detectors of one site: use --devices 5 or more".into());
        }
        Ok(())
    }
}

/// Kinds are dealt round-robin: gas, smoke, siren, gas, …
pub fn kind_of(index: usize) -> DeviceKind {
    DeviceKind::ALL[index % DeviceKind::ALL.len()]
}

/// A device id unique across sites: `{site}-{gas|smoke|siren}-{index:05}`.
pub fn device_id(site: &str, kind: DeviceKind, index: usize) -> String {
    let short = match kind {
        DeviceKind::GasDetector => "gas",
        DeviceKind::SmokeDetector => "smoke",
        DeviceKind::SirenMount => "siren",
    };
    format!("{site}-{short}-{index:05}")
}

/// Fleet-wide counters.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub telemetry: AtomicU64,
    pub events: AtomicU64,
    pub statuses: AtomicU64,
    /// Handed to the device ring because the link could not take them.
    pub buffered: AtomicU64,
    /// Evicted from a full ring.
    pub ring_dropped: AtomicU64,
    /// Handed to rumqttc but refused there (client gone).
    pub lost: AtomicU64,
    pub commands: AtomicU64,
    pub link_drops: AtomicU64,
    pub reconnects: AtomicU64,
    /// City mode: ms from start until the last connection had sent every birth.
    pub births_done_ms: AtomicU64,
    /// City mode: goodbyes not sent at stop because the budget ran out.
    pub goodbyes_skipped: AtomicU64,
    /// Bad messages sent on purpose, by the gateway reason they should earn.
    pub bad: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl FleetStats {
    pub fn published(&self) -> u64 {
        self.telemetry.load(Ordering::Relaxed) + self.events.load(Ordering::Relaxed) + self.statuses.load(Ordering::Relaxed)
    }

    /// The final summary as one JSON object.
    pub fn summary(&self, config: &FleetConfig, elapsed: Duration) -> serde_json::Value {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let bad = self.bad.lock().map(|m| m.clone()).unwrap_or_default();
        serde_json::json!({
            "scenario": config.scenario.as_str(),
            "site": config.site,
            "devices": config.devices,
            "elapsed_s": (secs * 1000.0).round() / 1000.0,
            "published": self.published(),
            "rate_per_s": (self.published() as f64 / secs).round(),
            "telemetry_per_s": (self.telemetry.load(Ordering::Relaxed) as f64 / secs).round(),
            "telemetry": self.telemetry.load(Ordering::Relaxed),
            "events": self.events.load(Ordering::Relaxed),
            "statuses": self.statuses.load(Ordering::Relaxed),
            "buffered": self.buffered.load(Ordering::Relaxed),
            "ring_dropped": self.ring_dropped.load(Ordering::Relaxed),
            "lost": self.lost.load(Ordering::Relaxed),
            "commands": self.commands.load(Ordering::Relaxed),
            "link_drops": self.link_drops.load(Ordering::Relaxed),
            "reconnects": self.reconnects.load(Ordering::Relaxed),
            "births_done_s": self.births_done_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            "goodbyes_skipped": self.goodbyes_skipped.load(Ordering::Relaxed),
            "bad": bad,
        })
    }
}

/// A message the firmware core handed over, waiting for the async client.
pub(super) struct Queued {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    /// `None` for deliberately bad messages (counted by reason, not by channel).
    pub channel: Option<Channel>,
}

/// The core's [`Transport`]: collects messages while the link is up; the connection task then
/// awaits each publish, so a slow broker pushes back on the simulator instead of growing a queue.
struct Collector {
    connected: Arc<AtomicBool>,
    queue: Vec<Queued>,
}

impl Transport for Collector {
    type Error = ();
    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }
    fn publish(&mut self, m: Outgoing<'_>) -> Result<(), ()> {
        if !self.is_connected() {
            return Err(());
        }
        self.queue.push(Queued {
            topic: m.topic.to_owned(),
            payload: m.payload.to_vec(),
            qos: match m.qos {
                Qos::AtMostOnce => QoS::AtMostOnce,
                Qos::AtLeastOnce => QoS::AtLeastOnce,
            },
            retain: m.retain,
            channel: Some(m.channel),
        });
        Ok(())
    }
}

/// One simulated device: the firmware core plus its surroundings.
struct SimDevice {
    core: Device<RING_CAPACITY>,
    physics: Physics,
    bad: Option<BadPayloads>,
    /// Flapping siren mounts toggle their announced state.
    announced_online: bool,
    /// The core's counters as last added to the fleet's.
    seen: DeviceStats,
}

/// Runs the fleet until `shutdown` turns true (or forever).
pub async fn run(config: FleetConfig, stats: Arc<FleetStats>, shutdown: watch::Receiver<bool>) -> Result<(), String> {
    config.validate()?;
    let started = Instant::now();
    if config.is_city() {
        let n = config.connections.min(config.devices);
        let tasks: Vec<_> = (0..n)
            .map(|i| tokio::spawn(CityConnection::new(&config, i, n, Arc::clone(&stats), started).run(shutdown.clone())))
            .collect();
        for task in tasks {
            task.await.map_err(|e| format!("connection task failed: {e}"))?;
        }
        return Ok(());
    }
    let devices = build_devices(&config)?;
    let groups: Vec<Vec<SimDevice>> = match config.rate {
        None => devices.into_iter().map(|d| vec![d]).collect(),
        Some(_) => {
            let n = config.connections.min(config.devices);
            let mut groups: Vec<Vec<SimDevice>> = (0..n).map(|_| Vec::new()).collect();
            for (i, d) in devices.into_iter().enumerate() {
                groups[i % n].push(d);
            }
            groups
        }
    };
    let per_connection_rate = config.rate.map(|r| r / groups.len() as f64);
    let mut tasks = Vec::with_capacity(groups.len());
    for (index, group) in groups.into_iter().enumerate() {
        let connection = Connection {
            config: config.clone(),
            index,
            devices: group,
            rate: per_connection_rate,
            stats: Arc::clone(&stats),
            started,
        };
        tasks.push(tokio::spawn(connection.run(shutdown.clone())));
    }
    for task in tasks {
        task.await.map_err(|e| format!("device task failed: {e}"))?;
    }
    Ok(())
}

fn build_devices(config: &FleetConfig) -> Result<Vec<SimDevice>, String> {
    let mut gas_seen = 0usize;
    let mut smoke_seen = 0usize;
    let mut out = Vec::with_capacity(config.devices);
    for index in 0..config.devices {
        let kind = kind_of(index);
        let id = device_id(&config.site, kind, index);
        let role = match (config.scenario, kind) {
            (Scenario::GasLeak, DeviceKind::GasDetector) => {
                gas_seen += 1;
                // Staggered so a large fleet does not leak all at once.
                Role::GasLeak { start_s: 2.0 + ((gas_seen - 1) % 10) as f64 }
            }
            (Scenario::Fire, DeviceKind::SmokeDetector) => {
                smoke_seen += 1;
                match smoke_seen {
                    1 => Role::Fire { start_s: 3.0 },
                    2 => Role::Fire { start_s: 8.0 },
                    _ => Role::Normal,
                }
            }
            (Scenario::BracketCorrosion, DeviceKind::SirenMount) => Role::Corroding,
            (Scenario::Flapping, _) => Role::Flapping { half_period_s: 12.0 },
            _ => Role::Normal,
        };
        let core = Device::new(&DeviceConfig {
            site: &config.site,
            device: &id,
            kind,
            fw: env!("CARGO_PKG_VERSION"),
            interval_s: config.interval_s,
            alarm: AlarmConfig::default(),
            telemetry_qos1: config.telemetry_qos1,
        })
        .map_err(|e| format!("device {id}: {e}"))?;
        out.push(SimDevice {
            core,
            physics: Physics::new(kind, role, config.seed.wrapping_add(index as u64)),
            bad: (config.scenario == Scenario::BadPayloads).then(|| BadPayloads::new(&config.site, &id)),
            announced_online: true,
            seen: DeviceStats::default(),
        });
    }
    Ok(out)
}

/// One MQTT connection and the devices behind it.
struct Connection {
    config: FleetConfig,
    index: usize,
    devices: Vec<SimDevice>,
    rate: Option<f64>,
    stats: Arc<FleetStats>,
    started: Instant,
}

impl Connection {
    fn link_config(&self) -> LinkConfig {
        let (client_id, will) = match (self.rate, self.devices.first()) {
            (None, Some(d)) => {
                let mut buf = [0u8; 128];
                let n = d.core.encode_will(&mut buf);
                let topic = d.core.topic(Channel::Status);
                (format!("edge-sim-{}", d.core.id()), Some(LastWill::new(topic.as_str(), buf[..n].to_vec(), QoS::AtLeastOnce, true)))
            }
            _ => (format!("edge-sim-{}-load-{}-{}", self.config.site, self.index, std::process::id()), None),
        };
        LinkConfig {
            host: self.config.host.clone(),
            port: self.config.port,
            client_id,
            credentials: self.config.credentials.clone(),
            will,
            keep_alive: Duration::from_secs(30),
            request_capacity: if self.rate.is_some() { 4096 } else { 64 },
            inflight: if self.rate.is_some() { super::city::INFLIGHT } else { 100 },
        }
    }

    fn cmd_filter(&self) -> String {
        match (self.devices.as_slice(), self.rate) {
            ([one], None) => one.core.topic(Channel::Cmd).as_str().to_owned(),
            _ => format!("citywatch/v1/{}/+/cmd", self.config.site),
        }
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let link_config = self.link_config();
        let filter = self.cmd_filter();
        let by_id: HashMap<String, usize> =
            self.devices.iter().enumerate().map(|(i, d)| (d.core.id().to_owned(), i)).collect();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut link = Some(Link::start(&link_config, events_tx.clone()));
        let mut collector = Collector { connected: link.as_ref().map(Link::connected).unwrap_or_default(), queue: Vec::new() };
        let mut ticker = tokio::time::interval(match self.rate {
            Some(_) => Duration::from_millis(1),
            None => SAMPLE_PERIOD,
        });
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut paced_sent: u64 = 0;
        let mut next_device = 0usize;
        let mut offline_done = self.config.scenario != Scenario::Offline;
        let mut reconnect_at: Option<Instant> = None;
        let mut flap_at = Instant::now() + Duration::from_secs(10);
        let mut bad_at = Instant::now() + Duration::from_secs(1);
        let mut ever_up = false;

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
                            if let Some(l) = &link {
                                l.subscribe(&filter).await;
                            }
                            for d in &mut self.devices {
                                d.core.on_connect(&mut collector);
                            }
                        }
                        LinkEvent::Down(reason) => {
                            tracing::debug!(connection = self.index, %reason, "link down");
                        }
                        LinkEvent::Message { topic, payload } => {
                            let Ok(t) = Topic::parse(&topic) else { continue };
                            let Some(&i) = by_id.get(t.device) else { continue };
                            self.stats.commands.fetch_add(1, Ordering::Relaxed);
                            let d = &mut self.devices[i];
                            let t_s = self.started.elapsed().as_secs_f64();
                            let sample = d.physics.sample(t_s);
                            match d.core.handle_command(wall_ms(), &payload, &sample, &mut collector) {
                                Ok(outputs) => { d.physics.apply(t_s, outputs); }
                                Err(reason) => tracing::warn!(device = d.core.id(), %reason, "bad command ignored"),
                            }
                        }
                    }
                }
                _ = ticker.tick() => {
                    let t_s = self.started.elapsed().as_secs_f64();
                    match self.rate {
                        None => {
                            for d in &mut self.devices {
                                let sample = d.physics.sample(t_s);
                                let outputs = d.core.tick(wall_ms(), &sample, &mut collector);
                                if d.physics.apply(t_s, outputs) == Some(CrewAction::ResetAndReopen) {
                                    let now = wall_ms();
                                    d.core.reset(now, &sample, &mut collector);
                                    d.core.open_valve(now, &mut collector);
                                    d.physics.apply(t_s, d.core.alarm().outputs(now));
                                }
                            }
                        }
                        Some(rate) => {
                            let due = (t_s * rate) as u64;
                            // Send what is due in slices, so link events still get a turn.
                            let slice = due.saturating_sub(paced_sent).min(256);
                            let fleet_size = self.devices.len();
                            for _ in 0..slice {
                                let d = &mut self.devices[next_device];
                                next_device = (next_device + 1) % fleet_size;
                                let sample = d.physics.sample(t_s);
                                let outputs = d.core.tick_paced(wall_ms(), &sample, &mut collector);
                                d.physics.apply(t_s, outputs);
                            }
                            paced_sent += slice;
                        }
                    }
                    let now = Instant::now();
                    if self.config.scenario == Scenario::Flapping && now >= flap_at {
                        flap_at = now + Duration::from_secs(10);
                        for d in self.devices.iter_mut().filter(|d| d.core.kind() == DeviceKind::SirenMount) {
                            d.announced_online = !d.announced_online;
                            if d.announced_online { d.core.on_connect(&mut collector) } else { d.core.on_disconnect(&mut collector) }
                        }
                    }
                    if now >= bad_at {
                        bad_at = now + Duration::from_secs(u64::from(self.config.interval_s));
                        if collector.is_connected() {
                            for d in &mut self.devices {
                                if let Some(bad) = &mut d.bad {
                                    let (reason, message) = bad.next_message();
                                    collector.queue.push(message);
                                    if let Ok(mut m) = self.stats.bad.lock() { *m.entry(reason).or_default() += 1; }
                                }
                            }
                        }
                    }
                    if !offline_done && self.started.elapsed() >= self.config.offline_after {
                        offline_done = true;
                        self.flush(&mut collector, link.as_ref()).await;
                        if let Some(l) = link.take() {
                            self.stats.link_drops.fetch_add(1, Ordering::Relaxed);
                            l.drop_ungracefully(Duration::from_millis(300)).await;
                        }
                        reconnect_at = Some(Instant::now() + self.config.offline_for);
                    }
                    if reconnect_at.is_some_and(|at| Instant::now() >= at) {
                        reconnect_at = None;
                        let l = Link::start(&link_config, events_tx.clone());
                        collector.connected = l.connected();
                        link = Some(l);
                    }
                }
            }
            self.flush(&mut collector, link.as_ref()).await;
            self.collect_core_stats();
        }
        // Deliberate stop: say goodbye so the gateway need not wait for a will.
        for d in &mut self.devices {
            d.core.on_disconnect(&mut collector);
        }
        self.flush(&mut collector, link.as_ref()).await;
        if let Some(l) = link {
            l.close(Duration::from_secs(2)).await;
        }
    }

    /// Hands queued messages to the client, awaiting each so the broker paces us.
    async fn flush(&self, collector: &mut Collector, link: Option<&Link>) {
        for m in collector.queue.drain(..) {
            let counter = match m.channel {
                Some(Channel::Telemetry) => Some(&self.stats.telemetry),
                Some(Channel::Event) => Some(&self.stats.events),
                Some(_) => Some(&self.stats.statuses),
                None => None,
            };
            let sent = match link {
                Some(l) => l.client().publish(m.topic, m.qos, m.retain, m.payload).await.is_ok(),
                None => false,
            };
            if sent {
                if let Some(counter) = counter {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                self.stats.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Adds what the cores counted since last time to the fleet's counters.
    fn collect_core_stats(&mut self) {
        for d in &mut self.devices {
            let now = d.core.stats();
            let dropped = now.dropped.wrapping_sub(d.seen.dropped);
            let buffered = now.buffered.wrapping_sub(d.seen.buffered);
            self.stats.ring_dropped.fetch_add(u64::from(dropped), Ordering::Relaxed);
            self.stats.buffered.fetch_add(u64::from(buffered), Ordering::Relaxed);
            d.seen = now;
        }
    }
}

/// Device clock: ms since the Unix epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

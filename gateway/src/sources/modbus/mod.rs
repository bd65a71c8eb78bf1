//! Modbus polling of legacy controllers and detectors (TCP and RTU) that speak no MQTT.
//!
//! Each bus is one task that reads its devices one request at a time, every call under a
//! timeout, reconnecting with backoff. What it reads becomes contract messages — `status`,
//! `telemetry`, `event` — on the same source channel as MQTT, so polled devices go through the
//! same decode, registry, rules and incidents as any other. A device whose controller misses
//! `offline_after_polls` polls announces `offline` (as an MQTT Last Will would) and comes back
//! `online` by itself with its first good poll. Not a Modbus server: the gateway only reads.

pub mod config;
pub mod map;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder as _;
use bytes::Bytes;
use citywatch_edge::wire::{self, Channel, Metric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, Instant};
use tokio_modbus::client::{Client as _, Context, Reader};
use tokio_modbus::prelude::{Slave, SlaveContext};

pub use config::{BusConfig, DeviceConfig, ModbusConfig, Parity, Transport};
pub use map::RegisterMap;

use crate::ingest::{now_ms, Inbound};
use map::{ReadSpan, Registers, Table};

/// Firmware string polled devices announce.
pub const FW: &str = "modbus";

/// A bus's counters, shown in `/metrics` by [`BusMetrics`] with a `bus` label.
#[derive(Debug, Default)]
pub struct BusStats {
    pub name: String,
    pub polls_ok: Counter,
    pub polls_failed: Counter,
    pub timeouts: Counter,
    pub exceptions: Counter,
    pub connects: Counter,
    pub connect_failures: Counter,
    pub connected: Gauge,
    pub devices_offline: Gauge,
}

/// Every bus's series of `/metrics`: one family per metric, one series per bus (registering
/// each bus apart would repeat a family, which OpenMetrics forbids). Names without `_total`.
#[derive(Debug)]
pub struct BusMetrics(pub Vec<Arc<BusStats>>);

impl Collector for BusMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        use crate::metrics::{counter_family, gauge_family};
        let counters = |f: fn(&BusStats) -> &Counter| self.0.iter().map(move |b| ([("bus", b.name.as_str())], f(b).get()));
        let gauges = |f: fn(&BusStats) -> &Gauge| self.0.iter().map(move |b| ([("bus", b.name.as_str())], f(b).get()));
        let e = &mut encoder;
        counter_family(e, "citywatch_modbus_polls", "Device polls that read every register.", counters(|b| &b.polls_ok))?;
        counter_family(e, "citywatch_modbus_failed_polls", "Device polls that failed (timeout, exception, no connection).", counters(|b| &b.polls_failed))?;
        counter_family(e, "citywatch_modbus_timeouts", "Calls that hit the bus timeout.", counters(|b| &b.timeouts))?;
        counter_family(e, "citywatch_modbus_exceptions", "Modbus exception responses.", counters(|b| &b.exceptions))?;
        counter_family(e, "citywatch_modbus_connects", "Connections opened.", counters(|b| &b.connects))?;
        counter_family(e, "citywatch_modbus_connect_failures", "Connection attempts that failed.", counters(|b| &b.connect_failures))?;
        gauge_family(e, "citywatch_modbus_connected", "1 while the bus connection is open.", gauges(|b| &b.connected))?;
        gauge_family(e, "citywatch_modbus_devices_offline", "Devices of the bus announced offline.", gauges(|b| &b.devices_offline))
    }
}

/// One device as the poller tracks it.
#[derive(Debug)]
struct Polled {
    config: DeviceConfig,
    map: Arc<RegisterMap>,
    plan: Vec<ReadSpan>,
    /// Contract `seq`: +1 per telemetry and event. Starts at 0 with the gateway, whose
    /// registry starts without a last `seq` too, so nothing is taken for a duplicate.
    seq: u32,
    /// Announced `online` and not since `offline`.
    online: bool,
    failures: u32,
    flags: Vec<Option<bool>>,
}

/// Why a poll failed.
#[derive(Debug)]
enum Failure {
    NotConnected,
    /// The connection is unusable (I/O error, or a late answer could still arrive): reconnect.
    Transport(String),
    /// The controller answered with a Modbus exception: the link is fine.
    Exception(String),
}

/// Polls one bus.
#[derive(Debug)]
pub struct BusPoller {
    bus: BusConfig,
    devices: Vec<Polled>,
    stats: Arc<BusStats>,
}

/// Builds one poller per configured bus, loading every register map (each file once).
pub fn build(config: &ModbusConfig) -> Result<Vec<BusPoller>, crate::sources::Error> {
    let err = |key: String, reason: String| crate::sources::Error::Modbus(format!("{key}: {reason}"));
    config.validate().map_err(|(k, r)| err(k, r))?;
    let mut maps: HashMap<std::path::PathBuf, Arc<RegisterMap>> = HashMap::new();
    let mut pollers = Vec::new();
    for (b, bus) in config.bus.iter().enumerate() {
        let mut devices = Vec::new();
        for (d, dev) in bus.device.iter().enumerate() {
            let key = format!("modbus.bus[{b}].device[{d}].map");
            let map = match maps.get(&dev.map) {
                Some(m) => Arc::clone(m),
                None => {
                    let m = Arc::new(RegisterMap::load(&dev.map).map_err(|e| err(key.clone(), e.to_string()))?);
                    maps.insert(dev.map.clone(), Arc::clone(&m));
                    m
                }
            };
            let plan = map.plan(dev.channel).map_err(|e| err(format!("modbus.bus[{b}].device[{d}].channel"), e))?;
            devices.push(Polled { config: dev.clone(), flags: vec![None; map.flags.len()], map, plan, seq: 0, online: false, failures: 0 });
        }
        let stats = Arc::new(BusStats { name: bus.name.clone(), ..BusStats::default() });
        pollers.push(BusPoller { bus: bus.clone(), devices, stats });
    }
    Ok(pollers)
}

impl BusPoller {
    pub fn stats(&self) -> Arc<BusStats> {
        Arc::clone(&self.stats)
    }

    /// Delays between connection attempts: `reconnect_min`, doubling up to `reconnect_max`.
    fn reconnect_backoff(&self) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::new()
            .with_min_delay(self.bus.reconnect_min.0)
            .with_max_delay(self.bus.reconnect_max.0)
            .without_max_times()
            .build()
    }

    /// Polls until `stop`, sending contract messages into `out` (waiting when it is full, like
    /// the MQTT sources: polling slows down rather than dropping).
    pub async fn run(mut self, out: mpsc::Sender<Inbound>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.bus.poll_interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ctx: Option<Context> = None;
        let mut backoff = self.reconnect_backoff();
        let mut next_connect = Instant::now();
        let mut logged_down = false;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tick.tick() => {}
            }
            if ctx.is_none() && Instant::now() >= next_connect {
                match self.connect().await {
                    Ok(c) => {
                        tracing::info!(bus = %self.bus.name, "Modbus bus connected");
                        self.stats.connects.inc();
                        self.stats.connected.set(1);
                        ctx = Some(c);
                        backoff = self.reconnect_backoff();
                        logged_down = false;
                    }
                    Err(e) => {
                        if !logged_down {
                            tracing::warn!(bus = %self.bus.name, error = %e, "Modbus bus unreachable; retrying with backoff (logged once until it returns)");
                            logged_down = true;
                        }
                        self.stats.connect_failures.inc();
                        // Unlimited attempts: the iterator never ends.
                        next_connect = Instant::now() + backoff.next().unwrap_or(self.bus.reconnect_max.0);
                    }
                }
            }
            for i in 0..self.devices.len() {
                if *stop.borrow() {
                    break; // a round of timeouts must not hold up shutdown
                }
                let result = match ctx.as_mut() {
                    Some(c) => read_device(c, &self.devices[i], self.bus.timeout.0, &self.stats).await,
                    None => Err(Failure::NotConnected),
                };
                let messages = match result {
                    Ok(regs) => {
                        self.stats.polls_ok.inc();
                        self.on_success(i, &regs)
                    }
                    Err(failure) => {
                        self.stats.polls_failed.inc();
                        match &failure {
                            Failure::Transport(e) => {
                                tracing::debug!(bus = %self.bus.name, error = %e, "Modbus transport error; reconnecting");
                                if let Some(mut c) = ctx.take() {
                                    let _ = timeout(self.bus.timeout.0, c.disconnect()).await;
                                }
                                self.stats.connected.set(0);
                            }
                            Failure::Exception(e) => tracing::debug!(bus = %self.bus.name, device = %self.devices[i].config.id, error = %e, "Modbus exception"),
                            Failure::NotConnected => {}
                        }
                        self.on_failure(i)
                    }
                };
                for m in messages {
                    if out.send(m).await.is_err() {
                        return; // the pipeline has stopped
                    }
                }
            }
        }
        if let Some(mut c) = ctx {
            let _ = timeout(self.bus.timeout.0, c.disconnect()).await;
        }
    }

    async fn connect(&self) -> Result<Context, String> {
        let limit = self.bus.timeout.0;
        match self.bus.transport {
            Transport::Tcp => {
                let addr = self.bus.address.ok_or("no address")?;
                match timeout(limit, tokio_modbus::client::tcp::connect(addr)).await {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(format!("{addr}: {e}")),
                    Err(_) => Err(format!("{addr}: connect timed out after {limit:?}")),
                }
            }
            Transport::Rtu => self.open_serial(),
        }
    }

    #[cfg(feature = "modbus-rtu")]
    fn open_serial(&self) -> Result<Context, String> {
        let path = self.bus.serial.as_ref().ok_or("no serial device")?;
        let builder = tokio_serial::new(path.to_string_lossy(), self.bus.baud)
            .parity(match self.bus.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            })
            .data_bits(match self.bus.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .stop_bits(if self.bus.stop_bits == 2 { tokio_serial::StopBits::Two } else { tokio_serial::StopBits::One })
            .timeout(self.bus.timeout.0);
        let port = tokio_serial::SerialStream::open(&builder).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(tokio_modbus::client::rtu::attach(port))
    }

    #[cfg(not(feature = "modbus-rtu"))]
    fn open_serial(&self) -> Result<Context, String> {
        Err("this build has no RTU support (feature modbus-rtu)".into())
    }

    /// A good poll: `online` if needed, the telemetry, and an event per flag that changed.
    fn on_success(&mut self, i: usize, regs: &Registers) -> Vec<Inbound> {
        let interval_s = self.bus.poll_interval.0.as_secs_f64().ceil().max(1.0) as u32;
        let was_offline = !self.devices[i].online;
        let dev = &mut self.devices[i];
        let now = now_ms();
        let mut out = Vec::new();
        if !dev.online {
            dev.online = true;
            out.extend(status(dev, wire::Status::online(dev.map.kind, FW, interval_s), now));
        }
        dev.failures = 0;
        let values = dev.map.values(dev.config.channel, regs);
        let mut telemetry = wire::Telemetry { seq: dev.seq, ts: Some(now as u64), values: wire::Values::new(), battery_v: None, rssi_dbm: None };
        for (metric, value) in &values {
            match metric {
                Metric::BatteryV => telemetry.battery_v = Some(*value),
                Metric::RssiDbm => telemetry.rssi_dbm = Some(*value),
                // Invariant: the map holds at most MAX_VALUES finite metrics, each once.
                m => {
                    let _ = telemetry.values.set(*m, *value);
                }
            }
        }
        if !values.is_empty() {
            telemetry.seq = next_seq(dev);
            let mut buf = [0u8; 1024];
            if let Ok(n) = telemetry.encode(&mut buf) {
                out.push(inbound(dev, Channel::Telemetry, &buf[..n], now));
            }
        }
        let states = dev.map.flags(dev.config.channel, regs);
        for (f, state) in states.into_iter().enumerate() {
            let Some(set) = state else { continue };
            let before = dev.flags[f];
            dev.flags[f] = Some(set);
            let map = Arc::clone(&dev.map);
            let spec = &map.flags[f];
            let event = match (before, set) {
                (Some(b), s) if b == s => None,
                (_, true) => Some(spec.on_set),
                (Some(true), false) => spec.on_clear,
                (_, false) => None,
            };
            if let Some(kind) = event {
                let mut e = wire::Event::new(0, Some(now as u64), kind);
                e.seq = next_seq(dev);
                e.metric = spec.metric;
                e.value = spec.metric.and_then(|m| values.iter().find(|(vm, _)| *vm == m).map(|(_, v)| *v));
                let mut buf = [0u8; 512];
                if let Ok(n) = e.encode(&mut buf) {
                    out.push(inbound(dev, Channel::Event, &buf[..n], now));
                }
                tracing::debug!(device = %dev.config.id, event = kind.as_str(), "Modbus flag changed");
            }
        }
        if was_offline && dev.seq > 0 {
            self.recount_offline();
        }
        out
    }

    /// A failed poll: after `offline_after_polls` in a row, the device announces `offline`.
    fn on_failure(&mut self, i: usize) -> Vec<Inbound> {
        let limit = self.bus.offline_after_polls;
        let dev = &mut self.devices[i];
        dev.failures = dev.failures.saturating_add(1);
        if dev.online && dev.failures >= limit {
            dev.online = false;
            // Flags are unknown while it is away; the first good poll re-reads them, and an
            // alarm still set then is an alarm again (the incident book de-duplicates it).
            dev.flags.iter_mut().for_each(|f| *f = None);
            tracing::warn!(device = %dev.config.id, bus = %self.bus.name, polls = dev.failures, "Modbus device not answering; announced offline");
            let msg = status(dev, wire::Status { state: wire::LinkState::Offline, kind: Some(dev.map.kind), fw: None, interval_s: None }, now_ms());
            self.recount_offline();
            return msg.into_iter().collect();
        }
        Vec::new()
    }

    fn recount_offline(&self) {
        let n = self.devices.iter().filter(|d| !d.online && d.seq > 0).count();
        self.stats.devices_offline.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

fn next_seq(dev: &mut Polled) -> u32 {
    let s = dev.seq;
    dev.seq = dev.seq.wrapping_add(1);
    s
}

fn status(dev: &Polled, s: wire::Status, now: i64) -> Option<Inbound> {
    let mut buf = [0u8; 256];
    let n = s.encode(&mut buf).ok()?;
    Some(inbound(dev, Channel::Status, &buf[..n], now))
}

fn inbound(dev: &Polled, channel: Channel, payload: &[u8], now: i64) -> Inbound {
    Inbound {
        topic: format!("citywatch/v1/{}/{}/{}", dev.config.site, dev.config.id, channel.as_str()),
        payload: Bytes::copy_from_slice(payload),
        received_ms: now,
        ack: None,
        origin: crate::ingest::Origin::Live,
    }
}

/// Reads every span of the device's plan, one request at a time, each under `limit`.
async fn read_device(ctx: &mut Context, dev: &Polled, limit: Duration, stats: &BusStats) -> Result<Registers, Failure> {
    ctx.set_slave(Slave(dev.config.unit));
    let mut regs = Registers::new();
    for span in &dev.plan {
        let call = async {
            match span.table {
                Table::Input => ctx.read_input_registers(span.start, span.count).await,
                Table::Holding => ctx.read_holding_registers(span.start, span.count).await,
            }
        };
        let words = match timeout(limit, call).await {
            Err(_) => {
                stats.timeouts.inc();
                return Err(Failure::Transport(format!("unit {} timed out after {limit:?}", dev.config.unit)));
            }
            Ok(Err(e)) => return Err(Failure::Transport(e.to_string())),
            Ok(Ok(Err(exception))) => {
                stats.exceptions.inc();
                return Err(Failure::Exception(format!("unit {}: {exception}", dev.config.unit)));
            }
            Ok(Ok(Ok(words))) => words,
        };
        if words.len() != usize::from(span.count) {
            return Err(Failure::Transport(format!("unit {} answered {} registers for {}", dev.config.unit, words.len(), span.count)));
        }
        for (k, w) in words.into_iter().enumerate() {
            regs.insert((span.table, span.start + k as u16), w);
        }
    }
    Ok(regs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use citywatch_edge::wire::EventKind;

    #[test]
    fn two_buses_share_one_family_per_metric_with_a_bus_label() {
        let (a, b) = (Arc::new(BusStats { name: "east".into(), ..BusStats::default() }), Arc::new(BusStats { name: "west".into(), ..BusStats::default() }));
        a.timeouts.inc();
        b.connected.set(1);
        let text = crate::metrics::encode_collector(BusMetrics(vec![a, b]));
        assert_eq!(text.matches("# TYPE citywatch_modbus_timeouts counter\n").count(), 1, "{text}");
        assert!(text.contains("citywatch_modbus_timeouts_total{bus=\"east\"} 1\n"), "{text}");
        assert!(text.contains("citywatch_modbus_timeouts_total{bus=\"west\"} 0\n"), "{text}");
        assert!(text.contains("citywatch_modbus_connected{bus=\"west\"} 1\n"), "{text}");
    }

    fn poller(offline_after: u32) -> BusPoller {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("modbus/gas-controller-8ch.toml");
        let config: ModbusConfig = toml::from_str(&format!(
            "[[bus]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\noffline_after_polls = {offline_after}\n[[bus.device]]\nid = \"gc-1\"\nsite = \"xuhui\"\nunit = 1\nchannel = 1\nmap = {:?}\n",
            path.display().to_string()
        ))
        .expect("config");
        build(&config).expect("build").remove(0)
    }

    fn texts(messages: &[Inbound]) -> Vec<(String, String)> {
        messages.iter().map(|m| (m.topic.rsplit('/').next().unwrap_or_default().to_owned(), String::from_utf8_lossy(&m.payload).into_owned())).collect()
    }

    #[test]
    fn polls_become_contract_messages_and_alarm_bits_become_events() {
        let mut p = poller(2);
        // Channel 1 of the controller: registers 4..8.
        let mut regs: Registers = [((Table::Input, 4), 32), ((Table::Input, 5), 215), ((Table::Input, 6), 0)].into();
        let first = texts(&p.on_success(0, &regs));
        assert_eq!(first[0].0, "status");
        assert!(first[0].1.contains("\"state\":\"online\"") && first[0].1.contains("\"kind\":\"gas_detector\""), "{first:?}");
        assert_eq!(first[1].0, "telemetry");
        let t = wire::Telemetry::decode(first[1].1.as_bytes()).expect("contract telemetry");
        assert_eq!((t.seq, t.values.get(Metric::GasLel), t.values.get(Metric::ValveClosed)), (0, Some(3.2), Some(0.0)));
        assert_eq!(first.len(), 2, "no flag set, no event");

        regs.insert((Table::Input, 4), 554);
        regs.insert((Table::Input, 6), 0b1010); // alarm + valve closed
        let second = texts(&p.on_success(0, &regs));
        let events: Vec<wire::Event> = second.iter().filter(|(c, _)| c == "event").map(|(_, b)| wire::Event::decode(b.as_bytes()).expect("event")).collect();
        assert_eq!(events.iter().map(|e| e.event).collect::<Vec<_>>(), vec![EventKind::Alarm, EventKind::ValveClosed]);
        assert_eq!((events[0].metric, events[0].value), (Some(Metric::GasLel), Some(55.4)));
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3], "seq shared with telemetry");

        regs.insert((Table::Input, 6), 0b1000);
        let third = texts(&p.on_success(0, &regs));
        assert!(third.iter().any(|(c, b)| c == "event" && b.contains("alarm_cleared")), "{third:?}");
        assert!(!third.iter().any(|(_, b)| b.contains("valve_opened")), "{third:?}");
    }

    #[test]
    fn a_silent_controller_turns_its_device_offline_and_it_recovers_by_itself() {
        let mut p = poller(2);
        let regs: Registers = [((Table::Input, 4), 0), ((Table::Input, 5), 0), ((Table::Input, 6), 0)].into();
        assert!(p.on_failure(0).is_empty(), "never announced: nothing to take back");
        p.on_success(0, &regs);
        assert!(p.on_failure(0).is_empty(), "one missed poll is not offline yet");
        let offline = texts(&p.on_failure(0));
        assert_eq!(offline.len(), 1);
        assert!(offline[0].0 == "status" && offline[0].1.contains("\"offline\""), "{offline:?}");
        assert_eq!(p.stats.devices_offline.get(), 1);
        assert!(p.on_failure(0).is_empty(), "announced once");
        let back = texts(&p.on_success(0, &regs));
        assert!(back[0].1.contains("\"online\""), "{back:?}");
        assert_eq!(p.stats.devices_offline.get(), 0);
    }

    #[test]
    fn config_errors_name_the_key() {
        let c: ModbusConfig = toml::from_str("[[bus]]\nname = \"b\"\ntransport = \"tcp\"\n").expect("parses");
        assert_eq!(c.validate().expect_err("no address").0, "modbus.bus[0].address");
        let c: ModbusConfig = toml::from_str("[[bus]]\nname = \"b\"\naddress = \"127.0.0.1:502\"\n[[bus.device]]\nid = \"a b\"\nsite = \"s\"\nunit = 1\nmap = \"x\"\n").expect("parses");
        assert_eq!(c.validate().expect_err("bad id").0, "modbus.bus[0].device[0].id");
        let err = crate::config::Config::from_toml("[[modbus.bus]]\nname = \"b\"\naddress = \"127.0.0.1:502\"\npoll = \"1s\"\n").expect_err("unknown key");
        assert!(err.to_string().contains("poll"), "{err}");
    }
}

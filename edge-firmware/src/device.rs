//! The device loop: sample → local decisions → publish, through a [`Transport`].
//!
//! Publish policy: telemetry every `interval_s` (the heartbeat, sent even when nothing
//! changed), early when a metric moves past its deadband, and an event at once on every
//! change of alarm, fault, valve or battery state. Every message takes the next `seq`. While
//! the link is down messages wait in the store-and-forward ring and are replayed in order, with
//! their original `seq` and `ts`, before anything new. The loop owns no clock and no socket:
//! the caller passes the time and a transport, so the same code runs on a board and in edge-sim.

use heapless::String;

use crate::alarm::{AlarmConfig, Events, LocalAlarm, LocalEvent, Outputs, Sample};
use crate::buffer::StoreAndForward;
use crate::wire::{
    Channel, Command, CommandKind, DecodeError, DeviceKind, Event, EventKind, Metric, Status, Telemetry, Topic,
    TopicString, Uplink, Values, MAX_CMD_ID_LEN, MAX_FW_LEN, MAX_ID_LEN, MAX_PAYLOAD_LEN,
};

/// MQTT delivery guarantee of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

/// One message ready for the wire.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub channel: Channel,
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: Qos,
    pub retain: bool,
}

/// The link to the broker, as the device loop sees it.
pub trait Transport {
    type Error;
    /// Whether a publish has a chance now; when false, messages go to the ring instead.
    fn is_connected(&self) -> bool;
    /// Hands one message to the link. An error keeps the message in the ring for later.
    fn publish(&mut self, message: Outgoing<'_>) -> Result<(), Self::Error>;
}

/// Who a device is and how it reports.
#[derive(Debug, Clone)]
pub struct DeviceConfig<'a> {
    pub site: &'a str,
    pub device: &'a str,
    pub kind: DeviceKind,
    pub fw: &'a str,
    pub interval_s: u32,
    pub alarm: AlarmConfig,
    /// Telemetry at QoS 1 instead of 0 (events and status are always QoS 1).
    pub telemetry_qos1: bool,
}

/// Shortest and longest `set_interval` a device accepts, in seconds.
pub const INTERVAL_RANGE_S: (u32, u32) = (1, 86_400);
/// Early telemetry is sent at most this often, however fast values move.
pub const MIN_EARLY_TELEMETRY_MS: u64 = 1_000;

/// How far a metric must move for telemetry to go out before its interval.
pub const fn deadband(metric: Metric) -> f64 {
    match metric {
        Metric::GasLel => 5.0,
        Metric::ValveClosed => 0.5,
        Metric::TempC => 2.0,
        Metric::SmokeDbM => 0.05,
        Metric::CoPpm => 10.0,
        Metric::TiltDeg => 0.05,
        Metric::VibrationMg => 100.0,
        Metric::CorrosionUm => 5.0,
        Metric::SectionLossPct => 1.0,
        Metric::BatteryV => 0.2,
        Metric::RssiDbm => 20.0,
    }
}

/// Counters a device keeps about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Messages handed to the transport (replays included).
    pub published: u32,
    /// Messages that went through the ring before being sent.
    pub buffered: u32,
    /// Messages the ring dropped because it was full.
    pub dropped: u32,
}

/// One device: its identity, alarm state, sequence counter and ring of `N` unsent messages.
#[derive(Debug)]
pub struct Device<const N: usize> {
    site: String<MAX_ID_LEN>,
    device: String<MAX_ID_LEN>,
    kind: DeviceKind,
    fw: String<MAX_FW_LEN>,
    interval_s: u32,
    telemetry_qos1: bool,
    next_seq: u32,
    last_telemetry_ms: Option<u64>,
    last_reported: Values,
    alarm: LocalAlarm,
    ring: StoreAndForward<N>,
    stats: DeviceStats,
}

impl<const N: usize> Device<N> {
    /// A device; ids must satisfy the topic rules.
    pub fn new(config: &DeviceConfig<'_>) -> Result<Self, DecodeError> {
        Topic::new(config.site, config.device, Channel::Status)?;
        let (min, max) = INTERVAL_RANGE_S;
        Ok(Device {
            site: String::try_from(config.site).map_err(|_| DecodeError::BadTopic)?,
            device: String::try_from(config.device).map_err(|_| DecodeError::BadTopic)?,
            kind: config.kind,
            fw: String::try_from(config.fw).map_err(|_| DecodeError::FieldTooLong)?,
            interval_s: config.interval_s.clamp(min, max),
            telemetry_qos1: config.telemetry_qos1,
            next_seq: 0,
            last_telemetry_ms: None,
            last_reported: Values::new(),
            alarm: LocalAlarm::new(config.kind, config.alarm),
            ring: StoreAndForward::new(),
            stats: DeviceStats::default(),
        })
    }

    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    pub fn id(&self) -> &str {
        &self.device
    }

    pub fn interval_s(&self) -> u32 {
        self.interval_s
    }

    /// The `seq` the next message will carry.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    pub fn alarm(&self) -> &LocalAlarm {
        &self.alarm
    }

    /// Messages waiting in the ring.
    pub fn pending(&self) -> usize {
        self.ring.len()
    }

    pub fn stats(&self) -> DeviceStats {
        DeviceStats { dropped: self.ring.dropped(), ..self.stats }
    }

    pub fn topic(&self, channel: Channel) -> TopicString {
        // Invariant: ids were validated in `new`.
        Topic { site: &self.site, device: &self.device, channel }.to_topic_string()
    }

    /// The retained `online` status sent on every connect.
    pub fn birth(&self) -> Status {
        Status::online(self.kind, &self.fw, self.interval_s)
    }

    /// The Last Will the transport registers with the broker.
    pub fn will(&self) -> Status {
        self.birth().offline_of()
    }

    /// Encodes the Last Will into `buf`, for the transport's CONNECT.
    pub fn encode_will(&self, buf: &mut [u8]) -> usize {
        // A status is well under MAX_PAYLOAD_LEN; a short buffer yields an empty will.
        self.will().encode(buf).unwrap_or(0)
    }

    /// Call once the link is (re)established: announce `online`, then replay the ring.
    pub fn on_connect<T: Transport>(&mut self, transport: &mut T) {
        let birth = self.birth();
        self.publish_status(&birth, transport);
        self.flush(transport);
    }

    /// Announces `offline` before a deliberate disconnect (the will covers the rest).
    pub fn on_disconnect<T: Transport>(&mut self, transport: &mut T) {
        let will = self.will();
        self.publish_status(&will, transport);
    }

    /// One cycle: decide on `sample` at `now_ms` (device clock, ms since epoch), report what
    /// changed, send telemetry when due. Returns the outputs to drive.
    pub fn tick<T: Transport>(&mut self, now_ms: u64, sample: &Sample, transport: &mut T) -> Outputs {
        let outputs = self.decide(now_ms, sample, transport);
        if self.telemetry_due(now_ms, sample) {
            self.send_telemetry(now_ms, sample, transport);
        } else {
            self.flush(transport);
        }
        outputs
    }

    /// One cycle with telemetry whatever the schedule: the load generator sets the pace.
    ///
    /// A reading is known by its device and time (the gateway stores one per millisecond and
    /// metric), so each telemetry gets a time after the last one's: a pacer catching up after a
    /// stall sends a device several readings within one millisecond, and at the same `ts` all
    /// but the first would never be stored.
    pub fn tick_paced<T: Transport>(&mut self, now_ms: u64, sample: &Sample, transport: &mut T) -> Outputs {
        let now_ms = self.last_telemetry_ms.map_or(now_ms, |last| now_ms.max(last.saturating_add(1)));
        let outputs = self.decide(now_ms, sample, transport);
        self.send_telemetry(now_ms, sample, transport);
        outputs
    }

    /// Local decisions on `sample`; events go out at once.
    fn decide<T: Transport>(&mut self, now_ms: u64, sample: &Sample, transport: &mut T) -> Outputs {
        let mut events = Events::new();
        let outputs = self.alarm.update(now_ms, sample, &mut events);
        self.send_events(now_ms, &events, transport);
        outputs
    }

    /// Sends telemetry now, after anything still in the ring.
    pub fn send_telemetry<T: Transport>(&mut self, now_ms: u64, sample: &Sample, transport: &mut T) {
        let mut values = sample.values.clone();
        if self.kind == DeviceKind::GasDetector {
            // The valve position is the device's own state, reported with every reading.
            let closed = if self.alarm.valve_closed() { 1.0 } else { 0.0 };
            let _ = values.set(Metric::ValveClosed, closed);
        }
        self.last_reported = values.clone();
        self.last_telemetry_ms = Some(now_ms);
        let telemetry = Telemetry {
            seq: self.take_seq(),
            ts: Some(now_ms),
            values,
            battery_v: sample.battery_v,
            rssi_dbm: sample.rssi_dbm,
        };
        self.send(Uplink::Telemetry(telemetry), transport);
    }

    /// Acts on a `cmd` payload from the gateway and acknowledges it with `cmd_ack`.
    pub fn handle_command<T: Transport>(
        &mut self,
        now_ms: u64,
        payload: &[u8],
        sample: &Sample,
        transport: &mut T,
    ) -> Result<Outputs, DecodeError> {
        let command = Command::decode(payload)?;
        let mut events = Events::new();
        match command.cmd {
            CommandKind::CloseValve => self.alarm.close_valve(&mut events),
            CommandKind::SelfTest => {
                self.alarm.self_test(sample, &mut events);
            }
            CommandKind::Silence => self.alarm.silence(now_ms, command.arg, &mut events),
            CommandKind::SetInterval => {
                let (min, max) = INTERVAL_RANGE_S;
                let wanted = command.arg.ok_or(DecodeError::WrongType)?;
                self.interval_s = wanted.clamp(min, max);
                let birth = self.birth();
                self.publish_status(&birth, transport);
            }
        }
        self.send_events(now_ms, &events, transport);
        self.send_ack(now_ms, &command.id, transport);
        Ok(self.alarm.outputs(now_ms))
    }

    /// On-site reset button: unlatches a gas alarm once gas is gone.
    pub fn reset<T: Transport>(&mut self, now_ms: u64, sample: &Sample, transport: &mut T) -> bool {
        let mut events = Events::new();
        let done = self.alarm.reset(sample.values.get(Metric::GasLel), &mut events);
        self.send_events(now_ms, &events, transport);
        done
    }

    /// Reopens the valve by hand once the alarm is reset.
    pub fn open_valve<T: Transport>(&mut self, now_ms: u64, transport: &mut T) -> bool {
        let mut events = Events::new();
        let done = self.alarm.open_valve(&mut events);
        self.send_events(now_ms, &events, transport);
        done
    }

    /// Replays the ring, oldest first, while the transport takes messages.
    pub fn flush<T: Transport>(&mut self, transport: &mut T) {
        let mut buf = [0u8; MAX_PAYLOAD_LEN];
        while transport.is_connected() {
            let Some(message) = self.ring.front() else { break };
            if self.publish_uplink(message, &mut buf, transport).is_err() {
                break;
            }
            self.ring.pop_front();
            self.stats.published = self.stats.published.wrapping_add(1);
        }
    }

    fn telemetry_due(&self, now_ms: u64, sample: &Sample) -> bool {
        let Some(last) = self.last_telemetry_ms else { return true };
        let elapsed = now_ms.saturating_sub(last);
        if elapsed >= u64::from(self.interval_s) * 1000 {
            return true;
        }
        elapsed >= MIN_EARLY_TELEMETRY_MS
            && sample.values.iter().any(|(metric, value)| match self.last_reported.get(metric) {
                Some(before) => (value - before).abs() > deadband(metric),
                None => true,
            })
    }

    fn take_seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        seq
    }

    fn send_events<T: Transport>(&mut self, now_ms: u64, events: &[LocalEvent], transport: &mut T) {
        for e in events {
            let event = Event {
                seq: self.take_seq(),
                ts: Some(now_ms),
                event: e.event,
                metric: e.metric,
                value: e.value,
                id: None,
            };
            self.send(Uplink::Event(event), transport);
        }
    }

    fn send_ack<T: Transport>(&mut self, now_ms: u64, id: &String<MAX_CMD_ID_LEN>, transport: &mut T) {
        let mut ack = Event::new(self.take_seq(), Some(now_ms), EventKind::CmdAck);
        ack.id = Some(id.clone());
        self.send(Uplink::Event(ack), transport);
    }

    /// Sends `message` after anything older; keeps it in the ring when the link cannot take it.
    fn send<T: Transport>(&mut self, message: Uplink, transport: &mut T) {
        self.flush(transport);
        if self.ring.is_empty() && transport.is_connected() {
            let mut buf = [0u8; MAX_PAYLOAD_LEN];
            if self.publish_uplink(&message, &mut buf, transport).is_ok() {
                self.stats.published = self.stats.published.wrapping_add(1);
                return;
            }
        }
        self.stats.buffered = self.stats.buffered.wrapping_add(1);
        self.ring.push(message);
    }

    fn publish_uplink<T: Transport>(&self, message: &Uplink, buf: &mut [u8], transport: &mut T) -> Result<(), ()> {
        // Messages built here always fit MAX_PAYLOAD_LEN (at most 8 values of ~40 bytes).
        let len = message.encode(buf).map_err(|_| ())?;
        let qos = match message {
            Uplink::Telemetry(_) if !self.telemetry_qos1 => Qos::AtMostOnce,
            _ => Qos::AtLeastOnce,
        };
        let topic = self.topic(message.channel());
        transport
            .publish(Outgoing { channel: message.channel(), topic: &topic, payload: &buf[..len], qos, retain: false })
            .map_err(|_| ())?;
        Ok(())
    }

    /// Status is state, not history: sent retained when possible, never buffered.
    fn publish_status<T: Transport>(&mut self, status: &Status, transport: &mut T) {
        if !transport.is_connected() {
            return;
        }
        let mut buf = [0u8; 128];
        let Ok(len) = status.encode(&mut buf) else { return };
        let topic = self.topic(Channel::Status);
        let _ = transport.publish(Outgoing { channel: Channel::Status, topic: &topic, payload: &buf[..len], qos: Qos::AtLeastOnce, retain: true });
    }
}

#[cfg(test)]
mod tests;

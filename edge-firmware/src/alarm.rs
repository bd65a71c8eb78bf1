//! Local alarm decisions: what a device does on its own, with no network at all.
//!
//! Gas at the high set point closes the shut-off valve and sounds the buzzer, and the alarm
//! latches until someone resets it on site; smoke, heat and bracket tilt alarm with hysteresis;
//! sensor faults and low battery are raised once and cleared once. Pure and synchronous: the
//! device loop feeds it samples and applies the [`Outputs`] it returns. The gateway's rule
//! engine is separate and may be stricter; this is the last line of defence.

use crate::wire::{DeviceKind, EventKind, Metric, Values};

/// Set points. Defaults follow SPEC §4 so device and gateway agree on what an alarm is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlarmConfig {
    /// Buzzer pre-alarm from here (GB/T 50493 level 1 ≤ 25 %LEL).
    pub gas_low_lel: f64,
    /// Valve closes and the alarm latches from here (level 2 ≤ 50 %LEL).
    pub gas_high_lel: f64,
    /// A latched gas alarm can be reset only below this.
    pub gas_clear_lel: f64,
    /// Smoke alarm set point (GB 4715 class B 0.15 dB/m) and its clear point.
    pub smoke_db_m: f64,
    pub smoke_clear_db_m: f64,
    /// Heat alarm set point (EN 54-5 A1, 54–65 °C) and its clear point.
    pub heat_c: f64,
    pub heat_clear_c: f64,
    /// Siren-mount tilt critical (h/150 ≈ 0.38°) and its clear point.
    pub tilt_deg: f64,
    pub tilt_clear_deg: f64,
    /// Battery floor and the level at which the warning re-arms.
    pub battery_floor_v: f64,
    pub battery_rearm_v: f64,
    /// How long `silence` mutes the buzzer when the command gives no duration.
    pub default_silence_s: u32,
}

impl Default for AlarmConfig {
    fn default() -> Self {
        AlarmConfig {
            gas_low_lel: 20.0,
            gas_high_lel: 50.0,
            gas_clear_lel: 10.0,
            smoke_db_m: 0.15,
            smoke_clear_db_m: 0.10,
            heat_c: 60.0,
            heat_clear_c: 55.0,
            tilt_deg: 0.38,
            tilt_clear_deg: 0.30,
            battery_floor_v: 2.7,
            battery_rearm_v: 2.8,
            default_silence_s: 300,
        }
    }
}

/// One cycle's sensor readings, as the drivers (or the simulator) produced them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub values: Values,
    pub battery_v: Option<f64>,
    pub rssi_dbm: Option<f64>,
    /// The sensor that failed this cycle (bus error, out of range), if any.
    pub faulted: Option<Metric>,
}

/// Output levels the caller drives onto the valve and buzzer pins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outputs {
    pub valve_closed: bool,
    pub buzzer: bool,
}

/// Something the device reports as an `event`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalEvent {
    pub event: EventKind,
    pub metric: Option<Metric>,
    pub value: Option<f64>,
}

impl LocalEvent {
    const fn bare(event: EventKind) -> Self {
        LocalEvent { event, metric: None, value: None }
    }
    const fn on(event: EventKind, metric: Metric, value: Option<f64>) -> Self {
        LocalEvent { event, metric: Some(metric), value }
    }
}

/// At most this many events come out of one decision.
pub const MAX_EVENTS_PER_CYCLE: usize = 8;
/// Events produced by one decision.
pub type Events = heapless::Vec<LocalEvent, MAX_EVENTS_PER_CYCLE>;

/// The alarm state of one device.
#[derive(Debug, Clone)]
pub struct LocalAlarm {
    kind: DeviceKind,
    config: AlarmConfig,
    /// Metrics currently in alarm (at most the kind's metrics).
    alarming: heapless::Vec<Metric, 4>,
    gas_latched: bool,
    gas_pre_alarm: bool,
    valve_closed: bool,
    silenced_until_ms: Option<u64>,
    fault: Option<Metric>,
    low_battery: bool,
}

impl LocalAlarm {
    pub fn new(kind: DeviceKind, config: AlarmConfig) -> Self {
        LocalAlarm {
            kind,
            config,
            alarming: heapless::Vec::new(),
            gas_latched: false,
            gas_pre_alarm: false,
            valve_closed: false,
            silenced_until_ms: None,
            fault: None,
            low_battery: false,
        }
    }

    pub fn config(&self) -> &AlarmConfig {
        &self.config
    }

    /// Whether any alarm is active (latched or not).
    pub fn in_alarm(&self) -> bool {
        self.gas_latched || !self.alarming.is_empty()
    }

    pub fn valve_closed(&self) -> bool {
        self.valve_closed
    }

    pub fn fault(&self) -> Option<Metric> {
        self.fault
    }

    /// The outputs as they stand at `now_ms`.
    pub fn outputs(&self, now_ms: u64) -> Outputs {
        let silenced = self.silenced_until_ms.is_some_and(|until| now_ms < until);
        let sounding = self.gas_latched || self.gas_pre_alarm || !self.alarming.is_empty();
        Outputs { valve_closed: self.valve_closed, buzzer: sounding && !silenced }
    }

    /// Decides on one sample; new events go to `events`.
    pub fn update(&mut self, now_ms: u64, sample: &Sample, events: &mut Events) -> Outputs {
        self.update_fault(sample.faulted, events);
        self.update_battery(sample.battery_v, events);
        match self.kind {
            DeviceKind::GasDetector => self.update_gas(sample.values.get(Metric::GasLel), events),
            DeviceKind::SmokeDetector => {
                let c = self.config;
                self.update_level(Metric::SmokeDbM, sample.values.get(Metric::SmokeDbM), c.smoke_db_m, c.smoke_clear_db_m, events);
                self.update_level(Metric::TempC, sample.values.get(Metric::TempC), c.heat_c, c.heat_clear_c, events);
            }
            DeviceKind::SirenMount => {
                let c = self.config;
                self.update_level(Metric::TiltDeg, sample.values.get(Metric::TiltDeg), c.tilt_deg, c.tilt_clear_deg, events);
            }
        }
        self.outputs(now_ms)
    }

    fn update_fault(&mut self, faulted: Option<Metric>, events: &mut Events) {
        if faulted == self.fault {
            return;
        }
        if let Some(old) = self.fault {
            push(events, LocalEvent::on(EventKind::FaultCleared, old, None));
        }
        if let Some(new) = faulted {
            push(events, LocalEvent::on(EventKind::Fault, new, None));
        }
        self.fault = faulted;
    }

    fn update_battery(&mut self, battery_v: Option<f64>, events: &mut Events) {
        let Some(v) = battery_v else { return };
        if !self.low_battery && v < self.config.battery_floor_v {
            self.low_battery = true;
            push(events, LocalEvent::on(EventKind::LowBattery, Metric::BatteryV, Some(v)));
        } else if self.low_battery && v >= self.config.battery_rearm_v {
            self.low_battery = false;
        }
    }

    fn update_gas(&mut self, gas_lel: Option<f64>, events: &mut Events) {
        // A faulted gas sensor has no reading to trust; keep the current state.
        let Some(lel) = gas_lel else { return };
        self.gas_pre_alarm = lel >= self.config.gas_low_lel;
        if lel >= self.config.gas_high_lel && !self.gas_latched {
            self.gas_latched = true;
            push(events, LocalEvent::on(EventKind::Alarm, Metric::GasLel, Some(lel)));
            self.close_valve(events);
        }
    }

    /// A non-latching alarm on `metric` with a set point and a lower clear point.
    fn update_level(&mut self, metric: Metric, value: Option<f64>, set: f64, clear: f64, events: &mut Events) {
        let Some(v) = value else { return };
        let active = self.alarming.contains(&metric);
        if !active && v >= set {
            // Capacity is the kind's metric count, at most 4; a full list cannot miss this one.
            let _ = self.alarming.push(metric);
            push(events, LocalEvent::on(EventKind::Alarm, metric, Some(v)));
        } else if active && v < clear {
            self.alarming.retain(|m| *m != metric);
            push(events, LocalEvent::on(EventKind::AlarmCleared, metric, Some(v)));
        }
    }

    /// Closes the shut-off valve (gas alarm or the gateway's `close_valve`).
    pub fn close_valve(&mut self, events: &mut Events) {
        if self.kind == DeviceKind::GasDetector && !self.valve_closed {
            self.valve_closed = true;
            push(events, LocalEvent::on(EventKind::ValveClosed, Metric::ValveClosed, Some(1.0)));
        }
    }

    /// On-site reset of a latched gas alarm; refused while gas is still above the clear point.
    /// The valve stays closed: reopening it is a deliberate act ([`LocalAlarm::open_valve`]).
    pub fn reset(&mut self, gas_lel: Option<f64>, events: &mut Events) -> bool {
        if !self.gas_latched {
            return true;
        }
        match gas_lel {
            Some(lel) if lel < self.config.gas_clear_lel => {
                self.gas_latched = false;
                push(events, LocalEvent::on(EventKind::AlarmCleared, Metric::GasLel, Some(lel)));
                true
            }
            _ => false,
        }
    }

    /// Reopens the valve by hand; refused while the gas alarm is latched.
    pub fn open_valve(&mut self, events: &mut Events) -> bool {
        if self.gas_latched {
            return false;
        }
        if self.valve_closed {
            self.valve_closed = false;
            push(events, LocalEvent::on(EventKind::ValveOpened, Metric::ValveClosed, Some(0.0)));
        }
        true
    }

    /// Mutes the buzzer for `seconds` (or the default); alarms and the valve stay as they are.
    pub fn silence(&mut self, now_ms: u64, seconds: Option<u32>, events: &mut Events) {
        let seconds = seconds.unwrap_or(self.config.default_silence_s);
        self.silenced_until_ms = Some(now_ms.saturating_add(u64::from(seconds) * 1000));
        push(events, LocalEvent::bare(EventKind::Silenced));
    }

    /// Self-test: every sensor of the kind answers with a plausible reading and none is faulted.
    pub fn self_test(&self, sample: &Sample, events: &mut Events) -> bool {
        let all_present = self
            .kind
            .metrics()
            .iter()
            .filter(|m| **m != Metric::ValveClosed)
            .all(|m| sample.values.get(*m).is_some());
        let ok = all_present && sample.faulted.is_none();
        let event = if ok { EventKind::SelfTestOk } else { EventKind::SelfTestFailed };
        push(events, LocalEvent { event, metric: sample.faulted, value: None });
        ok
    }
}

/// Pushes an event; the list is sized for the worst cycle, so a full list means a logic error,
/// and the event is dropped rather than panicking on a device.
fn push(events: &mut Events, event: LocalEvent) {
    let _ = events.push(event);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gas(lel: f64) -> Sample {
        let mut s = Sample::default();
        s.values.set(Metric::GasLel, lel).expect("room");
        s
    }

    fn kinds(events: &Events) -> std::vec::Vec<EventKind> {
        events.iter().map(|e| e.event).collect()
    }

    #[test]
    fn gas_high_closes_the_valve_and_latches_until_reset() {
        let mut alarm = LocalAlarm::new(DeviceKind::GasDetector, AlarmConfig::default());
        let mut ev = Events::new();
        assert_eq!(alarm.update(0, &gas(5.0), &mut ev), Outputs::default());
        assert!(ev.is_empty());

        let out = alarm.update(1, &gas(25.0), &mut ev);
        assert_eq!(out, Outputs { valve_closed: false, buzzer: true }, "pre-alarm sounds only");
        assert!(ev.is_empty());

        let out = alarm.update(2, &gas(55.0), &mut ev);
        assert_eq!(out, Outputs { valve_closed: true, buzzer: true });
        assert_eq!(kinds(&ev), [EventKind::Alarm, EventKind::ValveClosed]);
        assert_eq!(ev[0].value, Some(55.0));

        ev.clear();
        let out = alarm.update(3, &gas(0.0), &mut ev);
        assert_eq!(out, Outputs { valve_closed: true, buzzer: true }, "latched after gas is gone");
        assert!(ev.is_empty(), "no repeat alarm");

        assert!(!alarm.reset(Some(30.0), &mut ev), "reset refused while gas is present");
        assert!(!alarm.open_valve(&mut ev), "valve stays shut while latched");
        assert!(alarm.reset(Some(2.0), &mut ev));
        assert_eq!(kinds(&ev), [EventKind::AlarmCleared]);
        assert_eq!(alarm.outputs(4), Outputs { valve_closed: true, buzzer: false });
        assert!(alarm.open_valve(&mut ev));
        assert_eq!(alarm.outputs(4), Outputs::default());
    }

    #[test]
    fn smoke_and_heat_alarm_with_hysteresis() {
        let mut alarm = LocalAlarm::new(DeviceKind::SmokeDetector, AlarmConfig::default());
        let mut ev = Events::new();
        let smoke = |db: f64, t: f64| {
            let mut s = Sample::default();
            s.values.set(Metric::SmokeDbM, db).expect("room");
            s.values.set(Metric::TempC, t).expect("room");
            s
        };
        alarm.update(0, &smoke(0.16, 20.0), &mut ev);
        assert_eq!(kinds(&ev), [EventKind::Alarm]);
        ev.clear();
        alarm.update(1, &smoke(0.12, 20.0), &mut ev);
        assert!(ev.is_empty(), "between clear and set: still alarming, no flap");
        assert!(alarm.outputs(1).buzzer);
        alarm.update(2, &smoke(0.05, 61.0), &mut ev);
        assert_eq!(kinds(&ev), [EventKind::AlarmCleared, EventKind::Alarm]);
        assert_eq!(ev[0].metric, Some(Metric::SmokeDbM));
        assert_eq!(ev[1].metric, Some(Metric::TempC));
        ev.clear();
        alarm.update(3, &smoke(0.0, 50.0), &mut ev);
        assert_eq!(kinds(&ev), [EventKind::AlarmCleared]);
        assert!(!alarm.in_alarm());
    }

    #[test]
    fn faults_and_battery_are_reported_once() {
        let mut alarm = LocalAlarm::new(DeviceKind::SirenMount, AlarmConfig::default());
        let mut ev = Events::new();
        let mut s = Sample { battery_v: Some(2.6), faulted: Some(Metric::TiltDeg), ..Sample::default() };
        alarm.update(0, &s, &mut ev);
        alarm.update(1, &s, &mut ev);
        assert_eq!(kinds(&ev), [EventKind::Fault, EventKind::LowBattery]);
        ev.clear();
        s.faulted = None;
        s.battery_v = Some(2.75);
        alarm.update(2, &s, &mut ev);
        assert_eq!(kinds(&ev), [EventKind::FaultCleared]);
        s.battery_v = Some(2.65);
        ev.clear();
        alarm.update(3, &s, &mut ev);
        assert!(ev.is_empty(), "below re-arm level: no second warning");
        s.battery_v = Some(2.9);
        alarm.update(4, &s, &mut ev);
        s.battery_v = Some(2.6);
        alarm.update(5, &s, &mut ev);
        assert_eq!(kinds(&ev), [EventKind::LowBattery]);
    }

    #[test]
    fn silence_mutes_the_buzzer_for_a_while_only() {
        let mut alarm = LocalAlarm::new(DeviceKind::GasDetector, AlarmConfig::default());
        let mut ev = Events::new();
        alarm.update(0, &gas(60.0), &mut ev);
        alarm.silence(1_000, Some(10), &mut ev);
        assert_eq!(alarm.outputs(5_000), Outputs { valve_closed: true, buzzer: false });
        assert_eq!(alarm.outputs(11_000), Outputs { valve_closed: true, buzzer: true });
    }

    #[test]
    fn self_test_needs_every_sensor() {
        let alarm = LocalAlarm::new(DeviceKind::GasDetector, AlarmConfig::default());
        let mut ev = Events::new();
        let mut s = gas(1.0);
        assert!(!alarm.self_test(&s, &mut ev), "temp_c missing");
        s.values.set(Metric::TempC, 20.0).expect("room");
        assert!(alarm.self_test(&s, &mut ev));
        assert_eq!(kinds(&ev), [EventKind::SelfTestFailed, EventKind::SelfTestOk]);
    }
}

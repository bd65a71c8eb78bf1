use super::*;
use crate::wire::{LinkState, Uplink};

/// A transport that records what it was given and can be taken down.
#[derive(Default)]
struct Recorder {
    down: bool,
    sent: std::vec::Vec<(std::string::String, std::vec::Vec<u8>, Qos, bool)>,
}

impl Transport for Recorder {
    type Error = ();
    fn is_connected(&self) -> bool {
        !self.down
    }
    fn publish(&mut self, m: Outgoing<'_>) -> Result<(), ()> {
        if self.down {
            return Err(());
        }
        self.sent.push((m.topic.into(), m.payload.to_vec(), m.qos, m.retain));
        Ok(())
    }
}

impl Recorder {
    fn uplinks(&self) -> std::vec::Vec<Uplink> {
        self.sent
            .iter()
            .map(|(topic, payload, _, _)| {
                let t = Topic::parse(topic).expect("topic");
                Uplink::decode(t.channel, payload).expect("decodes")
            })
            .collect()
    }
    fn seqs(&self) -> std::vec::Vec<u32> {
        self.uplinks().iter().filter_map(Uplink::seq).collect()
    }
}

fn config(kind: DeviceKind) -> DeviceConfig<'static> {
    DeviceConfig {
        site: "xuhui",
        device: "dev-1",
        kind,
        fw: "0.1.0",
        interval_s: 60,
        alarm: AlarmConfig::default(),
        telemetry_qos1: false,
    }
}

fn gas(lel: f64) -> Sample {
    let mut s = Sample { battery_v: Some(3.0), rssi_dbm: Some(-70.0), ..Sample::default() };
    s.values.set(Metric::GasLel, lel).expect("room");
    s.values.set(Metric::TempC, 21.0).expect("room");
    s
}

#[test]
fn connect_announces_a_retained_birth_and_the_will_is_offline() {
    let mut dev = Device::<8>::new(&config(DeviceKind::GasDetector)).expect("valid");
    let mut link = Recorder::default();
    dev.on_connect(&mut link);
    let (topic, payload, qos, retain) = &link.sent[0];
    assert_eq!(topic, "citywatch/v1/xuhui/dev-1/status");
    assert_eq!((*qos, *retain), (Qos::AtLeastOnce, true));
    assert_eq!(Status::decode(payload), Ok(Status::online(DeviceKind::GasDetector, "0.1.0", 60)));
    let mut buf = [0u8; 128];
    let n = dev.encode_will(&mut buf);
    assert_eq!(Status::decode(&buf[..n]).expect("will").state, LinkState::Offline);
}

#[test]
fn telemetry_on_interval_and_early_on_big_change() {
    let mut dev = Device::<8>::new(&config(DeviceKind::GasDetector)).expect("valid");
    let mut link = Recorder::default();
    dev.tick(0, &gas(1.0), &mut link);
    dev.tick(10_000, &gas(2.0), &mut link); // within deadband, before interval
    dev.tick(60_000, &gas(2.0), &mut link); // interval
    dev.tick(60_500, &gas(12.0), &mut link); // big change, but < 1 s since last
    dev.tick(61_000, &gas(12.0), &mut link); // big change, ≥ 1 s: early
    let uplinks = link.uplinks();
    let ts: std::vec::Vec<_> = uplinks
        .iter()
        .map(|u| match u {
            Uplink::Telemetry(t) => t.ts.expect("ts"),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(ts, [0, 60_000, 61_000]);
    assert_eq!(link.seqs(), [0, 1, 2]);
    match &uplinks[2] {
        Uplink::Telemetry(t) => {
            assert_eq!(t.values.get(Metric::GasLel), Some(12.0));
            assert_eq!(t.values.get(Metric::ValveClosed), Some(0.0), "valve position always reported");
            assert_eq!(t.battery_v, Some(3.0));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(link.sent.iter().all(|(_, _, qos, retain)| *qos == Qos::AtMostOnce && !retain));
}

#[test]
fn paced_telemetry_within_one_millisecond_gets_successive_times() {
    let mut dev = Device::<8>::new(&config(DeviceKind::GasDetector)).expect("valid");
    let mut link = Recorder::default();
    for _ in 0..3 {
        dev.tick_paced(5_000, &gas(1.0), &mut link);
    }
    dev.tick_paced(5_001, &gas(1.0), &mut link); // the clock is behind the times handed out
    dev.tick_paced(9_000, &gas(1.0), &mut link); // and catches up
    let ts: std::vec::Vec<u64> = link
        .uplinks()
        .iter()
        .filter_map(|u| match u {
            Uplink::Telemetry(t) => t.ts,
            _ => None,
        })
        .collect();
    assert_eq!(ts, [5_000, 5_001, 5_002, 5_003, 9_000]);
    assert_eq!(link.seqs(), [0, 1, 2, 3, 4]);
}

#[test]
fn gas_high_sends_alarm_and_valve_events_at_once_with_shared_seq() {
    let mut dev = Device::<8>::new(&config(DeviceKind::GasDetector)).expect("valid");
    let mut link = Recorder::default();
    dev.tick(0, &gas(1.0), &mut link);
    let out = dev.tick(500, &gas(55.0), &mut link);
    assert!(out.valve_closed && out.buzzer);
    let kinds: std::vec::Vec<_> = link
        .uplinks()
        .iter()
        .filter_map(|u| match u {
            Uplink::Event(e) => Some(e.event),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, [EventKind::Alarm, EventKind::ValveClosed]);
    assert_eq!(link.seqs(), [0, 1, 2], "events share the telemetry sequence");
    assert!(link.sent[1..].iter().all(|(_, _, qos, _)| *qos == Qos::AtLeastOnce));
}

#[test]
fn link_down_buffers_and_replays_in_order_with_original_ts() {
    let mut dev = Device::<4>::new(&DeviceConfig { interval_s: 1, ..config(DeviceKind::GasDetector) }).expect("valid");
    let mut link = Recorder::default();
    dev.tick(0, &gas(1.0), &mut link);
    link.down = true;
    for i in 1..=6u64 {
        dev.tick(i * 1000, &gas(1.0), &mut link);
    }
    assert_eq!(dev.pending(), 4);
    assert_eq!(dev.stats().dropped, 2, "ring of 4 held 6: two oldest dropped");
    link.down = false;
    dev.on_connect(&mut link);
    dev.tick(7_000, &gas(1.0), &mut link);
    assert_eq!(dev.pending(), 0);
    let replay: std::vec::Vec<(u32, u64)> = link
        .uplinks()
        .iter()
        .filter_map(|u| match u {
            Uplink::Telemetry(t) => Some((t.seq, t.ts.expect("ts"))),
            _ => None,
        })
        .collect();
    assert_eq!(replay, [(0, 0), (3, 3_000), (4, 4_000), (5, 5_000), (6, 6_000), (7, 7_000)]);
}

#[test]
fn commands_act_and_are_acknowledged() {
    let mut dev = Device::<8>::new(&config(DeviceKind::GasDetector)).expect("valid");
    let mut link = Recorder::default();
    let out = dev
        .handle_command(5, br#"{"id":"c-1","cmd":"close_valve"}"#, &gas(1.0), &mut link)
        .expect("valid command");
    assert!(out.valve_closed);
    dev.handle_command(6, br#"{"id":"c-2","cmd":"set_interval","arg":15}"#, &gas(1.0), &mut link)
        .expect("valid command");
    assert_eq!(dev.interval_s(), 15);
    let uplinks = link.uplinks();
    let summary: std::vec::Vec<_> = uplinks
        .iter()
        .map(|u| match u {
            Uplink::Event(e) => (e.event.as_str(), e.id.as_deref().map(std::string::String::from)),
            Uplink::Status(s) => ("status", s.interval_s.map(|i| i.to_string())),
            Uplink::Telemetry(_) => ("telemetry", None),
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("valve_closed", None),
            ("cmd_ack", Some("c-1".into())),
            ("status", Some("15".into())),
            ("cmd_ack", Some("c-2".into())),
        ]
    );
    assert_eq!(
        dev.handle_command(7, br#"{"id":"c-3","cmd":"reboot"}"#, &gas(1.0), &mut link),
        Err(DecodeError::UnknownCommand)
    );
}

#[test]
fn reset_then_open_valve_after_the_gas_is_gone() {
    let mut dev = Device::<8>::new(&config(DeviceKind::GasDetector)).expect("valid");
    let mut link = Recorder::default();
    dev.tick(0, &gas(70.0), &mut link);
    assert!(!dev.reset(1, &gas(40.0), &mut link));
    assert!(dev.reset(2, &gas(3.0), &mut link));
    assert!(dev.open_valve(3, &mut link));
    let out = dev.tick(4, &gas(3.0), &mut link);
    assert!(!out.valve_closed && !out.buzzer);
}

#[test]
fn invalid_ids_are_refused() {
    let bad = DeviceConfig { device: "a/b", ..config(DeviceKind::SirenMount) };
    assert_eq!(Device::<2>::new(&bad).err(), Some(DecodeError::BadTopic));
}

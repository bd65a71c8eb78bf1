//! edge-sim against a real Mosquitto: every message a simulated fleet publishes is checked
//! against the wire contract (SPEC §3) by a real subscriber, per scenario.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use citywatch_edge::wire::{Channel, DecodeError, DeviceKind, EventKind, LinkState, Metric, Topic, Uplink};
use citywatch_tests::{spawn_edge_sim, ChildGuard, Mosquitto, QoS, Received, Subscriber};
use serde_json::Value;

/// Waits for edge-sim to finish its `--duration` and returns its JSON summary.
async fn finish(sim: &mut ChildGuard, within: Duration) -> Value {
    let status = sim.wait_timeout(within).await.expect("waiting for edge-sim").expect("edge-sim exits after --duration");
    assert!(status.success(), "edge-sim failed: {}", sim.logs());
    let stdout = sim.stdout();
    let line = stdout.lines().last().expect("edge-sim prints a summary");
    serde_json::from_str(line).expect("summary is JSON")
}

fn count(summary: &Value, key: &str) -> u64 {
    summary[key].as_u64().unwrap_or_else(|| panic!("summary has no {key}: {summary}"))
}

/// Decoded messages of one device, in arrival order.
#[derive(Debug, Default)]
struct DeviceLog {
    kind: Option<DeviceKind>,
    uplinks: Vec<(Uplink, bool)>,
}

/// Checks every message against the contract and groups them by device.
fn check_contract(messages: &[Received]) -> BTreeMap<String, DeviceLog> {
    let mut devices: BTreeMap<String, DeviceLog> = BTreeMap::new();
    for m in messages {
        let topic = Topic::parse(&m.topic).unwrap_or_else(|e| panic!("{}: {e}", m.topic));
        let uplink = Uplink::decode(topic.channel, &m.payload)
            .unwrap_or_else(|e| panic!("{} {:?}: {e}", m.topic, m.payload_str()));
        if let (Uplink::Status(_) | Uplink::Event(_), QoS::AtMostOnce) = (&uplink, m.qos) {
            panic!("{} must be QoS 1", m.topic);
        }
        let log = devices.entry(topic.device.to_owned()).or_default();
        if let Uplink::Status(s) = &uplink {
            let kind = s.kind.expect("the simulator always names its kind");
            assert!(log.kind.is_none_or(|k| k == kind), "{} changed kind", topic.device);
            log.kind = Some(kind);
        }
        log.uplinks.push((uplink, m.retain));
    }
    for (device, log) in &devices {
        let kind = log.kind.unwrap_or_else(|| panic!("{device} sent no status"));
        let mut last_seq: Option<u32> = None;
        for (uplink, _) in &log.uplinks {
            if let Uplink::Telemetry(t) = uplink {
                assert!(t.ts.is_some(), "{device}: telemetry without ts");
                for (metric, value) in t.values.iter() {
                    assert!(kind.has_metric(metric), "{device}: {metric} is not a {kind} metric");
                    assert!(value.is_finite());
                }
                assert!(t.battery_v.is_some_and(|v| (2.0..4.5).contains(&v)), "{device}: battery {:?}", t.battery_v);
            }
            if let Some(seq) = uplink.seq() {
                if let Some(last) = last_seq {
                    assert!(seq > last, "{device}: seq {seq} after {last}");
                }
                last_seq = Some(seq);
            }
        }
    }
    devices
}

fn events(log: &DeviceLog) -> Vec<(EventKind, Option<Metric>, Option<f64>)> {
    log.uplinks
        .iter()
        .filter_map(|(u, _)| match u {
            Uplink::Event(e) => Some((e.event, e.metric, e.value)),
            _ => None,
        })
        .collect()
}

fn link_states(log: &DeviceLog) -> Vec<LinkState> {
    log.uplinks
        .iter()
        .filter_map(|(u, _)| match u {
            Uplink::Status(s) => Some(s.state),
            _ => None,
        })
        .collect()
}

fn seqs(log: &DeviceLog) -> Vec<u32> {
    log.uplinks.iter().filter_map(|(u, _)| u.seq()).collect()
}

fn received_counts(devices: &BTreeMap<String, DeviceLog>) -> (u64, u64) {
    let mut telemetry = 0;
    let mut events = 0;
    for log in devices.values() {
        for (u, _) in &log.uplinks {
            match u.channel() {
                Channel::Telemetry => telemetry += 1,
                Channel::Event => events += 1,
                _ => {}
            }
        }
    }
    (telemetry, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gas_leak_fleet_follows_the_contract_and_answers_commands() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let mut sub = Subscriber::connect(&broker.addr(), "citywatch/#", QoS::AtLeastOnce).await.expect("subscriber");
    let mut sim = spawn_edge_sim(&[
        "--broker", &broker.addr(), "--devices", "6", "--site", "e2e-leak",
        "--scenario", "gas-leak", "--interval", "1", "--duration", "32",
    ]);

    // A command, as the gateway would send it, to a smoke detector once it is online.
    let smoke = "e2e-leak-smoke-00001";
    let online = format!("citywatch/v1/e2e-leak/{smoke}/status");
    let mut early = sub.collect_until(std::time::Instant::now() + Duration::from_secs(10), |got| got.iter().any(|m| m.topic == online)).await;
    assert!(early.iter().any(|m| m.topic == online), "{smoke} never came online");
    sub.client()
        .publish(format!("citywatch/v1/e2e-leak/{smoke}/cmd"), QoS::AtLeastOnce, false, br#"{"id":"c-e2e-1","cmd":"self_test"}"#.to_vec())
        .await
        .expect("publish cmd");

    let summary = finish(&mut sim, Duration::from_secs(60)).await;
    early.extend(sub.collect_for(Duration::from_secs(1)).await);
    let messages: Vec<_> = early.into_iter().filter(|m| !m.topic.ends_with("/cmd")).collect();
    let devices = check_contract(&messages);
    assert_eq!(devices.len(), 6, "{:?}", devices.keys().collect::<Vec<_>>());

    // Nothing lost between the simulator and the subscriber.
    let (telemetry, event_count) = received_counts(&devices);
    assert_eq!(telemetry, count(&summary, "telemetry"), "{summary}");
    assert_eq!(event_count, count(&summary, "events"), "{summary}");
    assert_eq!(count(&summary, "lost"), 0);

    // Every gas detector leaked past 50 %LEL: alarm with the reading, then its valve closed.
    for (device, log) in devices.iter().filter(|(_, l)| l.kind == Some(DeviceKind::GasDetector)) {
        let ev = events(log);
        let alarm = ev.iter().position(|e| e.0 == EventKind::Alarm).unwrap_or_else(|| panic!("{device}: no alarm in {ev:?}"));
        assert_eq!(ev[alarm].1, Some(Metric::GasLel));
        assert!(ev[alarm].2.is_some_and(|v| v >= 50.0), "{device}: {:?}", ev[alarm]);
        assert_eq!(ev.get(alarm + 1).map(|e| e.0), Some(EventKind::ValveClosed), "{device}: {ev:?}");
        let closed_reported = log.uplinks.iter().any(|(u, _)| matches!(u, Uplink::Telemetry(t) if t.values.get(Metric::ValveClosed) == Some(1.0)));
        assert!(closed_reported, "{device}: telemetry never showed the valve closed");
        let rising: Vec<f64> = log
            .uplinks
            .iter()
            .filter_map(|(u, _)| match u {
                Uplink::Telemetry(t) => t.values.get(Metric::GasLel),
                _ => None,
            })
            .collect();
        assert!(rising.iter().any(|v| (20.0..50.0).contains(v)), "{device}: the ramp skipped the 20 %LEL band: {rising:?}");
    }

    // The commanded detector tested itself and acknowledged the command by id.
    let smoke_events: Vec<_> = devices[smoke]
        .uplinks
        .iter()
        .filter_map(|(u, _)| match u {
            Uplink::Event(e) => Some((e.event, e.id.as_deref().map(str::to_owned))),
            _ => None,
        })
        .collect();
    assert!(smoke_events.contains(&(EventKind::SelfTestOk, None)), "{smoke_events:?}");
    assert!(smoke_events.contains(&(EventKind::CmdAck, Some("c-e2e-1".into()))), "{smoke_events:?}");

    // Births are retained-capable status messages, and the deliberate stop says offline.
    for (device, log) in &devices {
        let states = link_states(log);
        assert_eq!(states.first(), Some(&LinkState::Online), "{device}");
        assert_eq!(states.last(), Some(&LinkState::Offline), "{device}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_scenario_replays_every_buffered_reading_after_reconnect() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let mut sub = Subscriber::connect(&broker.addr(), "citywatch/#", QoS::AtLeastOnce).await.expect("subscriber");
    let mut sim = spawn_edge_sim(&[
        "--broker", &broker.addr(), "--devices", "3", "--site", "e2e-off", "--scenario", "offline",
        "--interval", "1", "--offline-after", "3", "--offline-for", "6", "--duration", "14",
    ]);
    let summary = finish(&mut sim, Duration::from_secs(60)).await;
    let messages = sub.collect_for(Duration::from_secs(1)).await;
    let devices = check_contract(&messages);
    assert_eq!(devices.len(), 3);
    assert!(count(&summary, "buffered") > 0, "nothing was buffered: {summary}");
    assert_eq!(count(&summary, "ring_dropped"), 0);
    assert_eq!(count(&summary, "link_drops"), 3);

    for (device, log) in &devices {
        // online → offline (the will, sent by the broker) → online → offline (goodbye).
        let states = link_states(log);
        assert_eq!(states, [LinkState::Online, LinkState::Offline, LinkState::Online, LinkState::Offline], "{device}");

        // No seq missing: the outage's readings were replayed.
        let seqs = seqs(log);
        let expected: Vec<u32> = (0..seqs.len() as u32).collect();
        assert_eq!(seqs, expected, "{device}");

        // Readings taken while down arrived after the second birth, with their original ts.
        let reborn = log
            .uplinks
            .iter()
            .enumerate()
            .filter(|(_, (u, _))| matches!(u, Uplink::Status(s) if s.state == LinkState::Online))
            .nth(1)
            .map(|(i, _)| i)
            .expect("second birth");
        let mut ts_after: Vec<u64> = log.uplinks[reborn..]
            .iter()
            .filter_map(|(u, _)| match u {
                Uplink::Telemetry(t) => t.ts,
                _ => None,
            })
            .collect();
        let last_before = log.uplinks[..reborn]
            .iter()
            .filter_map(|(u, _)| match u {
                Uplink::Telemetry(t) => t.ts,
                _ => None,
            })
            .max()
            .expect("readings before the outage");
        let replayed = ts_after.iter().filter(|ts| **ts > last_before).count();
        assert!(replayed >= 4, "{device}: only {replayed} readings after the outage");
        let first_after = ts_after.remove(0);
        assert!(first_after - last_before < 2_500, "{device}: replay starts {} ms after the last live reading", first_after - last_before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_each_rejected_for_the_labelled_reason() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let mut sub = Subscriber::connect(&broker.addr(), "citywatch/#", QoS::AtLeastOnce).await.expect("subscriber");
    let mut sim = spawn_edge_sim(&[
        "--broker", &broker.addr(), "--devices", "3", "--site", "e2e-bad", "--scenario", "bad-payloads",
        "--interval", "1", "--duration", "10",
    ]);
    let summary = finish(&mut sim, Duration::from_secs(60)).await;
    let messages = sub.collect_for(Duration::from_secs(1)).await;

    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut good = Vec::new();
    for m in messages {
        match Topic::parse(&m.topic).and_then(|t| Uplink::decode(t.channel, &m.payload)) {
            Ok(_) => good.push(m),
            Err(e) => *rejected.entry(e.reason().to_owned()).or_default() += 1,
        }
    }
    let labelled: BTreeMap<String, u64> = serde_json::from_value(summary["bad"].clone()).expect("bad counts");
    assert!(labelled.len() >= 7, "every kind of bad message was sent: {labelled:?}");
    assert_eq!(rejected, labelled, "what the contract rejects is exactly what was sent as bad");
    for reason in ["not_json", "non_finite", "wrong_type", "oversize", "unknown_kind", "unknown_metric", "bad_topic"] {
        assert!(labelled.contains_key(reason), "{reason} missing from {labelled:?}");
    }
    assert!(!DecodeError::ALL.is_empty());

    // The good ones kept flowing, in order.
    let devices = check_contract(&good);
    assert_eq!(devices.len(), 3);
    let (telemetry, _) = received_counts(&devices);
    assert_eq!(telemetry, count(&summary, "telemetry"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_scenario_alarms_two_detectors_of_one_site() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let mut sub = Subscriber::connect(&broker.addr(), "citywatch/+/+/+/event", QoS::AtLeastOnce).await.expect("subscriber");
    let mut sim = spawn_edge_sim(&[
        "--broker", &broker.addr(), "--devices", "6", "--site", "e2e-fire", "--scenario", "fire",
        "--interval", "1", "--duration", "16",
    ]);
    finish(&mut sim, Duration::from_secs(60)).await;
    let messages = sub.collect_for(Duration::from_secs(1)).await;
    let mut alarms: HashMap<String, Vec<u64>> = HashMap::new();
    for m in &messages {
        let topic = Topic::parse(&m.topic).expect("topic");
        let Ok(Uplink::Event(e)) = Uplink::decode(topic.channel, &m.payload) else { panic!("bad event {}", m.payload_str()) };
        if e.event == EventKind::Alarm {
            assert!(topic.device.contains("-smoke-"), "only smoke detectors burn: {}", topic.device);
            alarms.entry(topic.device.to_owned()).or_default().push(e.ts.expect("ts"));
        }
    }
    assert_eq!(alarms.len(), 2, "{alarms:?}");
    let firsts: Vec<u64> = alarms.values().map(|ts| *ts.iter().min().expect("one")).collect();
    assert!(firsts[0].abs_diff(firsts[1]) <= 60_000, "two signals within 60 s: {firsts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generator_delivers_every_paced_message_over_few_connections() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let mut sub = Subscriber::connect(&broker.addr(), "citywatch/+/+/+/telemetry", QoS::AtMostOnce).await.expect("subscriber");
    let mut sim = spawn_edge_sim(&[
        "--broker", &broker.addr(), "--devices", "90", "--site", "e2e-load", "--rate", "3000",
        "--connections", "3", "--duration", "4",
    ]);
    let summary = finish(&mut sim, Duration::from_secs(60)).await;
    let sent = count(&summary, "telemetry");
    let messages = sub.collect_until(std::time::Instant::now() + Duration::from_secs(10), |got| got.len() as u64 >= sent).await;
    assert_eq!(messages.len() as u64, sent, "{summary}");
    assert!(sent >= 3000, "a 4 s run at 3000/s sent only {sent}");
    let mut per_device: HashMap<String, Vec<u32>> = HashMap::new();
    for m in &messages {
        let topic = Topic::parse(&m.topic).expect("topic");
        let Ok(Uplink::Telemetry(t)) = Uplink::decode(Channel::Telemetry, &m.payload) else { panic!("bad telemetry") };
        per_device.entry(topic.device.to_owned()).or_default().push(t.seq);
    }
    assert_eq!(per_device.len(), 90, "round-robin reaches every device");
    for (device, seqs) in per_device {
        assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{device}: {seqs:?}");
    }
}

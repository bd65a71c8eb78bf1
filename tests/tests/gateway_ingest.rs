//! The gateway as a real process, fed by edge-sim through a real broker (Mosquitto, external
//! mode) or through its own embedded broker: what a fleet publishes is what the API returns.

use std::collections::BTreeMap;
use std::time::Duration;

use citywatch_edge::wire::{Channel, Metric, Topic, Uplink};
use citywatch_tests::{spawn_edge_sim, ChildGuard, GatewayProcess, Mosquitto, QoS, Received, Subscriber};
use serde_json::Value;

/// Telemetry as a device sent it: (ts, value of `metric`), per device, in arrival order. A copy
/// the subscriber got twice (QoS 1 redelivery) counts once; two values at one time fail here,
/// since the store keeps one reading per device, metric and millisecond (edge-sim stamps each
/// paced reading after the last).
fn telemetry_by_device(messages: &[Received], metric: Metric) -> BTreeMap<String, Vec<(i64, f64)>> {
    let mut out: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    let mut seen: BTreeMap<(String, i64), f64> = BTreeMap::new();
    for m in messages {
        let Ok(topic) = Topic::parse(&m.topic) else { continue };
        if topic.channel != Channel::Telemetry {
            continue;
        }
        let Ok(Uplink::Telemetry(t)) = Uplink::decode(Channel::Telemetry, &m.payload) else { continue };
        let value = if metric == Metric::BatteryV { t.battery_v } else { t.values.get(metric) };
        if let Some(v) = value {
            let ts = t.ts.expect("edge-sim sends ts") as i64;
            match seen.insert((topic.device.to_owned(), ts), v) {
                Some(before) if before.to_bits() == v.to_bits() => continue,
                Some(before) => panic!("{}: two readings at ts {ts} ({before} and {v}): the store keeps one", topic.device),
                None => out.entry(topic.device.to_owned()).or_default().push((ts, v)),
            }
        }
    }
    out
}

async fn finish(sim: &mut ChildGuard) -> Value {
    let status = sim.wait_timeout(Duration::from_secs(90)).await.expect("wait").expect("edge-sim ends after --duration");
    assert!(status.success(), "edge-sim: {}", sim.logs());
    serde_json::from_str(sim.stdout().lines().last().expect("summary")).expect("summary JSON")
}

fn readings(gw: &GatewayProcess, device: &str, metric: &str, from: i64, to: i64, step: Option<&str>) -> Value {
    let step = step.map(|s| format!("&step={s}")).unwrap_or_default();
    gw.get(&format!("/api/v1/devices/{device}/readings?metric={metric}&from={from}&to={to}{step}")).expect("readings")
}

/// Waits until the store holds, for every device, as many readings of `metric` as were sent.
async fn wait_until_stored(gw: &GatewayProcess, sent: &BTreeMap<String, Vec<(i64, f64)>>, metric: &str, within: Duration) {
    for (device, points) in sent {
        let from = points.iter().map(|p| p.0).min().expect("points") - 1;
        let to = points.iter().map(|p| p.0).max().expect("points") + 1;
        let want = points.len() as u64;
        let what = format!("{want} {metric} readings of {device}");
        let stored = citywatch_tests::wait_for(&what, within, || {
            let got = readings(gw, device, metric, from, to, None)["count"].as_u64().unwrap_or(0);
            (got >= want).then_some(())
        })
        .await;
        if let Err(e) = stored {
            // Short, not slow: what the gateway counted, for the cause (duplicates by seq,
            // gaps, rejections, drops) — every device's shortfall and the ingest counters.
            let short: Vec<String> = sent
                .iter()
                .filter_map(|(d, p)| {
                    let got = readings(gw, d, metric, from, to, None)["count"].as_u64().unwrap_or(0);
                    (got < p.len() as u64).then(|| format!("{d}: {got} of {}", p.len()))
                })
                .collect();
            let metrics = gw.get_text("/metrics").unwrap_or_default();
            let counters: Vec<&str> = metrics
                .lines()
                .filter(|l| !l.starts_with('#') && ["duplicate", "gap", "rejected", "dropped", "messages_total", "acks", "time_taken"].iter().any(|k| l.contains(k)))
                .collect();
            panic!("{e}\nshort: {short:?}\n{}\n{}", counters.join("\n"), citywatch_tests::tail(&gw.logs(), 40));
        }
        let got = readings(gw, device, metric, from, to, None)["count"].as_u64();
        assert_eq!(got, Some(want), "{device}: exactly what was sent, no duplicates");
    }
}

/// The shared body of the two ingest tests: values and downsampling match what was sent.
async fn fleet_round_trip(gw: &GatewayProcess, broker: &str, site: &str) {
    let mut sub = Subscriber::connect(broker, "citywatch/v1/+/+/telemetry", QoS::AtLeastOnce).await.expect("subscriber");
    let mut sim = spawn_edge_sim(&["--broker", broker, "--devices", "6", "--site", site, "--interval", "1", "--duration", "8"]);
    finish(&mut sim).await;
    let messages = sub.collect_for(Duration::from_secs(1)).await;
    let sent = telemetry_by_device(&messages, Metric::TempC);
    assert_eq!(sent.len(), 4, "gas and smoke detectors report temp_c: {:?}", sent.keys());
    wait_until_stored(gw, &sent, "temp_c", Duration::from_secs(30)).await;

    for (device, points) in &sent {
        let from = points.iter().map(|p| p.0).min().expect("points");
        let to = points.iter().map(|p| p.0).max().expect("points") + 1;
        // Raw: same values at the same times.
        let raw = readings(gw, device, "temp_c", from, to, None);
        let got: Vec<(i64, f64)> = raw["points"]
            .as_array()
            .expect("points")
            .iter()
            .map(|p| (p["ts_ms"].as_i64().expect("ts"), p["last"].as_f64().expect("value")))
            .collect();
        let mut want = points.clone();
        want.sort_by_key(|p| p.0);
        assert_eq!(got, want, "{device}");
        // Downsampled in 3 s steps: min/max/avg/last/count per bucket as computed here.
        let step = 3_000;
        let body = readings(gw, device, "temp_c", from, to, Some("3s"));
        let mut buckets: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for (ts, v) in &want {
            buckets.entry(from + (ts - from) / step * step).or_default().push(*v);
        }
        let points = body["points"].as_array().expect("points");
        assert_eq!(points.len(), buckets.len(), "{device}: {body}");
        for (p, (start, values)) in points.iter().zip(&buckets) {
            assert_eq!(p["ts_ms"].as_i64(), Some(*start));
            assert_eq!(p["count"].as_u64(), Some(values.len() as u64));
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let avg = values.iter().sum::<f64>() / values.len() as f64;
            assert_eq!(p["min"].as_f64(), Some(min));
            assert_eq!(p["max"].as_f64(), Some(max));
            assert!((p["avg"].as_f64().expect("avg") - avg).abs() < 1e-9);
            assert_eq!(p["last"].as_f64(), values.last().copied());
        }
    }
    // Every device registered from its birth, with kind and interval.
    let devices = gw.get(&format!("/api/v1/devices?site={site}")).expect("devices");
    assert_eq!(devices["count"], 6, "{devices}");
    for d in devices["devices"].as_array().expect("list") {
        assert_eq!(d["interval_s"], 1);
        assert_eq!(d["seq_gaps"], 0, "{d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_mode_stores_what_the_fleet_sends_through_mosquitto() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let gw = GatewayProcess::start_external(&broker.addr(), "").await.expect("gateway");
    fleet_round_trip(&gw, &broker.addr(), "gw-ext").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mode_stores_what_the_fleet_sends_to_the_gateway_itself() {
    let gw = GatewayProcess::start_embedded("").await.expect("gateway");
    let broker = gw.mqtt_addr().expect("embedded broker").to_owned();
    fleet_round_trip(&gw, &broker, "gw-emb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_devices_go_offline_then_online_and_their_replay_keeps_its_timestamps() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let gw = GatewayProcess::start_external(&broker.addr(), "").await.expect("gateway");
    let mut sub = Subscriber::connect(&broker.addr(), "citywatch/v1/+/+/telemetry", QoS::AtLeastOnce).await.expect("subscriber");
    let mut sim = spawn_edge_sim(&[
        "--broker", &broker.addr(), "--devices", "3", "--site", "gw-off", "--scenario", "offline", "--interval", "1",
        "--offline-after", "3", "--offline-for", "8", "--duration", "16",
    ]);
    let device = "gw-off-gas-00000";
    gw.wait_for(Duration::from_secs(10), "the device online", |gw| {
        (gw.get(&format!("/api/v1/devices/{device}")).ok()?["health"] == "online").then_some(())
    })
    .await;
    let went_offline_at = gw
        .wait_for(Duration::from_secs(10), "the will to mark it offline", |gw| {
            let d = gw.get(&format!("/api/v1/devices/{device}")).ok()?;
            (d["health"] == "offline" && d["link"] == "offline").then(citywatch_edge::sim::fleet::wall_ms)
        })
        .await as i64;
    gw.wait_for(Duration::from_secs(15), "the device back online", |gw| {
        (gw.get(&format!("/api/v1/devices/{device}")).ok()?["health"] == "online").then_some(())
    })
    .await;
    finish(&mut sim).await;
    let messages = sub.collect_for(Duration::from_secs(1)).await;
    let sent = telemetry_by_device(&messages, Metric::BatteryV);
    assert_eq!(sent.len(), 3);
    wait_until_stored(&gw, &sent, "battery_v", Duration::from_secs(30)).await;
    // Readings taken during the outage are stored under the time they were taken.
    let points = &sent[device];
    let from = points.iter().map(|p| p.0).min().expect("points");
    let body = readings(&gw, device, "battery_v", from, from + 60_000, None);
    let during: Vec<i64> = body["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|p| p["ts_ms"].as_i64())
        .filter(|ts| *ts > went_offline_at && *ts < went_offline_at + 5_000)
        .collect();
    assert!(during.len() >= 3, "readings from inside the outage, with their own timestamps: {during:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_counted_and_quarantined_while_good_ones_flow() {
    let gw = GatewayProcess::start_embedded("").await.expect("gateway");
    let broker = gw.mqtt_addr().expect("embedded broker").to_owned();
    let mut sub = Subscriber::connect(&broker, "citywatch/v1/+/+/telemetry", QoS::AtLeastOnce).await.expect("subscriber");
    let mut sim = spawn_edge_sim(&["--broker", &broker, "--devices", "3", "--site", "gw-bad", "--scenario", "bad-payloads", "--interval", "1", "--duration", "9"]);
    let summary = finish(&mut sim).await;
    let messages = sub.collect_for(Duration::from_secs(1)).await;
    let sent_bad: BTreeMap<String, u64> = serde_json::from_value(summary["bad"].clone()).expect("bad counts");
    assert!(sent_bad.len() >= 7, "{sent_bad:?}");

    // Every bad message counted under its reason, and kept with its bytes.
    let expected_total: u64 = sent_bad.values().sum();
    let q = gw
        .wait_for(Duration::from_secs(20), "every bad message quarantined", |gw| {
            let q = gw.get("/api/v1/quarantine?limit=1000").ok()?;
            let total: u64 = q["counts"].as_object()?.values().filter_map(Value::as_u64).sum();
            (total >= expected_total).then_some(q)
        })
        .await;
    let counted: BTreeMap<String, u64> = serde_json::from_value(q["counts"].clone()).expect("counts");
    assert_eq!(counted, sent_bad);
    let oversize = q["entries"].as_array().expect("entries").iter().find(|e| e["reason"] == "oversize").expect("an oversize entry");
    assert!(oversize["payload_len"].as_u64().expect("len") > 1024);
    let metrics = gw.get_text("/metrics").expect("metrics");
    for (reason, n) in &sent_bad {
        assert!(metrics.contains(&format!("citywatch_messages_rejected_total{{reason=\"{reason}\"}} {n}")), "{reason} {n}\n{metrics}");
    }
    // The good ones kept flowing, all of them.
    let good = telemetry_by_device(&messages, Metric::BatteryV);
    assert_eq!(good.len(), 3);
    wait_until_stored(&gw, &good, "battery_v", Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let mut gw = GatewayProcess::start_external(&broker.addr(), "").await.expect("gateway");
    let mut sub = Subscriber::connect(&broker.addr(), "citywatch/v1/+/+/telemetry", QoS::AtLeastOnce).await.expect("subscriber");
    let mut sim = spawn_edge_sim(&[
        "--broker", &broker.addr(), "--devices", "30", "--site", "gw-kill", "--rate", "1500", "--connections", "2",
        "--telemetry-qos1", "--duration", "10",
    ]);
    // Under load: kill -9, stay down a moment (the broker queues for the persistent session), restart.
    gw.wait_for(Duration::from_secs(10), "load flowing into the store", |gw| {
        let h = gw.get("/api/v1/health").ok()?;
        (h["store"]["readings_written"].as_u64()? > 2_000).then_some(())
    })
    .await;
    gw.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    gw.restart().await.expect("restart after SIGKILL");
    finish(&mut sim).await;
    let messages = sub.collect_for(Duration::from_secs(1)).await;
    let sent = telemetry_by_device(&messages, Metric::BatteryV);
    assert_eq!(sent.len(), 30);
    let total: usize = sent.values().map(Vec::len).sum();
    assert!(total >= 10_000, "enough load: {total}");
    wait_until_stored(&gw, &sent, "battery_v", Duration::from_secs(60)).await;
}

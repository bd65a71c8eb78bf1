//! Cluster mode with a long-term store (issue 17 item 7, SPEC §9): a device's readings reach back
//! past a failover. Three nats-server nodes, a real VictoriaMetrics, two gateways writing every
//! reading to it (`[storage.influx]`) and reading history back from it (`history_url`). A gas
//! detector at a site gw-a owns reports; gw-a is SIGKILLed; gw-b, whose own store starts at its
//! takeover, answers the device's readings with what gw-a took in (from VictoriaMetrics) and
//! what it took in since (its store), each reading once, raw and per step.

use std::time::Duration;

use citywatch_gateway::cluster::nats_config::partition_of;
use citywatch_tests::figures::{cluster_status, partition_owners};
use citywatch_tests::{birth, device_topic, wait_for, GatewayProcess, NatsCluster, Publisher, VictoriaMetrics};
use serde_json::{json, Value};

const PARTITIONS: u16 = 8;
const SETTLE: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// `GET …/readings` of `device` through `gateway`: (ts ms, last, count) of each point, and the
/// answer's `long_term` part.
fn readings(gateway: &GatewayProcess, device: &str, query: &str) -> Option<(Vec<(i64, f64, u64)>, Value)> {
    let answer = gateway.get(&format!("/api/v1/devices/{device}/readings?metric=gas_lel&{query}")).ok()?;
    let points = answer["points"].as_array()?.iter().map(|p| (p["ts_ms"].as_i64().unwrap_or(0), p["last"].as_f64().unwrap_or(f64::NAN), p["count"].as_u64().unwrap_or(0))).collect();
    Some((points, answer["long_term"].clone()))
}

async fn telemetry(publisher: &mut Publisher, site: &str, device: &str, seq: u32, ts: i64, sent: &mut u64) {
    let body = json!({"seq": seq, "ts": ts, "values": {"gas_lel": f64::from(seq)}});
    publisher.publish_json(&device_topic(site, device, "telemetry"), false, &body).await.expect("telemetry");
    *sent += 1;
    publisher.wait_acked(*sent, SETTLE).await.expect("PUBACK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_readings_reach_back_past_a_failover_from_the_long_term_store() {
    let vm = VictoriaMetrics::start().await.expect("victoria-metrics");
    let nats = NatsCluster::start(3, PARTITIONS).await.expect("3-node NATS cluster");
    let influx = format!(
        "[storage.influx]\nurl = \"{0}\"\nhistory_url = \"{0}\"\nflush_interval = \"100ms\"\ntimeout = \"2s\"\nretry_min = \"100ms\"\nretry_max = \"500ms\"\n",
        vm.url()
    );
    let mut gateways = Vec::new();
    for name in ["gw-a", "gw-b"] {
        gateways.push(GatewayProcess::start_cluster(&format!("{}{influx}", nats.gateway_section(name, PARTITIONS, "3s"))).await.expect("cluster gateway"));
    }
    let config = gateways[1].config_path().to_owned();
    let owners = wait_for("both gateways owning partitions", SETTLE, || {
        let owners = partition_owners(&cluster_status(&config).ok()?);
        (owners.len() == PARTITIONS as usize && ["gw-a", "gw-b"].iter().all(|g| owners.iter().any(|o| o == g))).then_some(owners)
    })
    .await
    .expect("partitions shared");
    let site = (0..10_000).map(|i| format!("hist{i}")).find(|s| owners[usize::from(partition_of(s, PARTITIONS))] == "gw-a").expect("a site of gw-a's");
    let device = format!("{site}-gas-1");

    // Five readings taken in by gw-a, a second apart.
    let mut publisher = Publisher::connect(&nats.nodes[0].mqtt_addr(), 64).await.expect("publisher");
    publisher.publish_json(&device_topic(&site, &device, "status"), true, &birth("gas_detector", 60)).await.expect("birth");
    let mut sent = 1;
    let base = now_ms() - 30_000;
    for seq in 1..=5 {
        telemetry(&mut publisher, &site, &device, seq, base + i64::from(seq) * 1000, &mut sent).await;
    }
    let from = format!("from={}", base);
    wait_for("gw-a's five readings of the device", SETTLE, || readings(&gateways[0], &device, &from).filter(|(p, _)| p.len() == 5).map(drop)).await.expect("gw-a stored them");
    wait_for("the five readings in VictoriaMetrics", SETTLE, || {
        let n = vm.export("reading_gas_lel").ok()?.into_iter().filter(|(_, labels, _, _)| labels["device"] == device.as_str()).count();
        (n == 5).then_some(())
    })
    .await
    .expect("the long-term store holds them");

    gateways[0].kill();
    wait_for("gw-b owning every partition", SETTLE, || partition_owners(&cluster_status(&config).ok()?).iter().all(|o| o == "gw-b").then_some(())).await.expect("failover");

    // Two more readings, taken in by gw-b.
    for seq in 6..=7 {
        telemetry(&mut publisher, &site, &device, seq, base + i64::from(seq) * 1000, &mut sent).await;
    }
    let expected: Vec<(i64, f64, u64)> = (1..=7).map(|seq| (base + i64::from(seq) * 1000, f64::from(seq), 1)).collect();
    let (raw, long_term) = wait_for("gw-b answering all seven readings", SETTLE, || {
        vm.export("reading_gas_lel").ok()?; // makes recent writes searchable
        readings(&gateways[1], &device, &from).filter(|(p, _)| p.len() == 7)
    })
    .await
    .unwrap_or_else(|_| panic!("gw-b's answer: {:?}", readings(&gateways[1], &device, &from)));
    assert_eq!(raw, expected, "each reading once, gw-a's from the long-term store: {long_term}");
    assert!(long_term["readings"].as_u64().unwrap_or(0) >= 5, "gw-a's readings came from the long-term store: {long_term}");

    // Per minute: one step holds them all (or two, when the seven straddle a minute), each
    // reading once — gw-b's two, which the long-term store may not have yet, included.
    let (stepped, _) = readings(&gateways[1], &device, &format!("{from}&step=1m")).expect("stepped readings");
    assert_eq!(stepped.iter().map(|(_, _, n)| n).sum::<u64>(), 7, "{stepped:?}");
    assert_eq!(stepped.last().map(|(_, last, _)| *last), Some(7.0), "{stepped:?}");
}

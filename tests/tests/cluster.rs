//! Cluster mode end to end (SPEC §9): three real nats-server nodes clustered on loopback (configs
//! from `citywatch cluster nats-config`), gateways joining with `[cluster]`, devices speaking MQTT
//! 3.1.1 to a NATS node, and one webhook receiver for the city: every gateway's channel points
//! at it (as an operations centre's would), each with a header naming the gateway. In cluster
//! mode any live gateway delivers from the replicated incident log, so who sent a change says
//! nothing about who owns the site; who acted shows in each gateway's own incident store.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use citywatch_gateway::cluster::nats_config::partition_of;
use citywatch_tests::{birth, citywatch_bin, device_topic, revisions_of, Delivery, GatewayProcess, NatsCluster, Publisher, QoS, Subscriber, WebhookReceiver, IDEMPOTENCY_HEADER};
use serde_json::{json, Value};

const SECRET: &str = "e2e-cluster-secret";
const PARTITIONS: u16 = 8;
const LEASE_TTL: &str = "3s";
const TTL: Duration = Duration::from_secs(3);
/// Bound of every "until the cluster has settled" wait.
const SETTLE: Duration = Duration::from_secs(60);

/// The header each gateway's webhook adds (a static `[notify.webhook.headers]` entry).
const GATEWAY_HEADER: &str = "x-test-gateway";

struct Node {
    name: String,
    gateway: GatewayProcess,
}

async fn gateway(nats: &NatsCluster, name: &str, receiver: &WebhookReceiver) -> Node {
    gateway_with(nats, name, receiver, "").await
}

/// [`gateway`] with more configuration (whole sections) appended.
async fn gateway_with(nats: &NatsCluster, name: &str, receiver: &WebhookReceiver, more: &str) -> Node {
    let section = format!(
        "{}[[notify.webhook]]\nname = \"ops\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n[notify.webhook.headers]\n{GATEWAY_HEADER} = \"{name}\"\n[notify.retry]\ninitial = \"100ms\"\nmax = \"1s\"\n{more}",
        nats.gateway_section(name, PARTITIONS, LEASE_TTL),
        receiver.url()
    );
    let gateway = GatewayProcess::start_cluster(&section).await.expect("cluster gateway");
    Node { name: name.to_owned(), gateway }
}

/// Three clustered NATS nodes, the city's webhook receiver, gateways gw-a and gw-b, and the
/// partition owners once both own some: the setup every test here starts from.
struct TwoGateways {
    nats: NatsCluster,
    receiver: WebhookReceiver,
    a: Node,
    b: Node,
    owners: Vec<String>,
}

async fn two_gateways() -> TwoGateways {
    let nats = NatsCluster::start(3, PARTITIONS).await.expect("3-node NATS cluster");
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let a = gateway(&nats, "gw-a", &receiver).await;
    let b = gateway(&nats, "gw-b", &receiver).await;
    let owners = wait_owned(b.gateway.config_path(), &["gw-a", "gw-b"]).await;
    TwoGateways { nats, receiver, a, b, owners }
}

/// The incidents a gateway's own store holds for a site (what that gateway acted on): the list
/// with `scope=local` (without it, any gateway lists the whole city's from the incident log).
fn stored_for_site(node: &Node, site: &str) -> Vec<Value> {
    let listed = node.gateway.get(&format!("/api/v1/incidents?site={site}&scope=local")).expect("incident list");
    listed["incidents"].as_array().cloned().unwrap_or_default()
}

/// `citywatch cluster status --config F` as JSON.
fn status(config: &std::path::Path) -> anyhow::Result<Value> {
    let out = Command::new(citywatch_bin()).args(["cluster", "status", "--config"]).arg(config).output()?;
    anyhow::ensure!(out.status.success(), "cluster status failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Owner of every partition, once every partition has one among `expected` (and each of them owns some).
async fn wait_owned(config: &std::path::Path, expected: &[&str]) -> Vec<String> {
    wait_owned_with(config, expected, expected).await
}

/// Owner of every partition, once every partition has one among `expected` and each of
/// `must_own` owns some (rendezvous hashing may give a member none: with 8 partitions over four
/// gateways, gw-a gets none).
async fn wait_owned_with(config: &std::path::Path, expected: &[&str], must_own: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + SETTLE;
    let mut last;
    loop {
        match status(config) {
            Err(e) => last = Value::String(format!("{e:#}")),
            Ok(s) => {
            let owners: Vec<String> = s["partitions"].as_array().map(|ps| ps.iter().map(|p| p["owner"].as_str().unwrap_or("").to_owned()).collect()).unwrap_or_default();
            let used: BTreeSet<&str> = owners.iter().map(String::as_str).collect();
            if owners.len() == PARTITIONS as usize && owners.iter().all(|o| expected.contains(&o.as_str())) && must_own.iter().all(|e| used.contains(e)) {
                return owners;
            }
            last = s;
            }
        }
        assert!(Instant::now() < deadline, "partitions not owned by {expected:?} within {SETTLE:?}: {last:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A site whose partition `owners` gives to `who`.
fn site_owned_by(owners: &[String], who: &str, prefix: &str) -> String {
    (0..10_000).map(|i| format!("{prefix}{i}")).find(|s| owners[partition_of(s, PARTITIONS) as usize] == who).expect("some site hashes to every partition owner")
}

async fn smoke_alarms(publisher: &Publisher, site: &str, devices: &[&str]) {
    for d in devices {
        publisher.publish_json(&device_topic(site, d, "status"), true, &birth("smoke_detector", 60)).await.expect("status");
    }
    let ts = chrono_ms();
    for (i, d) in devices.iter().enumerate() {
        let body = json!({"seq": 1, "ts": ts + i as i64, "event": "alarm", "metric": "smoke_db_m", "value": 0.4});
        publisher.publish_json(&device_topic(site, d, "event"), false, &body).await.expect("alarm");
    }
}

fn chrono_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn fires(deliveries: &[Delivery], site: &str) -> BTreeSet<String> {
    deliveries.iter().filter(|d| d.rule() == "fire_confirmed" && d.site() == site).map(|d| d.id().to_owned()).collect()
}

fn for_site(deliveries: &[Delivery], site: &str) -> Vec<String> {
    deliveries.iter().filter(|d| d.site() == site).map(Delivery::describe).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_are_shared_and_a_fire_gives_one_fire_confirmed_whichever_gateway_owns_the_site() {
    let TwoGateways { nats, receiver, a, b, owners } = two_gateways().await;
    let publisher = Publisher::connect(&nats.nodes[2].mqtt_addr(), 100).await.expect("device connection to NATS MQTT");
    for (owner, other) in [(&a, &b), (&b, &a)] {
        let site = site_owned_by(&owners, &owner.name, "fire-");
        let devices = [format!("{site}-smoke-1"), format!("{site}-smoke-2")];
        let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
        smoke_alarms(&publisher, &site, &refs).await;
        let fire = receiver.wait_for(SETTLE, "fire_confirmed of the site", |d| fires(d, &site).into_iter().next()).await;
        // Both detectors' alarms reached the owner (one partition per site), nothing the other.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(fires(&receiver.deliveries(), &site), BTreeSet::from([fire.clone()]), "one fire incident");
        assert!(stored_for_site(owner, &site).iter().any(|i| i["id"] == fire.as_str()), "the owner raised the fire");
        assert!(stored_for_site(other, &site).is_empty(), "the non-owner acted: {:?}", stored_for_site(other, &site));
        let ids: Vec<String> = receiver.deliveries().iter().filter(|d| d.site() == site).filter_map(|d| d.header(IDEMPOTENCY_HEADER).map(str::to_owned)).collect();
        assert!(ids.iter().any(|k| k.starts_with(&format!("{fire}:"))), "Idempotency-Key {{id}}:{{revision}} on the pushes: {ids:?}");
        // The owner's API knows the devices; the status JSON names members and lag.
        let listed = owner.gateway.get(&format!("/api/v1/devices/{}", devices[0])).expect("device on its owner");
        assert_eq!(listed["site"], site, "{listed}");
    }
    // gas_high → close_valve from the site's owner, through NATS, to the device at QoS 1.
    let site = site_owned_by(&owners, "gw-b", "kitchen-");
    let device = format!("{site}-gas-1");
    let mut cmds = Subscriber::connect(&nats.nodes[0].mqtt_addr(), &device_topic(&site, &device, "cmd"), QoS::AtLeastOnce).await.expect("device cmd subscription");
    cmds.wait_subacks(1, SETTLE).await.expect("suback");
    publisher.publish_json(&device_topic(&site, &device, "status"), true, &birth("gas_detector", 60)).await.expect("status");
    let leak = json!({"seq": 1, "ts": chrono_ms(), "event": "alarm", "metric": "gas_lel", "value": 55.0});
    publisher.publish_json(&device_topic(&site, &device, "event"), false, &leak).await.expect("leak");
    let cmd = cmds.recv_matching(SETTLE, |m| m.json().is_ok_and(|c| c["cmd"] == "close_valve")).await.expect("close_valve reached the device");
    assert_eq!(cmd.qos, QoS::AtLeastOnce, "commands reach devices at QoS 1");

    let s = status(a.gateway.config_path()).expect("status");
    assert_eq!(s["members"].as_array().map(Vec::len), Some(2), "{s:#}");
    assert!(s["partitions"][0].get("lag").is_some(), "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_partitions_are_owned_again_within_the_lease_ttl_and_its_sites_watched() {
    let TwoGateways { nats, receiver, mut a, b, owners } = two_gateways().await;
    let site = site_owned_by(&owners, "gw-a", "kill-");
    let killed = Instant::now();
    a.gateway.kill();
    let owners = wait_owned(b.gateway.config_path(), &["gw-b"]).await;
    let failover = killed.elapsed();
    eprintln!("failover: every partition owned by gw-b {failover:?} after SIGKILL of gw-a (lease TTL {TTL:?})");
    assert!(owners.iter().all(|o| o == "gw-b"));
    let publisher = Publisher::connect(&nats.nodes[0].mqtt_addr(), 100).await.expect("device connection");
    let devices = [format!("{site}-smoke-1"), format!("{site}-smoke-2")];
    let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
    smoke_alarms(&publisher, &site, &refs).await;
    receiver.wait_for(SETTLE, "fire_confirmed from the new owner", |d| fires(d, &site).into_iter().next()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fires(&receiver.deliveries(), &site).len(), 1, "{:?}", for_site(&receiver.deliveries(), &site));
    assert!(receiver.deliveries().iter().filter(|d| d.site() == site).all(|d| d.header(GATEWAY_HEADER) == Some("gw-b")), "only the live gateway delivers");
    assert!(!stored_for_site(&b, &site).is_empty(), "the new owner raised it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_paused_longer_than_the_lease_ttl_sends_nothing_for_the_partitions_it_lost() {
    let TwoGateways { nats, receiver, a, b, owners } = two_gateways().await;
    let site = site_owned_by(&owners, "gw-a", "pause-");
    let pid = a.gateway.pid().expect("gw-a runs").to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
    // Published while gw-a is frozen: its open pull requests may already carry these to its
    // socket, so after SIGCONT it holds them — and must not act on them.
    let publisher = Publisher::connect(&nats.nodes[1].mqtt_addr(), 100).await.expect("device connection");
    let devices = [format!("{site}-smoke-1"), format!("{site}-smoke-2")];
    let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
    smoke_alarms(&publisher, &site, &refs).await;
    let owners = wait_owned(b.gateway.config_path(), &["gw-b"]).await;
    assert!(owners.iter().all(|o| o == "gw-b"));
    // The new owner gets them (after the ack wait of the frozen consumer) and pushes the fire.
    let fire = receiver.wait_for(SETTLE, "fire_confirmed from the new owner", |d| fires(d, &site).into_iter().next()).await;
    assert!(Command::new("kill").args(["-CONT", &pid]).status().expect("kill").success());
    // gw-a wakes with an expired lease: it must not act on what it held for the site (it may
    // deliver the new owner's changes from the log: that is the shared push channel).
    tokio::time::sleep(TTL * 2).await;
    // (Once it owns the partition again it adopts the new owner's incidents: same ids.)
    let raised_by_b: BTreeSet<String> = stored_for_site(&b, &site).iter().filter_map(|i| i["id"].as_str().map(str::to_owned)).collect();
    let acted: Vec<Value> = stored_for_site(&a, &site).into_iter().filter(|i| !i["id"].as_str().is_some_and(|id| raised_by_b.contains(id))).collect();
    assert!(acted.is_empty(), "the paused gateway acted for a partition it lost: {acted:?}");
    // And it rejoins: both members own partitions again.
    wait_owned(b.gateway.config_path(), &["gw-a", "gw-b"]).await;
    let per_id: BTreeMap<String, usize> = receiver.deliveries().iter().filter(|d| d.rule() == "fire_confirmed").fold(BTreeMap::new(), |mut m, d| {
        *m.entry(d.id().to_owned()).or_default() += 1;
        m
    });
    assert_eq!(per_id.keys().cloned().collect::<Vec<_>>(), vec![fire], "one fire incident");
}

/// One gas detector's telemetry: `gas_lel` and a confirmed-closed valve (so `gas_valve_failed`
/// stays out of it), `seq` counting up.
async fn gas_reading(publisher: &Publisher, site: &str, device: &str, seq: &mut u32, gas_lel: f64) {
    *seq += 1;
    let body = json!({"seq": *seq, "ts": chrono_ms(), "values": {"gas_lel": gas_lel, "valve_closed": 1}});
    publisher.publish_json(&device_topic(site, device, "telemetry"), false, &body).await.expect("telemetry");
}

/// SPEC §9 "device state from the last message per device subject": a smoke detector is born
/// while gw-a owns its site, and gw-a acknowledges the birth (so no redelivery carries it to
/// anyone else). gw-a is SIGKILLed; the device's next event is an alarm without a measurement,
/// from which no kind can be inferred: the new owner must know the device from the ingest
/// stream's last status, evaluate the alarm and push it, and quarantine nothing as
/// `unknown_device`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_born_on_a_killed_gateway_is_known_to_the_new_owner() {
    let TwoGateways { nats, receiver, mut a, b, owners } = two_gateways().await;
    let site = site_owned_by(&owners, "gw-a", "born-");
    let partition = partition_of(&site, PARTITIONS) as usize;
    let device = format!("{site}-smoke-1");
    let publisher = Publisher::connect(&nats.nodes[1].mqtt_addr(), 100).await.expect("device connection");
    publisher.publish_json(&device_topic(&site, &device, "status"), true, &birth("smoke_detector", 3600)).await.expect("birth");
    let born = Instant::now() + SETTLE;
    loop {
        let known = a.gateway.get(&format!("/api/v1/devices/{device}")).is_ok_and(|d| d["kind"] == "smoke_detector");
        let part = status(a.gateway.config_path()).map(|s| s["partitions"][partition].clone()).unwrap_or_default();
        if known && part["owner"] == "gw-a" && part["lag"] == 0 && part["unacked"] == 0 {
            break;
        }
        assert!(Instant::now() < born, "gw-a never registered and acknowledged the birth: {part}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.gateway.kill();
    wait_owned(b.gateway.config_path(), &["gw-b"]).await;
    let alarm = json!({"seq": 2, "ts": chrono_ms(), "event": "alarm"});
    publisher.publish_json(&device_topic(&site, &device, "event"), false, &alarm).await.expect("alarm");
    receiver.wait_for(SETTLE, "the alarm pushed by the new owner", |d| d.iter().find(|d| d.device() == device && d.rule() == "device_alarm").map(|_| ())).await;
    let known = b.gateway.get(&format!("/api/v1/devices/{device}")).expect("the device on the new owner");
    assert_eq!(known["kind"], "smoke_detector", "{known}");
    assert_eq!(known["site"], site.as_str(), "{known}");
    let metrics = b.gateway.get_text("/metrics").expect("metrics");
    let unknown = metrics.lines().find(|l| l.starts_with("citywatch_messages_rejected_total{reason=\"unknown_device\"}")).unwrap_or("none");
    assert!(unknown == "none" || unknown.ends_with(" 0"), "the new owner quarantined an event as unknown_device: {unknown}");
    assert!(!stored_for_site(&b, &site).is_empty(), "the new owner raised the alarm");
}

/// SPEC §9 "rule windows by replaying the stream from now − window": one smoke detector of a
/// site owned by gw-a alarms, gw-a raises its `device_alarm` and acknowledges the message (so no
/// redelivery brings it to anyone else), and gw-a is SIGKILLed. The site's second detector
/// alarms within the 60 s of `fire_confirmed` once gw-b owns the partition: gw-b's engine knows
/// the first alarm only from replaying the partition's recent messages, so the fire is
/// confirmed by gw-b with both detectors — and the first detector's incident, which gw-b adopted
/// from the log, is not opened a second time by the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_half_seen_by_a_killed_gateway_is_confirmed_by_the_new_owner_from_the_replayed_window() {
    let TwoGateways { nats, receiver, mut a, b, owners } = two_gateways().await;
    let site = site_owned_by(&owners, "gw-a", "replay-");
    let partition = partition_of(&site, PARTITIONS) as usize;
    let (first, second) = (format!("{site}-smoke-1"), format!("{site}-smoke-2"));
    let publisher = Publisher::connect(&nats.nodes[1].mqtt_addr(), 100).await.expect("device connection");
    for d in [&first, &second] {
        publisher.publish_json(&device_topic(&site, d, "status"), true, &birth("smoke_detector", 3600)).await.expect("birth");
    }
    let alarm = |seq: u32| json!({"seq": seq, "ts": chrono_ms(), "event": "alarm"});
    publisher.publish_json(&device_topic(&site, &first, "event"), false, &alarm(1)).await.expect("first alarm");
    let first_alarm = receiver.wait_for(SETTLE, "the first detector's alarm pushed by gw-a", |d| d.iter().find(|d| d.device() == first && d.rule() != "fire_confirmed").map(|d| d.id().to_owned())).await;
    let acked = Instant::now() + SETTLE;
    loop {
        let part = status(a.gateway.config_path()).map(|s| s["partitions"][partition].clone()).unwrap_or_default();
        if part["owner"] == "gw-a" && part["lag"] == 0 && part["unacked"] == 0 {
            break;
        }
        assert!(Instant::now() < acked, "gw-a never acknowledged the first alarm: {part}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(fires(&receiver.deliveries(), &site).is_empty(), "one detector is no fire");
    a.gateway.kill();
    wait_owned(b.gateway.config_path(), &["gw-b"]).await;
    publisher.publish_json(&device_topic(&site, &second, "event"), false, &alarm(1)).await.expect("second alarm");
    let fire = receiver.wait_for(SETTLE, "fire_confirmed from the replayed first alarm and the live second", |d| fires(d, &site).into_iter().next()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deliveries = receiver.deliveries();
    assert_eq!(fires(&deliveries, &site), BTreeSet::from([fire.clone()]), "one fire incident: {:#?}", for_site(&deliveries, &site));
    let confirmed = deliveries.iter().find(|d| d.id() == fire).expect("the fire's delivery");
    let devices: BTreeSet<&str> = confirmed.body["devices"].as_array().map(|ds| ds.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    assert_eq!(devices, BTreeSet::from([first.as_str(), second.as_str()]), "{}", confirmed.raw);
    assert!(stored_for_site(&b, &site).iter().any(|i| i["id"] == fire.as_str()), "the new owner confirmed the fire");
    // The first detector's incident is the one gw-a opened, adopted: not opened again.
    let first_ids: BTreeSet<&str> = deliveries.iter().filter(|d| d.device() == first && d.rule() != "fire_confirmed").map(Delivery::id).collect();
    assert_eq!(first_ids, BTreeSet::from([first_alarm.as_str()]), "{:#?}", for_site(&deliveries, &site));
    let metrics = b.gateway.get_text("/metrics").expect("metrics");
    let replayed = format!("citywatch_cluster_partition_replayed_total{{partition=\"{partition}\"}} ");
    let count: u64 = metrics.lines().find_map(|l| l.strip_prefix(replayed.as_str())).and_then(|n| n.trim().parse().ok()).unwrap_or(0);
    assert!(count >= 1, "gw-b replayed the partition's recent messages: {:?}", metrics.lines().filter(|l| l.contains("replayed")).collect::<Vec<_>>());
}

/// SPEC §9 "state that survives a gateway": a gas leak opens at a site owned by gw-a, the
/// operator acknowledges it there while the city's receiver is down (so that change is still
/// waiting for delivery), gw-a is SIGKILLed. The receiver comes back, the detector keeps
/// reporting the leak and then clears, the operator resolves and closes through gw-b, the new
/// owner. The incident keeps its id (no second one for the device), its revisions go on from
/// gw-a's, and the receiver has every revision 1..n exactly once by Idempotency-Key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_survives_its_gateway_with_its_id_and_every_revision_delivered() {
    let TwoGateways { nats, receiver, mut a, b, owners } = two_gateways().await;
    let site = site_owned_by(&owners, "gw-a", "leak-");
    let device = format!("{site}-gas-1");
    let publisher = Publisher::connect(&nats.nodes[1].mqtt_addr(), 100).await.expect("device connection");
    publisher.publish_json(&device_topic(&site, &device, "status"), true, &birth("gas_detector", 60)).await.expect("status");
    let mut seq = 0;
    gas_reading(&publisher, &site, &device, &mut seq, 55.0).await;
    let id = receiver.wait_for(SETTLE, "the gas leak's first revision", |d| d.iter().find(|d| d.device() == device && d.revision() == 1).map(|d| d.id().to_owned())).await;
    assert!(stored_for_site(&a, &site).iter().any(|i| i["id"] == id.as_str()), "gw-a, the owner, opened it");

    // The receiver is down: the acknowledgement is committed on gw-a and waits for delivery.
    receiver.set_status(503);
    let (code, acked) = a.gateway.post(&format!("/api/v1/incidents/{id}/ack"), &json!({"actor": "li", "note": "crew on the way"})).expect("ack on gw-a");
    assert_eq!(code, 200, "{acked}");
    assert_eq!(acked["revision"], 2, "{acked}");
    let refused = Instant::now() + SETTLE;
    while !receiver.rejected_attempts().iter().any(|d| d.id() == id && d.revision() == 2) {
        assert!(Instant::now() < refused, "revision 2 was never attempted:\n{}", receiver.report());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let killed = Instant::now();
    a.gateway.kill();
    receiver.set_status(200);

    // The leak goes on while gw-b takes the partition over, and a few seconds after.
    let taken = Instant::now() + SETTLE;
    loop {
        gas_reading(&publisher, &site, &device, &mut seq, 55.0).await;
        if status(b.gateway.config_path()).is_ok_and(|s| s["partitions"][partition_of(&site, PARTITIONS) as usize]["owner"] == "gw-b") {
            break;
        }
        assert!(Instant::now() < taken, "gw-b never took the partition over");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let failover = killed.elapsed();
    for _ in 0..4 {
        gas_reading(&publisher, &site, &device, &mut seq, 55.0).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let delivered_2 = receiver.wait_for(SETTLE, "revision 2 after gw-a died", |d| d.iter().find(|d| d.id() == id && d.revision() == 2).map(|d| d.received)).await;
    eprintln!("failover: the site's partition owned by gw-b {failover:?} after SIGKILL of gw-a; revision 2 delivered {:?} after the kill", delivered_2.duration_since(killed));
    // Then it clears: under 40 %LEL held 30 s (the default pack's gas_high).
    let clearing = Instant::now();
    while clearing.elapsed() < Duration::from_secs(34) {
        gas_reading(&publisher, &site, &device, &mut seq, 2.0).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let cleared = receiver
        .wait_for(SETTLE, "the condition cleared on the same incident", |d| {
            d.iter().filter(|d| d.id() == id && d.body["history"].as_array().is_some_and(|h| h.iter().any(|e| e["action"] == "condition_cleared"))).map(|d| d.revision()).min()
        })
        .await;
    assert!(stored_for_site(&b, &site).iter().any(|i| i["id"] == id.as_str()), "gw-b adopted the incident");
    // The operator loop goes on at the new owner.
    for action in ["resolve", "close"] {
        let (code, answer) = b.gateway.post(&format!("/api/v1/incidents/{id}/{action}"), &json!({"actor": "li"})).expect("transition on gw-b");
        assert_eq!(code, 200, "{action}: {answer}");
    }
    receiver.wait_for(SETTLE, "the closed revision", |d| d.iter().find(|d| d.id() == id && d.state() == "closed").map(|_| ())).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let deliveries = receiver.deliveries();
    let for_device: BTreeSet<String> = deliveries.iter().filter(|d| d.device() == device).map(|d| d.id().to_owned()).collect();
    assert_eq!(for_device, BTreeSet::from([id.clone()]), "one incident for the device:\n{}", receiver.report());
    let revisions = revisions_of(&deliveries, &id);
    let n = revisions.keys().max().copied().unwrap_or(0);
    assert_eq!(revisions.keys().copied().collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>(), "every revision 1..{n}, no gap:\n{}", receiver.report());
    assert!(n >= 5 && cleared > 2, "opened, acked, cleared, resolved, closed: {n} revisions");
    let states: Vec<&str> = revisions.values().map(Delivery::state).collect();
    assert_eq!(states.first().copied(), Some("open"));
    assert_eq!(states.get(1).copied(), Some("acknowledged"));
    assert_eq!(revisions[&cleared].state(), "acknowledged", "the crew's state survived the failover");
    assert_eq!(states.last().copied(), Some("closed"));
    // Each revision's history is the one before it plus what changed: one story, not two.
    for (r, d) in &revisions {
        if let Some(prev) = revisions.get(&(r - 1)) {
            let (h, p) = (d.body["history"].as_array().expect("history"), prev.body["history"].as_array().expect("history"));
            assert_eq!(&h[..p.len()], &p[..], "revision {r} does not continue revision {}", r - 1);
        }
    }
    let senders: BTreeSet<&str> = revisions.values().filter_map(|d| d.header(GATEWAY_HEADER)).collect();
    assert!(senders.contains("gw-b"), "gw-b delivered after the kill: {senders:?}");
}

/// A change made by a timer, not by a message: an unacknowledged critical incident escalates
/// `escalate_after` after it opened (SPEC §4 `unacked_escalation`). Its owner gw-a is SIGKILLed
/// before that; gw-b adopts the incident from the log and escalates it on time — as it would
/// if gw-a had committed the escalation and died before the log append (the change is made
/// from the incident's `opened` time and escalation count, whoever holds it). Exactly one
/// escalation, revisions without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalation_due_after_the_owner_died_is_made_by_the_new_owner() {
    const ESCALATE_AFTER: Duration = Duration::from_secs(8);
    let incidents = format!("[incidents]\nescalate_after = \"{}s\"\nrenotify_every = \"1h\"\n", ESCALATE_AFTER.as_secs());
    let nats = NatsCluster::start(3, PARTITIONS).await.expect("3-node NATS cluster");
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let mut a = gateway_with(&nats, "gw-a", &receiver, &incidents).await;
    let b = gateway_with(&nats, "gw-b", &receiver, &incidents).await;
    let owners = wait_owned(b.gateway.config_path(), &["gw-a", "gw-b"]).await;
    let site = site_owned_by(&owners, "gw-a", "escalate-");
    let device = format!("{site}-gas-1");
    let publisher = Publisher::connect(&nats.nodes[1].mqtt_addr(), 100).await.expect("device connection");
    publisher.publish_json(&device_topic(&site, &device, "status"), true, &birth("gas_detector", 60)).await.expect("status");
    let mut seq = 0;
    gas_reading(&publisher, &site, &device, &mut seq, 55.0).await;
    let first = receiver.wait_for(SETTLE, "the gas leak's first revision", |d| d.iter().find(|d| d.device() == device && d.revision() == 1).cloned()).await;
    let (id, opened) = (first.id().to_owned(), first.received);
    assert_eq!(first.body["severity"], "critical", "gas_high escalates only when critical: {}", first.describe());
    a.gateway.kill();
    assert!(opened.elapsed() < ESCALATE_AFTER, "gw-a was killed too late to test this: {:?} after the open", opened.elapsed());

    receiver
        .wait_for(SETTLE, "the escalation after gw-a died", |d| d.iter().find(|d| d.id() == id && d.body["escalation"] == 1).map(|_| ()))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deliveries = receiver.deliveries();
    let revisions = revisions_of(&deliveries, &id);
    let n = revisions.keys().max().copied().unwrap_or(0);
    assert_eq!(revisions.keys().copied().collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>(), "every revision 1..{n}, no gap:\n{}", receiver.report());
    let escalations: Vec<u64> = revisions.values().filter_map(|d| d.body["escalation"].as_u64()).collect();
    assert_eq!(escalations.iter().max().copied(), Some(1), "one escalation, no renotification:\n{}", receiver.report());
    let escalation = revisions.values().find(|d| d.body["escalation"] == 1).expect("the escalated revision");
    assert_eq!(escalation.state(), "open", "{}", escalation.describe());
    // Due from the incident's own opening, which the adoption kept: not before, and not from
    // the takeover.
    assert_eq!(escalation.body["opened_ms"], first.body["opened_ms"], "the adopted incident kept its opening time");
    let opened_ms = first.body["opened_ms"].as_i64().expect("opened_ms");
    let history = escalation.body["history"].as_array().expect("history");
    let at_ms = history.iter().find(|e| e["action"] == "escalated").and_then(|e| e["at_ms"].as_i64()).expect("an escalated entry");
    assert!(at_ms >= opened_ms + ESCALATE_AFTER.as_millis() as i64, "escalated {} ms after the open", at_ms - opened_ms);
    assert!(stored_for_site(&b, &site).iter().any(|i| i["id"] == id.as_str() && i["escalation"] == 1), "gw-b, the new owner, escalated it");
}

/// A live stream (`GET /api/v1/events`) read on a thread: every `data:` line's JSON, as it comes.
fn live_stream(gateway: &GatewayProcess) -> std::sync::Arc<std::sync::Mutex<Vec<Value>>> {
    use std::io::BufRead as _;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let url = format!("http://{}/api/v1/events", gateway.http_addr());
    let sink = std::sync::Arc::clone(&seen);
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let response = ureq::get(&url).call();
        let _ = opened_tx.send(response.is_ok());
        let Ok(response) = response else { return };
        for line in std::io::BufReader::new(response.into_body().into_reader()).lines() {
            let Ok(line) = line else { return };
            if let Some(Ok(v)) = line.strip_prefix("data:").map(|d| serde_json::from_str::<Value>(d.trim())) {
                sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(v);
            }
        }
    });
    assert_eq!(opened_rx.recv_timeout(SETTLE), Ok(true), "the live stream opened");
    seen
}

/// SPEC §9 "one API for the whole city": a gas leak at a site owned by gw-a; through gw-b alone
/// the operator finds the device and the incident (lists, details, live stream) and runs the
/// loop ack → dispatch → resolve → close. gw-b forwards each transition to gw-a, which applies it
/// (gw-b's own book stays empty for the site); the receiver gets every revision once, no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_loop_and_the_city_lists_work_through_a_gateway_that_does_not_own_the_site() {
    let TwoGateways { nats, receiver, a, b, owners } = two_gateways().await;
    let site = site_owned_by(&owners, "gw-a", "city-");
    let device = format!("{site}-gas-1");
    let live = live_stream(&b.gateway);
    let publisher = Publisher::connect(&nats.nodes[1].mqtt_addr(), 100).await.expect("device connection");
    publisher.publish_json(&device_topic(&site, &device, "status"), true, &birth("gas_detector", 60)).await.expect("status");
    let mut seq = 0;
    gas_reading(&publisher, &site, &device, &mut seq, 55.0).await;
    let id = receiver.wait_for(SETTLE, "the gas leak's first revision", |d| d.iter().find(|d| d.device() == device && d.revision() == 1).map(|d| d.id().to_owned())).await;

    // Incidents: gw-b lists and shows gw-a's incident from the log.
    let listed = b
        .gateway
        .wait_for(SETTLE, "the incident in gw-b's city list", |g| {
            g.get(&format!("/api/v1/incidents?site={site}")).ok().filter(|l| l["incidents"].as_array().is_some_and(|l| l.iter().any(|i| i["id"] == id.as_str())))
        })
        .await;
    assert_eq!(listed["total"], 1, "{listed:#}");
    assert!(listed["by_state"]["open"].as_u64().is_some_and(|n| n >= 1), "{listed:#}");
    let one = b.gateway.get(&format!("/api/v1/incidents/{id}")).expect("incident detail on gw-b");
    assert_eq!((one["site"].as_str(), one["device"].as_str()), (Some(site.as_str()), Some(device.as_str())), "{one:#}");
    assert!(stored_for_site(&b, &site).is_empty(), "gw-b's own book acted for gw-a's site");

    // Devices: gw-b answers for gw-a's device (by site, in the whole list, alone).
    let by_site = b.gateway.get(&format!("/api/v1/devices?site={site}")).expect("devices of the site on gw-b");
    assert_eq!(by_site["devices"].as_array().map(|d| d.iter().filter_map(|d| d["id"].as_str()).collect::<Vec<_>>()), Some(vec![device.as_str()]), "{by_site:#}");
    let all = b.gateway.get("/api/v1/devices?limit=1000").expect("every device on gw-b");
    assert!(all["devices"].as_array().is_some_and(|d| d.iter().any(|d| d["id"] == device.as_str())), "{all:#}");
    assert_eq!(all["total"].as_u64(), all["devices"].as_array().map(|d| d.len() as u64), "{all:#}");
    let one_device = b.gateway.get(&format!("/api/v1/devices/{device}")).expect("the device on gw-b");
    assert_eq!(one_device["site"], site.as_str(), "{one_device:#}");
    assert_eq!(b.gateway.status_of("/api/v1/devices/no-such-device").expect("GET"), 404, "an unknown device, after every partition answered");

    // The operator loop through gw-b.
    let mut revision = 1;
    for (action, body, state) in [
        ("ack", json!({"actor": "li", "note": "on it"}), "acknowledged"),
        ("dispatch", json!({"actor": "li", "crew": "crew-7"}), "dispatched"),
        ("resolve", json!({"actor": "li"}), "resolved"),
        ("close", json!({"actor": "li"}), "closed"),
    ] {
        let (code, answer) = b.gateway.post(&format!("/api/v1/incidents/{id}/{action}"), &body).expect("transition through gw-b");
        assert_eq!(code, 200, "{action} through gw-b: {answer}");
        assert_eq!(answer["state"], state, "{action}: {answer:#}");
        assert!(answer["revision"].as_u64().is_some_and(|r| r > revision), "{action}: {answer:#}");
        revision = answer["revision"].as_u64().unwrap_or(revision);
        // The next action needs this one in the log's view at gw-b (the owner applied it).
        b.gateway
            .wait_for(SETTLE, "the change in gw-b's view", |g| g.get(&format!("/api/v1/incidents/{id}")).ok().filter(|i| i["state"] == state).map(|_| ()))
            .await;
    }
    assert_eq!(answer_state(&b, &id, "li"), Some("closed".to_owned()));
    assert!(stored_for_site(&b, &site).is_empty(), "gw-b applied a transition itself: {:?}", stored_for_site(&b, &site));
    assert!(stored_for_site(&a, &site).iter().any(|i| i["id"] == id.as_str() && i["state"] == "closed"), "the owner gw-a applied the loop");
    let (code, refused) = b.gateway.post(&format!("/api/v1/incidents/{id}/ack"), &json!({"actor": "li"})).expect("ack of a closed incident");
    assert!(code == 404 || code == 409, "a closed incident is not acknowledged again: {code} {refused}");

    receiver.wait_for(SETTLE, "the closed revision", |d| d.iter().find(|d| d.id() == id && d.state() == "closed").map(|_| ())).await;
    let revisions = revisions_of(&receiver.deliveries(), &id);
    let n = revisions.keys().max().copied().unwrap_or(0);
    assert_eq!(revisions.keys().copied().collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>(), "every revision once, no gap:\n{}", receiver.report());
    assert_eq!(n, revision, "the receiver's last revision is the last answer's");

    // gw-b's live stream saw every revision, gw-a's changes all.
    let deadline = Instant::now() + SETTLE;
    loop {
        let streamed: BTreeSet<u64> = live.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().filter(|e| e["id"] == id.as_str()).filter_map(|e| e["revision"].as_u64()).collect();
        if streamed == (1..=n).collect::<BTreeSet<u64>>() {
            break;
        }
        assert!(Instant::now() < deadline, "gw-b's live stream has revisions {streamed:?} of 1..={n}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The state of incident `id` at `node`, and that its history names the operator.
fn answer_state(node: &Node, id: &str, actor: &str) -> Option<String> {
    let i = node.gateway.get(&format!("/api/v1/incidents/{id}")).ok()?;
    let named = i["history"].as_array().is_some_and(|h| h.iter().any(|e| e["actor"] == actor));
    named.then(|| i["state"].as_str().map(str::to_owned)).flatten()
}

/// SPEC §9 "a fourth gateway joins": three gateways own the partitions, a gas leak is open at a
/// site of every partition; gw-d joins. The partitions rebalance by rendezvous hashing to include
/// it (each moves at most once: from its owner to gw-d), and nothing is lost or doubled: the
/// moved sites' incidents are adopted by gw-d with their ids, the operator acknowledges and
/// closes every one (through gw-d, which forwards to each owner), and the receiver has for every
/// device exactly one incident whose revisions run 1..n without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_gateway_joins_and_the_partitions_rebalance_with_nothing_lost_or_doubled() {
    let nats = NatsCluster::start(3, PARTITIONS).await.expect("3-node NATS cluster");
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let _a = gateway(&nats, "gw-a", &receiver).await;
    let _b = gateway(&nats, "gw-b", &receiver).await;
    let c = gateway(&nats, "gw-c", &receiver).await;
    let before = wait_owned(c.gateway.config_path(), &["gw-a", "gw-b", "gw-c"]).await;
    let publisher = Publisher::connect(&nats.nodes[0].mqtt_addr(), 100).await.expect("device connection");
    // One site per partition, a gas leak at each.
    let sites: Vec<String> = (0..PARTITIONS).map(|p| (0..10_000).map(|i| format!("join-{i}")).find(|s| partition_of(s, PARTITIONS) == p).expect("a site per partition")).collect();
    let mut seqs = vec![0u32; sites.len()];
    for (site, seq) in sites.iter().zip(seqs.iter_mut()) {
        let device = format!("{site}-gas-1");
        publisher.publish_json(&device_topic(site, &device, "status"), true, &birth("gas_detector", 60)).await.expect("status");
        gas_reading(&publisher, site, &device, seq, 55.0).await;
    }
    let mut ids = BTreeMap::new();
    for site in &sites {
        let device = format!("{site}-gas-1");
        let id = receiver.wait_for(SETTLE, "every site's gas leak", |d| d.iter().find(|d| d.device() == device && d.revision() == 1).map(|d| d.id().to_owned())).await;
        ids.insert(site.clone(), id);
    }

    let d = gateway(&nats, "gw-d", &receiver).await;
    let after = wait_owned_with(d.gateway.config_path(), &["gw-a", "gw-b", "gw-c", "gw-d"], &["gw-d"]).await;
    for (p, (was, is)) in before.iter().zip(&after).enumerate() {
        assert!(was == is || is == "gw-d", "partition {p} moved from {was} to {is}, not to the newcomer");
    }
    let moved: Vec<&String> = sites.iter().filter(|s| after[partition_of(s, PARTITIONS) as usize] == "gw-d").collect();
    assert!(!moved.is_empty(), "gw-d owns some partitions: {after:?}");
    // The leaks go on: the new owner must fold them into the adopted incidents, not open others.
    for _ in 0..3 {
        for (site, seq) in sites.iter().zip(seqs.iter_mut()) {
            gas_reading(&publisher, site, &format!("{site}-gas-1"), seq, 55.0).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for site in &moved {
        let id = &ids[*site];
        d.gateway.wait_for(SETTLE, "gw-d adopted the moved site's incident", |g| {
            g.get(&format!("/api/v1/incidents?site={site}&scope=local")).ok().filter(|l| l["incidents"].as_array().is_some_and(|l| l.iter().any(|i| i["id"] == id.as_str()))).map(|_| ())
        }).await;
    }
    // The operator ends every leak through gw-d (forwarded to each site's owner).
    for (site, id) in &ids {
        for action in ["ack", "resolve", "close"] {
            let (code, answer) = d.gateway.post(&format!("/api/v1/incidents/{id}/{action}"), &json!({"actor": "li"})).expect("transition through gw-d");
            assert_eq!(code, 200, "{action} of {id} at {site}: {answer}");
            let state = answer["state"].as_str().unwrap_or_default().to_owned();
            d.gateway.wait_for(SETTLE, "the change in gw-d's view", |g| g.get(&format!("/api/v1/incidents/{id}")).ok().filter(|i| i["state"] == state.as_str()).map(|_| ())).await;
        }
    }
    for id in ids.values() {
        receiver.wait_for(SETTLE, "every closed revision", |d| d.iter().find(|d| d.id() == id.as_str() && d.state() == "closed").map(|_| ())).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deliveries = receiver.deliveries();
    for (site, id) in &ids {
        let device = format!("{site}-gas-1");
        let for_device: BTreeSet<String> = deliveries.iter().filter(|d| d.device() == device).map(|d| d.id().to_owned()).collect();
        assert_eq!(for_device, BTreeSet::from([id.clone()]), "one incident for {device}:\n{}", receiver.report());
        let revisions = revisions_of(&deliveries, id);
        let n = revisions.keys().max().copied().unwrap_or(0);
        assert_eq!(revisions.keys().copied().collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>(), "{id}: every revision once, no gap:\n{}", receiver.report());
    }
}

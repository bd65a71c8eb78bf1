//! Cluster mode end to end (SPEC §9): three real nats-server nodes clustered on loopback (configs
//! from `citywatch cluster nats-config`), gateways joining with `[cluster]`, devices speaking MQTT
//! 3.1.1 to a NATS node, a webhook receiver per gateway so a test can tell who sent what.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use citywatch_gateway::cluster::nats_config::partition_of;
use citywatch_tests::{birth, citywatch_bin, device_topic, Delivery, GatewayProcess, NatsCluster, Publisher, QoS, Subscriber, WebhookReceiver, IDEMPOTENCY_HEADER};
use serde_json::{json, Value};

const SECRET: &str = "e2e-cluster-secret";
const PARTITIONS: u16 = 8;
const LEASE_TTL: &str = "3s";
const TTL: Duration = Duration::from_secs(3);
/// Bound of every "until the cluster has settled" wait.
const SETTLE: Duration = Duration::from_secs(60);

struct Node {
    name: String,
    gateway: GatewayProcess,
    receiver: WebhookReceiver,
}

async fn gateway(nats: &NatsCluster, name: &str) -> Node {
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let section = format!(
        "{}[[notify.webhook]]\nname = \"ops\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n[notify.retry]\ninitial = \"100ms\"\nmax = \"1s\"\n",
        nats.gateway_section(name, PARTITIONS, LEASE_TTL),
        receiver.url()
    );
    let gateway = GatewayProcess::start_cluster(&section).await.expect("cluster gateway");
    Node { name: name.to_owned(), gateway, receiver }
}

/// Three clustered NATS nodes, gateways gw-a and gw-b on them, and the partition owners once
/// both own some: the setup every test here starts from.
struct TwoGateways {
    nats: NatsCluster,
    a: Node,
    b: Node,
    owners: Vec<String>,
}

async fn two_gateways() -> TwoGateways {
    let nats = NatsCluster::start(3, PARTITIONS).await.expect("3-node NATS cluster");
    let a = gateway(&nats, "gw-a").await;
    let b = gateway(&nats, "gw-b").await;
    let owners = wait_owned(b.gateway.config_path(), &["gw-a", "gw-b"]).await;
    TwoGateways { nats, a, b, owners }
}

/// `citywatch cluster status --config F` as JSON.
fn status(config: &std::path::Path) -> anyhow::Result<Value> {
    let out = Command::new(citywatch_bin()).args(["cluster", "status", "--config"]).arg(config).output()?;
    anyhow::ensure!(out.status.success(), "cluster status failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Owner of every partition, once every partition has one among `expected` (and each of them owns some).
async fn wait_owned(config: &std::path::Path, expected: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + SETTLE;
    let mut last;
    loop {
        match status(config) {
            Err(e) => last = Value::String(format!("{e:#}")),
            Ok(s) => {
            let owners: Vec<String> = s["partitions"].as_array().map(|ps| ps.iter().map(|p| p["owner"].as_str().unwrap_or("").to_owned()).collect()).unwrap_or_default();
            let used: BTreeSet<&str> = owners.iter().map(String::as_str).collect();
            if owners.len() == PARTITIONS as usize && owners.iter().all(|o| expected.contains(&o.as_str())) && expected.iter().all(|e| used.contains(e)) {
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
    let TwoGateways { nats, a, b, owners } = two_gateways().await;
    let publisher = Publisher::connect(&nats.nodes[2].mqtt_addr(), 100).await.expect("device connection to NATS MQTT");
    for (owner, other) in [(&a, &b), (&b, &a)] {
        let site = site_owned_by(&owners, &owner.name, "fire-");
        let devices = [format!("{site}-smoke-1"), format!("{site}-smoke-2")];
        let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
        smoke_alarms(&publisher, &site, &refs).await;
        let fire = owner.receiver.wait_for(SETTLE, "fire_confirmed from the site's owner", |d| fires(d, &site).into_iter().next()).await;
        // Both detectors' alarms reached the owner (one partition per site), nothing the other.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(fires(&owner.receiver.deliveries(), &site), BTreeSet::from([fire.clone()]), "one fire incident");
        assert!(for_site(&other.receiver.deliveries(), &site).is_empty(), "the non-owner pushed: {:?}", for_site(&other.receiver.deliveries(), &site));
        let ids: Vec<String> = owner.receiver.deliveries().iter().filter(|d| d.site() == site).filter_map(|d| d.header(IDEMPOTENCY_HEADER).map(str::to_owned)).collect();
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
    let TwoGateways { nats, mut a, b, owners } = two_gateways().await;
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
    b.receiver.wait_for(SETTLE, "fire_confirmed from the new owner", |d| fires(d, &site).into_iter().next()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fires(&b.receiver.deliveries(), &site).len(), 1, "{:?}", for_site(&b.receiver.deliveries(), &site));
    assert!(a.receiver.deliveries().iter().all(|d| d.site() != site));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_paused_longer_than_the_lease_ttl_sends_nothing_for_the_partitions_it_lost() {
    let TwoGateways { nats, a, b, owners } = two_gateways().await;
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
    let fire = b.receiver.wait_for(SETTLE, "fire_confirmed from the new owner", |d| fires(d, &site).into_iter().next()).await;
    assert!(Command::new("kill").args(["-CONT", &pid]).status().expect("kill").success());
    // gw-a wakes with an expired lease: it must not push anything for the site.
    tokio::time::sleep(TTL * 2).await;
    let from_a = for_site(&a.receiver.deliveries(), &site);
    assert!(from_a.is_empty(), "the paused gateway pushed for a partition it lost: {from_a:?}");
    // And it rejoins: both members own partitions again.
    wait_owned(b.gateway.config_path(), &["gw-a", "gw-b"]).await;
    let per_id: BTreeMap<String, usize> = b.receiver.deliveries().iter().filter(|d| d.rule() == "fire_confirmed").fold(BTreeMap::new(), |mut m, d| {
        *m.entry(d.id().to_owned()).or_default() += 1;
        m
    });
    assert_eq!(per_id.keys().cloned().collect::<Vec<_>>(), vec![fire], "one fire incident");
}

//! Cluster mode on a closed NATS cluster (`citywatch cluster nats-config --gateway-user
//! --device-user`): three real nats-server nodes that know a gateway and a device user, two
//! gateways logging in with `[cluster] nats_user` and a password file. A device with the device
//! user keeps its contract (a fire reaches the webhook receiver, a command reaches it at QoS 1,
//! its Last Will goes out);
//! it cannot write into the incident log, the per-partition API or the lease bucket, nor read
//! replies on `_INBOX`; nobody gets in anonymously, with a wrong password, or on the other port.
//! A per-device account (`--accounts`) publishes and reads only its own device's topics.

use std::time::Duration;

use citywatch_gateway::cluster::nats_config::partition_of;
use citywatch_gateway::cluster::{forward::API_PREFIX, INCIDENT_PREFIX, INCIDENT_STREAM, LEASES_BUCKET};
use citywatch_tests::{birth, device_topic, Delivery, NatsCluster, NatsUsers, Publisher, QoS, Subscriber, WebhookReceiver};
use futures_util::StreamExt as _;
use serde_json::json;

const SECRET: &str = "e2e-cluster-auth-secret";
const PARTITIONS: u16 = 8;
const LEASE_TTL: &str = "3s";
/// Bound of every "until the cluster has settled" wait.
const SETTLE: Duration = Duration::from_secs(60);

const GATEWAY: (&str, &str) = ("gateway", "gw-e2e-password");
const DEVICE: (&str, &str) = ("device", "device-e2e-password");
/// A per-device account (`nats-config --accounts`): the device `closed-acct-gas-1` of the site
/// `closed-acct`.
const ACCOUNT: (&str, &str) = ("closed-acct-gas-1", "account-e2e-password");
const ACCOUNT_SITE: &str = "closed-acct";
/// An account without a site (`--accounts`): the operations centre's MQTT client.
const OPS: (&str, &str) = ("ops-centre", "ops-e2e-password");

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn fire_of(deliveries: &[Delivery], site: &str) -> Option<String> {
    deliveries.iter().find(|d| d.rule() == "fire_confirmed" && d.site() == site).map(|d| d.id().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_cluster_serves_the_device_user_its_contract_and_refuses_every_other_way_in() {
    let account = citywatch_gateway::sources::config::MqttUser {
        username: ACCOUNT.0.into(),
        password: ACCOUNT.1.into(),
        site: Some(ACCOUNT_SITE.into()),
        device: Some(ACCOUNT.0.into()),
    };
    let ops = citywatch_gateway::sources::config::MqttUser { username: OPS.0.into(), password: OPS.1.into(), site: None, device: None };
    let users = NatsUsers { gateway: (GATEWAY.0.into(), GATEWAY.1.into()), device: (DEVICE.0.into(), DEVICE.1.into()), accounts: vec![account, ops] };
    let nats = NatsCluster::start_closed(3, PARTITIONS, users).await.expect("closed 3-node NATS cluster");
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    // The gateways log in (connect, streams, leases) and so does `cluster status`, which
    // start_gateways polls until every partition has an owner.
    let (gateways, owners) = nats
        .start_gateways(&["gw-a", "gw-b"], &receiver, SECRET, PARTITIONS, LEASE_TTL, SETTLE, "[notify.mqtt]\n")
        .await
        .unwrap_or_else(|e| panic!("gateways with the gateway user: {e:#}\n{}", nats.logs()));

    // Nobody else gets in: not anonymously, not with a wrong password, not with the gateway user
    // on the MQTT port (CONNACK 5), not with the device user or anonymously on the client port.
    let mqtt = nats.nodes[1].mqtt_addr();
    for (who, credentials) in [("anonymous", None), ("a wrong password", Some((DEVICE.0, "not-the-password"))), ("the gateway user", Some(GATEWAY))] {
        let refused = Publisher::connect_as(&mqtt, credentials, 10).await.map(|_| ()).expect_err(who);
        assert!(format!("{refused:#}").contains("NotAuthorized"), "{who} on MQTT: {refused:#}");
    }
    let device_on_nats = async_nats::ConnectOptions::new().user_and_password(DEVICE.0.into(), DEVICE.1.into()).connect(nats.nodes[0].url()).await;
    assert!(device_on_nats.is_err(), "the device user on the NATS client port was let in");
    assert!(async_nats::connect(nats.nodes[0].url()).await.is_err(), "an anonymous NATS client was let in");

    // The operations centre's MQTT client, an account without a site, reads the MQTT push
    // channel ([notify.mqtt], QoS 1 on citywatch/v1/ops/incidents) of whichever gateway delivers.
    let mut ops_feed = Subscriber::connect_with_credentials(&nats.nodes[0].mqtt_addr(), OPS.0, OPS.1, "citywatch/v1/ops/#", QoS::AtLeastOnce)
        .await
        .expect("the ops account subscribes to the ops topics");

    // The device contract with the device user: retained status, QoS 1 events → fire_confirmed.
    let mut device = Publisher::connect_as(&nats.nodes[2].mqtt_addr(), Some(DEVICE), 100).await.expect("the device user connects by MQTT");
    let site = "closed-fire";
    for d in ["closed-fire-smoke-1", "closed-fire-smoke-2"] {
        device.publish_json(&device_topic(site, d, "status"), true, &birth("smoke_detector", 60)).await.expect("status");
    }
    for (i, d) in ["closed-fire-smoke-1", "closed-fire-smoke-2"].iter().enumerate() {
        let alarm = json!({"seq": 1, "ts": now_ms() + i as i64, "event": "alarm", "metric": "smoke_db_m", "value": 0.4});
        device.publish_json(&device_topic(site, d, "event"), false, &alarm).await.expect("alarm");
    }
    let fire = receiver.wait_for(SETTLE, "fire_confirmed of the closed cluster's site", |d| fire_of(d, site)).await;
    let pushed = ops_feed
        .recv_matching(SETTLE, |m| m.json().is_ok_and(|i| i["id"] == fire.as_str()))
        .await
        .expect("the fire on the ops topic, through the MQTT channel");
    assert_eq!((pushed.topic.as_str(), pushed.qos), ("citywatch/v1/ops/incidents", QoS::AtLeastOnce));

    // ... and a command back at QoS 1 on a subscription of the device user.
    let (kitchen, gas) = ("closed-kitchen", "closed-kitchen-gas-1");
    let mut cmds = Subscriber::connect_with_credentials(&nats.nodes[0].mqtt_addr(), DEVICE.0, DEVICE.1, &device_topic(kitchen, gas, "cmd"), QoS::AtLeastOnce)
        .await
        .expect("the device user subscribes to its cmd topic");
    device.publish_json(&device_topic(kitchen, gas, "status"), true, &birth("gas_detector", 60)).await.expect("status");
    let leak = json!({"seq": 1, "ts": now_ms(), "event": "alarm", "metric": "gas_lel", "value": 55.0});
    device.publish_json(&device_topic(kitchen, gas, "event"), false, &leak).await.expect("leak");
    let cmd = cmds.recv_matching(SETTLE, |m| m.json().is_ok_and(|c| c["cmd"] == "close_valve")).await.expect("close_valve reached the device");
    assert_eq!(cmd.qos, QoS::AtLeastOnce, "commands reach devices at QoS 1");

    // Forgeries by the device user: an incident into the log, an operator request on the
    // per-partition API, a lease. Watched by a gateway-user client on every subject they would
    // reach; a permitted publish of the same device connection after them is the barrier (one
    // connection's messages reach a subscriber in order). The watcher is on the device's node:
    // its interest is known there once flushed (on another node it would reach the device's
    // node through the route some time later, and a leak before that would go unseen).
    let watcher = async_nats::ConnectOptions::new()
        .user_and_password(GATEWAY.0.into(), GATEWAY.1.into())
        .connect(nats.nodes[2].url())
        .await
        .expect("gateway-user watcher");
    let citywatch = watcher.subscribe("citywatch.>").await.expect("subscribe citywatch.>");
    let leases = watcher.subscribe(format!("$KV.{LEASES_BUCKET}.>")).await.expect("subscribe the lease bucket");
    watcher.flush().await.expect("flush");
    let forged = json!({"id": "forged-1", "site": site, "rule": "fire_confirmed", "state": "active", "revision": 1});
    // Six QoS 1 publishes so far (statuses, alarms, the leak): all acknowledged first, so the
    // count below is the forgeries' and the barrier's.
    device.wait_acked(6, SETTLE).await.expect("PUBACKs of the device's contract messages");
    device.publish_json("citywatch/incidents/0/forged-1", false, &forged).await.expect("forged incident");
    device.publish_json("citywatch/api/0", false, &json!({"forged": "operator request"})).await.expect("forged request");
    device.publish(&format!("$KV/{LEASES_BUCKET}/p-0"), QoS::AtLeastOnce, false, b"mallory".to_vec()).await.expect("forged lease");
    let barrier = json!({"seq": 2, "ts": now_ms(), "values": {"gas_lel": 1.0}});
    device.publish_json(&device_topic(kitchen, gas, "telemetry"), false, &barrier).await.expect("barrier");

    let mut seen = futures_util::stream::select(citywatch, leases);
    let mut leaked = Vec::new();
    let waited = tokio::time::timeout(SETTLE, async {
        while let Some(m) = seen.next().await {
            let subject = m.subject.as_str();
            if subject.ends_with(&format!("{kitchen}.{gas}.telemetry")) {
                return;
            }
            let forged_incident = subject.starts_with(INCIDENT_PREFIX) && subject.ends_with("forged-1");
            let forged_request = subject.starts_with(API_PREFIX) && m.payload.as_ref() == br#"{"forged":"operator request"}"#;
            let forged_lease = m.payload.as_ref() == b"mallory";
            if forged_incident || forged_request || forged_lease {
                leaked.push(subject.to_owned());
            }
        }
    })
    .await;
    assert!(waited.is_ok(), "the barrier after the forgeries never arrived");
    assert!(leaked.is_empty(), "the device user's forgeries reached {leaked:?}");
    // The incident log holds nothing under the forged subject, and nothing was pushed for it.
    // (The decisive check for the incident: with the device user allowed to publish there, the
    // log held the forgery while the watcher above did not always see it before the barrier.)
    let js = async_nats::jetstream::new(watcher.clone());
    let log = js.get_stream(INCIDENT_STREAM).await.expect("incident log");
    assert!(log.get_last_raw_message_by_subject(&format!("{INCIDENT_PREFIX}.0.forged-1")).await.is_err(), "a forged incident is in the log");
    assert!(receiver.deliveries().iter().all(|d| d.id() != "forged-1"), "a forged incident was pushed");
    // nats-server neither disconnects an MQTT client for a denied publish nor tells it: the
    // QoS 1 forgeries were PUBACKed like the barrier (and dropped).
    device.wait_acked(10, SETTLE).await.expect("PUBACKs of the forgeries and the barrier");

    // A device message published straight onto another partition than its site's (the device
    // user may: nats-server checks its permissions on the mapped subject) would put the site in
    // two owners' hands: the wrong partition's owner drops it and counts it.
    let stray = "closed-stray";
    let wrong = (partition_of(stray, PARTITIONS) + 1) % PARTITIONS;
    let stray_alarm = json!({"seq": 1, "ts": now_ms(), "event": "alarm", "metric": "gas_lel", "value": 60.0});
    device.publish_json(&format!("citywatch/part/{wrong}/{stray}/closed-stray-gas-1/event"), false, &stray_alarm).await.expect("alarm onto another partition");
    let owner = gateways.iter().zip(["gw-a", "gw-b"]).find(|(_, name)| owners[usize::from(wrong)] == *name).map(|(g, _)| g).expect("the wrong partition's owner");
    let series = format!("citywatch_cluster_partition_misrouted_total{{partition=\"{wrong}\"}}");
    citywatch_tests::wait_for("the wrong partition's owner counting the stray message", SETTLE, || {
        (citywatch_tests::figures::metric_series(&owner.get_text("/metrics").ok()?, &series) >= 1.0).then_some(())
    })
    .await
    .expect("the misrouted message counted");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(receiver.deliveries().iter().all(|d| d.body["site"] != stray), "an incident of the stray message was pushed");

    // A per-device account (`--accounts`, the embedded broker's [[mqtt.users]]) speaks only for
    // its own device on its site's own partition: another device of its site, a device of
    // another site and its own device on another partition are denied (dropped, PUBACKed all the
    // same); its own status and telemetry go through. The barrier is its own telemetry again.
    let mut acct = Publisher::connect_as(&nats.nodes[2].mqtt_addr(), Some(ACCOUNT), 100).await.expect("the device account connects by MQTT");
    let mut reports = watcher.subscribe("citywatch.part.>").await.expect("subscribe the partitions");
    watcher.flush().await.expect("flush");
    let home = partition_of(ACCOUNT_SITE, PARTITIONS);
    let away = (home + 1) % PARTITIONS;
    let reading = |seq: u32| json!({"seq": seq, "ts": now_ms(), "values": {"gas_lel": 1.0}});
    acct.publish_json(&device_topic(ACCOUNT_SITE, ACCOUNT.0, "status"), true, &birth("gas_detector", 60)).await.expect("own status");
    acct.publish_json(&device_topic(ACCOUNT_SITE, "closed-acct-gas-2", "telemetry"), false, &reading(1)).await.expect("as a neighbour");
    acct.publish_json(&device_topic("closed-other", "closed-other-gas-1", "telemetry"), false, &reading(1)).await.expect("as another site");
    acct.publish_json(&format!("citywatch/part/{away}/{ACCOUNT_SITE}/{}/telemetry", ACCOUNT.0), false, &reading(2)).await.expect("elsewhere");
    acct.publish_json(&device_topic(ACCOUNT_SITE, ACCOUNT.0, "telemetry"), false, &reading(3)).await.expect("own telemetry");
    let own = |ch: &str| format!("citywatch.part.{home}.{ACCOUNT_SITE}.{}.{ch}", ACCOUNT.0);
    let mut through = Vec::new();
    let waited = tokio::time::timeout(SETTLE, async {
        while let Some(m) = reports.next().await {
            let subject = m.subject.as_str();
            if subject.contains("closed-acct") || subject.contains("closed-other") {
                through.push(subject.to_owned());
            }
            if subject == own("telemetry") {
                return;
            }
        }
    })
    .await;
    assert!(waited.is_ok(), "the account's own telemetry never arrived; seen {through:?}");
    // (The relay republishes each QoS 1 message into the ingest stream on the same subject, so
    // one may be seen twice.)
    let allowed = [own("status"), own("telemetry")];
    assert!(through.contains(&own("status")) && through.iter().all(|s| allowed.contains(s)), "only the account's own device on its own partition goes through: {through:?}");
    acct.wait_acked(5, SETTLE).await.expect("PUBACKs of the account's publishes, denied ones too");
    let cmd = device_topic(ACCOUNT_SITE, ACCOUNT.0, "cmd");
    Subscriber::connect_with_credentials(&mqtt, ACCOUNT.0, ACCOUNT.1, &cmd, QoS::AtLeastOnce).await.expect("the account reads its own commands");
    for filter in [device_topic(ACCOUNT_SITE, "closed-acct-gas-2", "cmd"), format!("citywatch/v1/{ACCOUNT_SITE}/+/cmd"), "citywatch/v1/ops/#".into()] {
        let refused = Subscriber::connect_with_credentials(&mqtt, ACCOUNT.0, ACCOUNT.1, &filter, QoS::AtLeastOnce).await.map(|_| ()).expect_err(&filter);
        assert!(format!("{refused:#}").contains("refused"), "{filter}: {refused:#}");
    }

    // The Last Will of a device that vanishes (no DISCONNECT) is a publish of the device user
    // on its status topic: let through, onto the site's partition.
    let will_device = "closed-kitchen-will-1";
    let mut wills = watcher.subscribe(format!("citywatch.part.*.{kitchen}.{will_device}.status")).await.expect("subscribe the will's subject");
    watcher.flush().await.expect("flush");
    let (host, port) = citywatch_tests::split_addr(&nats.nodes[2].mqtt_addr()).expect("mqtt address");
    let mut options = rumqttc::MqttOptions::new(will_device, host, port);
    options.set_credentials(DEVICE.0, DEVICE.1);
    let offline = json!({"state": "offline"}).to_string();
    options.set_last_will(rumqttc::LastWill::new(device_topic(kitchen, will_device, "status"), offline.clone(), QoS::AtLeastOnce, true));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let connack = tokio::time::timeout(SETTLE, eventloop.poll()).await.expect("CONNACK in time").expect("the device user connects with a Last Will");
    assert!(matches!(connack, rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))), "{connack:?}");
    // Dropping the event loop closes the socket without DISCONNECT: the server sends the Will.
    drop((client, eventloop));
    let will = tokio::time::timeout(SETTLE, wills.next()).await.expect("the Last Will in time").expect("subscription open");
    assert_eq!(String::from_utf8_lossy(&will.payload), offline, "{}", will.subject);

    // What the device user may not read: replies to other clients' requests, the incident log,
    // the API requests, other devices' reports.
    for filter in ["_INBOX/#", "citywatch/incidents/#", "citywatch/api/#", "citywatch/v1/+/+/event"] {
        let refused = Subscriber::connect_with_credentials(&mqtt, DEVICE.0, DEVICE.1, filter, QoS::AtLeastOnce).await.map(|_| ()).expect_err(filter);
        assert!(format!("{refused:#}").contains("refused"), "{filter}: {refused:#}");
    }
}

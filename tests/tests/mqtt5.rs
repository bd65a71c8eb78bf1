//! MQTT 3.1.1 and 5.0 devices against the real `citywatch` binary's embedded broker (issue 15).
//!
//! The devices are Eclipse Paho (Python, PyPI `paho-mqtt` 2.x) clients and `mosquitto_pub -V
//! mqttv5`: third-party implementations, so these tests check what a vendor's device sees.
//! 1. The whole device contract (SPEC §3) for v5, v3.1.1 and keep-alive-0 devices: retained
//!    status birth, telemetry and events with PUBACK, `close_valve` on their `cmd` topic when
//!    gas reaches 50 %LEL, the Last Will when the link drops.
//! 2. The broker behaviours the contract leans on: retained messages, `$`-topics kept out of
//!    `#`, overlapping subscriptions, unsubscribe, topic aliases, persistent sessions with QoS 1
//!    redelivery, session expiry 0 vs > 0, will delay, shared subscriptions, maximum packet size.
//! 3. A quiet start: no ERROR in the gateway's log (its readiness probe used to cause one).

use std::time::Duration;

use citywatch_tests::{GatewayProcess, PahoDevice, PahoOptions};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn gateway() -> GatewayProcess {
    GatewayProcess::start_embedded("").await.expect("gateway starts")
}

fn broker(gw: &GatewayProcess) -> String {
    gw.mqtt_addr().expect("embedded broker").to_owned()
}

/// A tool on the side that watches topics (anonymous embedded broker: no ACL).
async fn watcher(gw: &GatewayProcess, id: &str, filters: &[&str]) -> PahoDevice {
    let mut w = PahoDevice::connect(&broker(gw), "watch", id, &PahoOptions::v5()).await.expect("watcher connects");
    for f in filters {
        assert_eq!(w.subscribe(f, 1).await.expect("watcher subscribes"), vec![1], "{f}");
    }
    w
}

async fn wait_message(dev: &PahoDevice, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    dev.wait_event(WAIT, what, |e| e["ev"] == "message" && pred(e)).await.unwrap_or_else(|e| panic!("{e}"))
}

fn no_error_logged(gw: &GatewayProcess) {
    let logs = gw.logs();
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "the gateway logged errors:\n{}", errors.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_v311_and_keepalive_0_devices_speak_the_whole_contract() {
    let gw = gateway().await;
    let site = "mq5";
    let mut watch = watcher(&gw, "mq5-watch", &[&format!("citywatch/v1/{site}/+/status")]).await;
    let kinds: [(&str, PahoOptions); 4] = [
        ("mq5-gas-v5", PahoOptions::v5()),
        ("mq5-gas-v311", PahoOptions::v311()),
        ("mq5-gas-v5-ka0", PahoOptions { keepalive: 0, ..PahoOptions::v5() }),
        ("mq5-gas-v311-ka0", PahoOptions { keepalive: 0, ..PahoOptions::v311() }),
    ];
    let mut devices = Vec::new();
    for (device, opts) in &kinds {
        let mut d = PahoDevice::connect(&broker(&gw), site, device, opts).await.expect("device connects");
        assert_eq!(d.connack(), Some((0, false)), "{device}: CONNACK accepted");
        assert_eq!(d.subscribe(&d.topic("cmd"), 1).await.expect("subscribe cmd"), vec![1], "{device}");
        d.birth("gas_detector").await.expect("birth PUBACKed");
        gw.wait_for(WAIT, &format!("{device} registered"), |gw| gw.get(&format!("/api/v1/devices/{device}")).ok()).await;
        let quiet = json!({"seq": 1, "ts": now_ms(), "values": {"gas_lel": 3.0, "valve_closed": 0}, "battery_v": 3.0, "rssi_dbm": -70});
        d.publish("telemetry", &quiet, 1, false, None).await.expect("telemetry PUBACKed");
        let event = json!({"seq": 2, "ts": now_ms(), "event": "self_test_ok"});
        d.publish("event", &event, 1, false, None).await.expect("event PUBACKed");
        devices.push(d);
    }
    // Every birth is retained: a late subscriber sees all four with the retain flag.
    let late = watcher(&gw, "mq5-late", &[&format!("citywatch/v1/{site}/+/status")]).await;
    for (device, _) in &kinds {
        let m = wait_message(&late, &format!("retained birth of {device}"), |m| m["topic"] == format!("citywatch/v1/{site}/{device}/status")).await;
        assert_eq!((m["retain"].as_bool(), m["body"]["state"].as_str()), (Some(true), Some("online")), "{m}");
    }
    // gas_high (≥ 50 %LEL) closes the valve: the command reaches each device on its cmd topic.
    for d in &mut devices {
        let leak = json!({"seq": 3, "ts": now_ms(), "values": {"gas_lel": 55.0, "valve_closed": 0}});
        d.publish("telemetry", &leak, 1, false, None).await.expect("leak PUBACKed");
    }
    for d in &devices {
        let cmd = wait_message(d, "close_valve", |m| m["body"]["cmd"] == "close_valve").await;
        assert_eq!(cmd["topic"], d.topic("cmd"), "{cmd}");
        assert!(cmd["body"]["id"].as_str().is_some_and(|id| id.starts_with("c-")), "{cmd}");
    }
    // A dropped link (no DISCONNECT) publishes the Last Will: `offline`, retained.
    for d in devices {
        let topic = d.topic("status");
        d.kill().await;
        wait_message(&watch, &format!("Last Will on {topic}"), |m| m["topic"] == topic.as_str() && m["body"]["state"] == "offline").await;
    }
    // mosquitto_pub -V mqttv5 (QoS 1: it exits 0 only after the PUBACK).
    let (host, port) = broker(&gw).rsplit_once(':').map(|(h, p)| (h.to_owned(), p.to_owned())).expect("host:port");
    let topic = format!("citywatch/v1/{site}/mq5-mosq/status");
    let birth = json!({"state": "online", "kind": "smoke_detector", "fw": "0.1.0", "interval_s": 60}).to_string();
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-V", "mqttv5", "-h", &host, "-p", &port, "-i", "mq5-mosq", "-q", "1", "-r", "-t", &topic, "-m", &birth])
        .output()
        .await
        .expect("mosquitto_pub runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    gw.wait_for(WAIT, "mq5-mosq registered", |gw| gw.get("/api/v1/devices/mq5-mosq").ok()).await;
    wait_message(&watch, "the mosquitto v5 birth", |m| m["topic"] == topic.as_str()).await;
    let _ = watch.unsubscribe(&format!("citywatch/v1/{site}/+/status")).await;
    no_error_logged(&gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_behaves_as_mqtt_5_and_3_1_1_say() {
    let gw = gateway().await;
    let site = "beh";
    let addr = broker(&gw);

    // `$`-topics are not matched by `#` (MQTT 5 §4.7.2, 3.1.1 §4.7.2); overlapping subscriptions
    // deliver at the highest QoS granted; unsubscribe stops delivery.
    let mut all = watcher(&gw, "beh-all", &["#"]).await;
    let mut dev = PahoDevice::connect(&addr, site, "beh-dev", &PahoOptions::v5()).await.expect("device");
    let mut tool = PahoDevice::connect(&addr, "tool", "beh-tool", &PahoOptions::v311()).await.expect("tool");
    assert_eq!(tool.subscribe("$beh/#", 1).await.expect("sub"), vec![1]);
    assert_eq!(all.subscribe(&format!("citywatch/v1/{site}/+/telemetry"), 1).await.expect("sub"), vec![1]);
    dev.publish("telemetry", &json!({"seq": 1}), 1, false, None).await.expect("telemetry");
    wait_message(&all, "telemetry through overlapping filters", |m| m["body"]["seq"] == 1).await;
    // A `$` topic: only the explicit `$beh/#` subscriber gets it.
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", addr.rsplit_once(':').expect("addr").0, "-p", addr.rsplit_once(':').expect("addr").1, "-q", "1", "-t", "$beh/x", "-m", "\"dollar\""])
        .output()
        .await
        .expect("mosquitto_pub");
    assert!(out.status.success());
    wait_message(&tool, "$beh/x", |m| m["topic"] == "$beh/x").await;
    all.unsubscribe("#").await.expect("unsubscribe");
    all.unsubscribe(&format!("citywatch/v1/{site}/+/telemetry")).await.expect("unsubscribe");
    dev.publish("telemetry", &json!({"seq": 2}), 1, false, None).await.expect("telemetry");
    // Topic aliases (v5): the alias is set with the topic, then used alone.
    dev.publish("telemetry", &json!({"seq": 3}), 1, false, Some((1, false))).await.expect("alias set");
    dev.publish("telemetry", &json!({"seq": 4}), 1, false, Some((1, true))).await.expect("alias used");
    assert_eq!(tool.subscribe(&format!("citywatch/v1/{site}/+/telemetry"), 1).await.expect("sub"), vec![1]);
    dev.publish("telemetry", &json!({"seq": 5}), 1, false, Some((1, true))).await.expect("alias used");
    let m = wait_message(&tool, "aliased publish", |m| m["body"]["seq"] == 5).await;
    assert_eq!(m["topic"], dev.topic("telemetry"));
    let seen: Vec<Value> = all.messages().into_iter().filter(|m| m["topic"] == dev.topic("telemetry")).collect();
    assert!(seen.iter().all(|m| m["qos"] == 1), "overlapping subscriptions at QoS 1: {seen:?}");
    assert!(seen.iter().any(|m| m["body"]["seq"] == 1) && !seen.iter().any(|m| m["body"]["seq"] == 2), "unsubscribed: {seen:?}");
    assert!(!all.messages().iter().any(|m| m["topic"].as_str().is_some_and(|t| t.starts_with('$'))), "`#` matched a `$` topic");

    // Persistent session (v5 clean start 0, session expiry > 0): QoS 1 messages published while
    // the device is away are delivered when it comes back; with expiry 0 the session is gone.
    let keep = PahoOptions { clean: false, session_expiry: 300, ..PahoOptions::v5() };
    let mut p = PahoDevice::connect(&addr, site, "beh-persist", &keep).await.expect("persistent device");
    assert_eq!(p.subscribe(&p.topic("cmd"), 1).await.expect("sub"), vec![1]);
    let cmd_topic = p.topic("cmd");
    p.disconnect().await.expect("disconnect");
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-V", "mqttv5", "-h", addr.rsplit_once(':').expect("addr").0, "-p", addr.rsplit_once(':').expect("addr").1, "-q", "1", "-t", &cmd_topic, "-m", "{\"id\":\"c-away\",\"cmd\":\"self_test\"}"])
        .output()
        .await
        .expect("mosquitto_pub");
    assert!(out.status.success());
    let back = PahoDevice::connect(&addr, site, "beh-persist", &keep).await.expect("reconnects");
    assert_eq!(back.connack(), Some((0, true)), "session present");
    let m = wait_message(&back, "the QoS 1 message queued while away", |m| m["body"]["id"] == "c-away").await;
    assert_eq!(m["qos"], 1);
    back.disconnect().await.expect("disconnect");
    let gone = PahoDevice::connect(&addr, site, "beh-persist", &PahoOptions { clean: false, session_expiry: 0, ..PahoOptions::v5() })
        .await
        .expect("reconnects");
    assert_eq!(gone.connack(), Some((0, true)), "the 300 s session is still there");
    gone.disconnect().await.expect("disconnect");
    let fresh = PahoDevice::connect(&addr, site, "beh-persist", &PahoOptions { clean: false, ..PahoOptions::v5() }).await.expect("reconnects");
    assert_eq!(fresh.connack(), Some((0, false)), "session expiry 0 ended the session at disconnect");
    fresh.disconnect().await.expect("disconnect");

    // Will delay (v5): a device that comes back within the delay sends no Will; one that does
    // not, does.
    let mut wills = watcher(&gw, "beh-wills", &[&format!("citywatch/v1/{site}/+/status")]).await;
    let delayed = PahoOptions { will_delay: 3600, session_expiry: 3600, clean: false, ..PahoOptions::v5() };
    let d = PahoDevice::connect(&addr, site, "beh-delay", &delayed).await.expect("device");
    d.kill().await;
    let d = PahoDevice::connect(&addr, site, "beh-delay", &delayed).await.expect("back within the delay");
    d.disconnect().await.expect("disconnect");
    let short = PahoOptions { will_delay: 1, session_expiry: 60, clean: false, ..PahoOptions::v5() };
    let s = PahoDevice::connect(&addr, site, "beh-short", &short).await.expect("device");
    s.kill().await;
    wait_message(&wills, "the delayed Will", |m| m["topic"] == format!("citywatch/v1/{site}/beh-short/status")).await;
    assert!(
        !wills.messages().iter().any(|m| m["topic"] == format!("citywatch/v1/{site}/beh-delay/status")),
        "a device back within its will delay must not be reported offline"
    );

    // Shared subscriptions: each message goes to one member of the group.
    let mut a = PahoDevice::connect(&addr, "tool", "beh-share-a", &PahoOptions::v5()).await.expect("a");
    let mut b = PahoDevice::connect(&addr, "tool", "beh-share-b", &PahoOptions::v5()).await.expect("b");
    let shared = format!("$share/g/citywatch/v1/{site}/beh-dev/event");
    assert_eq!(a.subscribe(&shared, 1).await.expect("sub"), vec![1]);
    assert_eq!(b.subscribe(&shared, 1).await.expect("sub"), vec![1]);
    for seq in 0..20 {
        dev.publish("event", &json!({"seq": seq, "event": "self_test_ok"}), 1, false, None).await.expect("event");
    }
    let total = || a.messages().len() + b.messages().len();
    let deadline = tokio::time::Instant::now() + WAIT;
    while total() < 20 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(total(), 20, "each shared message exactly once across the group");

    // Maximum packet size: a PUBLISH over the limit closes the connection; nothing is delivered.
    let huge = json!({"seq": 99, "pad": "x".repeat(200 * 1024)});
    let _ = wills.unsubscribe(&format!("citywatch/v1/{site}/+/status")).await;
    let mut big = PahoDevice::connect(&addr, site, "beh-big", &PahoOptions::v5()).await.expect("device");
    let _ = big.publish("telemetry", &huge, 1, false, None).await;
    big.wait_event(WAIT, "disconnect after an oversize packet", |e| e["ev"] == "disconnect").await.expect("closed");
    assert!(!tool.messages().iter().any(|m| m["body"]["seq"] == 99), "the oversize message was routed");
    no_error_logged(&gw);
}

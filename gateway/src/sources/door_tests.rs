//! The door: packet framing and ACL verdicts as pure functions, then the real embedded broker
//! with real clients (mosquitto_pub / mosquitto_sub in MQTT 3.1.1 and 5, rumqttc) over TCP and TLS.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::*;
use crate::sources::config::{MqttConfig, MqttMode};
use crate::ingest::Inbound;
use crate::sources::broker::EmbeddedBroker;

const WAIT: Duration = Duration::from_secs(10);

fn user(name: &str, site: Option<&str>, device: Option<&str>) -> MqttUser {
    MqttUser { username: name.into(), password: format!("{name}-pw"), site: site.map(Into::into), device: device.map(Into::into) }
}

fn accounts() -> Vec<MqttUser> {
    vec![user("gas-1-acct", Some("xh"), Some("gas-1")), user("pd-site", Some("pd"), None), user("tool", None, None)]
}

fn str_field(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        v.push(byte);
        if len == 0 {
            break;
        }
    }
    v.extend_from_slice(body);
    v
}

fn connect(client_id: &str, username: Option<&str>, will: Option<&str>) -> Vec<u8> {
    let mut flags = 0x02u8;
    let mut body = str_field("MQTT");
    if will.is_some() {
        flags |= 0x04;
    }
    if username.is_some() {
        flags |= 0xC0;
    }
    body.extend_from_slice(&[4, flags, 0, 30]);
    body.extend(str_field(client_id));
    if let Some(w) = will {
        body.extend(str_field(w));
        body.extend(str_field("offline"));
    }
    if let Some(u) = username {
        body.extend(str_field(u));
        body.extend(str_field("pw"));
    }
    packet(0x10, &body)
}

fn publish(topic: &str) -> Vec<u8> {
    let mut body = str_field(topic);
    body.extend_from_slice(b"{}");
    packet(0x30, &body)
}

fn subscribe(filter: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend(str_field(filter));
    body.push(1);
    packet(0x82, &body)
}

/// Runs packets through `check` as the door would; the first verdict that is not Ok.
fn verdict(acl: &Acl, packets: &[Vec<u8>]) -> Result<(), End> {
    let mut session = None;
    for p in packets {
        let (header, total) = frame(p, 64 * 1024).expect("well formed").expect("complete");
        assert_eq!(total, p.len());
        check(p[0], &p[header..], &mut session, acl)?;
    }
    Ok(())
}

#[test]
fn frames_are_cut_whole_and_bounded() {
    let p = publish("citywatch/v1/xh/gas-1/telemetry");
    assert_eq!(frame(&p[..1], 1024), Ok(None));
    assert_eq!(frame(&p[..p.len() - 1], 1024), Ok(None));
    assert_eq!(frame(&p, 1024), Ok(Some((2, p.len()))));
    let big = packet(0x30, &vec![0u8; 300]);
    assert_eq!(frame(&big, 1024), Ok(Some((3, 303))));
    assert!(frame(&big, 100).is_err(), "larger than allowed");
    assert!(frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX).is_err(), "5-byte length");
}

#[test]
fn per_device_account_stays_in_its_topics() {
    let acl = Acl::new(&accounts());
    let me = connect("gas-1", Some("gas-1-acct"), Some("citywatch/v1/xh/gas-1/status"));
    let impostor = connect("gas-2", Some("gas-1-acct"), None);
    assert!(matches!(verdict(&acl, &[impostor]), Err(End::Denied("connect", _))), "client id of another device");
    for ch in ["status", "telemetry", "event"] {
        assert_eq!(verdict(&acl, &[me.clone(), publish(&format!("citywatch/v1/xh/gas-1/{ch}"))]), Ok(()), "{ch}");
    }
    assert_eq!(verdict(&acl, &[me.clone(), subscribe("citywatch/v1/xh/gas-1/cmd")]), Ok(()));
    for topic in ["citywatch/v1/xh/gas-2/telemetry", "citywatch/v1/pd/gas-1/telemetry", "citywatch/v1/xh/gas-1/cmd", "citywatch/v1/xh/gas-1/telemetry/x", "citywatch/v1/ops/incidents"] {
        assert!(matches!(verdict(&acl, &[me.clone(), publish(topic)]), Err(End::Denied("publish", _))), "{topic}");
    }
    for filter in ["#", "citywatch/v1/#", "citywatch/v1/xh/+/cmd", "citywatch/v1/xh/gas-2/cmd", "citywatch/v1/xh/gas-1/#"] {
        assert!(matches!(verdict(&acl, &[me.clone(), subscribe(filter)]), Err(End::Denied("subscribe", _))), "{filter}");
    }
    let foreign_will = connect("gas-1", Some("gas-1-acct"), Some("citywatch/v1/xh/gas-2/status"));
    assert!(matches!(verdict(&acl, &[foreign_will]), Err(End::Denied("connect", _))));
}

#[test]
fn per_site_account_is_the_device_of_its_client_id() {
    let acl = Acl::new(&accounts());
    let smk = connect("smk-9", Some("pd-site"), None);
    assert_eq!(verdict(&acl, &[smk.clone(), publish("citywatch/v1/pd/smk-9/event"), subscribe("citywatch/v1/pd/smk-9/cmd")]), Ok(()));
    assert!(matches!(verdict(&acl, &[smk.clone(), publish("citywatch/v1/pd/smk-8/event")]), Err(End::Denied("publish", _))));
    assert!(matches!(verdict(&acl, &[smk, publish("citywatch/v1/xh/smk-9/event")]), Err(End::Denied("publish", _))));
    let bad_id = connect("smk/9", Some("pd-site"), None);
    assert!(matches!(verdict(&acl, &[bad_id]), Err(End::Denied("connect", _))));
}

#[test]
fn unrestricted_unknown_and_broken_clients() {
    let acl = Acl::new(&accounts());
    let tool = connect("t", Some("tool"), Some("anywhere"));
    assert_eq!(verdict(&acl, &[tool, publish("anything/at/all"), subscribe("#")]), Ok(()));
    let stranger = connect("s", Some("stranger"), None);
    assert!(verdict(&acl, std::slice::from_ref(&stranger)).is_ok(), "the CONNECT goes on so rumqttd refuses it properly");
    assert!(matches!(verdict(&acl, &[stranger, publish("citywatch/v1/xh/gas-1/telemetry")]), Err(End::Denied("publish", _))));
    assert!(matches!(verdict(&acl, &[publish("citywatch/v1/xh/gas-1/telemetry")]), Err(End::Malformed(_))), "CONNECT first");
    assert!(matches!(verdict(&acl, &[connect("a", Some("tool"), None), connect("a", Some("tool"), None)]), Err(End::Malformed(_))));
    // No accounts at all (TLS only): anonymous devices, no ACL.
    assert_eq!(verdict(&Acl::new(&[]), &[connect("a", None, None), publish("x/y"), subscribe("#")]), Ok(()));
}

fn connect_v5(client_id: &str, username: &str) -> Vec<u8> {
    let mut body = str_field("MQTT");
    body.extend_from_slice(&[5, 0xC2, 0, 0, 0]); // level 5, user+password+clean, keep-alive 0, no properties
    body.extend(str_field(client_id));
    body.extend(str_field(username));
    body.extend(str_field("pw"));
    packet(0x10, &body)
}

/// A v5 QoS 1 PUBLISH with a Topic Alias property (and a user property before it).
fn publish_v5(topic: &str, alias: u16) -> Vec<u8> {
    let mut body = str_field(topic);
    body.extend_from_slice(&[0, 7]); // packet id
    let mut props = vec![0x26];
    props.extend(str_field("k"));
    props.extend(str_field("v"));
    props.extend_from_slice(&[0x23, (alias >> 8) as u8, alias as u8]);
    body.push(props.len() as u8);
    body.extend(props);
    body.extend_from_slice(b"{}");
    packet(0x32, &body)
}

#[test]
fn topic_aliases_are_judged_by_the_topic_they_stand_for() {
    let acl = Acl::new(&accounts());
    let me = connect_v5("gas-1", "gas-1-acct");
    let own = "citywatch/v1/xh/gas-1/telemetry";
    assert_eq!(verdict(&acl, &[me.clone(), publish_v5(own, 1), publish_v5("", 1), publish_v5("", 1)]), Ok(()));
    // An alias set on a forbidden topic is refused at once, and so is its later use.
    assert!(matches!(verdict(&acl, &[me.clone(), publish_v5("citywatch/v1/xh/gas-2/telemetry", 2)]), Err(End::Denied("publish", _))));
    // Re-pointing an alias to another device's topic is judged on the new topic.
    assert!(matches!(verdict(&acl, &[me.clone(), publish_v5(own, 1), publish_v5("citywatch/v1/xh/gas-2/event", 1)]), Err(End::Denied("publish", _))));
    assert!(matches!(verdict(&acl, &[me.clone(), publish_v5("", 3)]), Err(End::Malformed(_))), "unknown alias");
    assert!(matches!(verdict(&acl, &[me, publish_v5(own, 0)]), Err(End::Malformed(_))), "alias 0");
}

#[test]
fn account_settings_are_checked() {
    assert!(validate_users(&accounts()).is_ok());
    assert_eq!(validate_users(&[user("a", None, Some("gas-1"))]).expect_err("device without site").0, "mqtt.users[0].device");
    assert_eq!(validate_users(&[user("a", Some("x y"), None)]).expect_err("bad site").0, "mqtt.users[0].site");
    assert_eq!(validate_users(&[user("a", None, None), user("a", None, None)]).expect_err("dup").0, "mqtt.users[1].username");
    let err = crate::config::Config::from_toml("[[mqtt.users]]\nusername = \"u\"\npassword = \"p\"\ndevice = \"d\"\n").expect_err("device without site");
    assert!(err.to_string().starts_with("mqtt.users[0].device"), "{err}");
}

// -------------------------------------------------------------------------------------------
// The real broker behind the door
// -------------------------------------------------------------------------------------------

fn cfg(users: Vec<MqttUser>, tls: Option<crate::tls::TlsConfig>) -> MqttConfig {
    MqttConfig {
        mode: MqttMode::Embedded,
        listen: "127.0.0.1:0".parse().expect("addr"),
        users,
        topic_filter: "citywatch/v1/#".into(),
        queue_capacity: 1024,
        tls,
        ..MqttConfig::default()
    }
}

async fn mosquitto_pub(port: u16, args: &[&str]) -> bool {
    let port = port.to_string();
    let out = timeout(WAIT, tokio::process::Command::new("mosquitto_pub").args(["-h", "127.0.0.1", "-p", &port]).args(args).kill_on_drop(true).output())
        .await
        .expect("mosquitto_pub in time")
        .expect("mosquitto_pub runs (apt-get install mosquitto-clients)");
    out.status.success()
}

async fn recv(rx: &mut mpsc::Receiver<Inbound>) -> Inbound {
    timeout(WAIT, rx.recv()).await.expect("a message in time").expect("channel open")
}

/// Waits (bounded) until `counter` reaches `n`, then checks it is exactly `n`.
async fn counted(counter: &AtomicU64, n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while counter.load(Relaxed) < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counter.load(Relaxed), n);
}

async fn quiet(rx: &mut mpsc::Receiver<Inbound>) {
    if let Ok(Some(m)) = timeout(Duration::from_millis(500), rx.recv()).await {
        panic!("unexpected message on {}", m.topic);
    }
}

/// A rumqttc client's fate: Ok(()) once its SUBACK with success came, Err(text) when the
/// connection ended first.
async fn subscribe_outcome(port: u16, client_id: &str, username: &str, filter: &str, will: Option<&str>) -> Result<(), String> {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_credentials(username, format!("{username}-pw"));
    if let Some(w) = will {
        opts.set_last_will(LastWill::new(w, "offline", QoS::AtLeastOnce, true));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client.subscribe(filter, QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
    timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    return if ack.return_codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))) { Ok(()) } else { Err("refused".into()) };
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no answer in time".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_enforces_device_acls() {
    let (tx, mut rx) = mpsc::channel(64);
    let broker = EmbeddedBroker::start(&cfg(accounts(), None), tx).await.expect("broker starts");
    let port = broker.local_addr().port();
    let stats = Arc::clone(&broker.stats().door);

    assert!(mosquitto_pub(port, &["-i", "gas-1", "-u", "gas-1-acct", "-P", "gas-1-acct-pw", "-t", "citywatch/v1/xh/gas-1/telemetry", "-m", "mine"]).await);
    assert_eq!(recv(&mut rx).await.topic, "citywatch/v1/xh/gas-1/telemetry");
    // MQTT 5 through the door, under the same account rules.
    assert!(mosquitto_pub(port, &["-V", "mqttv5", "-q", "1", "-i", "gas-1", "-u", "gas-1-acct", "-P", "gas-1-acct-pw", "-t", "citywatch/v1/xh/gas-1/event", "-m", "v5"]).await);
    assert_eq!(recv(&mut rx).await.topic, "citywatch/v1/xh/gas-1/event");
    mosquitto_pub(port, &["-V", "mqttv5", "-q", "1", "-i", "gas-1", "-u", "gas-1-acct", "-P", "gas-1-acct-pw", "-t", "citywatch/v1/xh/gas-2/event", "-m", "forged"]).await;
    quiet(&mut rx).await;
    counted(&stats.denied_publish, 1).await;
    // Another device's topic, at QoS 0 and 1: never reaches the gateway.
    mosquitto_pub(port, &["-i", "gas-1", "-u", "gas-1-acct", "-P", "gas-1-acct-pw", "-t", "citywatch/v1/xh/gas-2/telemetry", "-m", "forged"]).await;
    mosquitto_pub(port, &["-q", "1", "-i", "gas-1", "-u", "gas-1-acct", "-P", "gas-1-acct-pw", "-t", "citywatch/v1/xh/gas-2/event", "-m", "forged"]).await;
    quiet(&mut rx).await;
    counted(&stats.denied_publish, 3).await;
    // A per-site account: the client id is the device.
    assert!(mosquitto_pub(port, &["-i", "smk-9", "-u", "pd-site", "-P", "pd-site-pw", "-t", "citywatch/v1/pd/smk-9/event", "-m", "e"]).await);
    assert_eq!(recv(&mut rx).await.topic, "citywatch/v1/pd/smk-9/event");
    mosquitto_pub(port, &["-i", "smk-9", "-u", "pd-site", "-P", "pd-site-pw", "-t", "citywatch/v1/pd/smk-8/event", "-m", "e"]).await;
    quiet(&mut rx).await;
    counted(&stats.denied_publish, 4).await;
    // Passwords are the broker's: a right username with a wrong password is refused.
    assert!(!mosquitto_pub(port, &["-i", "gas-1", "-u", "gas-1-acct", "-P", "nope", "-t", "citywatch/v1/xh/gas-1/telemetry", "-m", "x"]).await);
    quiet(&mut rx).await;

    // Reading: its own cmd only.
    assert_eq!(subscribe_outcome(port, "gas-1", "gas-1-acct", "citywatch/v1/xh/gas-1/cmd", None).await, Ok(()));
    assert!(subscribe_outcome(port, "gas-1", "gas-1-acct", "citywatch/v1/xh/gas-2/cmd", None).await.is_err());
    assert!(subscribe_outcome(port, "gas-1", "gas-1-acct", "citywatch/v1/#", None).await.is_err());
    counted(&stats.denied_subscribe, 2).await;
    // A Last Will on another device's status would be a forged "offline": refused at CONNECT.
    assert!(subscribe_outcome(port, "gas-1", "gas-1-acct", "citywatch/v1/xh/gas-1/cmd", Some("citywatch/v1/xh/gas-2/status")).await.is_err());
    counted(&stats.denied_connect, 1).await;
    // Nor may it use another device's client id (that would take over its session).
    assert!(subscribe_outcome(port, "gas-2", "gas-1-acct", "citywatch/v1/xh/gas-1/cmd", None).await.is_err());
    counted(&stats.denied_connect, 2).await;
    // Unrestricted accounts (tools, bridges) go anywhere.
    assert_eq!(subscribe_outcome(port, "tool-1", "tool", "citywatch/v1/#", None).await, Ok(()));

    // Commands still reach the device that may read them.
    let mut sub = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", "gas-1", "-u", "gas-1-acct", "-P", "gas-1-acct-pw", "-q", "1", "-t", "citywatch/v1/xh/gas-1/cmd", "-C", "1", "-W", "10"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub");
    let deadline = tokio::time::Instant::now() + WAIT;
    let output = loop {
        broker.publish("citywatch/v1/xh/gas-1/cmd", br#"{"id":"c-1","cmd":"self_test"}"#.to_vec(), false).expect("publish");
        if let Ok(Some(status)) = sub.try_wait() {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "command not received");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(output.success());
    let text = crate::metrics::encode_collector(Arc::clone(&stats));
    assert!(text.contains("citywatch_mqtt_rejected_total{reason=\"acl_denied_publish\"} 4"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_speaks_mqtt_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tls, _) = crate::tls::testing::self_signed(dir.path());
    let ca = tls.cert.display().to_string();
    let (tx, mut rx) = mpsc::channel(64);
    let broker = EmbeddedBroker::start(&cfg(Vec::new(), Some(tls)), tx).await.expect("broker starts");
    let port = broker.local_addr().port();
    assert!(mosquitto_pub(port, &["--cafile", &ca, "-q", "1", "-t", "citywatch/v1/xh/gas-1/telemetry", "-m", "over tls"]).await);
    let m = recv(&mut rx).await;
    assert_eq!(&m.payload[..], b"over tls");
    // Plain MQTT to the TLS port gets nothing through.
    assert!(!mosquitto_pub(port, &["-q", "1", "-t", "citywatch/v1/xh/gas-1/telemetry", "-m", "plain"]).await);
    quiet(&mut rx).await;
    // A client that does not trust the certificate refuses the broker.
    let other = tempfile::tempdir().expect("tempdir");
    let (untrusted, _) = crate::tls::testing::self_signed(other.path());
    assert!(!mosquitto_pub(port, &["--cafile", &untrusted.cert.display().to_string(), "-t", "citywatch/v1/xh/gas-1/telemetry", "-m", "x"]).await);
    quiet(&mut rx).await;
    counted(&broker.stats().door.tls_failed, 2).await;
}

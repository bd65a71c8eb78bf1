//! Incidents end to end (SPEC §4–§6): edge-sim scenarios or hand-driven devices publish to the
//! gateway's embedded broker, and what the operations centre sees is checked where it sees it —
//! a real webhook receiver verifying every signature, a real Alertmanager, the HTTP API and the
//! commands on the devices' `cmd` topics. Each test has its own gateway, receiver and site.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use citywatch_tests::{
    birth, device_topic, spawn_edge_sim, Alertmanager, ChildGuard, Delivery, GatewayProcess,
    Mosquitto, Publisher, QoS, Received, Subscriber, WebhookReceiver, IDEMPOTENCY_HEADER,
};
use serde_json::{json, Value};

const SECRET: &str = "e2e-webhook-secret";
/// Bound of the waits for something a scenario does within its first ~20 s.
const SCENARIO_WAIT: Duration = Duration::from_secs(60);
/// Bound of the waits for the gateway to catch up with what already happened.
const CATCH_UP: Duration = Duration::from_secs(30);
const ACTIVE: [&str; 3] = ["open", "acknowledged", "dispatched"];

/// The `[[notify.webhook]]` "ops" to `receiver`, with short retries.
fn webhook_toml(receiver: &WebhookReceiver) -> String {
    format!(
        "[[notify.webhook]]\nname = \"ops\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
         [notify.retry]\ninitial = \"100ms\"\nmax = \"1s\"\n",
        receiver.url()
    )
}

/// These tests are about per-rule behaviour (gas_low, gas_high … each pushed on its own), so
/// they run with the rule pack's situations off (`[rules] situations = false`, the centres'
/// one-incident-per-rule mode); tests/tests/situations.rs covers the merged default.
async fn gateway(extra: &str) -> GatewayProcess {
    GatewayProcess::start_embedded(&format!("[rules]\nsituations = false\n{extra}"))
        .await
        .expect("gateway")
}

fn broker(gw: &GatewayProcess) -> String {
    gw.mqtt_addr().expect("embedded broker").to_owned()
}

/// edge-sim on the gateway's broker: `devices` devices of `site` in `scenario`, 1 s interval.
fn sim(
    gw: &GatewayProcess,
    site: &str,
    scenario: &str,
    devices: usize,
    duration_s: u32,
    extra: &[&str],
) -> ChildGuard {
    let broker = broker(gw);
    let devices = devices.to_string();
    let duration = duration_s.to_string();
    let mut args = vec![
        "--broker",
        &broker,
        "--devices",
        &devices,
        "--site",
        site,
        "--scenario",
        scenario,
        "--interval",
        "1",
        "--duration",
        &duration,
    ];
    args.extend_from_slice(extra);
    spawn_edge_sim(&args)
}

/// `GET /api/v1/incidents?{query}`: the list, checked against its own count.
fn incidents(gw: &GatewayProcess, query: &str) -> anyhow::Result<Vec<Value>> {
    let body = gw.get(&format!("/api/v1/incidents?{query}"))?;
    let list = body["incidents"]
        .as_array()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no incidents list: {body}"))?;
    anyhow::ensure!(
        body["count"].as_u64() == Some(list.len() as u64),
        "count disagrees with the list: {body}"
    );
    Ok(list)
}

/// The webhook channel's row of `GET /api/v1/notify`.
fn webhook_channel(gw: &GatewayProcess) -> Option<Value> {
    let body = gw.get("/api/v1/notify").ok()?;
    body["channels"]
        .as_array()?
        .iter()
        .find(|c| c["channel"] == "webhook:ops")
        .cloned()
}

fn first<'a>(deliveries: &'a [Delivery], rule: &str, device: &str) -> Option<&'a Delivery> {
    deliveries
        .iter()
        .find(|d| d.rule() == rule && d.device() == device)
}

/// Every POST (accepted or refused) carried a valid signature and the idempotency key of its body.
fn assert_signed(receiver: &WebhookReceiver) {
    for d in receiver
        .deliveries()
        .iter()
        .chain(receiver.rejected_attempts().iter())
    {
        assert!(
            d.signature_valid,
            "bad signature: {}\n{}",
            d.describe(),
            receiver.report()
        );
        let key = format!("{}:{}", d.id(), d.revision());
        assert!(
            d.id().starts_with("inc-") && d.revision() >= 1,
            "not an incident: {}",
            d.raw
        );
        assert_eq!(
            d.header(IDEMPOTENCY_HEADER),
            Some(key.as_str()),
            "{}",
            d.describe()
        );
    }
}

/// (id, revision) of every change the API's incidents record: each history entry's revision
/// and the current one.
fn recorded_changes(incidents: &[Value]) -> BTreeSet<(String, u64)> {
    let mut out = BTreeSet::new();
    for inc in incidents {
        let id = inc["id"].as_str().unwrap_or_default().to_owned();
        if let Some(rev) = inc["revision"].as_u64() {
            out.insert((id.clone(), rev));
        }
        for h in inc["history"].as_array().into_iter().flatten() {
            if let Some(rev) = h["revision"].as_u64() {
                out.insert((id.clone(), rev));
            }
        }
    }
    out
}

/// Waits until every change the API shows for `site` was accepted by the receiver and the
/// webhook has nothing pending; returns the incidents of that moment.
async fn wait_all_delivered(
    gw: &GatewayProcess,
    receiver: &WebhookReceiver,
    site: &str,
) -> Vec<Value> {
    receiver
        .wait_for(
            CATCH_UP,
            &format!("every change of site {site} delivered"),
            |got| {
                let list = incidents(gw, &format!("site={site}")).ok()?;
                let delivered: BTreeSet<(String, u64)> = got
                    .iter()
                    .map(|d| (d.id().to_owned(), d.revision()))
                    .collect();
                let pending = webhook_channel(gw)?["pending"].as_u64()?;
                (pending == 0 && !list.is_empty() && recorded_changes(&list).is_subset(&delivered))
                    .then_some(list)
            },
        )
        .await
}

/// Accepted deliveries grouped by incident id, in arrival order.
fn by_incident(deliveries: &[Delivery]) -> BTreeMap<String, Vec<&Delivery>> {
    let mut out: BTreeMap<String, Vec<&Delivery>> = BTreeMap::new();
    for d in deliveries {
        out.entry(d.id().to_owned()).or_default().push(d);
    }
    out
}

/// The first device time at which `device` reported `gas_lel` ≥ `level`, in telemetry or in an
/// alarm event's value.
fn first_gas_at_or_above(messages: &[Received], device: &str, level: f64) -> Option<i64> {
    messages
        .iter()
        .filter(|m| m.topic.contains(&format!("/{device}/")))
        .filter_map(|m| {
            let body = m.json().ok()?;
            let value = if m.topic.ends_with("/telemetry") {
                body["values"]["gas_lel"].as_f64()?
            } else if m.topic.ends_with("/event") && body["metric"] == "gas_lel" {
                body["value"].as_f64()?
            } else {
                return None;
            };
            (value >= level).then(|| body["ts"].as_i64()).flatten()
        })
        .min()
}

fn history_actions(incident: &Value) -> Vec<String> {
    incident["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["action"].as_str().map(str::to_owned))
        .collect()
}

/// Whether `value` holds the number `n` anywhere (a rule's threshold, whatever its field is named).
fn contains_number(value: &Value, n: f64) -> bool {
    match value {
        Value::Number(x) => x.as_f64() == Some(n),
        Value::Array(items) => items.iter().any(|v| contains_number(v, n)),
        Value::Object(fields) => fields.values().any(|v| contains_number(v, n)),
        _ => false,
    }
}

fn now_ms() -> i64 {
    citywatch_edge::sim::fleet::wall_ms() as i64
}

/// A hand-driven gas detector on `broker` (the gateway's own, or the external one it
/// subscribes to): born (retained status), registered.
async fn hand_gas_detector(gw: &GatewayProcess, broker: &str, site: &str, device: &str) -> Publisher {
    let mut device_pub = Publisher::connect(broker, 64)
        .await
        .expect("publisher");
    device_pub
        .publish_json(
            &device_topic(site, device, "status"),
            true,
            &birth("gas_detector", 60),
        )
        .await
        .expect("birth");
    device_pub
        .wait_acked(1, Duration::from_secs(10))
        .await
        .expect("birth acknowledged");
    gw.wait_for(
        Duration::from_secs(10),
        &format!("{device} registered"),
        |gw| gw.get(&format!("/api/v1/devices/{device}")).ok(),
    )
    .await;
    device_pub
}

async fn leak_reading(device_pub: &Publisher, site: &str, device: &str, seq: u32, gas_lel: f64) {
    let body =
        json!({"seq": seq, "ts": now_ms(), "values": {"gas_lel": gas_lel, "valve_closed": 0}});
    device_pub
        .publish_json(&device_topic(site, device, "telemetry"), false, &body)
        .await
        .expect("telemetry");
}

// a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gas_leak_is_pushed_signed_as_gas_low_and_gas_high_and_the_valve_is_commanded_shut() {
    let site = "inc-leak";
    let device = "inc-leak-gas-00000";
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let gw = gateway(&webhook_toml(&receiver)).await;
    let mut uplinks = Subscriber::connect(
        &broker(&gw),
        &format!("citywatch/v1/{site}/+/+"),
        QoS::AtLeastOnce,
    )
    .await
    .expect("subscriber");
    let _sim = sim(&gw, site, "gas-leak", 3, 90, &[]);

    let (low, high) = receiver
        .wait_for(
            SCENARIO_WAIT,
            "gas_low and gas_high of the leaking detector",
            |got| {
                Some((
                    first(got, "gas_low", device)?.clone(),
                    first(got, "gas_high", device)?.clone(),
                ))
            },
        )
        .await;
    // The valve command on the device's topic, and the device's acknowledgement in the history.
    let mut messages = uplinks
        .collect_until(tokio::time::Instant::now() + CATCH_UP, |got| {
            got.iter().any(|m| {
                m.topic.ends_with(&format!("/{device}/cmd"))
                    && m.json().is_ok_and(|c| c["cmd"] == "close_valve")
            })
        })
        .await;
    let cmd = messages
        .iter()
        .filter(|m| m.topic == device_topic(site, device, "cmd"))
        .filter_map(|m| m.json().ok())
        .find(|c| c["cmd"] == "close_valve")
        .unwrap_or_else(|| panic!("no close_valve on {}", device_topic(site, device, "cmd")));
    assert_eq!(cmd["cmd"], "close_valve", "{cmd}");
    let cmd_id = cmd["id"].as_str().expect("cmd id").to_owned();
    assert!(cmd_id.starts_with("c-"), "{cmd}");
    let incident = gw
        .wait_for(
            CATCH_UP,
            "command and command_acked in the gas_high history",
            |gw| {
                let inc = gw.get(&format!("/api/v1/incidents/{}", high.id())).ok()?;
                let actions = history_actions(&inc);
                (actions.iter().any(|a| a == "command")
                    && actions.iter().any(|a| a == "command_acked"))
                .then_some(inc)
            },
        )
        .await;
    let actions = history_actions(&incident);
    let sent = actions
        .iter()
        .position(|a| a == "command")
        .expect("command");
    let acked = actions
        .iter()
        .position(|a| a == "command_acked")
        .expect("command_acked");
    assert!(sent < acked, "acknowledged after it was sent: {actions:?}");
    let event_topic = device_topic(site, device, "event");
    let is_ack = |m: &Received| {
        m.topic == event_topic
            && m.json()
                .is_ok_and(|e| e["event"] == "cmd_ack" && e["id"] == cmd_id.as_str())
    };
    if !messages.iter().any(is_ack) {
        // The gateway saw the acknowledgement; our subscriber may trail it a little.
        messages.extend(
            uplinks
                .collect_until(tokio::time::Instant::now() + CATCH_UP, |got| {
                    got.iter().any(is_ack)
                })
                .await,
        );
    }
    assert!(
        messages.iter().any(is_ack),
        "the device acknowledged command {cmd_id}"
    );

    // What was pushed says what happened.
    for (d, rule, severity, threshold) in [
        (&low, "gas_low", "major", 20.0),
        (&high, "gas_high", "critical", 50.0),
    ] {
        let b = &d.body;
        assert_eq!(b["key"], format!("{site}/{device}/{rule}"), "{b}");
        assert_eq!(
            (
                b["severity"].as_str(),
                b["state"].as_str(),
                b["scope"].as_str()
            ),
            (Some(severity), Some("open"), Some("device")),
            "{b}"
        );
        assert_eq!(
            (b["site"].as_str(), b["kind"].as_str(), b["metric"].as_str()),
            (Some(site), Some("gas_detector"), Some("gas_lel")),
            "{b}"
        );
        assert_eq!(b["threshold"].as_f64(), Some(threshold), "{b}");
        assert!(b["value"].as_f64().is_some_and(|v| v >= threshold), "{b}");
        assert_eq!(
            d.revision(),
            1,
            "the first push of an incident is its revision 1: {b}"
        );
        assert!(
            b["opened_ms"].as_i64().is_some()
                && b["history"].as_array().is_some_and(|h| !h.is_empty()),
            "{b}"
        );
    }
    let first20 = first_gas_at_or_above(&messages, device, 20.0).expect("the leak passed 20 %LEL");
    let first50 = first_gas_at_or_above(&messages, device, 50.0).expect("the leak passed 50 %LEL");
    let low_opened = low.body["opened_ms"].as_i64().expect("opened_ms");
    let high_opened = high.body["opened_ms"].as_i64().expect("opened_ms");
    // gas_low is held 10 s: not pushed before 10 s of readings at ≥ 20 %LEL, and its opening
    // time lies within the leak (at the start or at the end of the hold, as the gateway defines).
    assert!(
        low.wall_ms >= first20 + 10_000,
        "gas_low pushed {} ms after the first reading ≥ 20 %LEL",
        low.wall_ms - first20
    );
    assert!(
        (first20..=first20 + 15_000).contains(&low_opened),
        "gas_low opened_ms {low_opened}, first ≥ 20 at {first20}"
    );
    // gas_high is immediate: opened at the first reading ≥ 50 %LEL.
    assert!(
        (first50..=first50 + 5_000).contains(&high_opened),
        "gas_high opened_ms {high_opened}, first ≥ 50 at {first50}"
    );
    assert!(first20 <= first50);
    assert_signed(&receiver);
}

// b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_burning_smoke_detectors_of_one_site_confirm_a_fire() {
    let site = "inc-fire";
    let burning = ["inc-fire-smoke-00001", "inc-fire-smoke-00004"];
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let gw = gateway(&webhook_toml(&receiver)).await;
    let _sim = sim(&gw, site, "fire", 6, 90, &[]);

    let fire = receiver
        .wait_for(
            SCENARIO_WAIT,
            "fire_confirmed naming both burning detectors",
            |got| {
                got.iter()
                    .filter(|d| d.rule() == "fire_confirmed")
                    .find(|d| {
                        burning.iter().all(|b| {
                            d.body["devices"]
                                .as_array()
                                .is_some_and(|ds| ds.iter().any(|x| x == b))
                        })
                    })
                    .cloned()
            },
        )
        .await;
    let b = &fire.body;
    assert_eq!(b["scope"], "site", "{b}");
    assert_eq!(b["key"], format!("{site}/*/fire_confirmed"), "{b}");
    assert_eq!(
        (b["site"].as_str(), b["severity"].as_str()),
        (Some(site), Some("critical")),
        "{b}"
    );
    assert!(
        burning.contains(&b["device"].as_str().unwrap_or_default()),
        "the device is one of the burning: {b}"
    );
    let devices: BTreeSet<&str> = b["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        devices.iter().all(|d| d.starts_with("inc-fire-smoke-")),
        "only the smoke detectors burn: {b}"
    );
    // One fire incident for the site, whatever number of signals it folded.
    let fires = incidents(&gw, &format!("rule=fire_confirmed&site={site}")).expect("incidents");
    assert_eq!(fires.len(), 1, "{fires:?}");
    assert_eq!(fires[0]["id"], b["id"]);
    let ids: BTreeSet<String> = receiver
        .deliveries()
        .iter()
        .filter(|d| d.rule() == "fire_confirmed")
        .map(|d| d.id().to_owned())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "one fire_confirmed incident pushed\n{}",
        receiver.report()
    );
    assert_signed(&receiver);
}

// c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_that_drop_off_open_device_offline_and_clear_it_on_return() {
    let site = "inc-off";
    let devices = [
        "inc-off-gas-00000",
        "inc-off-smoke-00001",
        "inc-off-siren-00002",
    ];
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let gw = gateway(&webhook_toml(&receiver)).await;
    let _sim = sim(
        &gw,
        site,
        "offline",
        3,
        60,
        &["--offline-after", "3", "--offline-for", "10"],
    );

    let pairs = receiver
        .wait_for(
            SCENARIO_WAIT,
            "device_offline opened then cleared for every dropped device",
            |got| {
                devices
                    .iter()
                    .map(|device| {
                        let opened = got.iter().find(|d| {
                            d.rule() == "device_offline"
                                && d.device() == *device
                                && d.state() == "open"
                        })?;
                        let cleared = got
                            .iter()
                            .find(|d| d.id() == opened.id() && d.state() == "cleared")?;
                        Some((opened.clone(), cleared.clone()))
                    })
                    .collect::<Option<Vec<_>>>()
            },
        )
        .await;
    for (opened, cleared) in &pairs {
        assert!(
            cleared.revision() > opened.revision(),
            "{} then {}",
            opened.describe(),
            cleared.describe()
        );
        assert!(cleared.received >= opened.received);
        assert_eq!(
            opened.body["key"],
            format!("{site}/{}/device_offline", opened.device())
        );
        assert_eq!(opened.body["severity"], "warning", "{}", opened.raw);
        let now = gw
            .get(&format!("/api/v1/incidents/{}", opened.id()))
            .expect("incident");
        assert!(
            !ACTIVE.contains(&now["state"].as_str().unwrap_or_default())
                || now["revision"].as_u64() > Some(cleared.revision()),
            "{now}"
        );
        assert!(
            now["history"]
                .as_array()
                .expect("history")
                .iter()
                .any(|h| h["state"] == "cleared"),
            "{now}"
        );
    }
    assert_signed(&receiver);
}

// d.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_devices_get_one_incident_per_rule_and_few_pushes() {
    let site = "inc-flap";
    let siren = "inc-flap-siren-00002";
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let gw = gateway(&webhook_toml(&receiver)).await;
    let mut status = Subscriber::connect(
        &broker(&gw),
        &device_topic(site, siren, "status"),
        QoS::AtLeastOnce,
    )
    .await
    .expect("subscriber");
    let _sim = sim(&gw, site, "flapping", 3, 120, &[]);

    // The siren mount toggles offline/online every 10 s: let it flip six times (~60 s).
    let states = status
        .collect_until(
            tokio::time::Instant::now() + Duration::from_secs(90),
            |got| flips(got) >= 6,
        )
        .await;
    let flipped = flips(&states);
    assert!(flipped >= 5, "the siren flipped only {flipped} times");
    // Let the webhook catch up with what happened so far.
    gw.wait_for(CATCH_UP, "no webhook delivery pending", |gw| {
        (webhook_channel(gw)?["pending"].as_u64()? == 0).then_some(())
    })
    .await;

    let got = receiver.deliveries();
    let mut ids: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for d in &got {
        ids.entry((d.device().to_owned(), d.rule().to_owned()))
            .or_default()
            .insert(d.id().to_owned());
    }
    for ((device, rule), set) in &ids {
        assert_eq!(
            set.len(),
            1,
            "{device} × {rule}: one incident, got {set:?}\n{}",
            receiver.report()
        );
    }
    let offline: Vec<&Delivery> = got
        .iter()
        .filter(|d| d.device() == siren && d.rule() == "device_offline")
        .collect();
    assert!(
        !offline.is_empty(),
        "the siren's offline flips opened device_offline\n{}",
        receiver.report()
    );
    assert!(
        offline.len() < 10,
        "{} pushes for a device that flipped {flipped} times\n{}",
        offline.len(),
        receiver.report()
    );
    assert!(
        offline.iter().any(|d| d.body["flapping"] == true),
        "device_offline marked flapping at some revision\n{}",
        receiver.report()
    );
    // The API agrees: one incident per device × rule.
    let list = incidents(&gw, &format!("site={site}")).expect("incidents");
    let mut keys = BTreeSet::new();
    for inc in &list {
        let key = (inc["device"].to_string(), inc["rule"].to_string());
        assert!(
            keys.insert(key.clone()),
            "two incidents for {key:?}: {list:?}"
        );
    }
    assert_signed(&receiver);
}

/// How many times the announced state changed in a run of status messages.
fn flips(statuses: &[Received]) -> usize {
    let states: Vec<String> = statuses
        .iter()
        .filter_map(|m| m.json().ok()?["state"].as_str().map(str::to_owned))
        .collect();
    states.windows(2).filter(|w| w[0] != w[1]).count()
}

// e.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_window_keeps_its_site_quiet_while_other_sites_are_pushed() {
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let silence = "[[incidents.silence]]\nsite = \"quiet\"\nstart = \"2026-01-01T00:00:00Z\"\n\
                   end = \"2099-01-01T00:00:00Z\"\nreason = \"test\"\n";
    let gw = gateway(&format!("{}{silence}", webhook_toml(&receiver))).await;
    let started = tokio::time::Instant::now();
    let _quiet = sim(&gw, "quiet", "gas-leak", 3, 90, &[]);
    let _loud = sim(&gw, "loud", "gas-leak", 3, 90, &[]);

    // The same leak at the same moment on a site without a silence is pushed: the pipeline works.
    receiver
        .wait_for(SCENARIO_WAIT, "gas_high of the unsilenced site", |got| {
            first(got, "gas_high", "loud-gas-00000").map(|_| ())
        })
        .await;
    // Give the silenced leak the same time and more (its gas_high is due ~17 s in).
    tokio::time::sleep_until(started + Duration::from_secs(25)).await;
    let got = receiver.deliveries();
    let quiet: Vec<String> = got
        .iter()
        .chain(receiver.rejected_attempts().iter())
        .filter(|d| d.site() == "quiet")
        .map(Delivery::describe)
        .collect();
    assert!(quiet.is_empty(), "pushed despite the silence: {quiet:#?}");
    assert!(got.iter().any(|d| d.site() == "loud"));
    assert_signed(&receiver);
}

// f.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_receiver_is_down_arrive_once_each_and_in_order() {
    let site = "inc-down";
    let mut receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    receiver.stop().await.expect("stop the receiver");
    let gw = gateway(&webhook_toml(&receiver)).await;
    let _sim = sim(&gw, site, "gas-leak", 6, 120, &[]);

    gw.wait_for(
        SCENARIO_WAIT,
        "webhook changes pending while the receiver is down",
        |gw| (webhook_channel(gw)?["pending"].as_u64()? > 0).then_some(()),
    )
    .await;
    // Back, but refusing at first: the refused attempts must be retried, not counted delivered.
    receiver.set_status(503);
    receiver
        .start_again()
        .await
        .expect("start the receiver again");
    gw.wait_for(CATCH_UP, "a refused attempt", |_| {
        (!receiver.rejected_attempts().is_empty()).then_some(())
    })
    .await;
    receiver.set_status(200);

    // Both levels of the leak exist before "everything delivered" means anything.
    gw.wait_for(SCENARIO_WAIT, "gas_low and gas_high incidents", |gw| {
        let list = incidents(gw, &format!("site={site}")).ok()?;
        ["gas_low", "gas_high"].iter().all(|r| list.iter().any(|i| i["rule"] == *r)).then_some(())
    })
    .await;
    let list = wait_all_delivered(&gw, &receiver, site).await;
    assert!(list.iter().any(|i| i["rule"] == "gas_high"), "{list:?}");
    let got = receiver.deliveries();
    let mut seen = BTreeSet::new();
    for d in &got {
        assert!(
            seen.insert((d.id().to_owned(), d.revision())),
            "{}:{} accepted twice\n{}",
            d.id(),
            d.revision(),
            receiver.report()
        );
    }
    for (id, pushes) in by_incident(&got) {
        let revisions: Vec<u64> = pushes.iter().map(|d| d.revision()).collect();
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "{id}: revisions out of order {revisions:?}"
        );
    }
    let delivered = got
        .iter()
        .map(|d| (d.id().to_owned(), d.revision()))
        .collect::<BTreeSet<_>>();
    let missing: Vec<_> = recorded_changes(&list)
        .difference(&delivered)
        .cloned()
        .collect();
    assert!(missing.is_empty(), "changes never delivered: {missing:?}");
    // Counted by the gateway too: everything the API shows was delivered when nothing was pending.
    let channel = webhook_channel(&gw).expect("webhook channel");
    let changes = recorded_changes(&list).len() as u64;
    assert!(
        channel["delivered"].as_u64().is_some_and(|n| n >= changes),
        "{changes} changes: {channel}"
    );
    assert_signed(&receiver);
}

// g.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_incident_neither_duplicates_the_incident_nor_skips_a_revision() {
    let site = "inc-kill";
    let leaking = ["inc-kill-gas-00000", "inc-kill-gas-00003"];
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let mut gw = gateway(&webhook_toml(&receiver)).await;
    let _sim = sim(&gw, site, "gas-leak", 6, 120, &[]);

    receiver
        .wait_for(SCENARIO_WAIT, "the first gas_high", |got| {
            first(got, "gas_high", leaking[0]).map(|_| ())
        })
        .await;
    gw.restart().await.expect("restart after SIGKILL");
    receiver
        .wait_for(SCENARIO_WAIT, "gas_high of both leaking detectors", |got| {
            leaking
                .iter()
                .all(|d| first(got, "gas_high", d).is_some())
                .then_some(())
        })
        .await;
    let list = wait_all_delivered(&gw, &receiver, site).await;

    for device in leaking {
        let highs = incidents(&gw, &format!("rule=gas_high&device={device}")).expect("incidents");
        assert_eq!(
            highs.len(),
            1,
            "{device}: one gas_high incident across the restart: {highs:?}"
        );
        let pushed: BTreeSet<String> = receiver
            .deliveries()
            .iter()
            .filter(|d| d.rule() == "gas_high" && d.device() == device)
            .map(|d| d.id().to_owned())
            .collect();
        assert_eq!(
            pushed,
            BTreeSet::from([highs[0]["id"].as_str().expect("id").to_owned()]),
            "{device}: pushed under one id"
        );
    }
    let active: Vec<&Value> = list
        .iter()
        .filter(|i| {
            i["rule"] == "gas_high" && ACTIVE.contains(&i["state"].as_str().unwrap_or_default())
        })
        .collect();
    assert!(
        active.len() <= leaking.len(),
        "at most one active gas_high per leaking detector: {active:?}"
    );
    // Per incident, revisions 1..=max all arrived; a change re-sent after the kill is the same change.
    let got = receiver.deliveries();
    for (id, pushes) in by_incident(&got) {
        let mut bodies: BTreeMap<u64, &str> = BTreeMap::new();
        for d in &pushes {
            let earlier = bodies.insert(d.revision(), &d.raw);
            assert!(
                earlier.is_none_or(|raw| raw == d.raw),
                "{id}:{} re-sent with another body",
                d.revision()
            );
        }
        let max = *bodies.keys().max().expect("one push");
        let revisions: Vec<u64> = bodies.keys().copied().collect();
        assert_eq!(
            revisions,
            (1..=max).collect::<Vec<_>>(),
            "{id}: a revision is missing\n{}",
            receiver.report()
        );
    }
    assert_signed(&receiver);
}

/// The next `close_valve` on `cmd_topic` (its id), within `within`.
async fn next_close_valve(cmds: &mut Subscriber, cmd_topic: &str, within: Duration) -> Option<String> {
    let is_close = |m: &Received| m.topic == cmd_topic && m.json().is_ok_and(|c| c["cmd"] == "close_valve");
    let got = cmds.collect_until(tokio::time::Instant::now() + within, |got| got.iter().any(is_close)).await;
    got.iter().find(|m| is_close(m)).and_then(|m| m.json().ok()).and_then(|c| c["id"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valve_command_unanswered_when_the_gateway_dies_is_sent_again_and_its_late_ack_recorded() {
    // External broker: the detector and its command subscription outlive the gateway.
    let (site, device) = ("inc-cmd", "inc-cmd-gas-00000");
    let broker = Mosquitto::start().await.expect("mosquitto");
    let mut gw = GatewayProcess::start_external(&broker.addr(), "[rules]\nsituations = false\n").await.expect("gateway");
    let cmd_topic = device_topic(site, device, "cmd");
    let mut cmds = Subscriber::connect(&broker.addr(), &cmd_topic, QoS::AtLeastOnce).await.expect("subscriber");
    let detector = hand_gas_detector(&gw, &broker.addr(), site, device).await;
    leak_reading(&detector, site, device, 1, 80.0).await;
    let first = next_close_valve(&mut cmds, &cmd_topic, CATCH_UP).await.expect("close_valve for the leak");
    let high = gw
        .wait_for(CATCH_UP, "the gas_high incident with its command", |gw| {
            let list = incidents(gw, &format!("rule=gas_high&device={device}")).ok()?;
            list.into_iter().find(|i| history_actions(i).iter().any(|a| a == "command"))
        })
        .await;
    let id = high["id"].as_str().expect("id").to_owned();

    // The detector does not answer; the gateway dies and comes back.
    gw.restart().await.expect("restart after SIGKILL");
    let again = next_close_valve(&mut cmds, &cmd_topic, CATCH_UP).await.expect("close_valve sent again after the restart");
    assert_eq!(again, first, "the same command, under its own id");
    let body = json!({"seq": 2, "ts": now_ms(), "event": "cmd_ack", "id": first});
    detector.publish_json(&device_topic(site, device, "event"), false, &body).await.expect("cmd_ack");
    let inc = gw
        .wait_for(CATCH_UP, "command_acked in the history", |gw| {
            let inc = gw.get(&format!("/api/v1/incidents/{id}")).ok()?;
            history_actions(&inc).iter().any(|a| a == "command_acked").then_some(inc)
        })
        .await;
    let actions = history_actions(&inc);
    assert_eq!(actions.iter().filter(|a| *a == "command").count(), 1, "one command, sent twice: {actions:?}");
    assert!(!actions.iter().any(|a| a == "command_unanswered"), "{actions:?}");
    assert_eq!(incidents(&gw, &format!("rule=gas_high&device={device}")).expect("incidents").len(), 1);
    let metrics = gw.get_text("/metrics").expect("metrics");
    assert!(metrics.lines().any(|l| l == "citywatch_device_commands_total{outcome=\"resent\"} 1"), "{}", metrics.lines().filter(|l| l.contains("device_commands")).collect::<Vec<_>>().join("\n"));
}

// h.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_drive_an_incident_from_open_to_closed_and_every_step_is_pushed() {
    let (site, device) = ("inc-ops", "inc-ops-gas-00000");
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let gw = gateway(&webhook_toml(&receiver)).await;
    let device_pub = hand_gas_detector(&gw, &broker(&gw), site, device).await;
    leak_reading(&device_pub, site, device, 1, 55.0).await;
    let opened = receiver
        .wait_for(CATCH_UP, "gas_high opened", |got| {
            first(got, "gas_high", device).cloned()
        })
        .await;
    let id = opened.id().to_owned();
    assert_eq!(opened.state(), "open");

    let path = |action: &str| format!("/api/v1/incidents/{id}/{action}");
    let (status, body) = gw
        .post(
            &path("close"),
            &json!({"actor": "duty-ana", "note": "too early"}),
        )
        .expect("POST close");
    assert_eq!(
        status, 409,
        "an open incident cannot be closed before it is resolved: {body}"
    );
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    let (status, body) = gw
        .post(
            "/api/v1/incidents/inc-no-such-incident/ack",
            &json!({"actor": "duty-ana"}),
        )
        .expect("POST ack");
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].is_string(), "{body}");

    let steps = [
        (
            "ack",
            "acknowledged",
            json!({"actor": "duty-ana", "note": "seen on the wall"}),
        ),
        (
            "dispatch",
            "dispatched",
            json!({"actor": "duty-ana", "note": "sending crew 7", "crew": "crew-7"}),
        ),
        (
            "resolve",
            "resolved",
            json!({"actor": "crew-7-lead", "note": "valve shut, kitchen aired"}),
        ),
        (
            "close",
            "closed",
            json!({"actor": "reviewer-li", "note": "reviewed"}),
        ),
    ];
    let mut last_revision = opened.revision();
    for (action, state, request) in &steps {
        let (status, inc) = gw
            .post(&path(action), request)
            .unwrap_or_else(|e| panic!("POST {action}: {e}"));
        assert_eq!(status, 200, "{action}: {inc}");
        assert_eq!(
            (inc["id"].as_str(), inc["state"].as_str()),
            (Some(id.as_str()), Some(*state)),
            "{action}: {inc}"
        );
        let revision = inc["revision"].as_u64().expect("revision");
        assert!(
            revision > last_revision,
            "{action}: revision {revision} after {last_revision}"
        );
        last_revision = revision;
        let entry = inc["history"]
            .as_array()
            .expect("history")
            .iter()
            .find(|h| h["revision"] == revision)
            .cloned();
        let entry = entry
            .unwrap_or_else(|| panic!("{action}: no history entry for revision {revision}: {inc}"));
        assert_eq!(
            (
                entry["actor"].clone(),
                entry["state"].clone(),
                entry["note"].clone()
            ),
            (
                request["actor"].clone(),
                json!(state),
                request["note"].clone()
            ),
            "{action}: {entry}"
        );
        if *action == "dispatch" {
            assert_eq!(inc["crew"], "crew-7", "{inc}");
        }
        // Pushed as its own revision, carrying who did it.
        let pushed = receiver
            .wait_for(
                CATCH_UP,
                &format!("{id}:{revision} ({state}) at the webhook"),
                |got| {
                    got.iter()
                        .find(|d| d.id() == id && d.revision() == revision)
                        .cloned()
                },
            )
            .await;
        assert_eq!(pushed.state(), *state, "{}", pushed.raw);
        assert!(
            pushed.body["history"].as_array().is_some_and(|h| h
                .iter()
                .any(|e| e["revision"] == revision && e["actor"] == request["actor"])),
            "{action}: the pushed history names the actor: {}",
            pushed.raw
        );
    }
    let (status, body) = gw
        .post(&path("ack"), &json!({"actor": "duty-ana"}))
        .expect("POST ack");
    assert_eq!(
        status, 409,
        "a closed incident cannot be acknowledged: {body}"
    );
    let closed = gw
        .get(&format!("/api/v1/incidents/{id}"))
        .expect("incident");
    assert_eq!(closed["state"], "closed");
    let actors: Vec<&str> = closed["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| h["actor"] != "system")
        .filter_map(|h| h["actor"].as_str())
        .collect();
    assert_eq!(
        actors,
        ["duty-ana", "duty-ana", "crew-7-lead", "reviewer-li"],
        "{closed}"
    );
    assert_signed(&receiver);
}

// i.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gas_high_reaches_a_real_alertmanager() {
    let (site, device) = ("inc-am", "inc-am-gas-00000");
    let am = Alertmanager::start().await.expect("alertmanager");
    let gw = gateway(&format!("[notify.alertmanager]\nurl = \"{}\"\n", am.url())).await;
    // A leak that nobody stops (the hand-driven detector ignores close_valve and reports every
    // second): gas_high stays active, so the alert stays listed (Alertmanager hides resolved ones).
    let device_pub = hand_gas_detector(&gw, &broker(&gw), site, device).await;
    let feeder = tokio::spawn(async move {
        for seq in 1u32.. {
            leak_reading(&device_pub, site, device, seq, 55.0 + f64::from(seq % 3)).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let alert = gw
        .wait_for(
            CATCH_UP,
            "a gas_high alert for the device in Alertmanager",
            |_| {
                am.alerts().ok()?.into_iter().find(|a| {
                    a["labels"]["alertname"] == "gas_high"
                        && a["labels"]
                            .as_object()
                            .is_some_and(|l| l.values().any(|v| v == device))
                })
            },
        )
        .await;
    feeder.abort();
    assert_eq!(alert["status"]["state"], "active", "{alert}\n{}", am.logs());
    let same: Vec<Value> = am
        .alerts()
        .expect("alerts")
        .into_iter()
        .filter(|a| a["labels"]["alertname"] == "gas_high")
        .collect();
    assert_eq!(
        same.len(),
        1,
        "one alert for one incident, however often it is re-sent: {same:?}"
    );
}

// j.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_of_a_gas_detector_are_listed_with_their_thresholds() {
    let (site, device) = ("inc-rules", "inc-rules-gas-00000");
    let gw = gateway("").await;
    let _device_pub = hand_gas_detector(&gw, &broker(&gw), site, device).await;
    let body = gw
        .get(&format!("/api/v1/rules?device={device}"))
        .expect("rules");
    assert_eq!(body["device"], device, "{body}");
    let rules = body["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("no rules list: {body}"));
    let rule = |name: &str| {
        rules
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {body}"))
    };
    let (low, high) = (rule("gas_low"), rule("gas_high"));
    assert!(contains_number(&low, 20.0), "gas_low at 20 %LEL: {low}");
    assert!(contains_number(&high, 50.0), "gas_high at 50 %LEL: {high}");
    let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names.len(), rules.len(), "each rule listed once: {body}");
    assert_eq!(
        gw.status_of("/api/v1/rules?device=inc-rules-gas-99999")
            .expect("GET"),
        404
    );
}

/// The MQTT push channel (`[notify.mqtt]`) end to end on the embedded broker: an operations
/// centre's subscriber on `citywatch/v1/ops/#` gets every incident change at QoS 1 — the same
/// incident JSON (id, revision, state) the webhook gets — an opening and an operator's
/// acknowledgement alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt_channel_puts_every_incident_change_on_the_ops_topic_at_qos_1() {
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let gw = gateway(&format!("{}[notify.mqtt]\n", webhook_toml(&receiver))).await;
    let mut ops = Subscriber::connect(&broker(&gw), "citywatch/v1/ops/#", QoS::AtLeastOnce)
        .await
        .expect("ops subscriber");
    let publisher = Publisher::connect(&broker(&gw), 16).await.expect("device");
    let (site, device) = ("ops-mqtt", "ops-mqtt-gas-1");
    publisher
        .publish_json(&device_topic(site, device, "status"), true, &birth("gas_detector", 60))
        .await
        .expect("status");
    let leak = json!({"seq": 1, "ts": now_ms(), "event": "alarm", "metric": "gas_lel", "value": 55.0});
    publisher
        .publish_json(&device_topic(site, device, "event"), false, &leak)
        .await
        .expect("leak");
    let id = receiver
        .wait_for(SCENARIO_WAIT, "the leak at the webhook", |got| {
            got.iter()
                .find(|d| d.device() == device && d.revision() == 1)
                .map(|d| d.id().to_owned())
        })
        .await;
    let change = |revision: u64| {
        let id = id.clone();
        move |m: &Received| m.json().is_ok_and(|i| i["id"] == id.as_str() && i["revision"] == revision)
    };
    let opened = ops
        .recv_matching(SCENARIO_WAIT, change(1))
        .await
        .expect("the opening on the ops topic");
    assert_eq!((opened.topic.as_str(), opened.qos), ("citywatch/v1/ops/incidents", QoS::AtLeastOnce));
    assert_eq!(opened.json().expect("incident JSON")["state"], "open");
    let (status, body) = gw
        .post(&format!("/api/v1/incidents/{id}/ack"), &json!({"actor": "duty-ana"}))
        .expect("POST ack");
    assert_eq!(status, 200, "{body}");
    let acked = ops
        .recv_matching(SCENARIO_WAIT, change(2))
        .await
        .expect("the acknowledgement on the ops topic");
    assert_eq!(acked.json().expect("incident JSON")["state"], "acknowledged");
}

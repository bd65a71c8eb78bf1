//! Situations end to end (SPEC §5 "one situation, one incident"): a hand-driven gas detector on
//! the gateway's embedded broker leaks, rises to 55 %LEL and falls back; the operations centre
//! sees ONE incident rising and falling, at a real webhook receiver and in the HTTP API.

use std::collections::BTreeSet;
use std::time::Duration;

use citywatch_tests::{birth, device_topic, Delivery, GatewayProcess, Publisher, WebhookReceiver};
use serde_json::{json, Value};

const SECRET: &str = "e2e-situations-secret";
/// Bound of the waits for a step the test itself drives (holds here are 1–2 s).
const STEP_WAIT: Duration = Duration::from_secs(60);

/// Webhook "ops" to `receiver`, short retries; the gas rules' holds shortened so the leak runs
/// in seconds (the rules themselves, not the situation logic, are what the holds exercise
/// elsewhere); no command timeout inside the test (the hand-driven device does not answer).
fn config(receiver: &WebhookReceiver) -> String {
    format!(
        "[[notify.webhook]]\nname = \"ops\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
         [notify.retry]\ninitial = \"100ms\"\nmax = \"1s\"\n\
         [incidents]\ncommand_timeout = \"1h\"\n\
         [[rules.override]]\nrule = \"gas_low\"\nopen = {{ at_least = 20.0, for = \"1s\" }}\nclear = {{ below = 10.0, for = \"2s\" }}\n\
         [[rules.override]]\nrule = \"gas_high\"\nclear = {{ below = 40.0, for = \"2s\" }}\n",
        receiver.url()
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

struct Detector {
    publisher: Publisher,
    site: String,
    device: String,
    seq: u32,
}

impl Detector {
    async fn connect(gw: &GatewayProcess, site: &str, device: &str) -> Detector {
        let broker = gw.mqtt_addr().expect("embedded broker").to_owned();
        let mut publisher = Publisher::connect(&broker, 64).await.expect("publisher");
        publisher
            .publish_json(&device_topic(site, device, "status"), true, &birth("gas_detector", 60))
            .await
            .expect("birth");
        publisher.wait_acked(1, Duration::from_secs(10)).await.expect("birth acknowledged");
        gw.wait_for(Duration::from_secs(10), &format!("{device} registered"), |gw| {
            gw.get(&format!("/api/v1/devices/{device}")).ok()
        })
        .await;
        Detector { publisher, site: site.into(), device: device.into(), seq: 0 }
    }

    async fn reading(&mut self, gas_lel: f64, valve_closed: u8) {
        self.seq += 1;
        let body = json!({"seq": self.seq, "ts": now_ms(), "values": {"gas_lel": gas_lel, "valve_closed": valve_closed}});
        self.publisher
            .publish_json(&device_topic(&self.site, &self.device, "telemetry"), false, &body)
            .await
            .expect("telemetry");
    }

    /// Sends `gas_lel` every 500 ms until the webhook receiver has a push of `rule` in `state`
    /// for this device.
    async fn hold_until(&mut self, receiver: &WebhookReceiver, gas_lel: f64, valve_closed: u8, what: &str, done: impl Fn(&Delivery) -> bool) {
        let deadline = tokio::time::Instant::now() + STEP_WAIT;
        loop {
            self.reading(gas_lel, valve_closed).await;
            if receiver.deliveries().iter().any(|d| d.device() == self.device && done(d)) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}\n{}", receiver.report());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn history_actions(incident: &Value) -> Vec<String> {
    incident["history"]
        .as_array()
        .map(|h| h.iter().filter_map(|e| e["action"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gas_leak_rising_to_55_and_falling_is_one_incident_pushed_revision_by_revision() {
    let (site, device) = ("sit-leak", "sit-leak-gas-00000");
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let gw = GatewayProcess::start_embedded(&config(&receiver)).await.expect("gateway");
    let mut gas = Detector::connect(&gw, site, device).await;

    gas.hold_until(&receiver, 25.0, 0, "gas_low opened", |d| d.rule() == "gas_low" && d.state() == "open").await;
    gas.hold_until(&receiver, 55.0, 0, "raised to gas_high", |d| d.rule() == "gas_high").await;
    // The valve closes: no gas_valve_failed. Then the gas falls back through level 1 to clear.
    gas.hold_until(&receiver, 30.0, 1, "lowered to gas_low", |d| d.rule() == "gas_low" && d.revision() > 1).await;
    gas.hold_until(&receiver, 2.0, 1, "cleared", |d| d.state() == "cleared").await;

    // Every push of this device's leak is one incident, revisions in order, none missing.
    let mine: Vec<Delivery> = receiver.deliveries().into_iter().filter(|d| d.device() == device).collect();
    let ids: BTreeSet<&str> = mine.iter().map(Delivery::id).collect();
    assert_eq!(ids.len(), 1, "one incident for the leak:\n{}", receiver.report());
    let mut revisions: Vec<u64> = mine.iter().map(Delivery::revision).collect();
    revisions.dedup(); // a retried POST carries the same revision
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "revisions arrive in order: {revisions:?}");
    let last = *revisions.last().expect("pushes");
    assert_eq!(revisions, (1..=last).collect::<Vec<_>>(), "one push per revision, none skipped");
    assert!(mine.iter().all(|d| d.signature_valid), "every push signed");
    let rules: Vec<(&str, &str)> =
        mine.iter().map(|d| (d.rule(), d.body["severity"].as_str().unwrap_or_default())).collect();
    assert_eq!(rules.first(), Some(&("gas_low", "major")), "{rules:?}");
    assert!(rules.contains(&("gas_high", "critical")), "{rules:?}");
    let high = mine.iter().find(|d| d.rule() == "gas_high").expect("gas_high push");
    assert_eq!(high.body["situation"], "gas_leak");
    assert_eq!(high.body["key"], format!("{site}/{device}/gas_leak"));
    assert_eq!(high.body["rules_active"], json!(["gas_low", "gas_high"]));
    assert_eq!(high.body["value"], 55.0);
    assert_eq!(high.body["threshold"], 50.0);

    // The API has the same single incident, its history the rise and the fall.
    let list = gw.get(&format!("/api/v1/incidents?device={device}")).expect("incidents");
    let list = list["incidents"].as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 1, "{list:?}");
    let id = ids.into_iter().next().expect("id");
    let incident = gw.get(&format!("/api/v1/incidents/{id}")).expect("incident");
    let actions = history_actions(&incident);
    let pos = |a: &str| actions.iter().position(|x| x == a).unwrap_or_else(|| panic!("{a} in {actions:?}"));
    assert!(pos("open") < pos("raised") && pos("raised") < pos("lowered") && pos("lowered") < pos("cleared"), "{actions:?}");
    assert!(actions.contains(&"command".to_owned()), "close_valve sent when it rose: {actions:?}");
    assert_eq!(incident["rules_active"], json!([]), "nothing active once cleared");
    assert_eq!(incident["state"], "cleared");
}

/// A device of `kind` at `site` on its own publisher (born online), for the site tests.
async fn born(gw: &GatewayProcess, site: &str, device: &str, kind: &str) -> Publisher {
    let broker = gw.mqtt_addr().expect("embedded broker").to_owned();
    let mut publisher = Publisher::connect(&broker, 64).await.expect("publisher");
    publisher.publish_json(&device_topic(site, device, "status"), true, &birth(kind, 60)).await.expect("birth");
    publisher.wait_acked(1, Duration::from_secs(10)).await.expect("birth acknowledged");
    publisher
}

async fn wait_registered(gw: &GatewayProcess, device: &str) {
    gw.wait_for(Duration::from_secs(10), &format!("{device} registered"), |gw| gw.get(&format!("/api/v1/devices/{device}")).ok()).await;
}

fn ids(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_over_two_smoke_detectors_is_one_parent_whose_ack_acknowledges_its_children() {
    let site = "sit-fire";
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    // The smoke hold shortened to 1 s so the fire runs in seconds.
    let extra = "[[rules.override]]\nrule = \"smoke\"\nopen = { at_least = 0.15, for = \"1s\" }\n";
    let gw = GatewayProcess::start_embedded(&format!("{}{extra}", config(&receiver))).await.expect("gateway");
    let devices = ["sit-fire-smoke-01", "sit-fire-smoke-02"];
    let mut publishers = Vec::new();
    for d in devices {
        publishers.push(born(&gw, site, d, "smoke_detector").await);
        wait_registered(&gw, d).await;
    }
    // Both detectors see smoke until the fire is confirmed with both smoke incidents under it.
    let deadline = tokio::time::Instant::now() + STEP_WAIT;
    let mut seq = 0;
    let fire = loop {
        seq += 1;
        for (p, d) in publishers.iter().zip(devices) {
            let body = json!({"seq": seq, "ts": now_ms(), "values": {"smoke_db_m": 0.3, "temp_c": 25.0}});
            p.publish_json(&device_topic(site, d, "telemetry"), false, &body).await.expect("telemetry");
        }
        let found = receiver.deliveries().into_iter().rev().find(|d| d.site() == site && d.rule() == "fire_confirmed");
        if let Some(fire) = found.filter(|f| ids(&f.body["children"]).len() == 2) {
            break fire;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for the fire with two children\n{}", receiver.report());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let fire_id = fire.id().to_owned();
    let children = ids(&fire.body["children"]);
    // Linked both ways, in the API as pushed.
    let listed = gw.get(&format!("/api/v1/incidents?parent={fire_id}")).expect("children");
    let mut listed: Vec<String> = listed["incidents"].as_array().map(|a| a.iter().filter_map(|i| i["id"].as_str().map(str::to_owned)).collect()).unwrap_or_default();
    listed.sort();
    let mut expected = children.clone();
    expected.sort();
    assert_eq!(listed, expected, "?parent= lists the children");
    let mut child_devices = Vec::new();
    for child in &children {
        let inc = gw.get(&format!("/api/v1/incidents/{child}")).expect("child");
        assert_eq!(inc["parent"], fire_id.as_str(), "{inc}");
        assert_eq!(inc["situation"], "smoke");
        assert_eq!(inc["state"], "open");
        child_devices.push(inc["device"].as_str().unwrap_or_default().to_owned());
    }
    child_devices.sort();
    assert_eq!(child_devices, devices);
    let smoke_ids: BTreeSet<String> =
        receiver.deliveries().iter().filter(|d| d.site() == site && d.rule() != "fire_confirmed").map(|d| d.id().to_owned()).collect();
    assert_eq!(smoke_ids.len(), 2, "one incident per detector, no more:\n{}", receiver.report());

    // The duty officer acknowledges the fire: both children are acknowledged too, by them.
    let (status, acked) = gw.post(&format!("/api/v1/incidents/{fire_id}/ack"), &json!({"actor": "li", "note": "crew en route"})).expect("ack");
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["state"], "acknowledged");
    for child in &children {
        let pushed = receiver
            .wait_for(STEP_WAIT, "the child's ack pushed", |all| all.iter().find(|d| d.id() == child.as_str() && d.state() == "acknowledged").cloned())
            .await;
        let last = pushed.body["history"].as_array().and_then(|h| h.last()).cloned().unwrap_or_default();
        assert_eq!(last["actor"], "li", "{last}");
        assert_eq!(last["note"], format!("with parent {fire_id}: crew en route"));
        let inc = gw.get(&format!("/api/v1/incidents/{child}")).expect("child");
        assert_eq!(inc["state"], "acknowledged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_devices_of_a_site_going_offline_together_are_one_site_incident() {
    let site = "sit-outage";
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let gw = GatewayProcess::start_embedded(&config(&receiver)).await.expect("gateway");
    let devices: Vec<String> = (0..10).map(|i| format!("sit-outage-smoke-{i:02}")).collect();
    let mut publishers = Vec::new();
    for d in &devices {
        publishers.push(born(&gw, site, d, "smoke_detector").await);
    }
    for d in &devices {
        wait_registered(&gw, d).await;
    }
    // The power goes: every device's offline status (what its Last Will says) within a second.
    for (p, d) in publishers.iter_mut().zip(&devices) {
        let offline = json!({"state": "offline", "kind": "smoke_detector", "fw": "0.1.0", "interval_s": 60});
        p.publish_json(&device_topic(site, d, "status"), true, &offline).await.expect("offline");
        p.wait_acked(2, Duration::from_secs(10)).await.expect("offline acknowledged");
    }
    let storm = receiver
        .wait_for(STEP_WAIT, "one site incident listing the ten devices", |all| {
            all.iter().rev().find(|d| d.site() == site && d.body["scope"] == "site" && ids(&d.body["devices"]).len() == 10).cloned()
        })
        .await;
    assert_eq!(storm.body["situation"], "site_offline");
    assert_eq!(storm.body["key"], format!("{site}/*/site_offline"));
    assert_eq!(storm.body["rule"], "device_offline");
    let mut listed = ids(&storm.body["devices"]);
    listed.sort();
    assert_eq!(listed, devices);
    // The pushes of the site incident: revisions in order, opened with three, then the devices
    // added coalesced (at most one revision per `storm_update_every`), each listing the whole
    // set so far and never fewer than the one before.
    let storm_id = storm.id().to_owned();
    let pushes: Vec<Delivery> = receiver.deliveries().into_iter().filter(|d| d.id() == storm_id).collect();
    let mut revisions: Vec<u64> = pushes.iter().map(Delivery::revision).collect();
    revisions.dedup();
    let last = storm.revision();
    assert_eq!(revisions, (1..=last).collect::<Vec<_>>(), "every revision once, in order");
    assert!(last <= 8, "at most one revision per device added: {revisions:?}");
    let sizes: Vec<usize> = pushes.iter().map(|d| ids(&d.body["devices"]).len()).collect();
    assert_eq!(sizes.first(), Some(&3), "{sizes:?}");
    assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "{sizes:?}");
    // The board: one open incident for the site; the two device incidents opened before the
    // threshold are folded into it (closed, naming it).
    let open = gw.get(&format!("/api/v1/incidents?site={site}&state=active")).expect("incidents");
    let open = open["incidents"].as_array().cloned().unwrap_or_default();
    assert_eq!(open.len(), 1, "one active incident for the outage: {open:?}");
    assert_eq!(open[0]["id"], storm_id.as_str());
    let folded = ids(&storm.body["children"]);
    assert_eq!(folded.len(), 2, "{}", storm.body);
    for child in &folded {
        let inc = gw.get(&format!("/api/v1/incidents/{child}")).expect("folded");
        assert_eq!((inc["state"].as_str(), inc["parent"].as_str()), (Some("closed"), Some(storm_id.as_str())), "{inc}");
        assert!(history_actions(&inc).contains(&"folded".to_owned()));
    }

    // Power back on one device: removed from the site incident, one more revision.
    let online = birth("smoke_detector", 60);
    publishers[0].publish_json(&device_topic(site, &devices[0], "status"), true, &online).await.expect("online");
    let removed = receiver
        .wait_for(STEP_WAIT, "the device removed", |all| all.iter().find(|d| d.id() == storm_id && d.revision() == last + 1).cloned())
        .await;
    assert_eq!(removed.body["history"].as_array().and_then(|h| h.last()).map(|h| h["action"].clone()), Some(json!("device_removed")));
    assert_eq!(ids(&removed.body["devices"]).len(), 9);
    assert!(!ids(&removed.body["devices"]).contains(&devices[0]));
}

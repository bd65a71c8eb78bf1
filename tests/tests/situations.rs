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

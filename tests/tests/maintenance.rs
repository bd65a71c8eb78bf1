//! Maintenance end to end (issue 6, SPEC §4 `inspection_due`, §6): the inventory import over
//! HTTP and through the `citywatch devices import` CLI, reminders reaching a real webhook
//! receiver on the right days (due dates chosen relative to today), each once across restarts, a
//! crew's completion closing the overdue incident, and a siren test window with one silent
//! siren. Each test has its own gateway.

use std::process::Command;
use std::time::Duration;

use citywatch_tests::{birth, citywatch_bin, device_topic, GatewayProcess, Publisher, WebhookReceiver};
use jiff::civil::Date;
use jiff::ToSpan;
use serde_json::{json, Value};

const SECRET: &str = "e2e-maintenance-secret";
const WAIT: Duration = Duration::from_secs(30);
const HEADER: &str = "site,device,kind,location,install_date,last_inspection,inspection_interval_months,crew,phone\n";

/// Today in Shanghai, where due dates fall at midnight.
fn today() -> Date {
    jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::get("Asia/Shanghai").expect("tz")).date()
}

fn day(offset_days: i64, offset_months: i64) -> String {
    today().checked_add(offset_days.days()).and_then(|d| d.checked_add(offset_months.months())).expect("date").to_string()
}

fn webhook_toml(receiver: &WebhookReceiver, extra: &str) -> String {
    format!(
        "[[notify.webhook]]\nname = \"ops\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
         [notify.retry]\ninitial = \"100ms\"\nmax = \"1s\"\n\
         [inspections]\ncheck_every = \"200ms\"\n{extra}",
        receiver.url()
    )
}

fn import(gw: &GatewayProcess, csv: &str) -> Value {
    let (status, body) = gw.post_raw("/api/v1/devices/import", "text/csv", csv.as_bytes()).expect("import");
    assert_eq!(status, 200, "{body}");
    body
}

/// Revisions of one device's `inspection_due` incident whose last history entry is `action`
/// with a note or summary containing `text`, one per (id, revision): a redelivery after a
/// SIGKILL restart is the idempotency key's business, not a second reminder.
fn revisions_with<'a>(deliveries: &'a [citywatch_tests::Delivery], device: &str, action: &str, text: &str) -> Vec<&'a citywatch_tests::Delivery> {
    unique(deliveries)
        .into_iter()
        .filter(|d| d.rule() == "inspection_due" && d.device() == device)
        .filter(|d| {
            let last = d.body["history"].as_array().and_then(|h| h.last()).cloned().unwrap_or(Value::Null);
            let said = format!("{} {}", last["note"].as_str().unwrap_or(""), d.body["summary"].as_str().unwrap_or(""));
            last["action"] == action && said.contains(text)
        })
        .collect()
}

/// One delivery per (id, revision).
fn unique(deliveries: &[citywatch_tests::Delivery]) -> Vec<&citywatch_tests::Delivery> {
    let mut seen = std::collections::HashSet::new();
    deliveries.iter().filter(|d| seen.insert((d.id().to_owned(), d.revision()))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_reports_bad_lines_masks_phones_and_is_idempotent() {
    let gw = GatewayProcess::start_embedded("").await.expect("gateway");
    let csv = format!(
        "{HEADER}\
         xuhui,xuhui-gas-0,gas_detector,\"Wanping Rd 12, kitchen\",2024-03-01,{},12,crew-7,13812345678\n\
         xuhui,xuhui-gas-1,gas_detektor,Wanping Rd 14,2024-03-01,,,crew-7,13812345678\n\
         xuhui,xuhui-smoke-0,smoke_detector,Garage B2,{},{},,crew-8,13987654321\n\
         xuhui,xuhui-siren-0,siren_mount,Roof,2023-05-01,2024-01-01,6,crew-9,021-6432-1234\n\
         xuhui,xuhui-siren-1,siren_mount,Roof 2,2023-05-01,2022-01-01,6,crew-9,021-6432-1234\n\
         xuhui,xuhui-gas-0,gas_detector,again,2024-03-01,,,crew-7,13812345678\n\
         xuhui,xuhui-gas-2,gas_detector,Kitchen 3,2024-03-01,,,crew-7,call-me\n",
        day(10, -12),
        day(-20, -12),
        day(-20, 0),
    );
    let report = import(&gw, &csv);
    assert_eq!(report["rows"], 7, "{report}");
    assert_eq!(report["imported"], 3, "{report}");
    assert_eq!(report["created"], 3, "{report}");
    assert_eq!(report["rejected"], 4, "{report}");
    let errors: Vec<(u64, String)> = report["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| (e["line"].as_u64().expect("line"), e["reason"].as_str().expect("reason").to_owned()))
        .collect();
    let lines: Vec<u64> = errors.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, [3, 6, 7, 8], "{report}");
    assert!(errors[0].1.starts_with("kind:"), "{report}");
    assert!(errors[1].1.starts_with("last_inspection: before install_date"), "{report}");
    assert!(errors[2].1.contains("already on line 2"), "{report}");
    assert!(errors[3].1.starts_with("phone:"), "{report}");

    // Idempotent: the same file again changes nothing.
    let again = import(&gw, &csv);
    assert_eq!((again["created"].as_u64(), again["unchanged"].as_u64()), (Some(0), Some(3)), "{again}");

    // Work orders: the gas detector's calibration in 10 days, masked phone, sorted by due.
    let orders = gw.get("/api/v1/inspections?due_within_days=30").expect("work orders");
    let items = orders["items"].as_array().expect("items");
    let gas = items.iter().find(|i| i["device"] == "xuhui-gas-0").unwrap_or_else(|| panic!("gas-0 due: {orders}"));
    assert_eq!(gas["task"], "calibration");
    assert_eq!(gas["days_left"], 10, "{orders}");
    assert_eq!(gas["phone"], "138****5678");
    assert_eq!(gas["location"], "Wanping Rd 12, kitchen");
    assert_eq!(gas["overdue"], false);
    assert!(items.iter().all(|i| i["device"] != "xuhui-smoke-0"), "tested 20 days ago: not due within 30 days");
    let year = gw.get("/api/v1/inspections?due_within_days=366").expect("a year of work orders");
    let smoke: Vec<&Value> = year["items"].as_array().expect("items").iter().filter(|i| i["device"] == "xuhui-smoke-0").collect();
    assert_eq!(smoke.len(), 2, "its yearly test and its first cleaning: {year}");
    let days_left = smoke.iter().find(|i| i["task"] == "inspection").and_then(|i| i["days_left"].as_i64()).expect("test");
    assert!((344..=346).contains(&days_left), "a year less 20 days: {year}");
    let dues: Vec<&str> = items.iter().map(|i| i["due"].as_str().expect("due")).collect();
    let mut sorted = dues.clone();
    sorted.sort();
    assert_eq!(dues, sorted, "sorted by due");
    // The siren last inspected in 2024 is overdue and listed first.
    assert_eq!(items[0]["device"], "xuhui-siren-0", "{orders}");
    assert_eq!(items[0]["overdue"], true);
    let overdue = gw.get("/api/v1/inspections?overdue=true").expect("overdue");
    assert!(overdue["items"].as_array().expect("items").iter().all(|i| i["overdue"] == true), "{overdue}");
    let other_site = gw.get("/api/v1/inspections?due_within_days=365&site=minhang").expect("site");
    assert_eq!(other_site["items"].as_array().map(Vec::len), Some(0));

    // CSV, by parameter and by Accept.
    let text = gw.get_text("/api/v1/inspections?due_within_days=30&format=csv").expect("csv");
    assert!(text.starts_with("device,site,kind,location,task,due,days_left,overdue,crew,phone"), "{text}");
    assert!(text.contains("xuhui-gas-0,xuhui,gas_detector,\"Wanping Rd 12, kitchen\",calibration,"), "{text}");
    let url = format!("http://{}/api/v1/inspections", gw.http_addr());
    let by_accept = ureq::get(&url).header("accept", "text/csv").call().expect("accept csv").body_mut().read_to_string().expect("body");
    assert!(by_accept.starts_with("device,site,"), "{by_accept}");

    // The full numbers appear nowhere the API or the logs show.
    for shown in [text.as_str(), &orders.to_string(), &report.to_string(), &gw.logs()] {
        assert!(!shown.contains("13812345678") && !shown.contains("13987654321") && !shown.contains("6432-1234"), "a phone number leaked: {shown}");
    }
    assert_eq!(gw.status_of("/api/v1/inspections?due_within_days=-1").expect("status"), 400);
    assert_eq!(gw.status_of("/api/v1/inspections?format=xml").expect("status"), 400);

    // A device the gateway hears of shows its inventory facts, phone masked.
    let publisher = Publisher::connect(gw.mqtt_addr().expect("broker"), 16).await.expect("publisher");
    publisher.publish_json(&device_topic("xuhui", "xuhui-gas-0", "status"), true, &birth("gas_detector", 60)).await.expect("birth");
    let device = gw
        .wait_for(WAIT, "xuhui-gas-0 with its crew", |g| g.get("/api/v1/devices/xuhui-gas-0").ok().filter(|d| d["crew"] == "crew-7"))
        .await;
    assert_eq!(device["phone"], "138****5678", "{device}");
    assert_eq!(device["location"], "Wanping Rd 12, kitchen");
    assert_eq!(device["install_date"], "2024-03-01");

    // The CLI: through the running gateway, with file line numbers across chunks.
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("inventory.csv");
    let mut big = String::from(HEADER);
    for i in 0..250 {
        big.push_str(&format!("pudong,pd-gas-{i},gas_detector,Block {i},2025-01-01,2025-06-01,,crew-1,13700001111\n"));
    }
    big.push_str("pudong,pd-bad,gas_detector,x,2025-02-30,,,crew-1,13700001111\n");
    std::fs::write(&file, big).expect("write");
    let out = Command::new(citywatch_bin())
        .args(["devices", "import"])
        .arg(&file)
        .args(["--url", &format!("http://{}", gw.http_addr()), "--chunk-rows", "100"])
        .output()
        .expect("run citywatch devices import");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "rejected lines exit 1: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("line 252: install_date"), "{stdout}");
    assert!(stdout.contains("250 imported (250 new, 0 updated, 0 unchanged), 1 rejected"), "{stdout}");
    let metrics = gw.get_text("/metrics").expect("metrics");
    assert!(metrics.contains("citywatch_inventory_rows_rejected_total{reason=\"install_date\"} 1"), "{metrics}");
    assert!(metrics.contains("citywatch_inventory_rows_rejected_total{reason=\"kind\"} 2"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminders_fire_on_the_right_days_once_across_restarts() {
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let mut gw = GatewayProcess::start_embedded(&webhook_toml(&receiver, "")).await.expect("gateway");
    // Due in exactly 30, 7 and 60 days (12-month intervals, last inspection chosen to match).
    let csv = format!(
        "{HEADER}\
         xuhui,r-gas-30,gas_detector,Kitchen A,{},{},,crew-7,13812345678\n\
         xuhui,r-smoke-7,smoke_detector,Garage B,{},{},,crew-8,13987654321\n\
         xuhui,r-gas-60,gas_detector,Kitchen C,{},{},,crew-7,13812345678\n",
        day(-40, -12), day(30, -12),
        day(-60, -12), day(7, -12),
        day(-40, -12), day(60, -12),
    );
    import(&gw, &csv);
    receiver
        .wait_for(WAIT, "the 30-day and the 7-day reminders", |d| {
            (!revisions_with(d, "r-gas-30", "open", "in 30 days").is_empty() && !revisions_with(d, "r-smoke-7", "open", "in 7 days").is_empty()).then_some(())
        })
        .await;
    let deliveries = receiver.deliveries();
    let gas30 = revisions_with(&deliveries, "r-gas-30", "open", "in 30 days");
    assert_eq!(gas30.len(), 1, "{}", receiver.report());
    assert!(gas30[0].signature_valid);
    assert_eq!(gas30[0].body["severity"], "info");
    assert!(gas30[0].body["summary"].as_str().expect("summary").contains("crew crew-7 (138****5678)"), "{}", gas30[0].raw);
    // Learnt 7 days before: only the 7-day reminder, not the 30-day one too.
    assert!(revisions_with(&deliveries, "r-smoke-7", "open", "in 30 days").is_empty(), "{}", receiver.report());
    assert!(deliveries.iter().all(|d| d.device() != "r-gas-60"), "60 days out: nothing yet\n{}", receiver.report());

    // Restart: nothing is sent again. A device due tomorrow, imported after the restart, shows
    // the checks ran; by then a repeated reminder would have arrived too. The restart is a
    // SIGKILL: first wait until the gateway has recorded both deliveries (nothing pending), or
    // at-least-once delivery rightly sends them again.
    gw.wait_for(WAIT, "both reminders recorded as delivered", |g| {
        let body = g.get("/api/v1/notify").ok()?;
        let ops = body["channels"].as_array()?.iter().find(|c| c["channel"] == "webhook:ops")?.clone();
        (ops["pending"].as_u64()? == 0).then_some(())
    })
    .await;
    gw.restart().await.expect("restart");
    import(&gw, &format!("{HEADER}xuhui,r-gas-1,gas_detector,Kitchen D,{},{},,crew-7,13812345678\n", day(-40, -12), day(1, -12)));
    receiver.wait_for(WAIT, "the 1-day reminder", |d| (!revisions_with(d, "r-gas-1", "open", "in 1 day:").is_empty()).then_some(())).await;
    let deliveries = receiver.deliveries();
    assert_eq!(revisions_with(&deliveries, "r-gas-30", "open", "in 30 days").len(), 1, "{}", receiver.report());
    assert_eq!(unique(&deliveries).iter().filter(|d| d.device() == "r-smoke-7").count(), 1, "{}", receiver.report());

    // Days later (the next reminder once, overdue turning the incident warning) need a moved
    // clock: the in-crate test `inspections::service::tests::reminders_fall_on_their_days_…`
    // injects one through `Service::with_clock`.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_resets_the_schedule_and_closes_the_overdue_incident() {
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let gw = GatewayProcess::start_embedded(&webhook_toml(&receiver, "")).await.expect("gateway");
    // Last inspected 7 months ago, every 6 months: a month overdue.
    import(&gw, &format!("{HEADER}xuhui,c-siren-0,siren_mount,Roof,{},{},6,crew-9,021-6432-1234\n", day(0, -30), day(0, -7)));
    let opened = receiver
        .wait_for(WAIT, "the overdue incident", |d| {
            d.iter().find(|x| x.device() == "c-siren-0" && x.state() == "open" && x.body["severity"] == "warning").cloned()
        })
        .await;
    let id = opened.id().to_owned();
    assert!(opened.body["summary"].as_str().expect("summary").contains("inspection of c-siren-0"), "{}", opened.raw);

    // Bad requests first: JSON errors, nothing recorded.
    let (status, body) = gw.post("/api/v1/devices/nope/inspections", &json!({"result": "pass", "by": "crew-9"})).expect("post");
    assert_eq!((status, body["error"].is_string()), (404, true), "{body}");
    let (status, body) = gw.post("/api/v1/devices/c-siren-0/inspections", &json!({"result": "great", "by": "crew-9"})).expect("post");
    assert_eq!((status, body["error"].is_string()), (400, true), "{body}");
    let (status, body) = gw.post("/api/v1/devices/c-siren-0/inspections", &json!({"result": "pass", "by": "crew-9", "task": "cleaning"})).expect("post");
    assert_eq!(status, 400, "a siren mount is not cleaned: {body}");

    let (status, schedule) = gw
        .post("/api/v1/devices/c-siren-0/inspections", &json!({"result": "pass", "notes": "bracket tightened", "by": "crew-9", "task": "inspection"}))
        .expect("complete");
    assert_eq!(status, 201, "{schedule}");
    assert_eq!(schedule["device"], "c-siren-0");
    assert_eq!(schedule["incident_closed"], true, "{schedule}");
    let inspection = schedule["tasks"].as_array().expect("tasks").iter().find(|t| t["task"] == "inspection").cloned().expect("inspection task");
    let days_left = inspection["days_left"].as_i64().expect("days_left");
    assert!((180..=185).contains(&days_left), "six months from today: {schedule}");

    let closed = receiver
        .wait_for(WAIT, "the incident closed by the crew", |d| d.iter().find(|x| x.id() == id && x.state() == "closed").cloned())
        .await;
    let history = closed.body["history"].as_array().expect("history");
    let actions: Vec<&str> = history.iter().map(|h| h["action"].as_str().unwrap_or("")).collect();
    assert!(actions.ends_with(&["cleared", "closed"]), "{actions:?}");
    assert_eq!(history.last().expect("last")["actor"], "crew-9");
    let incident = gw.get(&format!("/api/v1/incidents/{id}")).expect("incident");
    assert_eq!(incident["state"], "closed");
    let overdue = gw.get("/api/v1/inspections?overdue=true").expect("overdue");
    assert_eq!(overdue["items"].as_array().map(Vec::len), Some(0), "{overdue}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_siren_test_window_opens_an_incident_for_the_silent_siren_only() {
    // Built before the window is chosen (a cold build takes minutes).
    citywatch_bin();
    // A one-off window starting in 5 s, 15 s long (room for a slow start on a busy machine).
    let start = jiff::Timestamp::now() + 5.seconds();
    let end = start + 15.seconds();
    let extra = format!("[inspections.siren_test]\nstart = \"{start}\"\nend = \"{end}\"\ngrace = \"1s\"\n");
    let gw = GatewayProcess::start_embedded(&format!("[inspections]\ncheck_every = \"200ms\"\n{extra}")).await.expect("gateway");
    let mut publisher = Publisher::connect(gw.mqtt_addr().expect("broker"), 16).await.expect("publisher");
    for siren in ["s-siren-loud", "s-siren-silent"] {
        publisher.publish_json(&device_topic("xuhui", siren, "status"), true, &birth("siren_mount", 60)).await.expect("birth");
    }
    publisher.wait_acked(2, WAIT).await.expect("births acked");
    gw.wait_for(WAIT, "both sirens registered", |g| g.get("/api/v1/devices?kind=siren_mount").ok().filter(|d| d["count"] == 2)).await;

    // Into the window (waiting for a wall-clock instant, not for the gateway).
    let until_start = start.duration_since(jiff::Timestamp::now()).as_secs_f64().max(0.0) + 0.5;
    tokio::time::sleep(Duration::from_secs_f64(until_start)).await;
    let ts = jiff::Timestamp::now().as_millisecond();
    publisher
        .publish_json(&device_topic("xuhui", "s-siren-loud", "event"), false, &json!({"seq": 1, "ts": ts, "event": "siren_activated"}))
        .await
        .expect("siren_activated");
    publisher.wait_acked(3, WAIT).await.expect("event stored (QoS 1 acks after commit)");
    assert!(jiff::Timestamp::now() < end, "the event went out inside the window");
    let silences = gw.get("/api/v1/silences").expect("silences");
    assert!(silences.to_string().contains("siren-test-day"), "the window holds siren_activated back: {silences}");

    let silent = gw
        .wait_for(Duration::from_secs(60), "the silent siren's incident", |g| {
            g.get("/api/v1/incidents?rule=siren_test_silent").ok().and_then(|b| b["incidents"].as_array().cloned()).filter(|l| !l.is_empty())
        })
        .await;
    // Both sirens were checked in one pass: the loud one has none.
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!(silent[0]["device"], "s-siren-silent");
    assert_eq!(silent[0]["severity"], "major");
    assert_eq!(silent[0]["state"], "open");
    let metrics = gw.get_text("/metrics").expect("metrics");
    assert!(metrics.contains("citywatch_siren_test_silent_total 1"), "{metrics}");
}

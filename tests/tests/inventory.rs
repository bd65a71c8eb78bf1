//! Every installed device accounted for, end to end (issue 16 item 2, SPEC §3 `never_reported`
//! and `not_in_inventory`, §4 `commissioning_overdue`): an imported device that never reported
//! is listed, answered and counted as `never_reported` from the import on (and after a restart),
//! opens `commissioning_overdue` once its grace has passed — a short configured
//! `[inspections] commissioning_grace` stands in for the 24 h default — and its first message
//! clears that incident and changes its health; a reporting device the inventory does not list
//! shows `not_in_inventory`.

use std::time::Duration;

use citywatch_tests::{birth, device_topic, GatewayProcess, Publisher};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const HEADER: &str = "site,device,kind,location,install_date,last_inspection,inspection_interval_months,crew,phone\n";

/// The device's `commissioning_overdue` incidents.
fn commissioning(gw: &GatewayProcess, device: &str) -> Vec<Value> {
    gw.get(&format!("/api/v1/incidents?rule=commissioning_overdue&device={device}"))
        .ok()
        .and_then(|b| b["incidents"].as_array().cloned())
        .unwrap_or_default()
}

fn ids(list: &Value) -> Vec<String> {
    let mut ids: Vec<String> = list["devices"].as_array().into_iter().flatten().filter_map(|d| d["id"].as_str().map(str::to_owned)).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_silent_devices_are_never_reported_then_overdue_until_they_report() {
    let mut gw = GatewayProcess::start_embedded("[inspections]\ncheck_every = \"200ms\"\ncommissioning_grace = \"3s\"\n").await.expect("gateway");
    let mut publisher = Publisher::connect(gw.mqtt_addr().expect("broker"), 16).await.expect("publisher");

    // Heard before any inventory exists: plain online, not "not in inventory".
    publisher.publish_json(&device_topic("xuhui", "x-stranger", "status"), true, &birth("gas_detector", 60)).await.expect("birth");
    publisher.wait_acked(1, WAIT).await.expect("birth acked");
    gw.wait_for(WAIT, "the stranger registered", |g| g.get("/api/v1/devices/x-stranger").ok().filter(|d| d["health"] == "online")).await;

    let csv = format!(
        "{HEADER}\
         xuhui,inv-gas-0,gas_detector,Kitchen A,2025-06-01,,,crew-7,13812345678\n\
         xuhui,inv-smoke-0,smoke_detector,Garage B2,2025-06-01,,,crew-8,13987654321\n"
    );
    let (status, report) = gw.post_raw("/api/v1/devices/import", "text/csv", csv.as_bytes()).expect("import");
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["created"], 2, "{report}");

    // From the import on: answered, listed, counted, filterable.
    let gas = gw.get("/api/v1/devices/inv-gas-0").expect("an imported device is answered");
    assert_eq!(gas["health"], "never_reported", "{gas}");
    assert_eq!(gas["health_flags"], serde_json::json!(["never_reported"]), "not offline: never heard");
    assert_eq!(gas["location"], "Kitchen A");
    assert_eq!(gas["phone"], "138****5678");
    let never = gw.get("/api/v1/devices?health=never_reported").expect("never reported");
    assert_eq!(ids(&never), ["inv-gas-0", "inv-smoke-0"], "{never}");
    assert_eq!(never["by_health"]["never_reported"], 2, "{never}");
    // Now an inventory exists: the stranger is not in it.
    let strangers = gw.get("/api/v1/devices?health=not_in_inventory").expect("not in inventory");
    assert_eq!(ids(&strangers), ["x-stranger"], "{strangers}");
    assert_eq!(gw.status_of("/api/v1/devices?health=nonsense").expect("bad filter"), 400);

    // After the grace period: one commissioning_overdue per silent device, a warning.
    let opened = gw
        .wait_for(WAIT, "commissioning_overdue for inv-gas-0", |g| commissioning(g, "inv-gas-0").into_iter().find(|i| i["state"] == "open"))
        .await;
    assert_eq!(opened["severity"], "warning", "{opened}");
    assert!(opened["summary"].as_str().is_some_and(|s| s.contains("never reported")), "{opened}");
    gw.wait_for(WAIT, "commissioning_overdue for inv-smoke-0", |g| (!commissioning(g, "inv-smoke-0").is_empty()).then_some(())).await;

    // The gas detector reports: the incident clears, its health is online.
    publisher.publish_json(&device_topic("xuhui", "inv-gas-0", "status"), true, &birth("gas_detector", 60)).await.expect("birth");
    publisher.wait_acked(2, WAIT).await.expect("birth acked");
    let cleared = gw
        .wait_for(WAIT, "inv-gas-0's incident cleared", |g| commissioning(g, "inv-gas-0").into_iter().find(|i| i["state"] == "cleared"))
        .await;
    assert_eq!(cleared["id"], opened["id"], "the same incident");
    let gas = gw.get("/api/v1/devices/inv-gas-0").expect("device");
    assert_eq!(gas["health"], "online", "{gas}");
    assert_eq!(gw.get("/api/v1/devices?health=never_reported").map(|l| ids(&l)).expect("list"), ["inv-smoke-0"]);

    // After a restart: the silent one is still listed as never reported, its incident not
    // opened twice; the one that reported stays cleared.
    gw.restart().await.expect("restart");
    let smoke = gw.get("/api/v1/devices/inv-smoke-0").expect("listed after a restart");
    assert_eq!(smoke["health"], "never_reported", "{smoke}");
    let gas = gw.get("/api/v1/devices/inv-gas-0").expect("device");
    assert_ne!(gas["health"], "never_reported", "{gas}");
    let strangers = gw.get("/api/v1/devices?health=not_in_inventory").expect("not in inventory");
    assert_eq!(ids(&strangers), ["x-stranger"], "{strangers}");
    // A device imported after the restart opens its incident: the checks after the restart ran,
    // and a repeated open of inv-smoke-0's would have come with them.
    let marker = format!("{HEADER}xuhui,inv-marker,gas_detector,Kitchen M,2025-06-01,,,crew-7,13812345678\n");
    let (status, report) = gw.post_raw("/api/v1/devices/import", "text/csv", marker.as_bytes()).expect("import");
    assert_eq!(status, 200, "{report}");
    gw.wait_for(WAIT, "the marker's commissioning_overdue", |g| (!commissioning(g, "inv-marker").is_empty()).then_some(())).await;
    let smoke_incidents = commissioning(&gw, "inv-smoke-0");
    assert_eq!(smoke_incidents.len(), 1, "{smoke_incidents:?}");
    assert_eq!(smoke_incidents[0]["revision"], 1, "not re-opened: {smoke_incidents:?}");
    assert_eq!(commissioning(&gw, "inv-gas-0").into_iter().map(|i| i["state"].clone()).collect::<Vec<_>>(), ["cleared"]);
}

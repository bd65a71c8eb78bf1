//! Integrations end to end (issue 7): legacy controllers polled over Modbus TCP — a real
//! pymodbus server whose registers the test changes — and the InfluxDB long-term store — a real
//! VictoriaMetrics, read back through its export API, killed and restarted mid-run. Checked
//! where users see it: the gateway's HTTP API and `/metrics`, and the server's own query API.

use std::time::Duration;

use citywatch_tests::{birth, device_topic, workspace_root, GatewayProcess, ModbusServer, Publisher, RegisterTable, VictoriaMetrics};
use serde_json::{json, Value};

/// Bound of every wait for something the gateway does within a few polls or flushes.
const WAIT: Duration = Duration::from_secs(30);

fn map(file: &str) -> String {
    workspace_root().join("gateway/modbus").join(file).display().to_string()
}

fn health(gw: &GatewayProcess, id: &str) -> Option<String> {
    gw.get(&format!("/api/v1/devices/{id}")).ok().and_then(|d| d["health"].as_str().map(str::to_owned))
}

fn last_value(gw: &GatewayProcess, id: &str, metric: &str) -> Option<f64> {
    let r = gw.get(&format!("/api/v1/devices/{id}/readings?metric={metric}")).ok()?;
    r["points"].as_array()?.last()?["last"].as_f64()
}

fn open_rules(gw: &GatewayProcess, device: &str) -> Vec<String> {
    let list = gw.get(&format!("/api/v1/incidents?device={device}")).unwrap_or(Value::Null);
    let items = list["incidents"].as_array().or_else(|| list.as_array()).cloned().unwrap_or_default();
    items.iter().filter(|i| i["state"] == "open").filter_map(|i| i["rule"].as_str().map(str::to_owned)).collect()
}

fn metric(gw: &GatewayProcess, line_prefix: &str) -> Option<f64> {
    let text = gw.get_text("/metrics").ok()?;
    text.lines().find(|l| l.starts_with(line_prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn f32_low_first(v: f32) -> [u16; 2] {
    let bits = v.to_bits();
    [(bits & 0xFFFF) as u16, (bits >> 16) as u16]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_registers_become_readings_alarm_bits_an_incident_and_a_hung_controller_goes_offline() {
    let mut server = ModbusServer::start(&[1, 2]).await.expect("pymodbus server");
    // Gas controller, unit 1: channel 0 at input registers 0..3, channel 1 at 4..7.
    server.set(1, RegisterTable::Input, 0, &[32, 215, 0]).await.expect("set");
    server.set(1, RegisterTable::Input, 4, &[0, (-50i16) as u16, 0b1000]).await.expect("set");
    // Smoke detector, unit 2: f32 low word first, a u32 high word first, mV, status.
    let smoke = f32_low_first(0.05);
    let temp = f32_low_first(24.5);
    server.set(2, RegisterTable::Holding, 0, &[smoke[0], smoke[1], temp[0], temp[1], 0, 1234, 3000, 0]).await.expect("set");
    // The panel's alarm bit and gas_high are checked as two incidents: situations off here.
    let extra = format!(
        "[rules]\nsituations = false\n[[modbus.bus]]\nname = \"kitchen-panel\"\naddress = \"{addr}\"\npoll_interval = \"1s\"\ntimeout = \"1s\"\n\
         offline_after_polls = 3\nreconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n\
         [[modbus.bus.device]]\nid = \"mb-gas-0\"\nsite = \"xuhui\"\nunit = 1\nchannel = 0\nmap = \"{gas}\"\n\
         [[modbus.bus.device]]\nid = \"mb-gas-1\"\nsite = \"xuhui\"\nunit = 1\nchannel = 1\nmap = \"{gas}\"\n\
         [[modbus.bus.device]]\nid = \"mb-smoke-1\"\nsite = \"xuhui\"\nunit = 2\nmap = \"{smoke}\"\n",
        addr = server.addr(),
        gas = map("gas-controller-8ch.toml"),
        smoke = map("smoke-heat-detector.toml"),
    );
    let gw = GatewayProcess::start_embedded(&extra).await.expect("gateway");

    // Registered through the same path as MQTT devices, readings scaled, word orders right.
    gw.wait_for(WAIT, "mb-gas-0 online with gas_lel 3.2", |g| {
        (health(g, "mb-gas-0").as_deref() == Some("online") && last_value(g, "mb-gas-0", "gas_lel") == Some(3.2)).then_some(())
    })
    .await;
    let device = gw.get("/api/v1/devices/mb-gas-0").expect("device");
    assert_eq!((device["site"].as_str(), device["kind"].as_str(), device["fw"].as_str()), (Some("xuhui"), Some("gas_detector"), Some("modbus")), "{device}");
    assert_eq!(last_value(&gw, "mb-gas-0", "temp_c"), Some(21.5));
    gw.wait_for(WAIT, "channel 1 read at its offset", |g| (last_value(g, "mb-gas-1", "temp_c") == Some(-5.0)).then_some(())).await;
    assert_eq!(last_value(&gw, "mb-gas-1", "valve_closed"), Some(1.0));
    gw.wait_for(WAIT, "the smoke detector's floats", |g| last_value(g, "mb-smoke-1", "smoke_db_m")).await;
    let smoke_db_m = last_value(&gw, "mb-smoke-1", "smoke_db_m").expect("smoke");
    assert!((smoke_db_m - 0.05).abs() < 1e-6, "{smoke_db_m}");
    assert_eq!(last_value(&gw, "mb-smoke-1", "temp_c"), Some(24.5));
    assert_eq!(last_value(&gw, "mb-smoke-1", "co_ppm"), Some(12.34));
    let smoke = gw.get("/api/v1/devices/mb-smoke-1").expect("device");
    assert_eq!(smoke["battery_v"].as_f64(), Some(3.0), "{smoke}");
    assert!(open_rules(&gw, "mb-gas-0").is_empty(), "nothing alarming yet");

    // The panel's level-2 alarm bit and 55.4 %LEL: the device's own alarm and gas_high.
    server.set(1, RegisterTable::Input, 0, &[554, 215, 0b0010]).await.expect("set");
    let rules = gw
        .wait_for(WAIT, "device_alarm and gas_high incidents for mb-gas-0", |g| {
            let rules = open_rules(g, "mb-gas-0");
            (rules.iter().any(|r| r == "device_alarm") && rules.iter().any(|r| r == "gas_high")).then_some(rules)
        })
        .await;
    assert!(!rules.iter().any(|r| r == "sensor_fault"), "{rules:?}");
    assert!(open_rules(&gw, "mb-gas-1").is_empty(), "the other channel is quiet");

    // The controller hangs: every call times out, its devices turn offline…
    server.pause().expect("SIGSTOP");
    for id in ["mb-gas-0", "mb-gas-1", "mb-smoke-1"] {
        gw.wait_for(WAIT, &format!("{id} offline"), |g| (health(g, id).as_deref() == Some("offline")).then_some(())).await;
    }
    assert!(metric(&gw, "citywatch_modbus_timeouts_total{bus=\"kitchen-panel\"}").unwrap_or(0.0) >= 1.0);
    assert_eq!(metric(&gw, "citywatch_modbus_devices_offline{bus=\"kitchen-panel\"}"), Some(3.0));
    gw.wait_for(WAIT, "a device_offline incident", |g| open_rules(g, "mb-gas-1").iter().any(|r| r == "device_offline").then_some(())).await;

    // …and recover by themselves when it answers again, with fresh values.
    server.resume().expect("SIGCONT");
    server.set(1, RegisterTable::Input, 4, &[12, 200, 0]).await.expect("set");
    for id in ["mb-gas-0", "mb-gas-1", "mb-smoke-1"] {
        gw.wait_for(WAIT, &format!("{id} back online"), |g| (health(g, id).as_deref() == Some("online")).then_some(())).await;
    }
    gw.wait_for(WAIT, "fresh values after recovery", |g| (last_value(g, "mb-gas-1", "gas_lel") == Some(1.2)).then_some(())).await;
    assert_eq!(metric(&gw, "citywatch_modbus_devices_offline{bus=\"kitchen-panel\"}"), Some(0.0));
}

/// What the gateway stored for `device`/`metric`: (ts ms, value), oldest first.
fn stored(gw: &GatewayProcess, device: &str, metric: &str, from_ms: i64) -> Vec<(i64, f64)> {
    let r = gw.get(&format!("/api/v1/devices/{device}/readings?metric={metric}&from={from_ms}")).expect("readings");
    r["points"].as_array().expect("points").iter().map(|p| (p["ts_ms"].as_i64().expect("ts"), p["last"].as_f64().expect("value"))).collect()
}

/// What VictoriaMetrics holds for the `reading` measurement's `metric` field of `device`.
fn exported(vm: &VictoriaMetrics, device: &str, metric: &str) -> Vec<(i64, f64)> {
    let mut points: Vec<(i64, f64)> = vm
        .export(&format!("reading_{metric}"))
        .expect("export")
        .into_iter()
        .filter(|(_, labels, _, _)| labels["device"] == device)
        .map(|(_, _, ts, v)| (ts, v))
        .collect();
    points.sort_by_key(|p| p.0);
    points
}

async fn publish_telemetry(p: &mut Publisher, device: &str, seqs: std::ops::Range<u32>, base_ms: i64, sent: &mut u64) {
    for seq in seqs {
        let body = json!({"seq": seq, "ts": base_ms + i64::from(seq) * 1000, "values": {"gas_lel": f64::from(seq) / 10.0, "temp_c": 20.0 + f64::from(seq % 7)}});
        p.publish_json(&device_topic("putuo", device, "telemetry"), false, &body).await.expect("publish");
        *sent += 1;
    }
    p.wait_acked(*sent, WAIT).await.expect("acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_sink_values_read_back_from_victoria_metrics_match_and_nothing_is_lost_across_a_server_restart() {
    let mut vm = VictoriaMetrics::start().await.expect("victoria-metrics");
    let extra = format!(
        "[storage.influx]\nurl = \"{}\"\norg = \"city\"\nbucket = \"citywatch\"\ntoken = \"e2e-token\"\n\
         batch_max_lines = 40\nbuffer_max_lines = 80\nflush_interval = \"100ms\"\ntimeout = \"2s\"\n\
         retry_min = \"100ms\"\nretry_max = \"500ms\"\n",
        vm.url()
    );
    let gw = GatewayProcess::start_embedded(&extra).await.expect("gateway");
    let mut p = Publisher::connect(gw.mqtt_addr().expect("broker"), 1024).await.expect("publisher");
    let device = "putuo-garage-gas-7";
    p.publish_json(&device_topic("putuo", device, "status"), true, &birth("gas_detector", 60)).await.expect("birth");
    let mut sent = 1;
    // Readings an hour ago, one a second: stored (historical), and sent to the long-term store.
    let base_ms = citywatch_tests_now_ms() - 3_600_000;
    publish_telemetry(&mut p, device, 0..150, base_ms, &mut sent).await;

    let expected = |gw: &GatewayProcess| stored(gw, device, "gas_lel", base_ms - 1);
    gw.wait_for(WAIT, "150 readings in the embedded store", |g| (expected(g).len() == 150).then_some(())).await;
    gw.wait_for(WAIT, "150 readings in victoria-metrics", |_| (exported(&vm, device, "gas_lel").len() == 150).then_some(())).await;
    assert_eq!(exported(&vm, device, "gas_lel"), expected(&gw), "what VictoriaMetrics holds is what the gateway stored");
    assert_eq!(exported(&vm, device, "temp_c"), stored(&gw, device, "temp_c", base_ms - 1));
    let labels = vm.export("reading_gas_lel").expect("export").into_iter().find(|(_, l, _, _)| l["device"] == device).expect("a series").1;
    assert_eq!((labels["site"].as_str(), labels["kind"].as_str()), (Some("putuo"), Some("gas_detector")), "{labels}");

    // The server goes away (SIGTERM, so that what it acknowledged is on disk: SIGKILL loses
    // VictoriaMetrics' own last seconds of acknowledged writes): readings keep coming, the sink
    // buffers, then spools.
    vm.stop().await.expect("stop victoria-metrics");
    publish_telemetry(&mut p, device, 150..300, base_ms, &mut sent).await;
    gw.wait_for(WAIT, "failed writes and a spool in use", |g| {
        (metric(g, "citywatch_influx_failed_requests_total").unwrap_or(0.0) >= 1.0 && metric(g, "citywatch_influx_spooled_lines").unwrap_or(0.0) > 0.0).then_some(())
    })
    .await;
    publish_telemetry(&mut p, device, 300..400, base_ms, &mut sent).await;
    gw.wait_for(WAIT, "400 readings in the embedded store", |g| (expected(g).len() == 400).then_some(())).await;

    // It returns on the same port and data: the backlog drains, in order, nothing missing.
    vm.restart().await.expect("restart victoria-metrics");
    gw.wait_for(WAIT, "the backlog drained", |g| {
        (metric(g, "citywatch_influx_spooled_lines") == Some(0.0) && metric(g, "citywatch_influx_buffered_lines") == Some(0.0)).then_some(())
    })
    .await;
    gw.wait_for(WAIT, "400 readings in victoria-metrics", |_| (exported(&vm, device, "gas_lel").len() >= 400).then_some(())).await;
    assert_eq!(exported(&vm, device, "gas_lel"), expected(&gw), "nothing missing, nothing extra after the restart");
    assert_eq!(exported(&vm, device, "temp_c"), stored(&gw, device, "temp_c", base_ms - 1));

    // A live leak opens gas_high: the incident change reaches the long-term store too (the
    // `influx` push channel → measurement `incident`), for Grafana's incident-rate dashboard.
    let leak = json!({"seq": 400, "ts": citywatch_tests_now_ms(), "values": {"gas_lel": 61.0, "temp_c": 21.0}});
    p.publish_json(&device_topic("putuo", device, "telemetry"), false, &leak).await.expect("publish the leak");
    gw.wait_for(WAIT, "gas_high in victoria-metrics' incident series", |_| {
        vm.export("incident_revision")
            .ok()?
            .into_iter()
            .find(|(_, l, _, v)| l["device"] == device && l["rule"] == "gas_high" && l["severity"] == "critical" && *v >= 1.0)
    })
    .await;
    let value = vm.export("incident_value").expect("export");
    assert!(value.iter().any(|(_, l, _, v)| l["rule"] == "gas_high" && *v == 61.0), "the incident's value is stored: {value:?}");
    let text = gw.get_text("/metrics").expect("metrics");
    for reason in ["queue_full", "spool_full", "rejected_by_server", "spool_error"] {
        assert!(text.contains(&format!("citywatch_influx_dropped_lines_total{{reason=\"{reason}\"}} 0")), "dropped for {reason}:\n{text}");
    }
}

fn citywatch_tests_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

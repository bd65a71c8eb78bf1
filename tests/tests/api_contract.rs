//! The API keeps its contract (SPEC §6): schemathesis, an OpenAPI-driven fuzzer, runs against
//! the real gateway (embedded broker, an admin token, a device, an incident and a quarantined
//! message seeded) from its own `/api/v1/openapi.json`, with every check that does not need
//! data we cannot seed, and must report nothing. Bounded by `--max-examples` (a fixed seed:
//! the same exploration every run), not by wall time.
//!
//! schemathesis comes from PyPI, pinned, installed by `scripts/test` (or by hand with
//! `scripts/api-contract --install`) into `target/schemathesis-venv`; `CITYWATCH_SCHEMATHESIS`
//! names another binary.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use citywatch_tests::{birth, device_topic, workspace_root, ChildGuard, GatewayProcess, Publisher};
use serde_json::json;

/// Long enough for a few hundred requests per operation on a busy 2-core machine; the run is
/// bounded by its example count, this only stops a hung fuzzer.
const FUZZ_DEADLINE: Duration = Duration::from_secs(600);
const TOKEN: &str = "cw_schemathesis_admin_token_0123456789";

fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("CITYWATCH_SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let venv = workspace_root().join("target/schemathesis-venv/bin/schemathesis");
    if venv.exists() {
        return venv;
    }
    panic!("schemathesis is not installed: run scripts/test, or scripts/api-contract --install (pip-installs the pinned version into {})", venv.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_to_report() {
    let bin = schemathesis();
    let gw = GatewayProcess::start_embedded(&format!("[[http.tokens]]\nname = \"fuzzer\"\nrole = \"admin\"\ntoken = \"{TOKEN}\"\n")).await.expect("gateway");

    // Seed: a gas detector with readings and an open gas_high incident, and one quarantined message.
    let broker = gw.mqtt_addr().expect("embedded broker").to_owned();
    let device = Publisher::connect(&broker, 64).await.expect("publisher");
    device.publish_json(&device_topic("xh", "gas-1", "status"), true, &birth("gas_detector", 60)).await.expect("birth");
    for seq in 0..3u32 {
        let body = json!({ "seq": seq, "values": { "gas_lel": 55.0 + f64::from(seq), "valve_closed": 0 } });
        device.publish_json(&device_topic("xh", "gas-1", "telemetry"), false, &body).await.expect("telemetry");
    }
    device.client().publish(device_topic("xh", "gas-1", "telemetry"), citywatch_tests::QoS::AtLeastOnce, false, "not json").await.expect("junk");
    let base = format!("http://{}", gw.http_addr());
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let authed = |path: &str| -> Option<serde_json::Value> {
        let mut r = agent.get(&format!("{base}{path}")).header("authorization", &format!("Bearer {TOKEN}")).call().ok()?;
        r.body_mut().read_json().ok()
    };
    gw.wait_for(Duration::from_secs(30), "the seeded incident and quarantine entry", |_| {
        let incidents = authed("/api/v1/incidents")?;
        let quarantine = authed("/api/v1/quarantine")?;
        (incidents["total"].as_u64()? >= 1 && quarantine["total"].as_u64()? >= 1).then_some(())
    })
    .await;

    let config = workspace_root().join("tests/schemathesis.toml");
    let report = tempfile::tempdir().expect("report dir");
    let mut cmd = Command::new(&bin);
    cmd.arg("--config-file")
        .arg(&config)
        .arg("--no-color")
        .arg("run")
        .arg(format!("{base}/api/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--checks", "all"])
        // The SSE stream never ends: a fuzzer cannot wait for its body.
        .args(["--exclude-path", "/api/v1/events"])
        .args(["--max-examples", "40", "--seed", "1", "--workers", "2", "--request-timeout", "20"])
        .args(["--suppress-health-check", "all"])
        .arg("--report-dir")
        .arg(report.path())
        .current_dir(report.path())
        .env("SCHEMATHESIS_HOOKS", "")
        .env("NO_COLOR", "1");
    let mut fuzzer = ChildGuard::spawn("schemathesis", cmd).expect("spawning schemathesis");
    let deadline = tokio::time::Instant::now() + FUZZ_DEADLINE;
    let status = loop {
        if let Some(status) = fuzzer.child_mut().try_wait().expect("schemathesis status") {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "schemathesis still running after {FUZZ_DEADLINE:?}:\n{}", fuzzer.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let out = fuzzer.stdout();
    println!("{out}");
    assert!(status.success(), "schemathesis reported failures ({status}):\n{}\n--- gateway ---\n{}", fuzzer.logs(), gw.logs());
    // It ran: every operation it tested is listed with its outcome.
    assert!(out.contains("/api/v1/devices"), "schemathesis did not test the API:\n{out}");
}

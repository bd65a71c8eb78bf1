//! Security of the real `citywatch` binary: API tokens and roles, the refusal of an open API on
//! the network, HTTPS and MQTT over TLS with per-device ACLs in the embedded broker, and the
//! shipped Mosquitto ACL file (gateway/mosquitto/citywatch.acl) against a real Mosquitto.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use citywatch_tests::{citywatch_bin, printed_addresses, wait_for, workspace_root, ChildGuard, GatewayProcess, Mosquitto, READY_TIMEOUT};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// `citywatch token create`: (the token, the `[[http.tokens]]` snippet).
fn create_token(name: &str, role: &str) -> (String, String) {
    let out = std::process::Command::new(citywatch_bin())
        .args(["token", "create", "--name", name, "--role", role])
        .output()
        .expect("citywatch token create runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let token = text.lines().nth(1).expect("the token on the second line").trim().to_owned();
    let snippet = text[text.find("[[http.tokens]]").expect("snippet")..].to_owned();
    assert!(!snippet.contains(&token), "the config snippet must not hold the token");
    (token, snippet)
}

/// Status, WWW-Authenticate and JSON body of a request (any status).
fn call(agent: &ureq::Agent, method: &str, url: &str, bearer: Option<&str>, body: Option<Value>) -> (u16, Option<String>, Value) {
    let mut response = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(url);
            if let Some(t) = bearer {
                r = r.header("authorization", &format!("Bearer {t}"));
            }
            r.call()
        }
        (_, body) => {
            let mut r = agent.post(url);
            if let Some(t) = bearer {
                r = r.header("authorization", &format!("Bearer {t}"));
            }
            r.send_json(body.unwrap_or(Value::Null))
        }
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let challenge = response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, challenge, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn plain_agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(READY_TIMEOUT)).build().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_and_roles_guard_the_real_gateway() {
    let (desk, desk_entry) = create_token("duty-desk", "operator");
    let (wall, wall_entry) = create_token("wallboard", "viewer");
    let gw = GatewayProcess::start_embedded(&format!("{desk_entry}\n{wall_entry}\n")).await.expect("gateway starts");
    let base = format!("http://{}", gw.http_addr());
    let agent = plain_agent();

    let (status, challenge, body) = call(&agent, "GET", &format!("{base}/api/v1/devices"), None, None);
    assert_eq!(status, 401, "{body}");
    assert!(challenge.expect("WWW-Authenticate").starts_with("Bearer"));
    assert!(body["error"].is_string(), "{body}");
    let (status, challenge, _) = call(&agent, "GET", &format!("{base}/metrics"), Some("cw_guessed"), None);
    assert_eq!(status, 401);
    assert!(challenge.expect("WWW-Authenticate").contains("invalid_token"));
    assert_ne!(call(&agent, "GET", &format!("{base}/"), None, None).0, 401, "the dashboard path is public");

    let (status, _, body) = call(&agent, "GET", &format!("{base}/api/v1/devices"), Some(&wall), None);
    assert_eq!((status, body["count"].as_u64()), (200, Some(0)), "{body}");
    assert_eq!(call(&agent, "GET", &format!("{base}/metrics"), Some(&wall), None).0, 200);
    let silence = json!({ "site": "xh", "reason": "annual siren test" });
    let (status, _, body) = call(&agent, "POST", &format!("{base}/api/v1/silences"), Some(&wall), Some(silence.clone()));
    assert_eq!(status, 403, "a viewer cannot write: {body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("operator"), "{body}");
    let (status, _, body) = call(&agent, "POST", &format!("{base}/api/v1/silences"), Some(&desk), Some(silence));
    assert_eq!(status, 201, "{body}");
    let (_, _, list) = call(&agent, "GET", &format!("{base}/api/v1/silences"), Some(&wall), None);
    // Beside the built-in siren test day window: the operator's one.
    let of_site = list["silences"].as_array().map(|all| all.iter().filter(|s| s["site"] == "xh").count());
    assert_eq!(of_site, Some(1), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_api_is_refused_on_a_network_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("open.toml");
    std::fs::write(&config, format!("[mqtt]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"0.0.0.0:0\"\n[storage]\npath = \"{}\"\n", dir.path().join("store").display()))
        .expect("write config");
    for args in [vec!["check-config", config.to_str().expect("path")], vec!["run", "--config", config.to_str().expect("path")]] {
        let mut cmd = std::process::Command::new(citywatch_bin());
        cmd.args(&args);
        let mut child = ChildGuard::spawn("citywatch", cmd).expect("spawn");
        let status = child.wait_timeout(WAIT).await.expect("wait").unwrap_or_else(|| panic!("{args:?} kept running: {}", child.logs()));
        assert!(!status.success(), "{args:?} must fail");
        assert!(child.logs().contains("http.listen"), "{args:?} names the key: {}", child.logs());
    }
}

/// Writes a self-signed certificate for localhost / 127.0.0.1; returns (cert path, key path, PEM).
fn certificate(dir: &Path) -> (String, String, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("rcgen");
    let pem = cert.cert.pem();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, &pem).expect("cert");
    std::fs::write(&k, cert.signing_key.serialize_pem()).expect("key");
    (c.display().to_string(), k.display().to_string(), pem)
}

fn tls_agent(pem: &str) -> ureq::Agent {
    let cert = ureq::tls::Certificate::from_pem(pem.as_bytes()).expect("pem");
    let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![cert]))).build();
    ureq::Agent::config_builder().tls_config(tls).http_status_as_error(false).timeout_global(Some(READY_TIMEOUT)).build().into()
}

/// Runs a mosquitto client to completion (bounded); true on exit status 0.
async fn mosquitto_cli(bin: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(WAIT, tokio::process::Command::new(bin).args(args).kill_on_drop(true).output())
        .await
        .unwrap_or_else(|_| panic!("{bin} {args:?} hung"))
        .unwrap_or_else(|e| panic!("{bin} not installed (scripts/test installs mosquitto-clients): {e}"));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The harness's bounded wait, at most WAIT; a timeout fails the test.
async fn eventually<T>(what: &str, probe: impl FnMut() -> Option<T>) -> T {
    wait_for(what, WAIT, probe).await.unwrap_or_else(|e| panic!("{e}"))
}

const STATUS: &str = r#"{"state":"online","kind":"gas_detector","fw":"0.1.0","interval_s":60}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_mqtt_over_tls_with_device_acls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, pem) = certificate(dir.path());
    // Port 0 for both: the gateway binds them and prints what it got.
    let toml = format!(
        "[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         [[mqtt.users]]\nusername = \"gas-1\"\npassword = \"gas-1-pw\"\nsite = \"xh\"\ndevice = \"gas-1\"\n\
         [mqtt.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [[http.tokens]]\nname = \"wall\"\nrole = \"viewer\"\ntoken = \"viewer-token-0123456789\"\n\
         [http.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [storage]\npath = \"{}\"\n",
        dir.path().join("store").display()
    );
    let config = dir.path().join("citywatch.toml");
    std::fs::write(&config, toml).expect("config");
    let mut cmd = std::process::Command::new(citywatch_bin());
    cmd.args(["run", "--config", config.to_str().expect("path")]).env("RUST_LOG", "info,rumqttd=warn");
    let mut gateway = ChildGuard::spawn("citywatch", cmd).expect("spawn");
    let (http_addr, mqtt_addr) = eventually("the printed addresses", || {
        if let Ok(Some(status)) = gateway.try_wait() {
            panic!("citywatch exited with {status}: {}", gateway.logs());
        }
        match printed_addresses(&gateway.stdout()) {
            (Some(http), Some(mqtt)) => Some((http, mqtt)),
            _ => None,
        }
    })
    .await;
    let port_of = |addr: &str| addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or_else(|| panic!("address {addr:?}"));
    let (http_port, mqtt_port) = (port_of(&http_addr), port_of(&mqtt_addr));
    let agent = tls_agent(&pem);
    let base = format!("https://127.0.0.1:{http_port}");
    let token = Some("viewer-token-0123456789");
    eventually("the HTTPS API", || {
        if let Ok(Some(status)) = gateway.try_wait() {
            panic!("citywatch exited with {status}: {}", gateway.logs());
        }
        agent.get(format!("{base}/api/v1/health")).call().ok().filter(|r| r.status() == 401)
    })
    .await;
    let (status, _, health) = call(&agent, "GET", &format!("{base}/api/v1/health"), token, None);
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")), "{health}");
    // Plain HTTP on the HTTPS port gets no answer.
    assert!(plain_agent().get(format!("http://127.0.0.1:{http_port}/api/v1/health")).call().is_err());

    // The device, over MQTT with TLS, on its own topics.
    let port = mqtt_port.to_string();
    let device = |topic: &'static str, payload: &'static str| {
        let port = port.clone();
        let cert = cert.clone();
        async move {
            let args = ["-h", "127.0.0.1", "-p", &port, "--cafile", &cert, "-i", "gas-1", "-u", "gas-1", "-P", "gas-1-pw", "-q", "1", "-t", topic, "-m", payload];
            mosquitto_cli("mosquitto_pub", &args).await.0
        }
    };
    assert!(device("citywatch/v1/xh/gas-1/status", STATUS).await);
    assert!(device("citywatch/v1/xh/gas-1/telemetry", r#"{"seq":1,"values":{"gas_lel":3.5}}"#).await);
    // Forged: another device's telemetry, with gas-1's account. The door closes the connection.
    device("citywatch/v1/xh/gas-2/status", STATUS).await;
    device("citywatch/v1/xh/gas-2/telemetry", r#"{"seq":1,"values":{"gas_lel":60.0}}"#).await;
    assert!(device("citywatch/v1/xh/gas-1/telemetry", r#"{"seq":2,"values":{"gas_lel":3.6}}"#).await);
    // Everything before gas-1's seq 2 has been through the pipeline once seq 2 shows.
    eventually("gas-1 seq 2 in the API", || {
        let (_, _, d) = call(&agent, "GET", &format!("{base}/api/v1/devices/gas-1"), token, None);
        (d["last_seq"].as_u64() == Some(2)).then_some(())
    })
    .await;
    let (status, _, _) = call(&agent, "GET", &format!("{base}/api/v1/devices/gas-2"), token, None);
    assert_eq!(status, 404, "a forged device must not exist");
    let (_, _, metrics) = call(&agent, "GET", &format!("{base}/metrics"), token, None);
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(metrics.contains("citywatch_mqtt_rejected_total{reason=\"acl_denied_publish\"} 2"), "{metrics}");
    // Plain MQTT to the TLS port is refused.
    let plain = ["-h", "127.0.0.1", "-p", &port, "-u", "gas-1", "-P", "gas-1-pw", "-q", "1", "-t", "citywatch/v1/xh/gas-1/telemetry", "-m", "{}"];
    assert!(!mosquitto_cli("mosquitto_pub", &plain).await.0);
    gateway.terminate().expect("SIGTERM");
    let status = gateway.wait_timeout(WAIT).await.expect("wait").expect("stops");
    assert!(status.success(), "{}", gateway.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_acl_file_confines_devices() {
    let acl = workspace_root().join("gateway/mosquitto/citywatch.acl");
    let broker = Mosquitto::builder().with_config_line(&format!("acl_file {}", acl.display())).start().await.expect("mosquitto with the ACL file");
    let gw = GatewayProcess::start_external(&broker.addr(), "username = \"citywatch-gateway\"\n").await.expect("gateway");
    let port = broker.port().to_string();
    let publish = |user: &'static str, topic: &'static str, payload: &'static str, retain: bool| {
        let port = port.clone();
        async move {
            let mut args = vec!["-h", "127.0.0.1", "-p", &port, "-u", user, "-q", "1", "-t", topic, "-m", payload];
            if retain {
                args.push("-r");
            }
            assert!(mosquitto_cli("mosquitto_pub", &args).await.0, "{user} → {topic}");
        }
    };
    publish("gas-1", "citywatch/v1/xh/gas-1/status", STATUS, true).await;
    publish("gas-1", "citywatch/v1/xh/gas-1/telemetry", r#"{"seq":1,"values":{"gas_lel":3.5}}"#, false).await;
    // Mosquitto drops a denied publish silently (it still acknowledges it).
    publish("gas-1", "citywatch/v1/xh/gas-2/status", STATUS, false).await;
    publish("gas-1", "citywatch/v1/ops/incidents", "{}", false).await;
    publish("gas-1", "citywatch/v1/xh/gas-1/telemetry", r#"{"seq":2,"values":{"gas_lel":3.6}}"#, false).await;
    gw.wait_for(WAIT, "gas-1 seq 2", |g| g.get("/api/v1/devices/gas-1").ok().filter(|d| d["last_seq"] == 2)).await;
    assert_eq!(gw.status_of("/api/v1/devices/gas-2").expect("status"), 404, "the forged device reached the gateway");
    let quarantine = gw.get("/api/v1/quarantine").expect("quarantine");
    assert_eq!(quarantine["entries"].as_array().map(Vec::len), Some(0), "{quarantine}");

    // Commands: the gateway's account writes them; each device reads only its own.
    publish("citywatch-gateway", "citywatch/v1/xh/gas-1/cmd", r#"{"id":"c-1","cmd":"self_test"}"#, true).await;
    publish("citywatch-gateway", "citywatch/v1/xh/gas-2/cmd", r#"{"id":"c-2","cmd":"close_valve"}"#, true).await;
    let (ok, own) = mosquitto_cli("mosquitto_sub", &["-h", "127.0.0.1", "-p", &port, "-u", "gas-1", "-t", "citywatch/v1/xh/gas-1/cmd", "-C", "1", "-W", "10"]).await;
    assert!(ok && own.contains("c-1"), "own command: {own:?}");
    // A retained message is delivered at once if allowed; two seconds of nothing means denied.
    let (_, other) = mosquitto_cli("mosquitto_sub", &["-h", "127.0.0.1", "-p", &port, "-u", "gas-1", "-t", "citywatch/v1/xh/gas-2/cmd", "-C", "1", "-W", "2"]).await;
    assert!(!other.contains("c-2"), "gas-1 read gas-2's command: {other:?}");
    let (ok, theirs) = mosquitto_cli("mosquitto_sub", &["-h", "127.0.0.1", "-p", &port, "-u", "gas-2", "-t", "citywatch/v1/xh/gas-2/cmd", "-C", "1", "-W", "10"]).await;
    assert!(ok && theirs.contains("c-2"), "gas-2 reads its own: {theirs:?}");
}

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use std::time::Duration;

use tower::ServiceExt;

use super::*;
use crate::store::StorageConfig;
use crate::registry::Device;
use crate::store::{Reading, Write};

struct Fixture {
    _dir: tempfile::TempDir,
    state: ApiState,
    writer: Option<crate::store::StoreWriter>,
    /// An open gas_high incident of gas-1.
    incident: String,
}

/// A running incident manager over a store in `dir`, holding one open incident.
fn incidents(dir: &std::path::Path) -> (crate::incidents::manager::IncidentsHandle, String) {
    use crate::incidents::{book::Book, manager::Manager, store::IncidentStore, Change, IncidentsConfig, Scope, Severity, Signal};
    let store = Arc::new(IncidentStore::open(dir).expect("incident store"));
    let mut book = Book::new(IncidentsConfig::default(), Vec::new(), Vec::new(), now_ms());
    book.apply(
        Signal {
            rule: "gas_high".into(),
            scope: Scope::Device,
            site: "xh".into(),
            device: "gas-1".into(),
            kind: DeviceKind::GasDetector,
            ts_ms: now_ms(),
            change: Change::Open { severity: Severity::Critical, metric: Some(Metric::GasLel), value: Some(55.0), threshold: Some(50.0), summary: "gas".into(), action: None },
            members: Vec::new(),
        },
        now_ms(),
    );
    let (commit, _) = book.take();
    let id = commit.outbox[0].id.clone();
    store.commit(&commit, &[], now_ms()).expect("commit");
    let (manager, handle, requests) = Manager::new(book, store, Vec::new(), None, 400 * 86_400_000);
    let (_done_tx, done_rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let _keep = _done_tx;
        manager.run(requests, done_rx).await
    });
    (handle, id)
}

const T0: i64 = 1_800_000_000_000;

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StorageConfig { path: dir.path().to_path_buf(), ..StorageConfig::default() };
    let (store, writer) = SqliteStore::open(&config).expect("store");
    let registry = Arc::new(Registry::new());
    let mut gas = Device::new("gas-1", "xh", DeviceKind::GasDetector, now_ms());
    gas.interval_s = 10;
    gas.observe(Metric::GasLel, 3.0, now_ms());
    registry.upsert("gas-1", || gas.clone(), |_, _| ());
    let mut smoke = Device::new("smk-1", "pd", DeviceKind::SmokeDetector, now_ms() - 600_000);
    smoke.last_seen_ms = now_ms() - 600_000;
    registry.upsert("smk-1", || smoke.clone(), |_, _| ());
    // Ten readings a second apart: 0..9.
    let device: Arc<str> = Arc::from("gas-1");
    let readings = (0..10)
        .map(|i| Reading { device: Arc::clone(&device), metric: Metric::GasLel, ts_ms: T0 + i * 1000, value: i as f64, historical: false })
        .collect();
    writer.send(Write::Readings(readings)).await.expect("write");
    writer
        .send(Write::Quarantine(crate::store::QuarantineEntry {
            id: 0,
            received_ms: T0,
            topic: "citywatch/v1/xh/gas-1/telemetry".into(),
            reason: "not_json".into(),
            payload: bytes::Bytes::from_static(b"junk"),
        }))
        .await
        .expect("write");
    // Wait for the commit: an ack fires after it.
    let (tx, rx) = tokio::sync::oneshot::channel();
    writer.send(Write::Ack(crate::ingest::Ack::new(move || { let _ = tx.send(()); }))).await.expect("ack");
    tokio::time::timeout(Duration::from_secs(10), rx).await.expect("commit in time").expect("ack fired");
    let store = Arc::new(store);
    let metrics = Arc::new(Metrics::new());
    let (handle, incident) = incidents(dir.path());
    // As the gateway wires it, the embedded broker included.
    let mut prometheus = prometheus_client::registry::Registry::default();
    metrics.register(&mut prometheus);
    prometheus.register_collector(Box::new(crate::store::StoreMetrics(Arc::clone(&store))));
    prometheus.register_collector(Box::new(crate::registry::HealthMetrics { registry: Arc::clone(&registry), ingest: IngestConfig::default() }));
    prometheus.register_collector(Box::new(crate::sources::broker::BrokerStats::default()));
    handle.register_metrics(&mut prometheus);
    let state = ApiState {
        registry,
        store,
        metrics,
        ingest: IngestConfig::default(),
        started: Instant::now(),
        source_queue: Arc::new(|| (0, 16)),
        prometheus: Arc::new(prometheus),
        incidents: Some(handle),
        rules: Arc::new(crate::rules::RuleSet::from_config(&Default::default()).expect("default rules")),
        notify: Vec::new(),
        city: None,
    };
    Fixture { _dir: dir, state, writer: Some(writer), incident }
}

async fn get(state: &ApiState, uri: &str) -> (StatusCode, Value) {
    let response = router(state.clone()).oneshot(Request::get(uri).body(Body::empty()).expect("request")).await.expect("response");
    let status = response.status();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

#[tokio::test]
async fn devices_list_filters_and_shows_health() {
    let f = fixture().await;
    let (status, body) = get(&f.state, "/api/v1/devices").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["count"], 2);
    assert_eq!(body["by_health"]["offline"], 1, "{body}");
    let (_, body) = get(&f.state, "/api/v1/devices?site=xh").await;
    assert_eq!(body["devices"][0]["id"], "gas-1");
    assert_eq!(body["devices"][0]["health"], "online");
    assert_eq!(body["devices"][0]["values"]["gas_lel"]["value"], 3.0);
    let (_, body) = get(&f.state, "/api/v1/devices?health=offline").await;
    assert_eq!(body["devices"][0]["id"], "smk-1");
    let (_, body) = get(&f.state, "/api/v1/devices?kind=siren_mount").await;
    assert_eq!(body["count"], 0);
    let (status, body) = get(&f.state, "/api/v1/devices?kind=toaster").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().expect("message").contains("kind"));
}

#[tokio::test]
async fn one_device_and_unknown_ones() {
    let f = fixture().await;
    let (status, body) = get(&f.state, "/api/v1/devices/gas-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["kind"], "gas_detector");
    let (status, body) = get(&f.state, "/api/v1/devices/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn readings_raw_and_downsampled() {
    let f = fixture().await;
    let (status, body) = get(&f.state, &format!("/api/v1/devices/gas-1/readings?metric=gas_lel&from={T0}&to={}", T0 + 10_000)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["count"], 10);
    assert_eq!(body["points"][9]["last"], 9.0);
    let (_, body) = get(&f.state, &format!("/api/v1/devices/gas-1/readings?metric=gas_lel&from={T0}&to={}&step=5s", T0 + 10_000)).await;
    assert_eq!(body["count"], 2, "{body}");
    let first = &body["points"][0];
    assert_eq!((first["min"].as_f64(), first["max"].as_f64(), first["avg"].as_f64(), first["last"].as_f64(), first["count"].as_u64()), (Some(0.0), Some(4.0), Some(2.0), Some(4.0), Some(5)));
    let (status, _) = get(&f.state, "/api/v1/devices/gas-1/readings").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "metric is required");
    let (status, _) = get(&f.state, "/api/v1/devices/gas-1/readings?metric=gas_lel&from=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = get(&f.state, "/api/v1/devices/gas-1/readings?metric=gas_lel&step=10ms").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = get(&f.state, "/api/v1/devices/ghost/readings?metric=gas_lel").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn quarantine_metrics_health_openapi() {
    let mut f = fixture().await;
    let (status, body) = get(&f.state, "/api/v1/quarantine").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["counts"]["not_json"], 1);
    assert_eq!(body["entries"][0]["payload_utf8"], "junk");
    assert_eq!(body["entries"][0]["payload_hex"], "6a756e6b");
    let response = router(f.state.clone()).oneshot(Request::get("/metrics").body(Body::empty()).expect("request")).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], crate::metrics::CONTENT_TYPE);
    let (status, body) = get(&f.state, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = body.as_str().expect("text");
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("citywatch_devices_by_health{health=\"offline\"} 1"), "{text}");
    assert!(text.contains("citywatch_store_readings_written 10"), "{text}");
    assert!(text.contains("citywatch_broker_dropped_total{reason=\"log_evicted\"} 0"), "{text}");
    let (status, body) = get(&f.state, "/api/v1/health").await;
    assert_eq!((status, body["devices"].as_u64()), (StatusCode::OK, Some(2)));
    let (_, doc) = get(&f.state, "/api/v1/openapi.json").await;
    for path in openapi::PATHS {
        assert!(doc["paths"][*path].is_object(), "{path} documented");
        let id = if path.starts_with("/api/v1/incidents") { f.incident.as_str() } else { "gas-1" };
        let uri = path.replace("{id}", id) + if path.ends_with("readings") { "?metric=gas_lel" } else { "" };
        let (status, _) = get(&f.state, &uri).await;
        assert_eq!(status, StatusCode::OK, "{uri} answers");
    }
    let (status, body) = get(&f.state, "/api/v1/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    drop(f.writer.take());
}

async fn post(state: &ApiState, uri: &str, body: Value) -> (StatusCode, Value) {
    let request = Request::post(uri).header("content-type", "application/json").body(Body::from(body.to_string())).expect("request");
    let response = router(state.clone()).oneshot(request).await.expect("response");
    let status = response.status();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_closed_loop_over_http() {
    let f = fixture().await;
    let id = f.incident.clone();
    let (status, body) = get(&f.state, "/api/v1/incidents?state=active").await;
    assert_eq!((status, body["count"].as_u64()), (StatusCode::OK, Some(1)));
    assert_eq!(body["incidents"][0]["id"], id.as_str());
    let (status, body) = get(&f.state, "/api/v1/incidents?state=sleeping").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = post(&f.state, &format!("/api/v1/incidents/{id}/close"), json!({ "actor": "li" })).await;
    assert_eq!(status, StatusCode::CONFLICT, "an open incident cannot be closed: {body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("open"), "{body}");
    let (status, _) = post(&f.state, &format!("/api/v1/incidents/{id}/ack"), json!({ "note": "no actor" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post(&f.state, &format!("/api/v1/incidents/{id}/sing"), json!({ "actor": "li" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post(&f.state, "/api/v1/incidents/inc-none/ack", json!({ "actor": "li" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = post(&f.state, &format!("/api/v1/incidents/{id}/ack"), json!({ "actor": "li", "note": "on it" })).await;
    assert_eq!((status, body["state"].as_str(), body["revision"].as_u64()), (StatusCode::OK, Some("acknowledged"), Some(2)));
    let (status, body) = post(&f.state, &format!("/api/v1/incidents/{id}/dispatch"), json!({ "actor": "li", "crew": "crew-7" })).await;
    assert_eq!((status, body["crew"].as_str()), (StatusCode::OK, Some("crew-7")));
    // Answered after the commit: the read side sees it at once.
    let (_, stored) = get(&f.state, &format!("/api/v1/incidents/{id}")).await;
    assert_eq!(stored["state"], "dispatched");
    assert_eq!(stored["history"][1]["actor"], "li");
    let (status, _) = get(&f.state, "/api/v1/rules?device=nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = post(&f.state, "/api/v1/silences", json!({ "site": "xh", "end": "2020-01-01T00:00:00Z", "start": "2021-01-01T00:00:00Z" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = post(&f.state, "/api/v1/silences", json!({ "site": "xh", "reason": "works", "actor": "li" })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, list) = get(&f.state, "/api/v1/silences").await;
    assert_eq!(list["silences"].as_array().map(Vec::len), Some(1));
}

/// The real router behind the token check: reads need viewer, transitions operator, and the
/// audit trail names the token, not what the body claims.
#[tokio::test]
async fn tokens_guard_the_real_routes_and_name_the_actor() {
    use super::auth::{protect, Authenticator, Role, TokenConfig};
    let mut f = fixture().await;
    let tokens = [
        TokenConfig { name: "wall".into(), role: Role::Viewer, token: Some("viewer-token-0123456789".into()), token_sha256: None },
        TokenConfig { name: "desk".into(), role: Role::Operator, token: Some("operator-token-0123456789".into()), token_sha256: None },
    ];
    let app = protect(router(f.state.clone()), Arc::new(Authenticator::new(&tokens)));
    let send = |method: &str, uri: String, bearer: Option<&str>, body: Value| {
        let mut request = Request::builder().method(method).uri(uri).header("content-type", "application/json");
        if let Some(t) = bearer {
            request = request.header("authorization", format!("Bearer {t}"));
        }
        let app = app.clone();
        let request = request.body(Body::from(body.to_string())).expect("request");
        async move {
            let response = app.oneshot(request).await.expect("response");
            let status = response.status();
            let bytes = response.into_body().collect().await.expect("body").to_bytes();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null))
        }
    };
    let id = f.incident.clone();
    let (status, body) = send("GET", "/api/v1/incidents".into(), None, Value::Null).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].is_string(), "{body}");
    let (status, _) = send("GET", "/metrics".into(), None, Value::Null).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = send("GET", "/api/v1/incidents".into(), Some("viewer-token-0123456789"), Value::Null).await;
    assert_eq!((status, body["count"].as_u64()), (StatusCode::OK, Some(1)));
    let (status, _) = send("POST", format!("/api/v1/incidents/{id}/ack"), Some("viewer-token-0123456789"), json!({ "actor": "li" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = send("POST", "/api/v1/silences".into(), Some("viewer-token-0123456789"), json!({ "site": "xh", "reason": "works" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = send("POST", format!("/api/v1/incidents/{id}/ack"), Some("operator-token-0123456789"), json!({ "actor": "li" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = send("POST", format!("/api/v1/incidents/{id}/dispatch"), Some("operator-token-0123456789"), json!({ "crew": "crew-7" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, stored) = send("GET", format!("/api/v1/incidents/{id}"), Some("viewer-token-0123456789"), Value::Null).await;
    assert_eq!(stored["history"][1]["actor"], "li via desk", "{stored}");
    assert_eq!(stored["history"][2]["actor"], "desk", "{stored}");
    drop(f.writer.take());
}

/// Any request, any body: (status, content type, body as JSON or a string, Allow header).
async fn send(state: &ApiState, method: &str, uri: &str, content_type: Option<&str>, body: &str) -> (StatusCode, String, Value, String) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = router(state.clone()).oneshot(request.body(Body::from(body.to_owned())).expect("request")).await.expect("response");
    let status = response.status();
    let header = |name| response.headers().get(name).and_then(|v: &axum::http::HeaderValue| v.to_str().ok()).unwrap_or_default().to_owned();
    let (content_type, allow) = (header(axum::http::header::CONTENT_TYPE), header(axum::http::header::ALLOW));
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, content_type, value, allow)
}

/// SPEC §6: every 4xx is JSON {"error"} with the right status, axum's own rejections included.
#[tokio::test]
async fn api_errors_are_json_with_the_right_status() {
    let mut f = fixture().await;
    let id = f.incident.clone();
    let cases: Vec<(&str, String, Option<&str>, &str, StatusCode)> = vec![
        ("GET", "/api/v1/devices?limit=many".into(), None, "", StatusCode::BAD_REQUEST),
        ("GET", "/api/v1/devices?limit=0".into(), None, "", StatusCode::BAD_REQUEST),
        ("GET", "/api/v1/devices?limit=1001".into(), None, "", StatusCode::BAD_REQUEST),
        ("GET", "/api/v1/devices?cursor=not-hex".into(), None, "", StatusCode::BAD_REQUEST),
        ("GET", "/api/v1/devices?colour=red".into(), None, "", StatusCode::BAD_REQUEST),
        ("GET", "/api/v1/quarantine?before=yesterday".into(), None, "", StatusCode::BAD_REQUEST),
        ("GET", "/api/v1/incidents?limit=-1".into(), None, "", StatusCode::BAD_REQUEST),
        ("GET", "/api/v1/incidents?cursor=00".into(), None, "", StatusCode::BAD_REQUEST),
        ("GET", "/api/v1/devices/gas-1/readings?metric=gas_lel&limit=x".into(), None, "", StatusCode::BAD_REQUEST),
        ("POST", "/api/v1/silences".into(), Some("text/plain"), "site=xh", StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("POST", "/api/v1/silences".into(), None, "", StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("POST", "/api/v1/silences".into(), Some("application/json"), "{not json", StatusCode::BAD_REQUEST),
        ("POST", "/api/v1/silences".into(), Some("application/json"), r#"{"colour":"red"}"#, StatusCode::UNPROCESSABLE_ENTITY),
        ("POST", "/api/v1/silences".into(), Some("application/json"), r#"{"site":7}"#, StatusCode::UNPROCESSABLE_ENTITY),
        ("POST", format!("/api/v1/incidents/{id}/ack"), Some("application/json"), "[", StatusCode::BAD_REQUEST),
        ("POST", format!("/api/v1/incidents/{id}/ack"), Some("application/xml"), "<ack/>", StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("POST", format!("/api/v1/incidents/{id}/ack"), Some("application/json"), r#"{"actor":["li"]}"#, StatusCode::UNPROCESSABLE_ENTITY),
        ("GET", "/api/v1/nothing".into(), None, "", StatusCode::NOT_FOUND),
        ("DELETE", "/api/v1/devices".into(), None, "", StatusCode::METHOD_NOT_ALLOWED),
        ("PUT", format!("/api/v1/incidents/{id}"), None, "", StatusCode::METHOD_NOT_ALLOWED),
    ];
    for (method, uri, ct, body, want) in cases {
        let (status, content_type, value, allow) = send(&f.state, method, &uri, ct, body).await;
        assert_eq!(status, want, "{method} {uri}: {value}");
        assert!(content_type.starts_with("application/json"), "{method} {uri}: {content_type}");
        assert!(value["error"].as_str().is_some_and(|m| !m.is_empty()), "{method} {uri}: {value}");
        if want == StatusCode::METHOD_NOT_ALLOWED {
            assert!(allow.contains("GET"), "{method} {uri}: Allow {allow:?}");
        }
    }
    drop(f.writer.take());
}

/// Pages of devices, incidents and quarantine: `limit`, `cursor`, `count`, `total`, `next_cursor`.
#[tokio::test]
async fn lists_are_paginated_with_limit_cursor_and_total() {
    let mut f = fixture().await;
    for i in 0..25 {
        let d = Device::new(&format!("pg-{i:02}"), "pg", DeviceKind::SmokeDetector, now_ms());
        f.state.registry.upsert(&d.id.clone(), || d, |_, _| ());
    }
    let mut seen = Vec::new();
    let mut uri = "/api/v1/devices?site=pg&limit=10".to_owned();
    loop {
        let (status, body) = get(&f.state, &uri).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["total"], 25, "{body}");
        assert_eq!(body["by_health"]["online"], 25, "{body}");
        let page: Vec<String> = body["devices"].as_array().expect("devices").iter().map(|d| d["id"].as_str().unwrap_or_default().to_owned()).collect();
        assert_eq!(body["count"].as_u64(), Some(page.len() as u64));
        seen.extend(page);
        match body["next_cursor"].as_str() {
            Some(cursor) => uri = format!("/api/v1/devices?site=pg&limit=10&cursor={cursor}"),
            None => break,
        }
    }
    let want: Vec<String> = (0..25).map(|i| format!("pg-{i:02}")).collect();
    assert_eq!(seen, want, "every device once, in id order");
    let (_, all) = get(&f.state, "/api/v1/devices").await;
    assert_eq!((all["total"].as_u64(), all["count"].as_u64(), all["limit"].as_u64()), (Some(27), Some(27), Some(100)));
    assert!(all["next_cursor"].is_null());

    // Incidents: a second one, then pages of one.
    f.state.incidents.as_ref().expect("incidents").transition(f.incident.clone(), crate::incidents::book::Action::Ack, "li".into(), None, None).await.expect("running").expect("ack");
    let (_, first) = get(&f.state, "/api/v1/incidents?limit=1").await;
    assert_eq!((first["count"].as_u64(), first["total"].as_u64()), (Some(1), Some(1)), "{first}");
    assert!(first["next_cursor"].is_null(), "{first}");

    let (_, q) = get(&f.state, "/api/v1/quarantine?limit=1").await;
    assert_eq!((q["count"].as_u64(), q["total"].as_u64()), (Some(1), Some(1)), "{q}");
    assert!(q["next_cursor"].is_null(), "{q}");
    drop(f.writer.take());
}

/// The figure behind "GET devices stays fast and small at 10⁶ devices": a page is a range of
/// the id index (no sort of the fleet); `total` and `by_health` are one pass. Prints timings;
/// asserts only the shape (no wall time in tests). Run:
/// `cargo test --release -p citywatch-gateway api_devices_page_at_a_million -- --ignored --nocapture`
#[tokio::test]
#[ignore = "builds a registry of 10^6 devices (~1 GB); run by hand for the figure"]
async fn api_devices_page_at_a_million() {
    let registry = Arc::new(Registry::new());
    let now = now_ms();
    for i in 0..1_000_000u32 {
        let id = format!("dev-{i:07}");
        let mut d = Device::new(&id, &format!("site-{}", i % 1000), DeviceKind::GasDetector, now);
        d.observe(Metric::GasLel, 1.0, now);
        registry.upsert(&id, || d, |_, _| ());
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, writer) = SqliteStore::open(&StorageConfig { path: dir.path().to_path_buf(), ..StorageConfig::default() }).expect("store");
    let state = ApiState {
        registry,
        store: Arc::new(store),
        metrics: Arc::new(Metrics::new()),
        ingest: IngestConfig::default(),
        started: Instant::now(),
        source_queue: Arc::new(|| (0, 16)),
        prometheus: Arc::default(),
        incidents: None,
        rules: Arc::new(crate::rules::RuleSet::from_config(&Default::default()).expect("default rules")),
        notify: Vec::new(),
        city: None,
    };
    for uri in ["/api/v1/devices", "/api/v1/devices?cursor=6465762d30353030303030", "/api/v1/devices?limit=1000", "/api/v1/devices?site=site-7", "/api/v1/devices?health=offline"] {
        let started = Instant::now();
        let response = router(state.clone()).oneshot(Request::get(uri).body(Body::empty()).expect("request")).await.expect("response");
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let elapsed = started.elapsed();
        let body: Value = serde_json::from_slice(&bytes).expect("json");
        println!("{uri}: {:?}, {} bytes, count {}, total {}", elapsed, bytes.len(), body["count"], body["total"]);
        assert!(body["count"].as_u64().is_some_and(|n| n <= 1000), "{uri}");
    }
    drop(writer);
}

/// Every family `/metrics` had before the move to one `prometheus_client` registry, with its
/// type (counters named without `_total`, as OpenMetrics names the family; their samples end
/// in `_total`). Dashboards, scripts and the end-to-end tests read these names.
const FAMILIES: [(&str, &str); 65] = [
        ("citywatch_broker_dropped", "counter"),
        ("citywatch_broker_forwarded", "counter"),
        ("citywatch_clock_skew", "counter"),
        ("citywatch_device_commands", "counter"),
        ("citywatch_devices", "gauge"),
        ("citywatch_devices_by_health", "gauge"),
        ("citywatch_duplicates", "counter"),
        ("citywatch_events", "counter"),
        ("citywatch_historical_readings", "counter"),
        ("citywatch_incident_changes", "counter"),
        ("citywatch_incident_commit_seconds", "histogram"),
        ("citywatch_incident_path_seconds", "histogram"),
        ("citywatch_incident_signals_silenced", "counter"),
        ("citywatch_incidents", "gauge"),
        ("citywatch_influx_buffered_lines", "gauge"),
        ("citywatch_influx_bytes_sent", "counter"),
        ("citywatch_influx_dropped_lines", "counter"),
        ("citywatch_influx_failed_requests", "counter"),
        ("citywatch_influx_lines_written", "counter"),
        ("citywatch_influx_requests", "counter"),
        ("citywatch_influx_spooled_lines", "gauge"),
        ("citywatch_influx_up", "gauge"),
        ("citywatch_ingest_queue_capacity", "gauge"),
        ("citywatch_ingest_queue_depth", "gauge"),
        ("citywatch_inspection_completions", "counter"),
        ("citywatch_inspection_overdue", "counter"),
        ("citywatch_inspection_reminders", "counter"),
        ("citywatch_inventory_rows_imported", "counter"),
        ("citywatch_messages_received", "counter"),
        ("citywatch_messages_rejected", "counter"),
        ("citywatch_modbus_connect_failures", "counter"),
        ("citywatch_modbus_connected", "gauge"),
        ("citywatch_modbus_connects", "counter"),
        ("citywatch_modbus_devices_offline", "gauge"),
        ("citywatch_modbus_exceptions", "counter"),
        ("citywatch_modbus_failed_polls", "counter"),
        ("citywatch_modbus_polls", "counter"),
        ("citywatch_modbus_timeouts", "counter"),
        ("citywatch_mqtt_connections", "counter"),
        ("citywatch_mqtt_rejected", "counter"),
        ("citywatch_notify_delivered", "counter"),
        ("citywatch_notify_dropped", "counter"),
        ("citywatch_notify_failed_attempts", "counter"),
        ("citywatch_notify_oldest_pending_age_seconds", "gauge"),
        ("citywatch_notify_pending", "gauge"),
        ("citywatch_readings", "counter"),
        ("citywatch_received_bytes", "counter"),
        ("citywatch_seq_gaps", "counter"),
        ("citywatch_siren_test_silent", "counter"),
        ("citywatch_statuses", "counter"),
        ("citywatch_store_batches", "gauge"),
        ("citywatch_store_busy_seconds", "counter"),
        ("citywatch_store_commit_seconds", "counter"),
        ("citywatch_store_last_batch_rows", "gauge"),
        ("citywatch_store_last_batch_seconds", "gauge"),
        ("citywatch_store_max_batch_seconds", "gauge"),
        ("citywatch_store_queue_capacity", "gauge"),
        ("citywatch_store_queue_depth", "gauge"),
        ("citywatch_store_queue_max_readings", "gauge"),
        ("citywatch_store_queue_readings", "gauge"),
        ("citywatch_store_readings_time_taken", "counter"),
        ("citywatch_store_readings_written", "gauge"),
        ("citywatch_store_refusing", "gauge"),
        ("citywatch_store_write_errors", "gauge"),
        ("citywatch_uptime_seconds", "gauge"),
];

#[tokio::test]
async fn every_metric_family_keeps_its_name_and_type_once() {
    let f = fixture().await;
    // Every component's series, registered as the gateway wires them.
    let mut p = prometheus_client::registry::Registry::default();
    f.state.metrics.register(&mut p);
    p.register_collector(Box::new(crate::metrics::Uptime(f.state.started)));
    p.register_collector(Box::new(crate::ingest::QueueMetrics(Arc::clone(&f.state.source_queue))));
    p.register_collector(Box::new(crate::store::StoreMetrics(Arc::clone(&f.state.store))));
    p.register_collector(Box::new(crate::registry::HealthMetrics { registry: Arc::clone(&f.state.registry), ingest: IngestConfig::default() }));
    p.register_collector(Box::new(crate::sources::broker::BrokerStats::default()));
    f.state.incidents.as_ref().expect("incidents").register_metrics(&mut p);
    p.register_collector(Box::new(crate::notify::ChannelMetrics(vec![crate::notify::ChannelState::new(Arc::from("webhook:ops"))])));
    crate::store::influx::InfluxStats::default().register(&mut p);
    p.register_collector(Box::new(crate::sources::modbus::BusMetrics(vec![Arc::new(crate::sources::modbus::BusStats { name: "kitchen".into(), ..Default::default() })])));
    crate::inspections::service::Stats::default().register(&mut p);
    let state = ApiState { prometheus: Arc::new(p), ..f.state.clone() };
    let (status, body) = get(&state, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = body.as_str().expect("text");
    let mut seen: Vec<(&str, &str)> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' ')).collect();
    seen.sort_unstable();
    let mut want = FAMILIES.to_vec();
    want.sort_unstable();
    assert_eq!(seen, want, "{text}");
    for sample in ["citywatch_readings_total 0", "citywatch_incident_path_seconds_count 0", "citywatch_incident_commit_seconds_bucket{le=\"+Inf\"} 0"] {
        assert!(text.lines().any(|l| l == sample), "missing {sample:?} in\n{text}");
    }
}

use super::*;
use std::collections::HashMap;

use bytes::Bytes;
use citywatch_edge::wire::Metric;
use influxdb_line_protocol::builder::LineProtocolBuilder;
use std::io::Read as _;
use std::sync::Mutex;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;

fn reading(device: &str, metric: Metric, ts_ms: i64, value: f64) -> Reading {
    Reading { device: device.into(), metric, ts_ms, value, historical: false }
}

fn tags_of(site: &str, kind: &'static str) -> impl FnMut(&str) -> Option<DeviceTags> {
    let site = site.to_owned();
    move |_| Some(DeviceTags { site: site.clone(), kind })
}

#[test]
fn readings_of_one_message_share_a_line_with_one_field_per_metric() {
    let mut buf = Vec::new();
    let readings = [
        reading("kitchen-gas-1", Metric::GasLel, 1_763_800_000_123, 3.2),
        reading("kitchen-gas-1", Metric::ValveClosed, 1_763_800_000_123, 0.0),
        reading("kitchen-gas-1", Metric::GasLel, 1_763_800_001_000, 54.0),
    ];
    let lines = encode_readings(&readings, &mut tags_of("xuhui", "gas_detector"), &mut buf);
    assert_eq!(lines, 2);
    assert_eq!(
        String::from_utf8(buf).expect("utf-8"),
        "reading,site=xuhui,device=kitchen-gas-1,kind=gas_detector gas_lel=3.2,valve_closed=0 1763800000123\n\
         reading,site=xuhui,device=kitchen-gas-1,kind=gas_detector gas_lel=54 1763800001000\n"
    );
}

#[test]
fn golden_escaping_of_spaces_commas_and_equals_in_tags() {
    let mut buf = Vec::new();
    let readings = [reading("dev,1 =x", Metric::TempC, 5, -1.5)];
    encode_readings(&readings, &mut tags_of("Xu Hui,east=2", "smoke_detector"), &mut buf);
    assert_eq!(
        String::from_utf8(buf).expect("utf-8"),
        "reading,site=Xu\\ Hui\\,east\\=2,device=dev\\,1\\ \\=x,kind=smoke_detector temp_c=-1.5 5\n"
    );
}

#[test]
fn cached_prefixes_give_the_same_lines_as_the_builder() {
    let readings = [reading("a b", Metric::GasLel, 1, 0.1), reading("c", Metric::GasLel, 1, 1e21), reading("a b", Metric::TempC, 2, -0.0)];
    let mut cache = PrefixCache::default();
    let mut first = Vec::new();
    encode_readings_cached(&readings, &mut tags_of("s=1", "gas_detector"), &mut cache, &mut first);
    let mut second = Vec::new();
    encode_readings_cached(&readings, &mut |_| panic!("cached: no lookup"), &mut cache, &mut second);
    assert_eq!(first, second);
    // The same lines straight from the builder, field and timestamp included.
    let mut expected = Vec::new();
    for r in &readings {
        let b = LineProtocolBuilder::new_with(std::mem::take(&mut expected))
            .measurement(READING_MEASUREMENT)
            .tag("site", "s=1")
            .tag("device", &r.device)
            .tag("kind", "gas_detector");
        expected = b.field(r.metric.as_str(), r.value).timestamp(r.ts_ms).close_line().build();
    }
    assert_eq!(String::from_utf8(first).expect("utf-8"), String::from_utf8(expected).expect("utf-8"));
}

#[test]
fn an_unknown_device_is_written_without_site_and_kind() {
    let mut buf = Vec::new();
    encode_readings(&[reading("new-1", Metric::TiltDeg, 7, 0.25)], &mut |_| None, &mut buf);
    assert_eq!(String::from_utf8(buf).expect("utf-8"), "reading,device=new-1 tilt_deg=0.25 7\n");
}

fn incident(summary: &str, ts_ms: i64) -> IncidentLine {
    IncidentLine {
        site: "xuhui".into(),
        device: "gas-1".into(),
        rule: "gas_high".into(),
        severity: "critical",
        state: "open",
        revision: 3,
        value: Some(55.0),
        threshold: Some(50.0),
        summary: summary.into(),
        ts_ms,
    }
}

#[test]
fn golden_escaping_of_quotes_and_backslashes_in_string_fields() {
    let mut buf = Vec::new();
    encode_incident(&incident("gas \"55\" %LEL\\ at stall\nB", 9), &mut buf);
    assert_eq!(
        String::from_utf8(buf).expect("utf-8"),
        "incident,site=xuhui,device=gas-1,rule=gas_high,severity=critical,state=open revision=3i,value=55,threshold=50,summary=\"gas \\\"55\\\" %LEL\\\\ at stall B\" 9\n"
    );
}

#[test]
fn the_write_url_carries_org_bucket_and_ms_precision() {
    let c = InfluxConfig { url: "http://h:8086/".into(), org: "city ops".into(), bucket: "cw&1".into(), ..InfluxConfig::default() };
    assert_eq!(c.write_url(), "http://h:8086/api/v2/write?org=city%20ops&bucket=cw%261&precision=ms");
}

#[test]
fn config_errors_name_the_key() {
    let bad = InfluxConfig { url: "h:8086".into(), ..InfluxConfig::default() };
    assert_eq!(bad.validate().expect_err("no scheme").0, "storage.influx.url");
    let bad = InfluxConfig { buffer_max_lines: 10, ..InfluxConfig::default() };
    assert_eq!(bad.validate().expect_err("too small").0, "storage.influx.buffer_max_lines");
    let err = crate::config::Config::from_toml("[storage.influx]\nbuckett = \"x\"\n").expect_err("unknown key");
    assert!(err.to_string().contains("buckett"), "{err}");
}

/// A fake write endpoint for unit tests (the real server is in the end-to-end tests): it
/// records gunzipped bodies in arrival order and answers with the status in `status`.
#[derive(Clone, Default)]
struct Fake {
    bodies: Arc<Mutex<Vec<String>>>,
    status: Arc<Mutex<u16>>,
    auth: Arc<Mutex<Vec<String>>>,
}

async fn fake_write(State(f): State<Fake>, Query(q): Query<HashMap<String, String>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let status = *f.status.lock().expect("lock");
    if status != 204 {
        return StatusCode::from_u16(status).expect("status");
    }
    assert_eq!(q.get("precision").map(String::as_str), Some("ms"));
    let mut text = String::new();
    if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
        flate2::read::GzDecoder::new(&body[..]).read_to_string(&mut text).expect("gzip");
    } else {
        text = String::from_utf8(body.to_vec()).expect("utf-8");
    }
    f.auth.lock().expect("lock").push(headers.get("authorization").map(|v| v.to_str().unwrap_or_default().to_owned()).unwrap_or_default());
    f.bodies.lock().expect("lock").push(text);
    StatusCode::NO_CONTENT
}

async fn fake_server(fake: Fake) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route("/api/v2/write", post(fake_write)).with_state(fake);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn config(url: String) -> InfluxConfig {
    InfluxConfig {
        url,
        token: Some("s3cret".into()),
        batch_max_lines: 10,
        buffer_max_lines: 20,
        flush_interval: Duration(StdDuration::from_millis(20)),
        retry_min: Duration(StdDuration::from_millis(10)),
        retry_max: Duration(StdDuration::from_millis(50)),
        ..InfluxConfig::default()
    }
}

fn received_values(fake: &Fake) -> Vec<i64> {
    let bodies = fake.bodies.lock().expect("lock");
    bodies
        .iter()
        .flat_map(|b| b.lines().map(|l| l.rsplit(' ').next().and_then(|ts| ts.parse().ok()).expect("a timestamp")).collect::<Vec<i64>>())
        .collect()
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    tokio::time::timeout(StdDuration::from_secs(20), async {
        while !ok() {
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn an_outage_spills_to_the_spool_and_drains_in_order_when_the_server_returns() {
    let fake = Fake::default();
    *fake.status.lock().expect("lock") = 503;
    let url = fake_server(fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (sink, tap, rx) = InfluxSink::open(config(url), dir.path(), None).expect("open");
    let stats = sink.stats();
    let task = tokio::spawn(sink.run(rx));
    // 100 lines, one per ms timestamp: 20 fit in memory, the rest must spill.
    for ts in 0..100 {
        tap.readings(&[reading("d", Metric::TempC, ts, 20.0)]);
        tokio::task::yield_now().await;
    }
    wait_for("the spool to hold the overflow", || stats.spooled_lines.get() >= 80).await;
    assert!(stats.failed_requests.get() > 0);
    assert_eq!(stats.lines_written.get(), 0);
    *fake.status.lock().expect("lock") = 204;
    wait_for("everything to arrive", || stats.lines_written.get() == 100).await;
    assert_eq!(received_values(&fake), (0..100).collect::<Vec<_>>(), "every line once, oldest first");
    assert_eq!(stats.spooled_lines.get(), 0);
    assert!(fake.auth.lock().expect("lock").iter().all(|a| a == "Token s3cret"));
    assert!(DROP_REASONS.iter().all(|r| stats.dropped(r) == 0));
    drop(tap);
    tokio::time::timeout(StdDuration::from_secs(10), task).await.expect("stops").expect("no panic");
}

#[tokio::test]
async fn unsent_lines_survive_a_restart_of_the_gateway() {
    let fake = Fake::default();
    *fake.status.lock().expect("lock") = 503;
    let url = fake_server(fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (sink, tap, rx) = InfluxSink::open(config(url.clone()), dir.path(), None).expect("open");
    let stats = sink.stats();
    let task = tokio::spawn(sink.run(rx));
    for ts in 0..35 {
        tap.readings(&[reading("d", Metric::TempC, ts, 1.0)]);
    }
    wait_for("a failed attempt", || stats.failed_requests.get() > 0 && stats.spooled_lines.get() > 0).await;
    drop(tap);
    tokio::time::timeout(StdDuration::from_secs(10), task).await.expect("stops").expect("no panic");
    assert_eq!(stats.spooled_lines.get(), 35, "memory saved to the spool at shutdown");

    *fake.status.lock().expect("lock") = 204;
    let (sink, tap, rx) = InfluxSink::open(config(url), dir.path(), None).expect("reopen");
    let stats = sink.stats();
    let task = tokio::spawn(sink.run(rx));
    tap.readings(&[reading("d", Metric::TempC, 35, 1.0)]);
    wait_for("the backlog and the new line", || stats.lines_written.get() == 36).await;
    assert_eq!(received_values(&fake), (0..36).collect::<Vec<_>>());
    drop(tap);
    tokio::time::timeout(StdDuration::from_secs(10), task).await.expect("stops").expect("no panic");
}

#[tokio::test]
async fn a_batch_the_server_refuses_is_dropped_and_counted() {
    let fake = Fake::default();
    *fake.status.lock().expect("lock") = 400;
    let url = fake_server(fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (sink, tap, rx) = InfluxSink::open(config(url), dir.path(), None).expect("open");
    let stats = sink.stats();
    let task = tokio::spawn(sink.run(rx));
    tap.readings(&[reading("d", Metric::TempC, 1, 1.0), reading("d", Metric::TempC, 2, 1.0)]);
    wait_for("the refusal", || stats.dropped("rejected_by_server") == 2).await;
    let mut registry = prometheus_client::registry::Registry::default();
    stats.register(&mut registry);
    let text = crate::metrics::encode(&registry).expect("encode");
    assert!(text.contains("citywatch_influx_dropped_lines_total{reason=\"rejected_by_server\"} 2"), "{text}");
    drop(tap);
    tokio::time::timeout(StdDuration::from_secs(10), task).await.expect("stops").expect("no panic");
}

#[tokio::test]
async fn a_full_queue_counts_dropped_readings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = InfluxConfig { queue_capacity: 1, ..config("http://127.0.0.1:9".into()) };
    let (_sink, tap, _rx) = InfluxSink::open(cfg, dir.path(), None).expect("open");
    tap.readings(&[reading("d", Metric::TempC, 1, 1.0)]);
    tap.readings(&[reading("d", Metric::TempC, 2, 1.0), reading("d", Metric::TempC, 3, 1.0)]);
    assert_eq!(tap.stats.dropped("queue_full"), 2);
}

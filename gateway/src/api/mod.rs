//! The HTTP API (SPEC §6): health, devices and their sensor health, readings with
//! downsampling, the quarantine, incidents and their closed loop ([`incidents`]), the live
//! stream, rules, push-channel state, Prometheus metrics and the OpenAPI document.
//!
//! Read handlers use the registry's snapshots and the stores' read connections; writes go
//! through the incident manager. Every error is JSON `{"error": "…"}` with the right status;
//! internal errors log once and say little.

pub mod auth;
pub mod dashboard;
mod incidents;
mod openapi;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use citywatch_edge::wire::{DeviceKind, Metric};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::IngestConfig;
/// RFC 3339 with milliseconds, UTC: one format for every time the API and the pushes show.
pub use crate::incidents::model::rfc3339;
use crate::ingest::now_ms;
use crate::metrics::Metrics;
use crate::registry::{Device, Health, Registry};
use crate::store::{ReadingQuery, SqliteStore};

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub registry: Arc<Registry>,
    pub store: Arc<SqliteStore>,
    pub metrics: Arc<Metrics>,
    pub ingest: IngestConfig,
    pub started: Instant,
    /// Messages waiting between the source and the decode stage: (depth, capacity).
    pub source_queue: Arc<dyn Fn() -> (usize, usize) + Send + Sync>,
    /// The embedded broker's counters, in embedded mode.
    pub broker: Option<Arc<crate::sources::broker::BrokerStats>>,
    /// The incident manager (None in tests of the read side only).
    pub incidents: Option<crate::incidents::manager::IncidentsHandle>,
    pub rules: Arc<crate::rules::RuleSet>,
    /// Delivery state of every push channel.
    pub notify: Vec<Arc<crate::notify::ChannelState>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

/// Most raw points one readings query returns.
pub const MAX_POINTS: usize = 10_000;

/// An API error: a status and a message for the user.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    NotFound(String),
    /// The request conflicts with the resource's state (e.g. closing an open incident).
    Conflict(String),
    Unavailable(String),
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error serving an API request");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error".to_owned())
            }
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

impl From<crate::store::Error> for ApiError {
    fn from(e: crate::store::Error) -> Self {
        ApiError::Internal(e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The router, with every route of SPEC §6 this side serves.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{id}", get(device))
        .route("/api/v1/devices/{id}/readings", get(readings))
        .route("/api/v1/quarantine", get(quarantine))
        .route("/api/v1/incidents", get(incidents::list))
        .route("/api/v1/incidents/{id}", get(incidents::one))
        .route("/api/v1/incidents/{id}/{action}", post(incidents::transition))
        .route("/api/v1/events", get(incidents::events))
        .route("/api/v1/rules", get(incidents::rules))
        .route("/api/v1/notify", get(incidents::notify))
        .route("/api/v1/silences", get(incidents::silences).post(incidents::add_silence))
        .route("/api/v1/silences/{id}", delete(incidents::remove_silence))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .merge(dashboard::routes())
        .fallback(|| async { ApiError::NotFound("no such endpoint; see /api/v1/openapi.json".into()) })
        .with_state(state)
}


/// A time parameter: RFC 3339 (`2026-11-22T10:00:00Z`) or milliseconds since the epoch.
pub fn parse_time(name: &str, text: &str) -> ApiResult<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t: SystemTime| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .ok_or_else(|| ApiError::BadRequest(format!("{name}={text:?} is neither RFC 3339 nor epoch milliseconds")))
}

/// A step parameter: a duration (`1m`, `30s`) or milliseconds.
pub fn parse_step(text: &str) -> ApiResult<i64> {
    let ms = match text.parse::<i64>() {
        Ok(ms) => ms,
        Err(_) => humantime::parse_duration(text)
            .map(|d| d.as_millis() as i64)
            .map_err(|_| ApiError::BadRequest(format!("step={text:?} is not a duration like 1m or 30s")))?,
    };
    if ms < 1000 {
        return Err(ApiError::BadRequest("step must be at least 1s".into()));
    }
    Ok(ms)
}

async fn health(State(s): State<ApiState>) -> Json<Value> {
    let (depth, capacity) = (s.source_queue)();
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": s.started.elapsed().as_secs(),
        "devices": s.registry.len(),
        "ingest_queue": { "depth": depth, "capacity": capacity },
        "store": s.store.stats(),
    }))
}

/// A device as the API shows it.
#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub id: String,
    pub site: String,
    pub kind: DeviceKind,
    pub fw: Option<String>,
    pub interval_s: u32,
    pub location: Option<String>,
    pub install_date: Option<String>,
    /// From the inventory's `lat`/`lon`: WGS-84 decimal degrees (absent when not given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lat: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lon: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crew: Option<String>,
    /// Always masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    pub health: Health,
    pub health_flags: Vec<Health>,
    pub link: citywatch_edge::wire::LinkState,
    pub first_seen: String,
    pub last_seen: String,
    pub battery_v: Option<f64>,
    pub rssi_dbm: Option<f64>,
    pub last_seq: Option<u32>,
    pub seq_gaps: u64,
    pub duplicates: u64,
    pub values: BTreeMap<Metric, Value>,
    /// Messages whose `ts` was far off the gateway's clock, and the last such offset (ms,
    /// device − gateway; null once the device's clock is right again).
    pub clock_skewed: u64,
    pub clock_offset_ms: Option<i64>,
}

impl DeviceView {
    pub fn of(d: &Device, now: i64, cfg: &IngestConfig) -> Self {
        let flags = d.health_flags(now, cfg);
        DeviceView {
            id: d.id.clone(),
            site: d.site.clone(),
            kind: d.kind,
            fw: d.fw.clone(),
            interval_s: d.interval_s,
            location: d.location.clone(),
            install_date: d.install_date.clone(),
            lat: d.lat,
            lon: d.lon,
            crew: d.crew.clone(),
            phone: d.phone.clone(),
            health: flags[0],
            health_flags: flags,
            link: d.link,
            first_seen: rfc3339(d.first_seen_ms),
            last_seen: rfc3339(d.last_seen_ms),
            battery_v: d.battery_v,
            rssi_dbm: d.rssi_dbm,
            last_seq: d.last_seq,
            seq_gaps: d.seq_gaps,
            duplicates: d.duplicates,
            values: d
                .values
                .iter()
                .map(|(m, v)| (*m, json!({ "value": v.value, "ts": rfc3339(v.ts_ms), "unchanged_since": rfc3339(v.unchanged_since_ms) })))
                .collect(),
            clock_skewed: d.clock_skewed,
            clock_offset_ms: d.clock_offset_ms,
        }
    }
}

#[derive(Debug, Deserialize)]
struct DeviceFilter {
    site: Option<String>,
    kind: Option<String>,
    health: Option<String>,
}

async fn devices(State(s): State<ApiState>, Query(f): Query<DeviceFilter>) -> ApiResult<Json<Value>> {
    let kind = f
        .kind
        .as_deref()
        .map(|k| DeviceKind::parse(k).ok_or_else(|| ApiError::BadRequest(format!("kind={k:?}: one of gas_detector, smoke_detector, siren_mount"))))
        .transpose()?;
    let health = f
        .health
        .as_deref()
        .map(|h| Health::parse(h).ok_or_else(|| ApiError::BadRequest(format!("health={h:?}: one of online, offline, stale, low_battery, stuck, clock_skew, faulted"))))
        .transpose()?;
    let now = now_ms();
    let list: Vec<DeviceView> = s
        .registry
        .list(|d| f.site.as_deref().is_none_or(|site| d.site == site) && kind.is_none_or(|k| d.kind == k))
        .iter()
        .map(|d| DeviceView::of(d, now, &s.ingest))
        .filter(|v| health.is_none_or(|h| v.health_flags.contains(&h)))
        .collect();
    let mut by_health: BTreeMap<&str, usize> = Health::ALL.iter().map(|h| (h.as_str(), 0)).collect();
    for v in &list {
        *by_health.entry(v.health.as_str()).or_default() += 1;
    }
    Ok(Json(json!({ "count": list.len(), "by_health": by_health, "devices": list })))
}

async fn device(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<DeviceView>> {
    let d = s.registry.get(&id).ok_or_else(|| ApiError::NotFound(format!("no device {id:?}")))?;
    Ok(Json(DeviceView::of(&d, now_ms(), &s.ingest)))
}

#[derive(Debug, Deserialize)]
struct ReadingParams {
    metric: Option<String>,
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
    limit: Option<usize>,
}

async fn readings(State(s): State<ApiState>, Path(id): Path<String>, Query(p): Query<ReadingParams>) -> ApiResult<Json<Value>> {
    if !s.registry.contains(&id) {
        return Err(ApiError::NotFound(format!("no device {id:?}")));
    }
    let metric_name = p.metric.ok_or_else(|| ApiError::BadRequest("metric is required, e.g. ?metric=gas_lel".into()))?;
    let metric = Metric::parse(&metric_name).ok_or_else(|| ApiError::BadRequest(format!("metric={metric_name:?} is not a metric of the contract")))?;
    let now = now_ms();
    let to = p.to.as_deref().map(|t| parse_time("to", t)).transpose()?.unwrap_or(now + 1);
    let from = p.from.as_deref().map(|t| parse_time("from", t)).transpose()?.unwrap_or(to - 3_600_000);
    if from >= to {
        return Err(ApiError::BadRequest("from must be before to".into()));
    }
    let step_ms = p.step.as_deref().map(parse_step).transpose()?;
    if let Some(step) = step_ms {
        if (to - from) / step > MAX_POINTS as i64 {
            return Err(ApiError::BadRequest(format!("more than {MAX_POINTS} steps: widen step or narrow the range")));
        }
    }
    let limit = p.limit.unwrap_or(MAX_POINTS).clamp(1, MAX_POINTS);
    let store = Arc::clone(&s.store);
    let query = ReadingQuery { device: id.clone(), metric, from_ms: from, to_ms: to, step_ms, limit };
    let points = tokio::task::spawn_blocking(move || store.readings(&query))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let points: Vec<Value> = points
        .iter()
        .map(|p| json!({ "ts": rfc3339(p.ts_ms), "ts_ms": p.ts_ms, "min": p.min, "max": p.max, "avg": p.avg, "last": p.last, "count": p.count }))
        .collect();
    Ok(Json(json!({
        "device": id, "metric": metric, "from": rfc3339(from), "to": rfc3339(to), "step_ms": step_ms,
        "count": points.len(), "points": points,
    })))
}

#[derive(Debug, Deserialize)]
struct QuarantineParams {
    limit: Option<usize>,
    before: Option<i64>,
}

async fn quarantine(State(s): State<ApiState>, Query(p): Query<QuarantineParams>) -> ApiResult<Json<Value>> {
    let limit = p.limit.unwrap_or(100).clamp(1, 1000);
    let store = Arc::clone(&s.store);
    let (entries, counts) = tokio::task::spawn_blocking(move || -> crate::store::Result<_> {
        Ok((store.quarantine(limit, p.before)?, store.quarantine_counts()?))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "id": e.id, "received_at": rfc3339(e.received_ms), "topic": e.topic, "reason": e.reason,
                "payload_len": e.payload.len(),
                "payload_utf8": String::from_utf8_lossy(&e.payload[..e.payload.len().min(4096)]),
                "payload_hex": hex(&e.payload[..e.payload.len().min(4096)]),
            })
        })
        .collect();
    let counts: BTreeMap<String, u64> = counts.into_iter().collect();
    Ok(Json(json!({ "counts": counts, "rejected_since_start": s.metrics.rejected(), "entries": entries })))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn openapi() -> Json<Value> {
    Json(openapi::document())
}

async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    let st = s.store.stats();
    let (depth, capacity) = (s.source_queue)();
    let now = now_ms();
    let extra: Vec<(&str, &str, f64)> = vec![
        ("citywatch_ingest_queue_depth", "Messages waiting between the MQTT source and the decode stage.", depth as f64),
        ("citywatch_ingest_queue_capacity", "Capacity of the ingest queue.", capacity as f64),
        ("citywatch_store_queue_depth", "Writes waiting for the store writer.", st.queue_depth as f64),
        ("citywatch_store_queue_capacity", "Capacity of the store queue.", st.queue_capacity as f64),
        ("citywatch_store_last_batch_seconds", "Duration of the last store transaction.", st.last_batch_us as f64 / 1e6),
        ("citywatch_store_max_batch_seconds", "Slowest store transaction since start.", st.max_batch_us as f64 / 1e6),
        ("citywatch_store_last_batch_rows", "Rows in the last store transaction.", st.last_batch_rows as f64),
        ("citywatch_store_batches", "Store transactions committed.", st.batches as f64),
        ("citywatch_store_readings_written", "Readings committed to the store.", st.readings_written as f64),
        ("citywatch_store_write_errors", "Store write errors.", st.write_errors as f64),
        ("citywatch_store_refusing", "1 while the disk refuses writes and ingestion is paused.", f64::from(u8::from(st.refusing))),
        ("citywatch_devices", "Devices in the registry.", s.registry.len() as f64),
        ("citywatch_uptime_seconds", "Seconds since start.", s.started.elapsed().as_secs_f64()),
    ];
    let mut by_health: BTreeMap<Health, usize> = BTreeMap::new();
    s.registry.for_each(|d| *by_health.entry(d.health(now, &s.ingest)).or_default() += 1);
    let health_lines: Vec<(String, f64)> = Health::ALL
        .iter()
        .map(|h| (format!("citywatch_devices_by_health{{health=\"{}\"}}", h.as_str()), by_health.get(h).copied().unwrap_or(0) as f64))
        .collect();
    let mut text = s.metrics.render(&extra);
    if let Some(b) = &s.broker {
        use std::sync::atomic::Ordering::Relaxed;
        text.push_str(&format!(
            "# HELP citywatch_broker_forwarded_total Publishes the embedded broker handed to the gateway.\n# TYPE citywatch_broker_forwarded_total counter\ncitywatch_broker_forwarded_total {}\n\
             # HELP citywatch_broker_dropped_total Publishes the embedded broker lost before the gateway read them, by reason.\n# TYPE citywatch_broker_dropped_total counter\ncitywatch_broker_dropped_total{{reason=\"log_evicted\"}} {}\n",
            b.forwarded.load(Relaxed),
            b.dropped.load(Relaxed)
        ));
        text.push_str(&b.door.render());
    }
    text.push_str(&crate::notify::render_metrics(&s.notify));
    if let Some(h) = &s.incidents {
        let b = h.stats();
        text.push_str("# HELP citywatch_incident_changes_total Incident changes by kind since start.\n# TYPE citywatch_incident_changes_total counter\n");
        for (kind, v) in [
            ("opened", b.opened),
            ("reopened", b.reopened),
            ("repeat", b.repeats),
            ("cleared", b.cleared),
            ("escalated", b.escalations),
            ("flapping", b.flapping_started),
        ] {
            text.push_str(&format!("citywatch_incident_changes_total{{change=\"{kind}\"}} {v}\n"));
        }
        text.push_str(&format!(
            "# HELP citywatch_incident_signals_silenced_total Rule signals held back by a silence.\n# TYPE citywatch_incident_signals_silenced_total counter\ncitywatch_incident_signals_silenced_total {}\n\
             # HELP citywatch_device_commands_total Commands sent to devices, by outcome.\n# TYPE citywatch_device_commands_total counter\n\
             citywatch_device_commands_total{{outcome=\"sent\"}} {}\ncitywatch_device_commands_total{{outcome=\"acked\"}} {}\ncitywatch_device_commands_total{{outcome=\"unanswered\"}} {}\n",
            b.silenced, b.commands_sent, b.commands_acked, b.commands_unanswered
        ));
        h.timing.render(&mut text);
        if let Ok(counts) = h.store.counts_by_state() {
            text.push_str("# HELP citywatch_incidents Incidents in the store by state.\n# TYPE citywatch_incidents gauge\n");
            for (state, n) in counts {
                text.push_str(&format!("citywatch_incidents{{state=\"{state}\"}} {n}\n"));
            }
        }
    }
    text.push_str("# HELP citywatch_devices_by_health Devices by their worst health condition.\n# TYPE citywatch_devices_by_health gauge\n");
    for (name, v) in health_lines {
        text.push_str(&format!("{name} {v}\n"));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

#[cfg(test)]
mod tests;

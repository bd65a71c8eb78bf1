//! The HTTP API (SPEC §6): health, devices and their sensor health, readings with
//! downsampling, the quarantine, incidents and their closed loop ([`incidents`]), the live
//! stream, rules, push-channel state, Prometheus metrics and the OpenAPI document.
//!
//! Read handlers use the registry's snapshots and the stores' read connections; writes go
//! through the incident manager. Every error is JSON `{"error": "…"}` with the right status;
//! internal errors log once and say little.

pub mod auth;
pub mod city;
pub mod config;
pub mod dashboard;
pub mod error;
mod incidents;
pub mod inspections;
mod openapi;
pub mod page;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use citywatch_edge::wire::{DeviceKind, Metric};
use serde::Deserialize;
use serde_json::{json, Value};

pub use config::HttpConfig;
use crate::ingest::IngestConfig;
/// RFC 3339 with milliseconds, UTC: one format for every time the API and the pushes show.
pub use crate::model::rfc3339;
use crate::ingest::now_ms;
use crate::metrics::Metrics;
/// A device as the API shows it: a view of the registry's one device model.
pub use crate::registry::DeviceView;
use crate::registry::{Device, Health, Registry};
use crate::store::{ReadingQuery, SqliteStore};
pub use error::{ApiError, JsonBody, Path, Query};

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
    /// The gateway's one Prometheus registry, which every component registered into when the
    /// gateway was wired; `/metrics` encodes it.
    pub prometheus: Arc<prometheus_client::registry::Registry>,
    /// The incident manager (None in tests of the read side only).
    pub incidents: Option<crate::incidents::manager::IncidentsHandle>,
    pub rules: Arc<crate::rules::RuleSet>,
    /// Delivery state of every push channel.
    pub notify: Vec<Arc<crate::notify::ChannelState>>,
    /// Cluster mode: the owners of the other partitions and the city's incidents ([`city`]).
    pub city: Option<Arc<city::City>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

/// Most raw points one readings query returns.
pub const MAX_POINTS: usize = 10_000;

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
        .layer(axum::middleware::from_fn_with_state(state.clone(), city::route))
        .layer(axum::middleware::from_fn(error::json_errors))
        .with_state(state)
}


/// A time parameter: epoch milliseconds (up to 14 digits) or RFC 3339 with an offset
/// (`2026-11-22T10:00:00Z`, `…+08:00`) — exactly what the OpenAPI document states.
pub fn parse_time(name: &str, text: &str) -> ApiResult<i64> {
    if let Some(ms) = page::digits(text, 14) {
        return Ok(ms);
    }
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|_| ApiError::BadRequest(format!("{name}={text:?} is neither RFC 3339 nor epoch milliseconds")))
}

/// A step parameter: milliseconds (≥ 1000, up to 12 digits) or a count (up to 6 digits) of
/// s, m, h or d — exactly what the OpenAPI document states.
pub fn parse_step(text: &str) -> ApiResult<i64> {
    let bad = || ApiError::BadRequest(format!("step={text:?}: milliseconds (at least 1000) or a duration like 30s, 5m, 1h, 1d"));
    let (number, unit_ms, max_digits) = match text.as_bytes().last() {
        Some(b's') => (&text[..text.len() - 1], 1000, 6),
        Some(b'm') => (&text[..text.len() - 1], 60_000, 6),
        Some(b'h') => (&text[..text.len() - 1], 3_600_000, 6),
        Some(b'd') => (&text[..text.len() - 1], 86_400_000, 6),
        _ => (text, 1, 12),
    };
    if number.starts_with('0') {
        return Err(bad());
    }
    let ms = page::digits(number, max_digits).ok_or_else(bad)? * unit_ms;
    if ms < 1000 {
        return Err(bad());
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFilter {
    site: Option<String>,
    kind: Option<String>,
    health: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET devices`: one page in id order. The page is a range of the registry's id index;
/// `total` and `by_health` count every matching device in one pass without copying or sorting.
async fn devices(State(s): State<ApiState>, served: Option<axum::Extension<city::ServedFor>>, Query(f): Query<DeviceFilter>) -> ApiResult<Json<Value>> {
    let kind = f
        .kind
        .as_deref()
        .map(|k| DeviceKind::parse(k).ok_or_else(|| ApiError::BadRequest(format!("kind={k:?}: one of gas_detector, smoke_detector, siren_mount"))))
        .transpose()?;
    let health = f
        .health
        .as_deref()
        .map(|h| {
            Health::parse(h).ok_or_else(|| {
                ApiError::BadRequest(format!("health={h:?}: one of {}", Health::ALL.map(Health::as_str).join(", ")))
            })
        })
        .transpose()?;
    let limit = page::limit(f.limit, page::DEFAULT_LIMIT, page::MAX_LIMIT)?;
    let after = f.cursor.as_deref().map(page::device_after).transpose()?;
    let now = now_ms();
    // Cluster mode, answering as a partition's owner: that partition's devices only.
    let partition = served.zip(s.city.as_ref()).map(|(axum::Extension(city::ServedFor(p)), c)| (p, c.partitions));
    let placed = |d: &Device| {
        f.site.as_deref().is_none_or(|site| &*d.site == site)
            && kind.is_none_or(|k| d.kind == k)
            && partition.is_none_or(|(p, n)| crate::cluster::nats_config::partition_of(&d.site, n) == p)
    };
    let mut total = 0usize;
    let mut by_health: BTreeMap<&str, usize> = Health::ALL.iter().map(|h| (h.as_str(), 0)).collect();
    s.registry.for_each(|d| {
        if !placed(d) {
            return;
        }
        let flags = d.health_flags(now, &s.ingest);
        if health.is_none_or(|h| flags.contains(&h)) {
            total += 1;
            *by_health.entry(flags[0].as_str()).or_default() += 1;
        }
    });
    let found = s.registry.page(after.as_deref(), limit, |d| placed(d) && health.is_none_or(|h| d.health_flags(now, &s.ingest).contains(&h)));
    let list: Vec<DeviceView> = found.devices.iter().map(|d| d.view(now, &s.ingest)).collect();
    Ok(Json(json!({
        "count": list.len(), "total": total, "limit": limit, "next_cursor": found.next_after.as_deref().map(page::hex_part),
        "by_health": by_health, "devices": list,
    })))
}

async fn device(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<DeviceView>> {
    let d = s.registry.get(&id).ok_or_else(|| ApiError::NotFound(format!("no device {id:?}")))?;
    Ok(Json(d.view(now_ms(), &s.ingest)))
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
    let mut from = p.from.as_deref().map(|t| parse_time("from", t)).transpose()?.unwrap_or(to.saturating_sub(3_600_000));
    let step_ms = p.step.as_deref().map(parse_step).transpose()?;
    if let Some(step) = step_ms {
        // At most MAX_POINTS buckets: a longer range is answered from its last ones (the
        // answer's `from` says where it starts).
        from = from.max(to.saturating_sub(step.saturating_mul(MAX_POINTS as i64)));
    }
    if from >= to {
        // An empty range has no points.
        return Ok(Json(json!({
            "device": id, "metric": metric, "from": rfc3339(from), "to": rfc3339(to), "step_ms": step_ms, "count": 0, "points": [],
        })));
    }
    let limit = page::limit(p.limit, MAX_POINTS, MAX_POINTS)?;
    let store = Arc::clone(&s.store);
    let query = ReadingQuery { device: id.clone(), metric, from_ms: from, to_ms: to, step_ms, limit };
    let points = tokio::task::spawn_blocking(move || store.readings(&query))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let points: Vec<Value> = points.iter().map(point_json).collect();
    Ok(Json(json!({
        "device": id, "metric": metric, "from": rfc3339(from), "to": rfc3339(to), "step_ms": step_ms,
        "count": points.len(), "points": points,
    })))
}

/// One point of a readings answer.
fn point_json(p: &crate::store::Point) -> Value {
    json!({ "ts": rfc3339(p.ts_ms), "ts_ms": p.ts_ms, "min": p.min, "max": p.max, "avg": p.avg, "last": p.last, "count": p.count })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantineParams {
    limit: Option<usize>,
    cursor: Option<String>,
    /// Entries with an id below this (the paging of old clients; `cursor` is the same).
    before: Option<u64>,
}

/// `GET quarantine`: newest first; the cursor is the last entry's id.
async fn quarantine(State(s): State<ApiState>, Query(p): Query<QuarantineParams>) -> ApiResult<Json<Value>> {
    let limit = page::limit(p.limit, page::DEFAULT_LIMIT, page::MAX_LIMIT)?;
    let before = match p.cursor.as_deref() {
        None => p.before.map(|b| i64::try_from(b).map_err(|_| ApiError::BadRequest(format!("before={b}: at most {}", i64::MAX)))).transpose()?,
        Some(c) => Some(page::quarantine_before(c)?),
    };
    let store = Arc::clone(&s.store);
    // One more than asked: whether a next page exists.
    let (mut entries, counts) = tokio::task::spawn_blocking(move || -> crate::store::Result<_> {
        Ok((store.quarantine(limit + 1, before)?, store.quarantine_counts()?))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let more = entries.len() > limit;
    entries.truncate(limit);
    let next_cursor = more.then(|| entries.last().map(|e| e.id.to_string())).flatten();
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
    let total: u64 = counts.values().sum();
    Ok(Json(json!({
        "count": entries.len(), "total": total, "limit": limit, "next_cursor": next_cursor,
        "counts": counts, "rejected_since_start": s.metrics.rejected(), "entries": entries,
    })))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn openapi() -> Json<Value> {
    Json(openapi::document())
}

/// The one Prometheus registry, encoded by `prometheus_client` (OpenMetrics text). Off the
/// async threads: some collectors read SQLite (incidents by state).
async fn metrics(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let registry = Arc::clone(&s.prometheus);
    let text = tokio::task::spawn_blocking(move || crate::metrics::encode(&registry))
        .await
        .map_err(|e| ApiError::Internal(format!("metrics: {e}")))?
        .map_err(|e| ApiError::Internal(format!("metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text))
}

#[cfg(test)]
mod tests;

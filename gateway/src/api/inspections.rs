//! The maintenance endpoints (SPEC §6, shape agreed with the dashboard): inventory import,
//! crews' completions, and the work orders as JSON or CSV. Merged into the main router; every
//! error is JSON `{"error": …}` like the rest of the API.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::inspections::schedule::Task;
use crate::inspections::service::{CompletionRequest, InspectionsHandle, Outcome, WorkOrderQuery};
use crate::inspections::Error;
use super::{page, ApiError, Path, Query};
use crate::model::rfc3339;

/// Largest inventory file accepted in one request (100k lines are about 10 MB).
pub const MAX_IMPORT_BYTES: usize = 64 * 1024 * 1024;
/// Largest `due_within_days`.
pub const MAX_DAYS: i64 = 3660;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::UnknownDevice(_) => ApiError::NotFound(e.to_string()),
            Error::Invalid(m) => ApiError::BadRequest(m),
            Error::Stopped => ApiError::Unavailable(e.to_string()),
            Error::Store(_) | Error::Io(_) => ApiError::Internal(e.to_string()),
        }
    }
}

pub fn router(handle: InspectionsHandle) -> Router {
    Router::new()
        .route("/api/v1/devices/import", post(import).layer(DefaultBodyLimit::max(MAX_IMPORT_BYTES)))
        .route("/api/v1/devices/{id}/inspections", post(complete))
        .route("/api/v1/inspections", get(work_orders))
        .with_state(handle)
}

async fn import(State(h): State<InspectionsHandle>, headers: HeaderMap, body: Bytes) -> Result<Json<crate::inspections::service::ImportReport>, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("text/csv");
    if content_type.starts_with("application/json") || content_type.starts_with("application/x-www-form-urlencoded") {
        return Err(ApiError::Rejected(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("Content-Type {content_type}: send the inventory as text/csv")));
    }
    if body.is_empty() {
        return Err(ApiError::BadRequest("empty body: send the inventory as text/csv with a header row".into()));
    }
    let report = h.import(body.to_vec()).await?;
    // A file whose header row does not read imports nothing: that is the request's fault (400),
    // not a per-row rejection.
    if report.imported == 0 {
        if let Some(header) = report.errors.iter().find(|e| e.line == 1 && e.reason.starts_with("header")) {
            return Err(ApiError::BadRequest(header.reason.clone()));
        }
    }
    Ok(Json(report))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionBody {
    result: Outcome,
    #[serde(default)]
    notes: String,
    by: String,
    #[serde(default)]
    task: Option<String>,
}

async fn complete(State(h): State<InspectionsHandle>, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let b: CompletionBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("body: {e}; expected {{\"result\":\"pass|fail|replaced\",\"notes\":\"…\",\"by\":\"…\",\"task\":\"inspection\"}}")))?;
    let task_text = b.task.as_deref().unwrap_or("inspection");
    let task = Task::parse(task_text)
        .ok_or_else(|| ApiError::BadRequest(format!("task: {task_text:?} is not one of inspection, calibration, cleaning, replacement, siren_season")))?;
    if b.notes.chars().count() > 2000 {
        return Err(ApiError::BadRequest("notes: at most 2000 characters".into()));
    }
    let view = h.complete(CompletionRequest { device: id, task, result: b.result, notes: b.notes, by: b.by }).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkOrderParams {
    due_within_days: Option<i64>,
    site: Option<String>,
    overdue: Option<bool>,
    format: Option<String>,
    /// JSON pages (the CSV export is always whole).
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn work_orders(State(h): State<InspectionsHandle>, headers: HeaderMap, Query(p): Query<WorkOrderParams>) -> Result<Response, ApiError> {
    let days = p.due_within_days.unwrap_or(30);
    if !(0..=MAX_DAYS).contains(&days) {
        return Err(ApiError::BadRequest(format!("due_within_days: 0–{MAX_DAYS}")));
    }
    let accept_csv = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/csv"));
    let csv = match p.format.as_deref() {
        None => accept_csv,
        Some("csv") => true,
        Some("json") => false,
        Some(other) => return Err(ApiError::BadRequest(format!("format: {other:?} is not json or csv"))),
    };
    let limit = page::limit(p.limit, page::DEFAULT_LIMIT, page::MAX_LIMIT)?;
    let after = p.cursor.as_deref().map(page::work_order_after).transpose()?;
    let orders = h.work_orders(WorkOrderQuery { due_within_days: days, site: p.site, overdue_only: p.overdue.unwrap_or(false) }).await?;
    if !csv {
        // Work orders come sorted by (due, device, task): a page starts after the cursor's key.
        let total = orders.items.len();
        let start = match after {
            None => 0,
            Some((due, device, task)) => {
                let task = Task::parse(&task).ok_or_else(|| ApiError::BadRequest("cursor is not a cursor of this list".into()))?;
                let after = (due.as_str(), device.as_str(), task);
                orders.items.partition_point(|o| (o.due.as_str(), o.device.as_str(), o.task) <= after)
            }
        };
        let items = &orders.items[start..(start + limit).min(total)];
        let next_cursor = (start + limit < total).then(|| items.last().map(|o| page::work_order_cursor(&o.due, &o.device, o.task.as_str()))).flatten();
        return Ok(Json(json!({
            "now": rfc3339(orders.now_ms), "due_within_days": days,
            "count": items.len(), "total": total, "limit": limit, "next_cursor": next_cursor, "items": items,
        }))
        .into_response());
    }
    let mut w = csv::Writer::from_writer(Vec::new());
    let header_row = ["device", "site", "kind", "location", "task", "due", "days_left", "overdue", "crew", "phone", "last_inspection", "note"];
    let write = |w: &mut csv::Writer<Vec<u8>>, rec: &[&str]| w.write_record(rec).map_err(|e| ApiError::Internal(e.to_string()));
    write(&mut w, &header_row)?;
    for o in &orders.items {
        let (days_left, overdue) = (o.days_left.to_string(), o.overdue.to_string());
        write(
            &mut w,
            &[&o.device, &o.site, o.kind.as_str(), &o.location, o.task.as_str(), &o.due, &days_left, &overdue, &o.crew, &o.phone, o.last_inspection.as_deref().unwrap_or(""), &o.note],
        )?;
    }
    let body = w.into_inner().map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8"), (header::CONTENT_DISPOSITION, "attachment; filename=\"work-orders.csv\"")], body).into_response())
}

//! The API's one error type and the extractors that answer with it, so that every 4xx and 5xx
//! of the API is JSON `{"error": "…"}` (SPEC §6) — axum's own rejections of a malformed query
//! string, path or body (text/plain by default) included. [`json_errors`] is the safety net
//! for what no handler sees: unknown routes and methods, body limits, rejections in routers
//! merged from other modules. Not here: who may call (see [`super::auth`]).

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequest, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

/// An API error: a status and a message for the user.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    NotFound(String),
    /// The request conflicts with the resource's state (e.g. closing an open incident).
    Conflict(String),
    Unavailable(String),
    Internal(String),
    /// An extractor refused the request (400 bad query or path, 415 not JSON, 422 JSON of the
    /// wrong shape, 413 too large): axum's status, axum's message.
    Rejected(StatusCode, String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            ApiError::Rejected(status, m) => (status, m),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error serving an API request");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error".to_owned())
            }
        };
        (status, axum::Json(json!({ "error": message }))).into_response()
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::Rejected(r.status(), r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::Rejected(r.status(), r.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError::Rejected(r.status(), r.body_text())
    }
}

/// `axum::extract::Query` answering a bad query string with a JSON 400.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(v) = axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Query(v))
    }
}

/// `axum::extract::Path` answering a bad path parameter with a JSON 400.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(v) = axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(Path(v))
    }
}

/// A JSON request body (`axum::Json`) answering with JSON 415 (not `application/json`),
/// 400 (not JSON) or 422 (JSON of the wrong shape). As `Option<JsonBody<T>>`: no body and no
/// Content-Type is `None`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(v) = <axum::Json<T> as FromRequest<S>>::from_request(req, state).await?;
        Ok(JsonBody(v))
    }
}

impl<T: DeserializeOwned, S: Send + Sync> OptionalFromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, ApiError> {
        let v = <axum::Json<T> as OptionalFromRequest<S>>::from_request(req, state).await?;
        Ok(v.map(|axum::Json(v)| JsonBody(v)))
    }
}

/// Largest non-JSON error body rewritten as a message; longer ones are replaced by the
/// status's reason phrase.
const MAX_ERROR_TEXT: usize = 4096;

/// Middleware: a 4xx or 5xx that is not JSON yet (axum's empty 404 and 405, a body-limit 413,
/// a rejection in a handler that uses axum's own extractors) becomes `{"error": "…"}` with
/// the same status and headers (`Allow`, `WWW-Authenticate` stay).
pub async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(response.headers()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_TEXT).await.ok().map(|b| String::from_utf8_lossy(&b).trim().to_owned()).unwrap_or_default();
    let message = match (status, text.is_empty()) {
        (StatusCode::NOT_FOUND, true) => "no such endpoint; see /api/v1/openapi.json".to_owned(),
        (StatusCode::METHOD_NOT_ALLOWED, true) => {
            let allow = parts.headers.get(header::ALLOW).and_then(|v| v.to_str().ok()).unwrap_or("");
            format!("method not allowed here; allowed: {allow}")
        }
        (_, true) => status.canonical_reason().unwrap_or("error").to_owned(),
        (_, false) => text,
    };
    let body = json!({ "error": message }).to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_ENCODING);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(body))
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/json"))
}

//! One API for the whole city (cluster mode, SPEC §9): any gateway answers for every site.
//!
//! Device questions (the list, one device, its readings, its effective rules) go to the owners
//! of the partitions over NATS ([`crate::cluster::forward`]): a list with `site=` to that site's
//! partition, everything else to every partition, merged here. An operator's transition goes to
//! the owner of the incident's partition, which applies it (it alone appends to the incident
//! log). Incident lists, details and the live stream read the replicated log
//! ([`crate::cluster::city`]) in the handlers of [`super::incidents`].
//!
//! The owner serves a forwarded request with its own router, marked [`ServedFor`]: then device
//! questions are answered only about the partition's devices, and nothing is forwarded again.
//! Not here: anything in single-node mode ([`ApiState::city`] is `None`: every request passes).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt as _;

use super::auth::{Caller, Role};
use super::{page, ApiError, ApiState};
use crate::cluster::city::CityIncidents;
use crate::cluster::forward::{Answer, AnswerFn, Forwarded, Forwarder};
use crate::cluster::nats_config::partition_of;

/// Largest request or answer body carried between gateways.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// What the API needs in cluster mode.
#[derive(Debug)]
pub struct City {
    pub forwarder: Forwarder,
    pub incidents: Arc<CityIncidents>,
    pub partitions: u16,
}

/// Marks a request forwarded to this gateway as the holder of the partition's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedFor(pub u16);

impl City {
    pub fn partition_of(&self, site: &str) -> u16 {
        partition_of(site, self.partitions)
    }
}

/// Middleware: in cluster mode, sends what only an owner can answer to the owner.
pub async fn route(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let Some(city) = s.city.clone() else { return next.run(req).await };
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let query: HashMap<String, String> = axum::extract::Query::try_from_uri(req.uri()).map(|q| q.0).unwrap_or_default();
    if let Some(ServedFor(p)) = req.extensions().get::<ServedFor>().copied() {
        // Answering as the owner: a device of another partition is not ours to show (it may
        // linger in the registry from when we owned its partition).
        let device = match (req.method(), segments.as_slice()) {
            (&Method::GET, ["api", "v1", "devices", id] | ["api", "v1", "devices", id, "readings"]) => Some((*id).to_owned()),
            (&Method::GET, ["api", "v1", "rules"]) => query.get("device").cloned(),
            _ => None,
        };
        if let Some(id) = device {
            if !s.registry.get(&id).is_some_and(|d| city.partition_of(&d.site) == p) {
                return ApiError::NotFound(format!("no device {id:?}")).into_response();
            }
        }
        return next.run(req).await;
    }
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["api", "v1", "devices"]) => match query.get("site") {
            Some(site) => {
                let p = city.partition_of(site);
                relay(city.forwarder.ask(p, &forwarded(req).await).await)
            }
            None => devices(&city, &forwarded(req).await, &query).await,
        },
        (Method::GET, ["api", "v1", "devices", _] | ["api", "v1", "devices", _, "readings"]) => found(&city, &forwarded(req).await).await,
        (Method::GET, ["api", "v1", "rules"]) if query.contains_key("device") => found(&city, &forwarded(req).await).await,
        (Method::POST, ["api", "v1", "incidents", id, _action]) => match city.incidents.get(id) {
            Some(incident) => {
                let p = city.partition_of(&incident.site);
                relay(city.forwarder.ask(p, &forwarded(req).await).await)
            }
            // Not in the log (yet): this gateway's own book answers (a 404 most likely).
            None => next.run(req).await,
        },
        _ => next.run(req).await,
    }
}

/// The request as it travels to an owner: the caller's token name and role go with it.
async fn forwarded(req: Request) -> Forwarded {
    let (parts, body) = req.into_parts();
    let caller = parts.extensions.get::<Caller>().map(|c| (c.name.clone(), role_name(c.role)));
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let uri = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    // A body over the limit is cut off here and refused by the owner as malformed JSON.
    let body = axum::body::to_bytes(body, MAX_BODY).await.unwrap_or_default();
    Forwarded { method: parts.method.as_str().to_owned(), uri, content_type, caller, body }
}

fn role_name(role: Role) -> String {
    serde_json::to_value(role).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn respond(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    (status, [(header::CONTENT_TYPE, "application/json")], answer.body).into_response()
}

fn relay(answer: Result<Answer, crate::cluster::forward::Error>) -> Response {
    match answer {
        Ok(a) => respond(a),
        Err(e) => ApiError::Unavailable(e.to_string()).into_response(),
    }
}

/// Every partition's owner's answer.
async fn ask_all(city: &City, request: &Forwarded) -> Vec<(u16, Result<Answer, crate::cluster::forward::Error>)> {
    let asks = (0..city.partitions).map(|p| async move { (p, city.forwarder.ask(p, request).await) });
    futures_util::future::join_all(asks).await
}

fn unanswered(missing: &[u16]) -> Response {
    ApiError::Unavailable(format!(
        "no gateway answers for partition(s) {missing:?} right now (no lease holder, or no answer within {:?}); try again in a few seconds",
        crate::cluster::forward::FORWARD_TIMEOUT
    ))
    .into_response()
}

/// One device (or its readings, or its rules): the partition that has it answers 200, the others
/// 404. A 404 only when every partition answered.
async fn found(city: &City, request: &Forwarded) -> Response {
    let mut missing = Vec::new();
    let mut not_found = None;
    for (p, answer) in ask_all(city, request).await {
        match answer {
            Ok(a) if a.status == 404 => not_found = Some(a),
            Ok(a) => return respond(a),
            Err(_) => missing.push(p),
        }
    }
    match not_found {
        Some(a) if missing.is_empty() => respond(a),
        _ => unanswered(&missing),
    }
}

/// The device list over every partition: each owner's page (same filter, limit and cursor, its
/// partition's devices only), merged in id order, totals and counts summed.
async fn devices(city: &City, request: &Forwarded, query: &HashMap<String, String>) -> Response {
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(page::DEFAULT_LIMIT);
    let mut missing = Vec::new();
    let (mut total, mut more) = (0u64, false);
    let mut by_health: BTreeMap<String, u64> = BTreeMap::new();
    let mut list: Vec<Value> = Vec::new();
    for (p, answer) in ask_all(city, request).await {
        let a = match answer {
            Ok(a) => a,
            Err(_) => {
                missing.push(p);
                continue;
            }
        };
        if a.status != 200 {
            // A bad filter is bad for every partition: the owner's answer says why.
            return respond(a);
        }
        let Ok(mut v) = serde_json::from_slice::<Value>(&a.body) else {
            return ApiError::Internal(format!("partition {p}'s owner answered the device list with bad JSON")).into_response();
        };
        total += v["total"].as_u64().unwrap_or(0);
        more |= !v["next_cursor"].is_null();
        if let Some(counts) = v["by_health"].as_object() {
            for (k, n) in counts {
                *by_health.entry(k.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
        if let Value::Array(devices) = v["devices"].take() {
            list.extend(devices);
        }
    }
    if !missing.is_empty() {
        return unanswered(&missing);
    }
    list.sort_by(|a, b| a["id"].as_str().unwrap_or("").cmp(b["id"].as_str().unwrap_or("")));
    more |= list.len() > limit;
    list.truncate(limit);
    let next_cursor = if more { list.last().and_then(|d| d["id"].as_str()).map(page::hex_part) } else { None };
    axum::Json(json!({
        "count": list.len(), "total": total, "limit": limit, "next_cursor": next_cursor,
        "by_health": by_health, "devices": list,
    }))
    .into_response()
}

/// How the owner answers a forwarded request: with `router` (the API without authentication —
/// the asking gateway authenticated the caller, whose name and role come along).
pub fn answer_with(router: Router) -> AnswerFn {
    Arc::new(move |partition, f: Forwarded| {
        let router = router.clone();
        Box::pin(async move {
            let mut builder = axum::http::Request::builder().method(f.method.as_str()).uri(f.uri.as_str());
            if let Some(ct) = &f.content_type {
                builder = builder.header(header::CONTENT_TYPE, ct.as_str());
            }
            let mut req = match builder.body(Body::from(f.body)) {
                Ok(r) => r,
                Err(e) => return Answer { status: 400, body: json!({ "error": format!("forwarded request: {e}") }).to_string().into() },
            };
            req.extensions_mut().insert(ServedFor(partition));
            if let Some((name, role)) = f.caller {
                if let Ok(role) = serde_json::from_value::<Role>(Value::String(role)) {
                    req.extensions_mut().insert(Caller { name, role });
                }
            }
            let response = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let status = response.status().as_u16();
            match axum::body::to_bytes(response.into_body(), MAX_BODY).await {
                Ok(body) => Answer { status, body },
                Err(e) => Answer { status: 500, body: json!({ "error": format!("answer too large: {e}") }).to_string().into() },
            }
        })
    })
}

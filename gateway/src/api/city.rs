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
//! A device's readings are the owner's answer merged with the long-term store's readings of the
//! same range when one is configured to be read ([`City::history`], [`merge_readings`]): the
//! owner's store starts at its takeover.
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
use crate::store::Point;

/// Largest request or answer body carried between gateways.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// What the API needs in cluster mode.
#[derive(Debug)]
pub struct City {
    pub forwarder: Forwarder,
    pub incidents: Arc<CityIncidents>,
    pub partitions: u16,
    /// The long-term store to read readings history from (`[storage.influx] history_url`).
    pub history: Option<crate::store::influx::History>,
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
        (Method::GET, ["api", "v1", "devices", id, "readings"]) => match &city.history {
            Some(history) => {
                let id = (*id).to_owned();
                readings_with_history(&city, history, &forwarded(req).await, &id, &query).await
            }
            None => found(&city, &forwarded(req).await).await,
        },
        (Method::GET, ["api", "v1", "devices", _]) => found(&city, &forwarded(req).await).await,
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
    match found_answer(city, request).await {
        Ok(a) => respond(a),
        Err(r) => r,
    }
}

/// [`found`]'s answer, or the 503 when a partition did not answer and none had the device.
async fn found_answer(city: &City, request: &Forwarded) -> Result<Answer, Response> {
    let mut missing = Vec::new();
    let mut not_found = None;
    for (p, answer) in ask_all(city, request).await {
        match answer {
            Ok(a) if a.status == 404 => not_found = Some(a),
            Ok(a) => return Ok(a),
            Err(_) => missing.push(p),
        }
    }
    match not_found {
        Some(a) if missing.is_empty() => Ok(a),
        _ => Err(unanswered(&missing)),
    }
}

/// A device's readings with the long-term store's history: the owner answers as usual (it
/// validates the query, and a 404 or 400 is its answer); for a stepped query it is also asked
/// for its raw readings of the answer's range. Its readings are merged with the raw samples the
/// long-term store holds for that range ([`merge_readings`]). The answer gains
/// `"long_term": {"samples": n, "readings": m}` (samples read; readings of the answer taken from
/// the long-term store), or `{"error": …}` when the long-term store did not answer — the
/// owner's points are then the answer, as without a long-term store.
async fn readings_with_history(city: &City, history: &crate::store::influx::History, request: &Forwarded, id: &str, query: &HashMap<String, String>) -> Response {
    let owner = match found_answer(city, request).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    if owner.status != 200 {
        return respond(owner);
    }
    let Ok(mut answer) = serde_json::from_slice::<Value>(&owner.body) else {
        return ApiError::Internal(format!("the owner of {id:?} answered its readings with bad JSON")).into_response();
    };
    let time = |key: &str| answer[key].as_str().and_then(|t| t.parse::<jiff::Timestamp>().ok()).map(|t| t.as_millisecond());
    let (Some(from), Some(to), Some(metric)) = (time("from"), time("to"), answer["metric"].as_str().map(str::to_owned)) else {
        return ApiError::Internal(format!("the owner of {id:?} answered its readings without from, to or metric")).into_response();
    };
    let step = answer["step_ms"].as_i64();
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(super::MAX_POINTS).min(super::MAX_POINTS);
    let points_of = |v: &Value| -> Vec<Point> { v["points"].as_array().map(|ps| ps.iter().filter_map(point_of).collect()).unwrap_or_default() };
    let owned = points_of(&answer);
    // A stepped answer's steps mix readings the owner has with ones only the long-term store
    // has: merged from the owner's raw readings, when it has at most MAX_POINTS of them.
    let owned_raw = match step {
        Some(_) => {
            let raw = Forwarded { uri: format!("/api/v1/devices/{id}/readings?metric={metric}&from={from}&to={to}&limit={}", super::MAX_POINTS), ..request.clone() };
            match found_answer(city, &raw).await {
                Ok(a) if a.status == 200 => serde_json::from_slice::<Value>(&a.body).ok().map(|v| points_of(&v)).filter(|ps| ps.len() < super::MAX_POINTS),
                _ => None,
            }
        }
        None => None,
    };
    match history.readings(id, &metric, from, to).await {
        Ok(samples) => {
            let (points, only_long_term) = merge_readings(&owned, owned_raw.as_deref(), &samples, from, step, limit);
            answer["long_term"] = json!({ "samples": samples.len(), "readings": only_long_term });
            answer["count"] = json!(points.len());
            answer["points"] = points.iter().map(super::point_json).collect();
        }
        Err(e) => {
            tracing::warn!(device = %id, error = %e, "readings history: the long-term store did not answer; the owner's readings alone");
            answer["long_term"] = json!({ "error": e });
        }
    }
    axum::Json(answer).into_response()
}

fn point_of(v: &Value) -> Option<Point> {
    Some(Point {
        ts_ms: v["ts_ms"].as_i64()?,
        min: v["min"].as_f64()?,
        max: v["max"].as_f64()?,
        avg: v["avg"].as_f64()?,
        last: v["last"].as_f64()?,
        count: v["count"].as_u64()?,
    })
}

/// The owner's readings merged with the long-term store's raw samples of the same range, oldest
/// first, at most `limit`; answers the points and how many of their readings came from the
/// samples (only the samples had them; without `owner_raw`, every reading of a step taken from
/// the samples). `owner` is the owner's answer (raw, or per `step`); `owner_raw` its raw readings of the
/// range when the answer is per step (`None`: not had, or too many).
///
/// - Raw: every timestamp once; the owner's reading where both have one.
/// - Per step with `owner_raw`: the union of both raw sets (every timestamp once) bucketed as
///   the owner's store buckets (from `from`, or from `from` floored to the minute when it
///   answered from its one-minute rollups: whole-minute steps, or its points say so).
/// - Per step without: for each step the side with more readings (the owner's on a tie) — both
///   hold the same readings where both have any, but a step holding some of each side's only
///   readings shows the larger part alone.
pub fn merge_readings(owner: &[Point], owner_raw: Option<&[Point]>, samples: &[(i64, f64)], from: i64, step: Option<i64>, limit: usize) -> (Vec<Point>, usize) {
    let Some(step) = step.filter(|s| *s > 0) else {
        let points: Vec<(Point, bool)> = union_raw(owner, samples).into_values().take(limit).collect();
        let only = points.iter().filter(|(_, s)| *s).count();
        return (points.into_iter().map(|(p, _)| p).collect(), only);
    };
    const MINUTE: i64 = 60_000;
    let rollups = (step >= MINUTE && step % MINUTE == 0) || owner.iter().any(|p| (p.ts_ms - from).rem_euclid(step) != 0);
    let origin = if rollups { from.div_euclid(MINUTE) * MINUTE } else { from };
    let mut merged: BTreeMap<i64, (Point, u64)> = BTreeMap::new();
    match owner_raw {
        Some(raw) => {
            let readings: Vec<(i64, f64, bool)> = union_raw(raw, samples).into_values().map(|(p, s)| (p.ts_ms, p.last, s)).collect();
            for (start, (p, only)) in buckets(&readings, origin, step) {
                merged.insert(start, (p, only));
            }
        }
        None => {
            merged.extend(owner.iter().map(|p| (p.ts_ms, (p.clone(), 0))));
            let readings: Vec<(i64, f64, bool)> = samples.iter().map(|&(ts, v)| (ts, v, true)).collect();
            for (start, (p, only)) in buckets(&readings, origin, step) {
                if merged.get(&start).is_none_or(|(own, _)| own.count < p.count) {
                    merged.insert(start, (p, only));
                }
            }
        }
    }
    let points: Vec<(Point, u64)> = merged.into_values().take(limit).collect();
    let only = points.iter().map(|(_, n)| *n as usize).sum();
    (points.into_iter().map(|(p, _)| p).collect(), only)
}

/// Raw readings of both sides by timestamp, each once (the owner's where both have one), with
/// whether it came from the samples alone.
fn union_raw(owner: &[Point], samples: &[(i64, f64)]) -> BTreeMap<i64, (Point, bool)> {
    let mut union: BTreeMap<i64, (Point, bool)> = owner.iter().map(|p| (p.ts_ms, (p.clone(), false))).collect();
    for &(ts, v) in samples {
        union.entry(ts).or_insert((Point { ts_ms: ts, min: v, max: v, avg: v, last: v, count: 1 }, true));
    }
    union
}

/// Raw readings `(ts, value, from the samples alone)` per step from `origin`: each step's
/// min/max/avg/last/count, and how many of its readings only the samples had.
fn buckets(readings: &[(i64, f64, bool)], origin: i64, step: i64) -> BTreeMap<i64, (Point, u64)> {
    let mut out: BTreeMap<i64, (Point, f64, i64, u64)> = BTreeMap::new();
    for &(ts, v, only) in readings {
        let start = origin + (ts - origin).div_euclid(step) * step;
        let (p, sum, last_ts, n) = out.entry(start).or_insert((Point { ts_ms: start, min: v, max: v, avg: 0.0, last: v, count: 0 }, 0.0, i64::MIN, 0));
        p.min = p.min.min(v);
        p.max = p.max.max(v);
        p.count += 1;
        *sum += v;
        *n += u64::from(only);
        if ts >= *last_ts {
            *last_ts = ts;
            p.last = v;
        }
    }
    out.into_iter()
        .map(|(start, (mut p, sum, _, n))| {
            p.avg = sum / p.count as f64;
            (start, (p, n))
        })
        .collect()
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

#[cfg(test)]
mod merge_tests {
    use super::*;

    fn raw(ts: i64, v: f64) -> Point {
        Point { ts_ms: ts, min: v, max: v, avg: v, last: v, count: 1 }
    }

    #[test]
    fn raw_readings_are_every_timestamp_once_the_owners_where_both_have_one() {
        let (points, taken) = merge_readings(&[raw(3000, 3.0)], None, &[(1000, 1.0), (3000, 9.0), (5000, 5.0)], 0, None, 100);
        assert_eq!(points, vec![raw(1000, 1.0), raw(3000, 3.0), raw(5000, 5.0)]);
        assert_eq!(taken, 2);
        let (points, _) = merge_readings(&[raw(3000, 3.0)], None, &[(1000, 1.0), (5000, 5.0)], 0, None, 2);
        assert_eq!(points.len(), 2, "at most the limit, oldest first");
        assert_eq!(points[1].ts_ms, 3000);
    }

    #[test]
    fn per_step_the_union_of_both_sides_readings_is_bucketed() {
        // Steps of 10 s from 0. The owner (a new owner) has 11 s and 14 s; the long-term store
        // everything before and 11–13 s (14 s not flushed yet).
        let owner_raw = [raw(11_000, 11.0), raw(14_000, 14.0)];
        let owner = [Point { ts_ms: 10_000, min: 11.0, max: 14.0, avg: 12.5, last: 14.0, count: 2 }];
        let samples = [(1000, 1.0), (2000, 2.0), (11_000, 11.0), (12_000, 12.0), (13_000, 13.0)];
        let (points, taken) = merge_readings(&owner, Some(&owner_raw), &samples, 0, Some(10_000), 100);
        assert_eq!(points[0], Point { ts_ms: 0, min: 1.0, max: 2.0, avg: 1.5, last: 2.0, count: 2 });
        assert_eq!(points[1], Point { ts_ms: 10_000, min: 11.0, max: 14.0, avg: 12.5, last: 14.0, count: 4 });
        assert_eq!(taken, 4, "1, 2, 12 and 13 s only the long-term store had");
    }

    #[test]
    fn per_step_without_the_owners_raw_readings_the_side_with_more_wins_each_step() {
        let owner = [Point { ts_ms: 10_000, min: 12.0, max: 13.0, avg: 12.5, last: 13.0, count: 2 }];
        let samples = [(1000, 1.0), (2000, 2.0), (11_000, 11.0), (12_000, 12.0), (13_000, 13.0)];
        let (points, taken) = merge_readings(&owner, None, &samples, 0, Some(10_000), 100);
        assert_eq!(points[1], Point { ts_ms: 10_000, min: 11.0, max: 13.0, avg: 12.0, last: 13.0, count: 3 });
        assert_eq!(taken, 5);
        // The long-term store behind (not flushed yet): the owner's step stands.
        let (points, taken) = merge_readings(&owner, None, &samples[..3], 0, Some(10_000), 100);
        assert_eq!(points[1], owner[0]);
        assert_eq!(taken, 2);
    }

    #[test]
    fn whole_minute_steps_start_at_the_minute_as_the_owners_rollups_do() {
        // from 30 s: the owner's rollups bucket from 0, and so must the samples.
        let (points, _) = merge_readings(&[], Some(&[]), &[(70_000, 7.0), (119_000, 9.0)], 30_000, Some(60_000), 100);
        assert_eq!(points.iter().map(|p| (p.ts_ms, p.count)).collect::<Vec<_>>(), vec![(60_000, 2)]);
        // A non-minute step the owner answered from rollups (its points are off `from`): same.
        let owner = [Point { ts_ms: 0, min: 1.0, max: 1.0, avg: 1.0, last: 1.0, count: 1 }];
        let (points, _) = merge_readings(&owner, Some(&[raw(40_000, 1.0)]), &[(95_000, 9.0)], 30_000, Some(90_000), 100);
        assert_eq!(points.iter().map(|p| p.ts_ms).collect::<Vec<_>>(), vec![0, 90_000]);
    }
}

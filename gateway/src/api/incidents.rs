//! The incident side of the API: incidents and the operator's closed loop (ack, dispatch,
//! resolve, close), the live stream (SSE), silences, the effective rules of a device and the
//! delivery state of every push channel.
//!
//! Writes go to the incident manager and answer only after its commit, so a 200 means the
//! transition is on disk and queued for every channel. In cluster mode lists, details and the
//! live stream show the whole city from the replicated incident log ([`super::city`]), and a
//! transition reaches this handler only at the owner of the incident's partition.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::BroadcastStream;

use super::{page, ApiError, ApiResult, ApiState, JsonBody, Path, Query};
use crate::incidents::book::{Action, TransitionError};
use crate::incidents::manager::IncidentsHandle;
use crate::incidents::silence::SilenceConfig;
use crate::incidents::store::{IncidentFilter, IncidentStore};
use crate::incidents::IncidentState;

/// Most incidents one list returns.
pub const MAX_INCIDENTS: usize = 1000;

fn handle(s: &ApiState) -> ApiResult<&IncidentsHandle> {
    s.incidents.as_ref().ok_or_else(|| ApiError::Unavailable("incidents are not running".into()))
}

/// Runs `f` on the incident store on the blocking pool: SQLite never runs on the async threads.
async fn blocking<T: Send + 'static>(
    h: &IncidentsHandle,
    f: impl FnOnce(&IncidentStore) -> Result<T, crate::incidents::store::Error> + Send + 'static,
) -> ApiResult<T> {
    let store = Arc::clone(&h.store);
    Ok(tokio::task::spawn_blocking(move || f(&store)).await.map_err(|e| ApiError::Internal(e.to_string()))??)
}

impl From<crate::incidents::store::Error> for ApiError {
    fn from(e: crate::incidents::store::Error) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<crate::incidents::manager::Stopped> for ApiError {
    fn from(e: crate::incidents::manager::Stopped) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentParams {
    /// One state or several, comma-separated; "active" = open,acknowledged,dispatched.
    state: Option<String>,
    rule: Option<String>,
    site: Option<String>,
    device: Option<String>,
    /// Only the children of this incident (SPEC §5: `fire_confirmed` over its smoke incidents).
    parent: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
    /// `city` (the default): in cluster mode every gateway's incidents, from the replicated log;
    /// `local`: this gateway's own book only (what it acted on). The same in single-node mode.
    scope: Option<String>,
}

/// Incidents listed when `limit` is not given.
pub const DEFAULT_INCIDENTS: usize = 200;

pub async fn list(State(s): State<ApiState>, Query(p): Query<IncidentParams>) -> ApiResult<Json<Value>> {
    let h = handle(&s)?;
    let mut states = Vec::new();
    if p.state.as_deref().is_some_and(|s| s.trim().is_empty()) {
        return Err(ApiError::BadRequest("state: empty; give one or more states, or leave the parameter out".into()));
    }
    for part in p.state.as_deref().unwrap_or("").split(',').map(str::trim).filter(|x| !x.is_empty()) {
        if part == "active" {
            states.extend([IncidentState::Open, IncidentState::Acknowledged, IncidentState::Dispatched]);
            continue;
        }
        let st = IncidentState::parse(part).ok_or_else(|| {
            ApiError::BadRequest(format!("state={part:?}: one of active, {}", IncidentState::ALL.map(|s| s.as_str()).join(", ")))
        })?;
        states.push(st);
    }
    let limit = page::limit(p.limit, DEFAULT_INCIDENTS, MAX_INCIDENTS)?;
    let after = p.cursor.as_deref().map(page::incident_after).transpose()?;
    // One more than asked: whether a next page exists.
    let local = match p.scope.as_deref() {
        None | Some("city") => false,
        Some("local") => true,
        Some(other) => return Err(ApiError::BadRequest(format!("scope={other:?}: city or local"))),
    };
    let filter = IncidentFilter { states, rule: p.rule, site: p.site, device: p.device, parent: p.parent, limit: limit + 1 };
    let (mut found, total, counts) = match s.city.as_ref().filter(|_| !local) {
        Some(city) => {
            let (found, total) = city.incidents.page(&filter, after.as_ref().map(|(t, id)| (*t, id.as_str())));
            (found, total, city.incidents.counts_by_state())
        }
        None => {
            let store = std::sync::Arc::clone(&h.store);
            tokio::task::spawn_blocking(move || -> Result<_, crate::incidents::store::Error> {
                let (found, total) = store.page(&filter, after.as_ref().map(|(t, id)| (*t, id.as_str())))?;
                Ok((found, total, store.counts_by_state()?))
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
        }
    };
    let more = found.len() > limit;
    found.truncate(limit);
    let next_cursor = more.then(|| found.last().map(|(t, i)| page::incident_cursor(*t, &i.id))).flatten();
    let incidents: Vec<_> = found.into_iter().map(|(_, i)| i).collect();
    let by_state: serde_json::Map<String, Value> = counts.into_iter().map(|(k, v)| (k, json!(v))).collect();
    Ok(Json(json!({
        "count": incidents.len(), "total": total, "limit": limit, "next_cursor": next_cursor,
        "by_state": by_state, "incidents": incidents,
    })))
}

pub async fn one(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let h = handle(&s)?;
    let lookup = id.clone();
    let local = blocking(h, move |store| store.get(&lookup)).await?;
    // Cluster mode: the log's newest revision, or this gateway's own if newer (its change is
    // committed here and on its way to the log).
    let city = s.city.as_ref().and_then(|c| c.incidents.get(&id));
    let incident = match (local, city) {
        (Some(l), Some(c)) => Some(if l.revision >= c.revision { l } else { c }),
        (l, c) => l.or(c),
    };
    let incident = incident.ok_or_else(|| ApiError::NotFound(format!("no incident {id}")))?;
    Ok(Json(json!(incident)))
}

/// The body of a transition.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitionBody {
    actor: Option<String>,
    note: Option<String>,
    /// The crew an incident is dispatched to.
    crew: Option<String>,
}

pub async fn transition(
    State(s): State<ApiState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
    Path((id, action)): Path<(String, String)>,
    body: Option<JsonBody<TransitionBody>>,
) -> ApiResult<Json<Value>> {
    let h = handle(&s)?;
    let action = Action::parse(&action).ok_or_else(|| ApiError::NotFound(format!("no action {action:?}: ack, dispatch, resolve or close")))?;
    let JsonBody(body) = body.unwrap_or_default();
    // With tokens, the record names the token that made the change: a body cannot forge it.
    let actor = match (caller, body.actor) {
        (Some(c), Some(a)) if a != c.name => format!("{a} via {}", c.name),
        (Some(c), _) => c.name.clone(),
        (None, a) => a.unwrap_or_default(),
    };
    match h.transition(id, action, actor, body.note, body.crew).await? {
        Ok(incident) => Ok(Json(json!(incident))),
        Err(TransitionError::NotFound(id)) => Err(ApiError::NotFound(format!("no open incident {id}"))),
        Err(e @ TransitionError::NotAllowed { .. }) => Err(ApiError::Conflict(e.to_string())),
        Err(TransitionError::Invalid(m)) => Err(ApiError::BadRequest(m)),
    }
}

/// `GET /api/v1/events`: every committed incident change as `event: incident`, `id:` its
/// outbox position. A client reconnecting with `Last-Event-ID` first gets what it missed.
pub async fn events(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let h = handle(&s)?;
    let last: Option<i64> = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    // Subscribe before reading the backlog, so nothing falls between the two. In cluster mode
    // the changes are the incident log's, `id:` its stream sequence.
    let (live, backlog) = match &s.city {
        Some(city) => {
            let live = BroadcastStream::new(city.incidents.subscribe());
            let backlog = match last {
                Some(after) => city.incidents.since(after, 1000).await.map_err(ApiError::Unavailable)?.into_iter().map(|e| (e.seq, e.body.to_string())).collect(),
                None => Vec::new(),
            };
            (live, backlog)
        }
        None => {
            let live = BroadcastStream::new(h.events.subscribe());
            let backlog = match last {
                Some(after) => blocking(h, move |store| store.outbox_since(after, 1000)).await?,
                None => Vec::new(),
            };
            (live, backlog)
        }
    };
    let replayed_up_to = backlog.last().map_or(last.unwrap_or(i64::MIN), |(seq, _)| *seq);
    let backlog = stream::iter(backlog.into_iter().map(|(seq, body)| Ok(Event::default().event("incident").id(seq.to_string()).data(body))));
    let live = live.filter_map(move |item| async move {
        match item {
            Ok(e) if e.seq > replayed_up_to => Some(Ok(Event::default().event("incident").id(e.seq.to_string()).data(&*e.body))),
            Ok(_) => None,
            // Lagged: tell the client to re-read the list.
            Err(_) => Some(Ok(Event::default().event("resync").data("{}"))),
        }
    });
    Ok(Sse::new(backlog.chain(live)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesParams {
    device: Option<String>,
}

/// `GET /api/v1/rules`: the pack as loaded, or with `?device=` the rules in effect for it.
pub async fn rules(State(s): State<ApiState>, Query(p): Query<RulesParams>) -> ApiResult<Json<Value>> {
    match p.device {
        None => Ok(Json(json!({ "rules": s.rules.rules() }))),
        Some(id) => {
            let d = s.registry.get(&id).ok_or_else(|| ApiError::NotFound(format!("no device {id}")))?;
            let effective = s.rules.effective(d.kind, &d.site, &d.id);
            Ok(Json(json!({ "device": &*d.id, "site": &*d.site, "kind": d.kind, "rules": effective })))
        }
    }
}

/// `GET /api/v1/notify`: delivery state of every push channel.
pub async fn notify(State(s): State<ApiState>) -> ApiResult<Json<Value>> {
    let mut channels: Vec<Value> = s.notify.iter().map(|c| json!(c.status())).collect();
    if let Some(h) = &s.incidents {
        let counts = blocking(h, |store| store.delivery_counts()).await?;
        for c in &mut channels {
            let name = c["channel"].as_str().unwrap_or_default().to_owned();
            if let Some((_, n)) = counts.iter().find(|(ch, _)| *ch == name) {
                c["outbox"] = json!(n);
            }
        }
    }
    Ok(Json(json!({ "channels": channels })))
}

pub async fn silences(State(s): State<ApiState>) -> ApiResult<Json<Value>> {
    let list = handle(&s)?.silences().await?;
    Ok(Json(json!({ "silences": list })))
}

pub async fn add_silence(State(s): State<ApiState>, JsonBody(body): JsonBody<Value>) -> ApiResult<Response> {
    // serde takes a JSON array for a struct (fields in order); the contract is an object.
    // JSON of the wrong shape is 422, like axum's own rejection; a cross-field rule is 400.
    if !body.is_object() {
        return Err(ApiError::Rejected(StatusCode::UNPROCESSABLE_ENTITY, "the silence must be a JSON object".into()));
    }
    let body: SilenceConfig =
        serde_json::from_value(body).map_err(|e| ApiError::Rejected(StatusCode::UNPROCESSABLE_ENTITY, format!("silence: {e}")))?;
    let h = handle(&s)?;
    match h.add_silence(body).await? {
        Ok(created) => Ok((StatusCode::CREATED, Json(json!(created))).into_response()),
        Err(reason) => Err(ApiError::BadRequest(reason)),
    }
}

pub async fn remove_silence(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    if handle(&s)?.remove_silence(id.clone()).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no silence {id}")))
    }
}

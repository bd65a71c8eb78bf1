//! The city's incidents as every gateway sees them in cluster mode: the newest revision of every
//! incident of every partition, followed from the replicated incident log, so any gateway lists
//! them, shows one, and streams every change (SSE) — whoever owns the site.
//!
//! One ordered consumer over `citywatch.incidents.>` starting with the last entry per subject
//! (one per incident), then every new entry; a change is kept (and announced) only when its
//! revision is newer than the one held, so a consumer restarted after an error announces nothing
//! twice. Read-only: an incident changes only at its partition's owner ([`super::forward`]).
//! Not here: the owner's own incident book (`crate::incidents`), which alone appends to the log.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt as _;
use tokio::sync::{broadcast, watch};

use super::{INCIDENT_PREFIX, INCIDENT_STREAM};
use crate::incidents::manager::LiveEvent;
use crate::incidents::store::IncidentFilter;
use crate::model::Incident;

/// What `IncidentStore::page` answers, over `incidents`: the matching ones most recently
/// updated first (`(updated_ms, id)` descending, after the cursor), and how many match.
fn page_of<'a>(incidents: impl Iterator<Item = &'a Incident>, filter: &IncidentFilter, after: Option<(i64, &str)>) -> (Vec<(i64, Incident)>, u64) {
    let matching: Vec<&Incident> = incidents
        .filter(|i| filter.states.is_empty() || filter.states.contains(&i.state))
        .filter(|i| filter.rule.as_ref().is_none_or(|r| &i.rule == r || i.rules_active.contains(r)))
        .filter(|i| filter.site.as_ref().is_none_or(|s| &i.site == s))
        .filter(|i| filter.device.as_ref().is_none_or(|d| &i.device == d))
        .filter(|i| filter.parent.is_none() || i.parent == filter.parent)
        .collect();
    let total = matching.len() as u64;
    let mut page: Vec<&Incident> = matching
        .into_iter()
        .filter(|i| after.is_none_or(|(t, id)| i.updated_ms < t || (i.updated_ms == t && i.id.as_str() < id)))
        .collect();
    page.sort_unstable_by(|a, b| (b.updated_ms, &b.id).cmp(&(a.updated_ms, &a.id)));
    page.truncate(filter.limit.max(1));
    (page.into_iter().map(|i| (i.updated_ms, i.clone())).collect(), total)
}

/// Longest one read of the log's history (an SSE client's backlog) may take.
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(10);

/// The newest revision of every incident in the log; `LiveEvent::seq` is the log's stream sequence.
#[derive(Debug)]
pub struct CityIncidents {
    latest: RwLock<HashMap<String, Incident>>,
    events: broadcast::Sender<LiveEvent>,
    js: jetstream::Context,
}

impl CityIncidents {
    /// Follows the incident log until `stop`; the view fills as the log is read.
    pub fn start(js: jetstream::Context, stop: watch::Receiver<bool>) -> (Arc<CityIncidents>, tokio::task::JoinHandle<()>) {
        let (events, _) = broadcast::channel(1024);
        let city = Arc::new(CityIncidents { latest: RwLock::new(HashMap::new()), events, js });
        let task = tokio::spawn(Arc::clone(&city).follow(stop));
        (city, task)
    }

    async fn follow(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut waits = super::calls::waits();
        loop {
            let error = tokio::select! {
                r = self.follow_once() => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            tracing::warn!(error = %error, "cluster: following the incident log failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(waits.next().unwrap_or(Duration::from_secs(2))) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    async fn follow_once(&self) -> String {
        let read = async {
            let stream = self.js.get_stream_no_info(INCIDENT_STREAM).await.map_err(|e| format!("incident log: {e}"))?;
            let consumer = stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: format!("{INCIDENT_PREFIX}.>"),
                    deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("incident log consumer: {e}"))?;
            let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
            while let Some(message) = messages.next().await {
                let message = message.map_err(|e| e.to_string())?;
                let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                self.apply(seq, &message.payload);
            }
            Ok::<(), String>(())
        };
        match read.await {
            Ok(()) => "the incident log's consumer ended".into(),
            Err(e) => e,
        }
    }

    /// Keeps an entry if it is the incident's newest revision; announces it then.
    fn apply(&self, seq: u64, payload: &[u8]) {
        let incident: Incident = match serde_json::from_slice(payload) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(seq, error = %e, "cluster: unreadable incident log entry; not shown");
                return;
            }
        };
        {
            let mut latest = self.latest.write().unwrap_or_else(PoisonError::into_inner);
            if latest.get(&incident.id).is_some_and(|held| held.revision >= incident.revision) {
                return;
            }
            latest.insert(incident.id.clone(), incident);
        }
        let body: Arc<str> = Arc::from(String::from_utf8_lossy(payload).as_ref());
        let _ = self.events.send(LiveEvent { seq: i64::try_from(seq).unwrap_or(i64::MAX), body });
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.events.subscribe()
    }

    pub fn get(&self, id: &str) -> Option<Incident> {
        self.latest.read().unwrap_or_else(PoisonError::into_inner).get(id).cloned()
    }

    /// What `IncidentStore::page` answers, over the city: the matching incidents most recently
    /// updated first (`(updated_ms, id)` descending, after the cursor), and how many match.
    pub fn page(&self, filter: &IncidentFilter, after: Option<(i64, &str)>) -> (Vec<(i64, Incident)>, u64) {
        page_of(self.latest.read().unwrap_or_else(PoisonError::into_inner).values(), filter, after)
    }

    /// Incidents by state, over the city.
    pub fn counts_by_state(&self) -> Vec<(String, u64)> {
        let mut counts: HashMap<&'static str, u64> = HashMap::new();
        for i in self.latest.read().unwrap_or_else(PoisonError::into_inner).values() {
            *counts.entry(i.state.as_str()).or_default() += 1;
        }
        counts.into_iter().map(|(s, n)| (s.to_owned(), n)).collect()
    }

    /// Up to `max` log entries after stream sequence `after`, oldest first (the live stream's
    /// backlog for a client reconnecting with `Last-Event-ID`).
    pub async fn since(&self, after: i64, max: usize) -> Result<Vec<LiveEvent>, String> {
        let start = u64::try_from(after).unwrap_or(0).saturating_add(1);
        let stream = self.js.get_stream_no_info(INCIDENT_STREAM).await.map_err(|e| format!("incident log: {e}"))?;
        let mut consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("{INCIDENT_PREFIX}.>"),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
                ..Default::default()
            })
            .await
            .map_err(|e| format!("incident log backlog: {e}"))?;
        let mut out = Vec::new();
        if consumer.info().await.map_err(|e| format!("incident log backlog: {e}"))?.num_pending == 0 {
            return Ok(out);
        }
        let read = async {
            let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
            while let Some(message) = messages.next().await {
                let message = message.map_err(|e| e.to_string())?;
                let info = message.info().map_err(|e| e.to_string())?;
                let (seq, pending) = (info.stream_sequence, info.pending);
                out.push(LiveEvent { seq: i64::try_from(seq).unwrap_or(i64::MAX), body: Arc::from(String::from_utf8_lossy(&message.payload).as_ref()) });
                if pending == 0 || out.len() >= max {
                    return Ok::<(), String>(());
                }
            }
            Err("the incident log's consumer ended early".into())
        };
        tokio::time::timeout(BACKLOG_TIMEOUT, read).await.map_err(|_| format!("reading the incident log's backlog took over {BACKLOG_TIMEOUT:?}"))??;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::IncidentState;

    fn incident(id: &str, site: &str, updated_ms: i64, state: IncidentState) -> Incident {
        let mut i: Incident = serde_json::from_value(serde_json::json!({
            "id": id, "key": format!("{site}/d/gas_high"), "revision": 1, "rule": "gas_high", "severity": "critical",
            "state": "open", "scope": "device", "site": site, "device": "d", "kind": "gas_detector",
            "opened_at": "", "updated_at": "", "opened_ms": 0, "updated_ms": 0, "summary": "", "count": 1,
            "escalation": 0, "flapping": false, "history": [],
        }))
        .expect("an incident");
        i.updated_ms = updated_ms;
        i.state = state;
        i
    }

    /// The order, filters, cursor and total of the single-node list (`IncidentStore::page`).
    #[test]
    fn the_city_list_pages_like_the_store() {
        let all = [
            incident("inc-a", "s1", 10, IncidentState::Open),
            incident("inc-b", "s1", 30, IncidentState::Closed),
            incident("inc-c", "s2", 30, IncidentState::Open),
            incident("inc-d", "s1", 20, IncidentState::Acknowledged),
        ];
        let filter = |states: Vec<IncidentState>, site: Option<&str>, limit| IncidentFilter { states, rule: None, site: site.map(str::to_owned), device: None, parent: None, limit };
        let ids = |page: &[(i64, Incident)]| page.iter().map(|(_, i)| i.id.clone()).collect::<Vec<_>>();
        let (page, total) = page_of(all.iter(), &filter(vec![], None, 2), None);
        assert_eq!((ids(&page), total), (vec!["inc-c".to_owned(), "inc-b".to_owned()], 4));
        let (page, total) = page_of(all.iter(), &filter(vec![], None, 2), Some((30, "inc-b")));
        assert_eq!((ids(&page), total), (vec!["inc-d".to_owned(), "inc-a".to_owned()], 4));
        let (page, total) = page_of(all.iter(), &filter(vec![IncidentState::Open, IncidentState::Acknowledged], Some("s1"), 10), None);
        assert_eq!((ids(&page), total), (vec!["inc-d".to_owned(), "inc-a".to_owned()], 2));
    }
}

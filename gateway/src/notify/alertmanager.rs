//! Alertmanager channel: each incident change as a Prometheus Alertmanager v2 alert
//! (`POST {url}/api/v2/alerts`), for centres that already route and silence with it.
//!
//! Alertmanager resolves an alert nobody re-posted within its `resolve_timeout`, so this sink
//! remembers the latest alert of every still-active incident it delivered and re-posts them
//! all every `resend_every`, until an inactive revision of the incident is delivered.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::BoxFuture;
use serde::Serialize;

use super::sink::{DeliveryError, Sink};
use crate::http_client::{build as http_client, send};
use super::{AlertmanagerConfig, Error, Result};
use crate::model::{Incident, OutboxItem};

/// One alert of the v2 API's `postableAlerts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// Alertmanager's identity of the alert: the same labels are the same alert.
    pub labels: BTreeMap<&'static str, String>,
    pub annotations: BTreeMap<&'static str, String>,
    #[serde(rename = "startsAt")]
    pub starts_at: String,
    /// Set once the incident is no longer active (the alert is then resolved).
    #[serde(rename = "endsAt", skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<String>,
    #[serde(rename = "generatorURL", skip_serializing_if = "Option::is_none")]
    pub generator_url: Option<String>,
}

impl Alert {
    /// The alert for one revision of an incident. `generator_url` is the dashboard's base URL.
    pub fn from_incident(incident: &Incident, generator_url: Option<&str>) -> Alert {
        let mut labels = BTreeMap::from([
            ("alertname", incident.rule.clone()),
            ("severity", incident.severity.as_str().to_owned()),
            ("site", incident.site.clone()),
            ("device", incident.device.clone()),
            ("kind", incident.kind.as_str().to_owned()),
            ("incident_id", incident.id.clone()),
            ("key", incident.key.clone()),
        ]);
        if let Some(metric) = incident.metric {
            labels.insert("metric", metric.as_str().to_owned());
        }
        let mut annotations = BTreeMap::from([
            ("summary", incident.summary.clone()),
            ("state", incident.state.as_str().to_owned()),
            ("revision", incident.revision.to_string()),
        ]);
        if let Some(value) = incident.value {
            annotations.insert("value", value.to_string());
        }
        if let Some(threshold) = incident.threshold {
            annotations.insert("threshold", threshold.to_string());
        }
        Alert {
            labels,
            annotations,
            starts_at: incident.opened_at.clone(),
            ends_at: (!incident.state.is_active()).then(|| incident.updated_at.clone()),
            generator_url: generator_url.map(|base| format!("{}/#/incidents/{}", base.trim_end_matches('/'), incident.id)),
        }
    }
}

/// The latest delivered alert of one still-active incident.
#[derive(Debug, Clone)]
struct Active {
    revision: u32,
    alert: Alert,
}

#[derive(Debug, Default)]
struct Resend {
    /// By incident id.
    active: HashMap<String, Active>,
    /// When the active alerts were last re-posted (`None`: not yet).
    last_ms: Option<i64>,
    /// Re-posting is failing; logged once when it starts and once when it recovers.
    failing: bool,
}

/// Delivers to `[notify.alertmanager]`.
#[derive(Debug)]
pub struct AlertmanagerSink {
    alerts_url: reqwest::Url,
    generator_url: Option<String>,
    resend_every_ms: i64,
    client: reqwest::Client,
    resend: Mutex<Resend>,
}

impl AlertmanagerSink {
    pub fn new(config: &AlertmanagerConfig) -> Result<AlertmanagerSink> {
        let endpoint = format!("{}/api/v2/alerts", config.url.trim_end_matches('/'));
        let alerts_url = reqwest::Url::parse(&endpoint)
            .map_err(|e| Error::Invalid { key: "notify.alertmanager.url".into(), reason: e.to_string() })?;
        let client = http_client(&alerts_url, config.timeout.0, None).map_err(|source| Error::HttpClient { channel: "alertmanager".into(), source })?;
        Ok(AlertmanagerSink {
            alerts_url,
            generator_url: config.generator_url.clone(),
            resend_every_ms: config.resend_every.as_ms(),
            client,
            resend: Mutex::new(Resend::default()),
        })
    }

    /// Incidents currently re-posted every `resend_every`, by id.
    pub fn active_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().active.keys().cloned().collect();
        ids.sort();
        ids
    }

    fn lock(&self) -> MutexGuard<'_, Resend> {
        // Poisoning means a panic elsewhere mid-update of a plain map; it is still usable.
        self.resend.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn post(&self, alerts: &[Alert]) -> Result<(), DeliveryError> {
        let body = serde_json::to_vec(alerts).map_err(|e| DeliveryError::Permanent(format!("encoding alerts: {e}")))?;
        let request =
            self.client.post(self.alerts_url.clone()).header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        send(request).await
    }

    /// Records a delivered revision: an active incident's alert is re-posted from now on, an
    /// inactive one's no longer. Revisions older than the one remembered change nothing.
    fn remember(&self, incident: &Incident, alert: Alert) {
        let mut resend = self.lock();
        if resend.active.get(&incident.id).is_some_and(|a| a.revision > incident.revision) {
            return;
        }
        if incident.state.is_active() {
            resend.active.insert(incident.id.clone(), Active { revision: incident.revision, alert });
        } else {
            resend.active.remove(&incident.id);
        }
    }
}

impl Sink for AlertmanagerSink {
    fn deliver<'a>(&'a self, item: &'a OutboxItem) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            let incident = &item.incident;
            let alert = Alert::from_incident(incident, self.generator_url.as_deref());
            let mut alerts = Vec::with_capacity(2);
            // A new severity is a new label set, so to Alertmanager a new alert: resolve the old
            // one now rather than leaving it to expire.
            let previous = self.lock().active.get(&incident.id).map(|a| a.alert.clone());
            if let Some(mut previous) = previous.filter(|p| p.labels != alert.labels) {
                previous.ends_at = Some(incident.updated_at.clone());
                alerts.push(previous);
            }
            alerts.push(alert.clone());
            self.post(&alerts).await?;
            self.remember(incident, alert);
            Ok(())
        })
    }

    fn tick<'a>(&'a self, now_ms: i64) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let alerts: Vec<Alert> = {
                let mut resend = self.lock();
                if resend.active.is_empty() || resend.last_ms.is_some_and(|last| now_ms - last < self.resend_every_ms) {
                    return;
                }
                resend.last_ms = Some(now_ms);
                let mut active: Vec<&Active> = resend.active.values().collect();
                // Oldest first, ties by id: the same request for the same set.
                active.sort_by_key(|a| (&a.alert.starts_at, a.alert.labels.get("incident_id")));
                active.into_iter().map(|a| a.alert.clone()).collect()
            };
            let result = self.post(&alerts).await;
            let mut resend = self.lock();
            match result {
                Ok(()) if resend.failing => {
                    resend.failing = false;
                    tracing::info!(alerts = alerts.len(), "alertmanager: re-posting active alerts works again");
                }
                // Tried again at the next `resend_every`; the changes themselves are retried by
                // the dispatcher, so this only risks Alertmanager expiring an alert early.
                Err(e) if !resend.failing => {
                    resend.failing = true;
                    tracing::warn!(error = %e, alerts = alerts.len(), "alertmanager: re-posting active alerts failed");
                }
                _ => {}
            }
        })
    }

    fn resume(&self, active: &[Arc<Incident>]) {
        for incident in active.iter().filter(|i| i.state.is_active()) {
            self.remember(incident, Alert::from_incident(incident, self.generator_url.as_deref()));
        }
    }
}

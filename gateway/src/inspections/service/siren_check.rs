//! The siren test check: after each siren test window, an incident for every siren mount that
//! did not report `siren_activated` (the window itself is tracked by `siren_test`).

use std::collections::HashMap;
use std::sync::Arc;

use citywatch_edge::wire::{DeviceKind, EventKind};

use super::views::rfc3339;
use super::{Service, SIGNALS_PER_REQUEST};
use crate::incidents::{Change, Scope, Severity, Signal};
use crate::inspections::RULE_SIREN_TEST_SILENT;

impl Service {
    /// After a siren test window: an incident for every siren mount without `siren_activated`
    /// between its start and its end plus the grace period.
    pub(super) async fn check_sirens(&mut self, start: i64, end: i64) {
        let mut sirens: HashMap<String, (String, String)> = HashMap::new();
        for e in self.entries.values().filter(|e| e.item.m.kind == DeviceKind::SirenMount) {
            sirens.insert(e.item.device.clone(), (e.item.site.clone(), e.item.location.clone()));
        }
        self.registry.for_each(|d| {
            if d.kind == DeviceKind::SirenMount {
                sirens.entry(d.id.to_string()).or_insert_with(|| (d.site.to_string(), d.placement().location.clone().unwrap_or_default()));
            }
        });
        let Some(readings) = self.readings.clone() else { return };
        let until = end.saturating_add(self.tracker.as_ref().map_or(0, |t| t.grace_ms()));
        let ids: Vec<String> = sirens.keys().cloned().collect();
        let heard = tokio::task::spawn_blocking(move || {
            let mut silent = Vec::new();
            for id in ids {
                match readings.events(&id, start, until, 10_000) {
                    Ok(events) if events.iter().any(|e| e.event == EventKind::SirenActivated) => {}
                    Ok(_) => silent.push(id),
                    Err(e) => tracing::warn!(device = %id, error = %e, "siren test: events unreadable; counted silent"),
                }
            }
            silent
        })
        .await;
        let Ok(mut silent) = heard else { return };
        silent.sort();
        let window = format!("{}–{}", rfc3339(start), rfc3339(end));
        tracing::info!(sirens = sirens.len(), silent = silent.len(), %window, "siren test window checked");
        let signals: Vec<Signal> = silent
            .iter()
            .filter_map(|id| sirens.get(id).map(|(site, location)| (id, site, location)))
            .map(|(id, site, location)| Signal {
                rule: Arc::from(RULE_SIREN_TEST_SILENT),
                scope: Scope::Device,
                site: Arc::from(site.as_str()),
                device: Arc::from(id.as_str()),
                kind: DeviceKind::SirenMount,
                ts_ms: end,
                change: Change::Open {
                    severity: Severity::Major,
                    metric: None,
                    value: None,
                    threshold: None,
                    summary: format!("Siren {id} ({site}{}{location}) did not report siren_activated during the siren test {window}", if location.is_empty() { "" } else { ", " }),
                    action: None,
                },
                members: Vec::new(),
            })
            .collect();
        let n = signals.len() as u64;
        for chunk in signals.chunks(SIGNALS_PER_REQUEST) {
            if !self.send_committed(chunk.to_vec()).await {
                tracing::error!("siren test: the incident manager did not commit the silent sirens");
                return;
            }
        }
        self.stats.silent_sirens.inc_by(n);
    }

}

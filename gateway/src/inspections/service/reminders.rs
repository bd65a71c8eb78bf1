//! Reminders and overdue maintenance tasks: what fell due since the last check goes to the
//! incident manager as `inspection_due` signals, and is marked sent once committed.

use std::sync::Arc;

use jiff::civil::Date;

use super::{with_store, Service, SIGNALS_PER_REQUEST};
use crate::incidents::{Change, Scope, Severity, Signal};
use crate::inspections::schedule::{self, Due, Task, TaskDue};
use crate::inspections::store::Item;
use crate::inspections::{mask_phone, RULE_INSPECTION_DUE};

impl Service {
    /// Reminders and overdue tasks that fell due, the siren test window, commissioning, and
    /// inventory facts and marks for devices the registry has newly heard of.
    pub async fn tick(&mut self) {
        if self.registry.len() != self.registry_len {
            self.registry_len = self.registry.len();
            for e in self.entries.values() {
                self.sync_registry(&e.item);
            }
            self.mark_inventory();
            self.registry_len = self.registry.len();
        }
        let wall = (self.wall)();
        if let Some((start, end)) = self.tracker.as_mut().and_then(|t| t.step(wall)) {
            self.check_sirens(start, end).await;
        }
        let now = (self.clock)();
        self.check_commissioning(now).await;
        if now < self.next_check {
            return;
        }
        let days = &self.cfg.remind_days;
        let mut next = i64::MAX;
        let mut due: Vec<(String, TaskDue, u32)> = Vec::new();
        for e in self.entries.values() {
            for t in &e.tasks {
                match schedule::due_at(days, t.due_ms, now) {
                    Due::Overdue => {
                        if !e.sent.contains(&(t.task, t.due, 0)) {
                            due.push((e.item.device.clone(), t.clone(), 0));
                        }
                    }
                    Due::Remind(d) => {
                        if !e.sent.contains(&(t.task, t.due, d)) {
                            due.push((e.item.device.clone(), t.clone(), d));
                        }
                        next = next.min(schedule::next_change(days, t.due_ms, now));
                    }
                    Due::NotYet(at) => next = next.min(at),
                }
            }
        }
        for chunk in due.chunks(SIGNALS_PER_REQUEST) {
            let signals: Vec<Signal> = chunk.iter().filter_map(|(device, t, d)| self.due_signal(device, t, *d, now)).collect();
            if !self.send_committed(signals).await {
                // Not committed: nothing is marked; the next check tries again.
                return;
            }
            let marks: Vec<(String, Task, Date, u32)> = chunk.iter().map(|(dev, t, d)| (dev.clone(), t.task, t.due, *d)).collect();
            let to_mark = marks.clone();
            if let Err(e) = with_store(&self.store, move |s| s.mark_notified(&to_mark, now)).await {
                tracing::error!(error = %e, "could not record sent reminders; they may be sent again after a restart");
            }
            for (device, task, date, d) in marks {
                if let Some(e) = self.entries.get_mut(&device) {
                    e.sent.insert((task, date, d));
                    e.item.incident_open = true;
                }
                if d == 0 {
                    self.stats.overdue_opened.inc();
                } else {
                    self.stats.reminders_sent.inc();
                }
            }
        }
        self.next_check = next;
    }

    fn due_signal(&self, device: &str, t: &TaskDue, days_before: u32, now: i64) -> Option<Signal> {
        let e = self.entries.get(device)?;
        let item = &e.item;
        let whom = format!("crew {} ({})", item.crew, mask_phone(&item.phone));
        let change = if days_before == 0 {
            Change::Open {
                severity: Severity::Warning,
                metric: None,
                value: None,
                threshold: None,
                summary: format!("{} of {device} ({}, {}) overdue since {}: {}; {whom}", t.task.as_str(), item.site, item.location, t.due, t.note),
                action: None,
            }
        } else {
            Change::Remind {
                due_ms: t.due_ms,
                days_before,
                summary: format!(
                    "{} of {device} ({}, {}) due on {}, in {days_before} day{}: {}; {whom}",
                    t.task.as_str(),
                    item.site,
                    item.location,
                    t.due,
                    if days_before == 1 { "" } else { "s" },
                    t.note
                ),
            }
        };
        Some(self.signal(item, RULE_INSPECTION_DUE, now, change))
    }

    pub(super) fn signal(&self, item: &Item, rule: &str, now: i64, change: Change) -> Signal {
        Signal {
            rule: Arc::from(rule),
            scope: Scope::Device,
            site: Arc::from(item.site.as_str()),
            device: Arc::from(item.device.as_str()),
            kind: item.m.kind,
            ts_ms: now,
            change,
            members: Vec::new(),
        }
    }

}

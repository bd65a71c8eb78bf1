//! What the crews see: a device's schedule after a completion, and the work orders due within a
//! horizon. Read-only over the service's state.

use citywatch_edge::wire::DeviceKind;
use serde::Serialize;

use super::Service;
use crate::inspections::mask_phone;
use crate::inspections::schedule::{self, Task};

/// One task of a device's schedule.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub task: Task,
    pub due: String,
    pub days_left: i64,
    pub note: String,
}

/// A device's schedule after a completion.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleView {
    pub device: String,
    pub tasks: Vec<TaskView>,
    /// Whether the device's `inspection_due` incident was closed by this completion.
    pub incident_closed: bool,
}

/// One line of the crews' work orders.
#[derive(Debug, Clone, Serialize)]
pub struct WorkOrder {
    pub device: String,
    pub site: String,
    pub kind: DeviceKind,
    pub location: String,
    pub task: Task,
    /// RFC 3339 of local midnight of the due date.
    pub due: String,
    pub days_left: i64,
    pub overdue: bool,
    pub crew: String,
    /// Always masked.
    pub phone: String,
    pub last_inspection: Option<String>,
    pub note: String,
}

/// Work orders due within a horizon.
#[derive(Debug, Clone, Serialize)]
pub struct WorkOrders {
    pub now_ms: i64,
    pub items: Vec<WorkOrder>,
}

/// A filter of work orders.
#[derive(Debug, Clone, Default)]
pub struct WorkOrderQuery {
    pub due_within_days: i64,
    pub site: Option<String>,
    pub overdue_only: bool,
}

impl Service {
    pub(super) fn schedule_view(&self, device: &str, now: i64, incident_closed: bool) -> Option<ScheduleView> {
        let e = self.entries.get(device)?;
        let today = schedule::local_date(now, &self.tz);
        Some(ScheduleView {
            device: device.to_owned(),
            tasks: e
                .tasks
                .iter()
                .map(|t| TaskView { task: t.task, due: rfc3339(t.due_ms), days_left: schedule::days_between(today, t.due), note: t.note.clone() })
                .collect(),
            incident_closed,
        })
    }

    /// The crews' work orders.
    pub fn work_orders(&self, q: &WorkOrderQuery) -> WorkOrders {
        let now = (self.clock)();
        let today = schedule::local_date(now, &self.tz);
        let mut items = Vec::new();
        for e in self.entries.values() {
            if q.site.as_deref().is_some_and(|s| s != e.item.site) {
                continue;
            }
            for t in &e.tasks {
                let days_left = schedule::days_between(today, t.due);
                let overdue = now >= t.due_ms;
                if !overdue && (q.overdue_only || days_left > q.due_within_days) {
                    continue;
                }
                items.push(WorkOrder {
                    device: e.item.device.clone(),
                    site: e.item.site.clone(),
                    kind: e.item.m.kind,
                    location: e.item.location.clone(),
                    task: t.task,
                    due: rfc3339(t.due_ms),
                    days_left,
                    overdue,
                    crew: e.item.crew.clone(),
                    phone: mask_phone(&e.item.phone),
                    last_inspection: e.item.m.last_inspection.map(|d| d.to_string()),
                    note: t.note.clone(),
                });
            }
        }
        items.sort_by(|a, b| (&a.due, &a.device, a.task).cmp(&(&b.due, &b.device, b.task)));
        WorkOrders { now_ms: now, items }
    }

}

/// RFC 3339 in UTC with milliseconds, the API's one time format (kept local: the maintenance
/// side depends on no HTTP code).
pub(super) fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| format!("{t:.3}")).unwrap_or_else(|_| ms.to_string())
}

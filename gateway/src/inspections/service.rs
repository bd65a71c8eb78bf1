//! The maintenance service: one task owning the inventory (in memory and in its store), the
//! sent-reminder marks and the siren test window. It wakes every `check_every`, sends what fell
//! due to the incident manager as rule signals (`inspection_due` reminders and overdue opens,
//! `siren_test_silent` opens), and marks them sent only once the manager has committed them to
//! the durable outbox — so each reaches every push channel once, also across a restart (a crash
//! between that commit and the mark can repeat one reminder; none is lost).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use citywatch_edge::wire::{DeviceKind, EventKind};
use jiff::civil::Date;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::inventory::{parse_inventory, RowError};
use super::schedule::{self, Due, Task, TaskDue};
use super::siren_test::WindowTracker;
use super::store::{merge, Completion, ImportCounts, Item, MaintenanceStore};
use super::{mask_phone, Error, InspectionsConfig, Result, RULE_INSPECTION_DUE, RULE_SIREN_TEST_SILENT};
use crate::incidents::book::Action;
use crate::incidents::manager::{IncidentsHandle, Request};
use crate::incidents::store::IncidentFilter;
use crate::incidents::{Change, IncidentState, Scope, Severity, Signal};
use crate::ingest::Ack;
use crate::registry::Registry;
use crate::store::SqliteStore;

/// The clock of the maintenance side, ms since the epoch.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Signals per request to the incident manager.
const SIGNALS_PER_REQUEST: usize = 1000;
/// How long the manager may take to commit a batch of signals.
const COMMIT_TIMEOUT: StdDuration = StdDuration::from_secs(30);
/// Errors listed in an import answer; the count covers all.
pub const MAX_ERRORS_LISTED: usize = 10_000;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub rows_imported: AtomicU64,
    pub reminders_sent: AtomicU64,
    pub overdue_opened: AtomicU64,
    pub completions: AtomicU64,
    pub silent_sirens: AtomicU64,
    /// Rejected inventory lines by the column (or "header", "csv", "duplicate") at fault.
    pub rows_rejected: Mutex<HashMap<String, u64>>,
}

impl Stats {
    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = write!(
            out,
            "# HELP citywatch_inventory_rows_imported_total Inventory lines imported (created, updated or unchanged).\n\
             # TYPE citywatch_inventory_rows_imported_total counter\ncitywatch_inventory_rows_imported_total {}\n\
             # HELP citywatch_inspection_reminders_total Inspection reminders committed to the outbox.\n\
             # TYPE citywatch_inspection_reminders_total counter\ncitywatch_inspection_reminders_total {}\n\
             # HELP citywatch_inspection_overdue_total Overdue maintenance tasks that opened or raised an incident.\n\
             # TYPE citywatch_inspection_overdue_total counter\ncitywatch_inspection_overdue_total {}\n\
             # HELP citywatch_inspection_completions_total Completions recorded by crews.\n\
             # TYPE citywatch_inspection_completions_total counter\ncitywatch_inspection_completions_total {}\n\
             # HELP citywatch_siren_test_silent_total Siren mounts silent through a siren test window.\n\
             # TYPE citywatch_siren_test_silent_total counter\ncitywatch_siren_test_silent_total {}\n\
             # HELP citywatch_inventory_rows_rejected_total Inventory lines rejected, by the column at fault.\n\
             # TYPE citywatch_inventory_rows_rejected_total counter\n",
            c(&self.rows_imported),
            c(&self.reminders_sent),
            c(&self.overdue_opened),
            c(&self.completions),
            c(&self.silent_sirens),
        );
        if let Ok(map) = self.rows_rejected.lock() {
            let mut reasons: Vec<_> = map.iter().collect();
            reasons.sort();
            for (reason, n) in reasons {
                let _ = writeln!(out, "citywatch_inventory_rows_rejected_total{{reason=\"{reason}\"}} {n}");
            }
        }
    }
}

/// The answer to an import.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// Data lines read (valid and rejected).
    pub rows: usize,
    pub imported: usize,
    #[serde(flatten)]
    pub counts: ImportCounts,
    pub rejected: usize,
    pub errors: Vec<RowError>,
}

/// What a crew reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    Replaced,
}

/// `POST /api/v1/devices/{id}/inspections`.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub device: String,
    pub task: Task,
    pub result: Outcome,
    pub notes: String,
    pub by: String,
}

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

enum Command {
    Import { csv: Vec<u8>, reply: oneshot::Sender<Result<ImportReport>> },
    Complete { request: CompletionRequest, reply: oneshot::Sender<Result<ScheduleView>> },
    WorkOrders { query: WorkOrderQuery, reply: oneshot::Sender<WorkOrders> },
}

/// Cheap handle for the API.
#[derive(Debug, Clone)]
pub struct InspectionsHandle {
    tx: mpsc::Sender<Command>,
    pub stats: Arc<Stats>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Import { .. } => "Import",
            Command::Complete { .. } => "Complete",
            Command::WorkOrders { .. } => "WorkOrders",
        })
    }
}

impl InspectionsHandle {
    pub async fn import(&self, csv: Vec<u8>) -> Result<ImportReport> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Import { csv, reply }).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    pub async fn complete(&self, request: CompletionRequest) -> Result<ScheduleView> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Complete { request, reply }).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    pub async fn work_orders(&self, query: WorkOrderQuery) -> Result<WorkOrders> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::WorkOrders { query, reply }).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }
}

/// One inventoried device with its computed schedule and what was sent for it.
#[derive(Debug)]
struct Entry {
    item: Item,
    tasks: Vec<TaskDue>,
    /// (task, due date, days before; 0 = overdue) already committed.
    sent: HashSet<(Task, Date, u32)>,
}

/// The service's state; [`Service::run`] is its task.
pub struct Service {
    cfg: InspectionsConfig,
    tz: jiff::tz::TimeZone,
    store: Arc<Mutex<MaintenanceStore>>,
    entries: HashMap<String, Entry>,
    registry: Arc<Registry>,
    readings: Option<Arc<SqliteStore>>,
    incidents: IncidentsHandle,
    /// The maintenance clock (wall clock plus the test-only offset).
    clock: Clock,
    /// The wall clock, for the siren test window (device events carry wall-clock times).
    wall: Clock,
    tracker: Option<WindowTracker>,
    next_check: i64,
    registry_len: usize,
    stats: Arc<Stats>,
    commands: mpsc::Receiver<Command>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("devices", &self.entries.len()).finish_non_exhaustive()
    }
}

fn lock(store: &Mutex<MaintenanceStore>) -> std::sync::MutexGuard<'_, MaintenanceStore> {
    // A panic while holding it leaves SQLite consistent (transactions roll back): go on.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on the store off the async threads.
async fn with_store<T: Send + 'static>(store: &Arc<Mutex<MaintenanceStore>>, f: impl FnOnce(&mut MaintenanceStore) -> Result<T> + Send + 'static) -> Result<T> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&mut lock(&store))).await.map_err(|e| Error::Invalid(format!("store task: {e}")))?
}

impl Service {
    /// Opens the store under `dir` and loads the inventory. `readings` is the time series
    /// (for the siren test: which sirens reported `siren_activated`).
    pub fn open(
        cfg: InspectionsConfig,
        dir: &std::path::Path,
        registry: Arc<Registry>,
        readings: Option<Arc<SqliteStore>>,
        incidents: IncidentsHandle,
    ) -> Result<(Service, InspectionsHandle)> {
        let store = MaintenanceStore::open(dir)?;
        let offset = cfg.clock_offset.as_ms();
        let clock: Clock = Arc::new(move || crate::ingest::now_ms() + offset);
        let wall: Clock = Arc::new(crate::ingest::now_ms);
        Service::with_clock(cfg, store, registry, readings, incidents, clock, wall)
    }

    /// As [`Service::open`], with a given store and clocks (tests).
    pub fn with_clock(
        cfg: InspectionsConfig,
        store: MaintenanceStore,
        registry: Arc<Registry>,
        readings: Option<Arc<SqliteStore>>,
        incidents: IncidentsHandle,
        clock: Clock,
        wall: Clock,
    ) -> Result<(Service, InspectionsHandle)> {
        let tz = cfg.time_zone();
        let items = store.load()?;
        let mut sent: HashMap<String, HashSet<(Task, Date, u32)>> = HashMap::new();
        for (device, task, due, days) in store.notified()? {
            sent.entry(device).or_default().insert((task, due, days));
        }
        let entries = items
            .into_iter()
            .map(|item| {
                let tasks = schedule::tasks(&cfg, &item.m, &tz);
                let sent = sent.remove(&item.device).unwrap_or_default();
                (item.device.clone(), Entry { item, tasks, sent })
            })
            .collect();
        let tracker = if cfg.siren_test.enabled { Some(WindowTracker::new(&cfg.siren_test).map_err(Error::Invalid)?) } else { None };
        let (tx, rx) = mpsc::channel(64);
        let stats = Arc::new(Stats::default());
        let service = Service {
            cfg,
            tz,
            store: Arc::new(Mutex::new(store)),
            entries,
            registry,
            readings,
            incidents,
            clock,
            wall,
            tracker,
            next_check: i64::MIN,
            registry_len: usize::MAX,
            stats: Arc::clone(&stats),
            commands: rx,
        };
        Ok((service, InspectionsHandle { tx, stats }))
    }

    /// Devices in the inventory.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Runs until `stop` turns true or every handle is gone.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.cfg.check_every.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(c) => self.handle(c).await,
                    None => break,
                },
                _ = tick.tick() => self.tick().await,
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Import { csv, reply } => {
                let _ = reply.send(self.import(csv).await);
            }
            Command::Complete { request, reply } => {
                let _ = reply.send(self.complete(request).await);
            }
            Command::WorkOrders { query, reply } => {
                let _ = reply.send(self.work_orders(&query));
            }
        }
    }

    /// Parses, validates and stores an inventory file in one transaction.
    pub async fn import(&mut self, csv: Vec<u8>) -> Result<ImportReport> {
        let (rows, mut errors) = tokio::task::spawn_blocking(move || parse_inventory(&csv))
            .await
            .map_err(|e| Error::Invalid(format!("parse task: {e}")))?;
        let mut counts = ImportCounts::default();
        let mut changed: Vec<Item> = Vec::new();
        for row in &rows {
            let old = self.entries.get(&row.device).map(|e| &e.item);
            let item = merge(row, old);
            match old {
                None => counts.created += 1,
                Some(o) if *o == item => counts.unchanged += 1,
                Some(_) => counts.updated += 1,
            }
            if old != Some(&item) {
                changed.push(item);
            }
        }
        let to_write = changed.clone();
        with_store(&self.store, move |s| s.upsert(&to_write.iter().collect::<Vec<_>>())).await?;
        for item in changed {
            let tasks = schedule::tasks(&self.cfg, &item.m, &self.tz);
            self.sync_registry(&item);
            match self.entries.get_mut(&item.device) {
                Some(e) => {
                    e.item = item;
                    e.tasks = tasks;
                }
                None => {
                    self.entries.insert(item.device.clone(), Entry { item, tasks, sent: HashSet::new() });
                }
            }
        }
        self.next_check = i64::MIN;
        self.stats.rows_imported.fetch_add(rows.len() as u64, Ordering::Relaxed);
        if let Ok(mut map) = self.stats.rows_rejected.lock() {
            for e in &errors {
                *map.entry(reject_reason(&e.reason).to_owned()).or_default() += 1;
            }
        }
        let rejected = errors.len();
        errors.truncate(MAX_ERRORS_LISTED);
        tracing::info!(imported = rows.len(), created = counts.created, updated = counts.updated, rejected, "inventory imported");
        Ok(ImportReport { rows: rows.len() + rejected, imported: rows.len(), counts, rejected, errors })
    }

    /// Records a crew's completion, resets the schedule, and clears and closes the device's
    /// `inspection_due` incident when nothing is overdue any more.
    pub async fn complete(&mut self, r: CompletionRequest) -> Result<ScheduleView> {
        let now = (self.clock)();
        let today = schedule::local_date(now, &self.tz);
        let entry = self.entries.get(&r.device).ok_or_else(|| Error::UnknownDevice(r.device.clone()))?;
        if !schedule::applies(entry.item.m.kind, r.task) {
            return Err(Error::Invalid(format!("task: {} is not a task of a {}", r.task.as_str(), entry.item.m.kind.as_str())));
        }
        if r.by.trim().is_empty() {
            return Err(Error::Invalid("by: required (who did the work)".into()));
        }
        let mut item = entry.item.clone();
        if r.result != Outcome::Fail {
            schedule::complete(&mut item.m, r.task, r.result == Outcome::Replaced, today);
        }
        let tasks = schedule::tasks(&self.cfg, &item.m, &self.tz);
        let overdue = tasks.iter().any(|t| now >= t.due_ms);
        let close = item.incident_open && !overdue;
        if close {
            item.incident_open = false;
        }
        let completion = Completion {
            device: r.device.clone(),
            task: r.task,
            result: match r.result {
                Outcome::Pass => "pass",
                Outcome::Fail => "fail",
                Outcome::Replaced => "replaced",
            }
            .into(),
            notes: r.notes.clone(),
            by: r.by.clone(),
            at_ms: now,
        };
        let to_write = item.clone();
        with_store(&self.store, move |s| {
            s.add_completion(&completion)?;
            s.upsert(&[&to_write])
        })
        .await?;
        self.stats.completions.fetch_add(1, Ordering::Relaxed);
        let mut incident_closed = false;
        if close {
            let summary = format!("{} of {} recorded by {}: {}", r.task.as_str(), r.device, r.by, completion_word(r.result));
            let signal = self.signal(&item, RULE_INSPECTION_DUE, now, Change::Clear { value: None, summary: summary.clone() });
            if self.send_committed(vec![signal]).await {
                incident_closed = self.close_incident(&item, &r.by, summary).await;
            }
        }
        self.sync_registry(&item);
        if let Some(e) = self.entries.get_mut(&r.device) {
            e.item = item;
            e.tasks = tasks;
        }
        self.next_check = i64::MIN;
        let view = self.schedule_view(&r.device, now, incident_closed);
        view.ok_or_else(|| Error::UnknownDevice(r.device.clone()))
    }

    /// Finds the device's cleared `inspection_due` incident and closes it in the crew's name.
    async fn close_incident(&self, item: &Item, by: &str, note: String) -> bool {
        let filter = IncidentFilter {
            states: vec![IncidentState::Cleared],
            rule: Some(RULE_INSPECTION_DUE.into()),
            site: Some(item.site.clone()),
            device: Some(item.device.clone()),
            limit: 10,
        };
        let store = Arc::clone(&self.incidents.store);
        let found = tokio::task::spawn_blocking(move || store.list(&filter)).await;
        let Ok(Ok(list)) = found else {
            tracing::warn!(device = %item.device, "could not look up the inspection incident to close it");
            return false;
        };
        let mut closed = false;
        for inc in list {
            match self.incidents.transition(inc.id.clone(), Action::Close, by.to_owned(), Some(note.clone()), None).await {
                Ok(Ok(_)) => closed = true,
                Ok(Err(e)) => tracing::warn!(incident = %inc.id, error = %e, "inspection incident not closed"),
                Err(_) => return closed,
            }
        }
        closed
    }

    fn schedule_view(&self, device: &str, now: i64, incident_closed: bool) -> Option<ScheduleView> {
        let e = self.entries.get(device)?;
        let today = schedule::local_date(now, &self.tz);
        Some(ScheduleView {
            device: device.to_owned(),
            tasks: e
                .tasks
                .iter()
                .map(|t| TaskView { task: t.task, due: crate::api::rfc3339(t.due_ms), days_left: schedule::days_between(today, t.due), note: t.note.clone() })
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
                    due: crate::api::rfc3339(t.due_ms),
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

    /// Reminders and overdue tasks that fell due, the siren test window, and inventory facts
    /// for devices the registry has newly heard of.
    pub async fn tick(&mut self) {
        if self.registry.len() != self.registry_len {
            self.registry_len = self.registry.len();
            for e in self.entries.values() {
                self.sync_registry(&e.item);
            }
        }
        let wall = (self.wall)();
        if let Some((start, end)) = self.tracker.as_mut().and_then(|t| t.step(wall)) {
            self.check_sirens(start, end).await;
        }
        let now = (self.clock)();
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
                    self.stats.overdue_opened.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.stats.reminders_sent.fetch_add(1, Ordering::Relaxed);
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

    fn signal(&self, item: &Item, rule: &str, now: i64, change: Change) -> Signal {
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

    /// Sends signals to the incident manager and waits until they are committed.
    async fn send_committed(&self, signals: Vec<Signal>) -> bool {
        if signals.is_empty() {
            return true;
        }
        let (done, committed) = oneshot::channel();
        let ack = Ack::new(move || {
            let _ = done.send(());
        });
        let request = Request::Signals { signals, ack: Some(ack), received_ms: (self.wall)() };
        if self.incidents.sender().send(request).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(COMMIT_TIMEOUT, committed).await, Ok(Ok(())))
    }

    /// After a siren test window: an incident for every siren mount without `siren_activated`
    /// between its start and its end plus the grace period.
    async fn check_sirens(&mut self, start: i64, end: i64) {
        let mut sirens: HashMap<String, (String, String)> = HashMap::new();
        for e in self.entries.values().filter(|e| e.item.m.kind == DeviceKind::SirenMount) {
            sirens.insert(e.item.device.clone(), (e.item.site.clone(), e.item.location.clone()));
        }
        self.registry.for_each(|d| {
            if d.kind == DeviceKind::SirenMount {
                sirens.entry(d.id.clone()).or_insert_with(|| (d.site.clone(), d.location.clone().unwrap_or_default()));
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
        let window = format!("{}–{}", crate::api::rfc3339(start), crate::api::rfc3339(end));
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
        self.stats.silent_sirens.fetch_add(n, Ordering::Relaxed);
    }

    /// Puts the inventory's facts on the registry's device, if the gateway has heard of it.
    fn sync_registry(&self, item: &Item) {
        if !self.registry.contains(&item.device) {
            return;
        }
        let make = || crate::registry::Device::new(&item.device, &item.site, item.m.kind, (self.wall)());
        self.registry.upsert(&item.device, make, |_, d| {
            d.location = Some(item.location.clone());
            d.lat = item.position.map(|p| p.lat);
            d.lon = item.position.map(|p| p.lon);
            d.install_date = Some(item.m.install_date.to_string());
            d.crew = Some(item.crew.clone());
            d.phone = Some(mask_phone(&item.phone));
        });
    }
}

fn completion_word(o: Outcome) -> &'static str {
    match o {
        Outcome::Pass => "pass",
        Outcome::Fail => "fail",
        Outcome::Replaced => "replaced",
    }
}

/// The metric label of a rejected line: the column named first in its reason.
fn reject_reason(reason: &str) -> &'static str {
    const LABELS: [&str; 13] = [
        "site", "device", "kind", "location", "install_date", "last_inspection", "inspection_interval_months", "crew", "phone", "premises", "lat", "lon",
        "header",
    ];
    if reason.contains("already on line") {
        return "duplicate";
    }
    let head = reason.split(':').next().unwrap_or("");
    LABELS.iter().find(|l| **l == head).copied().unwrap_or("csv")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicI64;

    use super::*;
    use crate::incidents::book::Book;
    use crate::incidents::manager::Manager;
    use crate::incidents::store::IncidentStore;
    use crate::incidents::IncidentsConfig;

    const DAY: i64 = schedule::DAY_MS;

    fn incidents(dir: &std::path::Path) -> IncidentsHandle {
        let store = Arc::new(IncidentStore::open(dir).expect("incident store"));
        let book = Book::new(IncidentsConfig::default(), Vec::new(), Vec::new(), crate::ingest::now_ms());
        let (manager, handle, requests) = Manager::new(book, store, Vec::new(), None, 365 * DAY);
        let (_delivered_tx, delivered) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _keep = _delivered_tx;
            manager.run(requests, delivered).await
        });
        handle
    }

    fn service(dir: &std::path::Path, handle: &IncidentsHandle, clock: &Arc<AtomicI64>) -> (Service, InspectionsHandle) {
        let c = Arc::clone(clock);
        let cfg = InspectionsConfig { siren_test: super::super::siren_test::SirenTestConfig { enabled: false, ..Default::default() }, ..Default::default() };
        let store = MaintenanceStore::open(dir).expect("store");
        let registry = Arc::new(Registry::new());
        Service::with_clock(cfg, store, registry, None, handle.clone(), Arc::new(move || c.load(Ordering::SeqCst)), Arc::new(crate::ingest::now_ms))
            .expect("service")
    }

    /// The device's inspection_due incident: (revision, severity, state, last history action).
    fn incident(handle: &IncidentsHandle) -> Option<(u32, Severity, IncidentState, String)> {
        let list = handle.store.list(&IncidentFilter { limit: 10, ..Default::default() }).expect("list");
        assert!(list.len() <= 1, "{list:?}");
        list.first().map(|i| (i.revision, i.severity, i.state, i.history.last().map(|h| h.action.clone()).unwrap_or_default()))
    }

    #[tokio::test]
    async fn reminders_fall_on_their_days_once_even_across_a_restart_and_a_completion_closes_the_incident() {
        let dir = tempfile::tempdir().expect("tmp");
        let handle = incidents(dir.path());
        // Calibrated 2025-12-20, due 2026-12-20 00:00 Shanghai.
        let due = schedule::midnight_ms(jiff::civil::date(2026, 12, 20), &jiff::tz::TimeZone::get("Asia/Shanghai").expect("tz"));
        let clock = Arc::new(AtomicI64::new(due - 31 * DAY));
        let (mut s, _h) = service(dir.path(), &handle, &clock);
        let csv = "site,device,kind,location,install_date,last_inspection,inspection_interval_months,crew,phone\n\
                   xh,g-1,gas_detector,Kitchen,2025-06-01,2025-12-20,,crew-7,13812345678\n";
        let report = s.import(csv.as_bytes().to_vec()).await.expect("import");
        assert_eq!((report.imported, report.rejected), (1, 0));
        s.tick().await;
        assert_eq!(incident(&handle), None, "31 days before: nothing");
        clock.store(due - 30 * DAY, Ordering::SeqCst);
        s.tick().await;
        assert_eq!(incident(&handle), Some((1, Severity::Info, IncidentState::Open, "open".into())), "the 30-day reminder");
        clock.store(due - 8 * DAY, Ordering::SeqCst);
        s.tick().await;
        assert_eq!(incident(&handle).map(|i| i.0), Some(1), "between reminders: nothing");
        clock.store(due - 7 * DAY, Ordering::SeqCst);
        s.tick().await;
        assert_eq!(incident(&handle), Some((2, Severity::Info, IncidentState::Open, "reminder".into())), "the 7-day reminder");

        // Restart: the marks are in the store; the 7-day reminder is not sent again.
        drop(s);
        let (mut s, _h) = service(dir.path(), &handle, &clock);
        clock.store(due - 6 * DAY, Ordering::SeqCst);
        s.tick().await;
        assert_eq!(incident(&handle).map(|i| i.0), Some(2));
        clock.store(due - DAY, Ordering::SeqCst);
        s.tick().await;
        assert_eq!(incident(&handle).map(|i| (i.0, i.3)), Some((3, "reminder".into())), "the 1-day reminder");
        clock.store(due, Ordering::SeqCst);
        s.tick().await;
        assert_eq!(incident(&handle), Some((4, Severity::Warning, IncidentState::Open, "severity".into())), "overdue");
        let orders = s.work_orders(&WorkOrderQuery { due_within_days: 0, site: None, overdue_only: true });
        assert_eq!(orders.items.len(), 1);
        assert_eq!(orders.items[0].phone, "138****5678");

        // A failed inspection resets nothing; a pass closes the incident.
        let failed = s
            .complete(CompletionRequest { device: "g-1".into(), task: Task::Inspection, result: Outcome::Fail, notes: String::new(), by: "crew-7".into() })
            .await
            .expect("fail recorded");
        assert!(!failed.incident_closed);
        let view = s
            .complete(CompletionRequest { device: "g-1".into(), task: Task::Calibration, result: Outcome::Pass, notes: "ok".into(), by: "crew-7".into() })
            .await
            .expect("pass");
        assert!(view.incident_closed);
        assert_eq!(view.tasks.iter().find(|t| t.task == Task::Calibration).map(|t| t.due.as_str()), Some("2027-12-19T16:00:00.000Z"));
        let (_, _, state, action) = incident(&handle).expect("incident");
        assert_eq!((state, action.as_str()), (IncidentState::Closed, "closed"));
        assert!(matches!(
            s.complete(CompletionRequest { device: "g-1".into(), task: Task::Cleaning, result: Outcome::Pass, notes: String::new(), by: "x".into() }).await,
            Err(Error::Invalid(_))
        ));
    }
}

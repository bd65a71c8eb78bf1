//! The maintenance service: one task owning the inventory (in memory and in its store), the
//! sent-reminder marks and the siren test window. It wakes every `check_every`, sends what fell
//! due to the incident manager as rule signals (`inspection_due` reminders and overdue opens,
//! `siren_test_silent` opens), and marks them sent only once the manager has committed them to
//! the durable outbox — so each reaches every push channel once, also across a restart (a crash
//! between that commit and the mark can repeat one reminder; none is lost).
//!
//! Here: the actor (its handle, commands, imports and completions). Reminders and overdue tasks
//! are in `reminders`, the siren test check in `siren_check`, the crews' views in `views`, the
//! metrics in `stats`.

mod commissioning;
mod reminders;
mod siren_check;
mod stats;
#[cfg(test)]
mod tests;
mod views;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use jiff::civil::Date;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

pub use stats::Stats;
pub use views::{ScheduleView, TaskView, WorkOrder, WorkOrderQuery, WorkOrders};

use super::inventory::{parse_inventory, RowError};
use super::schedule::{self, Task, TaskDue};
use super::siren_test::WindowTracker;
use super::store::{merge, Commissioning, Completion, ImportCounts, Item, MaintenanceStore};
use super::{Error, InspectionsConfig, Result, RULE_INSPECTION_DUE};
use crate::incidents::book::Action;
use crate::incidents::manager::IncidentsHandle;
use crate::incidents::store::IncidentFilter;
use crate::incidents::{Change, IncidentState, Signal};
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
    /// Inventory devices not heard yet: (grace counted from, ms; where they stand).
    commissioning: HashMap<String, (i64, Commissioning)>,
    registry: Arc<Registry>,
    readings: Option<Arc<SqliteStore>>,
    incidents: IncidentsHandle,
    /// The maintenance clock (the wall clock; tests inject their own through [`Service::with_clock`]).
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
        let wall: Clock = Arc::new(crate::ingest::now_ms);
        Service::with_clock(cfg, store, registry, readings, incidents, Arc::clone(&wall), wall)
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
        let commissioning: HashMap<String, (i64, Commissioning)> =
            store.commissioning()?.into_iter().filter(|(_, _, c)| *c != Commissioning::Reported).map(|(d, since, c)| (d, (since, c))).collect();
        let started: HashSet<String> = store.commissioning()?.into_iter().map(|(d, _, _)| d).collect();
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
        let mut service = Service {
            cfg,
            tz,
            store: Arc::new(Mutex::new(store)),
            entries,
            commissioning,
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
        // Inventories imported before commissioning was tracked start their grace now.
        let now = (service.clock)();
        let missing: Vec<(String, i64)> = service
            .entries
            .values()
            .filter(|e| !started.contains(&e.item.device))
            .map(|e| (e.item.device.clone(), service.commissioning_since(&e.item, now)))
            .collect();
        lock(&service.store).start_commissioning(&missing)?;
        for (device, since) in missing {
            service.commissioning.insert(device, (since, Commissioning::Waiting));
        }
        // Every inventory device is in the registry from the start, heard or not.
        for e in service.entries.values() {
            service.sync_registry(&e.item);
        }
        service.mark_inventory();
        service.registry_len = service.registry.len();
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
        let now = (self.clock)();
        let mut counts = ImportCounts::default();
        let mut changed: Vec<Item> = Vec::new();
        let mut started: Vec<(String, i64)> = Vec::new();
        for row in &rows {
            let old = self.entries.get(&row.device).map(|e| &e.item);
            let item = merge(row, old);
            match old {
                None => {
                    counts.created += 1;
                    started.push((item.device.clone(), self.commissioning_since(&item, now)));
                }
                Some(o) if *o == item => counts.unchanged += 1,
                Some(_) => counts.updated += 1,
            }
            if old != Some(&item) {
                changed.push(item);
            }
        }
        let to_write = changed.clone();
        let to_start = started.clone();
        with_store(&self.store, move |s| {
            s.upsert(&to_write.iter().collect::<Vec<_>>())?;
            s.start_commissioning(&to_start)
        })
        .await?;
        for (device, since) in started {
            self.commissioning.entry(device).or_insert((since, Commissioning::Waiting));
        }
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
        self.mark_inventory();
        self.registry_len = self.registry.len();
        self.next_check = i64::MIN;
        self.stats.rows_imported.inc_by(rows.len() as u64);
        for e in &errors {
            self.stats.reject(reject_reason(&e.reason));
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
        self.stats.completions.inc();
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
            parent: None,
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

    /// Sends signals to the incident manager and waits until they are committed.
    async fn send_committed(&self, signals: Vec<Signal>) -> bool {
        if signals.is_empty() {
            return true;
        }
        let (done, committed) = oneshot::channel();
        let ack = Ack::new(move || {
            let _ = done.send(());
        });
        if self.incidents.raise(signals, Some(ack), (self.wall)()).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(COMMIT_TIMEOUT, committed).await, Ok(Ok(())))
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


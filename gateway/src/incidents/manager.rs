//! The incident manager: the one task that owns the [`Book`] and the incident store. It takes
//! rule signals from the decode stage, operator actions from the API and delivery outcomes from
//! the push channels; commits each step in one transaction (group commit: whatever arrived
//! meanwhile rides along); only then acknowledges the QoS 1 messages behind the signals, hands
//! the new outbox items to every channel, sends device commands and feeds the live SSE stream.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};

use super::book::{Action, Book, BookStats, Command, TransitionError};
use crate::model::{Incident, OutboxItem, Release, Signal};
use super::silence::{Silence, SilenceConfig};
use super::store::{Commit, IncidentStore};
use crate::ingest::{now_ms, Ack};
use crate::metrics::{Histogram, LATENCY_BOUNDS_US};
use crate::model::{Outcome, PublishFn};

/// How often timers run.
pub const TICK: Duration = Duration::from_secs(1);
/// Coalesced updates (repeat counts, last values) are persisted this often.
pub const PERSIST_EVERY_TICKS: u64 = 10;
/// Requests buffered ahead of the manager.
pub const QUEUE: usize = 4096;

/// What the manager is asked to do: its protocol, private to this module; callers use the
/// methods of [`IncidentsHandle`].
#[derive(Debug)]
pub(crate) enum Request {
    /// Signals from one decode batch; `ack` fires once they are committed. `received_ms`:
    /// when the batch's first message arrived (for the path latency histogram).
    Signals { signals: Vec<Signal>, ack: Option<Ack>, received_ms: i64 },
    /// A device acknowledged a command.
    CommandAck { device: String, id: String },
    Transition {
        id: String,
        action: Action,
        actor: String,
        note: Option<String>,
        crew: Option<String>,
        reply: oneshot::Sender<Result<Incident, TransitionError>>,
    },
    AddSilence { config: Box<SilenceConfig>, reply: oneshot::Sender<Result<SilenceConfig, String>> },
    RemoveSilence { id: String, reply: oneshot::Sender<bool> },
    Silences { reply: oneshot::Sender<Vec<SilenceConfig>> },
    /// Commit what is pending and stop.
    Shutdown,
}

/// The manager's queue of requests, opaque: handed from [`Manager::new`] to [`Manager::run`].
#[derive(Debug)]
pub struct Requests(mpsc::Receiver<Request>);

/// One committed incident change, for the live stream.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    pub seq: i64,
    pub body: Arc<str>,
}

/// Cheap handle for the API and the decode stage.
#[derive(Debug, Clone)]
pub struct IncidentsHandle {
    tx: mpsc::Sender<Request>,
    pub store: Arc<IncidentStore>,
    pub events: broadcast::Sender<LiveEvent>,
    pub stats: Arc<Mutex<BookStats>>,
    pub timing: Arc<Timing>,
}

/// What each step of the incident path costs.
#[derive(Debug)]
pub struct Timing {
    /// One incident-store transaction (fsync included).
    pub commit: Histogram,
    /// From the arrival of the message that caused a signal to its incident change committed.
    pub message_to_commit: Histogram,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { commit: Histogram::new(LATENCY_BOUNDS_US), message_to_commit: Histogram::new(LATENCY_BOUNDS_US) }
    }
}

impl Timing {
    pub fn render(&self, out: &mut String) {
        self.commit.render("citywatch_incident_commit_seconds", "Incident store transactions (fsync included).", out);
        self.message_to_commit.render(
            "citywatch_incident_path_seconds",
            "From the arrival of a message that changed an incident to that change committed (before push).",
            out,
        );
    }
}

/// The manager is gone (shutting down).
pub use crate::model::Stopped;

impl IncidentsHandle {
    /// Signals from one batch (decode, inspections); `ack` fires once they are committed.
    /// `received_ms`: when the first message behind them arrived (path latency histogram).
    pub async fn raise(&self, signals: Vec<Signal>, ack: Option<Ack>, received_ms: i64) -> Result<(), Stopped> {
        self.tx.send(Request::Signals { signals, ack, received_ms }).await.map_err(|_| Stopped)
    }

    /// A device acknowledged the command `id`.
    pub async fn command_ack(&self, device: String, id: String) -> Result<(), Stopped> {
        self.tx.send(Request::CommandAck { device, id }).await.map_err(|_| Stopped)
    }

    /// Commits what is pending and stops the manager (after the requests queued before it).
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Request::Shutdown).await;
    }

    pub async fn transition(&self, id: String, action: Action, actor: String, note: Option<String>, crew: Option<String>) -> Result<Result<Incident, TransitionError>, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request::Transition { id, action, actor, note, crew, reply }).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    pub async fn add_silence(&self, config: SilenceConfig) -> Result<Result<SilenceConfig, String>, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request::AddSilence { config: Box::new(config), reply }).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    pub async fn remove_silence(&self, id: String) -> Result<bool, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request::RemoveSilence { id, reply }).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    pub async fn silences(&self) -> Result<Vec<SilenceConfig>, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request::Silences { reply }).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    pub fn stats(&self) -> BookStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The decode stage hands its signals to the manager through this.
impl crate::decode::SignalSink for IncidentsHandle {
    fn signals(&self, signals: Vec<Signal>, ack: Option<Ack>, received_ms: i64) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>> {
        Box::pin(self.raise(signals, ack, received_ms))
    }
    fn command_ack(&self, device: String, id: String) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>> {
        Box::pin(IncidentsHandle::command_ack(self, device, id))
    }
}

/// The manager task's state.
pub struct Manager {
    book: Book,
    store: Arc<IncidentStore>,
    channels: Vec<(Arc<str>, mpsc::UnboundedSender<OutboxItem>)>,
    events: broadcast::Sender<LiveEvent>,
    publish: Option<PublishFn>,
    stats: Arc<Mutex<BookStats>>,
    retention_ms: i64,
    /// To the decode stage's rule engine.
    releases: Option<mpsc::UnboundedSender<Release>>,
    timing: Arc<Timing>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").field("channels", &self.channels.len()).finish_non_exhaustive()
    }
}

impl Manager {
    /// A manager and its handle. `channels` are the push channels' names and their queues.
    pub fn new(
        book: Book,
        store: Arc<IncidentStore>,
        channels: Vec<(Arc<str>, mpsc::UnboundedSender<OutboxItem>)>,
        publish: Option<PublishFn>,
        retention_ms: i64,
    ) -> (Manager, IncidentsHandle, Requests) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (events, _) = broadcast::channel(1024);
        let stats = Arc::new(Mutex::new(BookStats::default()));
        let timing = Arc::new(Timing::default());
        let handle = IncidentsHandle { tx, store: Arc::clone(&store), events: events.clone(), stats: Arc::clone(&stats), timing: Arc::clone(&timing) };
        (Manager { book, store, channels, events, publish, stats, retention_ms, releases: None, timing }, handle, Requests(rx))
    }

    /// Where to tell the rule engine about incidents operators ended.
    pub fn with_releases(mut self, releases: mpsc::UnboundedSender<Release>) -> Self {
        self.releases = Some(releases);
        self
    }

    /// Runs until [`IncidentsHandle::shutdown`] or until every handle is gone.
    pub async fn run(mut self, Requests(mut requests): Requests, mut delivered: mpsc::UnboundedReceiver<(Arc<str>, i64, Outcome)>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        let mut acks: Vec<Ack> = Vec::new();
        let mut replies: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
        let mut marks: Vec<(Arc<str>, i64, bool, Option<&'static str>)> = Vec::new();
        let mut stopping = false;
        let mut earliest: Option<i64> = None;
        loop {
            let mut commit_marks = false;
            tokio::select! {
                request = requests.recv() => {
                    let Some(request) = request else { break };
                    stopping |= self.handle(request, &mut acks, &mut replies, &mut earliest);
                    // Group commit: take whatever else is already waiting.
                    while let Ok(request) = requests.try_recv() {
                        stopping |= self.handle(request, &mut acks, &mut replies, &mut earliest);
                        if acks.len() + replies.len() >= 512 {
                            break;
                        }
                    }
                }
                Some((channel, seq, outcome)) = delivered.recv() => {
                    marks.push(mark(channel, seq, outcome));
                    while let Ok((channel, seq, outcome)) = delivered.try_recv() {
                        marks.push(mark(channel, seq, outcome));
                    }
                }
                _ = tick.tick() => {
                    ticks += 1;
                    let now = now_ms();
                    self.book.tick(now, ticks.is_multiple_of(PERSIST_EVERY_TICKS));
                    commit_marks = true;
                    if ticks.is_multiple_of(3600) {
                        self.prune(now).await;
                    }
                }
            }
            let (mut commit, commands) = self.book.take();
            if commit_marks || stopping || !commit.is_empty() {
                commit.deliveries = std::mem::take(&mut marks);
            }
            if !commit.is_empty() {
                let changed = !commit.outbox.is_empty();
                let started = std::time::Instant::now();
                let result = self.commit(commit).await;
                self.timing.commit.observe_us(started.elapsed().as_micros() as u64);
                if let (Some(t0), true, true) = (earliest, changed, result.is_ok()) {
                    self.timing.message_to_commit.observe_us((now_ms() - t0).max(0) as u64 * 1000);
                }
                if let Err(e) = result {
                    // Nothing is acknowledged: the broker redelivers, operators get an error.
                    tracing::error!(error = %e, "incident commit failed; the triggering messages stay unacknowledged");
                    acks.clear();
                    replies.clear();
                    continue;
                }
            }
            if let Some(tx) = &self.releases {
                for r in self.book.take_released() {
                    let _ = tx.send(r);
                }
            }
            earliest = None;
            acks.drain(..).for_each(Ack::done);
            replies.drain(..).for_each(|r| r());
            self.send_commands(commands).await;
            if let Ok(mut s) = self.stats.lock() {
                *s = self.book.stats.clone();
            }
            if stopping {
                break;
            }
        }
        tracing::info!("incident manager stopped; pending changes committed");
    }

    /// Applies one request; true when it asks to stop.
    fn handle(&mut self, request: Request, acks: &mut Vec<Ack>, replies: &mut Vec<Box<dyn FnOnce() + Send>>, earliest: &mut Option<i64>) -> bool {
        let now = now_ms();
        match request {
            Request::Signals { signals, ack, received_ms } => {
                *earliest = Some(earliest.map_or(received_ms, |e| e.min(received_ms)));
                for s in signals {
                    self.book.apply(s, now);
                }
                acks.extend(ack);
            }
            Request::CommandAck { device, id } => self.book.command_acked(&device, &id, now),
            Request::Transition { id, action, actor, note, crew, reply } => {
                let result = self.book.transition(&id, action, &actor, note, crew, now);
                // The reply waits for the commit, so a 200 means it is on disk.
                replies.push(Box::new(move || {
                    let _ = reply.send(result);
                }));
            }
            Request::AddSilence { config, reply } => {
                let mut config = *config;
                config.id.get_or_insert_with(|| format!("sil-{now:x}-{:04x}", rand::random::<u16>()));
                let result = Silence::new(config.clone()).and_then(|s| {
                    let body = serde_json::to_string(&config).map_err(|e| e.to_string())?;
                    self.store.put_silence(s.id(), &body, now).map_err(|e| e.to_string())?;
                    self.book.add_silence(s);
                    Ok(config)
                });
                let _ = reply.send(result);
            }
            Request::RemoveSilence { id, reply } => {
                let stored = self.store.delete_silence(&id).unwrap_or(false);
                let _ = reply.send(self.book.remove_silence(&id) || stored);
            }
            Request::Silences { reply } => {
                let _ = reply.send(self.book.silences().iter().map(|s| s.config.clone()).collect());
            }
            Request::Shutdown => return true,
        }
        false
    }

    async fn commit(&mut self, commit: Commit) -> Result<(), super::store::Error> {
        let store = Arc::clone(&self.store);
        let names: Vec<Arc<str>> = self.channels.iter().map(|(n, _)| Arc::clone(n)).collect();
        let created = tokio::task::spawn_blocking(move || store.commit(&commit, &names, now_ms()))
            .await
            .map_err(|e| super::store::Error::Io(format!("commit task: {e}")))??;
        for super::store::Committed { seq, incident, body } in created {
            for (name, tx) in &self.channels {
                // A closed queue means the channel's dispatcher stopped (shutdown); the item
                // stays pending in the outbox and is sent after the next start.
                let _ = tx.send(OutboxItem { seq, channel: Arc::clone(name), incident: Arc::clone(&incident), body: Arc::clone(&body) });
            }
            let _ = self.events.send(LiveEvent { seq, body });
        }
        Ok(())
    }

    async fn send_commands(&self, commands: Vec<Command>) {
        for c in commands {
            let topic = format!("citywatch/v1/{}/{}/cmd", c.site, c.device);
            let body = serde_json::json!({ "id": c.id, "cmd": c.cmd.as_str() }).to_string();
            match &self.publish {
                Some(publish) => {
                    if let Err(e) = publish(topic.clone(), body.into_bytes(), false).await {
                        tracing::error!(%topic, error = %e, "device command not sent");
                    }
                }
                None => tracing::warn!(%topic, "no MQTT publisher: device command not sent"),
            }
        }
    }

    async fn prune(&self, now: i64) {
        let store = Arc::clone(&self.store);
        let before = now - self.retention_ms;
        match tokio::task::spawn_blocking(move || store.prune(before)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "closed incidents past retention removed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "incident retention failed"),
            _ => {}
        }
    }
}

fn mark(channel: Arc<str>, seq: i64, outcome: Outcome) -> (Arc<str>, i64, bool, Option<&'static str>) {
    match outcome {
        Outcome::Delivered => (channel, seq, true, None),
        Outcome::Dropped { reason } => (channel, seq, false, Some(reason)),
    }
}

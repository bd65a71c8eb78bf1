//! The incident manager: the one task that owns the [`Book`] and the incident store. It takes
//! rule signals from the decode stage, operator actions from the API and delivery outcomes from
//! the push channels; commits each step in one transaction (group commit: whatever arrived
//! meanwhile rides along); only then acknowledges the QoS 1 messages behind the signals, hands
//! the new outbox items to every channel, sends device commands and feeds the live SSE stream.
//! In cluster mode the acknowledgement waits further, until the incident log took the changes
//! ([`Manager::with_acks_after`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::book::{Action, Book, BookStats, Command, TransitionError};
use crate::model::{Incident, OutboxItem, Release, Signal};
use super::silence::{Silence, SilenceConfig};
use super::store::{Commit, IncidentStore};
use crate::ingest::{now_ms, Ack};
use crate::metrics::{counter, counter_family, gauge_family, latency_histogram};
use crate::model::{Outcome, PublishFn};

/// How often timers run.
pub const TICK: Duration = Duration::from_secs(1);
/// Coalesced updates (repeat counts, last values) are persisted this often.
pub const PERSIST_EVERY_TICKS: u64 = 10;
/// Requests buffered ahead of the manager.
pub const QUEUE: usize = 4096;
/// Items buffered ahead of each push channel's dispatcher; beyond that the durable outbox holds
/// them and the dispatcher re-reads it (see [`ChannelSender::offer`]).
pub const CHANNEL_QUEUE: usize = 1024;
/// Delivery outcomes buffered ahead of the manager (dispatchers wait when it is full).
pub const OUTCOMES_QUEUE: usize = 1024;
/// Releases buffered ahead of the decode stage's rule engine (the manager keeps the rest).
pub const RELEASES_QUEUE: usize = 256;

/// One push channel's queue, bounded: the manager's end. See [`channel_queue`].
#[derive(Debug, Clone)]
pub struct ChannelSender {
    tx: mpsc::Sender<OutboxItem>,
    lag: Arc<Lag>,
}

/// One push channel's queue: the dispatcher's end.
#[derive(Debug)]
pub struct ChannelQueue {
    rx: mpsc::Receiver<OutboxItem>,
    lag: Arc<Lag>,
}

/// What [`ChannelQueue::recv`] got.
#[derive(Debug)]
pub enum Received {
    Item(OutboxItem),
    Overflowed,
    Closed,
}

/// Set when the queue overflowed: the items since are only in the outbox.
#[derive(Debug, Default)]
struct Lag {
    lagged: AtomicBool,
    wake: tokio::sync::Notify,
}

/// A bounded queue from the incident manager to one push channel's dispatcher. The manager
/// never waits on it and nothing is lost when it is full: every item is committed to the
/// durable outbox before it is offered, so a full queue only tells the dispatcher to re-read
/// its backlog from the outbox ([`ChannelQueue::catch_up`]).
pub fn channel_queue(capacity: usize) -> (ChannelSender, ChannelQueue) {
    let (tx, rx) = mpsc::channel(capacity);
    let lag = Arc::new(Lag::default());
    (ChannelSender { tx, lag: Arc::clone(&lag) }, ChannelQueue { rx, lag })
}

impl ChannelSender {
    /// Queues a committed item without waiting. While the dispatcher has lagged (the queue was
    /// full and it has not re-read the outbox since) nothing is queued: it will read this item
    /// from the outbox. A closed queue means the dispatcher stopped; the item stays pending in
    /// the outbox for the next start.
    pub fn offer(&self, item: OutboxItem) {
        if self.lag.lagged.load(Ordering::SeqCst) {
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(item)) = self.tx.try_send(item) {
            tracing::debug!(channel = %item.channel, seq = item.seq, "push channel queue full; the dispatcher re-reads the outbox");
            self.lag.lagged.store(true, Ordering::SeqCst);
            self.lag.wake.notify_one();
        }
    }
}

impl ChannelQueue {
    /// The next item, or the news that the queue overflowed (then [`ChannelQueue::catch_up`]),
    /// or that it closed: the manager has stopped, the dispatcher's stop signal.
    pub async fn recv(&mut self) -> Received {
        if self.lagged() {
            return Received::Overflowed;
        }
        tokio::select! {
            item = self.rx.recv() => item.map_or(Received::Closed, Received::Item),
            () = self.lag.wake.notified() => Received::Overflowed,
        }
    }

    pub fn try_recv(&mut self) -> Result<OutboxItem, mpsc::error::TryRecvError> {
        self.rx.try_recv()
    }

    /// Whether items were left out since the last [`ChannelQueue::catch_up`].
    pub fn lagged(&self) -> bool {
        self.lag.lagged.load(Ordering::SeqCst)
    }

    /// Takes what is queued and clears the lag. The caller then re-reads the outbox: every item
    /// left out was committed before this call, and everything committed after it is queued
    /// again, so the queued items and the re-read backlog together miss nothing (duplicates
    /// are told apart by `seq`).
    pub fn catch_up(&mut self) -> Vec<OutboxItem> {
        let mut items = Vec::new();
        // The manager queues nothing while lagged, so `Empty` means drained.
        while let Ok(item) = self.rx.try_recv() {
            items.push(item);
        }
        self.lag.lagged.store(false, Ordering::SeqCst);
        items
    }

    /// Marks the queue lagged again (the outbox could not be read; try later).
    pub fn retry_catch_up(&self) {
        self.lag.lagged.store(true, Ordering::SeqCst);
    }
}

/// What the manager is asked to do: its protocol, private to this module; callers use the
/// methods of [`IncidentsHandle`].
#[derive(Debug)]
pub(crate) enum Request {
    /// Signals from one decode batch; `ack` fires once they are committed. `received_ms`:
    /// when the batch's first message arrived (for the path latency histogram).
    Signals { signals: Vec<Signal>, ack: Option<Ack>, received_ms: i64 },
    /// Signals of messages a partition's new owner replayed (cluster mode, see
    /// [`super::book::Book::apply_replayed`]).
    Replayed { signals: Vec<Signal> },
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
    /// Incidents another gateway kept (cluster mode); the reply, after the commit, says how
    /// many changed the book.
    Adopt { incidents: Vec<Incident>, reply: oneshot::Sender<usize> },
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
        Timing { commit: latency_histogram(), message_to_commit: latency_histogram() }
    }
}

/// The incident side's counters and gauges for `/metrics`, read at every scrape: changes and
/// device commands from the book's stats, incidents by state from the store. Holds no
/// [`IncidentsHandle`], so a registry never keeps the manager running.
#[derive(Debug)]
struct IncidentMetrics {
    stats: Arc<Mutex<BookStats>>,
    store: Arc<IncidentStore>,
}

/// Names without `_total`: the encoder adds it to counters.
impl Collector for IncidentMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let b = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        let e = &mut encoder;
        let changes = [
            ("opened", b.opened),
            ("reopened", b.reopened),
            ("repeat", b.repeats),
            ("cleared", b.cleared),
            ("escalated", b.escalations),
            ("flapping", b.flapping_started),
        ]
        .map(|(change, n)| ([("change", change)], n));
        counter_family(e, "citywatch_incident_changes", "Incident changes by kind since start.", changes)?;
        counter(e, "citywatch_incident_signals_silenced", "Rule signals held back by a silence.", b.silenced)?;
        let commands = [("sent", b.commands_sent), ("acked", b.commands_acked), ("unanswered", b.commands_unanswered), ("resent", b.commands_resent)].map(|(outcome, n)| ([("outcome", outcome)], n));
        counter_family(e, "citywatch_device_commands", "Commands sent to devices, by outcome.", commands)?;
        match self.store.counts_by_state() {
            Ok(counts) => gauge_family(e, "citywatch_incidents", "Incidents in the store by state.", counts.into_iter().map(|(state, n)| ([("state", state)], n))),
            // A failed read leaves the series out of this scrape, as a scrape error would.
            Err(err) => {
                tracing::warn!(error = %err, "/metrics: incidents by state unavailable");
                Ok(())
            }
        }
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

    /// Signals of messages a partition's new owner replayed (cluster mode): applied only where
    /// the incident log has nothing for their incident.
    pub async fn replayed(&self, signals: Vec<Signal>) -> Result<(), Stopped> {
        self.tx.send(Request::Replayed { signals }).await.map_err(|_| Stopped)
    }

    /// A device acknowledged the command `id`.
    pub async fn command_ack(&self, device: String, id: String) -> Result<(), Stopped> {
        self.tx.send(Request::CommandAck { device, id }).await.map_err(|_| Stopped)
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

    /// Takes over incidents as another gateway left them (cluster mode, a partition gained):
    /// stored and keyed, not pushed. Returns once committed, with how many changed the book.
    pub async fn adopt(&self, incidents: Vec<Incident>) -> Result<usize, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request::Adopt { incidents, reply }).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    pub fn stats(&self) -> BookStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Adds the incident side's series to `registry`: the manager's latency histograms (in
    /// seconds) and [`IncidentMetrics`].
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register("citywatch_incident_commit_seconds", "Incident store transactions (fsync included)", self.timing.commit.clone());
        registry.register(
            "citywatch_incident_path_seconds",
            "From the arrival of a message that changed an incident to that change committed (before push)",
            self.timing.message_to_commit.clone(),
        );
        registry.register_collector(Box::new(IncidentMetrics { stats: Arc::clone(&self.stats), store: Arc::clone(&self.store) }));
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
    fn replayed(&self, signals: Vec<Signal>) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>> {
        Box::pin(IncidentsHandle::replayed(self, signals))
    }
}

/// What waits for [`Manager::with_acks_after`]'s channel: the acks and operators' replies of one
/// commit, and the newest outbox `seq` it created.
struct Held {
    newest: i64,
    acks: Vec<Ack>,
    replies: Vec<Box<dyn FnOnce() + Send>>,
}

/// The manager task's state.
pub struct Manager {
    book: Book,
    store: Arc<IncidentStore>,
    channels: Vec<(Arc<str>, ChannelSender)>,
    events: broadcast::Sender<LiveEvent>,
    publish: Option<PublishFn>,
    stats: Arc<Mutex<BookStats>>,
    retention_ms: i64,
    /// To the decode stage's rule engine.
    releases: Option<mpsc::Sender<Release>>,
    /// Releases the decode stage had no room for yet, oldest first.
    unsent_releases: VecDeque<Release>,
    timing: Arc<Timing>,
    /// The channel whose delivery of a commit's changes the acks behind them wait for
    /// ([`Manager::with_acks_after`]); `None`: acks fire at the commit.
    acks_after: Option<Arc<str>>,
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
        channels: Vec<(Arc<str>, ChannelSender)>,
        publish: Option<PublishFn>,
        retention_ms: i64,
    ) -> (Manager, IncidentsHandle, Requests) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (events, _) = broadcast::channel(1024);
        let stats = Arc::new(Mutex::new(BookStats::default()));
        let timing = Arc::new(Timing::default());
        let handle = IncidentsHandle { tx, store: Arc::clone(&store), events: events.clone(), stats: Arc::clone(&stats), timing: Arc::clone(&timing) };
        (Manager { book, store, channels, events, publish, stats, retention_ms, releases: None, unsent_releases: VecDeque::new(), timing, acks_after: None }, handle, Requests(rx))
    }

    /// Where to tell the rule engine about incidents operators ended.
    pub fn with_releases(mut self, releases: mpsc::Sender<Release>) -> Self {
        self.releases = Some(releases);
        self
    }

    /// Acknowledges the messages behind a commit's changes, and answers the operators whose
    /// actions it holds, only once `channel` took the newest of them (delivered, or given up
    /// on), not at the commit. Cluster mode, with the incident
    /// log as the channel: a message is acknowledged to the ingest stream only when what it
    /// changed is in the replicated log, so an owner that dies between its commit and the append
    /// leaves the message unacknowledged, and the next owner takes it in and makes the change
    /// again (instead of the change living on in the dead gateway's outbox only); an operator's 200
    /// means the change is in the log. A channel
    /// delivers in `seq` order, so its outcome for `seq` covers every earlier change. Acks still
    /// held when the manager stops are dropped: the messages are redelivered.
    pub fn with_acks_after(mut self, channel: Arc<str>) -> Self {
        self.acks_after = Some(channel);
        self
    }

    /// Runs until every [`IncidentsHandle`] is gone (the gateway's drain: the sources, the
    /// decode stage and the API have stopped), then commits what is pending and returns;
    /// dropping the channel queues stops the dispatchers.
    pub async fn run(mut self, Requests(mut requests): Requests, mut delivered: mpsc::Receiver<(Arc<str>, i64, Outcome)>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        let mut acks: Vec<Ack> = Vec::new();
        // Acks and replies waiting for `acks_after`: the newest outbox `seq` of their commit,
        // oldest first.
        let mut held: VecDeque<Held> = VecDeque::new();
        let acks_after = self.acks_after.clone();
        // Fires what was held for changes `channel` has now taken up to `seq`.
        let release = |held: &mut VecDeque<Held>, channel: &str, seq: i64| {
            if acks_after.as_deref() != Some(channel) {
                return;
            }
            while held.front().is_some_and(|h| h.newest <= seq) {
                if let Some(h) = held.pop_front() {
                    h.acks.into_iter().for_each(Ack::done);
                    h.replies.into_iter().for_each(|r| r());
                }
            }
        };
        let mut replies: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
        let mut marks: Vec<(Arc<str>, i64, bool, Option<&'static str>)> = Vec::new();
        let mut stopping = false;
        let mut earliest: Option<i64> = None;
        loop {
            let mut commit_marks = false;
            tokio::select! {
                request = requests.recv(), if !stopping => {
                    match request {
                        Some(request) => self.handle(request, &mut acks, &mut replies, &mut earliest),
                        // Every handle is gone: commit what is pending and stop.
                        None => stopping = true,
                    }
                    // Group commit: take whatever else is already waiting.
                    while let Ok(request) = requests.try_recv() {
                        self.handle(request, &mut acks, &mut replies, &mut earliest);
                        if acks.len() + replies.len() >= 512 {
                            break;
                        }
                    }
                }
                Some((channel, seq, outcome)) = delivered.recv() => {
                    release(&mut held, &channel, seq);
                    marks.push(mark(channel, seq, outcome));
                    while let Ok((channel, seq, outcome)) = delivered.try_recv() {
                        release(&mut held, &channel, seq);
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
            if stopping {
                // Outage storms' coalesced membership changes go out with the last commit.
                self.book.flush_storms(now_ms());
            }
            let (mut commit, commands) = self.book.take();
            if commit_marks || stopping || !commit.is_empty() {
                commit.deliveries = std::mem::take(&mut marks);
            }
            let mut newest_change = None;
            if !commit.is_empty() {
                let changed = !commit.outbox.is_empty();
                let started = std::time::Instant::now();
                let result = self.commit(commit).await;
                self.timing.commit.observe(started.elapsed().as_secs_f64());
                if let (Some(t0), true, true) = (earliest, changed, result.is_ok()) {
                    self.timing.message_to_commit.observe((now_ms() - t0).max(0) as f64 / 1000.0);
                }
                match result {
                    Ok(newest) => newest_change = newest,
                    Err(e) => {
                        // Nothing is acknowledged: the broker redelivers, operators get an error.
                        tracing::error!(error = %e, "incident commit failed; the triggering messages stay unacknowledged");
                        acks.clear();
                        replies.clear();
                        continue;
                    }
                }
            }
            self.unsent_releases.extend(self.book.take_released());
            self.send_releases();
            earliest = None;
            match newest_change.filter(|_| self.acks_after.is_some() && !(acks.is_empty() && replies.is_empty())) {
                Some(newest) => held.push_back(Held { newest, acks: std::mem::take(&mut acks), replies: std::mem::take(&mut replies) }),
                None => {
                    acks.drain(..).for_each(Ack::done);
                    replies.drain(..).for_each(|r| r());
                }
            }
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

    /// Hands the rule engine what operators ended, as far as its queue has room; the rest waits
    /// here for the next round (the manager never waits on the decode stage, which waits on it).
    fn send_releases(&mut self) {
        let Some(tx) = &self.releases else {
            self.unsent_releases.clear();
            return;
        };
        while let Some(r) = self.unsent_releases.pop_front() {
            match tx.try_send(r) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(r)) => {
                    self.unsent_releases.push_front(r);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.unsent_releases.clear();
                    break;
                }
            }
        }
    }

    /// Applies one request.
    fn handle(&mut self, request: Request, acks: &mut Vec<Ack>, replies: &mut Vec<Box<dyn FnOnce() + Send>>, earliest: &mut Option<i64>) {
        let now = now_ms();
        match request {
            Request::Signals { signals, ack, received_ms } => {
                *earliest = Some(earliest.map_or(received_ms, |e| e.min(received_ms)));
                for s in signals {
                    self.book.apply(s, now);
                }
                acks.extend(ack);
            }
            Request::Replayed { signals } => {
                for s in signals {
                    self.book.apply_replayed(s, now);
                }
            }
            Request::CommandAck { device, id } => self.book.command_acked(&device, &id, now),
            Request::Transition { id, action, actor, note, crew, reply } => {
                let result = self.book.transition(&id, action, &actor, note, crew, now);
                // The reply waits for the commit, so a 200 means it is on disk (in cluster mode:
                // in the incident log, see `with_acks_after`).
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
            Request::Adopt { incidents, reply } => {
                let changed = incidents.into_iter().map(|i| self.book.adopt(i, now)).filter(|changed| *changed).count();
                // Like a transition's, the reply waits for the commit.
                replies.push(Box::new(move || {
                    let _ = reply.send(changed);
                }));
            }
        }
    }

    /// Commits one step; answers the newest outbox `seq` it created (`None`: no change).
    async fn commit(&mut self, commit: Commit) -> Result<Option<i64>, super::store::Error> {
        let store = Arc::clone(&self.store);
        let names: Vec<Arc<str>> = self.channels.iter().map(|(n, _)| Arc::clone(n)).collect();
        let created = tokio::task::spawn_blocking(move || store.commit(&commit, &names, now_ms()))
            .await
            .map_err(|e| super::store::Error::Io(format!("commit task: {e}")))??;
        let newest = created.iter().map(|c| c.seq).max();
        for super::store::Committed { seq, incident, body } in created {
            for (name, tx) in &self.channels {
                tx.offer(OutboxItem { seq, channel: Arc::clone(name), incident: Arc::clone(&incident), body: Arc::clone(&body) });
            }
            let _ = self.events.send(LiveEvent { seq, body });
        }
        Ok(newest)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use citywatch_edge::wire::{DeviceKind, Metric};

    use super::*;
    use crate::incidents::{Change, IncidentsConfig, Scope, Severity};

    const LOG: &str = "cluster-log";

    fn gas_open(device: &str) -> Signal {
        Signal {
            rule: "gas_high".into(),
            scope: Scope::Device,
            site: "xh".into(),
            device: device.into(),
            kind: DeviceKind::GasDetector,
            ts_ms: now_ms(),
            change: Change::Open { severity: Severity::Critical, metric: Some(Metric::GasLel), value: Some(55.0), threshold: Some(50.0), summary: "gas".into(), action: None },
            members: Vec::new(),
        }
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !check() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    #[tokio::test]
    async fn with_acks_after_a_channel_a_change_is_acknowledged_only_once_that_channel_took_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(IncidentStore::open(dir.path()).expect("incident store"));
        let book = Book::new(IncidentsConfig::default(), Vec::new(), Vec::new(), now_ms());
        let (log_tx, mut log_rx) = channel_queue(16);
        let (manager, handle, requests) = Manager::new(book, store, vec![(Arc::from(LOG), log_tx)], None, 400 * 86_400_000);
        let (done_tx, done_rx) = mpsc::channel(16);
        tokio::spawn(manager.with_acks_after(Arc::from(LOG)).run(requests, done_rx));

        // A message whose signal changes nothing is acknowledged at the commit as before; one
        // that opens an incident waits for the log.
        let acked = Arc::new(AtomicUsize::new(0));
        let ack = |acked: &Arc<AtomicUsize>| {
            let acked = Arc::clone(acked);
            Ack::new(move || {
                acked.fetch_add(1, Ordering::SeqCst);
            })
        };
        handle.raise(vec![gas_open("gas-1")], Some(ack(&acked)), now_ms()).await.expect("manager running");
        let item = tokio::time::timeout(Duration::from_secs(5), log_rx.rx.recv()).await.expect("the change reaches the log channel").expect("queue open");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(acked.load(Ordering::SeqCst), 0, "not acknowledged before the log took the change");

        // Another channel's outcome for that seq releases nothing.
        done_tx.send((Arc::from("webhook_ops"), item.seq, Outcome::Delivered)).await.expect("manager running");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(acked.load(Ordering::SeqCst), 0, "only the log's outcome counts");

        done_tx.send((Arc::from(LOG), item.seq, Outcome::Delivered)).await.expect("manager running");
        eventually("the ack once the log took the change", || acked.load(Ordering::SeqCst) == 1).await;

        // The same alarm again changes nothing: acknowledged at once.
        handle.raise(vec![gas_open("gas-1")], Some(ack(&acked)), now_ms()).await.expect("manager running");
        eventually("the ack of a message that changed nothing", || acked.load(Ordering::SeqCst) == 2).await;
    }
}

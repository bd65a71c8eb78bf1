//! The decode stage: raw MQTT messages in, validated readings, events and device updates out.
//!
//! Applies the wire contract, the site check (a known device under another site is
//! quarantined), metric-for-kind checks and `seq` de-duplication, keeps the registry current,
//! and quarantines everything it rejects with its raw bytes and a reason. Rejections never stop
//! ingestion. Live readings, events and statuses also go through the rule engine (pure, constant
//! work per reading), whose signals go to the incident manager *before* the batch goes to the
//! store, so an incident never queues behind a bulk batch of readings. A batch's acks fire only
//! once both its store writes and its incident changes are committed. In cluster mode a
//! partition's new owner also hands it restored statuses and replayed messages ([`Origin`]):
//! they update the registry and the rules, and are neither stored nor counted again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use citywatch_edge::wire::{Channel, DeviceKind, EventKind, LinkState, Metric, Topic, Uplink};
use tokio::sync::mpsc;

use crate::ingest::IngestConfig;
use crate::ingest::{now_ms, Ack, Inbound, LaneReceivers, Origin};
use crate::metrics::{self, Metrics};
use crate::model::{DeviceCtx, Release, Signal, Stopped};
use crate::registry::{infer_kind, Device, Registry, SeqCheck};
use crate::store::{EventRecord, QuarantineEntry, Reading, StoreWriter, Write};

/// How often the rule engine's timers run (held-for durations, absence, follow-ups, stuck sensors).
pub const RULE_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// The rule engine as the decode stage sees it: told every accepted status, reading and event,
/// and the time. Implemented by `rules::Engine`; the trait lives here so that decode does not
/// import the later stage (dependencies point against the flow). Synchronous and I/O-free.
pub trait Evaluator: Send + Sync + std::fmt::Debug {
    /// Starts tracking a registered device for absence from `last_seen_ms`.
    fn track(&mut self, dev: &DeviceCtx, last_seen_ms: i64);
    /// An incident open before a restart: its rule resumes as active, so nothing re-fires.
    fn restore_active(&mut self, dev: &DeviceCtx, rule: &str);
    /// An operator ended the incident: the rule is no longer active for it.
    fn release(&mut self, release: &Release);
    fn on_status(&mut self, dev: &DeviceCtx, state: LinkState, now_ms: i64, out: &mut Vec<Signal>);
    fn on_reading(&mut self, dev: &DeviceCtx, metric: Metric, value: f64, ts_ms: i64, now_ms: i64, out: &mut Vec<Signal>);
    #[allow(clippy::too_many_arguments)]
    fn on_event(&mut self, dev: &DeviceCtx, event: EventKind, metric: Option<Metric>, value: Option<f64>, ts_ms: i64, now_ms: i64, out: &mut Vec<Signal>);
    /// A message that reached none of the entry points above: proof of life only.
    fn on_seen(&mut self, dev: &DeviceCtx, now_ms: i64, out: &mut Vec<Signal>);
    /// Timers: held-for durations, absence.
    fn tick(&mut self, now_ms: i64, out: &mut Vec<Signal>);
}

/// Where the decode stage's signals and command acknowledgements go: the incident manager's
/// handle implements it. Each call resolves once the receiver has queued the input (a full
/// queue pushes back on ingestion; nothing is dropped).
pub trait SignalSink: Send + Sync + std::fmt::Debug {
    /// Signals from one batch; `ack` fires once they are committed.
    fn signals(&self, signals: Vec<Signal>, ack: Option<Ack>, received_ms: i64) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>>;
    /// A device acknowledged the command `id`.
    fn command_ack(&self, device: String, id: String) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>>;
    /// Signals of messages replayed by a partition's new owner ([`Origin::Replayed`]): the
    /// previous owner may already have acted on them, so the receiver decides what they may
    /// still change (the incident manager: only what the incident log does not hold).
    fn replayed(&self, signals: Vec<Signal>) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>>;
}

/// A [`SignalSink`] with nothing behind it, for tests and fuzzing that call
/// [`DecodeStage::handle`] only: every call fails with [`Stopped`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Unwired;

impl SignalSink for Unwired {
    fn signals(&self, _: Vec<Signal>, _: Option<Ack>, _: i64) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>> {
        Box::pin(std::future::ready(Err(Stopped)))
    }
    fn command_ack(&self, _: String, _: String) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>> {
        Box::pin(std::future::ready(Err(Stopped)))
    }
    fn replayed(&self, _: Vec<Signal>) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>> {
        Box::pin(std::future::ready(Err(Stopped)))
    }
}

/// The rule engine and where its signals go.
#[derive(Debug)]
pub struct Rules {
    pub engine: Box<dyn Evaluator>,
    pub incidents: Box<dyn SignalSink>,
    /// Incidents operators ended: the engine stops treating their rules as active.
    pub releases: mpsc::Receiver<Release>,
}

/// Messages taken from the source channel per batch.
pub const MAX_BATCH_MESSAGES: usize = 2048;
/// While filling a batch from the bulk lane, how often to look whether an alert is waiting.
const ALERT_CHECK_EVERY: usize = 32;
/// A device's record is persisted at least this often while it talks.
pub const PERSIST_EVERY_MS: i64 = 60_000;
/// How long an event from a device the gateway does not know yet is held back for the
/// device's birth (see [`Parked`]) before it is quarantined as `unknown_device`.
const PARK_FOR_BIRTH_MS: i64 = 2_000;
/// Events held back at once; past this an event of an unknown device is quarantined at once.
const MAX_PARKED: usize = 4_096;
/// Topics the gateway itself publishes under the same root; they are not device input.
pub const OWN_TOPIC_PREFIX: &str = "citywatch/v1/ops/";

/// The writes produced by one batch of messages, in the order they must be applied.
#[derive(Debug, Default)]
pub struct Batch {
    pub readings: Vec<Reading>,
    pub writes: Vec<Write>,
    pub acks: Vec<Ack>,
    /// What the rule engine reported for this batch.
    pub signals: Vec<Signal>,
    /// What it reported for replayed messages ([`DecodeStage::replay`]).
    pub replayed_signals: Vec<Signal>,
    /// `cmd_ack` events: (device, command id).
    pub command_acks: Vec<(String, String)>,
    /// When the batch's first message arrived.
    pub received_ms: Option<i64>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.readings.is_empty() && self.writes.is_empty() && self.acks.is_empty() && self.signals.is_empty() && self.replayed_signals.is_empty()
    }

    /// The store writes, in order: the readings, the other writes, then one write for all the
    /// acks (they fire together after the commit). Signals and command acks are not writes.
    pub fn into_writes(self) -> Vec<Write> {
        let mut out = Vec::with_capacity(self.writes.len() + 2);
        if !self.readings.is_empty() {
            out.push(Write::Readings(self.readings));
        }
        out.extend(self.writes);
        if !self.acks.is_empty() {
            let acks = self.acks;
            out.push(Write::Ack(Ack::new(move || acks.into_iter().for_each(Ack::done))));
        }
        out
    }
}

/// The stage's state.
#[derive(Debug)]
pub struct DecodeStage {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    config: IngestConfig,
    logged_at: HashMap<String, i64>,
    rules: Option<Rules>,
    /// Site names, the registry's shared copies (looked up here without its lock).
    sites: HashMap<String, Arc<str>>,
    /// The long-term store (InfluxDB), fed copies of the readings without waiting.
    influx: Option<crate::store::influx::InfluxTap>,
    /// Events of devices not known yet, waiting for their birth, oldest first.
    parked: std::collections::VecDeque<Parked>,
    /// When a replayed message was last decoded: the engine's timers wait while a replay is fed
    /// (see [`DecodeStage::replay`]).
    replayed_at: Option<std::time::Instant>,
}

/// An event that overtook its device's first `status`. Events take the alert lane and births
/// the bulk lane (and, with an external broker, another connection), so a new device's first
/// alarm can reach the decode stage before its birth does. Rejecting it as `unknown_device`
/// would lose a real alarm; it is held instead, and decoded again whenever the bulk lane is
/// seen empty after it was held (then every message queued before it has been seen). It is
/// quarantined when its device is still unknown after [`PARK_FOR_BIRTH_MS`]. Its ack travels
/// with it.
#[derive(Debug)]
struct Parked {
    message: Inbound,
    since_ms: i64,
}

impl DecodeStage {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>, config: IngestConfig) -> Self {
        DecodeStage { registry, metrics, config, logged_at: HashMap::new(), rules: None, sites: HashMap::new(), influx: None, parked: Default::default(), replayed_at: None }
    }

    /// Evaluates rules too, sending signals to the incident manager. Every registered device is
    /// tracked for absence from its last message, and `active` (device, rule) pairs — incidents
    /// open before a restart — resume as active, so nothing re-fires.
    pub fn with_rules(
        mut self,
        engine: impl Evaluator + 'static,
        incidents: impl SignalSink + 'static,
        releases: mpsc::Receiver<Release>,
        active: &[(String, String)],
    ) -> Self {
        let mut engine: Box<dyn Evaluator> = Box::new(engine);
        let mut active_by_device: HashMap<&str, Vec<&str>> = HashMap::new();
        for (device, rule) in active {
            active_by_device.entry(device.as_str()).or_default().push(rule.as_str());
        }
        let mut tracked = Vec::new();
        self.registry.for_each(|d| tracked.push((d.id.clone(), d.site.clone(), d.kind, d.interval_s, d.last_seen_ms)));
        for (id, site, kind, interval_s, last_seen) in tracked {
            let ctx = DeviceCtx { id: &id, site: &site, kind, interval_s };
            engine.track(&ctx, last_seen);
            for rule in active_by_device.get(&*id).into_iter().flatten() {
                engine.restore_active(&ctx, rule);
            }
        }
        self.rules = Some(Rules { engine, incidents: Box::new(incidents), releases });
        self
    }

    /// Also hands every batch's readings to the InfluxDB sink.
    pub fn with_influx(mut self, tap: crate::store::influx::InfluxTap) -> Self {
        self.influx = Some(tap);
        self
    }

    fn site(&mut self, site: &str) -> Arc<str> {
        if let Some(s) = self.sites.get(site) {
            return Arc::clone(s);
        }
        let s = self.registry.intern(site);
        self.sites.insert(site.to_owned(), Arc::clone(&s));
        s
    }

    /// Runs until the source side closes, then returns (dropping its store writer lets the
    /// store drain and stop).
    ///
    /// The alert lane (device events, command acks) is served first: a batch starts with every
    /// alert waiting, ends early when one arrives meanwhile, and while the store's queue is full
    /// alerts are still decoded and their signals sent (see [`DecodeStage::store`]). So a gas
    /// alarm queues neither behind bulk telemetry nor behind the store.
    pub async fn run(mut self, mut input: LaneReceivers, store: StoreWriter) {
        let mut tick = tokio::time::interval(RULE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut alerts_open = true;
        loop {
            let mut batch = Batch::default();
            tokio::select! {
                biased;
                first = input.alerts.recv(), if alerts_open => match first {
                    Some(first) => self.fill(first, &mut input, &mut batch),
                    None => alerts_open = false,
                },
                first = input.bulk.recv() => match first {
                    Some(first) => self.fill(first, &mut input, &mut batch),
                    None if alerts_open => {
                        // The sources are stopping: take what is left on the alert lane first.
                        while let Some(message) = input.alerts.recv().await {
                            self.handle(message, now_ms(), &mut batch);
                        }
                        alerts_open = false;
                    }
                    None => {
                        self.release_parked(now_ms(), true, true, &mut batch);
                        if self.send(&store, batch, &mut input.alerts).await.is_err() {
                            tracing::error!("the store writer or the incident manager stopped; ingestion stops");
                        }
                        return;
                    }
                },
                _ = tick.tick() => {
                    self.release_parked(now_ms(), input.bulk.is_empty(), false, &mut batch);
                    if let Some(rules) = self.rules.as_mut() {
                        while let Ok(r) = rules.releases.try_recv() {
                            rules.engine.release(&r);
                        }
                        // Not in the middle of a replay: a deadline of the replayed window would
                        // fire at today's time before the window's later messages were seen.
                        if self.replayed_at.is_none_or(|at| at.elapsed() >= RULE_TICK) {
                            rules.engine.tick(now_ms(), &mut batch.signals);
                        }
                    }
                }
            }
            if self.send(&store, batch, &mut input.alerts).await.is_err() {
                tracing::error!("the store writer or the incident manager stopped; ingestion stops");
                return;
            }
        }
    }

    /// One batch: `first`, then every alert waiting, then bulk messages up to
    /// [`MAX_BATCH_MESSAGES`], ending early when an alert arrives (its signal goes out with the
    /// next batch, not after a whole bulk batch).
    fn fill(&mut self, first: Inbound, input: &mut LaneReceivers, batch: &mut Batch) {
        let now = now_ms();
        self.handle(first, now, batch);
        let mut taken = 1;
        while taken < MAX_BATCH_MESSAGES {
            let Ok(message) = input.alerts.try_recv() else { break };
            self.handle(message, now, batch);
            taken += 1;
        }
        let mut bulk_drained = false;
        while taken < MAX_BATCH_MESSAGES {
            if taken % ALERT_CHECK_EVERY == 0 && !input.alerts.is_empty() {
                break;
            }
            let Ok(message) = input.bulk.try_recv() else {
                bulk_drained = true;
                break;
            };
            self.handle(message, now, batch);
            taken += 1;
        }
        if !self.parked.is_empty() {
            self.release_parked(now, bulk_drained, false, batch);
        }
    }

    /// Decodes the held events again when the bulk lane has been seen empty (`bulk_drained`,
    /// observed after they were held) or the sources are gone (`last`). One whose device is
    /// still unknown is quarantined once it is old enough, or when `last`; otherwise held again.
    fn release_parked(&mut self, now: i64, bulk_drained: bool, last: bool, batch: &mut Batch) {
        if !(bulk_drained || last) {
            return;
        }
        for _ in 0..self.parked.len() {
            let Some(parked) = self.parked.pop_front() else { break };
            let last_try = last || now - parked.since_ms >= PARK_FOR_BIRTH_MS;
            if let Some(message) = self.decode(parked.message, now, batch, Attempt::Retry { last: last_try }) {
                self.parked.push_back(Parked { message, since_ms: parked.since_ms });
            }
        }
    }

    /// Signals first (the incident path must not wait behind readings), then the store.
    async fn send(&mut self, store: &StoreWriter, mut batch: Batch, alerts: &mut mpsc::Receiver<Inbound>) -> Result<(), ()> {
        self.signal(&mut batch).await?;
        self.store(store, batch, alerts).await
    }

    /// Hands the batch's readings to InfluxDB, and its command acks and signals to the incident
    /// manager (the batch's acks then wait for both the store and the incident manager).
    async fn signal(&mut self, batch: &mut Batch) -> Result<(), ()> {
        if let Some(tap) = &self.influx {
            tap.readings(&batch.readings);
        }
        let Some(rules) = self.rules.as_ref() else { return Ok(()) };
        if !batch.replayed_signals.is_empty() {
            rules.incidents.replayed(std::mem::take(&mut batch.replayed_signals)).await.map_err(|_| ())?;
        }
        for (device, id) in std::mem::take(&mut batch.command_acks) {
            rules.incidents.command_ack(device, id).await.map_err(|_| ())?;
        }
        if !batch.signals.is_empty() {
            let signals = std::mem::take(&mut batch.signals);
            let ack = if batch.acks.is_empty() {
                None
            } else {
                let (store_part, incident_part) = Ack::all(std::mem::take(&mut batch.acks)).split();
                batch.acks.push(store_part);
                Some(incident_part)
            };
            let received_ms = batch.received_ms.unwrap_or_else(now_ms);
            rules.incidents.signals(signals, ack, received_ms).await.map_err(|_| ())?;
        }
        Ok(())
    }

    /// Queues the batch's writes in order. While the store's queue is full, messages on the
    /// alert lane are still decoded and their signals sent at once; their writes (and acks)
    /// queue after these.
    async fn store(&mut self, store: &StoreWriter, batch: Batch, alerts: &mut mpsc::Receiver<Inbound>) -> Result<(), ()> {
        let mut writes: std::collections::VecDeque<Write> = batch.into_writes().into();
        while let Some(write) = writes.pop_front() {
            let write = match store.try_send(write) {
                Ok(()) => continue,
                Err(tokio::sync::mpsc::error::TrySendError::Full(write)) => write,
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return Err(()),
            };
            let readings = write.reading_count();
            loop {
                tokio::select! {
                    biased;
                    permit = store.reserve(readings) => {
                        permit.map_err(|_| ())?.send(write);
                        break;
                    }
                    Some(message) = alerts.recv() => {
                        let mut urgent = Batch::default();
                        self.handle(message, now_ms(), &mut urgent);
                        while let Ok(message) = alerts.try_recv() {
                            self.handle(message, now_ms(), &mut urgent);
                        }
                        self.signal(&mut urgent).await?;
                        // After `write` and the rest of this batch: writes keep the order of batches.
                        writes.extend(urgent.into_writes());
                    }
                }
            }
        }
        Ok(())
    }

    /// Decodes one message into `batch`. Synchronous and I/O-free. An event of a device not
    /// known yet may be held back for its birth (see [`Parked`]).
    pub fn handle(&mut self, message: Inbound, now: i64, batch: &mut Batch) {
        if let Some(message) = self.decode(message, now, batch, Attempt::First) {
            self.parked.push_back(Parked { message, since_ms: now });
        }
    }

    /// [`DecodeStage::handle`]'s work; returns the message when it is to be held back.
    fn decode(&mut self, message: Inbound, now: i64, batch: &mut Batch, attempt: Attempt) -> Option<Inbound> {
        let Inbound { topic, payload, received_ms, ack, origin } = message;
        match origin {
            Origin::Live => {}
            Origin::Restored => {
                batch.acks.extend(ack);
                self.restore(&topic, &payload, received_ms, now, batch);
                return None;
            }
            Origin::Replayed => {
                batch.acks.extend(ack);
                self.replay(&topic, &payload, received_ms, now, batch);
                return None;
            }
        }
        batch.received_ms.get_or_insert(received_ms);
        if topic.starts_with(OWN_TOPIC_PREFIX) {
            batch.acks.extend(ack);
            return None;
        }
        let parsed = Topic::parse(&topic);
        if attempt == Attempt::First {
            self.metrics.count_received(parsed.ok().map(|t| t.channel), payload.len());
        }
        let mut is_event = false;
        let result = parsed.and_then(|t| {
            is_event = t.channel == Channel::Event;
            if t.channel == Channel::Cmd {
                return Ok(None); // the gateway's own commands to devices
            }
            Uplink::decode(t.channel, &payload).map(|u| Some((t, u)))
        });
        let outcome = match result {
            Ok(None) => Ok(()),
            Ok(Some((t, uplink))) => self.accept(t.site, t.device, uplink, received_ms, now, batch, Origin::Live),
            Err(e) => Err(e.reason()),
        };
        if let Err(reason) = outcome {
            let may_wait = match attempt {
                Attempt::First => self.parked.len() < MAX_PARKED,
                Attempt::Retry { last } => !last,
            };
            if reason == metrics::UNKNOWN_DEVICE && is_event && may_wait {
                return Some(Inbound { topic, payload, received_ms, ack, origin });
            }
            self.reject(reason, topic, payload, received_ms, now, batch);
        }
        batch.acks.extend(ack);
        None
    }

    /// An accepted message into the registry, the rule engine (at `now`) and `batch`; counted in
    /// the metrics when `origin` is [`Origin::Live`].
    #[allow(clippy::too_many_arguments)]
    fn accept(&mut self, site: &str, device: &str, uplink: Uplink, received_ms: i64, now: i64, batch: &mut Batch, origin: Origin) -> Result<(), &'static str> {
        let counted = origin == Origin::Live;
        // The kind to register an unknown device with.
        let kind = match &uplink {
            Uplink::Status(s) => s.kind,
            Uplink::Telemetry(t) => infer_kind(t.values.iter().map(|(m, _)| m)),
            Uplink::Event(e) => e.metric.and_then(|m| infer_kind([m])),
        };
        match (self.registry.site_matches(device, site), kind) {
            (Some(false), _) => return Err(metrics::SITE_MISMATCH),
            (None, None) => return Err(metrics::UNKNOWN_DEVICE),
            _ => {}
        }
        let horizon = self.config.live_horizon.as_ms();
        let clock = ClockSkew { ahead_ms: self.config.clock_skew_ahead.as_ms(), behind_ms: self.config.clock_skew_behind.as_ms(), metrics: counted.then_some(&*self.metrics) };
        let make = || Device::new(device, site, kind.unwrap_or(DeviceKind::GasDetector), received_ms);
        // Firmware versions are shared by whole fleets: one copy each.
        let fw = match &uplink {
            Uplink::Status(s) => s.fw.as_ref().map(|fw| self.registry.intern(fw.as_str())),
            _ => None,
        };
        let mut kind_and_interval = None;
        let outcome = self.registry.upsert(device, make, |key, d| {
            d.last_seen_ms = d.last_seen_ms.max(received_ms);
            if d.never_reported {
                // Known from the inventory until now: this is its first message.
                d.never_reported = false;
                d.first_seen_ms = received_ms;
            }
            match &uplink {
                Uplink::Status(s) => {
                    apply_status(d, s, fw);
                    kind_and_interval = Some((d.kind, d.interval_s));
                    Ok(Accepted::Status(s.state))
                }
                Uplink::Telemetry(t) => {
                    kind_and_interval = Some((d.kind, d.interval_s));
                    if t.values.iter().any(|(m, _)| !d.kind.has_metric(m)) {
                        return Err(metrics::METRIC_NOT_FOR_KIND);
                    }
                    let SeqCheck::Fresh { gap } = d.check_seq(t.seq) else {
                        return Ok(Accepted::Duplicate);
                    };
                    let ts = device_time(d, t.ts, received_ms, &clock);
                    let historical = received_ms - ts > horizon;
                    // A telemetry message is proof of life, even after an `offline` will.
                    if !historical {
                        d.link = LinkState::Online;
                    }
                    let pairs = t
                        .values
                        .iter()
                        .chain(t.battery_v.map(|v| (Metric::BatteryV, v)))
                        .chain(t.rssi_dbm.map(|v| (Metric::RssiDbm, v)));
                    let mut n = 0;
                    for (metric, value) in pairs {
                        d.observe(metric, value, ts);
                        n += 1;
                        batch.readings.push(Reading { device: Arc::clone(key), metric, ts_ms: ts, value, historical });
                    }
                    Ok(Accepted::Telemetry { count: n, historical, gap })
                }
                Uplink::Event(e) => {
                    kind_and_interval = Some((d.kind, d.interval_s));
                    let SeqCheck::Fresh { gap } = d.check_seq(e.seq) else {
                        return Ok(Accepted::Duplicate);
                    };
                    d.on_event(e.event);
                    Ok(Accepted::Event(gap, EventRecord {
                        device: Arc::clone(key),
                        ts_ms: device_time(d, e.ts, received_ms, &clock),
                        seq: e.seq,
                        event: e.event,
                        metric: e.metric,
                        value: e.value,
                        cmd_id: e.id.as_ref().map(|i| i.as_str().to_owned()),
                    }))
                }
            }
        });
        let Some((key, outcome)) = outcome else { return Ok(()) };
        let outcome = outcome?;
        if let Some((kind, interval_s)) = kind_and_interval.filter(|_| self.rules.is_some()) {
            if !matches!(outcome, Accepted::Duplicate) {
                let site = self.site(site);
                let first_reading = batch.readings.len().saturating_sub(match &outcome {
                    Accepted::Telemetry { count, historical: false, .. } => *count,
                    _ => 0,
                });
                if let Some(rules) = self.rules.as_mut() {
                    let ctx = DeviceCtx { id: &key, site: &site, kind, interval_s };
                    let out = &mut batch.signals;
                    // Each engine entry point counts as proof of life itself (except an
                    // `offline` status, which must not clear what it opens); `on_seen` is only
                    // for messages that reach none of them.
                    match &outcome {
                        Accepted::Status(state) => rules.engine.on_status(&ctx, *state, now, out),
                        Accepted::Telemetry { historical: false, .. } => {
                            for r in &batch.readings[first_reading..] {
                                rules.engine.on_reading(&ctx, r.metric, r.value, r.ts_ms, now, out);
                            }
                        }
                        Accepted::Event(_, e) if received_ms - e.ts_ms <= horizon => {
                            rules.engine.on_event(&ctx, e.event, e.metric, e.value, e.ts_ms, now, out);
                            // An event's measurement is a reading too: a detector that alarms at
                            // 50 %LEL reports that value in the alarm event, possibly in a tick
                            // whose telemetry it then skips.
                            if let (Some(metric), Some(value)) = (e.metric, e.value) {
                                if kind.has_metric(metric) {
                                    rules.engine.on_reading(&ctx, metric, value, e.ts_ms, now, out);
                                }
                            }
                        }
                        _ => rules.engine.on_seen(&ctx, now, out),
                    }
                    if let Accepted::Event(_, EventRecord { event: EventKind::CmdAck, cmd_id: Some(id), .. }) = &outcome {
                        batch.command_acks.push((key.to_string(), id.clone()));
                    }
                }
            }
        }
        if !counted {
            // Replayed: the previous owner counted it; the registry's record may be due anyway.
            self.persist(&key, now, false, batch);
            return Ok(());
        }
        match outcome {
            Accepted::Status(_) => {
                self.metrics.statuses.fetch_add(1, Ordering::Relaxed);
                self.persist(&key, now, true, batch);
            }
            Accepted::Telemetry { count, historical, gap } => {
                self.metrics.seq_gaps.fetch_add(u64::from(gap), Ordering::Relaxed);
                self.metrics.readings.fetch_add(count as u64, Ordering::Relaxed);
                if historical {
                    self.metrics.historical.fetch_add(count as u64, Ordering::Relaxed);
                }
                self.persist(&key, now, false, batch);
            }
            Accepted::Event(gap, record) => {
                self.metrics.seq_gaps.fetch_add(u64::from(gap), Ordering::Relaxed);
                self.metrics.events.fetch_add(1, Ordering::Relaxed);
                batch.writes.push(Write::Event(record));
                self.persist(&key, now, false, batch);
            }
            Accepted::Duplicate => {
                self.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// A device's last status read back from the cluster's ingest stream by a partition's new
    /// owner ([`Inbound::restored`]): registers the device, or updates it when nothing newer was
    /// heard here, and has the rule engine track it from its last message — as a restart does
    /// with the devices of its own store. Not a message that arrived: counted nowhere, no proof
    /// of life, never quarantined (the owner that received it did all that).
    fn restore(&mut self, topic: &str, payload: &[u8], received_ms: i64, now: i64, batch: &mut Batch) {
        let Ok(t) = Topic::parse(topic) else { return };
        let known = self.registry.site_matches(t.device, t.site);
        if t.channel != Channel::Status || known == Some(false) {
            return;
        }
        let Ok(Uplink::Status(s)) = Uplink::decode(t.channel, payload) else { return };
        if known.is_none() && s.kind.is_none() {
            return; // an unknown device whose status names no kind: its first owner refused it too
        }
        let fw = s.fw.as_ref().map(|fw| self.registry.intern(fw.as_str()));
        let make = || Device::new(t.device, t.site, s.kind.unwrap_or(DeviceKind::GasDetector), received_ms);
        let outcome = self.registry.upsert(t.device, make, |_, d| {
            if d.never_reported {
                d.never_reported = false;
                d.first_seen_ms = received_ms;
            }
            if received_ms >= d.last_seen_ms {
                apply_status(d, &s, fw);
            }
            d.last_seen_ms = d.last_seen_ms.max(received_ms);
            (d.kind, d.interval_s, d.last_seen_ms)
        });
        let Some((key, (kind, interval_s, last_seen_ms))) = outcome else { return };
        if self.rules.is_some() {
            let site = self.site(t.site);
            if let Some(rules) = self.rules.as_mut() {
                rules.engine.track(&DeviceCtx { id: &key, site: &site, kind, interval_s }, last_seen_ms);
            }
        }
        self.persist(&key, now, true, batch);
    }

    /// A message the partition's previous owner already took in, read back from the ingest
    /// stream by its new owner ([`Origin::Replayed`], cluster mode), so that held-for durations
    /// and windows begun on the old owner go on here. The registry and the rule engine see it at
    /// its own time (when the stream stored it; the engine's clock is that time, not now), and
    /// nothing else happens: its readings and events are not stored again, it is counted
    /// nowhere, a bad one is not quarantined. Its signals go to the incident manager as replayed
    /// ([`SignalSink::replayed`]), and only when it is within `[ingest] live_horizon` of now:
    /// an older one builds rule state and opens nothing, as it would not arriving that late.
    ///
    /// The engine's timers do not run while a replay is fed (see [`DecodeStage::run`]): a hold
    /// is evaluated at every replayed reading, a composite window by every contribution, and a
    /// deadline that came due within the window fires at the first tick after the replay.
    fn replay(&mut self, topic: &str, payload: &[u8], received_ms: i64, now: i64, batch: &mut Batch) {
        self.replayed_at = Some(std::time::Instant::now());
        if topic.starts_with(OWN_TOPIC_PREFIX) {
            return;
        }
        let Ok(t) = Topic::parse(topic) else { return };
        if t.channel == Channel::Cmd {
            return;
        }
        let Ok(uplink) = Uplink::decode(t.channel, payload) else { return };
        let mut replayed = Batch::default();
        if self.accept(t.site, t.device, uplink, received_ms, received_ms, &mut replayed, Origin::Replayed).is_err() {
            return;
        }
        // Of its writes only the device's record: the registry's view of it moved on.
        batch.writes.extend(replayed.writes.into_iter().filter(|w| matches!(w, Write::Device(_))));
        if now - received_ms <= self.config.live_horizon.as_ms() {
            batch.replayed_signals.append(&mut replayed.signals);
        }
    }

    /// Persists the device record when asked to, or when it was last persisted long ago.
    fn persist(&mut self, key: &Arc<str>, now: i64, force: bool, batch: &mut Batch) {
        if let Some(device) = self.registry.take_if_due(key, now, PERSIST_EVERY_MS, force) {
            batch.writes.push(Write::Device(device.to_record()));
        }
    }

    fn reject(&mut self, reason: &'static str, topic: String, payload: bytes::Bytes, received_ms: i64, now: i64, batch: &mut Batch) {
        self.metrics.count_rejected(reason);
        let last = self.logged_at.get(reason).copied();
        if last.is_none_or(|at| now - at >= self.config.log_every.as_ms()) {
            self.logged_at.insert(reason.to_owned(), now);
            tracing::warn!(%reason, %topic, total = self.metrics.rejected().get(reason).copied().unwrap_or(0), "rejected input quarantined (logged at most once per period per reason)");
        }
        batch.writes.push(Write::Quarantine(QuarantineEntry { id: 0, received_ms, topic, reason: reason.to_owned(), payload }));
    }
}

/// What a `status` says about its device: link state, and kind, firmware (already interned)
/// and interval where given. The one place both a received and a restored status go through.
fn apply_status(d: &mut Device, s: &citywatch_edge::wire::Status, fw: Option<Arc<str>>) {
    d.link = s.state;
    if let Some(k) = s.kind {
        d.kind = k;
    }
    if let Some(fw) = fw {
        d.fw = Some(fw);
    }
    if let Some(i) = s.interval_s {
        d.interval_s = i.max(1);
    }
}

/// Whether a message is decoded for the first time or again after being held (see [`Parked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    First,
    /// `last`: quarantine it if its device is still unknown.
    Retry { last: bool },
}

/// The skew limits of [`IngestConfig`] and where to count a skewed message (nowhere for a
/// replayed one, counted when it arrived).
struct ClockSkew<'a> {
    ahead_ms: i64,
    behind_ms: i64,
    metrics: Option<&'a Metrics>,
}

/// The time a message's readings are stored under: its `ts`, or the receive time when it has
/// none or when the device's clock is far off (then the device is flagged and the message
/// counted). A reset clock (1970) is not a replay: its readings are live, so a gas alarm from
/// a device that lost its time still reaches the rules.
fn device_time(d: &mut Device, ts: Option<u64>, received_ms: i64, clock: &ClockSkew) -> i64 {
    let Some(ts) = ts else { return received_ms };
    let offset = i64::try_from(ts).unwrap_or(i64::MAX).saturating_sub(received_ms);
    if offset > clock.ahead_ms || offset < -clock.behind_ms {
        d.clock_offset_ms = Some(offset);
        if let Some(metrics) = clock.metrics {
            d.clock_skewed += 1;
            metrics.clock_skew.fetch_add(1, Ordering::Relaxed);
        }
        d.clock_assigned_ms = received_ms.max(d.clock_assigned_ms.saturating_add(1));
        d.clock_assigned_ms
    } else {
        d.clock_offset_ms = None;
        received_ms + offset
    }
}

enum Accepted {
    Status(LinkState),
    Telemetry { count: usize, historical: bool, gap: u32 },
    Event(u32, EventRecord),
    Duplicate,
}

#[cfg(test)]
mod tests;

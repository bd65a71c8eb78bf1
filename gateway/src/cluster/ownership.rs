//! Membership and partition leases: which gateway acts on which partition, and proof of it.
//!
//! Every tick (a third of the lease TTL) a gateway (1) renews the leases it holds with
//! `update(key, me, expected_revision)` — the revision is the fencing token, a lease another
//! gateway has taken cannot be renewed — while it announces itself in the members bucket, whose
//! entries expire one TTL after their last put, and lists the live members; (2) computes, by
//! rendezvous hashing over them, the partitions it should own; (3) releases those another
//! member should now own, and takes the ones it should own once they are free or their
//! revision has not moved for a whole TTL on its own clock (at once when the key carries its
//! own name).
//!
//! Losing a NATS node: the client moves to another listed node by itself; what this loop adds
//! is that no call waits longer than [`call_timeout`] (a quarter TTL), the calls of one step
//! run together ([`bounded_each`]), a listing that fails keeps the last member list, and the members are listed
//! without creating a consumer. While a bucket's stream elects a new leader (RAFT, seconds)
//! renewals go unanswered; a lease that runs out meanwhile stops its partition, and its holder
//! takes it back at the first answer, since the key still carries its name.
//!
//! Safety without synchronised clocks: a holder's lease counts as valid until the instant it
//! *sent* its last successful renewal plus TTL (monotonic clock); a taker waits a full TTL after
//! it *saw* that revision, which is later. The holder checks [`LeaseTable::holds`] before it hands
//! a message on and before every command or push, so after a pause longer than the TTL (SIGSTOP,
//! a partition from NATS) it sends nothing for the partition before it has renewed — and renewing
//! fails once another gateway took it.
//!
//! A partition's worker takes it over (adopts its incidents, restores its devices, replays its
//! recent messages through the rules, then consumes it) with every JetStream call bounded by
//! [`worker_call_timeout`] and each step retried while the lease is held, so no step can stall a
//! takeover behind a leader that died.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, kv};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};

use super::adopt::AdoptFn;
use super::calls::{bounded, bounded_each, call_timeout, retried, waits, worker_call_timeout, READ_ATTEMPTS};
use super::leases::{Held, LeaseTable};
use super::partition_metrics::{LeaseLoss, PartitionMetrics};
use super::pull::{PartitionConsumers, PULL_EXPIRES, PULL_HEARTBEAT};
use super::relay::{is_plain_copy, Relay};
use super::replay::Start;
use super::{rendezvous, routed_topic, Cluster, Result, Routed, INGEST_STREAM};
use crate::ingest::{Ack, Inbound, Origin};

/// What a member writes about itself.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub node: String,
    /// ms since the epoch of this announcement.
    pub at_ms: i64,
    pub partitions: Vec<u16>,
}

pub fn lease_key(partition: u16) -> String {
    format!("p-{partition}")
}

/// The live members, sorted: the keys of the members bucket whose last entry is an
/// announcement (not a leave).
///
/// Read without a consumer: the bucket stream's subjects (stream info, answered by the
/// stream's leader), then each key's last entry (a direct get, answered by any replica).
/// `keys()` creates an ordered consumer for every listing — every gateway, every third of a
/// TTL — which goes through the meta leader and, when a node died, did not come back for over
/// a minute.
pub async fn live_members(members: &kv::Store, limit: Duration) -> Result<Vec<String>, String> {
    let prefix = &members.prefix; // `$KV.{bucket}.`
    let listing = async {
        let mut subjects = members.stream.info_with_subjects(format!("{prefix}>")).await.map_err(|e| e.to_string())?;
        let mut keys = Vec::new();
        while let Some(entry) = subjects.next().await {
            let (subject, _count) = entry.map_err(|e| e.to_string())?;
            if let Some(key) = subject.strip_prefix(prefix.as_str()) {
                keys.push(key.to_owned());
            }
        }
        Ok::<_, String>(keys)
    };
    let keys = bounded(limit, listing).await?;
    let entries = bounded_each(limit, keys.iter().cloned(), |k| members.entry(k)).await;
    let mut live = Vec::new();
    for (key, entry) in keys.into_iter().zip(entries) {
        match entry? {
            Some(e) if e.operation == kv::Operation::Put => live.push(key),
            _ => {}
        }
    }
    live.sort();
    Ok(live)
}

struct Owner {
    cluster: Cluster,
    table: Arc<LeaseTable>,
    members: kv::Store,
    leases: kv::Store,
    ingest: jetstream::stream::Stream,
    inbound: mpsc::Sender<Inbound>,
    /// The incident manager's adoption hook, once it runs.
    adopt: watch::Receiver<Option<AdoptFn>>,
    ttl: Duration,
    /// Partition consumers running, by partition.
    workers: HashMap<u16, tokio::task::JoinHandle<()>>,
    /// Relays running, by partition ([`super::relay`]).
    relays: HashMap<u16, tokio::task::JoinHandle<()>>,
    /// The relays' JetStream context.
    relay_js: jetstream::Context,
    /// Leases held by others: (revision, when we first saw it), to take them after a silent TTL.
    observed: HashMap<u16, (u64, Instant)>,
    /// The members of the last listing that answered (kept while the cluster does not answer).
    live: Vec<String>,
    /// When a failed listing was last logged (one warning per TTL, not per round).
    listing_warned: Option<Instant>,
    metrics: Arc<PartitionMetrics>,
    /// Each partition's durable consumer once looked up, kept for its later workers.
    consumers: PartitionConsumers,
    /// Each partition's relay consumer once looked up, kept for its later relays.
    relay_consumers: PartitionConsumers,
}

/// What [`start`] hands back: the lease table (fencing), the per-partition figures for
/// `/metrics`, and the lease loop's task.
#[derive(Debug)]
pub struct Started {
    pub leases: Arc<LeaseTable>,
    pub metrics: Arc<PartitionMetrics>,
    pub task: tokio::task::JoinHandle<()>,
}

pub(super) async fn start(
    cluster: Cluster,
    inbound: mpsc::Sender<Inbound>,
    adopt: watch::Receiver<Option<AdoptFn>>,
    mut stop: watch::Receiver<bool>,
) -> Result<Started> {
    let members = cluster.members().await?;
    let leases = cluster.leases().await?;
    let ingest = cluster.js.get_stream(INGEST_STREAM).await.map_err(|e| super::js_err("opening the ingest stream")(&e))?;
    let table = Arc::new(LeaseTable::default());
    let metrics = Arc::new(PartitionMetrics::new(cluster.config.partitions, Arc::clone(&table)));
    let ttl = cluster.config.lease_ttl.0;
    let relay_js = jetstream::ContextBuilder::new().timeout(worker_call_timeout(ttl)).backpressure_on_inflight(true).build(cluster.client.clone());
    let mut owner = Owner {
        cluster,
        table: Arc::clone(&table),
        members,
        leases,
        ingest,
        inbound,
        adopt,
        ttl,
        workers: HashMap::new(),
        relays: HashMap::new(),
        relay_js,
        observed: HashMap::new(),
        live: Vec::new(),
        listing_warned: None,
        metrics: Arc::clone(&metrics),
        consumers: PartitionConsumers::default(),
        relay_consumers: PartitionConsumers::default(),
    };
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => owner.round().await,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            }
        }
        owner.leave().await;
    });
    Ok(Started { leases: table, metrics, task })
}

/// What a renewal came to.
enum Renewal {
    /// Renewed (the table already has the new revision).
    Renewed,
    /// The lease ran out before we could renew it (paused, or the cluster did not answer).
    Late,
    /// The server refused the expected revision: someone else wrote the key since.
    Refused(String),
    /// No answer in time: the lease stays valid until it runs out; the next round tries again.
    Unanswered(String),
}

impl Owner {
    fn node(&self) -> &str {
        &self.cluster.config.node
    }

    /// One round: renew every held lease while announcing and listing the members; then hand
    /// over what another member now wins and take what we win. Every call is bounded by
    /// [`call_timeout`] and the calls of one step run concurrently, so a node that died (or a
    /// stream electing its leader) costs a round at most one timeout per step.
    async fn round(&mut self) {
        let limit = call_timeout(self.ttl);
        let held: Vec<(u16, Held)> = self.table.all();
        let announce = Member { node: self.node().to_owned(), at_ms: crate::ingest::now_ms(), partitions: self.table.held() };
        let announcement = serde_json::to_vec(&announce).unwrap_or_default();
        let (renewals, announced, listed) = tokio::join!(
            futures_util::future::join_all(held.iter().map(|&(p, h)| self.renew(p, h, limit))),
            bounded(limit, self.members.put(self.node(), announcement.into())),
            live_members(&self.members, limit),
        );
        for (&(p, h), renewal) in held.iter().zip(renewals) {
            match renewal {
                Renewal::Renewed => self.metrics.renewed(p),
                Renewal::Late => {
                    // Another gateway may already have taken it. Stop acting; take it again
                    // below if the key still carries our name (then nobody took it).
                    tracing::warn!(partition = p, "cluster: lease ran out before its renewal (paused, or NATS did not answer); stopped acting on it");
                    self.lost(p, LeaseLoss::Expired);
                }
                Renewal::Refused(e) => {
                    tracing::warn!(partition = p, error = %e, "cluster: lease renewal refused; stopped acting on the partition");
                    self.lost(p, LeaseLoss::Refused);
                }
                Renewal::Unanswered(e) => {
                    tracing::warn!(partition = p, error = %e, valid_for_ms = h.valid_until.saturating_duration_since(Instant::now()).as_millis() as u64, "cluster: lease renewal unanswered; retrying next round");
                }
            }
        }
        if let Err(e) = announced {
            tracing::warn!(error = %e, "cluster: announcing membership failed");
        }
        match listed {
            Ok(live) => {
                self.live = live;
                self.listing_warned = None;
            }
            Err(e) => {
                if self.listing_warned.is_none_or(|at| at.elapsed() >= self.ttl) {
                    tracing::warn!(error = %e, members = ?self.live, "cluster: listing members failed; going on with the last list");
                    self.listing_warned = Some(Instant::now());
                }
            }
        }
        let mut live = self.live.clone();
        if !live.iter().any(|m| m == self.node()) {
            live.push(self.node().to_owned());
        }
        let mut release = Vec::new();
        let mut take = Vec::new();
        for p in 0..self.cluster.config.partitions {
            let wanted = rendezvous::owner(p, &live) == Some(self.node());
            let held = self.table.get(p);
            match (held, wanted) {
                (Some(h), false) => release.push((p, h)),
                (None, true) => take.push(p),
                (Some(_), true) | (None, false) => {}
            }
        }
        for &(p, _) in &release {
            // Stop acting first, then free the key so the new owner need not wait a TTL.
            self.lost(p, LeaseLoss::HandedOver);
            tracing::info!(partition = p, "cluster: handing the partition over");
        }
        // A partition held whose consumer ended (it saw the lease invalid for a moment): start
        // it again.
        let ended: Vec<u16> = self.table.held().into_iter().filter(|p| self.workers.get(p).is_none_or(|w| w.is_finished())).collect();
        for p in ended {
            self.spawn_worker(p);
        }
        let ended: Vec<u16> = self.table.held().into_iter().filter(|p| self.relays.get(p).is_none_or(|w| w.is_finished())).collect();
        for p in ended {
            self.spawn_relay(p);
        }
        let leases = &self.leases;
        let (released, entries) = tokio::join!(
            bounded_each(limit, release.iter().copied(), |(p, h)| leases.delete_expect_revision(lease_key(p), Some(h.revision))),
            bounded_each(limit, take.iter().copied(), |p| leases.entry(lease_key(p))),
        );
        for (&(p, _), result) in release.iter().zip(released) {
            if let Err(e) = result {
                tracing::debug!(partition = p, error = %e, "cluster: releasing the lease failed; it expires instead");
            }
        }
        let mut attempts = Vec::new();
        for (&p, entry) in take.iter().zip(entries) {
            match entry {
                Ok(entry) => {
                    if let Some(expected) = self.may_take(p, entry) {
                        attempts.push((p, expected));
                    }
                }
                Err(e) => tracing::debug!(partition = p, error = %e, "cluster: reading the lease failed"),
            }
        }
        let taken = futures_util::future::join_all(attempts.iter().map(|&(p, expected)| self.take(p, expected, limit))).await;
        for (&(p, _), won) in attempts.iter().zip(taken) {
            match won {
                Ok(revision) => {
                    self.observed.remove(&p);
                    self.metrics.acquired(p);
                    tracing::info!(partition = p, token = revision, "cluster: partition acquired");
                    self.spawn_worker(p);
                    self.spawn_relay(p);
                }
                Err(e) => tracing::debug!(partition = p, error = %e, "cluster: lost the race for the lease"),
            }
        }
    }

    /// Renews one lease with its revision as the expected one; a success goes into the table
    /// at once (valid from the send time).
    async fn renew(&self, p: u16, h: Held, limit: Duration) -> Renewal {
        let sent = Instant::now();
        if h.valid_until <= sent {
            return Renewal::Late;
        }
        // An answer after the lease ran out is of no use: it is then renewed as a take.
        let limit = limit.min(h.valid_until - sent);
        match tokio::time::timeout(limit, self.leases.update(lease_key(p), self.node().as_bytes().to_vec().into(), h.revision)).await {
            Ok(Ok(revision)) => {
                self.table.hold(p, Held { revision, valid_until: sent + self.ttl });
                Renewal::Renewed
            }
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Renewal::Refused(e.to_string()),
            Ok(Err(e)) => Renewal::Unanswered(e.to_string()),
            Err(_) => Renewal::Unanswered(format!("no answer within {limit:?}")),
        }
    }

    /// Whether a partition we want and do not hold may be taken now, and with which expected
    /// revision: a free key at once; a key in our own name at once (no other gateway writes our
    /// name, so it is a renewal whose answer was lost or came too late, or this gateway's
    /// previous run; the expected revision proves nobody took it since); another holder's key
    /// once its revision has stood still for a whole TTL on our clock.
    fn may_take(&mut self, p: u16, entry: Option<kv::Entry>) -> Option<u64> {
        match entry {
            None => Some(0),
            Some(e) if e.operation != kv::Operation::Put => Some(e.revision),
            Some(e) if e.value[..] == *self.node().as_bytes() => Some(e.revision),
            Some(e) => {
                let now = Instant::now();
                let seen = self.observed.entry(p).or_insert((e.revision, now));
                if seen.0 != e.revision {
                    *seen = (e.revision, now);
                }
                if now.duration_since(seen.1) <= self.ttl {
                    return None;
                }
                tracing::info!(partition = p, holder = %String::from_utf8_lossy(&e.value), "cluster: lease silent for a whole TTL; taking it");
                Some(e.revision)
            }
        }
    }

    /// Writes our name over `expected`; a success goes into the table (valid from the send
    /// time).
    async fn take(&self, p: u16, expected: u64, limit: Duration) -> Result<u64, String> {
        let sent = Instant::now();
        let revision = bounded(limit, self.leases.update(lease_key(p), self.node().as_bytes().to_vec().into(), expected)).await?;
        self.table.hold(p, Held { revision, valid_until: sent + self.ttl });
        Ok(revision)
    }

    fn lost(&mut self, p: u16, why: LeaseLoss) {
        if self.table.drop_lease(p) {
            self.metrics.lost(p, why);
        }
        if let Some(w) = self.workers.remove(&p) {
            w.abort();
        }
        if let Some(r) = self.relays.remove(&p) {
            r.abort();
        }
    }

    /// The partition's relay runs beside its worker, from the lease on: it does not wait for the
    /// takeover's reads, and the worker's consumer takes in what it relays.
    fn spawn_relay(&mut self, p: u16) {
        let relay = Relay {
            partition: p,
            js: self.relay_js.clone(),
            table: Arc::clone(&self.table),
            ack_wait: self.ttl,
            limit: worker_call_timeout(self.ttl),
            consumers: self.relay_consumers.clone(),
            metrics: Arc::clone(&self.metrics),
        };
        if let Some(old) = self.relays.insert(p, tokio::spawn(relay.run())) {
            old.abort();
        }
    }

    fn spawn_worker(&mut self, p: u16) {
        let worker = Worker {
            partition: p,
            js: self.cluster.js.clone(),
            ingest: self.ingest.clone(),
            table: Arc::clone(&self.table),
            inbound: self.inbound.clone(),
            adopt: self.adopt.clone(),
            ack_wait: self.ttl,
            limit: worker_call_timeout(self.ttl),
            metrics: Arc::clone(&self.metrics),
            consumers: self.consumers.clone(),
            relay_since_ms: self.cluster.relay_since.get(usize::from(p)).copied().unwrap_or(i64::MAX),
            replay_window: self.cluster.config.replay_window.0,
            handed_up_to: 0,
            partitions: self.cluster.config.partitions,
        };
        if let Some(old) = self.workers.insert(p, tokio::spawn(worker.run())) {
            old.abort();
        }
    }

    /// Graceful leave: stop consuming, free every lease and the member entry at once.
    async fn leave(&mut self) {
        let limit = call_timeout(self.ttl);
        let held: Vec<(u16, Held)> = self.table.all();
        for &(p, _) in &held {
            self.lost(p, LeaseLoss::HandedOver);
        }
        let leases = &self.leases;
        bounded_each(limit, held.iter().copied(), |(p, h)| leases.delete_expect_revision(lease_key(p), Some(h.revision))).await;
        let _ = bounded(limit, self.members.purge(self.node())).await;
    }
}

/// Takes over one partition: first its unclosed incidents from the incident log and its
/// devices' last statuses from the ingest stream ([`super::adopt`]), then the messages of its
/// last `replay_window` the old owner took in ([`super::replay`]), then its messages from the
/// ingest stream through its durable consumer `part-{p}` (shared by whoever owns the partition,
/// so a new owner resumes at the old owner's ack floor).
struct Worker {
    partition: u16,
    js: jetstream::Context,
    ingest: jetstream::stream::Stream,
    table: Arc<LeaseTable>,
    inbound: mpsc::Sender<Inbound>,
    adopt: watch::Receiver<Option<AdoptFn>>,
    ack_wait: Duration,
    /// The longest one JetStream call may wait ([`worker_call_timeout`]).
    limit: Duration,
    metrics: Arc<PartitionMetrics>,
    consumers: PartitionConsumers,
    /// When the partition's relay consumer was created: a plain copy of a QoS 1 message stored
    /// since then is skipped, the relayed copy counts ([`super::relay::is_plain_copy`]).
    relay_since_ms: i64,
    /// `[cluster] replay_window`: how far back a takeover replays the partition (zero: not at all).
    replay_window: Duration,
    /// Partitions of the cluster (`[cluster] partitions`): a message's site must map to this one.
    partitions: u16,
    /// The newest stream sequence handed to the pipeline by this worker (0: none yet), where a
    /// later catch-up begins ([`Worker::catch_up`]).
    handed_up_to: u64,
}

/// The steps of a worker, in order; each is retried until it succeeds or the lease is gone.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Not one message before the partition's incidents are in the book: a continuing
    /// condition must find its incident, not open a second one.
    AdoptIncidents,
    /// Then the devices the previous owner registered, before their next message.
    RestoreDevices,
    /// Then what the previous owner took in lately, so the rule windows go on: before the
    /// consumer's first message, which comes after them.
    ReplayWindow,
    /// Then the partition's messages, until the lease is gone.
    Consume,
}

impl Step {
    fn failed(self) -> &'static str {
        match self {
            Step::AdoptIncidents => "adopting the partition's incidents",
            Step::RestoreDevices => "reading the partition's device statuses",
            Step::ReplayWindow => "replaying the partition's recent messages",
            Step::Consume => "consuming the partition",
        }
    }
}

impl Worker {
    async fn run(mut self) {
        let p = self.partition;
        let started = Instant::now();
        for step in [Step::AdoptIncidents, Step::RestoreDevices, Step::ReplayWindow, Step::Consume] {
            let mut waits = waits();
            loop {
                if !self.table.holds(p) {
                    return;
                }
                let result = match step {
                    Step::AdoptIncidents => self.adopt_incidents().await,
                    Step::RestoreDevices => self.restore_devices().await,
                    Step::ReplayWindow => self.replay_window().await,
                    Step::Consume => self.consume().await,
                };
                match result {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "cluster: {} failed; retrying", step.failed());
                        tokio::time::sleep(waits.next().unwrap_or(Duration::from_secs(2))).await;
                    }
                }
            }
            if matches!(step, Step::ReplayWindow) {
                self.metrics.took_over(p, started.elapsed());
                tracing::info!(partition = p, took_ms = started.elapsed().as_millis() as u64, "cluster: partition taken over; consuming it");
            }
        }
    }

    async fn adopt_incidents(&mut self) -> Result<(), String> {
        let p = self.partition;
        let adopt = self.adopt.wait_for(Option::is_some).await.map_err(|_| "the gateway is stopping".to_owned())?.clone();
        let Some(adopt) = adopt else { return Err("no incident manager".into()) };
        // Closed within the replay window too: a replayed alarm must not open again what an
        // operator just closed.
        let closed_since_ms = crate::ingest::now_ms() - i64::try_from(self.replay_window.as_millis()).unwrap_or(i64::MAX);
        let incidents = super::adopt::unclosed(&self.js, p, closed_since_ms, self.limit).await?;
        if incidents.is_empty() {
            return Ok(());
        }
        let found = incidents.len();
        let changed = adopt(incidents).await?;
        tracing::info!(partition = p, found, changed, "cluster: adopted the partition's incidents from the log (unclosed, or closed within the replay window)");
        Ok(())
    }

    /// Every device's last status of the partition, into the pipeline as restored (see
    /// [`Origin::Restored`]) ahead of the partition's messages (one channel, in order).
    async fn restore_devices(&mut self) -> Result<(), String> {
        let statuses = super::adopt::last_statuses(&self.ingest, self.partition, self.partitions, self.limit).await?;
        let found = statuses.len();
        for (topic, payload, stored_ms) in statuses {
            if !self.table.holds(self.partition) {
                return Ok(());
            }
            if self.inbound.send(Inbound { topic, payload, received_ms: stored_ms, ack: None, origin: Origin::Restored }).await.is_err() {
                return Ok(());
            }
        }
        if found > 0 {
            tracing::info!(partition = self.partition, devices = found, "cluster: restored the partition's devices from their last status in the ingest stream");
        }
        Ok(())
    }

    /// The partition's messages stored since now − `replay_window` up to its consumer's ack
    /// floor, into the pipeline as replayed ([`Origin::Replayed`]) in stream order, ahead of the
    /// consumer's first message (one channel, in order). They are all read before the first is
    /// sent, so they reach the decode stage as one burst (its rule timers wait while a replay
    /// is fed). Best effort: when the reads fail [`READ_ATTEMPTS`] times the partition is
    /// consumed without them (logged) — its windows then start over, as before replays existed.
    async fn replay_window(&mut self) -> Result<(), String> {
        let p = self.partition;
        if self.replay_window.is_zero() {
            return Ok(());
        }
        let started = Instant::now();
        let from_ms = crate::ingest::now_ms() - i64::try_from(self.replay_window.as_millis()).unwrap_or(i64::MAX);
        let filter = format!("{}.{p}.>", super::nats_config::PARTITION_PREFIX);
        let client = self.js.client();
        let limit = self.limit;
        // An attempt ends within 4 limits: the lookup and the ack floor take at most 2, the read
        // starts no batch past 2 limits from the attempt's start (or 1 from its own), and the
        // batch under way takes at most 1 more.
        let read = retried(limit * 4, READ_ATTEMPTS, || async {
            let deadline = Instant::now() + limit * 2;
            let consumer = self.consumer().await?;
            let floor = bounded(limit, consumer.get_info()).await?.ack_floor.stream_sequence;
            if floor == 0 {
                return Ok(super::replay::Window::default());
            }
            super::replay::read(&client, INGEST_STREAM, &filter, Start::At(from_ms), floor, limit, deadline.max(Instant::now() + limit)).await
        })
        .await;
        let window = match read {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cluster: the partition's recent messages could not be read; consuming it without replaying them (its rule windows start over)");
                return Ok(());
            }
        };
        let (mut replayed, mut skipped) = (0usize, 0usize);
        for message in window.messages {
            if !self.table.holds(p) {
                return Ok(());
            }
            let Routed::Topic(topic) = routed_topic(message.subject.as_str(), self.partitions) else { continue };
            let stored_ms = (message.time.unix_timestamp_nanos() / 1_000_000) as i64;
            if is_plain_copy(Some(&message.headers), stored_ms, self.relay_since_ms) {
                skipped += 1;
                continue;
            }
            if self.inbound.send(Inbound { topic, payload: message.payload, received_ms: stored_ms, ack: None, origin: Origin::Replayed }).await.is_err() {
                return Ok(());
            }
            replayed += 1;
        }
        self.metrics.replayed(p, replayed);
        let took_ms = started.elapsed().as_millis() as u64;
        if window.cut_short || window.dropped > 0 {
            tracing::warn!(partition = p, replayed, dropped_oldest = window.dropped, cut_short = window.cut_short, took_ms, "cluster: replayed only part of the partition's recent messages (bounded by count and time)");
        } else if replayed > 0 {
            tracing::info!(partition = p, replayed, plain_copies_skipped = skipped, took_ms, "cluster: replayed the partition's recent messages through the rules");
        }
        Ok(())
    }

    /// The partition's durable consumer: the one looked up before, or looked up (created if
    /// missing) within [`Worker::limit`].
    async fn consumer(&self) -> Result<jetstream::consumer::PullConsumer, String> {
        let p = self.partition;
        self.consumers
            .get(p, || async {
                let name = format!("part-{p}");
                let config = pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("{}.{p}.>", super::nats_config::PARTITION_PREFIX),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    // Unacknowledged messages of a dead owner come back after this: the lease
                    // TTL, so failover replays them within TTL + replay.
                    ack_wait: self.ack_wait,
                    max_ack_pending: 20_000,
                    ..Default::default()
                };
                bounded(self.limit, self.ingest.get_or_create_consumer(&name, config)).await.map_err(|e| format!("consumer {name}: {e}"))
            })
            .await
    }

    /// What the consumer delivered after its ack floor that nobody acknowledged and this
    /// worker did not hand on — a dead owner's messages in flight, or a pull lost with a NATS
    /// node — into the pipeline in stream order before the consumer's next pull, as taken in
    /// but without an ack: the consumer brings each again after `ack_wait`, and the device's
    /// `seq` then tells it for a duplicate (acknowledged, not stored twice). Without this the
    /// consumer delivers the newer messages first and these up to `ack_wait` later, when a
    /// device that sent more than [`crate::registry::SEQ_WINDOW`] messages meanwhile has them
    /// taken for duplicates and dropped. Best effort: what a failed read leaves out comes back
    /// by redelivery, as before.
    async fn catch_up(&mut self, consumer: &jetstream::consumer::PullConsumer) {
        let p = self.partition;
        let limit = self.limit;
        let client = self.js.client();
        let filter = format!("{}.{p}.>", super::nats_config::PARTITION_PREFIX);
        let read = async {
            let info = bounded(limit, consumer.clone().get_info()).await?;
            let from = (info.ack_floor.stream_sequence + 1).max(self.handed_up_to + 1);
            let up_to = info.delivered.stream_sequence;
            if up_to < from {
                return Ok(None);
            }
            let window = super::replay::read(&client, INGEST_STREAM, &filter, Start::Seq(from), up_to, limit, Instant::now() + limit * 2).await?;
            Ok::<_, String>(Some((from, up_to, window)))
        };
        let (from, up_to, window) = match read.await {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cluster: could not read back the partition's unacknowledged messages; the consumer redelivers them after its ack wait");
                return;
            }
        };
        let mut handed = 0usize;
        for message in window.messages {
            if !self.table.holds(p) {
                return;
            }
            let Routed::Topic(topic) = routed_topic(message.subject.as_str(), self.partitions) else { continue };
            let stored_ms = (message.time.unix_timestamp_nanos() / 1_000_000) as i64;
            self.handed_up_to = self.handed_up_to.max(message.sequence);
            if is_plain_copy(Some(&message.headers), stored_ms, self.relay_since_ms) {
                continue;
            }
            if self.inbound.send(Inbound { topic, payload: message.payload, received_ms: stored_ms, ack: None, origin: Origin::Live }).await.is_err() {
                return;
            }
            handed += 1;
        }
        self.metrics.caught_up(p, handed);
        if handed > 0 || window.cut_short {
            tracing::info!(partition = p, from_seq = from, up_to_seq = up_to, handed, cut_short = window.cut_short, "cluster: caught up with the partition's delivered but unacknowledged messages, in stream order");
        }
    }

    async fn consume(&mut self) -> Result<(), String> {
        let p = self.partition;
        let consumer = self.consumer().await?;
        self.catch_up(&consumer).await;
        // Short pulls with heartbeats: when the consumer's leader dies with a NATS node, the
        // pull it held is gone with it; a missed heartbeat ends this stream within
        // 2 × PULL_HEARTBEAT and the worker pulls again from the new leader (the client's
        // defaults, 30 s pulls and 15 s heartbeats, left a partition idle for half a minute).
        let mut messages = bounded(self.limit, consumer.stream().expires(PULL_EXPIRES).heartbeat(PULL_HEARTBEAT).messages()).await?;
        let runtime = tokio::runtime::Handle::current();
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(m) => m,
                // The leader went quiet: pull again from the same consumer.
                Err(e) if e.kind() == pull::MessagesErrorKind::MissingHeartbeat => return Err(e.to_string()),
                // Deleted, or no responder: look it up (or create it) again next time.
                Err(e) => {
                    self.consumers.forget(p);
                    return Err(e.to_string());
                }
            };
            // Fencing: not one message more once the lease is gone (the next owner gets it
            // again after ack_wait, since we never acknowledge it).
            if !self.table.holds(p) {
                return Ok(());
            }
            let topic = match routed_topic(message.subject.as_str(), self.partitions) {
                Routed::Topic(topic) => topic,
                // Not a device subject: acknowledge it away.
                Routed::NotDevice => {
                    let _ = message.ack().await;
                    continue;
                }
                Routed::Misrouted => {
                    if self.metrics.misrouted(p) == 1 {
                        tracing::warn!(partition = p, subject = %message.subject, "cluster: a device message published straight onto another partition than its site's was dropped (counted in citywatch_cluster_partition_misrouted_total)");
                    }
                    let _ = message.ack().await;
                    continue;
                }
            };
            let (received_ms, pending) = match message.info() {
                Ok(i) => {
                    self.handed_up_to = self.handed_up_to.max(i.stream_sequence);
                    ((i.published.unix_timestamp_nanos() / 1_000_000) as i64, i.pending)
                }
                Err(_) => (crate::ingest::now_ms(), 0),
            };
            if is_plain_copy(message.headers.as_ref(), received_ms, self.relay_since_ms) {
                // The relay brings this QoS 1 message (the copy its PUBACK stands for).
                let _ = message.ack().await;
                continue;
            }
            let payload = message.payload.clone();
            let rt = runtime.clone();
            let table = Arc::clone(&self.table);
            let ack = Ack::new(move || {
                // Fenced: a lease lost before the commit (or the log append) ends leaves the
                // message to the next owner, which takes it in again.
                if !table.holds(p) {
                    return;
                }
                rt.spawn(async move {
                    if let Err(e) = message.ack().await {
                        tracing::debug!(error = %e, "cluster: ack failed; the message is redelivered");
                    }
                });
            });
            if self.inbound.send(Inbound { topic, payload, received_ms, ack: Some(ack), origin: Origin::Live }).await.is_err() {
                return Ok(());
            }
            self.metrics.taken_in(p, pending);
        }
        Err("message stream ended".into())
    }
}

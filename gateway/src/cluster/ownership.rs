//! Membership and partition leases: which gateway acts on which partition, and proof of it.
//!
//! Every tick (a third of the lease TTL) a gateway (1) announces itself in the members bucket,
//! whose entries expire one TTL after their last put; (2) computes, by rendezvous hashing over
//! the live members, the partitions it should own; (3) renews the leases it holds with
//! `update(key, me, expected_revision)` — the revision is the fencing token, a lease another
//! gateway has taken cannot be renewed — releases those another member should now own, and
//! takes the ones it should own once they are free or their revision has not moved for a whole
//! TTL on its own clock.
//!
//! Safety without synchronised clocks: a holder's lease counts as valid until the instant it
//! *sent* its last successful renewal plus TTL (monotonic clock); a taker waits a full TTL after
//! it *saw* that revision, which is later. The holder checks [`LeaseTable::holds`] before it hands
//! a message on and before every command or push, so after a pause longer than the TTL (SIGSTOP,
//! a partition from NATS) it sends nothing for the partition before it has renewed — and renewing
//! fails once another gateway took it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, kv};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};

use super::adopt::AdoptFn;
use super::{rendezvous, topic_of_subject, Cluster, Result, INGEST_STREAM};
use crate::ingest::{Ack, Inbound};

/// A lease this gateway holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// The KV revision of our last write: the fencing token.
    revision: u64,
    /// Sent time of the last successful renewal + TTL.
    valid_until: Instant,
}

/// The partitions this gateway holds right now; shared by the ownership loop, the partition
/// consumers, the command publisher and the push channels.
#[derive(Debug, Default)]
pub struct LeaseTable {
    held: Mutex<HashMap<u16, Held>>,
}

impl LeaseTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<u16, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this gateway may act on `partition` at this instant.
    pub fn holds(&self, partition: u16) -> bool {
        self.lock().get(&partition).is_some_and(|h| h.valid_until > Instant::now())
    }

    /// The fencing token of a held partition.
    pub fn token(&self, partition: u16) -> Option<u64> {
        self.lock().get(&partition).filter(|h| h.valid_until > Instant::now()).map(|h| h.revision)
    }

    /// Held partitions, sorted.
    pub fn held(&self) -> Vec<u16> {
        let now = Instant::now();
        let mut v: Vec<u16> = self.lock().iter().filter(|(_, h)| h.valid_until > now).map(|(p, _)| *p).collect();
        v.sort_unstable();
        v
    }
}

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
    /// Leases held by others: (revision, when we first saw it), to take them after a silent TTL.
    observed: HashMap<u16, (u64, Instant)>,
}

pub(super) async fn start(
    cluster: Cluster,
    inbound: mpsc::Sender<Inbound>,
    adopt: watch::Receiver<Option<AdoptFn>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(Arc<LeaseTable>, tokio::task::JoinHandle<()>)> {
    let members = cluster.members().await?;
    let leases = cluster.leases().await?;
    let ingest = cluster.js.get_stream(INGEST_STREAM).await.map_err(|e| super::js_err("opening the ingest stream")(&e))?;
    let table = Arc::new(LeaseTable::default());
    let ttl = cluster.config.lease_ttl.0;
    let mut owner = Owner { cluster, table: Arc::clone(&table), members, leases, ingest, inbound, adopt, ttl, workers: HashMap::new(), observed: HashMap::new() };
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
    Ok((table, task))
}

impl Owner {
    fn node(&self) -> &str {
        &self.cluster.config.node
    }

    /// One round: announce, compute the wanted set, renew / release / take.
    async fn round(&mut self) {
        let announce = Member { node: self.node().to_owned(), at_ms: crate::ingest::now_ms(), partitions: self.table.held() };
        if let Err(e) = self.members.put(self.node(), serde_json::to_vec(&announce).unwrap_or_default().into()).await {
            tracing::warn!(error = %e, "cluster: announcing membership failed");
        }
        let mut live = match self.live_members().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: listing members failed; renewing only");
                Vec::new()
            }
        };
        if !live.iter().any(|m| m == self.node()) {
            live.push(self.node().to_owned());
        }
        for p in 0..self.cluster.config.partitions {
            let wanted = rendezvous::owner(p, &live) == Some(self.node());
            let held = self.table.lock().get(&p).copied();
            match (held, wanted) {
                (Some(h), true) => self.renew(p, h).await,
                (Some(h), false) => self.release(p, h).await,
                (None, true) => self.try_take(p).await,
                (None, false) => {}
            }
        }
    }

    async fn live_members(&self) -> Result<Vec<String>, String> {
        let mut keys = self.members.keys().await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            out.push(k.map_err(|e| e.to_string())?);
        }
        out.sort();
        Ok(out)
    }

    fn lost(&mut self, p: u16) {
        self.table.lock().remove(&p);
        if let Some(w) = self.workers.remove(&p) {
            w.abort();
        }
    }

    async fn renew(&mut self, p: u16, h: Held) {
        let sent = Instant::now();
        if h.valid_until <= sent {
            // Too late: another gateway may already have taken it. Stop acting, then try again
            // as a newcomer (it waits a whole TTL of silence, or finds our revision intact).
            tracing::warn!(partition = p, "cluster: lease expired before renewal (paused?); stopped acting on it");
            self.lost(p);
            self.observed.insert(p, (h.revision, sent));
            return;
        }
        match self.leases.update(super::ownership::lease_key(p), self.node().as_bytes().to_vec().into(), h.revision).await {
            Ok(revision) => {
                self.table.lock().insert(p, Held { revision, valid_until: sent + self.ttl });
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cluster: lease renewal refused; stopped acting on the partition");
                self.lost(p);
            }
        }
    }

    async fn release(&mut self, p: u16, h: Held) {
        // Stop acting first, then free the key so the new owner need not wait a TTL.
        self.lost(p);
        tracing::info!(partition = p, "cluster: handing the partition over");
        if let Err(e) = self.leases.delete_expect_revision(lease_key(p), Some(h.revision)).await {
            tracing::debug!(partition = p, error = %e, "cluster: releasing the lease failed; it expires instead");
        }
    }

    async fn try_take(&mut self, p: u16) {
        let key = lease_key(p);
        let entry = match self.leases.entry(key.clone()).await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(partition = p, error = %e, "cluster: reading the lease failed");
                return;
            }
        };
        let expected = match entry {
            None => 0,
            Some(e) if e.operation != kv::Operation::Put => e.revision,
            Some(e) => {
                let now = Instant::now();
                let seen = self.observed.entry(p).or_insert((e.revision, now));
                if seen.0 != e.revision {
                    *seen = (e.revision, now);
                }
                if now.duration_since(seen.1) <= self.ttl {
                    return;
                }
                tracing::info!(partition = p, holder = %String::from_utf8_lossy(&e.value), "cluster: lease silent for a whole TTL; taking it");
                e.revision
            }
        };
        let sent = Instant::now();
        match self.leases.update(&key, self.node().as_bytes().to_vec().into(), expected).await {
            Ok(revision) => {
                self.observed.remove(&p);
                self.table.lock().insert(p, Held { revision, valid_until: sent + self.ttl });
                tracing::info!(partition = p, token = revision, "cluster: partition acquired");
                self.spawn_worker(p);
            }
            Err(e) => tracing::debug!(partition = p, error = %e, "cluster: lost the race for the lease"),
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
        };
        self.workers.insert(p, tokio::spawn(worker.run()));
    }

    /// Graceful leave: stop consuming, free every lease and the member entry at once.
    async fn leave(&mut self) {
        let held: Vec<(u16, Held)> = self.table.lock().iter().map(|(p, h)| (*p, *h)).collect();
        for (p, h) in held {
            self.release(p, h).await;
        }
        let _ = self.members.purge(self.node()).await;
    }
}

/// Takes over one partition: first its unclosed incidents from the incident log
/// ([`super::adopt`]), then its messages from the ingest stream through its durable consumer
/// `part-{p}` (shared by whoever owns the partition, so a new owner resumes at the old owner's
/// ack floor).
struct Worker {
    partition: u16,
    js: jetstream::Context,
    ingest: jetstream::stream::Stream,
    table: Arc<LeaseTable>,
    inbound: mpsc::Sender<Inbound>,
    adopt: watch::Receiver<Option<AdoptFn>>,
    ack_wait: Duration,
}

impl Worker {
    async fn run(mut self) {
        let p = self.partition;
        let mut backoff = Duration::from_millis(200);
        // Not one message before the partition's incidents are in the book: a continuing
        // condition must find its incident, not open a second one.
        while self.table.holds(p) {
            match self.adopt_incidents().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "cluster: adopting the partition's incidents failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        backoff = Duration::from_millis(200);
        while self.table.holds(p) {
            match self.consume().await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "cluster: partition consumer failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn adopt_incidents(&mut self) -> Result<(), String> {
        let p = self.partition;
        let adopt = self.adopt.wait_for(Option::is_some).await.map_err(|_| "the gateway is stopping".to_owned())?.clone();
        let Some(adopt) = adopt else { return Err("no incident manager".into()) };
        let incidents = super::adopt::unclosed(&self.js, p).await?;
        if incidents.is_empty() {
            return Ok(());
        }
        let found = incidents.len();
        let changed = adopt(incidents).await?;
        tracing::info!(partition = p, found, changed, "cluster: adopted the partition's unclosed incidents from the log");
        Ok(())
    }

    async fn consume(&self) -> Result<(), String> {
        let p = self.partition;
        let name = format!("part-{p}");
        let consumer: jetstream::consumer::Consumer<pull::Config> = self
            .ingest
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("{}.{p}.>", super::nats_config::PARTITION_PREFIX),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    // Unacknowledged messages of a dead owner come back after this: the lease
                    // TTL, so failover replays them within TTL + replay.
                    ack_wait: self.ack_wait,
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Handle::current();
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| e.to_string())?;
            // Fencing: not one message more once the lease is gone (the next owner gets it
            // again after ack_wait, since we never acknowledge it).
            if !self.table.holds(p) {
                return Ok(());
            }
            let Some((_, topic)) = topic_of_subject(message.subject.as_str()) else {
                // Not a device subject: acknowledge it away.
                let _ = message.ack().await;
                continue;
            };
            let received_ms = message.info().map(|i| (i.published.unix_timestamp_nanos() / 1_000_000) as i64).unwrap_or_else(|_| crate::ingest::now_ms());
            let payload = message.payload.clone();
            let rt = runtime.clone();
            let ack = Ack::new(move || {
                rt.spawn(async move {
                    if let Err(e) = message.ack().await {
                        tracing::debug!(error = %e, "cluster: ack failed; the message is redelivered");
                    }
                });
            });
            if self.inbound.send(Inbound { topic, payload, received_ms, ack: Some(ack) }).await.is_err() {
                return Ok(());
            }
        }
        Err("message stream ended".into())
    }
}

//! Per-partition figures of one gateway in cluster mode, on its `/metrics`: which partitions it
//! owns, what each partition's consumer took in and has left, how its leases fare (renewals,
//! acquisitions, losses by reason), how long its last takeover took, what takeovers replayed and what
//! restarted pulls caught up with.
//!
//! Counted where it happens (the lease loop, the partition workers) into plain atomics and read
//! at scrape time. Not here: the cluster-wide view (every partition's owner and lag, whoever
//! holds it), which `citywatch cluster status` reads from NATS.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::LeaseTable;
use crate::metrics::{counter_family, gauge, gauge_family};

/// Why this gateway stopped acting on a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLoss {
    /// The lease ran out before a renewal was answered (paused, or NATS did not answer).
    Expired,
    /// A renewal was refused: another gateway wrote the lease since.
    Refused,
    /// Rendezvous hashing gave the partition to another member; released.
    HandedOver,
}

impl LeaseLoss {
    const ALL: [LeaseLoss; 3] = [LeaseLoss::Expired, LeaseLoss::Refused, LeaseLoss::HandedOver];

    pub fn as_str(self) -> &'static str {
        match self {
            LeaseLoss::Expired => "expired",
            LeaseLoss::Refused => "refused",
            LeaseLoss::HandedOver => "handed_over",
        }
    }
}

/// One partition's counters.
#[derive(Debug, Default)]
struct Figures {
    /// Messages of the partition's consumer handed to the pipeline.
    messages: AtomicU64,
    /// The consumer's messages not yet delivered, as of the last message delivered here.
    lag: AtomicU64,
    renewals: AtomicU64,
    acquisitions: AtomicU64,
    losses: [AtomicU64; 3],
    /// Milliseconds the last takeover's reads took (incidents adopted, devices restored, recent
    /// messages replayed).
    takeover_ms: AtomicU64,
    /// Messages takeovers replayed through the rules ([`super::replay`]).
    replayed: AtomicU64,
    /// Messages the partition's consumer had delivered and nobody acknowledged, read back and
    /// handed on in stream order when a pull (re)started here.
    caught_up: AtomicU64,
    /// The same for the partition's relay consumer: published into the ingest stream again.
    relay_caught_up: AtomicU64,
    /// Device messages on this partition's subject whose site the mapping puts elsewhere.
    misrouted: AtomicU64,
}

/// The figures of every partition of the cluster, as this gateway saw them.
#[derive(Debug)]
pub struct PartitionMetrics {
    partitions: Vec<Figures>,
    leases: Arc<LeaseTable>,
}

impl PartitionMetrics {
    pub fn new(partitions: u16, leases: Arc<LeaseTable>) -> PartitionMetrics {
        PartitionMetrics { partitions: (0..partitions).map(|_| Figures::default()).collect(), leases }
    }

    fn of(&self, partition: u16) -> Option<&Figures> {
        self.partitions.get(usize::from(partition))
    }

    /// A message handed to the pipeline; `pending` = what the consumer has left after it.
    pub fn taken_in(&self, partition: u16, pending: u64) {
        if let Some(f) = self.of(partition) {
            f.messages.fetch_add(1, Ordering::Relaxed);
            f.lag.store(pending, Ordering::Relaxed);
        }
    }

    pub fn renewed(&self, partition: u16) {
        if let Some(f) = self.of(partition) {
            f.renewals.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn acquired(&self, partition: u16) {
        if let Some(f) = self.of(partition) {
            f.acquisitions.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn lost(&self, partition: u16, why: LeaseLoss) {
        if let Some(f) = self.of(partition) {
            f.losses[why as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A takeover fed `messages` of the partition's recent past through the rules.
    pub fn replayed(&self, partition: u16, messages: usize) {
        if let Some(f) = self.of(partition) {
            f.replayed.fetch_add(messages as u64, Ordering::Relaxed);
        }
    }

    /// A (re)started pull of the partition's consumer handed on `messages` read back past its
    /// ack floor.
    pub fn caught_up(&self, partition: u16, messages: usize) {
        if let Some(f) = self.of(partition) {
            f.caught_up.fetch_add(messages as u64, Ordering::Relaxed);
        }
    }

    /// A (re)started relay of the partition published `messages` read back past its ack floor.
    pub fn relay_caught_up(&self, partition: u16, messages: usize) {
        if let Some(f) = self.of(partition) {
            f.relay_caught_up.fetch_add(messages as u64, Ordering::Relaxed);
        }
    }

    /// A device message on the partition's subject whose site is another partition's was
    /// dropped ([`super::Routed::Misrouted`]); answers how many so far.
    pub fn misrouted(&self, partition: u16) -> u64 {
        self.of(partition).map_or(0, |f| f.misrouted.fetch_add(1, Ordering::Relaxed) + 1)
    }

    pub fn took_over(&self, partition: u16, took: Duration) {
        if let Some(f) = self.of(partition) {
            f.takeover_ms.store(took.as_millis() as u64, Ordering::Relaxed);
        }
    }
}

/// Names without `_total`: counters get it when encoded.
impl Collector for PartitionMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let e = &mut encoder;
        let held = self.leases.held();
        let label = |p: usize| [("partition", p.to_string())];
        let each = |read: fn(&Figures) -> u64| self.partitions.iter().enumerate().map(move |(p, f)| (label(p), read(f)));
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(e, "citywatch_cluster_partitions_owned", "Partitions whose lease this gateway holds now.", held.len() as u64)?;
        let owned = (0..self.partitions.len()).map(|p| (label(p), u64::from(u16::try_from(p).is_ok_and(|p| held.contains(&p)))));
        gauge_family(e, "citywatch_cluster_partition_owned", "1 while this gateway holds the partition's lease.", owned)?;
        let lag = held.iter().filter_map(|&p| self.of(p).map(|f| (label(usize::from(p)), get(&f.lag))));
        gauge_family(e, "citywatch_cluster_partition_lag", "An owned partition's messages not yet delivered by its consumer, as of the last one delivered here.", lag)?;
        counter_family(e, "citywatch_cluster_partition_messages", "Messages of the partition handed to the pipeline by this gateway.", each(|f| f.messages.load(Ordering::Relaxed)))?;
        counter_family(e, "citywatch_cluster_partition_replayed", "Messages of the partition this gateway's takeovers replayed through the rules (taken in by the previous owner).", each(|f| f.replayed.load(Ordering::Relaxed)))?;
        counter_family(e, "citywatch_cluster_partition_caught_up", "Messages the partition's consumer had delivered and nobody acknowledged (a dead owner's in flight, a pull lost with a NATS node), read back and handed to the pipeline in stream order when its pull (re)started here.", each(|f| f.caught_up.load(Ordering::Relaxed)))?;
        counter_family(e, "citywatch_cluster_partition_relay_caught_up", "QoS 1 messages the partition's relay consumer had delivered and nobody acknowledged, read back and published into the ingest stream in order when its relay (re)started here.", each(|f| f.relay_caught_up.load(Ordering::Relaxed)))?;
        counter_family(e, "citywatch_cluster_partition_misrouted", "Device messages published straight onto the partition's subject while the mapping puts their site in another partition: acknowledged and dropped (they would split a site between two owners).", each(|f| f.misrouted.load(Ordering::Relaxed)))?;
        counter_family(e, "citywatch_cluster_lease_renewals", "Lease renewals of the partition that succeeded.", each(|f| f.renewals.load(Ordering::Relaxed)))?;
        counter_family(e, "citywatch_cluster_lease_acquisitions", "Times this gateway took the partition's lease.", each(|f| f.acquisitions.load(Ordering::Relaxed)))?;
        let losses = self
            .partitions
            .iter()
            .enumerate()
            .flat_map(|(p, f)| LeaseLoss::ALL.iter().map(move |why| ([("partition", p.to_string()), ("reason", why.as_str().to_owned())], f.losses[*why as usize].load(Ordering::Relaxed))));
        counter_family(e, "citywatch_cluster_lease_losses", "Times this gateway stopped acting on the partition, by reason (expired, refused, handed_over).", losses)?;
        let takeovers = self.partitions.iter().enumerate().map(|(p, f)| (label(p), get(&f.takeover_ms) as f64 / 1000.0));
        gauge_family(e, "citywatch_cluster_partition_takeover_seconds", "How long this gateway's last takeover of the partition took (incidents adopted, devices restored, recent messages replayed).", takeovers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_has_its_series() {
        let leases = Arc::new(LeaseTable::default());
        leases.hold_for_test(1, 7);
        let m = PartitionMetrics::new(2, Arc::clone(&leases));
        m.taken_in(1, 42);
        m.taken_in(1, 41);
        m.renewed(1);
        m.acquired(1);
        m.lost(0, LeaseLoss::Refused);
        m.took_over(1, Duration::from_millis(1500));
        m.replayed(1, 12);
        m.caught_up(1, 5);
        m.relay_caught_up(1, 3);
        assert_eq!((m.misrouted(1), m.misrouted(1)), (1, 2));
        let text = crate::metrics::encode_collector(m);
        for line in [
            "citywatch_cluster_partitions_owned 1\n",
            "citywatch_cluster_partition_owned{partition=\"0\"} 0\n",
            "citywatch_cluster_partition_owned{partition=\"1\"} 1\n",
            "citywatch_cluster_partition_lag{partition=\"1\"} 41\n",
            "citywatch_cluster_partition_messages_total{partition=\"1\"} 2\n",
            "citywatch_cluster_partition_messages_total{partition=\"0\"} 0\n",
            "citywatch_cluster_lease_renewals_total{partition=\"1\"} 1\n",
            "citywatch_cluster_lease_acquisitions_total{partition=\"1\"} 1\n",
            "citywatch_cluster_lease_losses_total{partition=\"0\",reason=\"refused\"} 1\n",
            "citywatch_cluster_lease_losses_total{partition=\"1\",reason=\"expired\"} 0\n",
            "citywatch_cluster_partition_takeover_seconds{partition=\"1\"} 1.5\n",
            "citywatch_cluster_partition_replayed_total{partition=\"1\"} 12\n",
            "citywatch_cluster_partition_caught_up_total{partition=\"1\"} 5\n",
            "citywatch_cluster_partition_relay_caught_up_total{partition=\"1\"} 3\n",
            "citywatch_cluster_partition_misrouted_total{partition=\"1\"} 2\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // No lag for a partition not owned here: someone else's consumer.
        assert!(!text.contains("citywatch_cluster_partition_lag{partition=\"0\"}"), "{text}");
    }
}

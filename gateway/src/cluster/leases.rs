//! The partitions this gateway holds, and until when: what every part of cluster mode asks
//! before it acts on a partition (fencing). The lease loop ([`super::ownership`]) alone writes
//! it; the partition consumers, relays, command publisher, push channels and forwarded API
//! requests read it. Not here: taking or renewing leases.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;
#[cfg(test)]
use std::time::Duration;

/// A lease this gateway holds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Held {
    /// The KV revision of our last write: the fencing token.
    pub(super) revision: u64,
    /// Sent time of the last successful renewal + TTL.
    pub(super) valid_until: Instant,
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

    /// Every lease in the table, valid or not (the lease loop renews or drops them).
    pub(super) fn all(&self) -> Vec<(u16, Held)> {
        self.lock().iter().map(|(p, h)| (*p, *h)).collect()
    }

    /// The lease of `partition` in the table, valid or not.
    pub(super) fn get(&self, partition: u16) -> Option<Held> {
        self.lock().get(&partition).copied()
    }

    /// `partition` taken or renewed: valid until `held.valid_until`.
    pub(super) fn hold(&self, partition: u16, held: Held) {
        self.lock().insert(partition, held);
    }

    /// `partition` no longer ours; whether it was in the table.
    pub(super) fn drop_lease(&self, partition: u16) -> bool {
        self.lock().remove(&partition).is_some()
    }

    /// A lease held from now on for one TTL of a minute (unit tests of what reads the table).
    #[cfg(test)]
    pub fn hold_for_test(&self, partition: u16, revision: u64) {
        self.lock().insert(partition, Held { revision, valid_until: Instant::now() + Duration::from_secs(60) });
    }
}

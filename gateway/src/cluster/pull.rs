//! Pulling from a partition's durable consumer: how long a pull waits and how its liveness is
//! watched, and each partition's consumer looked up once and kept. Shared by the partition
//! consumers ([`super::ownership`]), the relays ([`super::relay`]) and the push channels
//! ([`super::delivery`]). Not here: what a pull's messages become.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;

/// How long one pull request waits for messages.
pub const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server's heartbeat on an idle pull; two missed end the pull, and the caller pulls again
/// from the consumer's leader wherever it is now (the client's defaults, 30 s pulls and 15 s
/// heartbeats, left a partition idle for half a minute after a NATS node died).
pub const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

/// Each partition's durable consumer on one stream, once looked up, kept for the partition's
/// later workers (or relays): a pull goes to the consumer's leader wherever it is, while a
/// lookup is one more call that has to get through right after a NATS node died. Cheap to clone
/// (one shared map).
#[derive(Debug, Clone, Default)]
pub struct PartitionConsumers(Arc<Mutex<HashMap<u16, PullConsumer>>>);

impl PartitionConsumers {
    fn lock(&self) -> MutexGuard<'_, HashMap<u16, PullConsumer>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The consumer of `partition`: the one kept, or the one `lookup` finds (then kept).
    pub async fn get<F>(&self, partition: u16, lookup: impl FnOnce() -> F) -> Result<PullConsumer, String>
    where
        F: Future<Output = Result<PullConsumer, String>>,
    {
        if let Some(c) = self.lock().get(&partition) {
            return Ok(c.clone());
        }
        let consumer = lookup().await?;
        self.lock().insert(partition, consumer.clone());
        Ok(consumer)
    }

    /// Forgets the consumer of `partition` (deleted, or no responder): looked up again next time.
    pub fn forget(&self, partition: u16) {
        self.lock().remove(&partition);
    }
}

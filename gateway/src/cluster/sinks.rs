//! Incident changes in cluster mode: the replicated incident log, and fencing of every push.
//!
//! The log holds exactly one entry per (incident id, revision): the subject is
//! `citywatch.incidents.{partition}.{id}`, the entry carries `Nats-Msg-Id: {id}:{revision}` (JetStream drops
//! a repeat within the duplicate window) and is published with the expected last subject sequence
//! of the revision before it (a repeat after the window, or a conflicting writer, is refused).
//! Only the owner of the incident's site partition appends ([`Fence`]): a change committed by a
//! gateway that no longer holds the lease never reaches the log, so no channel ever sends it.
//! The push channels themselves deliver from the log ([`super::delivery`]).

use std::sync::Arc;

use async_nats::jetstream;
use futures_util::future::BoxFuture;

use super::{nats_config::partition_of, LeaseTable, INCIDENT_PREFIX, INCIDENT_STREAM};
use crate::model::{Incident, OutboxItem};
use crate::notify::{DeliveryError, NamedSink, Sink};

/// The incident log's channel name (API, metrics).
pub const LOG_CHANNEL: &str = "cluster-log";

/// Header carrying the revision, so a reader can tell the revisions apart without parsing.
pub const REVISION_HEADER: &str = "Citywatch-Revision";

/// Appends every incident change to [`INCIDENT_STREAM`].
pub struct IncidentLog {
    js: jetstream::Context,
    fence: Fence,
    /// The longest one JetStream call of an append may wait; the outbox retries after it.
    limit: std::time::Duration,
}

impl std::fmt::Debug for IncidentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IncidentLog")
    }
}

/// Whether this gateway may act for an incident's site now.
#[derive(Debug, Clone)]
pub struct Fence {
    pub leases: Arc<LeaseTable>,
    pub partitions: u16,
}

impl Fence {
    pub fn allows(&self, incident: &Incident) -> bool {
        self.leases.holds(partition_of(&incident.site, self.partitions))
    }
}

impl IncidentLog {
    pub fn new(js: jetstream::Context, fence: Fence, limit: std::time::Duration) -> IncidentLog {
        IncidentLog { js, fence, limit }
    }

    async fn append(&self, item: &OutboxItem) -> Result<(), DeliveryError> {
        let incident = &item.incident;
        let subject = subject_of(incident, self.fence.partitions);
        let transient = |what: &str, e: &dyn std::fmt::Display| DeliveryError::Transient(format!("incident log, {what}: {e}"));
        let stream = self.js.get_stream_no_info(INCIDENT_STREAM).await.map_err(|e| transient("stream", &e))?;
        // The last entry of this incident: already there (a repeat) → done; else expect it.
        let last = match tokio::time::timeout(self.limit, stream.direct_get_last_for_subject(&subject)).await.map_err(|_| transient("reading the last entry", &"no answer in time"))? {
            Ok(m) => {
                let revision = m.headers.get(REVISION_HEADER).and_then(|v| v.as_str().parse::<u32>().ok()).unwrap_or(0);
                Some((m.sequence, revision))
            }
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => None,
            Err(e) => return Err(transient("reading the last entry", &e)),
        };
        if let Some((_, revision)) = last {
            if revision >= incident.revision {
                return Ok(());
            }
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", item.idempotency_key().as_str());
        headers.insert("Nats-Expected-Last-Subject-Sequence", last.map(|(s, _)| s).unwrap_or(0).to_string().as_str());
        headers.insert(REVISION_HEADER, incident.revision.to_string().as_str());
        // Bounded: a change whose acknowledgement does not come (the log's leader died) is tried
        // again; if it was stored, the retry finds it as the last entry and stops there.
        let published = async {
            let ack = self.js.publish_with_headers(subject, headers, item.body.as_bytes().to_vec().into()).await.map_err(|e| transient("publish", &e))?;
            ack.await.map_err(|e| transient("acknowledgement", &e))
        };
        tokio::time::timeout(self.limit, published).await.map_err(|_| transient("acknowledgement", &"no answer in time"))??;
        Ok(())
    }
}

impl Sink for IncidentLog {
    fn deliver<'a>(&'a self, item: &'a OutboxItem) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            if !self.fence.allows(&item.incident) {
                tracing::info!(id = %item.incident.id, revision = item.incident.revision, "cluster: partition not held; the change is not logged from here");
                return Ok(());
            }
            self.append(item).await
        })
    }
}

/// The incident log as the outbox's only cluster channel: every configured push channel then
/// delivers from the log ([`super::delivery`]), not from this gateway's outbox.
/// Every JetStream call of an append waits at most `limit`.
pub fn log_sink(js: jetstream::Context, fence: Fence, limit: std::time::Duration) -> NamedSink {
    (Arc::from(LOG_CHANNEL), Arc::new(IncidentLog::new(js, fence, limit)))
}

/// The log subject of an incident: `citywatch.incidents.{partition}.{id}`, so a new owner of a
/// partition reads the last entry of its incidents alone (filter `citywatch.incidents.{p}.>`).
pub fn subject_of(incident: &Incident, partitions: u16) -> String {
    format!("{INCIDENT_PREFIX}.{}.{}", partition_of(&incident.site, partitions), incident.id)
}

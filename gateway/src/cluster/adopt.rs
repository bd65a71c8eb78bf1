//! Taking over a partition's incidents: when a gateway gains a partition it reads the last log
//! entry of every incident of that partition's sites and hands the unclosed ones to its incident
//! manager before it consumes a single device message of the partition, so a condition that goes
//! on updates the same incident id with the next revision instead of opening another.
//!
//! Not here: rule state. The new owner's rule engine learns an adopted condition from the
//! device's next messages (an alarm still sounding re-opens it in the engine, which the book
//! folds into the adopted incident as a repeat); windows are not replayed from the ingest stream.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;

use super::{INCIDENT_PREFIX, INCIDENT_STREAM};
use crate::model::{Incident, IncidentState};

/// Hands adopted incidents to the incident manager; answers how many changed its book. Set once
/// the manager runs (the partitions' consumers wait for it).
pub type AdoptFn = Arc<dyn Fn(Vec<Incident>) -> BoxFuture<'static, Result<usize, String>> + Send + Sync>;

/// Longest a partition's read of the log may take before it is tried again.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The newest log entry of every incident of `partition` that is not closed.
///
/// An ordered consumer delivering the last message per subject over
/// `citywatch.incidents.{partition}.>`: one entry per incident, the newest revision, read until
/// the consumer has nothing pending.
pub async fn unclosed(js: &jetstream::Context, partition: u16) -> Result<Vec<Incident>, String> {
    let stream = js.get_stream_no_info(INCIDENT_STREAM).await.map_err(|e| format!("incident log: {e}"))?;
    let mut consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: format!("{INCIDENT_PREFIX}.{partition}.>"),
            deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("reading partition {partition}'s incidents: {e}"))?;
    let pending = consumer.info().await.map_err(|e| format!("reading partition {partition}'s incidents: {e}"))?.num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let read = async {
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| e.to_string())?;
            match serde_json::from_slice::<Incident>(&message.payload) {
                Ok(i) if i.state != IncidentState::Closed => out.push(i),
                Ok(_) => {}
                Err(e) => tracing::warn!(subject = %message.subject, error = %e, "cluster: unreadable incident log entry; not adopted"),
            }
            if message.info().map(|i| i.pending).unwrap_or(0) == 0 {
                return Ok::<(), String>(());
            }
        }
        Err("the incident log's consumer ended early".into())
    };
    tokio::time::timeout(READ_TIMEOUT, read).await.map_err(|_| format!("reading partition {partition}'s incidents took over {READ_TIMEOUT:?}"))??;
    Ok(out)
}

//! Taking over a partition: when a gateway gains a partition it reads, before it consumes a
//! single device message of the partition, (1) the last log entry of every incident of the
//! partition's sites, handing the unclosed ones to its incident manager, so a condition that
//! goes on updates the same incident id with the next revision instead of opening another; and
//! (2) the last status message of every device of the partition from the ingest stream, so the
//! devices whose birth the previous owner took are known here (their next event is evaluated,
//! not quarantined as `unknown_device`).
//!
//! Not here: rule state. The new owner's rule engine learns an adopted condition from the
//! device's next messages (an alarm still sounding re-opens it in the engine, which the book
//! folds into the adopted incident as a repeat); windows are not replayed from the ingest stream.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;

use super::{nats_config, INCIDENT_PREFIX, INCIDENT_STREAM};
use crate::model::{Incident, IncidentState};

/// Hands adopted incidents to the incident manager; answers how many changed its book. Set once
/// the manager runs (the partitions' consumers wait for it).
pub type AdoptFn = Arc<dyn Fn(Vec<Incident>) -> BoxFuture<'static, Result<usize, String>> + Send + Sync>;

/// Longest a partition's read of the log or of its devices' statuses may take before it is
/// tried again.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The newest log entry of every incident of `partition` that is not closed.
pub async fn unclosed(js: &jetstream::Context, partition: u16) -> Result<Vec<Incident>, String> {
    let stream = js.get_stream_no_info(INCIDENT_STREAM).await.map_err(|e| format!("incident log: {e}"))?;
    let entries = last_per_subject(&stream, format!("{INCIDENT_PREFIX}.{partition}.>")).await.map_err(|e| format!("reading partition {partition}'s incidents: {e}"))?;
    let mut out = Vec::new();
    for message in entries {
        match serde_json::from_slice::<Incident>(&message.payload) {
            Ok(i) if i.state != IncidentState::Closed => out.push(i),
            Ok(_) => {}
            Err(e) => tracing::warn!(subject = %message.subject, error = %e, "cluster: unreadable incident log entry; not adopted"),
        }
    }
    Ok(out)
}

/// The last status message of every device of `partition` still in the ingest stream (its
/// retention is the horizon: a device whose last status is older is not found), as
/// (device topic, payload, ms since the epoch the stream stored it).
pub async fn last_statuses(ingest: &jetstream::stream::Stream, partition: u16) -> Result<Vec<(String, bytes::Bytes, i64)>, String> {
    let filter = format!("{}.{partition}.*.*.status", nats_config::PARTITION_PREFIX);
    let messages = last_per_subject(ingest, filter).await.map_err(|e| format!("reading partition {partition}'s device statuses: {e}"))?;
    Ok(messages
        .into_iter()
        .filter_map(|m| {
            let (_, topic) = super::topic_of_subject(m.subject.as_str())?;
            let stored_ms = m.info().map(|i| (i.published.unix_timestamp_nanos() / 1_000_000) as i64).ok()?;
            Some((topic, m.payload.clone(), stored_ms))
        })
        .collect())
}

/// The last message of every subject matching `filter`: an ordered consumer delivering the
/// last message per subject, read until it has nothing pending, within [`READ_TIMEOUT`].
async fn last_per_subject<I>(stream: &jetstream::stream::Stream<I>, filter: String) -> Result<Vec<jetstream::Message>, String> {
    let read = async {
        let mut consumer = stream
            .create_consumer(pull::OrderedConfig { filter_subject: filter, deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject, ..Default::default() })
            .await
            .map_err(|e| e.to_string())?;
        let pending = consumer.info().await.map_err(|e| e.to_string())?.num_pending;
        let mut out = Vec::new();
        if pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| e.to_string())?;
            let last = message.info().map(|i| i.pending).unwrap_or(0) == 0;
            out.push(message);
            if last {
                return Ok(out);
            }
        }
        Err("the consumer ended early".to_owned())
    };
    tokio::time::timeout(READ_TIMEOUT, read).await.map_err(|_| format!("took over {READ_TIMEOUT:?}"))?
}

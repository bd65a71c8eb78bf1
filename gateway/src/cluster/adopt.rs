//! Taking over a partition: when a gateway gains a partition it reads, before it consumes a
//! single device message of the partition, (1) the last log entry of every incident of the
//! partition's sites, handing the unclosed ones to its incident manager, so a condition that
//! goes on updates the same incident id with the next revision instead of opening another; and
//! (2) the last status message of every device of the partition from the ingest stream, so the
//! devices whose birth the previous owner took are known here (their next event is evaluated,
//! not quarantined as `unknown_device`).
//!
//! Not here: rule state, which the new owner rebuilds by replaying the partition's recent
//! messages ([`super::replay`]) and otherwise learns from the device's next messages (an alarm
//! still sounding re-opens it in the engine, which the book folds into the adopted incident as
//! a repeat).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage, stream::DirectGetErrorKind, stream::LastRawMessageErrorKind};
use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;

use super::calls::{retried, READ_ATTEMPTS};
use super::{nats_config, INCIDENT_PREFIX, INCIDENT_STREAM};
use crate::model::{Incident, IncidentState};

/// Hands adopted incidents to the incident manager; answers how many changed its book. Set once
/// the manager runs (the partitions' consumers wait for it).
pub type AdoptFn = Arc<dyn Fn(Vec<Incident>) -> BoxFuture<'static, Result<usize, String>> + Send + Sync>;

/// How many gets of one read run at once.
const CONCURRENT_GETS: usize = 32;

/// Who answers a get of a subject's last message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadFrom {
    /// The stream's leader (`STREAM.MSG.GET`): it has every acknowledged write, so the incident
    /// log's last entry is the one the previous owner appended last — an older revision
    /// adopted would make the next one repeat a revision number.
    Leader,
    /// Any replica (a direct get, `allow_direct`): spreads the load; a replica may be a few
    /// writes behind the leader, which for a device's last status is harmless (its next status
    /// comes through the partition's consumer anyway).
    AnyReplica,
}

/// The newest log entry of every incident of `partition` that is not closed, or was closed at or
/// after `closed_since_ms` (the replay window's start: the book then knows the log has that
/// incident, see `Book::apply_replayed`); every call bounded by `limit` (see
/// [`last_per_subject`]).
pub async fn unclosed(js: &jetstream::Context, partition: u16, closed_since_ms: i64, limit: Duration) -> Result<Vec<Incident>, String> {
    let stream = js.get_stream_no_info(INCIDENT_STREAM).await.map_err(|e| format!("incident log: {e}"))?;
    let entries = last_per_subject(&stream, format!("{INCIDENT_PREFIX}.{partition}.>"), ReadFrom::Leader, limit).await.map_err(|e| format!("reading partition {partition}'s incidents: {e}"))?;
    let mut out = Vec::new();
    for message in entries {
        match serde_json::from_slice::<Incident>(&message.payload) {
            Ok(i) if i.state != IncidentState::Closed || i.updated_ms >= closed_since_ms => out.push(i),
            Ok(_) => {}
            Err(e) => tracing::warn!(subject = %message.subject, error = %e, "cluster: unreadable incident log entry; not adopted"),
        }
    }
    Ok(out)
}

/// The last status message of every device of `partition` still in the ingest stream (its
/// retention is the horizon: a device whose last status is older is not found), as
/// (device topic, payload, ms since the epoch the stream stored it); a status published straight
/// onto the partition for a site the mapping puts elsewhere is left out ([`super::Routed`]).
pub async fn last_statuses(ingest: &jetstream::stream::Stream, partition: u16, partitions: u16, limit: Duration) -> Result<Vec<(String, bytes::Bytes, i64)>, String> {
    let filter = format!("{}.{partition}.*.*.status", nats_config::PARTITION_PREFIX);
    let messages = last_per_subject(ingest, filter, ReadFrom::AnyReplica, limit).await.map_err(|e| format!("reading partition {partition}'s device statuses: {e}"))?;
    Ok(messages
        .into_iter()
        .filter_map(|m| {
            let super::Routed::Topic(topic) = super::routed_topic(m.subject.as_str(), partitions) else { return None };
            let stored_ms = (m.time.unix_timestamp_nanos() / 1_000_000) as i64;
            Some((topic, m.payload, stored_ms))
        })
        .collect())
}

/// The last message of every subject matching `filter`, without a consumer: the stream's
/// subjects matching it (stream info, answered by the stream's leader), then each subject's
/// last message ([`ReadFrom`]). Each call is bounded by `limit` and tried [`READ_ATTEMPTS`]
/// times; none goes through the JetStream meta leader.
///
/// An ordered consumer (`LastPerSubject`) did the same in one go, but its creation goes
/// through the meta leader: right after a NATS node died it did not answer for 10–60 s, and
/// every partition's takeover waited behind it.
async fn last_per_subject<I>(stream: &jetstream::stream::Stream<I>, filter: String, from: ReadFrom, limit: Duration) -> Result<Vec<StreamMessage>, String> {
    let subjects = retried(limit, READ_ATTEMPTS, || async {
        let mut listing = stream.info_with_subjects(&filter).await.map_err(|e| e.to_string())?;
        let mut subjects = Vec::new();
        while let Some(entry) = listing.next().await {
            let (subject, _count) = entry.map_err(|e| e.to_string())?;
            subjects.push(subject);
        }
        Ok::<_, String>(subjects)
    })
    .await
    .map_err(|e| format!("listing the subjects {filter}: {e}"))?;
    let lasts: Vec<Result<Option<StreamMessage>, String>> =
        futures_util::stream::iter(subjects).map(|subject| last_of(stream, subject, from, limit)).buffer_unordered(CONCURRENT_GETS).collect().await;
    let mut out = Vec::with_capacity(lasts.len());
    for last in lasts {
        out.extend(last?);
    }
    Ok(out)
}

/// The last message of one subject; `None` when it is gone (aged out since it was listed).
async fn last_of<I>(stream: &jetstream::stream::Stream<I>, subject: String, from: ReadFrom, limit: Duration) -> Result<Option<StreamMessage>, String> {
    let from_leader = || async {
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    };
    retried(limit, READ_ATTEMPTS, || async {
        if from == ReadFrom::Leader {
            return from_leader().await;
        }
        match stream.direct_get_last_for_subject(subject.clone()).await {
            Ok(m) => Ok(Some(m)),
            // A replica that has not stored the subject yet, or it aged out: ask the leader.
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => from_leader().await,
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .map_err(|e| format!("last message of {subject}: {e}"))
}

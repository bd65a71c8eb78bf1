//! The relay: a partition's QoS 1 device messages from the MQTT listener's own stream into the
//! ingest stream, so that a device's PUBACK means the message reaches the ingest stream.
//!
//! nats-server's MQTT listener (2.12.8, `server/mqtt.go`, `mqttProcessPub` →
//! `mqttInitiateMsgDelivery`) hands a QoS 1 (or 2) PUBLISH on as a plain NATS publish on the
//! mapped subject — which a stream takes in only through its leader's subscription, so nothing
//! keeps it while the ingest stream elects a leader — and stores a copy as
//! `$MQTT.msgs.{mapped subject}` in its replicated `$MQTT_msgs` stream; the PUBACK waits for that
//! store. `$MQTT_msgs` keeps a message only while a consumer wants it (interest retention; with
//! no interested consumer the store is skipped and still answered, `server/stream.go`
//! `processJetStreamMsg`), so every partition has a durable consumer `relay-{p}` there, created
//! by the first gateway before any device message counts ([`ensure`]). The partition's owner
//! publishes each of them into the ingest stream (`Nats-Msg-Id: mqtt-msgs-{seq}`: a repeat within
//! the ingest stream's duplicate window is stored once) and acknowledges it in `$MQTT_msgs` only
//! after the ingest stream acknowledged it. The plain copy of such a message, which the ingest
//! stream also holds when its leader took it in, is skipped by the partition's consumer
//! ([`is_plain_copy`]); a QoS 0 message has only the plain copy and keeps it.
//!
//! Why not the engine's stream sourcing (the ingest stream sourcing `$MQTT_msgs`): a source's
//! internal consumer acknowledges on sending (`AckNone`, `server/stream.go`
//! `setupSourceConsumer`), which on an interest stream removes the message at once
//! (`server/consumer.go`, `deliverMsg`), so what was in flight to an ingest leader that died is
//! gone, and without another consumer nothing is kept while the source is being set up again.
//!
//! Not here: the messages themselves (the partition's consumer in [`super::ownership`] feeds
//! them into the pipeline), and commands to devices (published into `$MQTT_msgs` by
//! [`super::Cluster::publisher`], under `citywatch.v1…`, which no relay filter matches).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, context::PublishAckFuture};
use async_nats::HeaderMap;
use futures_util::StreamExt as _;

use super::calls::{bounded, waits};
use super::leases::LeaseTable;
use super::pull::{PartitionConsumers, PULL_EXPIRES, PULL_HEARTBEAT};
use super::{nats_config::PARTITION_PREFIX, MQTT_MSGS_PREFIX, MQTT_QOS_HEADER};

/// nats-server's stream of MQTT QoS 1 and 2 messages (one per account).
pub const MQTT_MSGS_STREAM: &str = "$MQTT_msgs";
/// The message id a relayed message carries in the ingest stream, followed by its `$MQTT_msgs`
/// sequence; it also tells the partition's consumer that this is the copy to keep.
pub const MSG_ID_PREFIX: &str = "mqtt-msgs-";
/// Messages relayed per round: published together, then their acknowledgements awaited in order.
const BATCH: usize = 256;

/// The relay consumer of `partition`.
pub fn consumer_name(partition: u16) -> String {
    format!("relay-{partition}")
}

/// What the relay consumer of `partition` takes: the partition's stored device messages.
pub fn filter(partition: u16) -> String {
    format!("{MQTT_MSGS_PREFIX}.{PARTITION_PREFIX}.{partition}.>")
}

/// `$MQTT_msgs` as nats-server creates it (`server/mqtt.go`, `mqttCreateAccountSessionManager`),
/// created here when no MQTT client has connected yet: the relay consumers must exist before the
/// first device's first message. The server uses a stream it finds as it is.
fn mqtt_msgs_config(replicas: usize) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: MQTT_MSGS_STREAM.into(),
        subjects: vec![format!("{MQTT_MSGS_PREFIX}.>")],
        storage: jetstream::stream::StorageType::File,
        retention: jetstream::stream::RetentionPolicy::Interest,
        num_replicas: replicas,
        ..Default::default()
    }
}

fn consumer_config(partition: u16, ack_wait: Duration) -> pull::Config {
    pull::Config {
        durable_name: Some(consumer_name(partition)),
        filter_subject: filter(partition),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        // A dead owner's unacknowledged messages come back to the next owner after this (the
        // lease TTL, as the partition's consumer).
        ack_wait,
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

/// When each partition's relay consumer was created (ms since the epoch): a plain copy of a
/// QoS 1 message stored before it has no relayed copy (the store was skipped for want of
/// interest, or it predates this version) and is kept.
pub type RelaySince = Arc<Vec<i64>>;

/// Creates `$MQTT_msgs` and every partition's relay consumer if missing; answers when each
/// consumer was created.
pub async fn ensure(js: &jetstream::Context, partitions: u16, replicas: usize, ack_wait: Duration) -> Result<RelaySince, String> {
    let stream = js.get_or_create_stream(mqtt_msgs_config(replicas)).await.map_err(|e| format!("the MQTT listener's stream {MQTT_MSGS_STREAM}: {e}"))?;
    let stream = &stream;
    let created = futures_util::stream::iter(0..partitions)
        .map(|p| async move {
            let name = consumer_name(p);
            let consumer: jetstream::consumer::PullConsumer = stream.get_or_create_consumer(&name, consumer_config(p, ack_wait)).await.map_err(|e| format!("relay consumer {name}: {e}"))?;
            Ok::<_, String>((consumer.cached_info().created.unix_timestamp_nanos() / 1_000_000) as i64)
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await;
    created.into_iter().collect::<Result<Vec<_>, _>>().map(Arc::new)
}

/// Whether an ingest stream message is the plain copy of a QoS ≥ 1 MQTT publish that the relay
/// also brings (see the module text); `published_ms` is when the ingest stream stored it.
pub fn is_plain_copy(headers: Option<&HeaderMap>, published_ms: i64, relay_since_ms: i64) -> bool {
    let Some(headers) = headers else { return false };
    let qos_1_or_2 = headers.get(MQTT_QOS_HEADER).is_some_and(|q| q.as_str() != "0");
    let relayed = headers.get(async_nats::header::NATS_MESSAGE_ID).is_some_and(|id| id.as_str().starts_with(MSG_ID_PREFIX));
    qos_1_or_2 && !relayed && published_ms >= relay_since_ms
}

/// One partition's relay, run by the partition's owner while it holds the lease.
pub(super) struct Relay {
    pub partition: u16,
    /// A context of its own, waiting when too many acknowledgements are outstanding instead of
    /// failing (the lease loop and the incident log share the gateway's).
    pub js: jetstream::Context,
    pub table: Arc<LeaseTable>,
    pub ack_wait: Duration,
    /// The longest one JetStream call may wait.
    pub limit: Duration,
    /// Each partition's relay consumer once looked up.
    pub consumers: PartitionConsumers,
}

/// One message on its way: the `$MQTT_msgs` message, where it goes, and its first publish.
struct InFlight {
    message: jetstream::Message,
    subject: String,
    headers: HeaderMap,
    ack: Result<PublishAckFuture, String>,
}

/// How a relay round ended.
enum Stopped {
    /// The lease is gone.
    LeaseGone,
    /// Anything else: tried again.
    Failed(String),
}

impl Relay {
    pub async fn run(self) {
        let p = self.partition;
        let mut waits = waits();
        while self.table.holds(p) {
            match self.relay().await {
                Stopped::LeaseGone => return,
                Stopped::Failed(e) => {
                    tracing::warn!(partition = p, error = %e, "cluster: relaying the partition's QoS 1 messages failed; retrying");
                    tokio::time::sleep(waits.next().unwrap_or(Duration::from_secs(2))).await;
                }
            }
        }
    }

    async fn consumer(&self) -> Result<jetstream::consumer::PullConsumer, String> {
        let p = self.partition;
        self.consumers
            .get(p, || async {
                let stream = bounded(self.limit, self.js.get_stream_no_info(MQTT_MSGS_STREAM)).await?;
                let name = consumer_name(p);
                bounded(self.limit, stream.get_or_create_consumer(&name, consumer_config(p, self.ack_wait))).await.map_err(|e| format!("relay consumer {name}: {e}"))
            })
            .await
    }

    async fn relay(&self) -> Stopped {
        let p = self.partition;
        let consumer = match self.consumer().await {
            Ok(c) => c,
            Err(e) => return Stopped::Failed(e),
        };
        // Short pulls with heartbeats, as the partition's consumer (see there).
        let messages = match bounded(self.limit, consumer.stream().max_messages_per_batch(BATCH).expires(PULL_EXPIRES).heartbeat(PULL_HEARTBEAT).messages()).await {
            Ok(m) => m,
            Err(e) => return Stopped::Failed(e),
        };
        let mut batches = messages.ready_chunks(BATCH);
        while let Some(batch) = batches.next().await {
            if !self.table.holds(p) {
                return Stopped::LeaseGone;
            }
            let mut ended = None;
            let mut in_flight = Vec::with_capacity(batch.len());
            for message in batch {
                match message {
                    Ok(m) => in_flight.push(self.publish(m).await),
                    Err(e) => {
                        // Messages after it in this batch are not acknowledged: they come back.
                        if e.kind() != pull::MessagesErrorKind::MissingHeartbeat {
                            self.consumers.forget(p);
                        }
                        ended = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Err(stopped) = self.confirm(in_flight.into_iter().flatten().collect()).await {
                return stopped;
            }
            if let Some(e) = ended {
                return Stopped::Failed(e);
            }
        }
        Stopped::Failed("message stream ended".into())
    }

    /// Publishes one `$MQTT_msgs` message into the ingest stream without waiting for its
    /// acknowledgement; `None` for a subject that is not a partition's (acknowledged away).
    async fn publish(&self, message: jetstream::Message) -> Option<InFlight> {
        let subject = message.subject.as_str().strip_prefix(MQTT_MSGS_PREFIX).and_then(|s| s.strip_prefix('.')).map(str::to_owned);
        let (Some(subject), Ok(info)) = (subject, message.info()) else {
            let _ = message.ack().await;
            return None;
        };
        let mut headers = HeaderMap::new();
        let qos = message.headers.as_ref().and_then(|h| h.get(MQTT_QOS_HEADER)).map_or("1", |q| q.as_str()).to_owned();
        headers.insert(MQTT_QOS_HEADER, qos.as_str());
        headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("{MSG_ID_PREFIX}{}", info.stream_sequence).as_str());
        Some(self.send(message, subject, headers).await)
    }

    /// Publishes a message into the ingest stream (first time or again) without waiting for its
    /// acknowledgement.
    async fn send(&self, message: jetstream::Message, subject: String, headers: HeaderMap) -> InFlight {
        let ack = self.js.publish_with_headers(subject.clone(), headers.clone(), message.payload.clone()).await.map_err(|e| e.to_string());
        InFlight { message, subject, headers, ack }
    }

    /// Waits for the ingest stream's acknowledgements of a batch, in order, acknowledging each
    /// message in `$MQTT_msgs` once the ingest stream has it; what was not acknowledged in time
    /// (the ingest stream may be electing a leader) is published again, all together, while the
    /// lease is held.
    async fn confirm(&self, mut batch: Vec<InFlight>) -> Result<(), Stopped> {
        let mut waits = waits();
        loop {
            // One deadline for the whole batch: its publishes went out together.
            let deadline = tokio::time::Instant::now() + self.limit;
            let mut failed = Vec::new();
            let mut error = String::new();
            for m in batch {
                let e = match m.ack {
                    Ok(pending) => match tokio::time::timeout_at(deadline, std::future::IntoFuture::into_future(pending)).await {
                        Ok(Ok(_)) => {
                            if let Err(e) = m.message.ack().await {
                                // It comes back after the ack wait and is published again:
                                // stored once (message id).
                                tracing::debug!(partition = self.partition, error = %e, "cluster: acknowledging a relayed message failed");
                            }
                            continue;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("no acknowledgement within {:?}", self.limit),
                    },
                    Err(e) => e,
                };
                error = e;
                failed.push((m.message, m.subject, m.headers));
            }
            if failed.is_empty() {
                return Ok(());
            }
            if !self.table.holds(self.partition) {
                return Err(Stopped::LeaseGone);
            }
            tracing::debug!(partition = self.partition, failed = failed.len(), error = %error, "cluster: the ingest stream did not acknowledge relayed messages; publishing them again");
            tokio::time::sleep(waits.next().unwrap_or(Duration::from_secs(2))).await;
            batch = Vec::with_capacity(failed.len());
            for (message, subject, headers) in failed {
                batch.push(self.send(message, subject, headers).await);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        h
    }

    #[test]
    fn only_the_plain_copy_of_a_qos_1_message_stored_after_the_relay_began_is_skipped() {
        let plain_q1 = headers(&[(MQTT_QOS_HEADER, "1")]);
        assert!(is_plain_copy(Some(&plain_q1), 2_000, 1_000));
        assert!(!is_plain_copy(Some(&plain_q1), 500, 1_000), "stored before the relay consumer existed: no relayed copy");
        assert!(is_plain_copy(Some(&headers(&[(MQTT_QOS_HEADER, "2")])), 2_000, 1_000));
        assert!(!is_plain_copy(Some(&headers(&[(MQTT_QOS_HEADER, "0")])), 2_000, 1_000), "QoS 0 has only the plain copy");
        assert!(!is_plain_copy(None, 2_000, 1_000), "not from the MQTT listener");
        // As parsed off the wire: `Nats-Msg-Id` is a standard header name (inserted by a `&str`
        // it would be a custom one, which async-nats does not find by the standard name).
        let mut relayed = headers(&[(MQTT_QOS_HEADER, "1")]);
        relayed.insert(async_nats::header::NATS_MESSAGE_ID, "mqtt-msgs-17");
        assert!(!is_plain_copy(Some(&relayed), 2_000, 1_000));
    }

    #[test]
    fn a_relay_filter_is_the_stored_form_of_its_partitions_subjects() {
        assert_eq!(filter(5), "$MQTT.msgs.citywatch.part.5.>");
        assert_eq!(consumer_name(5), "relay-5");
    }
}

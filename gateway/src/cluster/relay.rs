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
//! A relay (re)starts by catching up ([`Relay::catch_up`]): what its consumer delivered and
//! nobody acknowledged — a dead owner's relay in flight, a pull lost with a NATS node — is read
//! back by sequence and published first, so the ingest stream keeps each device's messages in
//! the order the listener stored them (otherwise they came back after `ack_wait`, behind newer
//! ones, and a device's `seq` could take them for duplicates).
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

/// The ingest stream subject of a `$MQTT_msgs` one (its stored form without the prefix).
fn ingest_subject(stored: &str) -> Option<String> {
    stored.strip_prefix(MQTT_MSGS_PREFIX).and_then(|s| s.strip_prefix('.')).map(str::to_owned)
}

/// The headers a relayed message carries into the ingest stream: the MQTT QoS it was published
/// with and its message id (its `$MQTT_msgs` sequence).
fn relayed_headers(stored: Option<&HeaderMap>, sequence: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let qos = stored.and_then(|h| h.get(MQTT_QOS_HEADER)).map_or("1", |q| q.as_str());
    headers.insert(MQTT_QOS_HEADER, qos);
    headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("{MSG_ID_PREFIX}{sequence}").as_str());
    headers
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
    pub metrics: Arc<super::partition_metrics::PartitionMetrics>,
}

/// One message on its way: the `$MQTT_msgs` message, where it goes, and its first publish.
struct InFlight {
    /// The message as pulled, acknowledged in `$MQTT_msgs` once the ingest stream has it; `None`
    /// for one a catch-up read back (its consumer brings it again, and it is acknowledged then).
    pulled: Option<jetstream::Message>,
    payload: bytes::Bytes,
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
        // The newest `$MQTT_msgs` sequence this relay published: where a catch-up begins.
        let mut relayed_up_to = 0;
        while self.table.holds(p) {
            match self.relay(&mut relayed_up_to).await {
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

    async fn relay(&self, relayed_up_to: &mut u64) -> Stopped {
        let p = self.partition;
        let consumer = match self.consumer().await {
            Ok(c) => c,
            Err(e) => return Stopped::Failed(e),
        };
        if let Err(stopped) = self.catch_up(&consumer, relayed_up_to).await {
            return stopped;
        }
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
                    Ok(m) => in_flight.push(self.publish(m, relayed_up_to).await),
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
    async fn publish(&self, message: jetstream::Message, relayed_up_to: &mut u64) -> Option<InFlight> {
        let subject = ingest_subject(message.subject.as_str());
        let (Some(subject), Ok(info)) = (subject, message.info()) else {
            let _ = message.ack().await;
            return None;
        };
        *relayed_up_to = (*relayed_up_to).max(info.stream_sequence);
        let headers = relayed_headers(message.headers.as_ref(), info.stream_sequence);
        let payload = message.payload.clone();
        Some(self.send(Some(message), payload, subject, headers).await)
    }

    /// What the relay consumer delivered after its ack floor that nobody acknowledged and this
    /// relay did not publish, read back from `$MQTT_msgs` by sequence (from the stream's
    /// leader) and published into the ingest stream in order, before the consumer's next pull
    /// (see the module text). Not acknowledged in `$MQTT_msgs`: the consumer brings each again
    /// after `ack_wait`, and the relay publishes it again (stored once: the message id) and
    /// acknowledges it then. Best effort: what a failed read leaves out comes back by
    /// redelivery, as before; only the lease's loss stops the relay here.
    async fn catch_up(&self, consumer: &jetstream::consumer::PullConsumer, relayed_up_to: &mut u64) -> Result<(), Stopped> {
        let p = self.partition;
        let info = match bounded(self.limit, consumer.clone().get_info()).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cluster: could not ask the relay consumer what it delivered; its unacknowledged messages come back after its ack wait");
                return Ok(());
            }
        };
        let from = (info.ack_floor.stream_sequence + 1).max(*relayed_up_to + 1);
        let up_to = info.delivered.stream_sequence;
        if up_to < from {
            return Ok(());
        }
        let stream = match bounded(self.limit, self.js.get_stream_no_info(MQTT_MSGS_STREAM)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cluster: could not read back the relay's unacknowledged messages");
                return Ok(());
            }
        };
        let deadline = tokio::time::Instant::now() + self.limit * 2;
        let (mut next, mut published, mut ended) = (from, 0usize, None);
        let mut batch = Vec::with_capacity(BATCH);
        while next <= up_to {
            if tokio::time::Instant::now() >= deadline {
                ended = Some(format!("not done within {:?}", self.limit * 2));
                break;
            }
            let read = tokio::time::timeout(self.limit, stream.raw_message_builder().sequence(next).next_by_subject(filter(p)).send()).await;
            let message = match read {
                Ok(Ok(m)) => m,
                Ok(Err(e)) if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => break,
                Ok(Err(e)) => {
                    ended = Some(e.to_string());
                    break;
                }
                Err(_) => {
                    ended = Some(format!("no answer within {:?}", self.limit));
                    break;
                }
            };
            if message.sequence > up_to {
                break;
            }
            next = message.sequence + 1;
            let Some(subject) = ingest_subject(message.subject.as_str()) else { continue };
            let headers = relayed_headers(Some(&message.headers), message.sequence);
            batch.push(self.send(None, message.payload, subject, headers).await);
            *relayed_up_to = (*relayed_up_to).max(message.sequence);
            published += 1;
            if batch.len() >= BATCH {
                self.confirm(std::mem::take(&mut batch)).await?;
            }
        }
        self.confirm(batch).await?;
        self.metrics.relay_caught_up(p, published);
        if published > 0 || ended.is_some() {
            tracing::info!(partition = p, from_seq = from, up_to_seq = up_to, published, stopped_early = ended.as_deref().unwrap_or("no"), "cluster: relayed the partition's delivered but unacknowledged QoS 1 messages again, in order");
        }
        Ok(())
    }

    /// Publishes a message into the ingest stream (first time or again) without waiting for its
    /// acknowledgement.
    async fn send(&self, pulled: Option<jetstream::Message>, payload: bytes::Bytes, subject: String, headers: HeaderMap) -> InFlight {
        let ack = self.js.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await.map_err(|e| e.to_string());
        InFlight { pulled, payload, subject, headers, ack }
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
                            let Some(pulled) = m.pulled else { continue };
                            if let Err(e) = pulled.ack().await {
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
                failed.push((m.pulled, m.payload, m.subject, m.headers));
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
            for (pulled, payload, subject, headers) in failed {
                batch.push(self.send(pulled, payload, subject, headers).await);
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

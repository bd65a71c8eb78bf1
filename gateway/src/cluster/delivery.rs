//! Push channels in cluster mode: every configured channel (webhook, MQTT ops topic,
//! Alertmanager) delivers from the replicated incident log through one durable JetStream
//! consumer per channel, shared by all gateways — not from a gateway's own outbox.
//!
//! Any live gateway may pull the next change; it is acknowledged only after the channel accepted
//! it, so a gateway that dies (or is frozen) mid-delivery leaves it unacknowledged and JetStream
//! hands it to another puller after the ack wait. `max_ack_pending = 1` keeps the log's order
//! across all pullers (revision n+1 never reaches a receiver before n: head-of-line, as the
//! single-node dispatcher). Delivery is at least once; receivers keep one per `Idempotency-Key`
//! (`{id}:{revision}`, the same key as in single-node mode). Not here: appending to the log
//! ([`super::sinks`]), fencing (only the owner appends, so whatever is in the log may be sent).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use backon::BackoffBuilder as _;
use futures_util::StreamExt as _;
use tokio::sync::watch;

use super::calls::bounded;
use super::{INCIDENT_PREFIX, INCIDENT_STREAM};
use crate::model::{Incident, OutboxItem};
use crate::notify::{drop_reason, ChannelState, DeliveryError, NamedSink, RetryConfig};

/// How often [`crate::notify::Sink::tick`] runs (Alertmanager re-posts), as in the dispatcher.
const TICK: Duration = Duration::from_secs(1);

/// The durable consumer's name for a channel: `push-` and the channel name with every character
/// JetStream does not allow in a name (`.`, `*`, `>`, whitespace, `:`…) as `_`.
pub fn consumer_name(channel: &str) -> String {
    let safe: String = channel.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("push-{safe}")
}

/// How long a pulled change may stay unacknowledged before JetStream gives it to another
/// gateway: long enough for one attempt of any channel (a webhook's default timeout is 5 s; a
/// running attempt also sends progress), short enough that a dead gateway's change moves on.
pub fn ack_wait(lease_ttl: Duration) -> Duration {
    (lease_ttl * 2).max(Duration::from_secs(10))
}

/// One channel's delivery from the log, as built; [`LogChannel::run`] until `stop`.
pub struct LogChannel {
    pub js: jetstream::Context,
    pub sink: NamedSink,
    pub state: Arc<ChannelState>,
    pub retry: RetryConfig,
    pub ack_wait: Duration,
    /// The longest one JetStream call may wait ([`super::calls::worker_call_timeout`]).
    pub limit: Duration,
}

impl std::fmt::Debug for LogChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogChannel").field("channel", &self.sink.0).finish_non_exhaustive()
    }
}

impl LogChannel {
    /// Pulls and delivers until `stop`; a failed connection or consumer is retried with backoff.
    /// Stopping ends the current attempt's wait at once: an unacknowledged change is simply
    /// delivered again later, by this or another gateway.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let channel = Arc::clone(&self.sink.0);
        let mut waits = backoff(&self.retry);
        // The channel's consumer once looked up, kept across pulls (see `consume`).
        let mut consumer = None;
        loop {
            let result = tokio::select! {
                r = self.consume(&mut consumer) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            if let Err(e) = result {
                self.state.record_failure(&e);
                tracing::warn!(%channel, error = %e, "cluster: delivering from the incident log failed; retrying");
            }
            let wait = waits.next().unwrap_or(self.retry.max.0);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// The channel's durable consumer, looked up (created if missing) within `limit`.
    async fn consumer(&self) -> Result<jetstream::consumer::PullConsumer, String> {
        let channel = &self.sink.0;
        let stream = self.js.get_stream_no_info(INCIDENT_STREAM).await.map_err(|e| format!("incident log: {e}"))?;
        let name = consumer_name(channel);
        let lookup = stream.get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    description: Some(format!("push channel {channel}, shared by every gateway")),
                    filter_subject: format!("{INCIDENT_PREFIX}.>"),
                    // A channel added later starts at its creation, not six months back.
                    deliver_policy: jetstream::consumer::DeliverPolicy::New,
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    // One change in flight across the cluster: the log's order at the receiver.
                    max_ack_pending: 1,
                    ..Default::default()
                },
            );
        bounded(self.limit, lookup).await.map_err(|e| format!("consumer {name}: {e}"))
    }

    /// Pulls and delivers until the pull fails. The consumer is looked up once and kept in
    /// `cached`: after a missed heartbeat (its leader died with a NATS node) the next pull goes
    /// to the new leader without another lookup; any other failure forgets it.
    async fn consume(&self, cached: &mut Option<jetstream::consumer::PullConsumer>) -> Result<(), String> {
        let sink = &self.sink.1;
        let consumer = match cached {
            Some(c) => c.clone(),
            None => cached.insert(self.consumer().await?).clone(),
        };
        let name = consumer_name(&self.sink.0);
        // Short pulls with heartbeats, as the partition consumers: a consumer leader lost with a
        // NATS node is noticed within two heartbeats, not after a 30 s pull.
        let pulls = consumer.stream().max_messages_per_batch(1).expires(super::pull::PULL_EXPIRES).heartbeat(super::pull::PULL_HEARTBEAT);
        let mut messages = bounded(self.limit, pulls.messages()).await.map_err(|e| format!("consumer {name}: {e}"))?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                m = messages.next() => m,
                _ = tick.tick() => {
                    sink.tick(crate::ingest::now_ms()).await;
                    continue;
                }
            };
            let Some(message) = message else { return Err("message stream ended".into()) };
            let message = match message {
                Ok(m) => m,
                Err(e) if e.kind() == pull::MessagesErrorKind::MissingHeartbeat => return Err(format!("consumer {name}: {e}")),
                Err(e) => {
                    *cached = None;
                    return Err(format!("consumer {name}: {e}"));
                }
            };
            self.deliver(message).await;
        }
    }

    /// One pulled change: delivered and acknowledged, or given back for a later attempt.
    async fn deliver(&self, message: jetstream::Message) {
        let (channel, sink) = (&self.sink.0, &self.sink.1);
        let (seq, attempt, pending) = match message.info() {
            Ok(i) => (i.stream_sequence as i64, i.delivered.max(1) as u32, i.pending),
            Err(_) => (0, 1, 0),
        };
        self.state.set_queue(pending as usize + 1, None);
        let body: Arc<str> = match std::str::from_utf8(&message.payload) {
            Ok(s) => Arc::from(s),
            Err(_) => return self.terminate(&message, seq, "not UTF-8").await,
        };
        let incident: Incident = match serde_json::from_str(&body) {
            Ok(i) => i,
            Err(e) => return self.terminate(&message, seq, &format!("not an incident: {e}")).await,
        };
        let item = OutboxItem { seq, channel: Arc::clone(channel), incident: Arc::new(incident), body };
        // A slow attempt keeps the change ours: progress every half ack wait.
        let result = {
            let attempt = sink.deliver(&item);
            tokio::pin!(attempt);
            let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + self.ack_wait / 2, self.ack_wait / 2);
            loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    _ = progress.tick() => {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                }
            }
        };
        let now = crate::ingest::now_ms();
        match result {
            Ok(()) => {
                // Waits for JetStream's confirmation; if it is lost the change comes again and
                // the receiver drops the repeat by its Idempotency-Key.
                if let Err(e) = bounded(self.limit, message.double_ack()).await {
                    tracing::debug!(%channel, seq, error = %e, "cluster: acknowledging a delivered change failed; it will be sent again");
                }
                self.state.record_delivered(now);
                self.state.set_queue(pending as usize, None);
            }
            Err(error) => {
                let text = error.to_string();
                let failures = self.state.record_failure(&text);
                if failures == 1 {
                    tracing::warn!(%channel, seq, error = %text, "push channel failing; retrying with backoff");
                }
                if matches!(error, DeliveryError::Permanent(_)) && attempt >= self.retry.give_up_after_attempts {
                    tracing::warn!(%channel, seq, incident = %item.incident.id, revision = item.incident.revision, attempts = attempt, error = %text, "push channel receiver refused an incident change; dropped it");
                    self.state.record_dropped(drop_reason::REJECTED);
                    let _ = message.double_ack_with(AckKind::Term).await;
                    return;
                }
                // Given back with a delay: JetStream redelivers it (to any gateway) then, and
                // nothing after it meanwhile.
                let wait = backoff(&self.retry).nth(attempt.saturating_sub(1) as usize).unwrap_or(self.retry.max.0);
                self.state.set_next_retry(Some(now + wait.as_millis() as i64));
                let _ = message.ack_with(AckKind::Nak(Some(wait))).await;
            }
        }
    }

    async fn terminate(&self, message: &jetstream::Message, seq: i64, why: &str) {
        tracing::warn!(channel = %self.sink.0, seq, why, "cluster: unreadable incident log entry; skipped");
        let _ = message.double_ack_with(AckKind::Term).await;
    }
}

/// The waits between attempts: exponential from `retry.initial` up to `retry.max` (the
/// dispatcher's policy, without jitter: the server times the redelivery).
fn backoff(retry: &RetryConfig) -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::new().with_min_delay(retry.initial.0).with_max_delay(retry.max.0.max(retry.initial.0)).without_max_times().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_valid_jetstream_names() {
        assert_eq!(consumer_name("webhook:ops"), "push-webhook_ops");
        assert_eq!(consumer_name("mqtt"), "push-mqtt");
        assert_eq!(consumer_name("webhook:a.b*>"), "push-webhook_a_b__");
    }

    #[test]
    fn ack_wait_outlasts_an_attempt() {
        assert_eq!(ack_wait(Duration::from_secs(3)), Duration::from_secs(10));
        assert_eq!(ack_wait(Duration::from_secs(6)), Duration::from_secs(12));
    }

    #[test]
    fn redelivery_waits_grow_to_the_max() {
        let retry = RetryConfig {
            initial: crate::units::Duration(Duration::from_millis(100)),
            max: crate::units::Duration(Duration::from_secs(1)),
            give_up_after_attempts: 3,
        };
        let waits: Vec<Duration> = backoff(&retry).take(6).collect();
        assert_eq!(waits[0], Duration::from_millis(100));
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(*waits.last().expect("six"), Duration::from_secs(1));
    }
}

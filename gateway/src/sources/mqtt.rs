//! The external-broker source (rumqttc 0.25): the gateway subscribes to Mosquitto, EMQX or
//! another broker under a persistent session, and acknowledges each QoS 1 message only when the
//! pipeline has stored it, so an unacknowledged message is redelivered after a reconnect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::{Error, Result};
use crate::sources::config::MqttConfig;
use crate::ingest::{now_ms, Ack, Inbound, Lanes};

/// Room for the topic and header on top of `max_payload_bytes`.
const PACKET_OVERHEAD: usize = 64 * 1024 + 16;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a clean DISCONNECT may take at shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Publishes gateway → device messages through the external broker (QoS 1). Cheap to clone.
/// Publishes made while disconnected are queued by rumqttc and sent after the reconnect.
#[derive(Debug, Clone)]
pub struct ExternalPublisher {
    client: AsyncClient,
}

impl ExternalPublisher {
    /// Queues a QoS 1 publish; waits only if rumqttc's request queue is full.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|e| Error::External(format!("publish to {topic}: {e}")))
    }
}

/// The receiving side; [`ExternalSource::run`] drives the connection.
pub struct ExternalSource {
    cfg: MqttConfig,
    client: AsyncClient,
    eventloop: EventLoop,
}

impl std::fmt::Debug for ExternalSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalSource").field("url", &self.cfg.url).field("client_id", &self.cfg.client_id).finish()
    }
}

/// Prepares the client (no network I/O yet): a publisher handle and the source to run.
pub fn connect(cfg: &MqttConfig) -> Result<(ExternalPublisher, ExternalSource)> {
    let (host, port) = cfg.url_host_port().map_err(|e| Error::Config(format!("mqtt.url {:?}: {e}", cfg.url)))?;
    if cfg.client_id.is_empty() {
        // rumqttc panics on a persistent session without a client id.
        return Err(Error::Config("mqtt.client_id must not be empty".into()));
    }
    let keep_alive = cfg.keep_alive.0;
    if !keep_alive.is_zero() && keep_alive < Duration::from_secs(1) {
        // rumqttc panics on sub-second keep-alives.
        return Err(Error::Config("mqtt.keep_alive must be 0 or at least 1s".into()));
    }
    let mut options = MqttOptions::new(cfg.client_id.clone(), host, port);
    options
        .set_clean_session(false)
        .set_keep_alive(keep_alive)
        .set_manual_acks(true)
        .set_max_packet_size(
            cfg.max_payload_bytes.saturating_add(PACKET_OVERHEAD),
            cfg.max_payload_bytes.saturating_add(PACKET_OVERHEAD),
        );
    if let Some(user) = &cfg.username {
        options.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    // Acks travel through this queue; make it deep enough that `try_ack` practically never
    // finds it full (every message waiting in `out` may be acked at once).
    let capacity = cfg.queue_capacity.saturating_add(1024);
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    eventloop.set_network_options(network_options());
    Ok((ExternalPublisher { client: client.clone() }, ExternalSource { cfg: cfg.clone(), client, eventloop }))
}

/// Socket options of the connection to the broker. `TCP_NODELAY` (rumqttc leaves Nagle on):
/// PUBACKs, subscribes and gateway → device commands are small writes, and Nagle's algorithm
/// holds each one back until the broker acknowledges the previous segment, which with delayed
/// ACKs costs up to 40 ms per command and keeps the broker's QoS 1 window full for as long.
/// The receive buffer is left to Linux's autotuning (up to `net.ipv4.tcp_rmem`'s maximum,
/// 32 MiB here): setting `SO_RCVBUF` would switch autotuning off and cap it lower.
fn network_options() -> rumqttc::NetworkOptions {
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network
}

/// Subscribes to `cfg.topic_filter` at the external broker and forwards messages into `out`
/// until `shutdown` becomes true (or its sender is dropped), then disconnects cleanly.
/// Reconnects by itself with capped exponential backoff; returns an error only for bad settings.
///
/// Backpressure choice: the task that polls rumqttc's `EventLoop` also awaits space in `out`.
/// While the pipeline is full the socket is not read, so TCP pushes back on the broker (and the
/// broker's QoS 1 in-flight window stops it early). The cost: rumqttc sends keep-alive pings
/// only while polled, so a stall longer than ~1.5 × `keep_alive` makes the broker drop the
/// connection; the client then reconnects and the broker redelivers every unacknowledged
/// message (at-least-once holds; the pipeline sees duplicates). The alternative, reading on into
/// an unbounded buffer, trades that for unbounded memory with QoS 0 traffic.
///
/// Payloads up to `max_payload_bytes` (plus 64 KiB for the topic) are accepted; a bigger one
/// breaks the connection and, being unacknowledged, comes back after every reconnect: keep the
/// broker's own `message_size_limit` at or below `max_payload_bytes`.
pub async fn run(cfg: MqttConfig, out: impl Into<Lanes>, shutdown: watch::Receiver<bool>) -> Result<()> {
    let (_publisher, source) = connect(&cfg)?;
    source.run(out, shutdown).await
}

impl ExternalSource {
    /// See [`crate::sources::mqtt::run`].
    pub async fn run(self, out: impl Into<Lanes>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let lanes: Lanes = out.into();
        let ExternalSource { cfg, client, mut eventloop } = self;
        let runtime = tokio::runtime::Handle::current();
        // Bumped on every ConnAck and every connection error: an Ack created under an older
        // value belongs to a connection that is gone (the broker will redeliver that message).
        let generation = Arc::new(AtomicU64::new(0));
        let mut backoff = Backoff::new();
        let mut connected = false;
        let mut outage: Option<Instant> = None;

        loop {
            let event = tokio::select! {
                biased;
                () = shutdown_requested(&mut shutdown) => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    generation.fetch_add(1, Ordering::SeqCst);
                    connected = true;
                    backoff.reset();
                    match outage.take() {
                        Some(since) => info!(url = %cfg.url, down_for = ?since.elapsed(), session_present = ack.session_present, "external broker: reconnected"),
                        None => info!(url = %cfg.url, session_present = ack.session_present, "external broker: connected"),
                    }
                    // A new session has no subscriptions; an old one keeps them, and subscribing
                    // again is harmless (retained messages are sent again). Never await the
                    // client from this task: the request queue only drains while we poll.
                    let (client, filter) = (client.clone(), cfg.topic_filter.clone());
                    tokio::spawn(async move {
                        if let Err(e) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                            warn!(filter, error = %e, "external broker: cannot queue subscribe");
                        }
                    });
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let ack = (publish.qos != QoS::AtMostOnce).then(|| make_ack(&client, &publish, &generation, &runtime));
                    // Events and command acks take the alert lane. One connection still delivers
                    // in order: while the bulk lane is full this task stops reading (to push back
                    // on the broker), and an alarm behind it on the socket waits too. A second
                    // connection for the alert topics would lift that (README, issue 14).
                    let out = lanes.for_topic(&publish.topic);
                    let inbound = Inbound { topic: publish.topic, payload: publish.payload, received_ms: now_ms(), ack, restored: false };
                    // Fast path without building a select: the pipeline usually has room.
                    let inbound = match out.try_send(inbound) {
                        Ok(()) => continue,
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            info!("external broker: pipeline closed, stopping");
                            break;
                        }
                        Err(mpsc::error::TrySendError::Full(inbound)) => inbound,
                    };
                    tokio::select! {
                        biased;
                        // Dropped unacknowledged: redelivered in the next session.
                        () = shutdown_requested(&mut shutdown) => break,
                        sent = out.send(inbound) => if sent.is_err() {
                            info!("external broker: pipeline closed, stopping");
                            break;
                        },
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(suback))) => {
                    if suback.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        error!(filter = %cfg.topic_filter, "external broker refused the subscription");
                    } else {
                        debug!(filter = %cfg.topic_filter, "external broker: subscribed");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    generation.fetch_add(1, Ordering::SeqCst);
                    connected = false;
                    if outage.is_none() {
                        outage = Some(Instant::now());
                        if matches!(e, ConnectionError::ConnectionRefused(_)) {
                            error!(url = %cfg.url, error = %e, "external broker refused the connection (credentials?); retrying");
                        } else {
                            warn!(url = %cfg.url, error = %e, "external broker unreachable; reconnecting with backoff");
                        }
                    } else {
                        debug!(error = %e, "external broker: reconnect failed");
                    }
                    let delay = backoff.next_delay();
                    tokio::select! {
                        biased;
                        () = shutdown_requested(&mut shutdown) => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }

        if connected {
            disconnect(&client, &mut eventloop).await;
        }
        info!("external broker source stopped");
        Ok(())
    }
}

/// The Ack of one QoS ≥ 1 message: PUBACK through the client's queue, never blocking the caller
/// (it may run on the store's writer thread).
fn make_ack(client: &AsyncClient, publish: &Publish, generation: &Arc<AtomicU64>, runtime: &tokio::runtime::Handle) -> Ack {
    // Only qos and pkid matter for the ack; do not keep the payload alive.
    let mut ack_of = Publish::new("", publish.qos, Vec::new());
    ack_of.pkid = publish.pkid;
    let (client, generation, runtime) = (client.clone(), generation.clone(), runtime.clone());
    let born = generation.load(Ordering::SeqCst);
    Ack::new(move || {
        if generation.load(Ordering::SeqCst) != born {
            // The connection that delivered it is gone; the broker redelivers the message and
            // that copy's Ack will do. Acking now could hit another message with the same pkid.
            return;
        }
        if let Err(rumqttc::ClientError::TryRequest(_)) = client.try_ack(&ack_of) {
            // Queue full (rare: it is deeper than the pipeline queue): ack asynchronously.
            runtime.spawn(async move {
                let _ = client.ack(&ack_of).await;
            });
        }
    })
}

/// Sends DISCONNECT (after the acks already queued) and polls until it is written.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let flushed = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    if flushed.is_err() {
        warn!("external broker: DISCONNECT not sent within {DISCONNECT_TIMEOUT:?}");
    }
}

/// Resolves when shutdown is requested or nobody can request it any more. Cancel-safe.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Capped exponential backoff with jitter: 100 ms, 200 ms, … 10 s, each scaled by [0.5, 1).
#[derive(Debug)]
struct Backoff {
    next: Duration,
    rng: u64,
}

impl Backoff {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Backoff { next: BACKOFF_MIN, rng: seed | 1 }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let fraction = 0.5 + (self.rng >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        let delay = self.next.mul_f64(fraction);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= BACKOFF_MIN / 2 && first < BACKOFF_MIN, "{first:?}");
        let mut last = first;
        for _ in 0..20 {
            last = b.next_delay();
            assert!(last < BACKOFF_MAX, "{last:?}");
        }
        assert!(last >= BACKOFF_MAX / 2, "{last:?}");
        b.reset();
        assert!(b.next_delay() < BACKOFF_MIN);
    }
}

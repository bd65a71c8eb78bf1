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

/// The receiving side; [`ExternalSource::run`] drives its connections.
pub struct ExternalSource {
    cfg: MqttConfig,
    main: Connection,
    /// The alert connection (`mqtt.alert_topic_filter`), if configured.
    alerts: Option<Connection>,
}

/// One MQTT connection to the broker.
struct Connection {
    client: AsyncClient,
    eventloop: EventLoop,
}

impl std::fmt::Debug for ExternalSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalSource")
            .field("url", &self.cfg.url)
            .field("client_id", &self.cfg.client_id)
            .field("alert_connection", &self.alerts.is_some())
            .finish()
    }
}

/// The client id of the alert connection: the main one's plus this.
pub const ALERT_CLIENT_SUFFIX: &str = "-alerts";

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
    cfg.check_filters().map_err(|(knob, reason)| Error::Config(format!("{knob} {reason}")))?;
    let open = |client_id: String, capacity: usize| {
        let mut options = MqttOptions::new(client_id, host.clone(), port);
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
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        eventloop.set_network_options(network_options());
        Connection { client, eventloop }
    };
    // Acks travel through this queue; make it deep enough that `try_ack` practically never
    // finds it full (every message waiting in the lanes may be acked at once).
    let main = open(cfg.client_id.clone(), cfg.queue_capacity.saturating_add(1024));
    let alerts = (!cfg.alert_topic_filter.is_empty())
        .then(|| open(format!("{}{ALERT_CLIENT_SUFFIX}", cfg.client_id), (cfg.queue_capacity / 8).max(256).saturating_add(1024)));
    let publisher = ExternalPublisher { client: main.client.clone() };
    Ok((publisher, ExternalSource { cfg: cfg.clone(), main, alerts }))
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
/// **The alert connection.** A connection delivers in order, so an alarm behind a full bulk lane
/// would wait on the socket. With `cfg.alert_topic_filter` set (device events by default), a
/// second connection (client id + [`ALERT_CLIENT_SUFFIX`], its own persistent session)
/// subscribes to those topics alone and feeds the alert lane, which the decode stage serves
/// first; it is read while the main connection is held back. The main connection still
/// subscribes to everything (so malformed topics are still seen and quarantined) and skips its
/// own copy of an alert-topic message (acknowledging it at once) only when the alert session is
/// known to hold every such message too — see [`Coverage`]. Otherwise it passes its copy on as
/// well, and the decode stage drops the second one by `seq`.
///
/// Payloads up to `max_payload_bytes` (plus 64 KiB for the topic) are accepted; a bigger one
/// breaks the connection and, being unacknowledged, comes back after every reconnect: keep the
/// broker's own `message_size_limit` at or below `max_payload_bytes`.
pub async fn run(cfg: MqttConfig, out: impl Into<Lanes>, shutdown: watch::Receiver<bool>) -> Result<()> {
    let (_publisher, source) = connect(&cfg)?;
    source.run(out, shutdown).await
}

/// Which of the source's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Main,
    Alerts,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Alerts => "alerts",
        }
    }
}

/// Whether the alert connection's session holds every alert-topic message the main session
/// holds, so the main connection may skip its copies. True only when, in this run, the alert
/// connection's first session was already present at the broker (it was subscribed before this
/// run: every alert-topic message since is queued for it) and no connection has since found its
/// session gone (a broker that lost its sessions loses both subscriptions; the main one's may
/// come back first, and what it receives before the alert one is back is in no other session).
/// A first run, or one after sessions were lost, passes both copies on until the next start.
#[derive(Debug, Default)]
struct Coverage(std::sync::atomic::AtomicU8);

impl Coverage {
    const UNKNOWN: u8 = 0;
    const COVERED: u8 = 1;
    const NEVER: u8 = 2;

    fn on_connack(&self, role: Role, session_present: bool, first: bool) {
        if !session_present {
            self.0.store(Self::NEVER, Ordering::SeqCst);
        } else if role == Role::Alerts && first {
            let _ = self.0.compare_exchange(Self::UNKNOWN, Self::COVERED, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    fn covered(&self) -> bool {
        self.0.load(Ordering::SeqCst) == Self::COVERED
    }
}

/// What each connection's loop shares.
struct Shared {
    cfg: MqttConfig,
    lanes: Lanes,
    coverage: Coverage,
    /// Tells the other connection to stop when one stops.
    stop: watch::Sender<bool>,
}

impl ExternalSource {
    /// See [`crate::sources::mqtt::run`].
    pub async fn run(self, out: impl Into<Lanes>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let ExternalSource { cfg, main, alerts } = self;
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared { cfg, lanes: out.into(), coverage: Coverage::default(), stop });
        let forward = {
            let shared = Arc::clone(&shared);
            async move {
                shutdown_requested(&mut shutdown).await;
                let _ = shared.stop.send(true);
            }
        };
        let main_loop = run_connection(Role::Main, main, Arc::clone(&shared), stop_rx.clone());
        let connections = async move {
            match alerts {
                Some(alerts) => {
                    let alert_loop = run_connection(Role::Alerts, alerts, Arc::clone(&shared), stop_rx);
                    tokio::join!(main_loop, alert_loop);
                }
                None => main_loop.await,
            }
        };
        tokio::select! {
            () = connections => {}
            () = async { forward.await; std::future::pending::<()>().await } => {}
        }
        info!("external broker source stopped");
        Ok(())
    }
}

/// Drives one connection until `stop`; then tells the other connection to stop as well.
async fn run_connection(role: Role, connection: Connection, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let Connection { client, mut eventloop } = connection;
    let cfg = &shared.cfg;
    let lanes = &shared.lanes;
    let connection = role.name();
    let filter = match role {
        Role::Main => cfg.topic_filter.clone(),
        Role::Alerts => cfg.alert_topic_filter.clone(),
    };
    // The alert topics the main connection may skip (see `Coverage`).
    let alert_filter = (role == Role::Main && !cfg.alert_topic_filter.is_empty()).then(|| cfg.alert_topic_filter.as_str());
    let runtime = tokio::runtime::Handle::current();
    // Bumped on every ConnAck and every connection error: an Ack created under an older
    // value belongs to a connection that is gone (the broker will redeliver that message).
    let generation = Arc::new(AtomicU64::new(0));
    let mut backoff = Backoff::new();
    let mut connected = false;
    let mut first_connack = true;
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
                shared.coverage.on_connack(role, ack.session_present, first_connack);
                first_connack = false;
                match outage.take() {
                    Some(since) => info!(url = %cfg.url, connection, down_for = ?since.elapsed(), session_present = ack.session_present, "external broker: reconnected"),
                    None => info!(url = %cfg.url, connection, session_present = ack.session_present, "external broker: connected"),
                }
                // A new session has no subscriptions; an old one keeps them, and subscribing
                // again is harmless (retained messages are sent again). Never await the
                // client from this task: the request queue only drains while we poll.
                let (client, filter) = (client.clone(), filter.clone());
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                        warn!(filter, connection, error = %e, "external broker: cannot queue subscribe");
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let ack = (publish.qos != QoS::AtMostOnce).then(|| make_ack(&client, &publish, &generation, &runtime));
                if alert_filter.is_some_and(|f| rumqttc::matches(&publish.topic, f)) && shared.coverage.covered() {
                    // The alert connection's session has this message too and delivers it.
                    if let Some(ack) = ack {
                        ack.done();
                    }
                    continue;
                }
                // Main: events and command acks take the alert lane, the rest the bulk lane.
                // Alerts: everything takes the alert lane (it must never wait for bulk room).
                let out = match role {
                    Role::Main => lanes.for_topic(&publish.topic),
                    Role::Alerts => &lanes.alerts,
                };
                let inbound = Inbound { topic: publish.topic, payload: publish.payload, received_ms: now_ms(), ack, origin: crate::ingest::Origin::Live };
                // Fast path without building a select: the pipeline usually has room.
                let inbound = match out.try_send(inbound) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        info!(connection, "external broker: pipeline closed, stopping");
                        break;
                    }
                    Err(mpsc::error::TrySendError::Full(inbound)) => inbound,
                };
                tokio::select! {
                    biased;
                    // Dropped unacknowledged: redelivered in the next session.
                    () = shutdown_requested(&mut shutdown) => break,
                    sent = out.send(inbound) => if sent.is_err() {
                        info!(connection, "external broker: pipeline closed, stopping");
                        break;
                    },
                }
            }
            Ok(Event::Incoming(Packet::SubAck(suback))) => {
                if suback.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    error!(filter, connection, "external broker refused the subscription");
                } else {
                    debug!(filter, connection, "external broker: subscribed");
                }
            }
            Ok(_) => {}
            Err(e) => {
                generation.fetch_add(1, Ordering::SeqCst);
                connected = false;
                if outage.is_none() {
                    outage = Some(Instant::now());
                    if matches!(e, ConnectionError::ConnectionRefused(_)) {
                        error!(url = %cfg.url, connection, error = %e, "external broker refused the connection (credentials?); retrying");
                    } else {
                        warn!(url = %cfg.url, connection, error = %e, "external broker unreachable; reconnecting with backoff");
                    }
                } else {
                    debug!(connection, error = %e, "external broker: reconnect failed");
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

    let _ = shared.stop.send(true);
    if connected {
        disconnect(&client, &mut eventloop).await;
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

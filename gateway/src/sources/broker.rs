//! The embedded MQTT broker (rumqttd 0.20): devices connect to the gateway itself.
//! An in-process link subscribed to the topic filter forwards every publish into the pipeline's
//! bounded channel; a second in-process link publishes gateway → device commands.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, Publish, QoS, RetainForwardRule, Subscribe,
};
use rumqttd::{Broker, Config, ConnectionSettings, Notification, RouterConfig, SegmentConfig, ServerSettings};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::{Error, Result};
use crate::sources::config::MqttConfig;
use crate::ingest::{now_ms, Inbound};

/// Most simultaneous device connections.
pub const MAX_CONNECTIONS: usize = 16_384;
/// Segment size of the commit log behind the gateway's filter (rumqttd counts topic + payload + 4
/// bytes per message; actual memory is a few times that for small messages).
pub const GATEWAY_LOG_SEGMENT_BYTES: usize = 8 * 1024 * 1024;
/// Segments kept in that log: with ~80-byte topic + payload, ≈ 400 k messages (≈ 3 s of a
/// 135k msgs/s flood) may wait for the pipeline before rumqttd starts evicting. rumqttd keeps
/// the log full even after the gateway read it, so under steady traffic this costs ≈ 5× the
/// accounted 32 MiB (≈ 150 MB RSS measured by scaling the flood benchmark).
pub const GATEWAY_LOG_SEGMENTS: usize = 4;
/// Commit logs of other filters (devices' own command subscriptions) are small.
const OTHER_LOG_SEGMENT_BYTES: usize = 256 * 1024;
const OTHER_LOG_SEGMENTS: usize = 2;
/// Messages the router reads from a log per pass. Also caps how many retained messages a new
/// subscription receives (rumqttd truncates the retained set to this count).
pub const MAX_OUTGOING_PACKET_COUNT: u64 = 20_000;
/// Room for the topic and header on top of `max_payload_bytes` (rumqttd limits the whole packet).
const PACKET_OVERHEAD: usize = 1024;
/// How long [`EmbeddedBroker::start`] waits for the listener.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

const DATA_LINK_ID: &str = "citywatch-gateway-ingest";
const COMMAND_LINK_ID: &str = "citywatch-gateway-commands";

/// Counters of the forwarder.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Publishes handed to the pipeline.
    pub forwarded: AtomicU64,
    /// Publishes lost because rumqttd evicted them from its commit log before the forwarder
    /// read them (the pipeline was more than the log's size behind).
    pub dropped: AtomicU64,
    /// The TLS/ACL door's counters (zero when it does not run).
    pub door: Arc<super::door::DoorStats>,
}

/// The running embedded broker.
///
/// What rumqttd gives and does not give (each point is exercised in `tests.rs`):
/// - Devices get MQTT 3.1.1 on `cfg.listen`, username/password auth (when `cfg.users` is not
///   empty), retained messages and Last Will (sent when a connection drops without DISCONNECT).
/// - The broker keeps every filter's messages in an in-memory commit log; a device's QoS 1
///   publish is PUBACKed once it is in that log, not once the gateway has stored it. The log of
///   the gateway's filter holds [`GATEWAY_LOG_SEGMENT_BYTES`] × [`GATEWAY_LOG_SEGMENTS`] bytes;
///   if the pipeline falls further behind than that, rumqttd evicts the oldest messages. Such
///   losses are detected from the log offsets and counted in [`BrokerStats::dropped`].
///   Subscribing the local link at QoS 1 would not change that (the log evicts regardless of
///   acks), so it subscribes at QoS 0 and uses rumqttd's own flow control (`Unschedule` → `Ready`).
/// - rumqttd has no shutdown: the broker threads and the listening socket live until the process
///   exits. Dropping this only stops the forwarder and detaches the ingest link.
pub struct EmbeddedBroker {
    addr: SocketAddr,
    commands: Mutex<LinkTx>,
    /// Kept so the router keeps the command link registered.
    _commands_rx: LinkRx,
    data_tx: Mutex<LinkTx>,
    forwarder: tokio::task::JoinHandle<()>,
    /// The TLS/ACL door in front of rumqttd, when configured.
    door: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<BrokerStats>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker").field("addr", &self.addr).field("stats", &self.stats).finish()
    }
}

impl EmbeddedBroker {
    /// Starts the broker on `cfg.listen`, subscribes the gateway to `cfg.topic_filter` and
    /// forwards every publish into `out` (awaiting space: a full channel pauses forwarding).
    /// Returns once the listener accepts TCP connections (blocks the calling thread up to 10 s
    /// while polling for that). Must be called inside a tokio runtime.
    /// Port 0 picks a free port (see [`EmbeddedBroker::local_addr`]).
    pub fn start(cfg: &MqttConfig, out: mpsc::Sender<Inbound>) -> Result<EmbeddedBroker> {
        Self::start_with_log(cfg, out, Some(&cfg.topic_filter), GATEWAY_LOG_SEGMENT_BYTES, GATEWAY_LOG_SEGMENTS)
    }

    /// Like [`start`](Self::start) without the subscription (tests: retained before subscribe).
    #[cfg(test)]
    fn start_unsubscribed(cfg: &MqttConfig, out: mpsc::Sender<Inbound>) -> Result<EmbeddedBroker> {
        Self::start_with_log(cfg, out, None, GATEWAY_LOG_SEGMENT_BYTES, GATEWAY_LOG_SEGMENTS)
    }

    /// `subscribe` is sent to the router before the listener exists, so the gateway's link is
    /// the one creating that filter's commit log and knows its first offset is 0 (the basis of
    /// eviction counting). Tests pass a small log to provoke evictions.
    fn start_with_log(
        cfg: &MqttConfig,
        out: mpsc::Sender<Inbound>,
        subscribe: Option<&str>,
        segment_bytes: usize,
        segments: usize,
    ) -> Result<EmbeddedBroker> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Broker("must be started inside a tokio runtime".into()))?;
        // With the door, rumqttd listens on a private loopback port and the door on `listen`.
        let door_listener = if super::door::needed(cfg) {
            let l = TcpListener::bind(cfg.listen).map_err(|e| Error::Broker(format!("cannot bind {}: {e}", cfg.listen)))?;
            l.set_nonblocking(true).map_err(|e| Error::Broker(format!("cannot bind {}: {e}", cfg.listen)))?;
            Some(l)
        } else {
            None
        };
        let addr = match door_listener {
            Some(_) => resolve_port(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?,
            None => resolve_port(cfg.listen)?,
        };
        let tls = cfg.tls.as_ref().map(crate::tls::acceptor).transpose().map_err(|e| Error::Config(format!("mqtt.tls: {e}")))?;
        let mut broker = Broker::new(rumqttd_config(cfg, addr, segment_bytes, segments));
        let link_err = |e: rumqttd::local::LinkError| Error::Broker(format!("local link: {e}"));
        let (data_tx, data_rx) = broker.link(DATA_LINK_ID).map_err(link_err)?;
        let (commands, commands_rx) = broker.link(COMMAND_LINK_ID).map_err(link_err)?;
        let data_tx = Mutex::new(data_tx);
        if let Some(filter) = subscribe {
            subscribe_link(&data_tx, filter)?;
        }

        let thread = std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                // Blocks for the life of the process unless every server thread fails.
                if let Err(e) = broker.start() {
                    error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(|e| Error::Broker(format!("cannot spawn broker thread: {e}")))?;
        wait_listening(addr, &thread)?;
        let stats = Arc::new(BrokerStats::default());
        let (addr, door) = match door_listener {
            None => (addr, None),
            Some(listener) => {
                let front = listener.local_addr().map_err(|e| Error::Broker(format!("door listener: {e}")))?;
                let _runtime = runtime.enter();
                let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| Error::Broker(format!("door listener: {e}")))?;
                let door = super::door::Door {
                    acl: super::door::Acl::new(&cfg.users),
                    tls,
                    upstream: addr,
                    max_packet: cfg.max_payload_bytes.saturating_add(PACKET_OVERHEAD),
                    stats: Arc::clone(&stats.door),
                };
                info!(%front, tls = door.tls.is_some(), broker = %addr, "MQTT door (TLS/ACL) in front of the embedded broker");
                (front, Some(runtime.spawn(super::door::run(listener, Arc::new(door)))))
            }
        };
        info!(%addr, "embedded MQTT broker listening");

        let forwarder = runtime.spawn(forward(data_rx, out, stats.clone()));
        Ok(EmbeddedBroker {
            addr,
            door,
            commands: Mutex::new(commands),
            _commands_rx: commands_rx,
            data_tx,
            forwarder,
            stats,
        })
    }

    /// Subscribes the gateway's link to one more filter. Retained messages matching it are
    /// delivered first (at most [`MAX_OUTGOING_PACKET_COUNT`]).
    #[cfg(test)]
    fn subscribe(&self, filter: &str) -> Result<()> {
        subscribe_link(&self.data_tx, filter)
    }

    /// Publishes a gateway → device message (QoS 0 from the gateway; devices receive it at the
    /// QoS they subscribed with). `retain` keeps it for devices that subscribe later.
    pub fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<()> {
        if topic.is_empty() || topic.contains(['+', '#']) {
            return Err(Error::Config(format!("cannot publish to topic {topic:?}")));
        }
        let publish = Publish::new(Bytes::copy_from_slice(topic.as_bytes()), Bytes::from(payload), retain);
        send_now(&self.commands, Packet::Publish(publish, None))
    }

    /// The address devices connect to (the configured one, with the port chosen if it was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops handing messages to the gateway (shutdown): the source channel's last sender is
    /// dropped, so the decode stage drains and stops. Publishing still works.
    pub fn stop_forwarding(&self) {
        self.forwarder.abort();
    }

    /// Forwarding counters.
    pub fn stats(&self) -> Arc<BrokerStats> {
        self.stats.clone()
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.forwarder.abort();
        if let Some(door) = &self.door {
            door.abort();
        }
        // Detach the ingest link so the router stops buffering for it.
        let bye = Packet::Disconnect(Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection }, None);
        let _ = send_now(&self.data_tx, bye);
    }
}

/// Subscribes a local link at QoS 0 (see the module docs), asking for retained messages.
fn subscribe_link(link: &Mutex<LinkTx>, filter: &str) -> Result<()> {
    let filter = Filter {
        path: filter.to_owned(),
        qos: QoS::AtMostOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    };
    send_now(link, Packet::Subscribe(Subscribe { pkid: 1, filters: vec![filter] }, None))
}

/// Hands one packet to the router through a local link. `LinkTx::send` is an `async fn` without
/// any `.await` inside (it pushes into a buffer and does a blocking send on the router channel),
/// so it completes on its first poll.
fn send_now(link: &Mutex<LinkTx>, packet: Packet) -> Result<()> {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let mut link = link.lock().map_err(|_| Error::Broker("local link lock poisoned".into()))?;
    let fut = std::pin::pin!(link.send(packet));
    match fut.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(_)) => Ok(()),
        Poll::Ready(Err(e)) => Err(Error::Broker(format!("router gone: {e}"))),
        Poll::Pending => Err(Error::Broker("local link send did not complete".into())),
    }
}

fn rumqttd_config(cfg: &MqttConfig, listen: SocketAddr, segment_bytes: usize, segments: usize) -> Config {
    let auth = (!cfg.users.is_empty())
        .then(|| cfg.users.iter().map(|u| (u.username.clone(), u.password.clone())).collect::<HashMap<_, _>>());
    let server = ServerSettings {
        name: "citywatch-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: cfg.max_payload_bytes.saturating_add(PACKET_OVERHEAD),
            max_inflight_count: 100,
            auth,
            external_auth: None,
            // Without this, a publish matching no subscription is simply not stored.
            dynamic_filters: false,
        },
    };
    // rumqttd panics below 1 KiB or 1 segment.
    let gateway_log = SegmentConfig { max_segment_size: segment_bytes.max(1024), max_segment_count: segments.max(1) };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: MAX_OUTGOING_PACKET_COUNT,
            max_segment_size: OTHER_LOG_SEGMENT_BYTES,
            max_segment_count: OTHER_LOG_SEGMENTS,
            custom_segment: Some(HashMap::from([(cfg.topic_filter.clone(), gateway_log)])),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Config::default()
    }
}

/// Port 0: rumqttd cannot report the port it bound, so pick a free one here (it could in
/// principle be taken by someone else before rumqttd binds it; fine for tests and tools).
fn resolve_port(listen: SocketAddr) -> Result<SocketAddr> {
    if listen.port() != 0 {
        return Ok(listen);
    }
    let probe = TcpListener::bind(listen).map_err(|e| Error::Broker(format!("cannot bind {listen}: {e}")))?;
    probe.local_addr().map_err(|e| Error::Broker(format!("cannot bind {listen}: {e}")))
}

/// Polls a TCP connect until the listener answers, the broker thread dies, or the wait ends.
fn wait_listening(addr: SocketAddr, thread: &std::thread::JoinHandle<()>) -> Result<()> {
    let target = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if thread.is_finished() {
            return Err(Error::Broker(format!("broker did not start on {addr} (see the log: port in use?)")));
        }
        if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
            // rumqttd logs an error for this connection (no CONNECT packet): harmless.
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Broker(format!("broker not listening on {addr} after {READY_TIMEOUT:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Moves publishes from the ingest link into the pipeline channel, awaiting space.
async fn forward(mut rx: LinkRx, out: mpsc::Sender<Inbound>, stats: Arc<BrokerStats>) {
    // Absolute offset expected next from the gateway filter's commit log (which our own
    // subscription created, so it starts at 0). A larger offset means rumqttd evicted the rest.
    let mut expected: u64 = 0;
    loop {
        let notification = match rx.next().await {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                error!(error = %e, "embedded broker: ingest link closed");
                return;
            }
        };
        match notification {
            Notification::Forward(forward) => {
                // Retained messages carry no cursor.
                if let Some((_segment, offset)) = forward.cursor {
                    if offset > expected {
                        let lost = offset - expected;
                        stats.dropped.fetch_add(lost, Ordering::Relaxed);
                        warn!(lost, "embedded broker evicted messages the pipeline had not read yet (pipeline too slow)");
                    }
                    expected = expected.max(offset + 1);
                }
                let publish = forward.publish;
                let topic = match std::str::from_utf8(&publish.topic) {
                    Ok(t) => t.to_owned(),
                    // The router rejects non-UTF-8 topics before they reach any log.
                    Err(_) => String::from_utf8_lossy(&publish.topic).into_owned(),
                };
                let inbound = Inbound { topic, payload: publish.payload, received_ms: now_ms(), ack: None };
                if out.send(inbound).await.is_err() {
                    debug!("embedded broker: pipeline closed, forwarder stops");
                    return;
                }
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
            }
            // The router filled our buffer and paused us until we say we are ready again.
            Notification::Unschedule => {
                if let Err(e) = rx.wake().await {
                    error!(error = %e, "embedded broker: router gone");
                    return;
                }
            }
            Notification::Disconnect(..) => {
                error!("embedded broker: router disconnected the ingest link");
                return;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

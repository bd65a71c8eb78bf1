//! The embedded MQTT broker: devices connect to the gateway itself.
//!
//! ## Which broker (issue 15, measured 2026-12-02)
//! Figures from `scripts/bench-broker` (each broker alone in its own process, 2 cores at load
//! average ≈ 17 from other builds, so absolute numbers are low and noisy):
//!
//! | broker | MQTT 5 / keep-alive 0 | in, QoS 1 PUBACKed | out, 1 subscriber | idle device, keep-alive 60 |
//! |---|---|---|---|---|
//! | rmqtt 0.24 (kept) | yes / yes | 14 400 msg/s | 14 400 msg/s, 0 lost | 16.7 KB each at 10k (163 MB) |
//! | rumqttd 0.20 (replaced) | no / no | 90 900 msg/s | 91 100 msg/s, 0 lost | not measured: its process was gone after 6 021 of 10k connections |
//!
//! rmqtt is ≈ 6× slower than rumqttd here and heavier per connection; it is kept because it is
//! the only maintained embeddable broker that devices of both protocol versions can talk to;
//! 14k msg/s on a loaded machine is above SPEC §7's 10k readings/s background load with little
//! margin — re-measure on a quiet machine before sizing a deployment. 100k idle connections
//! were not measured (the machine's hard `ulimit -n` is 20 000).
//! rumqttd 0.20 (the latest release) refuses a CONNECT with keep-alive 0 and every MQTT 5
//! CONNECT on a v4 listener; its v5 listener is a separate port and lacks topic aliases, will
//! delay and session expiry, and its in-memory commit log PUBACKs before the gateway has the
//! message and evicts when the pipeline lags. Candidates that speak 3.1.1 **and** 5.0:
//! - **rmqtt 0.24** (crates.io `rmqtt`, MIT/Apache, active): a broker *library* since 0.10 — a
//!   `ServerContext` and `MqttServer` that run as tasks on the caller's tokio runtime, listeners
//!   we bind ourselves (so the port is known at once: no readiness probe, no ERROR on start),
//!   hooks for authentication and for every publish (our ingest point), v3.1/3.1.1/5.0 on one
//!   port (version detected from CONNECT), keep-alive 0, retained (through a `RetainStorage`
//!   we supply: the built-in one only logs "use the rmqtt-retainer plugin"), Last Will with
//!   will delay, persistent sessions with QoS 1/2 redelivery, session expiry, topic aliases,
//!   receive maximum, maximum packet size, shared subscriptions (`$share/g/f`), `$`-topics
//!   kept out of `#` and `+`. Cost: with the features we use (retain, shared-subscription; no
//!   TLS, WS, gRPC, plugins) it brings 107 crates (rumqttd 0.20: 71; `quinn` comes along
//!   unconditionally through rmqtt-net): the gateway's normal dependency tree goes from 280 to
//!   319 unique crates (`cargo tree -p citywatch-gateway -e normal --prefix none | sort -u`).
//! - **ntex-mqtt 9** (a v3.1.1 + v5 server *framework*): codec and per-connection state
//!   machines only; sessions, retained, will, routing and shared subscriptions would be ours to
//!   write (and to prove conformant), on the ntex runtime beside tokio. Not chosen: more code
//!   of our own for the same features.
//! - Mosquitto / EMQX / NATS: separate processes ("nothing to install first" rules them out as
//!   the embedded default; they stay supported as the external broker).
//!
//! ## How the gateway sits in it
//! - **Ingest**: a `MessagePublish` hook hands every publish matching `mqtt.topic_filter`
//!   (Last Wills included) to the pipeline's bounded channel, awaiting space. rmqtt runs the hook
//!   inside the device's connection task before the PUBACK, so a device's QoS 1 publish is
//!   PUBACKed once the message is in the gateway's channel, and a slow pipeline slows the
//!   publishing devices instead of losing messages ([`BrokerStats::dropped`] stays 0).
//! - **Commands**: [`EmbeddedBroker::publish`] queues gateway → device messages (QoS 1, in order)
//!   to one task that routes them as a system publisher; they are not fed back to the ingest.
//! - **Retained**: our own flat map from topic to message (rmqtt's topic tree cost ~1.1 KB per
//!   device birth, measured by `scripts/bench-memory`, issue 14), each message re-owned on the
//!   way in so it does not pin the connection's read buffer (`own_buffers`).
//! - **Accounts**: a `ClientAuthenticate` hook checks `mqtt.users` (anonymous devices when
//!   there are none). The TLS/ACL door ([`super::door`]) stays in front when TLS or restricted
//!   accounts are configured, unchanged in what it allows.

use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rmqtt::codec::types::QoS;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::retain::RetainStorage;
use rmqtt::server::MqttServer;
use rmqtt::session::SessionState;
use rmqtt::topic::Topic;
use rmqtt::subscribe::SharedSubscription;
use rmqtt::types::{
    AuthResult, ClientId, CodecPublish, From, Id, IsOnline, NodeId, Publish, Retain, SharedGroup, SubscriptionIdentifier, SubscriptionOptions,
    TopicFilter, TopicName,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Error, Result};
use crate::sources::config::{MqttConfig, MqttUser};
use crate::ingest::{now_ms, Inbound, Lanes};

/// Most simultaneous device connections.
pub const MAX_CONNECTIONS: usize = 262_144;
/// Room for the topic and header on top of `max_payload_bytes` (the broker limits the whole packet).
const PACKET_OVERHEAD: usize = 1024;
/// Topic aliases a v5 device may set up (MQTT 5 §3.3.2.3.4).
pub const MAX_TOPIC_ALIASES: u16 = 64;
/// QoS 1/2 messages in flight to one device (its Receive Maximum applies when lower).
const MAX_INFLIGHT: u16 = 32;
/// Messages queued for one device while it is offline (persistent session) or slow.
const MAX_QUEUED_PER_DEVICE: usize = 1000;
/// A v3.1.1 persistent session (clean session = 0) is kept this long after its device left;
/// v5 devices ask for their own Session Expiry Interval (capped by this).
pub const SESSION_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Retained and queued messages without a v5 Message Expiry Interval never expire in MQTT;
/// rmqtt needs a number.
const MESSAGE_EXPIRY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Gateway → device commands waiting to be routed.
const COMMAND_QUEUE: usize = 4096;
/// The listener's id inside rmqtt (any unique number).
const LISTENER_ID: u16 = 1;
/// Client id shown as the sender of the gateway's own publishes.
const GATEWAY_CLIENT_ID: &str = "citywatch-gateway";

/// Counters of the broker.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Publishes handed to the pipeline.
    pub forwarded: AtomicU64,
    /// Publishes lost on the way to the pipeline. Always 0 with rmqtt (the ingest hook waits for
    /// room and the device's PUBACK waits for the hook); kept for the metrics' shape.
    pub dropped: AtomicU64,
    /// The TLS/ACL door's counters (zero when it does not run).
    pub door: Arc<super::door::DoorStats>,
}

/// The broker's series of `/metrics`, the door's included (names without `_total`).
impl prometheus_client::collector::Collector for BrokerStats {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let forwarded = self.forwarded.load(Ordering::Relaxed);
        crate::metrics::counter(&mut encoder, "citywatch_broker_forwarded", "Publishes the embedded broker handed to the gateway.", forwarded)?;
        let dropped = [([("reason", "log_evicted")], self.dropped.load(Ordering::Relaxed))];
        crate::metrics::counter_family(&mut encoder, "citywatch_broker_dropped", "Publishes the embedded broker lost before the gateway read them, by reason.", dropped)?;
        prometheus_client::collector::Collector::encode(&*self.door, encoder)
    }
}

/// The running embedded broker. Dropping it stops the listener, the door and the ingest.
pub struct EmbeddedBroker {
    addr: SocketAddr,
    /// The pipeline's sender, shared with the ingest hook; `None` once forwarding stopped.
    out: Arc<RwLock<Option<Lanes>>>,
    commands: mpsc::Sender<(TopicName, Bytes, bool)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stats: Arc<BrokerStats>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker").field("addr", &self.addr).field("stats", &self.stats).finish()
    }
}

impl EmbeddedBroker {
    /// Starts the broker on `cfg.listen` and forwards every publish matching `cfg.topic_filter`
    /// into `out`. Returns once the listener is bound (port 0 picks a free port, see
    /// [`EmbeddedBroker::local_addr`]). Must be called inside a tokio runtime.
    pub async fn start(cfg: &MqttConfig, out: impl Into<Lanes>) -> Result<EmbeddedBroker> {
        let out: Lanes = out.into();
        let filter = Topic::from_str(&cfg.topic_filter)
            .map_err(|e| Error::Config(format!("mqtt.topic_filter {:?}: {e}", cfg.topic_filter)))?;
        // With the door, the broker listens on a private loopback port and the door on `listen`.
        let door_listener = if super::door::needed(cfg) {
            Some(tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| Error::Broker(format!("cannot bind {}: {e}", cfg.listen)))?)
        } else {
            None
        };
        let broker_addr = if door_listener.is_some() { SocketAddr::from((Ipv4Addr::LOCALHOST, 0)) } else { cfg.listen };
        let tls = cfg.tls.as_ref().map(crate::tls::acceptor).transpose().map_err(|e| Error::Config(format!("mqtt.tls: {e}")))?;
        let max_packet = cfg.max_payload_bytes.saturating_add(PACKET_OVERHEAD);

        let listener = listener_settings(cfg, broker_addr, max_packet)
            .bind()
            .and_then(|l| l.tcp())
            .map_err(|e| Error::Broker(format!("cannot bind {broker_addr}: {e}")))?;
        let bound = listener.local_addr().map_err(|e| Error::Broker(format!("cannot bind {broker_addr}: {e}")))?;

        let scx = ServerContext::new()
            // rmqtt would refuse connections while the machine's CPU load is high.
            .busy_check_enable(false)
            .build()
            .await;
        *scx.extends.retain_mut().await = Box::new(Retained::default());
        *scx.extends.shared_subscription_mut().await = Box::new(SharedRoundRobin::default());
        let stats = Arc::new(BrokerStats::default());
        let out = Arc::new(RwLock::new(Some(out)));
        let register = scx.extends.hook_mgr().register();
        register.add(Type::ClientAuthenticate, Box::new(Accounts { users: cfg.users.clone() })).await;
        register
            .add(Type::MessagePublish, Box::new(Ingest { filter, out: Arc::clone(&out), stats: Arc::clone(&stats) }))
            .await;
        register.start().await;

        let mut tasks = Vec::new();
        let server = MqttServer::new(scx.clone()).listener_by_id(listener, LISTENER_ID).build();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = server.run().await {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        }));
        let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        tasks.push(tokio::spawn(route_commands(scx, commands_rx)));

        let addr = match door_listener {
            None => bound,
            Some(listener) => {
                let front = listener.local_addr().map_err(|e| Error::Broker(format!("door listener: {e}")))?;
                let door = super::door::Door {
                    acl: super::door::Acl::new(&cfg.users),
                    tls,
                    upstream: bound,
                    max_packet,
                    stats: Arc::clone(&stats.door),
                };
                info!(%front, tls = door.tls.is_some(), broker = %bound, "MQTT door (TLS/ACL) in front of the embedded broker");
                tasks.push(tokio::spawn(super::door::run(listener, Arc::new(door))));
                front
            }
        };
        info!(%addr, "embedded MQTT broker (rmqtt; MQTT 3.1, 3.1.1, 5.0) listening");
        Ok(EmbeddedBroker { addr, out, commands, tasks, stats })
    }

    /// Publishes a gateway → device message at QoS 1 (devices receive it at the QoS they
    /// subscribed with). `retain` keeps it for devices that subscribe later. Commands are routed
    /// in the order given; an error means the command queue is full or the broker is gone.
    pub fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<()> {
        if topic.is_empty() || topic.contains(['+', '#']) {
            return Err(Error::Config(format!("cannot publish to topic {topic:?}")));
        }
        self.commands.try_send((TopicName::from(topic), Bytes::from(payload), retain)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Broker("command queue full".into()),
            mpsc::error::TrySendError::Closed(_) => Error::Broker("broker stopped".into()),
        })
    }

    /// The address devices connect to (the configured one, with the port chosen if it was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops handing messages to the gateway (shutdown): the source channel's last sender is
    /// dropped, so the decode stage drains and stops. Publishing still works.
    pub fn stop_forwarding(&self) {
        if let Ok(mut out) = self.out.write() {
            *out = None;
        }
    }

    /// Forwarding counters.
    pub fn stats(&self) -> Arc<BrokerStats> {
        self.stats.clone()
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop_forwarding();
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn listener_settings(cfg: &MqttConfig, addr: SocketAddr, max_packet: usize) -> Builder {
    Builder::new()
        .name("citywatch")
        .laddr(addr)
        // A restart binds again at once while the old process's connections are in TIME_WAIT
        // (rmqtt leaves SO_REUSEADDR unset; tokio's and mosquitto's listeners set it).
        .reuseaddr(Some(true))
        .nodelay(true)
        .max_connections(MAX_CONNECTIONS)
        .max_packet_size(u32::try_from(max_packet).unwrap_or(u32::MAX))
        .allow_anonymous(cfg.users.is_empty())
        .allow_zero_keepalive(true)
        .max_inflight(NonZeroU16::new(MAX_INFLIGHT).unwrap_or(NonZeroU16::MIN))
        .max_mqueue_len(MAX_QUEUED_PER_DEVICE)
        .handshake_timeout(Duration::from_secs(10))
        .session_expiry_interval(SESSION_EXPIRY)
        .max_session_expiry_interval(SESSION_EXPIRY)
        .message_expiry_interval(MESSAGE_EXPIRY)
        .max_topic_aliases(MAX_TOPIC_ALIASES)
}

/// Routes the gateway's own publishes, one at a time, in order.
async fn route_commands(scx: ServerContext, mut rx: mpsc::Receiver<(TopicName, Bytes, bool)>) {
    let id = Id::from(scx.node.id(), ClientId::from_static(GATEWAY_CLIENT_ID));
    while let Some((topic, payload, retain)) = rx.recv().await {
        let publish = Publish::from(CodecPublish {
            dup: false,
            retain,
            qos: QoS::AtLeastOnce,
            topic,
            packet_id: None,
            payload,
            properties: None,
        })
        .create_time(rmqtt::utils::timestamp_millis());
        let expiry = retain.then_some(MESSAGE_EXPIRY);
        if let Err(e) = SessionState::forwards(&scx, From::from_system(id.clone()), publish, false, expiry).await {
            warn!(error = %e, "embedded broker: a gateway publish could not be routed");
        }
    }
}

/// `ClientAuthenticate`: the configured accounts (only asked when a username is given or
/// anonymous connections are off).
struct Accounts {
    users: Vec<MqttUser>,
}

#[async_trait]
#[allow(elided_lifetimes_in_paths)] // async_trait needs the trait's exact signature
impl Handler for Accounts {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let Parameter::ClientAuthenticate(connect) = param else { return (true, acc) };
        let username = connect.username().map(|u| u.as_ref() as &str);
        let password = connect.password().map(|p| p.as_ref());
        let known = self.users.iter().any(|u| Some(u.username.as_str()) == username && Some(u.password.as_bytes()) == password);
        let verdict = if known { AuthResult::Allow(false, None) } else { AuthResult::BadUsernameOrPassword };
        (false, Some(HookResult::AuthResult(verdict)))
    }
}

/// `MessagePublish`: hands device publishes (and Last Wills) under the filter to the pipeline.
struct Ingest {
    filter: Topic,
    out: Arc<RwLock<Option<Lanes>>>,
    stats: Arc<BrokerStats>,
}

#[async_trait]
#[allow(elided_lifetimes_in_paths)] // async_trait needs the trait's exact signature
impl Handler for Ingest {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let Parameter::MessagePublish(_, _, publish) = param else { return (true, acc) };
        // With topic aliases rmqtt has already put the real topic back.
        if !self.filter.matches_str(&publish.topic) {
            return (true, acc);
        }
        // Events and command acks take the alert lane, so a gas alarm never waits behind bulk telemetry.
        let out = self.out.read().ok().and_then(|o| o.as_ref().map(|lanes| lanes.for_topic(&publish.topic).clone()));
        let Some(out) = out else { return (true, acc) };
        let inbound = Inbound { topic: publish.topic.to_string(), payload: publish.payload.clone(), received_ms: now_ms(), ack: None, origin: crate::ingest::Origin::Live };
        if out.send(inbound).await.is_ok() {
            self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        } else {
            debug!("embedded broker: pipeline closed");
        }
        (true, acc)
    }
}

/// The retained messages, in memory: one map from topic to message (rmqtt's default answers
/// "use the plugin", and its topic tree costs a hash map per topic level, ~1.1 KB per device
/// birth). A subscription without wildcards (a device's own `cmd` topic) is one lookup; one
/// with wildcards scans the map, which only operators' tools do.
#[derive(Default)]
struct Retained {
    messages: tokio::sync::RwLock<std::collections::HashMap<TopicName, rmqtt::types::TimedValue<Retain>>>,
    max: std::sync::atomic::AtomicIsize,
}

#[async_trait]
impl RetainStorage for Retained {
    fn enable(&self) -> bool {
        true
    }

    async fn set(&self, topic: &TopicName, mut retain: Retain, expiry: Option<Duration>) -> rmqtt::Result<()> {
        let mut messages = self.messages.write().await;
        if retain.publish.payload.is_empty() {
            // An empty retained publish clears the topic's message (MQTT 3.3.1.3).
            messages.remove(topic);
            return Ok(());
        }
        own_buffers(&mut retain);
        messages.insert(TopicName::from(&**topic), rmqtt::types::TimedValue::new(retain, expiry));
        self.max.fetch_max(messages.len() as isize, Ordering::Relaxed);
        Ok(())
    }

    async fn get(&self, filter: &TopicFilter) -> rmqtt::Result<Vec<(TopicName, Retain)>> {
        let messages = self.messages.read().await;
        let live = |v: &rmqtt::types::TimedValue<Retain>| !v.is_expired();
        if !filter.contains(['+', '#']) {
            return Ok(messages.get_key_value(filter).filter(|(_, v)| live(v)).map(|(t, v)| (t.clone(), v.value().clone())).into_iter().collect());
        }
        let pattern = Topic::from_str(filter)?;
        // `$`-topics are not matched by a filter starting with a wildcard (MQTT 4.7.2).
        let wild_start = filter.starts_with(['+', '#']);
        Ok(messages
            .iter()
            .filter(|(t, v)| live(v) && !(wild_start && t.starts_with('$')) && pattern.matches_str(&***t))
            .map(|(t, v)| (t.clone(), v.value().clone()))
            .collect())
    }

    async fn count(&self) -> isize {
        self.messages.read().await.len() as isize
    }

    async fn max(&self) -> isize {
        self.max.load(Ordering::Relaxed)
    }
}

/// Gives a retained message its own copies of its topic, payload and properties. As decoded,
/// they are slices of the connection's read buffer, and a retained message (every device's
/// birth) lives as long as the device: it would keep that whole buffer allocation alive, with
/// all the telemetry read into it since. Measured with `scripts/bench-memory` (issue 14).
fn own_buffers(retain: &mut Retain) {
    let copy = |s: &TopicName| TopicName::from(&**s);
    let publish = &mut retain.publish.inner;
    publish.topic = copy(&publish.topic);
    publish.payload = Bytes::copy_from_slice(&publish.payload);
    if let Some(p) = publish.properties.as_mut() {
        p.correlation_data = p.correlation_data.as_ref().map(|d| Bytes::copy_from_slice(d));
        p.content_type = p.content_type.as_ref().map(copy);
        p.response_topic = p.response_topic.as_ref().map(copy);
        for (k, v) in p.user_properties.iter_mut() {
            (*k, *v) = (copy(k), copy(v));
        }
    }
}

/// MQTT 5 shared subscriptions (`$share/{group}/{filter}`): each message goes to one member of
/// the group, round-robin over the members online (any member when none is). rmqtt's default
/// strategy answers "not supported", which would take `$share/…` as a literal filter.
#[derive(Default)]
struct SharedRoundRobin(std::sync::atomic::AtomicUsize);

#[async_trait]
#[allow(elided_lifetimes_in_paths)] // async_trait needs the trait's exact signature
impl SharedSubscription for SharedRoundRobin {
    fn is_supported(&self) -> bool {
        true
    }

    async fn choice(
        &self,
        _scx: &ServerContext,
        _group: &SharedGroup,
        _publisher: &Id,
        _topic: &TopicName,
        members: &[(NodeId, ClientId, SubscriptionOptions, Option<Vec<SubscriptionIdentifier>>, Option<IsOnline>)],
    ) -> Option<(usize, IsOnline)> {
        if members.is_empty() {
            return None;
        }
        let turn = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // No allocation per message: count the online members, then take the turn's one.
        let is_online = |m: &(NodeId, ClientId, SubscriptionOptions, Option<Vec<SubscriptionIdentifier>>, Option<IsOnline>)| m.4.unwrap_or(true);
        let online = members.iter().filter(|m| is_online(m)).count();
        if online == 0 {
            // Nobody online: queue it in one member's session (delivered when it comes back).
            return Some((turn % members.len(), false));
        }
        let pick = members.iter().enumerate().filter(|(_, m)| is_online(m)).nth(turn % online).map(|(i, _)| i)?;
        Some((pick, true))
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

#[cfg(test)]
#[path = "broker_bench.rs"]
mod bench;

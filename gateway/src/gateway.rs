//! Wires the stages into a running gateway and shuts them down in order.
//!
//! Start: store → registry (reloaded from the store) → source (broker or external client, for
//! its publisher) → incident store, push channels (each with its backlog from the outbox) and
//! the incident manager → rule engine and decode stage → HTTP → demo fleet. Stop, in the
//! reverse direction of data (as in mini-redis): the fleet and the source stop first, the
//! decode stage drains the source channel and drops its store writer, the incident manager
//! commits what is pending, the push channels stop after their current attempt (what they have
//! not delivered stays in the outbox), the store writer commits and exits. Nothing accepted is
//! dropped on the way out.
//!
//! In cluster mode the owned partitions of the NATS ingest stream replace the MQTT source, the
//! outbox feeds the replicated incident log alone, and the push channels deliver from that log
//! (`crate::cluster`); a partition's consumer starts once the incident manager has adopted the
//! partition's unclosed incidents.
//!
//! [`Gateway::start`] reads as the pipeline; each stage is built from its config by one
//! `start_*`/`open_*` function below it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::sync::{mpsc, watch};

use crate::api::{self, ApiState};
use crate::config::{Config, MqttMode};
use crate::decode::DecodeStage;
use crate::incidents::book::Book;
use crate::incidents::manager::{self, ChannelSender, IncidentsHandle, Manager};
use crate::incidents::silence::{Silence, SilenceConfig};
use crate::incidents::store::IncidentStore;
use crate::ingest::{Inbound, Lanes};
use crate::inspections::service::InspectionsHandle;
use crate::metrics::Metrics;
use crate::model::{Incident, Outcome, PublishFn};
use crate::store::influx::InfluxTap;
use crate::rules::{Engine, RuleSet};
use crate::registry::Registry;
use crate::sources::broker::EmbeddedBroker;
use crate::store::SqliteStore;

/// Errors starting or stopping the gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store: {0}")]
    Store(#[from] crate::store::Error),
    #[error("MQTT: {0}")]
    Source(#[from] crate::sources::Error),
    #[error("HTTP listener on {addr}: {source}")]
    Http { addr: SocketAddr, source: std::io::Error },
    #[error("demo fleet: {0}")]
    Demo(String),
    #[error("{0}")]
    Incidents(#[from] crate::incidents::store::Error),
    #[error("rules: {0}")]
    Rules(#[from] crate::rules::Error),
    /// The siren test day's silence (`[inspections.siren_test]`) is unusable.
    #[error("rules: {0}")]
    SirenTestSilence(String),
    #[error("notify: {0}")]
    Notify(#[from] crate::notify::Error),
    /// An unsafe or unusable security setting (names the key).
    #[error("{0}")]
    Security(String),
    #[error("maintenance: {0}")]
    Maintenance(#[from] crate::inspections::Error),
    #[error("{0}")]
    Influx(#[from] crate::store::influx::Error),
    #[error("{0}")]
    Cluster(#[from] crate::cluster::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Without the `demo` feature there is no fleet to run: `Option<DemoFleet>` is always `None`.
#[cfg(not(feature = "demo"))]
#[derive(Debug, Clone)]
pub enum DemoFleet {}

/// The simulated fleet `citywatch demo` runs against the embedded broker.
#[cfg(feature = "demo")]
#[derive(Debug, Clone)]
pub struct DemoFleet {
    pub devices: usize,
    pub site: String,
    pub scenario: citywatch_edge::sim::Scenario,
    pub interval_s: u32,
    pub rate: Option<f64>,
}

/// A running gateway.
pub struct Gateway {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<SqliteStore>,
    pub http_addr: SocketAddr,
    /// The embedded broker's address, in embedded mode.
    pub mqtt_addr: Option<SocketAddr>,
    pub incidents: IncidentsHandle,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    decode: tokio::task::JoinHandle<()>,
    manager: tokio::task::JoinHandle<()>,
    dispatchers: Vec<tokio::task::JoinHandle<()>>,
    broker: Option<Arc<EmbeddedBroker>>,
    /// The InfluxDB sink's task: it ends after the decode stage drops its tap.
    influx: Option<tokio::task::JoinHandle<()>>,
    /// Cluster mode: the adoption hook given to the partition consumers (it holds an incident
    /// handle, so it is emptied before the manager is awaited).
    adopt: Option<watch::Sender<Option<crate::cluster::adopt::AdoptFn>>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("http_addr", &self.http_addr).field("mqtt_addr", &self.mqtt_addr).finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts every stage; returns once the HTTP and MQTT listeners accept connections.
    /// Reads as the pipeline: each stage is built from its config by one function below.
    pub async fn start(config: Config, demo: Option<DemoFleet>) -> Result<Gateway> {
        let started = Instant::now();
        // Before anything opens: an open API must not face the network.
        crate::api::auth::check_exposure(config.http.listen, &config.http.tokens).map_err(|(key, reason)| Error::Security(format!("{key}: {reason}")))?;
        let http_tls = config.http.tls.as_ref().map(crate::tls::acceptor).transpose().map_err(|e| Error::Security(format!("http.tls: {e}")))?;
        let (store, writer) = SqliteStore::open(&config.storage)?;
        let store = Arc::new(store);
        let registry = Arc::new(Registry::new());
        let devices = store.devices()?;
        tracing::info!(devices = devices.len(), path = %config.storage.path.display(), "store open");
        registry.load(devices);
        let metrics = Arc::new(Metrics::new());
        // The one registry `/metrics` encodes: each component adds its series as it is wired.
        let mut prometheus = MetricsRegistry::default();
        metrics.register(&mut prometheus);
        prometheus.register_collector(Box::new(crate::metrics::Uptime(started)));
        prometheus.register_collector(Box::new(crate::store::StoreMetrics(Arc::clone(&store))));
        prometheus.register_collector(Box::new(crate::registry::HealthMetrics { registry: Arc::clone(&registry), ingest: config.ingest.clone() }));
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        // sources → (bounded, two lanes: alerts first) → decode
        let (lanes, inbound_rx) = Lanes::channel(config.mqtt.queue_capacity);
        let queue_probe = lanes.clone();
        let source_queue: Arc<dyn Fn() -> (usize, usize) + Send + Sync> = Arc::new(move || queue_probe.fill());
        prometheus.register_collector(Box::new(crate::ingest::QueueMetrics(Arc::clone(&source_queue))));
        // Cluster mode: owned partitions of the NATS ingest stream replace the MQTT source.
        let cluster = join_cluster(&config, &lanes.bulk, &stop_rx, &mut tasks).await?;
        if let Some(joined) = &cluster {
            prometheus.register_collector(Box::new(Arc::clone(&joined.partition_metrics)));
        }
        let sources = match &cluster {
            Some(joined) => {
                // The partition consumers hold their own senders; the lanes close with them.
                drop(lanes);
                Sources { broker: None, mqtt_addr: None, publish: joined.cluster.publisher(Arc::clone(&joined.leases)) }
            }
            None => start_sources(&config, &mut prometheus, lanes, &stop_rx, &mut tasks).await?,
        };
        // incidents → notify (and the long-term store beside them)
        let rules = Arc::new(RuleSet::from_config(&config.rules)?);
        let opened = open_incidents(&config, &rules)?;
        let influx = start_influx(&config, &registry, &mut prometheus)?;
        let notify = start_notify(&config, &opened, &sources.publish, influx.as_ref().map(|(_, tap)| tap), cluster.as_ref(), &stop_rx, &mut tasks)?;
        prometheus.register_collector(Box::new(crate::notify::ChannelMetrics(notify.states.clone())));
        let (manager, incidents, requests) =
            Manager::new(opened.book, Arc::clone(&opened.store), notify.queues, Some(Arc::clone(&sources.publish)), config.incidents.retention.as_ms());
        let (releases_tx, releases_rx) = mpsc::channel(manager::RELEASES_QUEUE);
        let mut manager = manager.with_releases(releases_tx);
        if cluster.is_some() {
            // An ingest message is acknowledged only once what it changed is in the incident log.
            manager = manager.with_acks_after(Arc::from(crate::cluster::sinks::LOG_CHANNEL));
        }
        let manager = tokio::spawn(manager.run(requests, notify.done));
        incidents.register_metrics(&mut prometheus);
        // Cluster mode: one API for the city — the other partitions' owners and the incident log.
        let city_link = cluster.as_ref().map(|joined| (joined.cluster.clone(), Arc::clone(&joined.leases)));
        // Readings history past a failover, from the long-term store when it is to be read.
        let history = match config.storage.influx.as_ref().filter(|_| cluster.is_some()) {
            Some(influx) => influx
                .history_url
                .as_deref()
                .map(|url| crate::store::influx::History::new(url, influx.timeout.0))
                .transpose()
                .map_err(crate::store::influx::Error::Client)?,
            None => None,
        };
        let city = city_link.as_ref().map(|(c, _)| {
            let (incidents, task) = crate::cluster::city::CityIncidents::start(c.js.clone(), stop_rx.clone());
            tasks.push(("cluster incident view", task));
            Arc::new(api::city::City { forwarder: crate::cluster::forward::Forwarder::new(c.client.clone()), incidents, partitions: c.config.partitions, history: history.clone() })
        });
        // Cluster mode: partitions gained from now on (and those waiting) adopt their incidents.
        let adopt = cluster.map(|joined| {
            joined.adopt.send_replace(Some(adopt_into(incidents.clone())));
            joined.adopt
        });
        // decode (with the rule engine inline) → store, incidents
        let mut stage = DecodeStage::new(Arc::clone(&registry), Arc::clone(&metrics), config.ingest.clone())
            .with_rules(Engine::new(Arc::clone(&rules)), incidents.clone(), releases_rx, &opened.active);
        if let Some((_, tap)) = &influx {
            stage = stage.with_influx(tap.clone());
        }
        let decode = tokio::spawn(stage.run(inbound_rx, writer));
        // Beside the pipeline: maintenance, then the HTTP API over everything.
        let maintenance = start_maintenance(&config, &registry, &store, &mut prometheus, &incidents, &stop_rx, &mut tasks)?;
        let state = ApiState {
            registry: Arc::clone(&registry),
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            ingest: config.ingest.clone(),
            started,
            source_queue,
            prometheus: Arc::new(prometheus),
            incidents: Some(incidents.clone()),
            rules,
            notify: notify.states,
            city,
        };
        let routes = api::router(state).merge(api::inspections::router(maintenance));
        if let Some((c, leases)) = city_link {
            tasks.push(("cluster API answers", start_answering(&c, leases, routes.clone(), &stop_rx)));
        }
        let app = api::auth::protect(routes, Arc::new(api::auth::Authenticator::new(&config.http.tokens)));
        let http_addr = start_http(&config, app, http_tls, &stop_rx, &mut tasks).await?;
        #[cfg(feature = "demo")]
        if let Some(fleet) = demo {
            start_demo(&config, fleet, sources.mqtt_addr, &stop_rx, &mut tasks)?;
        }
        #[cfg(not(feature = "demo"))]
        if let Some(fleet) = demo {
            match fleet {}
        }
        let (broker, mqtt_addr, dispatchers) = (sources.broker, sources.mqtt_addr, notify.dispatchers);
        let influx = influx.map(|(task, _)| task);
        Ok(Gateway { registry, metrics, store, http_addr, mqtt_addr, incidents, stop, tasks, decode, manager, dispatchers, broker, influx, adopt })
    }

    /// Stops every stage in order and waits until the store has committed everything.
    ///
    /// One signal, `stop`, reaches the stages at the head of the pipeline (sources, the HTTP
    /// API, maintenance, the demo fleet); every later stage stops when its input closes, and
    /// each is awaited in turn: decode (its input closes when the sources are gone; it drops
    /// its store writer and incident handle), the incident manager (when every handle is gone;
    /// it commits and drops the push channels' queues), the dispatchers (after their current
    /// attempt), the InfluxDB sink and the store writer.
    pub async fn shutdown(self) -> Result<()> {
        let Gateway { store, stop, tasks, decode, broker, incidents, manager, dispatchers, influx, adopt, .. } = self;
        let _ = stop.send(true);
        for (name, mut task) in tasks {
            if tokio::time::timeout(Duration::from_secs(10), &mut task).await.is_err() {
                // E.g. an HTTP client holding a live stream open: its handles must go.
                tracing::warn!(task = name, "did not stop within 10 s; aborted");
                task.abort();
                let _ = task.await;
            }
        }
        // The embedded broker's forwarder holds the last sender of the source channel.
        if let Some(b) = &broker {
            b.stop_forwarding();
        }
        if tokio::time::timeout(Duration::from_secs(30), decode).await.is_err() {
            tracing::warn!("decode stage did not drain within 30 s");
        }
        // The partition consumers are gone; the adoption hook's handle goes too.
        if let Some(adopt) = adopt {
            adopt.send_replace(None);
        }
        // The decode stage has sent its last signals and the API is gone: with this last handle
        // dropped, the manager commits what is pending and stops, closing the channel queues.
        drop(incidents);
        if tokio::time::timeout(Duration::from_secs(10), manager).await.is_err() {
            tracing::warn!("incident manager did not stop within 10 s");
        }
        for d in dispatchers {
            let _ = tokio::time::timeout(Duration::from_secs(10), d).await;
        }
        // The decode stage and the `influx` channel dropped their taps: the sink finishes its
        // request and spools the rest.
        if let Some(sink) = influx {
            if tokio::time::timeout(Duration::from_secs(30), sink).await.is_err() {
                tracing::warn!("InfluxDB sink did not stop within 30 s");
            }
        }
        drop(broker);
        let store = Arc::try_unwrap(store).map_err(|_| crate::store::Error::Invalid("store still in use at shutdown".into()));
        match store {
            Ok(store) => tokio::task::spawn_blocking(move || store.close())
                .await
                .map_err(|e| crate::store::Error::Invalid(e.to_string()))??,
            Err(e) => tracing::warn!(error = %e, "store not closed cleanly; SQLite's journal keeps it consistent"),
        }
        tracing::info!("gateway stopped; pending writes flushed");
        Ok(())
    }
}

/// The tasks stopped by the one stop signal, in the order they are awaited.
type Tasks = Vec<(&'static str, tokio::task::JoinHandle<()>)>;

/// What the source stage leaves running: the embedded broker (if any) and the publisher that
/// carries device commands and the MQTT push channel.
struct Sources {
    broker: Option<Arc<EmbeddedBroker>>,
    mqtt_addr: Option<SocketAddr>,
    publish: PublishFn,
}

/// A joined cluster, the partition leases this gateway holds, and where to set the incident
/// manager's adoption hook once it runs.
struct Joined {
    cluster: crate::cluster::Cluster,
    leases: Arc<crate::cluster::LeaseTable>,
    partition_metrics: Arc<crate::cluster::partition_metrics::PartitionMetrics>,
    adopt: watch::Sender<Option<crate::cluster::adopt::AdoptFn>>,
}

/// Cluster mode (`[cluster]` set): joins, and feeds owned partitions into `inbound` (each once
/// its unclosed incidents are adopted, see [`adopt_into`]).
async fn join_cluster(config: &Config, inbound: &mpsc::Sender<Inbound>, stop_rx: &watch::Receiver<bool>, tasks: &mut Tasks) -> Result<Option<Joined>> {
    let Some(cluster_config) = &config.cluster else { return Ok(None) };
    let cluster = crate::cluster::Cluster::connect(cluster_config).await?;
    let (adopt, adopt_rx) = watch::channel(None);
    let started = cluster.join(inbound.clone(), adopt_rx, stop_rx.clone()).await?;
    tasks.push(("cluster", started.task));
    tracing::info!(node = %cluster_config.node, nats = ?cluster_config.nats, "joined the cluster");
    Ok(Some(Joined { cluster, leases: started.leases, partition_metrics: started.metrics, adopt }))
}

/// Cluster mode: answers the API requests other gateways forward for the partitions this one
/// holds, with its own routes (the asking gateway authenticated the caller).
fn start_answering(c: &crate::cluster::Cluster, leases: Arc<crate::cluster::LeaseTable>, routes: axum::Router, stop_rx: &watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    let answering = crate::cluster::forward::answer(c.client.clone(), leases, api::city::answer_with(routes), stop_rx.clone());
    tokio::spawn(async move {
        if let Err(e) = answering.await {
            tracing::error!(error = %e, "cluster: no longer answering forwarded API requests");
        }
    })
}

/// The adoption hook: incidents read from the log go to the incident manager.
fn adopt_into(incidents: IncidentsHandle) -> crate::cluster::adopt::AdoptFn {
    Arc::new(move |adopted| {
        let incidents = incidents.clone();
        Box::pin(async move { incidents.adopt(adopted).await.map_err(|e| e.to_string()) })
    })
}

/// Modbus buses (bulk lane), then the MQTT source (embedded broker or external client; alerts
/// and bulk by topic), all into `inbound`.

async fn start_sources(config: &Config, prometheus: &mut MetricsRegistry, inbound: Lanes, stop_rx: &watch::Receiver<bool>, tasks: &mut Tasks) -> Result<Sources> {
    // Modbus buses poll into the same source channel as MQTT (stopped with the sources).
    let mut buses = Vec::new();
    for poller in crate::sources::modbus::build(&config.modbus)? {
        buses.push(poller.stats());
        tasks.push(("modbus", tokio::spawn(poller.run(inbound.bulk.clone(), stop_rx.clone()))));
    }
    if !buses.is_empty() {
        prometheus.register_collector(Box::new(crate::sources::modbus::BusMetrics(buses)));
    }
    match config.mqtt.mode {
        MqttMode::Embedded => {
            let broker = Arc::new(EmbeddedBroker::start(&config.mqtt, inbound).await?);
            let addr = broker.local_addr();
            tracing::info!(%addr, "embedded MQTT broker listening");
            prometheus.register_collector(Box::new(broker.stats()));
            let b = Arc::clone(&broker);
            let publish: PublishFn = Arc::new(move |topic: String, payload: Vec<u8>, retain: bool| {
                let result = b.publish(&topic, payload, retain).map_err(|e| e.to_string());
                Box::pin(async move { result })
            });
            Ok(Sources { broker: Some(broker), mqtt_addr: Some(addr), publish })
        }
        MqttMode::External => {
            let (publisher, source) = crate::sources::mqtt::connect(&config.mqtt)?;
            let rx = stop_rx.clone();
            tracing::info!(url = %config.mqtt.url, "subscribing to the external broker");
            tasks.push((
                "mqtt",
                tokio::spawn(async move {
                    if let Err(e) = source.run(inbound, rx).await {
                        tracing::error!(error = %e, "external MQTT source stopped");
                    }
                }),
            ));
            let publish: PublishFn = Arc::new(move |topic: String, payload: Vec<u8>, retain: bool| {
                let p = publisher.clone();
                Box::pin(async move { p.publish(&topic, payload, retain).await.map_err(|e| e.to_string()) })
            });
            Ok(Sources { broker: None, mqtt_addr: None, publish })
        }
    }
}

/// The incident store as found at start: the book rebuilt from the unclosed incidents and the
/// silences, and what is still active (for the rule engine and the push channels).
struct OpenedIncidents {
    store: Arc<IncidentStore>,
    book: Book,
    /// (device, rule) pairs the rule engine resumes as active.
    active: Vec<(String, String)>,
    active_incidents: Vec<Arc<Incident>>,
}

fn open_incidents(config: &Config, rules: &RuleSet) -> Result<OpenedIncidents> {
    let now = crate::ingest::now_ms();
    let store = Arc::new(IncidentStore::open(&config.storage.path)?);
    let unclosed = store.load_unclosed()?;
    let mut silences = config.incidents.silences();
    // The siren test window holds `siren_activated` back (the maintenance side checks it).
    if config.inspections.siren_test.enabled {
        silences.push(config.inspections.siren_test.silence().map_err(Error::SirenTestSilence)?);
    }
    for body in store.silences()? {
        match serde_json::from_str::<SilenceConfig>(&body).map_err(|e| e.to_string()).and_then(Silence::new) {
            Ok(s) if !s.expired_at(now) => silences.push(s),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "a stored silence is invalid; ignored"),
        }
    }
    tracing::info!(unclosed = unclosed.len(), silences = silences.len(), "incident store open");
    let active_incidents: Vec<Arc<Incident>> = unclosed.iter().filter(|i| i.state.is_active()).cloned().map(Arc::new).collect();
    let book = Book::new(config.incidents.clone(), unclosed, silences, now)
        .with_situations(rules.situations().to_vec())
        .with_parents(rules.parents().to_vec())
        .with_groups(rules.groups().to_vec());
    let active = book.active_device_rules().into_iter().map(|(d, r, _)| (d, r)).collect();
    Ok(OpenedIncidents { store, book, active, active_incidents })
}

/// The long-term store, if configured: its task and the tap that feeds it a copy of every
/// reading (from the decode stage, never waited for) and every incident change.
fn start_influx(config: &Config, registry: &Arc<Registry>, prometheus: &mut MetricsRegistry) -> Result<Option<(tokio::task::JoinHandle<()>, InfluxTap)>> {
    let Some(influx_config) = &config.storage.influx else { return Ok(None) };
    let (sink, tap, rx) = crate::store::influx::InfluxSink::open(influx_config.clone(), &config.storage.path, Some(registry.clone()))?;
    sink.stats().register(prometheus);
    tracing::info!(url = %influx_config.url, bucket = %influx_config.bucket, "InfluxDB sink on");
    Ok(Some((tokio::spawn(sink.run(rx)), tap)))
}

/// The push channels, each dispatching from its backlog in the outbox and then from its queue.
struct Notify {
    /// Each channel's queue, fed by the incident manager.
    queues: Vec<(Arc<str>, ChannelSender)>,
    states: Vec<Arc<crate::notify::ChannelState>>,
    dispatchers: Vec<tokio::task::JoinHandle<()>>,
    /// Delivery outcomes, back to the incident manager.
    done: mpsc::Receiver<(Arc<str>, i64, Outcome)>,
}

/// In cluster mode the outbox feeds the replicated incident log alone (appended only while this
/// gateway holds the site's partition) and every configured push channel delivers from the log
/// through a durable consumer shared by all gateways (stopped with the sources).
fn start_notify(
    config: &Config,
    opened: &OpenedIncidents,
    publish: &PublishFn,
    influx: Option<&InfluxTap>,
    cluster: Option<&Joined>,
    stop_rx: &watch::Receiver<bool>,
    tasks: &mut Tasks,
) -> Result<Notify> {
    let mut sinks = crate::notify::build_sinks(&config.notify, Some(Arc::clone(publish)))?;
    let mut log_states = Vec::new();
    if let Some(joined) = cluster {
        let c = &joined.cluster;
        let ack_wait = crate::cluster::delivery::ack_wait(c.config.lease_ttl.0);
        let limit = crate::cluster::calls::worker_call_timeout(c.config.lease_ttl.0);
        for sink in std::mem::take(&mut sinks) {
            let state = crate::notify::ChannelState::new(Arc::clone(&sink.0));
            log_states.push(Arc::clone(&state));
            let channel = crate::cluster::delivery::LogChannel { js: c.js.clone(), sink, state, retry: config.notify.retry.clone(), ack_wait, limit };
            tasks.push(("cluster push channel", tokio::spawn(channel.run(stop_rx.clone()))));
        }
        let fence = crate::cluster::sinks::Fence { leases: Arc::clone(&joined.leases), partitions: c.config.partitions };
        sinks.push(crate::cluster::sinks::log_sink(c.js.clone(), fence, limit));
    }
    if let Some(tap) = influx {
        sinks.push((Arc::from(crate::notify::influx::CHANNEL), Arc::new(crate::notify::influx::InfluxIncidentSink::new(tap.clone()))));
    }
    let (done_tx, done) = mpsc::channel(manager::OUTCOMES_QUEUE);
    let mut notify = Notify { queues: Vec::new(), states: log_states, dispatchers: Vec::new(), done };
    for (name, sink) in sinks {
        // Alertmanager forgets alerts not re-posted: the sink re-posts what is still active.
        sink.resume(&opened.active_incidents);
        let state = crate::notify::ChannelState::new(Arc::clone(&name));
        let backlog = opened.store.pending(&name)?;
        if !backlog.is_empty() {
            tracing::info!(channel = %name, pending = backlog.len(), "undelivered incident changes from before the restart");
        }
        let (tx, rx) = manager::channel_queue(manager::CHANNEL_QUEUE);
        notify.queues.push((Arc::clone(&name), tx));
        notify.states.push(Arc::clone(&state));
        let outbox = Some(Arc::clone(&opened.store));
        let dispatcher = crate::notify::Dispatcher { sink, state, backlog, retry: config.notify.retry.clone(), outbox };
        notify.dispatchers.push(tokio::spawn(dispatcher.run(rx, done_tx.clone())));
    }
    Ok(notify)
}

/// Maintenance: inventory, schedules, reminders, the siren test day.
fn start_maintenance(
    config: &Config,
    registry: &Arc<Registry>,
    store: &Arc<SqliteStore>,
    prometheus: &mut MetricsRegistry,
    incidents: &IncidentsHandle,
    stop_rx: &watch::Receiver<bool>,
    tasks: &mut Tasks,
) -> Result<InspectionsHandle> {
    let (maintenance, handle) =
        crate::inspections::Service::open(config.inspections.clone(), &config.storage.path, Arc::clone(registry), Some(Arc::clone(store)), incidents.clone())?;
    tracing::info!(devices = maintenance.len(), "maintenance inventory loaded");
    handle.stats.register(prometheus);
    tasks.push(("maintenance", tokio::spawn(maintenance.run(stop_rx.clone()))));
    Ok(handle)
}

/// The HTTP API (HTTPS when `[http.tls]` is set), stopped with the sources.
async fn start_http(config: &Config, app: axum::Router, tls: Option<tokio_rustls::TlsAcceptor>, stop_rx: &watch::Receiver<bool>, tasks: &mut Tasks) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| Error::Http { addr: config.http.listen, source })?;
    let http_addr = listener.local_addr().map_err(|source| Error::Http { addr: config.http.listen, source })?;
    let mut http_stop = stop_rx.clone();
    // HTTPS when [http.tls] is set: the same router behind a TLS-terminating listener.
    let (tls_listener, plain_listener) = match tls {
        Some(acceptor) => (Some(crate::tls::TlsListener::new(listener, acceptor).map_err(|source| Error::Http { addr: config.http.listen, source })?), None),
        None => (None, Some(listener)),
    };
    tasks.push((
        "http",
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = http_stop.wait_for(|s| *s).await;
            };
            let served = match (tls_listener, plain_listener) {
                (Some(tls), _) => axum::serve(tls, app).with_graceful_shutdown(shutdown).await,
                (None, Some(plain)) => axum::serve(plain, app).with_graceful_shutdown(shutdown).await,
                (None, None) => Ok(()),
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }),
    ));
    tracing::info!(%http_addr, "HTTP API listening");
    Ok(http_addr)
}

/// `citywatch demo`: a simulated fleet on the embedded broker, stopped first.
#[cfg(feature = "demo")]
fn start_demo(config: &Config, fleet: DemoFleet, mqtt_addr: Option<SocketAddr>, stop_rx: &watch::Receiver<bool>, tasks: &mut Tasks) -> Result<()> {
    let addr = mqtt_addr.ok_or_else(|| Error::Demo("the demo fleet needs the embedded broker ([mqtt] mode = \"embedded\")".into()))?;
    let fleet_config = citywatch_edge::sim::FleetConfig {
        host: "127.0.0.1".into(),
        port: addr.port(),
        // One connection carries many devices: only an unrestricted account can do that.
        credentials: config.mqtt.users.iter().find(|u| u.site.is_none()).map(|u| (u.username.clone(), u.password.clone())),
        site: fleet.site,
        devices: fleet.devices,
        scenario: fleet.scenario,
        rate: fleet.rate,
        connections: 4,
        interval_s: fleet.interval_s,
        telemetry_qos1: false,
        offline_after: Duration::from_secs(60),
        offline_for: Duration::from_secs(30),
        seed: 1,
    };
    fleet_config.validate().map_err(Error::Demo)?;
    let stats = Arc::new(citywatch_edge::sim::FleetStats::default());
    let rx = stop_rx.clone();
    tracing::info!(devices = fleet_config.devices, scenario = fleet_config.scenario.as_str(), "demo fleet starting");
    tasks.insert(
        0,
        (
            "demo fleet",
            tokio::spawn(async move {
                if let Err(e) = citywatch_edge::sim::run(fleet_config, stats, rx).await {
                    tracing::error!(error = %e, "demo fleet stopped");
                }
            }),
        ),
    );
    Ok(())
}

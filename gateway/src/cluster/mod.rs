//! Cluster mode (SPEC §9): gateways share a NATS JetStream cluster instead of one broker.
//!
//! Devices speak MQTT 3.1.1 to any NATS node; the server maps their topics into partitions by
//! site ([`nats_config`]) and the ingest stream keeps them. Each gateway owns some partitions by
//! lease ([`ownership`]: a replicated KV bucket, revision = fencing token, [`rendezvous`] over
//! live members) and feeds the owned partitions' messages into the usual pipeline as
//! [`crate::ingest::Inbound`], acknowledged to JetStream only after the store commits; a
//! partition's QoS 1 messages reach the ingest stream through the owner's [`relay`] from the
//! MQTT listener's own stream, the copy a device's PUBACK stands for. Incident
//! changes go to a replicated log, one entry per (id, revision), appended only by the site's
//! owner ([`sinks`]); every push channel delivers from that log through a durable consumer shared
//! by all gateways ([`delivery`]); a gateway gaining a partition adopts its unclosed incidents
//! from the log ([`adopt`]) and replays its recent messages through the rules ([`replay`]). Not here: decode, rules, incidents — they run unchanged on whatever
//! the partitions deliver.

pub mod adopt;
pub mod calls;
pub mod city;
pub mod config;
pub mod delivery;
pub mod forward;
pub mod leases;
pub mod nats_config;
pub mod ownership;
pub mod partition_metrics;
pub mod pull;
pub mod relay;
pub mod rendezvous;
pub mod replay;
pub mod sinks;
pub mod status;

use std::sync::Arc;

use async_nats::jetstream;
use tokio::sync::{mpsc, watch};

pub use config::ClusterConfig;
pub use leases::LeaseTable;

use crate::ingest::Inbound;
use crate::notify::PublishFn;

/// The stream holding every partition's device messages.
pub const INGEST_STREAM: &str = "CITYWATCH_INGEST";
/// The replicated incident log: one entry per (incident id, revision).
pub const INCIDENT_STREAM: &str = "CITYWATCH_INCIDENTS";
/// Subject prefix of the incident log: `citywatch.incidents.{partition}.{id}`.
pub const INCIDENT_PREFIX: &str = "citywatch.incidents";
/// Live members, one key per gateway, expiring with the bucket's max age (= lease TTL).
pub const MEMBERS_BUCKET: &str = "citywatch_members";
/// Partition leases, key `p-{n}`, value the holder's name; the revision is the fencing token.
pub const LEASES_BUCKET: &str = "citywatch_leases";

/// Errors of cluster mode; each names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cluster config: {0}")]
    Config(String),
    #[error("connecting to NATS {urls:?}: {source}")]
    Connect { urls: Vec<String>, source: async_nats::ConnectError },
    #[error("JetStream: {what}: {reason}")]
    JetStream { what: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn js_err(what: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> Error {
    let what = what.into();
    move |e| Error::JetStream { what, reason: e.to_string() }
}

/// A connection to the cluster with its streams and buckets in place.
#[derive(Clone)]
pub struct Cluster {
    pub config: ClusterConfig,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// When each partition's relay consumer was created (empty for `cluster status`).
    pub relay_since: relay::RelaySince,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.config.node).field("nats", &self.config.nats).finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects (any listed node will do; the client fails over between them) and creates the
    /// ingest stream, the incident log, the KV buckets and the relay consumers (with the MQTT
    /// listener's stream they read) if they do not exist yet. nats-server cannot declare streams
    /// in its configuration, so the first gateway creates them.
    pub async fn connect(config: &ClusterConfig) -> Result<Cluster> {
        config.validate().map_err(Error::Config)?;
        let client = connect_options(config)?
            .name(format!("citywatch-{}", config.node))
            .retry_on_initial_connect()
            // A node that dies without closing its sockets (power, network) is noticed after
            // two unanswered pings: every third of a lease TTL, not the client's default minute.
            .ping_interval((config.lease_ttl.0 / 3).max(std::time::Duration::from_secs(1)))
            .connect(config.nats.clone())
            .await
            .map_err(|source| Error::Connect { urls: config.nats.clone(), source })?;
        // An R3 stream create waits for its RAFT group; the default 5 s is tight on a busy machine.
        let js = jetstream::ContextBuilder::new().timeout(std::time::Duration::from_secs(15)).build(client.clone());
        let mut cluster = Cluster { config: config.clone(), client, js, relay_since: Default::default() };
        cluster.relay_since = cluster.ensure_layout().await?;
        Ok(cluster)
    }

    /// Connects without creating anything (for `cluster status`).
    pub async fn connect_existing(config: &ClusterConfig) -> Result<Cluster> {
        config.validate().map_err(Error::Config)?;
        let client = connect_options(config)?
            .connect(config.nats.clone())
            .await
            .map_err(|source| Error::Connect { urls: config.nats.clone(), source })?;
        let js = jetstream::new(client.clone());
        Ok(Cluster { config: config.clone(), client, js, relay_since: Default::default() })
    }

    async fn ensure_layout(&self) -> Result<relay::RelaySince> {
        let c = &self.config;
        let jetstream_ready = std::time::Instant::now();
        // JetStream may still be electing its meta leader when the first gateway starts: retry.
        loop {
            let attempt = self
                .js
                .get_or_create_stream(jetstream::stream::Config {
                    name: INGEST_STREAM.into(),
                    subjects: vec![format!("{}.>", nats_config::PARTITION_PREFIX)],
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: c.replicas,
                    max_age: c.ingest_retention.0,
                    duplicate_window: std::time::Duration::from_secs(120),
                    // A partition's new owner reads its devices' last statuses by direct
                    // gets, answered by any replica ([`adopt`]).
                    allow_direct: true,
                    ..Default::default()
                })
                .await;
            match attempt {
                Ok(stream) => {
                    // Created by an earlier version without direct gets: turn them on.
                    if !stream.cached_info().config.allow_direct {
                        let config = jetstream::stream::Config { allow_direct: true, ..stream.cached_info().config.clone() };
                        self.js.update_stream(&config).await.map_err(|e| js_err("allowing direct gets on the ingest stream")(&e))?;
                    }
                    break;
                }
                Err(e) if jetstream_ready.elapsed() < std::time::Duration::from_secs(60) => {
                    tracing::info!(error = %e, "waiting for JetStream to accept the ingest stream");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => return Err(js_err("creating the ingest stream")(&e)),
            }
        }
        self.js
            .get_or_create_stream(jetstream::stream::Config {
                name: INCIDENT_STREAM.into(),
                subjects: vec![format!("{INCIDENT_PREFIX}.>")],
                storage: jetstream::stream::StorageType::File,
                num_replicas: c.replicas,
                max_age: c.incident_retention.0,
                duplicate_window: std::time::Duration::from_secs(120),
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("creating the incident log")(&e))?;
        self.members().await?;
        self.leases().await?;
        relay::ensure(&self.js, c.partitions, c.replicas, c.lease_ttl.0).await.map_err(|e| js_err("creating the relay consumers")(&e))
    }

    /// The members bucket (created if missing): entries vanish one lease TTL after the last put.
    pub async fn members(&self) -> Result<jetstream::kv::Store> {
        self.bucket(MEMBERS_BUCKET, self.config.lease_ttl.0).await
    }

    /// The leases bucket (created if missing).
    pub async fn leases(&self) -> Result<jetstream::kv::Store> {
        self.bucket(LEASES_BUCKET, std::time::Duration::ZERO).await
    }

    async fn bucket(&self, name: &str, max_age: std::time::Duration) -> Result<jetstream::kv::Store> {
        if let Ok(store) = self.js.get_key_value(name).await {
            return Ok(store);
        }
        match self
            .js
            .create_key_value(jetstream::kv::Config {
                bucket: name.into(),
                history: 1,
                max_age,
                storage: jetstream::stream::StorageType::File,
                num_replicas: self.config.replicas,
                ..Default::default()
            })
            .await
        {
            Ok(store) => Ok(store),
            // Another gateway created it meanwhile.
            Err(_) => self.js.get_key_value(name).await.map_err(|e| js_err(format!("bucket {name}"))(&e)),
        }
    }

    /// Starts membership and partition ownership; owned partitions' messages go to `inbound`.
    /// The returned table answers "do I hold partition p right now" for fencing; the
    /// per-partition figures go on `/metrics`.
    /// A gained partition's unclosed incidents go to `adopt` (once set) before its messages.
    pub async fn join(
        &self,
        inbound: mpsc::Sender<Inbound>,
        adopt: watch::Receiver<Option<adopt::AdoptFn>>,
        stop: watch::Receiver<bool>,
    ) -> Result<ownership::Started> {
        ownership::start(self.clone(), inbound, adopt, stop).await
    }

    /// Device commands and the MQTT ops topic through NATS, fenced: a command for a site whose
    /// partition this gateway does not hold right now is refused, never sent.
    ///
    /// A plain NATS publish reaches MQTT subscribers at QoS 0 only. Published instead into the
    /// MQTT listener's own replicated stream (`$MQTT.msgs.{subject}` with `Nmqtt-Pub: 1`, and
    /// waiting for JetStream's ack), it is delivered to QoS 1 subscriptions at QoS 1 and kept
    /// for a device with a persistent session that is offline (checked against nats-server 2.12.8).
    pub fn publisher(&self, leases: Arc<LeaseTable>) -> PublishFn {
        let js = self.js.clone();
        let partitions = self.config.partitions;
        Arc::new(move |topic: String, payload: Vec<u8>, _retain: bool| {
            let js = js.clone();
            let fence = site_of_topic(&topic).map(|site| nats_config::partition_of(site, partitions));
            let allowed = fence.is_none_or(|p| leases.holds(p));
            Box::pin(async move {
                if !allowed {
                    return Err(format!("{topic}: this gateway does not hold the lease of partition {}", fence.unwrap_or_default()));
                }
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(MQTT_QOS_HEADER, "1");
                let subject = format!("{MQTT_MSGS_PREFIX}.{}", topic.replace('/', "."));
                let ack = js.publish_with_headers(subject, headers, payload.into()).await.map_err(|e| e.to_string())?;
                ack.await.map(|_| ()).map_err(|e| e.to_string())
            })
        })
    }
}

/// Every NATS connection of a gateway (and of `cluster status`) starts here: with `[cluster]`'s
/// user and password when the cluster is closed (`cluster nats-config --gateway-user`).
fn connect_options(config: &ClusterConfig) -> Result<async_nats::ConnectOptions> {
    // A refused login is otherwise only retried, silently (`retry_on_initial_connect`): said
    // once, at error level, with what to check.
    let user = config.nats_user.clone();
    let said = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let options = async_nats::ConnectOptions::new().event_callback(move |event| {
        let (user, said) = (user.clone(), Arc::clone(&said));
        async move {
            if matches!(event, async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation))
                && !said.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                match user {
                    Some(user) => tracing::error!(%user, "cluster: NATS refused this gateway's login (authorization violation); check [cluster] nats_user and its password (nats_password_file, or CITYWATCH_NATS_PASSWORD) against the users the nats-server config names (cluster nats-config --gateway-user); retrying"),
                    None => tracing::error!("cluster: NATS refused this gateway's login (authorization violation): the cluster is closed (cluster nats-config --gateway-user) and [cluster] nats_user is not set; retrying"),
                }
            }
        }
    });
    Ok(match config.nats_credentials().map_err(Error::Config)? {
        Some(c) => options.user_and_password(c.user, c.password),
        None => options,
    })
}

/// nats-server's stream of MQTT QoS 1 messages: publishing here reaches QoS 1 subscriptions.
pub const MQTT_MSGS_PREFIX: &str = "$MQTT.msgs";
/// The header nats-server's MQTT code reads the QoS of a stored message from.
pub const MQTT_QOS_HEADER: &str = "Nmqtt-Pub";

/// The site of a device topic `citywatch/v1/{site}/{device}/{channel}`; `None` for `ops` topics.
pub fn site_of_topic(topic: &str) -> Option<&str> {
    let mut parts = topic.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("citywatch"), Some("v1"), Some(site)) if site != "ops" => Some(site),
        _ => None,
    }
}

/// `citywatch.part.{p}.{site}.{device}.{channel}` → (p, `citywatch/v1/{site}/{device}/{channel}`).
pub fn topic_of_subject(subject: &str) -> Option<(u16, String)> {
    let rest = subject.strip_prefix(nats_config::PARTITION_PREFIX)?.strip_prefix('.')?;
    let (p, rest) = rest.split_once('.')?;
    let p = p.parse().ok()?;
    Some((p, format!("citywatch/v1/{}", rest.replace('.', "/"))))
}

/// What an ingest stream subject carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    /// A device topic in its site's partition: where the mapping puts it.
    Topic(String),
    /// A device topic in another partition than its site's: published straight onto a
    /// partition subject (nats-server checks a device's permissions on the mapped subject, so
    /// the device user may), not through the mapping. Taking it would split a site's rule state
    /// between two owners, so it is dropped (acknowledged, counted).
    Misrouted,
    /// Not a device subject at all.
    NotDevice,
}

/// [`topic_of_subject`], checked against the partition the mapping gives the topic's site.
pub fn routed_topic(subject: &str, partitions: u16) -> Routed {
    let Some((p, topic)) = topic_of_subject(subject) else { return Routed::NotDevice };
    match site_of_topic(&topic) {
        Some(site) if nats_config::partition_of(site, partitions) == p => Routed::Topic(topic),
        Some(_) => Routed::Misrouted,
        None => Routed::NotDevice,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_topics_convert_both_ways() {
        assert_eq!(topic_of_subject("citywatch.part.17.s1.d-2.event"), Some((17, "citywatch/v1/s1/d-2/event".into())));
        assert_eq!(topic_of_subject("citywatch.v1.s1.d.event"), None);
        let p = nats_config::partition_of("s1", 16);
        assert_eq!(routed_topic(&format!("citywatch.part.{p}.s1.d-2.event"), 16), Routed::Topic("citywatch/v1/s1/d-2/event".into()));
        assert_eq!(routed_topic(&format!("citywatch.part.{}.s1.d-2.event", (p + 1) % 16), 16), Routed::Misrouted, "not where the mapping puts s1");
        assert_eq!(routed_topic("citywatch.part.3.ops.x.event", 16), Routed::NotDevice);
        assert_eq!(routed_topic("citywatch.v1.s1.d.event", 16), Routed::NotDevice);
        assert_eq!(site_of_topic("citywatch/v1/s1/d/cmd"), Some("s1"));
        assert_eq!(site_of_topic("citywatch/v1/ops/incidents"), None);
    }
}

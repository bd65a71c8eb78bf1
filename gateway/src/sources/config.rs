//! `[mqtt]`: where devices' messages come from (the embedded broker or an external one) and the
//! embedded broker's accounts. Parsing only.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::tls::TlsConfig;
use crate::units::Duration;

/// Where devices' messages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttMode {
    /// The gateway is the broker.
    Embedded,
    /// The gateway subscribes to Mosquitto, EMQX or another broker.
    External,
}

/// `[mqtt]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub mode: MqttMode,
    /// Embedded broker listen address.
    pub listen: SocketAddr,
    /// Embedded broker: accounts devices connect with. None: anonymous connections allowed.
    pub users: Vec<MqttUser>,
    /// External broker URL, `mqtt://host:port`.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Client id at the external broker; the session is persistent under this id.
    pub client_id: String,
    /// Topic filter subscribed to (both modes).
    pub topic_filter: String,
    /// External mode: the topics a second connection (client id + `-alerts`) subscribes to and
    /// feeds to the alert lane, so alarms never wait behind bulk telemetry on one socket.
    /// Empty: one connection.
    pub alert_topic_filter: String,
    pub keep_alive: Duration,
    /// Largest payload accepted by the embedded broker, bytes (the contract's limit is 1 KiB;
    /// larger ones are let in so they can be counted and quarantined).
    pub max_payload_bytes: usize,
    /// Messages buffered between the source and the pipeline.
    pub queue_capacity: usize,
    /// Embedded broker: TLS on `listen` (MQTT over TLS; usually port 8883). None: plain TCP.
    pub tls: Option<TlsConfig>,
}

/// One embedded-broker account, and what it may touch (see [`crate::sources::door`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttUser {
    pub username: String,
    pub password: String,
    /// Per-site or per-device account: publishes only under `citywatch/v1/{site}/…` and reads
    /// only its own `cmd`. None: an unrestricted account (a bridge, the simulator, tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Per-device account: this device only. None with `site` set: the device is the MQTT
    /// client id of the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

impl std::fmt::Debug for MqttUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttUser").field("username", &self.username).field("site", &self.site).field("device", &self.device).finish_non_exhaustive()
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            mode: MqttMode::Embedded,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            users: Vec::new(),
            url: "mqtt://127.0.0.1:1883".into(),
            username: None,
            password: None,
            client_id: "citywatch-gateway".into(),
            topic_filter: "citywatch/v1/#".into(),
            alert_topic_filter: "citywatch/v1/+/+/event".into(),
            keep_alive: Duration::secs(30),
            max_payload_bytes: 64 * 1024,
            queue_capacity: 16_384,
            tls: None,
        }
    }
}

impl MqttConfig {
    /// Host and port of `url`.
    pub fn url_host_port(&self) -> Result<(String, u16), String> {
        let rest = self.url.strip_prefix("mqtt://").or_else(|| self.url.strip_prefix("tcp://")).ok_or("scheme must be mqtt://")?;
        let (host, port) = rest.rsplit_once(':').ok_or("port missing")?;
        let port: u16 = port.trim_end_matches('/').parse().map_err(|_| "port is not a number")?;
        if host.is_empty() {
            return Err("host missing".into());
        }
        Ok((host.trim_matches(|c| c == '[' || c == ']').to_owned(), port))
    }

    /// Checks the subscription filters: `Err((knob, reason))` for the first bad one.
    /// `alert_topic_filter` may be empty (one connection).
    pub fn check_filters(&self) -> Result<(), (&'static str, String)> {
        if !rumqttc::valid_filter(&self.topic_filter) {
            return Err(("mqtt.topic_filter", format!("{:?} is not a valid MQTT topic filter", self.topic_filter)));
        }
        if !self.alert_topic_filter.is_empty() && !rumqttc::valid_filter(&self.alert_topic_filter) {
            return Err((
                "mqtt.alert_topic_filter",
                format!("{:?} is not a valid MQTT topic filter (or \"\" for one connection)", self.alert_topic_filter),
            ));
        }
        Ok(())
    }
}


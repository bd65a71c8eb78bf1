//! The gateway's configuration: TOML, every key optional with a documented default.
//!
//! `gateway/example.toml` documents every key and is parsed by a test, so the docs and these
//! defaults cannot drift apart. Unknown keys are errors, and [`Config::from_toml`] names the
//! key that is wrong. Parsing only; nothing here opens a socket or a file other than the one read.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

/// A duration written as text: "30s", "5m", "30days", "2years".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Duration(#[serde(serialize_with = "ser_duration")] pub std::time::Duration);

fn ser_duration<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Duration)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like \"30s\" or \"5m\": {e}")))
    }
}

impl Duration {
    pub const fn secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub fn as_ms(self) -> i64 {
        self.0.as_millis() as i64
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub storage: StorageConfig,
    pub ingest: IngestConfig,
    /// `[rules]`: the rule pack and its overrides.
    pub rules: crate::rules::RulesConfig,
    /// `[incidents]`: escalation, flapping, silences, retention.
    pub incidents: crate::incidents::IncidentsConfig,
    /// `[notify]`: push channels.
    pub notify: crate::notify::NotifyConfig,
    /// `[inspections]`: maintenance schedules, reminders, the siren test day.
    pub inspections: crate::inspections::InspectionsConfig,
    /// `[modbus]`: legacy controllers to poll.
    pub modbus: crate::sources::modbus::ModbusConfig,
}

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
    pub keep_alive: Duration,
    /// Largest payload accepted by the embedded broker, bytes (the contract's limit is 1 KiB;
    /// larger ones are let in so they can be counted and quarantined).
    pub max_payload_bytes: usize,
    /// Messages buffered between the source and the pipeline.
    pub queue_capacity: usize,
    /// Embedded broker: TLS on `listen` (MQTT over TLS; usually port 8883). None: plain TCP.
    pub tls: Option<crate::tls::TlsConfig>,
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
            keep_alive: Duration::secs(30),
            max_payload_bytes: 64 * 1024,
            queue_capacity: 16_384,
            tls: None,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// `[[http.tokens]]`: API bearer tokens. None: the API is open and must listen on loopback.
    pub tokens: Vec<crate::api::auth::TokenConfig>,
    /// `[http.tls]`: HTTPS on `listen`. None: plain HTTP.
    pub tls: Option<crate::tls::TlsConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8080)), tokens: Vec::new(), tls: None }
    }
}

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub path: PathBuf,
    /// Raw readings are kept this long.
    pub raw_retention: Duration,
    /// One-minute rollups are kept this long.
    pub rollup_retention: Duration,
    /// Most rows in one transaction.
    pub batch_max_rows: usize,
    /// Writes buffered ahead of the writer thread. One write is a whole decode batch (up to
    /// ~10k readings), so this bounds memory: 128 × 10k readings of ~40 bytes ≈ 50 MB.
    pub queue_capacity: usize,
    /// Rejected messages kept in the quarantine table (oldest removed first).
    pub quarantine_max_rows: usize,
    /// `[storage.influx]`: the long-term store; absent means off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub influx: Option<crate::store::influx::InfluxConfig>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("./citywatch-data"),
            raw_retention: Duration::secs(30 * 86_400),
            // humantime's year is 365.25 days, so "2years" in example.toml is exactly this.
            rollup_retention: Duration::secs(2 * 31_557_600),
            batch_max_rows: 10_000,
            queue_capacity: 128,
            quarantine_max_rows: 100_000,
            influx: None,
        }
    }
}

/// `[ingest]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Readings older than this when they arrive are stored as historical (a replay).
    pub live_horizon: Duration,
    /// Health: `stale` after this many intervals of silence.
    pub stale_after_intervals: u32,
    /// Health: `offline` after max(offline_after_intervals × interval, offline_min).
    pub offline_after_intervals: u32,
    pub offline_min: Duration,
    /// Health: `stuck` when an analog metric has not changed for this long.
    pub stuck_after: Duration,
    /// Health: `low_battery` under this voltage.
    pub battery_floor_v: f64,
    /// Rejections of one reason are logged at most once per this period.
    pub log_every: Duration,
    /// A device `ts` more than this ahead of the receive time is a wrong clock, not a reading
    /// from the future: the message is stored at its receive time and flagged `clock_skew`.
    pub clock_skew_ahead: Duration,
    /// A device `ts` more than this behind the receive time is a reset clock, not a replay:
    /// stored at its receive time (and so evaluated live) and flagged `clock_skew`.
    pub clock_skew_behind: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            live_horizon: Duration::secs(300),
            stale_after_intervals: 3,
            offline_after_intervals: 3,
            offline_min: Duration::secs(90),
            stuck_after: Duration::secs(86_400),
            battery_floor_v: 2.7,
            log_every: Duration::secs(10),
            clock_skew_ahead: Duration::secs(120),
            clock_skew_behind: Duration::secs(30 * 86_400),
        }
    }
}

/// A configuration error, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("{key}: {reason}")]
    Named { key: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &std::path::Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Read { path: path.display().to_string(), source })?;
        Config::from_toml(&text)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key, reason: &str| Err(Error::Invalid { key, reason: reason.to_owned() });
        if self.mqtt.mode == MqttMode::External && self.mqtt.url_host_port().is_err() {
            return invalid("mqtt.url", "must look like mqtt://host:port");
        }
        if self.mqtt.password.is_some() && self.mqtt.username.is_none() {
            return invalid("mqtt.password", "needs mqtt.username");
        }
        if self.mqtt.queue_capacity == 0 {
            return invalid("mqtt.queue_capacity", "must be at least 1");
        }
        if self.mqtt.client_id.is_empty() {
            return invalid("mqtt.client_id", "must not be empty");
        }
        if self.storage.batch_max_rows == 0 {
            return invalid("storage.batch_max_rows", "must be at least 1");
        }
        if self.storage.queue_capacity == 0 {
            return invalid("storage.queue_capacity", "must be at least 1");
        }
        if self.storage.raw_retention.0 < std::time::Duration::from_secs(3600) {
            return invalid("storage.raw_retention", "must be at least 1h");
        }
        if !(self.ingest.battery_floor_v.is_finite() && self.ingest.battery_floor_v > 0.0) {
            return invalid("ingest.battery_floor_v", "must be a positive number of volts");
        }
        if self.ingest.stale_after_intervals == 0 || self.ingest.offline_after_intervals == 0 {
            return invalid("ingest.offline_after_intervals", "intervals must be at least 1");
        }
        crate::api::auth::validate(&self.http.tokens).map_err(|(key, reason)| Error::Named { key, reason })?;
        crate::api::auth::check_exposure(self.http.listen, &self.http.tokens).map_err(|(key, reason)| Error::Named { key, reason })?;
        crate::sources::door::validate_users(&self.mqtt.users).map_err(|(key, reason)| Error::Named { key, reason })?;
        if let Some(influx) = &self.storage.influx {
            influx.validate().map_err(|(key, reason)| Error::Invalid { key, reason })?;
        }
        self.modbus.validate().map_err(|(key, reason)| Error::Named { key, reason })?;
        self.incidents.validate().map_err(|(key, reason)| Error::Named { key, reason })?;
        self.notify.validate().map_err(|(key, reason)| Error::Named { key: format!("notify.{}", key.trim_start_matches("notify.")), reason })?;
        self.inspections.validate().map_err(|(key, reason)| Error::Named { key, reason })?;
        // Rule errors already name their key (`rules.override[0].rule: …`, `rule gas_low: …`).
        crate::rules::RuleSet::from_config(&self.rules).map_err(|e| Error::Parse(e.to_string()))?;
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::from_toml("").expect("valid"), Config::default());
    }

    #[test]
    fn example_file_documents_every_default() {
        let text = include_str!("../example.toml");
        let parsed = Config::from_toml(text).expect("example.toml parses");
        assert_eq!(parsed, Config::default(), "example.toml must show the defaults");
    }

    #[test]
    fn bad_keys_are_named() {
        let err = Config::from_toml("[mqtt]\nmodee = \"embedded\"\n").expect_err("unknown key");
        assert!(err.to_string().contains("modee"), "{err}");
        let err = Config::from_toml("[storage]\nraw_retention = \"soon\"\n").expect_err("bad duration");
        assert!(err.to_string().contains("raw_retention") || err.to_string().contains("soon"), "{err}");
        let err = Config::from_toml("[mqtt]\nmode = \"external\"\nurl = \"http://x\"\n").expect_err("bad url");
        assert!(err.to_string().starts_with("mqtt.url"), "{err}");
        let err = Config::from_toml("[ingest]\nbattery_floor_v = -1.0\n").expect_err("negative");
        assert!(err.to_string().starts_with("ingest.battery_floor_v"), "{err}");
        let err = Config::from_toml("[[rules.override]]\nrule = \"gas_lo\"\nenabled = false\n").expect_err("unknown rule");
        assert!(err.to_string().starts_with("rules.override[0].rule"), "{err}");
        let err = Config::from_toml("[[notify.webhook]]\nurl = \"ftp://x\"\nsecret = \"s\"\n").expect_err("not http");
        assert!(err.to_string().starts_with("notify.webhook[0].url"), "{err}");
        let err = Config::from_toml("[incidents]\nretention = \"30days\"\n").expect_err("too short");
        assert!(err.to_string().starts_with("incidents.retention"), "{err}");
        let err = Config::from_toml("[[incidents.silence]]\nstart = \"soon\"\n").expect_err("bad time");
        assert!(err.to_string().starts_with("incidents.silence[0].start"), "{err}");
    }

    #[test]
    fn external_url_is_split() {
        let c = MqttConfig { url: "mqtt://broker.local:18830".into(), ..MqttConfig::default() };
        assert_eq!(c.url_host_port(), Ok(("broker.local".into(), 18830)));
    }
}

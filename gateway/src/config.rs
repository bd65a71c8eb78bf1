//! The gateway's configuration: TOML, every key optional with a documented default.
//!
//! `gateway/example.toml` documents every key and is parsed by a test, so the docs and these
//! defaults cannot drift apart. Unknown keys are errors, and [`Config::from_toml`] names the
//! key that is wrong. Each component's `[section]` struct lives in the component; this module
//! only gathers them and validates across them. Parsing only; nothing here opens a socket or a file other than the one read.

use serde::{Deserialize, Serialize};

// Each component's config lives in its component; this module gathers them into one file and
// checks what spans them. Re-exported here so `config::MqttConfig` etc. keep working.
pub use crate::api::HttpConfig;
pub use crate::ingest::IngestConfig;
pub use crate::sources::config::{MqttConfig, MqttMode, MqttUser};
pub use crate::store::StorageConfig;
pub use crate::units::Duration;

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
    /// `[cluster]`: join a NATS JetStream cluster instead of the MQTT source (SPEC §9). Default off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterConfig>,
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
        if let Err((key, reason)) = self.mqtt.check_filters() {
            return invalid(key, &reason);
        }
        if self.storage.batch_max_rows == 0 {
            return invalid("storage.batch_max_rows", "must be at least 1");
        }
        if self.storage.commit_max_rows < self.storage.batch_max_rows {
            return invalid(
                "storage.commit_max_rows",
                &format!("must be at least storage.batch_max_rows ({})", self.storage.batch_max_rows),
            );
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
        if let Some(cluster) = &self.cluster {
            cluster.validate().map_err(Error::Parse)?;
        }
        // Rule errors already name their key (`rules.override[0].rule: …`, `rule gas_low: …`).
        crate::rules::RuleSet::from_config(&self.rules).map_err(|e| Error::Parse(e.to_string()))?;
        Ok(())
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

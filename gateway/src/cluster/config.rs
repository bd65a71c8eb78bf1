//! `[cluster]`: joining a NATS JetStream cluster instead of running a broker (SPEC §9).
//!
//! Parsing and validation only; [`super::Cluster`] connects.

use serde::{Deserialize, Serialize};

use crate::units::Duration;

/// Partitions when `partitions` is not given (fixed when the cluster is first created).
pub const DEFAULT_PARTITIONS: u16 = 64;

/// `[cluster]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS client URLs of the cluster's nodes (any one is enough to connect; all are tried).
    pub nats: Vec<String>,
    /// This gateway's name, unique in the cluster (the lease holder's name).
    pub node: String,
    /// Partitions of the device topics; must equal the nats-server mapping's count.
    pub partitions: u16,
    /// Copies of every stream and KV bucket the gateway creates (1, 3 or 5 nodes).
    pub replicas: usize,
    /// A partition lease lives this long without renewal; renewed every third of it.
    pub lease_ttl: Duration,
    /// How long the ingest stream keeps device messages (the replay horizon of a new owner).
    pub ingest_retention: Duration,
    /// How long the incident log keeps every (incident id, revision) entry (SPEC §5: ≥ 6 months).
    pub incident_retention: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: vec!["nats://127.0.0.1:4222".into()],
            node: "gw-1".into(),
            partitions: DEFAULT_PARTITIONS,
            replicas: 3,
            lease_ttl: Duration::secs(6),
            ingest_retention: Duration::secs(24 * 3600),
            incident_retention: Duration::secs(200 * 24 * 3600),
        }
    }
}

impl ClusterConfig {
    /// Names the bad key and why.
    pub fn validate(&self) -> Result<(), String> {
        if self.nats.is_empty() {
            return Err("cluster.nats: at least one nats:// URL is needed".into());
        }
        if self.node.is_empty() || !self.node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("cluster.node: {:?} must be 1+ characters of [A-Za-z0-9_-] (it is a KV key)", self.node));
        }
        if self.partitions == 0 || self.partitions > 1024 {
            return Err(format!("cluster.partitions: {} is not within 1..=1024", self.partitions));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(format!("cluster.replicas: {} is not within 1..=5 (JetStream's limit)", self.replicas));
        }
        if self.lease_ttl.0 < std::time::Duration::from_secs(1) {
            return Err("cluster.lease_ttl: must be at least 1s".into());
        }
        if self.incident_retention.0 < std::time::Duration::from_secs(183 * 24 * 3600) {
            return Err("cluster.incident_retention: the audit trail is kept at least 6 months (183days)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// example.toml shows `[cluster]` commented out (off by default); uncommented it must be
    /// exactly the defaults.
    #[test]
    fn the_commented_example_section_is_the_defaults() {
        let text = include_str!("../../example.toml");
        let start = text.find("# [cluster]").expect("example.toml documents [cluster]");
        let section: String = text[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.trim_start_matches('#').trim_start())
            .filter(|l| l.starts_with("[cluster]") || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let parsed: crate::config::Config = toml::from_str(&section).unwrap_or_else(|e| panic!("{e}\n{section}"));
        assert_eq!(parsed.cluster, Some(ClusterConfig::default()), "{section}");
        assert!(ClusterConfig::default().validate().is_ok());
    }

    #[test]
    fn bad_keys_are_named() {
        let bad = ClusterConfig { node: "gw 1".into(), ..Default::default() };
        assert!(bad.validate().unwrap_err().starts_with("cluster.node"));
        let bad = ClusterConfig { replicas: 7, ..Default::default() };
        assert!(bad.validate().unwrap_err().starts_with("cluster.replicas"));
    }
}

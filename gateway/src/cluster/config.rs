//! `[cluster]`: joining a NATS JetStream cluster instead of running a broker (SPEC §9).
//!
//! Parsing and validation only; [`super::Cluster`] connects.

use serde::{Deserialize, Serialize};

use crate::units::Duration;

/// Partitions when `partitions` is not given (fixed when the cluster is first created).
pub const DEFAULT_PARTITIONS: u16 = 64;
/// The longest `replay_window`: a takeover replays at most this much before it consumes (and at
/// most `cluster::replay::MAX_MESSAGES` messages). Rules with longer windows (`stuck` after a
/// day, a 30-day `trend`, a 1 h hold) need the long-term store, not a replay.
pub const MAX_REPLAY_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

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
    /// How far back a partition's new owner replays the messages the old owner took in through
    /// its rules, so windows and held-for durations go on ("0s": not at all). At most
    /// [`MAX_REPLAY_WINDOW`] and `ingest_retention`.
    pub replay_window: Duration,
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
            // `[ingest] live_horizon`'s default: what is older opens nothing anyway, and it covers
            // every window of the default rule pack but mount_tilt's 1 h hold, stuck and trend.
            replay_window: Duration::secs(300),
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
        if self.replay_window.0 > MAX_REPLAY_WINDOW {
            return Err(format!("cluster.replay_window: {} is longer than the most a takeover replays (1h)", humantime::format_duration(self.replay_window.0)));
        }
        if self.replay_window.0 > self.ingest_retention.0 {
            return Err("cluster.replay_window: longer than cluster.ingest_retention, which keeps what it replays".into());
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
        let bad = ClusterConfig { replay_window: Duration::secs(2 * 3600), ..Default::default() };
        assert!(bad.validate().expect_err("past the cap").starts_with("cluster.replay_window"));
        let bad = ClusterConfig { replay_window: Duration::secs(600), ingest_retention: Duration::secs(300), ..Default::default() };
        assert!(bad.validate().expect_err("past the retention").starts_with("cluster.replay_window"));
        let off = ClusterConfig { replay_window: Duration::secs(0), ..Default::default() };
        assert!(off.validate().is_ok());
    }
}

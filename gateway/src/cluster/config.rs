//! `[cluster]`: joining a NATS JetStream cluster instead of running a broker (SPEC §9).
//!
//! Parsing and validation only (and reading the NATS password when asked);
//! [`super::Cluster`] connects.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::units::Duration;

/// Partitions when `partitions` is not given (fixed when the cluster is first created).
pub const DEFAULT_PARTITIONS: u16 = 64;
/// The longest `replay_window`: a takeover replays at most this much before it consumes (and at
/// most `cluster::replay::MAX_MESSAGES` messages). Rules with longer windows (`stuck` after a
/// day, a 30-day `trend`, a 1 h hold) need the long-term store, not a replay.
pub const MAX_REPLAY_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);
/// Where the NATS password comes from when `nats_user` is set without `nats_password_file`.
pub const NATS_PASSWORD_ENV: &str = "CITYWATCH_NATS_PASSWORD";

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
    /// The NATS user of every connection the gateway (and `cluster status`) opens: the
    /// `--gateway-user` of `cluster nats-config`. `None`: anonymous (an open cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_user: Option<String>,
    /// A file holding `nats_user`'s password (surrounding whitespace ignored), read at connect;
    /// `None`: the password is the environment variable [`NATS_PASSWORD_ENV`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_password_file: Option<PathBuf>,
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
            nats_user: None,
            nats_password_file: None,
        }
    }
}

/// A NATS user and its password. The password stays out of `Debug` (and so out of logs).
#[derive(Clone, PartialEq)]
pub struct NatsCredentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCredentials").field("user", &self.user).finish_non_exhaustive()
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
        match (&self.nats_user, &self.nats_password_file) {
            (Some(user), _) if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return Err(format!("cluster.nats_user: {user:?} is not a NATS user name"));
            }
            (None, Some(_)) => return Err("cluster.nats_password_file: whose password? set cluster.nats_user too".into()),
            _ => {}
        }
        Ok(())
    }

    /// The credentials of the gateway's NATS connections: `None` without `nats_user`, else the
    /// user with the password from `nats_password_file` or [`NATS_PASSWORD_ENV`]. Read when
    /// connecting (not when checking a config), so `check-config` runs where the secret is not.
    pub fn nats_credentials(&self) -> Result<Option<NatsCredentials>, String> {
        let Some(user) = &self.nats_user else { return Ok(None) };
        let password = match &self.nats_password_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cluster.nats_password_file: reading {}: {e}", path.display()))?
                .trim()
                .to_owned(),
            None => std::env::var(NATS_PASSWORD_ENV).map_err(|_| {
                format!("cluster.nats_user: {user:?} needs a password: set cluster.nats_password_file or the environment variable {NATS_PASSWORD_ENV}")
            })?,
        };
        if password.is_empty() {
            return Err(format!("cluster.nats_user: the password of {user:?} is empty"));
        }
        Ok(Some(NatsCredentials { user: user.clone(), password }))
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

        // The closed-cluster keys, documented in a block of their own, parse and validate too.
        let start = text.find("# A closed NATS cluster").expect("example.toml documents nats_user");
        let keys: String = text[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.trim_start_matches('#').trim_start())
            .filter(|l| l.starts_with("nats_"))
            .map(|l| format!("{l}\n"))
            .collect();
        let parsed: crate::config::Config = toml::from_str(&format!("[cluster]\n{keys}")).unwrap_or_else(|e| panic!("{e}\n{keys}"));
        let cluster = parsed.cluster.expect("[cluster]");
        assert_eq!(cluster.nats_user.as_deref(), Some("gateway"), "{keys}");
        assert!(cluster.nats_password_file.is_some() && cluster.validate().is_ok(), "{keys}");
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
        let bad = ClusterConfig { nats_password_file: Some("/etc/citywatch/nats-password".into()), ..Default::default() };
        assert!(bad.validate().expect_err("a password of nobody").starts_with("cluster.nats_password_file"));
        let bad = ClusterConfig { nats_user: Some("gate way".into()), ..Default::default() };
        assert!(bad.validate().expect_err("not a user name").starts_with("cluster.nats_user"));
    }

    #[test]
    fn the_nats_password_comes_from_the_file_and_stays_out_of_debug() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("nats-password");
        std::fs::write(&file, "s3cret-pw\n").expect("password file");
        let config = ClusterConfig { nats_user: Some("gateway".into()), nats_password_file: Some(file.clone()), ..Default::default() };
        assert!(config.validate().is_ok());
        let credentials = config.nats_credentials().expect("readable").expect("a user is set");
        assert_eq!((credentials.user.as_str(), credentials.password.as_str()), ("gateway", "s3cret-pw"));
        assert!(!format!("{credentials:?}").contains("s3cret"), "{credentials:?}");
        assert_eq!(ClusterConfig::default().nats_credentials(), Ok(None), "anonymous without nats_user");

        std::fs::write(&file, "\n").expect("empty password file");
        assert!(config.nats_credentials().expect_err("empty").contains("is empty"));
        let missing = ClusterConfig { nats_password_file: Some(dir.path().join("absent")), ..config };
        assert!(missing.nats_credentials().expect_err("no file").starts_with("cluster.nats_password_file: reading"));
    }
}

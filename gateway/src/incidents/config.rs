//! `[incidents]`: escalation, flapping, re-opening, command supervision, retention and
//! silences. Every key has a default; `gateway/example.toml` shows them all.

use serde::{Deserialize, Serialize};

use crate::model::Severity;
use super::silence::{Silence, SilenceConfig};
use crate::units::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IncidentsConfig {
    /// An incident at least this severe that nobody acknowledges within `escalate_after` is
    /// escalated (pushed again with `escalation` + 1), then re-notified every `renotify_every`
    /// until acknowledged (SPEC §4 `unacked_escalation`).
    pub escalate_severity: Severity,
    pub escalate_after: Duration,
    pub renotify_every: Duration,
    /// Flapping: this many open/clear flips within `flap_window` mark the incident flapping;
    /// flips are then recorded but not pushed until it has been quiet for `flap_quiet`.
    pub flap_threshold: u32,
    pub flap_window: Duration,
    pub flap_quiet: Duration,
    /// A `cleared` incident whose condition returns within this time is re-opened (same id)
    /// instead of a new incident being opened.
    pub reopen_within: Duration,
    /// A command sent to a device (e.g. `close_valve`) not acknowledged within this time is
    /// noted in the incident's history.
    pub command_timeout: Duration,
    /// An outage storm (a `[[group]]` site incident) pushes its membership changes (devices
    /// going offline, devices back) at most once per this interval: one revision carrying the
    /// whole device list and its count. Its opening, its clearing (the last device back) and
    /// operators' actions are pushed at once. "0s": one revision per device joining or leaving.
    pub storm_update_every: Duration,
    /// Closed incidents and their audit trail are kept this long (law: at least 6 months).
    pub retention: Duration,
    /// Silences and maintenance windows (`[[incidents.silence]]`).
    pub silence: Vec<SilenceConfig>,
}

impl Default for IncidentsConfig {
    fn default() -> Self {
        IncidentsConfig {
            escalate_severity: Severity::Critical,
            escalate_after: Duration::secs(300),
            renotify_every: Duration::secs(300),
            flap_threshold: 4,
            flap_window: Duration::secs(600),
            flap_quiet: Duration::secs(300),
            reopen_within: Duration::secs(600),
            command_timeout: Duration::secs(30),
            storm_update_every: Duration::secs(5),
            retention: Duration::secs(400 * 86_400),
            silence: Vec::new(),
        }
    }
}

impl IncidentsConfig {
    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, reason: &str| Err((format!("incidents.{key}"), reason.to_owned()));
        if self.retention.0 < std::time::Duration::from_secs(183 * 86_400) {
            return bad("retention", "must be at least 6 months (183days): the audit trail is kept that long by law");
        }
        if self.flap_threshold < 2 {
            return bad("flap_threshold", "must be at least 2");
        }
        for (key, d) in [
            ("escalate_after", self.escalate_after),
            ("renotify_every", self.renotify_every),
            ("flap_window", self.flap_window),
            ("flap_quiet", self.flap_quiet),
            ("command_timeout", self.command_timeout),
        ] {
            if d.0.is_zero() {
                return bad(key, "must be more than 0s");
            }
        }
        if self.storm_update_every.0 > std::time::Duration::from_secs(60) {
            return bad("storm_update_every", "must be at most 1m: a duty officer sees an outage grow or shrink within a minute");
        }
        for (i, s) in self.silence.iter().enumerate() {
            Silence::new(s.clone()).map_err(|e| {
                let (key, reason) = e.split_once(": ").unwrap_or(("", e.as_str()));
                (format!("incidents.silence[{i}].{key}"), reason.to_owned())
            })?;
        }
        Ok(())
    }

    /// The configured silences, validated, with ids "config-{index}" where none was given.
    pub fn silences(&self) -> Vec<Silence> {
        self.silence
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let mut s = s.clone();
                s.id.get_or_insert_with(|| format!("config-{i}"));
                Silence::new(s).ok()
            })
            .collect()
    }
}

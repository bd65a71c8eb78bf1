//! The plain vocabulary every stage shares, so no stage has to import another to name it:
//! what a rule reports ([`Signal`]), what an incident is ([`Incident`]), what the outbox hands
//! to a push channel ([`OutboxItem`]) and what became of it ([`Outcome`]), and time formatting.
//! A leaf module: types only, no I/O, no policy, and nothing imported from the rest of the crate.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use citywatch_edge::wire::{CommandKind, DeviceKind, Metric};
use serde::{Deserialize, Serialize};

/// How urgent an incident is, lowest first (so `Ord` ranks them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Major,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 4] = [Severity::Info, Severity::Warning, Severity::Major, Severity::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Major => "major",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(text: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// Where an incident is in the closed loop (受理 · 派遣 · 处置 · 审核 · 结案).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncidentState {
    Open,
    Acknowledged,
    Dispatched,
    Resolved,
    /// The condition ended on its own; still needs review to close.
    Cleared,
    Closed,
}

impl IncidentState {
    pub const ALL: [IncidentState; 6] = [
        IncidentState::Open,
        IncidentState::Acknowledged,
        IncidentState::Dispatched,
        IncidentState::Resolved,
        IncidentState::Cleared,
        IncidentState::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IncidentState::Open => "open",
            IncidentState::Acknowledged => "acknowledged",
            IncidentState::Dispatched => "dispatched",
            IncidentState::Resolved => "resolved",
            IncidentState::Cleared => "cleared",
            IncidentState::Closed => "closed",
        }
    }

    pub fn parse(text: &str) -> Option<IncidentState> {
        IncidentState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Still being worked on by the centre: a new signal for the same device × rule updates it
    /// instead of opening another.
    pub fn is_active(self) -> bool {
        matches!(self, IncidentState::Open | IncidentState::Acknowledged | IncidentState::Dispatched)
    }
}

/// Whose incident it is: one device, or a whole site (composite rules such as `fire_confirmed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Device,
    Site,
}

/// What a rule reports about one device (or site) at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    pub rule: Arc<str>,
    pub scope: Scope,
    pub site: Arc<str>,
    /// The device whose reading or event caused the signal (for a site scope: the latest one).
    pub device: Arc<str>,
    pub kind: DeviceKind,
    /// When it happened: the reading's or event's device time, or the engine's clock for timers.
    pub ts_ms: i64,
    pub change: Change,
    /// Site scope: every device counted so far (empty for device scope).
    pub members: Vec<Arc<str>>,
}

/// The change a rule reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The condition now holds (after its "held for" duration).
    Open {
        severity: Severity,
        metric: Option<Metric>,
        value: Option<f64>,
        threshold: Option<f64>,
        summary: String,
        /// A command to send to the device at once (e.g. `close_valve` on `gas_high`).
        action: Option<CommandKind>,
    },
    /// The condition still holds: a new value, or a new severity (levels of one rule).
    Repeat { severity: Severity, value: Option<f64>, summary: String },
    /// The condition has ended (its clear condition held for its duration).
    Clear { value: Option<f64>, summary: String },
    /// A due date approaches (the inspections service, `[inspections] remind_days`): `days_before`
    /// is 30, 7 or 1 by default.
    Remind { due_ms: i64, days_before: u32, summary: String },
}

/// One entry of an incident's history: every transition, who, when, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub revision: u32,
    /// RFC 3339, UTC.
    pub at: String,
    pub at_ms: i64,
    /// "system" for the gateway's own transitions, else the operator's name.
    pub actor: String,
    /// The new state, or "escalated", "renotified", "updated", "reminder", "command".
    pub action: String,
    pub state: IncidentState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// An incident as pushed on every change and returned by the API (SPEC §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// "inc-…", stable for the incident's whole life.
    pub id: String,
    /// "{site}/{device}/{rule}"; for site-scoped rules "{site}/*/{rule}".
    pub key: String,
    /// +1 on every pushed change; (`id`, `revision`) is the idempotency key of every channel.
    pub revision: u32,
    pub rule: String,
    pub severity: Severity,
    pub state: IncidentState,
    pub scope: Scope,
    pub site: String,
    pub device: String,
    pub kind: DeviceKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// RFC 3339, UTC.
    pub opened_at: String,
    pub updated_at: String,
    pub opened_ms: i64,
    pub updated_ms: i64,
    pub summary: String,
    /// The summary in Chinese and in English (= `summary`), SPEC §5; set on every revision
    /// by [`super::summary::localise`] (empty in incidents stored before they existed).
    #[serde(default)]
    pub summary_zh: String,
    #[serde(default)]
    pub summary_en: String,
    /// Signals folded into this incident (the first included).
    pub count: u64,
    /// Escalation level: 0, then +1 each time an unacknowledged critical incident escalates.
    pub escalation: u32,
    /// Open/clear flips are being suppressed.
    pub flapping: bool,
    /// The crew it was dispatched to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crew: Option<String>,
    /// Devices that contributed (site-scoped rules).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// The situation (rule pack `[[situation]]`) this incident is, e.g. "gas_leak"; None: one
    /// incident per rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub situation: Option<String>,
    /// The member rules whose condition is active now (in the order they joined); `rule` is the
    /// worst of them. Empty once the condition cleared.
    #[serde(default)]
    pub rules_active: Vec<String>,
    /// The incident this one is part of: a smoke incident under its site's `fire_confirmed`
    /// (rule pack `[[parent]]`), a device outage folded into its site's outage (`[[group]]`).
    /// Set once, never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The incidents whose `parent` this one is, in the order they joined.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<String>,
    pub history: Vec<HistoryEntry>,
}

/// One change waiting for (or delivered to) one push channel.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    /// Position in the outbox: increasing, so per-channel order is commit order.
    pub seq: i64,
    /// The channel's name, e.g. "webhook:ops", "mqtt", "alertmanager".
    pub channel: Arc<str>,
    pub incident: Arc<Incident>,
    /// The incident serialised once, exactly the bytes to send and sign.
    pub body: Arc<str>,
}

impl OutboxItem {
    /// `"{id}:{revision}"`, the idempotency key receivers de-duplicate by.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.incident.id, self.incident.revision)
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. "2026-11-22T14:19:52.123Z".
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| format!("{t:.3}")).unwrap_or_else(|_| ms.to_string())
}

/// The device a message is from, as the registry knows it (what the rule engine is told).
#[derive(Debug, Clone, Copy)]
pub struct DeviceCtx<'a> {
    pub id: &'a Arc<str>,
    pub site: &'a Arc<str>,
    pub kind: DeviceKind,
    /// Telemetry interval from the device's `status`; 0 = unknown.
    pub interval_s: u32,
}

/// An incident an operator ended while its rule may still be active in the engine; the engine
/// releases it so the condition persisting (or returning) opens a new incident.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    pub scope: Scope,
    pub site: String,
    pub device: String,
    pub rule: String,
}

/// What became of one outbox item; the outbox records it (`Dropped` as failed, never as
/// delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Given up on; `reason` is one of `notify::drop_reason::ALL` and has been counted.
    Dropped { reason: &'static str },
}

/// Publishes `(topic, payload, retain)` at QoS 1 and resolves once the broker has it (or the
/// client has queued it durably). An error is retried, so it must mean "not published".
pub type PublishFn =
    Arc<dyn Fn(String, Vec<u8>, bool) -> BoxFuture<'static, std::result::Result<(), String>> + Send + Sync>;

/// The stage a message was sent to has stopped (the gateway is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the incident manager has stopped")]
pub struct Stopped;

/// Why one attempt to deliver to a receiver failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Worth retrying as long as it takes: no answer, timeout, 408, 429, 5xx, broker away.
    #[error("{0}")]
    Transient(String),
    /// The receiver refused this item (4xx): retried `give_up_after_attempts` times, then dropped.
    #[error("{0}")]
    Permanent(String),
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(super::rfc3339(1_800_000_000_123), "2027-01-15T08:00:00.123Z");
        assert_eq!(super::rfc3339(1_800_000_000_000), "2027-01-15T08:00:00.000Z");
    }
}

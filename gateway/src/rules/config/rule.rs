//! The typed rule: [`RuleDef`] with its common keys and one struct per `kind`, as parsed and
//! validated, serialising back to the TOML (and JSON) it came from. No parsing (that is
//! `parse`), no evaluation (that is the engine's).

use citywatch_edge::wire::{CommandKind, DeviceKind, EventKind, Metric};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::model::Severity;
use crate::units::Duration;

/// One rule of the pack, typed and validated. Serialises to the TOML (and JSON) it parses from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct RuleDef {
    /// Unique in the pack; the incident key's last part.
    pub name: String,
    /// The incident's severity (threshold levels carry their own; then this is the highest).
    pub severity: Severity,
    /// Device kinds the rule applies to; None = all kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceKind>>,
    /// Template with `{value}`, `{threshold}`, `{metric}`, `{device}`, `{site}`, `{rule}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// A command for the device, carried in the Open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<CommandKind>,
    pub enabled: bool,
    #[serde(flatten)]
    pub spec: RuleSpec,
}

/// What a rule watches, by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuleSpec {
    Threshold(Threshold),
    Rate(Rate),
    Trend(Trend),
    Absence(Absence),
    Event(EventRule),
    Composite(Composite),
    FollowUp(FollowUp),
    Stuck(Stuck),
}

impl RuleSpec {
    pub const KINDS: [&'static str; 8] =
        ["threshold", "rate", "trend", "absence", "event", "composite", "follow_up", "stuck"];

    /// The metric a single-metric rule reads.
    pub fn metric(&self) -> Option<Metric> {
        match self {
            RuleSpec::Threshold(t) => Some(t.metric),
            RuleSpec::Rate(r) => Some(r.metric),
            RuleSpec::Trend(t) => Some(t.metric),
            _ => None,
        }
    }
}

/// A comparison against a fixed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// `at_least`: ≥
    AtLeast,
    /// `above`: >
    Above,
    /// `at_most`: ≤
    AtMost,
    /// `below`: <
    Below,
}

impl Compare {
    pub const ALL: [Compare; 4] = [Compare::AtLeast, Compare::Above, Compare::AtMost, Compare::Below];

    pub fn key(self) -> &'static str {
        match self {
            Compare::AtLeast => "at_least",
            Compare::Above => "above",
            Compare::AtMost => "at_most",
            Compare::Below => "below",
        }
    }

    pub fn holds(self, value: f64, limit: f64) -> bool {
        match self {
            Compare::AtLeast => value >= limit,
            Compare::Above => value > limit,
            Compare::AtMost => value <= limit,
            Compare::Below => value < limit,
        }
    }
}

/// `{ at_least = 20.0, for = "10s" }`: a comparison, optionally held for a duration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Condition {
    pub compare: Compare,
    pub value: f64,
    /// `for`: how long it must hold (gateway clock); None = at once.
    pub held_for: Option<Duration>,
}

impl Condition {
    pub fn holds(&self, value: f64) -> bool {
        self.compare.holds(value, self.value)
    }

    pub fn held_ms(&self) -> i64 {
        self.held_for.map_or(0, Duration::as_ms)
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry(self.compare.key(), &self.value)?;
        if let Some(held_for) = &self.held_for {
            map.serialize_entry("for", held_for)?;
        }
        map.end()
    }
}

/// One level of a threshold rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Level {
    pub severity: Severity,
    #[serde(flatten)]
    pub when: Condition,
}

/// `kind = "threshold"`: a metric against levels, with an optional separate clear condition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Threshold {
    pub metric: Metric,
    /// Rising severities; the short form `open = {…}` is one level at the rule's severity.
    pub levels: Vec<Level>,
    /// Hysteresis; None = clears at once when no level's condition holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clear: Option<Condition>,
    /// Events that open it too, at the first level's severity.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub open_on_events: Vec<EventKind>,
}

/// `kind = "rate"`: the change of a metric across a sliding window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rate {
    pub metric: Metric,
    pub window: Duration,
    /// Exactly one of `rise_at_least` / `fall_at_least`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rise_at_least: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fall_at_least: Option<f64>,
}

impl Rate {
    /// The limit, and whether it is a fall.
    pub fn limit(&self) -> (f64, bool) {
        match (self.rise_at_least, self.fall_at_least) {
            (Some(rise), _) => (rise, false),
            (None, Some(fall)) => (fall, true),
            // Unreachable after validation (exactly one is set); never matches anything.
            (None, None) => (f64::INFINITY, false),
        }
    }
}

/// Unit of a trend's slope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    Year,
    Day,
    Hour,
}

impl Per {
    pub fn ms(self) -> f64 {
        match self {
            // The Julian year, as in "µm/yr" of ISO 9223.
            Per::Year => 365.25 * 86_400_000.0,
            Per::Day => 86_400_000.0,
            Per::Hour => 3_600_000.0,
        }
    }
}

/// `kind = "trend"`: least-squares slope of bucket means over a long span (device time).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trend {
    pub metric: Metric,
    pub over: Duration,
    pub bucket: Duration,
    pub rate_above: f64,
    pub per: Per,
    /// Least span of buckets before a slope counts.
    pub min_span: Duration,
}

/// `kind = "absence"`: a silent device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Absence {
    /// Silent for this many of the device's `interval_s`…
    pub silence_intervals: u32,
    /// …but at least this long.
    pub silence_at_least: Duration,
    /// An `offline` status (or Last Will) opens it at once.
    pub open_on_offline: bool,
}

impl Absence {
    /// How long a device with this telemetry interval may be silent.
    pub fn silence_ms(&self, interval_s: u32) -> i64 {
        (i64::from(self.silence_intervals) * i64::from(interval_s) * 1000).max(self.silence_at_least.as_ms())
    }
}

/// `kind = "event"`: opened and cleared by device events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRule {
    pub open_on: Vec<EventKind>,
    /// Empty: only an operator closes the incident (the engine never clears it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clear_on: Vec<EventKind>,
}

/// `kind = "composite"`: several devices of one site matching other rules within a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Composite {
    /// Rules whose Opens and Repeats count.
    pub of: Vec<String>,
    pub min_devices: u32,
    pub within: Duration,
    /// Clears after this long without a contributing signal; None = closed by operators only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clear_after: Option<Duration>,
}

/// `expect = { metric = "valve_closed", at_least = 1.0 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Expect {
    pub metric: Metric,
    #[serde(flatten)]
    pub when: Condition,
}

/// `kind = "follow_up"`: after another rule opens, something must happen within a deadline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FollowUp {
    pub after: String,
    pub within: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<Expect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_event: Option<EventKind>,
}

/// `kind = "stuck"`: an analog metric exactly unchanged for a long time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stuck {
    pub metrics: Vec<Metric>,
    #[serde(rename = "for")]
    pub held_for: Duration,
}

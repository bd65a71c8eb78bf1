//! The rules' TOML schema: the rule pack (`[[rule]]` tables, built in or from a file) and the
//! per-kind, per-site and per-device `[[rules.override]]` entries, with the validation
//! `check-config` relies on. Parsing only: [`super::RuleSet`] merges, [`super::Engine`] evaluates.
//!
//! Rules are parsed key by key (not by a derived `Deserialize`) so that every error names the
//! rule and the full key, e.g. `rule gas_low: open.for: "10x" is not a duration`.

use std::fmt;
use std::path::PathBuf;

use citywatch_edge::wire::{is_valid_id, CommandKind, DeviceKind, EventKind, Metric};
use serde::de::DeserializeOwned;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::units::Duration;
use crate::model::Severity;

/// Most levels a threshold rule can have: one per severity, strictly rising.
pub const MAX_LEVELS: usize = 4;
/// Most buckets a trend rule keeps per device (`over / bucket`), bounding its memory.
pub const MAX_TREND_BUCKETS: i64 = 400;
/// The placeholders a `summary` template may use.
pub const PLACEHOLDERS: [&str; 6] = ["value", "threshold", "metric", "device", "site", "rule"];

/// `[rules]` of the gateway's configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// A rules file replacing the built-in pack (`gateway/rules/default.toml`); None = built-in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pack: Option<PathBuf>,
    /// `[[rules.override]]`, applied in precedence order: everywhere < kind < site < device;
    /// within one tier, later entries win.
    #[serde(rename = "override", skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Override>,
    /// The pack's `[[situation]]` tables merge member rules into one incident per device and
    /// situation (default true); `false` keeps one incident per device × rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub situations: Option<bool>,
    /// The pack's `[[parent]]` tables link device incidents under their site's incident
    /// (default true; `situations = false` turns them off too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parents: Option<bool>,
    /// The pack's `[[group]]` tables make an outage storm one site incident (default true;
    /// `situations = false` turns them off too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<bool>,
}

/// One `[[situation]]` of the pack: member rules whose incidents on one device are one incident
/// (like Alertmanager's inhibit rules, the worst member leads and the others are folded in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SituationDef {
    /// [A-Za-z0-9_-]; the incident key is "{site}/{device}/{name}".
    pub name: String,
    /// Member rules (device scope). A rule is a member of at most one situation.
    pub rules: Vec<String>,
    /// A device's own alarm (a signal of one of `alarm_rules`) carrying one of these metrics
    /// joins this situation instead of opening its own incident.
    #[serde(default)]
    pub alarm_metrics: Vec<Metric>,
    /// The rules that carry a device's own alarm (default `["device_alarm"]`).
    #[serde(default = "default_alarm_rules")]
    pub alarm_rules: Vec<String>,
}

fn default_alarm_rules() -> Vec<String> {
    vec!["device_alarm".to_owned()]
}

impl SituationDef {
    /// Whether a device-scoped signal of `rule` carrying `metric` belongs to this situation.
    pub fn takes(&self, rule: &str, metric: Option<Metric>) -> bool {
        self.rules.iter().any(|r| r == rule)
            || (self.alarm_rules.iter().any(|r| r == rule) && metric.is_some_and(|m| self.alarm_metrics.contains(&m)))
    }
}

/// One `[[parent]]` of the pack: the incident of a site-scoped (composite) rule becomes the
/// parent of the device incidents of its site that it sums up (`fire_confirmed` over `smoke`),
/// linked both ways (`parent`, `children`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentDef {
    /// The site-scoped (composite) rule whose incident is the parent.
    pub rule: String,
    /// The children: device incidents of the parent's site whose situation (if they are one)
    /// or rule (if not) is named here.
    pub children: Vec<String>,
    /// Only incidents of these device kinds become children; absent = all.
    #[serde(default)]
    pub devices: Vec<DeviceKind>,
    /// Acknowledging the parent acknowledges its open children (default true).
    #[serde(default = "yes")]
    pub ack_children: bool,
}

fn yes() -> bool {
    true
}

impl ParentDef {
    /// Whether a device incident of `kind` that is `situation` (or, outside situations, of
    /// `rule`) is one of this parent's children.
    pub fn takes(&self, situation: Option<&str>, rule: &str, kind: DeviceKind) -> bool {
        let name = situation.unwrap_or(rule);
        self.children.iter().any(|c| c == name) && (self.devices.is_empty() || self.devices.contains(&kind))
    }
}

/// One `[[group]]` of the pack: `min_devices` devices of one site opening `rule` within
/// `within` are one site incident listing them (an outage storm), keyed "{site}/*/{name}".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDef {
    /// [A-Za-z0-9_-], not a rule's name; the site incident's `situation`.
    pub name: String,
    /// The device-scoped rule grouped (e.g. `device_offline`).
    pub rule: String,
    /// How many distinct devices of one site make a storm (at least 2).
    pub min_devices: u32,
    /// The window their opens must fall in.
    pub within: crate::units::Duration,
    /// The site incident's severity; absent: the rule's.
    #[serde(default)]
    pub severity: Option<Severity>,
}

/// One `[[rules.override]]`: replaces top-level fields of one rule, for one device kind, one
/// site, one device or (none of the three) everywhere.
///
/// `serde(flatten)` rules out `deny_unknown_fields` here; unknown keys still fail, when the
/// merged rule is parsed (`rules.override[0]: rule gas_low: opn: unknown key …`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Override {
    /// The rule's name in the pack.
    pub rule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<DeviceKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `false` removes the rule where the override applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Fields replacing the rule's own (whole values: `open = {…}` replaces all of `open`).
    #[serde(flatten)]
    pub set: toml::Table,
}

/// Precedence tier of an override: everywhere, kind, site, device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Tier {
    Everywhere,
    Kind,
    Site,
    Device,
}

impl Override {
    pub(crate) fn tier(&self) -> Tier {
        if self.device.is_some() {
            Tier::Device
        } else if self.site.is_some() {
            Tier::Site
        } else if self.kind.is_some() {
            Tier::Kind
        } else {
            Tier::Everywhere
        }
    }

    /// Whether it applies to a device of `kind` at `site` (`device` None: any device that
    /// has no device-scoped override).
    pub(crate) fn matches(&self, kind: DeviceKind, site: Option<&str>, device: Option<&str>) -> bool {
        self.kind.is_none_or(|k| k == kind)
            && self.site.as_deref().is_none_or(|s| Some(s) == site)
            && self.device.as_deref().is_none_or(|d| Some(d) == device)
    }

    /// Checks what does not depend on the rule: the scope. Returns (key, reason).
    pub(crate) fn check_scope(&self) -> Result<(), (&'static str, String)> {
        let scopes = [self.kind.is_some(), self.site.is_some(), self.device.is_some()];
        if scopes.iter().filter(|s| **s).count() > 1 {
            return Err(("", "at most one of kind, site, device (use two overrides)".into()));
        }
        for (key, id) in [("site", &self.site), ("device", &self.device)] {
            if let Some(id) = id.as_deref().filter(|id| !is_valid_id(id)) {
                return Err((key, format!("{id:?} is not a valid id ([A-Za-z0-9_-]{{1,64}})")));
            }
        }
        for key in ["name", "kind"] {
            if self.set.contains_key(key) {
                return Err((key, "cannot be overridden".into()));
            }
        }
        Ok(())
    }

    /// Applies this override to a rule's table. A new `open` drops `levels` (and the
    /// reverse), a new `rise_at_least` drops `fall_at_least` (and the reverse): they are
    /// alternatives, so replacing one means replacing the other.
    pub(crate) fn apply(&self, table: &mut toml::Table) {
        const ALTERNATIVES: [(&str, &str); 2] = [("open", "levels"), ("rise_at_least", "fall_at_least")];
        for (a, b) in ALTERNATIVES {
            if self.set.contains_key(a) {
                table.remove(b);
            }
            if self.set.contains_key(b) {
                table.remove(a);
            }
        }
        for (key, value) in &self.set {
            table.insert(key.clone(), value.clone());
        }
        if let Some(enabled) = self.enabled {
            table.insert("enabled".into(), toml::Value::Boolean(enabled));
        }
    }
}

/// A rule that does not parse or validate: which rule, which key, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRule {
    /// The rule's name, or `#3` (its position) when it has none.
    pub rule: String,
    /// Dotted path inside the rule, e.g. `open.for`, `levels[1].severity`; empty: the whole rule.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for InvalidRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.rule.is_empty(), self.key.is_empty()) {
            (false, false) => write!(f, "rule {}: {}: {}", self.rule, self.key, self.reason),
            (false, true) => write!(f, "rule {}: {}", self.rule, self.reason),
            (true, false) => write!(f, "{}: {}", self.key, self.reason),
            (true, true) => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for InvalidRule {}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> InvalidRule {
    InvalidRule { rule: String::new(), key: key.into(), reason: reason.into() }
}

type Parsed<T> = std::result::Result<T, InvalidRule>;

// ---------------------------------------------------------------------------------------------
// The typed rule.

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
    Schedule(Schedule),
}

impl RuleSpec {
    pub const KINDS: [&'static str; 9] =
        ["threshold", "rate", "trend", "absence", "event", "composite", "follow_up", "stuck", "schedule"];

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

/// `kind = "schedule"`: reminders before a due date, an incident when overdue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    /// Days before the due date, largest first.
    pub remind_days: Vec<u32>,
}

// ---------------------------------------------------------------------------------------------
// Parsing, key by key.

/// A table being consumed: every key taken is remembered, so leftovers are unknown keys.
struct Fields {
    table: toml::Table,
    /// Dotted path of this table inside the rule ("" at the top).
    path: String,
    known: Vec<&'static str>,
}

impl Fields {
    fn new(table: toml::Table, path: impl Into<String>) -> Fields {
        Fields { table, path: path.into(), known: Vec::new() }
    }

    fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn err(&self, key: &str, reason: impl Into<String>) -> InvalidRule {
        invalid(self.key(key), reason)
    }

    fn opt<T: DeserializeOwned>(&mut self, key: &'static str) -> Parsed<Option<T>> {
        self.known.push(key);
        match self.table.remove(key) {
            None => Ok(None),
            Some(value) => value.try_into().map(Some).map_err(|e| self.err(key, e.message().trim())),
        }
    }

    fn req<T: DeserializeOwned>(&mut self, key: &'static str) -> Parsed<T> {
        self.opt(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    fn num(&mut self, key: &'static str) -> Parsed<Option<f64>> {
        match self.opt::<f64>(key)? {
            Some(v) if !v.is_finite() => Err(self.err(key, "must be a finite number")),
            v => Ok(v),
        }
    }

    /// A duration that must be longer than zero.
    fn span(&mut self, key: &'static str) -> Parsed<Option<Duration>> {
        match self.opt::<Duration>(key)? {
            Some(d) if d.as_ms() <= 0 => Err(self.err(key, "must be longer than zero")),
            d => Ok(d),
        }
    }

    fn sub(&mut self, key: &'static str) -> Parsed<Option<Fields>> {
        let path = self.key(key);
        Ok(self.opt::<toml::Table>(key)?.map(|t| Fields::new(t, path)))
    }

    fn finish(self) -> Parsed<()> {
        match self.table.keys().next() {
            None => Ok(()),
            Some(key) => Err(self.err(key, format!("unknown key, expected one of: {}", self.known.join(", ")))),
        }
    }

    /// One comparison key and, if `allow_for`, a `for` duration.
    fn condition(mut self, allow_for: bool) -> Parsed<Condition> {
        let mut found = Vec::new();
        for compare in Compare::ALL {
            if let Some(value) = self.num(compare.key())? {
                found.push((compare, value));
            }
        }
        let [(compare, value)] = found[..] else {
            return Err(invalid(self.path.clone(), "needs exactly one of at_least, above, at_most, below"));
        };
        let held_for = if allow_for { self.opt::<Duration>("for")? } else { None };
        self.finish()?;
        Ok(Condition { compare, value, held_for })
    }
}

impl TryFrom<toml::Table> for RuleDef {
    type Error = InvalidRule;

    fn try_from(table: toml::Table) -> Parsed<RuleDef> {
        let name = table.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_owned();
        parse_rule(table).map_err(|e| InvalidRule { rule: name, ..e })
    }
}

fn parse_rule(table: toml::Table) -> Parsed<RuleDef> {
    let mut f = Fields::new(table, "");
    let name: String = f.req("name")?;
    if !is_valid_id(&name) {
        return Err(f.err("name", "must be [A-Za-z0-9_-]{1,64}"));
    }
    let kind: String = f.req("kind")?;
    let mut severity: Option<Severity> = f.opt("severity")?;
    let devices: Option<Vec<DeviceKind>> = f.opt("devices")?;
    if devices.as_ref().is_some_and(Vec::is_empty) {
        return Err(f.err("devices", "empty; leave it out to apply to all kinds"));
    }
    let summary: Option<String> = f.opt("summary")?;
    if let Some(template) = &summary {
        check_template(template).map_err(|reason| f.err("summary", reason))?;
    }
    let action: Option<CommandKind> = f.opt("action")?;
    let enabled = f.opt("enabled")?.unwrap_or(true);
    let spec = match kind.as_str() {
        "threshold" => RuleSpec::Threshold(threshold(&mut f, &mut severity)?),
        "rate" => RuleSpec::Rate(rate(&mut f)?),
        "trend" => RuleSpec::Trend(trend(&mut f)?),
        "absence" => RuleSpec::Absence(absence(&mut f)?),
        "event" => RuleSpec::Event(event(&mut f)?),
        "composite" => RuleSpec::Composite(composite(&mut f)?),
        "follow_up" => RuleSpec::FollowUp(follow_up(&mut f)?),
        "stuck" => RuleSpec::Stuck(stuck(&mut f)?),
        "schedule" => RuleSpec::Schedule(schedule(&mut f)?),
        other => {
            return Err(
                f.err("kind", format!("unknown rule kind {other:?}, expected one of: {}", RuleSpec::KINDS.join(", ")))
            )
        }
    };
    let severity = severity.ok_or_else(|| f.err("severity", "missing"))?;
    f.finish()?;
    Ok(RuleDef { name, severity, devices, summary, action, enabled, spec })
}

fn threshold(f: &mut Fields, severity: &mut Option<Severity>) -> Parsed<Threshold> {
    let metric = f.req("metric")?;
    let open = f.sub("open")?;
    let levels: Option<Vec<toml::Table>> = f.opt("levels")?;
    let levels = match (open, levels) {
        (Some(open), None) => {
            let severity = severity.ok_or_else(|| f.err("severity", "missing (needed with `open`)"))?;
            vec![Level { severity, when: open.condition(true)? }]
        }
        (None, Some(tables)) if !tables.is_empty() => {
            let mut levels: Vec<Level> = Vec::with_capacity(tables.len());
            for (i, table) in tables.into_iter().enumerate() {
                let mut lf = Fields::new(table, format!("levels[{i}]"));
                let level_severity: Severity = lf.req("severity")?;
                if levels.last().is_some_and(|prev| prev.severity >= level_severity) {
                    return Err(lf.err("severity", "levels must have strictly rising severities"));
                }
                levels.push(Level { severity: level_severity, when: lf.condition(true)? });
            }
            // Invariant: not empty (guard above) and ≤ MAX_LEVELS (severities strictly rise).
            if let (None, Some(top)) = (*severity, levels.last()) {
                *severity = Some(top.severity);
            }
            levels
        }
        (None, Some(_)) => return Err(f.err("levels", "empty")),
        _ => return Err(f.err("open", "give exactly one of `open` or `levels`")),
    };
    let clear = f.sub("clear")?.map(|c| c.condition(true)).transpose()?;
    let open_on_events = f.opt("open_on_events")?.unwrap_or_default();
    Ok(Threshold { metric, levels, clear, open_on_events })
}

fn rate(f: &mut Fields) -> Parsed<Rate> {
    let metric = f.req("metric")?;
    let window = f.span("window")?.ok_or_else(|| f.err("window", "missing"))?;
    let rise_at_least = f.num("rise_at_least")?;
    let fall_at_least = f.num("fall_at_least")?;
    match (rise_at_least, fall_at_least) {
        (Some(v), None) | (None, Some(v)) if v > 0.0 => {}
        (Some(_), None) | (None, Some(_)) => return Err(f.err("rise_at_least", "must be positive")),
        _ => return Err(f.err("rise_at_least", "give exactly one of rise_at_least, fall_at_least")),
    }
    Ok(Rate { metric, window, rise_at_least, fall_at_least })
}

fn trend(f: &mut Fields) -> Parsed<Trend> {
    let metric = f.req("metric")?;
    let over = f.span("over")?.ok_or_else(|| f.err("over", "missing"))?;
    let bucket = f.span("bucket")?.unwrap_or(Duration::secs(86_400));
    if over.as_ms() < 2 * bucket.as_ms() || over.as_ms() / bucket.as_ms() > MAX_TREND_BUCKETS {
        return Err(f.err("over", format!("must span 2 to {MAX_TREND_BUCKETS} buckets")));
    }
    let rate_above = f.num("rate_above")?.ok_or_else(|| f.err("rate_above", "missing"))?;
    let per = f.opt("per")?.unwrap_or(Per::Year);
    let min_span = f.span("min_span")?.unwrap_or(bucket);
    if min_span.as_ms() > over.as_ms() {
        return Err(f.err("min_span", "longer than `over`"));
    }
    Ok(Trend { metric, over, bucket, rate_above, per, min_span })
}

fn absence(f: &mut Fields) -> Parsed<Absence> {
    let silence_intervals = f.opt("silence_intervals")?.unwrap_or(3);
    let silence_at_least = f.span("silence_at_least")?.unwrap_or(Duration::secs(90));
    let open_on_offline = f.opt("open_on_offline")?.unwrap_or(true);
    Ok(Absence { silence_intervals, silence_at_least, open_on_offline })
}

fn event(f: &mut Fields) -> Parsed<EventRule> {
    let open_on: Vec<EventKind> = f.req("open_on")?;
    if open_on.is_empty() {
        return Err(f.err("open_on", "empty"));
    }
    let clear_on: Vec<EventKind> = f.opt("clear_on")?.unwrap_or_default();
    if let Some(both) = clear_on.iter().find(|e| open_on.contains(e)) {
        return Err(f.err("clear_on", format!("{both} is also in open_on")));
    }
    Ok(EventRule { open_on, clear_on })
}

fn composite(f: &mut Fields) -> Parsed<Composite> {
    let of: Vec<String> = f.req("of")?;
    if of.is_empty() {
        return Err(f.err("of", "empty"));
    }
    let min_devices = f.opt("min_devices")?.unwrap_or(2);
    if min_devices == 0 {
        return Err(f.err("min_devices", "must be at least 1"));
    }
    let within = f.span("within")?.ok_or_else(|| f.err("within", "missing"))?;
    let clear_after = f.span("clear_after")?;
    Ok(Composite { of, min_devices, within, clear_after })
}

fn follow_up(f: &mut Fields) -> Parsed<FollowUp> {
    let after = f.req("after")?;
    let within = f.span("within")?.ok_or_else(|| f.err("within", "missing"))?;
    let expect = match f.sub("expect")? {
        None => None,
        Some(mut ef) => {
            let metric = ef.req("metric")?;
            Some(Expect { metric, when: ef.condition(false)? })
        }
    };
    let expect_event = f.opt("expect_event")?;
    if expect.is_none() && expect_event.is_none() {
        return Err(f.err("expect", "give expect, expect_event or both"));
    }
    Ok(FollowUp { after, within, expect, expect_event })
}

fn stuck(f: &mut Fields) -> Parsed<Stuck> {
    let metrics: Vec<Metric> = f.req("metrics")?;
    if metrics.is_empty() {
        return Err(f.err("metrics", "empty"));
    }
    if let Some(m) = metrics.iter().find(|m| !m.is_analog()) {
        return Err(f.err("metrics", format!("{m} is not analog (it may legitimately never change)")));
    }
    let held_for = f.span("for")?.ok_or_else(|| f.err("for", "missing"))?;
    Ok(Stuck { metrics, held_for })
}

fn schedule(f: &mut Fields) -> Parsed<Schedule> {
    let mut remind_days: Vec<u32> = f.opt("remind_days")?.unwrap_or_else(|| vec![30, 7, 1]);
    if remind_days.contains(&0) || remind_days.len() > 16 {
        return Err(f.err("remind_days", "days must be at least 1, at most 16 of them"));
    }
    remind_days.sort_unstable_by(|a, b| b.cmp(a));
    remind_days.dedup();
    Ok(Schedule { remind_days })
}

/// Every `{…}` is a known placeholder.
fn check_template(template: &str) -> std::result::Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or("unclosed {")?;
        let key = &after[..close];
        if !PLACEHOLDERS.contains(&key) {
            return Err(format!("unknown placeholder {{{key}}}, expected one of: {}", PLACEHOLDERS.join(", ")));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Fills a `summary` template; absent values render as "-".
pub(crate) fn render(template: &str, fill: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        out.push_str(fill(&after[..close]).as_deref().unwrap_or("-"));
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// A value for humans: at most three decimals, no trailing zeros.
pub(crate) fn number(value: f64) -> String {
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}

// ---------------------------------------------------------------------------------------------
// The pack.

/// Parses a pack file: `[[rule]]` tables. Returns each rule with the table it came from (the
/// tables are what overrides merge into).
pub(crate) struct Pack {
    pub rules: Vec<(RuleDef, toml::Table)>,
    pub situations: Vec<SituationDef>,
    pub parents: Vec<ParentDef>,
    pub groups: Vec<GroupDef>,
}

/// An optional array of tables of the pack, e.g. `[[situation]]`.
fn tables<T: DeserializeOwned>(top: &mut toml::Table, name: &str) -> std::result::Result<Vec<T>, PackError> {
    match top.remove(name) {
        None => Ok(Vec::new()),
        Some(v) => v.try_into().map_err(|e: toml::de::Error| PackError::Syntax(format!("[[{name}]]: {}", e.message().trim()))),
    }
}

pub(crate) fn parse_pack(text: &str) -> std::result::Result<Pack, PackError> {
    let mut top: toml::Table = toml::from_str(text).map_err(|e| PackError::Syntax(e.to_string()))?;
    let rules = top.remove("rule").ok_or_else(|| PackError::Syntax("no [[rule]] tables".into()))?;
    let situations: Vec<SituationDef> = tables(&mut top, "situation")?;
    let parents: Vec<ParentDef> = tables(&mut top, "parent")?;
    let groups: Vec<GroupDef> = tables(&mut top, "group")?;
    if let Some(key) = top.keys().next() {
        return Err(PackError::Syntax(format!("unknown top-level key {key:?}, expected only [[rule]], [[situation]], [[parent]] and [[group]]")));
    }
    let toml::Value::Array(rules) = rules else {
        return Err(PackError::Syntax("`rule` must be an array of tables ([[rule]])".into()));
    };
    let mut out = Vec::with_capacity(rules.len());
    for (i, value) in rules.into_iter().enumerate() {
        let toml::Value::Table(table) = value else {
            return Err(PackError::Syntax(format!("rule #{i} is not a table")));
        };
        let def = RuleDef::try_from(table.clone()).map_err(|mut e| {
            if e.rule.is_empty() {
                e.rule = format!("#{i}");
            }
            PackError::Rule(e)
        })?;
        out.push((def, table));
    }
    check_pack(out.iter().map(|(def, _)| def)).map_err(PackError::Rule)?;
    check_situations(&situations, out.iter().map(|(def, _)| def)).map_err(PackError::Syntax)?;
    check_parents(&parents, &situations, out.iter().map(|(def, _)| def)).map_err(PackError::Syntax)?;
    check_groups(&groups, &situations, out.iter().map(|(def, _)| def)).map_err(PackError::Syntax)?;
    Ok(Pack { rules: out, situations, parents, groups })
}

/// Parents: a composite rule, each at most once, over children that are situations or device
/// rules of the pack.
fn check_parents<'a>(parents: &[ParentDef], situations: &[SituationDef], defs: impl Iterator<Item = &'a RuleDef> + Clone) -> std::result::Result<(), String> {
    for (i, p) in parents.iter().enumerate() {
        let at = format!("parent {}", p.rule);
        match defs.clone().find(|d| d.name == p.rule) {
            None => return Err(format!("parent #{i}: rule: no rule named {:?}", p.rule)),
            Some(d) if !matches!(d.spec, RuleSpec::Composite(_)) => return Err(format!("{at}: rule: must be a composite (site) rule")),
            Some(_) => {}
        }
        if parents[..i].iter().any(|o| o.rule == p.rule) {
            return Err(format!("{at}: rule: already a parent"));
        }
        if p.children.is_empty() {
            return Err(format!("{at}: children: empty"));
        }
        for c in &p.children {
            let situation = situations.iter().any(|s| s.name == *c);
            match defs.clone().find(|d| d.name == *c) {
                Some(d) if matches!(d.spec, RuleSpec::Composite(_)) => return Err(format!("{at}: children: {c:?} is a composite (site) rule")),
                None if !situation => return Err(format!("{at}: children: no rule or situation named {c:?}")),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Groups: valid unique names that are no rule's, over a device rule of the pack that is in no
/// situation and no other group, at least 2 devices within more than 0s.
fn check_groups<'a>(groups: &[GroupDef], situations: &[SituationDef], defs: impl Iterator<Item = &'a RuleDef> + Clone) -> std::result::Result<(), String> {
    for (i, g) in groups.iter().enumerate() {
        let at = format!("group {}", g.name);
        if !is_valid_id(&g.name) {
            return Err(format!("group #{i}: name: must be [A-Za-z0-9_-]{{1,64}}"));
        }
        if groups[..i].iter().any(|o| o.name == g.name) || situations.iter().any(|s| s.name == g.name) {
            return Err(format!("{at}: name: already a group's or situation's name"));
        }
        if defs.clone().any(|d| d.name == g.name) {
            return Err(format!("{at}: name: a rule has this name (the site incident's key would clash)"));
        }
        match defs.clone().find(|d| d.name == g.rule) {
            None => return Err(format!("{at}: rule: no rule named {:?}", g.rule)),
            Some(d) if matches!(d.spec, RuleSpec::Composite(_)) => return Err(format!("{at}: rule: {:?} is a composite (site) rule", g.rule)),
            Some(_) => {}
        }
        if let Some(s) = situations.iter().find(|s| s.rules.contains(&g.rule)) {
            return Err(format!("{at}: rule: {:?} is in situation {}", g.rule, s.name));
        }
        if groups[..i].iter().any(|o| o.rule == g.rule) {
            return Err(format!("{at}: rule: {:?} is already in another group", g.rule));
        }
        if g.min_devices < 2 {
            return Err(format!("{at}: min_devices: must be at least 2"));
        }
        if g.within.0.is_zero() {
            return Err(format!("{at}: within: must be more than 0s"));
        }
    }
    Ok(())
}

/// Situations: valid unique names, member rules that exist, are not site-scoped (composite) and
/// belong to one situation only.
fn check_situations<'a>(situations: &[SituationDef], defs: impl Iterator<Item = &'a RuleDef> + Clone) -> std::result::Result<(), String> {
    for (i, s) in situations.iter().enumerate() {
        let at = format!("situation {}", s.name);
        if !is_valid_id(&s.name) {
            return Err(format!("situation #{i}: name: must be [A-Za-z0-9_-]{{1,64}}"));
        }
        if situations[..i].iter().any(|o| o.name == s.name) {
            return Err(format!("{at}: name: duplicate situation name"));
        }
        if s.rules.is_empty() {
            return Err(format!("{at}: rules: empty"));
        }
        for rule in s.rules.iter().chain(s.alarm_rules.iter().filter(|_| !s.alarm_metrics.is_empty())) {
            match defs.clone().find(|d| &d.name == rule) {
                None => return Err(format!("{at}: rules: no rule named {rule:?}")),
                Some(d) if matches!(d.spec, RuleSpec::Composite(_)) => return Err(format!("{at}: rules: {rule:?} is a composite (site) rule")),
                Some(_) => {}
            }
        }
        if let Some(rule) = s.rules.iter().find(|r| situations[..i].iter().any(|o| o.rules.contains(r))) {
            return Err(format!("{at}: rules: {rule:?} is already in another situation"));
        }
    }
    Ok(())
}

/// Why a pack does not load.
#[derive(Debug)]
pub(crate) enum PackError {
    Syntax(String),
    Rule(InvalidRule),
}

/// Checks across rules: unique names, and composite / follow-up rules referring to rules
/// that exist and are not themselves composite (or, for `after`, follow-up) rules.
pub(crate) fn check_pack<'a>(defs: impl Iterator<Item = &'a RuleDef> + Clone) -> Parsed<()> {
    let find = |name: &str| defs.clone().find(|d| d.name == name);
    for (i, def) in defs.clone().enumerate() {
        let rule_err = |key: &str, reason: String| InvalidRule { rule: def.name.clone(), key: key.into(), reason };
        if defs.clone().take(i).any(|d| d.name == def.name) {
            return Err(rule_err("name", "duplicate rule name".into()));
        }
        let (key, refs, forbid_follow_up): (&str, &[String], bool) = match &def.spec {
            RuleSpec::Composite(c) => ("of", &c.of, false),
            RuleSpec::FollowUp(f) => ("after", std::slice::from_ref(&f.after), true),
            _ => continue,
        };
        for name in refs {
            match find(name).map(|d| &d.spec) {
                None => return Err(rule_err(key, format!("no rule named {name:?}"))),
                Some(RuleSpec::Composite(_)) => return Err(rule_err(key, format!("{name:?} is a composite rule"))),
                Some(RuleSpec::FollowUp(_)) if forbid_follow_up => {
                    return Err(rule_err(key, format!("{name:?} is a follow_up rule")))
                }
                Some(_) if name == &def.name => return Err(rule_err(key, "refers to itself".into())),
                Some(_) => {}
            }
        }
    }
    Ok(())
}

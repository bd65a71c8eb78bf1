//! The rules' TOML schema: the rule pack (`[[rule]]` tables, built in or from a file) and the
//! per-kind, per-site and per-device `[[rules.override]]` entries, with the validation
//! `check-config` relies on. Parsing only: [`super::RuleSet`] merges, [`super::Engine`] evaluates.
//!
//! Rules are parsed key by key (not by a derived `Deserialize`) so that every error names the
//! rule and the full key, e.g. `rule gas_low: open.for: "10x" is not a duration`. Here: the
//! `[rules]` section, overrides, situations and the checks across a pack; `rule` holds the typed
//! rule and its kinds, `parse` the key-by-key parsing, `template` the `summary` templates.

mod parse;
mod rule;
mod template;

use std::fmt;
use std::path::PathBuf;

use citywatch_edge::wire::{is_valid_id, DeviceKind, Metric};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::Severity;

pub use rule::{
    Absence, Compare, Composite, Condition, EventRule, Expect, FollowUp, Level, Per, Rate, RuleDef, RuleSpec, Stuck,
    Threshold, Trend,
};
pub(crate) use template::{number, render};

/// Most levels a threshold rule can have: one per severity, strictly rising.
pub const MAX_LEVELS: usize = 4;

/// Most buckets a trend rule keeps per device (`over / bucket`), bounding its memory.
pub const MAX_TREND_BUCKETS: i64 = 400;

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

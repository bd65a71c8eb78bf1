//! Parsing a rule key by key, so that every error names the rule and the full key; one function
//! per kind. Only what a single rule says: the checks across a pack are in the parent module.

use citywatch_edge::wire::{is_valid_id, CommandKind, DeviceKind, EventKind, Metric};
use serde::de::DeserializeOwned;

use super::rule::{
    Absence, Compare, Composite, Condition, EventRule, Expect, FollowUp, Level, Per, Rate, RuleDef, RuleSpec, Stuck,
    Threshold, Trend,
};
use super::template::check_template;
use super::{invalid, InvalidRule, Parsed, MAX_TREND_BUCKETS};
use crate::model::Severity;
use crate::units::Duration;

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
        // Removed (issue 13): due dates and reminders have one home, the inspections service.
        "schedule" => {
            return Err(f.err(
                "kind",
                "\"schedule\" is no longer a rule kind: maintenance reminders and overdue \
                 incidents come from the inventory, with the reminder days under \
                 [inspections] remind_days; remove this rule",
            ))
        }
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

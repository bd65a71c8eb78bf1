//! Building a device's [`Signal`]s: open, repeat, clear, with the rule's summary template
//! filled in. Decides nothing: the kinds' evaluators say when.

use std::sync::Arc;

use citywatch_edge::wire::{DeviceKind, Metric};

use super::compiled::CompiledRule;
use crate::model::{Change, Scope, Severity, Signal};
use crate::rules::config::{number, render};

/// Builds the signals of one device.
pub(super) struct Emit<'a> {
    pub(super) out: &'a mut Vec<Signal>,
    pub(super) device: &'a Arc<str>,
    pub(super) site: &'a Arc<str>,
    pub(super) kind: DeviceKind,
}

impl Emit<'_> {
    pub(super) fn push(&mut self, rule: &CompiledRule, ts_ms: i64, change: Change) {
        self.out.push(Signal {
            rule: rule.name.clone(),
            scope: Scope::Device,
            site: self.site.clone(),
            device: self.device.clone(),
            kind: self.kind,
            ts_ms,
            change,
            members: Vec::new(),
        });
    }

    fn summary(
        &self,
        rule: &CompiledRule,
        metric: Option<Metric>,
        value: Option<f64>,
        threshold: Option<f64>,
    ) -> String {
        summary(rule, self.device, self.site, metric, value, threshold)
    }

    pub(super) fn open(
        &mut self,
        rule: &CompiledRule,
        ts: i64,
        severity: Severity,
        metric: Option<Metric>,
        value: Option<f64>,
        threshold: Option<f64>,
    ) {
        let summary = self.summary(rule, metric, value, threshold);
        let action = rule.def.action;
        self.push(rule, ts, Change::Open { severity, metric, value, threshold, summary, action });
    }

    pub(super) fn repeat(
        &mut self,
        rule: &CompiledRule,
        ts: i64,
        severity: Severity,
        metric: Option<Metric>,
        value: Option<f64>,
        threshold: Option<f64>,
    ) {
        let summary = self.summary(rule, metric, value, threshold);
        self.push(rule, ts, Change::Repeat { severity, value, summary });
    }

    pub(super) fn clear(&mut self, rule: &CompiledRule, ts: i64, metric: Option<Metric>, value: Option<f64>) {
        let what = match (metric, value) {
            (Some(m), Some(v)) => format!(" ({m} {})", number(v)),
            (None, Some(v)) => format!(" ({})", number(v)),
            _ => String::new(),
        };
        let summary = format!("{} cleared at {} ({}){what}", rule.name, self.device, self.site);
        self.push(rule, ts, Change::Clear { value, summary });
    }
}

/// The rule's template filled in, or a generated text.
pub(super) fn summary(
    rule: &CompiledRule,
    device: &str,
    site: &str,
    metric: Option<Metric>,
    value: Option<f64>,
    threshold: Option<f64>,
) -> String {
    match &rule.def.summary {
        Some(template) => render(template, |key| match key {
            "value" => value.map(number),
            "threshold" => threshold.map(number),
            "metric" => metric.map(|m| m.as_str().to_owned()),
            "device" => Some(device.to_owned()),
            "site" => Some(site.to_owned()),
            "rule" => Some(rule.name.to_string()),
            _ => None,
        }),
        None => {
            let mut text = format!("{} at {device} ({site})", rule.name);
            if let Some(m) = metric {
                text.push_str(&format!(": {m}"));
            }
            if let Some(v) = value {
                text.push_str(&format!(" {}", number(v)));
            }
            if let Some(t) = threshold {
                text.push_str(&format!(", limit {}", number(t)));
            }
            text
        }
    }
}

pub(super) fn nan_to_none(v: f64) -> Option<f64> {
    (!v.is_nan()).then_some(v)
}

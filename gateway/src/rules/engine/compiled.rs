//! What a rule pack compiles to for one device kind at one site (or one device with its own
//! overrides): the enabled rules that apply, indexed by what feeds them. Built once per
//! (kind, site) by [`RuleSet`](crate::rules::RuleSet) and shared; no per-device state, no
//! evaluation.

use std::sync::Arc;

use citywatch_edge::wire::{DeviceKind, EventKind, Metric};

use crate::rules::config::{RuleDef, RuleSpec};

/// A rule as the engine runs it.
#[derive(Debug)]
pub(crate) struct CompiledRule {
    pub(crate) name: Arc<str>,
    pub(crate) def: RuleDef,
}

/// The enabled rules that apply to one device kind at one site (or to one device with its own
/// overrides), indexed by what feeds them so a reading touches only its metric's rules.
#[derive(Debug)]
pub(crate) struct Effective {
    pub(crate) rules: Vec<CompiledRule>,
    /// Per `Metric as usize`: threshold, rate, trend, stuck and follow-up (expect) rules.
    pub(super) by_metric: Vec<Vec<u16>>,
    /// Per `EventKind as usize`: event, threshold (open_on_events) and follow-up rules.
    pub(super) by_event: Vec<Vec<u16>>,
    pub(super) absence: Vec<u16>,
    /// Per rule: the follow-up rules started by it.
    pub(super) followers: Vec<Vec<u16>>,
    /// Per rule: the composite rules it counts towards.
    pub(super) composites: Vec<Vec<u16>>,
}

impl Effective {
    /// Keeps the enabled rules that apply to `kind`: its kinds listed (or none listed), its
    /// metric reported by the kind, a follow-up's `after` rule and one of a composite's rules
    /// among them.
    pub(crate) fn build(kind: DeviceKind, defs: Vec<RuleDef>) -> Effective {
        let base_applies = |d: &RuleDef| {
            d.enabled
                && d.devices.as_ref().is_none_or(|ks| ks.contains(&kind))
                && d.spec.metric().is_none_or(|m| kind.has_metric(m))
                && match &d.spec {
                    RuleSpec::Stuck(s) => s.metrics.iter().any(|m| kind.has_metric(*m)),
                    RuleSpec::FollowUp(f) => {
                        f.expect.is_none_or(|e| kind.has_metric(e.metric)) || f.expect_event.is_some()
                    }
                    _ => true,
                }
        };
        let mut kept: Vec<RuleDef> = defs.iter().filter(|d| base_applies(d) && !is_derived(d)).cloned().collect();
        let has = |kept: &[RuleDef], name: &str| kept.iter().any(|d| d.name == name);
        let derived: Vec<RuleDef> = defs
            .into_iter()
            .filter(|d| base_applies(d) && is_derived(d))
            .filter(|d| match &d.spec {
                RuleSpec::FollowUp(f) => has(&kept, &f.after),
                RuleSpec::Composite(c) => c.of.iter().any(|n| has(&kept, n)),
                _ => false,
            })
            .collect();
        kept.extend(derived);

        let n = kept.len();
        let mut e = Effective {
            rules: Vec::with_capacity(n),
            by_metric: vec![Vec::new(); Metric::ALL.len()],
            by_event: vec![Vec::new(); EventKind::ALL.len()],
            absence: Vec::new(),
            followers: vec![Vec::new(); n],
            composites: vec![Vec::new(); n],
        };
        let index = |name: &str| kept.iter().position(|d| d.name == name);
        for (i, def) in kept.iter().enumerate() {
            let slot = i as u16;
            match &def.spec {
                RuleSpec::Threshold(t) => {
                    e.by_metric[t.metric as usize].push(slot);
                    for ev in &t.open_on_events {
                        e.by_event[*ev as usize].push(slot);
                    }
                }
                RuleSpec::Rate(r) => e.by_metric[r.metric as usize].push(slot),
                RuleSpec::Trend(t) => e.by_metric[t.metric as usize].push(slot),
                RuleSpec::Stuck(s) => {
                    for m in s.metrics.iter().filter(|m| kind.has_metric(**m)) {
                        e.by_metric[*m as usize].push(slot);
                    }
                }
                RuleSpec::Event(ev) => {
                    for k in ev.open_on.iter().chain(&ev.clear_on) {
                        e.by_event[*k as usize].push(slot);
                    }
                }
                RuleSpec::Absence(_) => e.absence.push(slot),
                RuleSpec::FollowUp(f) => {
                    if let Some(x) = &f.expect {
                        e.by_metric[x.metric as usize].push(slot);
                    }
                    if let Some(ev) = f.expect_event {
                        e.by_event[ev as usize].push(slot);
                    }
                    if let Some(after) = index(&f.after) {
                        e.followers[after].push(slot);
                    }
                }
                RuleSpec::Composite(c) => {
                    for of in c.of.iter().filter_map(|n| index(n)) {
                        e.composites[of].push(slot);
                    }
                }
            }
        }
        e.rules = kept.into_iter().map(|def| CompiledRule { name: Arc::from(def.name.as_str()), def }).collect();
        e
    }

    pub(super) fn index_of(&self, name: &str) -> Option<usize> {
        self.rules.iter().position(|r| &*r.name == name)
    }
}

/// Rules fed by other rules' signals rather than by the device.
pub(super) fn is_derived(def: &RuleDef) -> bool {
    matches!(def.spec, RuleSpec::FollowUp(_) | RuleSpec::Composite(_))
}

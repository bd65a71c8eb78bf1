//! Rule pack, overrides and engine: every rule kind against a controlled clock, the bad configs
//! `check-config` must name, and property tests for panics and flapping.

use std::sync::Arc;

use citywatch_edge::wire::{CommandKind, DeviceKind, EventKind, LinkState, Metric};

use super::*;
use crate::incidents::{Change, Scope, Severity, Signal};

mod kinds;
mod pack;
mod properties;

const S: i64 = 1000;
const MIN: i64 = 60 * S;
const H: i64 = 60 * MIN;
const DAY: i64 = 24 * H;
const T0: i64 = 1_763_800_000_000;

struct Dev {
    id: Arc<str>,
    site: Arc<str>,
    kind: DeviceKind,
    interval_s: u32,
}

impl Dev {
    fn new(id: &str, site: &str, kind: DeviceKind) -> Dev {
        Dev { id: id.into(), site: site.into(), kind, interval_s: 0 }
    }
    fn gas(id: &str) -> Dev {
        Dev::new(id, "s1", DeviceKind::GasDetector)
    }
    fn smoke(id: &str, site: &str) -> Dev {
        Dev::new(id, site, DeviceKind::SmokeDetector)
    }
    fn siren(id: &str) -> Dev {
        Dev::new(id, "s1", DeviceKind::SirenMount)
    }
    fn ctx(&self) -> DeviceCtx<'_> {
        DeviceCtx { id: &self.id, site: &self.site, kind: self.kind, interval_s: self.interval_s }
    }
}

struct Bench {
    engine: Engine,
}

impl Bench {
    fn new(rules: RuleSet) -> Bench {
        Bench { engine: Engine::new(Arc::new(rules)) }
    }
    fn default_pack() -> Bench {
        Bench::new(RuleSet::default_pack())
    }
    fn pack(text: &str) -> Bench {
        Bench::new(RuleSet::from_pack_str(text, &[]).expect("test pack"))
    }
    fn read(&mut self, d: &Dev, metric: Metric, value: f64, now: i64) -> Vec<Signal> {
        let mut out = Vec::new();
        self.engine.on_reading(&d.ctx(), metric, value, now, now, &mut out);
        out
    }
    fn event(&mut self, d: &Dev, event: EventKind, now: i64) -> Vec<Signal> {
        let mut out = Vec::new();
        self.engine.on_event(&d.ctx(), event, None, None, now, now, &mut out);
        out
    }
    fn status(&mut self, d: &Dev, state: LinkState, now: i64) -> Vec<Signal> {
        let mut out = Vec::new();
        self.engine.on_status(&d.ctx(), state, now, &mut out);
        out
    }
    fn seen(&mut self, d: &Dev, now: i64) -> Vec<Signal> {
        let mut out = Vec::new();
        self.engine.on_seen(&d.ctx(), now, &mut out);
        out
    }
    fn tick(&mut self, now: i64) -> Vec<Signal> {
        let mut out = Vec::new();
        self.engine.tick(now, &mut out);
        out
    }
}

/// The signals of one rule.
fn of<'a>(signals: &'a [Signal], rule: &str) -> Vec<&'a Signal> {
    signals.iter().filter(|s| &*s.rule == rule).collect()
}

/// "open", "repeat", "clear", "remind" for each signal of one rule.
fn changes(signals: &[Signal], rule: &str) -> Vec<&'static str> {
    of(signals, rule).iter().map(|s| change_name(&s.change)).collect()
}

fn change_name(change: &Change) -> &'static str {
    match change {
        Change::Open { .. } => "open",
        Change::Repeat { .. } => "repeat",
        Change::Clear { .. } => "clear",
        Change::Remind { .. } => "remind",
    }
}

fn severity(s: &Signal) -> Option<Severity> {
    match &s.change {
        Change::Open { severity, .. } | Change::Repeat { severity, .. } => Some(*severity),
        _ => None,
    }
}

fn load_err(pack: &str) -> String {
    RuleSet::from_pack_str(pack, &[]).expect_err("must be rejected").to_string()
}

fn override_err(overrides: &str) -> String {
    let cfg: RulesConfig = toml::from_str(overrides).expect("overrides parse");
    RuleSet::from_config(&cfg).expect_err("must be rejected").to_string()
}

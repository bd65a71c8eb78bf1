//! The rule engine: per device and rule, the little state each rule kind needs, fed by
//! readings, events, link states and a once-a-second `tick`, emitting [`Signal`]s. Synchronous
//! and I/O-free; it owns no incidents (the manager does) and keeps no history beyond what its
//! rules need (a 32-sample ring for rates, bucket means for trends).
//!
//! Timers (holds, silence deadlines, follow-up deadlines, stuck sensors) live in one
//! min-heap with lazy invalidation: a slot remembers its earliest queued deadline, later ones
//! are only queued when that fires, and entries of forgotten or rebuilt devices are skipped.
//!
//! The layout: [`Engine`] here routes each input to the rules it feeds; `compiled` is what a
//! pack compiles to, `state` the per-device state and the timer heap, `emit` builds signals,
//! and one module per rule kind holds that kind's state and evaluation.

mod absence;
mod compiled;
mod composite;
mod emit;
mod event;
mod follow_up;
mod rate;
mod state;
mod stuck;
mod threshold;
mod trend;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::Arc;

use citywatch_edge::wire::{EventKind, LinkState, Metric};
use serde::Serialize;

pub(crate) use compiled::Effective;

use super::config::RuleSpec;
use super::RuleSet;
use crate::model::{Change, DeviceCtx, Scope, Signal};
use emit::Emit;
use state::{arm, device_state, drop_idle, next_deadline, DeviceState, Target, Timers, NONE, NO_TIMER};

/// What the engine holds, for `/metrics` and the health endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub devices: usize,
    /// Sites with composite-rule state.
    pub sites: usize,
    /// Queued deadlines, including ones already superseded (skipped when they come due).
    pub timers_pending: usize,
    pub signals: SignalCounts,
}

/// Signals emitted since start, by change kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SignalCounts {
    pub open: u64,
    pub repeat: u64,
    pub clear: u64,
    /// No rule kind reminds any more (the inspections service does, past the engine): always 0,
    /// kept so the stats keep their shape.
    pub remind: u64,
}

/// Evaluates the rules of a [`RuleSet`] for every device; see the module docs.
pub struct Engine {
    rules: Arc<RuleSet>,
    /// Boxed, so the table holds a key and a pointer per slot, not a whole state (a hash table
    /// keeps up to twice the slots it uses).
    devices: HashMap<Arc<str>, Box<DeviceState>>,
    sites: composite::Sites,
    timers: Timers,
    next_epoch: u32,
    counts: SignalCounts,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").field("rules", &self.rules.rules().len()).field("stats", &self.stats()).finish()
    }
}

impl Engine {
    pub fn new(rules: Arc<RuleSet>) -> Engine {
        Engine {
            rules,
            devices: HashMap::new(),
            sites: HashMap::new(),
            timers: BinaryHeap::new(),
            next_epoch: 0,
            counts: SignalCounts::default(),
        }
    }

    /// The rules it runs.
    pub fn rule_set(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    /// A live (non-historical) reading. Constant work per rule.
    pub fn on_reading(
        &mut self,
        dev: &DeviceCtx,
        metric: Metric,
        value: f64,
        ts_ms: i64,
        now_ms: i64,
        out: &mut Vec<Signal>,
    ) {
        if !value.is_finite() {
            return;
        }
        let start = out.len();
        let Engine { rules, devices, timers, next_epoch, .. } = self;
        let d = device_state(devices, rules, next_epoch, dev);
        d.offline = false;
        absence::seen(d, dev.id, timers, now_ms, out);
        let DeviceState { rules: eff, slots, epoch, kind, .. } = d;
        let mut emit = Emit { out, device: dev.id, site: dev.site, kind: *kind };
        for &i in &eff.by_metric[metric as usize] {
            let i = usize::from(i);
            let (rule, slot) = (&eff.rules[i], &mut slots[i]);
            let evaluated = match &rule.def.spec {
                RuleSpec::Threshold(t) => threshold::on_reading(rule, t, slot, value, now_ms, ts_ms, &mut emit),
                RuleSpec::Rate(r) => rate::on_reading(rule, r, slot, value, now_ms, ts_ms, &mut emit),
                RuleSpec::Trend(t) => trend::on_reading(rule, t, slot, value, ts_ms, &mut emit),
                RuleSpec::Stuck(s) => stuck::on_reading(rule, s, slot, *kind, metric, value, now_ms, ts_ms, &mut emit),
                RuleSpec::FollowUp(f) => follow_up::on_reading(rule, f, slot, metric, value, ts_ms, &mut emit),
                _ => true,
            };
            if !evaluated {
                continue;
            }
            let next = next_deadline(rule, slot, now_ms);
            arm(timers, dev.id, *epoch, i, &mut slot.queued, next, NONE);
            drop_idle(slot);
        }
        self.finish(start, now_ms, out);
    }

    /// A device event (with its metric and value, if it carried them).
    #[allow(clippy::too_many_arguments)]
    pub fn on_event(
        &mut self,
        dev: &DeviceCtx,
        event: EventKind,
        metric: Option<Metric>,
        value: Option<f64>,
        ts_ms: i64,
        now_ms: i64,
        out: &mut Vec<Signal>,
    ) {
        let value = value.filter(|v| v.is_finite());
        let start = out.len();
        let Engine { rules, devices, timers, next_epoch, .. } = self;
        let d = device_state(devices, rules, next_epoch, dev);
        d.offline = false;
        absence::seen(d, dev.id, timers, now_ms, out);
        let DeviceState { rules: eff, slots, epoch, kind, .. } = d;
        let mut emit = Emit { out, device: dev.id, site: dev.site, kind: *kind };
        for &i in &eff.by_event[event as usize] {
            let i = usize::from(i);
            let (rule, slot) = (&eff.rules[i], &mut slots[i]);
            let evaluated = match &rule.def.spec {
                RuleSpec::Event(e) => event::on_event(rule, e, slot, event, metric, value, ts_ms, &mut emit),
                RuleSpec::Threshold(t) => threshold::on_event(rule, t, slot, value, ts_ms, &mut emit),
                RuleSpec::FollowUp(f) => follow_up::on_event(rule, f, slot, event, metric, value, now_ms, ts_ms, &mut emit),
                _ => true,
            };
            if !evaluated {
                continue;
            }
            let next = next_deadline(rule, slot, now_ms);
            arm(timers, dev.id, *epoch, i, &mut slot.queued, next, NONE);
            drop_idle(slot);
        }
        self.finish(start, now_ms, out);
    }

    /// A `status` message: `offline` opens absence rules at once (if they say so), `online`
    /// clears them.
    pub fn on_status(&mut self, dev: &DeviceCtx, state: LinkState, now_ms: i64, out: &mut Vec<Signal>) {
        let start = out.len();
        let Engine { rules, devices, timers, next_epoch, .. } = self;
        let d = device_state(devices, rules, next_epoch, dev);
        match state {
            LinkState::Online => {
                d.offline = false;
                absence::seen(d, dev.id, timers, now_ms, out);
            }
            LinkState::Offline => absence::offline(d, dev, now_ms, out),
        }
        self.finish(start, now_ms, out);
    }

    /// Any accepted message from the device (proof of life for absence rules); called in
    /// addition to the above. After an `offline` status it does not clear (that status is a
    /// message too): data or an `online` status does.
    pub fn on_seen(&mut self, dev: &DeviceCtx, now_ms: i64, out: &mut Vec<Signal>) {
        let start = out.len();
        let Engine { rules, devices, timers, next_epoch, .. } = self;
        let d = device_state(devices, rules, next_epoch, dev);
        absence::seen(d, dev.id, timers, now_ms, out);
        self.finish(start, now_ms, out);
    }

    /// A device known at start (from the registry), last heard at `last_seen_ms`, so absence
    /// works for devices that never speak again.
    pub fn track(&mut self, dev: &DeviceCtx, last_seen_ms: i64) {
        let Engine { rules, devices, timers, next_epoch, .. } = self;
        let d = device_state(devices, rules, next_epoch, dev);
        d.last_seen_ms = d.last_seen_ms.max(last_seen_ms);
        absence::arm_deadlines(d, dev.id, timers);
    }

    /// An incident open at start for (device, rule): the rule counts as active, so it does not
    /// open again and can clear. For a composite rule, the device's site's incident. A restored
    /// threshold rule is taken to be at its first level (a higher one held repeats at once); a
    /// restored absence rule needs data or an `online` status to clear.
    pub fn restore_active(&mut self, dev: &DeviceCtx, rule: &str) {
        let Engine { rules, devices, sites, timers, next_epoch, .. } = self;
        let d = device_state(devices, rules, next_epoch, dev);
        let Some(i) = d.rules.index_of(rule) else { return };
        let slot = &mut d.slots[i];
        let compiled = &d.rules.rules[i];
        match &compiled.def.spec {
            RuleSpec::Composite(c) => composite::restore(sites, timers, compiled, c, dev),
            RuleSpec::Threshold(_) => threshold::restore(slot),
            RuleSpec::Absence(_) => {
                slot.active = true;
                d.offline = true;
            }
            _ => slot.active = true,
        }
    }

    /// An incident was closed by an operator (or otherwise ended outside the engine): the rule
    /// is no longer active for (device, rule), or for (site, rule) with `Scope::Site`, and its
    /// state starts over, so the next match opens a new incident. Needed for rules that never
    /// clear on their own (events without `clear_on`, composites without `clear_after`).
    pub fn release(&mut self, scope: Scope, site: &str, device: &str, rule: &str) {
        match scope {
            Scope::Site => composite::release(&mut self.sites, site, rule),
            Scope::Device => {
                let Some(d) = self.devices.get_mut(device) else { return };
                if let Some(i) = d.rules.index_of(rule) {
                    d.slots[i].active = false;
                    d.slots[i].state = None;
                }
            }
        }
    }

    /// Timers: holds, silence deadlines, follow-up deadlines, stuck sensors, composite
    /// clear-afters. Called about once a second; the work is what is due, not the fleet.
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<Signal>) {
        let start = out.len();
        while self.timers.peek().is_some_and(|Reverse(t)| t.at <= now_ms) {
            let Some(Reverse(timer)) = self.timers.pop() else { break };
            match timer.target {
                Target::Slot { device, epoch, slot } => {
                    self.slot_due(&device, epoch, usize::from(slot), timer.at, now_ms, out)
                }
                Target::Site { site, rule } => {
                    composite::due(&mut self.sites, &mut self.timers, &site, &rule, timer.at, now_ms, out)
                }
            }
        }
        self.finish(start, now_ms, out);
    }

    /// Forget a device (unregistered). Its queued timers are skipped when they come due.
    pub fn forget(&mut self, device: &str) {
        self.devices.remove(device);
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            devices: self.devices.len(),
            sites: self.sites.len(),
            timers_pending: self.timers.len(),
            signals: self.counts,
        }
    }

    fn slot_due(&mut self, device: &Arc<str>, epoch: u32, i: usize, at: i64, now: i64, out: &mut Vec<Signal>) {
        let Some(d) = self.devices.get_mut(device) else { return };
        if d.epoch != epoch || d.slots.get(i).is_none_or(|s| s.queued != at) {
            return;
        }
        let DeviceState { rules: eff, slots, site, kind, interval_s, last_seen_ms, .. } = &mut **d;
        let (rule, slot) = (&eff.rules[i], &mut slots[i]);
        slot.queued = NO_TIMER;
        let mut emit = Emit { out, device, site, kind: *kind };
        match &rule.def.spec {
            RuleSpec::Threshold(t) => threshold::eval(rule, t, slot, now, now, false, &mut emit),
            RuleSpec::Rate(r) => rate::eval(rule, r, slot, now, now, false, &mut emit),
            RuleSpec::Absence(a) => absence::due(rule, a, slot, *interval_s, *last_seen_ms, now, &mut emit),
            RuleSpec::FollowUp(f) => follow_up::due(rule, f, slot, now, &mut emit),
            RuleSpec::Stuck(s) => stuck::due(rule, s, slot, *last_seen_ms, now, &mut emit),
            RuleSpec::Trend(_) | RuleSpec::Event(_) | RuleSpec::Composite(_) => {}
        }
        let next = next_deadline(rule, slot, now);
        arm(&mut self.timers, device, epoch, i, &mut slot.queued, next, now + 1);
        drop_idle(slot);
    }

    /// Runs what signals feed (follow-ups, composites) and counts them.
    fn finish(&mut self, start: usize, now: i64, out: &mut Vec<Signal>) {
        let mut n = start;
        while n < out.len() {
            let sig = &out[n];
            n += 1;
            if sig.scope != Scope::Device {
                continue;
            }
            let (opened, cleared) =
                (matches!(sig.change, Change::Open { .. }), matches!(sig.change, Change::Clear { .. }));
            let contributes = opened || matches!(sig.change, Change::Repeat { .. });
            let (device, site, kind, ts, rule) =
                (sig.device.clone(), sig.site.clone(), sig.kind, sig.ts_ms, sig.rule.clone());
            let Some(d) = self.devices.get_mut(&device) else { continue };
            let Some(i) = d.rules.index_of(&rule) else { continue };
            let eff = d.rules.clone();
            if opened || cleared {
                for &j in &eff.followers[i] {
                    let j = usize::from(j);
                    let (follower, slot) = (&eff.rules[j], &mut d.slots[j]);
                    let RuleSpec::FollowUp(f) = &follower.def.spec else { continue };
                    follow_up::on_leader(f, slot, cleared, now);
                    let next = next_deadline(follower, slot, now);
                    arm(&mut self.timers, &device, d.epoch, j, &mut slot.queued, next, NONE);
                    drop_idle(slot);
                }
            }
            if contributes {
                for &j in &eff.composites[i] {
                    let compiled = &eff.rules[usize::from(j)];
                    let RuleSpec::Composite(c) = &compiled.def.spec else { continue };
                    let dev = DeviceCtx { id: &device, site: &site, kind, interval_s: 0 };
                    composite::contribute(&mut self.sites, &mut self.timers, compiled, c, &dev, ts, now, out);
                }
            }
        }
        for sig in &out[start..] {
            match sig.change {
                Change::Open { .. } => self.counts.open += 1,
                Change::Repeat { .. } => self.counts.repeat += 1,
                Change::Clear { .. } => self.counts.clear += 1,
                Change::Remind { .. } => self.counts.remind += 1,
            }
        }
    }
}

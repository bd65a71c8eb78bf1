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
mod follow_up;
mod rate;
mod state;
mod stuck;
mod threshold;
mod trend;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use citywatch_edge::wire::{EventKind, LinkState, Metric};
use serde::Serialize;

pub(crate) use compiled::Effective;

use super::config::RuleSpec;
use super::RuleSet;
use crate::model::{Change, DeviceCtx, Scope, Signal};
use absence::{arm_absence, seen};
use composite::{arm_site, composite_contribute, site_composite, site_deadline, SiteComposite};
use emit::Emit;
use follow_up::{event_metric, follow_up_expectation, follow_up_state};
use rate::{rate_eval, RATE_SAMPLES};
use state::{arm, device_state, drop_idle, next_deadline, DeviceState, State, Target, Timers, NONE, NO_TIMER};
use stuck::stuck_state;
use threshold::{threshold_eval, threshold_state};
use trend::{trend_add, trend_eval, trend_state};

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
    devices: HashMap<Arc<str>, DeviceState>,
    /// Per site, its composite rules' state.
    sites: HashMap<Arc<str>, Vec<SiteComposite>>,
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
        seen(d, dev.id, timers, now_ms, out);
        let DeviceState { rules: eff, slots, epoch, kind, .. } = d;
        let mut emit = Emit { out, device: dev.id, site: dev.site, kind: *kind };
        for &i in &eff.by_metric[metric as usize] {
            let i = usize::from(i);
            let (rule, slot) = (&eff.rules[i], &mut slots[i]);
            match &rule.def.spec {
                RuleSpec::Threshold(t) => {
                    let active = slot.active;
                    if !active && slot.state.is_none() && !t.levels.iter().any(|l| l.when.holds(value)) {
                        // Idle and staying idle: the common case, no state to touch.
                        continue;
                    }
                    let st = threshold_state(&mut slot.state);
                    st.last = value;
                    for (h, level) in st.holds.iter_mut().zip(&t.levels) {
                        *h = if !level.when.holds(value) {
                            NONE
                        } else if *h == NONE {
                            now_ms
                        } else {
                            *h
                        };
                    }
                    st.clear_since = match &t.clear {
                        Some(c) if active && c.holds(value) && st.clear_since == NONE => now_ms,
                        Some(c) if active && c.holds(value) => st.clear_since,
                        _ => NONE,
                    };
                    threshold_eval(rule, t, slot, now_ms, ts_ms, true, &mut emit);
                }
                RuleSpec::Rate(r) => {
                    let samples =
                        match slot.state.get_or_insert_with(|| Box::new(State::Rate(VecDeque::new()))).as_mut() {
                            State::Rate(s) => s,
                            _ => continue,
                        };
                    if samples.len() == RATE_SAMPLES {
                        samples.pop_front();
                    }
                    samples.push_back((now_ms, value));
                    rate_eval(rule, r, slot, now_ms, ts_ms, true, &mut emit);
                }
                RuleSpec::Trend(t) => {
                    let State::Trend(st) =
                        slot.state.get_or_insert_with(|| Box::new(State::Trend(trend_state()))).as_mut()
                    else {
                        continue;
                    };
                    if trend_add(t, st, ts_ms, value) {
                        trend_eval(rule, t, st, &mut slot.active, ts_ms, &mut emit);
                    }
                }
                RuleSpec::Stuck(s) => {
                    let State::Stuck(list) =
                        slot.state.get_or_insert_with(|| Box::new(stuck_state(&s.metrics, *kind))).as_mut()
                    else {
                        continue;
                    };
                    let Some(m) = list.iter_mut().find(|m| m.metric == metric) else { continue };
                    if m.since == NONE {
                        (m.last, m.since) = (value, now_ms);
                    } else if value == m.last {
                        let newly = !m.stuck && now_ms - m.since >= s.held_for.as_ms();
                        m.stuck |= newly;
                        if newly && !slot.active {
                            slot.active = true;
                            emit.open(rule, ts_ms, rule.def.severity, Some(metric), Some(value), None);
                        } else if m.stuck && slot.active {
                            emit.repeat(rule, ts_ms, rule.def.severity, Some(metric), Some(value), None);
                        }
                    } else {
                        (m.last, m.since, m.stuck) = (value, now_ms, false);
                        if slot.active && !list.iter().any(|m| m.stuck) {
                            slot.active = false;
                            emit.clear(rule, ts_ms, Some(metric), Some(value));
                        }
                    }
                }
                RuleSpec::FollowUp(f) => {
                    let Some(expect) = f.expect.filter(|e| e.metric == metric) else { continue };
                    let ok = expect.when.holds(value);
                    if !ok && !slot.active && slot.state.is_none() {
                        continue;
                    }
                    let st = follow_up_state(&mut slot.state);
                    st.expect_ok = ok;
                    follow_up_expectation(rule, slot, ok, metric, value, ts_ms, &mut emit);
                }
                _ => {}
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
        seen(d, dev.id, timers, now_ms, out);
        let DeviceState { rules: eff, slots, epoch, kind, .. } = d;
        let mut emit = Emit { out, device: dev.id, site: dev.site, kind: *kind };
        for &i in &eff.by_event[event as usize] {
            let i = usize::from(i);
            let (rule, slot) = (&eff.rules[i], &mut slots[i]);
            match &rule.def.spec {
                RuleSpec::Event(e) => {
                    if e.open_on.contains(&event) {
                        if slot.active {
                            emit.repeat(rule, ts_ms, rule.def.severity, metric, value, None);
                        } else {
                            slot.active = true;
                            emit.open(rule, ts_ms, rule.def.severity, metric, value, None);
                        }
                    } else if e.clear_on.contains(&event) && slot.active {
                        slot.active = false;
                        emit.clear(rule, ts_ms, metric, value);
                    }
                }
                RuleSpec::Threshold(t) => {
                    let Some(first) = t.levels.first() else { continue };
                    let st = threshold_state(&mut slot.state);
                    if slot.active {
                        let severity = t.levels.get(st.level).map_or(first.severity, |l| l.severity);
                        emit.repeat(rule, ts_ms, severity, Some(t.metric), value, None);
                    } else {
                        slot.active = true;
                        st.level = 0;
                        st.clear_since = NONE;
                        emit.open(rule, ts_ms, first.severity, Some(t.metric), value, Some(first.when.value));
                    }
                }
                RuleSpec::FollowUp(f) if f.expect_event == Some(event) => {
                    follow_up_state(&mut slot.state).event_ms = now_ms;
                    follow_up_expectation(
                        rule,
                        slot,
                        true,
                        metric.unwrap_or(event_metric(f)),
                        value.unwrap_or(f64::NAN),
                        ts_ms,
                        &mut emit,
                    );
                }
                _ => {}
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
                seen(d, dev.id, timers, now_ms, out);
            }
            LinkState::Offline => {
                d.offline = true;
                let DeviceState { rules: eff, slots, kind, .. } = d;
                let mut emit = Emit { out, device: dev.id, site: dev.site, kind: *kind };
                for &i in &eff.absence {
                    let (rule, slot) = (&eff.rules[usize::from(i)], &mut slots[usize::from(i)]);
                    if let RuleSpec::Absence(a) = &rule.def.spec {
                        if a.open_on_offline && !slot.active {
                            slot.active = true;
                            emit.open(rule, now_ms, rule.def.severity, None, None, None);
                        }
                    }
                }
            }
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
        seen(d, dev.id, timers, now_ms, out);
        self.finish(start, now_ms, out);
    }

    /// A device known at start (from the registry), last heard at `last_seen_ms`, so absence
    /// works for devices that never speak again.
    pub fn track(&mut self, dev: &DeviceCtx, last_seen_ms: i64) {
        let Engine { rules, devices, timers, next_epoch, .. } = self;
        let d = device_state(devices, rules, next_epoch, dev);
        d.last_seen_ms = d.last_seen_ms.max(last_seen_ms);
        arm_absence(d, dev.id, timers);
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
            RuleSpec::Composite(c) => {
                let st = site_composite(sites, dev.site, &compiled.name, dev, c);
                st.active = true;
                st.last_ms = NONE;
                if !st.members.contains(dev.id) {
                    st.members.push(dev.id.clone());
                }
                // Counts from the first tick (restore has no clock).
                arm_site(timers, dev.site, st, Some(NONE + 1));
            }
            RuleSpec::Threshold(_) => {
                slot.active = true;
                threshold_state(&mut slot.state).level = 0;
            }
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
            Scope::Site => {
                if let Some(st) = self.sites.get_mut(site).and_then(|l| l.iter_mut().find(|s| &*s.rule == rule)) {
                    st.active = false;
                    st.members.clear();
                    st.recent.clear();
                }
            }
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
                Target::Site { site, rule } => self.site_due(&site, &rule, timer.at, now_ms, out),
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
        let DeviceState { rules: eff, slots, site, kind, interval_s, last_seen_ms, .. } = d;
        let (rule, slot) = (&eff.rules[i], &mut slots[i]);
        slot.queued = NO_TIMER;
        let mut emit = Emit { out, device, site, kind: *kind };
        match &rule.def.spec {
            RuleSpec::Threshold(t) => threshold_eval(rule, t, slot, now, now, false, &mut emit),
            RuleSpec::Rate(r) => rate_eval(rule, r, slot, now, now, false, &mut emit),
            RuleSpec::Absence(a) => {
                if let Some(State::Absence { deadline }) = slot.state.as_deref() {
                    if !slot.active && now >= *deadline {
                        slot.active = true;
                        let silent_s = ((now - *last_seen_ms) / 1000) as f64;
                        let limit_s = (a.silence_ms(*interval_s) / 1000) as f64;
                        emit.open(rule, now, rule.def.severity, None, Some(silent_s), Some(limit_s));
                    }
                }
            }
            RuleSpec::FollowUp(f) => {
                let st = follow_up_state(&mut slot.state);
                if st.deadline != NONE && now >= st.deadline {
                    st.deadline = NONE;
                    if !slot.active {
                        slot.active = true;
                        let (metric, threshold) =
                            f.expect.map_or((None, None), |e| (Some(e.metric), Some(e.when.value)));
                        emit.open(rule, now, rule.def.severity, metric, None, threshold);
                    }
                }
            }
            RuleSpec::Stuck(s) => {
                if let Some(State::Stuck(list)) = slot.state.as_deref_mut() {
                    let mut newly = None;
                    for m in list.iter_mut() {
                        if !m.stuck && m.since != NONE && now - m.since >= s.held_for.as_ms() && *last_seen_ms > m.since
                        {
                            m.stuck = true;
                            newly = newly.or(Some((m.metric, m.last)));
                        }
                    }
                    if let Some((metric, value)) = newly {
                        if slot.active {
                            emit.repeat(rule, now, rule.def.severity, Some(metric), Some(value), None);
                        } else {
                            slot.active = true;
                            emit.open(rule, now, rule.def.severity, Some(metric), Some(value), None);
                        }
                    }
                }
            }
            RuleSpec::Trend(_) | RuleSpec::Event(_) | RuleSpec::Composite(_) => {}
        }
        let next = next_deadline(rule, slot, now);
        arm(&mut self.timers, device, epoch, i, &mut slot.queued, next, now + 1);
        drop_idle(slot);
    }

    fn site_due(&mut self, site: &Arc<str>, rule: &Arc<str>, at: i64, now: i64, out: &mut Vec<Signal>) {
        let Some(list) = self.sites.get_mut(site) else { return };
        let Some(pos) = list.iter().position(|s| s.rule == *rule) else { return };
        let st = &mut list[pos];
        if st.queued != at {
            return;
        }
        st.queued = NO_TIMER;
        if st.last_ms == NONE {
            st.last_ms = now;
        }
        while st.recent.front().is_some_and(|(t, _)| *t < now - st.within_ms) {
            st.recent.pop_front();
        }
        if let (true, Some(after)) = (st.active, st.clear_after_ms) {
            if now - st.last_ms >= after {
                st.active = false;
                st.members.clear();
                out.push(Signal {
                    rule: st.rule.clone(),
                    scope: Scope::Site,
                    site: site.clone(),
                    device: st.last_device.clone(),
                    kind: st.last_kind,
                    ts_ms: now,
                    members: Vec::new(),
                    change: Change::Clear {
                        value: None,
                        summary: format!("{} at {site} cleared: nothing contributing for {} s", st.rule, after / 1000),
                    },
                });
            }
        }
        let next = site_deadline(st).map(|t| t.max(now + 1));
        if next.is_none() && !st.active {
            list.swap_remove(pos);
            if list.is_empty() {
                self.sites.remove(site);
            }
            return;
        }
        arm_site(&mut self.timers, site, st, next);
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
                    let st = follow_up_state(&mut slot.state);
                    if cleared {
                        st.deadline = NONE;
                    } else if !slot.active && st.deadline == NONE {
                        let met = st.expect_ok || (st.event_ms != NONE && now - st.event_ms <= f.within.as_ms());
                        if !met {
                            st.deadline = now + f.within.as_ms();
                        }
                    }
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
                    composite_contribute(&mut self.sites, &mut self.timers, compiled, c, &dev, ts, now, out);
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

//! The rule engine: per device and rule, the little state each rule kind needs, fed by
//! readings, events, link states and a once-a-second `tick`, emitting [`Signal`]s. Synchronous
//! and I/O-free; it owns no incidents (the manager does) and keeps no history beyond what its
//! rules need (a 32-sample ring for rates, bucket means for trends).
//!
//! Timers (holds, silence deadlines, follow-up deadlines, stuck sensors) live in one
//! min-heap with lazy invalidation: a slot remembers its earliest queued deadline, later ones
//! are only queued when that fires, and entries of forgotten or rebuilt devices are skipped.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use citywatch_edge::wire::{DeviceKind, EventKind, LinkState, Metric};
use serde::Serialize;

use super::config::{number, render, Composite, FollowUp, RuleDef, RuleSpec, Threshold, Trend, MAX_LEVELS};
use super::RuleSet;
use crate::model::{Change, DeviceCtx, Scope, Severity, Signal};

/// "Not set" for times.
const NONE: i64 = i64::MIN;
/// "No timer queued".
const NO_TIMER: i64 = i64::MAX;
/// Samples a rate rule keeps per device; a device sending faster shortens the window.
const RATE_SAMPLES: usize = 32;
/// Recent contributions a composite rule keeps per site (distinct devices).
const COMPOSITE_RECENT: usize = 64;

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

// ---------------------------------------------------------------------------------------------
// The compiled rule lists.

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
    by_metric: Vec<Vec<u16>>,
    /// Per `EventKind as usize`: event, threshold (open_on_events) and follow-up rules.
    by_event: Vec<Vec<u16>>,
    absence: Vec<u16>,
    /// Per rule: the follow-up rules started by it.
    followers: Vec<Vec<u16>>,
    /// Per rule: the composite rules it counts towards.
    composites: Vec<Vec<u16>>,
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

    fn index_of(&self, name: &str) -> Option<usize> {
        self.rules.iter().position(|r| &*r.name == name)
    }
}

/// Rules fed by other rules' signals rather than by the device.
fn is_derived(def: &RuleDef) -> bool {
    matches!(def.spec, RuleSpec::FollowUp(_) | RuleSpec::Composite(_))
}

// ---------------------------------------------------------------------------------------------
// State.

#[derive(Debug)]
struct DeviceState {
    site: Arc<str>,
    kind: DeviceKind,
    interval_s: u32,
    /// Distinguishes this state from an earlier one of the same id (forgotten, or rebuilt after
    /// a kind or site change), so their queued timers are skipped.
    epoch: u32,
    last_seen_ms: i64,
    /// The last link state was `offline` (or an absence incident was restored): only data or
    /// an `online` status prove the device back, not its offline status message itself.
    offline: bool,
    rules: Arc<Effective>,
    slots: Box<[Slot]>,
}

/// One rule's state for one device.
#[derive(Debug)]
struct Slot {
    active: bool,
    /// Earliest deadline queued for this slot, or NO_TIMER.
    queued: i64,
    /// None while there is nothing to remember (most rules, most of the time).
    state: Option<Box<State>>,
}

#[derive(Debug)]
enum State {
    Threshold(ThresholdState),
    /// (gateway time, value), oldest first.
    Rate(VecDeque<(i64, f64)>),
    Trend(TrendState),
    Absence {
        deadline: i64,
    },
    FollowUp(FollowUpState),
    Stuck(Vec<StuckMetric>),
}

#[derive(Debug)]
struct ThresholdState {
    /// The active level (while active).
    level: usize,
    /// Since when each level's condition has held, or NONE.
    holds: [i64; MAX_LEVELS],
    /// Since when the clear condition has held while active, or NONE.
    clear_since: i64,
    /// The latest value (NaN before the first reading).
    last: f64,
}

#[derive(Debug)]
struct TrendState {
    /// Index of the open bucket (`ts / bucket`).
    bucket: i64,
    sum: f64,
    count: u32,
    /// Closed buckets: (index, mean), oldest first.
    closed: VecDeque<(i64, f64)>,
}

#[derive(Debug)]
struct FollowUpState {
    deadline: i64,
    /// The latest reading of the expected metric meets the expectation.
    expect_ok: bool,
    /// When the expected event last came, or NONE.
    event_ms: i64,
}

#[derive(Debug)]
struct StuckMetric {
    metric: Metric,
    last: f64,
    /// When `last` was first seen (gateway time), or NONE.
    since: i64,
    stuck: bool,
}

/// A composite rule's state at one site.
#[derive(Debug)]
struct SiteComposite {
    rule: Arc<str>,
    active: bool,
    /// (gateway time, device) of recent contributions, one per device, oldest first.
    recent: VecDeque<(i64, Arc<str>)>,
    /// Devices counted in the current incident.
    members: Vec<Arc<str>>,
    last_device: Arc<str>,
    last_kind: DeviceKind,
    /// Gateway time of the last contribution, or NONE (restored, not yet ticked).
    last_ms: i64,
    within_ms: i64,
    clear_after_ms: Option<i64>,
    queued: i64,
}

#[derive(Debug)]
enum Target {
    Slot { device: Arc<str>, epoch: u32, slot: u16 },
    Site { site: Arc<str>, rule: Arc<str> },
}

/// A deadline; ordered by time only.
#[derive(Debug)]
struct Timer {
    at: i64,
    target: Target,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

type Timers = BinaryHeap<Reverse<Timer>>;

/// Queues `at` for a slot unless an earlier deadline is already queued (that one re-arms).
fn arm(timers: &mut Timers, device: &Arc<str>, epoch: u32, slot: usize, queued: &mut i64, at: Option<i64>, floor: i64) {
    let Some(at) = at.map(|at| at.max(floor)) else { return };
    if at < *queued {
        *queued = at;
        timers.push(Reverse(Timer { at, target: Target::Slot { device: device.clone(), epoch, slot: slot as u16 } }));
    }
}

/// Builds the signals of one device.
struct Emit<'a> {
    out: &'a mut Vec<Signal>,
    device: &'a Arc<str>,
    site: &'a Arc<str>,
    kind: DeviceKind,
}

impl Emit<'_> {
    fn push(&mut self, rule: &CompiledRule, ts_ms: i64, change: Change) {
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

    fn open(
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

    fn repeat(
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

    fn clear(&mut self, rule: &CompiledRule, ts: i64, metric: Option<Metric>, value: Option<f64>) {
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
fn summary(
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

fn nan_to_none(v: f64) -> Option<f64> {
    (!v.is_nan()).then_some(v)
}

fn earliest(a: Option<i64>, b: i64) -> Option<i64> {
    Some(a.map_or(b, |a| a.min(b)))
}

// ---------------------------------------------------------------------------------------------
// The engine.

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

/// The device's state, created (or rebuilt after a kind or site change) as needed.
fn device_state<'e>(
    devices: &'e mut HashMap<Arc<str>, DeviceState>,
    rules: &RuleSet,
    next_epoch: &mut u32,
    dev: &DeviceCtx,
) -> &'e mut DeviceState {
    let fresh = |next_epoch: &mut u32, last_seen_ms: i64, offline: bool| {
        let effective = rules.effective_for(dev.kind, dev.site, dev.id);
        let slots = (0..effective.rules.len()).map(|_| Slot { active: false, queued: NO_TIMER, state: None }).collect();
        *next_epoch = next_epoch.wrapping_add(1);
        DeviceState {
            site: dev.site.clone(),
            kind: dev.kind,
            interval_s: dev.interval_s,
            epoch: *next_epoch,
            last_seen_ms,
            offline,
            rules: effective,
            slots,
        }
    };
    let d = devices.entry(dev.id.clone()).or_insert_with(|| fresh(next_epoch, NONE, false));
    if d.kind != dev.kind || (!Arc::ptr_eq(&d.site, dev.site) && d.site != *dev.site) {
        // Re-registered as another kind or at another site: its rules change, so its state
        // starts over (incidents of the old rules stay with the manager).
        *d = fresh(next_epoch, d.last_seen_ms, d.offline);
    }
    d.interval_s = dev.interval_s;
    d
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

/// A message from the device: absence rules clear (unless after an `offline` status) and their
/// deadlines move.
fn seen(d: &mut DeviceState, id: &Arc<str>, timers: &mut Timers, now: i64, out: &mut Vec<Signal>) {
    d.last_seen_ms = d.last_seen_ms.max(now);
    if d.rules.absence.is_empty() {
        return;
    }
    if !d.offline {
        let DeviceState { rules: eff, slots, site, kind, .. } = &mut *d;
        let mut emit = Emit { out, device: id, site, kind: *kind };
        for &i in &eff.absence {
            let (rule, slot) = (&eff.rules[usize::from(i)], &mut slots[usize::from(i)]);
            if slot.active {
                slot.active = false;
                emit.clear(rule, now, None, None);
            }
        }
    }
    arm_absence(d, id, timers);
}

fn arm_absence(d: &mut DeviceState, id: &Arc<str>, timers: &mut Timers) {
    if d.last_seen_ms == NONE {
        return;
    }
    let DeviceState { rules: eff, slots, epoch, interval_s, last_seen_ms, .. } = d;
    for &i in &eff.absence {
        let i = usize::from(i);
        let (rule, slot) = (&eff.rules[i], &mut slots[i]);
        let RuleSpec::Absence(a) = &rule.def.spec else { continue };
        let deadline = last_seen_ms.saturating_add(a.silence_ms(*interval_s));
        slot.state = Some(Box::new(State::Absence { deadline }));
        let next = (!slot.active).then_some(deadline);
        arm(timers, id, *epoch, i, &mut slot.queued, next, NONE);
    }
}

/// The next time the slot's rule needs the clock, if any.
fn next_deadline(rule: &CompiledRule, slot: &Slot, now: i64) -> Option<i64> {
    let state = slot.state.as_deref()?;
    let mut next = None;
    match (&rule.def.spec, state) {
        (RuleSpec::Threshold(t), State::Threshold(st)) => {
            for (k, level) in t.levels.iter().enumerate() {
                if st.holds[k] != NONE && (!slot.active || k > st.level) {
                    next = earliest(next, st.holds[k] + level.when.held_ms());
                }
            }
            let any_holds = st.holds.iter().take(t.levels.len()).any(|h| *h != NONE);
            if let (true, false, Some(c)) = (slot.active, any_holds, &t.clear) {
                if st.clear_since != NONE {
                    next = earliest(next, st.clear_since + c.held_ms());
                }
            }
        }
        (RuleSpec::Rate(r), State::Rate(samples)) if slot.active && samples.len() >= 2 => {
            next = Some(samples[1].0 + r.window.as_ms());
        }
        (RuleSpec::Absence(_), State::Absence { deadline }) if !slot.active => next = Some(*deadline),
        (RuleSpec::FollowUp(_), State::FollowUp(st)) if st.deadline != NONE => next = Some(st.deadline),
        (RuleSpec::Stuck(s), State::Stuck(list)) => {
            for m in list.iter().filter(|m| !m.stuck && m.since != NONE) {
                next = earliest(next, m.since + s.held_for.as_ms());
            }
        }
        _ => {}
    }
    // Deadlines already passed were acted upon by the evaluation that just ran.
    next.filter(|at| *at > now)
}

/// Frees state that holds nothing worth keeping.
fn drop_idle(slot: &mut Slot) {
    let idle = match slot.state.as_deref() {
        Some(State::Threshold(st)) => !slot.active && st.holds.iter().all(|h| *h == NONE),
        Some(State::FollowUp(st)) => !slot.active && st.deadline == NONE && !st.expect_ok && st.event_ms == NONE,
        _ => false,
    };
    if idle {
        slot.state = None;
    }
}

fn threshold_state(state: &mut Option<Box<State>>) -> &mut ThresholdState {
    let state = state.get_or_insert_with(|| {
        Box::new(State::Threshold(ThresholdState {
            level: 0,
            holds: [NONE; MAX_LEVELS],
            clear_since: NONE,
            last: f64::NAN,
        }))
    });
    if !matches!(state.as_ref(), State::Threshold(_)) {
        **state =
            State::Threshold(ThresholdState { level: 0, holds: [NONE; MAX_LEVELS], clear_since: NONE, last: f64::NAN });
    }
    match state.as_mut() {
        State::Threshold(st) => st,
        // Invariant: set to a Threshold just above.
        _ => unreachable!("threshold state"),
    }
}

fn follow_up_state(state: &mut Option<Box<State>>) -> &mut FollowUpState {
    let fresh = || State::FollowUp(FollowUpState { deadline: NONE, expect_ok: false, event_ms: NONE });
    let state = state.get_or_insert_with(|| Box::new(fresh()));
    if !matches!(state.as_ref(), State::FollowUp(_)) {
        **state = fresh();
    }
    match state.as_mut() {
        State::FollowUp(st) => st,
        // Invariant: set to a FollowUp just above.
        _ => unreachable!("follow-up state"),
    }
}

fn trend_state() -> TrendState {
    TrendState { bucket: NONE, sum: 0.0, count: 0, closed: VecDeque::new() }
}

fn stuck_state(metrics: &[Metric], kind: DeviceKind) -> State {
    State::Stuck(
        metrics
            .iter()
            .filter(|m| kind.has_metric(**m))
            .map(|&metric| StuckMetric { metric, last: f64::NAN, since: NONE, stuck: false })
            .collect(),
    )
}

fn event_metric(f: &FollowUp) -> Metric {
    f.expect.map_or(Metric::ValveClosed, |e| e.metric)
}

/// Levels qualify when held for their `for`; the highest one counts. While active: upgrades
/// repeat at the new severity, a reading still matching repeats, and it clears when no level
/// holds and the clear condition (if any) has held for its `for`.
fn threshold_eval(
    rule: &CompiledRule,
    t: &Threshold,
    slot: &mut Slot,
    now: i64,
    ts: i64,
    from_reading: bool,
    emit: &mut Emit,
) {
    let active = slot.active;
    let st = threshold_state(&mut slot.state);
    let n = t.levels.len();
    let qualified = (0..n).rev().find(|&k| st.holds[k] != NONE && now - st.holds[k] >= t.levels[k].when.held_ms());
    let any_holds = st.holds.iter().take(n).any(|h| *h != NONE);
    let metric = Some(t.metric);
    let value = nan_to_none(st.last);
    if !active {
        if let Some(k) = qualified {
            st.level = k;
            st.clear_since = NONE;
            let level = t.levels[k];
            slot.active = true;
            emit.open(rule, ts, level.severity, metric, value, Some(level.when.value));
        }
        return;
    }
    if let Some(k) = qualified.filter(|k| *k > st.level) {
        st.level = k;
        let level = t.levels[k];
        emit.repeat(rule, ts, level.severity, metric, value, Some(level.when.value));
        return;
    }
    let level = t.levels.get(st.level).or(t.levels.first());
    if any_holds {
        if let (true, Some(level)) = (from_reading, level) {
            emit.repeat(rule, ts, level.severity, metric, value, Some(level.when.value));
        }
        return;
    }
    let clears = match &t.clear {
        None => from_reading,
        Some(c) => st.clear_since != NONE && now - st.clear_since >= c.held_ms(),
    };
    if clears {
        st.level = 0;
        st.clear_since = NONE;
        slot.active = false;
        emit.clear(rule, ts, metric, value);
    }
}

/// The change from the value at the window's start (the last sample at or before it: devices
/// send on change, so it persisted) to the latest.
fn rate_eval(
    rule: &CompiledRule,
    r: &super::Rate,
    slot: &mut Slot,
    now: i64,
    ts: i64,
    from_reading: bool,
    emit: &mut Emit,
) {
    let Some(State::Rate(samples)) = slot.state.as_deref_mut() else { return };
    let start = now - r.window.as_ms();
    while samples.len() >= 2 && samples[1].0 <= start {
        samples.pop_front();
    }
    let (Some(first), Some(last)) = (samples.front(), samples.back()) else { return };
    let (limit, fall) = r.limit();
    let change = last.1 - first.1;
    let holds = if fall { -change >= limit } else { change >= limit };
    let (metric, value, threshold) = (Some(r.metric), Some(change), Some(limit));
    match (slot.active, holds) {
        (false, true) => {
            slot.active = true;
            emit.open(rule, ts, rule.def.severity, metric, value, threshold);
        }
        (true, true) if from_reading => emit.repeat(rule, ts, rule.def.severity, metric, value, threshold),
        (true, false) => {
            slot.active = false;
            emit.clear(rule, ts, metric, value);
        }
        _ => {}
    }
}

/// Adds a reading to its bucket; true when that closed the previous bucket. Readings older than
/// the open bucket are ignored (late).
fn trend_add(t: &Trend, st: &mut TrendState, ts: i64, value: f64) -> bool {
    let bucket_ms = t.bucket.as_ms().max(1);
    let index = ts.div_euclid(bucket_ms);
    if st.count == 0 || st.bucket == NONE {
        (st.bucket, st.sum, st.count) = (index, value, 1);
        return false;
    }
    if index < st.bucket {
        return false;
    }
    if index == st.bucket {
        st.sum += value;
        st.count += 1;
        return false;
    }
    st.closed.push_back((st.bucket, st.sum / f64::from(st.count)));
    let keep = t.over.as_ms() / bucket_ms;
    while st.closed.front().is_some_and(|(b, _)| st.bucket.saturating_sub(*b) >= keep) {
        st.closed.pop_front();
    }
    (st.bucket, st.sum, st.count) = (index, value, 1);
    true
}

/// Least-squares slope of the closed buckets' means, in the rule's unit, once they span
/// `min_span`.
fn trend_slope(t: &Trend, closed: &VecDeque<(i64, f64)>) -> Option<f64> {
    let (first, last) = (closed.front()?, closed.back()?);
    let bucket_ms = t.bucket.as_ms();
    if closed.len() < 2 || last.0.saturating_sub(first.0).saturating_mul(bucket_ms) < t.min_span.as_ms() {
        return None;
    }
    let n = closed.len() as f64;
    let x = |b: i64| b.saturating_sub(first.0) as f64 * bucket_ms as f64;
    let mean_x = closed.iter().map(|(b, _)| x(*b)).sum::<f64>() / n;
    let mean_y = closed.iter().map(|(_, y)| *y).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (b, y) in closed {
        let dx = x(*b) - mean_x;
        sxy += dx * (y - mean_y);
        sxx += dx * dx;
    }
    (sxx > 0.0).then(|| sxy / sxx * t.per.ms())
}

fn trend_eval(rule: &CompiledRule, t: &Trend, st: &TrendState, active: &mut bool, ts: i64, emit: &mut Emit) {
    let Some(slope) = trend_slope(t, &st.closed) else { return };
    let (metric, value, threshold) = (Some(t.metric), Some(slope), Some(t.rate_above));
    match (*active, slope > t.rate_above) {
        (false, true) => {
            *active = true;
            emit.open(rule, ts, rule.def.severity, metric, value, threshold);
        }
        (true, true) => emit.repeat(rule, ts, rule.def.severity, metric, value, threshold),
        (true, false) => {
            *active = false;
            emit.clear(rule, ts, metric, value);
        }
        (false, false) => {}
    }
}

/// The expected reading or event came (`ok`), or a reading says it is not (any more) met.
fn follow_up_expectation(
    rule: &CompiledRule,
    slot: &mut Slot,
    ok: bool,
    metric: Metric,
    value: f64,
    ts: i64,
    emit: &mut Emit,
) {
    if ok {
        follow_up_state(&mut slot.state).deadline = NONE;
        if slot.active {
            slot.active = false;
            emit.clear(rule, ts, Some(metric), nan_to_none(value));
        }
    } else if slot.active {
        emit.repeat(rule, ts, rule.def.severity, Some(metric), nan_to_none(value), None);
    }
}

fn site_composite<'s>(
    sites: &'s mut HashMap<Arc<str>, Vec<SiteComposite>>,
    site: &Arc<str>,
    rule: &Arc<str>,
    dev: &DeviceCtx,
    c: &Composite,
) -> &'s mut SiteComposite {
    let list = sites.entry(site.clone()).or_default();
    let pos = match list.iter().position(|s| s.rule == *rule) {
        Some(pos) => pos,
        None => {
            list.push(SiteComposite {
                rule: rule.clone(),
                active: false,
                recent: VecDeque::new(),
                members: Vec::new(),
                last_device: dev.id.clone(),
                last_kind: dev.kind,
                last_ms: NONE,
                within_ms: c.within.as_ms(),
                clear_after_ms: None,
                queued: NO_TIMER,
            });
            list.len() - 1
        }
    };
    let st = &mut list[pos];
    st.within_ms = c.within.as_ms();
    st.clear_after_ms = c.clear_after.map(|d| d.as_ms());
    st
}

fn site_deadline(st: &SiteComposite) -> Option<i64> {
    match (st.active, st.clear_after_ms) {
        (true, Some(after)) if st.last_ms != NONE => Some(st.last_ms + after),
        (true, Some(_)) => Some(NONE + 1),
        _ => st.recent.front().map(|(t, _)| t + st.within_ms + 1),
    }
}

fn arm_site(timers: &mut Timers, site: &Arc<str>, st: &mut SiteComposite, at: Option<i64>) {
    let Some(at) = at else { return };
    if at < st.queued {
        st.queued = at;
        timers.push(Reverse(Timer { at, target: Target::Site { site: site.clone(), rule: st.rule.clone() } }));
    }
}

/// An Open or Repeat of one of a composite's rules, from `dev`.
#[allow(clippy::too_many_arguments)]
fn composite_contribute(
    sites: &mut HashMap<Arc<str>, Vec<SiteComposite>>,
    timers: &mut Timers,
    rule: &CompiledRule,
    c: &Composite,
    dev: &DeviceCtx,
    ts: i64,
    now: i64,
    out: &mut Vec<Signal>,
) {
    let st = site_composite(sites, dev.site, &rule.name, dev, c);
    while st.recent.front().is_some_and(|(t, _)| *t < now - st.within_ms) {
        st.recent.pop_front();
    }
    if let Some(pos) = st.recent.iter().position(|(_, d)| d == dev.id) {
        st.recent.remove(pos);
    }
    if st.recent.len() == COMPOSITE_RECENT {
        st.recent.pop_front();
    }
    st.recent.push_back((now, dev.id.clone()));
    (st.last_device, st.last_kind, st.last_ms) = (dev.id.clone(), dev.kind, now);
    let signal = |change, members: &Vec<Arc<str>>| Signal {
        rule: rule.name.clone(),
        scope: Scope::Site,
        site: dev.site.clone(),
        device: dev.id.clone(),
        kind: dev.kind,
        ts_ms: ts,
        change,
        members: members.clone(),
    };
    let threshold = Some(f64::from(c.min_devices));
    if !st.active {
        if st.recent.len() >= c.min_devices as usize {
            st.active = true;
            st.members = st.recent.iter().map(|(_, d)| d.clone()).collect();
            let value = Some(st.members.len() as f64);
            let summary = summary(rule, dev.id, dev.site, None, value, threshold);
            out.push(signal(
                Change::Open { severity: rule.def.severity, metric: None, value, threshold, summary, action: rule.def.action },
                &st.members,
            ));
        }
    } else if !st.members.contains(dev.id) {
        st.members.push(dev.id.clone());
        let value = Some(st.members.len() as f64);
        let summary = summary(rule, dev.id, dev.site, None, value, threshold);
        out.push(signal(Change::Repeat { severity: rule.def.severity, value, summary }, &st.members));
    }
    let next = site_deadline(st);
    arm_site(timers, dev.site, st, next);
}
